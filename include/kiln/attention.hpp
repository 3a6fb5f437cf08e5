// Scaled dot-product attention with F.scaled_dot_product_attention's layout: FlashAttention-style
// prefill and split-KV decode, compiled on first use for the head dims and flags of each call.
#pragma once

#include <optional>

#include "kiln/tensor.hpp"

namespace kiln {

struct AttentionOptions {
  // Multiplies q·k before the softmax; std::nullopt: 1 / sqrt(D). Finite and > 0.
  std::optional<float> scale;
  // Key j is visible to query i when j <= i + (Lk - Lq): aligned to the bottom right, as
  // FlashAttention and a KV cache do (with kv_len, Lk is that batch's length).
  bool causal = false;
  // Additive mask broadcastable to [N, Hq, Lq, Lk] (2 to 4 dims aligned to the right, size-1 or
  // zero-stride dims broadcast), f32/f16/bf16; -inf hides a key.
  std::optional<TensorView> mask;
  // Per-batch key counts, i32/i64 [N]: keys at or past kv_len[n] are hidden (KV caches whose
  // capacity exceeds the valid length). Values are clamped to [0, Lk].
  std::optional<TensorView> kv_len;
  // Logit soft-capping: s <- softcap * tanh(s / softcap) after the scale (Gemma 2, Grok).
  std::optional<float> softcap;
  // f32 [N, Hq, Lq], contiguous: log-sum-exp (natural log) of each row's scaled logits; -inf for a
  // row with no visible key.
  std::optional<TensorView> lse;
};

// q:   [N, Hq, Lq, D], f32/f16/bf16 (f32 is rounded to k's dtype in the kernel).
// k:   [N, Hkv, Lk, D], f16/bf16; v: [N, Hkv, Lk, Dv], k's dtype. Hq a multiple of Hkv (GQA, MQA).
//      Any strides with the last dim contiguous, the others multiples of 8 elements and a
//      16-byte-aligned start: the slices of a packed QKV, a KV cache with capacity > length.
// out: [N, Hq, Lq, Dv], contiguous, 16-byte aligned, f32/f16/bf16; must not overlap the inputs.
// D and Dv multiples of 8 up to 256. A row with no visible key gives zeros (never NaN).
// CPU tensors run the f64-accumulating reference; CUDA work is enqueued on `stream`.
void attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const AttentionOptions& options = {}, Stream stream = nullptr);

}  // namespace kiln
