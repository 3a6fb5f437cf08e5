// CPU reference of the activation family: written to be read, not to be fast.
#include <cmath>
#include <vector>

#include "core/numeric.hpp"
#include "core/rows.hpp"
#include "ops/activation/activation.hpp"
#include "ops/matmul/matmul.hpp"

namespace kiln::activation_detail {
namespace {

float activate(Activation activation, float x) {
  switch (activation) {
    case Activation::silu:
      return x / (1.f + std::exp(-x));
    case Activation::gelu_tanh: {
      const float beta = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * x * (1.f + std::tanh(beta * (x + 0.044715f * x * x * x)));
    }
  }
  return x;
}

}  // namespace

void reference(const TensorView& x, const TensorView& out, Activation activation, bool gated,
               const std::optional<TensorView>& out_scale) {
  const RowLayout layout = row_layout(x);
  const std::int64_t F = out.size(out.dim() - 1);
  const std::int64_t step = x.stride(x.dim() - 1);
  float* scales = out_scale ? static_cast<float*>(out_scale->data()) : nullptr;
  std::vector<float> y(static_cast<std::size_t>(F));
  for (std::int64_t r = 0; r < layout.rows; ++r) {
    const std::int64_t base = row_offset(layout, r);
    for (std::int64_t f = 0; f < F; ++f) {
      const float g = numeric::load_float(x.data(), x.dtype(), base + f * step);
      float v = activate(activation, g);
      if (gated) v *= numeric::load_float(x.data(), x.dtype(), base + (F + f) * step);
      y[std::size_t(f)] = v;
    }
    matmul_detail::store_row_reference(out, scales, r, y);
  }
}

}  // namespace kiln::activation_detail
