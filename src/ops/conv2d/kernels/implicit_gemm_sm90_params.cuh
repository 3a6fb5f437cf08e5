// Kernel parameters of implicit_gemm_conv2d_sm90, conv2d_x_nhwc and conv2d_w_ohwi
// (implicit_gemm_sm90.cuh), shared by the host launcher (g++) and the kernels (NVRTC); the TMA
// tensor maps travel inside the __grid_constant__ parameter struct.
#pragma once

#include "device/tensor_map.cuh"

namespace kiln {

struct Conv2dSm90Params {
  TensorMapBytes map_x;  // im2col map of x: (C, W, H, N), 64 channels x 128 pixels per load
  TensorMapBytes map_w;  // tiled map of w as [OC, KH * KW * C] (OHWI): boxes of 64 x BN
  const void* bias;      // [OC] with bias_stride, or nullptr
  void* out;             // [N, OH, OW, OC] contiguous, or NCHW with out_stride and unit OW stride
  long long bias_stride;
  long long out_stride[3];  // NCHW out: the strides of N, OC and OH in elements
  int M;                    // N * OH * OW output pixels
  int N;
  int OC;
  int OH, OW;
  int C;
  int KH, KW;
  int stride, pad, dilation;
};

// conv2d_x_nhwc and conv2d_w_ohwi: a 4-D src [N, C, H, W] in any strides (for w: [OC, C, KH, KW])
// to dst [N, H, W, C] contiguous.
struct Conv2dCopyParams {
  const void* src;
  void* dst;
  long long src_stride[4];
  int N, C, H, W;
};

}  // namespace kiln
