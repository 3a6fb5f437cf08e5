// jit::measure_overheads: the three paths of a kernel request, timed on the host.
#include <unistd.h>
#include <chrono>
#include <filesystem>
#include <string>

#include "core/check.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "kiln/device.hpp"

namespace kiln::jit {

namespace {

double elapsed_ms(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since)
      .count();
}

}  // namespace

Overheads measure_overheads(const std::string& workload, int device) {
  const auto specs = workload_variants(workload);
  if (specs.empty()) {
    check::fail("jit::measure_overheads", ErrorCode::invalid_argument,
                "workload '" + workload + "' has no kernel variants");
  }
  const KernelSpec& spec = specs.front();
  Overheads result;
  result.kernel = spec.key();
  result.arch = cuda_arch(device);

  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() /
      ("kiln-overheads-" + std::to_string(::getpid()) + "-" +
       std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  {
    KernelCache cold({dir.string(), false});
    const auto t0 = std::chrono::steady_clock::now();
    cold.kernel(spec, device);
    result.first_compile_ms = elapsed_ms(t0);
  }
  {
    KernelCache warm({dir.string(), false});
    auto t0 = std::chrono::steady_clock::now();
    warm.kernel(spec, device);
    result.disk_load_ms = elapsed_ms(t0);

    // A memory hit as an op pays it: the specialization is built anew for every request.
    constexpr int kRequests = 100000;
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kRequests; ++i) {
      const KernelSpec request = spec;
      warm.kernel(request, device);
    }
    result.memory_hit_us = elapsed_ms(t0) * 1000.0 / kRequests;
  }
  std::error_code ignored;
  fs::remove_all(dir, ignored);
  return result;
}

}  // namespace kiln::jit
