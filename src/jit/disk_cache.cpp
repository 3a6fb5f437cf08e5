#include "jit/disk_cache.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <system_error>
#include <unordered_map>

#include "core/check.hpp"
#include "jit/nvrtc.hpp"
#include "jit/sources.hpp"

namespace kiln::jit {

namespace {

constexpr std::string_view kMagic = "KILNCBIN";
constexpr std::string_view kExtension = ".kiln";
constexpr std::string_view kTempInfix = ".tmp.";
constexpr std::string_view kClaimSuffix = ".lock";
// magic, version, key bytes, name bytes, cubin bytes, checksum
constexpr std::size_t kHeaderBytes = 8 + 4 + 4 + 4 + 8 + 8;

std::string hex(std::uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
  return text;
}

std::string_view trim_left(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  return s;
}

// The names of every `#include "name"` line. Commented-out includes are kept: hashing a header
// too many only costs a spurious recompile.
std::vector<std::string_view> quoted_includes(std::string_view text) {
  std::vector<std::string_view> names;
  while (!text.empty()) {
    const std::size_t eol = text.find('\n');
    std::string_view line = trim_left(text.substr(0, eol));
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
    if (!line.starts_with('#')) continue;
    line = trim_left(line.substr(1));
    if (!line.starts_with("include")) continue;
    line = trim_left(line.substr(7));
    if (!line.starts_with('"')) continue;
    const std::size_t close = line.find('"', 1);
    if (close != std::string_view::npos) names.push_back(line.substr(1, close - 1));
  }
  return names;
}

// Hash of `path` and every embedded header it includes, transitively. Includes that are not in
// the table are left out: NVRTC either fails on them or takes them from its own built-in
// headers, which the NVRTC version in the key covers. Memoized: sources never change in-process.
std::uint64_t source_tree_hash(const std::string& path) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::uint64_t> memo;
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = memo.find(path); it != memo.end()) return it->second;

  const EmbeddedSource* root = find_source(path);
  if (root == nullptr) {
    check::fail("jit", ErrorCode::invalid_argument,
                "no embedded kernel source \"" + path + "\" (paths are relative to src/)");
  }
  std::map<std::string_view, std::string_view> tree;  // path -> text, in path order
  std::vector<const EmbeddedSource*> todo = {root};
  while (!todo.empty()) {
    const EmbeddedSource* source = todo.back();
    todo.pop_back();
    if (!tree.emplace(source->path, source->text).second) continue;
    for (std::string_view name : quoted_includes(source->text)) {
      if (const EmbeddedSource* header = find_source(name)) todo.push_back(header);
    }
  }
  std::uint64_t hash = fnv1a("");
  for (const auto& [name, text] : tree) {
    // The NULs keep ("ab", "c") and ("a", "bc") apart.
    hash = fnv1a(std::string_view("\0", 1), fnv1a(name, hash));
    hash = fnv1a(std::string_view("\0", 1), fnv1a(text, hash));
  }
  memo.emplace(path, hash);
  return hash;
}

template <class T>
T load(std::string_view bytes, std::size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof value);
  return value;
}

template <class T>
void store(std::string& bytes, T value) {
  bytes.append(reinterpret_cast<const char*>(&value), sizeof value);
}

bool read_file(const std::filesystem::path& file, std::string& bytes) {
  std::ifstream in(file, std::ios::binary | std::ios::ate);
  const std::streamoff size = in.tellg();
  if (!in || size < 0) return false;
  bytes.resize(static_cast<std::size_t>(size));
  in.seekg(0);
  return static_cast<bool>(in.read(bytes.data(), static_cast<std::streamsize>(bytes.size())));
}

struct Parsed {
  std::string problem;  // "" when header, sizes and checksum agree
  std::string_view key_text;
  std::string_view lowered_name;
  std::string_view image;
};

Parsed parse(std::string_view bytes) {
  Parsed p;
  if (bytes.size() < kHeaderBytes) {
    p.problem = "truncated (" + std::to_string(bytes.size()) + " bytes, shorter than the header)";
    return p;
  }
  if (bytes.substr(0, kMagic.size()) != kMagic) {
    p.problem = "not a kiln cache entry (bad magic)";
    return p;
  }
  const auto version = load<std::uint32_t>(bytes, 8);
  if (version != kFormatVersion) {
    p.problem = "format version " + std::to_string(version) + ", expected " +
                std::to_string(kFormatVersion);
    return p;
  }
  const auto key_bytes = load<std::uint32_t>(bytes, 12);
  const auto name_bytes = load<std::uint32_t>(bytes, 16);
  const auto image_bytes = load<std::uint64_t>(bytes, 20);
  const auto checksum = load<std::uint64_t>(bytes, 28);
  const std::uint64_t body = std::uint64_t(key_bytes) + name_bytes;
  if (image_bytes > bytes.size() || kHeaderBytes + body + image_bytes != bytes.size()) {
    p.problem = "truncated or padded (" + std::to_string(bytes.size()) + " bytes, header says " +
                std::to_string(kHeaderBytes + body + image_bytes) + ")";
    return p;
  }
  p.key_text = bytes.substr(kHeaderBytes, key_bytes);
  p.lowered_name = bytes.substr(kHeaderBytes + key_bytes, name_bytes);
  p.image = bytes.substr(kHeaderBytes + body);
  if (fnv1a(p.image, fnv1a(p.lowered_name)) != checksum) p.problem = "checksum mismatch";
  return p;
}

// The value of the "<field> value" line of a key text.
std::string field(std::string_view key_text, std::string_view name) {
  for (std::size_t start = 0; start < key_text.size();) {
    std::size_t eol = key_text.find('\n', start);
    if (eol == std::string_view::npos) eol = key_text.size();
    const std::string_view line = key_text.substr(start, eol - start);
    if (line.size() > name.size() && line.starts_with(name) && line[name.size()] == ' ') {
      return std::string(line.substr(name.size() + 1));
    }
    start = eol + 1;
  }
  return "";
}

std::string errno_text() { return std::error_code(errno, std::generic_category()).message(); }

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "?";
  return name;
}

std::string claim_path(const std::filesystem::path& entry) {
  return entry.string() + std::string(kClaimSuffix);
}

// Whether another process's claim is stale: its process is gone (same host), or it is older than
// kStaleClaimSeconds. A claim whose owner line is not written yet is fresh.
bool claim_is_stale(const std::string& claim) {
  std::error_code error;
  const auto written = std::filesystem::last_write_time(claim, error);
  if (error) return false;  // removed meanwhile: the caller tries again
  if (std::filesystem::file_time_type::clock::now() - written >
      std::chrono::seconds(kStaleClaimSeconds)) {
    return true;
  }
  std::ifstream in(claim);
  long long pid = 0;
  std::string host;
  if (!(in >> pid >> host) || pid <= 0 || host != host_name()) return false;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

}  // namespace

std::uint64_t fnv1a(std::string_view bytes, std::uint64_t hash) {
  for (const char c : bytes) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ull;
  }
  return hash;
}

std::string key_material(const KernelSpec& spec, const std::string& arch) {
  std::string options;
  for (const std::string& option : compile_options(arch)) {
    if (!options.empty()) options += ' ';
    options += option;
  }
  return "kiln " KILN_VERSION "\nnvrtc " + nvrtc_version() + "\narch " + arch + "\noptions " +
         options + "\nspec " + spec.key() + "\nsource " + spec.source + " " +
         hex(source_tree_hash(spec.source)) + "\n";
}

std::string entry_file_name(std::string_view key_text) {
  return hex(fnv1a(key_text)) + std::string(kExtension);
}

FileKind file_kind(std::string_view name) {
  if (name.size() < 16 + kExtension.size()) return FileKind::foreign;
  for (const char c : name.substr(0, 16)) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return FileKind::foreign;
  }
  name.remove_prefix(16);
  if (!name.starts_with(kExtension)) return FileKind::foreign;
  name.remove_prefix(kExtension.size());
  if (name.empty()) return FileKind::entry;
  if (name == kClaimSuffix) return FileKind::claim;
  return name.starts_with(kTempInfix) ? FileKind::temporary : FileKind::foreign;
}

bool claim_entry(const std::filesystem::path& entry) {
  const std::string claim = claim_path(entry);
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int fd = ::open(claim.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) {
      const std::string owner = std::to_string(::getpid()) + " " + host_name() + "\n";
      const bool written = ::write(fd, owner.data(), owner.size()) == ssize_t(owner.size());
      ::close(fd);
      if (!written) ::unlink(claim.c_str());  // an empty claim would look fresh for too long
      return true;
    }
    if (errno != EEXIST) return true;  // no claim possible here: compile without one
    if (!claim_is_stale(claim)) return false;
    ::unlink(claim.c_str());  // taken over: the next attempt creates it afresh
  }
  return false;
}

void release_claim(const std::filesystem::path& entry) { ::unlink(claim_path(entry).c_str()); }

EntryRead read_entry(const std::filesystem::path& file, std::string_view key_text) {
  EntryRead entry;
  std::string bytes;
  // An unreadable file counts as missing: the rewrite that follows reports any real problem.
  if (!read_file(file, bytes)) return entry;
  const Parsed p = parse(bytes);
  entry.status = EntryRead::corrupt;
  if (!p.problem.empty()) {
    entry.problem = p.problem;
  } else if (p.key_text != key_text) {
    entry.problem = "keyed for another kernel (its key text differs from the file name's)";
  } else if (p.lowered_name.empty()) {
    entry.problem = "missing the kernel's lowered name";
  } else {
    entry.status = EntryRead::ok;
    entry.lowered_name = p.lowered_name;
    entry.image.assign(p.image.begin(), p.image.end());
  }
  return entry;
}

std::string write_entry(const std::filesystem::path& file, std::string_view key_text,
                        const Cubin& cubin) {
  const std::string_view image(cubin.image.data(), cubin.image.size());
  std::string bytes(kMagic);
  store(bytes, kFormatVersion);
  store(bytes, static_cast<std::uint32_t>(key_text.size()));
  store(bytes, static_cast<std::uint32_t>(cubin.lowered_name.size()));
  store(bytes, static_cast<std::uint64_t>(image.size()));
  store(bytes, fnv1a(image, fnv1a(cubin.lowered_name)));
  bytes += key_text;
  bytes += cubin.lowered_name;
  bytes += image;

  // pid + counter: unique across the processes and threads that may write the same entry.
  static std::atomic<unsigned> counter{0};
  const std::string temp = file.string() + std::string(kTempInfix) + std::to_string(::getpid()) +
                           "." + std::to_string(counter++);
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return "cannot create " + temp + ": " + errno_text();
  std::string_view rest = bytes;
  while (!rest.empty()) {
    const ssize_t n = ::write(fd, rest.data(), rest.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    rest.remove_prefix(static_cast<std::size_t>(n));
  }
  std::string error;
  if (!rest.empty()) error = "cannot write " + temp + ": " + errno_text();
  if (::close(fd) != 0 && error.empty()) error = "cannot write " + temp + ": " + errno_text();
  // No fsync: an entry left short by a crash fails its checks on load and is rewritten.
  if (error.empty() && std::rename(temp.c_str(), file.c_str()) != 0) {
    error = "cannot rename " + temp + " to " + file.string() + ": " + errno_text();
  }
  if (!error.empty()) ::unlink(temp.c_str());
  return error;
}

CacheEntry describe_entry(const std::filesystem::path& file) {
  CacheEntry entry;
  entry.path = file.string();
  std::string bytes;
  if (!read_file(file, bytes)) return entry;
  entry.bytes = bytes.size();
  const Parsed p = parse(bytes);
  entry.kernel = field(p.key_text, "spec");
  entry.arch = field(p.key_text, "arch");
  entry.valid = p.problem.empty() && !p.lowered_name.empty() &&
                entry_file_name(p.key_text) == file.filename().string();
  return entry;
}

}  // namespace kiln::jit
