// The tensor-core GEMM path: plan (kinds, tile, load modes), JIT spec, launch, variant lists.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "jit/kernel_cache.hpp"
#include "ops/matmul/cublaslt.hpp"
#include "ops/matmul/gemm.hpp"
#include "ops/matmul/kernels/gemm_params.cuh"

namespace kiln::matmul_detail {
namespace {

constexpr const char* kOp = "matmul";
constexpr const char* kSource = "ops/matmul/kernels/gemm.cuh";

int a_kind(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return gemm_kind::f32;
    case DType::f16:
      return gemm_kind::f16;
    case DType::bf16:
      return gemm_kind::bf16;
    case DType::f8_e4m3fn:
      return gemm_kind::e4m3;
    case DType::f8_e5m2:
      return gemm_kind::e5m2;
    default:
      return -1;
  }
}

// The dequantized layout is a bf16 weight.
int w_kind(const MatmulProblem& p) {
  if (p.w_layout == WeightLayout::dequantized) return gemm_kind::bf16;
  switch (p.w_format) {
    case WeightFormat::f16:
      return gemm_kind::f16;
    case WeightFormat::bf16:
      return gemm_kind::bf16;
    case WeightFormat::f8_e4m3fn:
      return gemm_kind::e4m3;
    case WeightFormat::f8_e5m2:
      return gemm_kind::e5m2;
    case WeightFormat::q8_0:
      return gemm_kind::q8_0;
  }
  return -1;
}

bool w_is_8bit(int kind) {
  return kind == gemm_kind::e4m3 || kind == gemm_kind::e5m2 || kind == gemm_kind::q8_0;
}

// The mma type. bf16 a: bf16, or f16 under an f16 weight (a is converted on load, exact within
// f16's range; rounding the weight to bf16 instead left 2.5e-3 relative errors, over the 1e-3
// bound). f32 a: bf16, split on load into hi + lo (two mma per product, 16 significant bits,
// bf16's range), or f16 hi + lo under an f16 weight (kept exact). f16 and fp8 a: f16. fp8 and
// int8 weights are exact in both types; bf16 weights (the dequantized layout) are exact in f16
// within its exponent range.
DType mma_type(int a, int w) {
  if (a == gemm_kind::bf16) return w == gemm_kind::f16 ? DType::f16 : DType::bf16;
  if (a == gemm_kind::f32) return w == gemm_kind::f16 ? DType::f16 : DType::bf16;
  return DType::f16;
}

int bias_kind(const MatmulProblem& p) {
  if (p.bias == nullptr) return gemm_bias::none;
  switch (p.bias_dtype) {
    case DType::f32:
      return gemm_bias::f32;
    case DType::f16:
      return gemm_bias::f16;
    case DType::bf16:
      return gemm_bias::bf16;
    default:
      return -1;
  }
}

// Bytes between weight rows as the kernel reads them.
std::int64_t w_stride(const MatmulProblem& p) {
  if (p.w_layout == WeightLayout::gemm_packed) return packed_row_bytes(p.w_format, p.k);
  if (p.w_layout == WeightLayout::dequantized) return p.k * 2;
  return p.w_row_bytes;
}

// Tile table, from the tile sweep (NOTES.md "GEMM tiles"; dev/matmul/gemm_tiles.cpp reruns it):
//   M <= 32                      32 x 128, 4 warps of 32 x 32
//   128-row tiles < SMs / 2      64 x 128, 8 warps of 32 x 32: more CTAs, faster than 128 x 128
//   (or f32 a: three a tiles)    where 128-row tiles would leave most SMs idle
//   otherwise                    128 x 128, 8 warps of 64 x 32, 4 stages
// 128 x 256 with 8 warps of 128 x 32 measured faster on the largest shapes but is not in the test
// suite's reach yet, so it is not chosen.
GemmTile default_tile(std::int64_t m, std::int64_t n, int sms, bool f32_a) {
  if (m <= 32) return {32, 128, 1, 4, 4};
  const std::int64_t tiles = ((m + 127) / 128) * ((n + 127) / 128);
  if (2 * tiles < sms || f32_a) return {64, 128, 2, 4, 4};
  return {128, 128, 2, 4, 4};
}

}  // namespace

std::int64_t packed_row_bytes(WeightFormat format, std::int64_t k) {
  const std::int64_t elem = (format == WeightFormat::f16 || format == WeightFormat::bf16) ? 2 : 1;
  return (k * elem + 15) / 16 * 16;
}

std::int64_t packed_q8_n_pad(std::int64_t n) { return (n + 3) / 4 * 4; }

std::int64_t packed_q8_scale_offset(std::int64_t n, std::int64_t k) {
  return (n * k + 15) / 16 * 16;
}

std::size_t GemmPlan::smem_bytes() const {
  const std::size_t a = std::size_t(tile.bm) * 128 * (a_kind == gemm_kind::f32 ? 3 : 1);
  const std::size_t w = std::size_t(tile.bn) * (w_is_8bit(w_kind) ? 64 : 128);
  const std::size_t d = w_kind == gemm_kind::q8_0 ? std::size_t(tile.bn) * 8 : 0;
  return std::size_t(tile.stages) * (a + w + d);
}

std::string gemm_unsupported(const MatmulProblem& p) {
  if (p.m > INT_MAX || p.n > INT_MAX || p.k > INT_MAX) {
    return "M, N and K must be below 2^31 (got M = " + std::to_string(p.m) +
           ", N = " + std::to_string(p.n) + ", K = " + std::to_string(p.k) + ")";
  }
  if (a_kind(p.a_dtype) < 0) return std::string("a dtype ") + dtype_name(p.a_dtype);
  if (p.out_dtype != DType::f32 && p.out_dtype != DType::f16 && p.out_dtype != DType::bf16) {
    return std::string("out dtype ") + dtype_name(p.out_dtype);
  }
  if (bias_kind(p) < 0) return std::string("bias dtype ") + dtype_name(p.bias_dtype);
  if (p.w_format == WeightFormat::q8_0 && p.k % 32 != 0) {
    return "Q8_0 needs K % 32 == 0 (got K = " + std::to_string(p.k) + ")";
  }
  if (p.w_layout != WeightLayout::row_major && !aligned(p.w, 16)) {
    return "a prepared weight must start at a 16-byte boundary";
  }
  return "";
}

GemmPlan plan_gemm(const MatmulProblem& p, const GemmTile& tile) {
  GemmPlan plan;
  plan.a_kind = a_kind(p.a_dtype);
  plan.w_kind = w_kind(p);
  plan.mma = mma_type(plan.a_kind, plan.w_kind);
  plan.out = p.out_dtype;
  plan.tile = tile;
  const bool a_is_mma = (plan.a_kind == gemm_kind::f16 && plan.mma == DType::f16) ||
                        (plan.a_kind == gemm_kind::bf16 && plan.mma == DType::bf16);
  plan.a_async = a_is_mma && p.k % 8 == 0 && p.a_row_stride % 8 == 0 && aligned(p.a, 16);
  if (p.w_layout != WeightLayout::row_major) {
    plan.w_async = true;
  } else if (plan.w_kind == gemm_kind::q8_0) {
    plan.w_async = false;
  } else {
    const std::int64_t chunk = w_is_8bit(plan.w_kind) ? 16 : 8;  // elements per 16 bytes
    plan.w_async = p.k % chunk == 0 && p.w_row_bytes % 16 == 0 && aligned(p.w, 16);
  }
  plan.w_scale =
      p.w_layout == WeightLayout::dequantized ? gemm_scale::none : static_cast<int>(p.w_scale_kind);
  plan.a_row_scale = p.a_scale_kind == ScaleKind::row;
  plan.bias = bias_kind(p);
  plan.gate = operand_kind(p.gate, p.gate_dtype);
  plan.residual = operand_kind(p.residual, p.residual_dtype);
  return plan;
}

GemmPlan plan_gemm(const MatmulProblem& p) {
  GemmPlan plan =
      plan_gemm(p, default_tile(p.m, p.n, cuda::sm_count(kOp, p.device), p.a_dtype == DType::f32));
  if (!plan.w_async) {
    log::warning_once(
        std::string("gemm_gather_") + weight_format_name(p.w_format),
        std::string("matmul: the GEMM gathers this ") + weight_format_name(p.w_format) +
            " weight element by element (" +
            (plan.w_kind == gemm_kind::q8_0 ? "ggml's 34-byte Q8_0 blocks are 2-byte aligned"
                                            : "rows not 16-byte aligned or K not a multiple of "
                                              "16 bytes") +
            "); prepare_weight(w, gemm) repacks it for 16-byte copies");
  }
  return plan;
}

jit::KernelSpec gemm_spec(const GemmPlan& plan) {
  return {kSource,
          "kiln::gemm_kernel",
          {{"AK", std::to_string(plan.a_kind)},
           {"WK", std::to_string(plan.w_kind)},
           {"T", jit::cpp_type(kOp, plan.mma)},
           {"TOut", jit::cpp_type(kOp, plan.out)},
           {"BM", std::to_string(plan.tile.bm)},
           {"BN", std::to_string(plan.tile.bn)},
           {"WARPS_M", std::to_string(plan.tile.warps_m)},
           {"WARPS_N", std::to_string(plan.tile.warps_n)},
           {"STAGES", std::to_string(plan.tile.stages)},
           {"A_ASYNC", jit::cpp_bool(plan.a_async)},
           {"W_ASYNC", jit::cpp_bool(plan.w_async)},
           {"WSCALE", std::to_string(plan.w_scale)},
           {"A_ROW_SCALE", jit::cpp_bool(plan.a_row_scale)},
           {"BIAS", std::to_string(plan.bias)},
           {"GATE", std::to_string(plan.gate)},
           {"RESIDUAL", std::to_string(plan.residual)}}};
}

void launch_gemm_plan(const MatmulProblem& p, const GemmPlan& plan) {
  GemmParams params{};
  params.a = p.a;
  params.w = p.w;
  params.w_scale = plan.w_scale == gemm_scale::none ? nullptr : p.w_scale;
  params.a_scale = p.a_scale;
  params.bias = p.bias;
  params.out = p.out;
  params.a_stride = p.a_row_stride;
  params.w_stride = w_stride(p);
  params.m = int(p.m);
  params.n = int(p.n);
  params.k = int(p.k);
  params.n_pad = int(packed_q8_n_pad(p.n));
  params.scale_cols = int((p.k + 127) / 128);
  params.epilogue = gate_residual_of(p);
  if (plan.w_kind == gemm_kind::q8_0 && p.w_layout == WeightLayout::gemm_packed) {
    params.w_d = reinterpret_cast<const float*>(static_cast<const unsigned char*>(p.w) +
                                                packed_q8_scale_offset(p.n, p.k));
  }
  const std::int64_t tiles =
      ((p.m + plan.tile.bm - 1) / plan.tile.bm) * ((p.n + plan.tile.bn - 1) / plan.tile.bn);
  if (tiles > INT_MAX) {
    check::fail(kOp, ErrorCode::unsupported,
                "the GEMM grid would have " + std::to_string(tiles) + " CTAs, expected at most " +
                    std::to_string(INT_MAX));
  }
  const auto kernel = jit::process_cache().kernel(gemm_spec(plan), p.device);
  void* args[] = {&params};
  jit::launch(kOp, kernel, dim3(unsigned(tiles)), dim3(unsigned(plan.tile.threads())),
              plan.smem_bytes(), p.stream, args);
}

bool gemm_runs_cublaslt(const MatmulProblem& p) {
  const auto a16 = [](const void* ptr) { return ptr == nullptr || aligned(ptr, 16); };
  return p.w_layout == WeightLayout::dequantized && p.a_dtype == DType::bf16 &&
         (p.out_dtype == DType::bf16 || p.out_dtype == DType::f32) &&
         (p.bias == nullptr || p.bias_dtype == p.out_dtype) && p.k % 8 == 0 &&
         p.a_row_stride % 8 == 0 && p.n % 8 == 0 && a16(p.a) && a16(p.w) && a16(p.out) &&
         a16(p.bias);
}

void launch_gemm(const MatmulProblem& problem) {
  const std::string why = gemm_unsupported(problem);
  if (!why.empty()) check::fail(kOp, ErrorCode::unsupported, "the gemm path cannot run: " + why);
  if (gemm_runs_cublaslt(problem)) {
    LtMatmul lt;
    lt.m = problem.m;
    lt.n = problem.n;
    lt.k = problem.k;
    lt.a = problem.a;
    lt.a_dtype = DType::bf16;
    lt.a_stride = problem.a_row_stride;
    lt.w = problem.w;
    lt.w_dtype = DType::bf16;
    lt.w_stride = problem.k;
    lt.out = problem.out;
    lt.out_dtype = problem.out_dtype;
    lt.device = problem.device;
    lt.stream = problem.stream;
    const bool residual_is_c = problem.residual == nullptr ||
                               (problem.residual_dtype == problem.out_dtype &&
                                aligned(problem.residual, 16) && problem.residual_stride % 8 == 0);
    if (problem.gate == nullptr && residual_is_c) {
      // One call: out = a . w^T + residual (C, beta = 1) + bias.
      lt.bias = problem.bias;
      lt.bias_dtype = problem.bias_dtype;
      lt.c = problem.residual;
      lt.c_dtype = problem.residual_dtype;
      lt.c_stride = problem.residual_stride;
      lt_matmul(kOp, lt);
      return;
    }
    // cuBLASLt's epilogue has no gate: the f32 product, then bias, gate and residual in one pass.
    log::warning_once("gemm_dequantized_epilogue_pass",
                      "matmul: gemm over a dequantized weight: the gate / residual epilogue runs "
                      "as a second pass over an f32 product");
    const cuda::StreamScratch product(
        kOp, problem.device, std::size_t(problem.m * problem.n) * sizeof(float), problem.stream);
    lt.out = product.get();
    lt.out_dtype = DType::f32;
    lt_matmul(kOp, lt);
    launch_product_epilogue(problem, static_cast<const float*>(product.get()), false);
    return;
  }
  const std::string hopper = gemm_sm90_unsupported(problem);
  if (hopper.empty()) {
    launch_gemm_sm90(problem);
    return;
  }
  if (problem.arch == "sm_90a" && is_fp8(problem.w_format) &&
      problem.w_layout != WeightLayout::dequantized &&
      (problem.a_dtype == DType::f16 || problem.a_dtype == DType::bf16)) {
    log::warning_once("gemm_sm90_refused",
                      "matmul: the Hopper fp8 GEMM cannot run this call (" + hopper +
                          "); the mma.sync GEMM runs it, several times slower");
  }
  launch_gemm_plan(problem, plan_gemm(problem));
}

// The GEMM specializations a workload's linears need at prefill sizes (M > 64): bf16 a and out,
// fp8 e4m3fn weights with per-tensor and per-channel scales, Q8_0 prepared; with and without a
// bf16 bias.
std::vector<jit::KernelSpec> gemm_variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  if (workload != "llm" && workload != "flux") return specs;
  MatmulProblem p;
  p.m = 4096;
  p.n = 4096;
  p.k = 4096;
  p.a_dtype = DType::bf16;
  p.a_row_stride = p.k;
  p.out_dtype = DType::bf16;
  p.bias_dtype = DType::bf16;
  alignas(16) static const unsigned char kAligned[16] = {};
  p.a = kAligned;
  p.w = kAligned;
  struct Weights {
    WeightFormat format;
    WeightLayout layout;
    ScaleKind scale;
  };
  const Weights weights[] = {{WeightFormat::f8_e4m3fn, WeightLayout::row_major, ScaleKind::tensor},
                             {WeightFormat::f8_e4m3fn, WeightLayout::row_major, ScaleKind::row},
                             {WeightFormat::q8_0, WeightLayout::gemm_packed, ScaleKind::none}};
  for (const Weights& w : weights) {
    for (std::int64_t m : {128, 4096}) {  // both tile shapes at N = 4096
      p.m = m;
      p.w_format = w.format;
      p.w_layout = w.layout;
      p.w_scale_kind = w.scale;
      p.w_row_bytes = weight_row_bytes(w.format, p.k);
      for (bool bias : {false, true}) {
        p.bias = bias ? kAligned : nullptr;
        specs.push_back(gemm_spec(plan_gemm(p, default_tile(p.m, p.n, 132, false))));
      }
    }
  }
  // The Hopper kernel for the fp8 weights: 128 and 256 tokens a block, per-tensor and per-channel
  // scales, with and without a bias; and the split-K form (M = 128 at N = 4096 on 132 SMs).
  p.w_format = WeightFormat::f8_e4m3fn;
  p.w_layout = WeightLayout::row_major;
  for (ScaleKind scale : {ScaleKind::tensor, ScaleKind::row}) {
    p.w_scale_kind = scale;
    for (int bt : {128, 256}) {
      for (bool bias : {false, true}) {
        p.bias = bias ? kAligned : nullptr;
        GemmSm90Plan plan;
        plan.bt = bt;
        specs.push_back(gemm_sm90_spec(p, plan));
      }
    }
  }
  GemmSm90Plan split;
  split.bt = 128;
  split.splits = 4;
  specs.push_back(gemm_sm90_spec(p, split));
  // The epilogue of the linears that add into the residual stream, per-channel scales, no bias:
  // Flux's attention-out and MLP-out (AdaLN gate [B, N] and residual, bf16), an LLM's o_proj and
  // down_proj (residual alone); both GEMM kernels (wgmma on sm_90a, mma.sync elsewhere).
  p.w_scale_kind = ScaleKind::row;
  p.bias = nullptr;
  p.residual = kAligned;
  p.residual_dtype = DType::bf16;
  if (workload == "flux") {
    p.gate = kAligned;
    p.gate_dtype = DType::bf16;
  }
  for (int bt : {128, 256}) {
    GemmSm90Plan plan;
    plan.bt = bt;
    specs.push_back(gemm_sm90_spec(p, plan));
  }
  specs.push_back(gemm_spec(plan_gemm(p, default_tile(p.m, p.n, 132, false))));
  return specs;
}

}  // namespace kiln::matmul_detail
