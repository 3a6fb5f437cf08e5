// fp8 (e4m3fn, e5m2) and Q8_0 formats: every code of both fp8 formats against a bit-level decoder
// written here from the OCP definition, encode rounding (nearest even), saturation and NaN, and
// Q8_0 known-answer blocks from ggml's definition. The CPU codecs are the oracle; the CUDA
// decoders and encoders are checked through dequantize / quantize_fp8 on the device.
#include <cuda_runtime.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/matmul.hpp"
#include "support/harness.hpp"

namespace kiln::test {
namespace {

using matmul_detail::float_to_fp8;
using matmul_detail::fp8_to_float;

// The OCP 8-bit float definition, read off the bits: sign, exponent field E (EXP bits), mantissa
// field F (MANT bits). Normal: 2^(E - bias) * (1 + F / 2^MANT); E = 0: 2^(1 - bias) * F / 2^MANT.
// e4m3fn: S.1111.111 is NaN, everything else finite. e5m2: E = 31 is inf (F = 0) or NaN.
double ocp_decode(std::uint8_t code, bool e4m3) {
  const int mant_bits = e4m3 ? 3 : 2;
  const int bias = e4m3 ? 7 : 15;
  const int sign = code >> 7;
  const int e = (code >> mant_bits) & ((1 << (7 - mant_bits)) - 1);
  const int f = code & ((1 << mant_bits) - 1);
  const double s = sign ? -1.0 : 1.0;
  if (e4m3 && e == 15 && f == 7) return std::numeric_limits<double>::quiet_NaN();
  if (!e4m3 && e == 31) return f == 0 ? s * INFINITY : std::numeric_limits<double>::quiet_NaN();
  const double fraction = double(f) / double(1 << mant_bits);
  if (e == 0) return s * std::pow(2.0, 1 - bias) * fraction;
  return s * std::pow(2.0, e - bias) * (1.0 + fraction);
}

DType format_of(bool e4m3) { return e4m3 ? DType::f8_e4m3fn : DType::f8_e5m2; }

void expect_same(float got, double want, const std::string& what) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << what;
  } else {
    EXPECT_EQ(double(got), want) << what;
    EXPECT_EQ(std::signbit(got), std::signbit(want)) << what << " (sign)";
  }
}

class Fp8Format : public ::testing::TestWithParam<bool> {};

TEST_P(Fp8Format, EveryCodeDecodesByItsOwnRule) {
  const bool e4m3 = GetParam();
  for (int code = 0; code < 256; ++code) {
    expect_same(fp8_to_float(std::uint8_t(code), format_of(e4m3)),
                ocp_decode(std::uint8_t(code), e4m3), "code " + std::to_string(code));
  }
}

TEST_P(Fp8Format, LandmarkValues) {
  const bool e4m3 = GetParam();
  const DType f = format_of(e4m3);
  if (e4m3) {
    EXPECT_EQ(fp8_to_float(0x7E, f), 448.f);
    EXPECT_EQ(fp8_to_float(0x08, f), 0x1p-6f);  // smallest normal
    EXPECT_EQ(fp8_to_float(0x01, f), 0x1p-9f);  // smallest subnormal
    EXPECT_EQ(fp8_to_float(0x38, f), 1.f);
    EXPECT_TRUE(std::isnan(fp8_to_float(0x7F, f)));
    EXPECT_TRUE(std::isnan(fp8_to_float(0xFF, f)));
    EXPECT_EQ(fp8_to_float(0x7C, f), 384.f);  // finite in e4m3fn (inf in e5m2)
  } else {
    EXPECT_EQ(fp8_to_float(0x7B, f), 57344.f);
    EXPECT_EQ(fp8_to_float(0x04, f), 0x1p-14f);
    EXPECT_EQ(fp8_to_float(0x01, f), 0x1p-16f);
    EXPECT_EQ(fp8_to_float(0x3C, f), 1.f);
    EXPECT_EQ(fp8_to_float(0x7C, f), INFINITY);
    EXPECT_EQ(fp8_to_float(0xFC, f), -INFINITY);
    EXPECT_TRUE(std::isnan(fp8_to_float(0x7F, f)));
    EXPECT_TRUE(std::isnan(fp8_to_float(0x7D, f)));
  }
}

TEST_P(Fp8Format, EncodeRoundsToNearestEvenAndSaturates) {
  const bool e4m3 = GetParam();
  const DType f = format_of(e4m3);
  const std::uint8_t max_code = e4m3 ? 0x7E : 0x7B;
  int checked = 0;
  for (int code = 0; code < 256; ++code) {
    const double v = ocp_decode(std::uint8_t(code), e4m3);
    if (!std::isfinite(v)) continue;
    // Every finite code round-trips (including -0).
    EXPECT_EQ(float_to_fp8(float(v), f), code) << "code " << code;
    const int mag = code & 0x7F;
    if (mag >= max_code) continue;
    const double next = ocp_decode(std::uint8_t(code + 1), e4m3);  // next magnitude, same sign
    const double mid = (v + next) / 2;
    const std::uint8_t even = (mag % 2 == 0) ? std::uint8_t(code) : std::uint8_t(code + 1);
    EXPECT_EQ(float_to_fp8(float(mid), f), even) << "midpoint after code " << code;
    // Just off the midpoint rounds to the nearer code.
    const double quarter = (next - v) / 4;
    EXPECT_EQ(float_to_fp8(float(mid - quarter), f), code) << "below midpoint " << code;
    EXPECT_EQ(float_to_fp8(float(mid + quarter), f), code + 1) << "above midpoint " << code;
    ++checked;
  }
  EXPECT_GT(checked, 200);
  const float max = e4m3 ? 448.f : 57344.f;
  EXPECT_EQ(float_to_fp8(max * 1.5f, f), max_code);
  EXPECT_EQ(float_to_fp8(-max * 4.f, f), 0x80 | max_code);
  EXPECT_EQ(float_to_fp8(INFINITY, f), max_code);
  EXPECT_EQ(float_to_fp8(-INFINITY, f), 0x80 | max_code);
  EXPECT_TRUE(std::isnan(fp8_to_float(float_to_fp8(NAN, f), f)));
  EXPECT_TRUE(std::isnan(fp8_to_float(float_to_fp8(-NAN, f), f)));
  // Below half the smallest subnormal: zero, with the sign kept.
  const float tiny = e4m3 ? 0x1p-11f : 0x1p-18f;
  EXPECT_EQ(float_to_fp8(tiny, f), 0x00);
  EXPECT_EQ(float_to_fp8(-tiny, f), 0x80);
}

INSTANTIATE_TEST_SUITE_P(Formats, Fp8Format, ::testing::Values(true, false),
                         [](const auto& param_info) {
                           return param_info.param ? "e4m3fn" : "e5m2";
                         });

// A Q8_0 block as bytes: f16 d (little-endian) then 32 int8.
std::vector<std::uint8_t> q8_block(std::uint16_t d_bits, const std::vector<int>& qs) {
  std::vector<std::uint8_t> b(34);
  b[0] = std::uint8_t(d_bits & 0xFF);
  b[1] = std::uint8_t(d_bits >> 8);
  for (int i = 0; i < 32; ++i)
    b[std::size_t(2 + i)] = std::uint8_t(std::int8_t(qs[std::size_t(i)]));
  return b;
}

std::vector<std::uint8_t> quantize_block_cpu(const std::vector<float>& x) {
  std::vector<std::uint8_t> out(34, 0xEE);
  const TensorView xv(const_cast<float*>(x.data()), DType::f32, {1, 32});
  const TensorView qv(out.data(), DType::u8, {1, 34});
  quantize_q8_0(xv, qv);
  return out;
}

TEST(Q8Format, KnownAnswerBlocks) {
  // amax 127: d = 1 (f16 0x3C00), q = roundf(x): halves go away from zero (2.5 -> 3, -0.5 -> -1).
  std::vector<float> x(32);
  std::vector<int> q(32);
  const float values[] = {127.f, -127.f, 2.5f, -2.5f, 0.5f, -0.5f, 1.49f, -1.51f, 0.f, 3.5f};
  const int rounded[] = {127, -127, 3, -3, 1, -1, 1, -2, 0, 4};
  for (int i = 0; i < 32; ++i) {
    x[std::size_t(i)] = values[i % 10];
    q[std::size_t(i)] = rounded[i % 10];
  }
  EXPECT_EQ(quantize_block_cpu(x), q8_block(0x3C00, q));

  // All zeros: d = 0 and every q = 0.
  EXPECT_EQ(quantize_block_cpu(std::vector<float>(32, 0.f)), q8_block(0, std::vector<int>(32, 0)));

  // x = i - 16: amax 16, d = 16/127 = 0.1259843 -> f16 0x3008 (0.1259766); q = roundf(x * 127/16)
  // with the unrounded f32 d, as ggml computes it.
  for (int i = 0; i < 32; ++i) {
    x[std::size_t(i)] = float(i - 16);
    const float d = 16.f / 127.f;
    q[std::size_t(i)] = int(std::round(float(i - 16) * (1.f / d)));
  }
  EXPECT_EQ(numeric::float_to_f16(16.f / 127.f), 0x3008);
  EXPECT_EQ(q[0], -127);
  EXPECT_EQ(q[17], 8);  // 1 * 7.9375 -> 8
  EXPECT_EQ(quantize_block_cpu(x), q8_block(0x3008, q));
}

TEST(Q8Format, DequantizeIsDTimesQ) {
  const std::vector<std::uint8_t> block = q8_block(0x3800, std::vector<int>(32, -3));  // d = 0.5
  std::vector<float> out(32, NAN);
  dequantize(TensorView(const_cast<std::uint8_t*>(block.data()), DType::u8, {1, 34}), std::nullopt,
             TensorView(out.data(), DType::f32, {1, 32}));
  for (float v : out) EXPECT_EQ(v, -1.5f);
}

// ---- CUDA: the device codecs through dequantize and quantize_fp8 ------------------------------

void every_code_decodes_like_the_cpu(bool e4m3) {
  const DType f = format_of(e4m3);
  std::vector<std::uint8_t> codes(256);
  for (int i = 0; i < 256; ++i) codes[std::size_t(i)] = std::uint8_t(i);
  DeviceBuffer q(256), out(256 * 4);
  q.upload(codes.data(), 256);
  // Both the 16-code vector path and the element path ([16, 16] and [256, 1]).
  for (const std::int64_t cols : {16, 1}) {
    dequantize(TensorView(q.data(), f, {256 / cols, cols}, Device::cuda(0)), std::nullopt,
               TensorView(out.data(), DType::f32, {256 / cols, cols}, Device::cuda(0)));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> got(256);
    out.download(got.data(), 256 * 4);
    for (int code = 0; code < 256; ++code) {
      expect_same(got[std::size_t(code)], ocp_decode(std::uint8_t(code), e4m3),
                  "code " + std::to_string(code) + ", cols " + std::to_string(cols));
    }
  }
  EXPECT_TRUE(q.guards_intact());
  EXPECT_TRUE(out.guards_intact());
}

void encode_matches_the_cpu_bit_for_bit(bool e4m3) {
  const DType f = format_of(e4m3);
  Rng rng;
  // Codes' values, midpoints and random floats of every magnitude, NaN, inf, saturating values.
  std::vector<float> x;
  for (int code = 0; code < 255; ++code) {
    const double v = ocp_decode(std::uint8_t(code), e4m3);
    const double next = ocp_decode(std::uint8_t(code + 1), e4m3);
    x.push_back(float(v));
    if (std::isfinite(v) && std::isfinite(next)) x.push_back(float((v + next) / 2));
  }
  for (float v : {NAN, -NAN, INFINITY, -INFINITY, 1e6f, -1e6f, 0.f, -0.f}) x.push_back(v);
  std::uniform_int_distribution<std::uint32_t> bits;
  while (x.size() % 16 != 0 || x.size() < 4096) {
    float v = std::bit_cast<float>(bits(rng.engine()));
    if (x.size() % 2 == 0)
      v = std::ldexp(float(bits(rng.engine()) % 20001) / 10000.f - 1.f,
                     int(bits(rng.engine()) % 48) - 24);
    x.push_back(v);
  }
  const std::int64_t n = std::int64_t(x.size());
  DeviceBuffer xd(x.size() * 4), qd(x.size()), sd(4);
  xd.upload(x.data(), x.size() * 4);
  const float one = 1.f;
  sd.upload(&one, 4);
  quantize_fp8(TensorView(xd.data(), DType::f32, {n / 16, 16}, Device::cuda(0)),
               TensorView(qd.data(), f, {n / 16, 16}, Device::cuda(0)),
               TensorView(sd.data(), DType::f32, {1}, Device::cuda(0)), ScaleGranularity::tensor,
               false);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<std::uint8_t> got(x.size());
  qd.download(got.data(), got.size());
  int bad = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::uint8_t want = float_to_fp8(x[i], f);
    // NaN stays NaN; its sign is not kept through x / scale (the GPU's division returns the
    // canonical NaN).
    const bool same = std::isnan(x[i]) ? std::isnan(fp8_to_float(got[i], f)) : got[i] == want;
    if (!same && ++bad <= 5) {
      ADD_FAILURE() << "x = " << x[i] << ": device " << int(got[i]) << ", cpu " << int(want);
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_TRUE(qd.guards_intact());
}

KILN_CUDA_TEST(Fp8FormatCuda, E4m3fnEveryCodeDecodesLikeTheCpu, true) {
  every_code_decodes_like_the_cpu(true);
}
KILN_CUDA_TEST(Fp8FormatCuda, E5m2EveryCodeDecodesLikeTheCpu, true) {
  every_code_decodes_like_the_cpu(false);
}
KILN_CUDA_TEST(Fp8FormatCuda, E4m3fnEncodeMatchesTheCpuBitForBit, true) {
  encode_matches_the_cpu_bit_for_bit(true);
}
KILN_CUDA_TEST(Fp8FormatCuda, E5m2EncodeMatchesTheCpuBitForBit, true) {
  encode_matches_the_cpu_bit_for_bit(false);
}

}  // namespace
}  // namespace kiln::test
