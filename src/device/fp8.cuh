// fp8 (OCP e4m3fn, e5m2) and ggml Q8_0 on the device: exact decoders, round-to-nearest-even
// saturating encoders, and the four-at-a-time decoders the matmul kernels use in their loops.
//
//   e4m3fn  s eeee mmm   bias 7,  subnormal m/8 * 2^-6,  max 448 (0x7E), NaN 0x7F/0xFF, no inf
//   e5m2    s eeeee mm   bias 15, subnormal m/4 * 2^-14, max 57344 (0x7B), inf 0x7C/0xFC,
//                        NaN exp 31 with m != 0
//   Q8_0    {f16 d; int8 qs[32]} = 34 bytes, value = d * qs[i]
//
// The word decoder (fp8_word_to_float<e4m3 or e5m2>) moves each byte's magnitude bits under
// the f32 exponent field and undoes the bias difference with one multiply (2^120, 2^112): three
// integer operations and one multiply a value, subnormals exact (f32 denormals times a power of
// two, no flush: NVRTC's default -ftz=false). NaN and inf codes would decode as large finite
// values, so callers test words with fp8_word_has_special (three operations for four codes) and
// take the exact decoder for them. int8 -> f32 (q8_word_to_float) puts the byte, offset by 128,
// under the exponent of 2^23: one byte permute and one subtraction, no quarter-rate I2F.
// Measured on an H200 in a stripped GEMV (e4m3, 1 x 4096 x 14336): 2903 GB/s with these bit
// tricks, 1728 GB/s with a 256-entry table in shared memory (NOTES.md, "Decoding").
#pragma once

#include "device/numeric.cuh"
#include "device/vec.cuh"

namespace kiln {

struct e4m3 {
  unsigned char bits;
};
struct e5m2 {
  unsigned char bits;
};

// ---- exact decoders
// ------------------------------------------------------------------------------

__device__ __forceinline__ float e4m3_to_float(u32 code) {
  const u32 sign = (code & 0x80u) << 24;
  const u32 exp = (code >> 3) & 0xFu;
  const u32 mant = code & 0x7u;
  if (exp == 0xFu && mant == 0x7u) return __uint_as_float(sign | 0x7FC00000u);  // NaN
  if (exp == 0u) {
    const float magnitude = float(mant) * 0.001953125f;  // m/8 * 2^-6 = m * 2^-9
    return sign ? -magnitude : magnitude;
  }
  return __uint_as_float(sign | ((exp + 120u) << 23) | (mant << 20));
}

__device__ __forceinline__ float e5m2_to_float(u32 code) {
  const u32 sign = (code & 0x80u) << 24;
  const u32 exp = (code >> 2) & 0x1Fu;
  const u32 mant = code & 0x3u;
  if (exp == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (mant << 21));  // inf, NaN
  if (exp == 0u) {
    const float magnitude = float(mant) * 1.52587890625e-05f;  // m/4 * 2^-14 = m * 2^-16
    return sign ? -magnitude : magnitude;
  }
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 21));
}

__device__ __forceinline__ float to_float(e4m3 v) { return e4m3_to_float(v.bits); }
__device__ __forceinline__ float to_float(e5m2 v) { return e5m2_to_float(v.bits); }

// ---- encoders: round to nearest even, saturate to +-max (inf too), NaN stays NaN ---------------

// Shared rule for a format with MANT mantissa bits, exponent bias BIAS and largest code MAX_CODE
// (magnitude bits). Subnormal step 2^(1 - BIAS - MANT).
template <int MANT, int BIAS, u32 MAX_CODE, u32 NAN_CODE>
__device__ __forceinline__ u32 float_to_fp8_bits(float v) {
  const u32 u = __float_as_uint(v);
  const u32 sign = (u >> 24) & 0x80u;
  const u32 abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | NAN_CODE;
  constexpr u32 kMinNormal = u32(127 + 1 - BIAS) << 23;  // f32 bits of 2^(1 - BIAS)
  if (abs < kMinNormal) {
    // Subnormal range: a multiple of the subnormal step, rounded to nearest even by rintf.
    // A result equal to 2^MANT is the smallest normal code, which is the same bits.
    const float steps = __uint_as_float(abs) * __uint_as_float(u32(127 + BIAS + MANT - 1) << 23);
    return sign | u32(rintf(steps));
  }
  // Normal: round the f32 mantissa to MANT bits (nearest even), then rebias the exponent.
  constexpr int kDrop = 23 - MANT;
  const u32 rounded = abs + ((1u << (kDrop - 1)) - 1u) + ((abs >> kDrop) & 1u);
  const u32 code = (rounded >> kDrop) - (u32(127 - BIAS) << MANT);
  return sign | (code > MAX_CODE ? MAX_CODE : code);
}

__device__ __forceinline__ u32 float_to_e4m3(float v) {
  return float_to_fp8_bits<3, 7, 0x7Eu, 0x7Fu>(v);
}
__device__ __forceinline__ u32 float_to_e5m2(float v) {
  return float_to_fp8_bits<2, 15, 0x7Bu, 0x7Fu>(v);
}

template <typename T>
__device__ __forceinline__ T fp8_from_float(float v);
template <>
__device__ __forceinline__ e4m3 fp8_from_float<e4m3>(float v) {
  return {static_cast<unsigned char>(float_to_e4m3(v))};
}
template <>
__device__ __forceinline__ e5m2 fp8_from_float<e5m2>(float v) {
  return {static_cast<unsigned char>(float_to_e5m2(v))};
}

template <typename T>
struct fp8_traits;
template <>
struct fp8_traits<e4m3> {
  static constexpr bool is_e4m3 = true;
  static constexpr float max = 448.f;
};
template <>
struct fp8_traits<e5m2> {
  static constexpr bool is_e4m3 = false;
  static constexpr float max = 57344.f;
};

template <typename T>
inline constexpr bool is_fp8_type = false;
template <>
inline constexpr bool is_fp8_type<e4m3> = true;
template <>
inline constexpr bool is_fp8_type<e5m2> = true;

// ---- per-group scales: scale = amax / max, q = encode(v / scale) --------------------------------

// The scale of a group whose largest magnitude is `amax`: amax / max of the format, 1 for an
// all-zero group (what quantize_fp8 computes, and the fused per-token outputs of the norm and
// activation kernels, so their codes are the same bits).
template <typename Tq>
__device__ __forceinline__ float scale_from_amax(float amax) {
  const float s = amax / fp8_traits<Tq>::max;
  return s == 0.f ? 1.f : s;
}

// Encodes N values as v / scale (IEEE division, as the CPU reference) and stores the N codes at
// `dst` (global memory) with the widest store: 16-byte stores for N % 16 == 0, 8 / 4 / 2 bytes
// for N = 8 / 4 / 2 (dst aligned to min(16, N) bytes), bytes otherwise.
template <typename Tq, int N>
__device__ __forceinline__ void store_fp8(unsigned char* dst, const float (&v)[N], float scale) {
  if constexpr (N == 4 || N == 8 || N % 16 == 0) {
    float words[N / 4];  // the codes' 32-bit words, as f32 bit patterns for store_vec
#pragma unroll
    for (int w = 0; w < N / 4; ++w) {
      u32 word = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        word |= u32(fp8_from_float<Tq>(v[4 * w + i] / scale).bits) << (8 * i);
      }
      words[w] = __uint_as_float(word);
    }
    store_vec(reinterpret_cast<float*>(dst), words);
  } else if constexpr (N == 2) {
    const u32 lo = fp8_from_float<Tq>(v[0] / scale).bits;
    const u32 hi = fp8_from_float<Tq>(v[1] / scale).bits;
    *static_cast<unsigned short*>(__builtin_assume_aligned(dst, 2)) =
        static_cast<unsigned short>(lo | hi << 8);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = fp8_from_float<Tq>(v[i] / scale).bits;
  }
}

// ---- four codes of a 32-bit word at once (byte i = element i) ----------------------------------

// Nonzero when a byte of `word` is a NaN (e4m3: 0x7F/0xFF) or inf/NaN (e5m2: exponent 31).
template <typename T>
__device__ __forceinline__ u32 fp8_word_has_special(u32 word) {
  if constexpr (fp8_traits<T>::is_e4m3) {
    return ((word & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u;
  } else {
    return ((word & 0x7C7C7C7Cu) + 0x04040404u) & 0x80808080u;
  }
}

// Finite codes only (see fp8_word_has_special). out[i] = value of byte i. Byte i is shifted to
// bits 24..31 (byte 3 already is), then an arithmetic shift puts the magnitude bits under the f32
// exponent and mantissa while copying the sign down, and one AND keeps sign and magnitude: three
// integer operations and one multiply a value.
template <typename T>
__device__ __forceinline__ void fp8_word_to_float(u32 word, float (&out)[4]) {
  constexpr bool kE4m3 = fp8_traits<T>::is_e4m3;
  constexpr int kShift = kE4m3 ? 4 : 3;                     // magnitude bits under f32's
  constexpr u32 kMask = kE4m3 ? 0x87F00000u : 0x8FE00000u;  // sign, exponent and mantissa
  constexpr float kRebias = kE4m3 ? 0x1p120f : 0x1p112f;    // 2^(127 - bias)
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int top = static_cast<int>(word << (24 - 8 * i));  // byte i in bits 24..31
    out[i] = __uint_as_float(static_cast<u32>(top >> kShift) & kMask) * kRebias;
  }
}

// Any codes, exactly (the slow path for words with specials).
template <typename T>
__device__ __forceinline__ void fp8_word_to_float_exact(u32 word, float (&out)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 code = (word >> (8 * i)) & 0xFFu;
    if constexpr (fp8_traits<T>::is_e4m3) {
      out[i] = e4m3_to_float(code);
    } else {
      out[i] = e5m2_to_float(code);
    }
  }
}

// Four int8 (Q8_0 qs) -> f32: (byte ^ 0x80) = q + 128 under the exponent of 2^23, minus 2^23+128.
__device__ __forceinline__ void q8_word_to_float(u32 word, float (&out)[4]) {
  const u32 biased = word ^ 0x80808080u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[i] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540u | u32(i))) - 8388736.f;
  }
}

// ---- four codes of a word to two pairs of f16 or bf16 (tensor-core operands) -----------------

// Finite codes only, except e5m2 -> f16, which is exact for every code (see fp8_word_has_special).
// Bytes {0, 2} -> `even`, bytes {1, 3} -> `odd` (the lower byte in the low half): the odd bytes
// already sit at the top of the 16-bit lanes and the even ones get there by one shift, so no
// byte permute; then one shift and one LOP3 put sign and magnitude under T's fields, and one
// multiply by a power of two rebiases the exponent (e4m3 -> f16: 2^8, -> bf16: 2^120; e5m2 ->
// bf16: 2^112; e5m2 is the top byte of an f16 as is). Subnormal codes become subnormal T values,
// exact after the multiply. ALU and HMUL2/HFMA2 only: the same on sm_80 (no fp8 cvt) and sm_90.
// The k order inside a pair is {0, 2}, {1, 3}: the other operand of the product must match.
template <typename T>
inline constexpr bool is_f16_type = false;
template <>
inline constexpr bool is_f16_type<f16> = true;

// Two codes at the top bytes of the 16-bit lanes of `x` (bits 8..15 and 24..31; the rest ignored)
// -> one pair of T, lane order kept.
template <typename Tw, typename T>
__device__ __forceinline__ u32 fp8_lanes_to_pair(u32 x) {
  u32 pair;
  if constexpr (!fp8_traits<Tw>::is_e4m3 && is_f16_type<T>) {
    pair = x & 0xFF00FF00u;
  } else if constexpr (!fp8_traits<Tw>::is_e4m3) {
    const u32 bits = (x & 0x80008000u) | ((x >> 3) & 0x0FE00FE0u);
    asm("fma.rn.bf16x2 %0, %1, %2, %3;"
        : "=r"(pair)
        : "r"(bits), "r"(0x77807780u),
          "r"(0x80008000u));  // * 2^112 (+ -0: sm_80 has no bf16 multiply)
  } else if constexpr (is_f16_type<T>) {
    const u32 bits = (x & 0x80008000u) | ((x >> 1) & 0x3F803F80u);
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(pair) : "r"(bits), "r"(0x5C005C00u));  // * 2^8
  } else {
    const u32 bits = (x & 0x80008000u) | ((x >> 4) & 0x07F007F0u);
    asm("fma.rn.bf16x2 %0, %1, %2, %3;"
        : "=r"(pair)
        : "r"(bits), "r"(0x7B807B80u),
          "r"(0x80008000u));  // * 2^120
  }
  return pair;
}

template <typename Tw, typename T>
__device__ __forceinline__ void fp8x4_to_pairs(u32 word, u32& even, u32& odd) {
  even = fp8_lanes_to_pair<Tw, T>(word << 8);
  odd = fp8_lanes_to_pair<Tw, T>(word);
}

// True when fp8x4_to_pairs<Tw, T> can decode every code (no NaN / inf test needed).
template <typename Tw, typename T>
inline constexpr bool fp8_pairs_exact_for_all_codes = !fp8_traits<Tw>::is_e4m3 && is_f16_type<T>;

// Four int8 (Q8_0 qs) -> {q0, q2}, {q1, q3} as pairs of T (the pairing of fp8x4_to_pairs), exactly:
// q + 128 as the low byte of f16 1024 (one byte permute), minus 1152 (one HSUB2); bf16: that f16
// moved under bf16's fields (one shift, one LOP3) and rebiased by 2^112 (one HFMA2).
template <typename T>
__device__ __forceinline__ void int8x4_to_pairs(u32 word, u32& even, u32& odd) {
  const u32 biased = word ^ 0x80808080u;
  const u32 lanes[2] = {__byte_perm(biased, 0x64646464u, 0x4240u),
                        __byte_perm(biased, 0x64646464u, 0x4341u)};
  u32 pair[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(pair[i]) : "r"(lanes[i]), "r"(0x64806480u));
    if constexpr (!is_f16_type<T>) {
      const u32 bits = (pair[i] & 0x80008000u) | ((pair[i] >> 3) & 0x0FFF0FFFu);
      asm("fma.rn.bf16x2 %0, %1, %2, %3;"
          : "=r"(pair[i])
          : "r"(bits), "r"(0x77807780u), "r"(0x80008000u));  // * 2^112
    }
  }
  even = pair[0];
  odd = pair[1];
}

// ---- Q8_0: blocks of 32 values, {f16 d; int8 qs[32]} = 34 bytes (2-byte aligned) ------------

inline constexpr int kQ8Block = 32;
inline constexpr int kQ8BlockBytes = 34;

}  // namespace kiln
