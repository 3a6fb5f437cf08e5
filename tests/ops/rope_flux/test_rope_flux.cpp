// rope_flux: the CPU reference against a closed form, the CUDA kernels (fused, and the unfused
// chain KILN_DISABLE selects) against the CPU reference, out as a row range of a larger buffer
// (its guard rows untouched) or from token-major memory, 64-bit offsets, the JIT cache, and the
// argument checks.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/jit.hpp"
#include "kiln/rope_flux.hpp"
#include "support/harness.hpp"

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

// How out is laid out in memory.
enum class OutLayout {
  contiguous,    // [N, H, L, D]
  row_range,     // rows [kFirstRow, kFirstRow + L) of a contiguous [N, H, L + kGuardRows, D]
  tokens_major,  // [N, L, H, D] memory viewed as [N, H, L, D]
};

// The row range's place in its buffer: poisoned guard rows before and after it in every (n, h).
constexpr std::int64_t kFirstRow = 3, kGuardRows = 5;

struct Case {
  std::int64_t N, L, H, D;
  DType x = DType::bf16;
  DType out = DType::bf16;
  PeLayout pe = PeLayout::shared;
  bool norm = false;
  XLayout layout = XLayout::contiguous;
  DType weight = DType::bf16;
  OutLayout out_layout = OutLayout::contiguous;

  std::string name() const {
    static const char* layouts[] = {"contiguous", "packed_qkv", "heads_major", "strided_d"};
    static const char* pes[] = {"none", "shared", "batched", "padded"};
    static const char* outs[] = {"", "_out_row_range", "_out_tokens_major"};
    return cat("N", N, "_L", L, "_H", H, "_D", D, "_", dtype_name(x), "_to_", dtype_name(out),
               "_pe_", pes[int(pe)], norm ? "_norm" : "", "_", layouts[int(layout)],
               outs[int(out_layout)]);
  }
  bool small() const { return N * L * H * D <= 1'000'000; }
};

// Flux's rotation angles: the head dim is split into axes (16/56/56 for Flux.1's D = 128), each
// rotating by position * theta^(-2i / axis_dim); positions are random token coordinates.
std::vector<int> axes_for(std::int64_t D) {
  if (D == 128) return {16, 56, 56};
  const int a = int(2 * ((3 * D / 8) / 2));
  return {int(D) - 2 * a, a, a};
}

double angle(std::int64_t D, const std::int32_t* positions, std::int64_t p) {
  const double theta = D == 128 ? 10000.0 : 2000.0;
  int axis = 0, first = 0;
  for (int axis_dim : axes_for(D)) {
    if (p < first + axis_dim / 2) {
      return positions[axis] * std::pow(theta, -2.0 * double(p - first) / axis_dim);
    }
    first += axis_dim / 2;
    ++axis;
  }
  return 0;
}

struct RopeFlux {
  using Case = test::Case;

  // x (a view of its parent in memory), pe ([L or N * L, D/2, 2, 2] rotation matrices, each from
  // the three token coordinates in `positions`), the norm weight and out [N, H, L, D].
  static void build(const Case& c, Tensors& t, Rng& rng) {
    const auto N = c.N, L = c.L, H = c.H, D = c.D;
    switch (c.layout) {
      case XLayout::contiguous:
        t.input("x", c.x, {N, L, H, D});
        break;
      case XLayout::packed_qkv:
        t.input("x", c.x, {N, L, H, D}, {L * 3 * H * D, 3 * H * D, D, 1}, H * D, N * L * 3 * H * D);
        break;
      case XLayout::heads_major:
        t.input("x", c.x, {N, L, H, D}, {H * L * D, D, L * D, 1});
        break;
      case XLayout::strided_d:
        t.input("x", c.x, {N, L, H, D}, {L * H * 2 * D, H * 2 * D, 2 * D, 2}, 0, N * L * H * 2 * D);
        break;
    }
    t.fill("x", rng);
    if (c.pe != PeLayout::none) {
      const std::int64_t rows = c.pe == PeLayout::batched ? N * L : L;
      const int cols = c.pe == PeLayout::padded ? 3 : 2;
      auto* positions =
          static_cast<std::int32_t*>(t.host("positions", DType::i32, {rows, 3}).data());
      std::uniform_int_distribution<int> pos(0, 4095);
      for (std::int64_t i = 0; i < rows * 3; ++i) positions[i] = pos(rng.engine());
      const TensorView pe =
          c.pe == PeLayout::batched
              ? t.input("pe", DType::f32, {N, L, D / 2, 2, 2}, {L * D * 2, D * 2, 4, 2, 1})
              : t.input("pe", DType::f32, {L, D / 2, 2, 2}, {D * cols, 2 * cols, cols, 1}, 0,
                        L * D * cols);
      auto* m = static_cast<float*>(pe.data());
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t p = 0; p < D / 2; ++p) {
          const double phi = angle(D, positions + 3 * r, p);
          float* e = m + (r * (D / 2) + p) * 2 * cols;  // [[cos, -sin], [sin, cos]]
          e[0] = float(std::cos(phi)), e[1] = float(-std::sin(phi));
          e[cols] = float(std::sin(phi)), e[cols + 1] = float(std::cos(phi));
        }
      }
    }
    if (c.norm) {
      t.input("weight", c.weight, {D});
      t.fill("weight", rng, 0.5f, 1.5f);
    }
    switch (c.out_layout) {
      case OutLayout::contiguous:
        t.output("out", c.out, {N, H, L, D});
        break;
      case OutLayout::row_range: {
        const std::int64_t rows = L + kGuardRows;
        t.output("out", c.out, {N, H, L, D}, {H * rows * D, rows * D, D, 1}, kFirstRow * D,
                 N * H * rows * D);
        break;
      }
      case OutLayout::tokens_major:
        t.output("out", c.out, {N, H, L, D}, {L * H * D, D, H * D, 1});
        break;
    }
  }

  static void run(const Case&, const Views& v, Stream stream) {
    RopeFluxOptions options;
    options.norm_weight = v.optional("weight");
    rope_flux(v["x"], v.optional("pe"), v["out"], options, stream);
  }

  // The CPU reference against the closed form in f64 (normalize, then rotate each pair
  // (x0 + i x1) by e^{i phi}); the CUDA kernels against the CPU reference.
  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    if (r.backend() == Backend::cuda) {
      return {{"out", values(r.cpu()["out"]), Tolerance::rounding(c.out, 4.0)}};
    }
    const std::vector<double> x = values(r.host()["x"]);  // [N, L, H, D]
    const auto w = r.host().optional("weight");
    const auto* positions = c.pe == PeLayout::none
                                ? nullptr
                                : static_cast<const std::int32_t*>(r.host()["positions"].data());
    std::vector<double> out(x.size());
    for (std::int64_t n = 0; n < c.N; ++n) {
      for (std::int64_t l = 0; l < c.L; ++l) {
        for (std::int64_t h = 0; h < c.H; ++h) {
          std::vector<double> row(&x[std::size_t(((n * c.L + l) * c.H + h) * c.D)],
                                  &x[std::size_t(((n * c.L + l) * c.H + h) * c.D)] + c.D);
          double sum_sq = 0;
          for (double v : row) sum_sq += v * v;
          const double inv_rms = 1.0 / std::sqrt(sum_sq / double(c.D) + RopeFluxOptions{}.eps);
          for (std::int64_t d = 0; c.norm && d < c.D; ++d) {
            row[std::size_t(d)] *= inv_rms * numeric::load_float(w->data(), c.weight, d);
          }
          double* dst = out.data() + ((n * c.H + h) * c.L + l) * c.D;
          for (std::int64_t p = 0; p < c.D / 2; ++p) {
            const double x0 = row[std::size_t(2 * p)], x1 = row[std::size_t(2 * p + 1)];
            const std::int64_t pe_row = c.pe == PeLayout::batched ? n * c.L + l : l;
            const double phi = positions ? angle(c.D, positions + 3 * pe_row, p) : 0.0;
            dst[2 * p] = x0 * std::cos(phi) - x1 * std::sin(phi);
            dst[2 * p + 1] = x0 * std::sin(phi) + x1 * std::cos(phi);
          }
        }
      }
    }
    return {{"out", out, Tolerance::rounding(c.out, 1.0)}};
  }

  // A row range: the buffer's rows outside it (in every (n, h)) keep their poison, byte for byte.
  static void also(const Case& c, CaseRun& r) {
    if (c.out_layout != OutLayout::row_range) return;
    const TensorView out = r.got()["out"];
    const std::int64_t rows = c.L + kGuardRows, row_bytes = c.D * std::int64_t(dtype_size(c.out));
    const auto* buffer = static_cast<const std::uint8_t*>(out.data()) - kFirstRow * row_bytes;
    std::int64_t written = 0;
    for (std::int64_t nh = 0; nh < c.N * c.H; ++nh) {
      for (std::int64_t l = 0; l < rows; ++l) {
        if (l >= kFirstRow && l < kFirstRow + c.L) continue;
        const std::uint8_t* row = buffer + (nh * rows + l) * row_bytes;
        written += std::count_if(row, row + row_bytes, [](std::uint8_t b) { return b != kPoison; });
      }
    }
    EXPECT_EQ(written, 0) << "bytes of the guard rows around out's row range were written";
  }
};

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
    for (DType x : floats) {
      for (DType out : floats) {
        // Every dtype pair on small shapes; on large ones the pairs Flux uses.
        if (!base.small() && !(out == DType::bf16 && x != DType::f16)) continue;
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
  // out as a row range of a larger buffer (the joint attention input) and from token-major
  // memory: the vector path (bf16, D = 128, norm and pe) and D = 10 in f32 (2-element vectors, and
  // the scalar path with strided x).
  for (OutLayout o : {OutLayout::row_range, OutLayout::tokens_major}) {
    for (std::int64_t N : {1, 3}) {
      all.push_back({N, 77, 24, 128, DType::bf16, DType::bf16, PeLayout::shared, true,
                     XLayout::contiguous, DType::bf16, o});
      all.push_back({N, 9, 3, 10, DType::f32, DType::f32, PeLayout::shared, N == 3,
                     XLayout::contiguous, DType::f32, o});
      all.push_back({N, 9, 3, 10, DType::f32, DType::f32, PeLayout::batched, true,
                     XLayout::strided_d, DType::f32, o});
    }
  }
  all.push_back({2, 65, 24, 128, DType::bf16, DType::f16, PeLayout::batched, true,
                 XLayout::packed_qkv, DType::f32});
  return all;
}

// The unfused chain is checked on the small shapes.
std::vector<Case> small_cases() {
  std::vector<Case> small;
  for (const Case& c : cases()) {
    if (c.small()) small.push_back(c);
  }
  return small;
}

KILN_CASES(RopeFlux, "RopeFlux", cases, .sanitize = true);
KILN_CASES(RopeFlux, "RopeFluxUnfused", small_cases, .backends = {Backend::cuda}, .sanitize = true,
           .env = {{"KILN_DISABLE", "rope_flux"}});

// Byte offsets past 2^32: the second sequence of x starts 4.3 GB after the first.
KILN_CUDA_TEST(RopeFluxLarge, OffsetsBeyond32Bits, true) {
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
  const auto view = [](HostBuffer& b) { return TensorView(b.data(), DType::bf16, {N, H, L, D}); };
  expect_match("offsets > 2^32", view(actual),
               {"out", values(view(expected)), Tolerance::rounding(DType::bf16, 1.0)});
}

// The specialization is compiled once and then served from the memory cache.
KILN_CUDA_TEST(RopeFluxJit, SecondCallHitsMemoryCache, true) {
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

// Small valid arguments; each error row breaks one.
struct Args {
  ArgArray x_{2 * 4 * 3 * 8, DType::f32, 1.f}, pe_{4 * 4 * 4, DType::f32, 1.f};
  ArgArray out_{2 * 3 * 4 * 8, DType::f32, 0.f}, other_{256, DType::f32, 0.f};
  TensorView x() { return x_({2, 4, 3, 8}); }
  TensorView pe() { return pe_({4, 4, 2, 2}); }
  TensorView out() { return out_({2, 3, 4, 8}); }
  bool untouched() const { return x_.unchanged() && out_.unchanged(); }
};

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("OddHeadDim", invalid, {"x", "D = 7", "even"}, [](Args& a) {
    rope_flux(a.other_({2, 4, 3, 7}), std::nullopt, a.out_({2, 3, 4, 7}));
  });
  t.add("PeShape", invalid, {"pe", "[3, 4, 2, 2]", "[4, 4, 2, 2]"}, [](Args& a) {
    rope_flux(a.x(), a.other_({3, 4, 2, 2}), a.out());
  });
  t.add("PeDtype", invalid, {"pe", "bf16", "f32"}, [](Args& a) {
    rope_flux(a.x(), a.pe_({4, 4, 2, 2}, DType::bf16), a.out());
  });
  t.add("OutShape", invalid, {"out", "[2, 4, 3, 8]", "[2, 3, 4, 8]"}, [](Args& a) {
    rope_flux(a.x(), a.pe(), a.out_({2, 4, 3, 8}));
  });
  t.add("OutDtype", invalid, {"out", "i32"}, [](Args& a) {
    rope_flux(a.x(), a.pe(), a.out_({2, 3, 4, 8}, DType::i32));
  });
  t.add("OutDStrided", invalid, {"out", "last dim contiguous"}, [](Args& a) {
    rope_flux(a.x(), a.pe(), a.other_({2, 3, 4, 8}, DType::f32, {100, 32, 8, 2}));
  });
  t.add("OutRowsOverlapByStrideZero", invalid, {"out", "do not overlap"}, [](Args& a) {
    rope_flux(a.x(), a.pe(), a.other_({2, 3, 4, 8}, DType::f32, {0, 32, 8, 1}));
  });
  t.add("OutRowsOverlapByShortStride", invalid, {"out", "do not overlap"}, [](Args& a) {
    // Rows (n, h, l) 6 elements apart, each 8 long.
    rope_flux(a.x(), a.pe(), a.other_({2, 3, 4, 8}, DType::f32, {72, 24, 6, 1}));
  });
  t.add("OutOverlapsX", invalid, {"out", "overlaps", "x"}, [](Args& a) {
    rope_flux(a.x(), a.pe(), a.x_({2, 3, 4, 8}));
  });
  t.add("NormWeightShape", invalid, {"norm_weight", "[7]", "[8]"}, [](Args& a) {
    RopeFluxOptions options;
    options.norm_weight = a.other_({7});
    rope_flux(a.x(), a.pe(), a.out(), options);
  });
  t.add("MixedDevices", invalid, {"out", "cuda:0", "cpu"}, [](Args& a) {
    rope_flux(a.x(), a.pe(), a.out_({2, 3, 4, 8}, DType::f32, {}, Device::cuda(0)));
  });
}

KILN_ERRORS(Args, "RopeFluxErrors", "kiln::rope_flux", errors);

TEST(RopeFluxNoGpu, CudaTensorsWithoutDeviceSayNoCudaDevice) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  std::vector<float> buf(8);
  expect_error("kiln::rope_flux",
               [&] {
                 rope_flux(TensorView(buf.data(), DType::f32, {1, 1, 1, 2}, Device::cuda(0)),
                           std::nullopt,
                           TensorView(buf.data() + 4, DType::f32, {1, 1, 1, 2}, Device::cuda(0)));
               },
               ErrorCode::unsupported, {"no CUDA device"});
}

}  // namespace
}  // namespace kiln::test
