// The small-M matmul (M <= 16): out [M, N] = (a [M, K] . w^T) * a_scale * w_scale + bias, fused
// kernels that stream the weight once, in its stored format, and dequantize in registers. Two:
//
// gemv_mma_kernel (tensor cores; f16 / bf16 a; fp8 weights, 16-bit weights of a's type, q8_0
// from M = 5): "swap AB" mma.m16n8k16, the 16 weight rows of a block as the A operand decoded in
// registers from 16-byte coalesced loads (never through shared memory), up to 8 tokens of a as
// the B operand (two fragments for M = 9-16), f32 accumulators; the block's warps split K and add
// their sums through shared memory in warp order. Layout and limits beside the kernel below.
// The weight decode is 5 integer ops and two HFMA2 for 4 values (instead of 12 and 4 FMUL), and
// the M FMAs a value went to the tensor cores: from M = 4 it is well ahead of gemv_kernel, whose
// FMAs were the bound. At M = 1 both kernels take the same time (a fixed intercept plus the bytes
// at a rate cuBLAS bf16 matches), so the decode is not the bound there. NOTES.md, "GEMV v2";
// dev/matmul/paths.py times both kernels' paths over M.
//
// gemv_kernel (CUDA cores; every a and weight type, any alignment): warp w of block x owns the R
// weight rows n = (x * WARPS + w) * R + r (rows past N load row N - 1 and are discarded). Its
// lanes walk the K range of blockIdx.y (split-K) in 16-byte chunks of a row, lane l taking chunks
// l, l + 32, ... (coalesced 16-byte loads, U chunks of each of the R rows in flight), and keep all
// M rows of a per weight chunk: acc[R][M] in f32. The weight's chunk is decoded once and used for
// all M rows of a; a chunk of a (read through L1, shared by the R rows) once for all R rows.
//   fp8   16 codes a chunk; bit-trick decode (src/device/fp8.cuh), exact decode for the rare
//         chunk holding a NaN/inf code. block128 scales multiply each chunk's partial sums.
//   f16/bf16  8 values a chunk.
//   q8_0  34-byte blocks are not 16-byte aligned, so a warp stages 32 blocks (1088 bytes, 68
//         chunks) of each of its rows in shared memory with coalesced 16-byte loads, then lane l
//         takes block l: d * sum(qs * a) per block.
// Limits: VEC (16-byte loads of w) needs a 16-byte-aligned weight and row size (fp8 K % 16,
// f16/bf16 K % 8, q8_0 K % 256); otherwise chunks are single elements (q8_0: 2-byte loads into
// the stage), correct and slow. A_VEC: a chunk of a read with 16-byte loads (aligned rows).
// It runs f32 and fp8 a, unaligned operands, and where it measured faster than the tensor-core
// kernel: q8_0 at M <= 4 (16-byte staged loads against 4-byte ones) and 16-bit weights at M <= 2
// (one integer op a value to decode). The bit-trick decode beat a shared-memory table (NOTES.md,
// "Decoding").
//
// Epilogue (both): without split-K the scales, bias, gate and residual (out = residual + gate *
// (sum * scales + bias), params.cuh's GateResidual) are applied and out written by the kernel;
// with split-K (few rows, long K) each split writes its partial sums to its slice of an f32
// [splits, M, N] buffer and gemv_epilogue_kernel adds them in split order (deterministic: no
// atomics) and applies the rest. The thread that writes an output element reads its residual
// first, so out may be the residual itself.
#pragma once

#include "device/fp8.cuh"
#include "device/mma.cuh"
#include "device/numeric.cuh"
#include "device/vec.cuh"
#include "ops/matmul/kernels/params.cuh"

namespace kiln {

// The weight formats as template arguments.
inline constexpr int kWeightF16 = 0;
inline constexpr int kWeightBf16 = 1;
inline constexpr int kWeightE4m3 = 2;
inline constexpr int kWeightE5m2 = 3;
inline constexpr int kWeightQ8_0 = 4;

template <int WFMT>
struct gemv_weight;
template <>
struct gemv_weight<kWeightF16> {
  using type = f16;
  static constexpr int per_chunk = 8;
};
template <>
struct gemv_weight<kWeightBf16> {
  using type = bf16;
  static constexpr int per_chunk = 8;
};
template <>
struct gemv_weight<kWeightE4m3> {
  using type = e4m3;
  static constexpr int per_chunk = 16;
};
template <>
struct gemv_weight<kWeightE5m2> {
  using type = e5m2;
  static constexpr int per_chunk = 16;
};

// 16 bytes of the weight stream, read once: through the non-coherent path without allocating in
// L1 (the activations are what L1 should keep; measured neutral against a plain load, NOTES.md).
__device__ __forceinline__ uint4 load_weight_16(const void* p) {
  uint4 v;
  asm("{\n\t.reg .u64 g;\n\tcvta.to.global.u64 g, %4;\n\t"
      "ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [g];\n\t}"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Decodes one 16-byte chunk of a weight row (words in memory order) to E f32 values. fp8: the
// bit-trick decoder, or with EXACT the rule-by-rule one (chunks holding NaN or inf codes).
template <int WFMT, int E, bool EXACT>
__device__ __forceinline__ void decode_chunk(const u32 (&w)[4], float (&v)[E]) {
  using T = typename gemv_weight<WFMT>::type;
  if constexpr (is_fp8_type<T>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float four[4];
      if constexpr (EXACT) {
        fp8_word_to_float_exact<T>(w[i], four);
      } else {
        fp8_word_to_float<T>(w[i], four);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) v[4 * i + j] = four[j];
    }
  } else if constexpr (WFMT == kWeightBf16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned short lo, hi;
      unpack_halves(w[i], lo, hi);
      v[2 * i] = to_float(f16{lo});
      v[2 * i + 1] = to_float(f16{hi});
    }
  }
}

// N consecutive values of a (row m, from column k) as f32; fp8 a decoded exactly.
template <typename Ta, int N, bool A_VEC>
__device__ __forceinline__ void load_a(const GemvParams& p, int m, long long k, float (&v)[N]) {
  const Ta* row = static_cast<const Ta*>(p.a) + m * p.a_stride + k;
  if constexpr (is_fp8_type<Ta> && A_VEC && N % 16 == 0) {
#pragma unroll
    for (int c = 0; c < N / 16; ++c) {
      const uint4 q = *static_cast<const uint4*>(__builtin_assume_aligned(row + 16 * c, 16));
      const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float four[4];
        fp8_word_to_float_exact<Ta>(words[i], four);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[16 * c + 4 * i + j] = four[j];
      }
    }
  } else if constexpr (!is_fp8_type<Ta> && A_VEC && N * sizeof(Ta) % 16 == 0) {
    Ta raw[N];
    load_vec(raw, row);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_float(raw[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_float(row[i]);
  }
}

// Warp sum of every accumulator; afterwards each lane holds the totals.
template <int R, int M>
__device__ __forceinline__ void warp_sum(float (&acc)[R][M]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
      for (int o = 16; o > 0; o /= 2) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
    }
  }
}

template <int AKIND>
__device__ __forceinline__ float a_scale_of(const float* a_scale, int m) {
  if constexpr (AKIND == kScaleTensor) return a_scale[0];
  if constexpr (AKIND == kScaleRow) return a_scale[m];
  return 1.f;
}

template <int WKIND>
__device__ __forceinline__ float w_scale_of(const float* w_scale, long long n) {
  if constexpr (WKIND == kScaleTensor) return w_scale[0];
  if constexpr (WKIND == kScaleRow) return w_scale[n];
  return 1.f;  // none; block128 is applied in the main loop
}

template <typename Tout, typename Tbias, int M, int R, int WKIND, int AKIND, bool BIAS, bool SPLIT,
          int GATE, int RESIDUAL>
__device__ __forceinline__ void gemv_store(const GemvParams& p, long long n0,
                                           const float (&acc)[R][M]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const long long n = n0 + r;
      if (lane == (r * M + m) % 32 && n < p.n) {
        if constexpr (SPLIT) {
          p.partial[(blockIdx.y * (long long)M + m) * p.n + n] = acc[r][m];
        } else {
          float v = acc[r][m] * w_scale_of<WKIND>(p.w_scale, n) * a_scale_of<AKIND>(p.a_scale, m);
          if constexpr (BIAS) v += to_float(static_cast<const Tbias*>(p.bias)[n]);
          v = row_gate_residual<GATE, RESIDUAL>(p.epilogue, m)(n, v);
          static_cast<Tout*>(p.out)[m * p.n + n] = from_float<Tout>(v);
        }
      }
    }
  }
}

// The U loaded chunks of R rows of one lane (chunk u at k_lane + 32 * E * u), into acc.
template <typename Ta, int WFMT, int M, int R, int U, int E, int WKIND, bool VEC, bool A_VEC,
          bool EXACT>
__device__ __forceinline__ void gemv_chunks(const GemvParams& p, long long n0, long long k_lane,
                                            long long k_end, const u32 (&raw)[R][U][4],
                                            float (&acc)[R][M]) {
  using Tw = typename gemv_weight<WFMT>::type;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long long k = k_lane + 32LL * E * u;
    if (k >= k_end) break;
    float w[R][E];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if constexpr (VEC) {
        decode_chunk<WFMT, E, EXACT>(raw[r][u], w[r]);
      } else {
        w[r][0] = to_float(Tw{static_cast<decltype(Tw{}.bits)>(raw[r][u][0])});
      }
    }
    float part[R][M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float av[E];
      load_a<Ta, E, A_VEC>(p, m, k, av);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float t = 0.f;
#pragma unroll
        for (int j = 0; j < E; ++j) t = fmaf(av[j], w[r][j], t);
        part[r][m] = t;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = 1.f;
      if constexpr (WKIND == kScaleBlock128) {
        s = p.w_scale[(min_i64(n0 + r, p.n - 1) / 128) * p.scale_cols + k / 128];
      }
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = fmaf(s, part[r][m], acc[r][m]);
    }
  }
}

// fp8, f16 and bf16 weights: 16-byte chunks of E values, U chunks of each row in flight. The
// loop is warp-uniform (steps of 32 * E * U), so that the NaN/inf test can vote: a step whose
// chunks hold no special code (all of them, in practice) takes the bit-trick decoder, without a
// per-value branch in the hot loop.
template <typename Ta, int WFMT, int M, int R, int WKIND, bool VEC, bool A_VEC>
__device__ __forceinline__ void gemv_rows(const GemvParams& p, long long n0, long long k_begin,
                                          long long k_end, float (&acc)[R][M]) {
  using Tw = typename gemv_weight<WFMT>::type;
  constexpr int E = VEC ? gemv_weight<WFMT>::per_chunk : 1;  // values per chunk
  constexpr int U = 2;                                       // chunks per row in flight
  const int lane = threadIdx.x % 32;
  const unsigned char* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    rows[r] = static_cast<const unsigned char*>(p.w) + min_i64(n0 + r, p.n - 1) * p.w_row_bytes;
  }
  for (long long k_step = k_begin; k_step < k_end; k_step += 32LL * E * U) {
    const long long k_lane = k_step + lane * E;
    // (R, U) chunks: 16 bytes each (VEC) or one value. Branch-free: a chunk past k_end loads
    // the last chunk of the range instead (discarded by gemv_chunks), so that every load is
    // issued back to back.
    u32 raw[R][U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long k = k_lane + 32LL * E * u;
      const long long k_load = k < k_end ? k : k_end - E;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (VEC) {
          const uint4 q = load_weight_16(rows[r] + k_load * sizeof(Tw));
          raw[r][u][0] = q.x, raw[r][u][1] = q.y, raw[r][u][2] = q.z, raw[r][u][3] = q.w;
        } else {
          raw[r][u][0] = sizeof(Tw) == 1
                             ? u32(rows[r][k_load])
                             : u32(reinterpret_cast<const unsigned short*>(rows[r])[k_load]);
        }
      }
    }
    if constexpr (is_fp8_type<Tw> && VEC) {
      u32 special = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int i = 0; i < 4; ++i) special |= fp8_word_has_special<Tw>(raw[r][u][i]);
        }
      }
      if (__any_sync(0xffffffffu, special != 0)) {
        gemv_chunks<Ta, WFMT, M, R, U, E, WKIND, VEC, A_VEC, true>(p, n0, k_lane, k_end, raw, acc);
        continue;
      }
    }
    gemv_chunks<Ta, WFMT, M, R, U, E, WKIND, VEC, A_VEC, false>(p, n0, k_lane, k_end, raw, acc);
  }
}

// q8_0 weights: per warp a stage of R rows x 32 blocks in shared memory.
template <typename Ta, int M, int R, bool VEC, bool A_VEC>
__device__ __forceinline__ void gemv_rows_q8_0(const GemvParams& p, long long n0, long long k_begin,
                                               long long k_end, unsigned char* stage,
                                               float (&acc)[R][M]) {
  constexpr int kStepBlocks = 32;
  constexpr int kStepBytes = kStepBlocks * kQ8BlockBytes;  // 1088
  const int lane = threadIdx.x % 32;
  for (long long kb = k_begin; kb < k_end; kb += kStepBlocks * kQ8Block) {
    const int blocks = int(min_i64(kStepBlocks, (k_end - kb) / kQ8Block));
    const long long byte0 = kb / kQ8Block * kQ8BlockBytes;
    const unsigned char* src[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      src[r] =
          static_cast<const unsigned char*>(p.w) + min_i64(n0 + r, p.n - 1) * p.w_row_bytes + byte0;
    }
    if constexpr (VEC) {
      // All R x 3 loads of a lane first (68 chunks of 16 bytes a row: lanes 0-3 take 3, the rest
      // 2; a lane past the end reloads the last chunk and does not store it), then the stores.
      constexpr int kPerLane = (kStepBytes / 16 + 31) / 32;
      const int chunks = blocks * kQ8BlockBytes / 16;  // blocks % 8 == 0
      uint4 v[R][kPerLane];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int c = min(lane + 32 * j, chunks - 1);
          v[r][j] = load_weight_16(src[r] + 16 * c);
        }
      }
      __syncwarp();  // the previous step's reads of the stage are done
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          if (lane + 32 * j < chunks) {
            reinterpret_cast<uint4*>(stage + r * kStepBytes)[lane + 32 * j] = v[r][j];
          }
        }
      }
    } else {
      __syncwarp();  // the previous step's reads of the stage are done
      const int halves = blocks * kQ8BlockBytes / 2;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        for (int c = lane; c < halves; c += 32) {
          reinterpret_cast<unsigned short*>(stage + r * kStepBytes)[c] =
              reinterpret_cast<const unsigned short*>(src[r])[c];
        }
      }
    }
    __syncwarp();
    if (lane < blocks) {
      const long long k = kb + lane * kQ8Block;
      // Block `lane` starts at byte 34 * lane of a row's stage (16-byte aligned): its qs begin
      // 2 bytes in, at a word boundary for odd lanes and half a word off for even ones, so qs
      // words are funnel shifts of aligned shared words (shift 0 or 16), and d is the low or
      // high half of the word holding it.
      const u32 addr = u32(lane) * kQ8BlockBytes;
      const u32 qs_word = (addr + 2) / 4;
      const u32 qs_shift = ((addr + 2) % 4) * 8;
      float d[R];
      float part[R][M];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const u32* words = reinterpret_cast<const u32*>(stage + r * kStepBytes);
        d[r] = to_float(f16{static_cast<unsigned short>(words[addr / 4] >> ((addr % 4) * 8))});
#pragma unroll
        for (int m = 0; m < M; ++m) part[r][m] = 0.f;
      }
      // The block in 4 pieces of 8 values (two words of qs each).
#pragma unroll
      for (int piece = 0; piece < 4; ++piece) {
        float w[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const u32* words = reinterpret_cast<const u32*>(stage + r * kStepBytes) + qs_word;
          const u32 w0 = words[2 * piece], w1 = words[2 * piece + 1], w2 = words[2 * piece + 2];
          float four[4];
          q8_word_to_float(__funnelshift_r(w0, w1, qs_shift), four);
#pragma unroll
          for (int j = 0; j < 4; ++j) w[r][j] = four[j];
          q8_word_to_float(__funnelshift_r(w1, w2, qs_shift), four);
#pragma unroll
          for (int j = 0; j < 4; ++j) w[r][4 + j] = four[j];
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float av[8];
          load_a<Ta, 8, A_VEC>(p, m, k + 8 * piece, av);
#pragma unroll
          for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int j = 0; j < 8; ++j) part[r][m] = fmaf(av[j], w[r][j], part[r][m]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = fmaf(d[r], part[r][m], acc[r][m]);
      }
    }
  }
}

template <typename Ta, int WFMT, typename Tout, typename Tbias, int M, int R, int WARPS, int WKIND,
          int AKIND, bool BIAS, bool SPLIT, bool VEC, bool A_VEC, int GATE, int RESIDUAL>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(const __grid_constant__ GemvParams p) {
  const int warp = threadIdx.x / 32;
  const long long n0 = (blockIdx.x * (long long)WARPS + warp) * R;
  const long long k_begin = blockIdx.y * p.k_per_split;
  const long long k_end = min_i64(p.k, k_begin + p.k_per_split);
  if (n0 >= p.n) return;  // the whole warp: only warp-level synchronization below
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  }
  if constexpr (WFMT == kWeightQ8_0) {
    // 16 bytes of slack per warp: the last block's last qs word reads up to 4 bytes past it.
    __shared__ __align__(16) unsigned char stage[WARPS][R * 32 * kQ8BlockBytes + 16];
    gemv_rows_q8_0<Ta, M, R, VEC, A_VEC>(p, n0, k_begin, k_end, stage[warp], acc);
  } else {
    gemv_rows<Ta, WFMT, M, R, WKIND, VEC, A_VEC>(p, n0, k_begin, k_end, acc);
  }
  warp_sum(acc);
  gemv_store<Tout, Tbias, M, R, WKIND, AKIND, BIAS, SPLIT, GATE, RESIDUAL>(p, n0, acc);
}

// After a split-K gemv_kernel (and the Hopper GEMM's split-K): out = residual + gate * ((the
// splits' partial sums added in split order, so the result does not depend on scheduling) *
// w_scale * a_scale + bias), one thread an element; splits = 0 (K = 0) reads no partial.
template <typename Tout, typename Tbias, int WKIND, int AKIND, bool BIAS, int GATE, int RESIDUAL>
__global__ void gemv_epilogue_kernel(const __grid_constant__ GemvEpilogueParams p) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= p.m * p.n) return;
  const int m = int(i / p.n);
  const long long n = i - m * p.n;
  float sum = 0.f;
  for (long long s = 0; s < p.splits; ++s) sum += p.partial[s * p.m * p.n + i];
  float v = sum * w_scale_of<WKIND>(p.w_scale, n) * a_scale_of<AKIND>(p.a_scale, m);
  if constexpr (BIAS) v += to_float(static_cast<const Tbias*>(p.bias)[n]);
  v = row_gate_residual<GATE, RESIDUAL>(p.epilogue, m)(n, v);
  static_cast<Tout*>(p.out)[i] = from_float<Tout>(v);
}

// ---- the tensor-core GEMV: f16 / bf16 a; fp8, q8_0, or 16-bit weights of a's type ------------
//
// One block owns a tile of 16 weight rows n0 .. n0 + 15 ("swap AB": the rows are the 16-row A
// operand of mma.m16n8k16, the tokens the n8 B operand, two B fragments for M = 9-16); its WARPS
// warps split the block's K range into contiguous slices (k_per_split / WARPS, a multiple of 128)
// and add their accumulators through shared memory in warp order at the end (deterministic).
// Lane (group g = lane / 4, quad q = lane % 4) of a warp loads, per segment of 4 * E values of k,
// the 16 bytes at k = seg + E q .. seg + E q + E - 1 of rows n0 + g and n0 + g + 8 (E = 16 fp8 or
// 8 16-bit values: 64-byte coalesced runs of each row), U segments in flight, and converts them in
// registers straight into A fragments: weights never touch shared memory. An A fragment's k slots
// {2q, 2q + 1} and {2q + 8, 2q + 9} hold 4 consecutive k of the lane's 16 bytes (fp8: in the order
// {0, 2}, {1, 3} that fp8x4_to_pairs produces; 16-bit: {0, 1}, {2, 3}), so one mma takes 4 k from
// each quad; the B fragment of token g holds the same 4 k of a, read with 16-byte loads (fp8:
// pairs permuted to match by two byte permutes, shared by the 16 rows).
// fp8 codes that the bit trick would decode as finite (e4m3 NaN, e5m2 inf / NaN into bf16) are
// found by one vote per step, which then decodes the whole step rule by rule (exact).
// block128 scales: a fresh accumulator per 128-wide k-chunk (2 segments), scaled into the sum.
// q8_0: gemv_mma_rows_q8_0 (segments of two blocks). Limits: a rows 16-byte aligned; fp8 /
// 16-bit weights in 16-byte-aligned rows (fp8 K % 16, 16-bit K % 8), q8_0 4-byte aligned with
// K % 64; K tails inside a segment are zero-filled chunks (never loaded).
template <typename Ta, typename Tw, int E, int M, int F, bool EXACT>
__device__ __forceinline__ void gemv_mma_segment(const GemvParams& p, long long k, long long k_end,
                                                 const u32 (&raw)[2][4], float (&acc)[F][4]) {
  constexpr int kSteps = E / 4;  // mma k16 steps of a segment
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  // B: token 8 f + g, the lane's E values of a (zero past M or past the range).
  u32 b[F][E / 2];
#pragma unroll
  for (int f = 0; f < F; ++f) {
    const int m = 8 * f + g;
    if (m < M && k < k_end) {
      const Ta* row = static_cast<const Ta*>(p.a) + m * p.a_stride + k;
#pragma unroll
      for (int c = 0; c < E / 8; ++c) {
        const uint4 v = static_cast<const uint4*>(__builtin_assume_aligned(row, 16))[c];
        b[f][4 * c] = v.x, b[f][4 * c + 1] = v.y, b[f][4 * c + 2] = v.z, b[f][4 * c + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < E / 2; ++i) b[f][i] = 0u;
    }
  }
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    u32 a[4];
    u32 bs[F][2];
    if constexpr (is_fp8_type<Tw>) {
      // 4 codes of each row: a[0], a[1] = k {0, 2} of rows g, g + 8; a[2], a[3] = k {1, 3}.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if constexpr (EXACT) {
          float v[4];
          fp8_word_to_float_exact<Tw>(raw[r][s], v);
          a[r] = pack_float2<Ta>(v[0], v[2]);
          a[2 + r] = pack_float2<Ta>(v[1], v[3]);
        } else {
          fp8x4_to_pairs<Tw, Ta>(raw[r][s], a[r], a[2 + r]);
        }
      }
#pragma unroll
      for (int f = 0; f < F; ++f) {
        bs[f][0] = __byte_perm(b[f][2 * s], b[f][2 * s + 1], 0x5410u);  // k 0, 2
        bs[f][1] = __byte_perm(b[f][2 * s], b[f][2 * s + 1], 0x7632u);  // k 1, 3
      }
    } else {
      a[0] = raw[0][2 * s], a[1] = raw[1][2 * s];
      a[2] = raw[0][2 * s + 1], a[3] = raw[1][2 * s + 1];
#pragma unroll
      for (int f = 0; f < F; ++f) bs[f][0] = b[f][2 * s], bs[f][1] = b[f][2 * s + 1];
    }
#pragma unroll
    for (int f = 0; f < F; ++f) mma_16x8x16<Ta>(acc[f], a, bs[f]);
  }
}

// The U segments of one step of a warp (segment u at k0 + 4 E u) into acc; block128: a fresh
// partial sum per 128-wide k-chunk, scaled into acc.
template <typename Ta, typename Tw, int E, int M, int F, int U, int WKIND, bool EXACT>
__device__ __forceinline__ void gemv_mma_step(const GemvParams& p, long long n0, long long k0,
                                              long long k_end, const u32 (&raw)[U][2][4],
                                              float (&acc)[F][4]) {
  constexpr int kSeg = 4 * E;
  constexpr int kBlock = 128;                                          // block128's k-chunk
  constexpr int kGroup = WKIND == kScaleBlock128 ? kBlock / kSeg : U;  // segments a scale
  static_assert(U % kGroup == 0, "scale chunks inside a step");
  const int q = threadIdx.x % 4;
  float part[F][4];
#pragma unroll
  for (int f = 0; f < F; ++f) {
#pragma unroll
    for (int j = 0; j < 4; ++j) part[f][j] = 0.f;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const long long seg = k0 + kSeg * u;
    if (seg < k_end) {  // warp-uniform
      gemv_mma_segment<Ta, Tw, E, M, F, EXACT>(p, seg + E * q, k_end, raw[u],
                                               WKIND == kScaleBlock128 ? part : acc);
    }
    if constexpr (WKIND == kScaleBlock128) {
      if (u % kGroup == kGroup - 1) {
        const long long chunk = min_i64((k0 + kSeg * (u + 1 - kGroup)) / kBlock, p.scale_cols - 1);
        const float scale = p.w_scale[(n0 / kBlock) * p.scale_cols + chunk];
#pragma unroll
        for (int f = 0; f < F; ++f) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[f][j] = fmaf(scale, part[f][j], acc[f][j]);
            part[f][j] = 0.f;
          }
        }
      }
    }
  }
}

// q8_0 weights: segments of two blocks (64 k, 68 bytes: 4-byte aligned where 16-byte chunks are
// not), read with 4-byte loads through L1. Lane quad q takes qs[8 q .. 8 q + 7] of both blocks of
// rows g and g + 8: block 0's are half a word off (funnel shifts of words 2q .. 2q + 2), block 1's
// aligned (words 9 + 2q, 10 + 2q); d0, d1 are halves of words 0 and 8. One mma covers 4 qs of each
// quad, so each block's 2 (x F) mma accumulate into a fresh sum scaled by the rows' d.
template <typename Ta, int M, int F, int U>
__device__ __forceinline__ void gemv_mma_rows_q8_0(const GemvParams& p, long long n0,
                                                   long long k_warp, long long k_end,
                                                   float (&acc)[F][4]) {
  constexpr int kPair = 2 * kQ8Block;  // k of a segment
  constexpr int kPairWords = 2 * kQ8BlockBytes / 4;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const u32* rows[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rows[r] = reinterpret_cast<const u32*>(static_cast<const unsigned char*>(p.w) +
                                           min_i64(n0 + g + 8 * r, p.n - 1) * p.w_row_bytes);
  }
  const int offsets[7] = {2 * q, 2 * q + 1, 2 * q + 2, 9 + 2 * q, 10 + 2 * q, 0, 8};
  for (long long k0 = k_warp; k0 < k_end; k0 += U * kPair) {
    // words[u][r]: words 2q, 2q + 1, 2q + 2, 9 + 2q, 10 + 2q, 0, 8 of segment u of row r.
    u32 words[U][2][7];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long seg = k0 + kPair * u;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const u32* base = rows[r] + seg / kPair * kPairWords;
#pragma unroll
        for (int i = 0; i < 7; ++i) words[u][r][i] = seg < k_end ? __ldg(base + offsets[i]) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long seg = k0 + kPair * u;
      if (seg >= k_end) break;  // warp-uniform
      // B: token 8 f + g, k = seg + 32 blk + 8 q .. + 7 (16-byte loads).
      u32 b[F][2][4];
#pragma unroll
      for (int f = 0; f < F; ++f) {
        const int m = 8 * f + g;
#pragma unroll
        for (int blk = 0; blk < 2; ++blk) {
          uint4 v = {0u, 0u, 0u, 0u};
          if (m < M) {
            const Ta* row = static_cast<const Ta*>(p.a) + m * p.a_stride + seg + 32 * blk + 8 * q;
            v = *static_cast<const uint4*>(__builtin_assume_aligned(row, 16));
          }
          b[f][blk][0] = v.x, b[f][blk][1] = v.y, b[f][blk][2] = v.z, b[f][blk][3] = v.w;
        }
      }
#pragma unroll
      for (int blk = 0; blk < 2; ++blk) {
        u32 qs[2][2];
        float d[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const u32* w = words[u][r];
          qs[r][0] = blk == 0 ? __funnelshift_r(w[0], w[1], 16) : w[3];
          qs[r][1] = blk == 0 ? __funnelshift_r(w[1], w[2], 16) : w[4];
          d[r] = to_float(f16{static_cast<unsigned short>(blk == 0 ? w[5] : w[6] >> 16)});
        }
        float part[F][4];
#pragma unroll
        for (int f = 0; f < F; ++f) {
#pragma unroll
          for (int j = 0; j < 4; ++j) part[f][j] = 0.f;
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          u32 a[4];
          int8x4_to_pairs<Ta>(qs[0][s], a[0], a[2]);
          int8x4_to_pairs<Ta>(qs[1][s], a[1], a[3]);
#pragma unroll
          for (int f = 0; f < F; ++f) {
            const u32 bs[2] = {__byte_perm(b[f][blk][2 * s], b[f][blk][2 * s + 1], 0x5410u),
                               __byte_perm(b[f][blk][2 * s], b[f][blk][2 * s + 1], 0x7632u)};
            mma_16x8x16<Ta>(part[f], a, bs);
          }
        }
        // part[f][j] is row g + 8 (j / 2): scaled by that row's d.
#pragma unroll
        for (int f = 0; f < F; ++f) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[f][j] = fmaf(d[j / 2], part[f][j], acc[f][j]);
        }
      }
    }
  }
}

// fp8, f16 and bf16 weights: the loop of one warp over its K slice [k_warp, k_end).
template <typename Ta, int WFMT, int M, int F, int U, int WKIND>
__device__ __forceinline__ void gemv_mma_rows(const GemvParams& p, long long n0, long long k_warp,
                                              long long k_end, float (&acc)[F][4]) {
  using Tw = typename gemv_weight<WFMT>::type;
  constexpr int E = gemv_weight<WFMT>::per_chunk;  // k values in a lane's 16 bytes of a row
  constexpr int kSeg = 4 * E;                      // k of one segment (the 4 lanes of a group)
  constexpr bool kVote = [] {                      // NaN / inf codes need the exact decoder
    if constexpr (is_fp8_type<Tw>) return !fp8_pairs_exact_for_all_codes<Tw, Ta>;
    return false;
  }();
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  // Rows n0 + g and n0 + g + 8 (rows past N read row N - 1; their sums are not stored).
  const unsigned char* rows[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rows[r] = static_cast<const unsigned char*>(p.w) +
              min_i64(n0 + g + 8 * r, p.n - 1) * p.w_row_bytes + q * 16;
  }
  for (long long k0 = k_warp; k0 < k_end; k0 += U * kSeg) {
    // All U x 2 loads first; a chunk past the range is zero (and its B fragment too).
    u32 raw[U][2][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long k = k0 + kSeg * u + E * q;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint4 v = {0u, 0u, 0u, 0u};
        if (k < k_end) v = load_weight_16(rows[r] + (k0 + kSeg * u) * (long long)sizeof(Tw));
        raw[u][r][0] = v.x, raw[u][r][1] = v.y, raw[u][r][2] = v.z, raw[u][r][3] = v.w;
      }
    }
    if constexpr (kVote) {
      u32 special = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int i = 0; i < 4; ++i) special |= fp8_word_has_special<Tw>(raw[u][r][i]);
        }
      }
      if (__any_sync(0xffffffffu, special != 0)) {
        gemv_mma_step<Ta, Tw, E, M, F, U, WKIND, true>(p, n0, k0, k_end, raw, acc);
        continue;
      }
    }
    gemv_mma_step<Ta, Tw, E, M, F, U, WKIND, false>(p, n0, k0, k_end, raw, acc);
  }
}

template <typename Ta, int WFMT, typename Tout, typename Tbias, int M, int WARPS, int U, int WKIND,
          bool BIAS, bool SPLIT, int GATE, int RESIDUAL>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_mma_kernel(const __grid_constant__ GemvParams p) {
  constexpr int F = M > 8 ? 2 : 1;  // B fragments (tokens 0-7, 8-15)
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const long long n0 = blockIdx.x * 16LL;
  const long long k_per_warp = p.k_per_split / WARPS;  // a multiple of 128 (launch_gemv.cpp)
  const long long k_warp = blockIdx.y * p.k_per_split + warp * k_per_warp;
  const long long k_end = min_i64(p.k, k_warp + k_per_warp);
  float acc[F][4];
#pragma unroll
  for (int f = 0; f < F; ++f) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[f][j] = 0.f;
  }
  if constexpr (WFMT == kWeightQ8_0) {
    gemv_mma_rows_q8_0<Ta, M, F, U>(p, n0, k_warp, k_end, acc);
  } else {
    gemv_mma_rows<Ta, WFMT, M, F, U, WKIND>(p, n0, k_warp, k_end, acc);
  }
  // The warps' sums in warp order: red[warp][fragment element][lane].
  if constexpr (WARPS > 1) {
    __shared__ float red[WARPS][F * 4][32];
#pragma unroll
    for (int f = 0; f < F; ++f) {
#pragma unroll
      for (int j = 0; j < 4; ++j) red[warp][4 * f + j][lane] = acc[f][j];
    }
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int f = 0; f < F; ++f) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float sum = red[0][4 * f + j][lane];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) sum += red[w][4 * f + j][lane];
        acc[f][j] = sum;
      }
    }
  }
  // acc[f][j] = D[row g + 8 (j / 2)][token 8 f + 2 q + j % 2].
#pragma unroll
  for (int f = 0; f < F; ++f) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const long long n = n0 + g + 8 * (j / 2);
      const int m = 8 * f + 2 * q + j % 2;
      if (m < M && n < p.n) {
        if constexpr (SPLIT) {
          p.partial[(blockIdx.y * (long long)M + m) * p.n + n] = acc[f][j];
        } else {
          float v = acc[f][j] * w_scale_of<WKIND>(p.w_scale, n);
          if constexpr (BIAS) v += to_float(static_cast<const Tbias*>(p.bias)[n]);
          v = row_gate_residual<GATE, RESIDUAL>(p.epilogue, m)(n, v);
          static_cast<Tout*>(p.out)[m * p.n + n] = from_float<Tout>(v);
        }
      }
    }
  }
}

}  // namespace kiln
