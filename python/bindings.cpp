// kiln._C: the Python binding of kiln's C++ API (nanobind).
//
// Arrays arrive through DLPack (torch, numpy, CuPy) as nb::ndarray, whose strides are in elements
// like kiln::TensorView's. kiln::Error becomes one Python exception class per ErrorCode, all
// subclasses of kiln.KilnError(RuntimeError) with a `code` attribute:
//   invalid_argument -> InvalidArgumentError (also a ValueError)
//   unsupported      -> UnsupportedError     (also a NotImplementedError)
//   out_of_memory    -> OutOfMemoryError     (also a MemoryError)
//   cuda_error       -> CudaError
//   compile_error    -> CompileError
// Kernel launches, compiles and cache I/O run with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "kiln/jit.hpp"
#include "kiln/rope_flux.hpp"
#include "kiln/tensor.hpp"

namespace nb = nanobind;

namespace {

using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

// One exception class per kiln::ErrorCode, indexed by the code's value.
std::array<PyObject*, 5> g_error_classes{};

[[noreturn]] void invalid(const char* op, const char* arg, const std::string& what) {
  throw kiln::Error(kiln::ErrorCode::invalid_argument,
                    std::string("kiln::") + op + ": " + arg + " " + what);
}

kiln::DType to_dtype(const char* op, const char* arg, nb::dlpack::dtype dt) {
  using Code = nb::dlpack::dtype_code;
  const auto code = static_cast<Code>(dt.code);
  if (dt.lanes == 1) {
    switch (code) {
      case Code::Float:
        if (dt.bits == 32) return kiln::DType::f32;
        if (dt.bits == 16) return kiln::DType::f16;
        break;
      case Code::Bfloat:
        if (dt.bits == 16) return kiln::DType::bf16;
        break;
      case Code::Float8_E4M3FN:
        if (dt.bits == 8) return kiln::DType::f8_e4m3fn;
        break;
      case Code::Float8_E5M2:
        if (dt.bits == 8) return kiln::DType::f8_e5m2;
        break;
      case Code::Int:
        if (dt.bits == 8) return kiln::DType::i8;
        if (dt.bits == 32) return kiln::DType::i32;
        if (dt.bits == 64) return kiln::DType::i64;
        break;
      case Code::UInt:
        if (dt.bits == 8) return kiln::DType::u8;
        break;
      default:
        break;
    }
  }
  invalid(op, arg,
          "has DLPack dtype (code " + std::to_string(dt.code) + ", " + std::to_string(dt.bits) +
              " bits, " + std::to_string(dt.lanes) +
              " lanes), expected one of f32, f16, bf16, f8_e4m3fn, f8_e5m2, i8, u8, i32, i64");
}

kiln::Device to_device(const char* op, const char* arg, int device_type, int device_id) {
  if (device_type == nb::device::cpu::value) return kiln::Device::cpu();
  if (device_type == nb::device::cuda::value) return kiln::Device::cuda(device_id);
  invalid(op, arg,
          "lives on DLPack device type " + std::to_string(device_type) +
              ", expected cpu (1) or cuda (2)");
}

template <typename Array>
kiln::TensorView to_view(const char* op, const char* arg, const Array& a) {
  if (a.ndim() > static_cast<std::size_t>(kiln::kMaxDims)) {
    invalid(op, arg,
            "has " + std::to_string(a.ndim()) + " dims, expected at most " +
                std::to_string(kiln::kMaxDims));
  }
  std::array<std::int64_t, kiln::kMaxDims> shape{};
  std::array<std::int64_t, kiln::kMaxDims> strides{};
  for (std::size_t d = 0; d < a.ndim(); ++d) {
    shape[d] = static_cast<std::int64_t>(a.shape(d));
    strides[d] = a.stride(d);
  }
  const std::size_t n = a.ndim();
  return kiln::TensorView(const_cast<void*>(static_cast<const void*>(a.data())),
                          to_dtype(op, arg, a.dtype()), {shape.data(), n}, {strides.data(), n},
                          to_device(op, arg, a.device_type(), a.device_id()));
}

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

nb::dict jit_stats() {
  const kiln::jit::Stats s = kiln::jit::stats();
  nb::dict d;
  d["compiles"] = s.compiles;
  d["disk_hits"] = s.disk_hits;
  d["memory_hits"] = s.memory_hits;
  d["disk_writes"] = s.disk_writes;
  d["corrupt_entries"] = s.corrupt_entries;
  d["compile_ms"] = s.compile_ms;
  d["disk_load_ms"] = s.disk_load_ms;
  return d;
}

nb::list list_cache() {
  std::vector<kiln::jit::CacheEntry> entries;
  {
    nb::gil_scoped_release release;
    entries = kiln::jit::list_cache();
  }
  nb::list result;
  for (const kiln::jit::CacheEntry& e : entries) {
    nb::dict d;
    d["path"] = e.path;
    d["kernel"] = e.kernel;
    d["arch"] = e.arch;
    d["bytes"] = e.bytes;
    d["valid"] = e.valid;
    result.append(d);
  }
  return result;
}

nb::dict warmup(const std::string& workload, const std::vector<std::string>& archs) {
  kiln::jit::WarmupResult r;
  {
    nb::gil_scoped_release release;
    r = kiln::jit::warmup(workload, archs);
  }
  nb::dict d;
  d["variants"] = r.variants;
  d["compiled"] = r.compiled;
  return d;
}

nb::dict measure_overheads(const std::string& workload, int device) {
  kiln::jit::Overheads o;
  {
    nb::gil_scoped_release release;
    o = kiln::jit::measure_overheads(workload, device);
  }
  nb::dict d;
  d["kernel"] = o.kernel;
  d["arch"] = o.arch;
  d["first_compile_ms"] = o.first_compile_ms;
  d["disk_load_ms"] = o.disk_load_ms;
  d["memory_hit_us"] = o.memory_hit_us;
  return d;
}

// Creates kiln.<name> deriving from `bases` (a class or a tuple), with class attribute `code`.
PyObject* make_error_class(nb::module_& m, const char* name, const char* doc, PyObject* bases,
                           const char* code) {
  nb::dict attrs;
  attrs["code"] = code;
  const std::string qualified = std::string("kiln.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, attrs.ptr());
  if (cls == nullptr) throw nb::python_error();
  m.attr(name) = nb::handle(cls);
  return cls;
}

void register_errors(nb::module_& m) {
  nb::dict base_attrs;
  base_attrs["code"] = nb::none();
  PyObject* base = PyErr_NewExceptionWithDoc(
      "kiln.KilnError",
      "An error raised by kiln; `code` names its kind (invalid_argument, unsupported, "
      "out_of_memory, cuda_error, compile_error).",
      PyExc_RuntimeError, base_attrs.ptr());
  if (base == nullptr) throw nb::python_error();
  m.attr("KilnError") = nb::handle(base);

  const auto with = [base](PyObject* builtin) {
    return nb::make_tuple(nb::handle(base), nb::handle(builtin)).release().ptr();
  };
  using kiln::ErrorCode;
  g_error_classes[static_cast<std::size_t>(ErrorCode::invalid_argument)] = make_error_class(
      m, "InvalidArgumentError", "A shape, dtype, stride, device or value the op does not accept.",
      with(PyExc_ValueError), "invalid_argument");
  g_error_classes[static_cast<std::size_t>(ErrorCode::unsupported)] = make_error_class(
      m, "UnsupportedError", "A valid request kiln does not implement (e.g. no CUDA device).",
      with(PyExc_NotImplementedError), "unsupported");
  g_error_classes[static_cast<std::size_t>(ErrorCode::out_of_memory)] =
      make_error_class(m, "OutOfMemoryError", "A device or host allocation failed.",
                       with(PyExc_MemoryError), "out_of_memory");
  g_error_classes[static_cast<std::size_t>(ErrorCode::cuda_error)] =
      make_error_class(m, "CudaError", "The CUDA runtime reported an error.", base, "cuda_error");
  g_error_classes[static_cast<std::size_t>(ErrorCode::compile_error)] =
      make_error_class(m, "CompileError", "NVRTC rejected a kernel; the message carries its log.",
                       base, "compile_error");

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const kiln::Error& e) {
      PyErr_SetString(g_error_classes[static_cast<std::size_t>(e.code())], e.what());
    }
  });
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "kiln's C++ API; use the kiln package rather than this module.";
  register_errors(m);

  m.def("rope_flux", &rope_flux, nb::arg("x"), nb::arg("pe").none(), nb::arg("out"),
        nb::arg("norm_weight").none(), nb::arg("eps"), nb::arg("stream"),
        "Flux RoPE + [N, L, H, D] -> [N, H, L, D] permute into `out` (see kiln/rope_flux.hpp).");

  m.def("cuda_device_count", &kiln::cuda_device_count);
  m.def("cuda_unavailable_reason", &kiln::cuda_unavailable_reason);
  m.def("cuda_arch", &kiln::cuda_arch, nb::arg("device"));

  m.def("jit_stats", &jit_stats, "Counters of the process-wide kernel cache.");
  m.def("jit_reset_stats", &kiln::jit::reset_stats);
  m.def("cache_dir", &kiln::jit::cache_dir,
        "The disk cache folder in use; '' when the cache is memory-only.");
  m.def("list_cache", &list_cache, "Entries of the disk cache: path, kernel, arch, bytes, valid.");
  m.def("clear_cache", &kiln::jit::clear_cache, nb::call_guard<nb::gil_scoped_release>(),
        "Removes every kiln entry from the disk and memory caches; returns the files removed.");
  m.def("workloads", &kiln::jit::workloads);
  m.def("warmup", &warmup, nb::arg("workload"), nb::arg("archs"),
        "Compiles and stores every kernel variant of `workload` for `archs`; needs no GPU.");
  m.def("measure_overheads", &measure_overheads, nb::arg("workload"), nb::arg("device"),
        "First compile, disk load and memory hit times of the JIT on `device`.");
  m.def("version", &kiln::jit::version);
}
