// Kernel parameters of conv2d, shared by the host launcher (g++) and the kernels (NVRTC): a plain
// struct of pointers and integers, passed by value as __grid_constant__.
#pragma once

#include "device/host_device.cuh"

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

// conv2d_direct (direct.cuh): 128 threads of 4 output pixels a block, one row of 512 pixels. Its
// shared memory for a KH x KW window, OC output channels and CC input channels a chunk: KH rows
// of CC channels of input pixels, then the chunk's weights, all f32. A staged row holds the
// 16-byte groups its threads read (4 + KW - 1 pixels each, from pixel 4 tid) and is 4 words past
// a multiple of 32 long, so the channels-last stores (8 channels x 4 pixels a warp) hit 32
// different banks.
constexpr int kConv2dDirectThreads = 128;
constexpr int kConv2dDirectPixels = 4 * kConv2dDirectThreads;
KILN_HD constexpr int conv2d_direct_groups(int kw) { return (kw + 6) / 4; }
KILN_HD constexpr int conv2d_direct_pitch(int kw) {
  return (kConv2dDirectPixels + 4 * conv2d_direct_groups(kw) + 31) / 32 * 32 + 4;
}
// A (channel, window row) of staged weights: KW x OC floats padded to 16 bytes.
KILN_HD constexpr int conv2d_direct_weight_row(int kw, int oc) { return (kw * oc + 3) / 4 * 4; }
KILN_HD constexpr int conv2d_direct_smem_bytes(int oc, int kh, int kw, int cc) {
  return (kh * cc * conv2d_direct_pitch(kw) + cc * kh * conv2d_direct_weight_row(kw, oc)) * 4;
}

}  // namespace kiln
