// kiln::conv2d.
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>

#include <array>
#include <cstdint>
#include <optional>

#include "common.hpp"
#include "kiln/conv2d.hpp"

namespace kiln_python {

namespace {

using Pair = std::array<std::int64_t, 2>;

void conv2d(const InArray& x, const InArray& w, const std::optional<InArray>& bias,
            const OutArray& out, Pair stride, Pair padding, Pair dilation, std::int64_t groups,
            std::uintptr_t stream) {
  const kiln::TensorView x_view = to_view("conv2d", "x", x);
  const kiln::TensorView w_view = to_view("conv2d", "w", w);
  const kiln::TensorView out_view = to_view("conv2d", "out", out);
  std::optional<kiln::TensorView> bias_view;
  if (bias) bias_view = to_view("conv2d", "bias", *bias);
  kiln::Conv2dOptions options;
  options.stride = stride;
  options.padding = padding;
  options.dilation = dilation;
  options.groups = groups;
  nb::gil_scoped_release release;
  kiln::conv2d(x_view, w_view, bias_view, out_view, options,
               reinterpret_cast<kiln::Stream>(stream));
}

}  // namespace

void bind_conv2d(nb::module_& m) {
  m.def("conv2d", &conv2d, nb::arg("x"), nb::arg("w"), nb::arg("bias").none(), nb::arg("out"),
        nb::arg("stride"), nb::arg("padding"), nb::arg("dilation"), nb::arg("groups"),
        nb::arg("stream"), "2-D convolution into `out` (see kiln/conv2d.hpp).");
}

}  // namespace kiln_python
