// The disk cache's key material and file format.
//
// An entry is one file "<hash>.kiln" where <hash> is the 64-bit FNV-1a (16 hex digits) of the
// key text: kiln's version, NVRTC's version, the arch, the compile flags, the specialization
// and a hash of the kernel source with every header it includes. The file holds, in native
// byte order:
//   char[8]  magic "KILNCBIN"
//   u32      format version (kFormatVersion)
//   u32      key text bytes
//   u32      lowered name bytes
//   u64      cubin bytes
//   u64      FNV-1a of the lowered name followed by the cubin
//   key text, lowered name, cubin
// Writers use "<hash>.kiln.tmp.<pid>.<n>" in the same folder and rename it into place.
//
// Claims: a process about to compile a missing entry first creates "<hash>.kiln.lock" (O_EXCL),
// holding "<pid> <host>", and removes it once the entry is stored or the compile failed. Another
// process that finds the claim waits for the entry instead of compiling it too (warm-up first
// builds what nobody claimed). A claim is stale, and taken over, when its process is gone (same
// host) or it is older than kStaleClaimSeconds (another host, or an unreadable claim). Claims
// only save work: two processes that both compile an entry (a claim taken over twice at once,
// say) still store a correct file, since entries are renamed into place whole.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "jit/kernel_cache.hpp"
#include "jit/kernel_spec.hpp"
#include "kiln/jit.hpp"

namespace kiln::jit {

inline constexpr std::uint32_t kFormatVersion = 1;

std::uint64_t fnv1a(std::string_view bytes, std::uint64_t hash = 0xcbf29ce484222325ull);

// The full key text of (spec, arch), one "field value" per line. Throws kiln::Error
// (invalid_argument) when spec.source is not an embedded source.
std::string key_material(const KernelSpec& spec, const std::string& arch);

// "<16 hex digits>.kiln"
std::string entry_file_name(std::string_view key_text);

// Entries, writers' temporary files and claims are the only files clear() may remove.
enum class FileKind { foreign, entry, temporary, claim };
FileKind file_kind(std::string_view file_name);

// A claim older than this is taken over whoever holds it: longer than any compile takes.
inline constexpr int kStaleClaimSeconds = 600;

// Claims `entry` for this process: true when this process now holds "<entry>.lock" (after taking
// over a stale one), false while another process holds it. Throws nothing: a claim that cannot be
// made for another reason (a read-only folder) is reported as held here, so the caller compiles.
bool claim_entry(const std::filesystem::path& entry);
// Removes this process's claim on `entry`.
void release_claim(const std::filesystem::path& entry);

struct EntryRead {
  enum Status { ok, missing, corrupt } status = missing;
  std::string problem;  // why a corrupt entry was rejected
  std::string lowered_name;
  std::vector<char> image;
};

// Reads and verifies `file` against the expected key text.
EntryRead read_entry(const std::filesystem::path& file, std::string_view key_text);

// Writes `cubin` to `file` through a temporary file and rename(); returns "" or why it failed.
std::string write_entry(const std::filesystem::path& file, std::string_view key_text,
                        const Cubin& cubin);

// What list() shows for one entry file: its kernel and arch from the key text, and whether
// header, checksum and file name agree.
CacheEntry describe_entry(const std::filesystem::path& file);

}  // namespace kiln::jit
