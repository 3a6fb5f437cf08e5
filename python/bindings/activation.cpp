// kiln::glu and kiln::gelu_tanh.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common.hpp"
#include "kiln/activation.hpp"

namespace kiln_python {

namespace {

kiln::Activation to_activation(const std::string& name) {
  for (kiln::Activation a : {kiln::Activation::silu, kiln::Activation::gelu_tanh}) {
    if (name == kiln::activation_name(a)) return a;
  }
  invalid("glu", "activation", "is '" + name + "', expected silu or gelu_tanh");
}

void glu(const InArray& x, const OutArray& out, const std::optional<OutArray>& out_scale,
         const std::string& activation, std::uintptr_t stream,
         const std::optional<std::string>& fmt) {
  const kiln::TensorView xv = to_view("glu", "x", x);
  const kiln::TensorView ov = as_fp8("glu", "out", to_view("glu", "out", out), fmt);
  kiln::GluOptions options;
  options.activation = to_activation(activation);
  if (out_scale) options.out_scale = to_view("glu", "out_scale", *out_scale);
  nb::gil_scoped_release release;
  kiln::glu(xv, ov, options, reinterpret_cast<kiln::Stream>(stream));
}

void gelu_tanh(const InArray& x, const OutArray& out, const std::optional<OutArray>& out_scale,
               std::uintptr_t stream, const std::optional<std::string>& fmt) {
  const kiln::TensorView xv = to_view("gelu_tanh", "x", x);
  const kiln::TensorView ov = as_fp8("gelu_tanh", "out", to_view("gelu_tanh", "out", out), fmt);
  kiln::GeluOptions options;
  if (out_scale) options.out_scale = to_view("gelu_tanh", "out_scale", *out_scale);
  nb::gil_scoped_release release;
  kiln::gelu_tanh(xv, ov, options, reinterpret_cast<kiln::Stream>(stream));
}

}  // namespace

void bind_activation(nb::module_& m) {
  m.def("glu", &glu, nb::arg("x"), nb::arg("out"), nb::arg("out_scale").none(),
        nb::arg("activation"), nb::arg("stream"), nb::arg("fmt").none() = nb::none(),
        "act(x[..., :F]) * x[..., F:] into `out` (fp8 with out_scale; fmt: the format of a "
        "uint8 out holding fp8 codes). See kiln/activation.hpp.");
  m.def("gelu_tanh", &gelu_tanh, nb::arg("x"), nb::arg("out"), nb::arg("out_scale").none(),
        nb::arg("stream"), nb::arg("fmt").none() = nb::none(),
        "GELU (tanh approximation) of x into `out` (see kiln/activation.hpp).");
}

}  // namespace kiln_python
