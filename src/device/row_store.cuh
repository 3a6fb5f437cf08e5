// Row kernels (the norm and activation families): where a thread sits in its row, and the output
// stage. A row of C results y is held in the registers of its TPR threads: thread `lane` holds
// chunks lane, lane + TPR, ... of EPT consecutive elements (chunks past C / EPT are absent).
// store_row writes the row to `out` [R, C] (contiguous) as Tout, or, for an fp8 Tout, as codes
// with the row's scale:
//   scale = scale_from_amax(max |y|) (amax over the row's threads), out = encode(y / scale)
// the arithmetic of quantize_fp8 with per-row scales, so the codes are the same bits as that op
// gives for the same f32 y.
#pragma once

#include "device/fp8.cuh"
#include "device/numeric.cuh"
#include "device/reduce.cuh"
#include "device/vec.cuh"

namespace kiln {

// A thread's place in a block of ROWS rows of TPR threads (TPR a power of two). Rows past R read
// the last row, so every load is valid, and are not stored (`live` false); an absent chunk reads
// chunk 0 for the same reason (`chunk`).
template <int C, int EPT, int TPR, int ROWS>
struct RowThread {
  static_assert(C % EPT == 0, "whole chunks");
  static constexpr int kChunks = C / EPT;                        // chunks of a row
  static constexpr int kCpt = (kChunks + TPR - 1) / TPR;         // chunks per thread
  static constexpr int kShared = TPR > 32 ? TPR* ROWS / 32 : 1;  // floats of row_reduce scratch

  int lane;     // thread of the row
  bool live;    // a row below R
  long long r;  // the row it reads (R - 1 when not live)

  __device__ __forceinline__ explicit RowThread(long long rows) : lane(threadIdx.x % TPR) {
    const long long row = static_cast<long long>(blockIdx.x) * ROWS + threadIdx.x / TPR;
    live = row < rows;
    r = live ? row : rows - 1;
  }
  __device__ __forceinline__ bool present(int c) const {
    return kChunks % TPR == 0 || lane + c * TPR < kChunks;
  }
  __device__ __forceinline__ int chunk(int c) const { return present(c) ? lane + c * TPR : 0; }
};

// Every thread of the block calls it (the fp8 amax is a row_reduce; `shared` holds
// RowThread::kShared floats). VECTOR: out aligned to min(16, EPT * sizeof(Tout)) bytes (EPT fp8
// codes: EPT bytes).
template <typename Tout, bool VECTOR, int C, int EPT, int TPR, int ROWS, int CPT>
__device__ __forceinline__ void store_row(const RowThread<C, EPT, TPR, ROWS>& t, void* out,
                                          float* out_scale, const float (&y)[CPT][EPT],
                                          float* shared) {
  if constexpr (is_fp8_type<Tout>) {
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      if (!t.present(c)) continue;
#pragma unroll
      for (int e = 0; e < EPT; ++e) amax = fmaxf(amax, fabsf(y[c][e]));
    }
    const float scale = scale_from_amax<Tout>(row_reduce<TPR>(amax, shared, MaxOp{}));
    if (!t.live) return;
    unsigned char* codes = static_cast<unsigned char*>(out) + t.r * C;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      if (t.present(c)) store_fp8<Tout, EPT>(codes + t.chunk(c) * EPT, y[c], scale);
    }
    if (t.lane == 0) out_scale[t.r] = scale;
  } else {
    if (!t.live) return;
    Tout* dst = static_cast<Tout*>(out) + t.r * C;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      if (t.present(c)) store_floats<Tout, EPT, VECTOR>(dst + t.chunk(c) * EPT, y[c]);
    }
  }
}

}  // namespace kiln
