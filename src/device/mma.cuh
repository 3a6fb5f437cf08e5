// Warp-level tensor-core primitives for sm_80 and later (they run unchanged on sm_90): async
// global -> shared copies, ldmatrix, and mma.sync m16n8k16 with f32 accumulation. Every kernel
// that feeds mma.sync uses these instead of its own PTX.
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"), with
// lane = 4 * group + quad (group = lane / 4 in 0..7, quad = lane % 4 in 0..3):
//   A (16 x 16, row-major), 4 words of 2 halves:
//     a[0] = A[group    ][2 quad, 2 quad + 1]      a[1] = A[group + 8][2 quad, 2 quad + 1]
//     a[2] = A[group    ][2 quad + 8, .. + 9]      a[3] = A[group + 8][2 quad + 8, .. + 9]
//   B (16 x 8, "col": stored as B^T, n-major), 2 words:
//     b[0] = B[2 quad, 2 quad + 1][group]          b[1] = B[2 quad + 8, .. + 9][group]
//   C/D (16 x 8, f32), 4 floats:
//     d[0], d[1] = D[group    ][2 quad, 2 quad + 1]
//     d[2], d[3] = D[group + 8][2 quad, 2 quad + 1]
// ldmatrix.x4 gives exactly the A fragment when lanes 0-15 point at rows 0-15 of columns 0-7 and
// lanes 16-31 at rows 0-15 of columns 8-15; with the matrix stored n-major (each row of 16 bytes
// holds 8 k-values of one n), ldmatrix.x2 (lanes 0-7: k 0-7, lanes 8-15: k 8-15) gives the B
// fragment, and ldmatrix.trans gives it from a k-major tile.
#pragma once

#include "device/numeric.cuh"

namespace kiln {

// The shared-state-space address of a pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
  u64 generic = reinterpret_cast<u64>(p);
  u64 shared;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(shared) : "l"(generic));
  return static_cast<u32>(shared);
}

// 16-byte async copy global -> shared (cp.async.cg, bypassing L1); when `valid` is false the 16
// shared bytes are zero-filled and global memory is not read. Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Waits until at most `Pending` committed groups of this thread are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
}

// Four 8x8 b16 matrices; lane l supplies the address of row (l % 8) of matrix (l / 8).
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// Two 8x8 b16 matrices; lanes 0-15 supply the row addresses (lanes 16-31 are ignored).
__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(u32 (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem)));
}

// d += a * b for one 16x8x16 tile; T is f16 or bf16 (the type of a and b), d is f32.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]);

template <>
__device__ __forceinline__ void mma_16x8x16<bf16>(float (&d)[4], const u32 (&a)[4],
                                                  const u32 (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16x8x16<f16>(float (&d)[4], const u32 (&a)[4],
                                                 const u32 (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats rounded (nearest even) to a word of two T (f16 or bf16): `lo` in bits 0-15.
template <typename T>
__device__ __forceinline__ u32 pack_float2(float lo, float hi);

template <>
__device__ __forceinline__ u32 pack_float2<bf16>(float lo, float hi) {
  u32 word;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(hi), "f"(lo));
  return word;
}

template <>
__device__ __forceinline__ u32 pack_float2<f16>(float lo, float hi) {
  u32 word;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(hi), "f"(lo));
  return word;
}

}  // namespace kiln
