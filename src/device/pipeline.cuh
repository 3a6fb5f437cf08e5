// The Hopper (sm_90a) pipeline vocabulary every TMA kernel speaks, after CUTLASS's pipelines:
// a ring of shared-memory slots that a producer thread fills by TMA and consumers drain,
// handed over by mbarriers; the named barriers kernels sync subsets of a block with; and the
// register budgets of producer and consumer warpgroups. A kernel reads
//   producer:  u64* full = ring.producer_acquire(state, bytes);  tma_load_*(.., full, ..);  ++state
//   consumer:  ring.consumer_wait(state);  multiply;  ring.consumer_release(state);  ++state
// (the TMA copies complete the slot with their transaction bytes: no producer commit).
#pragma once

#include "device/numeric.cuh"
#include "device/sm90.cuh"

namespace kiln {

// Where a ring of STAGES slots stands: `count` slots passed since the start (Count: int, or i64
// where the caller counts tiles in i64). Slot count % STAGES; the phase (count / STAGES) & 1 flips
// each time the slot index wraps to 0. Producer and consumers keep their own state and step it
// over the same sequence of slots.
template <int STAGES, typename Count = int>
struct PipelineState {
  Count count = 0;

  __device__ __forceinline__ int index() const { return static_cast<int>(count % STAGES); }
  __device__ __forceinline__ u32 phase() const { return (count / STAGES) & 1; }
  __device__ __forceinline__ PipelineState& operator++() {
    ++count;
    return *this;
  }
  // The state `back` slots earlier (a consumer releasing the slot it took `back` steps ago).
  __device__ __forceinline__ PipelineState before(Count back) const { return {count - back}; }
};

// A ring of STAGES slots between one producer thread, whose TMA loads fill slot s (full[s]
// completes when the armed transaction bytes have landed), and the consumer threads, which each
// arrive on empty[s] when done reading it.
template <int STAGES>
struct TmaPipeline {
  u64* full;   // [STAGES]: 1 arrival (the producer's arm) + the transaction bytes
  u64* empty;  // [STAGES]: `consumers` arrivals

  // One thread, before mbarrier_init_fence() and the block-wide sync.
  __device__ __forceinline__ void init(u32 consumers) const {
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(full + s, 1);
      mbarrier_init(empty + s, consumers);
    }
  }

  // Producer: waits until the slot is free (its consumers released it a round ago; a fresh
  // barrier's previous phase counts as complete), arms full[slot] with the bytes the copies will
  // bring, and returns it for them to complete on.
  template <typename Count>
  __device__ __forceinline__ u64* producer_acquire(PipelineState<STAGES, Count> state,
                                                   u32 bytes) const {
    mbarrier_wait(empty + state.index(), state.phase() ^ 1);
    mbarrier_arrive_expect_tx(full + state.index(), bytes);
    return full + state.index();
  }

  // Consumer: waits until the slot's copies have landed.
  template <typename Count>
  __device__ __forceinline__ void consumer_wait(PipelineState<STAGES, Count> state) const {
    mbarrier_wait(full + state.index(), state.phase());
  }

  // Consumer: this thread is done reading the slot.
  template <typename Count>
  __device__ __forceinline__ void consumer_release(PipelineState<STAGES, Count> state) const {
    mbarrier_arrive(empty + state.index());
  }
};

// Named barrier ids (bar.sync, bar.arrive, bar.red); 0 is __syncthreads()'s. Ids need only be
// distinct within a kernel, so each role below names the kernel that uses it.
enum class NamedBarrier : int {
  // attention decode with TMA (attention.cuh): the math warps, without the producer warp.
  math_warps = 1,
  // attention prefill (prefill_sm90.cuh) ping-pong: consumer warpgroup c issues its GEMMs once
  // its turn barrier completes, then arrives on the other one's.
  consumer0_turn = 1,
  consumer1_turn = 2,
};

// Waits at barrier ID with THREADS threads (a multiple of 32, the calling warps included).
template <NamedBarrier ID, int THREADS>
__device__ __forceinline__ void named_barrier_sync() {
  asm volatile("bar.sync %0, %1;" ::"n"(int(ID)), "n"(THREADS) : "memory");
}

// Arrives at barrier ID without waiting for it (the signalling side of a hand-over).
template <NamedBarrier ID, int THREADS>
__device__ __forceinline__ void named_barrier_arrive() {
  asm volatile("bar.arrive %0, %1;" ::"n"(int(ID)), "n"(THREADS) : "memory");
}

// named_barrier_sync that also returns whether `pred` held in any of the THREADS threads.
template <NamedBarrier ID, int THREADS>
__device__ __forceinline__ bool named_barrier_sync_or(bool pred) {
  int any;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.s32 q, %1, 0;\nbar.red.or.pred p, %2, %3, q;\n"
      "selp.s32 %0, 1, 0, p;\n}"
      : "=r"(any)
      : "r"(int(pred)), "n"(int(ID)), "n"(THREADS)
      : "memory");
  return any != 0;
}

// Register budgets of a block of one producer warpgroup and CONSUMERS consumer warpgroups
// (setmaxnreg): the producer, which only issues copies, gives registers back and the consumers
// take them. Per thread, multiples of 8 in [24, 256]; every warp of a warpgroup calls its side.
template <int PRODUCER, int CONSUMER, int CONSUMERS = 2>
struct WarpgroupRegisters {
  static_assert(PRODUCER % 8 == 0 && CONSUMER % 8 == 0, "setmaxnreg counts are multiples of 8");
  static_assert(PRODUCER >= 24 && CONSUMER <= 256, "setmaxnreg counts lie in [24, 256]");
  static_assert(128 * (PRODUCER + CONSUMERS * CONSUMER) <= 64 * 1024,
                "the budgets must fit the SM's 64 K registers");

  static __device__ __forceinline__ void producer() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER));
  }
  static __device__ __forceinline__ void consumer() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER));
  }
};

}  // namespace kiln
