// Quantization kernels: x [rows, cols] f32/f16/bf16 -> fp8 codes with a scale, or Q8_0 blocks.
//
// fp8 (q = encode(x / scale), round to nearest even, saturating; src/device/fp8.cuh):
//   quantize_fp8_kernel        scale given (or KIND tensor and FROM_AMAX: scale[0] holds the
//                              amax bits from amax_kernel): one read of x, grid-stride chunks.
//   quantize_fp8_group_kernel  compute_scale for row / block128: one block per scale group,
//                              amax pass, scale written, encode pass (the group is re-read from
//                              L1/L2: a row of 14336 bf16 is 28 KiB, a 128x128 tile 32 KiB).
//   amax_kernel + quantize_fp8_kernel<FROM_AMAX> + finalize_tensor_scale: compute_scale for
//                              tensor (a grid-wide amax; three launches).
// Q8_0 (ggml's quantize_row_q8_0_ref): quantize_q8_0_kernel, one thread a 32-value block.
//
// Layout: a thread takes VEC consecutive elements of a row: VEC = 16 (one 16-byte store of
// codes; x read with 16-byte loads) when cols % 16 == 0, x has unit column stride and 16-byte
// aligned rows and q is 16-byte aligned, else VEC = 1. Offsets are 64-bit.
// Not timed yet (correctness only: bit-identical to the CPU reference); NOTES.md.
#pragma once

#include "device/fp8.cuh"
#include "device/numeric.cuh"
#include "device/vec.cuh"
#include "ops/matmul/kernels/params.cuh"

namespace kiln {

// VEC elements of row r from column c of x, as f32.
template <typename Tin, int VEC>
__device__ __forceinline__ void load_x(const QuantizeParams& p, long long r, long long c,
                                       float (&v)[VEC]) {
  const Tin* x = static_cast<const Tin*>(p.x);
  if constexpr (VEC == 1) {
    v[0] = to_float(x[r * p.x_stride[0] + c * p.x_stride[1]]);
  } else {
    Tin raw[VEC];
    load_vec(raw, x + r * p.x_stride[0] + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(raw[i]);
  }
}

// Encodes VEC values and stores them at element (r, c) of q.
template <typename Tq, int VEC>
__device__ __forceinline__ void store_codes(const QuantizeParams& p, long long r, long long c,
                                            const float (&v)[VEC], float scale) {
  store_fp8<Tq, VEC>(static_cast<unsigned char*>(p.q) + r * p.cols + c, v, scale);
}

template <int KIND>
__device__ __forceinline__ float group_scale(const QuantizeParams& p, long long r, long long c) {
  if constexpr (KIND == kScaleTensor) return p.scale[0];
  if constexpr (KIND == kScaleRow) return p.scale[r];
  return p.scale[(r / 128) * p.scale_cols + c / 128];
}

// Max over the block (all threads get it); `shared` holds one float per warp.
__device__ __forceinline__ float block_max(float v, float* shared) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  __syncthreads();  // `shared` may still be read from a previous call
  if (threadIdx.x % 32 == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < warps; ++w) v = fmaxf(v, shared[w]);
  return v;
}

template <typename Tin, typename Tq, int KIND, int VEC, bool FROM_AMAX>
__global__ void quantize_fp8_kernel(const __grid_constant__ QuantizeParams p) {
  const long long chunks_per_row = p.cols / VEC;
  const long long chunks = p.rows * chunks_per_row;
  float tensor_scale = 0.f;
  if constexpr (FROM_AMAX) tensor_scale = scale_from_amax<Tq>(p.scale[0]);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < chunks;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / chunks_per_row;
    const long long c = (i - r * chunks_per_row) * VEC;
    float v[VEC];
    load_x<Tin, VEC>(p, r, c, v);
    const float s = FROM_AMAX ? tensor_scale : group_scale<KIND>(p, r, c);
    store_codes<Tq, VEC>(p, r, c, v, s);
  }
}

// amax of the whole matrix into scale[0] (zeroed first) as f32 bits: non-negative floats order
// like their bits, so atomicMax on the bits is a float max.
template <typename Tin, int VEC>
__global__ void amax_kernel(const __grid_constant__ QuantizeParams p) {
  __shared__ float shared[32];
  const long long chunks_per_row = p.cols / VEC;
  const long long chunks = p.rows * chunks_per_row;
  float amax = 0.f;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < chunks;
       i += (long long)gridDim.x * blockDim.x) {
    const long long r = i / chunks_per_row;
    float v[VEC];
    load_x<Tin, VEC>(p, r, (i - r * chunks_per_row) * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) amax = fmaxf(amax, fabsf(v[j]));
  }
  amax = block_max(amax, shared);
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned int*>(p.scale), __float_as_uint(amax));
}

template <typename Tq>
__global__ void finalize_tensor_scale(const __grid_constant__ QuantizeParams p) {
  p.scale[0] = scale_from_amax<Tq>(p.scale[0]);
}

// One block per scale group: KIND row (group = row blockIdx.x) or block128 (group = tile
// (blockIdx.x / scale_cols, blockIdx.x % scale_cols) of 128 x 128).
template <typename Tin, typename Tq, int KIND, int VEC>
__global__ void quantize_fp8_group_kernel(const __grid_constant__ QuantizeParams p) {
  __shared__ float shared[32];
  long long r0, c0, rows, cols;
  if constexpr (KIND == kScaleRow) {
    r0 = blockIdx.x, c0 = 0, rows = 1, cols = p.cols;
  } else {
    r0 = (blockIdx.x / p.scale_cols) * 128;
    c0 = (blockIdx.x % p.scale_cols) * 128;
    rows = min_i64(128, p.rows - r0);
    cols = min_i64(128, p.cols - c0);
  }
  const long long chunks_per_row = cols / VEC;  // VEC divides cols (cols % 16 == 0 when VEC 16)
  const long long chunks = rows * chunks_per_row;
  float amax = 0.f;
  for (long long i = threadIdx.x; i < chunks; i += blockDim.x) {
    const long long r = i / chunks_per_row;
    float v[VEC];
    load_x<Tin, VEC>(p, r0 + r, c0 + (i - r * chunks_per_row) * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) amax = fmaxf(amax, fabsf(v[j]));
  }
  const float s = scale_from_amax<Tq>(block_max(amax, shared));
  if (threadIdx.x == 0) p.scale[blockIdx.x] = s;
  for (long long i = threadIdx.x; i < chunks; i += blockDim.x) {
    const long long r = i / chunks_per_row;
    const long long c = c0 + (i - r * chunks_per_row) * VEC;
    float v[VEC];
    load_x<Tin, VEC>(p, r0 + r, c, v);
    store_codes<Tq, VEC>(p, r0 + r, c, v, s);
  }
}

// ggml Q8_0: one thread a block of 32 values of a row; q rows are cols / 32 * 34 bytes.
// VEC 32: x read with 16-byte loads (unit column stride, aligned rows), else element by element.
// The 34-byte block is written as 17 2-byte stores (blocks are only 2-byte aligned).
template <typename Tin, int VEC>
__global__ void quantize_q8_0_kernel(const __grid_constant__ QuantizeParams p) {
  const long long blocks_per_row = p.cols / kQ8Block;
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= p.rows * blocks_per_row) return;
  const long long r = i / blocks_per_row;
  const long long b = i - r * blocks_per_row;
  float v[kQ8Block];
  if constexpr (VEC == kQ8Block) {
    load_x<Tin, kQ8Block>(p, r, b * kQ8Block, v);
  } else {
#pragma unroll
    for (int j = 0; j < kQ8Block; ++j) {
      float one[1];
      load_x<Tin, 1>(p, r, b * kQ8Block + j, one);
      v[j] = one[0];
    }
  }
  // ggml's quantize_row_q8_0_ref: amax = MAX(amax, |x|) with MAX(a, b) = a > b ? a : b; a block
  // holding NaN, and one whose d overflows f16, as the CPU reference (kQ8NanScale, kQ8MaxScale).
  float amax = 0.f;
  bool has_nan = false;
#pragma unroll
  for (int j = 0; j < kQ8Block; ++j) {
    const float a = fabsf(v[j]);
    has_nan = has_nan || isnan(a);
    amax = amax > a ? amax : a;
  }
  unsigned short d_bits = kQ8NanScale;
  float d = 0.f;
  bool saturate = false;
  if (!has_nan) {
    d = amax / 127.f;
    d_bits = from_float<f16>(d).bits;
    saturate = (d_bits & 0x7FFFu) == 0x7C00u;
    if (saturate) {
      d_bits = kQ8MaxScale;
      d = to_float(f16{d_bits});
    }
  }
  const float id = d != 0.f ? 1.f / d : 0.f;
  unsigned short* out =
      reinterpret_cast<unsigned short*>(static_cast<unsigned char*>(p.q) + i * kQ8BlockBytes);
  out[0] = d_bits;
  const auto code = [&](float x) {
    float c = has_nan ? 0.f : roundf(x * id);
    if (saturate) c = fminf(fmaxf(c, -127.f), 127.f);
    return u32(int(c)) & 0xFFu;
  };
#pragma unroll
  for (int j = 0; j < kQ8Block; j += 2) {
    out[1 + j / 2] = static_cast<unsigned short>(code(v[j]) | code(v[j + 1]) << 8);
  }
}

}  // namespace kiln
