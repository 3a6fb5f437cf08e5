// Kernel parameters of implicit_gemm_conv2d_sm90 (implicit_gemm_sm90.cuh), shared by the host
// launcher (g++) and the kernel (NVRTC); the TMA tensor maps travel inside the __grid_constant__
// parameter struct.
#pragma once

#include "device/tensor_map.cuh"

namespace kiln {

struct Conv2dSm90Params {
  TensorMapBytes map_x;  // im2col map of x: (C, W, H, N), 64 channels x 128 pixels per load
  TensorMapBytes map_w;  // tiled map of w as [OC, KH * KW * C] (OHWI): boxes of 64 x BN
  const void* bias;      // [OC] with bias_stride, or nullptr
  void* out;             // [N, OH, OW, OC] contiguous (channels-last)
  long long bias_stride;
  int M;  // N * OH * OW output pixels
  int OC;
  int OH, OW;
  int C;
  int KH, KW;
  int stride, pad, dilation;
};

}  // namespace kiln
