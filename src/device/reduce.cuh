// Warp-level reductions.
#pragma once

namespace kiln {

// Sum over aligned groups of `Lanes` consecutive lanes (a power of two, at most 32); every lane
// of the group gets the group's sum. All 32 lanes of the warp must call it.
template <int Lanes>
__device__ __forceinline__ float group_sum(float v) {
  static_assert(Lanes >= 1 && Lanes <= 32 && (Lanes & (Lanes - 1)) == 0,
                "Lanes must be a power of two <= 32");
#pragma unroll
  for (int offset = Lanes / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

}  // namespace kiln
