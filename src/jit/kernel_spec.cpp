#include "jit/kernel_spec.hpp"

#include <algorithm>
#include <string>

#include "core/check.hpp"

namespace kiln::jit {

std::string KernelSpec::name_expression() const {
  if (params.empty()) return kernel;
  std::string s = kernel + "<";
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (i) s += ", ";
    s += params[i].second;
  }
  return s + ">";
}

std::string KernelSpec::key() const {
  if (params.empty()) return kernel;
  std::string s = kernel + "<";
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (i) s += ", ";
    s += params[i].first;
    s += '=';
    s += params[i].second;
  }
  return s + ">";
}

bool KernelSpec::targets(const std::string& arch) const {
  return archs.empty() || std::find(archs.begin(), archs.end(), arch) != archs.end();
}

const char* cpp_type(const char* op, DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "float";
    case DType::f16:
      return "kiln::f16";
    case DType::bf16:
      return "kiln::bf16";
    case DType::f8_e4m3fn:
      return "kiln::e4m3";
    case DType::f8_e5m2:
      return "kiln::e5m2";
    default:
      check::fail(op, ErrorCode::unsupported,
                  std::string("no kernel type for ") + dtype_name(dtype));
  }
}

const char* cpp_bool(bool value) { return value ? "true" : "false"; }

}  // namespace kiln::jit
