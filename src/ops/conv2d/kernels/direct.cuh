// conv2d with few output channels (OC <= 16, stride 1, dilation 1) of an x that is not
// channels-last (NCHW: a VAE's conv_out, 128 -> 3): a direct convolution on CUDA cores in f32.
// Such a conv is memory-bound (x is read once, the output is OC / C of its size), while an
// implicit GEMM re-reads x once per tap through L2 for a GEMM N of 3, and the mma.sync kernel
// gathers NCHW x a pixel column at a time.
//
// A block of 128 threads computes 512 output pixels of one row (ow0 .. ow0 + 511 of row oh of
// image n), 4 adjacent pixels a thread, all OC channels. It walks C in chunks of CC channels:
// the KH input rows the row needs (511 + KW pixels each, zero outside x) and the chunk's weights
// are staged in shared memory as f32 ([row][channel][pixel], [channel][row][kw, oc]); a thread
// then reads its 3 + KW pixels of a row with 16-byte loads once per (channel, row) and its
// weights with 16-byte broadcasts once per 4 pixels. x is read along its rows (16 bytes a load
// with VEC, else 2-byte gathers for any strides).
//
// On NCHW x it measured twice the mma.sync kernel's speed; on channels-last x it was slower than
// the mma.sync kernel, which keeps those (NOTES.md, "conv_out, a direct kernel";
// dev/conv2d/paths.cpp times both).
#pragma once

#include "device/numeric.cuh"
#include "ops/conv2d/kernels/params.cuh"

namespace kiln {

// Tx, Tw, Tb, Tout: element types of x, w, bias and out; OUT_NHWC: out channels-last (else NCHW,
// both contiguous); VEC: x read with 16-byte loads (unit W stride, W a multiple of 16 bytes,
// 16-byte-aligned start and strides).
template <typename Tx, typename Tw, typename Tb, typename Tout, int OC, int KH, int KW, int CC,
          bool VEC, bool OUT_NHWC, bool HAS_BIAS>
__global__ void __launch_bounds__(kConv2dDirectThreads)
    conv2d_direct(const __grid_constant__ Conv2dParams p) {
  constexpr int kThreads = kConv2dDirectThreads, kPixels = kConv2dDirectPixels;
  constexpr int kPixelsPerThread = kPixels / kThreads;
  // Input pixels of a row the threads read (the window needs kPixels + KW - 1 of them).
  constexpr int kSpan = kPixels - kPixelsPerThread + 4 * conv2d_direct_groups(KW);
  constexpr int kPitch = conv2d_direct_pitch(KW);
  static_assert(kPixelsPerThread == 4, "a thread's pixels are one 16-byte group");
  constexpr int kWRow = conv2d_direct_weight_row(KW, OC);  // floats of a (channel, row) of w
  constexpr int kVec = 16 / static_cast<int>(sizeof(Tx));  // elements of x a 16-byte load
  extern __shared__ float4 smem_raw[];                     // 16-byte aligned
  float* s_x = reinterpret_cast<float*>(smem_raw);         // [KH][CC][kPitch]
  float* s_w = s_x + KH * CC * kPitch;                     // [CC][KH * KW][OC]

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
      const Tx* x_row = x + ih * p.x_stride[2];
      if constexpr (VEC) {  // 16 bytes along a row a load, from a kVec-aligned pixel
        const int a0 = (iw0 >= 0 ? iw0 : iw0 - (kVec - 1)) / kVec * kVec;
        const int groups = (iw0 + kSpan - a0 + kVec - 1) / kVec;
        for (int i = tid; i < CC * groups; i += kThreads) {
          const int c = i / groups, a = a0 + i % groups * kVec;  // W % kVec == 0
          alignas(16) Tx v[kVec];
          if (row_in && a >= 0 && a < p.W && c0 + c < p.C) {
            *reinterpret_cast<uint4*>(v) =
                *reinterpret_cast<const uint4*>(x_row + (c0 + c) * p.x_stride[1] + a);
          } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) v[e] = from_float<Tx>(0.f);
          }
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const int j = a + e - iw0;
            if (j >= 0 && j < kSpan) s_x[(r * CC + c) * kPitch + j] = to_float(v[e]);
          }
        }
      } else {  // pixels fastest: coalesced along a row
        for (int c = 0; c < CC; ++c) {
          for (int j = tid; j < kSpan; j += kThreads) {
            const int iw = iw0 + j;
            const bool in = row_in && iw >= 0 && iw < p.W && c0 + c < p.C;
            s_x[(r * CC + c) * kPitch + j] =
                in ? to_float(x_row[iw * p.x_stride[3] + (c0 + c) * p.x_stride[1]]) : 0.f;
          }
        }
      }
    }
    for (int i = tid; i < CC * KH * kWRow; i += kThreads) {  // [c][r][kw * OC + oc], padded
      const int k = i % kWRow, r = i / kWRow % KH, c = i / (kWRow * KH);
      const int kw = k / OC, oc = k % OC;
      s_w[i] = k < KW * OC && c0 + c < p.C
                   ? to_float(w[oc * p.w_stride[0] + (c0 + c) * p.w_stride[1] + r * p.w_stride[2] +
                                kw * p.w_stride[3]])
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
        float ws[kWRow];  // row r's weights of channel c: (kw, oc), broadcast 16-byte reads
        const float4* w_row = reinterpret_cast<const float4*>(s_w + (c * KH + r) * kWRow);
#pragma unroll
        for (int g = 0; g < kWRow / 4; ++g) {
          const float4 v = w_row[g];
          ws[4 * g] = v.x, ws[4 * g + 1] = v.y, ws[4 * g + 2] = v.z, ws[4 * g + 3] = v.w;
        }
#pragma unroll
        for (int kw = 0; kw < KW; ++kw) {
#pragma unroll
          for (int oc = 0; oc < OC; ++oc) {
#pragma unroll
            for (int i = 0; i < kPixelsPerThread; ++i) acc[i][oc] += xs[i + kw] * ws[kw * OC + oc];
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
