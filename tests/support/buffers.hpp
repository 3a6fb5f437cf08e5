// Guard-banded, poisoned host and device memory, seeded random inputs, environment overrides and
// error checks: the pieces under the op-case harness (harness.hpp) and the tests beside it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
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

// A seeded generator. The seed is fresh each run, or KILN_SEED's to replay a failure, and every
// failure while the generator lives names it ("seed 123").
class Rng {
 public:
  Rng();
  Rng(const Rng&) = delete;
  Rng& operator=(const Rng&) = delete;
  std::mt19937_64& engine() { return engine_; }
  std::uint64_t seed() const { return seed_; }

 private:
  std::uint64_t seed_;
  std::mt19937_64 engine_;
  ::testing::ScopedTrace trace_;
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

// Relative rounding step of a dtype: 2^-24 (f32), 2^-11 (f16), 2^-8 (bf16).
double unit_roundoff(DType dtype);

// `x` rounded to `dtype` (f32, f16 or bf16).
double round_to(DType dtype, double x);

// Sets environment variables for a scope (kiln's launchers read them on every call), then
// restores them.
class ScopedEnv {
 public:
  explicit ScopedEnv(const std::vector<std::pair<std::string, std::string>>& values);
  ScopedEnv(const std::string& name, const std::string& value) : ScopedEnv({{name, value}}) {}
  ~ScopedEnv();
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> old_;
};

// A host array for argument checks: `count` elements of `dtype` set to `value`, seen through views
// of any shape, dtype and strides; unchanged() says whether anything wrote to it.
class ArgArray {
 public:
  ArgArray(std::size_t count, DType dtype, float value);
  TensorView operator()(const std::vector<std::int64_t>& shape, DType dtype = DType::f32,
                        const std::vector<std::int64_t>& strides = {},
                        Device device = Device::cpu());
  bool unchanged() const { return bytes_ == initial_; }

 private:
  std::vector<std::uint8_t> bytes_, initial_;
};

// Expects `call` to throw kiln::Error with `code` and a message naming `op` ("kiln::conv2d")
// and containing every fragment.
void expect_error(const std::string& op, const std::function<void()>& call, ErrorCode code,
                  const std::vector<std::string>& fragments);

}  // namespace kiln::test
