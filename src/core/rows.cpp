#include "core/rows.hpp"

#include <algorithm>
#include <bit>
#include <climits>
#include <cstdint>
#include <string>

#include "core/check.hpp"
#include "core/log.hpp"

namespace kiln {

RowLayout row_layout(const TensorView& x) {
  RowLayout layout{};
  layout.rows = 1;
  for (int d = 0; d + 1 < x.dim(); ++d) {
    const long long size = x.size(d), stride = x.stride(d);
    layout.rows *= size;
    if (size == 1) continue;
    if (layout.dims > 0 && layout.stride[layout.dims - 1] == stride * size) {
      // The previous dim steps exactly over this one: one dim of both.
      layout.size[layout.dims - 1] *= size;
      layout.stride[layout.dims - 1] = stride;
      continue;
    }
    layout.size[layout.dims] = size;
    layout.stride[layout.dims] = stride;
    ++layout.dims;
  }
  return layout;
}

int vector_ept(DType dtype, std::int64_t cols) {
  int ept = 16 / int(dtype_size(dtype));
  while (ept > 1 && cols % ept != 0) ept /= 2;
  return ept;
}

bool vector_aligned(const void* data, DType dtype, int ept) {
  const std::size_t bytes = std::min<std::size_t>(16, std::size_t(ept) * dtype_size(dtype));
  return reinterpret_cast<std::uintptr_t>(data) % bytes == 0;
}

bool rows_vector_aligned(const TensorView& x, const RowLayout& layout, int ept) {
  if (!vector_aligned(x.data(), x.dtype(), ept)) return false;
  for (int d = 0; d < layout.dims; ++d) {
    if (layout.stride[d] % ept != 0) return false;
  }
  return true;
}

RowThreads row_threads(std::int64_t cols, int ept) {
  constexpr std::int64_t kChunksPerThread = 4;
  const std::int64_t chunks = std::max<std::int64_t>(1, cols / ept);
  const std::int64_t want = (chunks + kChunksPerThread - 1) / kChunksPerThread;
  RowThreads t;
  t.tpr = int(std::min<std::uint64_t>(1024, std::bit_ceil(std::uint64_t(want))));
  t.rows = std::max(1, 128 / t.tpr);
  return t;
}

RowLaunch row_launch(const char* op, const TensorView& x, const TensorView& out,
                     std::int64_t cols) {
  if (cols > kMaxRowCols) {
    check::fail(op, ErrorCode::unsupported,
                "rows of " + std::to_string(cols) + " elements, expected at most " +
                    std::to_string(kMaxRowCols) + " on CUDA (a row is held in registers)");
  }
  RowLaunch launch;
  launch.layout = row_layout(x);
  launch.ept = vector_ept(x.dtype(), cols);
  launch.vector = launch.ept >= 2 && rows_vector_aligned(x, launch.layout, launch.ept) &&
                  vector_aligned(out.data(), out.dtype(), launch.ept);
  return launch;
}

void log_scalar_rows(const char* op, const RowLaunch& launch, std::int64_t cols) {
  if (launch.vector) return;
  log::warning_once(std::string(op) + "_scalar",
                    std::string(op) + ": operands not aligned for " + std::to_string(launch.ept) +
                        "-element accesses (rows of " + std::to_string(cols) +
                        "): element-wise loads, slower than the vector path");
}

unsigned row_blocks(const char* op, const RowLayout& layout, int rows_per_block) {
  const std::int64_t blocks = (layout.rows + rows_per_block - 1) / rows_per_block;
  if (blocks > INT_MAX) {
    check::fail(op, ErrorCode::unsupported,
                "x has " + std::to_string(layout.rows) + " rows, more than the grid holds");
  }
  return unsigned(blocks);
}

}  // namespace kiln
