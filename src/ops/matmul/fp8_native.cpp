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
// M >= 128. Otherwise
// it writes the f32 product and product_epilogue applies the per-row scales and the bias, rounding
// once (an extra pass over M x N: NOTES.md has its cost).
// 128x128 block scales are not offered: cuBLASLt's block mode needs both operands block-scaled
// (a with 1x128 scales), which this API's per-tensor / per-row a_scale does not describe.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
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

}  // namespace

void launch_fp8_native(const MatmulProblem& p) {
  const std::string why = fp8_native_unsupported(p);
  if (!why.empty()) {
    check::fail(kOp, ErrorCode::unsupported, "the fp8_native path cannot run: " + why);
  }
  constexpr const char* kSource = "ops/matmul/kernels/fp8_native.cuh";
  const bool outer = p.a_scale_kind == ScaleKind::row || p.w_scale_kind == ScaleKind::row;
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
  constexpr std::int64_t kOuterMinM = 128;
  const bool fused = outer ? p.out_dtype == DType::bf16 && p.bias == nullptr && p.m >= kOuterMinM
                           : p.bias == nullptr || fused_bias(p);
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
      sv.m = p.m;
      sv.n = p.n;
      sv.a_row = p.a_scale_kind == ScaleKind::row;
      sv.w_row = p.w_scale_kind == ScaleKind::row;
      launch_simple({kSource, "kiln::scale_vectors", {}}, p.device, std::max(p.m, p.n), &sv,
                    p.stream);
      lt.a_scale = sv.a_out;
      lt.w_scale = sv.w_out;
      lt.outer = true;
    } else {
      lt.a_scale = a_scale;
      lt.w_scale = w_scale;
    }
    lt.bias = p.bias;
    lt.bias_dtype = p.bias_dtype;
    lt_matmul(kOp, lt);
    return;
  }
  // Otherwise the f32 product (in out itself when out is f32; tensor scales still applied by
  // cuBLASLt), then per-row scales and the bias in one pass, rounded once.
  std::optional<cuda::StreamScratch> product;
  if (p.out_dtype != DType::f32) {
    product.emplace(kOp, p.device, std::size_t(p.m * p.n) * sizeof(float), p.stream);
    lt.out = product->get();
    lt.out_dtype = DType::f32;
  }
  if (!outer) {
    lt.a_scale = a_scale;
    lt.w_scale = w_scale;
  }
  lt_matmul(kOp, lt);
  ProductEpilogueParams pe{};
  pe.src = static_cast<const float*>(lt.out);
  pe.a_scale = outer ? a_scale : nullptr;
  pe.w_scale = outer ? w_scale : nullptr;
  pe.a_row = p.a_scale_kind == ScaleKind::row;
  pe.w_row = p.w_scale_kind == ScaleKind::row;
  pe.bias = p.bias;
  pe.out = p.out;
  pe.m = p.m;
  pe.n = p.n;
  launch_simple({kSource,
                 "kiln::product_epilogue",
                 {{"TOut", jit::cpp_type(kOp, p.out_dtype)},
                  {"TBias", p.bias ? jit::cpp_type(kOp, p.bias_dtype) : "float"}}},
                p.device, p.m * p.n, &pe, p.stream);
}

}  // namespace kiln::matmul_detail
