// kiln::rms_norm, layer_norm and group_norm.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "common.hpp"
#include "kiln/norm.hpp"

namespace kiln_python {

namespace {

std::optional<kiln::TensorView> optional_view(const char* op, const char* arg,
                                              const std::optional<InArray>& a) {
  if (!a) return std::nullopt;
  return to_view(op, arg, *a);
}

void rms_norm(const InArray& x, const std::optional<InArray>& weight, const OutArray& out,
              const std::optional<OutArray>& out_scale, float eps, std::uintptr_t stream,
              const std::optional<std::string>& fmt) {
  constexpr const char* kOp = "rms_norm";
  const kiln::TensorView xv = to_view(kOp, "x", x);
  const kiln::TensorView ov = as_fp8(kOp, "out", to_view(kOp, "out", out), fmt);
  kiln::RmsNormOptions options;
  options.weight = optional_view(kOp, "weight", weight);
  options.eps = eps;
  if (out_scale) options.out_scale = to_view(kOp, "out_scale", *out_scale);
  nb::gil_scoped_release release;
  kiln::rms_norm(xv, ov, options, reinterpret_cast<kiln::Stream>(stream));
}

void layer_norm(const InArray& x, const std::optional<InArray>& weight,
                const std::optional<InArray>& bias, const std::optional<InArray>& shift,
                const std::optional<InArray>& scale, const OutArray& out,
                const std::optional<OutArray>& out_scale, float eps, std::uintptr_t stream,
                const std::optional<std::string>& fmt) {
  constexpr const char* kOp = "layer_norm";
  const kiln::TensorView xv = to_view(kOp, "x", x);
  const kiln::TensorView ov = as_fp8(kOp, "out", to_view(kOp, "out", out), fmt);
  kiln::LayerNormOptions options;
  options.weight = optional_view(kOp, "weight", weight);
  options.bias = optional_view(kOp, "bias", bias);
  options.shift = optional_view(kOp, "shift", shift);
  options.scale = optional_view(kOp, "scale", scale);
  options.eps = eps;
  if (out_scale) options.out_scale = to_view(kOp, "out_scale", *out_scale);
  nb::gil_scoped_release release;
  kiln::layer_norm(xv, ov, options, reinterpret_cast<kiln::Stream>(stream));
}

void group_norm(const InArray& x, std::int64_t num_groups, const std::optional<InArray>& weight,
                const std::optional<InArray>& bias, const OutArray& out, float eps, bool silu,
                std::uintptr_t stream) {
  constexpr const char* kOp = "group_norm";
  const kiln::TensorView xv = to_view(kOp, "x", x);
  const kiln::TensorView ov = to_view(kOp, "out", out);
  kiln::GroupNormOptions options;
  options.num_groups = num_groups;
  options.weight = optional_view(kOp, "weight", weight);
  options.bias = optional_view(kOp, "bias", bias);
  options.eps = eps;
  options.silu = silu;
  nb::gil_scoped_release release;
  kiln::group_norm(xv, ov, options, reinterpret_cast<kiln::Stream>(stream));
}

}  // namespace

void bind_norm(nb::module_& m) {
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight").none(), nb::arg("out"),
        nb::arg("out_scale").none(), nb::arg("eps"), nb::arg("stream"),
        nb::arg("fmt").none() = nb::none(),
        "RMSNorm over the last dim into `out` (fp8 with out_scale; fmt: the format of a uint8 "
        "out holding fp8 codes). See kiln/norm.hpp.");
  m.def("layer_norm", &layer_norm, nb::arg("x"), nb::arg("weight").none(), nb::arg("bias").none(),
        nb::arg("shift").none(), nb::arg("scale").none(), nb::arg("out"),
        nb::arg("out_scale").none(), nb::arg("eps"), nb::arg("stream"),
        nb::arg("fmt").none() = nb::none(),
        "LayerNorm over the last dim, affine, then AdaLN modulation, into `out` (see "
        "kiln/norm.hpp).");
  m.def("group_norm", &group_norm, nb::arg("x"), nb::arg("num_groups"), nb::arg("weight").none(),
        nb::arg("bias").none(), nb::arg("out"), nb::arg("eps"), nb::arg("silu"), nb::arg("stream"),
        "GroupNorm (+ SiLU) into `out` (see kiln/norm.hpp).");
}

}  // namespace kiln_python
