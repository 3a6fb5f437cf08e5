// kiln::Error becomes one Python exception class per ErrorCode, all subclasses of
// kiln.KilnError(RuntimeError) with a `code` attribute:
//   invalid_argument -> InvalidArgumentError (also a ValueError)
//   unsupported      -> UnsupportedError     (also a NotImplementedError)
//   out_of_memory    -> OutOfMemoryError     (also a MemoryError)
//   cuda_error       -> CudaError
//   compile_error    -> CompileError
#include "common.hpp"

namespace kiln_python {

namespace {

// One exception class per kiln::ErrorCode, indexed by the code's value.
std::array<PyObject*, 5> g_error_classes{};

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

}  // namespace

void bind_errors(nb::module_& m) {
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

}  // namespace kiln_python
