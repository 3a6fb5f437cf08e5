// The bytes of a CUtensorMap, for kernel parameter structs shared by the host launchers (g++) and
// the kernels (NVRTC): TMA reads its tensor map from a __grid_constant__ parameter. The host
// fills it with core/tma.hpp.
#pragma once

namespace kiln {

struct alignas(64) TensorMapBytes {
  unsigned long long words[16];
};

}  // namespace kiln
