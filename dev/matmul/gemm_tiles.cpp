// Tile plans of the mma.sync GEMM (kernels/gemm.cuh; NOTES.md "GEMM tiles"): the kernel with each
// CTA tile of --tiles (BMxBN:WARPS_MxWARPS_N:STAGES) on an e4m3fn weight with per-channel scales,
// bf16 a and out, next to the launcher's default tile (default_tile in launch_gemm.cpp) and to
// what kiln::matmul(path = gemm) runs on this device (on sm_90a the wgmma GEMM, gemm_sm90.cuh).
// Every plan's output is checked against kiln's CPU reference on 8 rows of a (the first, the
// last, tile edges and random ones) before it is timed; times are timing.py's method (median of
// CUDA-event-timed calls after warm-up, each queued behind a gate, inputs rotated past the L2).
//
//   cmake -S . -B build/dev -G Ninja -DKILN_BUILD_DEV=ON
//   cmake --build build/dev --target dev_matmul_gemm_tiles
//   build/dev/dev/dev_matmul_gemm_tiles                        # 4608x3072x9216, 512x4096x4096
//   build/dev/dev/dev_matmul_gemm_tiles --full                 # NOTES' eleven shapes
//   build/dev/dev/dev_matmul_gemm_tiles --shapes 128x4096x14336 --tiles 64x128:2x4:4
#include <algorithm>
#include <cstdio>
#include <exception>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/gemm.hpp"
#include "ops/matmul/matmul.hpp"

namespace {

using kiln::DType;
using kiln::TensorView;
using namespace kiln::dev;
namespace md = kiln::matmul_detail;

constexpr const char* kHarness = "dev_matmul_gemm_tiles";
constexpr int kCheckRows = 8;
// Products exact in the mma type, f32 sums in another order than the f64 reference, both
// rounded once to bf16: a few rows of outputs one bf16 ulp apart.
constexpr double kBound = 0x1p-7;

struct Shape {
  std::int64_t m, k, n;
};

Shape parse_shape(const std::string& text) {
  Shape s{};
  if (std::sscanf(text.c_str(), "%ldx%ldx%ld", &s.m, &s.k, &s.n) != 3) {
    throw std::invalid_argument("shape '" + text + "', expected MxKxN");
  }
  return s;
}

md::GemmTile parse_tile(const std::string& text) {
  md::GemmTile t;
  if (std::sscanf(text.c_str(), "%dx%d:%dx%d:%d", &t.bm, &t.bn, &t.warps_m, &t.warps_n,
                  &t.stages) != 5) {
    throw std::invalid_argument("tile '" + text + "', expected BMxBN:WARPS_MxWARPS_N:STAGES");
  }
  return t;
}

std::string tile_name(const md::GemmTile& t) {
  return std::to_string(t.bm) + "x" + std::to_string(t.bn) + ":" + std::to_string(t.warps_m) + "x" +
         std::to_string(t.warps_n) + ":" + std::to_string(t.stages);
}

void run_shape(const Shape& s, const std::vector<md::GemmTile>& tiles, const Args& args, Rng& rng,
               Results& results) {
  const std::string shape =
      std::to_string(s.m) + "x" + std::to_string(s.k) + "x" + std::to_string(s.n);
  // e4m3fn weight codes of normal values, per-channel scales around 1/64, bf16 a.
  std::vector<std::uint8_t> w_host(std::size_t(s.n * s.k));
  std::normal_distribution<float> normal(0.f, 64.f);
  for (auto& code : w_host) code = md::float_to_fp8(normal(rng.engine()), DType::f8_e4m3fn);
  std::vector<std::uint8_t> scale_host(std::size_t(s.n) * sizeof(float));
  std::uniform_real_distribution<float> uniform(0.5f / 64, 1.5f / 64);
  for (std::int64_t i = 0; i < s.n; ++i) {
    reinterpret_cast<float*>(scale_host.data())[i] = uniform(rng.engine());
  }
  const auto a_host = random_host(DType::bf16, std::size_t(s.m * s.k), rng);

  // The CPU reference on kCheckRows rows of a: the first and last, both sides of a 128-row tile
  // edge, and random ones.
  std::set<std::int64_t> picked = {0, s.m - 1, std::min<std::int64_t>(127, s.m - 1),
                                   std::min<std::int64_t>(128, s.m - 1)};
  std::uniform_int_distribution<std::int64_t> any_row(0, s.m - 1);
  while (picked.size() < std::size_t(std::min<std::int64_t>(kCheckRows, s.m))) {
    picked.insert(any_row(rng.engine()));
  }
  const std::vector<std::int64_t> rows(picked.begin(), picked.end());
  const std::int64_t r = std::int64_t(rows.size());
  std::vector<std::uint8_t> a_rows(std::size_t(r * s.k) * 2);
  for (std::int64_t i = 0; i < r; ++i) {
    std::copy_n(a_host.begin() + rows[i] * s.k * 2, s.k * 2, a_rows.begin() + i * s.k * 2);
  }
  std::vector<std::uint8_t> want(std::size_t(r * s.n) * 2);
  kiln::Weight cpu_w{TensorView(w_host.data(), DType::f8_e4m3fn, {s.n, s.k}),
                     kiln::WeightFormat::f8_e4m3fn, s.n, s.k,
                     TensorView(scale_host.data(), DType::f32, {s.n})};
  kiln::matmul(TensorView(a_rows.data(), DType::bf16, {r, s.k}), cpu_w,
               TensorView(want.data(), DType::bf16, {r, s.n}));

  const std::size_t set_bytes = w_host.size() + a_host.size() + std::size_t(s.m * s.n) * 2;
  const int sets = rotation_count(set_bytes);
  std::vector<DeviceBuffer> w, a, out;
  for (int i = 0; i < sets; ++i) {
    w.emplace_back(w_host);
    a.emplace_back(a_host);
    out.emplace_back(std::size_t(s.m * s.n) * 2);
  }
  const DeviceBuffer scale(scale_host);
  const double flops = 2.0 * double(s.m) * double(s.n) * double(s.k);
  const auto check = [&](int set) {
    const auto got = out[std::size_t(set)].download();
    std::vector<std::uint8_t> got_rows(want.size());
    for (std::int64_t i = 0; i < r; ++i) {
      std::copy_n(got.begin() + rows[i] * s.n * 2, s.n * 2, got_rows.begin() + i * s.n * 2);
    }
    return relative_error(got_rows.data(), DType::bf16, want.data(), DType::bf16,
                          std::size_t(r * s.n));
  };
  const auto report = [&](const std::string& config, double err, double ms) {
    results.add({{"shape", shape},
                 {"config", config},
                 {"ms", fixed(ms, 4)},
                 {"TFLOP/s", fixed(flops / ms / 1e9, 1)},
                 {"rel_err", fixed(err, 6)}},
                {"shape", "config", "ms", "TFLOP/s", "rel_err"});
  };
  const auto timed = [&](const std::function<void(int)>& call, const std::string& config) {
    out[0].poison();
    call(0);
    const double err = check(0);
    if (!(err <= kBound)) {
      std::printf("%s %s: relative error %.3g against the CPU reference, bound %.3g\n",
                  shape.c_str(), config.c_str(), err, kBound);
      throw std::runtime_error("a plan disagrees with the CPU reference");
    }
    report(config, err, median_ms(sets, call, args.get_int("warmup"), args.get_int("reps")));
  };

  // The problem as the launcher hands it to a path.
  const auto problem = [&](int i) {
    md::MatmulProblem p;
    p.m = s.m, p.n = s.n, p.k = s.k;
    p.a = a[i].data(), p.a_dtype = DType::bf16, p.a_row_stride = s.k;
    p.w = w[i].data(), p.w_format = kiln::WeightFormat::f8_e4m3fn;
    p.w_row_bytes = s.k;
    p.w_scale = static_cast<const float*>(scale.data());
    p.w_scale_kind = md::ScaleKind::row;
    p.out = out[i].data(), p.out_dtype = DType::bf16;
    p.device = 0, p.arch = kiln::cuda_arch(0);
    return p;
  };

  // What path = gemm runs on this device (the wgmma GEMM on sm_90a).
  timed(
      [&](int i) {
        kiln::Weight weight{
            TensorView(w[i].data(), DType::f8_e4m3fn, {s.n, s.k}, kiln::Device::cuda(0)),
            kiln::WeightFormat::f8_e4m3fn, s.n, s.k,
            TensorView(scale.data(), DType::f32, {s.n}, kiln::Device::cuda(0))};
        kiln::MatmulOptions options;
        options.path = kiln::MatmulPath::gemm;
        kiln::matmul(
            TensorView(a[i].data(), DType::bf16, {s.m, s.k}, kiln::Device::cuda(0)), weight,
            TensorView(out[i].data(), DType::bf16, {s.m, s.n}, kiln::Device::cuda(0)), options);
      },
      md::gemm_sm90_unsupported(problem(0)).empty() ? "path=gemm (wgmma)" : "path=gemm (mma.sync)");

  // The mma.sync kernel with each tile, launched directly.
  const md::GemmTile launcher = md::plan_gemm(problem(0)).tile;
  std::vector<md::GemmTile> all = {launcher};
  for (const auto& t : tiles) {
    if (!(t == launcher)) all.push_back(t);
  }
  for (const auto& tile : all) {
    const std::string config =
        "mma.sync " + tile_name(tile) + (tile == launcher ? " (default_tile)" : "");
    try {
      timed([&](int i) { md::launch_gemm_plan(problem(i), md::plan_gemm(problem(i), tile)); },
            config);
    } catch (const kiln::Error& error) {  // a tile outside the kernel's limits
      not_run(shape + " " + config, error);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args args(
      "dev_matmul_gemm_tiles: the mma.sync GEMM with each CTA tile (e4m3fn weight, per-channel\n"
      "scales, bf16 a and out), checked against the CPU reference and timed (timing.py's "
      "method).\n"
      "NOTES.md 'GEMM tiles'.\n"
      "  build/dev/dev/dev_matmul_gemm_tiles [--full] [--shapes MxKxN,...] [--tiles ...]");
  args.option("shapes", "4608x3072x9216,512x4096x4096", "M x K x N of each problem");
  args.option("tiles", "128x128:2x2:4,128x128:1x4:4,128x256:1x8:4,64x128:2x4:4",
              "CTA tiles BMxBN:WARPS_MxWARPS_N:STAGES (the launcher's default is always run)");
  args.flag("full", "NOTES' eleven shapes and six tiles");
  add_common_options(args);
  std::vector<Shape> shapes;
  std::vector<md::GemmTile> tiles;
  const auto prepare = [&] {
    std::vector<std::string> shape_texts = args.list("shapes");
    std::vector<std::string> tile_texts = args.list("tiles");
    if (args.has("full")) {
      shape_texts = {"4608x3072x9216", "4608x3072x3072", "4608x3072x18432", "4608x9216x3072",
                     "128x4096x4096",  "128x4096x14336", "128x14336x4096",  "512x4096x4096",
                     "512x4096x14336", "2048x4096x4096", "4096x3072x12288"};
      tile_texts = {"128x128:2x2:4", "128x128:2x4:4", "128x128:1x4:4",
                    "256x128:4x2:4", "128x256:1x8:4", "64x128:2x4:4"};
    }
    for (const auto& text : shape_texts) shapes.push_back(parse_shape(text));
    for (const auto& text : tile_texts) tiles.push_back(parse_tile(text));
  };
  return run_harness(kHarness, args, argc, argv, prepare, [&](Rng& rng, Results& results) {
    for (const Shape& s : shapes) run_shape(s, tiles, args, rng, results);
  });
}
