// Hopper (sm_90) bulk copies: contiguous global bytes into shared memory through the TMA unit
// (cp.async.bulk, no tensor map), completing on an mbarrier (sm90.cuh) as transaction bytes.
// Kernels that use them are compiled for sm_90a only.
#pragma once

#include "device/mma.cuh"
#include "device/numeric.cuh"

namespace kiln {

// `bytes` (a multiple of 16) from `src` to `dst` (both 16-byte aligned); completes `bytes`
// transaction bytes on `bar`, which the issuing phase must expect (mbarrier_arrive_expect_tx).
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, u32 bytes, u64* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

}  // namespace kiln
