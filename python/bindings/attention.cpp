// kiln::attention.
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>

#include "common.hpp"
#include "kiln/attention.hpp"

namespace kiln_python {

namespace {

void attention(const InArray& q, const InArray& k, const InArray& v, const OutArray& out,
               bool causal, std::optional<float> scale, const std::optional<InArray>& mask,
               const std::optional<InArray>& kv_len, std::optional<float> softcap,
               const std::optional<OutArray>& lse, std::uintptr_t stream) {
  constexpr const char* op = "attention";
  kiln::AttentionOptions options;
  options.scale = scale;
  options.causal = causal;
  if (mask) options.mask = to_view(op, "mask", *mask);
  if (kv_len) options.kv_len = to_view(op, "kv_len", *kv_len);
  options.softcap = softcap;
  if (lse) options.lse = to_view(op, "lse", *lse);
  const kiln::TensorView q_view = to_view(op, "q", q);
  const kiln::TensorView k_view = to_view(op, "k", k);
  const kiln::TensorView v_view = to_view(op, "v", v);
  const kiln::TensorView out_view = to_view(op, "out", out);
  nb::gil_scoped_release release;
  kiln::attention(q_view, k_view, v_view, out_view, options,
                  reinterpret_cast<kiln::Stream>(stream));
}

}  // namespace

void bind_attention(nb::module_& m) {
  m.def("attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"),
        nb::arg("causal"), nb::arg("scale").none(), nb::arg("mask").none(),
        nb::arg("kv_len").none(), nb::arg("softcap").none(), nb::arg("lse").none(),
        nb::arg("stream"),
        "Scaled dot-product attention into `out` (and `lse`); see kiln/attention.hpp.");
}

}  // namespace kiln_python
