// Every kernel variant a workload can ask for compiles with NVRTC for Ampere and Hopper, with no
// warning and no register spilled to local memory, so a kernel edit that breaks or spills one
// specialization fails here, on a machine with no GPU. ptxas's report (-Xptxas=-v) gives the
// spill bytes. With KILN_JIT_DUMP=<dir> every variant's source, PTX, cubin and SASS are written
// there (jit/dump.hpp), e.g. to compare the machine code of two trees (dev/jit/compare_sass.py).
//
// kKnownSpills lists the variants that spilled when this check was introduced (2026-12-07), with
// their exact spill bytes: a ratchet, not an allow-list. The test fails when a listed variant
// spills more, when it spills less or not at all (lower or remove its entry), when an entry names
// no variant any more, and when any other variant spills. Removing the spills needs the GPU to
// measure each change (the attention and conv2d NOTES say what is known); the list only shrinks.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "jit/dump.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/nvrtc.hpp"
#include "jit/variants.hpp"
#include "kiln/error.hpp"

namespace kiln::jit {
namespace {

// (variant key, arch, spill store bytes, spill load bytes), as ptxas reported them.
struct KnownSpill {
  const char* key;
  const char* arch;
  int store_bytes, load_bytes;
};
const KnownSpill kKnownSpills[] = {
    {"kiln::attention_kernel<T=kiln::bf16, TQ=kiln::bf16, TO=kiln::bf16, D=192, DV=192, "
     "WARPS_M=4, WARPS_N=1, BLOCK_N=32, STAGES=2, G=1, CAUSAL=false, MASK=kiln::kMaskNone, "
     "KV_LEN=kiln::kKvLenNone, SOFTCAP=false, SPLIT=false, TMA=false>",
     "sm_80", 32, 48},
    {"kiln::attention_kernel<T=kiln::bf16, TQ=kiln::bf16, TO=kiln::bf16, D=192, DV=192, "
     "WARPS_M=4, WARPS_N=1, BLOCK_N=32, STAGES=2, G=1, CAUSAL=false, MASK=kiln::kMaskNone, "
     "KV_LEN=kiln::kKvLenNone, SOFTCAP=false, SPLIT=false, TMA=false>",
     "sm_90a", 28, 44},
    // 40 / 52 until the strided out of 2026-12-08 (its epilogue's strides moved ptxas's
    // allocation: +8 bytes of loads here, while the entries of D 192 and the D 64 split decode
    // lost 4 + 12 and 3 x (8 + 8) bytes).
    {"kiln::attention_kernel<T=kiln::bf16, TQ=kiln::bf16, TO=kiln::bf16, D=256, DV=256, "
     "WARPS_M=4, WARPS_N=1, BLOCK_N=32, STAGES=2, G=1, CAUSAL=false, MASK=kiln::kMaskNone, "
     "KV_LEN=kiln::kKvLenNone, SOFTCAP=false, SPLIT=false, TMA=false>",
     "sm_80", 40, 60},
    {"kiln::attention_kernel<T=kiln::bf16, TQ=kiln::bf16, TO=kiln::bf16, D=256, DV=256, "
     "WARPS_M=4, WARPS_N=1, BLOCK_N=32, STAGES=2, G=1, CAUSAL=false, MASK=kiln::kMaskNone, "
     "KV_LEN=kiln::kKvLenNone, SOFTCAP=false, SPLIT=false, TMA=false>",
     "sm_90a", 20, 20},
    {"kiln::attention_kernel<T=kiln::bf16, TQ=kiln::bf16, TO=kiln::bf16, D=256, DV=256, "
     "WARPS_M=4, WARPS_N=1, BLOCK_N=32, STAGES=2, G=2, CAUSAL=true, MASK=kiln::kMaskNone, "
     "KV_LEN=kiln::kKvLenNone, SOFTCAP=true, SPLIT=false, TMA=false>",
     "sm_80", 52, 72},
    {"kiln::attention_kernel<T=kiln::bf16, TQ=kiln::bf16, TO=kiln::bf16, D=256, DV=256, "
     "WARPS_M=4, WARPS_N=1, BLOCK_N=32, STAGES=2, G=2, CAUSAL=true, MASK=kiln::kMaskNone, "
     "KV_LEN=kiln::kKvLenNone, SOFTCAP=true, SPLIT=false, TMA=false>",
     "sm_90a", 52, 64},
    {"kiln::attention_kernel<T=kiln::f16, TQ=kiln::f16, TO=kiln::f16, D=128, DV=128, "
     "WARPS_M=8, WARPS_N=1, BLOCK_N=64, STAGES=2, G=1, CAUSAL=false, MASK=kiln::kMaskF16, "
     "KV_LEN=kiln::kKvLenNone, SOFTCAP=false, SPLIT=false, TMA=false>",
     "sm_80", 12, 40},
    {"kiln::implicit_gemm_conv2d<Tx=kiln::bf16, Tw=kiln::bf16, Tb=kiln::bf16, "
     "Tout=kiln::bf16, T=kiln::bf16, KH=3, KW=3, BM=128, BN=128, BK=32, WARPS_M=2, WARPS_N=2, "
     "STAGES=4, X_NHWC=false, ROW_CHUNKS=true, X_ASYNC=false, W_ASYNC=true, IM2COL=true, "
     "OUT_NHWC=false, OUT_VEC=true, HAS_BIAS=true>",
     "sm_90a", 16, 16},
};

const KnownSpill* known_spill(const std::string& key, const std::string& arch) {
  for (const KnownSpill& known : kKnownSpills) {
    if (key == known.key && arch == known.arch) return &known;
  }
  return nullptr;
}

TEST(VariantsCompileTest, EveryWorkloadHasVariants) {
  const std::vector<std::string> names = workloads();
  ASSERT_FALSE(names.empty());
  for (const std::string& name : names) {
    EXPECT_FALSE(workload_variants(name).empty()) << name;
  }
}

// Each family registered in jit/families.def contributes variants to some workload.
TEST(VariantsCompileTest, EveryFamilyHasVariants) {
  std::vector<std::string> names = workloads();
  std::erase(names, "all");
  const auto has_variants = [&](auto* family) {
    return std::any_of(names.begin(), names.end(),
                       [&](const std::string& name) { return !family(name).empty(); });
  };
#define KILN_FAMILY(family) EXPECT_TRUE(has_variants(&family##_detail::variants)) << #family;
#include "jit/families.def"
#undef KILN_FAMILY
}

TEST(VariantsCompileTest, ReportParsesSpillsRegistersAndWarnings) {
  const PtxasReport report = parse_ptxas_report(
      "ptxas info    : 0 bytes gmem\n"
      "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'\n"
      "ptxas info    : Function properties for _Z1kPf\n"
      "ptxas         .     24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
      "ptxas info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]\n"
      "ptxas warning : (C7513) Potential Performance Loss: wgmma.mma_async instructions are "
      "serialized\n");
  EXPECT_EQ(report.functions, 1);
  EXPECT_EQ(report.registers, 168);
  EXPECT_EQ(report.stack_bytes, 24);
  EXPECT_EQ(report.spill_store_bytes, 16);
  EXPECT_EQ(report.spill_load_bytes, 12);
  ASSERT_EQ(report.warnings.size(), 1u);
  EXPECT_NE(report.warnings[0].find("C7513"), std::string::npos);
}

// One test, so that ctest (a process a test) compiles the variants once.
TEST(VariantsCompileTest, EveryVariantCompilesForSm80AndSm90aWithoutSpillsOrWarnings) {
  const std::vector<KernelSpec> specs = workload_variants("all");
  ASSERT_FALSE(specs.empty());
  const std::vector<std::string> archs = {"sm_80", "sm_90a"};
  const std::string dump = dump_dir_from_env();
  // An arch-specific kernel (wgmma, TMA) is built for its own archs only.
  std::vector<std::pair<const KernelSpec*, std::string>> pairs;
  for (const KernelSpec& spec : specs) {
    for (const std::string& arch : archs) {
      if (spec.targets(arch)) pairs.emplace_back(&spec, arch);
    }
  }
  for (const KnownSpill& known : kKnownSpills) {
    const bool listed = std::any_of(pairs.begin(), pairs.end(), [&](const auto& pair) {
      return pair.first->key() == known.key && pair.second == known.arch;
    });
    EXPECT_TRUE(listed) << "kKnownSpills names no variant: " << known.key << " for " << known.arch;
  }
  // What went wrong with each pair, "" when nothing did.
  std::vector<std::string> problems(pairs.size());
  // One NVRTC compile per thread at a time; the variants are independent.
  std::atomic<std::size_t> next{0};
  const auto work = [&] {
    for (std::size_t i = next++; i < pairs.size(); i = next++) {
      const KernelSpec& spec = *pairs[i].first;
      const std::string& arch = pairs[i].second;
      std::string& problem = problems[i];
      try {
        std::string log, ptx;
        const Cubin cubin = compile(spec, arch, log, {true, &ptx});
        const PtxasReport r = parse_ptxas_report(log);
        if (cubin.image.empty()) problem += "empty cubin. ";
        if (r.functions == 0) problem += "no ptxas report in the log:\n" + log;
        const KnownSpill* known = known_spill(spec.key(), arch);
        const int store_bytes = known ? known->store_bytes : 0;
        const int load_bytes = known ? known->load_bytes : 0;
        if (r.spill_store_bytes != store_bytes || r.spill_load_bytes != load_bytes) {
          problem += "spills: " + std::to_string(r.spill_store_bytes) + " bytes of spill stores, " +
                     std::to_string(r.spill_load_bytes) + " bytes of spill loads (" +
                     std::to_string(r.registers) + " registers, " + std::to_string(r.stack_bytes) +
                     " bytes of stack frame), expected " + std::to_string(store_bytes) + " and " +
                     std::to_string(load_bytes) + (known ? " (kKnownSpills)" : "") + ". ";
        }
        for (const std::string& warning : r.warnings) problem += warning + "\n";
        if (!dump.empty()) {
          if (std::string error = write_dump(dump, spec, cubin, ptx, log); !error.empty()) {
            problem += "KILN_JIT_DUMP: " + error;
          }
        }
      } catch (const std::exception& e) {
        problem += e.what();
      }
    }
  };
  std::vector<std::thread> threads(
      std::min<std::size_t>(std::max(1u, std::thread::hardware_concurrency()), pairs.size()));
  for (auto& thread : threads) thread = std::thread(work);
  for (auto& thread : threads) thread.join();

  for (std::size_t i = 0; i < pairs.size(); ++i) {
    if (problems[i].empty()) continue;
    ADD_FAILURE() << pairs[i].first->key() << " (" << pairs[i].first->source << ") for "
                  << pairs[i].second << ": " << problems[i];
  }
}

}  // namespace
}  // namespace kiln::jit
