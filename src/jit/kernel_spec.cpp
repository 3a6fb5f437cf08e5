#include "jit/kernel_spec.hpp"

#include <algorithm>

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

}  // namespace kiln::jit
