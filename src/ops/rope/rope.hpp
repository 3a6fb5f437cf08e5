// rope internals: the CPU reference, the kernel plan and the JIT variant list.
#pragma once

#include <string>
#include <vector>

#include "jit/kernel_spec.hpp"
#include "kiln/rope.hpp"

namespace kiln::rope_detail {

// The CPU backend and the oracle of every GPU test: plain loops, f32 math, angles and cos/sin in
// f64, the RMSNorm sum of squares accumulated in f64. Arguments already validated; out is [N, H,
// S, D] with its own strides; at_positions: row (n, t, h) goes to out[n, h, positions[n, t]]
// (positions checked against S here), otherwise to out[n, h, t].
void reference(const TensorView& x, const TensorView& positions, const TensorView& out,
               bool at_positions, const RopeOptions& options);

// The kernel's specialization: what the JIT compiles for one call.
struct Plan {
  DType x = DType::f32;
  DType out = DType::f32;
  DType weight = DType::f32;     // norm weight dtype (unused without norm)
  DType positions = DType::i32;  // i32 or i64
  int head_dim = 0;              // D
  RopeStyle style = RopeStyle::normal;
  bool rotate = false;
  bool norm = false;
  bool vector = false;  // 16-byte loads of x (alignment and strides allow it)
  int pairs = 1;        // P: pairs per lane and chunk
  int lanes = 1;        // lanes per row
  int head_groups = 1;  // rows in flight per block
  int hpt = 1;          // heads per thread

  int threads() const { return lanes * head_groups; }
};

// P of the vector path: 16 bytes of x per chunk (two 16-byte halves for neox).
int vector_pairs(DType x, RopeStyle style);
Plan plan_kernel(DType x, DType out, DType weight, DType positions, int head_dim, long long heads,
                 RopeStyle style, bool rotate, bool norm, bool vector);
jit::KernelSpec kernel_spec(const Plan& plan);

}  // namespace kiln::rope_detail
