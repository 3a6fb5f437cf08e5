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

// What a compile may give besides the cubin.
struct CompileExtras {
  bool ptxas_verbose = false;  // -Xptxas=-v: the log also holds ptxas's report (PtxasReport)
  std::string* ptx = nullptr;  // receives the PTX that ptxas compiled
};

// Compiles `spec` to a cubin for `arch`. `log` receives NVRTC's log of a successful compile
// (warnings; usually empty). Throws kiln::Error (compile_error) with the NVRTC log, spec.key()
// and the arch.
Cubin compile(const KernelSpec& spec, const std::string& arch, std::string& log,
              const CompileExtras& extras = {});

// ptxas's report in the log of a verbose compile (CompileExtras::ptxas_verbose), summed over the
// functions it lists, and every warning line of the log (NVRTC's or ptxas's).
struct PtxasReport {
  int functions = 0;  // "Compiling entry function" lines
  int registers = 0;  // the most any function uses
  int stack_bytes = 0;
  int spill_store_bytes = 0;
  int spill_load_bytes = 0;
  std::vector<std::string> warnings;
};
PtxasReport parse_ptxas_report(const std::string& log);

}  // namespace kiln::jit
