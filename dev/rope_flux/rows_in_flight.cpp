// Rows in flight per block of the fused rope_flux kernel (launch.cpp's kRowsInFlight; NOTES.md
// "Rows in flight"): the kernel of the launcher's plan with R rows of a token in flight (each
// thread taking ceil(H / R) heads), for each R of --rows, on Flux's shapes (H 24, D 128, x the Q
// slice of a packed [1, L, 3, H, D] QKV, pe f32 [L, 64, 2, 2], bf16 out), next to kiln::rope_flux
// itself (the launcher's plan: the row marked "launcher"). Every variant's output is checked
// against kiln's CPU reference before it is timed; times are timing.py's method (median of
// CUDA-event-timed calls after warm-up, each queued behind a gate, inputs rotated past the L2).
//
//   cmake -S . -B build/dev -G Ninja -DKILN_BUILD_DEV=ON
//   cmake --build build/dev --target dev_rope_flux_rows_in_flight
//   build/dev/dev/dev_rope_flux_rows_in_flight            # L 4608, the sweep's four cases
//   build/dev/dev/dev_rope_flux_rows_in_flight --full     # L 1536, 4608, 13056; six cases
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <numbers>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "jit/kernel_cache.hpp"
#include "kiln/device.hpp"
#include "kiln/rope_flux.hpp"
#include "ops/rope_flux/kernels/params.cuh"
#include "ops/rope_flux/rope_flux.hpp"

namespace {

using kiln::DType;
using kiln::TensorView;
using namespace kiln::dev;

constexpr const char* kHarness = "dev_rope_flux_rows_in_flight";
constexpr std::int64_t kHeads = 24, kHeadDim = 128, kBatch = 1;
constexpr float kEps = 1e-6f;
// Both sides round an f32 result to bf16: one bf16 ulp (2^-8 relative) where they straddle a
// rounding boundary, as kiln bench rope bounds its peers.
constexpr double kBound = 0x1p-8;

struct Case {
  const char* name;
  DType x;
  bool pe;
  bool norm;
};

// The launcher's plan with `rows` rows in flight: plan_fused's arithmetic for kRowsInFlight.
kiln::rope_flux_detail::FusedPlan with_rows(kiln::rope_flux_detail::FusedPlan plan, int rows) {
  plan.hpt = int((kHeads + rows - 1) / rows);
  const int groups = int((kHeads + plan.hpt - 1) / plan.hpt);
  plan.head_groups = (groups * plan.lanes + 31) / 32 * 32 / plan.lanes;
  return plan;
}

// Launches the fused kernel of `plan` as launch.cpp's run_fused does (pe [L, D/2, 2, 2]): the
// parameters must follow run_fused's when RopeFluxParams changes.
void launch_fused(const kiln::rope_flux_detail::FusedPlan& plan, const TensorView& x,
                  const float* pe, const void* weight, void* out) {
  kiln::RopeFluxParams params{};
  params.x = x.data();
  params.pe = pe;
  params.norm_weight = weight;
  params.out = out;
  params.N = x.size(0);
  params.L = x.size(1);
  params.H = x.size(2);
  for (int d = 0; d < 4; ++d) params.x_stride[d] = x.stride(d);
  const long long pe_stride[5] = {0, kHeadDim / 2 * 4, 4, 2, 1};
  for (int d = 0; d < 5; ++d) params.pe_stride[d] = pe_stride[d];
  params.eps = kEps;
  const long long out_stride[3] = {params.H * params.L * kHeadDim, params.L * kHeadDim, kHeadDim};
  for (int d = 0; d < 3; ++d) params.out_stride[d] = out_stride[d];  // contiguous [N, H, L, D]
  const auto kernel = kiln::jit::process_cache().kernel(fused_spec(plan), 0);
  void* args[] = {&params};
  kiln::jit::launch("rope_flux", kernel, dim3(unsigned(x.size(0) * x.size(1))),
                    dim3(unsigned(plan.threads())), 0, nullptr, args);
}

std::vector<std::uint8_t> random_pe(std::int64_t length, Rng& rng) {
  std::vector<std::uint8_t> bytes(std::size_t(length * kHeadDim / 2 * 4) * sizeof(float));
  float* pe = reinterpret_cast<float*>(bytes.data());
  std::uniform_real_distribution<float> angle(0.f, 2 * std::numbers::pi_v<float>);
  for (std::int64_t i = 0; i < length * kHeadDim / 2; ++i) {
    const float a = angle(rng.engine());
    pe[4 * i] = std::cos(a), pe[4 * i + 1] = -std::sin(a);
    pe[4 * i + 2] = std::sin(a), pe[4 * i + 3] = std::cos(a);
  }
  return bytes;
}

void run_case(const Case& c, std::int64_t length, const std::vector<int>& rows, const Args& args,
              Rng& rng, Results& results) {
  const std::int64_t packed[5] = {kBatch, length, 3, kHeads, kHeadDim};
  const std::int64_t x_shape[4] = {kBatch, length, kHeads, kHeadDim};
  const std::int64_t x_strides[4] = {length * 3 * kHeads * kHeadDim, 3 * kHeads * kHeadDim,
                                     kHeadDim, 1};
  const std::int64_t pe_shape[4] = {length, kHeadDim / 2, 2, 2};
  const std::int64_t out_shape[4] = {kBatch, kHeads, length, kHeadDim};
  const std::size_t x_count =
      std::size_t(packed[0] * packed[1] * packed[2] * packed[3] * packed[4]);
  const std::size_t out_count = std::size_t(kBatch * length * kHeads * kHeadDim);

  const auto qkv_host = random_host(c.x, x_count, rng);
  const auto pe_host = random_pe(length, rng);
  const auto weight_host = random_host(DType::bf16, kHeadDim, rng, 1.f, 0.25f);

  // CPU reference on the Q slice of the packed host QKV.
  std::vector<std::uint8_t> want(out_count * 2);
  kiln::RopeFluxOptions cpu_options;
  if (c.norm) {
    cpu_options.norm_weight =
        TensorView(const_cast<std::uint8_t*>(weight_host.data()), DType::bf16, {kHeadDim});
  }
  cpu_options.eps = kEps;
  std::optional<TensorView> cpu_pe;
  if (c.pe) {
    cpu_pe =
        TensorView::contiguous(const_cast<std::uint8_t*>(pe_host.data()), DType::f32, pe_shape);
  }
  kiln::rope_flux(TensorView(const_cast<std::uint8_t*>(qkv_host.data()), c.x, x_shape, x_strides),
                  cpu_pe, TensorView::contiguous(want.data(), DType::bf16, out_shape), cpu_options);

  // Input sets rotated past the L2 (the same values in each: only the addresses matter here).
  const std::size_t x_bytes = out_count * kiln::dtype_size(c.x);
  const std::size_t pe_bytes = c.pe ? pe_host.size() : 0;
  const std::size_t moved = x_bytes + pe_bytes + (c.norm ? weight_host.size() : 0) + out_count * 2;
  const int sets = rotation_count(3 * x_bytes + pe_bytes + out_count * 2);
  std::vector<DeviceBuffer> qkv, pe, out;
  for (int s = 0; s < sets; ++s) {
    qkv.emplace_back(qkv_host);
    pe.emplace_back(pe_host);
    out.emplace_back(out_count * 2);
  }
  const DeviceBuffer weight(weight_host);
  const auto x_view = [&](int s) {
    return TensorView(qkv[s].data(), c.x, x_shape, x_strides, kiln::Device::cuda(0));
  };
  // Runs `call` on set 0 into a poisoned output and checks it against the CPU reference.
  const auto check = [&](const std::function<void(int)>& call, const std::string& config) {
    out[0].poison();
    call(0);
    const auto got = out[0].download();
    const double err = relative_error(got.data(), DType::bf16, want.data(), DType::bf16, out_count);
    if (!(err <= kBound)) {
      std::printf("%s %s: relative error %.3g against the CPU reference, bound %.3g\n", c.name,
                  config.c_str(), err, kBound);
      throw std::runtime_error("a variant disagrees with the CPU reference");
    }
    return err;
  };
  std::string shape = "L";
  shape += std::to_string(length);
  shape += " H24 D128";
  double launcher_ms = 0;
  const auto report = [&](const std::string& config, double err, double ms) {
    if (config == "launcher") launcher_ms = ms;
    results.add({{"case", c.name},
                 {"shape", shape},
                 {"config", config},
                 {"ms", fixed(ms, 4)},
                 {"GB/s", fixed(double(moved) / ms / 1e6, 0)},
                 {"vs_launcher", fixed(launcher_ms / ms, 3)},
                 {"rel_err", fixed(err, 6)}},
                {"case", "shape", "config", "ms", "GB/s", "vs_launcher", "rel_err"});
  };

  // The launcher's own plan, through the public API.
  kiln::RopeFluxOptions options;
  if (c.norm) {
    options.norm_weight = TensorView(weight.data(), DType::bf16, {kHeadDim}, kiln::Device::cuda(0));
  }
  options.eps = kEps;
  const auto public_call = [&](int s) {
    std::optional<TensorView> pe_view;
    if (c.pe) {
      pe_view = TensorView::contiguous(pe[s].data(), DType::f32, pe_shape, kiln::Device::cuda(0));
    }
    kiln::rope_flux(
        x_view(s), pe_view,
        TensorView::contiguous(out[s].data(), DType::bf16, out_shape, kiln::Device::cuda(0)),
        options);
  };
  const double launcher_err = check(public_call, "launcher");
  report("launcher", launcher_err,
         median_ms(sets, public_call, args.get_int("warmup"), args.get_int("reps")));

  const auto base = kiln::rope_flux_detail::plan_fused(c.x, DType::bf16, DType::bf16, int(kHeadDim),
                                                       kHeads, c.pe, c.norm, true);
  for (const int r : rows) {
    const auto plan = with_rows(base, r);
    const bool same = fused_spec(plan).key() == fused_spec(base).key();
    const auto call = [&](int s) {
      launch_fused(plan, x_view(s), c.pe ? static_cast<const float*>(pe[s].data()) : nullptr,
                   c.norm ? weight.data() : nullptr, out[s].data());
    };
    const std::string config = std::to_string(r) + " rows" + (same ? " (launcher)" : "");
    const double err = check(call, config);
    report(config, err, median_ms(sets, call, args.get_int("warmup"), args.get_int("reps")));
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args args(
      "dev_rope_flux_rows_in_flight: the fused rope_flux kernel with R rows of a token in flight,\n"
      "checked against the CPU reference and timed (timing.py's method). NOTES.md 'Rows in "
      "flight'.\n"
      "  build/dev/dev/dev_rope_flux_rows_in_flight [--full] [--rows 2,4,8,12,24]");
  args.option("rows", "2,4,8,12,24", "rows in flight per block to time");
  args.option("lengths", "4608",
              "token counts L (Flux.2 512^2 / 1024^2 / 1792^2: 1536,4608,13056)");
  args.flag("full", "every length and six cases (adds rope f32 and the V path in f32)");
  add_common_options(args);
  std::vector<int> rows;
  std::vector<std::int64_t> lengths;
  std::vector<Case> cases = {{"rope bf16", DType::bf16, true, false},
                             {"rope+norm bf16", DType::bf16, true, true},
                             {"v-path bf16", DType::bf16, false, false},
                             {"rope+norm f32", DType::f32, true, true}};
  const auto prepare = [&] {
    for (const std::string& r : args.list("rows")) rows.push_back(std::stoi(r));
    for (const std::string& l : args.list("lengths")) lengths.push_back(std::stoll(l));
    if (args.has("full")) {
      lengths = {1536, 4608, 13056};
      cases.push_back({"rope f32", DType::f32, true, false});
      cases.push_back({"v-path f32", DType::f32, false, false});
    }
  };
  return run_harness(kHarness, args, argc, argv, prepare, [&](Rng& rng, Results& results) {
    for (const std::int64_t length : lengths) {
      for (const Case& c : cases) run_case(c, length, rows, args, rng, results);
    }
  });
}
