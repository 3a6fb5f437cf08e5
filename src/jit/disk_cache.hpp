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

// Entries and writers' temporary files are the only files clear() may remove.
enum class FileKind { foreign, entry, temporary };
FileKind file_kind(std::string_view file_name);

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
