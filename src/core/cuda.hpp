// CUDA runtime helpers used by op launchers: error checks and a device guard.
#pragma once

#include <cuda_runtime.h>

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

}  // namespace kiln::cuda
