// Kernel parameters of the quantize, dequantize and GEMV kernels, shared by the host launchers
// (g++) and the kernels (NVRTC): plain structs passed by value as __grid_constant__.
#pragma once

#if defined(__CUDACC__)
#include "device/numeric.cuh"
#endif

namespace kiln {

#if defined(__CUDACC__)
__device__ __forceinline__ long long min_i64(long long a, long long b) { return a < b ? a : b; }
#endif

// The dtype of an optional epilogue operand (bias, gate, residual) as a template argument.
inline constexpr int kOperandNone = 0;
inline constexpr int kOperandF32 = 1;
inline constexpr int kOperandF16 = 2;
inline constexpr int kOperandBf16 = 3;

// The gate and residual of every matmul path's epilogue:
//   out[m, n] = residual[m, n] + gate[m / gate_rows, n] * (product * scales + bias)[m, n]
// (each only when given). A [B, N] gate covers gate_rows = M / B output rows a row (a read as
// [B, L, K]); a [N] gate has gate_stride 0.
struct GateResidual {
  const void* gate;           // [B, N], rows gate_stride elements apart, or null
  const void* residual;       // [M, N], rows residual_stride elements apart, or null
  long long gate_stride;      // elements
  long long residual_stride;  // elements
  int gate_rows;              // output rows a gate row covers (>= 1; M < 2^31 with a gate)
};

#if defined(__CUDACC__)
// Element i of an epilogue operand of kind KIND (not none) as f32.
template <int KIND>
__device__ __forceinline__ float operand_at(const void* p, long long i) {
  static_assert(KIND != kOperandNone, "an operand that is given");
  if constexpr (KIND == kOperandF32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (KIND == kOperandF16) {
    return to_float(static_cast<const f16*>(p)[i]);
  } else {
    return to_float(static_cast<const bf16*>(p)[i]);
  }
}

template <int KIND>
__device__ __forceinline__ const void* operand_row(const void* p, long long offset) {
  if constexpr (KIND == kOperandNone) {
    return p;
  } else {
    return static_cast<const char*>(p) + offset * (KIND == kOperandF32 ? 4 : 2);
  }
}

// The gate and residual rows of one output row m: v -> residual[m, n] + gate[b, n] * v, built
// once a row (the gate's row index is one 32-bit division) and applied per column.
template <int GATE, int RESIDUAL>
struct RowGateResidual {
  const void* gate;      // the gate vector of row m
  const void* residual;  // row m of the residual

  __device__ __forceinline__ float operator()(long long n, float v) const {
    if constexpr (GATE != kOperandNone) v *= operand_at<GATE>(gate, n);
    if constexpr (RESIDUAL != kOperandNone) v += operand_at<RESIDUAL>(residual, n);
    return v;
  }
};

template <int GATE, int RESIDUAL>
__device__ __forceinline__ RowGateResidual<GATE, RESIDUAL> row_gate_residual(const GateResidual& e,
                                                                             long long m) {
  RowGateResidual<GATE, RESIDUAL> row{e.gate, e.residual};
  if constexpr (GATE != kOperandNone) {
    const long long b = static_cast<unsigned>(m) / static_cast<unsigned>(e.gate_rows);
    row.gate = operand_row<GATE>(e.gate, b * e.gate_stride);
  }
  if constexpr (RESIDUAL != kOperandNone) {
    row.residual = operand_row<RESIDUAL>(e.residual, m * e.residual_stride);
  }
  return row;
}
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

// gemv.cuh: out [M, N] = residual + gate * ((a [M, K] . w^T) * a_scale * w_scale + bias).
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
  GateResidual epilogue;  // applied with the scales and bias (not by the split-K partials)
};

// gemv.cuh's split-K epilogue: out = residual + gate * ((sum of the splits' partials, in order)
// * scales + bias).
struct GemvEpilogueParams {
  const float* partial;  // [splits, M, N]
  const float* w_scale;  // tensor or row ([N]); block128 already applied
  const float* a_scale;
  const void* bias;
  void* out;
  long long m;
  long long n;
  long long splits;  // 0: out = bias (K = 0)
  GateResidual epilogue;
};

}  // namespace kiln
