// Kernel parameters of the quantize, dequantize and GEMV kernels, shared by the host launchers
// (g++) and the kernels (NVRTC): plain structs passed by value as __grid_constant__.
#pragma once

namespace kiln {

#if defined(__CUDACC__)
__device__ __forceinline__ long long min_i64(long long a, long long b) { return a < b ? a : b; }
#endif

// Scale kinds as template arguments (matmul_detail::ScaleKind on the host).
inline constexpr int kScaleNone = 0;
inline constexpr int kScaleTensor = 1;
inline constexpr int kScaleRow = 2;
inline constexpr int kScaleBlock128 = 3;

// Q8_0 block scales (f16 bits) where ggml's rule d = amax / 127 gives no usable d: the largest
// finite f16, stored when d overflows f16 (the block's codes saturate at +-127; ggml stores inf),
// and a NaN, stored with zero codes for a block holding a NaN (it dequantizes to NaN).
inline constexpr unsigned short kQ8MaxScale = 0x7BFF;
inline constexpr unsigned short kQ8NanScale = 0x7E00;

// quantize.cuh and dequantize.cuh: a matrix [rows, cols] and its quantized form.
struct QuantizeParams {
  const void* x;  // [rows, cols] with x_stride (quantize: the input; dequantize: q)
  void* q;        // contiguous codes or Q8_0 blocks (dequantize: the output)
  float* scale;   // contiguous, of the scale kind's shape
  long long rows;
  long long cols;
  long long x_stride[2];  // (row, col) in elements
  long long scale_cols;   // block128: ceil(cols / 128)
};

// gemv.cuh: out [M, N] = (a [M, K] . w^T) * a_scale * w_scale + bias.
struct GemvParams {
  const void* a;         // [M, K], row stride a_stride, unit column stride
  const void* w;         // [N, K] row-major, w_row_bytes from row to row
  const float* w_scale;  // tensor [1], row [N] or block128 [ceil(N/128), ceil(K/128)]
  const float* a_scale;  // tensor [1] or row [M]
  const void* bias;      // [N]
  void* out;             // [M, N] contiguous
  float* partial;        // split-K: f32 [splits, M, N], one slice a split; else nullptr
  long long n;
  long long k;
  long long a_stride;  // elements
  long long w_row_bytes;
  long long k_per_split;  // K range of one blockIdx.y, a multiple of the chunk
  long long scale_cols;   // block128: ceil(K / 128)
};

// gemv.cuh's split-K epilogue: out = (sum of the splits' partials, in order) * scales + bias.
struct GemvEpilogueParams {
  const float* partial;  // [splits, M, N]
  const float* w_scale;  // tensor or row ([N]); block128 already applied
  const float* a_scale;
  const void* bias;
  void* out;
  long long m;
  long long n;
  long long splits;  // 0: out = bias (K = 0)
};

}  // namespace kiln
