// kiln::quantize_fp8, quantize_q8_0, dequantize, matmul, select_path and prepared weights
// (src/ops/matmul/README.md, "Python binding", lists the functions and their arguments).
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common.hpp"
#include "kiln/matmul.hpp"

namespace kiln_python {

namespace {

kiln::ScaleGranularity to_granularity(const std::string& name) {
  if (name == "tensor") return kiln::ScaleGranularity::tensor;
  if (name == "row") return kiln::ScaleGranularity::row;
  if (name == "block128") return kiln::ScaleGranularity::block128;
  invalid("quantize_fp8", "granularity", "is '" + name + "', expected tensor, row or block128");
}

kiln::WeightFormat to_format(const char* op, const std::string& name) {
  for (kiln::WeightFormat f :
       {kiln::WeightFormat::f16, kiln::WeightFormat::bf16, kiln::WeightFormat::f8_e4m3fn,
        kiln::WeightFormat::f8_e5m2, kiln::WeightFormat::q8_0}) {
    if (name == kiln::weight_format_name(f)) return f;
  }
  invalid(op, "w_format", "is '" + name + "', expected f16, bf16, f8_e4m3fn, f8_e5m2 or q8_0");
}

kiln::WeightLayout to_layout(const char* op, const std::string& name) {
  for (kiln::WeightLayout l : {kiln::WeightLayout::row_major, kiln::WeightLayout::gemm_packed,
                               kiln::WeightLayout::dequantized}) {
    if (name == kiln::weight_layout_name(l)) return l;
  }
  invalid(op, "w_layout", "is '" + name + "', expected row_major, gemm_packed or dequantized");
}

kiln::MatmulPath to_path(const char* op, const std::string& name) {
  for (kiln::MatmulPath p :
       {kiln::MatmulPath::automatic, kiln::MatmulPath::gemv, kiln::MatmulPath::gemm,
        kiln::MatmulPath::fp8_native, kiln::MatmulPath::reference}) {
    if (name == kiln::matmul_path_name(p)) return p;
  }
  invalid(op, "path", "is '" + name + "', expected auto, gemv, gemm, fp8_native or reference");
}

kiln::Stream to_stream(std::uintptr_t stream) { return reinterpret_cast<kiln::Stream>(stream); }

kiln::Weight to_weight(const char* op, const InArray& w, const std::string& format, std::int64_t n,
                       std::int64_t k, const std::optional<InArray>& scale,
                       const std::string& layout) {
  kiln::Weight weight;
  weight.data = to_view(op, "w", w);
  weight.format = to_format(op, format);
  weight.layout = to_layout(op, layout);
  // fp8 bytes held as uint8 (numpy, CuPy) in the checkpoint's layout.
  const bool fp8 = weight.format == kiln::WeightFormat::f8_e4m3fn ||
                   weight.format == kiln::WeightFormat::f8_e5m2;
  if (fp8 && weight.layout == kiln::WeightLayout::row_major &&
      weight.data.dtype() == kiln::DType::u8) {
    weight.data = as_fp8(op, "w", weight.data, format);
  }
  weight.n = n;
  weight.k = k;
  if (scale) weight.scale = to_view(op, "w_scale", *scale);
  return weight;
}

void quantize_fp8(const InArray& x, const OutArray& q, const OutArray& scale,
                  const std::string& granularity, bool compute_scale, std::uintptr_t stream,
                  const std::optional<std::string>& fmt) {
  const kiln::TensorView xv = to_view("quantize_fp8", "x", x);
  const kiln::TensorView qv = as_fp8("quantize_fp8", "q", to_view("quantize_fp8", "q", q), fmt);
  const kiln::TensorView sv = to_view("quantize_fp8", "scale", scale);
  const kiln::ScaleGranularity g = to_granularity(granularity);
  nb::gil_scoped_release release;
  kiln::quantize_fp8(xv, qv, sv, g, compute_scale, to_stream(stream));
}

void quantize_q8_0(const InArray& x, const OutArray& q, std::uintptr_t stream) {
  const kiln::TensorView xv = to_view("quantize_q8_0", "x", x);
  const kiln::TensorView qv = to_view("quantize_q8_0", "q", q);
  nb::gil_scoped_release release;
  kiln::quantize_q8_0(xv, qv, to_stream(stream));
}

void dequantize(const InArray& q, const std::optional<InArray>& scale, const OutArray& out,
                std::uintptr_t stream, const std::optional<std::string>& fmt) {
  const kiln::TensorView qv = as_fp8("dequantize", "q", to_view("dequantize", "q", q), fmt);
  std::optional<kiln::TensorView> sv;
  if (scale) sv = to_view("dequantize", "scale", *scale);
  const kiln::TensorView ov = to_view("dequantize", "out", out);
  nb::gil_scoped_release release;
  kiln::dequantize(qv, sv, ov, to_stream(stream));
}

std::string matmul(const InArray& a, const InArray& w, const std::string& w_format, std::int64_t n,
                   std::int64_t k, const std::optional<InArray>& w_scale,
                   const std::string& w_layout, const OutArray& out,
                   const std::optional<InArray>& a_scale, const std::optional<InArray>& bias,
                   const std::string& path, std::uintptr_t stream,
                   const std::optional<std::string>& a_format, const std::optional<InArray>& gate,
                   const std::optional<InArray>& residual) {
  const kiln::TensorView av = as_fp8("matmul", "a", to_view("matmul", "a", a), a_format);
  const kiln::Weight weight = to_weight("matmul", w, w_format, n, k, w_scale, w_layout);
  const kiln::TensorView ov = to_view("matmul", "out", out);
  kiln::MatmulOptions options;
  if (a_scale) options.a_scale = to_view("matmul", "a_scale", *a_scale);
  if (bias) options.bias = to_view("matmul", "bias", *bias);
  if (gate) options.gate = to_view("matmul", "gate", *gate);
  if (residual) options.residual = to_view("matmul", "residual", *residual);
  options.path = to_path("matmul", path);
  kiln::MatmulPath ran;
  {
    nb::gil_scoped_release release;
    ran = kiln::matmul(av, weight, ov, options, to_stream(stream));
  }
  return kiln::matmul_path_name(ran);
}

std::string matmul_select_path(std::int64_t m, std::int64_t n, std::int64_t k,
                               const std::string& w_format, const std::string& w_layout,
                               const std::string& a_dtype, int device) {
  kiln::Weight weight;
  weight.format = to_format("select_path", w_format);
  weight.layout = to_layout("select_path", w_layout);
  weight.n = n;
  weight.k = k;
  const kiln::Device dev = device < 0 ? kiln::Device::cpu() : kiln::Device::cuda(device);
  return kiln::matmul_path_name(
      kiln::select_path(m, weight, to_dtype_name("select_path", "a_dtype", a_dtype), dev));
}

std::size_t prepared_weight_bytes(const InArray& w, const std::string& w_format, std::int64_t n,
                                  std::int64_t k, const std::optional<InArray>& w_scale,
                                  const std::string& w_layout, const std::string& path) {
  const kiln::Weight weight =
      to_weight("prepared_weight_bytes", w, w_format, n, k, w_scale, w_layout);
  return kiln::prepared_weight_bytes(weight, to_path("prepared_weight_bytes", path));
}

std::tuple<std::string, std::string, bool> prepare_weight(
    const InArray& w, const std::string& w_format, std::int64_t n, std::int64_t k,
    const std::optional<InArray>& w_scale, const std::string& w_layout, const std::string& path,
    const OutArray& storage, std::uintptr_t stream) {
  const kiln::Weight weight = to_weight("prepare_weight", w, w_format, n, k, w_scale, w_layout);
  const kiln::MatmulPath p = to_path("prepare_weight", path);
  const kiln::TensorView sv = to_view("prepare_weight", "storage", storage);
  kiln::Weight prepared;
  {
    nb::gil_scoped_release release;
    prepared = kiln::prepare_weight(weight, p, sv, to_stream(stream));
  }
  return {kiln::weight_format_name(prepared.format), kiln::weight_layout_name(prepared.layout),
          prepared.scale.has_value()};
}

}  // namespace

void bind_matmul(nb::module_& m) {
  m.def("quantize_fp8", &quantize_fp8, nb::arg("x"), nb::arg("q"), nb::arg("scale"),
        nb::arg("granularity"), nb::arg("compute_scale"), nb::arg("stream"),
        nb::arg("fmt").none() = nb::none(),
        "x -> fp8 q (format = q's dtype, or fmt for uint8 q) with its scale (kiln/matmul.hpp).");
  m.def("quantize_q8_0", &quantize_q8_0, nb::arg("x"), nb::arg("q"), nb::arg("stream"),
        "x -> ggml Q8_0 blocks, u8 [R, C / 32 * 34].");
  m.def("dequantize", &dequantize, nb::arg("q"), nb::arg("scale").none(), nb::arg("out"),
        nb::arg("stream"), nb::arg("fmt").none() = nb::none(),
        "fp8 q * scale (fmt: the format of uint8 q holding fp8 bytes), or Q8_0 blocks, into out.");
  m.def("matmul", &matmul, nb::arg("a"), nb::arg("w"), nb::arg("w_format"), nb::arg("n"),
        nb::arg("k"), nb::arg("w_scale").none(), nb::arg("w_layout"), nb::arg("out"),
        nb::arg("a_scale").none(), nb::arg("bias").none(), nb::arg("path"), nb::arg("stream"),
        nb::arg("a_format").none() = nb::none(), nb::arg("gate").none() = nb::none(),
        nb::arg("residual").none() = nb::none(),
        "out = residual + gate * ((a . w^T) * a_scale * w_scale + bias); returns the path that "
        "ran. a_format: the fp8 format of uint8 a; a uint8 w with an fp8 w_format is read as "
        "that format.");
  m.def("matmul_select_path", &matmul_select_path, nb::arg("m"), nb::arg("n"), nb::arg("k"),
        nb::arg("w_format"), nb::arg("w_layout"), nb::arg("a_dtype"), nb::arg("device"),
        "The path `auto` runs for this problem on CUDA device `device` (-1: CPU).");
  m.def("prepared_weight_bytes", &prepared_weight_bytes, nb::arg("w"), nb::arg("w_format"),
        nb::arg("n"), nb::arg("k"), nb::arg("w_scale").none(), nb::arg("w_layout"), nb::arg("path"),
        "Bytes of u8 storage prepare_weight needs for `path`.");
  m.def("prepare_weight", &prepare_weight, nb::arg("w"), nb::arg("w_format"), nb::arg("n"),
        nb::arg("k"), nb::arg("w_scale").none(), nb::arg("w_layout"), nb::arg("path"),
        nb::arg("storage"), nb::arg("stream"),
        "Repacks w into `storage`; returns (w_format, w_layout, keeps_scale) of the copy.");
}

}  // namespace kiln_python
