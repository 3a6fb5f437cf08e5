// The conv2d paths on the Flux VAE decoder's convolutions (NOTES.md): for each shape and memory
// format, what kiln::conv2d runs ("auto": on sm_90a the TMA im2col + wgmma kernel, with a
// channels-last copy of an NCHW x or a 1x1 read in place; the direct kernel for NCHW x with few
// output channels; else the mma.sync implicit GEMM), the mma.sync implicit GEMM with each CTA tile
// of --tiles (BMxBNxBK:WARPS_MxWARPS_N:STAGES; choose_tile's is always run) and the direct kernel
// where it applies. bf16 x, w, bias and out, batch 1, padding K/2, out in x's format. Every
// path's output on a small problem of the same channels, window and format (5 x 24 pixels) is
// checked against kiln's CPU reference before it is timed; times are timing.py's method (median
// of CUDA-event-timed calls after warm-up, each queued behind a gate, inputs rotated past the L2).
//
//   cmake -S . -B build/dev -G Ninja -DKILN_BUILD_DEV=ON
//   cmake --build build/dev --target dev_conv2d_paths
//   build/dev/dev/dev_conv2d_paths                   # 512@256, 128@1024, conv_out; both formats
//   build/dev/dev/dev_conv2d_paths --full            # every decoder shape, the v1 tile sweep
//   build/dev/dev/dev_conv2d_paths --shapes 512@128 --layouts nhwc --tiles 128x128x32:2x2:3
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "core/cuda.hpp"
#include "kiln/conv2d.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "ops/conv2d/conv2d.hpp"

namespace {

using kiln::DType;
using kiln::TensorView;
using namespace kiln::dev;
namespace cd = kiln::conv2d_detail;

constexpr const char* kHarness = "dev_conv2d_paths";
// f32 sums in another order than the f64 reference, both rounded once to bf16.
constexpr double kBound = 0x1p-7;
constexpr std::int64_t kCheckH = 5, kCheckW = 24;

struct Shape {
  const char* name;
  std::int64_t c, oc, size, k;
};

// The Flux VAE decoder at 1024^2 output, as kiln bench conv2d runs it.
const Shape kShapes[] = {
    {"conv_in", 16, 512, 128, 3},
    {"512@128", 512, 512, 128, 3},
    {"512@256", 512, 512, 256, 3},
    {"512@512up", 512, 512, 512, 3},
    {"512-256@512", 512, 256, 512, 3},
    {"256@512", 256, 256, 512, 3},
    {"1x1-512-256@512", 512, 256, 512, 1},
    {"256@1024up", 256, 256, 1024, 3},
    {"256-128@1024", 256, 128, 1024, 3},
    {"128@1024", 128, 128, 1024, 3},
    {"1x1-256-128@1024", 256, 128, 1024, 1},
    {"conv_out", 128, 3, 1024, 3},
};

cd::TileConfig parse_tile(const std::string& text) {
  cd::TileConfig t;
  if (std::sscanf(text.c_str(), "%dx%dx%d:%dx%d:%d", &t.bm, &t.bn, &t.bk, &t.warps_m, &t.warps_n,
                  &t.stages) != 6) {
    throw std::invalid_argument("tile '" + text + "', expected BMxBNxBK:WARPS_MxWARPS_N:STAGES");
  }
  return t;
}

std::string tile_name(const cd::TileConfig& t) {
  return std::to_string(t.bm) + "x" + std::to_string(t.bn) + "x" + std::to_string(t.bk) + ":" +
         std::to_string(t.warps_m) + "x" + std::to_string(t.warps_n) + ":" +
         std::to_string(t.stages);
}

bool same_tile(const cd::TileConfig& a, const cd::TileConfig& b) {
  return a.bm == b.bm && a.bn == b.bn && a.bk == b.bk && a.warps_m == b.warps_m &&
         a.warps_n == b.warps_n && a.stages == b.stages;
}

// x, w and out of one problem in one memory format, on the host or the device.
struct Views {
  TensorView x, w, out;
  std::optional<TensorView> bias;
};

Views views(const Shape& s, std::int64_t h, std::int64_t w, bool nhwc, void* x, void* weight,
            void* bias, void* out, kiln::Device device) {
  const std::int64_t c = s.c, oc = s.oc, k = s.k;
  const auto strides = [&](std::int64_t n_c, std::int64_t n_h, std::int64_t n_w) {
    return nhwc ? std::vector<std::int64_t>{n_h * n_w * n_c, 1, n_w * n_c, n_c}
                : std::vector<std::int64_t>{n_c * n_h * n_w, n_h * n_w, n_w, 1};
  };
  const std::int64_t x_shape[4] = {1, c, h, w};
  const std::int64_t w_shape[4] = {oc, c, k, k};
  const std::int64_t out_shape[4] = {1, oc, h, w};  // padding K / 2, stride 1
  const auto xs = strides(c, h, w), ws = strides(c, k, k), os = strides(oc, h, w);
  return {TensorView(x, DType::bf16, x_shape, xs, device),
          TensorView(weight, DType::bf16, w_shape, ws, device),
          TensorView(out, DType::bf16, out_shape, os, device),
          TensorView(bias, DType::bf16, {oc}, device)};
}

kiln::Conv2dOptions options_of(const Shape& s) {
  kiln::Conv2dOptions o;
  o.padding = {s.k / 2, s.k / 2};
  return o;
}

// What kiln::conv2d runs for these CUDA views (the dispatch order of launch.cpp's conv2d).
std::string auto_path(const cd::Problem& p, const Views& v) {
  if (const auto layout = cd::sm90_layout(p, v.x, v.w, v.out)) {
    return std::string("auto: sm90") + (layout->a_mn_major ? " (1x1 in place)"
                                        : layout->x_copy   ? " (x copy)"
                                                           : "");
  }
  if (cd::direct_takes(p, p.C > 1 && v.x.stride(1) == 1)) return "auto: direct";
  return "auto: mma.sync";
}

// A path of the harness: runs on views of one problem.
using Path = std::function<void(const cd::Problem&, const Views&)>;

void run_shape(const Shape& s, bool nhwc, const std::vector<cd::TileConfig>& tiles,
               const std::vector<std::string>& paths, const Args& args, Rng& rng,
               Results& results) {
  const std::string layout = nhwc ? "nhwc" : "nchw";
  const auto wants = [&](const std::string& path) {
    return std::find(paths.begin(), paths.end(), path) != paths.end();
  };
  const auto w_host = random_host(DType::bf16, std::size_t(s.oc * s.c * s.k * s.k), rng, 0.f,
                                  float(1.0 / std::sqrt(double(s.c * s.k * s.k))));
  const auto bias_host = random_host(DType::bf16, std::size_t(s.oc), rng);
  const DeviceBuffer weight(w_host), bias(bias_host);
  const int sms = kiln::cuda::sm_count("conv2d", 0);

  // The check problem and its CPU reference.
  const auto xc_host = random_host(DType::bf16, std::size_t(s.c * kCheckH * kCheckW), rng);
  const std::size_t check_out = std::size_t(s.oc * kCheckH * kCheckW);
  std::vector<std::uint8_t> want(check_out * 2);
  const Views cpu =
      views(s, kCheckH, kCheckW, nhwc, const_cast<std::uint8_t*>(xc_host.data()),
            const_cast<std::uint8_t*>(w_host.data()), const_cast<std::uint8_t*>(bias_host.data()),
            want.data(), kiln::Device::cpu());
  kiln::conv2d(cpu.x, cpu.w, cpu.bias, cpu.out, options_of(s));
  const DeviceBuffer xc(xc_host);
  DeviceBuffer outc(check_out * 2);
  const Views check_views = views(s, kCheckH, kCheckW, nhwc, xc.data(), weight.data(), bias.data(),
                                  outc.data(), kiln::Device::cuda(0));
  const cd::Problem check_problem = cd::problem_of(check_views.x, check_views.w, options_of(s));

  // The timed problem, in rotated sets.
  const std::size_t x_count = std::size_t(s.c * s.size * s.size);
  const std::size_t out_count = std::size_t(s.oc * s.size * s.size);
  const auto x_host = random_host(DType::bf16, x_count, rng);
  const int sets = rotation_count((x_count + out_count) * 2 + w_host.size());
  std::vector<DeviceBuffer> x, out;
  std::vector<Views> timed_views;
  for (int i = 0; i < sets; ++i) {
    x.emplace_back(x_host);
    out.emplace_back(out_count * 2);
    timed_views.push_back(views(s, s.size, s.size, nhwc, x.back().data(), weight.data(),
                                bias.data(), out.back().data(), kiln::Device::cuda(0)));
  }
  const cd::Problem problem = cd::problem_of(timed_views[0].x, timed_views[0].w, options_of(s));
  const double flops = 2.0 * double(s.oc * s.c * s.k * s.k) * double(s.size * s.size);

  const auto run = [&](const std::string& config, const Path& path) {
    outc.poison();
    path(check_problem, check_views);
    const auto got = outc.download();
    const double err = relative_error(got.data(), DType::bf16, want.data(), DType::bf16, check_out);
    if (!(err <= kBound)) {
      std::printf("%s %s %s: relative error %.3g against the CPU reference, bound %.3g\n", s.name,
                  layout.c_str(), config.c_str(), err, kBound);
      throw std::runtime_error("a path disagrees with the CPU reference");
    }
    const double ms = median_ms(
        sets, [&](int i) { path(problem, timed_views[std::size_t(i)]); }, args.get_int("warmup"),
        args.get_int("reps"));
    results.add({{"shape", s.name},
                 {"layout", layout},
                 {"config", config},
                 {"ms", fixed(ms, 4)},
                 {"TFLOP/s", fixed(flops / ms / 1e9, 1)},
                 {"rel_err", fixed(err, 6)}},
                {"shape", "layout", "config", "ms", "TFLOP/s", "rel_err"});
  };

  if (wants("auto")) {
    run(auto_path(problem, timed_views[0]), [&](const cd::Problem&, const Views& v) {
      kiln::conv2d(v.x, v.w, v.bias, v.out, options_of(s));
    });
  }
  if (wants("direct")) {
    if (cd::direct_takes(problem, nhwc && s.c > 1)) {
      run("direct", [&](const cd::Problem& p, const Views& v) {
        cd::launch_direct(p, v.x, v.w, v.bias, v.out, nullptr);
      });
    } else {
      std::printf("%s %s direct: does not apply (x channels-last, or OC > 16)\n", s.name,
                  layout.c_str());
    }
  }
  if (!wants("mma")) return;
  const cd::TileConfig chosen = cd::choose_tile(problem, sms);
  std::vector<cd::TileConfig> all = {chosen};
  for (const auto& t : tiles) {
    if (!same_tile(t, chosen)) all.push_back(t);
  }
  for (const auto& tile : all) {
    const std::string config =
        "mma.sync " + tile_name(tile) + (same_tile(tile, chosen) ? " (choose_tile)" : "");
    try {
      run(config, [&](const cd::Problem& p, const Views& v) {
        cd::launch(cd::make_plan(p, v.x, v.w, v.bias, v.out, tile), p, v.x, v.w, v.bias, v.out,
                   nullptr);
      });
    } catch (const kiln::Error& error) {  // a tile outside the kernel's limits
      not_run(std::string(s.name) + " " + layout + " " + config, error);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args args(
      "dev_conv2d_paths: the conv2d paths (auto, mma.sync with each tile, direct) on the Flux VAE\n"
      "decoder's convolutions, checked against the CPU reference and timed (timing.py's "
      "method).\n"
      "  build/dev/dev/dev_conv2d_paths [--full] [--shapes NAME,...] [--layouts nhwc,nchw]");
  std::string names;
  for (const Shape& s : kShapes) names += std::string(names.empty() ? "" : ", ") + s.name;
  args.option("shapes", "512@256,128@1024,conv_out", "shapes by name: " + names);
  args.option("layouts", "nhwc,nchw", "memory formats of x, w and out");
  args.option("paths", "auto,mma,direct", "paths to time: auto, mma, direct");
  args.option("tiles", "", "mma.sync tiles BMxBNxBK:WARPS_MxWARPS_N:STAGES besides choose_tile's");
  args.flag("full", "every decoder shape and the v1 tile sweep's seven tiles");
  add_common_options(args);
  std::vector<const Shape*> shapes;
  std::vector<cd::TileConfig> tiles;
  std::vector<std::string> layouts, paths;
  const auto prepare = [&] {
    std::vector<std::string> shape_names = args.list("shapes");
    std::vector<std::string> tile_texts = args.list("tiles");
    if (args.has("full")) {
      shape_names.clear();
      for (const Shape& s : kShapes) shape_names.push_back(s.name);
      tile_texts = {"128x128x32:2x2:4", "128x128x32:2x2:3", "128x128x64:2x2:3", "128x256x32:2x4:4",
                    "256x128x32:4x2:4", "64x128x32:1x2:4",  "128x64x32:2x2:4"};
    }
    for (const std::string& name : shape_names) {
      const Shape* found = nullptr;
      for (const Shape& s : kShapes) {
        if (name == s.name) found = &s;
      }
      if (found == nullptr) throw std::invalid_argument("unknown shape '" + name + "'");
      shapes.push_back(found);
    }
    for (const std::string& text : tile_texts) tiles.push_back(parse_tile(text));
    layouts = args.list("layouts");
    for (const std::string& l : layouts) {
      if (l != "nhwc" && l != "nchw") throw std::invalid_argument("layout '" + l + "'");
    }
    paths = args.list("paths");
  };
  return run_harness(kHarness, args, argc, argv, prepare, [&](Rng& rng, Results& results) {
    for (const Shape* s : shapes) {
      for (const std::string& l : layouts) {
        run_shape(*s, l == "nhwc", tiles, paths, args, rng, results);
      }
    }
  });
}
