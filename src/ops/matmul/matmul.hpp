// matmul internals: host fp8/Q8_0 codecs, the CPU reference, the problem description every CUDA
// path receives, and the entry points each path's file implements.
//
//   launch.cpp (validation, dispatch), launch_quantize.cpp, launch_gemv.cpp (gemv),
//   reference.cpp, launch_gemm.cpp (launch_gemm), fp8_native.cpp (launch_fp8_native,
//   fp8_native_supported), select.cpp (select_path_cuda and its measured thresholds),
//   prepare.cpp (prepared_weight_bytes, prepare_weight: the public functions).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "jit/kernel_spec.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/kernels/params.cuh"

namespace kiln::matmul_detail {

// ---- small shared helpers -----------------------------------------------------------------------

// ceil(a / b) for positive b.
inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// ---- formats (host side; the device side is src/device/fp8.cuh) ---------------------------------

inline constexpr int kQ8Block = 32;       // values per Q8_0 block
inline constexpr int kQ8BlockBytes = 34;  // f16 d + 32 int8
inline constexpr int kScaleBlock = 128;   // side of a block128 scale tile
inline constexpr float kE4m3Max = 448.f;
inline constexpr float kE5m2Max = 57344.f;

// Decodes one fp8 code of `format` (f8_e4m3fn or f8_e5m2) to f32 (exact).
float fp8_to_float(std::uint8_t code, DType format);
// Encodes to `format`: round to nearest even, saturate to +-max (inf too), NaN -> NaN.
std::uint8_t float_to_fp8(float value, DType format);
// Largest finite value of an fp8 format.
float fp8_max(DType format);
// Row r of a contiguous [R, C] `out` from C f32 values y: rounded to out's dtype (f32/f16/bf16),
// or, for an fp8 out, quantized with the row's own scale as quantize_fp8_reference does per row
// (scale = amax / fp8_max, 1 for an all-zero row; codes = float_to_fp8(y / scale)), the scale
// written to out_scale[r]. The CPU side of the fused per-token outputs of the norm and activation
// ops.
void store_row_reference(const TensorView& out, float* out_scale, std::int64_t r,
                         std::span<const float> y);
bool is_fp8(DType dtype);
DType fp8_dtype(WeightFormat format);  // f8_e4m3fn or f8_e5m2 (fp8 formats only)
bool is_fp8(WeightFormat format);
// The dtype a row-major weight's data has: the format's, or u8 for Q8_0 blocks.
DType storage_dtype(WeightFormat format);
// "sm_90a" -> 90.
int arch_number(const std::string& arch);
// Bytes of one row of a row-major weight: K * element size, or K / 32 * 34 for q8_0.
std::int64_t weight_row_bytes(WeightFormat format, std::int64_t k);
// One Q8_0 block: `x` 32 values -> 34 bytes, exactly as ggml's quantize_row_q8_0_ref.
void quantize_q8_0_block(const float* x, std::uint8_t* block);

// ---- scales -------------------------------------------------------------------------------------

enum class ScaleKind : int { none = 0, tensor = 1, row = 2, block128 = 3 };

// The kind of a scale view for a quantized matrix [rows, cols]; throws kiln::Error naming `op`
// and `arg` when the shape is none of [1], [rows], [ceil(rows/128), ceil(cols/128)].
ScaleKind scale_kind(const char* op, const char* arg, const TensorView& scale, std::int64_t rows,
                     std::int64_t cols, bool allow_block);
// The expected shape of a scale of `granularity` for [rows, cols].
std::vector<std::int64_t> scale_shape(ScaleGranularity granularity, std::int64_t rows,
                                      std::int64_t cols);

// Checks a Weight (data shape, dtype, contiguity, format, scale) and throws kiln::Error naming
// `op`. Prepared layouts are checked for storage dtype and device only.
void validate_weight(const char* op, const Weight& w);

// ---- the CPU backend (arguments already validated) ----------------------------------------------

void quantize_fp8_reference(const TensorView& x, const TensorView& q, const TensorView& scale,
                            ScaleGranularity granularity, bool compute_scale);
void quantize_q8_0_reference(const TensorView& x, const TensorView& q);
void dequantize_reference(const TensorView& q, const std::optional<TensorView>& scale,
                          const TensorView& out);
// f64 accumulation over weights dequantized to f32 (q * scale rounded to f32, as `dequantize`
// to f32 gives them); a dequantized to f32 likewise; epilogue
// out = residual + gate * (sum * a_scale + bias) in f64, rounded once to out's dtype. Row-major
// weights only. out may be the residual itself (read before written, element by element).
void matmul_reference(const TensorView& a, const Weight& w, const TensorView& out,
                      const MatmulOptions& options);

// ---- one matmul, as every CUDA path receives it -------------------------------------------------

// out [M, N] = residual + gate * ((a [M, K] . w^T) * a_scale * w_scale + bias). Validated by
// launch.cpp: M, N, K > 0, all pointers on `device`, the path supports the dtypes.
struct MatmulProblem {
  std::int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;  // [M, K], element (i, j) at a + i * a_row_stride + j
  DType a_dtype = DType::bf16;
  std::int64_t a_row_stride = 0;  // in elements
  const void* w = nullptr;        // Weight::data
  WeightFormat w_format = WeightFormat::bf16;
  WeightLayout w_layout = WeightLayout::row_major;
  std::int64_t w_row_bytes = 0;  // row_major: bytes from row n to row n + 1
  const float* w_scale = nullptr;
  ScaleKind w_scale_kind = ScaleKind::none;  // block128: [ceil(N/128), ceil(K/128)] row-major
  const float* a_scale = nullptr;
  ScaleKind a_scale_kind = ScaleKind::none;  // none, tensor or row ([M])
  const void* bias = nullptr;                // [N] or nullptr
  DType bias_dtype = DType::f32;
  void* out = nullptr;  // [M, N] contiguous
  DType out_dtype = DType::bf16;
  const void* gate = nullptr;  // [B, N] rows gate_stride apart ([N]: gate_stride 0), or nullptr
  DType gate_dtype = DType::f32;
  std::int64_t gate_stride = 0;
  std::int64_t gate_rows = 1;      // output rows a gate row covers (M / B)
  const void* residual = nullptr;  // [M, N] rows residual_stride apart (may be out), or nullptr
  DType residual_dtype = DType::f32;
  std::int64_t residual_stride = 0;
  int device = 0;
  std::string arch;  // cuda_arch(device): "sm_90a", "sm_80", ...
  Stream stream = nullptr;
};

// The epilogue operand kind (kOperandNone, kOperandF32, ...) of an optional bias / gate / residual.
int operand_kind(const void* data, DType dtype);
// The kernels' view of a problem's gate and residual.
GateResidual gate_residual_of(const MatmulProblem& problem);

// ---- path entry points --------------------------------------------------------------------------

// The fused small-M kernel (launch_gemv.cpp): M <= kGemvMaxM, row-major weights, any format;
// a f32/f16/bf16, or fp8 with an fp8 weight.
inline constexpr std::int64_t kGemvMaxM = 16;
void launch_gemv(const MatmulProblem& problem);
// Why gemv cannot run this problem ("" when it can): M too large, prepared layout.
std::string gemv_unsupported(const MatmulProblem& problem);

// Split-K: out = (the f32 partial sums [splits, M, N] added in split order) * tensor / row scales
// + bias (launch_gemv.cpp); splits = 0 writes out = bias (or 0).
void launch_split_epilogue(const MatmulProblem& problem, const float* partial, std::int64_t splits);

// The tensor-core GEMM (launch_gemm.cpp): any M, row-major or gemm_packed weights.
void launch_gemm(const MatmulProblem& problem);
// Why the GEMM cannot run this problem ("" when it can).
std::string gemm_unsupported(const MatmulProblem& problem);

// The epilogue after a cuBLASLt product written in f32 [M, N] (fp8_native.cpp): out = residual +
// gate * (product * a_scale * w_scale + bias), one pass, rounded once. `scales`: whether the
// problem's tensor / row scales are still to be applied (false when cuBLASLt applied them).
void launch_product_epilogue(const MatmulProblem& problem, const float* product, bool scales);

// fp8 x fp8 on sm_90 (fp8_native.cpp).
void launch_fp8_native(const MatmulProblem& problem);
// Why fp8_native cannot run this problem ("" when it can): arch, dtypes, alignment.
std::string fp8_native_unsupported(const MatmulProblem& problem);

// What `automatic` picks on a CUDA device of `arch` (select.cpp, thresholds measured on the
// GPU). Never returns automatic or reference; must pick a path whose *_unsupported() is "" for
// every problem with these parameters and aligned pointers.
MatmulPath select_path_cuda(std::int64_t m, std::int64_t n, std::int64_t k, WeightFormat format,
                            WeightLayout layout, DType a_dtype, const std::string& arch);

// ---- JIT variants (variants() itself: jit/variants.hpp) -----------------------------------------

// The GEMM kernels' variants a workload needs (launch_gemm.cpp).
std::vector<jit::KernelSpec> gemm_variants(const std::string& workload);
// The fp8_native path's own kernels (scale vectors, the product's epilogue; fp8_native.cpp).
std::vector<jit::KernelSpec> fp8_native_variants(const std::string& workload);
// quantize / dequantize kernels for inputs (and outputs) of dtype x (launch_quantize.cpp).
std::vector<jit::KernelSpec> quantize_variants(DType x);
// The GEMV kernel `launch_gemv` runs for `problem` with aligned pointers (launch_gemv.cpp).
jit::KernelSpec gemv_spec_for(const MatmulProblem& problem);

}  // namespace kiln::matmul_detail
