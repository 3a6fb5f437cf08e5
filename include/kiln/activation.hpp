// Activations of whole models' MLPs: the gated linear unit (SwiGLU: Flux.2's Flux2SwiGLU, an
// LLM's silu(gate) * up; GEGLU with gelu_tanh) and FLUX.1's GELU-tanh, each one read of x and one
// write of out.
//
// Like rms_norm and layer_norm (kiln/norm.hpp), they can write the fp8 input of the next fp8 x fp8
// GEMM: `out` f8_e4m3fn / f8_e5m2 with `out_scale` f32 [R], one scale per row (token):
//   scale[r] = amax(y[r, :]) / max of the format (an all-zero row gets 1),
//   out[r, c] = encode(y[r, c] / scale[r])
// with y the f32 result (not rounded to a 16-bit type first): bit for bit what quantize_fp8 with
// per-row scales gives for that f32 y.
#pragma once

#include <optional>

#include "kiln/tensor.hpp"

namespace kiln {

enum class Activation {
  silu,       // x * sigmoid(x)
  gelu_tanh,  // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), torch's approximate="tanh"
};

const char* activation_name(Activation activation);  // "silu", "gelu_tanh"

struct GluOptions {
  Activation activation = Activation::silu;
  // fp8 out only (and then required): f32 [R] contiguous, written with each row's scale.
  std::optional<TensorView> out_scale;
};

// y[..., f] = act(x[..., f]) * x[..., F + f] for f < F: the first half of x's last dim is the gate,
// the second the linear part (gate and up projections concatenated), math in f32.
// x:   [..., 2F] (1 to 6 dims), f32/f16/bf16, unit stride along the last dim, any strides of the
//      leading dims (e.g. the MLP slice of Flux's fused single-block projection).
// out: [..., F] (x's leading dims), contiguous, f32/f16/bf16 or fp8 with options.out_scale; must
//      not overlap x.
// CUDA work is enqueued on `stream`. R = 0 or F = 0: nothing is written. CUDA: F <= 65536.
void glu(const TensorView& x, const TensorView& out, const GluOptions& options = {},
         Stream stream = nullptr);

struct GeluOptions {
  // fp8 out only (and then required): f32 [R] contiguous, written with each row's scale.
  std::optional<TensorView> out_scale;
};

// y = gelu_tanh(x) elementwise over x [..., F] (layout as glu's x; out of x's shape), math in f32.
void gelu_tanh(const TensorView& x, const TensorView& out, const GeluOptions& options = {},
               Stream stream = nullptr);

}  // namespace kiln
