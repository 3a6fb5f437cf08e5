// The run-time compiler and its caches.
//
// kernel(spec, device): memory cache -> disk cache -> NVRTC, then cudaLibraryLoadData.
// cubin(spec, arch):    memory cache -> disk cache -> NVRTC, nothing loaded (needs no GPU).
//
// Disk entries live in CacheConfig::dir, one file per (spec, arch), named by a hash of the key
// material: the kernel source and every header it includes (transitively), the specialization,
// the arch, the NVRTC version, the compile flags and kiln's version. A file holds a header with
// the full key text, the cubin size and a checksum; an entry whose header, key or checksum does
// not match is recompiled with a warning and never used. Entries are written to a temporary file
// in the same folder and renamed into place, so concurrent processes both succeed and no reader
// sees a partial file; a per-entry claim file keeps two processes from compiling one entry twice
// (disk_cache.hpp). The folder is created on the first store, never by a read or a listing. A
// read-only folder is read (a cache warmed at build time and shipped): kernels missing from it are
// compiled and kept in memory, with one warning. A folder that cannot be read, or is missing and
// cannot be created, makes the cache memory-only with one warning.
#pragma once

#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "jit/kernel_spec.hpp"
#include "kiln/jit.hpp"
#include "kiln/tensor.hpp"

namespace kiln::jit {

struct CacheConfig {
  std::string dir;   // "" = memory-only
  bool log = false;  // print each compile and load with its time (KILN_JIT_LOG)
  // Where each compile's source, PTX, cubin and SASS are written (KILN_JIT_DUMP, jit/dump.hpp);
  // while set, the disk cache is written but not read, so that every kernel used is compiled.
  std::string dump = {};
};

// $KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else $HOME/.cache/kiln; log from KILN_JIT_LOG,
// dump from KILN_JIT_DUMP.
CacheConfig config_from_env();

struct Cubin {
  std::string arch;          // "sm_90a"
  std::string key;           // spec.key()
  std::string lowered_name;  // mangled name of the instantiated kernel
  std::vector<char> image;   // the cubin
};

// A kernel loaded on a device, ready for launch(). Handles stay valid while their KernelCache
// lives; process_cache() is never destroyed.
struct Kernel {
  cudaKernel_t handle = nullptr;
  const std::string* key = nullptr;  // spec.key(), owned by the cache
};

class KernelCache {
 public:
  explicit KernelCache(CacheConfig config);
  ~KernelCache();
  KernelCache(const KernelCache&) = delete;
  KernelCache& operator=(const KernelCache&) = delete;

  // Thread-safe. Throws kiln::Error (compile_error) with the NVRTC log and the specialization,
  // and (unsupported) for archs older than sm_80. Waits while another process that claimed the
  // entry compiles it, then reads its file.
  std::shared_ptr<const Cubin> cubin(const KernelSpec& spec, const std::string& arch);
  // As cubin(), but returns nullptr at once where another process has claimed the entry.
  std::shared_ptr<const Cubin> cubin_unless_claimed(const KernelSpec& spec,
                                                    const std::string& arch);
  // Thread-safe. Loads the cubin for cuda_arch(device) on first use.
  Kernel kernel(const KernelSpec& spec, int device);

  Stats stats() const;
  void reset_stats();
  // "" when memory-only.
  const std::string& dir() const { return dir_; }
  // Whether compiled kernels are stored in dir() (false for a read-only folder).
  bool writable() const { return writable_; }
  // The entry files in dir(), each checked (header, checksum, file name).
  std::vector<CacheEntry> list() const;
  // Removes kiln's files from dir() (entries and leftover temporary files, nothing else) and
  // empties the memory cubin cache; returns the number of files removed. Kernels already loaded
  // stay loaded: their handles may be in use.
  std::size_t clear();

 private:
  struct Loaded;
  std::shared_ptr<const Cubin> get(const KernelSpec& spec, const std::string& arch,
                                   bool wait_for_claims);
  // nullptr when !wait_for_claims and another process has claimed the entry.
  std::shared_ptr<const Cubin> load_or_compile(const KernelSpec& spec, const std::string& arch,
                                               const std::string& key_text, bool wait_for_claims);
  // The entry's cubin, or nullptr when it is missing or rejected (`corrupt` set, with a warning).
  std::shared_ptr<const Cubin> read_disk(const std::filesystem::path& file, const KernelSpec& spec,
                                         const std::string& arch, const std::string& key_text,
                                         bool& corrupt);
  void store(const std::filesystem::path& file, const std::string& key_text, const Cubin& cubin);

  std::string dir_;
  bool writable_ = false;
  bool log_ = false;
  std::string dump_;
  mutable std::mutex mutex_;
  std::condition_variable built_;  // a cubin another thread was building is ready (or failed)
  Stats stats_;
  // arch|key -> cubin; nullptr while one thread builds it and the others wait on built_.
  std::unordered_map<std::string, std::shared_ptr<const Cubin>> cubins_;
  std::unordered_map<std::string, std::unique_ptr<Loaded>> loaded_;  // device|key -> kernel
};

// Throws kiln::Error unless `arch` reads like "sm_90a" (invalid_argument) and is sm_80 or newer
// (unsupported: "kiln needs sm_80 or newer").
void check_supported_arch(const std::string& arch);

// jit::warmup on `cache`: compiles (in parallel) and stores every pair of `specs` and `archs`
// a spec targets; entries another process has claimed are left to it and read once stored.
WarmupResult warm(KernelCache& cache, const std::vector<KernelSpec>& specs,
                  const std::vector<std::string>& archs);

// The process-wide cache, configured from the environment on first use.
KernelCache& process_cache();

// Enqueues `kernel` on `stream`; throws kiln::Error (cuda_error) naming `op` and the kernel.
void launch(const char* op, const Kernel& kernel, dim3 grid, dim3 block, std::size_t smem_bytes,
            Stream stream, void** args);

}  // namespace kiln::jit
