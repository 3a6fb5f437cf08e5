// Aligned register vectors for 16-byte global loads and stores.
#pragma once

#include "device/numeric.cuh"

namespace kiln {

// N elements of T held in registers, aligned so that a whole-vector access is one instruction
// when sizeof(T) * N is 4, 8 or 16 bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N <= 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

// Loads N contiguous elements; `p` must be aligned to min(16, sizeof(T) * N) bytes.
template <typename T, int N>
__device__ __forceinline__ void load_vec(T (&dst)[N], const T* p) {
  constexpr int kBytes = sizeof(T) * N;
  if constexpr (kBytes <= 16) {
    const Vec<T, N> r = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = r.v[i];
  } else {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const Vec<T, kPer> r = *reinterpret_cast<const Vec<T, kPer>*>(p + c * kPer);
#pragma unroll
      for (int i = 0; i < kPer; ++i) dst[c * kPer + i] = r.v[i];
    }
  }
}

// Stores N contiguous elements; `p` must be aligned to min(16, sizeof(T) * N) bytes.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const T (&src)[N]) {
  constexpr int kBytes = sizeof(T) * N;
  if constexpr (kBytes <= 16) {
    Vec<T, N> r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = src[i];
    *reinterpret_cast<Vec<T, N>*>(p) = r;
  } else {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      Vec<T, kPer> r;
#pragma unroll
      for (int i = 0; i < kPer; ++i) r.v[i] = src[c * kPer + i];
      *reinterpret_cast<Vec<T, kPer>*>(p + c * kPer) = r;
    }
  }
}

}  // namespace kiln
