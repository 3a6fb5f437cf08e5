// The JIT's caches without a GPU: NVRTC compiles, memory and disk hits, damaged entries,
// unusable and read-only folders, claims, concurrent processes and threads, warm-up, list() and
// clear().
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <latch>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <thread>

#include "jit/disk_cache.hpp"
#include "jit/kernel_cache.hpp"
#include "kiln/error.hpp"

namespace kiln::jit {
namespace {

namespace fs = std::filesystem;

KernelSpec probe(const std::string& n) {
  return {"jit/kernels/jit_probe.cuh", "kiln::jit_probe_kernel", {{"N", n}}};
}
KernelSpec probe(int n) { return probe(std::to_string(n)); }

// A cubin is an ELF image; this keeps a test from passing on an empty or garbage buffer.
bool is_elf(const Cubin& cubin) {
  return cubin.image.size() > 4 && std::string_view(cubin.image.data(), 4) ==
                                       "\x7f"
                                       "ELF";
}

std::set<std::string> file_names(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& file : fs::directory_iterator(dir)) names.insert(file.path().filename());
  return names;
}

std::string read_bytes(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write_bytes(const fs::path& file, const std::string& bytes) {
  std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
}

std::size_t count(const std::string& text, const std::string& word) {
  std::size_t n = 0;
  for (auto at = text.find(word); at != std::string::npos; at = text.find(word, at + 1)) ++n;
  return n;
}

// What a forked child reported: its exit status (its failed check's number, 0 when all held)
// and its stderr.
struct ChildResult {
  int status = -1;
  std::string err;
};

// Runs `body` (returning an exit status) in a forked child. As root the child runs as user nobody,
// so that folder permissions apply to it as to any user. `scratch` holds the child's stderr.
template <typename F>
ChildResult in_child_as_user(const fs::path& scratch, F body) {
  const fs::path err_file = scratch / "child-stderr";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) ::dup2(fd, 2);
    if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) ::_exit(100);
    ::_exit(body());
  }
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid) return {};
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_bytes(err_file)};
}

// In a child's body: returns `number` (its exit status) when `condition` does not hold.
#define CHILD_EXPECT(number, condition)                                \
  if (!(condition)) {                                                  \
    std::fprintf(stderr, "check %d failed: %s\n", number, #condition); \
    return number;                                                     \
  }

// Forks `count` children that start `body()` together (they wait until the parent closes a pipe)
// and returns their exit statuses (-1 for a child that did not exit normally).
template <typename F>
std::vector<int> run_together(int count, F body) {
  int barrier[2];
  if (::pipe(barrier) != 0) return {};
  std::vector<pid_t> children;
  for (int i = 0; i < count; ++i) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(barrier[1]);
      char byte;
      if (::read(barrier[0], &byte, 1) != 0) ::_exit(255);
      int code = 254;
      try {
        code = body();
      } catch (...) {
      }
      ::_exit(code);
    }
    if (pid > 0) children.push_back(pid);
  }
  ::close(barrier[0]);
  ::close(barrier[1]);
  std::vector<int> statuses;
  for (const pid_t pid : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    statuses.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  }
  return statuses;
}

class KernelCacheTest : public testing::Test {
 protected:
  KernelCacheTest() {
    std::string pattern = testing::TempDir() + "kiln-jit-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    root_ = pattern;
  }
  ~KernelCacheTest() override {
    fs::permissions(root_, fs::perms::owner_all, fs::perm_options::add);
    std::error_code ignored;
    fs::remove_all(root_, ignored);
  }

  // The cache folder (created by the first KernelCache).
  fs::path dir() const { return root_ / "cache"; }
  CacheConfig config() const { return {dir().string(), false}; }
  // The one entry file in dir().
  fs::path only_entry() const {
    const auto names = file_names(dir());
    if (names.size() != 1) throw std::runtime_error("expected one cache file");
    return dir() / *names.begin();
  }

  fs::path root_;
};

TEST(KernelSpecTest, NameExpressionAndKey) {
  const KernelSpec spec{"x.cuh", "kiln::k", {{"T", "kiln::bf16"}, {"D", "128"}}};
  EXPECT_EQ(spec.name_expression(), "kiln::k<kiln::bf16, 128>");
  EXPECT_EQ(spec.key(), "kiln::k<T=kiln::bf16, D=128>");
  const KernelSpec plain{"x.cuh", "kiln::plain", {}};
  EXPECT_EQ(plain.name_expression(), "kiln::plain");
  EXPECT_EQ(plain.key(), "kiln::plain");
}

// Sets environment variables for one scope and restores them afterwards.
class EnvGuard {
 public:
  void set(const char* name, const char* value) {
    if (!saved_.contains(name)) {
      const char* old = std::getenv(name);
      saved_[name] = old ? std::optional<std::string>(old) : std::nullopt;
    }
    value ? ::setenv(name, value, 1) : ::unsetenv(name);
  }
  ~EnvGuard() {
    for (const auto& [name, value] : saved_) {
      value ? ::setenv(name.c_str(), value->c_str(), 1) : ::unsetenv(name.c_str());
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

TEST(CacheConfigTest, FolderAndLogFromEnvironment) {
  EnvGuard env;
  env.set("KILN_CACHE_DIR", "/x/kiln-dir");
  env.set("XDG_CACHE_HOME", "/x/xdg");
  env.set("HOME", "/x/home");
  env.set("KILN_JIT_LOG", "1");
  EXPECT_EQ(config_from_env().dir, "/x/kiln-dir");
  EXPECT_TRUE(config_from_env().log);
  env.set("KILN_CACHE_DIR", nullptr);
  env.set("KILN_JIT_LOG", "0");
  EXPECT_EQ(config_from_env().dir, "/x/xdg/kiln");
  EXPECT_FALSE(config_from_env().log);
  env.set("XDG_CACHE_HOME", "relative/xdg");  // ignored, as XDG asks
  EXPECT_EQ(config_from_env().dir, "/x/home/.cache/kiln");
  env.set("HOME", nullptr);
  EXPECT_EQ(config_from_env().dir, "");
}

TEST_F(KernelCacheTest, CompilesOnceThenHitsMemoryThenDisk) {
  std::shared_ptr<const Cubin> compiled;
  {
    KernelCache cache(config());
    EXPECT_EQ(cache.dir(), dir().string());
    const auto start = std::chrono::steady_clock::now();
    compiled = cache.cubin(probe(1), "sm_80");
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(ms, 1000.0) << "the probe kernel should compile well under a second";
    ASSERT_TRUE(is_elf(*compiled));
    EXPECT_EQ(compiled->arch, "sm_80");
    EXPECT_EQ(compiled->key, "kiln::jit_probe_kernel<N=1>");
    EXPECT_NE(compiled->lowered_name.find("jit_probe_kernel"), std::string::npos);
    Stats s = cache.stats();
    EXPECT_EQ(s.compiles, 1u);
    EXPECT_EQ(s.disk_writes, 1u);
    EXPECT_EQ(s.memory_hits, 0u);
    EXPECT_GT(s.compile_ms, 0.0);

    EXPECT_EQ(cache.cubin(probe(1), "sm_80"), compiled);
    s = cache.stats();
    EXPECT_EQ(s.compiles, 1u);
    EXPECT_EQ(s.memory_hits, 1u);

    cache.reset_stats();
    EXPECT_EQ(cache.stats().memory_hits, 0u);
  }
  KernelCache fresh(config());
  const auto loaded = fresh.cubin(probe(1), "sm_80");
  const Stats s = fresh.stats();
  EXPECT_EQ(s.disk_hits, 1u);
  EXPECT_EQ(s.compiles, 0u);
  EXPECT_EQ(s.disk_writes, 0u);
  EXPECT_EQ(loaded->image, compiled->image);
  EXPECT_EQ(loaded->lowered_name, compiled->lowered_name);
  EXPECT_EQ(loaded->key, compiled->key);
  EXPECT_EQ(file_names(dir()).size(), 1u);
}

TEST_F(KernelCacheTest, SpecializationsAndArchsAreSeparateEntries) {
  KernelCache cache(config());
  const auto one_80 = cache.cubin(probe(1), "sm_80");
  const auto two_80 = cache.cubin(probe(2), "sm_80");
  const auto one_90 = cache.cubin(probe(1), "sm_90a");
  EXPECT_EQ(cache.stats().compiles, 3u);
  EXPECT_EQ(cache.stats().memory_hits, 0u);
  EXPECT_EQ(file_names(dir()).size(), 3u);
  EXPECT_NE(one_80->image, two_80->image);
  EXPECT_NE(one_80->image, one_90->image);
  EXPECT_EQ(one_90->arch, "sm_90a");

  KernelCache fresh(config());
  EXPECT_EQ(fresh.cubin(probe(1), "sm_90a")->image, one_90->image);
  EXPECT_EQ(fresh.cubin(probe(2), "sm_80")->image, two_80->image);
  EXPECT_EQ(fresh.stats().disk_hits, 2u);
  EXPECT_EQ(fresh.stats().compiles, 0u);
}

enum class Damage { truncate, flip_cubin_byte, overwrite_key, foreign_magic };

class DamagedEntryTest : public KernelCacheTest, public testing::WithParamInterface<Damage> {};

TEST_P(DamagedEntryTest, IsRejectedRecompiledAndReplaced) {
  const std::string key = probe(1).key();
  std::vector<char> original;
  {
    KernelCache cache(config());
    original = cache.cubin(probe(1), "sm_80")->image;
  }
  const fs::path file = only_entry();
  std::string bytes = read_bytes(file);
  switch (GetParam()) {
    case Damage::truncate:
      bytes.resize(bytes.size() / 2);
      break;
    case Damage::flip_cubin_byte:
      bytes[bytes.size() - original.size() / 2] ^= 0x01;
      break;
    case Damage::overwrite_key: {
      // Same length, so only the key comparison can notice.
      const auto at = bytes.find(key);
      ASSERT_NE(at, std::string::npos);
      bytes.replace(at, key.size(), probe(2).key());
      break;
    }
    case Damage::foreign_magic:
      bytes.replace(0, 8, "NOTKILN!");
      break;
  }
  write_bytes(file, bytes);

  KernelCache cache(config());
  ASSERT_EQ(cache.list().size(), 1u);
  EXPECT_FALSE(cache.list()[0].valid);

  testing::internal::CaptureStderr();
  const auto rebuilt = cache.cubin(probe(1), "sm_80");
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(count(err, "warning"), 1u) << err;
  EXPECT_NE(err.find(key), std::string::npos) << err;
  EXPECT_NE(err.find(file.string()), std::string::npos) << err;
  const Stats s = cache.stats();
  EXPECT_EQ(s.corrupt_entries, 1u);
  EXPECT_EQ(s.compiles, 1u);
  EXPECT_EQ(s.disk_hits, 0u);
  EXPECT_EQ(s.disk_writes, 1u);
  EXPECT_TRUE(is_elf(*rebuilt));

  ASSERT_EQ(cache.list().size(), 1u);
  EXPECT_TRUE(cache.list()[0].valid);
  KernelCache fresh(config());
  EXPECT_EQ(fresh.cubin(probe(1), "sm_80")->image, rebuilt->image);
  EXPECT_EQ(fresh.stats().disk_hits, 1u);
  EXPECT_EQ(fresh.stats().corrupt_entries, 0u);
}

std::string damage_name(const testing::TestParamInfo<Damage>& info) {
  switch (info.param) {
    case Damage::truncate:
      return "truncate";
    case Damage::flip_cubin_byte:
      return "flip_cubin_byte";
    case Damage::overwrite_key:
      return "overwrite_key";
    case Damage::foreign_magic:
      return "foreign_magic";
  }
  return "unknown";
}

INSTANTIATE_TEST_SUITE_P(Damages, DamagedEntryTest,
                         testing::Values(Damage::truncate, Damage::flip_cubin_byte,
                                         Damage::overwrite_key, Damage::foreign_magic),
                         damage_name);

TEST_F(KernelCacheTest, UncreatableFolderMeansMemoryOnly) {
  // A folder under a regular file cannot be created, even by root.
  const fs::path file = root_ / "plain-file";
  write_bytes(file, "not a folder");
  const CacheConfig unusable{(file / "sub").string(), false};

  testing::internal::CaptureStderr();
  KernelCache cache(unusable);
  KernelCache again(unusable);
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(count(err, "warning"), 1u) << err;
  EXPECT_NE(err.find(unusable.dir), std::string::npos) << err;
  EXPECT_EQ(cache.dir(), "");

  EXPECT_TRUE(is_elf(*cache.cubin(probe(1), "sm_80")));
  EXPECT_TRUE(is_elf(*cache.cubin(probe(1), "sm_80")));
  const Stats s = cache.stats();
  EXPECT_EQ(s.compiles, 1u);
  EXPECT_EQ(s.memory_hits, 1u);
  EXPECT_EQ(s.disk_writes, 0u);
  EXPECT_TRUE(cache.list().empty());
  EXPECT_EQ(cache.clear(), 0u);
  EXPECT_EQ(read_bytes(file), "not a folder");
}

TEST_F(KernelCacheTest, ListingMakesNoFolder) {
  KernelCache cache(config());
  EXPECT_EQ(cache.dir(), dir().string());
  EXPECT_TRUE(cache.writable());
  EXPECT_TRUE(cache.list().empty());
  EXPECT_EQ(cache.clear(), 0u);
  EXPECT_FALSE(fs::exists(dir()));
  EXPECT_TRUE(is_elf(*cache.cubin(probe(1), "sm_80")));  // the first store makes it
  EXPECT_EQ(file_names(dir()).size(), 1u);
}

// A cache warmed where it could be written, then shipped read-only: a user who cannot write it
// still reads every entry, and compiles (in memory) only what is missing, with one warning.
TEST_F(KernelCacheTest, ReadOnlyFolderIsRead) {
  ASSERT_TRUE(is_elf(*KernelCache(config()).cubin(probe(1), "sm_80")));
  fs::permissions(root_, fs::perms(0755));
  fs::permissions(dir(), fs::perms(0555));
  const ChildResult child = in_child_as_user(root_, [&] {
    KernelCache cache(config());
    CHILD_EXPECT(1, cache.dir() == dir().string());
    CHILD_EXPECT(2, !cache.writable());
    CHILD_EXPECT(3, cache.list().size() == 1 && cache.list()[0].valid);
    CHILD_EXPECT(4, is_elf(*cache.cubin(probe(1), "sm_80")));
    CHILD_EXPECT(5, cache.stats().disk_hits == 1 && cache.stats().compiles == 0);
    CHILD_EXPECT(6, is_elf(*cache.cubin(probe(2), "sm_80")));
    CHILD_EXPECT(7, is_elf(*cache.cubin(probe(3), "sm_80")));
    CHILD_EXPECT(8, cache.stats().compiles == 2 && cache.stats().disk_writes == 0);
    return 0;
  });
  fs::permissions(dir(), fs::perms(0755));
  EXPECT_EQ(child.status, 0) << child.err;
  EXPECT_EQ(count(child.err, "warning"), 1u) << child.err;
  EXPECT_NE(child.err.find("read-only"), std::string::npos) << child.err;
  EXPECT_EQ(file_names(dir()).size(), 1u);  // nothing written, no claim left
}

TEST_F(KernelCacheTest, MissingFolderUnderReadOnlyParentMeansMemoryOnly) {
  fs::permissions(root_, fs::perms(0555));
  const ChildResult child = in_child_as_user(testing::TempDir(), [&] {
    KernelCache cache(config());
    CHILD_EXPECT(1, cache.dir().empty() && !cache.writable());
    CHILD_EXPECT(2, is_elf(*cache.cubin(probe(1), "sm_80")));
    CHILD_EXPECT(3, cache.stats().compiles == 1 && cache.stats().disk_writes == 0);
    return 0;
  });
  fs::permissions(root_, fs::perms(0700));
  EXPECT_EQ(child.status, 0) << child.err;
  EXPECT_EQ(count(child.err, "warning"), 1u) << child.err;
  EXPECT_NE(child.err.find("cannot be created"), std::string::npos) << child.err;
  EXPECT_FALSE(fs::exists(dir()));
}

TEST_F(KernelCacheTest, FolderRemovedAfterStartIsMadeAgain) {
  KernelCache cache(config());
  ASSERT_EQ(cache.dir(), dir().string());
  EXPECT_TRUE(is_elf(*cache.cubin(probe(1), "sm_80")));
  fs::remove_all(dir());
  testing::internal::CaptureStderr();
  EXPECT_TRUE(is_elf(*cache.cubin(probe(2), "sm_80")));
  EXPECT_TRUE(is_elf(*cache.cubin(probe(3), "sm_80")));
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(count(err, "warning"), 0u) << err;
  EXPECT_EQ(cache.stats().compiles, 3u);
  EXPECT_EQ(cache.stats().disk_writes, 3u);
  EXPECT_EQ(file_names(dir()).size(), 2u);
}

TEST_F(KernelCacheTest, ArchsBeforeSm80AreRefusedInOneLine) {
  KernelCache cache(config());
  for (const char* arch : {"sm_75", "sm_70", "sm_61"}) {
    try {
      cache.cubin(probe(1), arch);
      ADD_FAILURE() << "accepted " << arch;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_EQ(e.code(), ErrorCode::unsupported) << what;
      EXPECT_NE(what.find("kiln needs sm_80 or newer"), std::string::npos) << what;
      EXPECT_NE(what.find(arch), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    }
  }
  // warm() checks every arch before compiling anything, and wants at least one.
  EXPECT_THROW(warm(cache, {probe(1)}, {"sm_90a", "sm_75"}), Error);
  EXPECT_THROW(warm(cache, {probe(1)}, {}), Error);
  EXPECT_EQ(cache.stats().compiles, 0u);
  EXPECT_FALSE(fs::exists(dir()));
}

// The claim another process holds on an entry it compiles: a request that may skip it gets
// nothing at once; one that must have it waits and reads the entry the claimant stores.
TEST_F(KernelCacheTest, ClaimedEntryIsWaitedFor) {
  fs::create_directories(dir());
  const std::string key_text = key_material(probe(5), "sm_80");
  const fs::path entry = dir() / entry_file_name(key_text);
  ASSERT_TRUE(claim_entry(entry));
  KernelCache cache(config());
  EXPECT_EQ(cache.cubin_unless_claimed(probe(5), "sm_80"), nullptr);
  EXPECT_EQ(cache.stats().compiles, 0u);

  constexpr auto kDelay = std::chrono::milliseconds(300);
  std::thread claimant([&] {
    std::this_thread::sleep_for(kDelay);
    KernelCache memory_only({"", false});
    EXPECT_EQ(write_entry(entry, key_text, *memory_only.cubin(probe(5), "sm_80")), "");
    release_claim(entry);
  });
  const auto start = std::chrono::steady_clock::now();
  const auto cubin = cache.cubin(probe(5), "sm_80");
  const auto waited = std::chrono::steady_clock::now() - start;
  claimant.join();
  ASSERT_NE(cubin, nullptr);
  EXPECT_TRUE(is_elf(*cubin));
  EXPECT_GE(waited, kDelay);
  EXPECT_EQ(cache.stats().compiles, 0u);
  EXPECT_EQ(cache.stats().disk_hits, 1u);
  EXPECT_EQ(file_names(dir()).size(), 1u);
}

TEST_F(KernelCacheTest, StaleClaimsAreTakenOver) {
  fs::create_directories(dir());
  const fs::path entry = dir() / entry_file_name(key_material(probe(6), "sm_80"));
  const fs::path claim = entry.string() + ".lock";
  char host[256] = {};
  ASSERT_EQ(::gethostname(host, sizeof host - 1), 0);
  const pid_t gone = ::fork();
  if (gone == 0) ::_exit(0);
  ASSERT_EQ(::waitpid(gone, nullptr, 0), gone);

  // A live process of this host (this one) holds it; then one that is gone.
  write_bytes(claim, std::to_string(::getpid()) + " " + host + "\n");
  EXPECT_FALSE(claim_entry(entry));
  write_bytes(claim, std::to_string(gone) + " " + host + "\n");
  EXPECT_TRUE(claim_entry(entry));
  EXPECT_EQ(read_bytes(claim), std::to_string(::getpid()) + " " + host + "\n");
  // Another host's claim: fresh until kStaleClaimSeconds have passed.
  write_bytes(claim, "1 another-host\n");
  EXPECT_FALSE(claim_entry(entry));
  fs::last_write_time(
      claim, fs::file_time_type::clock::now() - std::chrono::seconds(kStaleClaimSeconds + 60));
  EXPECT_TRUE(claim_entry(entry));

  // Through the cache: the entry of a gone claimant is compiled at once and the claim removed.
  write_bytes(claim, std::to_string(gone) + " " + host + "\n");
  KernelCache cache(config());
  EXPECT_TRUE(is_elf(*cache.cubin(probe(6), "sm_80")));
  EXPECT_EQ(cache.stats().compiles, 1u);
  EXPECT_EQ(file_names(dir()), (std::set<std::string>{entry.filename().string()}));
}

// Two processes warming one folder compile each entry once between them, and read the rest.
TEST_F(KernelCacheTest, TwoProcessesWarmingOneFolderCompileEachEntryOnce) {
  constexpr int kSpecs = 12;
  std::vector<KernelSpec> specs;
  for (int i = 0; i < kSpecs; ++i) specs.push_back(probe(100 + i));
  // Each child's status: how many kernels it compiled (and stored).
  const std::vector<int> statuses = run_together(2, [&] {
    KernelCache cache(config());
    const WarmupResult r = warm(cache, specs, {"sm_80"});
    return r.variants == std::size_t(kSpecs) && r.stored == r.compiled ? int(r.compiled) : 254;
  });
  ASSERT_EQ(statuses.size(), 2u);
  int compiled = 0;
  for (const int status : statuses) {
    ASSERT_TRUE(status >= 0 && status <= kSpecs) << "child status " << status;
    compiled += status;
  }
  EXPECT_EQ(compiled, kSpecs);
  const auto names = file_names(dir());
  EXPECT_EQ(names.size(), std::size_t(kSpecs)) << testing::PrintToString(names);
  for (const std::string& name : names) EXPECT_TRUE(name.ends_with(".kiln")) << name;
}

TEST_F(KernelCacheTest, ConcurrentProcessesShareOneEntry) {
  constexpr int kChildren = 4;
  const std::vector<int> statuses = run_together(kChildren, [&] {
    KernelCache cache(config());
    return !cache.dir().empty() && is_elf(*cache.cubin(probe(1), "sm_80")) ? 0 : 1;
  });
  EXPECT_EQ(statuses, std::vector<int>(kChildren, 0));
  // Exactly one entry and no temporary file left behind.
  const auto names = file_names(dir());
  ASSERT_EQ(names.size(), 1u) << testing::PrintToString(names);
  EXPECT_TRUE(names.begin()->ends_with(".kiln")) << *names.begin();
  KernelCache cache(config());
  ASSERT_EQ(cache.list().size(), 1u);
  EXPECT_TRUE(cache.list()[0].valid);
  EXPECT_TRUE(is_elf(*cache.cubin(probe(1), "sm_80")));
  EXPECT_EQ(cache.stats().disk_hits, 1u);
}

TEST_F(KernelCacheTest, CompileErrorCarriesLogKeyAndArch) {
  KernelCache cache(config());
  const KernelSpec bad = probe("kiln::no_such_type");
  for (int attempt = 0; attempt < 2; ++attempt) {  // a failure is not cached
    try {
      cache.cubin(bad, "sm_80");
      ADD_FAILURE() << "expected a compile error";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_EQ(e.code(), ErrorCode::compile_error) << what;
      EXPECT_TRUE(what.starts_with("kiln::jit: ")) << what;
      EXPECT_NE(what.find(bad.key()), std::string::npos) << what;
      EXPECT_NE(what.find("sm_80"), std::string::npos) << what;
      EXPECT_NE(what.find("error: "), std::string::npos) << "no NVRTC log in: " << what;
    }
  }
  EXPECT_EQ(cache.stats().compiles, 0u);
  EXPECT_TRUE(file_names(dir()).empty());
  EXPECT_TRUE(is_elf(*cache.cubin(probe(1), "sm_80")));  // the cache still works
}

TEST_F(KernelCacheTest, RejectsUnknownArchAndSource) {
  KernelCache cache(config());
  for (const char* arch : {"compute_90", "sm_9", "sm_90ab", "90a", ""}) {
    try {
      cache.cubin(probe(1), arch);
      ADD_FAILURE() << "accepted arch '" << arch << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    }
  }
  KernelSpec missing = probe(1);
  missing.source = "jit/kernels/no_such_file.cuh";
  try {
    cache.cubin(missing, "sm_80");
    ADD_FAILURE() << "accepted a missing source";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find(missing.source), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.stats().compiles, 0u);
}

TEST_F(KernelCacheTest, ArchSpecificKernelRefusesOtherArchs) {
  KernelCache cache(config());
  KernelSpec hopper_only = probe(3);
  hopper_only.archs = {"sm_90a"};
  EXPECT_TRUE(hopper_only.targets("sm_90a"));
  EXPECT_FALSE(hopper_only.targets("sm_80"));
  EXPECT_TRUE(probe(3).targets("sm_80"));
  try {
    cache.cubin(hopper_only, "sm_80");
    ADD_FAILURE() << "built an sm_90a-only kernel for sm_80";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("sm_90a"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache.stats().compiles, 0u);
  EXPECT_TRUE(is_elf(*cache.cubin(hopper_only, "sm_90a")));
}

TEST_F(KernelCacheTest, ThreadsShareOneCompilePerSpec) {
  constexpr int kThreads = 8;
  constexpr int kRounds = 5;
  constexpr int kSpecs = 3;
  KernelCache cache(config());
  std::latch start(kThreads);
  std::vector<std::vector<std::shared_ptr<const Cubin>>> seen(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      start.arrive_and_wait();
      for (int r = 0; r < kRounds; ++r) {
        for (int s = 0; s < kSpecs; ++s) seen[t].push_back(cache.cubin(probe(s), "sm_80"));
      }
    });
  }
  for (auto& thread : threads) thread.join();

  const Stats s = cache.stats();
  EXPECT_EQ(s.compiles, std::uint64_t(kSpecs));
  EXPECT_EQ(s.disk_writes, std::uint64_t(kSpecs));
  EXPECT_EQ(s.memory_hits, std::uint64_t(kThreads * kRounds * kSpecs - kSpecs));
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(seen[t].size(), std::size_t(kRounds * kSpecs));
    for (std::size_t i = 0; i < seen[t].size(); ++i) {
      EXPECT_EQ(seen[t][i], seen[0][i % kSpecs]) << "thread " << t << " request " << i;
      EXPECT_EQ(seen[t][i]->key, probe(int(i % kSpecs)).key());
    }
  }
}

TEST_F(KernelCacheTest, ListAndClearTouchOnlyKilnFiles) {
  KernelCache cache(config());
  cache.cubin(probe(1), "sm_80");
  cache.cubin(probe(2), "sm_90a");
  write_bytes(dir() / "notes.txt", "mine");
  write_bytes(dir() / "0123456789abcdef.kiln.bak", "mine too");
  write_bytes(dir() / "0123456789abcdef.kiln.tmp.1.0", "a writer's leftover");
  write_bytes(dir() / "0123456789abcdef.kiln.lock", "1 a claim left by a crash");

  const std::vector<CacheEntry> entries = cache.list();
  ASSERT_EQ(entries.size(), 2u);
  std::set<std::pair<std::string, std::string>> kernels;
  for (const CacheEntry& e : entries) {
    EXPECT_TRUE(e.valid) << e.path;
    EXPECT_EQ(fs::path(e.path).parent_path(), dir());
    EXPECT_EQ(e.bytes, fs::file_size(e.path));
    EXPECT_GT(e.bytes, 1000u);
    kernels.emplace(e.kernel, e.arch);
  }
  const std::set<std::pair<std::string, std::string>> expected = {{probe(1).key(), "sm_80"},
                                                                  {probe(2).key(), "sm_90a"}};
  EXPECT_EQ(kernels, expected);

  EXPECT_EQ(cache.clear(), 4u);  // two entries, the leftover temporary file and the claim
  EXPECT_EQ(file_names(dir()), (std::set<std::string>{"notes.txt", "0123456789abcdef.kiln.bak"}));
  EXPECT_TRUE(cache.list().empty());

  // The memory cache was emptied too.
  cache.reset_stats();
  cache.cubin(probe(1), "sm_80");
  EXPECT_EQ(cache.stats().compiles, 1u);
  EXPECT_EQ(cache.stats().memory_hits, 0u);
}

TEST_F(KernelCacheTest, LogNamesEachCompileAndDiskLoad) {
  CacheConfig logged = config();
  logged.log = true;
  testing::internal::CaptureStderr();
  KernelCache(logged).cubin(probe(1), "sm_80");
  KernelCache(logged).cubin(probe(1), "sm_80");
  KernelCache(config()).cubin(probe(2), "sm_80");  // not logged
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("compiled kiln::jit_probe_kernel<N=1> for sm_80 in "), std::string::npos)
      << err;
  EXPECT_NE(err.find("loaded kiln::jit_probe_kernel<N=1> for sm_80 from disk in "),
            std::string::npos)
      << err;
  EXPECT_EQ(err.find("N=2"), std::string::npos) << err;
}

}  // namespace
}  // namespace kiln::jit
