// conv2d with few output channels (OC <= 16, stride 1, dilation 1: a VAE's conv_out, 128 -> 3):
// a direct convolution on CUDA cores in f32. Such a conv is memory-bound (x is read once, the
// output is OC / C of its size), while an implicit GEMM re-reads x once per tap through L2 for a
// GEMM N of 3 (the mma.sync kernel: 14 TFLOP/s channels-last, 5 NCHW on an H200).
//
// A block of 128 threads computes 512 output pixels of one row (ow0 .. ow0 + 511 of row oh of
// image n), 4 adjacent pixels a thread, all OC channels. It walks C in chunks of CC channels:
// the KH input rows the row needs (511 + KW pixels each, zero outside x) and the chunk's weights
// are staged in shared memory as f32 ([row][channel][pixel], [channel][tap][oc]); a thread then
// reads its 3 + KW pixels of a row with 16-byte loads once per (channel, row) and each weight (a
// broadcast) once per 4 pixels. Loads follow x's layout (channels fastest for channels-last, so
// both are coalesced), any strides.
//
// Measured on an H200: NOTES.md ("conv_out: a direct kernel").
#pragma once

#include "device/numeric.cuh"
#include "ops/conv2d/kernels/params.cuh"

namespace kiln {

// Tx, Tw, Tb, Tout: element types of x, w, bias and out; OUT_NHWC: out channels-last (else NCHW,
// both contiguous); X_NHWC: x channels-last in memory (the load order only).
template <typename Tx, typename Tw, typename Tb, typename Tout, int OC, int KH, int KW, int CC,
          bool X_NHWC, bool OUT_NHWC, bool HAS_BIAS>
__global__ void __launch_bounds__(kConv2dDirectThreads)
    conv2d_direct(const __grid_constant__ Conv2dParams p) {
  constexpr int kThreads = kConv2dDirectThreads, kPixels = kConv2dDirectPixels;
  constexpr int kPixelsPerThread = kPixels / kThreads;
  // Input pixels of a row the threads read (the window needs kPixels + KW - 1 of them).
  constexpr int kSpan = kPixels - kPixelsPerThread + 4 * conv2d_direct_groups(KW);
  constexpr int kPitch = conv2d_direct_pitch(KW);
  static_assert(kPixelsPerThread == 4, "a thread's pixels are one 16-byte group");
  extern __shared__ float4 smem_raw[];              // 16-byte aligned
  float* s_x = reinterpret_cast<float*>(smem_raw);  // [KH][CC][kPitch]
  float* s_w = s_x + KH * CC * kPitch;              // [CC][KH * KW][OC]

  const int ow0 = blockIdx.x * kPixels, oh = blockIdx.y, n = blockIdx.z;
  const int iw0 = ow0 - p.pad_w, ih0 = oh - p.pad_h;
  const Tx* x = static_cast<const Tx*>(p.x) + n * p.x_stride[0];
  const Tw* w = static_cast<const Tw*>(p.w);
  const int tid = threadIdx.x;

  float acc[kPixelsPerThread][OC];
#pragma unroll
  for (int i = 0; i < kPixelsPerThread; ++i)
#pragma unroll
    for (int oc = 0; oc < OC; ++oc) acc[i][oc] = 0.f;

  for (int c0 = 0; c0 < p.C; c0 += CC) {
    __syncthreads();  // the previous chunk's reads are done
    for (int r = 0; r < KH; ++r) {
      const int ih = ih0 + r;
      const bool row_in = ih >= 0 && ih < p.H;
      if constexpr (X_NHWC) {  // channels fastest: coalesced along a pixel's channels
        for (int i = tid; i < kSpan * CC; i += kThreads) {
          const int c = i % CC, j = i / CC, iw = iw0 + j;
          const bool in = row_in && iw >= 0 && iw < p.W && c0 + c < p.C;
          s_x[(r * CC + c) * kPitch + j] =
              in ? to_float(x[ih * p.x_stride[2] + iw * p.x_stride[3] + (c0 + c) * p.x_stride[1]])
                 : 0.f;
        }
      } else {  // pixels fastest: coalesced along a row
        for (int c = 0; c < CC; ++c) {
          for (int j = tid; j < kSpan; j += kThreads) {
            const int iw = iw0 + j;
            const bool in = row_in && iw >= 0 && iw < p.W && c0 + c < p.C;
            s_x[(r * CC + c) * kPitch + j] =
                in ? to_float(x[ih * p.x_stride[2] + iw * p.x_stride[3] + (c0 + c) * p.x_stride[1]])
                   : 0.f;
          }
        }
      }
    }
    for (int i = tid; i < CC * KH * KW * OC; i += kThreads) {
      const int oc = i % OC, tap = i / OC % (KH * KW), c = i / (OC * KH * KW);
      s_w[i] = c0 + c < p.C ? to_float(w[oc * p.w_stride[0] + (c0 + c) * p.w_stride[1] +
                                         tap / KW * p.w_stride[2] + tap % KW * p.w_stride[3]])
                            : 0.f;
    }
    __syncthreads();

    for (int c = 0; c < CC; ++c) {
#pragma unroll
      for (int r = 0; r < KH; ++r) {
        constexpr int kGroups = conv2d_direct_groups(KW);
        float xs[4 * kGroups];  // this thread's pixels of row r, channel c
        const float* row = s_x + (r * CC + c) * kPitch + kPixelsPerThread * tid;
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          const float4 v = reinterpret_cast<const float4*>(row)[g];
          xs[4 * g] = v.x, xs[4 * g + 1] = v.y, xs[4 * g + 2] = v.z, xs[4 * g + 3] = v.w;
        }
#pragma unroll
        for (int kw = 0; kw < KW; ++kw) {
#pragma unroll
          for (int oc = 0; oc < OC; ++oc) {
            const float wv = s_w[(c * KH * KW + r * KW + kw) * OC + oc];
#pragma unroll
            for (int i = 0; i < kPixelsPerThread; ++i) acc[i][oc] += xs[i + kw] * wv;
          }
        }
      }
    }
  }

  Tout* out = static_cast<Tout*>(p.out);
#pragma unroll
  for (int i = 0; i < kPixelsPerThread; ++i) {
    const int ow = ow0 + kPixelsPerThread * tid + i;
    if (ow >= p.OW) break;
#pragma unroll
    for (int oc = 0; oc < OC; ++oc) {
      float v = acc[i][oc];
      if constexpr (HAS_BIAS) v += to_float(static_cast<const Tb*>(p.bias)[oc * p.bias_stride]);
      const i64 pixel = (static_cast<i64>(n) * p.OH + oh) * p.OW + ow;
      const i64 at = OUT_NHWC ? pixel * OC + oc
                              : (static_cast<i64>(n) * OC + oc) * p.OH * p.OW +
                                    static_cast<i64>(oh) * p.OW + ow;
      out[at] = from_float<Tout>(v);
    }
  }
}

}  // namespace kiln
