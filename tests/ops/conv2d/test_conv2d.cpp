// conv2d: the CPU backend and the CUDA kernels against a direct f64 convolution computed here,
// the 64-bit offsets of a > 2^31-element activation, and the argument checks. Inputs are random
// and fresh every run (seed in the test's XML record).
//
// Error bounds (FlashAttention's style): the CUDA kernel rounds x and w to its compute type T
// (bf16, or f16 when neither is bf16 and one is f16) and accumulates in f32, so it is compared
// with `low`, the f64 convolution of the T-rounded inputs: within the output's rounding plus
// f32 accumulation; and its distance to the exact f64 result must stay within 1.25 times that of
// `low` (plus the output's rounding). The CPU backend accumulates in f64: within the output's
// rounding of the exact result.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/conv2d.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "ops/conv2d/conv2d.hpp"
#include "support/buffers.hpp"

namespace kiln::test {
namespace {

struct Case {
  std::int64_t N, C, H, W, OC, K;  // x [N, C, H, W], w [OC, C, K, K]
  std::int64_t stride = 1, pad = 0, dilation = 1;
  DType x = DType::bf16, w = DType::bf16, out = DType::bf16;
  bool nhwc = false;    // x, w and out channels-last
  bool bias = true;     // bias [OC] in w's dtype
  bool sliced = false;  // x is channels [1, C + 1) of a [N, C + 2, H, W] tensor
  bool w_flip = false;  // w in the other memory format (OHWI under NCHW x, OIHW under NHWC)

  std::int64_t OH() const { return conv2d_out_size(H, K, stride, pad, dilation); }
  std::int64_t OW() const { return conv2d_out_size(W, K, stride, pad, dilation); }
  std::int64_t macs() const { return N * OH() * OW() * OC * C * K * K; }
  std::string name() const {
    return "N" + std::to_string(N) + "_C" + std::to_string(C) + "_" + std::to_string(H) + "x" +
           std::to_string(W) + "_OC" + std::to_string(OC) + "_k" + std::to_string(K) + "_s" +
           std::to_string(stride) + "_p" + std::to_string(pad) + "_d" + std::to_string(dilation) +
           "_x" + dtype_name(x) + "_w" + dtype_name(w) + "_out" + dtype_name(out) +
           (nhwc ? "_nhwc" : "_nchw") + (bias ? "" : "_nobias") + (sliced ? "_sliced" : "") +
           (w_flip ? "_wflip" : "");
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

DType compute_type(DType x, DType w) {
  if (x == DType::bf16 || w == DType::bf16) return DType::bf16;
  if (x == DType::f16 || w == DType::f16) return DType::f16;
  return DType::bf16;
}

// The arithmetic of the CUDA kernel a case runs: f32 in the direct kernel (OC <= 16, stride 1,
// dilation 1, x not channels-last), else the mma.sync / wgmma operand type.
DType cuda_compute_type(const Case& c) {
  const bool x_nhwc = c.nhwc && c.C > 1;
  if (!x_nhwc && c.OC <= 16 && c.stride == 1 && c.dilation == 1) return DType::f32;
  return compute_type(c.x, c.w);
}

float round_to(DType dtype, float v) {
  if (dtype == DType::bf16) return numeric::bf16_to_float(numeric::float_to_bf16(v));
  if (dtype == DType::f16) return numeric::f16_to_float(numeric::float_to_f16(v));
  return v;
}

std::array<std::int64_t, 4> format_strides(bool nhwc, std::int64_t C, std::int64_t H,
                                           std::int64_t W) {
  if (nhwc) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

// Host tensors of one case.
struct Inputs {
  HostBuffer x_storage, w_storage, b_storage;
  TensorView x, w;
  std::optional<TensorView> bias;

  Inputs(std::size_t x_bytes, std::size_t w_bytes, std::size_t b_bytes)
      : x_storage(x_bytes), w_storage(w_bytes), b_storage(b_bytes) {}
};

std::unique_ptr<Inputs> make_inputs(const Case& c, Rng& rng) {
  const std::int64_t parent_c = c.sliced ? c.C + 2 : c.C;
  const std::int64_t x_count = c.N * parent_c * c.H * c.W;
  const std::int64_t w_count = c.OC * c.C * c.K * c.K;
  auto in = std::make_unique<Inputs>(std::size_t(x_count) * dtype_size(c.x),
                                     std::size_t(w_count) * dtype_size(c.w),
                                     std::size_t(c.OC) * dtype_size(c.w));
  fill_uniform(in->x_storage.data(), c.x, std::size_t(x_count), rng);
  fill_uniform(in->w_storage.data(), c.w, std::size_t(w_count), rng);
  fill_uniform(in->b_storage.data(), c.w, std::size_t(c.OC), rng);
  const auto xs = format_strides(c.nhwc, parent_c, c.H, c.W);
  const std::int64_t x_offset = c.sliced ? xs[1] : 0;  // channel 1 of the parent
  const std::int64_t x_shape[] = {c.N, c.C, c.H, c.W};
  in->x = TensorView(static_cast<char*>(in->x_storage.data()) + x_offset * dtype_size(c.x), c.x,
                     x_shape, xs);
  const auto ws = format_strides(c.nhwc != c.w_flip, c.C, c.K, c.K);
  const std::int64_t w_shape[] = {c.OC, c.C, c.K, c.K};
  in->w = TensorView(in->w_storage.data(), c.w, w_shape, ws);
  if (c.bias) in->bias = TensorView(in->b_storage.data(), c.w, {c.OC});
  return in;
}

struct Pixel {
  std::int64_t n, oh, ow;
};

// Every output pixel of small cases; borders of the first and last image and random pixels of
// large ones.
std::vector<Pixel> pixels_to_check(const Case& c, Rng& rng) {
  const std::int64_t OH = c.OH(), OW = c.OW();
  std::vector<Pixel> pixels;
  if (c.N * OH * OW <= 4096) {
    for (std::int64_t n = 0; n < c.N; ++n) {
      for (std::int64_t oh = 0; oh < OH; ++oh) {
        for (std::int64_t ow = 0; ow < OW; ++ow) pixels.push_back({n, oh, ow});
      }
    }
    return pixels;
  }
  for (std::int64_t n : {std::int64_t(0), c.N - 1}) {
    for (std::int64_t ow = 0; ow < OW; ++ow) {
      pixels.push_back({n, 0, ow});
      pixels.push_back({n, OH - 1, ow});
    }
    for (std::int64_t oh = 1; oh + 1 < OH; ++oh) {
      pixels.push_back({n, oh, 0});
      pixels.push_back({n, oh, OW - 1});
    }
  }
  std::uniform_int_distribution<std::int64_t> n(0, c.N - 1), h(0, OH - 1), w(0, OW - 1);
  for (int i = 0; i < 512; ++i) {
    pixels.push_back({n(rng.engine()), h(rng.engine()), w(rng.engine())});
  }
  return pixels;
}

// The direct convolution at `pixels` (all OC of each), in f64: `exact` of the inputs as given,
// `low` of the inputs rounded to the compute type, `magnitude` = |bias| + sum |x w|.
struct Expected {
  std::vector<double> exact, low, magnitude;
};

// x_at(n, c, ih, iw), w_at(oc, c, kh, kw): element values as stored.
using Element = std::function<float(std::int64_t, std::int64_t, std::int64_t, std::int64_t)>;

Expected direct(const Case& c, const std::vector<Pixel>& pixels, const Element& x_at,
                const Element& w_at, const std::function<float(std::int64_t)>& bias_at) {
  const DType t = cuda_compute_type(c);
  Expected e;
  for (const Pixel& p : pixels) {
    for (std::int64_t oc = 0; oc < c.OC; ++oc) {
      const double b = c.bias ? bias_at(oc) : 0.0;
      double exact = b, low = b, magnitude = std::abs(b);
      for (std::int64_t kh = 0; kh < c.K; ++kh) {
        const std::int64_t ih = p.oh * c.stride - c.pad + kh * c.dilation;
        for (std::int64_t kw = 0; kw < c.K; ++kw) {
          const std::int64_t iw = p.ow * c.stride - c.pad + kw * c.dilation;
          if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
          for (std::int64_t ch = 0; ch < c.C; ++ch) {
            const float xv = x_at(p.n, ch, ih, iw), wv = w_at(oc, ch, kh, kw);
            exact += double(xv) * double(wv);
            const double lv = double(round_to(t, xv)) * double(round_to(t, wv));
            low += lv;
            magnitude += std::abs(lv);
          }
        }
      }
      e.exact.push_back(exact);
      e.low.push_back(low);
      e.magnitude.push_back(magnitude);
    }
  }
  return e;
}

Expected direct(const Case& c, const Inputs& in, const std::vector<Pixel>& pixels) {
  const auto at = [](const TensorView& v) {
    return [&v](std::int64_t a, std::int64_t b, std::int64_t h, std::int64_t w) {
      return numeric::load_float(
          v.data(), v.dtype(),
          a * v.stride(0) + b * v.stride(1) + h * v.stride(2) + w * v.stride(3));
    };
  };
  const TensorView& bias = in.bias ? *in.bias : in.w;
  return direct(c, pixels, at(in.x), at(in.w),
                [&](std::int64_t oc) { return numeric::load_float(bias.data(), c.w, oc); });
}

// Checks `got` (all OC of each pixel, in pixel order) against `e`; `gpu` selects the bound.
void expect_matches(const Case& c, const std::vector<float>& got, const Expected& e, bool gpu,
                    const std::string& what) {
  ASSERT_EQ(got.size(), e.exact.size()) << what;
  const double u = unit_roundoff(c.out);
  const double k = double(c.C * c.K * c.K);
  const double subnormal = c.out == DType::f16 ? std::ldexp(1.0, -24) : 1e-30;
  double ref_sq = 0, err_sq = 0, low_err_sq = 0;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double target = gpu ? e.low[i] : e.exact[i];
    const double accumulation = gpu ? k * std::ldexp(1.0, -24) : std::ldexp(1.0, -40);
    // f16 outputs below 2^-14 are subnormal: their rounding step is 2^-24, not relative.
    const double bound = 2 * u * std::abs(target) + accumulation * e.magnitude[i] + subnormal;
    if (!(std::abs(double(got[i]) - target) <= bound)) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << ": element " << i << " (pixel " << i / std::size_t(c.OC) << ", oc "
                      << i % std::size_t(c.OC) << ") is " << got[i] << ", expected " << target
                      << " (bound " << bound << ")";
      }
    }
    ref_sq += e.exact[i] * e.exact[i];
    err_sq += (double(got[i]) - e.exact[i]) * (double(got[i]) - e.exact[i]);
    low_err_sq += (e.low[i] - e.exact[i]) * (e.low[i] - e.exact[i]);
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off";
  ASSERT_GT(ref_sq, 0.0) << what << ": the expected output is all zeros; the test cannot fail";
  const double ref = std::sqrt(ref_sq);
  const double norm_bound =
      (gpu ? 1.25 * std::sqrt(low_err_sq) : 0.0) + 2 * u * ref + std::ldexp(1.0, -20) * ref;
  EXPECT_LE(std::sqrt(err_sq), norm_bound) << what << ": ||got - exact|| vs the low-precision "
                                           << "reference's " << std::sqrt(low_err_sq);
}

std::int64_t out_index(const Case& c, std::int64_t n, std::int64_t oc, std::int64_t oh,
                       std::int64_t ow) {
  const std::int64_t OH = c.OH(), OW = c.OW();
  if (c.nhwc) return ((n * OH + oh) * OW + ow) * c.OC + oc;
  return ((n * c.OC + oc) * OH + oh) * OW + ow;
}

TensorView out_view(const Case& c, void* data, Device device) {
  const std::int64_t shape[] = {c.N, c.OC, c.OH(), c.OW()};
  return TensorView(data, c.out, shape, format_strides(c.nhwc, c.OC, c.OH(), c.OW()), device);
}

// Every output element was written (no poison left), then the pixels are compared.
void check_output(const Case& c, const Inputs& in, const void* out, bool gpu, Rng& rng) {
  const std::int64_t count = c.N * c.OC * c.OH() * c.OW();
  const std::vector<float> all = to_floats(out, c.out, std::size_t(count));
  const auto nans = std::count_if(all.begin(), all.end(), [](float v) { return std::isnan(v); });
  EXPECT_EQ(nans, 0) << c.name() << ": " << nans << " outputs not written (still poisoned)";
  const auto pixels = pixels_to_check(c, rng);
  std::vector<float> got;
  for (const Pixel& p : pixels) {
    for (std::int64_t oc = 0; oc < c.OC; ++oc) {
      got.push_back(all[std::size_t(out_index(c, p.n, oc, p.oh, p.ow))]);
    }
  }
  expect_matches(c, got, direct(c, in, pixels), gpu, c.name());
}

Conv2dOptions options_of(const Case& c) {
  Conv2dOptions o;
  o.stride = {c.stride, c.stride};
  o.padding = {c.pad, c.pad};
  o.dilation = {c.dilation, c.dilation};
  return o;
}

// The seed's 17 configurations, with N = 2, dilation 2, 5x5, 7x7 and odd ones.
std::vector<Case> shapes() {
  return {
      {1, 10, 8, 6, 10, 3, 1, 1},
      {1, 32, 16, 16, 32, 3, 1, 1},
      {1, 64, 32, 32, 64, 3, 1, 1},
      {1, 128, 32, 32, 128, 3, 1, 1},
      {1, 320, 64, 64, 320, 3, 1, 1},
      {1, 640, 32, 32, 640, 3, 1, 1},
      {1, 320, 64, 64, 320, 1},
      {1, 640, 32, 32, 640, 1},
      {1, 32, 8, 8, 32, 1, 1, 1},
      {1, 32, 8, 8, 32, 1, 2, 1},
      {1, 128, 64, 64, 256, 3, 2, 1},
      {1, 32, 16, 16, 32, 3},
      {1, 64, 48, 32, 64, 3, 1, 1},
      {1, 64, 16, 16, 48, 3, 1, 1},
      {1, 3, 32, 32, 16, 3, 1, 1},
      {1, 16, 16, 16, 3, 1},
      {1, 16, 8, 8, 16, 3, 1, 1},
      // N = 2, dilation 2, 5x5, 7x7 (stride 2, pad 3: a ResNet stem on 3 channels), odd sizes.
      {2, 24, 13, 11, 40, 3, 1, 1},
      {1, 16, 20, 20, 24, 3, 1, 2, 2},
      {1, 24, 17, 15, 32, 5, 1, 2},
      {1, 3, 37, 29, 64, 7, 2, 3},
      {2, 40, 9, 7, 72, 7, 1, 3},
  };
}

std::vector<Case> sm90_shapes() {
  Case sliced{1, 64, 8, 128, 128, 3, 1, 1};
  sliced.sliced = true;
  return {
      {1, 64, 10, 128, 128, 3, 1, 1},   {2, 96, 7, 200, 256, 3, 1, 1},
      {1, 64, 9, 136, 128, 3, 1, 2, 2}, {1, 64, 8, 136, 384, 1},
      {1, 40, 12, 96, 128, 5, 1, 2},    {2, 128, 19, 23, 128, 3, 2, 1},
      {2, 72, 5, 24, 128, 1},           sliced,
  };
}

std::vector<Case> cases() {
  const DType floats[] = {DType::f32, DType::f16, DType::bf16};
  std::vector<Case> all;
  const auto shape_list = shapes();
  for (std::size_t s = 0; s < shape_list.size(); ++s) {
    const Case base = shape_list[s];
    for (bool nhwc : {false, true}) {
      // Every (x, w, out) dtype triple on the first shape (10@8x6). On the others, each
      // specialization is a JIT compile (~1 s): bf16 and f16 throughout, and one mix per layout
      // (f32 x with bf16 w for channels-last, bf16 x with f32 w and out for NCHW); on the big
      // shapes bf16 and f16 alone.
      const bool full = s == 0;
      for (DType x : floats) {
        for (DType w : floats) {
          for (DType out : floats) {
            const bool same16 = x == w && w == out && x != DType::f32;
            const bool mixed = nhwc ? (x == DType::f32 && w == DType::bf16 && out == DType::bf16)
                                    : (x == DType::bf16 && w == DType::f32 && out == DType::f32);
            const bool big = base.macs() > 100'000'000;
            if (!full && !(same16 || (mixed && !big))) continue;
            Case c = base;
            c.x = x, c.w = w, c.out = out, c.nhwc = nhwc;
            all.push_back(c);
          }
        }
      }
    }
  }
  // Without bias; x a channel slice (register loads of a misaligned, strided view).
  for (bool nhwc : {false, true}) {
    Case c{1, 32, 16, 16, 40, 3, 1, 1};
    c.nhwc = nhwc, c.bias = false;
    all.push_back(c);
    c.bias = true, c.sliced = true;
    all.push_back(c);
    c.x = DType::f16, c.w = DType::f16, c.out = DType::f32;
    all.push_back(c);
  }
  // Shapes the sm_90a kernel takes (C % 8 == 0, OC % 128 == 0), in both layouts (NCHW: from a
  // channels-last copy of x, or in place for 1x1; written NCHW): 128-pixel tiles crossing output
  // rows and images, C not a multiple of 64, BN = 256, N = 2, dilation, stride 2, 1x1 (images of
  // 1088 and 120 pixels) and 5x5, a channel slice; each with w in the other memory format too.
  for (Case c : sm90_shapes()) {
    for (bool nhwc : {false, true}) {
      for (bool w_flip : {false, true}) {
        for (DType t : {DType::bf16, DType::f16}) {
          if (t == DType::f16 && w_flip) continue;
          c.nhwc = nhwc, c.w_flip = w_flip, c.x = c.w = c.out = t;
          all.push_back(c);
        }
      }
    }
  }
  // Shapes the direct kernel takes (OC <= 16, stride 1, dilation 1; NCHW x) beyond the seeds' ones:
  // rows of 600 and 520 pixels (a second, partial 512-pixel block), C not a multiple of its
  // 8-channel chunks, 5x5 and 7x7 windows (two and three 16-byte groups a thread), 1x1, N = 2, a
  // channel slice; f32 throughout too (the kernel computes in f32).
  Case direct_sliced{1, 20, 6, 520, 4, 3, 1, 1};
  direct_sliced.sliced = true;
  for (Case c : {Case{1, 40, 9, 600, 3, 3, 1, 1}, Case{2, 12, 7, 70, 16, 5, 1, 2},
                 Case{1, 9, 11, 33, 5, 7, 1, 3}, Case{1, 24, 6, 520, 3, 1}, direct_sliced}) {
    for (bool nhwc : {false, true}) {
      for (DType t : {DType::bf16, DType::f32}) {
        c.nhwc = nhwc, c.x = c.w = c.out = t;
        all.push_back(c);
      }
    }
  }
  // The f32 weights of seed case 17 with bf16 activations.
  Case f32w{1, 16, 8, 8, 16, 3, 1, 1};
  f32w.w = DType::f32;
  all.push_back(f32w);
  return all;
}

class Conv2d : public ::testing::TestWithParam<Case> {};

TEST_P(Conv2d, CpuMatchesDirect) {
  const Case& c = GetParam();
  if (c.macs() > 40'000'000) GTEST_SKIP() << "the CPU backend is checked on small shapes";
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const auto in = make_inputs(c, rng);
  HostBuffer out(std::size_t(c.N * c.OC * c.OH() * c.OW()) * dtype_size(c.out));
  conv2d(in->x, in->w, in->bias, out_view(c, out.data(), Device::cpu()), options_of(c));
  EXPECT_TRUE(out.guards_intact()) << "conv2d wrote outside out";
  check_output(c, *in, out.data(), false, rng);
}

TEST_P(Conv2d, CudaMatchesDirect) {
  KILN_REQUIRE_GPU();
  const Case& c = GetParam();
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const auto in = make_inputs(c, rng);
  const std::size_t out_bytes = std::size_t(c.N * c.OC * c.OH() * c.OW()) * dtype_size(c.out);
  DeviceBuffer x(in->x_storage.bytes()), w(in->w_storage.bytes()), b(in->b_storage.bytes()),
      out(out_bytes);
  x.upload(in->x_storage.data(), in->x_storage.bytes());
  w.upload(in->w_storage.data(), in->w_storage.bytes());
  b.upload(in->b_storage.data(), in->b_storage.bytes());
  const auto on_device = [](const TensorView& v, void* base, const void* host_base) {
    const auto offset = static_cast<const char*>(v.data()) - static_cast<const char*>(host_base);
    return TensorView(static_cast<char*>(base) + offset, v.dtype(), v.shape(), v.strides(),
                      Device::cuda(0));
  };
  std::optional<TensorView> bias;
  if (in->bias) bias = on_device(*in->bias, b.data(), in->b_storage.data());
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  conv2d(on_device(in->x, x.data(), in->x_storage.data()),
         on_device(in->w, w.data(), in->w_storage.data()), bias,
         out_view(c, out.data(), Device::cuda(0)), options_of(c), stream);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  HostBuffer actual(out_bytes);
  out.download(actual.data(), out_bytes);
  EXPECT_TRUE(out.guards_intact()) << "conv2d wrote outside out";
  check_output(c, *in, actual.data(), true, rng);
}

INSTANTIATE_TEST_SUITE_P(Cases, Conv2d, ::testing::ValuesIn(cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

// The subset compute-sanitizer runs (scripts/gpu_check.sh leaves out Cases/ and Conv2dLarge):
// both layouts of the async and register paths, 1x1, stride 2, 7x7, an OC tail, a slice, the
// direct kernel and the sm_90a kernel.
std::vector<Case> sanitize_cases() {
  std::vector<Case> all;
  for (bool nhwc : {false, true}) {
    for (Case c : {Case{1, 32, 16, 16, 32, 3, 1, 1}, Case{2, 24, 13, 11, 40, 3, 1, 1},
                   Case{1, 32, 8, 8, 32, 1, 2, 1}, Case{1, 16, 16, 16, 3, 1},
                   Case{1, 3, 37, 29, 64, 7, 2, 3}, Case{1, 64, 16, 16, 48, 3, 1, 1},
                   Case{1, 40, 9, 600, 3, 3, 1, 1}}) {
      c.nhwc = nhwc;
      all.push_back(c);
    }
    for (Case c : {Case{1, 64, 10, 128, 128, 3, 1, 1}, Case{2, 96, 7, 200, 256, 3, 1, 1}}) {
      c.nhwc = nhwc, c.w_flip = c.C == 64;  // the sm_90a kernel, with and without a repack
      all.push_back(c);
    }
    Case f32{1, 32, 16, 16, 40, 3, 1, 1};
    f32.nhwc = nhwc, f32.x = DType::f32, f32.w = DType::f32, f32.out = DType::f32;
    f32.sliced = true;
    all.push_back(f32);
  }
  return all;
}

INSTANTIATE_TEST_SUITE_P(Sanitize, Conv2d, ::testing::ValuesIn(sanitize_cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

// An activation of more than 2^31 elements: x [1, 8, 16392, 16384] bf16 (4 GiB) and an output
// of the same size, 3x3 pad 1 to 8 channels. x repeats a random block of 2^20 elements; pixels
// of the first and last rows and random ones are compared.
class Conv2dLarge : public ::testing::TestWithParam<bool> {};

TEST_P(Conv2dLarge, OffsetsBeyond31Bits) {
  KILN_REQUIRE_GPU();
  const bool nhwc = GetParam();
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  Case c{1, 8, 16392, 16384, 8, 3, 1, 1};
  c.nhwc = nhwc;
  const std::int64_t x_count = c.N * c.C * c.H * c.W;
  ASSERT_GT(x_count, std::int64_t(1) << 31);
  constexpr std::int64_t kBlock = std::int64_t(1) << 20;
  ASSERT_EQ(x_count % kBlock, 0);
  HostBuffer block(kBlock * 2), w_host(std::size_t(c.OC * c.C * 9) * 2), b_host(16);
  fill_uniform(block.data(), DType::bf16, kBlock, rng);
  fill_uniform(w_host.data(), DType::bf16, std::size_t(c.OC * c.C * 9), rng);
  fill_uniform(b_host.data(), DType::bf16, std::size_t(c.OC), rng);
  DeviceBuffer x(std::size_t(x_count) * 2), w(w_host.bytes()), b(b_host.bytes()),
      out(std::size_t(x_count) * 2);
  x.upload(block.data(), kBlock * 2);
  for (std::int64_t at = kBlock; at < x_count; at += kBlock) {
    ASSERT_EQ(cudaMemcpy(static_cast<char*>(x.data()) + at * 2, x.data(), kBlock * 2,
                         cudaMemcpyDeviceToDevice),
              cudaSuccess);
  }
  w.upload(w_host.data(), w_host.bytes());
  b.upload(b_host.data(), b_host.bytes());
  const auto xs = format_strides(nhwc, c.C, c.H, c.W);
  const auto ws = format_strides(nhwc, c.C, 3, 3);
  const std::int64_t x_shape[] = {c.N, c.C, c.H, c.W}, w_shape[] = {c.OC, c.C, 3, 3};
  conv2d(TensorView(x.data(), DType::bf16, x_shape, xs, Device::cuda(0)),
         TensorView(w.data(), DType::bf16, w_shape, ws, Device::cuda(0)),
         TensorView(b.data(), DType::bf16, {c.OC}, Device::cuda(0)),
         out_view(c, out.data(), Device::cuda(0)), options_of(c));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_TRUE(out.guards_intact()) << "conv2d wrote outside out";

  std::vector<Pixel> pixels;
  for (std::int64_t ow = 0; ow < c.W; ow += 97) pixels.push_back({0, c.H - 1, ow});
  pixels.push_back({0, c.H - 1, c.W - 1});
  pixels.push_back({0, 0, 0});
  std::uniform_int_distribution<std::int64_t> h(0, c.H - 1), wd(0, c.W - 1);
  for (int i = 0; i < 256; ++i) pixels.push_back({0, h(rng.engine()), wd(rng.engine())});
  std::vector<float> got;
  for (const Pixel& p : pixels) {
    for (std::int64_t oc = 0; oc < c.OC; ++oc) {
      std::uint16_t bits = 0;
      out.download(&bits, 2, std::size_t(out_index(c, 0, oc, p.oh, p.ow)) * 2);
      got.push_back(numeric::bf16_to_float(bits));
    }
  }
  const auto x_at = [&](std::int64_t n, std::int64_t ch, std::int64_t ih, std::int64_t iw) {
    const std::int64_t e = n * xs[0] + ch * xs[1] + ih * xs[2] + iw * xs[3];
    return numeric::load_float(block.data(), DType::bf16, e % kBlock);
  };
  const auto w_at = [&](std::int64_t oc, std::int64_t ch, std::int64_t kh, std::int64_t kw) {
    return numeric::load_float(w_host.data(), DType::bf16,
                               oc * ws[0] + ch * ws[1] + kh * ws[2] + kw * ws[3]);
  };
  const auto bias_at = [&](std::int64_t oc) {
    return numeric::load_float(b_host.data(), DType::bf16, oc);
  };
  expect_matches(c, got, direct(c, pixels, x_at, w_at, bias_at), true,
                 nhwc ? "large nhwc" : "large nchw");
}

INSTANTIATE_TEST_SUITE_P(Layouts, Conv2dLarge, ::testing::Bool(),
                         [](const auto& layout) { return layout.param ? "nhwc" : "nchw"; });

// Argument checks: each names the op, the argument, what was expected and what came.
class Conv2dErrors : public ::testing::Test {
 protected:
  std::vector<float> x_ = std::vector<float>(2 * 4 * 6 * 5, 1.f);
  std::vector<float> w_ = std::vector<float>(3 * 4 * 3 * 3, 1.f);
  std::vector<float> b_ = std::vector<float>(3, 1.f);
  std::vector<float> out_ = std::vector<float>(2 * 3 * 6 * 5, 0.f);
  TensorView x() { return TensorView(x_.data(), DType::f32, {2, 4, 6, 5}); }
  TensorView w() { return TensorView(w_.data(), DType::f32, {3, 4, 3, 3}); }
  TensorView out() { return TensorView(out_.data(), DType::f32, {2, 3, 6, 5}); }
  static Conv2dOptions pad1() {
    Conv2dOptions o;
    o.padding = {1, 1};
    return o;
  }

  static void expect_error(const std::function<void()>& call, ErrorCode code,
                           const std::vector<std::string>& fragments) {
    test::expect_error("kiln::conv2d", call, code, fragments);
  }
};

TEST_F(Conv2dErrors, ValidCallSucceeds) {
  conv2d(x(), w(), TensorView(b_.data(), DType::f32, {3}), out(), pad1());
  // Every output is 1 + the number of taps inside the image times 4 channels.
  EXPECT_EQ(out_[0], 1.f + 4 * 4);      // corner: 2x2 taps
  EXPECT_EQ(out_[5 + 1], 1.f + 9 * 4);  // interior pixel (1, 1)
}

TEST_F(Conv2dErrors, Groups) {
  Conv2dOptions o = pad1();
  o.groups = 2;
  expect_error([&] { conv2d(x(), w(), std::nullopt, out(), o); }, ErrorCode::unsupported,
               {"groups = 2", "not supported"});
}

TEST_F(Conv2dErrors, GroupedWeight) {
  expect_error(
      [&] {
        conv2d(x(), TensorView(w_.data(), DType::f32, {3, 2, 3, 3}), std::nullopt, out(), pad1());
      },
      ErrorCode::unsupported, {"w", "[3, 2, 3, 3]", "grouped", "groups = 2"});
}

TEST_F(Conv2dErrors, WeightChannels) {
  expect_error(
      [&] {
        conv2d(x(), TensorView(w_.data(), DType::f32, {3, 3, 3, 3}), std::nullopt, out(), pad1());
      },
      ErrorCode::invalid_argument, {"w", "[3, 3, 3, 3]", "[OC, 4, KH, KW]"});
}

TEST_F(Conv2dErrors, OutShape) {
  expect_error([&] { conv2d(x(), w(), std::nullopt, out(), Conv2dOptions{}); },
               ErrorCode::invalid_argument, {"out", "[2, 3, 6, 5]", "[2, 3, 4, 3]"});
}

TEST_F(Conv2dErrors, OutStrides) {
  const std::int64_t shape[] = {2, 3, 6, 5};
  const std::int64_t strides[] = {90, 1, 5, 15};  // neither NCHW nor channels-last
  expect_error(
      [&] {
        conv2d(x(), w(), std::nullopt, TensorView(out_.data(), DType::f32, shape, strides), pad1());
      },
      ErrorCode::invalid_argument, {"out", "strides", "[90, 30, 5, 1]", "[90, 1, 15, 3]"});
}

TEST_F(Conv2dErrors, Options) {
  Conv2dOptions o = pad1();
  o.stride = {0, 1};
  expect_error([&] { conv2d(x(), w(), std::nullopt, out(), o); }, ErrorCode::invalid_argument,
               {"stride (0, 1)", "stride >= 1"});
  o = pad1();
  o.padding = {-1, 1};
  expect_error([&] { conv2d(x(), w(), std::nullopt, out(), o); }, ErrorCode::invalid_argument,
               {"padding (-1, 1)"});
}

TEST_F(Conv2dErrors, KernelLargerThanInput) {
  std::vector<float> big(3 * 4 * 9 * 9);
  expect_error(
      [&] {
        conv2d(x(), TensorView(big.data(), DType::f32, {3, 4, 9, 9}), std::nullopt, out(),
               Conv2dOptions{});
      },
      ErrorCode::invalid_argument, {"9x9 kernel", "does not fit", "[2, 4, 6, 5]"});
}

TEST_F(Conv2dErrors, Dtypes) {
  expect_error(
      [&] {
        conv2d(TensorView(x_.data(), DType::i32, {2, 4, 6, 5}), w(), std::nullopt, out(), pad1());
      },
      ErrorCode::invalid_argument, {"x", "i32", "f32, f16, bf16"});
}

TEST_F(Conv2dErrors, BiasShape) {
  expect_error([&] { conv2d(x(), w(), TensorView(b_.data(), DType::f32, {2}), out(), pad1()); },
               ErrorCode::invalid_argument, {"bias", "[2]", "[3]"});
}

TEST_F(Conv2dErrors, OutOverlapsX) {
  expect_error(
      [&] {
        conv2d(x(), w(), std::nullopt, TensorView(x_.data(), DType::f32, {2, 3, 6, 5}), pad1());
      },
      ErrorCode::invalid_argument, {"out", "overlaps", "x"});
}

TEST_F(Conv2dErrors, MixedDevices) {
  expect_error(
      [&] {
        conv2d(x(), w(), std::nullopt,
               TensorView(out_.data(), DType::f32, {2, 3, 6, 5}, Device::cuda(0)), pad1());
      },
      ErrorCode::invalid_argument, {"out", "cuda:0", "cpu"});
}

TEST_F(Conv2dErrors, UntouchedOutputOnError) {
  Conv2dOptions o = pad1();
  o.groups = 4;
  EXPECT_THROW(conv2d(x(), w(), std::nullopt, out(), o), Error);
  for (float v : out_) EXPECT_EQ(v, 0.f);
}

// The CUDA path's own limit: kernels up to 7x7 (the CPU backend takes any size).
TEST(Conv2dCudaErrors, KernelLargerThan7x7) {
  KILN_REQUIRE_GPU();
  DeviceBuffer x(4 * 16 * 16 * 2), w(2 * 4 * 81 * 2), out(2 * 8 * 8 * 2);
  try {
    conv2d(TensorView(x.data(), DType::bf16, {1, 4, 16, 16}, Device::cuda(0)),
           TensorView(w.data(), DType::bf16, {2, 4, 9, 9}, Device::cuda(0)), std::nullopt,
           TensorView(out.data(), DType::bf16, {1, 2, 8, 8}, Device::cuda(0)));
    ADD_FAILURE() << "no kiln::Error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("9x9 kernel, expected at most 7x7"), std::string::npos)
        << e.what();
  }
}

// Which calls the Hopper kernel takes, and what it copies first (on sm_90a; the case table checks
// its results there).
TEST(Conv2dSm90Cuda, TakesSquareWindowsWith128kChannels) {
  KILN_REQUIRE_GPU();
  if (cuda_arch(0) != "sm_90a") GTEST_SKIP() << "not an sm_90a device: " << cuda_arch(0);
  DeviceBuffer x(2 * 64 * 20 * 20 * 4), w(256 * 64 * 9 * 4), out(2 * 256 * 20 * 20 * 4);
  const auto view = [](const DeviceBuffer& b, DType t, std::vector<std::int64_t> shape, bool nhwc) {
    const std::int64_t C = shape[1], H = shape[2], W = shape[3];
    const std::array<std::int64_t, 4> strides = format_strides(nhwc, C, H, W);
    return TensorView(b.data(), t, shape, {strides.begin(), strides.end()}, Device::cuda(0));
  };
  Conv2dOptions pad1;
  pad1.padding = {1, 1};
  // "m x w o": A MN-major (1x1 NCHW in place), x copied, w copied, out NCHW; "" when the kernel
  // does not take the call.
  const auto layout = [&](DType t, std::int64_t oc, bool x_nhwc, bool w_nhwc, Conv2dOptions o,
                          std::int64_t k = 3) {
    const TensorView xv = view(x, t, {2, 64, 20, 16}, x_nhwc);
    const TensorView wv = view(w, t, {oc, 64, k, k}, w_nhwc);
    const conv2d_detail::Problem p = conv2d_detail::problem_of(xv, wv, o);
    const TensorView ov = view(out, t, {2, oc, p.OH, p.OW}, x_nhwc);
    const auto l = conv2d_detail::sm90_layout(p, xv, wv, ov);
    if (!l) return std::string();
    return std::string(l->a_mn_major ? "m" : "-") + (l->x_copy ? "x" : "-") +
           (l->w_copy ? "w" : "-") + (l->out_nchw ? "o" : "-");
  };
  EXPECT_EQ(layout(DType::bf16, 256, true, true, pad1), "----");
  EXPECT_EQ(layout(DType::f16, 128, true, true, pad1), "----");
  EXPECT_EQ(layout(DType::bf16, 256, true, false, pad1), "--w-");    // OIHW w
  EXPECT_EQ(layout(DType::bf16, 256, false, false, pad1), "-xwo");   // NCHW
  EXPECT_EQ(layout(DType::f16, 128, false, true, pad1), "-x-o");     // NCHW x, OHWI w
  EXPECT_EQ(layout(DType::bf16, 192, true, true, pad1), "");         // OC % 128 != 0
  EXPECT_EQ(layout(DType::f32, 256, true, true, pad1), "");          // f32 operands
  EXPECT_EQ(layout(DType::bf16, 256, false, false, {}, 1), "m-wo");  // 1x1 NCHW: in place
  EXPECT_EQ(layout(DType::bf16, 256, false, false, pad1, 1), "-xwo");
  Conv2dOptions uneven = pad1;
  uneven.padding = {1, 0};
  EXPECT_EQ(layout(DType::bf16, 256, true, true, uneven), "");
  Conv2dOptions stride2 = pad1;
  stride2.stride = {2, 2};
  EXPECT_EQ(layout(DType::bf16, 256, false, false, stride2), "-xwo");
}

}  // namespace
}  // namespace kiln::test
