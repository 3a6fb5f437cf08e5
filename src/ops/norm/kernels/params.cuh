// Kernel parameters of the norm family, shared by the host launcher (g++) and the kernels
// (NVRTC): plain structs of pointers and integers, passed by value as __grid_constant__.
#pragma once

#include "device/rows.cuh"

namespace kiln {

// rms_norm and layer_norm kernels (norm.cuh): KIND selects the math.
inline constexpr int kNormRms = 0;
inline constexpr int kNormLayer = 1;

struct NormParams {
  const void* x;       // R rows of D elements (unit stride), row r at row_offset(rows, r)
  const void* weight;  // [D] contiguous, or null
  const void* bias;    // [D] contiguous, or null (layer_norm)
  const void* shift;   // [B, D], rows shift_stride apart (0 for a [D] shift), or null
  const void* scale;   // [B, D], rows scale_stride apart (0 for a [D] scale), or null
  void* out;           // [R, D] contiguous (fp8: the codes)
  float* out_scale;    // fp8 out: [R], one scale per row
  RowLayout layout;
  long long rows_per_batch;  // rows one modulation vector covers (R / B)
  long long shift_stride;    // elements
  long long scale_stride;
  float eps;
};

// group_norm_stats and group_norm_apply (group_norm.cuh). A slice is the work of one block:
// NCHW, `slice` consecutive elements of one group (grid: slices x N * G); channels-last, `slice`
// consecutive pixels of one image, every channel (grid: slices x N).
struct GroupNormParams {
  const void* x;       // [N, C, H, W], contiguous NCHW or channels-last
  const void* weight;  // [C] or null
  const void* bias;    // [C] or null
  void* out;           // x's shape and memory format
  float* partial;      // [N, G, slices, 2]: sums of (x - s) and (x - s)^2, s = the group's first
                       // element (a shift that keeps the f32 sums free of cancellation)
  long long n;
  long long c;
  long long hw;      // H * W
  long long groups;  // G
  long long slices;  // per group (NCHW) or per image (channels-last)
  long long slice;   // elements (NCHW) or pixels (channels-last) of one slice
  float eps;
};

}  // namespace kiln
