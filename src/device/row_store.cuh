// The output stage of the row kernels (norm and activation families). A row of C results y is
// held in the registers of its TPR threads: thread `lane` holds chunks lane, lane + TPR, ... of
// EPT consecutive elements (chunks past C / EPT are absent). store_row writes the row to `out`
// [R, C] (contiguous) as Tout, or, for an fp8 Tout, as codes with the row's scale:
//   scale = scale_from_amax(max |y|) (amax over the row's threads), out = encode(y / scale)
// the arithmetic of quantize_fp8 with per-row scales, so the codes are the same bits as that op
// gives for the same f32 y.
#pragma once

#include "device/fp8.cuh"
#include "device/numeric.cuh"
#include "device/reduce.cuh"
#include "device/vec.cuh"

namespace kiln {

// Every thread of the block calls it (the fp8 amax is a row_reduce); rows that are not `live`
// (past R) take part in the reductions and store nothing. VECTOR: out aligned to
// min(16, EPT * sizeof(Tout)) bytes (EPT fp8 codes: EPT bytes).
template <typename Tout, int C, int EPT, int TPR, bool VECTOR, int CPT>
__device__ __forceinline__ void store_row(void* out, float* out_scale, long long r, bool live,
                                          int lane, const float (&y)[CPT][EPT], float* shared) {
  constexpr int kChunks = C / EPT;
  const auto present = [&](int c) { return kChunks % TPR == 0 || lane + c * TPR < kChunks; };
  if constexpr (is_fp8_type<Tout>) {
    float amax = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      if (!present(c)) continue;
#pragma unroll
      for (int e = 0; e < EPT; ++e) amax = fmaxf(amax, fabsf(y[c][e]));
    }
    const float scale = scale_from_amax<Tout>(row_reduce<TPR>(amax, shared, MaxOp{}));
    if (!live) return;
    unsigned char* codes = static_cast<unsigned char*>(out) + r * C;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      if (present(c)) store_fp8<Tout, EPT>(codes + (lane + c * TPR) * EPT, y[c], scale);
    }
    if (lane == 0) out_scale[r] = scale;
  } else {
    if (!live) return;
    Tout* dst = static_cast<Tout*>(out) + r * C;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      if (present(c)) store_floats<Tout, EPT, VECTOR>(dst + (lane + c * TPR) * EPT, y[c]);
    }
  }
}

}  // namespace kiln
