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
  // capacity exceeds the valid length) and never read. On CPU a value outside [0, Lk] is an
  // error; on CUDA the values are device memory, which kiln does not read on the host (that
  // would synchronize the stream), and the kernels clamp them to [0, Lk].
  std::optional<TensorView> kv_len;
  // Logit soft-capping: s <- softcap * tanh(s / softcap) after the scale (Gemma 2, Grok).
  std::optional<float> softcap;
  // f32 [N, Hq, Lq], contiguous: log-sum-exp (natural log) of each row's scaled logits; -inf for a
  // row whose scores are all -inf, NaN where the row is NaN.
  std::optional<TensorView> lse;
};

// q:   [N, Hq, Lq, D], f32/f16/bf16 (f32 is rounded to k's dtype in the kernel).
// k:   [N, Hkv, Lk, D], f16/bf16; v: [N, Hkv, Lk, Dv], k's dtype. Hq a multiple of Hkv (GQA, MQA).
//      Any strides with the last dim contiguous, the others multiples of 8 elements and a
//      16-byte-aligned start: the slices of a packed QKV, a KV cache with capacity > length.
// out: [N, Hq, Lq, Dv], f32/f16/bf16; must not overlap the inputs. Dv contiguous, rows (n, h, l)
//      any strides that do not overlap: a contiguous [N, Hq, Lq, Dv], or a [N, Lq, Hq, Dv] buffer
//      seen transposed, so that the rows land as the output projection reads them ([N, Lq,
//      Hq * Dv]) with no transpose copy. On CUDA the other strides multiples of 8 elements and
//      the start 16-byte aligned, as for q, k and v.
// D and Dv multiples of 8 up to 256; a call with no out or lse element to write returns at once
// whatever D and Dv are (N, Hq, Lq or Dv = 0, as torch gives empty results).
// Non-finite values follow SDPA's math: a NaN score, or a +inf one, makes its row NaN (and its
// lse). A row whose scores are all -inf (every key hidden by the mask's -inf, causal or kv_len;
// Lk = 0) gives zeros and lse -inf (torch 2.15's SDPA on CPU gives zeros too; older torch and
// some SDPA backends give NaN). A hidden key never contributes on CPU whatever v holds there; on
// CUDA a tile's P V multiplies the v of a hidden key inside the tile by 0, so an inf or NaN there
// gives NaN, as SDPA. CPU tensors run the f64-accumulating reference; CUDA work is enqueued on
// `stream`.
void attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const AttentionOptions& options = {}, Stream stream = nullptr);

}  // namespace kiln
