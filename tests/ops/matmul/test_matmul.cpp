// matmul: the CPU reference against a direct f64 sum written here, argument checks and empty
// problems on CPU, and the small-M GEMV path on CUDA against the CPU reference at M in
// {1, 2, 3, 5, 8, 16} (the GEMM, fp8_native and prepared paths, and M up to 257, are in
// test_gemm.cpp). Every weight format and scale kind, with and without bias, every out dtype,
// strided and misaligned a, K off the 16-byte chunk and the q8_0 stage, odd N, split-K, fp8 a
// with per-tensor and per-row scales. Outputs are poisoned and guard-banded; `automatic` is
// checked bit for bit against the path it names. Inputs are fresh every run (seed in the record).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/matmul.hpp"
#include "ops/matmul/support.hpp"
#include "support/buffers.hpp"

namespace kiln::test {
namespace {

using matmul_detail::fp8_to_float;
using matmul_detail::quantize_q8_0_block;
using matmul_detail::weight_row_bytes;

enum class Scale { none, tensor, row, block128 };

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

std::vector<std::int64_t> scale_shape(Scale s, std::int64_t rows, std::int64_t cols) {
  if (s == Scale::tensor) return {1};
  if (s == Scale::row) return {rows};
  if (s == Scale::block128) return {ceil_div(rows, 128), ceil_div(cols, 128)};
  return {};
}

std::int64_t numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

bool fp8(DType d) { return d == DType::f8_e4m3fn || d == DType::f8_e5m2; }

struct GemvCase {
  WeightFormat format = WeightFormat::f8_e4m3fn;
  Scale w_scale = Scale::row;
  DType a = DType::bf16;
  Scale a_scale = Scale::none;  // fp8 a only
  DType out = DType::bf16;
  std::optional<DType> bias;
  std::int64_t n = 77;
  std::int64_t k = 1040;
  std::int64_t a_pad = 0;     // row stride of a = K + a_pad
  std::int64_t a_offset = 0;  // elements from the buffer start to a (misaligned a)
  std::int64_t w_offset = 0;  // bytes from the buffer start to w (misaligned weight)
  std::vector<std::int64_t> ms = {1, 2, 3, 5, 8, 16};

  std::string name() const {
    static const char* scales[] = {"none", "tensor", "row", "block128"};
    std::string s = weight_format_name(format);
    s += "_w";
    s += scales[int(w_scale)];
    s += "_a_";
    s += dtype_name(a);
    if (fp8(a)) {
      s += "_";
      s += scales[int(a_scale)];
    }
    s += "_out_";
    s += dtype_name(out);
    if (bias) {
      s += "_bias_";
      s += dtype_name(*bias);
    }
    const auto field = [&s](const char* label, std::int64_t v) {
      s += label;
      s += std::to_string(v);
    };
    field("_N", n);
    field("_K", k);
    if (a_pad) field("_apad", a_pad);
    if (a_offset) field("_aoff", a_offset);
    if (w_offset) field("_woff", w_offset);
    s += "_M";
    for (auto m : ms) field("_", m);
    return s;
  }
};

void PrintTo(const GemvCase& c, std::ostream* os) { *os << c.name(); }

// A host buffer and, on machines with a GPU, its device copy (both guard-banded and poisoned).
struct Pair {
  HostBuffer host;
  std::unique_ptr<DeviceBuffer> gpu;
  explicit Pair(std::size_t bytes)
      : host(bytes),
        gpu(cuda_device_count() > 0 ? std::make_unique<DeviceBuffer>(bytes) : nullptr) {}
  void upload() {
    if (gpu) gpu->upload(host.data(), host.bytes());
  }
  DeviceBuffer& device() const { return *gpu; }
};

// The inputs of one case at one M, on host and device.
class Problem {
 public:
  Problem(const GemvCase& c, std::int64_t m, Rng& rng)
      : c_(c),
        m_(m),
        lda_(c.k + c.a_pad),
        a_(std::size_t(c.a_offset + (m - 1) * lda_ + c.k) * dtype_size(c.a) + 1),
        w_(std::size_t(c.w_offset + c.n * weight_row_bytes(c.format, c.k)) + 1),
        w_scale_(std::size_t(std::max<std::int64_t>(1, numel(scale_shape(c.w_scale, c.n, c.k)))) *
                 4),
        a_scale_(std::size_t(std::max<std::int64_t>(1, numel(scale_shape(c.a_scale, m, c.k)))) * 4),
        bias_(std::size_t(c.n) * 4),
        out_(std::size_t(std::max<std::int64_t>(1, m * c.n)) * dtype_size(c.out)) {
    for (std::int64_t i = 0; i < m; ++i) {
      auto* row =
          static_cast<std::uint8_t*>(a_.host.data()) + (c.a_offset + i * lda_) * dtype_size(c.a);
      if (fp8(c.a)) {
        fill_fp8(row, c.a, std::size_t(c.k), rng, 8.f);
      } else {
        fill_uniform(row, c.a, std::size_t(c.k), rng);
      }
    }
    a_.upload();
    auto* w = static_cast<std::uint8_t*>(w_.host.data()) + c.w_offset;
    if (c.format == WeightFormat::q8_0) {
      std::uniform_real_distribution<float> dist(-1.f, 1.f);
      std::vector<float> block(32);
      for (std::int64_t b = 0; b < c.n * c.k / 32; ++b) {
        for (float& v : block) v = dist(rng.engine());
        quantize_q8_0_block(block.data(), w + b * 34);
      }
    } else if (c.format == WeightFormat::f16 || c.format == WeightFormat::bf16) {
      fill_uniform(w, matmul_detail::storage_dtype(c.format), std::size_t(c.n * c.k), rng);
    } else {
      // Normals and subnormals of the format (e5m2's range reaches 2^-16).
      fill_fp8(w, matmul_detail::storage_dtype(c.format), std::size_t(c.n * c.k), rng, 240.f);
    }
    w_.upload();
    fill_uniform(w_scale_.host.data(), DType::f32, w_scale_.host.bytes() / 4, rng, 0.25f, 2.f);
    w_scale_.upload();
    fill_uniform(a_scale_.host.data(), DType::f32, a_scale_.host.bytes() / 4, rng, 0.25f, 2.f);
    a_scale_.upload();
    if (c.bias) {
      fill_uniform(bias_.host.data(), *c.bias, std::size_t(c.n), rng, -4.f, 4.f);
      bias_.upload();
    }
  }

  TensorView a(bool device) const {
    const std::int64_t shape[] = {m_, c_.k};
    const std::int64_t strides[] = {lda_, 1};
    auto* base =
        static_cast<std::uint8_t*>(device ? a_.device().data() : const_cast<void*>(a_.host.data()));
    return TensorView(base + c_.a_offset * dtype_size(c_.a), c_.a, shape, strides,
                      device ? Device::cuda(0) : Device::cpu());
  }

  Weight weight(bool device) const {
    Weight w;
    w.format = c_.format;
    w.n = c_.n;
    w.k = c_.k;
    const Device dev = device ? Device::cuda(0) : Device::cpu();
    auto* data = static_cast<std::uint8_t*>(device ? w_.device().data()
                                                   : const_cast<void*>(w_.host.data())) +
                 c_.w_offset;
    const std::int64_t cols = c_.format == WeightFormat::q8_0 ? c_.k / 32 * 34 : c_.k;
    w.data = TensorView(data, matmul_detail::storage_dtype(c_.format), {c_.n, cols}, dev);
    if (c_.w_scale != Scale::none) {
      w.scale = TensorView::contiguous(
          device ? w_scale_.device().data() : const_cast<void*>(w_scale_.host.data()), DType::f32,
          scale_shape(c_.w_scale, c_.n, c_.k), dev);
    }
    return w;
  }

  MatmulOptions options(bool device, MatmulPath path) const {
    MatmulOptions o;
    o.path = path;
    const Device dev = device ? Device::cuda(0) : Device::cpu();
    if (c_.a_scale != Scale::none) {
      o.a_scale = TensorView::contiguous(
          device ? a_scale_.device().data() : const_cast<void*>(a_scale_.host.data()), DType::f32,
          scale_shape(c_.a_scale, m_, c_.k), dev);
    }
    if (c_.bias) {
      o.bias = TensorView(device ? bias_.device().data() : const_cast<void*>(bias_.host.data()),
                          *c_.bias, {c_.n}, dev);
    }
    return o;
  }

  TensorView out(bool device, HostBuffer* host = nullptr) const {
    return device ? TensorView(out_.device().data(), c_.out, {m_, c_.n}, Device::cuda(0))
                  : TensorView(host->data(), c_.out, {m_, c_.n});
  }

  std::vector<float> download_out() const {
    HostBuffer host(out_.device().bytes());
    out_.device().download(host.data(), host.bytes());
    return to_floats(host.data(), c_.out, std::size_t(m_ * c_.n));
  }

  std::vector<std::uint8_t> download_out_bytes() const {
    std::vector<std::uint8_t> bytes(out_.device().bytes());
    out_.device().download(bytes.data(), bytes.size());
    return bytes;
  }

  // The CPU reference (f64 sums), rounded to out's dtype like the GPU result.
  std::vector<float> reference() const {
    HostBuffer host(std::size_t(m_ * c_.n) * dtype_size(c_.out));
    EXPECT_EQ(
        matmul(a(false), weight(false), out(false, &host), options(false, MatmulPath::automatic)),
        MatmulPath::reference);
    EXPECT_TRUE(host.guards_intact());
    return to_floats(host.data(), c_.out, std::size_t(m_ * c_.n));
  }

  bool guards_intact() const {
    return a_.device().guards_intact() && w_.device().guards_intact() &&
           w_scale_.device().guards_intact() && a_scale_.device().guards_intact() &&
           bias_.device().guards_intact() && out_.device().guards_intact();
  }

 private:
  GemvCase c_;
  std::int64_t m_, lda_;
  Pair a_, w_, w_scale_, a_scale_, bias_, out_;
};

// ||got - want|| / ||want||; infinity when got has a NaN.
// f16/bf16 out: the bound (both sides rounded to out's dtype, so this measures the
// accumulation order only). f32 out: f32 sums of exact products over K <= 4352 stay near 1e-6.
double tolerance(DType out) { return out == DType::f32 ? 1e-5 : 1e-3; }

// ---- CPU ----------------------------------------------------------------------------------------

// The value of weight element (n, k), decoded here from the bytes (not through the reference).
double weight_value(const GemvCase& c, const Weight& w, std::int64_t n, std::int64_t k) {
  const auto* bytes = static_cast<const std::uint8_t*>(w.data.data());
  double s = 1;
  if (w.scale) {
    const float* sc = static_cast<const float*>(w.scale->data());
    if (c.w_scale == Scale::tensor) s = sc[0];
    if (c.w_scale == Scale::row) s = sc[n];
    if (c.w_scale == Scale::block128) s = sc[(n / 128) * ceil_div(c.k, 128) + k / 128];
  }
  switch (c.format) {
    case WeightFormat::f16:
    case WeightFormat::bf16:
      return numeric::load_float(w.data.data(), w.data.dtype(), n * c.k + k);
    case WeightFormat::f8_e4m3fn:
    case WeightFormat::f8_e5m2:
      return double(fp8_to_float(bytes[n * c.k + k], matmul_detail::storage_dtype(c.format))) * s;
    case WeightFormat::q8_0: {
      const std::uint8_t* block = bytes + n * (c.k / 32 * 34) + (k / 32) * 34;
      const std::uint16_t d = std::uint16_t(block[0] | block[1] << 8);
      return double(numeric::f16_to_float(d)) * double(std::int8_t(block[2 + k % 32]));
    }
  }
  return 0;
}

TEST(MatmulReference, MatchesADirectSum) {
  Rng rng;
  const GemvCase cases[] = {
      {WeightFormat::f8_e4m3fn, Scale::block128, DType::bf16, Scale::none, DType::f32, DType::f32,
       130, 300},
      {WeightFormat::f8_e5m2, Scale::row, DType::f8_e5m2, Scale::row, DType::f32, DType::bf16, 9,
       64},
      {WeightFormat::q8_0, Scale::none, DType::f32, Scale::none, DType::f32, std::nullopt, 5, 96},
      {WeightFormat::f16, Scale::none, DType::f16, Scale::none, DType::f32, DType::f16, 3, 40},
  };
  for (const GemvCase& c : cases) {
    SCOPED_TRACE(c.name() + ", seed " + std::to_string(rng.seed()));
    const std::int64_t m = 3;
    Problem p(c, m, rng);
    const std::vector<float> got = p.reference();
    const Weight w = p.weight(false);
    const TensorView a = p.a(false);
    const MatmulOptions o = p.options(false, MatmulPath::automatic);
    std::vector<float> want(std::size_t(m * c.n));
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t n = 0; n < c.n; ++n) {
        double sum = 0;
        for (std::int64_t k = 0; k < c.k; ++k) {
          const std::int64_t idx = i * a.stride(0) + k;
          const double av = fp8(c.a)
                                ? fp8_to_float(static_cast<const std::uint8_t*>(a.data())[idx], c.a)
                                : numeric::load_float(a.data(), c.a, idx);
          sum += av * weight_value(c, w, n, k);
        }
        if (o.a_scale)
          sum *= static_cast<const float*>(o.a_scale->data())[c.a_scale == Scale::row ? i : 0];
        if (o.bias) sum += numeric::load_float(o.bias->data(), o.bias->dtype(), n);
        want[std::size_t(i * c.n + n)] = float(sum);
      }
    }
    EXPECT_LE(relative_error(got, want), 1e-6);
  }
}

TEST(MatmulReference, EmptyAndBiasOnlyProblems) {
  // K = 0: out = bias.
  std::vector<float> bias = {1.5f, -2.f, 3.f}, out(6, NAN);
  Weight w;
  w.format = WeightFormat::bf16;
  w.n = 3;
  w.k = 0;
  w.data = TensorView(nullptr, DType::bf16, {3, 0});
  MatmulOptions o;
  o.bias = TensorView(bias.data(), DType::f32, {3});
  matmul(TensorView(nullptr, DType::bf16, {2, 0}), w, TensorView(out.data(), DType::f32, {2, 3}),
         o);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(out[std::size_t(i)], bias[std::size_t(i % 3)]);
  // M = 0: nothing to write.
  std::vector<std::uint16_t> wd(3 * 8);
  w.k = 8;
  w.data = TensorView(wd.data(), DType::bf16, {3, 8});
  EXPECT_EQ(matmul(TensorView(nullptr, DType::bf16, {0, 8}), w,
                   TensorView(nullptr, DType::f32, {0, 3}), {}),
            MatmulPath::reference);
}

// The message of the kiln::Error `f` throws ("" when it does not throw).
template <typename F>
std::string error_of(F f, ErrorCode expected_code) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), expected_code) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected a kiln::Error";
  return "";
}

TEST(MatmulArguments, ClearErrors) {
  std::vector<float> a(4 * 64), out(4 * 8), scale(8), bias(8);
  std::vector<std::uint8_t> w8(8 * 64), q8(8 * 68);
  Weight w;
  w.format = WeightFormat::f8_e4m3fn;
  w.n = 8;
  w.k = 64;
  w.data = TensorView(w8.data(), DType::f8_e4m3fn, {8, 64});
  const TensorView av(a.data(), DType::f32, {4, 64}), ov(out.data(), DType::f32, {4, 8});
  auto run = [&](const TensorView& a_, const Weight& w_, const MatmulOptions& o) {
    return [=] { matmul(a_, w_, ov, o); };
  };
  // K mismatch.
  EXPECT_NE(
      error_of(run(TensorView(a.data(), DType::f32, {4, 32}), w, {}), ErrorCode::invalid_argument)
          .find("K = 32"),
      std::string::npos);
  // Scale shape mismatch.
  Weight bad_scale = w;
  bad_scale.scale = TensorView(scale.data(), DType::f32, {5});
  EXPECT_NE(error_of(run(av, bad_scale, {}), ErrorCode::invalid_argument).find("w.scale"),
            std::string::npos);
  // Unsupported dtype pair: fp8 a with a bf16 weight.
  std::vector<std::uint16_t> wb(8 * 64);
  Weight bf = w;
  bf.format = WeightFormat::bf16;
  bf.data = TensorView(wb.data(), DType::bf16, {8, 64});
  EXPECT_NE(error_of(run(TensorView(w8.data(), DType::f8_e4m3fn, {4, 64}), bf, {}),
                     ErrorCode::unsupported)
                .find("fp8 weight"),
            std::string::npos);
  // Q8_0 with K off the block.
  Weight q = w;
  q.format = WeightFormat::q8_0;
  q.k = 48;
  q.data = TensorView(q8.data(), DType::u8, {8, 51});
  EXPECT_NE(
      error_of(run(TensorView(a.data(), DType::f32, {4, 48}), q, {}), ErrorCode::invalid_argument)
          .find("multiple of 32"),
      std::string::npos);
  // a with a column stride.
  const std::int64_t shape[] = {4, 32}, strides[] = {64, 2};
  Weight w32 = w;
  w32.k = 32;
  w32.data = TensorView(w8.data(), DType::f8_e4m3fn, {8, 32});
  EXPECT_NE(error_of(run(TensorView(a.data(), DType::f32, shape, strides), w32, {}),
                     ErrorCode::invalid_argument)
                .find("column stride"),
            std::string::npos);
  // Bias of the wrong length; a_scale with a float a; an explicit CUDA path on CPU tensors.
  MatmulOptions o;
  o.bias = TensorView(bias.data(), DType::f32, {7});
  EXPECT_NE(error_of(run(av, w, o), ErrorCode::invalid_argument).find("bias"), std::string::npos);
  o = {};
  o.a_scale = TensorView(scale.data(), DType::f32, {1});
  EXPECT_NE(error_of(run(av, w, o), ErrorCode::invalid_argument).find("a_scale"),
            std::string::npos);
  o = {};
  o.path = MatmulPath::gemv;
  EXPECT_NE(error_of(run(av, w, o), ErrorCode::invalid_argument).find("CUDA"), std::string::npos);
  // A scale on a weight format without one.
  Weight bf_scaled = bf;
  bf_scaled.scale = TensorView(scale.data(), DType::f32, {1});
  EXPECT_NE(error_of(run(av, bf_scaled, {}), ErrorCode::invalid_argument).find("only with fp8"),
            std::string::npos);
}

// ---- CUDA: the GEMV path ------------------------------------------------------------------------

std::vector<GemvCase> gemv_cases() {
  using F = WeightFormat;
  std::vector<GemvCase> cases;
  // Every format, every M, default shape (K = 1040: 65 fp8 chunks, 130 16-bit chunks, off the
  // 2-chunk unroll; q8_0 K = 1280: one full and one partial 32-block stage).
  cases.push_back({F::f8_e4m3fn, Scale::row, DType::bf16, Scale::none, DType::bf16, DType::bf16});
  cases.push_back({F::f8_e5m2, Scale::tensor, DType::f16, Scale::none, DType::f16, std::nullopt});
  cases.push_back(
      {F::f8_e4m3fn, Scale::block128, DType::f32, Scale::none, DType::f32, DType::f32, 301, 1040});
  cases.push_back(
      {F::q8_0, Scale::none, DType::bf16, Scale::none, DType::bf16, DType::f16, 77, 1280});
  cases.push_back({F::bf16, Scale::none, DType::bf16, Scale::none, DType::f32, std::nullopt});
  cases.push_back({F::f16, Scale::none, DType::f16, Scale::none, DType::bf16, DType::bf16});
  // The tensor-core kernel's decoders: e5m2 -> bf16 (NaN / inf vote) with block128 scales and
  // K off the 128-chunk, e4m3 -> f16; M 9-16 take a second B fragment.
  cases.push_back(
      {F::f8_e5m2, Scale::block128, DType::bf16, Scale::none, DType::bf16, DType::f32, 45, 1088});
  cases.push_back(
      {F::f8_e4m3fn, Scale::tensor, DType::f16, Scale::none, DType::f16, DType::f16, 50, 2064});
  // q8_0 with K off the 256-value 16-byte period but whole block pairs (the tensor-core kernel's
  // 4-byte loads), f16 a.
  cases.push_back(
      {F::q8_0, Scale::none, DType::f16, Scale::none, DType::f32, DType::bf16, 29, 1088});
  // Few rows, K = 3072 (a partial last step of the warps' 4-segment steps), split-K.
  GemvCase six{F::f8_e4m3fn, Scale::block128, DType::bf16, Scale::none, DType::bf16, DType::bf16};
  six.n = 40;
  six.k = 3072;
  six.ms = {2, 16};
  cases.push_back(six);
  // N large enough for 4 warps a block (>= 4 row tiles an SM), no split.
  GemvCase wide{F::f8_e4m3fn, Scale::row, DType::bf16, Scale::none, DType::bf16, std::nullopt};
  wide.n = 12801;
  wide.k = 256;
  wide.ms = {1, 9};
  cases.push_back(wide);
  // fp8 activations with per-tensor and per-row scales.
  cases.push_back(
      {F::f8_e4m3fn, Scale::row, DType::f8_e4m3fn, Scale::tensor, DType::bf16, DType::bf16});
  cases.push_back({F::f8_e5m2, Scale::block128, DType::f8_e4m3fn, Scale::row, DType::f32,
                   std::nullopt, 129, 1040});
  // Each scale kind, bias and out dtype on fewer Ms.
  const std::vector<std::int64_t> few = {1, 5, 16};
  for (Scale s : {Scale::none, Scale::tensor, Scale::row, Scale::block128}) {
    for (DType out : {DType::f32, DType::f16, DType::bf16}) {
      GemvCase c{F::f8_e4m3fn, s, DType::bf16, Scale::none, out, DType::f32, 33, 528};
      c.ms = few;
      if (out == DType::f16) c.bias = std::nullopt;
      cases.push_back(c);
    }
  }
  // K off the 16-byte chunk (element loads, with a log line), odd N, misaligned weight and a.
  GemvCase c{F::f8_e4m3fn, Scale::row,  DType::bf16, Scale::none,
             DType::bf16,  DType::bf16, 37,          1000};
  c.ms = {1, 3, 16};
  cases.push_back(c);
  c = {F::bf16, Scale::none, DType::f32, Scale::none, DType::f32, std::nullopt, 19, 1001};
  c.ms = {2, 8};
  cases.push_back(c);
  c = {F::q8_0,    Scale::none, DType::f16, Scale::none,
       DType::f16, DType::f32,  45,         1056};  // K % 256 != 0
  c.ms = {1, 5, 16};
  cases.push_back(c);
  c = {F::f8_e5m2, Scale::row, DType::bf16, Scale::none, DType::bf16, std::nullopt, 41, 512};
  c.w_offset = 1;  // weight at an odd address: element loads
  c.ms = {1, 3};
  cases.push_back(c);
  // Strided a (a column slice of a wider matrix) and a at an address off 16 bytes.
  c = {F::f8_e4m3fn, Scale::tensor, DType::bf16, Scale::none, DType::f32, std::nullopt, 63, 1024};
  c.a_pad = 40;
  c.ms = {2, 5, 16};
  cases.push_back(c);
  c = {F::q8_0, Scale::none, DType::f32, Scale::none, DType::bf16, DType::bf16, 63, 1024};
  c.a_pad = 3;
  c.a_offset = 1;
  c.ms = {1, 3};
  cases.push_back(c);
  // Few rows, long K: split-K (partial sums in f32, then the epilogue kernel).
  c = {F::f8_e4m3fn, Scale::block128, DType::bf16, Scale::none, DType::bf16, DType::bf16, 7, 4352};
  c.ms = {1, 8};
  cases.push_back(c);
  c = {F::q8_0, Scale::none, DType::bf16, Scale::none, DType::f32, DType::f32, 3, 4096};
  c.ms = {1, 3, 16};
  cases.push_back(c);
  c = {F::bf16, Scale::none, DType::bf16, Scale::none, DType::f16, DType::f16, 1, 2056};
  c.ms = {1, 16};
  cases.push_back(c);
  return cases;
}

class MatmulGemvCuda : public ::testing::TestWithParam<GemvCase> {};

TEST_P(MatmulGemvCuda, MatchesReference) {
  KILN_REQUIRE_GPU();
  const GemvCase c = GetParam();
  Rng rng;
  for (std::int64_t m : c.ms) {
    SCOPED_TRACE("M = " + std::to_string(m) + ", seed " + std::to_string(rng.seed()));
    Problem p(c, m, rng);
    const MatmulPath ran =
        matmul(p.a(true), p.weight(true), p.out(true), p.options(true, MatmulPath::gemv));
    EXPECT_EQ(ran, MatmulPath::gemv);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> got = p.download_out();
    const std::vector<float> want = p.reference();
    EXPECT_LE(relative_error(got, want), tolerance(c.out));
    EXPECT_TRUE(p.guards_intact());

    // `automatic` runs the path select_path names, bit for bit (aligned pointers: the selector
    // decides on shapes, and a misaligned pointer may rule its choice out).
    if (c.w_offset != 0 || c.a_offset != 0) continue;
    const MatmulPath chosen = select_path(m, p.weight(true), c.a, Device::cuda(0));
    const std::vector<std::uint8_t> explicit_bytes = [&] {
      matmul(p.a(true), p.weight(true), p.out(true), p.options(true, chosen));
      return p.download_out_bytes();
    }();
    EXPECT_EQ(
        matmul(p.a(true), p.weight(true), p.out(true), p.options(true, MatmulPath::automatic)),
        chosen);
    EXPECT_EQ(p.download_out_bytes(), explicit_bytes) << "auto vs " << matmul_path_name(chosen);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, MatmulGemvCuda, ::testing::ValuesIn(gemv_cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

TEST(MatmulCudaEdges, NanAndInfWeightCodesPropagate) {
  KILN_REQUIRE_GPU();
  Rng rng;
  // Both tensor-core operand types (bf16, f16) for each fp8 format.
  using Formats = std::pair<DType, WeightFormat>;
  for (const auto& [a_dtype, f] :
       {Formats{DType::bf16, WeightFormat::f8_e4m3fn}, Formats{DType::bf16, WeightFormat::f8_e5m2},
        Formats{DType::f16, WeightFormat::f8_e4m3fn}, Formats{DType::f16, WeightFormat::f8_e5m2}}) {
    for (MatmulPath path : {MatmulPath::gemv, MatmulPath::gemm}) {
      SCOPED_TRACE(std::string("a ") + dtype_name(a_dtype) + ", w " + weight_format_name(f) +
                   ", path " + matmul_path_name(path));
      GemvCase c{f, Scale::none, a_dtype, Scale::none, DType::f32, std::nullopt, 20, 512};
      Problem p(c, 2, rng);
      // Row 3 gets a NaN code, row 7 (e5m2) an inf code; the rest stays finite.
      Weight w = p.weight(true);
      const std::uint8_t nan_code = 0x7F, inf_code = 0x7C;
      ASSERT_EQ(cudaMemcpy(static_cast<std::uint8_t*>(w.data.data()) + 3 * 512 + 100, &nan_code, 1,
                           cudaMemcpyHostToDevice),
                cudaSuccess);
      if (f == WeightFormat::f8_e5m2) {
        ASSERT_EQ(cudaMemcpy(static_cast<std::uint8_t*>(w.data.data()) + 7 * 512 + 5, &inf_code, 1,
                             cudaMemcpyHostToDevice),
                  cudaSuccess);
      }
      matmul(p.a(true), w, p.out(true), p.options(true, path));
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<float> got = p.download_out();
      for (std::int64_t i = 0; i < 2; ++i) {
        for (std::int64_t n = 0; n < 20; ++n) {
          const float v = got[std::size_t(i * 20 + n)];
          if (n == 3) {
            EXPECT_TRUE(std::isnan(v)) << n;
          } else if (n == 7 && f == WeightFormat::f8_e5m2) {
            EXPECT_TRUE(std::isinf(v) || std::isnan(v)) << n;  // +-inf * a, NaN when a is 0
          } else {
            EXPECT_TRUE(std::isfinite(v)) << n;
          }
        }
      }
    }
  }
}

TEST(MatmulCudaEdges, EveryFp8CodeDecodesExactly) {
  KILN_REQUIRE_GPU();
  // Row n of a [256, 16] weight holds code n then zeros; a = [1, 0, ..., 0]: out[n] is the decoded
  // code, exactly, through the GEMV's bit-trick decoder (and the exact one for the NaN / inf
  // rows) and the GEMM's (on sm_90a: cvt to f16, bit tricks and the specials' fixup to bf16).
  // Both tensor-core operand types (bf16, f16) for each fp8 format.
  using Formats = std::pair<DType, WeightFormat>;
  for (const auto& [a_dtype, f] :
       {Formats{DType::bf16, WeightFormat::f8_e4m3fn}, Formats{DType::bf16, WeightFormat::f8_e5m2},
        Formats{DType::f16, WeightFormat::f8_e4m3fn}, Formats{DType::f16, WeightFormat::f8_e5m2}}) {
    for (MatmulPath path : {MatmulPath::gemv, MatmulPath::gemm}) {
      const DType dt = matmul_detail::storage_dtype(f);
      std::vector<std::uint8_t> w(256 * 16, 0);
      for (int n = 0; n < 256; ++n) w[std::size_t(n * 16)] = std::uint8_t(n);
      std::vector<std::uint16_t> a(16, 0);
      a[0] = a_dtype == DType::bf16 ? numeric::float_to_bf16(1.f) : numeric::float_to_f16(1.f);
      DeviceBuffer wd(w.size()), ad(a.size() * 2), od(256 * 4);
      wd.upload(w.data(), w.size());
      ad.upload(a.data(), a.size() * 2);
      Weight weight;
      weight.format = f;
      weight.n = 256;
      weight.k = 16;
      weight.data = TensorView(wd.data(), dt, {256, 16}, Device::cuda(0));
      MatmulOptions o;
      o.path = path;
      matmul(TensorView(ad.data(), a_dtype, {1, 16}, Device::cuda(0)), weight,
             TensorView(od.data(), DType::f32, {1, 256}, Device::cuda(0)), o);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<float> got(256);
      od.download(got.data(), 256 * 4);
      for (int n = 0; n < 256; ++n) {
        const float want = fp8_to_float(std::uint8_t(n), dt);
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(got[std::size_t(n)]))
              << weight_format_name(f) << " code " << n << ", a " << dtype_name(a_dtype) << ", "
              << matmul_path_name(path);
        } else {
          // +-0 codes: 1 * (+-0) + 0 * 0 + ... is +0 either way.
          EXPECT_EQ(got[std::size_t(n)], want)
              << weight_format_name(f) << " code " << n << ", a " << dtype_name(a_dtype) << ", "
              << matmul_path_name(path);
        }
      }
      EXPECT_TRUE(od.guards_intact());
    }
  }
}

TEST(MatmulCudaEdges, EmptyAndBiasOnly) {
  KILN_REQUIRE_GPU();
  Rng rng;
  // K = 0 on CUDA: out = bias, for a GEMV-sized and a GEMM-sized M.
  for (std::int64_t m : {3, 40}) {
    DeviceBuffer bias(5 * 4), out(std::size_t(m) * 5 * 2);
    const float b[] = {1.f, -2.f, 0.5f, 3.f, -4.f};
    bias.upload(b, sizeof(b));
    Weight w;
    w.format = WeightFormat::f8_e4m3fn;
    w.n = 5;
    w.k = 0;
    w.data = TensorView(nullptr, DType::f8_e4m3fn, {5, 0}, Device::cuda(0));
    MatmulOptions o;
    o.bias = TensorView(bias.data(), DType::f32, {5}, Device::cuda(0));
    matmul(TensorView(nullptr, DType::bf16, {m, 0}, Device::cuda(0)), w,
           TensorView(out.data(), DType::bf16, {m, 5}, Device::cuda(0)), o);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<std::uint16_t> got(std::size_t(m) * 5);
    out.download(got.data(), got.size() * 2);
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(numeric::bf16_to_float(got[i]), b[i % 5]) << i;
    }
    EXPECT_TRUE(out.guards_intact());
  }
  // M = 0: nothing written, no launch.
  DeviceBuffer wbuf(64 * 4);
  Weight w;
  w.format = WeightFormat::f8_e4m3fn;
  w.n = 4;
  w.k = 64;
  w.data = TensorView(wbuf.data(), DType::f8_e4m3fn, {4, 64}, Device::cuda(0));
  MatmulOptions o;
  o.path = MatmulPath::gemv;
  EXPECT_EQ(matmul(TensorView(nullptr, DType::bf16, {0, 64}, Device::cuda(0)), w,
                   TensorView(nullptr, DType::f32, {0, 4}, Device::cuda(0)), o),
            MatmulPath::gemv);
  // gemv refuses M > 16 with a clear error.
  DeviceBuffer abuf(17 * 64 * 2), obuf(17 * 4 * 4);
  try {
    matmul(TensorView(abuf.data(), DType::bf16, {17, 64}, Device::cuda(0)), w,
           TensorView(obuf.data(), DType::f32, {17, 4}, Device::cuda(0)), o);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("M = 17"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln::test
