// What the two RoPE families (rope and rope_flux) share: the checks of x [N, L, H, D] and of the
// per-head norm weight, the reference's per-head RMSNorm, and the block layout of their kernels
// (one block per token, a row of D elements over LANES lanes, heads spread over a few row slots).
#pragma once

#include <cstdint>
#include <vector>

#include "kiln/tensor.hpp"

namespace kiln::rope_heads {

// x: 4 dims [N, L, H, D], f32/f16/bf16, D even.
void check_x(const char* op, const TensorView& x);
// norm_weight: contiguous [D], f32/f16/bf16, not overlapping `out`; eps finite and >= 0.
void check_norm_weight(const char* op, const char* out_arg, const TensorView& out,
                       const TensorView& norm_weight, std::int64_t D, float eps);

// row <- row * rsqrt(mean(row^2) + eps) * weight: f32 math, the sum of squares in f64.
void rms_norm_row(std::vector<float>& row, const TensorView& weight, float eps);

struct HeadBlock {
  int lanes = 1;        // lanes per row
  int head_groups = 1;  // rows in flight per block
  int hpt = 1;          // heads per thread
  int threads() const { return lanes * head_groups; }
};
// Rows of `chunks` chunks (one chunk a lane at a time, up to 32 lanes), `heads` rows a token.
HeadBlock head_block(int chunks, long long heads);

}  // namespace kiln::rope_heads
