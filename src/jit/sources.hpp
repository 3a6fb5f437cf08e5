// Kernel sources embedded into the library at build time (cmake/embed_sources.cmake writes the
// table from every .cuh under src/).
#pragma once

#include <span>
#include <string_view>

namespace kiln::jit {

struct EmbeddedSource {
  std::string_view path;  // relative to src/, e.g. "device/numeric.cuh"
  std::string_view text;
};

std::span<const EmbeddedSource> embedded_sources();
// nullptr when no embedded source has that path.
const EmbeddedSource* find_source(std::string_view path);

}  // namespace kiln::jit
