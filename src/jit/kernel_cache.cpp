#include "jit/kernel_cache.hpp"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "jit/disk_cache.hpp"
#include "jit/dump.hpp"
#include "jit/nvrtc.hpp"
#include "kiln/device.hpp"

namespace kiln::jit {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

std::string ms_text(double ms) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f ms", ms);
  return text;
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

// Launches get 48 KiB of dynamic shared memory unless the kernel opts in to more.
constexpr std::size_t kDefaultSharedMemory = 48 * 1024;

// The largest dynamic shared memory each loaded kernel has opted in to. Each (device, kernel)
// is loaded from its own library, so a handle names one device's kernel. Never destroyed, like
// process_cache(), whose kernels it tracks.
struct SharedMemoryOptIns {
  std::mutex mutex;
  std::unordered_map<cudaKernel_t, std::size_t> bytes;
};

SharedMemoryOptIns& opt_ins() {
  static SharedMemoryOptIns* const registry = new SharedMemoryOptIns;
  return *registry;
}

void allow_shared_memory(const char* op, const Kernel& kernel, std::size_t bytes) {
  SharedMemoryOptIns& registry = opt_ins();
  std::lock_guard<std::mutex> lock(registry.mutex);
  std::size_t& allowed = registry.bytes[kernel.handle];
  if (bytes <= allowed) return;
  cuda::check(
      cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel.handle),
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
      op, ("cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for " + *kernel.key).c_str());
  allowed = bytes;
}

}  // namespace

CacheConfig config_from_env() {
  CacheConfig config;
  config.log = log::env_flag("KILN_JIT_LOG");
  config.dump = dump_dir_from_env();
  // XDG asks to ignore relative paths in XDG_CACHE_HOME.
  const std::string xdg = env("XDG_CACHE_HOME");
  if (const std::string dir = env("KILN_CACHE_DIR"); !dir.empty()) {
    config.dir = dir;
  } else if (xdg.starts_with('/')) {
    config.dir = xdg + "/kiln";
  } else if (const std::string home = env("HOME"); !home.empty()) {
    config.dir = home + "/.cache/kiln";
  }
  return config;
}

// One cubin loaded on one device. The library is context-independent, but loading it per device
// keeps handles per device (see SharedMemoryOptIns).
struct KernelCache::Loaded {
  cudaLibrary_t library = nullptr;
  Kernel kernel;
  std::string key;  // what kernel.key points to

  Loaded() = default;
  Loaded(const Loaded&) = delete;
  Loaded& operator=(const Loaded&) = delete;
  ~Loaded() {
    if (library == nullptr) return;
    {
      // A later library may reuse the handle; it must opt in afresh.
      SharedMemoryOptIns& registry = opt_ins();
      std::lock_guard<std::mutex> lock(registry.mutex);
      registry.bytes.erase(kernel.handle);
    }
    cudaLibraryUnload(library);
  }
};

namespace {

// Whether `dir` (a folder) allows `mode` (access(2)'s R_OK, W_OK) with X_OK.
bool allows(const fs::path& dir, int mode) { return ::access(dir.c_str(), mode | X_OK) == 0; }

// How long a process waits between looks at an entry another process has claimed.
constexpr auto kClaimPoll = std::chrono::milliseconds(20);

}  // namespace

void check_supported_arch(const std::string& arch) {
  check_arch(arch);
  // kiln's kernels use sm_80 instructions (cp.async, bf16 mma.sync); ptxas would reject them for
  // older targets with a screenful of errors per kernel.
  if (std::stoi(arch.substr(3)) < 80) {
    check::fail("jit", ErrorCode::unsupported,
                "arch " + arch + " is older than sm_80: kiln needs sm_80 or newer");
  }
}

KernelCache::KernelCache(CacheConfig config) : log_(config.log), dump_(std::move(config.dump)) {
  if (!dump_.empty()) {
    log::info("jit: KILN_JIT_DUMP: each kernel compiled is written to " + dump_ +
              " (source, PTX, cubin, SASS); the disk cache is not read");
  }
  if (config.dir.empty()) return;
  // Nothing is created here: a listing or a read must not leave a folder behind. A missing folder
  // is made on the first store, where its nearest existing parent allows it.
  std::error_code ignored;  // an unreadable path is not a folder either
  const fs::path dir = config.dir;
  std::string problem;
  if (fs::is_directory(dir, ignored)) {
    if (!allows(dir, R_OK)) problem = "cannot be read";
    writable_ = allows(dir, W_OK);
  } else if (fs::exists(dir, ignored)) {
    problem = "is not a folder";
  } else {
    fs::path parent = fs::absolute(dir, ignored).parent_path();
    while (!parent.empty() && !fs::exists(parent, ignored) && parent != parent.parent_path()) {
      parent = parent.parent_path();
    }
    writable_ = fs::is_directory(parent, ignored) && allows(parent, W_OK);
    if (!writable_) problem = "is missing and cannot be created under " + parent.string();
  }
  if (!problem.empty()) {
    writable_ = false;
    log::warning_once("jit-cache-dir:" + config.dir,
                      "jit: kernel cache folder " + config.dir + " " + problem +
                          "; compiled kernels are cached in memory only");
    return;
  }
  dir_ = config.dir;
}

KernelCache::~KernelCache() = default;

std::shared_ptr<const Cubin> KernelCache::cubin(const KernelSpec& spec, const std::string& arch) {
  return get(spec, arch, true);
}

std::shared_ptr<const Cubin> KernelCache::cubin_unless_claimed(const KernelSpec& spec,
                                                               const std::string& arch) {
  return get(spec, arch, false);
}

std::shared_ptr<const Cubin> KernelCache::get(const KernelSpec& spec, const std::string& arch,
                                              bool wait_for_claims) {
  // Reused per thread so that a memory hit allocates nothing but spec.key().
  thread_local std::string memory_key;
  memory_key.assign(arch).append(1, '|').append(spec.key());

  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    const auto [it, inserted] = cubins_.try_emplace(memory_key);
    if (inserted) break;  // this thread builds it; the nullptr tells others to wait
    if (it->second != nullptr) {
      ++stats_.memory_hits;
      return it->second;
    }
    built_.wait(lock);
  }
  lock.unlock();

  const std::string building = memory_key;
  std::shared_ptr<const Cubin> built;
  try {
    check_supported_arch(arch);
    if (!spec.targets(arch)) {
      std::string written_for;
      for (const std::string& a : spec.archs) written_for += (written_for.empty() ? "" : ", ") + a;
      check::fail("jit", ErrorCode::unsupported,
                  spec.key() + " is written for " + written_for + ", not " + arch);
    }
    built = load_or_compile(spec, arch, key_material(spec, arch), wait_for_claims);
  } catch (...) {
    // Waiters retry and meet the same error themselves.
    lock.lock();
    cubins_.erase(building);
    built_.notify_all();
    throw;
  }
  lock.lock();
  if (built == nullptr) {
    cubins_.erase(building);  // claimed by another process: a later call reads its entry
  } else {
    cubins_[building] = built;
  }
  built_.notify_all();
  return built;
}

std::shared_ptr<const Cubin> KernelCache::read_disk(const fs::path& file, const KernelSpec& spec,
                                                    const std::string& arch,
                                                    const std::string& key_text, bool& corrupt) {
  const std::string key = spec.key();
  const Clock::time_point start = Clock::now();
  EntryRead entry = read_entry(file, key_text);
  const double ms = elapsed_ms(start);
  if (entry.status == EntryRead::ok) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.disk_hits;
      stats_.disk_load_ms += ms;
    }
    if (log_) log::info("jit: loaded " + key + " for " + arch + " from disk in " + ms_text(ms));
    return std::make_shared<const Cubin>(
        Cubin{arch, key, std::move(entry.lowered_name), std::move(entry.image)});
  }
  if (entry.status == EntryRead::corrupt) {
    corrupt = true;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.corrupt_entries;
      stats_.disk_load_ms += ms;
    }
    log::warning("jit: cache entry " + file.string() + " for " + key + " on " + arch +
                 " rejected (" + entry.problem + "); recompiling it");
  }
  return nullptr;
}

std::shared_ptr<const Cubin> KernelCache::load_or_compile(const KernelSpec& spec,
                                                          const std::string& arch,
                                                          const std::string& key_text,
                                                          bool wait_for_claims) {
  const std::string key = spec.key();
  fs::path file;
  bool claimed = false;
  if (!dir_.empty()) {
    file = fs::path(dir_) / entry_file_name(key_text);
    // The first look-up that misses memory makes the folder (while dumping, nothing is read from
    // it, but what is compiled is stored).
    std::error_code made;
    if (writable_) fs::create_directories(dir_, made);
  }
  if (!dir_.empty() && dump_.empty()) {
    bool corrupt = false;
    if (auto cubin = read_disk(file, spec, arch, key_text, corrupt)) return cubin;
    // Missing (or rejected): compile it, unless another process has claimed it; then wait for its
    // file (or for its claim to go stale).
    const Clock::time_point start = Clock::now();
    while (writable_ && !(claimed = claim_entry(file))) {
      if (!wait_for_claims) return nullptr;
      if (Clock::now() - start > std::chrono::seconds(kStaleClaimSeconds)) break;
      std::this_thread::sleep_for(kClaimPoll);
      if (auto cubin = read_disk(file, spec, arch, key_text, corrupt)) return cubin;
    }
    // The process that held the claim may have stored the entry between the read above and
    // this claim: read it once more (unless it was there and rejected) before compiling.
    if (claimed && !corrupt) {
      if (auto cubin = read_disk(file, spec, arch, key_text, corrupt)) {
        release_claim(file);
        return cubin;
      }
    }
  }

  std::shared_ptr<const Cubin> cubin;
  std::string nvrtc_log;
  std::string ptx;
  CompileExtras extras;
  if (!dump_.empty()) extras = {true, &ptx};
  const Clock::time_point start = Clock::now();
  try {
    cubin = std::make_shared<const Cubin>(compile(spec, arch, nvrtc_log, extras));
  } catch (...) {
    if (claimed) release_claim(file);
    throw;
  }
  const double ms = elapsed_ms(start);
  if (!dump_.empty()) {
    if (const std::string error = write_dump(dump_, spec, *cubin, ptx, nvrtc_log); !error.empty()) {
      log::warning_once("jit-dump:" + dump_, "jit: KILN_JIT_DUMP incomplete (" + error + ")");
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.compiles;
    stats_.compile_ms += ms;
  }
  if (log_) {
    log::info("jit: compiled " + key + " for " + arch + " in " + ms_text(ms) +
              (nvrtc_log.empty() ? std::string() : ":\n" + nvrtc_log));
  }
  if (!dir_.empty()) store(file, key_text, *cubin);
  if (claimed) release_claim(file);
  return cubin;
}

void KernelCache::store(const fs::path& file, const std::string& key_text, const Cubin& cubin) {
  std::string error;
  if (!writable_) {
    error = "the folder is read-only";
  } else {
    error = write_entry(file, key_text, cubin);
  }
  if (error.empty()) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.disk_writes;
    return;
  }
  log::warning_once("jit-cache-write:" + dir_, "jit: cannot store compiled kernels in " + dir_ +
                                                   " (" + error +
                                                   "); kernels missing from it are compiled and "
                                                   "cached in memory only");
}

Kernel KernelCache::kernel(const KernelSpec& spec, int device) {
  thread_local std::string memory_key;
  char digits[16];
  char* digits_end = std::to_chars(digits, digits + sizeof digits, device).ptr;
  memory_key.assign(digits, digits_end).append(1, '|').append(spec.key());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (const auto it = loaded_.find(memory_key); it != loaded_.end()) {
      ++stats_.memory_hits;
      return it->second->kernel;
    }
  }

  const std::string loading = memory_key;
  const std::shared_ptr<const Cubin> image = cubin(spec, cuda_arch(device));
  const Clock::time_point start = Clock::now();
  auto loaded = std::make_unique<Loaded>();
  loaded->key = image->key;
  loaded->kernel.key = &loaded->key;
  cuda::check(cudaLibraryLoadData(&loaded->library, image->image.data(), nullptr, nullptr, 0,
                                  nullptr, nullptr, 0),
              "jit", ("cudaLibraryLoadData for " + image->key + " (" + image->arch + ")").c_str());
  cuda::check(
      cudaLibraryGetKernel(&loaded->kernel.handle, loaded->library, image->lowered_name.c_str()),
      "jit", ("cudaLibraryGetKernel for " + image->key + " (" + image->lowered_name + ")").c_str());
  if (log_) {
    log::info("jit: loaded " + image->key + " for " + image->arch + " into device " +
              std::to_string(device) + " in " + ms_text(elapsed_ms(start)));
  }

  std::lock_guard<std::mutex> lock(mutex_);
  // A thread that lost the race keeps `loaded`, which unloads itself after the lock is released.
  return loaded_.try_emplace(loading, std::move(loaded)).first->second->kernel;
}

Stats KernelCache::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void KernelCache::reset_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_ = Stats{};
}

std::vector<CacheEntry> KernelCache::list() const {
  std::vector<CacheEntry> entries;
  if (dir_.empty()) return entries;
  std::error_code error;  // a folder not made yet lists nothing
  for (const fs::directory_entry& file : fs::directory_iterator(dir_, error)) {
    if (file.is_regular_file(error) &&
        file_kind(file.path().filename().string()) == FileKind::entry) {
      entries.push_back(describe_entry(file.path()));
    }
  }
  std::sort(entries.begin(), entries.end(),
            [](const CacheEntry& a, const CacheEntry& b) { return a.path < b.path; });
  return entries;
}

std::size_t KernelCache::clear() {
  {
    // Entries being built (nullptr) stay: their builders will fill them in.
    std::lock_guard<std::mutex> lock(mutex_);
    std::erase_if(cubins_, [](const auto& entry) { return entry.second != nullptr; });
  }
  std::size_t removed = 0;
  if (dir_.empty()) return removed;
  std::error_code error;
  for (const fs::directory_entry& file : fs::directory_iterator(dir_, error)) {
    if (file.is_regular_file(error) &&
        file_kind(file.path().filename().string()) != FileKind::foreign &&
        fs::remove(file.path(), error)) {
      ++removed;
    }
  }
  return removed;
}

KernelCache& process_cache() {
  // Never destroyed: kernels launched from static destructors must stay loaded, and unloading
  // libraries while the CUDA runtime shuts down fails.
  static KernelCache* const cache = new KernelCache(config_from_env());
  return *cache;
}

void launch(const char* op, const Kernel& kernel, dim3 grid, dim3 block, std::size_t smem_bytes,
            Stream stream, void** args) {
  if (smem_bytes > kDefaultSharedMemory) allow_shared_memory(op, kernel, smem_bytes);
  const cudaError_t status =
      cudaLaunchKernel(reinterpret_cast<const void*>(kernel.handle), grid, block, args, smem_bytes,
                       static_cast<cudaStream_t>(stream));
  if (status != cudaSuccess) {
    // Clear the error we report, so that a caller's next cudaGetLastError does not see it again.
    cudaGetLastError();
    cuda::check(status, op, ("launching " + *kernel.key).c_str());
  }
}

}  // namespace kiln::jit
