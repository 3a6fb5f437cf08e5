// Kernel parameters of conv2d, shared by the host launcher (g++) and the kernels (NVRTC): a plain
// struct of pointers and integers, passed by value as __grid_constant__.
#pragma once

namespace kiln {

// implicit_gemm_conv2d (implicit_gemm.cuh). Strides are in elements; offsets are 64-bit.
// GEMM view: M = N * OH * OW output pixels, N_gemm = OC, K = C * KH * KW.
struct Conv2dParams {
  const void* x;     // [N, C, H, W] with x_stride (n, c, h, w)
  const void* w;     // [OC, C, KH, KW] with w_stride (oc, c, kh, kw)
  const void* bias;  // [OC] with bias_stride, or nullptr
  void* out;         // [N, OC, OH, OW], contiguous NCHW or NHWC (OUT_NHWC)
  long long x_stride[4];
  long long w_stride[4];
  long long bias_stride;
  int N, C, H, W;
  int OC, OH, OW;
  int stride_h, stride_w;
  int pad_h, pad_w;
  int dilation_h, dilation_w;
  int M;  // N * OH * OW
  int K;  // C * KH * KW
  // Channels-last k order: how far one BK step moves (kh, kw, c): BK / C taps and BK % C channels.
  int k_tile_taps;
  int k_tile_channels;
};

// Padding (elements of T) of a shared-memory row of an A or B tile: 16 bytes, which put the 8
// rows an ldmatrix phase reads in 8 different 16-byte bank groups.
constexpr int kConv2dSmemPad = 8;

}  // namespace kiln
