// Attention prefill for Hopper (sm_90a), built the way the FlashAttention-3 paper describes.
//
// A work tile is 128 query rows of one (batch, head) against all their visible keys. The grid is
// persistent (PersistentTiles: min(work tiles, SMs) blocks, each walking the tiles b, b + grid,
// ...), so a block's producer loads the next tile's Q, K and V while its consumers finish this one:
//   warpgroup 0 (the producer, 24 registers): one thread issues TMA loads of each tile's Q into a
//     one-slot ring (freed once both consumers are done with the tile) and of its K and V tiles
//     (128 keys each) into a ring of STAGES shared-memory slots that runs on across work tiles;
//     full/empty mbarriers hand the slots over, K and V separately (a K slot is free as soon as
//     QK^T has read it).
//   warpgroups 1 and 2 (consumers, 240 registers): 64 query rows each. S = Q K^T by wgmma with
//     both operands in shared memory; O += P V by wgmma with P in registers (the S accumulator
//     layout is the A-operand layout, so P never touches shared memory).
//   Inside a consumer, the QK^T of tile j is issued together with the PV of tile j - 1, and tile
//     j's softmax runs while that PV is in flight. Between the consumers, two named barriers take
//     turns (ping-pong), so one warpgroup's softmax runs under the other's GEMMs.
// Online softmax in registers in log2 units (exp2 with the scale folded in); rows with no
// visible key give zeros and LSE -inf. Out-of-range rows and keys are zero-filled by TMA and
// masked; the epilogue writes O / l in TO, and the LSE when asked.
//
// Layout: q [N, Hq, Lq, D], k [N, Hkv, Lk, D], v [N, Hkv, Lk, D] read through TMA tensor maps
// (any strides that are 16-byte multiples: SDPA's layout, the slices of a packed QKV, a KV cache
// with spare capacity); out [N, Hq, Lq, D] contiguous. Limits: D = Dv in
// {64, 128}, q of k's dtype, no additive mask (the sm_80 kernel takes those).
//
// Each step above (ping-pong and intra-warpgroup overlap, the third ring slot, K slots released
// right after QK^T) was measured against the one before: NOTES.md, "sm_90a prefill".
#pragma once

#include "device/mma.cuh"
#include "device/numeric.cuh"
#include "device/pipeline.cuh"
#include "device/sm90.cuh"
#include "device/tile_scheduler.cuh"
#include "ops/attention/kernels/prefill_sm90_params.cuh"

namespace kiln {

namespace prefill_sm90 {

constexpr int kBlockM = 128;  // query rows per block (64 per consumer warpgroup)
constexpr int kBlockN = 128;  // keys per tile
constexpr int kThreads = 384;
using Registers = WarpgroupRegisters<24, 240>;  // producer, consumers

// The visible-key rule of one consumer thread's two rows.
struct Visibility {
  int lk;        // keys of this batch
  int diagonal;  // Lk - Lq: key j is visible to row i when j <= i + diagonal (causal)
};

// Online softmax of one S tile in place: sc holds this thread's 2 rows x 64 columns of tile j
// (raw q.k) and becomes P (f32). Updates the running max and sum and returns in alpha the factor
// the output accumulator must be scaled by.
template <bool CAUSAL, bool SOFTCAP>
__device__ __forceinline__ void softmax_tile(float (&sc)[kBlockN / 2], float (&m_run)[2],
                                             float (&l_run)[2], float (&alpha)[2],
                                             const AttentionSm90Params& p, const Visibility& vis,
                                             int j, int row0, int lane, bool need_mask) {
  float mult = p.scale_log2;
  if constexpr (SOFTCAP) {
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      sc[i] = p.softcap_log2 * tanhf(sc[i] * p.scale_over_softcap);
    }
    mult = 1.f;
  }
  if (need_mask) {
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      const int col = j * kBlockN + 8 * (i / 4) + 2 * (lane % 4) + (i % 2);  // key index
      const int row = row0 + 8 * ((i % 4) / 2);
      bool visible = col < vis.lk;
      if constexpr (CAUSAL) visible = visible && col <= row + vis.diagonal;
      if (!visible) sc[i] = neg_inf();
    }
  }
  float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) mx[(i % 4) / 2] = fmaxf(mx[(i % 4) / 2], sc[i]);
  float m_use[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float m_new = fmaxf(m_run[r], mx[r] * mult);
    m_use[r] = m_new == neg_inf() ? 0.f : m_new;  // a row with nothing visible yet stays at 0
    alpha[r] = exp2_approx(m_run[r] - m_use[r]);
    m_run[r] = m_new;
    l_run[r] *= alpha[r];
  }
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) {
    sc[i] = exp2_approx(fmaf(sc[i], mult, -m_use[(i % 4) / 2]));
    l_run[(i % 4) / 2] += sc[i];
  }
}

// P (f32 accumulator layout) to the A fragments of P V: columns 16 k .. 16 k + 15 of the tile are
// fragment k.
template <typename T>
__device__ __forceinline__ void to_fragments(const float (&sc)[kBlockN / 2],
                                             u32 (&pa)[kBlockN / 16][4]) {
#pragma unroll
  for (int i = 0; i < kBlockN / 2; i += 2)
    pa[i / 8][(i % 8) / 2] = pack_float2<T>(sc[i], sc[i + 1]);
}

}  // namespace prefill_sm90

// T: bf16 or f16 (q, k, v); TO: out's type; D: 64 or 128; STAGES: K/V ring depth; KV_LEN: 0, 1
// (i32) or 2 (i64).
template <typename T, typename TO, int D, int STAGES, bool CAUSAL, int KV_LEN, bool SOFTCAP>
__global__ void __launch_bounds__(prefill_sm90::kThreads, 1)
    attention_prefill_sm90(const __grid_constant__ AttentionSm90Params p) {
  using namespace prefill_sm90;
  using Slot = PipelineState<STAGES>;  // K/V tiles, counted across the block's work tiles
  static_assert(D == 64 || D == 128, "head dims of whole 64-element panels, up to 128");
  constexpr int kPanels = D / 64;  // 128-byte-wide column panels of a tile
  constexpr int kQBytes = kBlockM * D * 2;
  constexpr int kKVBytes = kBlockN * D * 2;

  extern __shared__ char smem_raw[];
  // (kBlockM, D) Q | STAGES x (kBlockN, D) K | STAGES x (kBlockN, D) V | barriers; each tile is a
  // run of kPanels (rows, 64) panels of 128-byte rows, 1024-byte aligned for the swizzle.
  char* smem = reinterpret_cast<char*>((reinterpret_cast<u64>(smem_raw) + 1023) & ~u64(1023));
  char* s_q = smem;
  char* s_k = s_q + kQBytes;
  char* s_v = s_k + STAGES * kKVBytes;
  // Barriers: full Q | empty Q | full K | full V | empty K | empty V (STAGES each). Q is a ring of
  // one slot: loaded once a work tile, released when both consumers are done with it.
  u64* bars = reinterpret_cast<u64*>(s_v + STAGES * kKVBytes);
  const TmaPipeline<1> q_ring{bars, bars + 1};
  u64* full_k = bars + 2;
  const TmaPipeline<STAGES> k_ring{full_k, full_k + 2 * STAGES};
  const TmaPipeline<STAGES> v_ring{full_k + STAGES, full_k + 3 * STAGES};

  // Work tile t (PersistentTiles over p.tiles): query rows m_block * kBlockM .. + kBlockM - 1 of
  // one (batch, head), row blocks fastest so that the blocks at work share a head's K and V in
  // L2; causal: the last row blocks, which see the most keys, first.
  const int lq = static_cast<int>(p.Lq);
  const int m_blocks = (lq + kBlockM - 1) / kBlockM;
  const int heads = static_cast<int>(p.Hq);
  struct Work {
    int m_block, head, batch;
    Visibility vis;
    int n_tiles;  // K/V tiles it reads
  };
  const auto work_at = [&](int tile) {
    Work w;
    const int m = tile % m_blocks;
    w.m_block = CAUSAL ? m_blocks - 1 - m : m;
    w.head = tile / m_blocks % heads;
    w.batch = tile / m_blocks / heads;
    w.vis = Visibility{static_cast<int>(p.Lk), 0};
    if constexpr (KV_LEN == 1) w.vis.lk = static_cast<const int*>(p.kv_len)[w.batch];
    if constexpr (KV_LEN == 2) {
      w.vis.lk = static_cast<int>(static_cast<const i64*>(p.kv_len)[w.batch]);
    }
    w.vis.lk = max(0, min(w.vis.lk, static_cast<int>(p.Lk)));
    w.vis.diagonal = w.vis.lk - lq;
    w.n_tiles = (w.vis.lk + kBlockN - 1) / kBlockN;
    if constexpr (CAUSAL) {
      const int last_key = min(lq, (w.m_block + 1) * kBlockM) - 1 + w.vis.diagonal;
      w.n_tiles = last_key < 0 ? 0 : min(w.n_tiles, last_key / kBlockN + 1);
    }
    return w;
  };

  if (threadIdx.x == 0) {
    q_ring.init(2 * 128);  // every consumer thread releases Q and each K and V slot
    k_ring.init(2 * 128);
    v_ring.init(2 * 128);
    mbarrier_init_fence();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    Registers::producer();
    if (threadIdx.x == 0) {
      PipelineState<1> q_slot;  // Q tiles loaded
      Slot kv;                  // K/V tiles loaded
      for (const int tile : PersistentTiles{p.tiles}) {
        const Work w = work_at(tile);
        const int kv_head = w.head / p.group, row = w.m_block * kBlockM;
        u64* landed = q_ring.producer_acquire(q_slot, kQBytes);
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_4d(s_q + pn * kBlockM * 128, &p.map_q, landed, 64 * pn,
                      p.q_l_inner ? row : w.head, p.q_l_inner ? w.head : row, w.batch);
        }
        ++q_slot;
        for (int j = 0; j < w.n_tiles; ++j, ++kv) {
          const int s = kv.index();
          landed = k_ring.producer_acquire(kv, kKVBytes);
          for (int pn = 0; pn < kPanels; ++pn) {
            tma_load_4d(s_k + s * kKVBytes + pn * kBlockN * 128, &p.map_k, landed, 64 * pn,
                        p.k_l_inner ? j * kBlockN : kv_head, p.k_l_inner ? kv_head : j * kBlockN,
                        w.batch);
          }
          landed = v_ring.producer_acquire(kv, kKVBytes);
          for (int pn = 0; pn < kPanels; ++pn) {
            tma_load_4d(s_v + s * kKVBytes + pn * kBlockN * 128, &p.map_v, landed, 64 * pn,
                        p.v_l_inner ? j * kBlockN : kv_head, p.v_l_inner ? kv_head : j * kBlockN,
                        w.batch);
          }
        }
      }
    }
    return;
  }

  Registers::consumer();
  const int c = warpgroup - 1;  // consumer 0 or 1: rows 64 c .. 64 c + 63 of a work tile
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
  // Ping-pong: consumer c issues its GEMMs once its turn barrier completes, then lets the other go.
  // The turns run on across work tiles: consumer 1's last arrive of one tile opens consumer 0's
  // first turn of the next, so each barrier sees its arrivals in pairs however many tiles a block
  // takes.
  constexpr NamedBarrier kTurn0 = NamedBarrier::consumer0_turn,
                         kTurn1 = NamedBarrier::consumer1_turn;
  const auto my_turn = [&] {
    if (c == 0) {
      named_barrier_sync<kTurn0, 256>();
    } else {
      named_barrier_sync<kTurn1, 256>();
    }
  };
  const auto your_turn = [&] {
    if (c == 0) {
      named_barrier_arrive<kTurn1, 256>();
    } else {
      named_barrier_arrive<kTurn0, 256>();
    }
  };
  if (c == 1) named_barrier_arrive<kTurn0, 256>();  // consumer 0 goes first

  const u32 q_base = smem_addr(s_q) + 64 * c * 128;
  PipelineState<1> q_slot;  // Q tiles taken
  Slot kv;                  // K/V tiles taken before this work tile
  for (const int tile : PersistentTiles{p.tiles}) {
    const Work w = work_at(tile);
    const Visibility& vis = w.vis;
    const int n_tiles = w.n_tiles;
    const int row0 = w.m_block * kBlockM + 64 * c + 16 * warp + lane / 4;  // and row0 + 8

    float o[D / 2];  // (64 rows, D) accumulator of this warpgroup
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f}, alpha[2];
    q_ring.consumer_wait(q_slot);
    const int first_row_last_key = w.m_block * kBlockM + vis.diagonal;
    const auto need_mask = [&](int j) {
      return (j + 1) * kBlockN > vis.lk || (CAUSAL && (j + 1) * kBlockN - 1 > first_row_last_key);
    };
    // K/V tile j of this work tile is the ring's slot state kv + j.
    const auto slot = [&](int j) { return Slot{kv.count + j}; };
    const auto issue_s = [&](float(&sc)[kBlockN / 2], int j) {  // S (64, kBlockN) = Q K_j^T
      const int s = slot(j).index();
      k_ring.consumer_wait(slot(j));
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int panel = kk / 4, offset = (kk % 4) * 32;
        const u64 a = swizzle128_desc(q_base + panel * kBlockM * 128 + offset, 16, 1024);
        const u64 b = swizzle128_desc(
            smem_addr(s_k + s * kKVBytes) + panel * kBlockN * 128 + offset, 16, 1024);
        Wgmma<T, kBlockN, 0, 0>::ss(sc, a, b, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
    };
    const auto issue_pv = [&](u32(&pa)[kBlockN / 16][4], int j) {  // O (64, D) += P V_j
      const int s = slot(j).index();
      v_ring.consumer_wait(slot(j));
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks) {
        const u64 b =
            swizzle128_desc(smem_addr(s_v + s * kKVBytes) + ks * 16 * 128, kBlockN * 128, 1024);
        Wgmma<T, D, 0, 1>::rs(o, pa[ks], b, 1);
      }
      wgmma_commit();
    };
    if (n_tiles > 0) {
      u32 pa[kBlockN / 16][4];  // P of the previous tile, as A fragments
      {
        float sc[kBlockN / 2];
        my_turn();
        wgmma_fence();
        issue_s(sc, 0);
        your_turn();
        wgmma_wait<0>();
        register_fence(sc);
        k_ring.consumer_release(slot(0));
        softmax_tile<CAUSAL, SOFTCAP>(sc, m_run, l_run, alpha, p, vis, 0, row0, lane, need_mask(0));
        to_fragments<T>(sc, pa);
      }
      // S_j and P_{j-1} V_{j-1} issued together; softmax of S_j under the PV; then O rescaled and
      // P_j converted once the PV has read P_{j-1}.
      for (int j = 1; j < n_tiles; ++j) {
        float sc[kBlockN / 2];
        register_fence(o);
        register_fence(pa);
        my_turn();
        wgmma_fence();
        issue_s(sc, j);
        issue_pv(pa, j - 1);
        your_turn();
        wgmma_wait<1>();
        register_fence(sc);
        k_ring.consumer_release(slot(j));
        softmax_tile<CAUSAL, SOFTCAP>(sc, m_run, l_run, alpha, p, vis, j, row0, lane, need_mask(j));
        wgmma_wait<0>();
        register_fence(o);
        register_fence(pa);
        v_ring.consumer_release(slot(j - 1));
        to_fragments<T>(sc, pa);
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i % 4) / 2];
      }
      register_fence(o);
      register_fence(pa);
      my_turn();
      wgmma_fence();
      issue_pv(pa, n_tiles - 1);
      your_turn();
      wgmma_wait<0>();
      register_fence(o);
      v_ring.consumer_release(slot(n_tiles - 1));
    }
    // Every wgmma of this tile has completed: Q may be overwritten by the next tile's, which the
    // producer loads under this epilogue.
    q_ring.consumer_release(q_slot);
    ++q_slot;
    kv.count += n_tiles;

    float inv_l[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
      inv_l[r] = l_run[r] == 0.f ? 0.f : 1.f / l_run[r];  // NaN (a NaN or +inf score) stays NaN
    }
    const i64 head_row = (static_cast<i64>(w.batch) * p.Hq + w.head) * p.Lq;  // row 0 of it
    if (p.lse != nullptr && lane % 4 == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        if (row < lq) {
          p.lse[head_row + row] =
              l_run[r] == 0.f ? neg_inf() : (m_run[r] + __log2f(l_run[r])) * 0.6931471805599453f;
        }
      }
    }
    TO* out = static_cast<TO*>(p.out) + static_cast<i64>(w.batch) * p.out_stride[0] +
              static_cast<i64>(w.head) * p.out_stride[1];
#pragma unroll
    for (int i = 0; i < D / 2; i += 2) {
      const int r = (i % 4) / 2;
      const int row = row0 + 8 * r;
      const int col = 8 * (i / 4) + 2 * (lane % 4);
      if (row < lq) {
        TO* dst = out + static_cast<i64>(row) * p.out_stride[2] + col;
        if constexpr (sizeof(TO) == 4) {
          *reinterpret_cast<float2*>(dst) = float2{o[i] * inv_l[r], o[i + 1] * inv_l[r]};
        } else {
          *reinterpret_cast<u32*>(dst) = pack_float2<TO>(o[i] * inv_l[r], o[i + 1] * inv_l[r]);
        }
      }
    }
  }
  if (c == 0) named_barrier_sync<kTurn0, 256>();  // consumer 1's last arrive
}

}  // namespace kiln
