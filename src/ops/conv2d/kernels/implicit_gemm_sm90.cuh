// conv2d on Hopper (sm_90a): an implicit GEMM whose im2col tiles are loaded by TMA in im2col mode
// and multiplied by wgmma.
//
// GEMM view: out[m, oc] = bias[oc] + sum_k A[m, k] B[oc, k], m = (n, oh, ow) over M = N OH OW
// output pixels, k = (kh, kw, c) over K = KH KW C. A tile (128 pixels, 64 channels of one tap) is
// one TMA im2col load of channels-last x: the copy engine walks the 128 output pixels' windows,
// shifts them by the tap and zero-fills the padding; B tile (BN output channels, the same 64 k) is
// one tiled TMA load of w viewed as [OC, K] (OHWI weights). Both land 128-byte swizzled in a ring
// of STAGES slots.
//   warpgroup 0 (the producer, 40 registers): one thread issues the loads, ahead by STAGES.
//   warpgroups 1 and 2 (consumers): 64 pixels x BN channels each, wgmma m64nBNk16 from shared
//   memory, one group of 4 in flight while the next slot is awaited.
// The grid is persistent (one block per SM, tiles in steps of the grid, output channels fastest
// so that neighbouring blocks share x in L2): the producer fetches the next tile while the
// consumers run the epilogue (bias in f32, conversion to TO, direct stores: channels-last pairs,
// or NCHW elements, each warp store covering 8 consecutive pixels of 4 channels).
//
// Layout: x channels-last [N, H, W, C] in memory with 16-byte-multiple strides, w [OC, KH, KW, C]
// contiguous in K, out [N, OH, OW, OC] contiguous, or NCHW with unit OW stride (OUT_NCHW). The
// launcher gives other layouts a channels-last copy of x (conv2d_x_nhwc) and an OHWI copy of w
// (conv2d_w_ohwi) below. Limits (the launcher checks them): square window with equal strides,
// padding and dilation on both dims; C % 8 == 0 (channels past C read as zeros, so any such C
// works); OC % BN == 0.
//
// The persistent grid measured faster than one block a tile on every VAE shape (NOTES.md,
// "sm_90a implicit GEMM").
#pragma once

#include "device/numeric.cuh"
#include "device/pipeline.cuh"
#include "device/sm90.cuh"
#include "device/tile_scheduler.cuh"
#include "ops/conv2d/kernels/implicit_gemm_sm90_params.cuh"

namespace kiln {

namespace conv2d_sm90 {

constexpr int kBlockM = 128;  // output pixels per tile (64 per consumer warpgroup)
constexpr int kBlockK = 64;   // channels per k-step: one 128-byte row of 16-bit elements
constexpr int kThreads = 384;
using Registers = WarpgroupRegisters<40, 232>;  // producer, consumers

}  // namespace conv2d_sm90

// T: bf16 or f16 (x and w); TB: bias type; TO: out type; BN: 128 or 256 output channels per tile;
// OUT_NCHW: out in NCHW (else channels-last); A_MN_MAJOR: a 1x1 conv (stride 1, no padding) of an
// NCHW x, whose A tiles (128 pixels of one image x 64 channels) are two tiled TMA loads of x as
// (H W, C, N), pixel-contiguous, which wgmma reads transposed.
template <typename T, typename TB, typename TO, int BN, int STAGES, bool HAS_BIAS, bool OUT_NCHW,
          bool A_MN_MAJOR>
__global__ void __launch_bounds__(conv2d_sm90::kThreads, 1)
    implicit_gemm_conv2d_sm90(const __grid_constant__ Conv2dSm90Params p) {
  using namespace conv2d_sm90;
  constexpr int kABytes = kBlockM * kBlockK * 2;  // (kBlockM, kBlockK) A slot
  constexpr int kBBytes = BN * kBlockK * 2;       // (BN, kBlockK) B slot
  extern __shared__ char smem_raw[];
  // STAGES x A | STAGES x B | full and empty barriers; 1024-byte aligned for the swizzle.
  char* smem = reinterpret_cast<char*>((reinterpret_cast<u64>(smem_raw) + 1023) & ~u64(1023));
  char* s_a = smem;
  char* s_b = s_a + STAGES * kABytes;
  u64* full = reinterpret_cast<u64*>(s_b + STAGES * kBBytes);
  const TmaPipeline<STAGES> ring{full, full + STAGES};

  const int c_steps = (p.C + kBlockK - 1) / kBlockK;
  const int k_steps = p.KH * p.KW * c_steps;
  const int n_tiles = p.OC / BN;
  // 128-pixel tiles: over the N OH OW pixels, or (A_MN_MAJOR) over each image's H W pixels.
  const int image_tiles = (p.OH * p.OW + kBlockM - 1) / kBlockM;
  const int tiles = (A_MN_MAJOR ? p.N * image_tiles : (p.M + kBlockM - 1) / kBlockM) * n_tiles;
  // The first pixel of tile `m_tile` (over N OH OW) and the end of the pixels it holds.
  const auto pixels_of = [&](int m_tile, int& m0, int& m_end) {
    if constexpr (A_MN_MAJOR) {
      const int image = m_tile / image_tiles, first = m_tile % image_tiles * kBlockM;
      m0 = image * p.OH * p.OW + first;
      m_end = image * p.OH * p.OW + min(p.OH * p.OW, first + kBlockM);
    } else {
      m0 = m_tile * kBlockM;
      m_end = p.M;
    }
  };
  if (threadIdx.x == 0) {
    ring.init(2 * 128);  // every consumer thread releases the slot
    mbarrier_init_fence();
  }
  __syncthreads();

  if (threadIdx.x / 128 == 0) {  // producer
    Registers::producer();
    if (threadIdx.x == 0) {
      PipelineState<STAGES> slot;  // k-steps issued, across tiles
      for (const int tile : PersistentTiles{tiles}) {
        const int oc0 = tile % n_tiles * BN;
        int m0, m_end;
        pixels_of(tile / n_tiles, m0, m_end);
        const int ow = m0 % p.OW, oh = m0 / p.OW % p.OH, n = m0 / (p.OW * p.OH);
        const int w0 = ow * p.stride - p.pad, h0 = oh * p.stride - p.pad;  // window corner
        for (int kt = 0; kt < k_steps; ++kt, ++slot) {
          const int s = slot.index();
          u64* landed = ring.producer_acquire(slot, kABytes + kBBytes);
          const int tap = kt / c_steps, c0 = kt % c_steps * kBlockK;
          const int kh = tap / p.KW, kw = tap % p.KW;
          if constexpr (A_MN_MAJOR) {  // two (64 channels, 64 pixels) panels, pixels contiguous
            const int first = m0 - n * p.OH * p.OW;
            tma_load_3d(s_a + s * kABytes, &p.map_x, landed, first, c0, n);
            tma_load_3d(s_a + s * kABytes + kABytes / 2, &p.map_x, landed, first + kBlockM / 2, c0,
                        n);
          } else {
            tma_load_im2col_4d(s_a + s * kABytes, &p.map_x, landed, c0, w0, h0, n,
                               static_cast<unsigned short>(kw * p.dilation),
                               static_cast<unsigned short>(kh * p.dilation));
          }
          tma_load_2d(s_b + s * kBBytes, &p.map_w, landed, tap * p.C + c0, oc0);
        }
      }
    }
    return;
  }

  Registers::consumer();
  const int c = threadIdx.x / 128 - 1;  // consumer 0 or 1: pixels 64 c .. 64 c + 63 of a tile
  const int lane = threadIdx.x % 32, warp = threadIdx.x % 128 / 32;
  PipelineState<STAGES> slot;  // k-steps taken, across tiles
  for (const int tile : PersistentTiles{tiles}) {
    const int oc0 = tile % n_tiles * BN;
    int m0, m_end;
    pixels_of(tile / n_tiles, m0, m_end);
    float acc[BN / 2];  // (64, BN) accumulator of this warpgroup
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
    for (int kt = 0; kt < k_steps; ++kt, ++slot) {
      const int s = slot.index();
      ring.consumer_wait(slot);
      register_fence(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {
        // This consumer's 64 pixels start 8 KiB into the slot: 64 K-major rows, or the second
        // MN-major panel (groups of 8 channel rows 1024 bytes apart; LBO unused at M = 64).
        const u32 a_base = smem_addr(s_a + s * kABytes) + c * (kABytes / 2);
        const u64 a = A_MN_MAJOR ? swizzle128_desc(a_base + kk * 2048, kABytes / 2, 1024)
                                 : swizzle128_desc(a_base + kk * 32, 16, 1024);
        const u64 b = swizzle128_desc(smem_addr(s_b + s * kBBytes) + kk * 32, 16, 1024);
        Wgmma<T, BN, A_MN_MAJOR ? 1 : 0, 0>::ss(acc, a, b, 1);
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous step's group is done: release its slot
      register_fence(acc);
      if (kt > 0) ring.consumer_release(slot.before(1));
    }
    wgmma_wait<0>();
    register_fence(acc);
    ring.consumer_release(slot.before(1));

    // Epilogue: thread holds rows row0 and row0 + 8, columns 8 j + 2 (lane % 4) + {0, 1}.
    const int row0 = m0 + 64 * c + 16 * warp + lane / 4;
    TO* out = static_cast<TO*>(p.out);
    i64 pixel[2];  // NCHW: the offsets of rows row0 and row0 + 8 at channel 0
    if constexpr (OUT_NCHW) {
      for (int h = 0; h < 2; ++h) {
        const int m = min(row0 + 8 * h, p.M - 1);  // rows past the pixels are not stored
        const int ow = m % p.OW, oh = m / p.OW % p.OH, n = m / (p.OW * p.OH);
        pixel[h] = n * p.out_stride[0] + oh * p.out_stride[2] + ow;
      }
    }
#pragma unroll
    for (int i = 0; i < BN / 2; i += 2) {
      const int row = row0 + 8 * ((i % 4) / 2);
      const int col = oc0 + 8 * (i / 4) + 2 * (lane % 4);
      float v0 = acc[i], v1 = acc[i + 1];
      if constexpr (HAS_BIAS) {
        const TB* bias = static_cast<const TB*>(p.bias);
        v0 += to_float(bias[col * p.bias_stride]);
        v1 += to_float(bias[(col + 1) * p.bias_stride]);
      }
      if (row >= m_end) continue;
      if constexpr (OUT_NCHW) {
        TO* dst = out + pixel[(i % 4) / 2] + col * p.out_stride[1];
        dst[0] = from_float<TO>(v0);
        dst[p.out_stride[1]] = from_float<TO>(v1);
      } else {
        TO* dst = out + static_cast<i64>(row) * p.OC + col;
        if constexpr (sizeof(TO) == 4) {
          *reinterpret_cast<float2*>(dst) = float2{v0, v1};
        } else {
          TO pair[2] = {from_float<TO>(v0), from_float<TO>(v1)};
          *reinterpret_cast<u32*>(dst) =
              static_cast<u32>(pair[0].bits) | static_cast<u32>(pair[1].bits) << 16;
        }
      }
    }
  }
}

// The channels-last copy of an x stored otherwise: out [N, H, W, C] contiguous (C % 8 == 0) from
// x [N, C, H, W] in any strides. A block transposes 64 channels x 64 pixels of one image row
// (grid: W / 64, H, N x C / 64) through shared memory: reads along the row (VEC: 16-byte loads of
// 8 pixels, for a unit W stride, 16-byte-aligned rows and W % 8 == 0; else 2-byte loads), writes
// of 8 channels (16 bytes) of a pixel. Its speed: NOTES.md, "NCHW on Hopper".
template <typename T, bool VEC>
__global__ void __launch_bounds__(256) conv2d_x_nhwc(const __grid_constant__ Conv2dCopyParams p) {
  __shared__ T tile[64][65];  // [channel][pixel]; the odd pitch spreads channel groups over banks
  const T* x = static_cast<const T*>(p.src);
  const int c_blocks = (p.C + 63) / 64;
  const int w0 = blockIdx.x * 64, h = blockIdx.y;
  const int n = blockIdx.z / c_blocks, c0 = blockIdx.z % c_blocks * 64;
  const T* row = x + n * p.src_stride[0] + h * p.src_stride[2];
  if constexpr (VEC) {
    for (int v = threadIdx.x; v < 64 * 8; v += 256) {  // (channel, 8-pixel chunk)
      const int i = v / 8, w = w0 + v % 8 * 8, c = c0 + i;
      if (w < p.W && c < p.C) {
        const uint4 chunk = *reinterpret_cast<const uint4*>(row + c * p.src_stride[1] + w);
        const u32 words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          tile[i][v % 8 * 8 + j].bits = static_cast<unsigned short>(words[j / 2] >> (16 * (j % 2)));
        }
      }
    }
  } else {
    for (int i = threadIdx.x / 64; i < 64; i += 4) {
      const int w = w0 + threadIdx.x % 64, c = c0 + i;
      if (w < p.W && c < p.C) {
        tile[i][threadIdx.x % 64] = row[c * p.src_stride[1] + w * p.src_stride[3]];
      }
    }
  }
  __syncthreads();
  const int group = threadIdx.x % 8, c = c0 + 8 * group;  // 8 channels of a pixel
  for (int i = threadIdx.x / 8; i < 64; i += 32) {
    const int w = w0 + i;
    if (w < p.W && c < p.C) {
      u32 words[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        words[j] = static_cast<u32>(tile[8 * group + 2 * j][i].bits) |
                   static_cast<u32>(tile[8 * group + 2 * j + 1][i].bits) << 16;
      }
      const i64 pixel = (static_cast<i64>(n) * p.H + h) * p.W + w;
      *reinterpret_cast<uint4*>(static_cast<T*>(p.dst) + pixel * p.C + c) =
          uint4{words[0], words[1], words[2], words[3]};
    }
  }
}

// The OHWI copy of a w stored otherwise: out [OC, KH, KW, C] contiguous from w [OC, C, KH, KW] in
// any strides, a block an output channel (KH KW C < 2^31 elements), 32-bit index math. Writes are
// coalesced; OIHW reads are KH KW elements apart, their lines reused from L1 by the other taps.
template <typename T>
__global__ void __launch_bounds__(256) conv2d_w_ohwi(const __grid_constant__ Conv2dCopyParams p) {
  const int oc = blockIdx.x;  // N = OC, H = KH, W = KW
  const T* w = static_cast<const T*>(p.src) + oc * p.src_stride[0];
  T* out = static_cast<T*>(p.dst) + static_cast<i64>(oc) * p.H * p.W * p.C;
  const int count = p.H * p.W * p.C;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int c = i % p.C, tap = i / p.C, kh = tap / p.W, kw = tap % p.W;
    out[i] = w[c * p.src_stride[1] + kh * p.src_stride[2] + kw * p.src_stride[3]];
  }
}

}  // namespace kiln
