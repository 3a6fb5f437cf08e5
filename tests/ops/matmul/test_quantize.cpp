// quantize_fp8 (every granularity, computed or given scale), quantize_q8_0 and dequantize: the CPU
// reference against the definitions, the CUDA kernels against the CPU bit for bit (same f32
// products and divisions, so the codes, scales and dequantized values must be identical), odd
// shapes, strided x, poisoned outputs and guard bands, and argument errors.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/error.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/matmul.hpp"
#include "support/buffers.hpp"

namespace kiln::test {
namespace {

using matmul_detail::fp8_to_float;

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

std::vector<std::int64_t> scale_shape(ScaleGranularity g, std::int64_t r, std::int64_t c) {
  if (g == ScaleGranularity::tensor) return {1};
  if (g == ScaleGranularity::row) return {r};
  return {ceil_div(r, 128), ceil_div(c, 128)};
}

std::int64_t numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

const char* granularity_name(ScaleGranularity g) {
  return g == ScaleGranularity::tensor ? "tensor" : g == ScaleGranularity::row ? "row" : "block128";
}

struct QuantCase {
  std::int64_t rows, cols;
  DType x = DType::bf16;
  DType format = DType::f8_e4m3fn;
  ScaleGranularity granularity = ScaleGranularity::row;
  bool compute_scale = true;
  std::int64_t x_pad = 0;  // row stride = cols + x_pad (a column slice of a wider matrix)

  std::string name() const {
    return std::to_string(rows) + "x" + std::to_string(cols) + "_" + dtype_name(x) + "_to_" +
           dtype_name(format) + "_" + granularity_name(granularity) +
           (compute_scale ? "_computed" : "_given") + "_pad" + std::to_string(x_pad);
  }
};

void PrintTo(const QuantCase& c, std::ostream* os) { *os << c.name(); }

// x with values spread over several binades: uniform in [-1, 1) times 2^[-6, 6] per row.
void fill_x(HostBuffer& buf, const QuantCase& c, Rng& rng) {
  std::uniform_int_distribution<int> exp(-6, 6);
  for (std::int64_t r = 0; r < c.rows; ++r) {
    void* row = static_cast<char*>(buf.data()) + r * (c.cols + c.x_pad) * dtype_size(c.x);
    const float s = std::ldexp(1.f, exp(rng.engine()));
    fill_uniform(row, c.x, std::size_t(c.cols), rng, -s, s);
  }
}

TensorView x_view(void* data, const QuantCase& c, Device device) {
  const std::int64_t shape[] = {c.rows, c.cols};
  const std::int64_t strides[] = {c.cols + c.x_pad, 1};
  return TensorView(data, c.x, shape, strides, device);
}

// ---- CPU ----------------------------------------------------------------------------------------

TEST(QuantizeFp8, ComputedScaleIsAmaxOverMaxAndCodesRoundTrip) {
  Rng rng;
  for (DType format : {DType::f8_e4m3fn, DType::f8_e5m2}) {
    for (ScaleGranularity g :
         {ScaleGranularity::tensor, ScaleGranularity::row, ScaleGranularity::block128}) {
      const QuantCase c{300, 260, DType::f32, format, g, true, 0};
      SCOPED_TRACE(c.name() + ", seed " + std::to_string(rng.seed()));
      HostBuffer x(std::size_t(c.rows * c.cols) * 4);
      fill_x(x, c, rng);
      const auto sshape = scale_shape(g, c.rows, c.cols);
      std::vector<std::uint8_t> q(std::size_t(c.rows * c.cols));
      std::vector<float> scale(std::size_t(numel(sshape)), NAN);
      quantize_fp8(x_view(x.data(), c, Device::cpu()),
                   TensorView(q.data(), format, {c.rows, c.cols}),
                   TensorView::contiguous(scale.data(), DType::f32, sshape), g, true);
      const float max = format == DType::f8_e4m3fn ? 448.f : 57344.f;
      const float* xs = static_cast<const float*>(x.data());
      // The group of element (r, c) and the group's amax, computed here.
      auto group = [&](std::int64_t r, std::int64_t col) -> std::int64_t {
        if (g == ScaleGranularity::tensor) return 0;
        if (g == ScaleGranularity::row) return r;
        return (r / 128) * ceil_div(c.cols, 128) + col / 128;
      };
      std::vector<float> amax(scale.size(), 0.f);
      for (std::int64_t r = 0; r < c.rows; ++r) {
        for (std::int64_t col = 0; col < c.cols; ++col) {
          float& a = amax[std::size_t(group(r, col))];
          a = std::max(a, std::fabs(xs[r * c.cols + col]));
        }
      }
      for (std::size_t i = 0; i < scale.size(); ++i) EXPECT_EQ(scale[i], amax[i] / max) << i;
      // Dequantized values are within half an fp8 step (relative 2^-4 or 2^-3) of x, or within
      // half the subnormal step times the scale; the amax element maps to +-max.
      const double rel = format == DType::f8_e4m3fn ? 0x1p-4 : 0x1p-3;
      const double sub = format == DType::f8_e4m3fn ? 0x1p-10 : 0x1p-17;
      int at_max = 0;
      for (std::int64_t r = 0; r < c.rows; ++r) {
        for (std::int64_t col = 0; col < c.cols; ++col) {
          const float s = scale[std::size_t(group(r, col))];
          const std::uint8_t code = q[std::size_t(r * c.cols + col)];
          const double v = double(fp8_to_float(code, format)) * s;
          const double want = xs[r * c.cols + col];
          ASSERT_LE(std::fabs(v - want), rel * std::fabs(want) + sub * s) << r << ", " << col;
          at_max += std::fabs(fp8_to_float(code, format)) == max;
        }
      }
      EXPECT_GE(at_max, int(scale.size()));
    }
  }
}

TEST(QuantizeQ8_0, ShapesAndErrors) {
  std::vector<float> x(64, 1.f);
  std::vector<std::uint8_t> q(68);
  EXPECT_THROW(quantize_q8_0(TensorView(x.data(), DType::f32, {2, 32}),
                             TensorView(q.data(), DType::u8, {2, 33})),
               Error);
  try {
    quantize_q8_0(TensorView(x.data(), DType::f32, {4, 16}),
                  TensorView(q.data(), DType::u8, {4, 17}));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("multiple of 32"), std::string::npos) << e.what();
  }
}

TEST(QuantizeFp8, ScaleShapeMismatchIsAnError) {
  std::vector<float> x(256, 1.f), scale(4);
  std::vector<std::uint8_t> q(256);
  try {
    quantize_fp8(TensorView(x.data(), DType::f32, {2, 128}),
                 TensorView(q.data(), DType::f8_e4m3fn, {2, 128}),
                 TensorView(scale.data(), DType::f32, {3}), ScaleGranularity::row, true);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("scale"), std::string::npos) << e.what();
  }
  EXPECT_THROW(dequantize(TensorView(q.data(), DType::f8_e4m3fn, {2, 128}),
                          TensorView(scale.data(), DType::f32, {3}),
                          TensorView(x.data(), DType::f32, {2, 128})),
               Error);
  // The format comes from q's dtype: a non-fp8 q is refused.
  EXPECT_THROW(quantize_fp8(TensorView(x.data(), DType::f32, {2, 128}),
                            TensorView(q.data(), DType::u8, {2, 128}),
                            TensorView(scale.data(), DType::f32, {2}), ScaleGranularity::row, true),
               Error);
}

TEST(QuantizeFp8, EmptyInputIsANoOp) {
  std::vector<float> scale(1, 7.f);
  quantize_fp8(TensorView(nullptr, DType::f32, {0, 16}),
               TensorView(nullptr, DType::f8_e4m3fn, {0, 16}),
               TensorView(scale.data(), DType::f32, {1}), ScaleGranularity::tensor, true);
  EXPECT_EQ(scale[0], 7.f);
}

// ---- CUDA against the CPU -----------------------------------------------------------------------

std::vector<QuantCase> quant_cases() {
  std::vector<QuantCase> cases;
  const std::pair<std::int64_t, std::int64_t> shapes[] = {{1, 16},    {37, 208}, {130, 256},
                                                          {257, 200}, {3, 4096}, {300, 1000}};
  int i = 0;
  for (auto [rows, cols] : shapes) {
    for (DType format : {DType::f8_e4m3fn, DType::f8_e5m2}) {
      for (ScaleGranularity g :
           {ScaleGranularity::tensor, ScaleGranularity::row, ScaleGranularity::block128}) {
        for (bool compute : {true, false}) {
          const DType xs[] = {DType::bf16, DType::f32, DType::f16};
          QuantCase c{rows, cols, xs[i % 3], format, g, compute, (i % 4 == 3) ? 24 : 0};
          cases.push_back(c);
          ++i;
        }
      }
    }
  }
  return cases;
}

class QuantizeFp8Cuda : public ::testing::TestWithParam<QuantCase> {};

TEST_P(QuantizeFp8Cuda, MatchesCpuBitForBit) {
  KILN_REQUIRE_GPU();
  const QuantCase c = GetParam();
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const std::size_t x_bytes =
      std::size_t((c.rows - 1) * (c.cols + c.x_pad) + c.cols) * dtype_size(c.x);
  HostBuffer x(x_bytes);
  fill_x(x, c, rng);
  const auto sshape = scale_shape(c.granularity, c.rows, c.cols);
  const std::size_t s_bytes = std::size_t(numel(sshape)) * 4;
  const std::size_t q_bytes = std::size_t(c.rows * c.cols);
  // Given scales: positive values of any size.
  HostBuffer scale_cpu(s_bytes);
  if (!c.compute_scale) fill_uniform(scale_cpu.data(), DType::f32, s_bytes / 4, rng, 1e-3f, 2.f);
  HostBuffer q_cpu(q_bytes);
  quantize_fp8(
      x_view(x.data(), c, Device::cpu()), TensorView(q_cpu.data(), c.format, {c.rows, c.cols}),
      TensorView::contiguous(scale_cpu.data(), DType::f32, sshape), c.granularity, c.compute_scale);

  DeviceBuffer xd(x_bytes), qd(q_bytes), sd(s_bytes), outd(q_bytes * dtype_size(c.x));
  xd.upload(x.data(), x_bytes);
  if (!c.compute_scale) sd.upload(scale_cpu.data(), s_bytes);
  const TensorView sview = TensorView::contiguous(sd.data(), DType::f32, sshape, Device::cuda(0));
  quantize_fp8(x_view(xd.data(), c, Device::cuda(0)),
               TensorView(qd.data(), c.format, {c.rows, c.cols}, Device::cuda(0)), sview,
               c.granularity, c.compute_scale);
  // dequantize back into x's dtype, against the CPU's dequantize.
  dequantize(TensorView(qd.data(), c.format, {c.rows, c.cols}, Device::cuda(0)), sview,
             TensorView(outd.data(), c.x, {c.rows, c.cols}, Device::cuda(0)));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  std::vector<std::uint8_t> q_gpu(q_bytes);
  std::vector<float> s_gpu(s_bytes / 4);
  qd.download(q_gpu.data(), q_bytes);
  sd.download(s_gpu.data(), s_bytes);
  const auto* qc = static_cast<const std::uint8_t*>(q_cpu.data());
  const auto* sc = static_cast<const float*>(scale_cpu.data());
  for (std::size_t i = 0; i < s_gpu.size(); ++i) ASSERT_EQ(s_gpu[i], sc[i]) << "scale " << i;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < q_bytes; ++i) {
    if (q_gpu[i] != qc[i] && ++bad <= 5) {
      ADD_FAILURE() << "code " << i << ": device " << int(q_gpu[i]) << ", cpu " << int(qc[i]);
    }
  }
  EXPECT_EQ(bad, 0u);

  HostBuffer deq_cpu(q_bytes * dtype_size(c.x));
  dequantize(TensorView(q_cpu.data(), c.format, {c.rows, c.cols}),
             TensorView::contiguous(scale_cpu.data(), DType::f32, sshape),
             TensorView(deq_cpu.data(), c.x, {c.rows, c.cols}));
  std::vector<std::uint8_t> deq_gpu(q_bytes * dtype_size(c.x));
  outd.download(deq_gpu.data(), deq_gpu.size());
  EXPECT_EQ(std::memcmp(deq_gpu.data(), deq_cpu.data(), deq_gpu.size()), 0) << "dequantize";
  EXPECT_TRUE(xd.guards_intact() && qd.guards_intact() && sd.guards_intact() &&
              outd.guards_intact());
}

INSTANTIATE_TEST_SUITE_P(Cases, QuantizeFp8Cuda, ::testing::ValuesIn(quant_cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

struct Q8Case {
  std::int64_t rows, cols;
  DType x;
  std::int64_t x_pad;
  DType out;
};

void PrintTo(const Q8Case& c, std::ostream* os) {
  *os << c.rows << "x" << c.cols << "_" << dtype_name(c.x) << "_pad" << c.x_pad << "_out_"
      << dtype_name(c.out);
}

class QuantizeQ8_0Cuda : public ::testing::TestWithParam<Q8Case> {};

TEST_P(QuantizeQ8_0Cuda, MatchesCpuBitForBit) {
  KILN_REQUIRE_GPU();
  const Q8Case c = GetParam();
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const QuantCase shape{c.rows, c.cols, c.x, DType::f8_e4m3fn, ScaleGranularity::row,
                        true,   c.x_pad};
  const std::size_t x_bytes =
      std::size_t((c.rows - 1) * (c.cols + c.x_pad) + c.cols) * dtype_size(c.x);
  HostBuffer x(x_bytes);
  fill_x(x, shape, rng);
  // A few all-zero blocks (d = 0).
  std::memset(x.data(), 0, std::min<std::size_t>(x_bytes, 32 * dtype_size(c.x)));
  const std::int64_t qcols = c.cols / 32 * 34;
  const std::size_t q_bytes = std::size_t(c.rows * qcols);
  HostBuffer q_cpu(q_bytes);
  quantize_q8_0(x_view(x.data(), shape, Device::cpu()),
                TensorView(q_cpu.data(), DType::u8, {c.rows, qcols}));
  DeviceBuffer xd(x_bytes), qd(q_bytes), outd(std::size_t(c.rows * c.cols) * dtype_size(c.out));
  xd.upload(x.data(), x_bytes);
  quantize_q8_0(x_view(xd.data(), shape, Device::cuda(0)),
                TensorView(qd.data(), DType::u8, {c.rows, qcols}, Device::cuda(0)));
  dequantize(TensorView(qd.data(), DType::u8, {c.rows, qcols}, Device::cuda(0)), std::nullopt,
             TensorView(outd.data(), c.out, {c.rows, c.cols}, Device::cuda(0)));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<std::uint8_t> q_gpu(q_bytes);
  qd.download(q_gpu.data(), q_bytes);
  EXPECT_EQ(std::memcmp(q_gpu.data(), q_cpu.data(), q_bytes), 0) << "Q8_0 blocks";
  HostBuffer deq_cpu(outd.bytes());
  dequantize(TensorView(q_cpu.data(), DType::u8, {c.rows, qcols}), std::nullopt,
             TensorView(deq_cpu.data(), c.out, {c.rows, c.cols}));
  std::vector<std::uint8_t> deq_gpu(outd.bytes());
  outd.download(deq_gpu.data(), deq_gpu.size());
  EXPECT_EQ(std::memcmp(deq_gpu.data(), deq_cpu.data(), deq_gpu.size()), 0) << "dequantize";
  EXPECT_TRUE(xd.guards_intact() && qd.guards_intact() && outd.guards_intact());
}

INSTANTIATE_TEST_SUITE_P(Cases, QuantizeQ8_0Cuda,
                         ::testing::Values(Q8Case{1, 32, DType::f32, 0, DType::f32},
                                           Q8Case{7, 96, DType::bf16, 0, DType::bf16},
                                           Q8Case{33, 4096, DType::f16, 0, DType::f16},
                                           Q8Case{5, 224, DType::f32, 3, DType::bf16},
                                           Q8Case{300, 1024, DType::bf16, 16, DType::f32}),
                         [](const auto& param_info) {
                           std::ostringstream os;
                           PrintTo(param_info.param, &os);
                           return os.str();
                         });

}  // namespace
}  // namespace kiln::test
