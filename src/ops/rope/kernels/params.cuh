// Kernel parameters of rope, shared by the host launcher (g++) and the kernel (NVRTC): a plain
// struct of pointers and 64-bit integers, passed by value as __grid_constant__.
#pragma once

namespace kiln {

struct RopeParams {
  const void* x;            // [N, T, H, D], strides x_stride
  const void* positions;    // i32/i64 [N, T], strides pos_stride
  const void* norm_weight;  // [D], contiguous
  void* out;                // [N, H, S, D], strides (out_stride, 1)
  long long N;
  long long T;
  long long H;
  long long S;              // rows per head of out: T, or the cache length
  long long x_stride[4];    // (n, t, h, d) in elements
  long long pos_stride[2];  // (n, t)
  long long out_stride[3];  // (n, h, s); unit stride in d
  double log2_theta;        // log2 of the frequency base
  float eps;
  int at_positions;  // 1: token (n, t) goes to row positions[n, t] of out (a KV cache); 0: row t
};

}  // namespace kiln
