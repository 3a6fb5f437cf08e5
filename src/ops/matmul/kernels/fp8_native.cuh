// The fp8_native path's helpers around cuBLASLt (fp8_native.cpp):
//   scale_vectors   the f32 vectors of cuBLASLt's outer-vector fp8 scaling, which takes a vector
//                   for both operands when either has per-row scales: each entry is the
//                   operand's row scale, its tensor scale repeated, or 1.
//   product_epilogue  out = src * a_scale * w_scale + bias[n], rounded once to out's dtype, after
//                   a cuBLASLt call into f32: CUDA 13.0's cuBLASLt ran outer-vector scaling only
//                   into bf16 without a bias on the H200 (status 15, NOT_SUPPORTED, for f32 out
//                   and for any bias), and its fp8 bias types are fixed (bf16 for bf16 and f32
//                   out, f16 for f16 out).
#pragma once

#include "device/numeric.cuh"
#include "ops/matmul/kernels/gemm_params.cuh"

namespace kiln {

__global__ void scale_vectors(const __grid_constant__ ScaleVectorParams p) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.m) p.a_out[i] = p.a_src == nullptr ? 1.f : p.a_src[p.a_row ? i : 0];
  if (i < p.n) p.w_out[i] = p.w_src == nullptr ? 1.f : p.w_src[p.w_row ? i : 0];
}

// One thread per output element, grid-stride; src may alias out (f32 out). TBias is float when
// there is no bias (p.bias null).
template <typename TOut, typename TBias>
__global__ void product_epilogue(const __grid_constant__ ProductEpilogueParams p) {
  const long long total = p.m * p.n;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / p.n, col = i % p.n;
    float v = p.src[i];
    if (p.a_scale != nullptr) v *= p.a_scale[p.a_row ? row : 0];
    if (p.w_scale != nullptr) v *= p.w_scale[p.w_row ? col : 0];
    if (p.bias != nullptr) v += to_float(static_cast<const TBias*>(p.bias)[col]);
    static_cast<TOut*>(p.out)[i] = from_float<TOut>(v);
  }
}

}  // namespace kiln
