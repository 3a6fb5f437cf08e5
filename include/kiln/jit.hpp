// kiln's run-time compiler, seen from outside: counters, the disk cache, warm-up.
//
// Kernels are CUDA C++ sources embedded in the library. Each is compiled by NVRTC on first use
// for the device's architecture and the shapes at hand, then cached in memory (per process) and
// on disk under $KILN_CACHE_DIR (default $XDG_CACHE_HOME/kiln, else ~/.cache/kiln).
// KILN_JIT_LOG=1 prints each compile and load with its time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kiln::jit {

struct Stats {
  std::uint64_t compiles = 0;         // NVRTC compilations
  std::uint64_t disk_hits = 0;        // cubins read from the disk cache
  std::uint64_t memory_hits = 0;      // requests served from the in-memory cache
  std::uint64_t disk_writes = 0;      // cubins stored to the disk cache
  std::uint64_t corrupt_entries = 0;  // disk entries rejected on load (then recompiled)
  double compile_ms = 0;              // total NVRTC time
  double disk_load_ms = 0;            // total time reading and checking disk entries
};

// Counters of the process-wide cache.
Stats stats();
void reset_stats();

// The disk cache folder in use; "" when the cache is memory-only (the folder cannot be read, or
// is missing and cannot be made). The folder is made on the first store, not before.
std::string cache_dir();
// Whether new kernels are stored in cache_dir(). A read-only folder (a cache warmed at build time
// and shipped) is still read; kernels missing from it are compiled and kept in memory.
bool cache_writable();

struct CacheEntry {
  std::string path;    // file in cache_dir()
  std::string kernel;  // the specialization, e.g. "kiln::rope_flux_kernel<D=128, ...>"
  std::string arch;    // "sm_90a"
  std::uint64_t bytes = 0;
  bool valid = false;  // header, key and checksum verified
};

std::vector<CacheEntry> list_cache();
// Removes every kiln entry from the disk cache and empties the memory cache; returns the
// number of files removed.
std::size_t clear_cache();

// The named workloads whose kernel variants can be precompiled ("flux", "all").
std::vector<std::string> workloads();

struct WarmupResult {
  std::size_t variants = 0;  // (kernel, arch) pairs requested
  std::size_t compiled = 0;  // of which newly compiled; the rest were cached (or compiled by
                             // another process warming the same folder, then read)
  std::size_t stored = 0;    // compiled ones written to the disk cache (< compiled: read-only)
};

// Compiles and stores, without loading, every variant `workload` needs for each arch in
// `archs` ("sm_80", "sm_90a", ...). Needs no GPU. Throws kiln::Error for no arch, an arch that is
// not a CUDA target, or one older than sm_80, before compiling anything. Processes warming one
// folder at once share the work: each entry is compiled by one of them (disk_cache.hpp, claims).
WarmupResult warmup(const std::string& workload, const std::vector<std::string>& archs);

struct Overheads {
  std::string kernel;  // the specialization measured
  std::string arch;
  double first_compile_ms = 0;  // NVRTC compile of a kernel in no cache
  double disk_load_ms = 0;      // reading, checking and loading it from the disk cache
  double memory_hit_us = 0;     // host time of a request served from the memory cache,
                                // building the specialization key included
};

// Measures the JIT's three paths for the first kernel of `workload` on `device`, in a scratch
// cache folder (the process cache is left alone). Needs a GPU.
Overheads measure_overheads(const std::string& workload, int device);

// The kiln version that keys the disk cache.
const char* version();

}  // namespace kiln::jit
