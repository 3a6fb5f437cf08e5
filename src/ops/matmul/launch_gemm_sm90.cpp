// The Hopper weight-only GEMM (kernels/gemm_sm90.cuh): when it takes a gemm-path problem, its
// plan (tokens per block, ring depth, split-K), TMA maps, JIT spec and launch.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/tma.hpp"
#include "jit/kernel_cache.hpp"
#include "ops/matmul/gemm.hpp"
#include "ops/matmul/kernels/gemm_params.cuh"

namespace kiln::matmul_detail {
namespace {

constexpr const char* kOp = "matmul";
constexpr const char* kSource = "ops/matmul/kernels/gemm_sm90.cuh";
constexpr std::int64_t kBlockW = 128;  // weight rows per block
constexpr std::int64_t kBlockK = 64;
constexpr int kThreads = 384;

// Bytes between weight rows: the caller's rows, or the packed layout's 16-byte padded ones.
std::int64_t w_stride(const MatmulProblem& p) {
  return p.w_layout == WeightLayout::gemm_packed ? packed_row_bytes(p.w_format, p.k)
                                                 : p.w_row_bytes;
}

// Ring depth by tokens per unit (a slot of 40, 24 or 16 KB): 5 at 256 tokens (200 KB; 4 measured
// slower), 8 below (192 KB at 128 tokens; 6 measured slower). NOTES.md, "Hopper GEMM".
int stages_for(int bt) { return bt == 256 ? 5 : 8; }

std::size_t smem_bytes(const GemmSm90Plan& plan) {
  const std::size_t slot = std::size_t(plan.bt) * kBlockK * 2 + kBlockW * kBlockK;
  return std::size_t(stages_for(plan.bt)) * (slot + 16) + 1024;
}

}  // namespace

std::string gemm_sm90_unsupported(const MatmulProblem& p) {
  if (p.arch != "sm_90a") return "the device is " + p.arch + ", not sm_90a";
  if (p.a_dtype != DType::f16 && p.a_dtype != DType::bf16) {
    return std::string("a is ") + dtype_name(p.a_dtype) + ", not f16 or bf16";
  }
  if (!is_fp8(p.w_format) || p.w_layout == WeightLayout::dequantized) {
    return std::string("the weight is ") + weight_format_name(p.w_format) + " (" +
           weight_layout_name(p.w_layout) + "), not fp8";
  }
  if (p.k == 0 || p.m > INT32_MAX || p.n > INT32_MAX || p.k > INT32_MAX) {
    return "M, N, K must be in [1, 2^31)";
  }
  if (ceil_div(p.n, kBlockW) * ceil_div(p.m, 64) > INT32_MAX / 64) {
    return "M x N exceeds the work-unit count";
  }
  if (!aligned(p.a, 16) || (p.m > 1 && p.a_row_stride % 8 != 0)) {
    return "rows of a must be 16-byte aligned (start and row stride)";
  }
  if (!aligned(p.w, 16) || w_stride(p) % 16 != 0) {
    return "rows of w must be 16-byte aligned (start and row bytes; K % 16 == 0)";
  }
  return "";
}

GemmSm90Plan plan_gemm_sm90(const MatmulProblem& p) {
  GemmSm90Plan plan;
  const int sms = cuda::sm_count(kOp, p.device);
  const bool block128 = p.w_scale_kind == ScaleKind::block128;
  const std::int64_t n_tiles = ceil_div(p.n, kBlockW);
  // The share of the last wave's slots that `units` work units fill.
  const auto fill = [&](std::int64_t units) {
    return double(units) / double(ceil_div(units, sms) * sms);
  };
  if (p.m <= 64) {
    plan.bt = 64;
  } else if (p.m <= 128 || block128) {
    plan.bt = 128;
  } else {
    // 256 tokens a unit reads less of L2 per FLOP; 128 where it fills the waves much better
    // (512 x 4096 x 4096: 64 units against 128 on 132 SMs).
    const double fill256 = fill(n_tiles * ceil_div(p.m, 256));
    const double fill128 = fill(n_tiles * ceil_div(p.m, 128));
    plan.bt = fill128 > 1.15 * fill256 ? 128 : 256;
  }
  // Split K while the units fill less than half the SMs and each slice keeps >= 16 k-tiles; a
  // slice's k-tiles stay even under block128 scales (whole 128-wide chunks).
  const std::int64_t tiles = n_tiles * ceil_div(p.m, plan.bt);
  const std::int64_t k_tiles = ceil_div(p.k, kBlockK);
  std::int64_t splits = 1;
  while (tiles * splits * 2 <= sms && k_tiles >= 32 * splits) splits *= 2;
  std::int64_t per_split = ceil_div(k_tiles, splits);
  if (block128) per_split += per_split % 2;
  plan.tiles_per_split = int(per_split);
  plan.splits = int(ceil_div(k_tiles, per_split));
  plan.units = tiles * plan.splits;
  plan.blocks = int(std::min<std::int64_t>(plan.units, sms));
  return plan;
}

jit::KernelSpec gemm_sm90_spec(const MatmulProblem& p, const GemmSm90Plan& plan) {
  const bool bias = p.bias != nullptr;
  const int scale =
      plan.splits > 1 && p.w_scale_kind != ScaleKind::block128 ? 0 : int(p.w_scale_kind);
  // Split-K writes partial sums; the split epilogue applies gate and residual.
  const bool split = plan.splits > 1;
  const int gate = operand_kind(p.gate, p.gate_dtype);
  const int residual = operand_kind(p.residual, p.residual_dtype);
  jit::KernelSpec spec{kSource,
                       "kiln::gemm_sm90_kernel",
                       {{"T", jit::cpp_type(kOp, p.a_dtype)},
                        {"Tw", jit::cpp_type(kOp, fp8_dtype(p.w_format))},
                        {"TO", jit::cpp_type(kOp, p.out_dtype)},
                        {"TB", bias ? jit::cpp_type(kOp, p.bias_dtype) : "float"},
                        {"BT", std::to_string(plan.bt)},
                        {"STAGES", std::to_string(stages_for(plan.bt))},
                        {"WSCALE", std::to_string(scale)},
                        {"HAS_BIAS", jit::cpp_bool(bias && plan.splits == 1)},
                        {"SPLIT", jit::cpp_bool(plan.splits > 1)},
                        {"GATE", std::to_string(split ? kOperandNone : gate)},
                        {"RESIDUAL", std::to_string(split ? kOperandNone : residual)}}};
  spec.archs = {"sm_90a"};
  return spec;
}

void launch_gemm_sm90(const MatmulProblem& p) {
  const GemmSm90Plan plan = plan_gemm_sm90(p);
  GemmSm90Params params{};
  {
    const std::uint64_t dims[2] = {std::uint64_t(p.k), std::uint64_t(p.n)};
    const std::uint64_t strides[1] = {std::uint64_t(w_stride(p))};
    const std::uint32_t box[2] = {std::uint32_t(kBlockK), std::uint32_t(kBlockW)};
    params.map_w = tma::tiled(kOp, "w", DType::u8, p.w, dims, strides, box);
  }
  {
    // With M = 1 the row stride is never stepped along (any 16-byte multiple will do).
    const std::int64_t row_bytes = p.m > 1 ? p.a_row_stride * 2 : (p.k * 2 + 15) / 16 * 16;
    const std::uint64_t dims[2] = {std::uint64_t(p.k), std::uint64_t(p.m)};
    const std::uint64_t strides[1] = {std::uint64_t(row_bytes)};
    const std::uint32_t box[2] = {std::uint32_t(kBlockK), std::uint32_t(plan.bt)};
    params.map_a = tma::tiled(kOp, "a", p.a_dtype, p.a, dims, strides, box);
  }
  params.w_scale = p.w_scale;
  params.bias = p.bias;
  params.m = int(p.m);
  params.n = int(p.n);
  params.k = int(p.k);
  params.splits = plan.splits;
  params.tiles_per_split = plan.tiles_per_split;
  params.scale_cols = int(ceil_div(p.k, 128));
  params.epilogue = gate_residual_of(p);
  std::optional<cuda::StreamScratch> partial;
  if (plan.splits > 1) {
    partial.emplace(kOp, p.device, std::size_t(plan.splits * p.m * p.n) * sizeof(float), p.stream);
    params.out = partial->get();
    params.out_vec = p.n % 2 == 0;
  } else {
    params.out = p.out;
    params.out_vec = p.n % 2 == 0 && aligned(p.out, 2 * dtype_size(p.out_dtype));
  }
  const auto kernel = jit::process_cache().kernel(gemm_sm90_spec(p, plan), p.device);
  void* args[] = {&params};
  jit::launch(kOp, kernel, dim3(unsigned(plan.blocks)), dim3(kThreads), smem_bytes(plan), p.stream,
              args);
  if (partial) launch_split_epilogue(p, static_cast<const float*>(partial->get()), plan.splits);
}

}  // namespace kiln::matmul_detail
