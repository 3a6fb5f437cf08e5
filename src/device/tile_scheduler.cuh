// The persistent tile scheduler: a grid of fewer blocks than tiles (one a SM, say) in which each
// block walks the tiles b, b + G, b + 2 G, ... (b = blockIdx.x, G = gridDim.x), so every tile is
// taken exactly once whatever the grid size. Static: the order follows from blockIdx alone, so a
// block's producer and consumer warpgroups, each iterating on its own, see the same tiles in the
// same order without talking, no counter lives in global memory (nothing to reset, a launch can
// be captured in a CUDA graph and replayed), and a block's next tile is known while it finishes
// this one (its producer fetches ahead across the boundary).
//
//   for (const int tile : PersistentTiles{tiles}) { ... }
//
// The launcher sizes the grid: min(tiles, SMs x blocks per SM) blocks along x.
#pragma once

namespace kiln {

struct PersistentTiles {
  int tiles;  // tile indices [0, tiles)

  struct Iterator {
    int tile;
    int step;
    __device__ __forceinline__ int operator*() const { return tile; }
    __device__ __forceinline__ Iterator& operator++() {
      tile += step;
      return *this;
    }
  };
  // The range-for loop's test: a block is done once its next tile lies past the last.
  struct Bounded {
    int tiles;
  };

  __device__ __forceinline__ Iterator begin() const {
    return {static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x)};
  }
  __device__ __forceinline__ Bounded end() const { return {tiles}; }
};

__device__ __forceinline__ bool operator!=(const PersistentTiles::Iterator& it,
                                           const PersistentTiles::Bounded& end) {
  return it.tile < end.tiles;
}

}  // namespace kiln
