// norm family: argument checks, dispatch by device, kernel plans and launches, variant lists.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "core/rows.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "ops/norm/kernels/params.cuh"
#include "ops/norm/norm.hpp"

namespace kiln {
namespace norm_detail {
namespace {

constexpr const char* kRowSource = "ops/norm/kernels/norm.cuh";
constexpr const char* kGroupSource = "ops/norm/kernels/group_norm.cuh";
constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::f16, DType::bf16};
// Elements of a group_norm block's slice: enough work a block that the partial sums stay few.
constexpr std::int64_t kGroupSliceElems = 16384;
constexpr int kGroupThreads = 256;  // group_norm.cuh's kGroupNormThreads (NCHW blocks)
constexpr std::int64_t kMaxGroups = 4096;

// Whether a [D] vector, or rows of one `row_stride` apart, allow `ept`-element accesses.
bool vector_ok(const void* data, DType dtype, int ept, std::int64_t row_stride = 0) {
  return vector_aligned(data, dtype, ept) && row_stride % ept == 0;
}

void check_eps(const char* op, float eps) {
  if (!std::isfinite(eps) || !(eps >= 0.f)) {
    check::fail(op, ErrorCode::invalid_argument,
                "eps = " + std::to_string(eps) + ", expected a finite value >= 0");
  }
}

// A per-channel vector (weight or bias) [C], contiguous, f32/f16/bf16.
void check_vector(const char* op, const char* arg, const TensorView& v, std::int64_t size,
                  const char* why) {
  check::dtype_in(op, arg, v, kFloat);
  const std::int64_t shape[] = {size};
  check::shape(op, arg, v, shape, why);
  check::contiguous(op, arg, v);
  check::non_null(op, arg, v);
}

// weight and bias share a dtype when both are given.
void check_same_dtype(const char* op, const char* a, const std::optional<TensorView>& va,
                      const char* b, const std::optional<TensorView>& vb) {
  if (va && vb && va->dtype() != vb->dtype()) {
    check::fail(op, ErrorCode::invalid_argument,
                std::string(b) + " has dtype " + dtype_name(vb->dtype()) +
                    ", expected the dtype of " + a + " (" + dtype_name(va->dtype()) + ")");
  }
}

// x [..., D] (unit stride along D) and out (x's shape, contiguous, 16/32-bit or fp8 with
// out_scale [R]). Returns whether out is fp8.
bool check_rows(const char* op, const TensorView& x, const TensorView& out,
                const std::optional<TensorView>& out_scale) {
  if (x.dim() < 1) {
    check::fail(op, ErrorCode::invalid_argument, "x has 0 dims, expected [..., D]");
  }
  check::dtype_in(op, "x", x, kFloat);
  const std::int64_t D = x.size(x.dim() - 1);
  if (D > 1 && x.numel() > 0 && x.stride(x.dim() - 1) != 1) {
    check::fail(op, ErrorCode::invalid_argument,
                "x has stride " + std::to_string(x.stride(x.dim() - 1)) + " along D (shape " +
                    x.shape_str() + "), expected 1 (rows may be strided, D contiguous)");
  }
  check::shape(op, "out", out, x.shape(), "the shape of x");
  check::contiguous(op, "out", out);
  const bool fp8 = check::row_scaled_out(op, out, out_scale, row_layout(x).rows);
  check::non_null(op, "x", x);
  check::non_null(op, "out", out);
  check::no_overlap(op, "out", out, "x", x);
  if (out_scale) {
    check::non_null(op, "out_scale", *out_scale);
    check::no_overlap(op, "out_scale", *out_scale, "x", x);
    check::no_overlap(op, "out_scale", *out_scale, "out", out);
  }
  return fp8;
}

// An input the output must not overlap (weight, bias, modulation).
void check_input(const char* op, const char* arg, const TensorView& v, const TensorView& out,
                 const std::optional<TensorView>& out_scale) {
  check::no_overlap(op, "out", out, arg, v);
  if (out_scale) check::no_overlap(op, "out_scale", *out_scale, arg, v);
}

// A modulation vector: [D] contiguous, or [B, D] (B = x.size(0), x of 2+ dims) with unit stride
// along D.
void check_modulation(const char* op, const char* arg, const TensorView& v, const TensorView& x) {
  const std::int64_t D = x.size(x.dim() - 1);
  check::dtype_in(op, arg, v, kFloat);
  check::non_null(op, arg, v);
  if (v.dim() == 1) {
    const std::int64_t shape[] = {D};
    check::shape(op, arg, v, shape, "[D] or [B, D] with D = x's last size");
    check::contiguous(op, arg, v);
    return;
  }
  if (v.dim() != 2 || x.dim() < 2 || v.size(0) != x.size(0) || v.size(1) != D) {
    check::fail(
        op, ErrorCode::invalid_argument,
        std::string(arg) + " has shape " + v.shape_str() + ", expected [" + std::to_string(D) +
            "] or [" + (x.dim() >= 2 ? std::to_string(x.size(0)) : "B") + ", " + std::to_string(D) +
            "] for x of shape " + x.shape_str() + " (one vector per index of x's first dim)");
  }
  if (D > 1 && v.size(0) > 0 && v.stride(1) != 1) {
    check::fail(op, ErrorCode::invalid_argument,
                std::string(arg) + " has stride " + std::to_string(v.stride(1)) +
                    " along D, expected 1 (rows may be strided)");
  }
}

// The CUDA side of rms_norm and layer_norm.
struct RowCall {
  int kind = kNormRms;
  const TensorView* x = nullptr;
  const TensorView* out = nullptr;
  const TensorView* weight = nullptr;
  const TensorView* bias = nullptr;
  const TensorView* shift = nullptr;
  const TensorView* scale = nullptr;
  float* out_scale = nullptr;
  float eps = 0.f;
};

void run_rows(const char* op, const RowCall& call, Stream stream) {
  const TensorView& x = *call.x;
  const TensorView& out = *call.out;
  const std::int64_t D = x.size(x.dim() - 1);
  RowLaunch launch = row_launch(op, x, out, D);
  const TensorView* vectors[] = {call.weight, call.bias, call.shift, call.scale};
  for (const TensorView* v : vectors) {
    if (v != nullptr) {
      launch.vector = launch.vector && vector_ok(v->data(), v->dtype(), launch.ept,
                                                 v->dim() == 2 ? v->stride(0) : 0);
    }
  }
  log_scalar_rows(op, launch, D);
  const RowLayout& layout = launch.layout;
  const DType weight =
      call.weight ? call.weight->dtype() : (call.bias ? call.bias->dtype() : DType::f32);
  const DType mod =
      call.shift ? call.shift->dtype() : (call.scale ? call.scale->dtype() : DType::f32);
  const NormPlan plan = plan_norm(call.kind, x.dtype(), out.dtype(), weight, mod, int(D),
                                  launch.vector, call.weight != nullptr, call.bias != nullptr,
                                  call.shift != nullptr, call.scale != nullptr);
  const unsigned blocks = row_blocks(op, layout, plan.rows);
  NormParams p{};
  p.x = x.data();
  p.weight = call.weight ? call.weight->data() : nullptr;
  p.bias = call.bias ? call.bias->data() : nullptr;
  p.shift = call.shift ? call.shift->data() : nullptr;
  p.scale = call.scale ? call.scale->data() : nullptr;
  p.out = out.data();
  p.out_scale = call.out_scale;
  p.layout = layout;
  const bool batched =
      (call.shift && call.shift->dim() == 2) || (call.scale && call.scale->dim() == 2);
  p.rows_per_batch = batched ? layout.rows / x.size(0) : layout.rows;
  p.shift_stride = call.shift && call.shift->dim() == 2 ? call.shift->stride(0) : 0;
  p.scale_stride = call.scale && call.scale->dim() == 2 ? call.scale->stride(0) : 0;
  p.eps = call.eps;
  const auto kernel = jit::process_cache().kernel(norm_spec(plan), x.device().index);
  void* args[] = {&p};
  jit::launch(op, kernel, dim3(blocks), dim3(unsigned(plan.tpr * plan.rows)), 0, stream, args);
}

// x's memory format: NCHW-contiguous (true) or channels-last (false); anything else is an error.
bool dense_nchw(const TensorView& t) { return t.is_contiguous(); }

bool dense_nhwc(const TensorView& t) {
  const std::int64_t shape[] = {t.size(0), t.size(2), t.size(3), t.size(1)};
  const std::int64_t strides[] = {t.stride(0), t.stride(2), t.stride(3), t.stride(1)};
  return TensorView(t.data(), t.dtype(), shape, strides, t.device()).is_contiguous();
}

}  // namespace

NormPlan plan_norm(int kind, DType x, DType out, DType weight, DType mod, int dim, bool vector,
                   bool has_weight, bool has_bias, bool has_shift, bool has_scale) {
  NormPlan plan;
  plan.kind = kind;
  plan.x = x;
  plan.out = out;
  plan.weight = has_weight || has_bias ? weight : DType::f32;
  plan.mod = has_shift || has_scale ? mod : DType::f32;
  plan.dim = dim;
  plan.vector = vector;
  plan.ept = vector ? vector_ept(x, dim) : 1;
  const RowThreads threads = row_threads(dim, plan.ept);
  plan.tpr = threads.tpr;
  plan.rows = threads.rows;
  plan.has_weight = has_weight;
  plan.has_bias = has_bias;
  plan.has_shift = has_shift;
  plan.has_scale = has_scale;
  return plan;
}

jit::KernelSpec norm_spec(const NormPlan& plan) {
  constexpr const char* kOp = "norm";
  return {kRowSource,
          "kiln::norm_kernel",
          {{"KIND", std::to_string(plan.kind)},
           {"Tin", jit::cpp_type(kOp, plan.x)},
           {"Tout", jit::cpp_type(kOp, plan.out)},
           {"Tw", jit::cpp_type(kOp, plan.weight)},
           {"Tm", jit::cpp_type(kOp, plan.mod)},
           {"D", std::to_string(plan.dim)},
           {"EPT", std::to_string(plan.ept)},
           {"TPR", std::to_string(plan.tpr)},
           {"ROWS", std::to_string(plan.rows)},
           {"VECTOR", jit::cpp_bool(plan.vector)},
           {"HAS_WEIGHT", jit::cpp_bool(plan.has_weight)},
           {"HAS_BIAS", jit::cpp_bool(plan.has_bias)},
           {"HAS_SHIFT", jit::cpp_bool(plan.has_shift)},
           {"HAS_SCALE", jit::cpp_bool(plan.has_scale)}}};
}

jit::KernelSpec group_norm_stats_spec(const GroupNormPlan& plan) {
  return {kGroupSource,
          "kiln::group_norm_stats",
          {{"Tin", jit::cpp_type("group_norm", plan.x)},
           {"NHWC", jit::cpp_bool(plan.nhwc)},
           {"EPT", std::to_string(plan.ept)},
           {"VECTOR", jit::cpp_bool(plan.vector)}}};
}

jit::KernelSpec group_norm_apply_spec(const GroupNormPlan& plan) {
  constexpr const char* kOp = "group_norm";
  return {kGroupSource,
          "kiln::group_norm_apply",
          {{"Tin", jit::cpp_type(kOp, plan.x)},
           {"Tout", jit::cpp_type(kOp, plan.out)},
           {"Tw", jit::cpp_type(kOp, plan.weight)},
           {"NHWC", jit::cpp_bool(plan.nhwc)},
           {"EPT", std::to_string(plan.ept)},
           {"VECTOR", jit::cpp_bool(plan.vector)},
           {"HAS_WEIGHT", jit::cpp_bool(plan.has_weight)},
           {"HAS_BIAS", jit::cpp_bool(plan.has_bias)},
           {"SILU", jit::cpp_bool(plan.silu)}}};
}

// Kernel variants a workload needs: "flux" (Flux.1 / Flux.2 LayerNorm + AdaLN at hidden 3072 and
// 4096), "flux-vae" (the VAE decoder's GroupNorm + SiLU at 512 / 256 / 128 channels), "llm"
// (RMSNorm at hidden 4096).
std::vector<jit::KernelSpec> variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  if (workload == "flux") {
    // Flux.1 / Flux.2 (hidden 3072; Flux.2 klein 9B 4096): LayerNorm without affine, then AdaLN
    // shift and scale of [B, D] (chunks of the modulation linear's output), bf16 out or fp8 for
    // the next GEMM; norm_out's scale-then-shift is the same kernel.
    for (int dim : {3072, 4096}) {
      for (DType out : {DType::bf16, DType::f8_e4m3fn}) {
        specs.push_back(norm_spec(plan_norm(kNormLayer, DType::bf16, out, DType::f32, DType::bf16,
                                            dim, true, false, false, true, true)));
      }
    }
    // Per-head RMSNorm (QK-norm, 24 heads of 128) outside rope_flux's fused one.
    specs.push_back(norm_spec(plan_norm(kNormRms, DType::bf16, DType::bf16, DType::bf16, DType::f32,
                                        128, true, true, false, false, false)));
  } else if (workload == "llm") {
    // Llama-3-8B / Qwen3-8B (hidden 4096): RMSNorm with an f32 (GGUF) or bf16 weight over a bf16
    // or f32 residual stream, bf16 out or fp8 for the next GEMM.
    for (DType x : {DType::bf16, DType::f32}) {
      for (DType weight : {DType::f32, DType::bf16}) {
        for (DType out : {DType::bf16, DType::f8_e4m3fn}) {
          specs.push_back(norm_spec(plan_norm(kNormRms, x, out, weight, DType::f32, 4096, true,
                                              true, false, false, false)));
        }
      }
    }
    // Qwen3's per-head QK RMSNorm (head dim 128), where it runs apart from the rope.
    specs.push_back(norm_spec(plan_norm(kNormRms, DType::bf16, DType::bf16, DType::f32, DType::f32,
                                        128, true, true, false, false, false)));
  } else if (workload == "flux-vae") {
    // The Flux VAE decoder's GroupNorm(32) (+ SiLU) at 512, 256 and 128 channels, bf16 or f32,
    // NCHW or channels-last: NCHW reads 16-byte chunks; channels-last chunks stay in one group
    // (C / G = 16, 8, 4 channels).
    for (DType x : {DType::bf16, DType::f32}) {
      for (bool nhwc : {false, true}) {
        for (std::int64_t channels : {512, 256, 128}) {
          GroupNormPlan plan;
          plan.x = x;
          plan.out = x;
          plan.weight = x;
          plan.nhwc = nhwc;
          plan.ept = nhwc ? vector_ept(x, channels / 32) : vector_ept(x, 1 << 14);
          plan.vector = true;
          plan.has_weight = plan.has_bias = true;
          specs.push_back(group_norm_stats_spec(plan));
          for (bool silu : {false, true}) {
            plan.silu = silu;
            specs.push_back(group_norm_apply_spec(plan));
          }
        }
      }
    }
  }
  return specs;
}

}  // namespace norm_detail

void rms_norm(const TensorView& x, const TensorView& out, const RmsNormOptions& options,
              Stream stream) {
  using namespace norm_detail;
  constexpr const char* kOp = "rms_norm";
  check_rows(kOp, x, out, options.out_scale);
  check_eps(kOp, options.eps);
  const std::int64_t D = x.dim() > 0 ? x.size(x.dim() - 1) : 0;
  if (options.weight) {
    check_vector(kOp, "weight", *options.weight, D, "D = x's last size");
    check_input(kOp, "weight", *options.weight, out, options.out_scale);
  }
  const Device device =
      check::common_device(kOp, {{"x", &x},
                                 {"out", &out},
                                 {"weight", options.weight ? &*options.weight : nullptr},
                                 {"out_scale", options.out_scale ? &*options.out_scale : nullptr}});
  if (out.numel() == 0) return;
  if (device.type == DeviceType::cpu) {
    rms_norm_reference(x, out, options);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);
  RowCall call;
  call.kind = kNormRms;
  call.x = &x;
  call.out = &out;
  call.weight = options.weight ? &*options.weight : nullptr;
  call.out_scale = options.out_scale ? static_cast<float*>(options.out_scale->data()) : nullptr;
  call.eps = options.eps;
  run_rows(kOp, call, stream);
}

void layer_norm(const TensorView& x, const TensorView& out, const LayerNormOptions& options,
                Stream stream) {
  using namespace norm_detail;
  constexpr const char* kOp = "layer_norm";
  check_rows(kOp, x, out, options.out_scale);
  check_eps(kOp, options.eps);
  const std::int64_t D = x.dim() > 0 ? x.size(x.dim() - 1) : 0;
  const std::pair<const char*, const std::optional<TensorView>*> vectors[] = {
      {"weight", &options.weight}, {"bias", &options.bias}};
  for (const auto& [name, v] : vectors) {
    if (!*v) continue;
    check_vector(kOp, name, **v, D, "D = x's last size");
    check_input(kOp, name, **v, out, options.out_scale);
  }
  check_same_dtype(kOp, "weight", options.weight, "bias", options.bias);
  const std::pair<const char*, const std::optional<TensorView>*> mods[] = {
      {"shift", &options.shift}, {"scale", &options.scale}};
  for (const auto& [name, v] : mods) {
    if (!*v) continue;
    check_modulation(kOp, name, **v, x);
    check_input(kOp, name, **v, out, options.out_scale);
  }
  check_same_dtype(kOp, "shift", options.shift, "scale", options.scale);
  const auto ptr = [](const std::optional<TensorView>& v) { return v ? &*v : nullptr; };
  const Device device = check::common_device(kOp, {{"x", &x},
                                                   {"out", &out},
                                                   {"weight", ptr(options.weight)},
                                                   {"bias", ptr(options.bias)},
                                                   {"shift", ptr(options.shift)},
                                                   {"scale", ptr(options.scale)},
                                                   {"out_scale", ptr(options.out_scale)}});
  if (out.numel() == 0) return;
  if (device.type == DeviceType::cpu) {
    layer_norm_reference(x, out, options);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);
  RowCall call;
  call.kind = kNormLayer;
  call.x = &x;
  call.out = &out;
  call.weight = ptr(options.weight);
  call.bias = ptr(options.bias);
  call.shift = ptr(options.shift);
  call.scale = ptr(options.scale);
  call.out_scale = options.out_scale ? static_cast<float*>(options.out_scale->data()) : nullptr;
  call.eps = options.eps;
  run_rows(kOp, call, stream);
}

void group_norm(const TensorView& x, const TensorView& out, const GroupNormOptions& options,
                Stream stream) {
  using namespace norm_detail;
  constexpr const char* kOp = "group_norm";
  check::dims(kOp, "x", x, 4);
  check::dtype_in(kOp, "x", x, kFloat);
  const std::int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const std::int64_t G = options.num_groups;
  if (G < 1 || C % G != 0) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "num_groups = " + std::to_string(G) + " for x of shape " + x.shape_str() +
                    ", expected a divisor of C = " + std::to_string(C));
  }
  check_eps(kOp, options.eps);
  const bool nchw = dense_nchw(x);
  if (!nchw && !dense_nhwc(x)) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "x has strides " + check::shape_str(x.strides()) + " for shape " + x.shape_str() +
                    ", expected contiguous NCHW or channels-last memory");
  }
  check::dtype_in(kOp, "out", out, kFloat);
  check::shape(kOp, "out", out, x.shape(), "the shape of x");
  if (nchw ? !dense_nchw(out) : !dense_nhwc(out)) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "out has strides " + check::shape_str(out.strides()) + ", expected x's memory " +
                    "format (" + (nchw ? "contiguous NCHW" : "channels-last") + ")");
  }
  check::non_null(kOp, "x", x);
  check::non_null(kOp, "out", out);
  check::no_overlap(kOp, "out", out, "x", x);
  const std::pair<const char*, const std::optional<TensorView>*> vectors[] = {
      {"weight", &options.weight}, {"bias", &options.bias}};
  for (const auto& [name, v] : vectors) {
    if (!*v) continue;
    check_vector(kOp, name, **v, C, "C = x's channels");
    check::no_overlap(kOp, "out", out, name, **v);
  }
  check_same_dtype(kOp, "weight", options.weight, "bias", options.bias);
  const auto ptr = [](const std::optional<TensorView>& v) { return v ? &*v : nullptr; };
  const Device device = check::common_device(
      kOp,
      {{"x", &x}, {"out", &out}, {"weight", ptr(options.weight)}, {"bias", ptr(options.bias)}});
  if (out.numel() == 0) return;
  if (device.type == DeviceType::cpu) {
    group_norm_reference(x, out, options);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);

  const std::int64_t hw = H * W, cg = C / G;
  GroupNormPlan plan;
  plan.x = x.dtype();
  plan.out = out.dtype();
  plan.weight = options.weight ? options.weight->dtype()
                               : (options.bias ? options.bias->dtype() : DType::f32);
  plan.nhwc = !nchw;
  plan.has_weight = options.weight.has_value();
  plan.has_bias = options.bias.has_value();
  plan.silu = options.silu;
  // NCHW: a chunk stays in one channel (H W a multiple); channels-last: in one group.
  const int ept = vector_ept(x.dtype(), plan.nhwc ? cg : hw);
  plan.vector = ept >= 2 && vector_ok(x.data(), x.dtype(), ept) &&
                vector_ok(out.data(), out.dtype(), ept) &&
                (!options.weight || vector_ok(options.weight->data(), plan.weight, ept)) &&
                (!options.bias || vector_ok(options.bias->data(), plan.weight, ept));
  plan.ept = plan.vector ? ept : 1;
  if (!plan.vector) {
    log::warning_once(
        "group_norm_scalar",
        "group_norm: operands not aligned for vector accesses (C = " + std::to_string(C) +
            ", H W = " + std::to_string(hw) + "): element-wise loads, slower than the vector path");
  }

  GroupNormParams p{};
  p.x = x.data();
  p.weight = options.weight ? options.weight->data() : nullptr;
  p.bias = options.bias ? options.bias->data() : nullptr;
  p.out = out.data();
  p.n = N;
  p.c = C;
  p.hw = hw;
  p.groups = G;
  p.eps = options.eps;
  dim3 grid, block;
  std::size_t apply_smem = 0;
  if (!plan.nhwc) {
    if (N * G > 65535) {
      check::fail(kOp, ErrorCode::unsupported,
                  "N * G = " + std::to_string(N * G) + ", expected at most 65535 on CUDA (NCHW)");
    }
    const std::int64_t run = cg * hw;
    const std::int64_t slices = (run + kGroupSliceElems - 1) / kGroupSliceElems;
    p.slice = ((run + slices - 1) / slices + plan.ept - 1) / plan.ept * plan.ept;
    p.slices = (run + p.slice - 1) / p.slice;
    grid = dim3(unsigned(p.slices), unsigned(N * G));
    block = dim3(kGroupThreads);
  } else {
    const std::int64_t cp = C / plan.ept;  // chunks a pixel
    if (cp > 1024 || G > kMaxGroups || N > 65535) {
      check::fail(kOp, ErrorCode::unsupported,
                  "x has C = " + std::to_string(C) + " (" + std::to_string(cp) +
                      " chunks a pixel), G = " + std::to_string(G) + ", N = " + std::to_string(N) +
                      "; channels-last on CUDA takes at most 1024 chunks, " +
                      std::to_string(kMaxGroups) + " groups and N <= 65535");
    }
    p.slice = std::max<std::int64_t>(1, kGroupSliceElems / C);
    p.slices = (hw + p.slice - 1) / p.slice;
    grid = dim3(unsigned(p.slices), unsigned(N));
    block = dim3(unsigned(cp * std::max<std::int64_t>(1, 256 / cp)));
    apply_smem = std::size_t(2 * G) * sizeof(float);
  }
  if (p.slices > INT_MAX) {
    check::fail(kOp, ErrorCode::unsupported, "x has too many slices for the grid");
  }
  cuda::StreamScratch partial(kOp, device.index, std::size_t(N * G * p.slices) * 2 * sizeof(float),
                              stream);
  p.partial = static_cast<float*>(partial.get());
  void* args[] = {&p};
  jit::launch(kOp, jit::process_cache().kernel(group_norm_stats_spec(plan), device.index), grid,
              block, 0, stream, args);
  jit::launch(kOp, jit::process_cache().kernel(group_norm_apply_spec(plan), device.index), grid,
              block, apply_smem, stream, args);
}

}  // namespace kiln
