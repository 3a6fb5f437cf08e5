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
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/error.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/matmul.hpp"
#include "support/harness.hpp"

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
    return cat(rows, "x", cols, "_", dtype_name(x), "_to_", dtype_name(format), "_",
               granularity_name(granularity), compute_scale ? "_computed" : "_given", "_pad",
               x_pad);
  }
};

// x (a host view, rows of any stride) with values spread over several binades: uniform in
// [-1, 1) times 2^[-6, 6] per row.
void fill_x(const TensorView& x, Rng& rng) {
  std::uniform_int_distribution<int> exp(-6, 6);
  for (std::int64_t r = 0; r < x.size(0); ++r) {
    void* row =
        static_cast<char*>(x.data()) + r * x.stride(0) * std::int64_t(dtype_size(x.dtype()));
    const float s = std::ldexp(1.f, exp(rng.engine()));
    fill_uniform(row, x.dtype(), std::size_t(x.size(1)), rng, -s, s);
  }
}

// ---- CPU ----------------------------------------------------------------------------------------

TEST(QuantizeFp8, ComputedScaleIsAmaxOverMaxAndCodesRoundTrip) {
  Rng rng;
  for (DType format : {DType::f8_e4m3fn, DType::f8_e5m2}) {
    for (ScaleGranularity g :
         {ScaleGranularity::tensor, ScaleGranularity::row, ScaleGranularity::block128}) {
      const QuantCase c{300, 260, DType::f32, format, g, true, 0};
      SCOPED_TRACE(c.name());
      HostBuffer x(std::size_t(c.rows * c.cols) * 4);
      const TensorView xv(x.data(), DType::f32, {c.rows, c.cols});
      fill_x(xv, rng);
      const auto sshape = scale_shape(g, c.rows, c.cols);
      std::vector<std::uint8_t> q(std::size_t(c.rows * c.cols));
      std::vector<float> scale(std::size_t(numel(sshape)), NAN);
      quantize_fp8(xv, TensorView(q.data(), format, {c.rows, c.cols}),
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

// quantize_fp8, then dequantize back into x's dtype: codes, computed scales and dequantized
// values bit for bit against the CPU.
struct QuantizeFp8 {
  using Case = QuantCase;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    fill_x(t.input("x", c.x, {c.rows, c.cols}, {c.cols + c.x_pad, 1}), rng);
    const Dims sshape = scale_shape(c.granularity, c.rows, c.cols);
    if (c.compute_scale) {
      t.output("scale", DType::f32, sshape);
    } else {
      t.input("scale", DType::f32, sshape);  // given scales: positive values of any size
      t.fill("scale", rng, 1e-3f, 2.f);
    }
    t.output("q", c.format, {c.rows, c.cols});
    t.output("dequantized", c.x, {c.rows, c.cols});
  }

  static void run(const Case& c, const Views& v, Stream stream) {
    quantize_fp8(v["x"], v["q"], v["scale"], c.granularity, c.compute_scale, stream);
    dequantize(v["q"], v["scale"], v["dequantized"], stream);
  }

  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    const Views& cpu = r.cpu();
    std::vector<Expected> e = {same_bits("q", cpu["q"]),
                               same_bits("dequantized", cpu["dequantized"])};
    if (c.compute_scale) e.push_back(same_bits("scale", cpu["scale"]));
    return e;
  }
};

KILN_CASES(QuantizeFp8, "QuantizeFp8", quant_cases, .backends = {Backend::cuda}, .sanitize = true);

struct Q8Case {
  std::int64_t rows, cols;
  DType x;
  std::int64_t x_pad;
  DType out;
  std::string name() const {
    return cat(rows, "x", cols, "_", dtype_name(x), "_pad", x_pad, "_out_", dtype_name(out));
  }
};

// quantize_q8_0 (an all-zero block: d = 0; in the last row a block holding 1e7, whose d overflows
// f16 and saturates (inf for f16 x), one holding +inf and one NaN), then dequantize: blocks and
// values bit for bit against the CPU.
struct QuantizeQ8_0 {
  using Case = Q8Case;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    const TensorView x = t.input("x", c.x, {c.rows, c.cols}, {c.cols + c.x_pad, 1});
    fill_x(x, rng);
    std::memset(x.data(), 0, 32 * dtype_size(c.x));
    const float specials[] = {1e7f, INFINITY, NAN};
    const std::int64_t last_row = (c.rows - 1) * (c.cols + c.x_pad);
    for (std::int64_t i = 0; i < 3 && 32 * (i + 1) + 5 < c.cols; ++i) {
      numeric::store_float(x.data(), c.x, last_row + 32 * (i + 1) + 5, specials[i]);
    }
    t.output("q", DType::u8, {c.rows, c.cols / 32 * 34});
    t.output("dequantized", c.out, {c.rows, c.cols});
  }

  static void run(const Case&, const Views& v, Stream stream) {
    quantize_q8_0(v["x"], v["q"], stream);
    dequantize(v["q"], std::nullopt, v["dequantized"], stream);
  }

  static std::vector<Expected> expect(const Case&, CaseRun& r) {
    const Views& cpu = r.cpu();
    return {same_bits("q", cpu["q"]), same_bits("dequantized", cpu["dequantized"])};
  }
};

std::vector<Q8Case> q8_cases() {
  return {{1, 32, DType::f32, 0, DType::f32},
          {7, 96, DType::bf16, 0, DType::bf16},
          {33, 4096, DType::f16, 0, DType::f16},
          {5, 224, DType::f32, 3, DType::bf16},
          {300, 1024, DType::bf16, 16, DType::f32}};
}

KILN_CASES(QuantizeQ8_0, "QuantizeQ8_0", q8_cases, .backends = {Backend::cuda}, .sanitize = true);

}  // namespace
}  // namespace kiln::test
