// conv2d internals: the CPU reference, the kernel plan and the JIT variant list.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "jit/kernel_spec.hpp"
#include "kiln/conv2d.hpp"

namespace kiln::conv2d_detail {

// The CPU backend and the oracle of every GPU test: plain loops over the output, products and
// their sum in f64, rounded once to out's dtype. Arguments already validated.
void reference(const TensorView& x, const TensorView& w, const std::optional<TensorView>& bias,
               const TensorView& out, const Conv2dOptions& options);

// One block tile of implicit_gemm_conv2d: (bm, bn, bk) over (m, oc, k), warps_m x warps_n warps,
// `stages` shared-memory stages.
struct TileConfig {
  int bm = 128;
  int bn = 128;
  int bk = 32;
  int warps_m = 2;
  int warps_n = 2;
  int stages = 4;
};

// The kernel's specialization for one call: what the JIT compiles.
struct Plan {
  DType x = DType::bf16;
  DType w = DType::bf16;
  DType bias = DType::f32;  // f32 when there is no bias
  DType out = DType::bf16;
  DType compute = DType::bf16;  // f16 or bf16: the mma operand type
  int kh = 3;
  int kw = 3;
  TileConfig tile;
  bool x_nhwc = true;       // k order (kh, kw, c) and channels-last A loads; else (c, kh, kw)
  bool row_chunks = false;  // NCHW with OW % 8 == 0: 8-pixel chunks lie in one output row
  bool x_async = true;      // A by cp.async (else strided register loads with conversion)
  bool w_async = true;      // B by cp.async
  bool im2col = true;       // false: 1x1, stride 1, no padding (a plain GEMM)
  bool out_nhwc = true;     // out is channels-last
  bool out_vec = true;      // 16-byte output stores
  bool has_bias = false;

  int threads() const { return tile.warps_m * tile.warps_n * 32; }
  int smem_bytes() const;
};

// The problem as the launcher sees it, after validation.
struct Problem {
  std::int64_t N, C, H, W, OC, KH, KW, OH, OW;
  Conv2dOptions options;
};

DType compute_type(DType x, DType w);
Problem problem_of(const TensorView& x, const TensorView& w, const Conv2dOptions& options);
// The plan for these (validated) CUDA tensors with the given tile.
Plan make_plan(const Problem& problem, const TensorView& x, const TensorView& w,
               const std::optional<TensorView>& bias, const TensorView& out,
               const TileConfig& tile);
// Enqueues the plan's kernel on `stream` (x's device current).
void launch(const Plan& plan, const Problem& problem, const TensorView& x, const TensorView& w,
            const std::optional<TensorView>& bias, const TensorView& out, Stream stream);
// The tile for a problem on a device with `sm_count` SMs: the heuristic documented in README.md.
TileConfig choose_tile(const Problem& problem, int sm_count);
jit::KernelSpec kernel_spec(const Plan& plan);

// The direct kernel for few output channels (direct.cuh): OC <= 16, stride 1, dilation 1, x not
// channels-last (x_nhwc false); any window up to 7x7, padding and dtypes, f32 arithmetic on CUDA
// cores; taken before the mma.sync kernel on every architecture.
bool direct_takes(const Problem& problem, bool x_nhwc);
void launch_direct(const Problem& problem, const TensorView& x, const TensorView& w,
                   const std::optional<TensorView>& bias, const TensorView& out, Stream stream);
jit::KernelSpec direct_spec(DType x, DType w, DType bias, DType out, int oc, int kh, int kw,
                            int channels, bool vec, bool out_nhwc, bool has_bias);

// The sm_90a kernel (implicit_gemm_sm90.cuh, launch_sm90.cpp): TMA im2col loads and wgmma. It
// takes a call on Hopper when x and w are both bf16 or both f16, C % 8 == 0, OC % 128 == 0, the
// window square (equal strides, padding and dilation on both dims) and out channels-last or with
// unit OW stride; the mma.sync kernel takes the rest. x and w in other layouts than channels-last
// (x with 16-byte strides) and OHWI are copied to those first, into workspaces of their sizes,
// except an NCHW x under a 1x1 conv (stride 1, no padding), read in place.
struct Sm90Layout {
  bool a_mn_major = false;  // a 1x1 conv of an NCHW x: A tiles read pixel-contiguous, in place
  bool x_copy = false;      // x into a channels-last workspace
  bool w_copy = false;      // w into an OHWI workspace
  bool out_nchw = false;    // out written NCHW (else channels-last contiguous)
};
std::optional<Sm90Layout> sm90_layout(const Problem& problem, const TensorView& x,
                                      const TensorView& w, const TensorView& out);
void launch_sm90(const Sm90Layout& layout, const Problem& problem, const TensorView& x,
                 const TensorView& w, const std::optional<TensorView>& bias, const TensorView& out,
                 int sm_count, Stream stream);
jit::KernelSpec sm90_spec(DType t, DType bias, DType out, int block_n, bool has_bias, bool out_nchw,
                          bool a_mn_major);
// The channels-last copy of x (weight = false; vec: 16-byte loads) or OHWI copy of w (true) for
// the sm_90a kernel.
jit::KernelSpec sm90_copy_spec(DType t, bool weight, bool vec);
// Output channels per tile of the sm_90a kernel for OC output channels (256 or 128).
int sm90_block_n(std::int64_t oc);

}  // namespace kiln::conv2d_detail
