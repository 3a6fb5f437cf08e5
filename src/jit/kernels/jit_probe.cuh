// The JIT's probe: the smallest templated kernel, used by the JIT tests and as the smoke kernel
// of the disk cache (it compiles in ~25 ms with NVRTC 13). Writes N to out[0, n).
// Layout: out is a contiguous int array of n elements; one thread per element.
#pragma once

namespace kiln {

template <int N>
__global__ void jit_probe_kernel(int* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;  // element index in [0, grid * block)
  if (i < n) out[i] = N;
}

}  // namespace kiln
