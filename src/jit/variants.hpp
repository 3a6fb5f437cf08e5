// The kernel variants of the named workloads: what `kiln cache warmup` precompiles and what CI
// compiles for sm_80 and sm_90a. Each op family listed in jit/families.def contributes its own
// list; the JIT includes no family's internal header.
#pragma once

#include <string>
#include <vector>

#include "jit/kernel_spec.hpp"

#define KILN_FAMILY(family)                                                               \
  namespace kiln::family##_detail {                                                       \
    /* The variants `workload` needs from this family (none for a workload it is not in). \
       Defined in src/ops/<family>/launch.cpp. */                                         \
    std::vector<jit::KernelSpec> variants(const std::string& workload);                   \
  }
#include "jit/families.def"
#undef KILN_FAMILY

namespace kiln::jit {

// Every (spec) a workload needs, each once; throws kiln::Error (invalid_argument) for an unknown
// workload. "all" is every workload.
std::vector<KernelSpec> workload_variants(const std::string& workload);

}  // namespace kiln::jit
