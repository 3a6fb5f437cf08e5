#include "common.hpp"

#include <optional>
#include <string>

namespace kiln_python {

[[noreturn]] void invalid(const char* op, const char* arg, const std::string& what) {
  throw kiln::Error(kiln::ErrorCode::invalid_argument,
                    std::string("kiln::") + op + ": " + arg + " " + what);
}

namespace {

// A DLPack dtype in the frameworks' words: "float64", "bool", "complex64", "float8_e4m3fnuz"...
std::string dlpack_dtype_name(nb::dlpack::dtype dt) {
  using Code = nb::dlpack::dtype_code;
  std::string name;
  switch (static_cast<Code>(dt.code)) {
    case Code::Int:
      name = "int" + std::to_string(dt.bits);
      break;
    case Code::UInt:
      name = "uint" + std::to_string(dt.bits);
      break;
    case Code::Float:
      name = "float" + std::to_string(dt.bits);
      break;
    case Code::Bfloat:
      name = "bfloat" + std::to_string(dt.bits);
      break;
    case Code::Complex:
      name = "complex" + std::to_string(dt.bits);
      break;
    case Code::Bool:
      name = "bool";
      break;
    case Code::Float8_E4M3FNUZ:
      name = "float8_e4m3fnuz";
      break;
    case Code::Float8_E5M2FNUZ:
      name = "float8_e5m2fnuz";
      break;
    case Code::Float8_E8M0FNU:
      name = "float8_e8m0fnu";
      break;
    case Code::Float4_E2M1FN:
      name = "float4_e2m1fn";
      break;
    default:
      name = "DLPack code " + std::to_string(dt.code) + " of " + std::to_string(dt.bits) + " bits";
      break;
  }
  return dt.lanes == 1 ? name : name + " x " + std::to_string(dt.lanes) + " lanes";
}

}  // namespace

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
          "has dtype " + dlpack_dtype_name(dt) +
              ", which no kiln op takes (kiln computes in f32, f16, bf16 and fp8, and takes "
              "u8 bytes and i32/i64 lengths where an op says so)");
}

kiln::Device to_device(const char* op, const char* arg, int device_type, int device_id) {
  if (device_type == nb::device::cpu::value) return kiln::Device::cpu();
  if (device_type == nb::device::cuda::value) return kiln::Device::cuda(device_id);
  invalid(op, arg,
          "lives on DLPack device type " + std::to_string(device_type) +
              ", expected cpu (1) or cuda (2)");
}

kiln::DType to_dtype_name(const char* op, const char* arg, const std::string& name) {
  for (kiln::DType d : {kiln::DType::f32, kiln::DType::f16, kiln::DType::bf16,
                        kiln::DType::f8_e4m3fn, kiln::DType::f8_e5m2}) {
    if (name == kiln::dtype_name(d)) return d;
  }
  invalid(op, arg, "is '" + name + "', expected f32, f16, bf16, f8_e4m3fn or f8_e5m2");
}

kiln::TensorView as_fp8(const char* op, const char* arg, const kiln::TensorView& view,
                        const std::optional<std::string>& format) {
  if (!format) return view;
  const kiln::DType fp8 = to_dtype_name(op, arg, *format);
  if (fp8 != kiln::DType::f8_e4m3fn && fp8 != kiln::DType::f8_e5m2) {
    invalid(op, arg, "format is '" + *format + "', expected f8_e4m3fn or f8_e5m2");
  }
  if (view.dtype() != kiln::DType::u8 && view.dtype() != fp8) {
    invalid(op, arg,
            std::string("is ") + kiln::dtype_name(view.dtype()) + " with format " + *format +
                ", expected uint8 bytes (or that fp8 dtype)");
  }
  return kiln::TensorView(view.data(), fp8, view.shape(), view.strides(), view.device());
}

}  // namespace kiln_python
