// Warp- and row-level reductions.
#pragma once

namespace kiln {

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
// fmaxf: a NaN operand is ignored, as std::fmax in the CPU references.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduction over aligned groups of `Lanes` consecutive lanes (a power of two, at most 32); every
// lane of the group gets the result. All 32 lanes of the warp must call it.
template <int Lanes, typename Op>
__device__ __forceinline__ float group_reduce(float v, Op op) {
  static_assert(Lanes >= 1 && Lanes <= 32 && (Lanes & (Lanes - 1)) == 0,
                "Lanes must be a power of two <= 32");
#pragma unroll
  for (int offset = Lanes / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <int Lanes>
__device__ __forceinline__ float group_sum(float v) {
  return group_reduce<Lanes>(v, SumOp{});
}

// Reduction over the TPR consecutive threads of a row, for blocks that hold rows of TPR threads
// each (TPR a power of two; above 32, whole warps). Every thread of the block must call it: with
// TPR > 32 it synchronizes the block and goes through `shared`, one float per warp of the block,
// which the next call may reuse at once. The order of the operations is fixed (deterministic).
template <int TPR, typename Op>
__device__ __forceinline__ float row_reduce(float v, float* shared, Op op) {
  if constexpr (TPR <= 32) {
    return group_reduce<TPR>(v, op);
  } else {
    static_assert(TPR % 32 == 0, "rows of whole warps");
    constexpr int kWarps = TPR / 32;  // warps of a row
    v = group_reduce<32>(v, op);
    const int warp = threadIdx.x / 32;
    __syncthreads();  // `shared` may still be read by a previous call
    if (threadIdx.x % 32 == 0) shared[warp] = v;
    __syncthreads();
    const float* row = shared + warp / kWarps * kWarps;  // this row's warps
    float r = row[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = op(r, row[w]);
    return r;
  }
}

}  // namespace kiln
