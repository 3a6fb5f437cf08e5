// Every kernel variant a workload can ask for compiles with NVRTC for Ampere and Hopper, so a
// kernel edit that breaks one specialization fails here, on a machine with no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>

#include "jit/kernel_cache.hpp"
#include "kiln/error.hpp"

namespace kiln::jit {
namespace {

TEST(VariantsCompileTest, EveryWorkloadHasVariants) {
  const std::vector<std::string> names = workloads();
  ASSERT_FALSE(names.empty());
  for (const std::string& name : names) {
    EXPECT_FALSE(workload_variants(name).empty()) << name;
  }
}

TEST(VariantsCompileTest, EveryVariantCompilesForSm80AndSm90a) {
  const std::vector<KernelSpec> specs = workload_variants("all");
  ASSERT_FALSE(specs.empty());
  const std::vector<std::string> archs = {"sm_80", "sm_90a"};
  KernelCache cache(CacheConfig{});  // memory-only: this test must not depend on the disk

  // One NVRTC compile per thread at a time; the variants are independent. An arch-specific kernel
  // (wgmma, TMA) is built for its own archs only.
  std::vector<std::pair<const KernelSpec*, std::string>> pairs;
  for (const KernelSpec& spec : specs) {
    for (const std::string& arch : archs) {
      if (spec.targets(arch)) pairs.emplace_back(&spec, arch);
    }
  }
  const std::size_t jobs = pairs.size();
  std::atomic<std::size_t> next{0};
  std::mutex mutex;
  std::vector<std::string> failures;
  const auto work = [&] {
    for (std::size_t i = next++; i < jobs; i = next++) {
      const KernelSpec& spec = *pairs[i].first;
      const std::string& arch = pairs[i].second;
      try {
        const auto cubin = cache.cubin(spec, arch);
        if (cubin->image.empty()) throw std::runtime_error("empty cubin");
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mutex);
        failures.push_back(spec.key() + " (" + spec.source + ") for " + arch + ": " + e.what());
      }
    }
  };
  std::vector<std::thread> threads(
      std::min<std::size_t>(std::max(1u, std::thread::hardware_concurrency()), jobs));
  for (auto& thread : threads) thread = std::thread(work);
  for (auto& thread : threads) thread.join();

  for (const std::string& failure : failures) ADD_FAILURE() << failure;
  if (failures.empty()) {
    const Stats s = cache.stats();
    EXPECT_EQ(s.compiles + s.memory_hits, jobs);  // "all" may list a variant twice
  }
}

}  // namespace
}  // namespace kiln::jit
