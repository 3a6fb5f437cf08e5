// The public face of the JIT (include/kiln/jit.hpp), over the process-wide cache.
#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>

#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "kiln/jit.hpp"

namespace kiln::jit {

Stats stats() { return process_cache().stats(); }

void reset_stats() { process_cache().reset_stats(); }

std::string cache_dir() { return process_cache().dir(); }

std::vector<CacheEntry> list_cache() { return process_cache().list(); }

std::size_t clear_cache() { return process_cache().clear(); }

WarmupResult warmup(const std::string& workload, const std::vector<std::string>& archs) {
  const std::vector<KernelSpec> specs = workload_variants(workload);
  // The (spec, arch) pairs to build: an arch-specific kernel only for its archs.
  std::vector<std::pair<const KernelSpec*, const std::string*>> jobs;
  for (const KernelSpec& spec : specs) {
    for (const std::string& arch : archs) {
      if (spec.targets(arch)) jobs.emplace_back(&spec, &arch);
    }
  }
  WarmupResult result;
  result.variants = jobs.size();
  KernelCache& cache = process_cache();
  const std::uint64_t compiles_before = cache.stats().compiles;

  // NVRTC compiles independent programs in parallel, and a workload's variants are many.
  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  const auto work = [&] {
    for (std::size_t i = next++; i < result.variants; i = next++) {
      try {
        cache.cubin(*jobs[i].first, *jobs[i].second);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
      }
    }
  };
  const std::size_t workers =
      std::min<std::size_t>(std::max(1u, std::thread::hardware_concurrency()), jobs.size());
  std::vector<std::thread> threads;
  for (std::size_t t = 1; t < workers; ++t) threads.emplace_back(work);
  work();
  for (std::thread& thread : threads) thread.join();
  if (failure) std::rethrow_exception(failure);

  // Exact unless other threads of the process compile at the same time.
  result.compiled = cache.stats().compiles - compiles_before;
  return result;
}

const char* version() { return KILN_VERSION; }

}  // namespace kiln::jit
