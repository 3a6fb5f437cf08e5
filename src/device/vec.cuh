// 16-byte (or narrower) global loads and stores of small register arrays.
//
// Elements are moved through 32-bit words (uint4, uint2, unsigned). Pairs of 16-bit elements are
// packed with mov.b32, which the optimizer does not split: a store of a uint4 built from 16-bit
// values through a union was turned back into four st.global.v2.u16 (NVRTC/nvcc 13.0, sm_90a),
// four times the store instructions; inside a kernel whose pointers come from a
// __grid_constant__ struct, even a packed uint4 store was split into four st.global.u32, so the
// 16-byte store is written in PTX. Narrower accesses state their alignment.
#pragma once

#include "device/numeric.cuh"

namespace kiln {

__device__ __forceinline__ u32 pack_halves(unsigned short lo, unsigned short hi) {
  u32 word;
  asm("mov.b32 %0, {%1, %2};" : "=r"(word) : "h"(lo), "h"(hi));
  return word;
}

__device__ __forceinline__ void unpack_halves(u32 word, unsigned short& lo, unsigned short& hi) {
  asm("mov.b32 {%0, %1}, %2;" : "=h"(lo), "=h"(hi) : "r"(word));
}

// The 32-bit words of N elements of f32, f16 or bf16, in memory order.
template <typename T, int N>
__device__ __forceinline__ void to_words(const T (&src)[N], u32 (&words)[sizeof(T) * N / 4]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < N; ++i) words[i] = __float_as_uint(src[i]);
  } else {
    static_assert(sizeof(T) == 2 && N % 2 == 0, "f32, or pairs of 16-bit elements");
#pragma unroll
    for (int i = 0; i < N / 2; ++i) words[i] = pack_halves(src[2 * i].bits, src[2 * i + 1].bits);
  }
}

template <typename T, int N>
__device__ __forceinline__ void from_words(const u32 (&words)[sizeof(T) * N / 4], T (&dst)[N]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = __uint_as_float(words[i]);
  } else {
    static_assert(sizeof(T) == 2 && N % 2 == 0, "f32, or pairs of 16-bit elements");
#pragma unroll
    for (int i = 0; i < N / 2; ++i) unpack_halves(words[i], dst[2 * i].bits, dst[2 * i + 1].bits);
  }
}

// Loads N contiguous elements; `p` must be aligned to min(16, sizeof(T) * N) bytes.
template <typename T, int N>
__device__ __forceinline__ void load_vec(T (&dst)[N], const T* p) {
  constexpr int kWords = sizeof(T) * N / 4;
  static_assert(kWords % 4 == 0 || kWords == 2 || kWords == 1, "4, 8 or 16k bytes");
  u32 words[kWords];
  if constexpr (kWords % 4 == 0) {
#pragma unroll
    for (int c = 0; c < kWords / 4; ++c) {
      const uint4 v = static_cast<const uint4*>(__builtin_assume_aligned(p, 16))[c];
      words[4 * c] = v.x, words[4 * c + 1] = v.y, words[4 * c + 2] = v.z, words[4 * c + 3] = v.w;
    }
  } else if constexpr (kWords == 2) {
    const uint2 v = *static_cast<const uint2*>(__builtin_assume_aligned(p, 8));
    words[0] = v.x, words[1] = v.y;
  } else {
    words[0] = *static_cast<const u32*>(__builtin_assume_aligned(p, 4));
  }
  from_words(words, dst);
}

// Stores N contiguous elements to global memory; `p` must be aligned to min(16, sizeof(T) * N)
// bytes.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const T (&src)[N]) {
  constexpr int kWords = sizeof(T) * N / 4;
  static_assert(kWords % 4 == 0 || kWords == 2 || kWords == 1, "4, 8 or 16k bytes");
  u32 words[kWords];
  to_words(src, words);
  if constexpr (kWords % 4 == 0) {
#pragma unroll
    for (int c = 0; c < kWords / 4; ++c) {
      asm volatile(
          "{\n\t.reg .u64 g;\n\tcvta.to.global.u64 g, %0;\n\t"
          "st.global.v4.b32 [g], {%1, %2, %3, %4};\n\t}" ::"l"(p + c * (16 / sizeof(T))),
          "r"(words[4 * c]), "r"(words[4 * c + 1]), "r"(words[4 * c + 2]), "r"(words[4 * c + 3])
          : "memory");
    }
  } else if constexpr (kWords == 2) {
    uint2 v;
    v.x = words[0], v.y = words[1];
    *static_cast<uint2*>(__builtin_assume_aligned(p, 8)) = v;
  } else {
    *static_cast<u32*>(__builtin_assume_aligned(p, 4)) = words[0];
  }
}

// N elements at `p` as f32: one load_vec when VECTOR (p aligned as load_vec requires), else N
// element loads.
template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[N]) {
  if constexpr (VECTOR) {
    T raw[N];
    load_vec(raw, p);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_float(raw[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_float(p[i]);
  }
}

// N f32 values rounded to T (nearest even) and stored at `p` (global memory): one store_vec when
// VECTOR (p aligned as store_vec requires), else N element stores.
template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void store_floats(T* p, const float (&v)[N]) {
  T raw[N];
#pragma unroll
  for (int i = 0; i < N; ++i) raw[i] = from_float<T>(v[i]);
  if constexpr (VECTOR) {
    store_vec(p, raw);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = raw[i];
  }
}

}  // namespace kiln
