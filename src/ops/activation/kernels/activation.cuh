// glu and gelu_tanh: one row of F outputs per TPR threads, held in registers from one read of x
// to one write of out.
//
// Computes for each row (math in f32, device/activation.cuh):
//   GATED:  y[f] = act(x[f]) * x[F + f]    (gate half first, then the linear half)
//   else:   y[f] = act(x[f])
// then out = y rounded to Tout, or, for an fp8 Tout, the codes of y with the row's scale
// (device/row_store.cuh: the row's amax is a reduction over the same registers).
//
// Layout as the norm kernels' (ops/norm/kernels/norm.cuh): ROWS rows a block of TPR threads
// each; thread `lane` holds chunks lane, lane + TPR, ... of EPT consecutive outputs (16 bytes of
// each half of x on the VECTOR path) and issues every load of its chunks before the first use
// (chunks past F and rows past R read valid addresses and are discarded). A row lives in
// registers because the fp8 scale needs the whole row's amax before the first code is written; the
// 16/32-bit outputs use the same kernel (no reduction then).
//
// Limits: F % EPT == 0; VECTOR needs x's rows and out aligned for EPT-element accesses (the
// launcher checks, else EPT = 1 element loads). Offsets are 64-bit.
#pragma once

#include "device/activation.cuh"
#include "device/numeric.cuh"
#include "device/row_store.cuh"
#include "device/rows.cuh"
#include "device/vec.cuh"
#include "ops/activation/kernels/params.cuh"

namespace kiln {

template <int ACT>
__device__ __forceinline__ float activate(float x) {
  if constexpr (ACT == kActSilu) {
    return silu(x);
  } else {
    return gelu_tanh(x);
  }
}

template <int ACT, bool GATED, typename Tin, typename Tout, int F, int EPT, int TPR, int ROWS,
          bool VECTOR>
__global__ void __launch_bounds__(TPR* ROWS, 1)
    activation_kernel(const __grid_constant__ ActivationParams p) {
  using Row = RowThread<F, EPT, TPR, ROWS>;
  constexpr int kCpt = Row::kCpt;
  __shared__ float shared[Row::kShared];
  const Row t(p.layout.rows);

  // (kCpt, EPT) gate values and linear values of this thread, every load issued first.
  const Tin* x = static_cast<const Tin*>(p.x) + row_offset(p.layout, t.r);
  float gate[kCpt][EPT], linear[GATED ? kCpt : 1][EPT];
#pragma unroll
  for (int c = 0; c < kCpt; ++c) {
    load_floats<Tin, EPT, VECTOR>(x + t.chunk(c) * EPT, gate[c]);
    if constexpr (GATED) load_floats<Tin, EPT, VECTOR>(x + F + t.chunk(c) * EPT, linear[c]);
  }
  float y[kCpt][EPT];
#pragma unroll
  for (int c = 0; c < kCpt; ++c) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      y[c][e] = activate<ACT>(gate[c][e]);
      if constexpr (GATED) y[c][e] = __fmul_rn(y[c][e], linear[c][e]);
    }
  }
  store_row<Tout, VECTOR>(t, p.out, p.out_scale, y, shared);
}

}  // namespace kiln
