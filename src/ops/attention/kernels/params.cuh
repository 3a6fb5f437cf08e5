// Kernel parameters of attention, shared by the host launcher (g++) and the kernels (NVRTC):
// plain structs of pointers and 64-bit integers, passed by value as __grid_constant__.
#pragma once

#include "device/host_device.cuh"  // the shared-memory plan below is evaluated by both
#include "device/tensor_map.cuh"

namespace kiln {

// Mask kinds (template argument MASK of attention_kernel): the additive mask's dtype, or none.
enum AttentionMask : int { kMaskNone = 0, kMaskF32 = 1, kMaskF16 = 2, kMaskBF16 = 3 };
// Per-batch key counts (template argument KV_LEN): absent, i32 or i64.
enum AttentionKvLen : int { kKvLenNone = 0, kKvLenI32 = 1, kKvLenI64 = 2 };

// attention_kernel (attention.cuh), with the split-KV combine (combine.cuh) folded in.
struct AttentionParams {
  // TMA = true only (sm_90a decode): 4-D maps of k (D, Lk, Hkv, N) and v (Dv, Lk, Hkv, N), the L
  // and H dims swapped where *_l_inner is 0; boxes of 64 x BLOCK_N keys, 128-byte swizzle.
  TensorMapBytes map_k;
  TensorMapBytes map_v;
  int k_l_inner;
  int v_l_inner;
  const void* q;       // [N, Hq, Lq, D], strides q_stride
  const void* k;       // [N, Hkv, Lk, D], strides k_stride
  const void* v;       // [N, Hkv, Lk, Dv], strides v_stride
  void* out;           // [N, Hq, Lq, Dv], strides out_stride, Dv contiguous
  float* lse;          // [N, Hq, Lq] natural-log LSE, or nullptr
  const void* mask;    // additive, [N, Hq, Lq, Lk] with mask_stride (0 where broadcast)
  const void* kv_len;  // [N]
  // Split-KV workspace: o_part [splits, N * Hq * Lq, Dv] (normalized by the split's own sum),
  // lse_part [splits, N * Hq * Lq] in log2 units (-inf for a split that saw no key), and one
  // arrival counter per (row tile, n, kv head), zero at launch: the block that finds it at
  // splits - 1 combines that row tile and wraps it back to zero.
  float* o_part;
  float* lse_part;
  unsigned* arrivals;
  long long q_stride[4];
  long long k_stride[4];
  long long v_stride[4];
  long long mask_stride[4];
  long long out_stride[3];  // out's (n, h, l)
  long long N;
  long long Hq;
  long long Hkv;
  long long Lq;
  long long Lk;
  float scale_log2;          // scale * log2(e)
  float softcap_log2;        // softcap * log2(e)
  float scale_over_softcap;  // scale / softcap
  int splits;                // KV chunks per (row tile, kv head): gridDim.z; each block takes
                             // tiles [z * tiles / splits, (z + 1) * tiles / splits)
};

// Row pitch, in elements, of a shared-memory tile whose rows hold `cols` 16-bit elements (a
// multiple of 8): an odd number of 16-byte chunks, so that the 8 rows one ldmatrix reads fall in
// 8 different bank groups.
KILN_HD constexpr int attention_pitch(int cols) { return (cols / 8) % 2 == 1 ? cols : cols + 8; }

// D rounded up to a whole number of 16-wide k-steps of mma.m16n8k16 (the pad reads as zeros).
KILN_HD constexpr int attention_k_dim(int d) { return (d + 15) / 16 * 16; }

// Dynamic shared memory of attention_kernel: the Q tile and STAGES K/V tiles of 16-bit elements,
// reused after the main loop by the f32 epilogue (WARPS_N partial outputs, their row statistics
// and the rows' LSE). With TMA the K/V tiles are unpadded (the swizzle spreads the banks), start
// on a 1024-byte boundary (up to 1008 bytes of slack: the runtime aligns the base to 16), and
// 2 * STAGES mbarriers follow Q.
KILN_HD constexpr int attention_smem_bytes(int d, int dv, int warps_m, int warps_n, int block_n,
                                           int stages, bool tma) {
  const int block_m = 16 * warps_m;
  const int qk_pitch = attention_pitch(attention_k_dim(d));
  const int pipeline =
      tma ? 1024 + 2 * (block_m * qk_pitch + stages * block_n * (d + dv)) + 16 * stages
          : 2 * (block_m * qk_pitch + stages * block_n * (qk_pitch + attention_pitch(dv)));
  const int epilogue =
      (tma ? 1024 : 0) + 4 * (warps_n * block_m * (dv + 8) + warps_n * block_m * 2 + block_m);
  return pipeline > epilogue ? pipeline : epilogue;
}

}  // namespace kiln
