// Weight-only fp8 GEMM on Hopper (sm_90a): wgmma with the fp8 weights decoded in registers as its
// A operand.
//   out[m, n] = (sum_k a[m, k] * w[n, k]) * w_scale + bias[n]
// a: f16 / bf16 [M, K] (the mma type), w: fp8 e4m3fn / e5m2 [N, K], f32 accumulation, scales and
// bias in f32 in the epilogue (128 x 128 block scales once per 128-wide k chunk), out f32 / f16 /
// bf16.
//
// "Swap AB": a work unit is 128 weight rows (the M side of wgmma m64nBTk16, 64 per consumer
// warpgroup) by BT tokens (the N side), so the weights go through registers, where they are
// decoded, and the 16-bit tokens stay in shared memory, where wgmma reads them. Per 64-wide
// k-tile one TMA load brings the 128 x 64 fp8 weight tile (64-byte rows, 64-byte swizzle) and one
// the BT x 64 a tile (128-byte swizzle) into a STAGES-deep ring with full / empty mbarriers. The
// grid is persistent (min(units, SMs) blocks), so the producer fills the ring with the next
// unit's tiles while the consumers store this one's outputs.
//   warpgroup 0 (the producer, 40 registers): one thread issues the loads, STAGES ahead.
//   warpgroups 1 and 2 (consumers): lane (g, q) of warp w reads the codes of its A fragments with
//   one 16-bit shared load per pair (rows 16 w + g and + 8, k = 2 q, 2 q + 1 and + 8 of each k16
//   step), decodes them into the fragment registers and issues 4 wgmma a k-tile; the fragments are
//   double-buffered, so decoding tile t + 1 overlaps the multiplies of tile t.
// Decode to f16: cvt.rn.f16x2.e4m3x2 / e5m2x2, one instruction a pair, exact for every code. To
// bf16: the bit tricks of fp8_lanes_to_pair (subnormals exact), then NaN and inf codes, which
// decode above the format's largest value, get bf16's all-ones exponent (one compare, one LOP3).
// block128 scales: a second accumulator set takes each 128-wide k chunk (two k-tiles) and is
// scaled into the first (BT <= 128).
// Epilogue from registers: scales and bias in f32, then lanes g and g ^ 1 swap one value so that
// each stores two adjacent outputs of one token (4 or 8 bytes). SPLIT (split-K: few units, long
// K): each unit takes one k slice and writes f32 partial sums to the slice's [M, N] of
// [splits, M, N]; gemv_epilogue_kernel adds them in slice order and applies tensor / row scales
// and bias.
//
// Limits (the launcher checks them): a rows 16-byte aligned (row stride % 8 == 0), w rows 16-byte
// aligned (K % 16 == 0 when contiguous); M, N, K < 2^31. Tokens, weights and k past M, N and K
// read as zeros (TMA's out-of-bounds fill).
//
// Measured on an H200 (bf16 a and out, e4m3 per-channel, NOTES.md "Hopper GEMM"): Flux.2's
// 4608 x 3072 x 9216 in 0.39 ms (660 TFLOP/s, 0.86x cuBLAS bf16; the mma.sync kernel took 1.56);
// ncu: tensor pipe 75% active against cuBLAS's 91%, 3.5x its instructions (the decode).
#pragma once

#include "device/fp8.cuh"
#include "device/numeric.cuh"
#include "device/sm90.cuh"
#include "ops/matmul/kernels/gemm_params.cuh"

namespace kiln {

namespace gemm_sm90 {

constexpr int kBlockW = 128;                // weight rows per block, 64 per consumer warpgroup
constexpr int kBlockK = 64;                 // k per tile: 64 fp8 bytes, 128 bytes of a
constexpr int kWBytes = kBlockW * kBlockK;  // one fp8 weight slot
constexpr int kThreads = 384;

template <bool C, typename A, typename B>
struct select_type {
  using type = A;
};
template <typename A, typename B>
struct select_type<false, A, B> {
  using type = B;
};

}  // namespace gemm_sm90

// Two fp8 codes (k in the low byte, k + 1 in the high byte) -> a pair of T, every code exact.
template <typename Tw, typename T>
__device__ __forceinline__ u32 fp8x2_to_pair_sm90(unsigned short codes) {
  u32 pair;
  if constexpr (is_f16_type<T>) {
    if constexpr (fp8_traits<Tw>::is_e4m3) {
      asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(pair) : "h"(codes));
    } else {
      asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(pair) : "h"(codes));
    }
  } else {
    // Code k to bits 8..15, code k + 1 to bits 24..31.
    pair = fp8_lanes_to_pair<Tw, T>(__byte_perm(static_cast<u32>(codes), 0u, 0x1404));
    // NaN (e4m3 0x7F decodes as 480) and inf / NaN (e5m2 exponent 31: 2^16 and above) lie above
    // the format's largest finite value (448, 57344): all-ones exponent for those lanes, the
    // mantissa keeps NaN nonzero and inf zero.
    constexpr u32 kSpecial = fp8_traits<Tw>::is_e4m3 ? 0x43F043F0u : 0x47804780u;
    u32 special;
    asm("set.ge.u32.bf16x2 %0, %1, %2;" : "=r"(special) : "r"(pair & 0x7FFF7FFFu), "r"(kSpecial));
    pair |= special & 0x7F807F80u;
  }
  return pair;
}

__device__ __forceinline__ unsigned short ld_shared_u16(u32 addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}

// The store of a pair of outputs (columns n, n + 1 of one row) and of one.
template <typename TS>
__device__ __forceinline__ void store_pair(TS* dst, float v0, float v1) {
  if constexpr (sizeof(TS) == 4) {
    *reinterpret_cast<float2*>(dst) = float2{v0, v1};
  } else {
    const TS pair[2] = {from_float<TS>(v0), from_float<TS>(v1)};
    *reinterpret_cast<u32*>(dst) = static_cast<u32>(pair[0].bits) | static_cast<u32>(pair[1].bits)
                                                                        << 16;
  }
}

// T: f16 or bf16 (a and the mma); Tw: e4m3 or e5m2; TO: out; TB: bias (HAS_BIAS); BT: tokens per
// work unit (64, 128 or 256); WSCALE: gemm_scale::*; SPLIT: write f32 partial sums (no scale,
// bias, gate, residual); GATE, RESIDUAL: kOperand* of params.cuh's GateResidual.
template <typename T, typename Tw, typename TO, typename TB, int BT, int STAGES, int WSCALE,
          bool HAS_BIAS, bool SPLIT, int GATE, int RESIDUAL>
__global__ void __launch_bounds__(gemm_sm90::kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ GemmSm90Params p) {
  using namespace gemm_sm90;
  constexpr bool kBlock128 = WSCALE == gemm_scale::block128;
  static_assert(!kBlock128 || BT <= 128, "block128 scales keep two accumulator sets");
  constexpr int kABytes = BT * kBlockK * 2;  // (BT, 64) a slot
  extern __shared__ char smem_raw[];
  // STAGES x a slot | STAGES x w slot | full and empty barriers; 1024-byte aligned (swizzles).
  char* smem = reinterpret_cast<char*>((reinterpret_cast<u64>(smem_raw) + 1023) & ~u64(1023));
  char* s_a = smem;
  char* s_w = s_a + STAGES * kABytes;
  u64* full = reinterpret_cast<u64*>(s_w + STAGES * kWBytes);
  u64* empty = full + STAGES;

  // Work units: (weight tile, token tile, k slice), weight tiles fastest so that the blocks at
  // work share a's token tile in L2.
  const int n_tiles = (p.n + kBlockW - 1) / kBlockW, m_tiles = (p.m + BT - 1) / BT;
  const int k_tiles = (p.k + kBlockK - 1) / kBlockK;
  const int units = n_tiles * m_tiles * p.splits;
  struct Unit {
    int n0, m0, kt0, tiles;
  };
  const auto unit_at = [&](int u) {
    Unit w;
    w.n0 = u % n_tiles * kBlockW;
    w.m0 = u / n_tiles % m_tiles * BT;
    w.kt0 = u / (n_tiles * m_tiles) * p.tiles_per_split;
    w.tiles = min(k_tiles, w.kt0 + p.tiles_per_split) - w.kt0;
    return w;
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(full + s, 1);
      mbarrier_init(empty + s, 2 * 128);  // every consumer thread releases the slot
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (threadIdx.x / 128 == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (threadIdx.x == 0) {
      int step = 0;  // k-tiles issued, across units
      for (int u = blockIdx.x; u < units; u += gridDim.x) {
        const Unit w = unit_at(u);
        for (int i = 0; i < w.tiles; ++i, ++step) {
          const int s = step % STAGES, k = (w.kt0 + i) * kBlockK;
          mbarrier_wait(empty + s, ((step / STAGES) & 1) ^ 1);
          mbarrier_arrive_expect_tx(full + s, kABytes + kWBytes);
          tma_load_2d(s_a + s * kABytes, &p.map_a, full + s, k, w.m0);
          tma_load_2d(s_w + s * kWBytes, &p.map_w, full + s, k, w.n0);
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int c = threadIdx.x / 128 - 1;  // consumer 0 or 1: weight rows 64 c .. 64 c + 63
  const int warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32;
  const int q = lane % 4, odd = lane / 4 % 2;
  const int r0 = 64 * c + 16 * warp + lane / 4;  // this lane's weight rows r0 and r0 + 8
  // 64-byte swizzle: 16-byte unit u of row r sits at r * 64 + 16 (u ^ (r / 2 % 4)); rows r0 and
  // r0 + 8 share the pattern.
  const u32 swizzle = (r0 >> 1) & 3;
  const u32 w_lane = smem_addr(s_w) + r0 * kBlockK + 2 * q;

  float acc[BT / 2];
  u32 frag0[4][4], frag1[4][4];  // A fragments of two k-tiles: [k16 step][register]
  int step = 0;                  // k-tiles taken, across units
  int taken = 0;                 // k-tiles taken in this unit
  // Waits for the next tile, decodes its weights into `frag` and issues its 4 wgmma into d
  // (`fresh`: the first overwrites d).
  const auto issue = [&](u32(&frag)[4][4], float(&d)[BT / 2], bool fresh) {
    const int s = step % STAGES;
    mbarrier_wait(full + s, (step / STAGES) & 1);
    const u32 w_slot = w_lane + s * kWBytes;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const u32 unit = w_slot + ((kk ^ swizzle) << 4);
      frag[kk][0] = fp8x2_to_pair_sm90<Tw, T>(ld_shared_u16(unit));
      frag[kk][1] = fp8x2_to_pair_sm90<Tw, T>(ld_shared_u16(unit + 8 * kBlockK));
      frag[kk][2] = fp8x2_to_pair_sm90<Tw, T>(ld_shared_u16(unit + 8));
      frag[kk][3] = fp8x2_to_pair_sm90<Tw, T>(ld_shared_u16(unit + 8 * kBlockK + 8));
    }
    register_fence(frag);
    wgmma_fence();
    const u32 a_slot = smem_addr(s_a + s * kABytes);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      Wgmma<T, BT, 0, 0>::rs(d, frag[kk], swizzle128_desc(a_slot + kk * 32, 16, 1024),
                             fresh && kk == 0 ? 0 : 1);
    }
    wgmma_commit();
    ++step;
    ++taken;
  };
  const auto release = [&](int tile) { mbarrier_arrive(empty + tile % STAGES); };

  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const Unit w = unit_at(u);
#pragma unroll
    for (int i = 0; i < BT / 2; ++i) acc[i] = 0.f;
    taken = 0;
    if constexpr (kBlock128) {
      // Chunks of two k-tiles (kt0 is even): part = the chunk's sum, acc += scale * part.
      const float* scales = p.w_scale + w.n0 / kBlockW * p.scale_cols + w.kt0 / 2;
      float part[BT / 2];
      for (int chunk = 0; taken < w.tiles; ++chunk) {
        issue(frag0, part, true);
        const bool pair = taken < w.tiles;
        if (pair) issue(frag1, part, false);
        wgmma_wait<0>();
        register_fence(part);
        register_fence(frag0);
        register_fence(frag1);
        release(step - 1);
        if (pair) release(step - 2);
        const float scale = scales[chunk];
#pragma unroll
        for (int i = 0; i < BT / 2; ++i) acc[i] += scale * part[i];
      }
    } else {
      // One group in flight while the next tile is decoded: after issuing a tile, the previous
      // tile's group is done, its slot free and its fragments reusable. The loop runs whole pairs
      // (ptxas then sees which fragments each wait frees; otherwise it serializes the wgmma).
      const auto take = [&](u32(&frag)[4][4], u32(&other)[4][4]) {
        issue(frag, acc, false);
        wgmma_wait<1>();
        register_fence(other);
        if (taken > 1) release(step - 2);
      };
      while (taken + 2 <= w.tiles) {
        take(frag0, frag1);
        take(frag1, frag0);
      }
      if (taken < w.tiles) take(frag0, frag1);
      wgmma_wait<0>();
      register_fence(acc);
      register_fence(frag0);
      register_fence(frag1);
      release(step - 1);
    }

    // Epilogue, from registers: register 4 j + 2 h + e holds weight row r0 + 8 h, token
    // 8 j + 2 q + e. Lanes g and g ^ 1 (lane ^ 4) swap one value so that each holds two adjacent
    // columns of one token: the even lane token 8 j + 2 q, the odd one token 8 j + 2 q + 1.
    using TS = typename select_type<SPLIT, float, TO>::type;
    TS* out = static_cast<TS*>(p.out) +
              (SPLIT ? static_cast<long long>(w.kt0 / p.tiles_per_split) * p.m * p.n : 0);
    float scale[2] = {1.f, 1.f}, shift[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = min(w.n0 + r0 + 8 * h, p.n - 1);  // columns past N are not stored
      if constexpr (!SPLIT && WSCALE == gemm_scale::tensor) scale[h] = p.w_scale[0];
      if constexpr (!SPLIT && WSCALE == gemm_scale::row) scale[h] = p.w_scale[n];
      if constexpr (!SPLIT && HAS_BIAS) shift[h] = to_float(static_cast<const TB*>(p.bias)[n]);
    }
#pragma unroll
    for (int i = 0; i < BT / 2; i += 2) {
      const int h = (i % 4) / 2;
      const float v0 = acc[i] * scale[h] + shift[h], v1 = acc[i + 1] * scale[h] + shift[h];
      const float other = __shfl_xor_sync(0xFFFFFFFFu, odd ? v0 : v1, 4);
      const int m = w.m0 + 8 * (i / 4) + 2 * q + odd;
      const int n = w.n0 + r0 + 8 * h - odd;  // even
      if (m >= p.m || n >= p.n) continue;
      float first = odd ? other : v0, second = odd ? v1 : other;
      if constexpr (!SPLIT) {  // out = residual + gate * v; the residual is read before the store
        const auto row = row_gate_residual<GATE, RESIDUAL>(p.epilogue, m);
        first = row(n, first);
        if (n + 1 < p.n) second = row(n + 1, second);
      }
      TS* dst = out + static_cast<long long>(m) * p.n + n;
      if (p.out_vec) {
        store_pair(dst, first, second);
      } else {
        dst[0] = from_float<TS>(first);
        if (n + 1 < p.n) dst[1] = from_float<TS>(second);
      }
    }
  }
}

}  // namespace kiln
