// Host-side conversions between f32 and the 16-bit float formats (round to nearest even), and
// element access to host buffers by dtype, used by the CPU reference ops and by tests.
#pragma once

#include <bit>
#include <cstdint>
#include <string>

#include "core/check.hpp"
#include "kiln/tensor.hpp"

namespace kiln::numeric {

inline float bf16_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // NaN
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24.
    const float magnitude = static_cast<float>(mant) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (abs < 0x38800000u) {
    // Below the smallest normal (2^-14): the result is a multiple of 2^-24; adding 0.5 makes the
    // FPU round the quotient to nearest even in the low mantissa bits.
    const float scaled = std::bit_cast<float>(abs) + 0.5f;
    return static_cast<std::uint16_t>(sign | (std::bit_cast<std::uint32_t>(scaled) - 0x3f000000u));
  }
  const std::uint32_t rounding = 0xfffu + ((abs >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | ((abs - 0x38000000u + rounding) >> 13));
}

}  // namespace kiln::numeric

namespace kiln::numeric {

// Element `index` (in elements from `base`) of a host buffer of f32/f16/bf16, as f32.
inline float load_float(const void* base, DType dtype, std::int64_t index) {
  switch (dtype) {
    case DType::f32:
      return static_cast<const float*>(base)[index];
    case DType::f16:
      return f16_to_float(static_cast<const std::uint16_t*>(base)[index]);
    case DType::bf16:
      return bf16_to_float(static_cast<const std::uint16_t*>(base)[index]);
    default:
      check::fail("load_float", ErrorCode::unsupported,
                  std::string("dtype ") + dtype_name(dtype) + ", expected f32, f16 or bf16");
  }
}

// Rounds `value` to `dtype` (f32/f16/bf16, nearest even) and stores it at `index`.
inline void store_float(void* base, DType dtype, std::int64_t index, float value) {
  switch (dtype) {
    case DType::f32:
      static_cast<float*>(base)[index] = value;
      return;
    case DType::f16:
      static_cast<std::uint16_t*>(base)[index] = float_to_f16(value);
      return;
    case DType::bf16:
      static_cast<std::uint16_t*>(base)[index] = float_to_bf16(value);
      return;
    default:
      check::fail("store_float", ErrorCode::unsupported,
                  std::string("dtype ") + dtype_name(dtype) + ", expected f32, f16 or bf16");
  }
}

}  // namespace kiln::numeric
