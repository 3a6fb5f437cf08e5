// 2-D convolution (torch.nn.functional.conv2d with groups = 1) as an implicit GEMM on the tensor
// cores: no im2col buffer, no workspace, the bias fused.
#pragma once

#include <array>
#include <cstdint>
#include <optional>

#include "kiln/tensor.hpp"

namespace kiln {

struct Conv2dOptions {
  std::array<std::int64_t, 2> stride{1, 1};    // (h, w), >= 1
  std::array<std::int64_t, 2> padding{0, 0};   // (h, w), zeros on both sides, >= 0
  std::array<std::int64_t, 2> dilation{1, 1};  // (h, w), >= 1
  std::int64_t groups = 1;                     // only 1: grouped and depthwise are unsupported
};

// x:    [N, C, H, W], any strides (NCHW or channels-last memory, or views of either),
//       f32/f16/bf16; C, H, W >= 1 (N = 0 or OC = 0 give an empty out, which is not written).
// w:    [OC, C, KH, KW], any strides, f32/f16/bf16 (may differ from x's dtype).
// bias: [OC], any stride, f32/f16/bf16, or std::nullopt.
// out:  [N, OC, OH, OW] with OH = (H + 2 pad_h - dil_h (KH - 1) - 1) / stride_h + 1 (and OW
//       alike), f32/f16/bf16, contiguous NCHW or contiguous channels-last (strides
//       [OH OW OC, 1, OW OC, OC]); must not overlap the inputs.
// All tensors on one device; CUDA work is enqueued on `stream`.
// CPU: f64 accumulation of the inputs as given. CUDA: products of x and w rounded to the compute
// type (bf16 when x or w is bf16, f16 when either is f16, bf16 for f32 x f32), f32 accumulation,
// bias added in f32; kernels up to 7x7; N * OH * OW < 2^31.
void conv2d(const TensorView& x, const TensorView& w, const std::optional<TensorView>& bias,
            const TensorView& out, const Conv2dOptions& options = {}, Stream stream = nullptr);

// The output's spatial size along one dim, or a value < 1 when the window does not fit.
std::int64_t conv2d_out_size(std::int64_t in, std::int64_t kernel, std::int64_t stride,
                             std::int64_t padding, std::int64_t dilation);

}  // namespace kiln
