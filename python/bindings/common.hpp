// Shared pieces of kiln._C, the nanobind binding of kiln's C++ API: DLPack arrays to
// kiln::TensorView, and the registration function of each part of the module. Each op family
// binds itself in its own file (bindings/<family>.cpp) and is registered in module.cpp.
//
// Arrays arrive through DLPack (torch, numpy, CuPy) as nb::ndarray, whose strides are in elements
// like kiln::TensorView's. Kernel launches, compiles and cache I/O run with the GIL released.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "kiln/error.hpp"
#include "kiln/tensor.hpp"

namespace kiln_python {

namespace nb = nanobind;

using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

// Throws kiln::Error(invalid_argument) "kiln::<op>: <arg> <what>".
[[noreturn]] void invalid(const char* op, const char* arg, const std::string& what);
kiln::DType to_dtype(const char* op, const char* arg, nb::dlpack::dtype dt);
kiln::Device to_device(const char* op, const char* arg, int device_type, int device_id);
// A dtype by kiln's name: "f32", "f16", "bf16", "f8_e4m3fn" or "f8_e5m2".
kiln::DType to_dtype_name(const char* op, const char* arg, const std::string& name);
// numpy and CuPy have no fp8 dtype: fp8 data arrives as uint8 bytes with its format named
// ("f8_e4m3fn" or "f8_e5m2"); the view is re-typed, the bytes are the same. No format: `view`.
kiln::TensorView as_fp8(const char* op, const char* arg, const kiln::TensorView& view,
                        const std::optional<std::string>& format);

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

// The parts of the module, each defined in its own file.
void bind_activation(nb::module_& m);
void bind_conv2d(nb::module_& m);
void bind_errors(nb::module_& m);
void bind_jit(nb::module_& m);
void bind_matmul(nb::module_& m);
void bind_norm(nb::module_& m);
void bind_rope_flux(nb::module_& m);
void bind_attention(nb::module_& m);

}  // namespace kiln_python
