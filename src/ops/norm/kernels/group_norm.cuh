// group_norm: per-slice sums, then normalize (+ SiLU) and write; two launches, no atomics.
//
// A group (n, g) is C / G channels of one image at every one of its H W positions. With only G
// groups an image (32 in the Flux VAE) a block per group would leave most SMs idle, so each group
// is cut into slices, one block each:
//   group_norm_stats: sums of d = x - s and d^2 over the block's slice in f32 (s = the group's
//     first element: the f32 sums then hold deviations of the data's own scale, not of its
//     offset), written to partial[n, g, slice] (channels-last: every group of the slice's pixels).
//   group_norm_apply: the same slices; each block first adds its group's partials in f64 in slice
//     order (the same order in every block: every block computes the same mean and rstd), then
//     y = (x - mean) * rstd * weight[c] + bias[c], SiLU, rounded to Tout.
// Two reads of x and one write of out.
//
// NCHW (contiguous): a group is one contiguous run of C / G * H W elements; slice = `p.slice`
// elements of it, 256 threads reading EPT-element chunks (16 bytes on the VECTOR path) U at a
// time. VECTOR needs the run, the slice and H W to be multiples of EPT (a chunk stays in one
// channel) and x, out aligned.
// Channels-last (NHWC memory): a pixel is C contiguous channels; thread t of a block of
// CP x PPI threads (CP = C / EPT chunks a pixel) takes chunk t % CP of pixels t / CP, + PPI, ...
// of the slice, so its group and its weights are fixed; the group sums of the threads go through
// shared memory, added in a fixed order by one thread a group. VECTOR needs C / G a multiple of
// EPT (a chunk stays in one group).
// Offsets are 64-bit.
#pragma once

#include "device/activation.cuh"
#include "device/numeric.cuh"
#include "device/reduce.cuh"
#include "device/vec.cuh"
#include "ops/norm/kernels/params.cuh"

namespace kiln {

inline constexpr int kGroupNormThreads = 256;  // NCHW blocks
inline constexpr int kGroupNormUnroll = 4;     // NCHW: chunks of a thread in flight

// Mean and rstd of group (n, g) from its partial sums: lane-strided f64 sums over the slices, a
// fixed shuffle tree, then the moments. Called by one whole warp; every lane gets the result.
__device__ __forceinline__ void group_moments(const GroupNormParams& p, long long ng, float shift,
                                              float& mean, float& rstd) {
  const int lane = threadIdx.x % 32;
  double s1 = 0.0, s2 = 0.0;
  for (long long i = lane; i < p.slices; i += 32) {
    s1 += double(p.partial[(ng * p.slices + i) * 2]);
    s2 += double(p.partial[(ng * p.slices + i) * 2 + 1]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    s1 += __shfl_xor_sync(0xffffffffu, s1, offset);
    s2 += __shfl_xor_sync(0xffffffffu, s2, offset);
  }
  const double count = double(p.c / p.groups) * double(p.hw);
  const double m1 = s1 / count;  // mean of x - shift
  const double var = s2 / count - m1 * m1;
  mean = float(double(shift) + m1);
  rstd = float(1.0 / sqrt((var > 0.0 ? var : 0.0) + double(p.eps)));
}

// NCHW: the kGroupNormUnroll chunks of a thread from element i0 of a group's run, kGroupNormThreads
// chunks apart, all loads issued together (a chunk at or past `end` reads `begin` instead).
template <typename Tin, int EPT, bool VECTOR>
__device__ __forceinline__ void load_run_chunks(const Tin* run, long long i0, long long begin,
                                                long long end, float (&v)[kGroupNormUnroll][EPT]) {
  constexpr long long kStep = kGroupNormThreads * EPT;
#pragma unroll
  for (int u = 0; u < kGroupNormUnroll; ++u) {
    const long long i = i0 + u * kStep;
    load_floats<Tin, EPT, VECTOR>(run + (i < end ? i : begin), v[u]);
  }
}

template <typename Tout, typename Tw, int EPT, bool VECTOR, bool HAS_WEIGHT, bool HAS_BIAS,
          bool SILU>
__device__ __forceinline__ void group_norm_store(Tout* dst, const float (&v)[EPT], float mean,
                                                 float rstd, const float (&w)[EPT],
                                                 const float (&b)[EPT]) {
  float y[EPT];
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    float t = (v[e] - mean) * rstd;
    if constexpr (HAS_WEIGHT) t *= w[e];
    if constexpr (HAS_BIAS) t += b[e];
    if constexpr (SILU) t = silu(t);
    y[e] = t;
  }
  store_floats<Tout, EPT, VECTOR>(dst, y);
}

template <typename Tin, bool NHWC, int EPT, bool VECTOR>
__global__ void __launch_bounds__(1024)
    group_norm_stats(const __grid_constant__ GroupNormParams p) {
  const Tin* x = static_cast<const Tin*>(p.x);
  const long long cg = p.c / p.groups;
  float sum = 0.f, sum_sq = 0.f;
  if constexpr (!NHWC) {
    __shared__ float shared[kGroupNormThreads / 32];
    const long long ng = blockIdx.y;  // n * G + g
    const long long run = cg * p.hw;  // the group's elements
    const Tin* group = x + ng * run;
    const float s = to_float(group[0]);
    const long long begin = blockIdx.x * p.slice;
    const long long end = begin + p.slice < run ? begin + p.slice : run;
    constexpr long long kStep = kGroupNormThreads * EPT;
    for (long long i0 = begin + threadIdx.x * EPT; i0 < end; i0 += kStep * kGroupNormUnroll) {
      float v[kGroupNormUnroll][EPT];
      load_run_chunks<Tin, EPT, VECTOR>(group, i0, begin, end, v);
#pragma unroll
      for (int u = 0; u < kGroupNormUnroll; ++u) {
        if (i0 + u * kStep >= end) continue;
#pragma unroll
        for (int e = 0; e < EPT; ++e) {
          const float d = v[u][e] - s;
          sum += d;
          sum_sq = fmaf(d, d, sum_sq);
        }
      }
    }
    sum = row_reduce<kGroupNormThreads>(sum, shared, SumOp{});
    sum_sq = row_reduce<kGroupNormThreads>(sum_sq, shared, SumOp{});
    if (threadIdx.x == 0) {
      p.partial[(ng * p.slices + blockIdx.x) * 2] = sum;
      p.partial[(ng * p.slices + blockIdx.x) * 2 + 1] = sum_sq;
    }
  } else {
    __shared__ float shared[2][1024];  // (sum, sum_sq) of every thread
    const long long n = blockIdx.y;
    const int cp = int(p.c / EPT);  // chunks a pixel
    const int ppi = int(blockDim.x) / cp;
    const int j = threadIdx.x % cp;
    const int pl = threadIdx.x / cp;
    const long long g = j * EPT / cg;
    const Tin* image = x + n * p.hw * p.c;
    const float s = to_float(image[g * cg]);
    const long long begin = blockIdx.x * p.slice;
    const long long end = begin + p.slice < p.hw ? begin + p.slice : p.hw;
    for (long long px = begin + pl; px < end; px += ppi) {
      float v[EPT];
      load_floats<Tin, EPT, VECTOR>(image + px * p.c + j * EPT, v);
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const float d = v[e] - s;
        sum += d;
        sum_sq = fmaf(d, d, sum_sq);
      }
    }
    shared[0][threadIdx.x] = sum;
    shared[1][threadIdx.x] = sum_sq;
    __syncthreads();
    const int chunks_per_group = int(cg / EPT);
    for (long long gi = threadIdx.x; gi < p.groups; gi += blockDim.x) {
      float total = 0.f, total_sq = 0.f;
      for (int q = 0; q < ppi; ++q) {
        for (int jj = 0; jj < chunks_per_group; ++jj) {
          const int t = q * cp + int(gi) * chunks_per_group + jj;
          total += shared[0][t];
          total_sq += shared[1][t];
        }
      }
      const long long ng = n * p.groups + gi;
      p.partial[(ng * p.slices + blockIdx.x) * 2] = total;
      p.partial[(ng * p.slices + blockIdx.x) * 2 + 1] = total_sq;
    }
  }
}

template <typename Tin, typename Tout, typename Tw, bool NHWC, int EPT, bool VECTOR,
          bool HAS_WEIGHT, bool HAS_BIAS, bool SILU>
__global__ void __launch_bounds__(1024)
    group_norm_apply(const __grid_constant__ GroupNormParams p) {
  const Tin* x = static_cast<const Tin*>(p.x);
  Tout* out = static_cast<Tout*>(p.out);
  const Tw* weight = static_cast<const Tw*>(p.weight);
  const Tw* bias = static_cast<const Tw*>(p.bias);
  const long long cg = p.c / p.groups;
  float w[EPT], b[EPT];
  if constexpr (!NHWC) {
    __shared__ float moments[2];
    const long long ng = blockIdx.y;
    const long long run = cg * p.hw;
    const long long g = ng % p.groups;
    if (threadIdx.x < 32) {
      float mean, rstd;
      group_moments(p, ng, to_float(x[ng * run]), mean, rstd);
      if (threadIdx.x == 0) moments[0] = mean, moments[1] = rstd;
    }
    __syncthreads();
    const float mean = moments[0], rstd = moments[1];
    const long long begin = blockIdx.x * p.slice;
    const long long end = begin + p.slice < run ? begin + p.slice : run;
    constexpr long long kStep = kGroupNormThreads * EPT;
    for (long long i0 = begin + threadIdx.x * EPT; i0 < end; i0 += kStep * kGroupNormUnroll) {
      float v[kGroupNormUnroll][EPT];
      load_run_chunks<Tin, EPT, VECTOR>(x + ng * run, i0, begin, end, v);
#pragma unroll
      for (int u = 0; u < kGroupNormUnroll; ++u) {
        const long long i = i0 + u * kStep;
        if (i >= end) continue;
        const long long ch = g * cg + i / p.hw;  // a chunk stays in one channel
#pragma unroll
        for (int e = 0; e < EPT; ++e) {
          if constexpr (HAS_WEIGHT) w[e] = to_float(weight[ch]);
          if constexpr (HAS_BIAS) b[e] = to_float(bias[ch]);
        }
        group_norm_store<Tout, Tw, EPT, VECTOR, HAS_WEIGHT, HAS_BIAS, SILU>(out + ng * run + i,
                                                                            v[u], mean, rstd, w, b);
      }
    }
  } else {
    extern __shared__ float moments[];  // [G][2]
    const long long n = blockIdx.y;
    const int warps = int(blockDim.x) / 32;
    const Tin* image = x + n * p.hw * p.c;
    Tout* image_out = out + n * p.hw * p.c;
    for (long long gi = threadIdx.x / 32; gi < p.groups && int(threadIdx.x) < warps * 32;
         gi += warps) {
      float mean, rstd;
      group_moments(p, n * p.groups + gi, to_float(image[gi * cg]), mean, rstd);
      if (threadIdx.x % 32 == 0) moments[2 * gi] = mean, moments[2 * gi + 1] = rstd;
    }
    __syncthreads();
    const int cp = int(p.c / EPT);
    const int ppi = int(blockDim.x) / cp;
    const int j = threadIdx.x % cp;
    const int pl = threadIdx.x / cp;
    const long long g = j * EPT / cg;
    const float mean = moments[2 * g], rstd = moments[2 * g + 1];
    if constexpr (HAS_WEIGHT) load_floats<Tw, EPT, VECTOR>(weight + j * EPT, w);
    if constexpr (HAS_BIAS) load_floats<Tw, EPT, VECTOR>(bias + j * EPT, b);
    const long long begin = blockIdx.x * p.slice;
    const long long end = begin + p.slice < p.hw ? begin + p.slice : p.hw;
    for (long long px = begin + pl; px < end; px += ppi) {
      float v[EPT];
      load_floats<Tin, EPT, VECTOR>(image + px * p.c + j * EPT, v);
      group_norm_store<Tout, Tw, EPT, VECTOR, HAS_WEIGHT, HAS_BIAS, SILU>(
          image_out + px * p.c + j * EPT, v, mean, rstd, w, b);
    }
  }
}

}  // namespace kiln
