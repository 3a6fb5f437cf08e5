// Flux rotary position embedding fused with the [N, L, H, D] -> [N, H, L, D] permute that feeds
// attention (ggml's GGML_OP_ROPE_FLUX + kernel_permute_cont_021), with an optional per-head
// RMSNorm (Flux's QK-norm) fused in front of the rotation.
#pragma once

#include <optional>

#include "kiln/tensor.hpp"

namespace kiln {

struct RopeFluxOptions {
  // RMSNorm over D before the rotation: x * rsqrt(mean(x^2) + eps) * norm_weight. Contiguous
  // [D], f32/f16/bf16.
  std::optional<TensorView> norm_weight;
  float eps = 1e-6f;
};

// x:   [N, L, H, D], any strides (e.g. the Q slice of a packed [N, L, 3, H, D] QKV), f32/f16/bf16.
// pe:  f32 [L, D/2, 2, 2] or [N, L, D/2, 2, 2], any strides; for pair p of row (n, l, h)
//        out[2p]   = pe[p][0][0] * x[2p] + pe[p][0][1] * x[2p+1]
//        out[2p+1] = pe[p][1][0] * x[2p] + pe[p][1][1] * x[2p+1]
//      std::nullopt: permute (and norm) only, the V path.
// out: [N, H, L, D], f32/f16/bf16 (may differ from x's dtype), must not overlap x; D contiguous,
//      rows (n, h, l) any non-overlapping strides: contiguous, or a row range [:, :, a:b] of a
//      contiguous [N, H, L', D] buffer, so that Flux's text and image tokens are written into one
//      joint attention input without a concatenation copy.
// All tensors on one device; CUDA work is enqueued on `stream`. Math in f32.
// KILN_DISABLE=rope_flux runs the unfused chain (separate norm, rotate and permute kernels).
void rope_flux(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
               const RopeFluxOptions& options = {}, Stream stream = nullptr);

}  // namespace kiln
