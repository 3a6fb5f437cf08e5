// CUDA availability. kiln links the CUDA runtime statically and loads the driver on first use,
// so it loads and runs CPU ops on machines with no GPU and no NVIDIA driver.
#pragma once

#include <cstddef>
#include <string>

namespace kiln {

// Number of usable CUDA devices; 0 when there is no driver or no device (never throws).
int cuda_device_count();

// Why cuda_device_count() is 0 ("no NVIDIA driver ...", "no CUDA device ..."), or "".
std::string cuda_unavailable_reason();

// The NVRTC target kiln compiles for on this device: "sm_90a" on Hopper, "sm_80" on A100,
// "sm_86"... Throws kiln::Error (unsupported) when the device is missing or older than sm_80.
std::string cuda_arch(int device);

// The most device memory kiln's own workspaces (split-KV partials, layout copies for conv2d,
// cuBLASLt) held at once on `device` since the last reset_workspace_peak(device); torch's
// allocator does not see them.
std::size_t workspace_peak_bytes(int device);
void reset_workspace_peak(int device);

}  // namespace kiln
