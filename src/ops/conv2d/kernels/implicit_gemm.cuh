// conv2d as an implicit GEMM on the tensor cores (mma.sync m16n8k16, sm_80 and later).
//
// GEMM view: out[m, oc] = bias[oc] + sum_k A[m, k] * B[oc, k] with m = (n, oh, ow) over
// M = N * OH * OW output pixels and k over K = C * KH * KW; A is the im2col matrix of x, never
// materialized: each A tile's addresses are computed while it is loaded into shared memory,
// padding taps read as zeros. B is w viewed as [OC, K].
//
// Block tile (BM, BN, BK) over (m, oc, k), WARPS_M x WARPS_N warps each owning a (BM / WARPS_M,
// BN / WARPS_N) tile of f32 accumulators; STAGES shared-memory stages of A and B [BN, BK] (rows
// padded by 16 bytes so that ldmatrix and 16-byte stores are conflict-free).
//   channels-last x (X_NHWC): k order (kh, kw, c), A stored [BM, BK]; 8 consecutive k are 16
//     contiguous bytes of one pixel, loaded by cp.async (zero-fill for padding, rows past M and
//     k past K) when x's dtype is the compute type T and C % 8 == 0 (X_ASYNC), else by 8 strided
//     scalar loads converted to T.
//   NCHW x: k order (c, kh, kw) (an OIHW w is then a row-major [OC, K]), A stored transposed
//     [BK, BM] and read with ldmatrix.trans; a thread loads 8 consecutive pixels of one column k
//     (one tap of one channel: consecutive addresses along a row of x for stride 1), decoding k
//     once per chunk; ROW_CHUNKS (OW % 8 == 0) keeps the 8 pixels in one output row.
//   w: cp.async of the [OC, K] rows when w's dtype is T and it is k-contiguous (W_ASYNC), else
//     strided scalar loads converted to T.
// Register-loaded chunks are issued before the current tile's math and stored to shared memory
// after it. Epilogue: accumulators through shared memory (f32), bias added, converted to Tout,
// written with 16-byte stores along the output's contiguous dim (oc for NHWC, ow for NCHW) when
// OUT_VEC. IM2COL = false is the 1x1 stride-1 unpadded convolution: a plain GEMM whose A row is
// one pixel.
//
// Limits: M, K, C, H, W, OC < 2^31 (checked by the launcher); element offsets are 64-bit.
// The main loop has no branch: with the next tile's loads behind `if`s and a branch around every
// cp.async pointer, the same tiles were slower, NCHW most (NOTES.md has every version, "mma.sync
// v3" this one; dev/conv2d/paths.cpp times it with any tile).
#pragma once

#include "device/mma.cuh"
#include "device/numeric.cuh"
#include "device/vec.cuh"
#include "ops/conv2d/kernels/params.cuh"

namespace kiln {
namespace conv2d_kernel {

// Four words of 8 elements of T, rounded from f32.
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  uint4 words;
  words.x = pack_float2<T>(v[0], v[1]);
  words.y = pack_float2<T>(v[2], v[3]);
  words.z = pack_float2<T>(v[4], v[5]);
  words.w = pack_float2<T>(v[6], v[7]);
  return words;
}

}  // namespace conv2d_kernel

template <typename Tx, typename Tw, typename Tb, typename Tout, typename T, int KH, int KW, int BM,
          int BN, int BK, int WARPS_M, int WARPS_N, int STAGES, bool X_NHWC, bool ROW_CHUNKS,
          bool X_ASYNC, bool W_ASYNC, bool IM2COL, bool OUT_NHWC, bool OUT_VEC, bool HAS_BIAS>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    implicit_gemm_conv2d(const __grid_constant__ Conv2dParams p) {
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int kWarpM = BM / WARPS_M;  // rows of a warp's tile
  constexpr int kWarpN = BN / WARPS_N;  // columns of a warp's tile
  constexpr int kMi = kWarpM / 16;      // m16 tiles per warp
  constexpr int kNi = kWarpN / 8;       // n8 tiles per warp
  constexpr int kLds = BK + kConv2dSmemPad;
  constexpr int kChunks = BK / 8;  // 16-byte chunks of T in a tile row
  constexpr int kTaps = KH * KW;
  constexpr int kAChunks = BM * kChunks;
  constexpr int kBChunks = BN * kChunks;
  constexpr int kAIters = (kAChunks + kThreads - 1) / kThreads;
  constexpr int kMChunks = BM / 8;            // NCHW: 8-pixel chunks of a column of A
  constexpr int kLdaT = BM + kConv2dSmemPad;  // NCHW: A stored (BK, BM), pixels contiguous
  constexpr int kAStage = X_NHWC ? BM * kLds : BK * kLdaT;
  constexpr int kBIters = (kBChunks + kThreads - 1) / kThreads;
  static_assert(sizeof(T) == 2, "the compute type is f16 or bf16");
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0 && BK % 16 == 0, "whole mma tiles");
  static_assert(kThreads % kChunks == 0, "a thread keeps one k chunk of its rows");
  static_assert(X_NHWC || kThreads % kMChunks == 0, "a thread keeps one pixel chunk (NCHW)");
  static_assert(X_NHWC || !X_ASYNC, "cp.async loads of A need channels-last x");
  static_assert(IM2COL || kTaps == 1, "the plain GEMM path is the 1x1 convolution");

  extern __shared__ __align__(16) unsigned char smem[];
  T* const a_smem = reinterpret_cast<T*>(smem);  // (STAGES, BM, kLds) or NCHW (STAGES, BK, kLdaT)
  T* const b_smem = a_smem + STAGES * kAStage;   // (STAGES, BN, kLds)

  const Tx* const x = static_cast<const Tx*>(p.x);
  const Tw* const w = static_cast<const Tw*>(p.w);
  const int tid = threadIdx.x;
  const int n_tiles = (p.OC + BN - 1) / BN;
  // Blocks next to each other share an A tile (the activations) and walk the OC tiles.
  const int tile_n = int(blockIdx.x % unsigned(n_tiles));
  const int tile_m = int(blockIdx.x / unsigned(n_tiles));
  const int m0 = tile_m * BM;
  const int n0 = tile_n * BN;
  const int ohw = p.OH * p.OW;

  // ---- A, channels-last: this thread's chunks (row, k chunk) of every A tile and the pixel of
  // each row. NCHW: its chunk of 8 pixels (entry 0 holds the first pixel) and one k per chunk.
  int a_row[kAIters], a_kc[kAIters];
  i64 a_base[kAIters];  // x offset of (n, 0, 0, 0), or of the pixel itself without IM2COL
  int a_ih0[kAIters], a_iw0[kAIters];
  i64 a_corner[kAIters];  // x offset of the window's first tap (n, ih0, iw0), maybe outside x
  bool a_ok[kAIters];     // the chunk exists and its row is an output pixel (m < M)
  const int a_mc = tid % kMChunks;
  auto locate = [&](int i, int m, bool exists) {
    a_ok[i] = exists && m < p.M;
    const int mm = a_ok[i] ? m : 0;
    const int n = mm / ohw, pix = mm % ohw;
    const int oh = pix / p.OW, ow = pix % p.OW;
    a_ih0[i] = IM2COL ? oh * p.stride_h - p.pad_h : 0;
    a_iw0[i] = IM2COL ? ow * p.stride_w - p.pad_w : 0;
    a_base[i] = i64(n) * p.x_stride[0];
    if (!IM2COL) a_base[i] += i64(oh) * p.x_stride[2] + i64(ow) * p.x_stride[3];
    a_corner[i] = a_base[i] + i64(a_ih0[i]) * p.x_stride[2] + i64(a_iw0[i]) * p.x_stride[3];
  };
  if constexpr (X_NHWC) {
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      const int id = tid + i * kThreads;
      a_row[i] = id / kChunks;
      a_kc[i] = id % kChunks;
      locate(i, m0 + a_row[i], id < kAChunks);
    }
  } else {
    locate(0, m0 + a_mc * 8, true);
  }

  // ---- B: this thread's chunks (row = oc, k chunk) of every B tile.
  int b_row[kBIters];
  bool b_ok[kBIters];
  i64 b_base[kBIters];
  const int b_kc = tid % kChunks;
#pragma unroll
  for (int i = 0; i < kBIters; ++i) {
    const int id = tid + i * kThreads;
    b_row[i] = id / kChunks;
    b_ok[i] = id < kBChunks && n0 + b_row[i] < p.OC;
    b_base[i] = b_ok[i] ? i64(n0 + b_row[i]) * p.w_stride[0] : 0;
  }

  // Channels-last k order: the first k of this thread's chunk is tap r, channel c; both advance
  // by BK per tile (A and B chunks share the k chunk tid % kChunks).
  int nhwc_c = 0, nhwc_r = 0;
  if constexpr (X_NHWC) {
    const int k = (tid % kChunks) * 8;
    nhwc_r = k / p.C;
    nhwc_c = k % p.C;
  }

  // x[row's pixel, k] for a register-loaded element k (0 outside the image or past K).
  auto x_element = [&](int i, int k, int c, int r) -> float {
    if (!a_ok[i] || k >= p.K) return 0.f;
    if constexpr (!IM2COL) {
      return to_float(x[a_base[i] + i64(k) * p.x_stride[1]]);
    } else {
      const int ih = a_ih0[i] + (r / KW) * p.dilation_h;
      const int iw = a_iw0[i] + (r % KW) * p.dilation_w;
      if (unsigned(ih) >= unsigned(p.H) || unsigned(iw) >= unsigned(p.W)) return 0.f;
      return to_float(x[a_base[i] + i64(c) * p.x_stride[1] + i64(ih) * p.x_stride[2] +
                        i64(iw) * p.x_stride[3]]);
    }
  };
  // NCHW without ROW_CHUNKS: x at pixel m, channel c, tap (kh, kw), decoded from scratch.
  auto pixel_element = [&](int m, int k, int c, int kh, int kw) -> float {
    if (m >= p.M || k >= p.K) return 0.f;
    const int n = m / ohw, pix = m % ohw;
    const int ih = (pix / p.OW) * p.stride_h - p.pad_h + kh * p.dilation_h;
    const int iw = (pix % p.OW) * p.stride_w - p.pad_w + kw * p.dilation_w;
    if (unsigned(ih) >= unsigned(p.H) || unsigned(iw) >= unsigned(p.W)) return 0.f;
    return to_float(x[i64(n) * p.x_stride[0] + i64(c) * p.x_stride[1] + i64(ih) * p.x_stride[2] +
                      i64(iw) * p.x_stride[3]]);
  };
  auto w_element = [&](int i, int k, int c, int r) -> float {
    if (!b_ok[i] || k >= p.K) return 0.f;
    return to_float(w[b_base[i] + i64(c) * p.w_stride[1] + i64(r / KW) * p.w_stride[2] +
                      i64(r % KW) * p.w_stride[3]]);
  };

  uint4 a_regs[kAIters];  // register-loaded chunks in flight: 8 elements of T each
  uint4 b_regs[kBIters];

  // Issues the loads of k tile `kt` into stage `stage`: cp.async for async operands, registers
  // for the others (stored by store_registers after the current tile's math).
  auto load_tile = [&](int kt, int stage) {
    T* const a_stage = a_smem + stage * kAStage;
    T* const b_stage = b_smem + stage * BN * kLds;
    const int chunk_c = nhwc_c, chunk_r = nhwc_r;  // channels-last position of this chunk
    // Channels-last: the chunk's tap, and its x offset from the window's first tap (one
    // multiply-add per tile; each chunk then adds it to its pixel's corner).
    const int tap_h = (chunk_r / KW) * p.dilation_h, tap_w = (chunk_r % KW) * p.dilation_w;
    const i64 tap_offset = i64(tap_h) * p.x_stride[2] + i64(tap_w) * p.x_stride[3] + chunk_c;
#pragma unroll
    for (int i = 0; i < kAIters; ++i) {
      if (kAChunks % kThreads != 0 && tid + i * kThreads >= kAChunks) continue;
      if constexpr (!X_NHWC) {
        // NCHW: 8 consecutive pixels of column k of A (one tap of one channel).
        const int k = kt * BK + (tid + i * kThreads) / kMChunks;
        const int c = k / kTaps, r = k % kTaps, kh = r / KW, kw = r % KW;
        float v[8];
        if constexpr (ROW_CHUNKS) {
          // OW % 8 == 0: the chunk lies in one output row, pixel j at column iw0 + j stride_w.
          const int ih = a_ih0[0] + kh * p.dilation_h;
          const int iw = a_iw0[0] + kw * p.dilation_w;
          const bool row_ok = a_ok[0] && k < p.K && (!IM2COL || unsigned(ih) < unsigned(p.H));
          const i64 row = a_base[0] + i64(c) * p.x_stride[1] + i64(ih) * p.x_stride[2];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            // Branch-free: a padding tap loads x[0] and is replaced by 0, so the 8 loads issue
            // back to back.
            const int iwj = iw + j * p.stride_w;
            const bool ok = row_ok && (!IM2COL || unsigned(iwj) < unsigned(p.W));
            const float value = to_float(x[ok ? row + i64(iwj) * p.x_stride[3] : 0]);
            v[j] = ok ? value : 0.f;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = pixel_element(m0 + a_mc * 8 + j, k, c, kh, kw);
        }
        a_regs[i] = conv2d_kernel::pack8<T>(v);
      } else {
        const int k = kt * BK + a_kc[i] * 8;
        T* const dst = a_stage + a_row[i] * kLds + a_kc[i] * 8;
        if constexpr (X_ASYNC) {
          // Channels-last, C % 8 == 0: the chunk is 8 channels of one tap of one pixel.
          bool valid = a_ok[i] && k < p.K;
          i64 offset = a_base[i] + k;
          if constexpr (IM2COL) {
            const int ih = a_ih0[i] + tap_h, iw = a_iw0[i] + tap_w;
            valid = valid && unsigned(ih) < unsigned(p.H) && unsigned(iw) < unsigned(p.W);
            offset = a_corner[i] + tap_offset;
          }
          // An invalid chunk reads nothing: its address is x's own, selected without a branch.
          cp_async_16(dst, x + (valid ? offset : 0), valid);
        } else {
          float v[8];
          int c = chunk_c, r = chunk_r;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            v[j] = x_element(i, k + j, c, r);
            if (++c == p.C) c = 0, ++r;
          }
          a_regs[i] = conv2d_kernel::pack8<T>(v);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kBIters; ++i) {
      if (kBChunks % kThreads != 0 && tid + i * kThreads >= kBChunks) continue;
      const int k = kt * BK + b_kc * 8;
      T* const dst = b_stage + b_row[i] * kLds + b_kc * 8;
      if constexpr (W_ASYNC) {
        // w viewed as a row-major [OC, K] matrix in this k order (checked by the launcher).
        const bool valid = b_ok[i] && k < p.K;
        cp_async_16(dst, w + (valid ? b_base[i] + k : 0), valid);
      } else {
        float v[8];
        if constexpr (X_NHWC) {
          int c = chunk_c, r = chunk_r;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            v[j] = w_element(i, k + j, c, r);
            if (++c == p.C) c = 0, ++r;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = w_element(i, k + j, (k + j) / kTaps, (k + j) % kTaps);
        }
        b_regs[i] = conv2d_kernel::pack8<T>(v);
      }
    }
    if constexpr (X_NHWC) {
      // k += BK: BK / C taps and BK % C channels, then one carry (no loop, no branch).
      nhwc_c += p.k_tile_channels;
      nhwc_r += p.k_tile_taps;
      if (nhwc_c >= p.C) nhwc_c -= p.C, ++nhwc_r;
    }
  };

  auto store_registers = [&](int stage) {
    if constexpr (!X_ASYNC) {
      T* const a_stage = a_smem + stage * kAStage;
#pragma unroll
      for (int i = 0; i < kAIters; ++i) {
        const int id = tid + i * kThreads;
        if (kAChunks % kThreads != 0 && id >= kAChunks) continue;
        T* const dst = X_NHWC ? a_stage + a_row[i] * kLds + a_kc[i] * 8
                              : a_stage + (id / kMChunks) * kLdaT + a_mc * 8;
        *reinterpret_cast<uint4*>(dst) = a_regs[i];
      }
    }
    if constexpr (!W_ASYNC) {
      T* const b_stage = b_smem + stage * BN * kLds;
#pragma unroll
      for (int i = 0; i < kBIters; ++i) {
        if (kBChunks % kThreads != 0 && tid + i * kThreads >= kBChunks) continue;
        *reinterpret_cast<uint4*>(b_stage + b_row[i] * kLds + b_kc * 8) = b_regs[i];
      }
    }
  };

  const int warp = tid / 32, lane = tid % 32;
  const int warp_m = (warp / WARPS_N) * kWarpM;
  const int warp_n = (warp % WARPS_N) * kWarpN;
  float acc[kMi][kNi][4] = {};  // (m16 tile, n8 tile, fragment)

  auto compute_tile = [&](int stage) {
    const T* const a_stage = a_smem + stage * kAStage;
    const T* const b_stage = b_smem + stage * BN * kLds;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      u32 a[kMi][4];
#pragma unroll
      for (int mi = 0; mi < kMi; ++mi) {
        if constexpr (X_NHWC) {
          // lanes 0-15: rows 0-15 at k 0-7; lanes 16-31: rows 0-15 at k 8-15.
          ldmatrix_x4(
              a[mi], a_stage + (warp_m + mi * 16 + (lane & 15)) * kLds + ks * 16 + (lane >> 4) * 8);
        } else {
          // Transposed from (k, m): lanes 0-7 k 0-7 at m 0-7, 8-15 k 0-7 at m 8-15, 16-23 k 8-15
          // at m 0-7, 24-31 k 8-15 at m 8-15.
          ldmatrix_x4_trans(a[mi], a_stage + (ks * 16 + (lane & 7) + (lane >> 4) * 8) * kLdaT +
                                       warp_m + mi * 16 + ((lane >> 3) & 1) * 8);
        }
      }
      u32 b[kNi][2];
#pragma unroll
      for (int np = 0; np < kNi / 2; ++np) {
        // matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
        u32 r[4];
        ldmatrix_x4(r, b_stage + (warp_n + np * 16 + (lane >> 4) * 8 + (lane & 7)) * kLds +
                           ks * 16 + ((lane >> 3) & 1) * 8);
        b[2 * np][0] = r[0], b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2], b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
        for (int ni = 0; ni < kNi; ++ni) mma_16x8x16<T>(acc[mi][ni], a[mi], b[ni]);
      }
    }
  };

  // ---- Main loop: STAGES - 1 tiles in flight ahead of the one being multiplied. Tiles past
  // the last (k >= K) load as zeros into stages nobody reads again: the loop body has no branch,
  // so the compiler can interleave the next tile's address math and loads with this tile's mma.
  const int k_tiles = (p.K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    load_tile(s, s);
    store_registers(s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt has landed; every warp is done with tile kt - 1's stage
    const int next_stage = (kt + STAGES - 1) % STAGES;
    load_tile(kt + STAGES - 1, next_stage);
    compute_tile(kt % STAGES);
    store_registers(next_stage);
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- Epilogue: accumulators -> shared (f32) -> bias, Tout -> global in 16-byte chunks.
  float* const c_smem = reinterpret_cast<float*>(smem);
  const int group = lane / 4, quad = lane % 4;
#pragma unroll
  for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNi; ++ni) {
      const int row = warp_m + mi * 16 + group;
      const int col = warp_n + ni * 8 + 2 * quad;
      const float* d = acc[mi][ni];
      if constexpr (OUT_NHWC) {
        constexpr int kLdc = BN + 8;  // (BM, BN) row-major
        c_smem[row * kLdc + col] = d[0], c_smem[row * kLdc + col + 1] = d[1];
        c_smem[(row + 8) * kLdc + col] = d[2], c_smem[(row + 8) * kLdc + col + 1] = d[3];
      } else {
        constexpr int kLdc = BM + 4;  // (BN, BM): m contiguous
        c_smem[col * kLdc + row] = d[0], c_smem[(col + 1) * kLdc + row] = d[1];
        c_smem[col * kLdc + row + 8] = d[2], c_smem[(col + 1) * kLdc + row + 8] = d[3];
      }
    }
  }
  __syncthreads();

  constexpr int kVec = 16 / sizeof(Tout);  // elements of a 16-byte store
  Tout* const out = static_cast<Tout*>(p.out);
  const Tb* const bias = static_cast<const Tb*>(p.bias);
  auto bias_at = [&](int oc) -> float {
    if constexpr (HAS_BIAS) {
      return to_float(bias[i64(oc) * p.bias_stride]);
    } else {
      return 0.f;
    }
  };
  if constexpr (OUT_NHWC) {
    // out[m, oc] at m * OC + oc; a thread writes kVec consecutive oc of one pixel.
    constexpr int kLdc = BN + 8;
    constexpr int kRowChunks = BN / kVec;
    for (int id = tid; id < BM * kRowChunks; id += kThreads) {
      const int row = id / kRowChunks;
      const int col = (id % kRowChunks) * kVec;
      const int m = m0 + row, oc = n0 + col;
      if (m >= p.M || oc >= p.OC) continue;
      Tout v[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[j] =
            from_float<Tout>(c_smem[row * kLdc + col + j] + bias_at(oc + j < p.OC ? oc + j : oc));
      }
      Tout* const dst = out + i64(m) * p.OC + oc;
      if constexpr (OUT_VEC) {
        store_vec(dst, v);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (oc + j < p.OC) dst[j] = v[j];
        }
      }
    }
  } else {
    // out[n, oc, pix] at (n * OC + oc) * OH * OW + pix; a thread writes kVec consecutive pixels.
    constexpr int kLdc = BM + 4;
    constexpr int kColChunks = BM / kVec;
    for (int id = tid; id < BN * kColChunks; id += kThreads) {
      const int col = id / kColChunks;
      const int row = (id % kColChunks) * kVec;
      const int m = m0 + row, oc = n0 + col;
      if (m >= p.M || oc >= p.OC) continue;
      const float b = bias_at(oc);
      Tout v[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = from_float<Tout>(c_smem[col * kLdc + row + j] + b);
      if constexpr (OUT_VEC) {
        // OH * OW % kVec == 0: the chunk lies in one image.
        store_vec(out + (i64(m / ohw) * p.OC + oc) * ohw + m % ohw, v);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int mj = m + j;
          if (mj < p.M) out[(i64(mj / ohw) * p.OC + oc) * ohw + mj % ohw] = v[j];
        }
      }
    }
  }
}

}  // namespace kiln
