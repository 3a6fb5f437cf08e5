// Kernel parameters of the tensor-core GEMM (gemm.cuh) and fp8_native.cuh, shared by the host
// launcher (g++) and the kernel (NVRTC): plain constants and one struct of pointers and integers,
// passed by value as
// __grid_constant__.
#pragma once

#include "device/tensor_map.cuh"
#include "ops/matmul/kernels/params.cuh"

namespace kiln {

// Element kinds of the GEMM's operands (template arguments AK and WK of gemm_kernel).
namespace gemm_kind {
constexpr int f32 = 0;
constexpr int f16 = 1;
constexpr int bf16 = 2;
constexpr int e4m3 = 3;  // f8_e4m3fn
constexpr int e5m2 = 4;  // f8_e5m2
constexpr int q8_0 = 5;  // ggml Q8_0 (weights only)
}  // namespace gemm_kind

// How the weight scale is applied (template argument WSCALE).
namespace gemm_scale {
constexpr int none = 0;
constexpr int tensor = 1;    // f32 [1], in the epilogue
constexpr int row = 2;       // f32 [N] (weights) or [M] (activations), in the epilogue
constexpr int block128 = 3;  // f32 [ceil(N/128), ceil(K/128)], once per k-tile in the main loop
}  // namespace gemm_scale

// Bias dtype (template argument BIAS): the epilogue operand kinds of params.cuh.
namespace gemm_bias {
constexpr int none = kOperandNone;
constexpr int f32 = kOperandF32;
constexpr int f16 = kOperandF16;
constexpr int bf16 = kOperandBf16;
}  // namespace gemm_bias

// Weights with k-tiles of 64 elements: the packed q8_0 layout stores the block scales per k-tile.
constexpr int kGemmTileK = 64;

struct GemmParams {
  const void* a;         // [M, K], element row stride a_stride, unit column stride
  const void* w;         // [N, K] rows w_stride bytes apart (q8_0 row-major: ggml blocks;
                         // q8_0 packed: int8 [N, K] then the block scales at w_scales)
  const float* w_scale;  // fp8: [1], [N] or [ceil(N/128), ceil(K/128)]; else null
  const float* w_d;      // q8_0 packed: f32 [ceil(K/64)][2][n_pad] block scales; else null
  const float* a_scale;  // a fp8: [1] or [M]; else null
  const void* bias;      // [N]
  void* out;             // [M, N] contiguous
  long long a_stride;    // elements
  long long w_stride;    // bytes
  int m;
  int n;
  int k;
  int n_pad;       // q8_0 packed: row count of w_d's [2][n_pad] slabs (N rounded up to 4)
  int scale_cols;  // block128: ceil(K/128)
  GateResidual epilogue;
};

// gemm_sm90.cuh: the Hopper weight-only GEMM (f16 / bf16 a, fp8 w).
struct GemmSm90Params {
  TensorMapBytes
      map_w;  // w as bytes [N, K] (rows w_stride apart): boxes of 64 x 128, 64-byte swizzle
  TensorMapBytes map_a;  // a [M, K]: boxes of 64 x BT, 128-byte swizzle
  const float* w_scale;  // tensor [1], row [N] or block128 [ceil(N/128), ceil(K/128)]; else null
  const void* bias;      // [N] or null
  void* out;             // [M, N] contiguous; SPLIT: f32 partial sums [splits, M, N]
  int m;
  int n;
  int k;
  int splits;             // k slices (SPLIT: the slices of the partial sums)
  int tiles_per_split;    // 64-wide k-tiles of one slice (even with block128 scales)
  int scale_cols;         // block128: ceil(K / 128)
  int out_vec;            // outputs stored in pairs (N even, out aligned to a pair)
  GateResidual epilogue;  // not SPLIT (the split epilogue applies it then)
};

// scale_vectors (fp8_native.cuh): the f32 vectors of cuBLASLt's outer-vector fp8 scaling.
struct ScaleVectorParams {
  const float* a_src;  // [1], [M] or null
  float* a_out;        // [M]
  const float* w_src;  // [1], [N] or null
  float* w_out;        // [N]
  const void* gate;    // [N] folded into w_out (template argument GATE), or null
  long long m;
  long long n;
  int a_row;  // a_src is [M]
  int w_row;  // w_src is [N]
};

// product_epilogue (fp8_native.cuh): out [M, N] = residual + gate * (src * a_scale * w_scale +
// bias[n]).
struct ProductEpilogueParams {
  const float* src;      // [M, N] contiguous, f32 (may be out itself)
  const float* a_scale;  // [1] or [M] (a_row), or null
  const float* w_scale;  // [1] or [N] (w_row), or null
  const void* bias;      // [N] or null
  void* out;             // [M, N] contiguous
  long long m;
  long long n;
  int a_row;
  int w_row;
  GateResidual epilogue;
};

// pack_q8_0 (prepare.cuh): ggml Q8_0 blocks -> the GEMM's packed layout (launch_gemm.cpp).
struct PackQ8Params {
  const unsigned char* src;  // [N] rows of K / 32 blocks of 34 bytes, src_stride bytes apart
  signed char* qs;           // int8 [N, K]
  float* d;                  // f32 [ceil(K/64)][2][n_pad], zeroed by the caller
  long long src_stride;
  long long n;
  long long k;
  long long n_pad;
};

}  // namespace kiln
