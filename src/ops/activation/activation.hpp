// activation internals: the CPU reference, the kernel plan and the JIT variant list.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "jit/kernel_spec.hpp"
#include "kiln/activation.hpp"

namespace kiln::activation_detail {

// The CPU backend and the oracle of every GPU test: plain loops, f32 math (std::exp, std::tanh),
// fp8 outputs through matmul_detail::store_row_reference on each row's f32 results. `gated`:
// x holds 2F per row (glu). Arguments already validated.
void reference(const TensorView& x, const TensorView& out, Activation activation, bool gated,
               const std::optional<TensorView>& out_scale);

// The specialization of activation_kernel (kernels/activation.cuh) for one call.
struct ActivationPlan {
  Activation activation = Activation::silu;
  bool gated = true;
  DType x = DType::bf16;
  DType out = DType::bf16;  // f32/f16/bf16, or fp8 (per-row scales)
  int cols = 0;             // F: outputs a row
  int ept = 1;
  int tpr = 1;
  int rows = 1;
  bool vector = false;
};

ActivationPlan plan_activation(Activation activation, bool gated, DType x, DType out, int cols,
                               bool vector);
jit::KernelSpec activation_spec(const ActivationPlan& plan);

// Kernel variants a workload needs: "flux" (Flux.2 SwiGLU at 9216 / 12288, FLUX.1 GELU-tanh at
// 12288), "llm" (SwiGLU at Llama-3-8B's 14336 and Qwen3-8B's 12288).
std::vector<jit::KernelSpec> variants(const std::string& workload);

}  // namespace kiln::activation_detail
