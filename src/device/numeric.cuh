// Scalar types and conversions for kernels compiled by NVRTC.
//
// kiln's kernels include no toolkit header (they are compiled at run time wherever libnvrtc is,
// with or without the toolkit's include folder), so the 16-bit float types are defined here as
// bit containers, converted with the PTX cvt instructions (round to nearest even).
#pragma once

namespace kiln {

using i32 = int;
using u32 = unsigned int;
using i64 = long long;
using u64 = unsigned long long;

// -infinity (no toolkit header provides INFINITY to NVRTC).
__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// 2^x by the SFU (ex2.approx.ftz: approximate, subnormals flushed): the softmax exponential.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// select_type<C, A, B>::type is A when C holds, else B; same_type<A, B> is whether A is B (no
// toolkit <type_traits> under NVRTC).
template <bool C, typename A, typename B>
struct select_type {
  using type = A;
};
template <typename A, typename B>
struct select_type<false, A, B> {
  using type = B;
};

template <typename A, typename B>
inline constexpr bool same_type = false;
template <typename A>
inline constexpr bool same_type<A, A> = true;

struct f16 {
  unsigned short bits;
};
struct bf16 {
  unsigned short bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }

__device__ __forceinline__ float to_float(f16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}

__device__ __forceinline__ float to_float(bf16 v) {
  return __uint_as_float(static_cast<u32>(v.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}

template <>
__device__ __forceinline__ f16 from_float<f16>(float v) {
  f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
  return h;
}

template <>
__device__ __forceinline__ bf16 from_float<bf16>(float v) {
  bf16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
  return h;
}

}  // namespace kiln
