// attention internals: the CPU reference, the kernel plans and the JIT variant list.
#pragma once

#include <string>
#include <vector>

#include "jit/kernel_spec.hpp"
#include "kiln/attention.hpp"
#include "ops/attention/kernels/params.cuh"

namespace kiln::attention_detail {

// The CPU backend and the oracle of every GPU test: plain loops, scores and sums in f64, one
// rounding to out's dtype at the end. Arguments already validated; `scale` resolved.
void reference(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const AttentionOptions& options, float scale);

// One call's specialization of attention_kernel.
struct Plan {
  DType kv = DType::bf16;   // k and v (T)
  DType q = DType::bf16;    // q (TQ): kv's dtype or f32
  DType out = DType::bf16;  // TO
  int head_dim = 0;         // D
  int head_dim_v = 0;       // DV
  int group = 1;            // G = Hq / Hkv
  bool causal = false;
  int mask = 0;    // AttentionMask
  int kv_len = 0;  // AttentionKvLen
  bool softcap = false;
  // Tile configuration.
  int warps_m = 4;  // 16 query rows each
  int warps_n = 1;  // warps splitting a KV tile
  int block_n = 64;
  int stages = 2;
  int splits = 1;  // KV chunks per row tile (> 1: partials, combined by each tile's last block)
  // K/V tiles loaded by TMA from a producer warp (sm_90a decode, D and Dv multiples of 64) instead
  // of cp.async by the math warps.
  bool tma = false;

  int block_m() const { return 16 * warps_m; }
  int threads() const { return 32 * warps_m * warps_n + (tma ? 32 : 0); }
  int smem_bytes() const;
};

// The tile configuration for a problem: decode (rows of a KV head <= 16) splits every KV tile
// between 4 warps, fills one block's shared memory with the K/V ring and splits the keys across
// blocks (size_splits); prefill uses 16 rows per warp and tiles sized by D. `sm_count` and
// `smem_per_sm` (bytes of shared memory an SM has) describe the device; `has_tma`: decode may load
// K/V by TMA (an sm_90a device and K/V views a tensor map can describe), which it does when D and
// Dv are multiples of 64.
Plan make_plan(DType q, DType kv, DType out, int head_dim, int head_dim_v, int group, bool causal,
               int mask, int kv_len, bool softcap, long long batch_kv_heads, long long lq,
               long long lk, int sm_count, int smem_per_sm, bool has_tma);
// Blocks of the plan's kernel an SM holds at once (by shared memory, registers and threads).
int resident_blocks(const Plan& plan, int smem_per_sm);
// Sets plan.splits for its tiles. Decode: the count whose busiest SM streams the fewest KV tiles
// (whole waves of resident blocks, a fixed cost per block); prefill: split only when the row
// tiles leave SMs idle.
void size_splits(Plan& plan, long long batch_kv_heads, long long lq, long long lk, int sm_count,
                 int smem_per_sm);
jit::KernelSpec kernel_spec(const Plan& plan);
// The K and V tensor maps of a TMA decode plan (launch_sm90.cpp): boxes of 64 x block_n keys.
void decode_tma_maps(const TensorView& k, const TensorView& v, int block_n,
                     AttentionParams& params);

// The sm_90a prefill kernel (prefill_sm90.cuh, launch_sm90.cpp): TMA loads by a producer warp,
// wgmma, two consumer warpgroups in ping-pong. It takes a call on Hopper when q, k and v share a
// 16-bit dtype, D = Dv is 64 or 128, Lq > 16, there is no additive mask, and the views suit TMA
// (16-byte aligned starts and strides); the mma.sync kernel takes the rest.
bool prefill_sm90_takes(const TensorView& q, const TensorView& k, const TensorView& v,
                        const AttentionOptions& options);
void run_prefill_sm90(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionOptions& options, float scale,
                      Stream stream);
jit::KernelSpec prefill_sm90_spec(DType t, DType out, int head_dim, bool causal, int kv_len,
                                  bool softcap);

}  // namespace kiln::attention_detail
