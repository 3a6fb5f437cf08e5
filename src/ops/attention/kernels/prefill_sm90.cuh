// Attention prefill for Hopper (sm_90a), built the way the FlashAttention-3 paper describes.
//
// One block computes 128 query rows of one (batch, head) against all visible keys:
//   warpgroup 0 (the producer, 24 registers): one thread issues TMA loads of the Q tile once and
//     of K and V tiles (128 keys each) into a ring of STAGES shared-memory slots; full/empty
//     mbarriers hand the slots over, K and V separately (a K slot is free as soon as QK^T has
//     read it).
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
// Measured on an H200 (standalone harness, bf16, TFLOP/s; NOTES.md has every version):
//   B1 H24 D128 L = 4608: no overlap 442; ping-pong + intra-warpgroup overlap, 2 stages 458,
//   3 stages 590; K and V slots released separately (K right after QK^T) 622; L = 13056: 670;
//   causal B1 H32 L = 8192: 609; B4 H16 D64 L = 4096: 436.
#pragma once

#include "device/mma.cuh"
#include "device/numeric.cuh"
#include "device/sm90.cuh"
#include "ops/attention/kernels/prefill_sm90_params.cuh"

namespace kiln {

namespace prefill_sm90 {

constexpr int kBlockM = 128;  // query rows per block (64 per consumer warpgroup)
constexpr int kBlockN = 128;  // keys per tile
constexpr int kThreads = 384;

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

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
  u64* bar_q = reinterpret_cast<u64*>(s_v + STAGES * kKVBytes);
  u64* full_k = bar_q + 1;
  u64* full_v = full_k + STAGES;
  u64* empty_k = full_v + STAGES;
  u64* empty_v = empty_k + STAGES;

  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.group;
  const int lq = static_cast<int>(p.Lq);
  Visibility vis{static_cast<int>(p.Lk), 0};
  if constexpr (KV_LEN == 1) vis.lk = static_cast<const int*>(p.kv_len)[batch];
  if constexpr (KV_LEN == 2) vis.lk = static_cast<int>(static_cast<const i64*>(p.kv_len)[batch]);
  vis.lk = max(0, min(vis.lk, static_cast<int>(p.Lk)));
  vis.diagonal = vis.lk - lq;
  int n_tiles = (vis.lk + kBlockN - 1) / kBlockN;
  if constexpr (CAUSAL) {
    const int last_key = min(lq, (m_block + 1) * kBlockM) - 1 + vis.diagonal;
    n_tiles = last_key < 0 ? 0 : min(n_tiles, last_key / kBlockN + 1);
  }

  if (threadIdx.x == 0) {
    mbarrier_init(bar_q, 1);
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(full_k + s, 1);
      mbarrier_init(full_v + s, 1);
      mbarrier_init(empty_k + s, 2 * 128);  // every consumer thread releases the slot
      mbarrier_init(empty_v + s, 2 * 128);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(bar_q, kQBytes);
      for (int pn = 0; pn < kPanels; ++pn) {
        const int row = m_block * kBlockM;
        tma_load_4d(s_q + pn * kBlockM * 128, &p.map_q, bar_q, 64 * pn, p.q_l_inner ? row : head,
                    p.q_l_inner ? head : row, batch);
      }
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % STAGES;
        const u32 parity = ((j / STAGES) & 1) ^ 1;  // a fresh barrier's previous phase is complete
        mbarrier_wait(empty_k + s, parity);
        mbarrier_arrive_expect_tx(full_k + s, kKVBytes);
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_4d(s_k + s * kKVBytes + pn * kBlockN * 128, &p.map_k, full_k + s, 64 * pn,
                      p.k_l_inner ? j * kBlockN : kv_head, p.k_l_inner ? kv_head : j * kBlockN,
                      batch);
        }
        mbarrier_wait(empty_v + s, parity);
        mbarrier_arrive_expect_tx(full_v + s, kKVBytes);
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_4d(s_v + s * kKVBytes + pn * kBlockN * 128, &p.map_v, full_v + s, 64 * pn,
                      p.v_l_inner ? j * kBlockN : kv_head, p.v_l_inner ? kv_head : j * kBlockN,
                      batch);
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  const int c = warpgroup - 1;  // consumer 0 or 1: rows 64 c .. 64 c + 63 of the block
  const int t = threadIdx.x % 128, warp = t / 32, lane = t % 32;
  const int row0 = m_block * kBlockM + 64 * c + 16 * warp + lane / 4;  // and row0 + 8
  // Ping-pong: consumer c issues its GEMMs after named barrier c + 1, then lets the other go.
  const auto my_turn = [&] {
    if (c == 0) {
      asm volatile("bar.sync 1, 256;" ::: "memory");
    } else {
      asm volatile("bar.sync 2, 256;" ::: "memory");
    }
  };
  const auto your_turn = [&] {
    if (c == 0) {
      asm volatile("bar.arrive 2, 256;" ::: "memory");
    } else {
      asm volatile("bar.arrive 1, 256;" ::: "memory");
    }
  };
  if (c == 1) asm volatile("bar.arrive 1, 256;" ::: "memory");  // consumer 0 goes first

  float o[D / 2];  // (64 rows, D) accumulator of this warpgroup
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f}, alpha[2];
  mbarrier_wait(bar_q, 0);
  const u32 q_base = smem_addr(s_q) + 64 * c * 128;
  const int first_row_last_key = m_block * kBlockM + vis.diagonal;
  const auto need_mask = [&](int j) {
    return (j + 1) * kBlockN > vis.lk || (CAUSAL && (j + 1) * kBlockN - 1 > first_row_last_key);
  };
  const auto issue_s = [&](float(&sc)[kBlockN / 2], int j) {  // S (64, kBlockN) = Q K_j^T
    const int s = j % STAGES;
    mbarrier_wait(full_k + s, (j / STAGES) & 1);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int panel = kk / 4, offset = (kk % 4) * 32;
      const u64 a = swizzle128_desc(q_base + panel * kBlockM * 128 + offset, 16, 1024);
      const u64 b =
          swizzle128_desc(smem_addr(s_k + s * kKVBytes) + panel * kBlockN * 128 + offset, 16, 1024);
      Wgmma<T, kBlockN, 0, 0>::ss(sc, a, b, kk > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  const auto issue_pv = [&](u32(&pa)[kBlockN / 16][4], int j) {  // O (64, D) += P V_j
    const int s = j % STAGES;
    mbarrier_wait(full_v + s, (j / STAGES) & 1);
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
      mbarrier_arrive(empty_k);
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
      mbarrier_arrive(empty_k + j % STAGES);
      softmax_tile<CAUSAL, SOFTCAP>(sc, m_run, l_run, alpha, p, vis, j, row0, lane, need_mask(j));
      wgmma_wait<0>();
      register_fence(o);
      register_fence(pa);
      mbarrier_arrive(empty_v + (j - 1) % STAGES);
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
    mbarrier_arrive(empty_v + (n_tiles - 1) % STAGES);
  }
  if (c == 0) asm volatile("bar.sync 1, 256;" ::: "memory");  // consumer 1's last arrive

  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    inv_l[r] = l_run[r] == 0.f ? 0.f : 1.f / l_run[r];  // NaN (a NaN or +inf score) stays NaN
  }
  const i64 head_row = (static_cast<i64>(batch) * p.Hq + head) * p.Lq;  // row 0 of (batch, head)
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
  TO* out = static_cast<TO*>(p.out) + head_row * D;
#pragma unroll
  for (int i = 0; i < D / 2; i += 2) {
    const int r = (i % 4) / 2;
    const int row = row0 + 8 * r;
    const int col = 8 * (i / 4) + 2 * (lane % 4);
    if (row < lq) {
      TO* dst = out + static_cast<i64>(row) * D + col;
      if constexpr (sizeof(TO) == 4) {
        *reinterpret_cast<float2*>(dst) = float2{o[i] * inv_l[r], o[i + 1] * inv_l[r]};
      } else {
        *reinterpret_cast<u32*>(dst) = pack_float2<TO>(o[i] * inv_l[r], o[i + 1] * inv_l[r]);
      }
    }
  }
}

}  // namespace kiln
