// LLM RoPE fused with the [N, T, H, D] -> [N, H, T, D] permute (or a KV-cache write at the
// tokens' positions) and an optional per-head RMSNorm in front.
//
// Computes, for every row (n, t, h), with pair i = (a, b) = (2i, 2i+1) when !NEOX ("normal",
// llama.cpp's LLAMA rope) or (i, i + D/2) when NEOX (rotate_half), in f32:
//   y = NORM ? x * rsqrt(mean(x^2) + eps) * w : x
//   angle = positions[n, t] * theta^(-2i / D)                     (f64)
//   out[n, h, s, a] = y[a] cos - y[b] sin,  out[n, h, s, b] = y[a] sin + y[b] cos   (ROTATE)
// with s = positions[n, t] (a KV cache, at_positions) or s = t; one read of x, one write of out.
//
// Layout: one block per token (n, t) holds every head of that token. A row's D/2 pairs are cut
// into chunks of P pairs; LANES consecutive lanes take the chunks of a row (CPL each), so a lane
// holds P pairs as v[c][0][q] (element a) and v[c][1][q] (element b). A normal chunk is 2P
// contiguous elements (one 16-byte load on the VECTOR path), a neox chunk two runs of P (two
// loads). HEAD_GROUPS rows are in flight per block and each thread covers HPT heads: cos and sin
// of its pairs are computed once for all of them, and all HPT loads of x are issued before the
// first use (rope_flux's layout, whose NOTES measure it).
//
// Angles: the frequency, the product with the position and the reduction to [-pi, pi] are in
// f64 (a position of 32768 times the highest frequency, 1 rad, loses 2^-9 rad to f32 rounding);
// cos and sin of the reduced angle in f32.
//
// Limits: D even; VECTOR needs x contiguous in D with rows aligned to the chunk, out's rows
// (and the cache's strides) aligned likewise, and norm_weight aligned (the launcher checks and
// otherwise picks the scalar path, P = 1). Rows whose cache position lies outside [0, S) are
// not written. Offsets are 64-bit.
#pragma once

#include "device/numeric.cuh"
#include "device/reduce.cuh"
#include "device/vec.cuh"
#include "ops/rope/kernels/params.cuh"

namespace kiln {

template <typename Tin, typename Tout, typename Tw, typename TPos, int D, bool NEOX, int P,
          int LANES, int HEAD_GROUPS, int HPT, bool VECTOR, bool ROTATE, bool NORM>
__global__ void __launch_bounds__(LANES* HEAD_GROUPS)
    rope_kernel(const __grid_constant__ RopeParams p) {
  static_assert(D % 2 == 0 && (D / 2) % P == 0, "a lane handles whole chunks of P pairs");
  constexpr int kHalf = D / 2;
  constexpr int kChunks = kHalf / P;                   // chunks per row
  constexpr int kCpl = (kChunks + LANES - 1) / LANES;  // chunks per lane

  // Chunks past the row (when LANES does not divide kChunks) read chunk 0 and are discarded.
  const auto safe_chunk = [](int chunk) {
    return kChunks % LANES == 0 || chunk < kChunks ? chunk : 0;
  };
  // Element index of side `side` (0: a, 1: b) of pair q of a chunk.
  const auto element = [](int chunk, int side, int q) {
    return NEOX ? side * kHalf + chunk * P + q : chunk * 2 * P + 2 * q + side;
  };
  const int lane = threadIdx.x % LANES;   // lane within the row
  const int group = threadIdx.x / LANES;  // row slot within the block
  const i64 token = blockIdx.x;           // n * T + t
  const i64 n = token / p.T;
  const i64 t = token - n * p.T;
  const i64 pos =
      i64(static_cast<const TPos*>(p.positions)[n * p.pos_stride[0] + t * p.pos_stride[1]]);
  const i64 s = p.at_positions ? pos : t;
  const bool in_range = s >= 0 && s < p.S;

  // cos and sin of this lane's pairs: (kCpl, P).
  float cs[kCpl][P], sn[kCpl][P];
  if constexpr (ROTATE) {
    constexpr double kTwoPi = 6.283185307179586476925;
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = safe_chunk(lane + c * LANES);
#pragma unroll
      for (int q = 0; q < P; ++q) {
        const int i = chunk * P + q;
        const double angle = double(pos) * exp2(-2.0 * i / D * p.log2_theta);
        const double reduced = fma(-kTwoPi, rint(angle / kTwoPi), angle);  // [-pi, pi]
        sincosf(float(reduced), &sn[c][q], &cs[c][q]);
      }
    }
  }

  // RMSNorm weights of this lane's elements: (kCpl, side, P).
  float w[kCpl][2][P];
  if constexpr (NORM) {
    const Tw* weight = static_cast<const Tw*>(p.norm_weight);
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = safe_chunk(lane + c * LANES);
#pragma unroll
      for (int side = 0; side < 2; ++side) {
#pragma unroll
        for (int q = 0; q < P; ++q) w[c][side][q] = to_float(weight[element(chunk, side, q)]);
      }
    }
  }

  // Every load of x is issued before the first use: (HPT, kCpl, 2P) raw values per thread, in
  // memory order (normal: a b a b ..., neox: the a run then the b run). Cells past H or D load
  // row 0 / chunk 0 instead and are discarded, so the loads need no branches.
  const Tin* x = static_cast<const Tin*>(p.x) + n * p.x_stride[0] + t * p.x_stride[1];
  Tin raw[HPT][kCpl][2 * P];
#pragma unroll
  for (int k = 0; k < HPT; ++k) {
    const i64 h = group + i64(k) * HEAD_GROUPS;
    const Tin* src = x + (h < p.H ? h : 0) * p.x_stride[2];
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = safe_chunk(lane + c * LANES);
      if constexpr (VECTOR && !NEOX) {
        load_vec(raw[k][c], src + chunk * 2 * P);
      } else if constexpr (VECTOR) {
        Tin(&runs)[2][P] = reinterpret_cast<Tin(&)[2][P]>(raw[k][c]);
        load_vec(runs[0], src + chunk * P);
        load_vec(runs[1], src + kHalf + chunk * P);
      } else {
#pragma unroll
        for (int side = 0; side < 2; ++side) {
#pragma unroll
          for (int q = 0; q < P; ++q) {
            const int e = NEOX ? side * P + q : 2 * q + side;  // memory order within the chunk
            raw[k][c][e] = src[i64(element(chunk, side, q)) * p.x_stride[3]];
          }
        }
      }
    }
  }

  Tout* out = static_cast<Tout*>(p.out) + n * p.out_stride[0] + s * p.out_stride[2];
#pragma unroll
  for (int k = 0; k < HPT; ++k) {
    const i64 h = group + i64(k) * HEAD_GROUPS;
    const bool row = h < p.H;
    float v[kCpl][2][P];  // (kCpl, side, P): this row's pairs in f32
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const bool cell = row && lane + c * LANES < kChunks;
#pragma unroll
      for (int q = 0; q < P; ++q) {
        v[c][0][q] = cell ? to_float(raw[k][c][NEOX ? q : 2 * q]) : 0.f;
        v[c][1][q] = cell ? to_float(raw[k][c][NEOX ? P + q : 2 * q + 1]) : 0.f;
      }
    }
    if constexpr (NORM) {
      float sum_sq = 0.f;
#pragma unroll
      for (int c = 0; c < kCpl; ++c) {
#pragma unroll
        for (int q = 0; q < P; ++q) sum_sq += v[c][0][q] * v[c][0][q] + v[c][1][q] * v[c][1][q];
      }
      // Every lane takes part, rows past H included, so the shuffles see full warps.
      sum_sq = group_sum<LANES>(sum_sq);
      const float inv_rms = rsqrtf(sum_sq / float(D) + p.eps);
#pragma unroll
      for (int c = 0; c < kCpl; ++c) {
#pragma unroll
        for (int side = 0; side < 2; ++side) {
#pragma unroll
          for (int q = 0; q < P; ++q) v[c][side][q] *= inv_rms * w[c][side][q];
        }
      }
    }
    if (!row || !in_range) continue;
    Tout* dst = out + h * p.out_stride[1];  // row (n, h, s)
#pragma unroll
    for (int c = 0; c < kCpl; ++c) {
      const int chunk = lane + c * LANES;
      if (chunk >= kChunks) continue;
      Tout res[2 * P];  // memory order, as raw
#pragma unroll
      for (int q = 0; q < P; ++q) {
        float a = v[c][0][q], b = v[c][1][q];
        if constexpr (ROTATE) {
          const float ra = a * cs[c][q] - b * sn[c][q];
          b = a * sn[c][q] + b * cs[c][q];
          a = ra;
        }
        res[NEOX ? q : 2 * q] = from_float<Tout>(a);
        res[NEOX ? P + q : 2 * q + 1] = from_float<Tout>(b);
      }
      if constexpr (VECTOR && !NEOX) {
        store_vec(dst + chunk * 2 * P, res);
      } else if constexpr (VECTOR) {
        const Tout(&runs)[2][P] = reinterpret_cast<const Tout(&)[2][P]>(res);
        store_vec(dst + chunk * P, runs[0]);
        store_vec(dst + kHalf + chunk * P, runs[1]);
      } else {
#pragma unroll
        for (int side = 0; side < 2; ++side) {
#pragma unroll
          for (int q = 0; q < P; ++q) {
            dst[element(chunk, side, q)] = res[NEOX ? side * P + q : 2 * q + side];
          }
        }
      }
    }
  }
}

}  // namespace kiln
