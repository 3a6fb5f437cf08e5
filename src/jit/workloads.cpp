// The checked-in list of kernel variants, by workload: what `kiln cache warmup` precompiles and
// what CI compiles for sm_80 and sm_90a. Each op family in jit/families.def contributes its own.
#include <algorithm>
#include <set>

#include "core/check.hpp"
#include "jit/variants.hpp"
#include "kiln/jit.hpp"

namespace kiln::jit {

namespace {
// "flux": Flux.1/Flux.2 inference; "flux-unfused": the A/B chains behind KILN_DISABLE;
// "flux-vae": the Flux VAE decoder's convolutions and GroupNorms; "llm": LLM prefill and decode
// attention, RoPE, norms, activations and the matmuls of ANCHORS' LLM shapes;
// "attention-head-dims": attention at every head dim in use.
const std::vector<std::string> kWorkloads = {"flux", "flux-unfused", "flux-vae", "llm",
                                             "attention-head-dims"};
}  // namespace

std::vector<std::string> workloads() {
  std::vector<std::string> names = kWorkloads;
  names.push_back("all");
  return names;
}

std::vector<KernelSpec> workload_variants(const std::string& workload) {
  std::vector<std::string> selected;
  if (workload == "all") {
    selected = kWorkloads;
  } else if (std::find(kWorkloads.begin(), kWorkloads.end(), workload) != kWorkloads.end()) {
    selected = {workload};
  } else {
    std::string names;
    for (const auto& w : workloads()) names += (names.empty() ? "" : ", ") + w;
    check::fail("jit::warmup", ErrorCode::invalid_argument,
                "workload '" + workload + "' is unknown, expected one of " + names);
  }
  std::vector<KernelSpec> specs;
  std::set<std::string> seen;
  for (const auto& name : selected) {
    for (auto* family : {
#define KILN_FAMILY(family) &family##_detail::variants,
#include "jit/families.def"
#undef KILN_FAMILY
         }) {
      for (auto& spec : family(name)) {
        if (seen.insert(spec.key()).second) specs.push_back(std::move(spec));
      }
    }
  }
  return specs;
}

}  // namespace kiln::jit
