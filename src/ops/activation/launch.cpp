// activation family: argument checks, dispatch by device, kernel plans and launches, variants.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/rows.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "ops/activation/activation.hpp"
#include "ops/activation/kernels/params.cuh"

namespace kiln {
namespace activation_detail {
namespace {

constexpr const char* kSource = "ops/activation/kernels/activation.cuh";

int act_value(Activation activation) {
  return activation == Activation::silu ? kActSilu : kActGeluTanh;
}

// x [..., 2F] (gated) or [..., F] with unit stride along the last dim, out [..., F] contiguous
// (16/32-bit, or fp8 with out_scale [R]).
void validate(const char* op, const TensorView& x, const TensorView& out, bool gated,
              const std::optional<TensorView>& out_scale) {
  if (x.dim() < 1) {
    check::fail(op, ErrorCode::invalid_argument,
                std::string("x has 0 dims, expected [..., ") + (gated ? "2F" : "F") + "]");
  }
  check::dtype_in(op, "x", x, {DType::f32, DType::f16, DType::bf16});
  const std::int64_t cols = x.size(x.dim() - 1);
  if (gated && cols % 2 != 0) {
    check::fail(op, ErrorCode::invalid_argument,
                "x has shape " + x.shape_str() + ", expected an even last size 2F (the gate " +
                    "half, then the linear half)");
  }
  if (cols > 1 && x.numel() > 0 && x.stride(x.dim() - 1) != 1) {
    check::fail(op, ErrorCode::invalid_argument,
                "x has stride " + std::to_string(x.stride(x.dim() - 1)) +
                    " along its last dim (shape " + x.shape_str() +
                    "), expected 1 (rows may be strided, the last dim contiguous)");
  }
  std::int64_t shape[kMaxDims];
  for (int d = 0; d < x.dim(); ++d) shape[d] = x.size(d);
  shape[x.dim() - 1] = gated ? cols / 2 : cols;
  check::shape(op, "out", out, std::span<const std::int64_t>(shape, std::size_t(x.dim())),
               gated ? "x's leading dims, then F = x's last size / 2" : "the shape of x");
  check::contiguous(op, "out", out);
  check::row_scaled_out(op, out, out_scale, row_layout(x).rows);
  check::non_null(op, "x", x);
  check::non_null(op, "out", out);
  check::no_overlap(op, "out", out, "x", x);
  if (out_scale) {
    check::non_null(op, "out_scale", *out_scale);
    check::no_overlap(op, "out_scale", *out_scale, "x", x);
    check::no_overlap(op, "out_scale", *out_scale, "out", out);
  }
}

void run(const char* op, const TensorView& x, const TensorView& out, Activation activation,
         bool gated, const std::optional<TensorView>& out_scale, Stream stream) {
  validate(op, x, out, gated, out_scale);
  const Device device = check::common_device(
      op, {{"x", &x}, {"out", &out}, {"out_scale", out_scale ? &*out_scale : nullptr}});
  if (out.numel() == 0) return;
  if (device.type == DeviceType::cpu) {
    reference(x, out, activation, gated, out_scale);
    return;
  }
  cuda::require_device(op, device);
  cuda::DeviceGuard guard(op, device.index);
  const std::int64_t F = out.size(out.dim() - 1);
  const RowLaunch launch = row_launch(op, x, out, F);
  log_scalar_rows(op, launch, F);
  const ActivationPlan plan =
      plan_activation(activation, gated, x.dtype(), out.dtype(), int(F), launch.vector);
  const unsigned blocks = row_blocks(op, launch.layout, plan.rows);
  ActivationParams p{};
  p.x = x.data();
  p.out = out.data();
  p.out_scale = out_scale ? static_cast<float*>(out_scale->data()) : nullptr;
  p.layout = launch.layout;
  const auto kernel = jit::process_cache().kernel(activation_spec(plan), device.index);
  void* args[] = {&p};
  jit::launch(op, kernel, dim3(blocks), dim3(unsigned(plan.tpr * plan.rows)), 0, stream, args);
}

}  // namespace

ActivationPlan plan_activation(Activation activation, bool gated, DType x, DType out, int cols,
                               bool vector) {
  ActivationPlan plan;
  plan.activation = activation;
  plan.gated = gated;
  plan.x = x;
  plan.out = out;
  plan.cols = cols;
  plan.vector = vector;
  plan.ept = vector ? vector_ept(x, cols) : 1;
  const RowThreads threads = row_threads(cols, plan.ept);
  plan.tpr = threads.tpr;
  plan.rows = threads.rows;
  return plan;
}

jit::KernelSpec activation_spec(const ActivationPlan& plan) {
  constexpr const char* kOp = "activation";
  return {kSource,
          "kiln::activation_kernel",
          {{"ACT", std::to_string(act_value(plan.activation))},
           {"GATED", jit::cpp_bool(plan.gated)},
           {"Tin", jit::cpp_type(kOp, plan.x)},
           {"Tout", jit::cpp_type(kOp, plan.out)},
           {"F", std::to_string(plan.cols)},
           {"EPT", std::to_string(plan.ept)},
           {"TPR", std::to_string(plan.tpr)},
           {"ROWS", std::to_string(plan.rows)},
           {"VECTOR", jit::cpp_bool(plan.vector)}}};
}

// Kernel variants a workload needs: "flux" (Flux.2 SwiGLU at 9216 / 12288, FLUX.1 GELU-tanh at
// 12288), "llm" (SwiGLU at Llama-3-8B's 14336 and Qwen3-8B's 12288).
std::vector<jit::KernelSpec> variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  const auto add = [&](Activation activation, bool gated, DType x, int cols) {
    for (DType out : {DType::bf16, DType::f8_e4m3fn}) {
      specs.push_back(activation_spec(plan_activation(activation, gated, x, out, cols, true)));
    }
  };
  if (workload == "flux") {
    // Flux.2 klein 4B / 9B: SwiGLU of MLP ratio 3 (F = 9216, 12288); FLUX.1: GELU-tanh at
    // F = 4 x 3072. bf16 activations, bf16 out or fp8 for the next GEMM.
    add(Activation::silu, true, DType::bf16, 9216);
    add(Activation::silu, true, DType::bf16, 12288);
    add(Activation::gelu_tanh, false, DType::bf16, 12288);
  } else if (workload == "llm") {
    // Llama-3-8B (F = 14336) and Qwen3-8B (12288): silu(gate) * up over the concatenated
    // gate / up projection, bf16 or f32 activations.
    for (DType x : {DType::bf16, DType::f32}) {
      add(Activation::silu, true, x, 14336);
      add(Activation::silu, true, x, 12288);
    }
  }
  return specs;
}

}  // namespace activation_detail

const char* activation_name(Activation activation) {
  return activation == Activation::silu ? "silu" : "gelu_tanh";
}

void glu(const TensorView& x, const TensorView& out, const GluOptions& options, Stream stream) {
  activation_detail::run("glu", x, out, options.activation, true, options.out_scale, stream);
}

void gelu_tanh(const TensorView& x, const TensorView& out, const GeluOptions& options,
               Stream stream) {
  activation_detail::run("gelu_tanh", x, out, Activation::gelu_tanh, false, options.out_scale,
                         stream);
}

}  // namespace kiln
