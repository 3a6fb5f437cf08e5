// kiln::rope_flux.
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>

#include "common.hpp"
#include "kiln/rope_flux.hpp"

namespace kiln_python {

namespace {

void rope_flux(const InArray& x, const std::optional<InArray>& pe, const OutArray& out,
               const std::optional<InArray>& norm_weight, float eps, std::uintptr_t stream) {
  const kiln::TensorView x_view = to_view("rope_flux", "x", x);
  const kiln::TensorView out_view = to_view("rope_flux", "out", out);
  std::optional<kiln::TensorView> pe_view;
  if (pe) pe_view = to_view("rope_flux", "pe", *pe);
  kiln::RopeFluxOptions options;
  if (norm_weight) options.norm_weight = to_view("rope_flux", "norm_weight", *norm_weight);
  options.eps = eps;
  nb::gil_scoped_release release;
  kiln::rope_flux(x_view, pe_view, out_view, options, reinterpret_cast<kiln::Stream>(stream));
}

}  // namespace

void bind_rope_flux(nb::module_& m) {
  m.def("rope_flux", &rope_flux, nb::arg("x"), nb::arg("pe").none(), nb::arg("out"),
        nb::arg("norm_weight").none(), nb::arg("eps"), nb::arg("stream"),
        "Flux RoPE + [N, L, H, D] -> [N, H, L, D] permute into `out` (see kiln/rope_flux.hpp).");
}

}  // namespace kiln_python
