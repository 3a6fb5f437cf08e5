// Split-KV combine: merges the per-chunk partial outputs of attention_kernel<..., SPLIT = true>,
// run by the last block of each (row tile, n, kv head) to finish its chunk (attention.cuh).
//
// For each output row (n, hq, i), with chunk s holding O_s (normalized by its own sum) and its
// log2-sum-exp L_s:  out = sum_s 2^(L_s - L) O_s,  L = log2 sum_s 2^L_s  (lse = L * ln 2).
// A row whose every chunk saw no key (all L_s = -inf) gets zeros and lse -inf; a NaN L_s gives a
// NaN row.
//
// Layout: one warp per row; lane l owns columns [8c, 8c + 8) for chunks c = l, l + 32, ... of
// DV / 8. The workspace is [splits, rows, DV] f32 plus [splits, rows] (params.cuh); it is small
// next to K/V (B1 H32 D128 with 4 splits: 66 KB against 16 MB of K/V at 4096 keys) and the last
// block reads it from L2, where the other chunks' blocks have just written it.
#pragma once

#include "device/numeric.cuh"
#include "device/vec.cuh"
#include "ops/attention/kernels/params.cuh"

namespace kiln {

// Combines output row `row` of [N * Hq * Lq] with one warp (`lane` its lane).
template <typename TO, int DV>
__device__ __forceinline__ void attention_combine_row(const AttentionParams& p, i64 row, int lane) {
  constexpr int kChunks = DV / 8;
  constexpr float kLn2 = 0.6931471805599453f;
  const i64 rows = p.N * p.Hq * p.Lq;
  const float inf = __int_as_float(0x7f800000);
  // out's element offset of the row's (n, hq, i): out may be strided (params.cuh).
  const i64 nh = row / p.Lq;
  TO* out = static_cast<TO*>(p.out) + (nh / p.Hq) * p.out_stride[0] +
            (nh % p.Hq) * p.out_stride[1] + (row % p.Lq) * p.out_stride[2];

  float max_lse = -inf;
  for (int s = lane; s < p.splits; s += 32) max_lse = fmaxf(max_lse, p.lse_part[s * rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, off));
  }
  // Weights relative to the max, or to 0 when every chunk's L_s is -inf: then the total is
  // exactly 0 (zeros, lse -inf), while a NaN L_s (a chunk that met a NaN or +inf score; the max
  // skips it) makes the total and the row NaN.
  const float shift = max_lse == -inf ? 0.f : max_lse;
  float total = 0.f;
  for (int s = 0; s < p.splits; ++s) total += exp2f(p.lse_part[s * rows + row] - shift);
  const float inv_total = total == 0.f ? 0.f : 1.f / total;

  for (int c = lane; c < kChunks; c += 32) {
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    if (total != 0.f) {
      for (int s = 0; s < p.splits; ++s) {
        const float w = exp2f(p.lse_part[s * rows + row] - shift) * inv_total;
        if (w == 0.f) continue;
        float part[8];
        load_vec(part, p.o_part + (s * rows + row) * DV + c * 8);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(w, part[e], acc[e]);
      }
    }
    TO y[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = from_float<TO>(acc[e]);
    store_vec(out + c * 8, y);
  }
  if (lane == 0 && p.lse != nullptr) {
    p.lse[row] = total == 0.f ? -inf : (shift + __log2f(total)) * kLn2;
  }
}

}  // namespace kiln
