// rope_flux: argument checks, dispatch by device, kernel plans and launches.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "ops/rope/heads.hpp"
#include "ops/rope_flux/kernels/params.cuh"
#include "ops/rope_flux/rope_flux.hpp"

namespace kiln {
namespace rope_flux_detail {
namespace {

constexpr const char* kOp = "rope_flux";
constexpr const char* kFusedSource = "ops/rope_flux/kernels/rope_flux.cuh";
constexpr const char* kUnfusedSource = "ops/rope_flux/kernels/rope_flux_unfused.cuh";

void validate(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
              const RopeFluxOptions& options) {
  static constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::f16, DType::bf16};
  rope_heads::check_x(kOp, x);
  const std::int64_t N = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  const std::string nlhd = "N = " + std::to_string(N) + ", L = " + std::to_string(L) +
                           ", H = " + std::to_string(H) + ", D = " + std::to_string(D);
  if (pe) {
    check::dtype_in(kOp, "pe", *pe, {DType::f32});
    if (pe->dim() == 4) {
      const std::int64_t expected[] = {L, D / 2, 2, 2};
      check::shape(kOp, "pe", *pe, expected,
                   "L = " + std::to_string(L) + ", D/2 = " + std::to_string(D / 2));
    } else {
      const std::int64_t expected[] = {N, L, D / 2, 2, 2};
      check::shape(kOp, "pe", *pe, expected,
                   "N = " + std::to_string(N) + ", L = " + std::to_string(L) +
                       ", D/2 = " + std::to_string(D / 2));
    }
    check::non_null(kOp, "pe", *pe);
  }
  check::dtype_in(kOp, "out", out, kFloat);
  const std::int64_t out_shape[] = {N, H, L, D};
  check::shape(kOp, "out", out, out_shape, "[N, H, L, D] with " + nlhd);
  // out's rows may be strided: a row range of the joint attention input.
  check::distinct_rows(kOp, "out", out,
                       "a contiguous [N, H, L, D] or a row range [:, :, a:b] of a contiguous "
                       "[N, H, L', D]");
  check::non_null(kOp, "x", x);
  check::non_null(kOp, "out", out);
  check::no_overlap(kOp, "out", out, "x", x);
  if (pe) check::no_overlap(kOp, "out", out, "pe", *pe);
  if (x.device().type == DeviceType::cuda && N * L > INT_MAX) {
    check::fail(kOp, ErrorCode::unsupported,
                "x has N * L = " + std::to_string(N * L) + " tokens, expected at most " +
                    std::to_string(INT_MAX) + " on CUDA (one block per token)");
  }
  if (options.norm_weight) {
    rope_heads::check_norm_weight(kOp, "out", out, *options.norm_weight, D, options.eps);
  }
}

// Whether the fused kernel may use 16-byte accesses on these tensors with `ept` elements a lane.
bool vector_ok(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
               const std::optional<TensorView>& weight, int ept) {
  const std::size_t x_bytes = std::size_t(ept) * dtype_size(x.dtype());
  if (x.stride(3) != 1 || !aligned(x.data(), x_bytes)) return false;
  for (int d = 0; d < 3; ++d) {
    if (x.stride(d) % ept != 0) return false;
  }
  if (!aligned(out.data(), std::min<std::size_t>(16, std::size_t(ept) * dtype_size(out.dtype())))) {
    return false;
  }
  for (int d = 0; d < 3; ++d) {
    if (out.stride(d) % ept != 0) return false;  // every row starts aligned like the first
  }
  if (weight && !aligned(weight->data(), std::min<std::size_t>(
                                             16, std::size_t(ept) * dtype_size(weight->dtype())))) {
    return false;
  }
  if (pe) {
    const int o = pe->dim() - 4;  // 1 when batched
    if (pe->stride(o + 1) != 4 || pe->stride(o + 2) != 2 || pe->stride(o + 3) != 1) return false;
    if (!aligned(pe->data(), 16) || pe->stride(o) % 4 != 0) return false;
    if (o == 1 && pe->stride(0) % 4 != 0) return false;
  }
  return true;
}

int vector_ept(DType x, int head_dim) {
  int ept = 16 / int(dtype_size(x));
  while (head_dim % ept != 0) ept /= 2;
  return ept;
}

jit::KernelSpec norm_stage_spec(DType x, DType weight) {
  return {kUnfusedSource,
          "kiln::rms_norm_rows",
          {{"Tin", jit::cpp_type(kOp, x)}, {"Tw", jit::cpp_type(kOp, weight)}}};
}

jit::KernelSpec rotate_stage_spec(DType src) {
  return {kUnfusedSource, "kiln::rotate_pairs", {{"Tin", jit::cpp_type(kOp, src)}}};
}

jit::KernelSpec permute_stage_spec(DType src, DType out) {
  return {kUnfusedSource,
          "kiln::permute_cast",
          {{"Tin", jit::cpp_type(kOp, src)}, {"Tout", jit::cpp_type(kOp, out)}}};
}

void launch_stage(const jit::KernelSpec& spec, int device, std::int64_t threads, RopeStage& stage,
                  Stream stream) {
  constexpr int kBlock = 256;
  const auto kernel = jit::process_cache().kernel(spec, device);
  void* args[] = {&stage};
  jit::launch(kOp, kernel, dim3(unsigned((threads + kBlock - 1) / kBlock)), dim3(kBlock), 0, stream,
              args);
}

void run_unfused(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
                 const RopeFluxOptions& options, Stream stream) {
  log::warning_once("rope_flux_unfused",
                    "rope_flux: KILN_DISABLE=rope_flux, running the unfused chain "
                    "(norm, rotate and permute as separate kernels)");
  const int device = x.device().index;
  const std::int64_t N = x.size(0), L = x.size(1), H = x.size(2), D = x.size(3);
  const std::int64_t rows = N * L * H;
  const std::size_t f32_bytes = std::size_t(rows * D) * sizeof(float);
  const std::int64_t contiguous_stride[4] = {L * H * D, H * D, D, 1};

  RopeStage stage{};
  stage.N = N;
  stage.L = L;
  stage.H = H;
  stage.D = D;
  stage.eps = options.eps;
  stage.src = x.data();
  std::copy_n(x.strides().begin(), 4, stage.src_stride);
  std::copy_n(out.strides().begin(), 3, stage.out_stride);
  DType src_dtype = x.dtype();

  // f32 intermediates in stream-ordered scratch memory.
  std::optional<cuda::StreamScratch> normed, rotated;
  if (options.norm_weight) {
    normed.emplace(kOp, device, f32_bytes, stream);
    stage.dst = normed->get();
    stage.norm_weight = options.norm_weight->data();
    launch_stage(norm_stage_spec(src_dtype, options.norm_weight->dtype()), device, rows * 32, stage,
                 stream);
    stage.src = normed->get();
    std::copy_n(contiguous_stride, 4, stage.src_stride);
    src_dtype = DType::f32;
  }
  if (pe) {
    rotated.emplace(kOp, device, f32_bytes, stream);
    stage.dst = rotated->get();
    stage.pe = static_cast<const float*>(pe->data());
    const int o = pe->dim() - 4;
    stage.pe_stride[0] = o == 1 ? pe->stride(0) : 0;
    for (int i = 0; i < 4; ++i) stage.pe_stride[i + 1] = pe->stride(o + i);
    launch_stage(rotate_stage_spec(src_dtype), device, rows * D / 2, stage, stream);
    stage.src = rotated->get();
    std::copy_n(contiguous_stride, 4, stage.src_stride);
    src_dtype = DType::f32;
  }
  stage.dst = out.data();
  launch_stage(permute_stage_spec(src_dtype, out.dtype()), device, rows * D, stage, stream);
}

void run_fused(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
               const RopeFluxOptions& options, Stream stream) {
  const int D = int(x.size(3));
  const int ept = vector_ept(x.dtype(), D);
  const bool vector = vector_ok(x, pe, out, options.norm_weight, ept);
  const DType weight = options.norm_weight ? options.norm_weight->dtype() : DType::f32;
  const FusedPlan plan = plan_fused(x.dtype(), out.dtype(), weight, D, x.size(2), pe.has_value(),
                                    options.norm_weight.has_value(), vector);
  RopeFluxParams params{};
  params.x = x.data();
  params.pe = pe ? static_cast<const float*>(pe->data()) : nullptr;
  params.norm_weight = options.norm_weight ? options.norm_weight->data() : nullptr;
  params.out = out.data();
  params.N = x.size(0);
  params.L = x.size(1);
  params.H = x.size(2);
  std::copy_n(x.strides().begin(), 4, params.x_stride);
  std::copy_n(out.strides().begin(), 3, params.out_stride);
  if (pe) {
    const int o = pe->dim() - 4;
    params.pe_stride[0] = o == 1 ? pe->stride(0) : 0;
    for (int i = 0; i < 4; ++i) params.pe_stride[i + 1] = pe->stride(o + i);
  }
  params.eps = options.eps;

  const auto kernel = jit::process_cache().kernel(fused_spec(plan), x.device().index);
  void* args[] = {&params};
  jit::launch(kOp, kernel, dim3(unsigned(x.size(0) * x.size(1))), dim3(unsigned(plan.threads())), 0,
              stream, args);
}

}  // namespace

FusedPlan plan_fused(DType x, DType out, DType weight, int head_dim, long long heads, bool has_pe,
                     bool has_norm, bool vector) {
  FusedPlan plan;
  plan.x = x;
  plan.out = out;
  plan.weight = has_norm ? weight : DType::f32;
  plan.head_dim = head_dim;
  plan.has_pe = has_pe;
  plan.has_norm = has_norm;
  plan.vector = vector;
  plan.ept = vector ? vector_ept(x, head_dim) : 2;
  const rope_heads::HeadBlock block = rope_heads::head_block(head_dim / plan.ept, heads);
  plan.lanes = block.lanes;
  plan.head_groups = block.head_groups;
  plan.hpt = block.hpt;
  return plan;
}

jit::KernelSpec fused_spec(const FusedPlan& plan) {
  return {kFusedSource,
          "kiln::rope_flux_kernel",
          {{"Tin", jit::cpp_type(kOp, plan.x)},
           {"Tout", jit::cpp_type(kOp, plan.out)},
           {"Tw", jit::cpp_type(kOp, plan.weight)},
           {"D", std::to_string(plan.head_dim)},
           {"EPT", std::to_string(plan.ept)},
           {"LANES", std::to_string(plan.lanes)},
           {"HEAD_GROUPS", std::to_string(plan.head_groups)},
           {"HPT", std::to_string(plan.hpt)},
           {"VECTOR", jit::cpp_bool(plan.vector)},
           {"HAS_PE", jit::cpp_bool(plan.has_pe)},
           {"HAS_NORM", jit::cpp_bool(plan.has_norm)}}};
}

// Kernel variants a workload needs ("flux": Flux.1 and Flux.2, 24 heads of 128; "flux-unfused":
// the stages of the unfused chain); jit/variants.hpp.
std::vector<jit::KernelSpec> variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  const DType floats[] = {DType::f32, DType::bf16, DType::f16};
  if (workload == "flux-unfused") {
    for (DType x : floats) {
      for (DType other : floats) {
        specs.push_back(norm_stage_spec(x, other));
        specs.push_back(permute_stage_spec(x, other));
      }
      specs.push_back(rotate_stage_spec(x));
    }
    return specs;
  }
  if (workload != "flux") return specs;
  // Flux.1 and Flux.2: 24 heads of 128. Q and K take norm + rotation, V the permute alone.
  constexpr int kHeadDim = 128;
  constexpr int kHeads = 24;
  for (DType x : floats) {
    for (DType out : floats) {
      for (bool norm : {false, true}) {
        specs.push_back(
            fused_spec(plan_fused(x, out, DType::bf16, kHeadDim, kHeads, true, norm, true)));
      }
      specs.push_back(
          fused_spec(plan_fused(x, out, DType::f32, kHeadDim, kHeads, false, false, true)));
    }
  }
  return specs;
}

}  // namespace rope_flux_detail

void rope_flux(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
               const RopeFluxOptions& options, Stream stream) {
  using namespace rope_flux_detail;
  validate(x, pe, out, options);
  const TensorView* weight = options.norm_weight ? &*options.norm_weight : nullptr;
  const Device device = check::common_device(
      kOp, {{"x", &x}, {"pe", pe ? &*pe : nullptr}, {"out", &out}, {"norm_weight", weight}});
  if (out.numel() == 0) return;
  if (device.type == DeviceType::cpu) {
    reference(x, pe, out, options);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);
  if (log::op_disabled(kOp)) {
    run_unfused(x, pe, out, options, stream);
  } else {
    run_fused(x, pe, out, options, stream);
  }
}

}  // namespace kiln
