// NVRTC: one embedded kernel source and one specialization in, one cubin for one arch out.
#pragma once

#include <string>
#include <vector>

#include "jit/kernel_cache.hpp"
#include "jit/kernel_spec.hpp"

namespace kiln::jit {

// Throws kiln::Error (invalid_argument) unless `arch` reads like "sm_80", "sm_90a", "sm_100f".
void check_arch(const std::string& arch);

// The flags kiln compiles `arch` with; part of the disk cache key.
std::vector<std::string> compile_options(const std::string& arch);

// "13.0"; part of the disk cache key.
const std::string& nvrtc_version();

// Compiles `spec` to a cubin for `arch`. `log` receives NVRTC's log of a successful compile
// (warnings; usually empty). Throws kiln::Error (compile_error) with the NVRTC log, spec.key()
// and the arch.
Cubin compile(const KernelSpec& spec, const std::string& arch, std::string& log);

}  // namespace kiln::jit
