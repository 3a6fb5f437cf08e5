// Dequantization kernels: fp8 codes [rows, cols] (contiguous) times their scale, or Q8_0 blocks,
// -> out [rows, cols] contiguous f32/f16/bf16. out = f32(decode(q) * scale) rounded to out's
// dtype, the same product the CPU reference forms, so results are bit-identical to it.
//
// dequantize_fp8_kernel: a thread takes VEC codes of a row (VEC = 16: one 16-byte load of codes,
// 16-byte stores of out; needs cols % 16 == 0 and 16-byte aligned q and out), exact decoders
// (src/device/fp8.cuh). dequantize_q8_0_kernel: a thread takes one 34-byte block (17 2-byte
// loads: blocks are only 2-byte aligned) and writes its 32 values (VEC 32: 16-byte stores).
// Not timed yet (correctness only: bit-identical to the CPU reference); NOTES.md.
#pragma once

#include "device/fp8.cuh"
#include "device/numeric.cuh"
#include "device/vec.cuh"
#include "ops/matmul/kernels/params.cuh"

namespace kiln {

// Here `p.x` is q and `p.q` is out.
template <typename Tq, typename Tout, int KIND, int VEC>
__global__ void dequantize_fp8_kernel(const __grid_constant__ QuantizeParams p) {
  const long long chunks_per_row = p.cols / VEC;
  const long long chunks = p.rows * chunks_per_row;
  const unsigned char* q = static_cast<const unsigned char*>(p.x);
  Tout* out = static_cast<Tout*>(p.q);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < chunks;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / chunks_per_row;
    const long long c = (i - r * chunks_per_row) * VEC;
    float s = 1.f;
    if constexpr (KIND == kScaleTensor) s = p.scale[0];
    if constexpr (KIND == kScaleRow) s = p.scale[r];
    if constexpr (KIND == kScaleBlock128) s = p.scale[(r / 128) * p.scale_cols + c / 128];
    const long long offset = r * p.cols + c;
    if constexpr (VEC == 1) {
      out[offset] = from_float<Tout>(to_float(Tq{q[offset]}) * s);
    } else {
      const uint4 codes = *static_cast<const uint4*>(__builtin_assume_aligned(q + offset, 16));
      const u32 words[4] = {codes.x, codes.y, codes.z, codes.w};
      Tout v[VEC];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          v[4 * w + j] = from_float<Tout>(to_float(Tq{(unsigned char)(words[w] >> (8 * j))}) * s);
        }
      }
      store_vec(out + offset, v);
    }
  }
}

template <typename Tout, int VEC>
__global__ void dequantize_q8_0_kernel(const __grid_constant__ QuantizeParams p) {
  const long long blocks_per_row = p.cols / kQ8Block;
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= p.rows * blocks_per_row) return;
  const unsigned short* block = reinterpret_cast<const unsigned short*>(
      static_cast<const unsigned char*>(p.x) + i * kQ8BlockBytes);
  const float d = to_float(f16{block[0]});
  Tout v[kQ8Block];
#pragma unroll
  for (int j = 0; j < kQ8Block / 2; ++j) {
    const u32 pair = block[1 + j];
    v[2 * j] = from_float<Tout>(d * float(static_cast<signed char>(pair & 0xFFu)));
    v[2 * j + 1] = from_float<Tout>(d * float(static_cast<signed char>(pair >> 8)));
  }
  Tout* out = static_cast<Tout*>(p.q) + i * kQ8Block;  // row r, column b * 32: contiguous
  if constexpr (VEC == kQ8Block) {
    store_vec(out, v);
  } else {
#pragma unroll
    for (int j = 0; j < kQ8Block; ++j) out[j] = v[j];
  }
}

}  // namespace kiln
