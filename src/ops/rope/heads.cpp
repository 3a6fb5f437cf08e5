#include "ops/rope/heads.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <string>

#include "core/check.hpp"
#include "core/numeric.hpp"

namespace kiln::rope_heads {

namespace {
// Rows in flight per block: 4 (6 heads a thread at H = 24) is within 2% of the best of 2, 4, 8,
// 12 and 24 rows on every Flux case of rope_flux and the best with the norm (rope_flux NOTES.md
// "Rows in flight"; dev/rope_flux/rows_in_flight.cpp reruns the sweep).
constexpr int kRowsInFlight = 4;
}  // namespace

void check_x(const char* op, const TensorView& x) {
  check::dims(op, "x", x, 4);
  check::dtype_in(op, "x", x, {DType::f32, DType::f16, DType::bf16});
  const std::int64_t D = x.size(3);
  if (D % 2 != 0) {
    check::fail(op, ErrorCode::invalid_argument,
                "x has head dim D = " + std::to_string(D) + " (shape " + x.shape_str() +
                    "), expected an even number: RoPE rotates pairs");
  }
}

void check_norm_weight(const char* op, const char* out_arg, const TensorView& out,
                       const TensorView& norm_weight, std::int64_t D, float eps) {
  check::dtype_in(op, "norm_weight", norm_weight, {DType::f32, DType::f16, DType::bf16});
  const std::int64_t w_shape[] = {D};
  check::shape(op, "norm_weight", norm_weight, w_shape, "D = " + std::to_string(D));
  check::contiguous(op, "norm_weight", norm_weight);
  check::non_null(op, "norm_weight", norm_weight);
  check::no_overlap(op, out_arg, out, "norm_weight", norm_weight);
  if (!(eps >= 0.f) || !std::isfinite(eps)) {
    check::fail(op, ErrorCode::invalid_argument,
                "eps = " + std::to_string(eps) + ", expected a finite value >= 0");
  }
}

void rms_norm_row(std::vector<float>& row, const TensorView& weight, float eps) {
  double sum_sq = 0;
  for (float v : row) sum_sq += double(v) * double(v);
  const float inv_rms =
      static_cast<float>(1.0 / std::sqrt(sum_sq / double(row.size()) + double(eps)));
  for (std::size_t d = 0; d < row.size(); ++d) {
    row[d] *= inv_rms * numeric::load_float(weight.data(), weight.dtype(),
                                            std::int64_t(d) * weight.stride(0));
  }
}

HeadBlock head_block(int chunks, long long heads) {
  HeadBlock block;
  block.lanes = std::min(32, int(std::bit_ceil(unsigned(std::max(1, chunks)))));
  const long long h = std::max(1LL, heads);
  block.hpt = int((h + kRowsInFlight - 1) / kRowsInFlight);
  const int groups = int((h + block.hpt - 1) / block.hpt);
  // Whole warps, so that the row shuffles of the norm see full warps.
  block.head_groups = (groups * block.lanes + 31) / 32 * 32 / block.lanes;
  return block;
}

}  // namespace kiln::rope_heads
