// kiln::rope and kiln::rope_cache.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common.hpp"
#include "kiln/rope.hpp"

namespace kiln_python {

namespace {

kiln::RopeStyle to_style(const std::string& style) {
  if (style == "normal") return kiln::RopeStyle::normal;
  if (style == "neox") return kiln::RopeStyle::neox;
  invalid("rope", "style", "is '" + style + "', expected 'normal' or 'neox'");
}

void rope(const InArray& x, const InArray& positions, const OutArray& out,
          std::optional<double> theta, const std::string& style,
          const std::optional<InArray>& norm_weight, float eps, bool at_positions,
          std::uintptr_t stream) {
  const char* op = at_positions ? "rope_cache" : "rope";
  const kiln::TensorView x_view = to_view(op, "x", x);
  const kiln::TensorView positions_view = to_view(op, "positions", positions);
  const kiln::TensorView out_view = to_view(op, at_positions ? "cache" : "out", out);
  kiln::RopeOptions options;
  options.theta = theta;
  options.style = to_style(style);
  if (norm_weight) options.norm_weight = to_view(op, "norm_weight", *norm_weight);
  options.eps = eps;
  nb::gil_scoped_release release;
  const auto s = reinterpret_cast<kiln::Stream>(stream);
  if (at_positions) {
    kiln::rope_cache(x_view, positions_view, out_view, options, s);
  } else {
    kiln::rope(x_view, positions_view, out_view, options, s);
  }
}

}  // namespace

void bind_rope(nb::module_& m) {
  m.def("rope", &rope, nb::arg("x"), nb::arg("positions"), nb::arg("out"), nb::arg("theta").none(),
        nb::arg("style"), nb::arg("norm_weight").none(), nb::arg("eps"), nb::arg("at_positions"),
        nb::arg("stream"),
        "LLM RoPE into `out` [N, H, T, D], or into a KV cache [N, H, S, D] at the positions when "
        "at_positions (see kiln/rope.hpp).");
}

}  // namespace kiln_python
