// fp8 x fp8 on sm_89+ tensor cores through cuBLASLt.
//
// Why cuBLASLt and not our own wgmma kernel: its Hopper fp8 kernels (TMA, wgmma, warp-specialized
// persistent tiles) are what torch._scaled_mm runs, so they are the peer itself (ANCHORS.md's fp8
// GEMM figure); kiln has no fp8 x fp8 wgmma kernel of its own that could reach them. Per-row
// scales use cuBLASLt's outer-vector scale mode (CUDA 12.9+),
// which takes an f32 vector for both operands, so a tensor (or absent) scale on the other operand
// is broadcast into a stream-ordered scratch vector first (one tiny kernel, M + N floats).
// cuBLASLt takes the whole problem where it can: tensor scales with no bias or a bias of its fp8
// bias type (out's type, bf16 for f32 out), and per-row scales into bf16 without a bias at
// M >= 128. The epilogue's residual goes in as cuBLASLt's C with beta = 1 (of out's dtype,
// 16-byte aligned rows), and a gate that is one [N] vector for all rows (a [N] gate, or [1, N]) is
// folded into the weight's outer-vector scale, which makes the scaling per row (so: bf16 out, no
// bias, M >= 128). Otherwise cuBLASLt writes the f32 product and product_epilogue applies the
// per-row scales, bias, gate and residual, rounding once (an extra pass over M x N: NOTES.md has
// its cost; for a gate or residual that pass is logged once). A fused call that cuBLASLt refuses
// (no algorithm) takes that path too, logged once.
// 128x128 block scales are not offered: cuBLASLt's block mode needs both operands block-scaled
// (a with 1x128 scales), which this API's per-tensor / per-row a_scale does not describe.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "jit/kernel_cache.hpp"
#include "ops/matmul/cublaslt.hpp"
#include "ops/matmul/kernels/gemm_params.cuh"
#include "ops/matmul/matmul.hpp"

namespace kiln::matmul_detail {
namespace {

constexpr const char* kOp = "matmul";

}  // namespace

std::string fp8_native_unsupported(const MatmulProblem& p) {
  if (arch_number(p.arch) < 89) return "needs fp8 tensor cores (sm_89 or newer), got " + p.arch;
  if (!is_fp8(p.a_dtype)) return std::string("a must be fp8, got ") + dtype_name(p.a_dtype);
  if (!is_fp8(p.w_format)) {
    return std::string("the weight must be fp8, got ") + weight_format_name(p.w_format);
  }
  if (p.w_layout != WeightLayout::row_major) {
    return std::string("the weight must be row-major, got ") + weight_layout_name(p.w_layout);
  }
  if (p.a_dtype == DType::f8_e5m2 && p.w_format == WeightFormat::f8_e5m2) {
    return "cuBLASLt has no e5m2 x e5m2 kernel";
  }
  if (p.w_scale_kind == ScaleKind::block128) {
    return "128x128 block weight scales need a block-scaled a (cuBLASLt's block mode)";
  }
  if (p.k % 16 != 0 || p.n % 16 != 0 || p.a_row_stride % 16 != 0) {
    return "cuBLASLt's fp8 kernels need K, N and a's row stride multiples of 16 (got K = " +
           std::to_string(p.k) + ", N = " + std::to_string(p.n) +
           ", row stride = " + std::to_string(p.a_row_stride) + ")";
  }
  if (!aligned(p.a, 16) || !aligned(p.w, 16) || !aligned(p.out, 16) ||
      (p.bias != nullptr && !aligned(p.bias, 16))) {
    return "cuBLASLt's fp8 kernels need a, w, out and bias at 16-byte boundaries";
  }
  if (p.out_dtype != DType::f32 && p.out_dtype != DType::f16 && p.out_dtype != DType::bf16) {
    return std::string("out dtype ") + dtype_name(p.out_dtype);
  }
  return "";
}

namespace {

// Whether cuBLASLt's epilogue takes this bias (with tensor scales): its fp8 bias type.
bool fused_bias(const MatmulProblem& p) {
  const DType want = p.out_dtype == DType::f16 ? DType::f16 : DType::bf16;
  return p.bias_dtype == want;
}

void launch_simple(const jit::KernelSpec& spec, int device, std::int64_t threads, void* params,
                   Stream stream) {
  constexpr int kBlock = 256;
  const std::int64_t blocks = std::min<std::int64_t>((threads + kBlock - 1) / kBlock, 65536);
  const auto kernel = jit::process_cache().kernel(spec, device);
  void* args[] = {params};
  jit::launch(kOp, kernel, dim3(unsigned(blocks)), dim3(kBlock), 0, stream, args);
}

constexpr const char* kSource = "ops/matmul/kernels/fp8_native.cuh";

jit::KernelSpec scale_vectors_spec(int gate) {
  return {kSource, "kiln::scale_vectors", {{"GATE", std::to_string(gate)}}};
}

jit::KernelSpec product_epilogue_spec(DType out, int bias, DType bias_dtype, int gate,
                                      int residual) {
  return {kSource,
          "kiln::product_epilogue",
          {{"TOut", jit::cpp_type(kOp, out)},
           {"TBias", bias != kOperandNone ? jit::cpp_type(kOp, bias_dtype) : "float"},
           {"GATE", std::to_string(gate)},
           {"RESIDUAL", std::to_string(residual)}}};
}

}  // namespace

std::vector<jit::KernelSpec> fp8_native_variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  if (workload != "llm" && workload != "flux") return specs;
  // The outer-vector scales without and with a folded [N] gate; the f32 product's epilogue into
  // bf16 with per-row scales, with a bf16 residual (LLM) or a bf16 gate and residual (Flux's
  // AdaLN-gated residual of a batch > 1).
  specs.push_back(scale_vectors_spec(kOperandNone));
  specs.push_back(
      product_epilogue_spec(DType::bf16, kOperandNone, DType::bf16, kOperandNone, kOperandNone));
  if (workload == "flux") {
    specs.push_back(scale_vectors_spec(kOperandBf16));
    specs.push_back(
        product_epilogue_spec(DType::bf16, kOperandNone, DType::bf16, kOperandBf16, kOperandBf16));
  } else {
    specs.push_back(
        product_epilogue_spec(DType::bf16, kOperandNone, DType::bf16, kOperandNone, kOperandBf16));
  }
  return specs;
}

void launch_product_epilogue(const MatmulProblem& p, const float* product, bool scales) {
  ProductEpilogueParams pe{};
  pe.src = product;
  pe.a_scale = scales && p.a_scale_kind != ScaleKind::none ? p.a_scale : nullptr;
  pe.w_scale = scales && p.w_scale_kind != ScaleKind::none ? p.w_scale : nullptr;
  pe.a_row = p.a_scale_kind == ScaleKind::row;
  pe.w_row = p.w_scale_kind == ScaleKind::row;
  pe.bias = p.bias;
  pe.out = p.out;
  pe.m = p.m;
  pe.n = p.n;
  pe.epilogue = gate_residual_of(p);
  launch_simple(product_epilogue_spec(p.out_dtype, operand_kind(p.bias, p.bias_dtype), p.bias_dtype,
                                      operand_kind(p.gate, p.gate_dtype),
                                      operand_kind(p.residual, p.residual_dtype)),
                p.device, p.m * p.n, &pe, p.stream);
}

void launch_fp8_native(const MatmulProblem& p) {
  const std::string why = fp8_native_unsupported(p);
  if (!why.empty()) {
    check::fail(kOp, ErrorCode::unsupported, "the fp8_native path cannot run: " + why);
  }
  const bool row_scales = p.a_scale_kind == ScaleKind::row || p.w_scale_kind == ScaleKind::row;
  const float* a_scale = p.a_scale_kind == ScaleKind::none ? nullptr : p.a_scale;
  const float* w_scale = p.w_scale_kind == ScaleKind::none ? nullptr : p.w_scale;
  LtMatmul lt;
  lt.m = p.m;
  lt.n = p.n;
  lt.k = p.k;
  lt.a = p.a;
  lt.a_dtype = p.a_dtype;
  lt.a_stride = p.a_row_stride;
  lt.w = p.w;
  lt.w_dtype = fp8_dtype(p.w_format);
  lt.w_stride = p.k;
  lt.out = p.out;
  lt.out_dtype = p.out_dtype;
  lt.device = p.device;
  lt.stream = p.stream;

  // One cuBLASLt call where it takes the whole problem (measured on an H200, CUDA 13.0: its
  // outer-vector kernels ran bf16 out without a bias at M = 128 ... 4608, and answered
  // NOT_SUPPORTED at M <= 16 for f32 out and for a bias, with the scale vectors then packed
  // unaligned; the vectors are now 256-byte aligned, the unverified cases stay unfused).
  // A gate folds into the weight's vector only when every row has the same one; a residual is C.
  constexpr std::int64_t kOuterMinM = 128;
  const bool gate_folds = p.gate == nullptr || p.gate_stride == 0 || p.gate_rows >= p.m;
  const bool residual_is_c =
      p.residual == nullptr ||
      (p.residual_dtype == p.out_dtype && aligned(p.residual, 16) &&
       (p.residual_stride * std::int64_t(dtype_size(p.out_dtype))) % 16 == 0);
  const bool outer = row_scales || p.gate != nullptr;
  const bool fused = gate_folds && residual_is_c &&
                     (outer ? p.out_dtype == DType::bf16 && p.bias == nullptr && p.m >= kOuterMinM
                            : p.bias == nullptr || fused_bias(p));
  if (fused) {
    std::optional<cuda::StreamScratch> vectors;
    if (outer) {
      const std::int64_t w_offset = (p.m + 63) / 64 * 64;  // both vectors 256-byte aligned
      vectors.emplace(kOp, p.device, std::size_t(w_offset + p.n) * sizeof(float), p.stream);
      ScaleVectorParams sv{};
      sv.a_src = a_scale;
      sv.a_out = static_cast<float*>(vectors->get());
      sv.w_src = w_scale;
      sv.w_out = sv.a_out + w_offset;
      sv.gate = p.gate;
      sv.m = p.m;
      sv.n = p.n;
      sv.a_row = p.a_scale_kind == ScaleKind::row;
      sv.w_row = p.w_scale_kind == ScaleKind::row;
      launch_simple(scale_vectors_spec(operand_kind(p.gate, p.gate_dtype)), p.device,
                    std::max(p.m, p.n), &sv, p.stream);
      lt.a_scale = sv.a_out;
      lt.w_scale = sv.w_out;
      lt.outer = true;
    } else {
      lt.a_scale = a_scale;
      lt.w_scale = w_scale;
    }
    lt.bias = p.bias;
    lt.bias_dtype = p.bias_dtype;
    lt.c = p.residual;
    lt.c_dtype = p.residual_dtype;
    lt.c_stride = p.residual_stride;
    try {
      lt_matmul(kOp, lt);
      return;
    } catch (const Error& e) {
      if (e.code() != ErrorCode::unsupported || (p.gate == nullptr && p.residual == nullptr)) {
        throw;
      }
      log::warning_once("fp8_native_epilogue_refused",
                        std::string("matmul: fp8_native: cuBLASLt refused the fused gate / "
                                    "residual epilogue (") +
                            e.what() + "); it runs as a second pass over an f32 product");
    }
  } else if (p.gate != nullptr || p.residual != nullptr) {
    log::warning_once(
        "fp8_native_epilogue_pass",
        std::string("matmul: fp8_native: the gate / residual epilogue runs as a second pass over "
                    "an f32 product (") +
            (!gate_folds         ? "a gate per batch element"
             : !residual_is_c    ? "a residual of another dtype than out, or unaligned rows"
             : p.bias != nullptr ? "a bias with per-row scaling"
                                 : "per-row scaling needs bf16 out and M >= 128") +
            ")");
  }
  // Otherwise the f32 product (in out itself when out is f32 and no residual can alias it;
  // tensor scales still applied by cuBLASLt), then per-row scales, bias, gate and residual in one
  // pass, rounded once.
  lt.c = nullptr;
  lt.bias = nullptr;
  lt.outer = false;
  std::optional<cuda::StreamScratch> product;
  if (p.out_dtype != DType::f32 || p.residual != nullptr) {
    product.emplace(kOp, p.device, std::size_t(p.m * p.n) * sizeof(float), p.stream);
    lt.out = product->get();
    lt.out_dtype = DType::f32;
  } else {
    lt.out = p.out;
    lt.out_dtype = DType::f32;
  }
  lt.a_scale = row_scales ? nullptr : a_scale;
  lt.w_scale = row_scales ? nullptr : w_scale;
  lt_matmul(kOp, lt);
  launch_product_epilogue(p, static_cast<const float*>(lt.out), row_scales);
}

}  // namespace kiln::matmul_detail
