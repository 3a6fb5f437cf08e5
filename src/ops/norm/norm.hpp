// norm internals: the CPU references, the kernel plans and the JIT variant list.
#pragma once

#include <string>
#include <vector>

#include "jit/kernel_spec.hpp"
#include "kiln/norm.hpp"

namespace kiln::norm_detail {

// The CPU backend and the oracle of every GPU test: plain loops, f32 math, the reductions (sum of
// squares, mean, variance) accumulated in f64; fp8 outputs through matmul_detail::
// quantize_row_fp8 on the row's f32 results. Arguments already validated.
void rms_norm_reference(const TensorView& x, const TensorView& out, const RmsNormOptions& options);
void layer_norm_reference(const TensorView& x, const TensorView& out,
                          const LayerNormOptions& options);
void group_norm_reference(const TensorView& x, const TensorView& out,
                          const GroupNormOptions& options);

// The specialization of norm_kernel (kernels/norm.cuh) for one call.
struct NormPlan {
  int kind = 0;  // kNormRms or kNormLayer
  DType x = DType::bf16;
  DType out = DType::bf16;    // f32/f16/bf16, or fp8 (per-row scales)
  DType weight = DType::f32;  // weight and bias (f32 when neither is given)
  DType mod = DType::f32;     // shift and scale (f32 when neither is given)
  int dim = 0;                // D
  int ept = 1;                // elements a chunk
  int tpr = 1;                // threads a row
  int rows = 1;               // rows a block
  bool vector = false;        // EPT-element vector accesses
  bool has_weight = false, has_bias = false, has_shift = false, has_scale = false;
};

// The plan for rows of D elements; `vector` says whether the operands allow EPT-element accesses
// (vector_ept(x, D) elements; scalar accesses otherwise).
NormPlan plan_norm(int kind, DType x, DType out, DType weight, DType mod, int dim, bool vector,
                   bool has_weight, bool has_bias, bool has_shift, bool has_scale);
jit::KernelSpec norm_spec(const NormPlan& plan);

// group_norm's two kernels (kernels/group_norm.cuh) for one call.
struct GroupNormPlan {
  DType x = DType::bf16;
  DType out = DType::bf16;
  DType weight = DType::f32;  // weight and bias (f32 when neither is given)
  bool nhwc = false;          // channels-last memory
  int ept = 1;
  bool vector = false;
  bool has_weight = false, has_bias = false, silu = false;
};
jit::KernelSpec group_norm_stats_spec(const GroupNormPlan& plan);
jit::KernelSpec group_norm_apply_spec(const GroupNormPlan& plan);

// Kernel variants a workload needs: "flux" (Flux.1 / Flux.2 LayerNorm + AdaLN at hidden 3072 and
// 4096), "flux-vae" (the VAE decoder's GroupNorm + SiLU at 512 / 256 / 128 channels), "llm"
// (RMSNorm at hidden 4096).
std::vector<jit::KernelSpec> variants(const std::string& workload);

}  // namespace kiln::norm_detail
