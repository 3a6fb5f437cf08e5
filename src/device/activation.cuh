// Elementwise activations in f32, shared by the activation family's kernels and the epilogues
// that fuse one (group_norm's SiLU). Accurate expf / tanhf (kiln compiles without fast math); the
// roundings are explicit (__fmul_rn, __fadd_rn: no contraction into FMAs), so every kernel that
// inlines them computes the same bits for the same input.
#pragma once

namespace kiln {

// x * sigmoid(x), as x / (1 + exp(-x)) (torch's formula; -0 for x below about -88).
__device__ __forceinline__ float silu(float x) { return x / __fadd_rn(1.f, expf(-x)); }

// GELU with the tanh approximation (torch's approximate="tanh"):
// 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  const float cube = __fmul_rn(__fmul_rn(__fmul_rn(kKappa, x), x), x);
  const float inner = __fmul_rn(kBeta, __fadd_rn(x, cube));
  return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.f, tanhf(inner)));
}

}  // namespace kiln
