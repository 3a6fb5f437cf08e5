// Test buffers with guard bands, random inputs and error measures shared by the op tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "kiln/tensor.hpp"

namespace kiln::test {

// Skips the test, visibly, on machines without a usable CUDA device.
#define KILN_REQUIRE_GPU()                                                     \
  do {                                                                         \
    if (::kiln::cuda_device_count() == 0) {                                    \
      GTEST_SKIP() << "no CUDA device: " << ::kiln::cuda_unavailable_reason(); \
    }                                                                          \
  } while (0)

// Every byte of a poisoned buffer is 0xFF: NaN in f32, f16 and bf16, so an element the op did
// not write shows up as NaN.
inline constexpr std::uint8_t kPoison = 0xFF;
inline constexpr std::size_t kGuardBytes = 4096;

// A seeded generator whose seed is fresh each run and printed with every failure.
class Rng {
 public:
  Rng();
  std::mt19937_64& engine() { return engine_; }
  std::uint64_t seed() const { return seed_; }

 private:
  std::uint64_t seed_;
  std::mt19937_64 engine_;
};

// Host memory with guard bands of kGuardBytes on both sides; the payload and guards start
// poisoned.
class HostBuffer {
 public:
  explicit HostBuffer(std::size_t bytes);
  void* data() { return storage_.data() + kGuardBytes; }
  const void* data() const { return storage_.data() + kGuardBytes; }
  std::size_t bytes() const { return bytes_; }
  bool guards_intact() const;

 private:
  std::size_t bytes_;
  std::vector<std::uint8_t> storage_;
};

// Device memory with guard bands, poisoned at construction.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() const { return base_ + kGuardBytes; }
  std::size_t bytes() const { return bytes_; }
  void upload(const void* host, std::size_t bytes, std::size_t offset = 0);
  void download(void* host, std::size_t bytes, std::size_t offset = 0) const;
  bool guards_intact() const;

 private:
  std::size_t bytes_;
  std::uint8_t* base_ = nullptr;
};

// Fills `count` elements of a host f32/f16/bf16 buffer with uniform values in [lo, hi).
void fill_uniform(void* data, DType dtype, std::size_t count, Rng& rng, float lo = -1.f,
                  float hi = 1.f);

// Reads `count` elements of a host f32/f16/bf16 buffer as f32.
std::vector<float> to_floats(const void* data, DType dtype, std::size_t count);

// sum (a - b)^2 / sum b^2; infinity when any a is NaN.
double nmse(const std::vector<float>& actual, const std::vector<double>& expected);

// Relative rounding step of a dtype: 2^-24 (f32), 2^-11 (f16), 2^-8 (bf16).
double unit_roundoff(DType dtype);

// Checks that `actual` (rounded to `dtype`) matches `expected` to within the rounding of
// `dtype`, plus `slack` ulps for differently ordered f32 math: no NaN, every element within
// (1 + slack) * 2 * u * |e| + floor, and NMSE within the bound of uniform rounding.
void expect_close(const std::vector<float>& actual, const std::vector<double>& expected,
                  DType dtype, const std::string& what, double slack = 1.0);

// Expects `call` to throw kiln::Error with `code` and a message naming `op` ("kiln::conv2d")
// and containing every fragment.
void expect_error(const std::string& op, const std::function<void()>& call, ErrorCode code,
                  const std::vector<std::string>& fragments);

}  // namespace kiln::test
