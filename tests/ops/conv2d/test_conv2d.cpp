// conv2d: the CPU backend and the CUDA kernels against a direct f64 convolution computed here,
// the 64-bit offsets of a > 2^31-element activation, and the argument checks.
//
// Error bounds (FlashAttention's style): the CUDA kernel rounds x and w to its compute type T
// (bf16, or f16 when neither is bf16 and one is f16) and accumulates in f32, so it is compared
// with `low`, the f64 convolution of the T-rounded inputs: within the output's rounding plus
// f32 accumulation; and its distance to the exact f64 result must stay within 1.25 times that of
// `low` (plus the output's rounding). The CPU backend accumulates in f64: within the output's
// rounding of the exact result.
#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/conv2d.hpp"
#include "ops/conv2d/conv2d.hpp"
#include "support/harness.hpp"

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
    return cat("N", N, "_C", C, "_", H, "x", W, "_OC", OC, "_k", K, "_s", stride, "_p", pad, "_d",
               dilation, "_x", dtype_name(x), "_w", dtype_name(w), "_out", dtype_name(out),
               nhwc ? "_nhwc" : "_nchw", bias ? "" : "_nobias", sliced ? "_sliced" : "",
               w_flip ? "_wflip" : "");
  }
};

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

std::array<std::int64_t, 4> format_strides(bool nhwc, std::int64_t C, std::int64_t H,
                                           std::int64_t W) {
  if (nhwc) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

Dims dims(const std::array<std::int64_t, 4>& a) { return {a.begin(), a.end()}; }

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

// x_at(n, c, ih, iw), w_at(oc, c, kh, kw): element values as stored.
using Element = std::function<float(std::int64_t, std::int64_t, std::int64_t, std::int64_t)>;

// The direct convolution at `pixels` (all OC of each, at their logical indices in out): `exact`
// of the inputs as given, `low` of the inputs rounded to the CUDA kernel's compute type,
// `magnitude` = |bias| + sum |x w|; bounded as the header says for `backend`.
Expected direct(const Case& c, Backend backend, const std::vector<Pixel>& pixels,
                const Element& x_at, const Element& w_at,
                const std::function<float(std::int64_t)>& bias_at) {
  const DType t = cuda_compute_type(c);
  Expected e{.output = "out"};
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
            const double lv = round_to(t, xv) * round_to(t, wv);
            low += lv;
            magnitude += std::abs(lv);
          }
        }
      }
      e.exact.push_back(exact);
      e.low.push_back(low);
      e.magnitude.push_back(magnitude);
      e.at.push_back(((p.n * c.OC + oc) * c.OH() + p.oh) * c.OW() + p.ow);
    }
  }
  const double u = unit_roundoff(c.out);
  Tolerance& tol = e.tolerance;
  tol.rel = 2 * u;
  // f16 outputs below 2^-14 are subnormal: their rounding step is 2^-24, not relative.
  tol.abs = c.out == DType::f16 ? std::ldexp(1.0, -24) : 1e-30;
  if (backend == Backend::cuda) {
    tol.accum = double(c.C * c.K * c.K) * std::ldexp(1.0, -24);
    tol.against_low = true;
    tol.factor = 1.25, tol.low_floor = 2 * u + std::ldexp(1.0, -20), tol.low_stats = kRmsError;
  } else {
    tol.accum = std::ldexp(1.0, -40);
    tol.nmse = std::pow(2 * u + std::ldexp(1.0, -20), 2);
  }
  return e;
}

Conv2dOptions options_of(const Case& c) {
  Conv2dOptions o;
  o.stride = {c.stride, c.stride};
  o.padding = {c.pad, c.pad};
  o.dilation = {c.dilation, c.dilation};
  return o;
}

struct Conv2d {
  using Case = test::Case;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    const std::int64_t parent_c = c.sliced ? c.C + 2 : c.C;
    const auto xs = format_strides(c.nhwc, parent_c, c.H, c.W);
    t.input("x", c.x, {c.N, c.C, c.H, c.W}, dims(xs), c.sliced ? xs[1] : 0,
            c.N * parent_c * c.H * c.W);
    t.input("w", c.w, {c.OC, c.C, c.K, c.K},
            dims(format_strides(c.nhwc != c.w_flip, c.C, c.K, c.K)));
    for (const char* name : {"x", "w"}) t.fill(name, rng);
    if (c.bias) {
      t.input("bias", c.w, {c.OC});
      t.fill("bias", rng);
    }
    t.output("out", c.out, {c.N, c.OC, c.OH(), c.OW()},
             dims(format_strides(c.nhwc, c.OC, c.OH(), c.OW())));
  }

  static void run(const Case& c, const Views& v, Stream stream) {
    conv2d(v["x"], v["w"], v.optional("bias"), v["out"], options_of(c), stream);
  }

  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    const auto at = [](const TensorView& v) {
      return [v](std::int64_t a, std::int64_t b, std::int64_t h, std::int64_t w) {
        return numeric::load_float(
            v.data(), v.dtype(),
            a * v.stride(0) + b * v.stride(1) + h * v.stride(2) + w * v.stride(3));
      };
    };
    const auto bias = r.host().optional("bias");
    return {direct(c, r.backend(), pixels_to_check(c, r.rng()), at(r.host()["x"]),
                   at(r.host()["w"]),
                   [&](std::int64_t oc) { return numeric::load_float(bias->data(), c.w, oc); })};
  }

  // The CPU backend is checked on small shapes.
  static bool runs_on(const Case& c, Backend b) {
    return b == Backend::cuda || c.macs() <= 40'000'000;
  }

  static double flops(const Case& c) { return 2.0 * double(c.macs()); }
};

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

KILN_CASES(Conv2d, "Conv2d", cases);

// The subset compute-sanitizer runs: both layouts of the async and register paths, 1x1, stride 2,
// 7x7, an OC tail, a slice, the direct kernel and the sm_90a kernel.
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

KILN_CASES(Conv2d, "Conv2dSanitize", sanitize_cases, .sanitize = true);

// An activation of more than 2^31 elements: x [1, 8, 16392, 16384] bf16 (4 GiB) and an output
// of the same size, 3x3 pad 1 to 8 channels. x repeats a random block of 2^20 elements; pixels
// of the first and last rows and random ones are compared.
void check_offsets_beyond_31_bits(bool nhwc) {
  Rng rng;
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
  const auto os = format_strides(nhwc, c.OC, c.OH(), c.OW());
  const std::int64_t x_shape[] = {c.N, c.C, c.H, c.W}, w_shape[] = {c.OC, c.C, 3, 3};
  const std::int64_t out_shape[] = {c.N, c.OC, c.OH(), c.OW()};
  conv2d(TensorView(x.data(), DType::bf16, x_shape, xs, Device::cuda(0)),
         TensorView(w.data(), DType::bf16, w_shape, ws, Device::cuda(0)),
         TensorView(b.data(), DType::bf16, {c.OC}, Device::cuda(0)),
         TensorView(out.data(), DType::bf16, out_shape, os, Device::cuda(0)), options_of(c));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_TRUE(out.guards_intact()) << "conv2d wrote outside out";

  std::vector<Pixel> pixels;
  for (std::int64_t ow = 0; ow < c.W; ow += 97) pixels.push_back({0, c.H - 1, ow});
  pixels.push_back({0, c.H - 1, c.W - 1});
  pixels.push_back({0, 0, 0});
  std::uniform_int_distribution<std::int64_t> h(0, c.H - 1), wd(0, c.W - 1);
  for (int i = 0; i < 256; ++i) pixels.push_back({0, h(rng.engine()), wd(rng.engine())});
  std::vector<double> got;
  for (const Pixel& p : pixels) {
    for (std::int64_t oc = 0; oc < c.OC; ++oc) {
      std::uint16_t bits = 0;
      out.download(&bits, 2, std::size_t(oc * os[1] + p.oh * os[2] + p.ow * os[3]) * 2);
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
  expect_values(nhwc ? "large nhwc" : "large nchw", got,
                direct(c, Backend::cuda, pixels, x_at, w_at, bias_at));
}

KILN_CUDA_TEST(Conv2dLarge, OffsetsBeyond31BitsNchw, false) { check_offsets_beyond_31_bits(false); }
KILN_CUDA_TEST(Conv2dLarge, OffsetsBeyond31BitsNhwc, false) { check_offsets_beyond_31_bits(true); }

// Small valid arguments (x [2, 4, 6, 5], w [3, 4, 3, 3], padding 1); each error row breaks one.
struct Args {
  ArgArray x_{2 * 4 * 6 * 5, DType::f32, 1.f}, w_{3 * 4 * 9 * 9, DType::f32, 1.f};
  ArgArray b_{3, DType::f32, 1.f}, out_{2 * 3 * 6 * 5, DType::f32, 0.f};
  TensorView x() { return x_({2, 4, 6, 5}); }
  TensorView w() { return w_({3, 4, 3, 3}); }
  TensorView out() { return out_({2, 3, 6, 5}); }
  bool untouched() const { return x_.unchanged() && out_.unchanged(); }
  static Conv2dOptions pad1() {
    Conv2dOptions o;
    o.padding = {1, 1};
    return o;
  }
  // The valid call with one option changed.
  template <typename T>
  void with(T Conv2dOptions::*option, T value) {
    Conv2dOptions o = pad1();
    o.*option = value;
    conv2d(x(), w(), std::nullopt, out(), o);
  }
};

TEST(Conv2dArgs, ValidCallSucceeds) {
  Args a;
  conv2d(a.x(), a.w(), a.b_({3}), a.out(), Args::pad1());
  // Every output is 1 + the number of taps inside the image times 4 channels.
  const std::vector<double> out = values(a.out());
  EXPECT_EQ(out[0], 1.0 + 4 * 4);      // corner: 2x2 taps
  EXPECT_EQ(out[5 + 1], 1.0 + 9 * 4);  // interior pixel (1, 1)
}

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  using Pair = std::array<std::int64_t, 2>;
  t.add("Groups", ErrorCode::unsupported, {"groups = 2", "not supported"},
        [](Args& a) { a.with(&Conv2dOptions::groups, std::int64_t(2)); });
  t.add("GroupedWeight", ErrorCode::unsupported, {"w", "[3, 2, 3, 3]", "grouped", "groups = 2"},
        [](Args& a) {
          conv2d(a.x(), a.w_({3, 2, 3, 3}), std::nullopt, a.out(), Args::pad1());
        });
  t.add("WeightChannels", invalid, {"w", "[3, 3, 3, 3]", "[OC, 4, KH, KW]"}, [](Args& a) {
    conv2d(a.x(), a.w_({3, 3, 3, 3}), std::nullopt, a.out(), Args::pad1());
  });
  t.add("OutShape", invalid, {"out", "[2, 3, 6, 5]", "[2, 3, 4, 3]"}, [](Args& a) {
    a.with(&Conv2dOptions::padding, Pair{0, 0});
  });
  t.add("OutStrides", invalid, {"out", "strides", "[90, 30, 5, 1]", "[90, 1, 15, 3]"}, [](Args& a) {
    // Neither NCHW nor channels-last.
    const TensorView out = a.out_({2, 3, 6, 5}, DType::f32, {90, 1, 5, 15});
    conv2d(a.x(), a.w(), std::nullopt, out, Args::pad1());
  });
  t.add("Stride", invalid, {"stride (0, 1)", "stride >= 1"}, [](Args& a) {
    a.with(&Conv2dOptions::stride, Pair{0, 1});
  });
  t.add("Padding", invalid, {"padding (-1, 1)"}, [](Args& a) {
    a.with(&Conv2dOptions::padding, Pair{-1, 1});
  });
  t.add("KernelLargerThanInput", invalid, {"9x9 kernel", "does not fit", "[2, 4, 6, 5]"},
        [](Args& a) {
          conv2d(a.x(), a.w_({3, 4, 9, 9}), std::nullopt, a.out(), {});
        });
  t.add("Dtypes", invalid, {"x", "i32", "f32, f16, bf16"}, [](Args& a) {
    conv2d(a.x_({2, 4, 6, 5}, DType::i32), a.w(), std::nullopt, a.out(), Args::pad1());
  });
  t.add("BiasShape", invalid, {"bias", "[2]", "[3]"},
        [](Args& a) { conv2d(a.x(), a.w(), a.b_({2}), a.out(), Args::pad1()); });
  t.add("OutOverlapsX", invalid, {"out", "overlaps", "x"}, [](Args& a) {
    conv2d(a.x(), a.w(), std::nullopt, a.x_({2, 3, 6, 5}), Args::pad1());
  });
  t.add("MixedDevices", invalid, {"out", "cuda:0", "cpu"}, [](Args& a) {
    const TensorView out = a.out_({2, 3, 6, 5}, DType::f32, {}, Device::cuda(0));
    conv2d(a.x(), a.w(), std::nullopt, out, Args::pad1());
  });
  // An input with no channel or no pixel has no defined convolution (torch raises too).
  t.add("NoChannels", invalid, {"x", "[2, 0, 6, 5]", "C, H and W >= 1"}, [](Args& a) {
    conv2d(a.x_({2, 0, 6, 5}), a.w_({3, 0, 3, 3}), std::nullopt, a.out(), Args::pad1());
  });
  t.add("NoRows", invalid, {"x", "[2, 4, 0, 5]", "C, H and W >= 1"}, [](Args& a) {
    conv2d(a.x_({2, 4, 0, 5}), a.w(), std::nullopt, a.out_({2, 3, 0, 5}), Args::pad1());
  });
  t.add("NoColumns", invalid, {"x", "[2, 4, 6, 0]", "C, H and W >= 1"}, [](Args& a) {
    conv2d(a.x_({2, 4, 6, 0}), a.w(), std::nullopt, a.out_({2, 3, 6, 0}), Args::pad1());
  });
}

KILN_ERRORS(Args, "Conv2dErrors", "kiln::conv2d", errors);

// N = 0 or OC = 0: an empty result, nothing written (the out views have torch's odd strides of
// empty tensors; the arrays behind them keep their bytes).
TEST(Conv2dArgs, EmptyBatchOrNoOutputChannelsWriteNothing) {
  Args a;
  conv2d(a.x_({0, 4, 6, 5}), a.w(), a.b_({3}), a.out_({0, 3, 6, 5}, DType::f32, {1, 1, 1, 1}),
         Args::pad1());
  conv2d(a.x(), a.w_({0, 4, 3, 3}), a.b_({0}), a.out_({2, 0, 6, 5}, DType::f32, {30, 30, 5, 1}),
         Args::pad1());
  EXPECT_TRUE(a.untouched());
}

// The CUDA path's own limit: kernels up to 7x7 (the CPU backend takes any size).
KILN_CUDA_TEST(Conv2dCudaErrors, KernelLargerThan7x7, true) {
  DeviceBuffer x(4 * 16 * 16 * 2), w(2 * 4 * 81 * 2), out(2 * 8 * 8 * 2);
  expect_error("kiln::conv2d",
               [&] {
                 conv2d(TensorView(x.data(), DType::bf16, {1, 4, 16, 16}, Device::cuda(0)),
                        TensorView(w.data(), DType::bf16, {2, 4, 9, 9}, Device::cuda(0)),
                        std::nullopt,
                        TensorView(out.data(), DType::bf16, {1, 2, 8, 8}, Device::cuda(0)));
               },
               ErrorCode::unsupported, {"9x9 kernel, expected at most 7x7"});
}

// Which calls the Hopper kernel takes, and what it copies first (on sm_90a; the case table checks
// its results there).
KILN_CUDA_TEST(Conv2dSm90, TakesSquareWindowsWith128kChannels, true) {
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
