// The cuBLASLt calls of the matmul family: fp8 x fp8 (fp8_native.cpp) and bf16 x bf16 over a
// dequantized prepared weight (launch_gemm.cpp). out [M, N] row-major = a [M, K] . w[N, K]^T,
// with a and w K-major (cuBLASLt's "TN", the layout its fp8 kernels require).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kiln/tensor.hpp"

namespace kiln::matmul_detail {

struct LtMatmul {
  std::int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;  // [M, K], rows a_stride elements apart
  DType a_dtype = DType::bf16;
  std::int64_t a_stride = 0;
  const void* w = nullptr;  // [N, K], rows w_stride elements apart
  DType w_dtype = DType::bf16;
  std::int64_t w_stride = 0;
  void* out = nullptr;  // [M, N] contiguous
  DType out_dtype = DType::bf16;
  const void* bias = nullptr;  // [N] of bias_dtype (cuBLASLt's epilogue), or null
  DType bias_dtype = DType::bf16;
  // C, added with beta = 1 (out = product + c + bias): [M, N] of c_dtype, rows c_stride elements
  // apart, or null (beta = 0). May be out itself (then c_dtype is out's and c_stride N).
  const void* c = nullptr;
  DType c_dtype = DType::bf16;
  std::int64_t c_stride = 0;
  // fp8 only. outer = false: a_scale, w_scale are f32 [1] (null = 1); outer = true: f32 [M] and
  // [N] vectors (cuBLASLt's outer-vector scaling).
  const float* a_scale = nullptr;
  const float* w_scale = nullptr;
  bool outer = false;
  int device = 0;
  Stream stream = nullptr;
};

// Runs one matmul; throws kiln::Error naming `op` when cuBLASLt has no algorithm for it
// (unsupported; remembered, so asking again costs no heuristic query) or fails (cuda_error).
// Descriptors and algorithms are cached per (device, problem); the 32 MiB workspace is a
// cuda::StreamScratch.
void lt_matmul(const char* op, const LtMatmul& problem);

}  // namespace kiln::matmul_detail
