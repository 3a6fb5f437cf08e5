// The unfused Flux RoPE chain, one elementwise kernel per stage as an eager framework runs it:
//   rms_norm_rows:  x (strided)    -> f32 [N, L, H, D]   (only with a norm weight)
//   rotate_pairs:   src (strided)  -> f32 [N, L, H, D]   (only with pe)
//   permute_cast:   src (strided)  -> out [N, H, L, D] (rows strided, D contiguous)
// Selected by KILN_DISABLE=rope_flux for A/B checks against the fused kernel; each stage reads
// and writes device memory. One thread per row, pair or element; offsets are 64-bit.
#pragma once

#include "device/numeric.cuh"
#include "device/reduce.cuh"
#include "ops/rope_flux/kernels/params.cuh"

namespace kiln {

// One warp per row (n, l, h).
template <typename Tin, typename Tw>
__global__ void rms_norm_rows(const __grid_constant__ RopeStage s) {
  const i64 row = (i64(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= s.N * s.L * s.H) return;  // whole warps leave together
  const i64 h = row % s.H;
  const i64 l = (row / s.H) % s.L;
  const i64 n = row / (s.H * s.L);
  const Tin* src = static_cast<const Tin*>(s.src) + n * s.src_stride[0] + l * s.src_stride[1] +
                   h * s.src_stride[2];
  float sum_sq = 0.f;
  for (i64 d = lane; d < s.D; d += 32) {
    const float v = to_float(src[d * s.src_stride[3]]);
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(group_sum<32>(sum_sq) / float(s.D) + s.eps);
  const Tw* w = static_cast<const Tw*>(s.norm_weight);
  float* dst = static_cast<float*>(s.dst) + row * s.D;
  for (i64 d = lane; d < s.D; d += 32) {
    dst[d] = to_float(src[d * s.src_stride[3]]) * inv_rms * to_float(w[d]);
  }
}

// One thread per pair.
template <typename Tin>
__global__ void rotate_pairs(const __grid_constant__ RopeStage s) {
  const i64 pair = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  const i64 pairs_per_row = s.D / 2;
  if (pair >= s.N * s.L * s.H * pairs_per_row) return;
  const i64 q = pair % pairs_per_row;
  const i64 row = pair / pairs_per_row;
  const i64 h = row % s.H;
  const i64 l = (row / s.H) % s.L;
  const i64 n = row / (s.H * s.L);
  const Tin* src = static_cast<const Tin*>(s.src) + n * s.src_stride[0] + l * s.src_stride[1] +
                   h * s.src_stride[2] + 2 * q * s.src_stride[3];
  const float* m = s.pe + n * s.pe_stride[0] + l * s.pe_stride[1] + q * s.pe_stride[2];
  const float x0 = to_float(src[0]);
  const float x1 = to_float(src[s.src_stride[3]]);
  float* dst = static_cast<float*>(s.dst) + pair * 2;
  dst[0] = m[0] * x0 + m[s.pe_stride[4]] * x1;
  dst[1] = m[s.pe_stride[3]] * x0 + m[s.pe_stride[3] + s.pe_stride[4]] * x1;
}

// One thread per output element, in output order.
template <typename Tin, typename Tout>
__global__ void permute_cast(const __grid_constant__ RopeStage s) {
  const i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x;  // index into [N, H, L, D]
  if (i >= s.N * s.H * s.L * s.D) return;
  const i64 d = i % s.D;
  const i64 l = (i / s.D) % s.L;
  const i64 h = (i / (s.D * s.L)) % s.H;
  const i64 n = i / (s.D * s.L * s.H);
  const Tin* src = static_cast<const Tin*>(s.src);
  const float v = to_float(
      src[n * s.src_stride[0] + l * s.src_stride[1] + h * s.src_stride[2] + d * s.src_stride[3]]);
  static_cast<Tout*>(s.dst)[n * s.out_stride[0] + h * s.out_stride[1] + l * s.out_stride[2] + d] =
      from_float<Tout>(v);
}

}  // namespace kiln
