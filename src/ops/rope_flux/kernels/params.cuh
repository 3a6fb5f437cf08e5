// Kernel parameters of rope_flux, shared by the host launcher (g++) and the kernels (NVRTC):
// plain structs of pointers and 64-bit integers, passed by value as __grid_constant__.
#pragma once

namespace kiln {

// rope_flux_kernel (rope_flux.cuh).
struct RopeFluxParams {
  const void* x;            // [N, L, H, D], strides x_stride
  const float* pe;          // [N?, L, D/2, 2, 2], strides pe_stride (pe_stride[0] = 0 if shared)
  const void* norm_weight;  // [D], contiguous
  void* out;                // [N, H, L, D], strides out_stride, D contiguous
  long long N;
  long long L;
  long long H;
  long long x_stride[4];    // (n, l, h, d) in elements
  long long pe_stride[5];   // (n, l, pair, row, col) in elements
  long long out_stride[3];  // (n, h, l) in elements
  float eps;
};

// The unfused chain's stages (rope_flux_unfused.cuh).
struct RopeStage {
  const void* src;          // [N, L, H, D] with src_stride
  void* dst;                // f32 [N, L, H, D] contiguous, or out [N, H, L, D] for permute_cast
  const float* pe;          // rotate_pairs: [N?, L, D/2, 2, 2] with pe_stride
  const void* norm_weight;  // rms_norm_rows: [D]
  long long N;
  long long L;
  long long H;
  long long D;
  long long src_stride[4];  // (n, l, h, d)
  long long pe_stride[5];   // (n, l, pair, row, col)
  long long out_stride[3];  // permute_cast: out's (n, h, l); D contiguous
  float eps;
};

}  // namespace kiln
