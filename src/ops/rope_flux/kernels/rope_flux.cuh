// Fused Flux RoPE + [N, L, H, D] -> [N, H, L, D] permute, with optional per-head RMSNorm.
//
// Computes, for every row (n, l, h) and pair p of its D elements (math in f32):
//   y = HAS_NORM ? x * rsqrt(mean(x^2) + eps) * w : x
//   out[n, h, l, 2p]   = pe[l][p][0][0] * y[2p] + pe[l][p][0][1] * y[2p+1]
//   out[n, h, l, 2p+1] = pe[l][p][1][0] * y[2p] + pe[l][p][1][1] * y[2p+1]
// (without pe, out = y), one read of x and pe and one write of out.
//
// Layout: one block per token (n, l) holds every head of that token. A row of D elements is
// handled by LANES consecutive lanes, each taking EPT consecutive elements (16 bytes of x on the
// VECTOR path) in CPL chunks; HEAD_GROUPS rows are in flight per block and each thread covers HPT
// heads, so a lane loads its rotation matrices (pe) once for HPT heads, and issues all HPT loads
// of x before the first use. The RMSNorm sum of squares is a shuffle reduction over the row's
// LANES lanes.
//
// Why this shape (figures in ../NOTES.md, every version): it runs close to a device copy of the
// same bytes because it takes all loads in flight at once (branch-free: rows past H load row 0
// and are discarded) and stores 16 bytes at a time (device/vec.cuh); the same layout with
// branches around the loads and split stores was far slower (v5). A loop over tokens with the
// next token's loads in flight (v3), and tiles of tokens walking the heads (v4), were both slower.
//
// Limits: D even; out's rows may be strided (a row range of a longer [N, H, L', D] buffer, so that
// text and image tokens land in one attention input without a concatenation), D contiguous.
// VECTOR needs x contiguous in D with 16-byte-aligned rows, pe's [D/2, 2, 2] block contiguous and
// 16-byte aligned, and out's rows and norm_weight aligned for EPT-element accesses (the launcher
// checks and otherwise picks the scalar path, EPT = 2). Offsets are 64-bit.
#pragma once

#include "device/numeric.cuh"
#include "device/reduce.cuh"
#include "device/vec.cuh"
#include "ops/rope_flux/kernels/params.cuh"

namespace kiln {

template <typename Tin, typename Tout, typename Tw, int D, int EPT, int LANES, int HEAD_GROUPS,
          int HPT, bool VECTOR, bool HAS_PE, bool HAS_NORM>
__global__ void __launch_bounds__(LANES* HEAD_GROUPS)
    rope_flux_kernel(const __grid_constant__ RopeFluxParams p) {
  static_assert(D % EPT == 0 && EPT % 2 == 0, "a lane handles whole pairs of one row");
  constexpr int kChunks = D / EPT;                     // chunks per row
  constexpr int kCpl = (kChunks + LANES - 1) / LANES;  // chunks per lane
  constexpr int kPairs = EPT / 2;                      // pairs per chunk

  // Chunks past the row (when LANES does not divide kChunks) read chunk 0 and are discarded.
  const auto safe_chunk = [](int chunk) {
    return kChunks % LANES == 0 || chunk < kChunks ? chunk : 0;
  };
  const int lane = threadIdx.x % LANES;   // lane within the row
  const int group = threadIdx.x / LANES;  // row slot within the block
  const i64 token = blockIdx.x;           // n * L + l
  const i64 n = token / p.L;
  const i64 l = token - n * p.L;

  // Rotation matrices of this lane's pairs: (kCpl, kPairs, [m00, m01, m10, m11]).
  float rot[kCpl][kPairs][4];
  if constexpr (HAS_PE) {
    const float* pe_token = p.pe + n * p.pe_stride[0] + l * p.pe_stride[1];
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = safe_chunk(lane + c * LANES);
#pragma unroll
      for (int q = 0; q < kPairs; ++q) {
        const i64 pair = i64(chunk) * kPairs + q;
        if constexpr (VECTOR) {
          load_vec(rot[c][q], pe_token + pair * 4);
        } else {
          const float* m = pe_token + pair * p.pe_stride[2];
          rot[c][q][0] = m[0];
          rot[c][q][1] = m[p.pe_stride[4]];
          rot[c][q][2] = m[p.pe_stride[3]];
          rot[c][q][3] = m[p.pe_stride[3] + p.pe_stride[4]];
        }
      }
    }
  }

  // RMSNorm weights of this lane's elements: (kCpl, EPT).
  float w[kCpl][EPT];
  if constexpr (HAS_NORM) {
    const Tw* weight = static_cast<const Tw*>(p.norm_weight);
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = lane + c * LANES;
      if (chunk >= kChunks) continue;
      Tw raw[EPT];
      if constexpr (VECTOR) {
        load_vec(raw, weight + chunk * EPT);
      } else {
#pragma unroll
        for (int e = 0; e < EPT; ++e) raw[e] = weight[chunk * EPT + e];
      }
#pragma unroll
      for (int e = 0; e < EPT; ++e) w[c][e] = to_float(raw[e]);
    }
  }

  // Every load of x is issued before the first use: (HPT, kCpl, EPT) raw values per thread.
  // Cells past H or D load row 0 / chunk 0 instead and are discarded, so the loads need no
  // branches and all of them are in flight together.
  const Tin* x = static_cast<const Tin*>(p.x) + n * p.x_stride[0] + l * p.x_stride[1];
  Tin raw[HPT][kCpl][EPT];
#pragma unroll
  for (int k = 0; k < HPT; ++k) {
    const i64 h = group + i64(k) * HEAD_GROUPS;
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = safe_chunk(lane + c * LANES);
      const Tin* src = x + (h < p.H ? h : 0) * p.x_stride[2];
      if constexpr (VECTOR) {
        load_vec(raw[k][c], src + chunk * EPT);
      } else {
#pragma unroll
        for (int e = 0; e < EPT; ++e) raw[k][c][e] = src[(i64(chunk) * EPT + e) * p.x_stride[3]];
      }
    }
  }

  Tout* out = static_cast<Tout*>(p.out);
#pragma unroll
  for (int k = 0; k < HPT; ++k) {
    const i64 h = group + i64(k) * HEAD_GROUPS;
    const bool row = h < p.H;
    float v[kCpl][EPT];  // (kCpl, EPT): this row's elements in f32
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const bool cell = row && lane + c * LANES < kChunks;
#pragma unroll
      for (int e = 0; e < EPT; ++e) v[c][e] = cell ? to_float(raw[k][c][e]) : 0.f;
    }
    if constexpr (HAS_NORM) {
      float sum_sq = 0.f;
#pragma unroll
      for (int c = 0; c < kCpl; ++c) {
#pragma unroll
        for (int e = 0; e < EPT; ++e) sum_sq += v[c][e] * v[c][e];
      }
      // Every lane takes part, rows past H included, so the shuffles see full warps.
      sum_sq = group_sum<LANES>(sum_sq);
      const float inv_rms = rsqrtf(sum_sq / float(D) + p.eps);
#pragma unroll
      for (int c = 0; c < kCpl; ++c) {
#pragma unroll
        for (int e = 0; e < EPT; ++e) v[c][e] *= inv_rms * w[c][e];
      }
    }
    if (!row) continue;
    Tout* dst = out + n * p.out_stride[0] + h * p.out_stride[1] +
                l * p.out_stride[2];  // row (n, h, l) of [N, H, L, D]
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = lane + c * LANES;
      if (chunk >= kChunks) continue;
      Tout res[EPT];
#pragma unroll
      for (int q = 0; q < kPairs; ++q) {
        const float x0 = v[c][2 * q];
        const float x1 = v[c][2 * q + 1];
        if constexpr (HAS_PE) {
          res[2 * q] = from_float<Tout>(rot[c][q][0] * x0 + rot[c][q][1] * x1);
          res[2 * q + 1] = from_float<Tout>(rot[c][q][2] * x0 + rot[c][q][3] * x1);
        } else {
          res[2 * q] = from_float<Tout>(x0);
          res[2 * q + 1] = from_float<Tout>(x1);
        }
      }
      if constexpr (VECTOR) {
        store_vec(dst + chunk * EPT, res);
      } else {
#pragma unroll
        for (int e = 0; e < EPT; ++e) dst[chunk * EPT + e] = res[e];
      }
    }
  }
}

}  // namespace kiln
