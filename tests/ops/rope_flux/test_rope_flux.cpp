// rope_flux: the CPU reference against a closed form, the CUDA kernels against the CPU reference,
// and argument checks. Inputs are random and fresh every run (seed in the test's XML record).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numbers>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/error.hpp"
#include "kiln/jit.hpp"
#include "kiln/rope_flux.hpp"
#include "support/buffers.hpp"

namespace kiln::test {
namespace {

// How x is laid out in memory.
enum class XLayout {
  contiguous,   // [N, L, H, D]
  packed_qkv,   // the K slice of [N, L, 3, H, D]
  heads_major,  // [N, H, L, D] memory viewed as [N, L, H, D]
  strided_d,    // every other element of [N, L, H, 2D]: no vector loads
};

enum class PeLayout { none, shared, batched, padded /* [L, D/2, 2, 3][..., :2] */ };

struct Case {
  std::int64_t N, L, H, D;
  DType x = DType::bf16;
  DType out = DType::bf16;
  PeLayout pe = PeLayout::shared;
  bool norm = false;
  XLayout layout = XLayout::contiguous;
  DType weight = DType::bf16;

  std::string name() const {
    static const char* layouts[] = {"contiguous", "packed_qkv", "heads_major", "strided_d"};
    static const char* pes[] = {"none", "shared", "batched", "padded"};
    return "N" + std::to_string(N) + "_L" + std::to_string(L) + "_H" + std::to_string(H) + "_D" +
           std::to_string(D) + "_" + dtype_name(x) + "_to_" + dtype_name(out) + "_pe_" +
           pes[int(pe)] + (norm ? "_norm" : "") + "_" + layouts[int(layout)];
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

// Host tensors of one case, in a layout that mirrors how the device copies are made.
struct Inputs {
  HostBuffer x_storage;
  TensorView x;                // view into x_storage
  std::vector<double> angles;  // [N?, L, D/2] rotation angle of each pair
  HostBuffer pe_storage;
  std::optional<TensorView> pe;
  HostBuffer w_storage;
  std::optional<TensorView> weight;
  std::int64_t x_offset = 0;  // elements from x_storage.data() to x.data()

  Inputs(std::size_t x_bytes, std::size_t pe_bytes, std::size_t w_bytes)
      : x_storage(x_bytes), pe_storage(pe_bytes), w_storage(w_bytes) {}
};

// Flux's rotation angles: the head dim is split into axes (16/56/56 for Flux.1's D = 128), each
// rotating by position * theta^(-2i / axis_dim); positions are random token coordinates.
std::vector<int> axes_for(std::int64_t D) {
  if (D == 128) return {16, 56, 56};
  const int a = int(2 * ((3 * D / 8) / 2));
  return {int(D) - 2 * a, a, a};
}

std::unique_ptr<Inputs> make_inputs(const Case& c, Rng& rng) {
  const auto N = c.N, L = c.L, H = c.H, D = c.D;
  const std::int64_t x_parent = c.layout == XLayout::packed_qkv  ? N * L * 3 * H * D
                                : c.layout == XLayout::strided_d ? N * L * H * 2 * D
                                                                 : N * L * H * D;
  const std::int64_t pe_rows = c.pe == PeLayout::batched ? N * L : L;
  const std::int64_t pe_elems = pe_rows * (D / 2) * 2 * (c.pe == PeLayout::padded ? 3 : 2);
  auto in =
      std::make_unique<Inputs>(std::size_t(x_parent) * dtype_size(c.x), std::size_t(pe_elems) * 4,
                               std::size_t(D) * dtype_size(c.weight));
  fill_uniform(in->x_storage.data(), c.x, std::size_t(x_parent), rng);

  std::int64_t strides[4];
  switch (c.layout) {
    case XLayout::contiguous:
      strides[0] = L * H * D, strides[1] = H * D, strides[2] = D, strides[3] = 1;
      break;
    case XLayout::packed_qkv:
      strides[0] = L * 3 * H * D, strides[1] = 3 * H * D, strides[2] = D, strides[3] = 1;
      in->x_offset = H * D;
      break;
    case XLayout::heads_major:
      strides[0] = H * L * D, strides[1] = D, strides[2] = L * D, strides[3] = 1;
      break;
    case XLayout::strided_d:
      strides[0] = L * H * 2 * D, strides[1] = H * 2 * D, strides[2] = 2 * D, strides[3] = 2;
      break;
  }
  const std::int64_t shape[] = {N, L, H, D};
  in->x = TensorView(static_cast<char*>(in->x_storage.data()) + in->x_offset * dtype_size(c.x), c.x,
                     shape, strides);

  if (c.pe != PeLayout::none) {
    const auto axes = axes_for(D);
    const double theta = D == 128 ? 10000.0 : 2000.0;
    std::uniform_int_distribution<int> pos(0, 4095);
    in->angles.resize(std::size_t(pe_rows * (D / 2)));
    float* pe = static_cast<float*>(in->pe_storage.data());
    const int cols = c.pe == PeLayout::padded ? 3 : 2;
    for (std::int64_t r = 0; r < pe_rows; ++r) {
      std::int64_t p = 0;
      for (int axis_dim : axes) {
        const int position = pos(rng.engine());
        for (int i = 0; i < axis_dim / 2; ++i, ++p) {
          const double phi = position * std::pow(theta, -2.0 * i / axis_dim);
          in->angles[std::size_t(r * (D / 2) + p)] = phi;
          float* m = pe + (r * (D / 2) + p) * 2 * cols;  // [[cos, -sin], [sin, cos]]
          m[0] = float(std::cos(phi)), m[1] = float(-std::sin(phi));
          m[cols] = float(std::sin(phi)), m[cols + 1] = float(std::cos(phi));
        }
      }
    }
    if (c.pe == PeLayout::batched) {
      const std::int64_t s[] = {L * D * 2, D * 2, 4, 2, 1};
      const std::int64_t sh[] = {N, L, D / 2, 2, 2};
      in->pe = TensorView(pe, DType::f32, sh, s);
    } else {
      const std::int64_t s[] = {D * 2 * cols / 2, 2 * cols, cols, 1};
      const std::int64_t sh[] = {L, D / 2, 2, 2};
      in->pe = TensorView(pe, DType::f32, sh, s);
    }
  }
  if (c.norm) {
    fill_uniform(in->w_storage.data(), c.weight, std::size_t(D), rng, 0.5f, 1.5f);
    in->weight = TensorView(in->w_storage.data(), c.weight, {D});
  }
  return in;
}

// The closed form, in f64: normalize, then rotate each pair (x0 + i x1) by e^{i phi}.
std::vector<double> closed_form(const Case& c, const Inputs& in, float eps) {
  const auto N = c.N, L = c.L, H = c.H, D = c.D;
  std::vector<double> out(std::size_t(N * H * L * D));
  std::vector<double> row(static_cast<std::size_t>(D));
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t l = 0; l < L; ++l) {
      for (std::int64_t h = 0; h < H; ++h) {
        double sum_sq = 0;
        for (std::int64_t d = 0; d < D; ++d) {
          row[std::size_t(d)] = numeric::load_float(
              in.x.data(), c.x,
              n * in.x.stride(0) + l * in.x.stride(1) + h * in.x.stride(2) + d * in.x.stride(3));
          sum_sq += row[std::size_t(d)] * row[std::size_t(d)];
        }
        if (c.norm) {
          const double inv_rms = 1.0 / std::sqrt(sum_sq / double(D) + eps);
          for (std::int64_t d = 0; d < D; ++d) {
            row[std::size_t(d)] *= inv_rms * numeric::load_float(in.weight->data(), c.weight, d);
          }
        }
        double* dst = out.data() + ((n * H + h) * L + l) * D;
        for (std::int64_t p = 0; p < D / 2; ++p) {
          const double x0 = row[std::size_t(2 * p)], x1 = row[std::size_t(2 * p + 1)];
          if (c.pe == PeLayout::none) {
            dst[2 * p] = x0, dst[2 * p + 1] = x1;
            continue;
          }
          const std::int64_t r = c.pe == PeLayout::batched ? n * L + l : l;
          const double phi = in.angles[std::size_t(r * (D / 2) + p)];
          dst[2 * p] = x0 * std::cos(phi) - x1 * std::sin(phi);
          dst[2 * p + 1] = x0 * std::sin(phi) + x1 * std::cos(phi);
        }
      }
    }
  }
  return out;
}

// The seed's configurations and odd ones, each crossed with the dtype pairs and options.
std::vector<Case> shapes() {
  return {
      {1, 32, 4, 16}, {1, 128, 8, 64},   {1, 4352, 24, 128}, {2, 256, 24, 128}, {1, 1, 24, 128},
      {1, 7, 3, 64},  {1, 4609, 2, 128}, {3, 33, 5, 256},    {2, 17, 6, 2},     {1, 9, 4, 6},
  };
}

std::vector<Case> cases() {
  std::vector<Case> all;
  const DType floats[] = {DType::f32, DType::f16, DType::bf16};
  for (Case base : shapes()) {
    const bool large = base.N * base.L * base.H * base.D > 1'000'000;
    for (DType x : floats) {
      for (DType out : floats) {
        // Every dtype pair on small shapes; on large ones the pairs Flux uses.
        if (large && !(out == DType::bf16 && x != DType::f16)) continue;
        for (PeLayout pe : {PeLayout::shared, PeLayout::none}) {
          for (bool norm : {false, true}) {
            Case c = base;
            c.x = x, c.out = out, c.pe = pe, c.norm = norm;
            all.push_back(c);
          }
        }
      }
    }
  }
  // Layouts: the packed QKV view, heads-major memory, strided D, batched and padded pe.
  for (XLayout layout : {XLayout::packed_qkv, XLayout::heads_major, XLayout::strided_d}) {
    all.push_back({2, 256, 24, 128, DType::bf16, DType::bf16, PeLayout::shared, true, layout});
    all.push_back({3, 7, 5, 64, DType::f32, DType::bf16, PeLayout::batched, false, layout});
  }
  all.push_back({2, 65, 24, 128, DType::f32, DType::f32, PeLayout::padded, true});
  all.push_back({2, 65, 24, 128, DType::bf16, DType::f16, PeLayout::batched, true,
                 XLayout::packed_qkv, DType::f32});
  return all;
}

class RopeFlux : public ::testing::TestWithParam<Case> {};

TEST_P(RopeFlux, CpuMatchesClosedForm) {
  const Case& c = GetParam();
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const auto in = make_inputs(c, rng);
  const std::int64_t count = c.N * c.H * c.L * c.D;
  HostBuffer out(std::size_t(count) * dtype_size(c.out));
  RopeFluxOptions options;
  options.norm_weight = in->weight;
  options.eps = 1e-6f;
  rope_flux(in->x, in->pe, TensorView(out.data(), c.out, {c.N, c.H, c.L, c.D}), options);
  EXPECT_TRUE(out.guards_intact()) << "rope_flux wrote outside out";
  expect_close(to_floats(out.data(), c.out, std::size_t(count)), closed_form(c, *in, options.eps),
               c.out, c.name());
}

// Runs the case on the GPU (fused, or the unfused chain when `unfused`) and compares it with
// the CPU reference, both rounded to the output dtype.
void check_gpu(const Case& c, bool unfused) {
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const auto in = make_inputs(c, rng);
  const std::int64_t count = c.N * c.H * c.L * c.D;
  const std::size_t out_bytes = std::size_t(count) * dtype_size(c.out);

  RopeFluxOptions options;
  options.norm_weight = in->weight;
  HostBuffer expected(out_bytes);
  rope_flux(in->x, in->pe, TensorView(expected.data(), c.out, {c.N, c.H, c.L, c.D}), options);

  // Device copies with the same strides and offsets.
  DeviceBuffer x(in->x_storage.bytes()), pe(in->pe_storage.bytes()), w(in->w_storage.bytes()),
      out(out_bytes);
  x.upload(in->x_storage.data(), in->x_storage.bytes());
  const auto on_device = [](const TensorView& v, void* base, const void* host_base) {
    const auto offset = static_cast<const char*>(v.data()) - static_cast<const char*>(host_base);
    return TensorView(static_cast<char*>(base) + offset, v.dtype(), v.shape(), v.strides(),
                      Device::cuda(0));
  };
  std::optional<TensorView> pe_view, w_view;
  if (in->pe) {
    pe.upload(in->pe_storage.data(), in->pe_storage.bytes());
    pe_view = on_device(*in->pe, pe.data(), in->pe_storage.data());
  }
  if (in->weight) {
    w.upload(in->w_storage.data(), in->w_storage.bytes());
    w_view = on_device(*in->weight, w.data(), in->w_storage.data());
  }
  options.norm_weight = w_view;

  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  if (unfused) setenv("KILN_DISABLE", "rope_flux", 1);
  rope_flux(on_device(in->x, x.data(), in->x_storage.data()), pe_view,
            TensorView(out.data(), c.out, {c.N, c.H, c.L, c.D}, Device::cuda(0)), options, stream);
  if (unfused) unsetenv("KILN_DISABLE");
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);

  HostBuffer actual(out_bytes);
  out.download(actual.data(), out_bytes);
  EXPECT_TRUE(out.guards_intact()) << "rope_flux wrote outside out";
  const auto ref = to_floats(expected.data(), c.out, std::size_t(count));
  expect_close(to_floats(actual.data(), c.out, std::size_t(count)),
               std::vector<double>(ref.begin(), ref.end()), c.out, c.name(), 4.0);
}

TEST_P(RopeFlux, CudaMatchesCpu) {
  KILN_REQUIRE_GPU();
  check_gpu(GetParam(), false);
}

TEST_P(RopeFlux, CudaUnfusedMatchesCpu) {
  KILN_REQUIRE_GPU();
  const Case& c = GetParam();
  if (c.N * c.L * c.H * c.D > 1'000'000) GTEST_SKIP() << "unfused chain checked on small shapes";
  check_gpu(c, true);
}

INSTANTIATE_TEST_SUITE_P(Cases, RopeFlux, ::testing::ValuesIn(cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

// Byte offsets past 2^32: the second sequence of x starts 4.3 GB after the first.
TEST(RopeFluxLarge, OffsetsBeyond32Bits) {
  KILN_REQUIRE_GPU();
  Rng rng;
  constexpr std::int64_t N = 2, L = 5, H = 3, D = 64;
  constexpr std::int64_t kBatchStride = (std::int64_t(1) << 31) + 4096;  // elements of bf16
  const std::size_t row_bytes = std::size_t(L * H * D) * 2;
  HostBuffer host_x(row_bytes * N);
  fill_uniform(host_x.data(), DType::bf16, std::size_t(N * L * H * D), rng);
  DeviceBuffer x(std::size_t(kBatchStride) * 2 + row_bytes);
  x.upload(host_x.data(), row_bytes);
  x.upload(static_cast<char*>(host_x.data()) + row_bytes, row_bytes, std::size_t(kBatchStride) * 2);
  DeviceBuffer out(std::size_t(N * H * L * D) * 2);
  const std::int64_t shape[] = {N, L, H, D};
  const std::int64_t strides[] = {kBatchStride, H * D, D, 1};
  rope_flux(TensorView(x.data(), DType::bf16, shape, strides, Device::cuda(0)), std::nullopt,
            TensorView(out.data(), DType::bf16, {N, H, L, D}, Device::cuda(0)));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  HostBuffer expected(std::size_t(N * H * L * D) * 2), actual(std::size_t(N * H * L * D) * 2);
  rope_flux(TensorView(host_x.data(), DType::bf16, {N, L, H, D}), std::nullopt,
            TensorView(expected.data(), DType::bf16, {N, H, L, D}));
  out.download(actual.data(), actual.bytes());
  EXPECT_TRUE(out.guards_intact());
  const auto ref = to_floats(expected.data(), DType::bf16, std::size_t(N * H * L * D));
  expect_close(to_floats(actual.data(), DType::bf16, ref.size()),
               std::vector<double>(ref.begin(), ref.end()), DType::bf16, "offsets > 2^32");
}

// The specialization is compiled once and then served from the memory cache.
TEST(RopeFluxJit, SecondCallHitsMemoryCache) {
  KILN_REQUIRE_GPU();
  Rng rng;
  constexpr std::int64_t N = 1, L = 3, H = 2, D = 32;
  DeviceBuffer x(N * L * H * D * 4), out(N * L * H * D * 4);
  HostBuffer host(N * L * H * D * 4);
  fill_uniform(host.data(), DType::f32, N * L * H * D, rng);
  x.upload(host.data(), host.bytes());
  const TensorView xv(x.data(), DType::f32, {N, L, H, D}, Device::cuda(0));
  const TensorView ov(out.data(), DType::f32, {N, H, L, D}, Device::cuda(0));
  rope_flux(xv, std::nullopt, ov);
  const jit::Stats before = jit::stats();
  rope_flux(xv, std::nullopt, ov);
  const jit::Stats after = jit::stats();
  EXPECT_EQ(after.compiles, before.compiles);
  EXPECT_EQ(after.memory_hits, before.memory_hits + 1);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

// Argument checks: each names the op, the argument, what was expected and what came.
class RopeFluxErrors : public ::testing::Test {
 protected:
  std::vector<float> x_ = std::vector<float>(2 * 4 * 3 * 8, 1.f);
  std::vector<float> pe_ = std::vector<float>(4 * 4 * 4, 1.f);
  std::vector<float> out_ = std::vector<float>(2 * 3 * 4 * 8, 0.f);
  TensorView x() { return TensorView(x_.data(), DType::f32, {2, 4, 3, 8}); }
  TensorView pe() { return TensorView(pe_.data(), DType::f32, {4, 4, 2, 2}); }
  TensorView out() { return TensorView(out_.data(), DType::f32, {2, 3, 4, 8}); }

  static void expect_error(const std::function<void()>& call, ErrorCode code,
                           const std::vector<std::string>& fragments) {
    test::expect_error("kiln::rope_flux", call, code, fragments);
  }
};

TEST_F(RopeFluxErrors, OddHeadDim) {
  std::vector<float> odd(2 * 4 * 3 * 7);
  std::vector<float> o(2 * 3 * 4 * 7);
  expect_error(
      [&] {
        rope_flux(TensorView(odd.data(), DType::f32, {2, 4, 3, 7}), std::nullopt,
                  TensorView(o.data(), DType::f32, {2, 3, 4, 7}));
      },
      ErrorCode::invalid_argument, {"x", "D = 7", "even"});
}

TEST_F(RopeFluxErrors, PeShape) {
  std::vector<float> small(3 * 4 * 4);
  expect_error(
      [&] {
        rope_flux(x(), TensorView(small.data(), DType::f32, {3, 4, 2, 2}), out());
      },
      ErrorCode::invalid_argument, {"pe", "[3, 4, 2, 2]", "[4, 4, 2, 2]"});
}

TEST_F(RopeFluxErrors, PeDtype) {
  expect_error(
      [&] {
        rope_flux(x(), TensorView(pe_.data(), DType::bf16, {4, 4, 2, 2}), out());
      },
      ErrorCode::invalid_argument, {"pe", "bf16", "f32"});
}

TEST_F(RopeFluxErrors, OutShape) {
  expect_error(
      [&] {
        rope_flux(x(), pe(), TensorView(out_.data(), DType::f32, {2, 4, 3, 8}));
      },
      ErrorCode::invalid_argument, {"out", "[2, 4, 3, 8]", "[2, 3, 4, 8]"});
}

TEST_F(RopeFluxErrors, OutDtype) {
  expect_error(
      [&] {
        rope_flux(x(), pe(), TensorView(out_.data(), DType::i32, {2, 3, 4, 8}));
      },
      ErrorCode::invalid_argument, {"out", "i32"});
}

TEST_F(RopeFluxErrors, OutNotContiguous) {
  const std::int64_t shape[] = {2, 3, 4, 8};
  const std::int64_t strides[] = {100, 32, 8, 1};  // a gap between the two sequences
  std::vector<float> big(256);
  expect_error([&] { rope_flux(x(), pe(), TensorView(big.data(), DType::f32, shape, strides)); },
               ErrorCode::invalid_argument, {"out", "contiguous"});
}

TEST_F(RopeFluxErrors, OutOverlapsX) {
  expect_error(
      [&] {
        rope_flux(x(), pe(), TensorView(x_.data(), DType::f32, {2, 3, 4, 8}));
      },
      ErrorCode::invalid_argument, {"out", "overlaps", "x"});
}

TEST_F(RopeFluxErrors, NormWeightShape) {
  std::vector<float> w(7);
  RopeFluxOptions options;
  options.norm_weight = TensorView(w.data(), DType::f32, {7});
  expect_error([&] { rope_flux(x(), pe(), out(), options); }, ErrorCode::invalid_argument,
               {"norm_weight", "[7]", "[8]"});
}

TEST_F(RopeFluxErrors, MixedDevices) {
  expect_error(
      [&] {
        rope_flux(x(), pe(), TensorView(out_.data(), DType::f32, {2, 3, 4, 8}, Device::cuda(0)));
      },
      ErrorCode::invalid_argument, {"out", "cuda:0", "cpu"});
}

TEST_F(RopeFluxErrors, UntouchedOutputOnError) {
  std::vector<float> small(3 * 4 * 4);
  EXPECT_THROW(rope_flux(x(), TensorView(small.data(), DType::f32, {3, 4, 2, 2}), out()), Error);
  for (float v : out_) EXPECT_EQ(v, 0.f);
}

TEST(RopeFluxNoGpu, CudaTensorsWithoutDeviceSayNoCudaDevice) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  std::vector<float> buf(8);
  try {
    rope_flux(TensorView(buf.data(), DType::f32, {1, 1, 1, 2}, Device::cuda(0)), std::nullopt,
              TensorView(buf.data() + 4, DType::f32, {1, 1, 1, 2}, Device::cuda(0)));
    ADD_FAILURE() << "no kiln::Error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln::test
