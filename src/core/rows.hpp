// Row kernels (the norm and activation families): the row layout (device/rows.cuh) of a tensor
// [..., C], its leading dims collapsed where their strides allow, and how a row of C elements is
// spread over the threads of a block.
#pragma once

#include <cstdint>

#include "device/rows.cuh"
#include "kiln/tensor.hpp"

namespace kiln {

// x must have at least one dim; size-1 dims are dropped and a dim that steps exactly over the
// next one merges with it (a contiguous tensor, or whole rows sliced from one, is one dim).
// TensorView holds at most 6 dims, so at most kMaxRowDims leading dims remain.
RowLayout row_layout(const TensorView& x);

// Elements of one 16-byte access of `dtype` that divide `cols` (16 / size, halved until it
// divides; 1 when nothing larger does).
int vector_ept(DType dtype, std::int64_t cols);

// Whether `data` of `dtype` allows vector accesses of `ept` elements (load_vec / store_vec:
// aligned to min(16, ept * element size) bytes), and whether every row of x does (its data and
// every leading stride of `layout`).
bool vector_aligned(const void* data, DType dtype, int ept);
bool rows_vector_aligned(const TensorView& x, const RowLayout& layout, int ept);

// A row of `cols` elements in chunks of `ept` held in registers: TPR threads a row (a power of two
// giving about 4 chunks a thread, at most 1024), ROWS rows a block (at least 128 threads a block).
struct RowThreads {
  int tpr = 1;
  int rows = 1;
  int threads() const { return tpr * rows; }
};
RowThreads row_threads(std::int64_t cols, int ept);
// The widest row a row kernel takes: 64 values a thread at 1024 threads a row.
inline constexpr std::int64_t kMaxRowCols = 65536;

// The CUDA launch of a row kernel reading x's rows and writing `cols` results a row into `out`:
// the row width checked against kMaxRowCols (kiln::Error naming `op` beyond it), x's layout, and
// whether x's rows and out allow vector_ept(x, cols)-element accesses. The caller ANDs in its own
// operands, then calls log_scalar_rows.
struct RowLaunch {
  RowLayout layout{};
  int ept = 1;
  bool vector = false;
};
RowLaunch row_launch(const char* op, const TensorView& x, const TensorView& out, std::int64_t cols);
// Logs once per op when the row kernel runs element-wise loads (launch.vector false).
void log_scalar_rows(const char* op, const RowLaunch& launch, std::int64_t cols);
// Blocks of `rows_per_block` rows for the layout's rows; kiln::Error naming `op` past the grid.
unsigned row_blocks(const char* op, const RowLayout& layout, int rows_per_block);

}  // namespace kiln
