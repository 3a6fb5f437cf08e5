// Tensor-core GEMM with the weight dequantized in registers on the way to mma.sync (sm_80+; on
// sm_90a the fp8 weights with f16 / bf16 a and aligned rows go to gemm_sm90.cuh instead):
//   out[m, n] = residual[m, n] + gate[b(m), n] * ((sum_k a[m, k] * w[n, k]) * a_scale * w_scale
//               + bias[n])     (gate and residual optional: params.cuh's GateResidual)
// a: f32 / f16 / bf16 / fp8 [M, K] (row stride free), w: f16 / bf16 / fp8 e4m3fn or e5m2 / Q8_0
// [N, K], f32 accumulation, scales and bias in f32 in the epilogue (128x128 block scales and Q8_0
// block scales once per block in the main loop), out f32 / f16 / bf16.
//
// Layout. A CTA computes a BM x BN tile of out with WARPS_M x WARPS_N warps, each a
// (BM / WARPS_M) x (BN / WARPS_N) tile of m16n8k16 mmas, over k-tiles of 64 in a STAGES-deep
// cp.async ring. Shared memory holds a as T (the mma type, f16 or bf16: 128-byte rows of 64
// elements) and w in its own format (64-byte rows of fp8 / int8, or 128-byte rows of f16 / bf16),
// 16-byte chunks XOR-swizzled so that the fragment loads below are free of bank conflicts.
//
// The k order inside a 32-wide k block is permuted, the same way for a and w: mma slots
// {2q, 2q+1, 2q+8, 2q+9} of k16 step c (lane = 4 g + q) hold k = 8q + 4c + {0, 1, 2, 3}. So a
// lane's fragments of two k16 steps are 8 contiguous elements of one row: one 16-byte shared load
// per a row (instead of ldmatrix) and one 8-byte load per n8 of fp8 weights, decoded to 4 words
// of T by bit tricks (magnitude under T's exponent, one HMUL2 to rebias, NaN / inf bits OR-ed in
// without branches). Each decoded weight fragment feeds BM / WARPS_M / 16 mmas. f32 a is split on
// load into three T parts (hi + mid + lo == a), one mma each.
//
// Loads. A_ASYNC: a is f16 / bf16 of the mma type with 16-byte aligned rows and K % 8 == 0,
// copied by cp.async; otherwise each lane loads 8 elements, converts and stores them (f32 and fp8
// a, odd K). W_ASYNC: rows 16-byte aligned and K a multiple of a 16-byte chunk (raw fp8 / f16 /
// bf16, or any prepared weight), copied by cp.async; otherwise gathered the same way (raw Q8_0,
// whose 34-byte blocks are 2-byte aligned, and odd K). Everything past M, N and K reads as zero.
//
// Limits: M, N, K < 2^31; K % 32 == 0 for Q8_0; BN <= 128 and 128 % BN == 0 with block128 scales
// (one scale per CTA and k-tile). Offsets into a and w are 64-bit.
//
// Measured on an H200 (NOTES.md has every version and the tile sweep): e4m3fn weight with
// per-channel scales, bf16 a and out, 128 x 128 tiles of 8 warps: 158-169 TFLOP/s at Flux.2's
// M = 4608 linears, 0.22x cuBLAS bf16 (705-741 TFLOP/s with a bf16 weight): mma.sync on Hopper
// has no path to wgmma's rate, which is why gemm_sm90.cuh takes those problems there.
#pragma once

#include "device/fp8.cuh"
#include "device/mma.cuh"
#include "device/numeric.cuh"
#include "ops/matmul/kernels/gemm_params.cuh"

namespace kiln {
namespace gemm_detail {

template <bool C, typename A, typename B>
struct select_type {
  using type = A;
};
template <typename A, typename B>
struct select_type<false, A, B> {
  using type = B;
};

template <typename A, typename B>
constexpr bool same_type = false;
template <typename A>
constexpr bool same_type<A, A> = true;

// --- decode of 4 packed 8-bit weights (byte i = element i) into 2 words of T pairs ----------

__device__ __forceinline__ u32 byte_perm(u32 x, u32 y, u32 selector) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(selector));
  return r;
}

__device__ __forceinline__ u32 sub_f16x2(u32 a, u32 b) {
  u32 r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// A word of two f16 -> a word of two T (exact for T = f16; rounded to nearest for bf16).
template <typename T>
__device__ __forceinline__ u32 f16x2_to(u32 word) {
  if constexpr (same_type<T, f16>) {
    return word;
  } else {
    float lo, hi;
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;\n}"
        : "=f"(lo), "=f"(hi)
        : "r"(word));
    return pack_float2<T>(lo, hi);
  }
}

// The fp8 struct of a kind (e4m3fn / e5m2), for device/fp8.cuh's decoders.
template <int FMT>
using fp8_of = typename select_type<FMT == gemm_kind::e5m2, e5m2, e4m3>::type;

__device__ __forceinline__ u32 mul_f16x2(u32 a, u32 b) {
  u32 r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// a * b in bf16x2 (fma with -0: sm_80 has no bf16 mul; exact for the power-of-two b used here).
__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {
  u32 r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
  return r;
}

// Two bytes of a word as the high bytes of two 16-bit lanes (lane = byte << 8): bytes 0, 1
// (HI = false) or 2, 3.
template <bool HI>
__device__ __forceinline__ u32 byte_lanes(u32 x) {
  return byte_perm(x, 0u, HI ? 0x3424u : 0x1404u);
}

// Two fp8 codes in byte lanes (byte_lanes) -> T pair, exact for finite codes. The magnitude bits
// go under T's exponent field and one multiply by a power of two rebiases the exponent (e4m3 to
// f16: * 2^8; to bf16: * 2^120; e5m2 to bf16: * 2^112; e5m2 is the top byte of an f16 as is).
// ALU and HMUL2 only, the same on sm_80 (which has no fp8 cvt) and sm_90. The first version's
// cvt chain (cvt.rn.f16x2.e4m3x2, 2 x cvt.f32.f16, cvt.rn.bf16x2.f32 per pair) measured as fast
// or faster on sm_90 with 64 x 64 warp tiles (NOTES.md, "GEMM versions").
template <int FMT, typename T>
__device__ __forceinline__ u32 fp8_lanes_to(u32 lanes) {
  const u32 sign = lanes & 0x80008000u;
  if constexpr (FMT == gemm_kind::e5m2 && same_type<T, f16>) {
    return lanes;
  } else if constexpr (FMT == gemm_kind::e5m2) {
    return mul_bf16x2(sign | ((lanes >> 3) & 0x0FE00FE0u), 0x77807780u);  // 2^112
  } else if constexpr (same_type<T, f16>) {
    return mul_f16x2(sign | ((lanes >> 1) & 0x3F803F80u), 0x5C005C00u);  // 2^8
  } else {
    return mul_bf16x2(sign | ((lanes >> 4) & 0x07F007F0u), 0x7B807B80u);  // 2^120
  }
}

// The bits that turn a decoded lane into NaN / inf: T's exponent field (e5m2: inf, or NaN with
// the mantissa kept), or exponent and top mantissa bit (e4m3fn: NaN).
template <int FMT, typename T>
constexpr u32 kSpecialBits = FMT == gemm_kind::e5m2 ? 0x7F807F80u
                             : same_type<T, f16>    ? 0x7E007E00u
                                                    : 0x7FC07FC0u;

// 0xFFFF in each 16-bit lane whose byte (bytes 0, 1, or 2, 3 with HI) has its top bit set: prmt's
// sign-replicate selectors (bit 3 of a nibble).
template <bool HI>
__device__ __forceinline__ u32 byte_masks(u32 x) {
  return byte_perm(x, 0u, HI ? 0xBBAAu : 0x9988u);
}

// 4 fp8 bytes (byte i = element i) -> 2 words of T pairs {e0, e1}, {e2, e3}, exactly (fp8 values
// are exact in f16 and bf16), without branches: codes the bit trick would make finite (e4m3fn NaN,
// e5m2 inf / NaN) get their exponent bits OR-ed in afterwards. A branch on a rare special word
// (the first try) put a divergence region around every word and halved the GEMM's rate.
template <int FMT, typename T>
__device__ __forceinline__ void fp8x4_to(u32 x, u32& lo, u32& hi) {
  lo = fp8_lanes_to<FMT, T>(byte_lanes<false>(x));
  hi = fp8_lanes_to<FMT, T>(byte_lanes<true>(x));
  if constexpr (!(FMT == gemm_kind::e5m2 && same_type<T, f16>)) {  // e5m2 -> f16 is exact as is
    const u32 special = fp8_word_has_special<fp8_of<FMT>>(x);      // 0x80 in each special byte
    lo |= byte_masks<false>(special) & kSpecialBits<FMT, T>;
    hi |= byte_masks<true>(special) & kSpecialBits<FMT, T>;
  }
}

// An f16 pair holding integers of magnitude < 256 (or zero) -> the same bf16 pair, exactly: the
// f16 bits shifted under bf16's exponent, rebiased by * 2^112.
__device__ __forceinline__ u32 f16_ints_to_bf16(u32 h) {
  return mul_bf16x2((h & 0x80008000u) | ((h >> 3) & 0x0FFF0FFFu), 0x77807780u);
}

// 4 int8 bytes -> 2 words of T pairs, exactly: 0x64XX is the f16 1024 + XX, so (q + 128) under
// that exponent minus 1024 + 128 is q (bf16: then rebiased from f16).
template <typename T>
__device__ __forceinline__ void int8x4_to(u32 x, u32& lo, u32& hi) {
  const u32 biased = x ^ 0x80808080u;  // q + 128 as unsigned bytes
  lo = sub_f16x2(byte_perm(biased, 0x64646464u, 0x5140u), 0x64806480u);
  hi = sub_f16x2(byte_perm(biased, 0x64646464u, 0x7362u), 0x64806480u);
  if constexpr (!same_type<T, f16>) {
    lo = f16_ints_to_bf16(lo);
    hi = f16_ints_to_bf16(hi);
  }
}

// A word of two 16-bit values of kind K16 (f16 / bf16) -> a word of two T.
template <int K16, typename T>
__device__ __forceinline__ u32 half2_to(u32 word) {
  constexpr bool same = (K16 == gemm_kind::f16) == same_type<T, f16>;
  if constexpr (same) {
    return word;
  } else if constexpr (K16 == gemm_kind::f16) {
    return f16x2_to<T>(word);
  } else {
    const float lo = __uint_as_float(word << 16), hi = __uint_as_float(word & 0xFFFF0000u);
    return pack_float2<T>(lo, hi);
  }
}

// --- shared-memory layout ---------------------------------------------------------------------

// Byte offset of 16-byte chunk c of row r in a tile of 128-byte rows (8 chunks). Lanes 4g + q
// read chunk 4j + q of rows g (8 lanes a phase: rows g, g + 1), so odd rows swap halves.
__device__ __forceinline__ int offset128(int r, int c) {
  return r * 128 + ((c ^ ((r & 1) << 2)) << 4);
}

// Byte offset of 16-byte chunk c of row r in a tile of 64-byte rows (4 chunks). Lanes read 8
// bytes at 32j + 8q of rows g (16 lanes a phase: rows g..g+3), so rows 2, 3 mod 4 swap halves.
__device__ __forceinline__ int offset64(int r, int c) { return r * 64 + ((c ^ (r & 2)) << 4); }

__device__ __forceinline__ void st_shared_16(void* smem, u32 x, u32 y, u32 z, u32 w) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(smem_addr(smem)), "r"(x), "r"(y),
               "r"(z), "r"(w)
               : "memory");
}

__device__ __forceinline__ void ld_shared_16(u32 (&r)[4], const void* smem) {
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ld_shared_8(u32 (&r)[2], const void* smem) {
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(smem)));
}

__device__ __forceinline__ float ld_shared_f32(const float* smem) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(smem_addr(smem)));
  return v;
}

// One element of a (kind AK) as a float.
template <int AK>
__device__ __forceinline__ float load_a_element(const void* base, long long i) {
  if constexpr (AK == gemm_kind::f32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (AK == gemm_kind::f16) {
    return to_float(static_cast<const f16*>(base)[i]);
  } else if constexpr (AK == gemm_kind::bf16) {
    return to_float(static_cast<const bf16*>(base)[i]);
  } else {
    return to_float(fp8_of<AK>{static_cast<const unsigned char*>(base)[i]});
  }
}

template <int AK>
constexpr long long kAElementBytes = AK == gemm_kind::f32                              ? 4
                                     : (AK == gemm_kind::f16 || AK == gemm_kind::bf16) ? 2
                                                                                       : 1;

// The f32 values of the low / high element of a word of two T.
template <typename T>
__device__ __forceinline__ float low_half_value(u32 word) {
  if constexpr (same_type<T, f16>) {
    return to_float(f16{static_cast<unsigned short>(word & 0xFFFFu)});
  } else {
    return __uint_as_float(word << 16);
  }
}

template <typename T>
__device__ __forceinline__ float high_half_value(u32 word) {
  if constexpr (same_type<T, f16>) {
    return to_float(f16{static_cast<unsigned short>(word >> 16)});
  } else {
    return __uint_as_float(word & 0xFFFF0000u);
  }
}

template <typename T>
__device__ __forceinline__ T load_bias(const void* bias, int n) {
  return static_cast<const T*>(bias)[n];
}

}  // namespace gemm_detail

template <int AK, int WK, typename T, typename TOut, int BM, int BN, int WARPS_M, int WARPS_N,
          int STAGES, bool A_ASYNC, bool W_ASYNC, int WSCALE, bool A_ROW_SCALE, int BIAS, int GATE,
          int RESIDUAL>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    gemm_kernel(const __grid_constant__ GemmParams p) {
  using namespace gemm_detail;
  constexpr int kThreads = WARPS_M * WARPS_N * 32;
  constexpr int BK = kGemmTileK;
  constexpr int kWarpM = BM / WARPS_M, kWarpN = BN / WARPS_N;  // warp tile
  constexpr int MT = kWarpM / 16, NT = kWarpN / 8;             // mma tiles per warp
  constexpr bool kW8 = WK == gemm_kind::e4m3 || WK == gemm_kind::e5m2 || WK == gemm_kind::q8_0;
  constexpr bool kQ8 = WK == gemm_kind::q8_0;
  constexpr bool kBlock = WSCALE == gemm_scale::block128;
  constexpr int kRowW = kW8 ? 64 : 128;  // bytes per weight row of a k-tile
  // f32 a is carried as three T parts (hi + mid + lo == a exactly: 24 significant bits), one
  // mma each; a two-part split (16 bits) left 1e-5 relative errors that flipped 16-bit outputs.
  constexpr int kPartsA = AK == gemm_kind::f32 ? 3 : 1;
  constexpr int kTileA = BM * 128;  // bytes of one a tile of T
  constexpr int kStageA = kPartsA * kTileA;
  constexpr int kStageW = BN * kRowW;
  constexpr int kStageD = kQ8 ? 2 * BN * 4 : 0;  // q8_0: f32 [2][BN] block scales
  constexpr int kStage = kStageA + kStageW + kStageD;
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0, "whole m16n8 tiles per warp");
  static_assert(!kBlock || (BN <= 128 && 128 % BN == 0), "one 128x128 scale block per CTA");
  static_assert(STAGES >= 2, "a ring of at least two k-tiles");
  constexpr int kChunksW = kRowW / 16;  // 16-byte chunks per weight row of a k-tile
  constexpr int kCopiesA = BM * 8 / kThreads, kCopiesW = BN * kChunksW / kThreads;
  static_assert(kCopiesA * kThreads == BM * 8 && kCopiesW * kThreads == BN * kChunksW,
                "whole copies per thread");

  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;

  // Grouped raster: 8 consecutive CTAs walk 8 m-tiles of one n column, so a and w tiles are
  // reused from L2.
  const int tiles_m = (p.m + BM - 1) / BM, tiles_n = (p.n + BN - 1) / BN;
  constexpr int kGroup = 8;
  const int id = blockIdx.x;
  const int group = id / (kGroup * tiles_n);
  const int first_m = group * kGroup;
  const int group_rows = min(tiles_m - first_m, kGroup);
  const int tile_m = first_m + (id % (kGroup * tiles_n)) % group_rows;
  const int tile_n = (id % (kGroup * tiles_n)) / group_rows;
  const int m0 = tile_m * BM, n0 = tile_n * BN;
  const int k_tiles = (p.k + BK - 1) / BK;

  // This thread's copies: a rows a_r0 + it * kRowStepA at chunk tid % 8, w rows w_r0 + it *
  // kRowStepW at chunk tid % kChunksW. One base pointer and a row step each, for registers (rows
  // past M / N are never read).
  constexpr int kRowStepA = kThreads / 8, kRowStepW = kThreads / kChunksW;
  const int a_r0 = tid >> 3, w_r0 = tid / kChunksW;
  const int a_rows_left = p.m - m0 - a_r0, w_rows_left = p.n - n0 - w_r0;
  const long long a_step = (long long)kRowStepA * p.a_stride * kAElementBytes<AK>;
  const long long w_step = (long long)kRowStepW * p.w_stride;
  const unsigned char* a_base =
      static_cast<const unsigned char*>(p.a) +
      (a_rows_left > 0 ? (long long)(m0 + a_r0) * p.a_stride * kAElementBytes<AK> : 0);
  const unsigned char* w_base = static_cast<const unsigned char*>(p.w) +
                                (w_rows_left > 0 ? (long long)(n0 + w_r0) * p.w_stride : 0);

  // Issues the copies of k-tile kt into stage s (cp.async, or loads + shared stores).
  auto load_tile = [&](int kt, int s) {
    unsigned char* sa = smem + s * kStage;
    unsigned char* sw = sa + kStageA;
    const int k0 = kt * BK;
    // a: BM rows x 8 chunks of 8 elements.
#pragma unroll
    for (int it = 0; it < kCopiesA; ++it) {
      const int i = tid + it * kThreads;
      const int r = i >> 3, c = i & 7;
      const int k = k0 + c * 8;
      unsigned char* dst = sa + offset128(r, c);
      const bool row_in = it * kRowStepA < a_rows_left;
      const unsigned char* row = a_base + it * a_step;
      if constexpr (A_ASYNC) {
        const bool valid = row_in && k < p.k;
        cp_async_16(dst, valid ? row + (long long)k * sizeof(T) : p.a, valid);
      } else {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          v[e] = row_in && k + e < p.k ? load_a_element<AK>(row, k + e) : 0.f;
        }
        // Part h is T(a - parts before it), exact in f32 at every step.
#pragma unroll
        for (int h = 0; h < kPartsA; ++h) {
          u32 word[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            word[e] = pack_float2<T>(v[2 * e], v[2 * e + 1]);
            if (h + 1 < kPartsA) {
              v[2 * e] -= low_half_value<T>(word[e]);
              v[2 * e + 1] -= high_half_value<T>(word[e]);
            }
          }
          st_shared_16(dst + h * kTileA, word[0], word[1], word[2], word[3]);
        }
      }
    }
    // w: BN rows x (kRowW / 16) chunks.
    constexpr int kElems = kW8 ? 16 : 8;  // elements per chunk
#pragma unroll
    for (int it = 0; it < kCopiesW; ++it) {
      const int i = tid + it * kThreads;
      const int r = i / kChunksW, c = i % kChunksW;
      const int k = k0 + c * kElems;
      const bool row_in = it * kRowStepW < w_rows_left;
      unsigned char* dst = sw + (kW8 ? offset64(r, c) : offset128(r, c));
      const unsigned char* row = w_base + it * w_step;
      if constexpr (W_ASYNC) {
        const bool valid = row_in && k < p.k;
        cp_async_16(dst, valid ? row + (long long)k * (kW8 ? 1 : 2) : p.w, valid);
      } else if constexpr (kQ8) {
        // ggml blocks: 16 quants at byte 34 (k / 32) + 2 + k % 32, 2-byte aligned.
        u32 word[4] = {0u, 0u, 0u, 0u};
        if (row_in && k < p.k) {
          const unsigned short* src = reinterpret_cast<const unsigned short*>(
              row + (long long)(k >> 5) * 34 + 2 + (k & 31));
#pragma unroll
          for (int e = 0; e < 4; ++e) word[e] = u32(src[2 * e]) | (u32(src[2 * e + 1]) << 16);
        }
        st_shared_16(dst, word[0], word[1], word[2], word[3]);
      } else {
        u32 word[4] = {0u, 0u, 0u, 0u};
        if (row_in) {
#pragma unroll
          for (int b = 0; b < 16; ++b) {
            const int kk = k + (kW8 ? b : b / 2);
            const u32 byte = kk < p.k ? row[(long long)k * (kW8 ? 1 : 2) + b] : 0u;
            word[b >> 2] |= byte << ((b & 3) * 8);
          }
        }
        st_shared_16(dst, word[0], word[1], word[2], word[3]);
      }
    }
    if constexpr (kQ8) {
      float* sd = reinterpret_cast<float*>(sw + kStageW);  // [2][BN]
      if constexpr (W_ASYNC) {
        // packed: f32 [k-tile][2][n_pad], 4 rows a chunk (n_pad % 4 == 0, zero past N).
        for (int i = tid; i < 2 * BN / 4; i += kThreads) {
          const int j = i / (BN / 4), r = (i % (BN / 4)) * 4;
          const bool valid = n0 + r < p.n_pad;
          const float* src = p.w_d + ((long long)kt * 2 + j) * p.n_pad + n0 + r;
          cp_async_16(sd + j * BN + r, valid ? src : p.w_d, valid);
        }
      } else {
        for (int i = tid; i < 2 * BN; i += kThreads) {
          const int j = i / BN, r = i % BN;
          const int n = n0 + r, kb = kt * 2 + j;
          float d = 0.f;
          if (n < p.n && kb * 32 < p.k) {
            const unsigned char* row =
                static_cast<const unsigned char*>(p.w) + (long long)n * p.w_stride;
            d = to_float(*reinterpret_cast<const f16*>(row + (long long)kb * 34));
          }
          sd[j * BN + r] = d;
        }
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

        // Prologue: STAGES - 1 tiles in flight.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    // The stage freed by the previous iteration takes tile kt + STAGES - 1.
    if (kt + STAGES - 1 < k_tiles) load_tile(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
    cp_async_commit();

    const unsigned char* sa = smem + (kt % STAGES) * kStage;
    const unsigned char* sw = sa + kStageA;
    // Q8_0 and block128: this tile's products in `part`, scaled into acc per 32 / 64 of k.
    constexpr bool kPart = kQ8 || kBlock;
    float part[kPart ? MT : 1][kPart ? NT : 1][4];

#pragma unroll
    for (int j = 0; j < 2; ++j) {  // k blocks of 32
      if constexpr (kPart) {
        if (kQ8 || j == 0) {
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
              for (int e = 0; e < 4; ++e) part[i][t][e] = 0.f;
        }
      }
      constexpr int kParts = kPartsA;
      u32 af[kParts][MT][2][4];  // [part of a][mt][k16 step][fragment]
#pragma unroll
      for (int h = 0; h < kParts; ++h)
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const int r = warp_m * kWarpM + i * 16 + g;
          u32 top[4], bottom[4];  // rows r and r + 8
          ld_shared_16(top, sa + h * kTileA + offset128(r, 4 * j + q));
          ld_shared_16(bottom, sa + h * kTileA + offset128(r + 8, 4 * j + q));
          af[h][i][0][0] = top[0], af[h][i][0][1] = bottom[0];
          af[h][i][0][2] = top[1], af[h][i][0][3] = bottom[1];
          af[h][i][1][0] = top[2], af[h][i][1][1] = bottom[2];
          af[h][i][1][2] = top[3], af[h][i][1][3] = bottom[3];
        }
        // One n8 column of weights at a time: decoded (4 words) and used by every m16 tile of the
        // warp before the next, so only its fragments are live.
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int r = warp_n * kWarpN + t * 8 + g;
        u32 bf[2][2];  // [k16 step][fragment]
        if constexpr (kW8) {
          u32 raw[2];
          ld_shared_8(raw, sw + offset64(r, 2 * j + (q >> 1)) + (q & 1) * 8);
          if constexpr (kQ8) {
            int8x4_to<T>(raw[0], bf[0][0], bf[0][1]);
            int8x4_to<T>(raw[1], bf[1][0], bf[1][1]);
          } else {
            fp8x4_to<WK, T>(raw[0], bf[0][0], bf[0][1]);
            fp8x4_to<WK, T>(raw[1], bf[1][0], bf[1][1]);
          }
        } else {
          u32 raw[4];
          ld_shared_16(raw, sw + offset128(r, 4 * j + q));
          bf[0][0] = half2_to<WK, T>(raw[0]), bf[0][1] = half2_to<WK, T>(raw[1]);
          bf[1][0] = half2_to<WK, T>(raw[2]), bf[1][1] = half2_to<WK, T>(raw[3]);
        }
#pragma unroll
        for (int h = 0; h < kParts; ++h)
#pragma unroll
          for (int c = 0; c < 2; ++c)
#pragma unroll
            for (int i = 0; i < MT; ++i) {
              if constexpr (kPart) {
                mma_16x8x16<T>(part[i][t], af[h][i][c], bf[c]);
              } else {
                mma_16x8x16<T>(acc[i][t], af[h][i][c], bf[c]);
              }
            }
      }
      if constexpr (kQ8) {
        // acc += part * d[n] for this 32-block; the lane's columns are 2q, 2q + 1 of each n8.
        const float* sd = reinterpret_cast<const float*>(sw + kStageW) + j * BN;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int c = warp_n * kWarpN + t * 8 + 2 * q;
          const float d0 = ld_shared_f32(sd + c), d1 = ld_shared_f32(sd + c + 1);
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            acc[i][t][0] += part[i][t][0] * d0;
            acc[i][t][1] += part[i][t][1] * d1;
            acc[i][t][2] += part[i][t][2] * d0;
            acc[i][t][3] += part[i][t][3] * d1;
          }
        }
      }
    }
    if constexpr (kBlock) {
      // One scale for the CTA's 128-row block of n and this k-tile's 128-column block.
      const float s = p.w_scale[(n0 / 128) * p.scale_cols + (kt * BK) / 128];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][t][e] += part[i][t][e] * s;
    }
  }
  cp_async_wait<0>();

  // Epilogue: scales and bias in f32, then gate and residual (row by row), then the lane's pairs
  // of columns. The thread that stores an element reads its residual first (out may be it).
  const float tensor_scale = (WSCALE == gemm_scale::tensor ? p.w_scale[0] : 1.f) *
                             (p.a_scale != nullptr && !A_ROW_SCALE ? p.a_scale[0] : 1.f);
  const bool pairs = (p.n & 1) == 0 && (reinterpret_cast<u64>(p.out) & 7) == 0;
  float col_scale[NT][2], col_bias[NT][2];  // (n8 tile, column of the lane's pair)
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int n = n0 + warp_n * kWarpN + t * 8 + 2 * q;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool in = n + e < p.n;
      col_scale[t][e] = tensor_scale * (WSCALE == gemm_scale::row && in ? p.w_scale[n + e] : 1.f);
      col_bias[t][e] = 0.f;
      if constexpr (BIAS == gemm_bias::f32)
        col_bias[t][e] = in ? load_bias<float>(p.bias, n + e) : 0.f;
      if constexpr (BIAS == gemm_bias::f16)
        col_bias[t][e] = in ? to_float(load_bias<f16>(p.bias, n + e)) : 0.f;
      if constexpr (BIAS == gemm_bias::bf16)
        col_bias[t][e] = in ? to_float(load_bias<bf16>(p.bias, n + e)) : 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + warp_m * kWarpM + i * 16 + g + 8 * h;
      if (m >= p.m) continue;
      const float row_scale = A_ROW_SCALE ? p.a_scale[m] : 1.f;
      const auto row = row_gate_residual<GATE, RESIDUAL>(p.epilogue, m);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int n = n0 + warp_n * kWarpN + t * 8 + 2 * q;
        float v0 = acc[i][t][2 * h] * col_scale[t][0] * row_scale + col_bias[t][0];
        float v1 = acc[i][t][2 * h + 1] * col_scale[t][1] * row_scale + col_bias[t][1];
        if (n < p.n) v0 = row(n, v0);
        if (n + 1 < p.n) v1 = row(n + 1, v1);
        TOut* out = static_cast<TOut*>(p.out) + (long long)m * p.n + n;
        if (pairs && n + 1 < p.n) {
          if constexpr (sizeof(TOut) == 4) {
            asm volatile("st.global.v2.f32 [%0], {%1, %2};" ::"l"(out), "f"(v0), "f"(v1)
                         : "memory");
          } else {
            asm volatile("st.global.b32 [%0], %1;" ::"l"(out), "r"(pack_float2<TOut>(v0, v1))
                         : "memory");
          }
        } else {
          if (n < p.n) out[0] = from_float<TOut>(v0);
          if (n + 1 < p.n) out[1] = from_float<TOut>(v1);
        }
      }
    }
  }
}

}  // namespace kiln
