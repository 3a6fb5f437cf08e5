// Normalizations of whole models: RMSNorm (LLMs, Flux's QK-norm), LayerNorm with AdaLN
// modulation (Flux's norm1 / norm2 / norm_out), GroupNorm with an optional SiLU (the VAE).
//
// rms_norm and layer_norm can also write the fp8 input of the next fp8 x fp8 GEMM: `out` of dtype
// f8_e4m3fn or f8_e5m2 with `out_scale` f32 [R], one scale per row (token):
//   scale[r] = amax(y[r, :]) / max of the format (448 for e4m3fn; an all-zero row gets 1),
//   out[r, c] = encode(y[r, c] / scale[r])   (round to nearest even, saturated, NaN kept)
// where y is the op's f32 result before any rounding: the codes and scales are bit for bit what
// quantize_fp8(y, out, scale, ScaleGranularity::row, true) gives for that f32 y (y is not rounded
// to a 16-bit type first). That pair is what matmul takes as fp8 `a` with its `a_scale`.
#pragma once

#include <cstdint>
#include <optional>

#include "kiln/tensor.hpp"

namespace kiln {

struct RmsNormOptions {
  std::optional<TensorView> weight;  // [D], contiguous, f32/f16/bf16; std::nullopt = 1
  float eps = 1e-6f;                 // finite, >= 0
  // fp8 out only (and then required): f32 [R] contiguous, written with each row's scale.
  std::optional<TensorView> out_scale;
};

// y = x * rsqrt(mean(x^2) + eps) * weight over the last dim D, math in f32 (the CPU reference
// accumulates the sum of squares in f64).
// x:   [..., D] (1 to 6 dims), f32/f16/bf16, unit stride along D, any strides of the leading dims
//      (read as R rows, R the product of the leading sizes).
// out: x's shape, contiguous, f32/f16/bf16 (any pairing with x) or fp8 with options.out_scale;
//      must not overlap the inputs.
// All tensors on one device; CUDA work is enqueued on `stream`. R = 0 or D = 0: nothing is
// written. CUDA: D <= 65536 (a row is held in the registers of one block).
void rms_norm(const TensorView& x, const TensorView& out, const RmsNormOptions& options = {},
              Stream stream = nullptr);

struct LayerNormOptions {
  std::optional<TensorView> weight;  // [D], contiguous, f32/f16/bf16 (bias's dtype when both)
  std::optional<TensorView> bias;    // [D], contiguous
  // AdaLN modulation y = y * (1 + scale) + shift: [D] contiguous, or [B, D] with B = x.size(0)
  // (x of 3 or more dims; one vector per leading index, broadcast over the dims between) with
  // unit stride along D and any row stride (a chunk of a modulation linear's output), f32/f16/
  // bf16, one dtype for both when both are given.
  std::optional<TensorView> shift;
  std::optional<TensorView> scale;
  float eps = 1e-6f;  // finite, >= 0
  // fp8 out only (and then required): f32 [R] contiguous, written with each row's scale.
  std::optional<TensorView> out_scale;
};

// LayerNorm over the last dim D (biased variance, as torch), then the affine weight and bias,
// then the modulation:
//   y = (x - mean) * rsqrt(var + eps);  y = y * weight + bias;  y = y * (1 + scale) + shift
// (each factor only when given), math in f32 (CPU reference: mean and variance in f64).
// x and out as for rms_norm.
void layer_norm(const TensorView& x, const TensorView& out, const LayerNormOptions& options = {},
                Stream stream = nullptr);

struct GroupNormOptions {
  std::int64_t num_groups = 1;       // G: C % G == 0
  std::optional<TensorView> weight;  // [C], contiguous, f32/f16/bf16 (bias's dtype when both)
  std::optional<TensorView> bias;    // [C], contiguous
  float eps = 1e-6f;                 // finite, >= 0
  bool silu = false;                 // y = y * sigmoid(y) after the affine transform
};

// torch.nn.functional.group_norm (mean and biased variance over each group of C / G channels and
// all H x W positions of one image), then SiLU when options.silu.
// x:   [N, C, H, W], f32/f16/bf16, contiguous NCHW or channels-last (strides [H W C, 1, W C, C]).
// out: x's shape and memory format, f32/f16/bf16; must not overlap the inputs.
// CUDA: two passes over x (per-slice sums, then normalize and write: 2 reads + 1 write), no
// atomics (deterministic); a small f32 workspace [N, G, slices, 2] from kiln's stream-ordered
// pool. Limits on CUDA: N * G <= 65535 (NCHW), G <= 4096, C / EPT <= 1024 (channels-last).
void group_norm(const TensorView& x, const TensorView& out, const GroupNormOptions& options = {},
                Stream stream = nullptr);

}  // namespace kiln
