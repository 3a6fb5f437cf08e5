// A tensor [..., C] read as R rows of C elements (unit column stride) whose leading dims may have
// any strides: the row kernels of the norm and activation families, and their CPU references,
// find row r through the same function. Shared by the host (g++) and the kernels (NVRTC).
#pragma once

#include "device/host_device.cuh"

namespace kiln {

inline constexpr int kMaxRowDims = 5;

struct RowLayout {
  long long rows;                 // R: the product of the leading sizes
  int dims;                       // leading dims left after collapsing (0: a single row)
  long long size[kMaxRowDims];    // outermost first
  long long stride[kMaxRowDims];  // in elements
};

// Element offset of row r (0 <= r < rows) from the tensor's data pointer.
KILN_HD inline long long row_offset(const RowLayout& layout, long long r) {
  long long offset = 0;
  for (int d = layout.dims - 1; d >= 0; --d) {
    const long long i = r % layout.size[d];
    r /= layout.size[d];
    offset += i * layout.stride[d];
  }
  return offset;
}

}  // namespace kiln
