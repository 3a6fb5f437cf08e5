#include "support/buffers.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/numeric.hpp"

namespace kiln::test {

namespace {

std::uint64_t fresh_seed() {
  if (const char* seed = std::getenv("KILN_SEED")) return std::strtoull(seed, nullptr, 10);
  return std::random_device{}() ^ (std::uint64_t(std::random_device{}()) << 32);
}

}  // namespace

Rng::Rng()
    : seed_(fresh_seed()),
      engine_(seed_),
      trace_(__FILE__, __LINE__, "seed " + std::to_string(seed_) + " (KILN_SEED replays it)") {
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

double round_to(DType dtype, double x) {
  std::uint32_t word = 0;
  numeric::store_float(&word, dtype, 0, float(x));
  return numeric::load_float(&word, dtype, 0);
}

ScopedEnv::ScopedEnv(const std::vector<std::pair<std::string, std::string>>& values) {
  for (const auto& [name, value] : values) {
    const char* old = std::getenv(name.c_str());
    old_.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
    ::setenv(name.c_str(), value.c_str(), 1);
  }
}

ScopedEnv::~ScopedEnv() {
  for (const auto& [name, old] : old_) {
    old ? ::setenv(name.c_str(), old->c_str(), 1) : ::unsetenv(name.c_str());
  }
}

ArgArray::ArgArray(std::size_t count, DType dtype, float value)
    : bytes_(count * dtype_size(dtype)) {
  for (std::size_t i = 0; i < count; ++i)
    numeric::store_float(bytes_.data(), dtype, std::int64_t(i), value);
  initial_ = bytes_;
}

TensorView ArgArray::operator()(const std::vector<std::int64_t>& shape, DType dtype,
                                const std::vector<std::int64_t>& strides, Device device) {
  if (strides.empty()) return TensorView::contiguous(bytes_.data(), dtype, shape, device);
  return TensorView(bytes_.data(), dtype, shape, strides, device);
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
