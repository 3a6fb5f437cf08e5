// Core behaviour at the edge: empty views (any strides, as torch gives them, are contiguous and
// touch no memory) and what the CUDA probe says on a machine without a driver.
#include <dlfcn.h>

#include <cstdint>
#include <string>

#include <gtest/gtest.h>

#include "core/check.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "kiln/tensor.hpp"

namespace kiln {
namespace {

TEST(EmptyView, AnyStridesAreContiguous) {
  // torch.empty(3, 0).stride() == (1, 1); torch.empty(0, 128) and numpy give others.
  const std::int64_t shapes[][2] = {{3, 0}, {0, 128}, {0, 0}};
  const std::int64_t strides[][2] = {{1, 1}, {1, 0}, {7, 3}};
  for (const auto& shape : shapes) {
    for (const auto& stride : strides) {
      const TensorView t(nullptr, DType::bf16, shape, stride);
      EXPECT_TRUE(t.is_contiguous())
          << t.shape_str() << " strides " << stride[0] << ", " << stride[1];
      EXPECT_EQ(t.numel(), 0);
      EXPECT_EQ(t.byte_begin(), t.byte_end());
      EXPECT_NO_THROW(check::contiguous("op", "out", t));
      EXPECT_NO_THROW(check::non_null("op", "out", t));
    }
  }
  // A non-empty view with the same strides is not.
  const std::int64_t shape[] = {3, 2};
  const std::int64_t stride[] = {1, 1};
  EXPECT_FALSE(TensorView(nullptr, DType::bf16, shape, stride).is_contiguous());
}

TEST(EmptyView, NeverOverlaps) {
  float buffer[4];
  const TensorView empty(buffer, DType::f32, {0, 4});
  EXPECT_FALSE(may_overlap(empty, TensorView(buffer, DType::f32, {4})));
}

// Without libcuda the runtime says "insufficient driver"; kiln says there is no driver.
TEST(CudaProbe, NoDriverIsNotAnOldDriver) {
  void* driver = ::dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (driver == nullptr) driver = ::dlopen("libcuda.so.1", RTLD_LAZY);
  if (driver != nullptr) {
    ::dlclose(driver);
    GTEST_SKIP() << "needs a machine without an NVIDIA driver";
  }
  EXPECT_EQ(cuda_device_count(), 0);
  const std::string reason = cuda_unavailable_reason();
  EXPECT_TRUE(reason.starts_with("no NVIDIA driver")) << reason;
  EXPECT_EQ(reason.find("insufficient"), std::string::npos) << reason;
  try {
    cuda_arch(0);
    ADD_FAILURE() << "cuda_arch answered without a driver";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("no NVIDIA driver"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln
