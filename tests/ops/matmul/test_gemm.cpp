// matmul's tensor-core GEMM, fp8_native (cuBLASLt) and prepared-weight paths against the CPU
// reference (f64 accumulation over the dequantized weights), at M in {1, 2, 3, 5, 8, 16, 17, 33,
// 100, 257} with K off the 64-wide tile, odd N, every scale kind, with and without bias, every out
// dtype and strided a. Outputs are poisoned and guard-banded; `automatic` is checked bit for bit
// against the path it names. Inputs are random and fresh every run (seed in the XML record).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <ostream>
#include <random>
#include <string>
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

using matmul_detail::quantize_q8_0_block;
using matmul_detail::weight_row_bytes;

enum class Scale { none, tensor, row, block128 };
enum class Prep { raw, gemm, automatic };

struct GemmCase {
  WeightFormat format = WeightFormat::f8_e4m3fn;
  Scale w_scale = Scale::row;
  DType a = DType::bf16;
  Scale a_scale = Scale::none;  // fp8 a only
  DType out = DType::bf16;
  std::optional<DType> bias;
  std::int64_t n = 77;
  std::int64_t k = 208;
  std::int64_t a_pad = 0;  // row stride = K + a_pad
  MatmulPath path = MatmulPath::gemm;
  Prep prep = Prep::raw;
  float w_range = 200.f;  // fp8 weights uniform in [-w_range, w_range)

  std::string name() const {
    static const char* scales[] = {"none", "tensor", "row", "block128"};
    static const char* preps[] = {"raw", "prepared_gemm", "prepared_auto"};
    return std::string(matmul_path_name(path)) + "_" + weight_format_name(format) + "_w" +
           scales[int(w_scale)] + "_a_" + dtype_name(a) +
           (is_fp8_dtype(a) ? std::string("_a") + scales[int(a_scale)] : "") + "_out_" +
           dtype_name(out) + (bias ? std::string("_bias_") + dtype_name(*bias) : "") + "_N" +
           std::to_string(n) + "_K" + std::to_string(k) + "_pad" + std::to_string(a_pad) + "_" +
           preps[int(prep)] + (w_range < 1.f ? "_subnormal" : "");
  }
  static bool is_fp8_dtype(DType d) { return d == DType::f8_e4m3fn || d == DType::f8_e5m2; }

  // Chained setters for the case table.
  GemmCase fmt(WeightFormat v) const {
    return with([&](GemmCase& c) { c.format = v; });
  }
  GemmCase ws(Scale v) const {
    return with([&](GemmCase& c) { c.w_scale = v; });
  }
  GemmCase ad(DType v) const {
    return with([&](GemmCase& c) { c.a = v; });
  }
  GemmCase as(Scale v) const {
    return with([&](GemmCase& c) { c.a_scale = v; });
  }
  GemmCase od(DType v) const {
    return with([&](GemmCase& c) { c.out = v; });
  }
  GemmCase bd(DType v) const {
    return with([&](GemmCase& c) { c.bias = v; });
  }
  GemmCase nk(std::int64_t n_, std::int64_t k_) const {
    return with([&](GemmCase& c) { c.n = n_, c.k = k_; });
  }
  GemmCase pad(std::int64_t v) const {
    return with([&](GemmCase& c) { c.a_pad = v; });
  }
  GemmCase on(MatmulPath v) const {
    return with([&](GemmCase& c) { c.path = v; });
  }
  GemmCase prepared(Prep v) const {
    return with([&](GemmCase& c) { c.prep = v; });
  }
  GemmCase range(float v) const {
    return with([&](GemmCase& c) { c.w_range = v; });
  }

 private:
  template <typename F>
  GemmCase with(F f) const {
    GemmCase c = *this;
    f(c);
    return c;
  }
};

void PrintTo(const GemmCase& c, std::ostream* os) { *os << c.name(); }

constexpr std::int64_t kMs[] = {1, 2, 3, 5, 8, 16, 17, 33, 100, 257};

std::vector<std::int64_t> scale_shape(Scale s, std::int64_t rows, std::int64_t cols) {
  switch (s) {
    case Scale::tensor:
      return {1};
    case Scale::row:
      return {rows};
    case Scale::block128:
      return {(rows + 127) / 128, (cols + 127) / 128};
    case Scale::none:
      break;
  }
  return {};
}

std::int64_t count(const std::vector<std::int64_t>& shape) {
  std::int64_t c = 1;
  for (std::int64_t s : shape) c *= s;
  return c;
}

// A host array and its device copy.
struct Pair {
  HostBuffer host;
  DeviceBuffer device;
  explicit Pair(std::size_t bytes) : host(bytes), device(bytes) {}
  void upload() { device.upload(host.data(), host.bytes()); }
};

void fill_scales(void* data, std::int64_t n, Rng& rng) {
  std::uniform_real_distribution<float> dist(0.25f, 2.f);
  for (std::int64_t i = 0; i < n; ++i) static_cast<float*>(data)[i] = dist(rng.engine());
}

// Everything one M of a case needs, on host and device.
class Problem {
 public:
  Problem(const GemmCase& c, std::int64_t m, Rng& rng)
      : c_(c),
        m_(m),
        lda_(c.k + c.a_pad),
        a_(std::size_t((m - 1) * lda_ + c.k) * dtype_size(c.a)),
        w_(std::size_t(c.n * weight_row_bytes(c.format, c.k))),
        w_scale_(std::size_t(std::max<std::int64_t>(1, count(scale_shape(c.w_scale, c.n, c.k)))) *
                 4),
        a_scale_(std::size_t(std::max<std::int64_t>(1, count(scale_shape(c.a_scale, m, c.k)))) * 4),
        bias_(std::size_t(c.n) * 4),
        out_(std::size_t(m * c.n) * dtype_size(c.out)) {
    // a (the pad columns stay poisoned: NaN if read)
    for (std::int64_t i = 0; i < m; ++i) {
      auto* row = static_cast<std::uint8_t*>(a_.host.data()) + i * lda_ * dtype_size(c.a);
      if (GemmCase::is_fp8_dtype(c.a)) {
        fill_fp8(row, c.a, std::size_t(c.k), rng, 4.f);
      } else {
        fill_uniform(row, c.a, std::size_t(c.k), rng);
      }
    }
    a_.upload();
    // w
    if (c.format == WeightFormat::q8_0) {
      std::uniform_real_distribution<float> dist(-1.f, 1.f);
      std::vector<float> block(32);
      auto* bytes = static_cast<std::uint8_t*>(w_.host.data());
      for (std::int64_t b = 0; b < c.n * c.k / 32; ++b) {
        for (float& v : block) v = dist(rng.engine());
        quantize_q8_0_block(block.data(), bytes + b * 34);
      }
    } else if (c.format == WeightFormat::f16 || c.format == WeightFormat::bf16) {
      fill_uniform(w_.host.data(), matmul_detail::storage_dtype(c.format), std::size_t(c.n * c.k),
                   rng);
    } else {
      fill_fp8(w_.host.data(), matmul_detail::storage_dtype(c.format), std::size_t(c.n * c.k), rng,
               c.w_range);
    }
    w_.upload();
    fill_scales(w_scale_.host.data(), count(scale_shape(c.w_scale, c.n, c.k)), rng);
    w_scale_.upload();
    fill_scales(a_scale_.host.data(), count(scale_shape(c.a_scale, m, c.k)), rng);
    a_scale_.upload();
    if (c.bias) {
      fill_uniform(bias_.host.data(), *c.bias, std::size_t(c.n), rng, -4.f, 4.f);
      bias_.upload();
    }
  }

  TensorView a(bool device) const {
    const std::int64_t shape[] = {m_, c_.k};
    const std::int64_t strides[] = {lda_, 1};
    return TensorView(device ? a_.device.data() : const_cast<void*>(a_.host.data()), c_.a, shape,
                      strides, device ? Device::cuda(0) : Device::cpu());
  }

  Weight weight(bool device) const {
    Weight w;
    w.format = c_.format;
    w.n = c_.n;
    w.k = c_.k;
    const Device dev = device ? Device::cuda(0) : Device::cpu();
    void* data = device ? w_.device.data() : const_cast<void*>(w_.host.data());
    if (c_.format == WeightFormat::q8_0) {
      w.data = TensorView(data, DType::u8, {c_.n, c_.k / 32 * 34}, dev);
    } else {
      w.data = TensorView(data, matmul_detail::storage_dtype(c_.format), {c_.n, c_.k}, dev);
    }
    if (c_.w_scale != Scale::none) {
      const auto shape = scale_shape(c_.w_scale, c_.n, c_.k);
      w.scale = TensorView::contiguous(
          device ? w_scale_.device.data() : const_cast<void*>(w_scale_.host.data()), DType::f32,
          shape, dev);
    }
    return w;
  }

  MatmulOptions options(bool device, MatmulPath path) const {
    MatmulOptions o;
    o.path = path;
    const Device dev = device ? Device::cuda(0) : Device::cpu();
    if (c_.a_scale != Scale::none) {
      const auto shape = scale_shape(c_.a_scale, m_, c_.k);
      o.a_scale = TensorView::contiguous(
          device ? a_scale_.device.data() : const_cast<void*>(a_scale_.host.data()), DType::f32,
          shape, dev);
    }
    if (c_.bias) {
      o.bias = TensorView(device ? bias_.device.data() : const_cast<void*>(bias_.host.data()),
                          *c_.bias, {c_.n}, dev);
    }
    return o;
  }

  TensorView out_view() const {
    return TensorView(out_.device.data(), c_.out, {m_, c_.n}, Device::cuda(0));
  }

  std::vector<float> download_out() const {
    HostBuffer host(out_.device.bytes());
    out_.device.download(host.data(), host.bytes());
    return to_floats(host.data(), c_.out, std::size_t(m_ * c_.n));
  }

  // The CPU reference over `w` (host), rounded to out's dtype like the GPU result.
  std::vector<float> reference(const Weight& w) const {
    HostBuffer out(std::size_t(m_ * c_.n) * dtype_size(c_.out));
    const TensorView view(out.data(), c_.out, {m_, c_.n});
    matmul(a(false), w, view, options(false, MatmulPath::automatic));
    return to_floats(out.data(), c_.out, std::size_t(m_ * c_.n));
  }

  bool guards_intact() const {
    return a_.device.guards_intact() && w_.device.guards_intact() &&
           w_scale_.device.guards_intact() && a_scale_.device.guards_intact() &&
           bias_.device.guards_intact() && out_.device.guards_intact();
  }

 private:
  GemmCase c_;
  std::int64_t m_, lda_;
  Pair a_, w_, w_scale_, a_scale_, bias_, out_;
};

double tolerance(const GemmCase& c) {
  // fp8_native: Hopper's fp8 tensor cores accumulate in reduced precision between cuBLASLt's
  // promotions to f32 (relative 1e-4 at K = 208 with f32 out); rounded to 16 bits, a few outputs
  // round the other way, which at M = 2 (288 outputs) measured up to 1.4e-3. torch._scaled_mm runs
  // the same kernels.
  if (c.path == MatmulPath::fp8_native) return c.out == DType::f32 ? 5e-4 : 3e-3;
  // 16-bit out: the bound. f32 out: exact products (16-bit and fp8 a, fp8 / int8 / 16-bit
  // w in the mma type; f32 a as hi + lo, 2^-17) and f32 sums leave ~1e-6.
  if (c.out != DType::f32) return 1e-3;
  return 2e-5;
}

// sm_89 or newer (fp8 tensor cores).
bool fp8_tensor_cores() {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  return major * 10 + minor >= 89;
}

class MatmulGemmCuda : public ::testing::TestWithParam<GemmCase> {};

// Runs one case at one M: the path against the CPU reference, guard bands, and `automatic`
// against the path it names.
void check_case(const GemmCase& c, std::int64_t m, Rng& rng) {
  SCOPED_TRACE("M = " + std::to_string(m) + ", seed " + std::to_string(rng.seed()));
  Problem p(c, m, rng);
  Weight w = p.weight(true);
  Weight host_w = p.weight(false);
  std::optional<DeviceBuffer> storage;
  std::vector<std::uint8_t> dequantized;  // host copy of a dequantized prepared weight
  if (c.prep != Prep::raw) {
    const MatmulPath prep_path = c.prep == Prep::gemm ? MatmulPath::gemm : MatmulPath::automatic;
    const std::size_t bytes = prepared_weight_bytes(w, prep_path);
    storage.emplace(bytes);
    w = prepare_weight(
        w, prep_path,
        TensorView(storage->data(), DType::u8, {std::int64_t(bytes)}, Device::cuda(0)));
    if (w.layout == WeightLayout::dequantized) {
      // The reference multiplies the same bf16 copy (the scale folded in, rounded to bf16).
      dequantized.resize(std::size_t(c.n * c.k * 2));
      ASSERT_EQ(
          cudaMemcpy(dequantized.data(), w.data.data(), dequantized.size(), cudaMemcpyDeviceToHost),
          cudaSuccess);
      host_w = Weight{};
      host_w.format = WeightFormat::bf16;
      host_w.n = c.n;
      host_w.k = c.k;
      host_w.data = TensorView(dequantized.data(), DType::bf16, {c.n, c.k});
    }
  }
  const MatmulPath ran = matmul(p.a(true), w, p.out_view(), p.options(true, c.path));
  ASSERT_EQ(ran, c.path);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = p.download_out();
  const std::vector<float> want = p.reference(host_w);
  const double err = relative_error(got, want);
  ::testing::Test::RecordProperty("error_M" + std::to_string(m), std::to_string(err));
  EXPECT_LE(err, tolerance(c)) << "relative Frobenius error at M = " << m;
  EXPECT_TRUE(p.guards_intact()) << "a write outside the buffers at M = " << m;
  if (storage) {
    EXPECT_TRUE(storage->guards_intact()) << "prepare_weight wrote past its storage";
  }

  // automatic == the path it names, bit for bit.
  const MatmulPath chosen = select_path(m, w, c.a, Device::cuda(0));
  if (chosen == c.path) {
    const MatmulPath auto_ran =
        matmul(p.a(true), w, p.out_view(), p.options(true, MatmulPath::automatic));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(auto_ran, chosen);
    const std::vector<float> again = p.download_out();
    EXPECT_EQ(std::memcmp(again.data(), got.data(), got.size() * sizeof(float)), 0)
        << "automatic differs from " << matmul_path_name(chosen) << " at M = " << m;
  }
}

bool skip_path(const GemmCase& c) {
  return c.path == MatmulPath::fp8_native && !fp8_tensor_cores();
}

TEST_P(MatmulGemmCuda, MatchesReferenceAtEveryM) {
  KILN_REQUIRE_GPU();
  const GemmCase c = GetParam();
  if (skip_path(c)) GTEST_SKIP() << "fp8_native needs sm_89+, device is " << cuda_arch(0);
  Rng rng;
  for (std::int64_t m : kMs) check_case(c, m, rng);
}

// Large enough for the 128 x 128 tiles (more tiles than SMs), partial in M, N and K.
class MatmulGemmCudaLarge : public ::testing::TestWithParam<GemmCase> {};

TEST_P(MatmulGemmCudaLarge, MatchesReference) {
  KILN_REQUIRE_GPU();
  const GemmCase c = GetParam();
  if (skip_path(c)) GTEST_SKIP() << "fp8_native needs sm_89+, device is " << cuda_arch(0);
  Rng rng;
  check_case(c, 520, rng);
}

std::vector<GemmCase> gemm_cases() {
  const GemmCase base;  // e4m3fn weight, per-channel scale, bf16 a and out, N 77, K 208
  const GemmCase q8 = base.fmt(WeightFormat::q8_0).ws(Scale::none);
  std::vector<GemmCase> cases;
  // Every weight format and scale kind, bf16 a and out.
  for (Scale s : {Scale::none, Scale::tensor, Scale::row, Scale::block128}) {
    cases.push_back(base.ws(s).nk(257, 208));
  }
  cases.push_back(base.fmt(WeightFormat::f8_e5m2));
  cases.push_back(base.fmt(WeightFormat::f8_e5m2).ws(Scale::block128).nk(130, 328));
  cases.push_back(q8.nk(77, 224));
  cases.push_back(base.fmt(WeightFormat::bf16).ws(Scale::none));
  cases.push_back(base.fmt(WeightFormat::f16).ws(Scale::none).ad(DType::f16).od(DType::f16));
  // Mostly subnormal fp8 weights (e4m3fn below 2^-6, e5m2 below 2^-14), through the bf16 and the
  // f16 decoders.
  cases.push_back(base.ws(Scale::tensor).range(0.03f));
  cases.push_back(base.ws(Scale::tensor).ad(DType::f16).od(DType::f32).range(0.03f));
  cases.push_back(base.fmt(WeightFormat::f8_e5m2).ws(Scale::tensor).range(1e-4f));
  cases.push_back(
      base.fmt(WeightFormat::f8_e5m2).ws(Scale::tensor).ad(DType::f16).od(DType::f32).range(1e-4f));
  // Out dtypes and biases.
  cases.push_back(base.od(DType::f32).bd(DType::f32));
  cases.push_back(base.od(DType::f16).bd(DType::bf16));
  cases.push_back(base.bd(DType::f16));
  cases.push_back(q8.od(DType::f32).bd(DType::bf16).nk(77, 96));
  // a: f16, f32, strided (16-byte rows: cp.async; odd stride: converted loads); odd K.
  cases.push_back(base.ad(DType::f16).od(DType::f32));
  cases.push_back(base.ad(DType::f32).bd(DType::f32));
  cases.push_back(base.pad(24));
  cases.push_back(base.pad(3).od(DType::f32));
  cases.push_back(base.nk(131, 200));  // K % 16 != 0: fp8 rows not 16-byte aligned, gathered
  cases.push_back(base.fmt(WeightFormat::bf16).ws(Scale::none).nk(33, 77));
  cases.push_back(q8.ad(DType::f32).nk(65, 32));
  // Split-K on sm_90a (few weight tiles, long K): 4 slices of 17 k-tiles (the last 14), with
  // per-channel scales and a bias; block128 scales over slices of whole 128-wide chunks; f16.
  cases.push_back(base.bd(DType::bf16).nk(200, 4160));
  cases.push_back(base.ws(Scale::block128).od(DType::f32).bd(DType::f32).nk(130, 4200));
  cases.push_back(base.ws(Scale::tensor).ad(DType::f16).od(DType::f16).bd(DType::f16).nk(96, 2112));
  // fp8 a (decoded exactly by the GEMM) with tensor and per-row a scales.
  cases.push_back(base.ad(DType::f8_e4m3fn).as(Scale::row).od(DType::f32).bd(DType::f32));
  cases.push_back(base.fmt(WeightFormat::f8_e5m2).ad(DType::f8_e4m3fn).as(Scale::tensor));
  cases.push_back(
      base.fmt(WeightFormat::f8_e5m2).ws(Scale::tensor).ad(DType::f8_e5m2).as(Scale::row).pad(16));
  // Prepared weights: packed (16-byte copies for Q8_0 and odd K) and automatic.
  cases.push_back(q8.nk(77, 224).prepared(Prep::gemm));
  cases.push_back(q8.od(DType::f32).nk(77, 160).prepared(Prep::gemm));
  cases.push_back(base.nk(131, 200).prepared(Prep::gemm));
  cases.push_back(base.ws(Scale::block128).nk(150, 264).prepared(Prep::gemm));
  cases.push_back(
      base.fmt(WeightFormat::f16).ws(Scale::none).ad(DType::f16).nk(77, 100).prepared(Prep::gemm));
  cases.push_back(base.bd(DType::bf16).nk(144, 208).prepared(Prep::automatic));
  cases.push_back(base.od(DType::f32).bd(DType::f32).prepared(Prep::automatic));
  cases.push_back(q8.ad(DType::f16).nk(77, 128).prepared(Prep::automatic));
  // fp8_native: K, N % 16 == 0; tensor and per-row scales on either side; its bias types.
  const GemmCase native =
      base.ad(DType::f8_e4m3fn).nk(144, 208).on(MatmulPath::fp8_native).ws(Scale::tensor);
  cases.push_back(native.as(Scale::tensor));
  cases.push_back(native.ws(Scale::row).as(Scale::tensor).bd(DType::bf16));
  cases.push_back(native.as(Scale::row).od(DType::f32).bd(DType::bf16));
  cases.push_back(native.ws(Scale::row).as(Scale::row).od(DType::f16).bd(DType::f16).pad(32));
  cases.push_back(native.fmt(WeightFormat::f8_e5m2).ws(Scale::none).nk(144, 512));
  // Biases cuBLASLt's epilogue does not take: added by bias_epilogue after an f32 product.
  cases.push_back(native.od(DType::f32).bd(DType::f32));
  cases.push_back(native.as(Scale::row).bd(DType::f16));
  return cases;
}

std::vector<GemmCase> large_cases() {
  const GemmCase base = GemmCase{}.nk(4100, 336);
  return {base,
          base.ws(Scale::tensor).od(DType::f32).bd(DType::f32),
          base.ws(Scale::block128),
          base.fmt(WeightFormat::q8_0).ws(Scale::none).nk(4100, 320).prepared(Prep::gemm),
          base.ad(DType::f32).bd(DType::bf16),
          base.fmt(WeightFormat::f8_e5m2).ad(DType::f16).od(DType::f16),
          base.fmt(WeightFormat::bf16).ws(Scale::none),
          base.nk(256, 8192),  // sm_90a: 6 tiles, split-K into 8 slices
          base.ad(DType::f8_e4m3fn)
              .as(Scale::row)
              .ws(Scale::row)
              .on(MatmulPath::fp8_native)
              .nk(4096, 336)};
}

INSTANTIATE_TEST_SUITE_P(Cases, MatmulGemmCudaLarge, ::testing::ValuesIn(large_cases()),
                         [](const ::testing::TestParamInfo<GemmCase>& param) {
                           return param.param.name();
                         });

INSTANTIATE_TEST_SUITE_P(Cases, MatmulGemmCuda, ::testing::ValuesIn(gemm_cases()),
                         [](const ::testing::TestParamInfo<GemmCase>& param) {
                           return param.param.name();
                         });

// Problems a path cannot run are refused with a kiln::Error naming the path and the reason.
TEST(MatmulGemmCudaErrors, Fp8NativeRefusesWhatCublasLtCannotRun) {
  KILN_REQUIRE_GPU();
  if (!fp8_tensor_cores()) GTEST_SKIP() << "fp8_native needs sm_89+, device is " << cuda_arch(0);
  Rng rng;
  const GemmCase native =
      GemmCase{}.ws(Scale::tensor).ad(DType::f8_e4m3fn).nk(144, 208).on(MatmulPath::fp8_native);
  const GemmCase cases[] = {
      native.nk(77, 208),                                    // N % 16 != 0
      native.ws(Scale::block128),                            // 128x128 weight blocks
      native.fmt(WeightFormat::f8_e5m2).ad(DType::f8_e5m2),  // e5m2 x e5m2
  };

  for (const GemmCase& c : cases) {
    SCOPED_TRACE(c.name());
    Problem p(c, 64, rng);
    try {
      matmul(p.a(true), p.weight(true), p.out_view(), p.options(true, c.path));
      ADD_FAILURE() << "expected kiln::Error";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::unsupported);
      EXPECT_NE(std::string(e.what()).find("fp8_native"), std::string::npos) << e.what();
    }
    // automatic still runs it (on the GEMM), bit-identical to asking for the GEMM.
    const MatmulPath ran =
        matmul(p.a(true), p.weight(true), p.out_view(), p.options(true, MatmulPath::automatic));
    EXPECT_EQ(ran, MatmulPath::gemm);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> auto_out = p.download_out();
    matmul(p.a(true), p.weight(true), p.out_view(), p.options(true, MatmulPath::gemm));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> gemm_out = p.download_out();
    EXPECT_EQ(std::memcmp(auto_out.data(), gemm_out.data(), gemm_out.size() * sizeof(float)), 0);
  }
}

TEST(MatmulGemmCudaErrors, PrepareChecksItsStorage) {
  KILN_REQUIRE_GPU();
  Rng rng;
  const GemmCase c = GemmCase{}.fmt(WeightFormat::q8_0).ws(Scale::none).nk(77, 64);
  Problem p(c, 4, rng);
  const Weight w = p.weight(true);
  const std::size_t bytes = prepared_weight_bytes(w, MatmulPath::gemm);
  DeviceBuffer storage(bytes + 16);
  try {
    prepare_weight(
        w, MatmulPath::gemm,
        TensorView(storage.data(), DType::u8, {std::int64_t(bytes) - 1}, Device::cuda(0)));
    ADD_FAILURE() << "expected kiln::Error for short storage";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("storage"), std::string::npos) << e.what();
  }
  try {
    prepare_weight(w, MatmulPath::gemm,
                   TensorView(static_cast<char*>(storage.data()) + 1, DType::u8,
                              {std::int64_t(bytes)}, Device::cuda(0)));
    ADD_FAILURE() << "expected kiln::Error for misaligned storage";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
  }
  EXPECT_TRUE(storage.guards_intact());
}

}  // namespace
}  // namespace kiln::test
