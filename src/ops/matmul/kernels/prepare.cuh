// prepare_weight's repack of ggml Q8_0 into the GEMM's packed layout (gemm.hpp): each thread
// moves one 34-byte block, its 32 quants to an int8 row (two 16-byte stores) and its f16 scale to
// the f32 scale table [k-tile][32-block][row], so the GEMM copies both with 16-byte cp.async.
#pragma once

#include "device/numeric.cuh"
#include "ops/matmul/kernels/gemm_params.cuh"

namespace kiln {

__global__ void pack_q8_0(const __grid_constant__ PackQ8Params p) {
  const long long blocks = p.k / 32;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n * blocks) return;
  const long long row = i / blocks, b = i % blocks;
  const unsigned char* block = p.src + row * p.src_stride + b * 34;
  const unsigned short* q16 = reinterpret_cast<const unsigned short*>(block + 2);  // 2-aligned
  unsigned int words[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) words[e] = unsigned(q16[2 * e]) | (unsigned(q16[2 * e + 1]) << 16);
  uint4* dst = reinterpret_cast<uint4*>(p.qs + row * p.k + b * 32);  // K % 32 == 0: 16-aligned
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint4 v;
    v.x = words[4 * h], v.y = words[4 * h + 1], v.z = words[4 * h + 2], v.w = words[4 * h + 3];
    dst[h] = v;
  }
  p.d[((b / 2) * 2 + b % 2) * p.n_pad + row] = to_float(*reinterpret_cast<const f16*>(block));
}

}  // namespace kiln
