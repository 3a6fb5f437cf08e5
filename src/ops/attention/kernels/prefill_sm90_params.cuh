// Kernel parameters of attention_prefill_sm90 (prefill_sm90.cuh), shared by the host launcher
// (g++) and the kernel (NVRTC): the three TMA tensor maps travel inside the __grid_constant__
// parameter struct, as the bulk tensor copy requires.
#pragma once

#include "device/tensor_map.cuh"

namespace kiln {

struct AttentionSm90Params {
  // 4-D maps (innermost first): q (D, Lq, Hq, N), k (D, Lk, Hkv, N), v (Dv, Lk, Hkv, N), with
  // the L and H dims swapped where the *_l_inner flag is false; boxes of 64 x 128 rows, 128-byte
  // swizzle.
  TensorMapBytes map_q;
  TensorMapBytes map_k;
  TensorMapBytes map_v;
  void* out;                // [N, Hq, Lq, Dv], strides out_stride, Dv contiguous
  float* lse;               // [N, Hq, Lq] natural-log LSE, or nullptr
  const void* kv_len;       // [N] (KV_LEN != 0)
  long long out_stride[3];  // out's (n, h, l)
  long long Hq;
  long long Lq;
  long long Lk;
  int tiles;                 // work tiles: ceil(Lq / 128) x Hq x N
  int group;                 // Hq / Hkv
  int q_l_inner;             // q's map is (D, L, H, N) (1) or (D, H, L, N) (0)
  int k_l_inner;             // the same for k
  int v_l_inner;             // and for v
  float scale_log2;          // scale * log2(e)
  float softcap_log2;        // softcap * log2(e)
  float scale_over_softcap;  // scale / softcap
};

}  // namespace kiln
