// Quantized matmul: fp8 (e4m3fn, e5m2) and ggml Q8_0 weights. Quantize, dequantize, and
// out = (a . w^T) * scales + bias with the weight read in its quantized form.
//
// Formats (src/ops/matmul/README.md has the bit-level definitions):
//   f8_e4m3fn  OCP E4M3: bias 7, max 448, NaN = 0x7F/0xFF, no infinities.
//   f8_e5m2    OCP E5M2 (IEEE-like): bias 15, max 57344, infinities and NaNs.
//   q8_0       ggml's block_q8_0: 32 values as {f16 d; int8 qs[32]} = 34 bytes, x = d * qs[i].
// Encoding rounds to nearest even and saturates to +-max; NaN stays NaN.
//
// Header changes after the first version are announced here ("CHANGED: ...").
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "kiln/tensor.hpp"

namespace kiln {

// Which scale a quantized matrix [R, C] carries, always f32 and contiguous:
//   tensor    [1]
//   row       [R]  (per output channel for a weight [N, K], per token for activations [M, K])
//   block128  [ceil(R/128), ceil(C/128)]  (DeepSeek-style 128x128 blocks)
// Dequantized value = q * scale.
enum class ScaleGranularity { tensor, row, block128 };

// x [R, C] f32/f16/bf16 (any strides) -> q [R, C] contiguous fp8 (the format is q's dtype,
// f8_e4m3fn or f8_e5m2), scale f32 contiguous of the granularity's shape.
// compute_scale = true: scale = amax / max_of_format per group (fused amax pass; an all-zero
// group gets scale 1), written to `scale`. compute_scale = false: `scale` is read (one read of
// x); its values must be finite and > 0 (an error on CPU; CUDA scales are device memory, which
// kiln does not read on the host). q = encode(x / scale): round to nearest even, saturated to
// +-max, NaN stays NaN. An empty x (R or C = 0) writes nothing (and computes no scale).
void quantize_fp8(const TensorView& x, const TensorView& q, const TensorView& scale,
                  ScaleGranularity granularity, bool compute_scale, Stream stream = nullptr);

// ggml Q8_0: x [R, C] f32/f16/bf16 (any strides), C % 32 == 0 -> q u8 [R, C / 32 * 34]
// contiguous, byte-identical to ggml's quantize_row_q8_0_ref: per block d = amax / 127 stored as
// f16, qs[i] = roundf(x[i] / d) (half away from zero; 0 when d == 0). Where ggml's rule fails:
// a block whose d overflows f16 (amax above 127 * 65504, inf included) stores d = 65504 and its
// codes saturate at +-127, so values saturate at +-127 * 65504 (ggml stores d = inf, which its
// own row validation rejects); a block holding a NaN stores d = NaN and zero codes, so the whole
// block dequantizes to NaN (ggml's codes are undefined there).
void quantize_q8_0(const TensorView& x, const TensorView& q, Stream stream = nullptr);

// fp8 q [R, C] (contiguous) with its scale (granularity from the scale's shape: [1], [R] or
// [ceil(R/128), ceil(C/128)]; std::nullopt = 1), or Q8_0 blocks (u8 [R, C / 32 * 34], no scale)
// -> out [R, C] contiguous f32/f16/bf16 = q * scale.
void dequantize(const TensorView& q, const std::optional<TensorView>& scale, const TensorView& out,
                Stream stream = nullptr);

enum class WeightFormat { f16, bf16, f8_e4m3fn, f8_e5m2, q8_0 };

// The kernel path of a matmul.
//   automatic   select_path() picks one of the CUDA paths (bit-identical to asking for it).
//   gemv        M <= 16: one fused kernel streaming the quantized weight once.
//   gemm        tensor-core (mma.sync) GEMM, weights dequantized on the way to mma (sm_80+).
//   fp8_native  fp8 x fp8 on sm_90 tensor cores (a must be fp8).
//   reference   the CPU backend (what every request on CPU tensors runs).
enum class MatmulPath { automatic, gemv, gemm, fp8_native, reference };

// How a Weight's data is laid out.
//   row_major    the checkpoint's layout: [N, K] (fp8/f16/bf16) or u8 [N, K / 32 * 34] (q8_0).
//   gemm_packed  prepare_weight(w, gemm): the same format repacked (u8 [bytes]) in the order
//                the tensor-core path reads; scale kept as given.
//   dequantized  prepare_weight(w, ...): a bf16 [N, K] copy with the scale folded in (no scale).
enum class WeightLayout { row_major, gemm_packed, dequantized };

// A weight [N, K] as the kernels read it.
struct Weight {
  TensorView data;  // row_major: contiguous [N, K] fp8/f16/bf16 or u8 [N, K / 32 * 34] (q8_0)
  WeightFormat format = WeightFormat::bf16;
  std::int64_t n = 0, k = 0;
  // fp8 only: f32 [1], [N] or [ceil(N/128), ceil(K/128)]; std::nullopt = 1. Other formats: none.
  std::optional<TensorView> scale;
  WeightLayout layout = WeightLayout::row_major;
};

struct MatmulOptions {
  std::optional<TensorView> a_scale;  // a fp8 only: f32 [1] or [M]; std::nullopt = 1
  std::optional<TensorView> bias;     // [N] f32/f16/bf16, contiguous
  // AdaLN's gated residual (Flux's attention-out and MLP-out linears) and the plain residual add
  // (an LLM's o_proj / down_proj), in the epilogue of every path:
  // gate: [N] contiguous, or [B, N] with unit stride along N and any row stride (a chunk of a
  //   modulation output), M a multiple of B: rows b * L .. b * L + L - 1 of out (L = M / B, a read
  //   as [B, L, K]) use gate[b]. f32/f16/bf16; M < 2^31.
  std::optional<TensorView> gate;
  // residual: [M, N], f32/f16/bf16, unit stride along N, any row stride. It may be `out` itself
  //   (the same data, dtype and strides: an in-place residual add, safe on every path: each
  //   output element is read and written by one thread, and cuBLASLt takes C == D); otherwise
  //   it must not overlap out.
  std::optional<TensorView> residual;
  MatmulPath path = MatmulPath::automatic;
};

// out [M, N] (f32/f16/bf16, contiguous) = residual + gate * ((a [M, K] . w^T) * a_scale * w_scale
// + bias), with the scales, bias, gate and residual applied in f32 in the epilogue and out rounded
// once. a: f32/f16/bf16 with any row stride and unit column stride, or fp8 (with an fp8 weight
// only) with a_scale. M = 0, N = 0 give an empty out; K = 0 gives out = residual + gate * bias
// (bias or 0). Returns the path that ran (`reference` on CPU).
// CHANGED: gate and residual (MatmulOptions).
MatmulPath matmul(const TensorView& a, const Weight& w, const TensorView& out,
                  const MatmulOptions& options = {}, Stream stream = nullptr);

// What `automatic` runs for this problem on this device (the dispatcher calls the same
// function): `reference` for a CPU device.
MatmulPath select_path(std::int64_t m, const Weight& w, DType a_dtype, const Device& device);

// Prepared weights: the bytes a layout for `path` needs, then a one-time repack into
// caller-owned memory `storage` (u8, contiguous, at least that many bytes, so that the caller's
// allocator accounts for it); returns the Weight view of the prepared copy (data = storage).
std::size_t prepared_weight_bytes(const Weight& w, MatmulPath path);
Weight prepare_weight(const Weight& w, MatmulPath path, const TensorView& storage,
                      Stream stream = nullptr);

const char* matmul_path_name(MatmulPath path);        // "auto", "gemv", "gemm", ...
const char* weight_format_name(WeightFormat format);  // "f16", ..., "q8_0"
const char* weight_layout_name(WeightLayout layout);  // "row_major", ...

}  // namespace kiln
