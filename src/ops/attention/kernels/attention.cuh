// Attention forward, FlashAttention-2 style, on mma.sync m16n8k16 (sm_80 and later): prefill
// where the sm_90a kernel (prefill_sm90.cuh) does not take the call, and every decode.
//
// Computes, for every query row (n, hq, i) and its visible keys j:
//   s_j = scale * q_i . k_j  (then softcap * tanh(s_j / softcap), then + mask[n, hq, i, j])
//   out[n, hq, i, :] = sum_j softmax(s)_j * v_j,   lse[n, hq, i] = log sum_j exp(s_j)
// with an online softmax in registers (exp2, scale * log2(e) folded into one FMA).
//
// Layout. Rows are the G query heads of one KV head packed with the queries, row r = i * G + h:
// a block owns BLOCK_M = 16 * WARPS_M rows of one (n, kv head), so GQA reads K/V once per group
// (decode with 8 heads to a group fills 8 of a warp's 16 rows instead of 1). Each warp owns 16
// rows; WARPS_N warps share those rows and split each KV tile of BLOCK_N keys between them
// (decode: one row tile, 4 warps along the keys), combined through shared memory at the end.
// K/V tiles stream through a STAGES-deep cp.async ring; Q stays in registers for D <= 128 and
// is re-read from shared memory above that. Shared-memory rows are padded to an odd number of
// 16-byte chunks (attention_pitch), which makes every ldmatrix conflict-free for any D.
// With TMA (sm_90a decode, D and DV multiples of 64) a fifth warp, the producer, loads whole K/V
// tiles instead: one tiled TMA load per 64-element panel into the ring, handed over by full and
// empty mbarriers; the tiles are unpadded and 128-byte swizzled, which the ldmatrix addresses
// undo, and the math warps sync among themselves with a named barrier (math_warps).
// gridDim = (row tiles, N * Hkv, splits); with SPLIT each z-slice covers one KV chunk (the tiles
// spread evenly) and writes an f32 partial output and its LSE, then counts its arrival on the
// row tile's counter; the last block to arrive combines the partials (combine.cuh) and leaves the
// counter at zero for the next call on the stream (no memset launch).
//
// Limits: D, DV multiples of 8 up to 256 (TMA: multiples of 64); q/k/v rows contiguous and
// 16-byte aligned (the launcher checks); out contiguous. A row whose scores are all -inf (no
// visible key) writes zeros and LSE -inf; a NaN or +inf score makes its row and LSE NaN, as the
// CPU reference (reference.cpp) and SDPA's math do.
//
// Why this shape (figures in ../NOTES.md, every version): mma.sync with 16 rows a warp feeds each
// ldmatrix'd K/V fragment to one MMA, which caps prefill well below wgmma (prefill_sm90.cuh);
// decode keeps enough bytes in flight with 128-key tiles, 32 keys a warp, a ring as deep as
// shared memory allows and splits in whole waves, and on sm_90a loads whole 64-key tiles by TMA
// from a producer warp.
#pragma once

#include "device/mma.cuh"
#include "device/numeric.cuh"
#include "device/pipeline.cuh"
#include "device/sm90.cuh"
#include "device/vec.cuh"
#include "ops/attention/kernels/combine.cuh"
#include "ops/attention/kernels/params.cuh"

namespace kiln {

template <int MASK>
__device__ __forceinline__ float load_mask(const void* mask, long long i) {
  if constexpr (MASK == kMaskF32) {
    return static_cast<const float*>(mask)[i];
  } else if constexpr (MASK == kMaskF16) {
    return to_float(static_cast<const f16*>(mask)[i]);
  } else {
    return to_float(static_cast<const bf16*>(mask)[i]);
  }
}

// Barrier of the THREADS math threads: the whole block, or a named barrier when a TMA producer
// warp (which leaves after its loads) is not part of it.
template <int THREADS, bool NAMED>
__device__ __forceinline__ void math_sync() {
  if constexpr (NAMED) {
    named_barrier_sync<NamedBarrier::math_warps, THREADS>();
  } else {
    __syncthreads();
  }
}

// math_sync that also returns whether `pred` held in any of the threads.
template <int THREADS, bool NAMED>
__device__ __forceinline__ bool math_sync_or(bool pred) {
  if constexpr (NAMED) {
    return named_barrier_sync_or<NamedBarrier::math_warps, THREADS>(pred);
  } else {
    return __syncthreads_or(pred) != 0;
  }
}

template <typename T, typename TQ, typename TO, int D, int DV, int WARPS_M, int WARPS_N,
          int BLOCK_N, int STAGES, int G, bool CAUSAL, int MASK, int KV_LEN, bool SOFTCAP,
          bool SPLIT, bool TMA>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N + (TMA ? 32 : 0), TMA ? 1 : 0)
    attention_kernel(const __grid_constant__ AttentionParams p) {
  constexpr int kThreads = 32 * WARPS_M * WARPS_N;  // the math warps (TMA adds a producer warp)
  constexpr int kBlockM = 16 * WARPS_M;
  constexpr int kKeys = BLOCK_N / WARPS_N;  // keys of a tile one warp multiplies
  constexpr int kDk = attention_k_dim(D);   // D padded to whole k-steps
  constexpr int kQkPitch = attention_pitch(kDk);
  constexpr int kVPitch = attention_pitch(DV);
  constexpr int kDChunks = D / 8;    // 16-byte chunks of a q/k row in global memory
  constexpr int kKChunks = kDk / 8;  // ... in shared memory, pad included
  constexpr int kVChunks = DV / 8;
  constexpr int kSTiles = kKeys / 8;  // n-tiles of S per warp
  constexpr int kOTiles = DV / 8;     // n-tiles of O per warp
  constexpr bool kQInRegisters = D <= 128;
  // Without softcap or mask, logits stay raw and scale * log2(e) is folded into the exp2 FMA;
  // otherwise they are moved to log2 units first.
  constexpr bool kLog2Units = SOFTCAP || MASK != kMaskNone;
  constexpr float kLog2e = 1.4426950408889634f;
  static_assert(D % 8 == 0 && DV % 8 == 0 && D <= 256 && DV <= 256, "head dims: multiples of 8");
  static_assert(kKeys % 16 == 0, "a warp multiplies whole 16-key steps");
  static_assert(!TMA || (D % 64 == 0 && DV % 64 == 0), "TMA tiles: whole 64-element panels");

  // cp.async: Q | K ring | V ring, rows padded to kQkPitch / kVPitch.
  // TMA: K ring | V ring | Q | full and empty mbarriers, from a 1024-byte boundary; a ring tile is
  // D / 64 (or DV / 64) panels of (BLOCK_N, 64) with 128-byte rows, swizzled as TMA writes them
  // (16-byte chunk c of row r at chunk c ^ (r % 8)).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* const smem =
      TMA ? reinterpret_cast<unsigned char*>((reinterpret_cast<u64>(smem_raw) + 1023) & ~u64(1023))
          : smem_raw;
  T* const s_k = reinterpret_cast<T*>(smem) + (TMA ? 0 : kBlockM * kQkPitch);
  T* const s_v = s_k + STAGES * BLOCK_N * (TMA ? D : kQkPitch);
  T* const s_q = TMA ? s_v + STAGES * BLOCK_N * DV : reinterpret_cast<T*>(smem);
  // TMA: full[s], a tile landed; empty[s], every math warp is done with the slot.
  u64* const full = reinterpret_cast<u64*>(s_q + kBlockM * kQkPitch);
  const TmaPipeline<STAGES> ring{full, full + STAGES};

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warp_m = warp % WARPS_M;
  const int warp_n = warp / WARPS_M;
  const int group = lane / 4;  // fragment row
  const int quad = lane % 4;   // fragment column pair

  // Heavy causal row tiles (the last ones) start first.
  const int tile_m = CAUSAL ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  const i64 n = blockIdx.y / p.Hkv;
  const i64 kv_head = blockIdx.y % p.Hkv;
  const i64 rows = p.Lq * G;  // packed (query, head-in-group) rows of this kv head
  const i64 m0 = i64(tile_m) * kBlockM;

  i64 keys = p.Lk;  // visible prefix of the keys
  if constexpr (KV_LEN == kKvLenI32) {
    keys = static_cast<const int*>(p.kv_len)[n];
  } else if constexpr (KV_LEN == kKvLenI64) {
    keys = static_cast<const long long*>(p.kv_len)[n];
  }
  keys = keys < 0 ? 0 : (keys > p.Lk ? p.Lk : keys);
  const i64 diagonal = keys - p.Lq;  // causal: query i sees keys j <= i + diagonal

  // KV tiles of this block: all tiles up to the causal limit of its last row, split in chunks.
  i64 tiles = (keys + BLOCK_N - 1) / BLOCK_N;
  if constexpr (CAUSAL) {
    const i64 last_query = (m0 + kBlockM - 1) / G < p.Lq - 1 ? (m0 + kBlockM - 1) / G : p.Lq - 1;
    const i64 last_key = last_query + diagonal;
    const i64 causal_tiles = last_key < 0 ? 0 : last_key / BLOCK_N + 1;
    tiles = tiles < causal_tiles ? tiles : causal_tiles;
  }
  // Chunk z of the split: the tiles spread evenly, chunk sizes differ by at most one tile (a
  // chunk may be empty when the visible keys are few).
  const i64 t_begin = blockIdx.z * tiles / p.splits;
  const i64 t_end = (blockIdx.z + 1) * tiles / p.splits;

  if constexpr (TMA) {
    // The producer warp's lane 0 streams this chunk's tiles through the ring: a slot is refilled
    // once each math warp has released it; one transaction count covers K and V. Keys past Lk
    // arrive as zeros (TMA's out-of-bounds fill).
    if (tid == 0) {
      ring.init(kThreads / 32);
      mbarrier_init_fence();
    }
    __syncthreads();
    if (warp == kThreads / 32) {
      if (lane == 0) {
        const int head = int(kv_head), batch = int(n);
        for (i64 t = t_begin; t < t_end; ++t) {
          const PipelineState<STAGES> state{int(t - t_begin)};
          const int slot = state.index(), key0 = int(t * BLOCK_N);
          u64* landed = ring.producer_acquire(state, BLOCK_N * (D + DV) * 2);
#pragma unroll
          for (int pn = 0; pn < D / 64; ++pn) {
            tma_load_4d(s_k + (slot * (D / 64) + pn) * BLOCK_N * 64, &p.map_k, landed, 64 * pn,
                        p.k_l_inner ? key0 : head, p.k_l_inner ? head : key0, batch);
          }
#pragma unroll
          for (int pn = 0; pn < DV / 64; ++pn) {
            tma_load_4d(s_v + (slot * (DV / 64) + pn) * BLOCK_N * 64, &p.map_v, landed, 64 * pn,
                        p.v_l_inner ? key0 : head, p.v_l_inner ? head : key0, batch);
          }
        }
      }
      return;
    }
  }

  // Global offset of packed row r (clamped into range: rows past the end load row 0's data).
  const auto row_coords = [&](i64 r, i64& query, i64& head) {
    const i64 rc = r < rows ? r : 0;
    query = rc / G;
    head = kv_head * G + rc % G;
  };

  // Q tile: (kBlockM, kDk) with zero pad columns and rows.
  {
    const TQ* q = static_cast<const TQ*>(p.q);
    for (int i = tid; i < kBlockM * kKChunks; i += kThreads) {
      const int r = i / kKChunks, c = i % kKChunks;
      i64 query, head;
      row_coords(m0 + r, query, head);
      const bool valid = m0 + r < rows && c < kDChunks;
      const TQ* src = q + n * p.q_stride[0] + head * p.q_stride[1] + query * p.q_stride[2] + c * 8;
      T* dst = s_q + r * kQkPitch + c * 8;
      if constexpr (sizeof(TQ) == sizeof(T)) {
        cp_async_16(dst, valid ? src : q, valid);
      } else {
        float x[8];
        T y[8];
        if (valid) {
          load_vec(x, src);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) x[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) y[e] = from_float<T>(x[e]);
        u32 w[4];
        to_words(y, w);
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }

  // One K/V tile into ring slot `slot`: rows past the visible keys are zero-filled (never read
  // from global memory), so masked keys contribute exactly 0 * 0.
  const T* k_head = static_cast<const T*>(p.k) + n * p.k_stride[0] + kv_head * p.k_stride[1];
  const T* v_head = static_cast<const T*>(p.v) + n * p.v_stride[0] + kv_head * p.v_stride[1];
  const auto load_kv = [&](i64 tile, int slot) {
    const i64 key0 = tile * BLOCK_N;
    T* k_dst = s_k + slot * BLOCK_N * kQkPitch;
    T* v_dst = s_v + slot * BLOCK_N * kVPitch;
    for (int i = tid; i < BLOCK_N * kKChunks; i += kThreads) {
      const int r = i / kKChunks, c = i % kKChunks;
      const bool valid = key0 + r < keys && c < kDChunks;
      const T* src = k_head + (key0 + r) * p.k_stride[2] + c * 8;
      cp_async_16(k_dst + r * kQkPitch + c * 8, valid ? src : k_head, valid);
    }
    for (int i = tid; i < BLOCK_N * kVChunks; i += kThreads) {
      const int r = i / kVChunks, c = i % kVChunks;
      const bool valid = key0 + r < keys;
      const T* src = v_head + (key0 + r) * p.v_stride[2] + c * 8;
      cp_async_16(v_dst + r * kVPitch + c * 8, valid ? src : v_head, valid);
    }
  };

  if constexpr (TMA) {
    // Q lands before the loop; the producer fills the ring.
    cp_async_commit();
    cp_async_wait<0>();
    math_sync<kThreads, TMA>();
  } else {
    // Prologue: Q and the first STAGES - 1 tiles, one commit group per tile (Q rides in the
    // first).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (t_begin + s < t_end) load_kv(t_begin + s, s);
      cp_async_commit();
    }
  }

  // This thread's two rows (fragment rows group and group + 8) of the warp's 16.
  i64 row_query[2];
  i64 row_mask[2];  // mask offset of the row, without the key term
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const i64 r = m0 + warp_m * 16 + group + 8 * h;
    i64 head;
    row_coords(r, row_query[h], head);
    row_mask[h] = n * p.mask_stride[0] + head * p.mask_stride[1] + row_query[h] * p.mask_stride[2];
  }
  const i64 first_query = m0 / G;

  float o[kOTiles][4];  // (16 rows, DV) accumulator of the warp, fragment layout
#pragma unroll
  for (int j = 0; j < kOTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()};  // in logit units (raw, or log2 with kLog2Units)
  float row_sum[2] = {0.f, 0.f};              // this thread's part of the row sums
  const float unit = kLog2Units ? 1.f : p.scale_log2;

  u32 q_frag[kQInRegisters ? kDk / 16 : 1][4];
  const T* q_warp = s_q + (warp_m * 16 + lane % 16) * kQkPitch + (lane / 16) * 8;

  for (i64 t = t_begin; t < t_end; ++t) {
    const PipelineState<STAGES, i64> state{t - t_begin};  // the ring's slot (cp.async or TMA)
    const int slot = state.index();
    const i64 key0 = t * BLOCK_N + warp_n * kKeys;  // first key of this warp's part of the tile
    if constexpr (TMA) {
      ring.consumer_wait(state);
      if (t * BLOCK_N + BLOCK_N > keys) {
        // The last tile: V rows of keys in [keys, Lk) hold whatever the cache holds (NaN, say)
        // and would meet P = 0; zero this warp's rows (K needs nothing: those scores are set to
        // -inf). No later TMA write targets this slot, so no proxy fence is needed.
        T* v_warp = s_v + slot * BLOCK_N * DV + warp_n * kKeys * 64;
        for (int r = lane; r < kKeys; r += 32) {
          if (key0 + r < keys) continue;
#pragma unroll
          for (int c = 0; c < kVChunks; ++c) {  // the whole row: the swizzle does not matter
            *reinterpret_cast<uint4*>(v_warp + (c / 8) * BLOCK_N * 64 + r * 64 + c % 8 * 8) =
                make_uint4(0, 0, 0, 0);
          }
        }
        __syncwarp();
      }
    } else {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      const i64 next = t + STAGES - 1;
      if (next < t_end) load_kv(next, int((next - t_begin) % STAGES));
      cp_async_commit();
    }
    if constexpr (kQInRegisters) {
      if (t == t_begin) {
#pragma unroll
        for (int ks = 0; ks < kDk / 16; ++ks) ldmatrix_x4(q_frag[ks], q_warp + ks * 16);
      }
    }
    // This warp's kKeys rows of the slot's K and V tiles.
    const T* k_tile =
        s_k + slot * BLOCK_N * (TMA ? D : kQkPitch) + warp_n * kKeys * (TMA ? 64 : kQkPitch);
    const T* v_tile =
        s_v + slot * BLOCK_N * (TMA ? DV : kVPitch) + warp_n * kKeys * (TMA ? 64 : kVPitch);

    // S = Q K^T: (16, kKeys) per warp.
    float s[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    // ldmatrix.x4 of K: matrices (keys 0-7 | 8-15) x (k 0-7 | 8-15) give two n-tiles' B.
    // Lane l reads row 8 (l / 16) + l % 8 (+ 8 j), chunk 2 ks + (l / 8) % 2: with TMA's swizzle
    // in panel ks / 4 at chunk (2 (ks % 4)) ^ ((l / 8) % 2) ^ (l % 8).
    const int k_row = (lane / 16) * 8 + lane % 8;
    const auto k_address = [&](int ks, int j) {
      if constexpr (TMA) {
        return k_tile + (ks / 4) * BLOCK_N * 64 + (k_row + j * 8) * 64 +
               ((2 * (ks % 4)) ^ ((lane / 8) % 2) ^ (lane % 8)) * 8;
      } else {
        return k_tile + (k_row + j * 8) * kQkPitch + ks * 16 + ((lane / 8) % 2) * 8;
      }
    };
#pragma unroll
    for (int ks = 0; ks < kDk / 16; ++ks) {
      u32 a[4];
      if constexpr (kQInRegisters) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = q_frag[ks][e];
      } else {
        ldmatrix_x4(a, q_warp + ks * 16);
      }
#pragma unroll
      for (int j = 0; j < kSTiles; j += 2) {
        u32 b[4];
        ldmatrix_x4(b, k_address(ks, j));
        const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_16x8x16<T>(s[j], a, b0);
        mma_16x8x16<T>(s[j + 1], a, b1);
      }
    }

    // Scores to softmax units; hide keys past the end and above the causal diagonal.
    const bool edge = t * BLOCK_N + BLOCK_N > keys ||
                      (CAUSAL && t * BLOCK_N + BLOCK_N - 1 > first_query + diagonal);
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const i64 key = key0 + j * 8 + 2 * quad + e % 2;
        float x = s[j][e];
        if constexpr (SOFTCAP) {
          x = tanhf(x * p.scale_over_softcap) * p.softcap_log2;
        } else if constexpr (kLog2Units) {
          x *= p.scale_log2;
        }
        if constexpr (MASK != kMaskNone) {
          if (key < keys)
            x += kLog2e * load_mask<MASK>(p.mask, row_mask[h] + key * p.mask_stride[3]);
        }
        if (edge && (key >= keys || (CAUSAL && key > row_query[h] + diagonal))) x = neg_inf();
        s[j][e] = x;
      }
    }

    // Online softmax: new row maxima over the quad, rescale, exponentiate.
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with no visible key yet keeps max -inf; subtracting 0 keeps every exp2 at 0.
      const float shift = mx == neg_inf() ? 0.f : mx * unit;
      alpha[h] = exp2_approx(row_max[h] * unit - shift);
      row_max[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        s[j][2 * h] = exp2_approx(fmaf(s[j][2 * h], unit, -shift));
        s[j][2 * h + 1] = exp2_approx(fmaf(s[j][2 * h + 1], unit, -shift));
        sum += s[j][2 * h] + s[j][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * alpha[h] + sum;
    }
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) {
      o[j][0] *= alpha[0], o[j][1] *= alpha[0];
      o[j][2] *= alpha[1], o[j][3] *= alpha[1];
    }

    // O += P V: P's accumulator fragments of keys 16kk..16kk+15 are the A fragment of step kk.
    // ldmatrix.x4.trans of V: matrices (keys 0-7 | 8-15) x (dv 0-7 | 8-15) give two n-tiles' B.
    // Lane l reads row 16 kk + 8 ((l / 8) % 2) + l % 8, chunk j + l / 16 (j even): with TMA's
    // swizzle in panel j / 8 at chunk (j % 8) ^ (l / 16) ^ (l % 8).
    const int v_row = ((lane / 8) % 2) * 8 + lane % 8;
    const auto v_address = [&](int kk, int j) {
      if constexpr (TMA) {
        return v_tile + (j / 8) * BLOCK_N * 64 + (kk * 16 + v_row) * 64 +
               ((j % 8) ^ (lane / 16) ^ (lane % 8)) * 8;
      } else {
        return v_tile + (kk * 16 + v_row) * kVPitch + j * 8 + (lane / 16) * 8;
      }
    };
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const u32 a[4] = {pack_float2<T>(s[2 * kk][0], s[2 * kk][1]),
                        pack_float2<T>(s[2 * kk][2], s[2 * kk][3]),
                        pack_float2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                        pack_float2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int j = 0; j + 1 < kOTiles; j += 2) {
        u32 b[4];
        ldmatrix_x4_trans(b, v_address(kk, j));
        const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_16x8x16<T>(o[j], a, b0);
        mma_16x8x16<T>(o[j + 1], a, b1);
      }
      if constexpr (kOTiles % 2 == 1) {
        u32 b[2];
        ldmatrix_x2_trans(b, v_tile + (kk * 16 + lane % 16) * kVPitch + (kOTiles - 1) * 8);
        mma_16x8x16<T>(o[kOTiles - 1], a, b);
      }
    }
    if constexpr (TMA) {
      __syncwarp();  // the warp's reads of the slot are done
      if (lane == 0) ring.consumer_release(state);
    }
  }
  cp_async_wait<0>();
  math_sync<kThreads, TMA>();

  // Epilogue through shared memory (the pipeline's space): each warp's O, scaled to the block's
  // common max and divided by the row sum, then summed over WARPS_N and stored in 16 bytes.
  constexpr int kOPitch = DV + 8;
  float* s_o = reinterpret_cast<float*>(smem);        // (WARPS_N, kBlockM, kOPitch)
  float* s_stat = s_o + WARPS_N * kBlockM * kOPitch;  // (WARPS_N, kBlockM, [max, sum])
  float* s_lse = s_stat + WARPS_N * kBlockM * 2;      // (kBlockM) log2 units
  // Row statistics in log2 units: this warp's max, then the block's max and sum over WARPS_N.
  float factor[2];  // multiplies this warp's O: exp2(own max - block max) / block sum
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    row_max[h] = row_max[h] == neg_inf() ? neg_inf() : row_max[h] * unit;
    if (WARPS_N > 1 && quad == 0) {
      const int r = warp_m * 16 + group + 8 * h;
      s_stat[(warp_n * kBlockM + r) * 2] = row_max[h];
      s_stat[(warp_n * kBlockM + r) * 2 + 1] = row_sum[h];
    }
  }
  if constexpr (WARPS_N > 1) math_sync<kThreads, TMA>();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp_m * 16 + group + 8 * h;
    // Sums relative to the max, or to 0 when every score so far is -inf (as the loop's shift):
    // a row whose scores are all -inf sums to exactly 0 (zeros, LSE -inf); a NaN score, or a
    // +inf one (inf - inf), has made its warp's sum NaN, which reaches the total either way.
    float total_max = row_max[h];
    if constexpr (WARPS_N > 1) {
      total_max = neg_inf();
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) total_max = fmaxf(total_max, s_stat[(w * kBlockM + r) * 2]);
    }
    const float shift = total_max == neg_inf() ? 0.f : total_max;
    float total_sum = row_sum[h];
    if constexpr (WARPS_N > 1) {
      total_sum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) {
        total_sum +=
            s_stat[(w * kBlockM + r) * 2 + 1] * exp2_approx(s_stat[(w * kBlockM + r) * 2] - shift);
      }
    }
    factor[h] = total_sum == 0.f ? 0.f : exp2_approx(row_max[h] - shift) / total_sum;
    if (warp_n == 0 && quad == 0) {
      s_lse[r] = total_sum == 0.f ? neg_inf() : shift + __log2f(total_sum);
    }
  }
  float* s_o_warp = s_o + (warp_n * kBlockM + warp_m * 16) * kOPitch;
#pragma unroll
  for (int j = 0; j < kOTiles; ++j) {
    const int col = j * 8 + 2 * quad;
    *reinterpret_cast<float2*>(s_o_warp + group * kOPitch + col) =
        make_float2(o[j][0] * factor[0], o[j][1] * factor[0]);
    *reinterpret_cast<float2*>(s_o_warp + (group + 8) * kOPitch + col) =
        make_float2(o[j][2] * factor[1], o[j][3] * factor[1]);
  }
  math_sync<kThreads, TMA>();

  const i64 out_rows = p.N * p.Hq * p.Lq;
  TO* const out_n = static_cast<TO*>(p.out) + n * p.out_stride[0];  // out may be strided
  for (int i = tid; i < kBlockM * kVChunks; i += kThreads) {
    const int r = i / kVChunks, c = i % kVChunks;
    if (m0 + r >= rows) continue;
    i64 query, head;
    row_coords(m0 + r, query, head);
    const i64 row = (n * p.Hq + head) * p.Lq + query;  // row of [N, Hq, Lq]: o_part's and lse's
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) {
      float part[8];
      const float* src = s_o + (w * kBlockM + r) * kOPitch + c * 8;
      *reinterpret_cast<float4*>(part) = *reinterpret_cast<const float4*>(src);
      *reinterpret_cast<float4*>(part + 4) = *reinterpret_cast<const float4*>(src + 4);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += part[e];
    }
    if constexpr (SPLIT) {
      store_vec(p.o_part + (blockIdx.z * out_rows + row) * DV + c * 8, acc);
      if (c == 0) p.lse_part[blockIdx.z * out_rows + row] = s_lse[r];
    } else {
      TO y[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) y[e] = from_float<TO>(acc[e]);
      store_vec(out_n + head * p.out_stride[1] + query * p.out_stride[2] + c * 8, y);
      if (c == 0 && p.lse != nullptr) p.lse[row] = s_lse[r] / kLog2e;
    }
  }
  if constexpr (SPLIT) {
    // The last of the row tile's chunks to arrive combines the partials: every thread's stores
    // are made visible device-wide before its block's arrival is counted.
    __threadfence();
    const unsigned tile_id = blockIdx.y * gridDim.x + blockIdx.x;
    // atomicInc wraps: the last arrival finds splits - 1 and leaves the counter at zero.
    const bool last = math_sync_or<kThreads, TMA>(
        tid == 0 &&
        atomicInc(p.arrivals + tile_id, unsigned(p.splits - 1)) == unsigned(p.splits - 1));
    if (!last) return;
    __threadfence();
    for (int r = warp; r < kBlockM && m0 + r < rows; r += kThreads / 32) {
      i64 query, head;
      row_coords(m0 + r, query, head);
      attention_combine_row<TO, DV>(p, (n * p.Hq + head) * p.Lq + query, lane);
    }
  }
}

}  // namespace kiln
