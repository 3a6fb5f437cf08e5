// Core: tensor views, dtypes, host conversions, device probing without a driver.
#include <cmath>
#include <cstdint>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "kiln/tensor.hpp"

namespace kiln {
namespace {

TEST(DType, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::f32), 4u);
  EXPECT_EQ(dtype_size(DType::bf16), 2u);
  EXPECT_EQ(dtype_size(DType::f8_e5m2), 1u);
  EXPECT_EQ(dtype_size(DType::i64), 8u);
  EXPECT_STREQ(dtype_name(DType::f8_e4m3fn), "f8_e4m3fn");
}

TEST(TensorView, ContiguousStridesAndExtent) {
  float buf[24];
  const TensorView t(buf, DType::f32, {2, 3, 4});
  EXPECT_EQ(t.stride(0), 12);
  EXPECT_EQ(t.stride(2), 1);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.byte_end(), 96);
  EXPECT_EQ(t.shape_str(), "[2, 3, 4]");
}

TEST(TensorView, StridedViewIsNotContiguous) {
  float buf[48];
  const std::int64_t shape[] = {2, 3, 4};
  const std::int64_t strides[] = {24, 8, 1};
  const TensorView t(buf, DType::f32, shape, strides);
  EXPECT_FALSE(t.is_contiguous());
  EXPECT_EQ(t.byte_end(), (24 + 16 + 3 + 1) * 4);
}

TEST(TensorView, RejectsTooManyDims) {
  const std::int64_t shape[7] = {1, 1, 1, 1, 1, 1, 1};
  EXPECT_THROW(TensorView(nullptr, DType::f32, shape, shape), Error);
}

TEST(TensorView, Overlap) {
  float buf[32];
  const TensorView a(buf, DType::f32, {16});
  const TensorView b(buf + 16, DType::f32, {16});
  const TensorView c(buf + 8, DType::f32, {16});
  EXPECT_FALSE(may_overlap(a, b));
  EXPECT_TRUE(may_overlap(a, c));
  EXPECT_FALSE(may_overlap(a, TensorView(buf, DType::f32, {16}, Device::cuda(0))));
}

// Every 16-bit pattern that is not NaN survives a round trip through f32.
TEST(Numeric, HalfAndBfloatRoundTripEveryCode) {
  for (std::uint32_t code = 0; code < 65536; ++code) {
    const auto h = static_cast<std::uint16_t>(code);
    const float f16 = numeric::f16_to_float(h);
    if (!std::isnan(f16)) {
      ASSERT_EQ(numeric::float_to_f16(f16), h) << code;
    }
    const float bf = numeric::bf16_to_float(h);
    if (!std::isnan(bf)) {
      ASSERT_EQ(numeric::float_to_bf16(bf), h) << code;
    }
  }
}

TEST(Numeric, RoundsToNearestEven) {
  EXPECT_EQ(numeric::float_to_bf16(1.0f + 0x1p-8f), 0x3f80);  // tie, to even
  EXPECT_EQ(numeric::float_to_bf16(1.0f + 0x1p-8f + 0x1p-16f), 0x3f81);
  EXPECT_EQ(numeric::float_to_f16(1.0f + 0x1p-11f), 0x3c00);  // tie, to even
  EXPECT_EQ(numeric::float_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);
  EXPECT_EQ(numeric::float_to_f16(65520.f), 0x7c00);       // overflows to inf
  EXPECT_EQ(numeric::float_to_f16(0x1p-25f), 0x0000);      // tie to even zero
  EXPECT_EQ(numeric::float_to_f16(3 * 0x1p-25f), 0x0002);  // subnormal tie, to even
  EXPECT_TRUE(std::isnan(numeric::f16_to_float(numeric::float_to_f16(NAN))));
}

TEST(Device, ProbeNeverThrows) {
  const int n = cuda_device_count();
  EXPECT_GE(n, 0);
  if (n == 0) {
    EXPECT_FALSE(cuda_unavailable_reason().empty());
    EXPECT_THROW(cuda_arch(0), Error);
  }
}

}  // namespace
}  // namespace kiln
