// matmul: the CPU reference against a direct f64 sum written here; the CUDA paths against the
// CPU reference (f64 sums over the dequantized weights, rounded to out's dtype): the small-M
// GEMV at M in {1, 2, 3, 5, 8, 16}, the tensor-core GEMM, fp8_native (cuBLASLt) and prepared
// weights at M up to 257 and 520; every weight format and scale kind, with and without bias,
// every out dtype, strided and misaligned a, K off the 16-byte chunk and the q8_0 stage, odd N,
// split-K, fp8 a with per-tensor and per-row scales, NaN / inf codes; `automatic` checked bit
// for bit against the path it names; empty problems; and the argument checks.
#include <cuda_runtime.h>

#include <any>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/matmul.hpp"
#include "support/harness.hpp"

namespace kiln::test {
namespace {

using matmul_detail::fp8_to_float;
using matmul_detail::storage_dtype;

enum class Scale { none, tensor, row, block128 };
enum class Prep { raw, gemm, automatic };

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

Dims scale_shape(Scale s, std::int64_t rows, std::int64_t cols) {
  if (s == Scale::tensor) return {1};
  if (s == Scale::row) return {rows};
  if (s == Scale::block128) return {ceil_div(rows, 128), ceil_div(cols, 128)};
  return {};
}

bool fp8(DType d) { return d == DType::f8_e4m3fn || d == DType::f8_e5m2; }

struct Case {
  WeightFormat format = WeightFormat::f8_e4m3fn;
  Scale w_scale = Scale::row;
  DType a = DType::bf16;
  Scale a_scale = Scale::none;  // fp8 a only
  DType out = DType::bf16;
  std::optional<DType> bias;
  std::int64_t n = 77;
  std::int64_t k = 208;
  std::vector<std::int64_t> ms = {};  // the Ms the case runs at (one test each)
  std::int64_t m = 1;
  std::int64_t a_pad = 0;     // row stride of a = K + a_pad
  std::int64_t a_offset = 0;  // elements from the allocation's start to a (misaligned a)
  std::int64_t w_offset = 0;  // elements (bytes, for fp8 and Q8_0) to w (misaligned weight)
  MatmulPath path = MatmulPath::gemm;
  Prep prep = Prep::raw;
  float w_range = 200.f;  // fp8 weights uniform in [-w_range, w_range)
  float a_range = 4.f;    // fp8 a uniform in [-a_range, a_range)

  std::string name() const {
    static const char* scales[] = {"none", "tensor", "row", "block128"};
    static const char* preps[] = {"", "_prepared_gemm", "_prepared_auto"};
    return cat(matmul_path_name(path), "_", weight_format_name(format), "_w", scales[int(w_scale)],
               "_a_", dtype_name(a), fp8(a) ? cat("_a", scales[int(a_scale)]) : "", "_out_",
               dtype_name(out), bias ? cat("_bias_", dtype_name(*bias)) : "", "_N", n, "_K", k,
               "_M", m, a_pad ? cat("_apad", a_pad) : "", a_offset ? cat("_aoff", a_offset) : "",
               w_offset ? cat("_woff", w_offset) : "", preps[int(prep)],
               w_range < 1.f ? "_subnormal" : "");
  }

  // Chained setters for the case tables.
  Case fmt(WeightFormat v) const { return with(&Case::format, v); }
  Case ws(Scale v) const { return with(&Case::w_scale, v); }
  Case ad(DType v) const { return with(&Case::a, v); }
  Case as(Scale v) const { return with(&Case::a_scale, v); }
  Case od(DType v) const { return with(&Case::out, v); }
  Case bd(DType v) const { return with(&Case::bias, std::optional<DType>(v)); }
  Case nk(std::int64_t n_, std::int64_t k_) const { return with(&Case::n, n_).with(&Case::k, k_); }
  Case pad(std::int64_t v) const { return with(&Case::a_pad, v); }
  Case on(MatmulPath v) const { return with(&Case::path, v); }
  Case prepared(Prep v) const { return with(&Case::prep, v); }
  Case range(float v) const { return with(&Case::w_range, v); }
  Case at(std::int64_t v) const { return with(&Case::m, v); }
  template <typename T>
  Case with(T Case::*field, T value) const {
    Case c = *this;
    c.*field = value;
    return c;
  }
};

// One case for each M in its `ms`.
std::vector<Case> at_each_m(const std::vector<Case>& cases) {
  std::vector<Case> all;
  for (const Case& c : cases) {
    for (std::int64_t m : c.ms) all.push_back(c.at(m));
  }
  return all;
}

// Random fp8 codes (`format` f8_e4m3fn or f8_e5m2) of values uniform in [-range, range): normals
// and subnormals, no NaN.
void fill_fp8(void* data, DType format, std::size_t n, Rng& rng, float range) {
  std::uniform_real_distribution<float> dist(-range, range);
  auto* bytes = static_cast<std::uint8_t*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    bytes[i] = matmul_detail::float_to_fp8(dist(rng.engine()), format);
  }
}

Weight weight_of(const Case& c, const Views& v) {
  Weight w;
  w.format = c.format;
  w.n = c.n;
  w.k = c.k;
  w.data = v["w"];
  w.scale = v.optional("w_scale");
  return w;
}

MatmulOptions options_of(const Views& v, MatmulPath path) {
  MatmulOptions o;
  o.path = path;
  o.a_scale = v.optional("a_scale");
  o.bias = v.optional("bias");
  return o;
}

// sm_89 or newer (fp8 tensor cores).
bool fp8_tensor_cores() {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  return major * 10 + minor >= 89;
}

// The value of weight element (n, k), decoded here from the bytes (not through the reference).
double weight_value(const Case& c, const Weight& w, std::int64_t n, std::int64_t k) {
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
      return double(fp8_to_float(bytes[n * c.k + k], storage_dtype(c.format))) * s;
    case WeightFormat::q8_0: {
      const std::uint8_t* block = bytes + n * (c.k / 32 * 34) + (k / 32) * 34;
      const std::uint16_t d = std::uint16_t(block[0] | block[1] << 8);
      return double(numeric::f16_to_float(d)) * double(std::int8_t(block[2 + k % 32]));
    }
  }
  return 0;
}

// The direct f64 sum of (a . w^T) * a_scale + bias.
std::vector<double> direct_sum(const Case& c, const Views& host) {
  const TensorView a = host["a"];
  const Weight w = weight_of(c, host);
  const auto a_scale = host.optional("a_scale"), bias = host.optional("bias");
  std::vector<double> want(std::size_t(c.m * c.n));
  for (std::int64_t i = 0; i < c.m; ++i) {
    for (std::int64_t n = 0; n < c.n; ++n) {
      double sum = 0;
      for (std::int64_t k = 0; k < c.k; ++k) {
        const std::int64_t idx = i * a.stride(0) + k;
        const double av = fp8(c.a)
                              ? fp8_to_float(static_cast<const std::uint8_t*>(a.data())[idx], c.a)
                              : numeric::load_float(a.data(), c.a, idx);
        sum += av * weight_value(c, w, n, k);
      }
      if (a_scale)
        sum *= static_cast<const float*>(a_scale->data())[c.a_scale == Scale::row ? i : 0];
      if (bias) sum += numeric::load_float(bias->data(), bias->dtype(), n);
      want[std::size_t(i * c.n + n)] = sum;
    }
  }
  return want;
}

// ||got - want|| / ||want|| of each path.
double tolerance(const Case& c) {
  // fp8_native: Hopper's fp8 tensor cores accumulate in reduced precision between cuBLASLt's
  // promotions to f32 (relative 1e-4 at K = 208 with f32 out); rounded to 16 bits, a few outputs
  // round the other way, which at M = 2 (288 outputs) measured up to 1.4e-3. torch._scaled_mm runs
  // the same kernels.
  if (c.path == MatmulPath::fp8_native) return c.out == DType::f32 ? 5e-4 : 3e-3;
  // 16-bit out: both sides rounded to out's dtype, so this measures the accumulation order only.
  // f32 out: exact products (16-bit and fp8 a, fp8 / int8 / 16-bit w in the mma type; f32 a as
  // hi + lo, 2^-17) and f32 sums leave ~1e-6 (GEMV: ~1e-6 over K <= 4352).
  if (c.out != DType::f32) return 1e-3;
  return c.path == MatmulPath::gemv ? 1e-5 : 2e-5;
}

struct Matmul {
  using Case = test::Case;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    // a (the pad columns stay poisoned: NaN if read)
    const std::int64_t lda = c.k + c.a_pad;
    const TensorView a = t.input("a", c.a, {c.m, c.k}, {lda, 1}, c.a_offset);
    for (std::int64_t i = 0; i < c.m; ++i) {
      void* row = static_cast<char*>(a.data()) + i * lda * std::int64_t(dtype_size(c.a));
      fp8(c.a) ? fill_fp8(row, c.a, std::size_t(c.k), rng, c.a_range)
               : fill_uniform(row, c.a, std::size_t(c.k), rng);
    }
    // w [N, K] (Q8_0: u8 [N, K / 32 * 34])
    const bool q8 = c.format == WeightFormat::q8_0;
    const TensorView w =
        t.input("w", storage_dtype(c.format), {c.n, q8 ? c.k / 32 * 34 : c.k}, {}, c.w_offset);
    if (q8) {
      std::uniform_real_distribution<float> dist(-1.f, 1.f);
      std::vector<float> block(32);
      for (std::int64_t b = 0; b < c.n * c.k / 32; ++b) {
        for (float& v : block) v = dist(rng.engine());
        matmul_detail::quantize_q8_0_block(block.data(),
                                           static_cast<std::uint8_t*>(w.data()) + b * 34);
      }
    } else if (c.format == WeightFormat::f16 || c.format == WeightFormat::bf16) {
      fill_uniform(w.data(), w.dtype(), std::size_t(c.n * c.k), rng);
    } else {
      // Normals and subnormals of the format (e5m2's range reaches 2^-16).
      fill_fp8(w.data(), w.dtype(), std::size_t(c.n * c.k), rng, c.w_range);
    }
    if (c.w_scale != Scale::none) {
      t.input("w_scale", DType::f32, scale_shape(c.w_scale, c.n, c.k));
      t.fill("w_scale", rng, 0.25f, 2.f);
    }
    if (c.a_scale != Scale::none) {
      t.input("a_scale", DType::f32, scale_shape(c.a_scale, c.m, c.k));
      t.fill("a_scale", rng, 0.25f, 2.f);
    }
    if (c.bias) {
      t.input("bias", *c.bias, {c.n});
      t.fill("bias", rng, -4.f, 4.f);
    }
    if (c.prep != Prep::raw) {
      // prepare_weight's storage, as many bytes as the layout needs on this device.
      const auto on_device = [&](const TensorView& v) {
        return TensorView(v.data(), v.dtype(), v.shape(), v.strides(), t.device());
      };
      Weight probe = weight_of(c, t.views());
      probe.data = on_device(probe.data);
      if (probe.scale) probe.scale = on_device(*probe.scale);
      const auto bytes = std::int64_t(prepared_weight_bytes(probe, prep_path(c)));
      t.output("prepared", DType::u8, {bytes});
    }
    t.output("out", c.out, {c.m, c.n});
  }

  static MatmulPath prep_path(const Case& c) {
    return c.prep == Prep::gemm ? MatmulPath::gemm : MatmulPath::automatic;
  }

  static void prepare(const Case& c, Views& v, Stream stream) {
    if (c.prep != Prep::raw) {
      v.prepared = prepare_weight(weight_of(c, v), prep_path(c), v["prepared"], stream);
    }
  }

  static Weight weight(const Case& c, const Views& v) {
    return c.prep == Prep::raw ? weight_of(c, v) : std::any_cast<Weight>(v.prepared);
  }

  // The case's path on CUDA; on CPU tensors the reference path.
  static void run(const Case& c, const Views& v, Stream stream) {
    const bool cuda = v["out"].device().type == DeviceType::cuda;
    const MatmulPath ran = matmul(v["a"], weight(c, v), v["out"],
                                  options_of(v, cuda ? c.path : MatmulPath::automatic), stream);
    EXPECT_EQ(ran, cuda ? c.path : MatmulPath::reference);
  }

  // The CPU reference against the direct sum; the CUDA paths against the CPU reference over the
  // same weight (for a dequantized prepared weight: the same bf16 copy, the scale folded in).
  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    if (r.backend() == Backend::cpu) {
      return {{"out", direct_sum(c, r.host()), Tolerance::relative(1e-6)}};
    }
    Weight w = weight_of(c, r.host());
    const Views& got = r.got();
    if (c.prep != Prep::raw &&
        std::any_cast<Weight>(r.views().prepared).layout == WeightLayout::dequantized) {
      w = Weight{};
      w.format = WeightFormat::bf16, w.n = c.n, w.k = c.k;
      w.data = TensorView(got["prepared"].data(), DType::bf16, {c.n, c.k});
    }
    HostBuffer out(std::size_t(c.m * c.n) * dtype_size(c.out));
    const TensorView out_view(out.data(), c.out, {c.m, c.n});
    EXPECT_EQ(matmul(r.host()["a"], w, out_view, options_of(r.host(), MatmulPath::automatic)),
              MatmulPath::reference);
    EXPECT_TRUE(out.guards_intact()) << "the CPU reference wrote outside out";
    return {{"out", values(out_view), Tolerance::relative(tolerance(c))}};
  }

  // `automatic` runs the path select_path names, bit for bit (aligned pointers: the selector
  // decides on shapes, and a misaligned pointer may rule its choice out).
  static void also(const Case& c, CaseRun& r) {
    if (r.backend() != Backend::cuda || c.a_offset != 0 || c.w_offset != 0) return;
    const Views& v = r.views();
    const MatmulPath chosen = select_path(c.m, weight(c, v), c.a, Device::cuda(0));
    if (chosen != c.path) {
      matmul(v["a"], weight(c, v), v["out"], options_of(v, chosen), r.stream());
      ASSERT_EQ(cudaStreamSynchronize(static_cast<cudaStream_t>(r.stream())), cudaSuccess);
    }
    const std::vector<std::uint8_t> explicit_bits = bytes(r.got()["out"]);
    EXPECT_EQ(
        matmul(v["a"], weight(c, v), v["out"], options_of(v, MatmulPath::automatic), r.stream()),
        chosen);
    ASSERT_EQ(cudaStreamSynchronize(static_cast<cudaStream_t>(r.stream())), cudaSuccess);
    EXPECT_TRUE(bytes(r.got()["out"]) == explicit_bits)
        << "automatic differs from " << matmul_path_name(chosen);
  }

  static std::string skip(const Case& c) {
    if (c.path != MatmulPath::fp8_native || fp8_tensor_cores()) return "";
    return "fp8_native needs sm_89+, device is " + cuda_arch(0);
  }

  static double flops(const Case& c) { return 2.0 * double(c.m * c.n * c.k); }
};

// ---- the CPU reference against the direct sum, at M = 3 ---------------------------------------

std::vector<Case> reference_cases() {
  using F = WeightFormat;
  const Case cases[] = {
      {F::f8_e4m3fn, Scale::block128, DType::bf16, Scale::none, DType::f32, DType::f32, 130, 300},
      {F::f8_e5m2, Scale::row, DType::f8_e5m2, Scale::row, DType::f32, DType::bf16, 9, 64},
      {F::q8_0, Scale::none, DType::f32, Scale::none, DType::f32, std::nullopt, 5, 96},
      {F::f16, Scale::none, DType::f16, Scale::none, DType::f32, DType::f16, 3, 40},
  };
  std::vector<Case> all;
  for (const Case& c : cases) all.push_back(c.on(MatmulPath::reference).at(3));
  // Empty problems: K = 0 gives out = bias; M = 0 writes nothing.
  const Case bf16{F::bf16, Scale::none, DType::bf16, Scale::none, DType::f32, DType::f32, 3, 0};
  all.push_back(bf16.on(MatmulPath::reference).at(2));
  all.push_back(
      bf16.on(MatmulPath::reference).with(&Case::bias, std::optional<DType>()).nk(3, 8).at(0));
  return all;
}

KILN_CASES(Matmul, "MatmulReference", reference_cases, .backends = {Backend::cpu});

// CPU tensors run the reference whatever path is asked for (the paths are CUDA kernels): each
// returns `reference` and writes the bits `automatic` writes.
TEST(MatmulReferencePaths, EveryPathOnCpuRunsTheReference) {
  Rng rng;
  const Case c = Case{}.ws(Scale::tensor).ad(DType::f8_e4m3fn).as(Scale::row).nk(48, 64).at(5);
  CaseRun r(Backend::cpu, rng, [&](Tensors& t, Rng& g) { Matmul::build(c, t, g); });
  const Views& v = r.views();
  const TensorView out = v["out"];
  const auto poison = [&] {
    std::memset(out.data(), kPoison, std::size_t(out.numel()) * dtype_size(out.dtype()));
  };
  poison();
  EXPECT_EQ(matmul(v["a"], weight_of(c, v), out, options_of(v, MatmulPath::automatic)),
            MatmulPath::reference);
  const std::vector<std::uint8_t> automatic = bytes(out);
  for (double x : values(out)) ASSERT_TRUE(std::isfinite(x));
  for (MatmulPath path : {MatmulPath::gemv, MatmulPath::gemm, MatmulPath::fp8_native}) {
    SCOPED_TRACE(matmul_path_name(path));
    poison();
    EXPECT_EQ(matmul(v["a"], weight_of(c, v), out, options_of(v, path)), MatmulPath::reference);
    EXPECT_TRUE(bytes(out) == automatic);
  }
}

// ---- CUDA: the GEMV path ------------------------------------------------------------------------

std::vector<Case> gemv_cases() {
  using F = WeightFormat;
  const DType bf = DType::bf16, hf = DType::f16, f32 = DType::f32, e4m3 = DType::f8_e4m3fn;
  const Scale none = Scale::none, tensor = Scale::tensor, row = Scale::row;
  const Scale block = Scale::block128;
  const std::optional<DType> no_bias;
  std::vector<Case> cases = {
      // Every format, every M, default shape (K = 1040: 65 fp8 chunks, 130 16-bit chunks, off
      // the 2-chunk unroll; q8_0 K = 1280: one full and one partial 32-block stage).
      {F::f8_e4m3fn, row, bf, none, bf, bf, 77, 1040},
      {F::f8_e5m2, tensor, hf, none, hf, no_bias, 77, 1040},
      {F::f8_e4m3fn, block, f32, none, f32, f32, 301, 1040},
      {F::q8_0, none, bf, none, bf, hf, 77, 1280},
      {F::bf16, none, bf, none, f32, no_bias, 77, 1040},
      {F::f16, none, hf, none, bf, bf, 77, 1040},
      // The tensor-core kernel's decoders: e5m2 -> bf16 (NaN / inf vote) with block128 scales and
      // K off the 128-chunk, e4m3 -> f16; M 9-16 take a second B fragment.
      {F::f8_e5m2, block, bf, none, bf, f32, 45, 1088},
      {F::f8_e4m3fn, tensor, hf, none, hf, hf, 50, 2064},
      // q8_0 with K off the 256-value 16-byte period but whole block pairs (the tensor-core
      // kernel's 4-byte loads), f16 a.
      {F::q8_0, none, hf, none, f32, bf, 29, 1088},
      // Few rows, K = 3072 (a partial last step of the warps' 4-segment steps), split-K.
      {F::f8_e4m3fn, block, bf, none, bf, bf, 40, 3072, {2, 16}},
      // N large enough for 4 warps a block (>= 4 row tiles an SM), no split.
      {F::f8_e4m3fn, row, bf, none, bf, no_bias, 12801, 256, {1, 9}},
      // fp8 activations with per-tensor and per-row scales.
      {F::f8_e4m3fn, row, e4m3, tensor, bf, bf, 77, 1040},
      {F::f8_e5m2, block, e4m3, row, f32, no_bias, 129, 1040},
      // K off the 16-byte chunk (element loads, with a log line), odd N.
      {F::f8_e4m3fn, row, bf, none, bf, bf, 37, 1000, {1, 3, 16}},
      {F::bf16, none, f32, none, f32, no_bias, 19, 1001, {2, 8}},
      {F::q8_0, none, hf, none, hf, f32, 45, 1056, {1, 5, 16}},  // K % 256 != 0
      // Few rows, long K: split-K (partial sums in f32, then the epilogue kernel).
      {F::f8_e4m3fn, block, bf, none, bf, bf, 7, 4352, {1, 8}},
      {F::q8_0, none, bf, none, f32, f32, 3, 4096, {1, 3, 16}},
      {F::bf16, none, bf, none, hf, hf, 1, 2056, {1, 16}},
      // Empty problems: K = 0 gives out = bias; M = 0 writes nothing and launches nothing.
      {F::f8_e4m3fn, none, bf, none, bf, f32, 5, 0, {3}},
      {F::f8_e4m3fn, none, bf, none, f32, no_bias, 4, 64, {0}},
  };
  // Each scale kind, bias and out dtype on fewer Ms.
  for (Scale s : {none, tensor, row, block}) {
    for (DType out : {f32, hf, bf}) {
      cases.push_back(
          {F::f8_e4m3fn, s, bf, none, out, out == hf ? no_bias : f32, 33, 528, {1, 5, 16}});
    }
  }
  // A weight at an odd address (element loads); strided a (a column slice of a wider matrix);
  // a at an address off 16 bytes.
  Case c = {F::f8_e5m2, row, bf, none, bf, no_bias, 41, 512, {1, 3}};
  c.w_offset = 1;
  cases.push_back(c);
  c = {F::f8_e4m3fn, tensor, bf, none, f32, no_bias, 63, 1024, {2, 5, 16}};
  c.a_pad = 40;
  cases.push_back(c);
  c = {F::q8_0, none, f32, none, bf, bf, 63, 1024, {1, 3}};
  c.a_pad = 3, c.a_offset = 1;
  cases.push_back(c);
  // The GEMV's inputs: fp8 weights over [-240, 240), fp8 a over [-8, 8); M 1-16 unless named.
  for (Case& g : cases) {
    g.path = MatmulPath::gemv, g.w_range = 240.f, g.a_range = 8.f;
    if (g.ms.empty()) g.ms = {1, 2, 3, 5, 8, 16};
  }
  return at_each_m(cases);
}

KILN_CASES(Matmul, "MatmulGemv", gemv_cases, .backends = {Backend::cuda}, .sanitize = true);

// ---- CUDA: the GEMM, fp8_native and prepared-weight paths ---------------------------------------

std::vector<Case> gemm_cases() {
  const Case base;  // e4m3fn weight, per-channel scale, bf16 a and out, N 77, K 208
  const Case q8 = base.fmt(WeightFormat::q8_0).ws(Scale::none);
  std::vector<Case> cases;
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
  const Case native =
      base.ad(DType::f8_e4m3fn).nk(144, 208).on(MatmulPath::fp8_native).ws(Scale::tensor);
  cases.push_back(native.as(Scale::tensor));
  cases.push_back(native.ws(Scale::row).as(Scale::tensor).bd(DType::bf16));
  cases.push_back(native.as(Scale::row).od(DType::f32).bd(DType::bf16));
  cases.push_back(native.ws(Scale::row).as(Scale::row).od(DType::f16).bd(DType::f16).pad(32));
  cases.push_back(native.fmt(WeightFormat::f8_e5m2).ws(Scale::none).nk(144, 512));
  // Biases cuBLASLt's epilogue does not take: added by bias_epilogue after an f32 product.
  cases.push_back(native.od(DType::f32).bd(DType::f32));
  cases.push_back(native.as(Scale::row).bd(DType::f16));
  for (Case& c : cases) c.ms = {1, 2, 3, 5, 8, 16, 17, 33, 100, 257};
  // K = 0 at a GEMM-sized M: out = bias.
  cases.push_back(base.ws(Scale::none).bd(DType::f32).nk(5, 0).with(&Case::ms, {40}));
  return at_each_m(cases);
}

KILN_CASES(Matmul, "MatmulGemm", gemm_cases, .backends = {Backend::cuda}, .sanitize = true);

// Large enough for the 128 x 128 tiles (more tiles than SMs), partial in M, N and K.
std::vector<Case> large_cases() {
  const Case base = Case{}.nk(4100, 336).at(520);
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

KILN_CASES(Matmul, "MatmulGemmLarge", large_cases, .backends = {Backend::cuda});

// ---- CUDA: refusals and edges ------------------------------------------------------------------

// Problems a path cannot run are refused with a kiln::Error naming the path and the reason; the
// same problems run through `automatic` (on the GEMM), bit-identical to asking for the GEMM.
KILN_CUDA_TEST(MatmulGemmCudaErrors, Fp8NativeRefusesWhatCublasLtCannotRun, true) {
  if (!fp8_tensor_cores()) GTEST_SKIP() << "fp8_native needs sm_89+, device is " << cuda_arch(0);
  Rng rng;
  const Case native =
      Case{}.ws(Scale::tensor).ad(DType::f8_e4m3fn).nk(144, 208).on(MatmulPath::fp8_native).at(64);
  for (const Case& c : {
           native.nk(77, 208),                                    // N % 16 != 0
           native.ws(Scale::block128),                            // 128x128 weight blocks
           native.fmt(WeightFormat::f8_e5m2).ad(DType::f8_e5m2),  // e5m2 x e5m2
       }) {
    SCOPED_TRACE(c.name());
    CaseRun r(Backend::cuda, rng, [&](Tensors& t, Rng& g) { Matmul::build(c, t, g); });
    const Views& v = r.views();
    expect_error("kiln::matmul",
                 [&] { matmul(v["a"], weight_of(c, v), v["out"], options_of(v, c.path)); },
                 ErrorCode::unsupported, {"fp8_native"});
    EXPECT_EQ(matmul(v["a"], weight_of(c, v), v["out"], options_of(v, MatmulPath::automatic)),
              MatmulPath::gemm);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<std::uint8_t> auto_out = bytes(r.got()["out"]);
    matmul(v["a"], weight_of(c, v), v["out"], options_of(v, MatmulPath::gemm));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_TRUE(bytes(r.got()["out"]) == auto_out);
  }
}

KILN_CUDA_TEST(MatmulGemmCudaErrors, PrepareChecksItsStorage, true) {
  Rng rng;
  const Case c = Case{}.fmt(WeightFormat::q8_0).ws(Scale::none).nk(77, 64).at(4);
  CaseRun r(Backend::cuda, rng, [&](Tensors& t, Rng& g) { Matmul::build(c, t, g); });
  const Weight w = weight_of(c, r.views());
  const std::size_t bytes = prepared_weight_bytes(w, MatmulPath::gemm);
  DeviceBuffer storage(bytes + 16);
  expect_error("kiln::prepare_weight",
               [&] {
                 prepare_weight(w, MatmulPath::gemm,
                                TensorView(storage.data(), DType::u8, {std::int64_t(bytes) - 1},
                                           Device::cuda(0)));
               },
               ErrorCode::invalid_argument, {"storage"});
  expect_error("kiln::prepare_weight",
               [&] {
                 prepare_weight(w, MatmulPath::gemm,
                                TensorView(static_cast<char*>(storage.data()) + 1, DType::u8,
                                           {std::int64_t(bytes)}, Device::cuda(0)));
               },
               ErrorCode::invalid_argument, {"storage", "16-byte"});
  EXPECT_TRUE(storage.guards_intact());
}

// Both tensor-core operand types (bf16, f16) for each fp8 format, through the GEMV and the GEMM.
const std::pair<DType, WeightFormat> kDecoders[] = {{DType::bf16, WeightFormat::f8_e4m3fn},
                                                    {DType::bf16, WeightFormat::f8_e5m2},
                                                    {DType::f16, WeightFormat::f8_e4m3fn},
                                                    {DType::f16, WeightFormat::f8_e5m2}};

KILN_CUDA_TEST(MatmulCudaEdges, NanAndInfWeightCodesPropagate, true) {
  Rng rng;
  for (const auto& [a_dtype, f] : kDecoders) {
    for (MatmulPath path : {MatmulPath::gemv, MatmulPath::gemm}) {
      SCOPED_TRACE(cat("a ", dtype_name(a_dtype), ", w ", weight_format_name(f), ", path ",
                       matmul_path_name(path)));
      const Case c{f, Scale::none, a_dtype, Scale::none, DType::f32, std::nullopt, 20, 512, {}, 2};
      CaseRun r(Backend::cuda, rng, [&](Tensors& t, Rng& g) { Matmul::build(c, t, g); });
      // Row 3 gets a NaN code, row 7 (e5m2) an inf code; the rest stays finite.
      const Views& v = r.views();
      auto* w = static_cast<std::uint8_t*>(v["w"].data());
      const std::uint8_t nan_code = 0x7F, inf_code = 0x7C;
      ASSERT_EQ(cudaMemcpy(w + 3 * 512 + 100, &nan_code, 1, cudaMemcpyHostToDevice), cudaSuccess);
      if (f == WeightFormat::f8_e5m2) {
        ASSERT_EQ(cudaMemcpy(w + 7 * 512 + 5, &inf_code, 1, cudaMemcpyHostToDevice), cudaSuccess);
      }
      matmul(v["a"], weight_of(c, v), v["out"], options_of(v, path));
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const std::vector<double> got = values(r.got()["out"]);
      for (std::int64_t i = 0; i < 2; ++i) {
        for (std::int64_t n = 0; n < 20; ++n) {
          const double x = got[std::size_t(i * 20 + n)];
          if (n == 3) {
            EXPECT_TRUE(std::isnan(x)) << n;
          } else if (n == 7 && f == WeightFormat::f8_e5m2) {
            EXPECT_TRUE(std::isinf(x) || std::isnan(x)) << n;  // +-inf * a, NaN when a is 0
          } else {
            EXPECT_TRUE(std::isfinite(x)) << n;
          }
        }
      }
    }
  }
}

// Every fp8 code through the GEMV's bit-trick decoder (and the exact one for the NaN / inf rows)
// and the GEMM's (on sm_90a: cvt to f16, bit tricks and the specials' fixup to bf16): row n of a
// [256, 16] weight holds code n then zeros and a = [1, 0, ..., 0], so out[n] is the decoded code,
// exactly (NaN for the NaN codes; the +-0 codes give 1 * (+-0) + 0 * 0 + ... = +0 either way).
struct Fp8Codes : Matmul {
  static void build(const Case& c, Tensors& t, Rng&) {
    void* w = t.input("w", storage_dtype(c.format), {256, 16}).data();
    std::memset(w, 0, 256 * 16);
    for (int n = 0; n < 256; ++n) static_cast<std::uint8_t*>(w)[n * 16] = std::uint8_t(n);
    const TensorView a = t.input("a", c.a, {1, 16});
    for (int k = 0; k < 16; ++k) numeric::store_float(a.data(), c.a, k, k == 0 ? 1.f : 0.f);
    t.output("out", DType::f32, {1, 256});
  }

  static std::vector<Expected> expect(const Case& c, CaseRun&) {
    std::vector<double> codes;
    for (int n = 0; n < 256; ++n)
      codes.push_back(fp8_to_float(std::uint8_t(n), storage_dtype(c.format)));
    Tolerance exact;
    exact.rel = 0;
    return {{"out", codes, exact}};
  }
};

std::vector<Case> fp8_code_cases() {
  std::vector<Case> all;
  for (const auto& [a, format] : kDecoders) {
    for (MatmulPath path : {MatmulPath::gemv, MatmulPath::gemm}) {
      all.push_back(
          Case{format, Scale::none, a, Scale::none, DType::f32, std::nullopt, 256, 16}.on(path));
    }
  }
  return all;
}

KILN_CASES(Fp8Codes, "MatmulFp8Codes", fp8_code_cases, .backends = {Backend::cuda},
           .sanitize = true);

// gemv refuses M > 16 with a clear error.
KILN_CUDA_TEST(MatmulCudaEdges, GemvRefusesMoreThan16Rows, true) {
  DeviceBuffer a(17 * 64 * 2), w(4 * 64), out(17 * 4 * 4);
  Weight weight;
  weight.format = WeightFormat::f8_e4m3fn, weight.n = 4, weight.k = 64;
  weight.data = TensorView(w.data(), DType::f8_e4m3fn, {4, 64}, Device::cuda(0));
  MatmulOptions o;
  o.path = MatmulPath::gemv;
  expect_error("kiln::matmul",
               [&] {
                 matmul(TensorView(a.data(), DType::bf16, {17, 64}, Device::cuda(0)), weight,
                        TensorView(out.data(), DType::f32, {17, 4}, Device::cuda(0)), o);
               },
               ErrorCode::unsupported, {"M = 17"});
}

// ---- argument checks ----------------------------------------------------------------------------

// Small valid arguments: a f32 [4, 64], an e4m3fn weight [8, 64]; each error row breaks one.
struct Args {
  ArgArray a_{4 * 64, DType::f32, 1.f}, out_{4 * 8, DType::f32, 0.f}, scale_{8, DType::f32, 1.f};
  ArgArray w_{8 * 68, DType::bf16, 1.f};  // room for Q8_0 rows of 64 values
  TensorView a() { return a_({4, 64}); }
  TensorView out() { return out_({4, 8}); }
  Weight w(WeightFormat format = WeightFormat::f8_e4m3fn, std::int64_t k = 64) {
    Weight w;
    w.format = format, w.n = 8, w.k = k;
    w.data = w_({8, format == WeightFormat::q8_0 ? k / 32 * 34 : k}, storage_dtype(format));
    return w;
  }
  bool untouched() const { return out_.unchanged(); }
};

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("KMismatch", invalid, {"K = 32"}, [](Args& x) { matmul(x.a_({4, 32}), x.w(), x.out()); });
  t.add("ScaleShape", invalid, {"w.scale"}, [](Args& x) {
    Weight w = x.w();
    w.scale = x.scale_({5});
    matmul(x.a(), w, x.out());
  });
  t.add("Fp8ActivationWithBf16Weight", ErrorCode::unsupported, {"fp8 weight"}, [](Args& x) {
    matmul(x.a_({4, 64}, DType::f8_e4m3fn), x.w(WeightFormat::bf16), x.out());
  });
  t.add("Q8KOffTheBlock", invalid, {"multiple of 32"}, [](Args& x) {
    matmul(x.a_({4, 48}), x.w(WeightFormat::q8_0, 48), x.out());
  });
  t.add("AColumnStride", invalid, {"column stride"}, [](Args& x) {
    matmul(x.a_({4, 32}, DType::f32, {64, 2}), x.w(WeightFormat::f8_e4m3fn, 32), x.out());
  });
  t.add("BiasLength", invalid, {"bias"}, [](Args& x) {
    MatmulOptions o;
    o.bias = x.scale_({7});
    matmul(x.a(), x.w(), x.out(), o);
  });
  t.add("AScaleWithFloatA", invalid, {"a_scale"}, [](Args& x) {
    MatmulOptions o;
    o.a_scale = x.scale_({1});
    matmul(x.a(), x.w(), x.out(), o);
  });
  t.add("ScaleOnAFormatWithout", invalid, {"only with fp8"}, [](Args& x) {
    Weight w = x.w(WeightFormat::bf16);
    w.scale = x.scale_({1});
    matmul(x.a(), w, x.out());
  });
}

KILN_ERRORS(Args, "MatmulErrors", "kiln::matmul", errors);

}  // namespace
}  // namespace kiln::test
