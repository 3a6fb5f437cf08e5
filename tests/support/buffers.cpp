#include "support/buffers.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/numeric.hpp"

namespace kiln::test {

Rng::Rng()
    : seed_(std::random_device{}() ^ (std::uint64_t(std::random_device{}()) << 32)),
      engine_(seed_) {
  ::testing::Test::RecordProperty("seed", std::to_string(seed_));
}

HostBuffer::HostBuffer(std::size_t bytes)
    : bytes_(bytes), storage_(bytes + 2 * kGuardBytes, kPoison) {}

bool HostBuffer::guards_intact() const {
  const auto intact = [](auto first, auto last) {
    return std::all_of(first, last, [](std::uint8_t b) { return b == kPoison; });
  };
  return intact(storage_.begin(), storage_.begin() + kGuardBytes) &&
         intact(storage_.end() - kGuardBytes, storage_.end());
}

DeviceBuffer::DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes + 2 * kGuardBytes) != cudaSuccess) {
    throw std::runtime_error("cudaMalloc of " + std::to_string(bytes) + " bytes failed");
  }
  base_ = static_cast<std::uint8_t*>(p);
  cudaMemset(base_, kPoison, bytes + 2 * kGuardBytes);
}

DeviceBuffer::~DeviceBuffer() { cudaFree(base_); }

void DeviceBuffer::upload(const void* host, std::size_t bytes, std::size_t offset) {
  EXPECT_EQ(cudaMemcpy(base_ + kGuardBytes + offset, host, bytes, cudaMemcpyHostToDevice),
            cudaSuccess);
}

void DeviceBuffer::download(void* host, std::size_t bytes, std::size_t offset) const {
  EXPECT_EQ(cudaMemcpy(host, base_ + kGuardBytes + offset, bytes, cudaMemcpyDeviceToHost),
            cudaSuccess);
}

bool DeviceBuffer::guards_intact() const {
  std::vector<std::uint8_t> guard(kGuardBytes);
  for (const std::uint8_t* p : {base_, base_ + kGuardBytes + bytes_}) {
    if (cudaMemcpy(guard.data(), p, kGuardBytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
      return false;
    }
    if (!std::all_of(guard.begin(), guard.end(), [](std::uint8_t b) { return b == kPoison; })) {
      return false;
    }
  }
  return true;
}

void fill_uniform(void* data, DType dtype, std::size_t count, Rng& rng, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  for (std::size_t i = 0; i < count; ++i) {
    numeric::store_float(data, dtype, std::int64_t(i), dist(rng.engine()));
  }
}

std::vector<float> to_floats(const void* data, DType dtype, std::size_t count) {
  std::vector<float> out(count);
  for (std::size_t i = 0; i < count; ++i)
    out[i] = numeric::load_float(data, dtype, std::int64_t(i));
  return out;
}

double nmse(const std::vector<float>& actual, const std::vector<double>& expected) {
  double err = 0, ref = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    if (std::isnan(actual[i])) return std::numeric_limits<double>::infinity();
    const double d = double(actual[i]) - expected[i];
    err += d * d;
    ref += expected[i] * expected[i];
  }
  return ref > 0 ? err / ref : err;
}

double unit_roundoff(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return std::ldexp(1.0, -11);
    case DType::bf16:
      return std::ldexp(1.0, -8);
    default:
      return std::ldexp(1.0, -24);
  }
}

void expect_close(const std::vector<float>& actual, const std::vector<double>& expected,
                  DType dtype, const std::string& what, double slack) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  ASSERT_FALSE(expected.empty()) << what;
  double sum_sq = 0;
  for (double e : expected) sum_sq += e * e;
  const double rms = std::sqrt(sum_sq / double(expected.size()));
  ASSERT_GT(rms, 0.0) << what << ": the expected output is all zeros; the test cannot fail";
  const double u = unit_roundoff(dtype);
  // f32 math differs from f64 by a few 2^-24 relative to the row's magnitude.
  const double floor = 64 * std::ldexp(1.0, -24) * rms;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double bound = (1 + slack) * 2 * u * std::abs(expected[i]) + floor;
    if (!(std::abs(double(actual[i]) - expected[i]) <= bound)) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << ": element " << i << " is " << actual[i] << ", expected "
                      << expected[i] << " (bound " << bound << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << actual.size() << " elements off";
  const double bound_nmse = std::max(1e-10, (1 + slack) * (1 + slack) * u * u);
  EXPECT_LE(nmse(actual, expected), bound_nmse) << what;
}

void expect_error(const std::string& op, const std::function<void()>& call, ErrorCode code,
                  const std::vector<std::string>& fragments) {
  try {
    call();
    ADD_FAILURE() << "no kiln::Error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    const std::string what = e.what();
    EXPECT_NE(what.find(op), std::string::npos) << what;
    for (const auto& f : fragments) EXPECT_NE(what.find(f), std::string::npos) << what;
  }
}

}  // namespace kiln::test
