// The public face of the JIT (include/kiln/jit.hpp), over the process-wide cache.
#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>

#include "core/check.hpp"
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
  return warm(process_cache(), workload_variants(workload), archs);
}

WarmupResult warm(KernelCache& cache, const std::vector<KernelSpec>& specs,
                  const std::vector<std::string>& archs) {
  if (archs.empty()) {
    check::fail("jit", ErrorCode::invalid_argument,
                "warmup got no arch, expected one or more like \"sm_90a\"");
  }
  // The (spec, arch) pairs to build: an arch-specific kernel only for its archs. Every arch is
  // checked before anything compiles: one clear error rather than a compile log per kernel.
  std::vector<std::pair<const KernelSpec*, const std::string*>> jobs;
  for (const std::string& arch : archs) {
    check_supported_arch(arch);
    for (const KernelSpec& spec : specs) {
      if (spec.targets(arch)) jobs.emplace_back(&spec, &arch);
    }
  }
  WarmupResult result;
  result.variants = jobs.size();
  const Stats before = cache.stats();

  // NVRTC compiles independent programs in parallel, and a workload's variants are many. The
  // first pass skips entries another process has claimed (it is compiling them); the second
  // waits for those and reads them from disk.
  std::mutex mutex;
  std::exception_ptr failure;
  std::vector<std::size_t> claimed;
  const auto run = [&](const std::vector<std::size_t>& todo, bool wait) {
    std::atomic<std::size_t> next{0};
    const auto work = [&] {
      for (std::size_t i = next++; i < todo.size(); i = next++) {
        const auto& [spec, arch] = jobs[todo[i]];
        try {
          if (wait) {
            cache.cubin(*spec, *arch);
          } else if (cache.cubin_unless_claimed(*spec, *arch) == nullptr) {
            std::lock_guard<std::mutex> lock(mutex);
            claimed.push_back(todo[i]);
          }
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex);
          if (!failure) failure = std::current_exception();
        }
      }
    };
    const std::size_t workers =
        std::min<std::size_t>(std::max(1u, std::thread::hardware_concurrency()), todo.size());
    std::vector<std::thread> threads;
    for (std::size_t t = 1; t < workers; ++t) threads.emplace_back(work);
    work();
    for (std::thread& thread : threads) thread.join();
  };
  std::vector<std::size_t> all(jobs.size());
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
  run(all, false);
  if (!failure) run(std::vector<std::size_t>(claimed), true);
  if (failure) std::rethrow_exception(failure);

  // Exact unless other threads of the process compile at the same time.
  const Stats after = cache.stats();
  result.compiled = after.compiles - before.compiles;
  result.stored = after.disk_writes - before.disk_writes;
  return result;
}

bool cache_writable() { return process_cache().writable(); }

const char* version() { return KILN_VERSION; }

}  // namespace kiln::jit
