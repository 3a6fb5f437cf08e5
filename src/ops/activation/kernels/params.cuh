// Kernel parameters of the activation family, shared by the host launcher (g++) and the kernels
// (NVRTC): a plain struct passed by value as __grid_constant__.
#pragma once

#include "device/rows.cuh"

namespace kiln {

// Activation functions as template arguments (kiln::Activation on the host).
inline constexpr int kActSilu = 0;
inline constexpr int kActGeluTanh = 1;

struct ActivationParams {
  const void* x;     // R rows (of 2F elements when gated, else F), unit stride, row r at
                     // row_offset(layout, r)
  void* out;         // [R, F] contiguous (fp8: the codes)
  float* out_scale;  // fp8 out: [R], one scale per row
  RowLayout layout;
};

}  // namespace kiln
