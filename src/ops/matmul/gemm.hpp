// The tensor-core GEMM's plan (kernels/gemm.cuh): what the launcher picks for a problem, as a
// value the tile sweep (and the JIT variant lists) can build and launch directly.
#pragma once

#include <cstdint>
#include <string>

#include "jit/kernel_spec.hpp"
#include "ops/matmul/matmul.hpp"

namespace kiln::matmul_detail {

// A CTA tile of the GEMM: BM x BN outputs, WARPS_M x WARPS_N warps, a STAGES-deep ring of
// k-tiles of 64.
struct GemmTile {
  int bm = 128;
  int bn = 128;
  int warps_m = 2;
  int warps_n = 4;
  int stages = 4;

  int threads() const { return warps_m * warps_n * 32; }
  bool operator==(const GemmTile&) const = default;
};

struct GemmPlan {
  int a_kind = 0;  // gemm_kind::*
  int w_kind = 0;
  DType mma = DType::bf16;  // f16 or bf16: the type a and w are converted to
  DType out = DType::bf16;
  GemmTile tile;
  bool a_async = false;  // cp.async of a (else loaded and converted by the lanes)
  bool w_async = false;  // cp.async of w (else gathered)
  int w_scale = 0;       // gemm_scale::*
  bool a_row_scale = false;
  int bias = 0;      // gemm_bias::*
  int gate = 0;      // kOperand* (params.cuh)
  int residual = 0;  // kOperand*

  std::size_t smem_bytes() const;
};

// The plan launch_gemm runs for `problem` (tile from the measured table in launch_gemm.cpp).
GemmPlan plan_gemm(const MatmulProblem& problem);
// The same problem with another tile (the sweep); the tile must satisfy the kernel's limits.
GemmPlan plan_gemm(const MatmulProblem& problem, const GemmTile& tile);
jit::KernelSpec gemm_spec(const GemmPlan& plan);
void launch_gemm_plan(const MatmulProblem& problem, const GemmPlan& plan);
// Whether launch_gemm hands this problem to cuBLASLt: a dequantized prepared weight (bf16) with
// bf16 a, bf16 / f32 out, a bias of out's dtype and 16-byte aligned operands. Otherwise it runs
// the mma.sync kernel.
bool gemm_runs_cublaslt(const MatmulProblem& problem);

// The Hopper weight-only GEMM (kernels/gemm_sm90.cuh): f16 / bf16 a, fp8 weights, on sm_90a;
// launch_gemm runs it wherever gemm_sm90_unsupported is "".
struct GemmSm90Plan {
  int bt = 256;             // tokens per block (64, 128 or 256); the ring depth follows from it
  int splits = 1;           // split-K slices (blockIdx.z); > 1 adds the split epilogue
  int tiles_per_split = 0;  // 64-wide k-tiles per slice
  std::int64_t units = 0;   // work units: weight tiles x token tiles x slices
  int blocks = 0;           // the persistent grid: min(units, SMs)
};
std::string gemm_sm90_unsupported(const MatmulProblem& problem);
GemmSm90Plan plan_gemm_sm90(const MatmulProblem& problem);
jit::KernelSpec gemm_sm90_spec(const MatmulProblem& problem, const GemmSm90Plan& plan);
void launch_gemm_sm90(const MatmulProblem& problem);

// The packed layout (prepare_weight for the gemm path): rows of the weight's own elements padded
// to 16 bytes, zero-filled; for q8_0 an int8 [N, K] matrix, then (at a 16-byte boundary) the f16
// block scales as f32 [ceil(K/64)][2][round_up(N, 4)] (k-tile, 32-block in it, row).
std::int64_t packed_row_bytes(WeightFormat format, std::int64_t k);
std::int64_t packed_q8_scale_offset(std::int64_t n, std::int64_t k);
std::int64_t packed_q8_n_pad(std::int64_t n);

}  // namespace kiln::matmul_detail
