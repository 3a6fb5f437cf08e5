// CUDA runtime helpers used by op launchers: error checks, a device guard, the SM count and
// stream-ordered scratch memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "kiln/tensor.hpp"

namespace kiln::cuda {

// Throws kiln::Error (cuda_error, or out_of_memory for allocation failures) naming the op and
// the call when `status` is not cudaSuccess.
void check(cudaError_t status, const char* op, const char* what);

// Throws kiln::Error (unsupported) "kiln::<op>: no CUDA device ..." when `device` is not a
// usable CUDA device.
void require_device(const char* op, Device device);

// Makes `device` current for its lifetime and restores the previous one.
class DeviceGuard {
 public:
  DeviceGuard(const char* op, int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// The number of SMs of `device` (cached per device).
int sm_count(const char* op, int device);

// Device memory for the work queued on `stream` before its destruction: cudaMallocFromPoolAsync
// and cudaFreeAsync on kiln's own pool on `device`, which keeps up to 64 MiB mapped between
// calls. (The default pool hands memory back at every synchronization: a 32 MiB cuBLASLt
// workspace mapped again each call cost host time on every call; matmul NOTES.md.)
class StreamScratch {
 public:
  StreamScratch(const char* op, int device, std::size_t bytes, Stream stream);
  ~StreamScratch();
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  Stream stream_;
};

// Arrival counters (u32) for kernels whose blocks count their arrivals: one buffer per (device,
// stream), all zeros whenever no kernel using it runs, because such kernels return each counter to
// zero when its last block arrives (atomicInc with wrap). Zeroed once when created or grown, so a
// call needs no memset launch; freed at process exit. Returns nullptr while `stream` is being
// captured into a CUDA graph (no allocation there): the caller then zeroes counters of its own.
unsigned* stream_counters(const char* op, int device, Stream stream, std::size_t count);

}  // namespace kiln::cuda
