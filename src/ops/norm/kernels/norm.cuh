// rms_norm and layer_norm (with AdaLN modulation): one row of D elements per TPR threads, the row
// held in registers from one read of x to one write of out.
//
// Computes for each row of x (math in f32):
//   kNormRms:   y = x * rsqrt(mean(x^2) + eps) * weight
//   kNormLayer: y = (x - mean) * rsqrt(mean((x - mean)^2) + eps);  y = y * weight + bias;
//               y = y * (1 + scale[b]) + shift[b]      (b = r / rows_per_batch)
// (each factor only where given), then out = y rounded to Tout, or, for an fp8 Tout, the codes
// of y with the row's scale (device/row_store.cuh: the amax is a third reduction over the same
// registers, no second read of x).
//
// Layout: a block holds ROWS rows of TPR threads (TPR a power of two; ROWS * TPR >= 128 threads).
// Thread `lane` of a row holds chunks lane, lane + TPR, ... of EPT consecutive elements (16 bytes
// of x on the VECTOR path), loads all of them before the first use (chunks past D / EPT load chunk
// 0 and are discarded, rows past R load the last row and are not stored), so every load of the
// row is in flight at once. Sums are row_reduce calls (warp shuffles, then shared memory across
// the row's warps), in a fixed order. LayerNorm's variance is taken around the mean from the
// registers (two passes over registers, none over memory).
// The result's last operations are written with explicit roundings (__fmul_rn, fmaf), so that
// the fp8 variant quantizes exactly the f32 y that the 16/32-bit variant rounds.
//
// Limits: D % EPT == 0; VECTOR needs x's rows, out, weight, bias and the modulation rows aligned
// for EPT-element accesses (the launcher checks, else EPT = 1 element loads). Offsets are 64-bit.
#pragma once

#include "device/numeric.cuh"
#include "device/reduce.cuh"
#include "device/row_store.cuh"
#include "device/rows.cuh"
#include "device/vec.cuh"
#include "ops/norm/kernels/params.cuh"

namespace kiln {

template <int KIND, typename Tin, typename Tout, typename Tw, typename Tm, int D, int EPT, int TPR,
          int ROWS, bool VECTOR, bool HAS_WEIGHT, bool HAS_BIAS, bool HAS_SHIFT, bool HAS_SCALE>
__global__ void __launch_bounds__(TPR* ROWS, 1) norm_kernel(const __grid_constant__ NormParams p) {
  using Row = RowThread<D, EPT, TPR, ROWS>;
  constexpr int kCpt = Row::kCpt;
  __shared__ float shared[Row::kShared];
  const Row t(p.layout.rows);

  // x: (kCpt, EPT) values of this thread, every load issued first; absent chunks become 0.
  const Tin* x = static_cast<const Tin*>(p.x) + row_offset(p.layout, t.r);
  float v[kCpt][EPT];
#pragma unroll
  for (int c = 0; c < kCpt; ++c) load_floats<Tin, EPT, VECTOR>(x + t.chunk(c) * EPT, v[c]);
#pragma unroll
  for (int c = 0; c < kCpt; ++c) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) v[c][e] = t.present(c) ? v[c][e] : 0.f;
  }

  // The per-element factors of this thread's chunks: weight, bias, modulation of batch b.
  const long long b = HAS_SHIFT || HAS_SCALE ? t.r / p.rows_per_batch : 0;
  const Tw* weight = static_cast<const Tw*>(p.weight);
  const Tw* bias = static_cast<const Tw*>(p.bias);
  const Tm* shift = static_cast<const Tm*>(p.shift) + b * p.shift_stride;
  const Tm* scale = static_cast<const Tm*>(p.scale) + b * p.scale_stride;

  float y[kCpt][EPT];
  if constexpr (KIND == kNormRms) {
    float sum_sq = 0.f;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
#pragma unroll
      for (int e = 0; e < EPT; ++e) sum_sq = fmaf(v[c][e], v[c][e], sum_sq);
    }
    sum_sq = row_reduce<TPR>(sum_sq, shared, SumOp{});
    const float inv_rms = rsqrtf(sum_sq / float(D) + p.eps);
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      float w[EPT];
      if constexpr (HAS_WEIGHT) load_floats<Tw, EPT, VECTOR>(weight + t.chunk(c) * EPT, w);
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        y[c][e] = __fmul_rn(v[c][e], inv_rms);
        if constexpr (HAS_WEIGHT) y[c][e] = __fmul_rn(y[c][e], w[e]);
      }
    }
  } else {
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
#pragma unroll
      for (int e = 0; e < EPT; ++e) sum += v[c][e];
    }
    const float mean = row_reduce<TPR>(sum, shared, SumOp{}) / float(D);
    float sum_sq = 0.f;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      if (!t.present(c)) continue;
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const float d = v[c][e] - mean;
        sum_sq = fmaf(d, d, sum_sq);
      }
    }
    const float rstd = rsqrtf(row_reduce<TPR>(sum_sq, shared, SumOp{}) / float(D) + p.eps);
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      float w[EPT], bi[EPT], sh[EPT], sc[EPT];
      if constexpr (HAS_WEIGHT) load_floats<Tw, EPT, VECTOR>(weight + t.chunk(c) * EPT, w);
      if constexpr (HAS_BIAS) load_floats<Tw, EPT, VECTOR>(bias + t.chunk(c) * EPT, bi);
      if constexpr (HAS_SHIFT) load_floats<Tm, EPT, VECTOR>(shift + t.chunk(c) * EPT, sh);
      if constexpr (HAS_SCALE) load_floats<Tm, EPT, VECTOR>(scale + t.chunk(c) * EPT, sc);
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        float t = __fmul_rn(__fsub_rn(v[c][e], mean), rstd);
        if constexpr (HAS_WEIGHT && HAS_BIAS) {
          t = fmaf(t, w[e], bi[e]);
        } else if constexpr (HAS_WEIGHT) {
          t = __fmul_rn(t, w[e]);
        } else if constexpr (HAS_BIAS) {
          t = __fadd_rn(t, bi[e]);
        }
        if constexpr (HAS_SCALE && HAS_SHIFT) {
          t = fmaf(t, __fadd_rn(1.f, sc[e]), sh[e]);
        } else if constexpr (HAS_SCALE) {
          t = __fmul_rn(t, __fadd_rn(1.f, sc[e]));
        } else if constexpr (HAS_SHIFT) {
          t = __fadd_rn(t, sh[e]);
        }
        y[c][e] = t;
      }
    }
  }
  store_row<Tout, VECTOR>(t, p.out, p.out_scale, y, shared);
}

}  // namespace kiln
