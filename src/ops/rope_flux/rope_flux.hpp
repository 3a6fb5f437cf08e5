// rope_flux internals: the CPU reference, the kernel plans and the JIT variant list.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "jit/kernel_spec.hpp"
#include "kiln/rope_flux.hpp"

namespace kiln::rope_flux_detail {

// The CPU backend and the oracle of every GPU test: plain loops, f32 math, the RMSNorm sum of
// squares accumulated in f64. Arguments already validated.
void reference(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
               const RopeFluxOptions& options);

// The fused kernel's specialization: what the JIT compiles for one call.
struct FusedPlan {
  DType x = DType::f32;
  DType out = DType::f32;
  DType weight = DType::f32;  // norm weight dtype (unused without norm)
  int head_dim = 0;           // D
  bool has_pe = false;
  bool has_norm = false;
  bool vector = false;  // 16-byte loads and stores (alignment and strides allow it)
  int ept = 2;          // elements per lane and chunk
  int lanes = 1;        // lanes per row
  int head_groups = 1;  // rows in flight per block
  int hpt = 1;          // heads per thread

  int threads() const { return lanes * head_groups; }
};

FusedPlan plan_fused(DType x, DType out, DType weight, int head_dim, long long heads, bool has_pe,
                     bool has_norm, bool vector);
jit::KernelSpec fused_spec(const FusedPlan& plan);

}  // namespace kiln::rope_flux_detail
