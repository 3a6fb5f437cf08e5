// LLM rotary position embedding (llama.cpp's GGML_OP_ROPE, "normal" and "neox" modes) fused
// with the [N, T, H, D] -> [N, H, T, D] permute that feeds attention, an optional per-head
// RMSNorm in front (Qwen3's QK-norm), and optionally the write into a KV cache at the tokens'
// positions. Positions are read from a device tensor, so a captured CUDA graph replays with new
// positions.
#pragma once

#include <optional>

#include "kiln/tensor.hpp"

namespace kiln {

enum class RopeStyle {
  normal,  // rotates adjacent pairs (x[2i], x[2i+1]): llama.cpp's LLAMA_ROPE_TYPE_NORM (llama)
  neox,    // rotates halves (x[i], x[i + D/2]): LLAMA_ROPE_TYPE_NEOX (Qwen, HF's rotate_half)
};

struct RopeOptions {
  // Base of the rotation frequencies: pair i turns by position * theta^(-2i / D) radians.
  // std::nullopt: no rotation (the V path: norm, permute and cache write only). Finite, > 0.
  std::optional<double> theta;
  RopeStyle style = RopeStyle::normal;
  // RMSNorm over D before the rotation: x * rsqrt(mean(x^2) + eps) * norm_weight. Contiguous
  // [D], f32/f16/bf16.
  std::optional<TensorView> norm_weight;
  float eps = 1e-6f;
};

// x:         [N, T, H, D], any strides (e.g. the K slice of a packed QKV projection),
//            f32/f16/bf16; D even.
// positions: i32/i64 [N, T], any strides: the position of token t of sequence n.
// out:       contiguous [N, H, T, D], f32/f16/bf16 (may differ from x's dtype); must not
//            overlap x.
// For each row (n, t, h), in f32 with the angles in f64 (exact for any position below 2^53):
//   y = norm_weight ? x * rsqrt(mean(x^2) + eps) * norm_weight : x
//   pair i of y, (a, b) = (y[2i], y[2i+1]) for normal or (y[i], y[i + D/2]) for neox, becomes
//   (a cos - b sin, a sin + b cos) with angle positions[n, t] * theta^(-2i / D).
// All tensors on one device; CUDA work is enqueued on `stream`.
void rope(const TensorView& x, const TensorView& positions, const TensorView& out,
          const RopeOptions& options = {}, Stream stream = nullptr);

// The same rows written into a KV cache instead: row (n, t, h) goes to cache[n, h, positions[n,
// t], :]. cache: [N, H, S, D], f32/f16/bf16, unit stride in D, any other strides; rows of the
// cache no token names are left as they are. Positions must lie in [0, S): the CPU backend
// raises otherwise; CUDA kernels cannot report without a synchronization and skip such rows.
// Two tokens of one sequence with the same position write the same row in an unspecified order.
void rope_cache(const TensorView& x, const TensorView& positions, const TensorView& cache,
                const RopeOptions& options = {}, Stream stream = nullptr);

}  // namespace kiln
