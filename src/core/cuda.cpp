#include "core/cuda.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "core/check.hpp"
#include "kiln/device.hpp"

namespace kiln {

namespace {

struct Probe {
  int count = 0;
  std::string reason;
};

// "12.4" for CUDA's version number 12040.
std::string cuda_version_text(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

const Probe& probe() {
  static const Probe p = [] {
    Probe r;
    const cudaError_t status = cudaGetDeviceCount(&r.count);
    if (status != cudaSuccess) {
      r.count = 0;
      // 0 when no driver is installed: the runtime then reports "insufficient driver" too, which
      // would send the user to update a driver they do not have.
      int driver = 0;
      if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
      if (status == cudaErrorNoDevice) {
        r.reason = "no CUDA device: the NVIDIA driver sees none";
      } else if (driver == 0) {
        r.reason = "no NVIDIA driver: libcuda.so.1 is not installed";
      } else if (status == cudaErrorInsufficientDriver) {
        r.reason = "the NVIDIA driver supports CUDA " + cuda_version_text(driver) +
                   ", older than the CUDA " + cuda_version_text(CUDART_VERSION) +
                   " runtime kiln is built with: update the driver";
      } else {
        r.reason = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
      }
      cudaGetLastError();  // clear the sticky-free error so later calls start clean
    } else if (r.count == 0) {
      r.reason = "no CUDA device: the NVIDIA driver sees none";
    }
    return r;
  }();
  return p;
}

}  // namespace

int cuda_device_count() { return probe().count; }

std::string cuda_unavailable_reason() { return probe().reason; }

std::string cuda_arch(int device) {
  cuda::require_device("cuda_arch", Device::cuda(device));
  static std::mutex m;
  static std::array<std::string, 64> archs;
  std::lock_guard<std::mutex> lock(m);
  auto& arch = archs.at(std::size_t(device));
  if (arch.empty()) {
    int major = 0;
    int minor = 0;
    cuda::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                "cuda_arch", "cudaDeviceGetAttribute(major)");
    cuda::check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
                "cuda_arch", "cudaDeviceGetAttribute(minor)");
    if (major < 8) {
      check::fail("cuda_arch", ErrorCode::unsupported,
                  "device " + std::to_string(device) + " has compute capability " +
                      std::to_string(major) + "." + std::to_string(minor) +
                      ", expected 8.0 or newer");
    }
    // Hopper's wgmma and setmaxnreg live in the arch-specific sm_90a target.
    arch = "sm_" + std::to_string(major) + std::to_string(minor) + (major == 9 ? "a" : "");
  }
  return arch;
}

namespace cuda {

void check(cudaError_t status, const char* op, const char* what) {
  if (status == cudaSuccess) return;
  const ErrorCode code =
      status == cudaErrorMemoryAllocation ? ErrorCode::out_of_memory : ErrorCode::cuda_error;
  check::fail(op, code,
              std::string(what) + " failed: " + cudaGetErrorName(status) + " (" +
                  cudaGetErrorString(status) + ")");
}

void require_device(const char* op, Device device) {
  const int count = cuda_device_count();
  if (count == 0) {
    check::fail(op, ErrorCode::unsupported,
                "no CUDA device available (" + cuda_unavailable_reason() + ")");
  }
  if (device.type != DeviceType::cuda || device.index < 0 || device.index >= count) {
    check::fail(op, ErrorCode::invalid_argument,
                "device " + device.str() + " is not a CUDA device of this machine (" +
                    std::to_string(count) + " visible)");
  }
}

DeviceGuard::DeviceGuard(const char* op, int device) {
  check(cudaGetDevice(&previous_), op, "cudaGetDevice");
  if (previous_ != device) check(cudaSetDevice(device), op, "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

int sm_count(const char* op, int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = counts.find(device); it != counts.end()) return it->second;
  int count = 0;
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), op,
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  counts.emplace(device, count);
  return count;
}

namespace {

cudaMemPool_t scratch_pool(const char* op, int device) {
  constexpr std::uint64_t kPoolKeepBytes = std::uint64_t(64) << 20;
  static std::mutex mutex;
  static std::map<int, cudaMemPool_t> pools;
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = pools.find(device); it != pools.end()) return it->second;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  check(cudaMemPoolCreate(&pool, &props), op, "cudaMemPoolCreate");
  std::uint64_t keep = kPoolKeepBytes;
  check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), op,
        "cudaMemPoolSetAttribute");
  pools.emplace(device, pool);
  return pool;
}

}  // namespace

StreamScratch::StreamScratch(const char* op, int device, std::size_t bytes, Stream stream)
    : stream_(stream) {
  check(cudaMallocFromPoolAsync(&ptr_, bytes, scratch_pool(op, device),
                                static_cast<cudaStream_t>(stream)),
        op, "cudaMallocFromPoolAsync");
}

StreamScratch::~StreamScratch() { cudaFreeAsync(ptr_, static_cast<cudaStream_t>(stream_)); }

namespace {

// The counter buffers by (device, stream). Constructed after the CUDA runtime's first use, so
// destroyed before the runtime's own teardown at exit.
struct CounterBuffers {
  struct Buffer {
    unsigned* data = nullptr;
    std::size_t count = 0;
  };
  std::mutex mutex;
  std::map<std::pair<int, Stream>, Buffer> buffers;
  ~CounterBuffers() {
    for (auto& entry : buffers) cudaFree(entry.second.data);
  }
};

}  // namespace

unsigned* stream_counters(const char* op, int device, Stream stream, std::size_t count) {
  const auto s = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(s, &capture), op, "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) return nullptr;
  static CounterBuffers counters;
  std::lock_guard<std::mutex> lock(counters.mutex);
  CounterBuffers::Buffer& buffer = counters.buffers[{device, stream}];
  if (buffer.count < count) {
    if (buffer.data != nullptr) {  // kernels queued on the stream may still count in it
      check(cudaStreamSynchronize(s), op, "cudaStreamSynchronize (growing the counters)");
      check(cudaFree(buffer.data), op, "cudaFree (counters)");
      buffer = {};
    }
    const std::size_t grown = std::max<std::size_t>(count, 4096);
    void* data = nullptr;
    check(cudaMalloc(&data, grown * sizeof(unsigned)), op, "cudaMalloc (counters)");
    buffer = {static_cast<unsigned*>(data), grown};
    check(cudaMemsetAsync(data, 0, grown * sizeof(unsigned), s), op, "cudaMemsetAsync (counters)");
  }
  return buffer.data;
}

}  // namespace cuda

std::size_t workspace_peak_bytes(int device) {
  std::uint64_t bytes = 0;
  cuda::check(cudaMemPoolGetAttribute(cuda::scratch_pool("workspace_peak_bytes", device),
                                      cudaMemPoolAttrUsedMemHigh, &bytes),
              "workspace_peak_bytes", "cudaMemPoolGetAttribute(UsedMemHigh)");
  return std::size_t(bytes);
}

void reset_workspace_peak(int device) {
  std::uint64_t zero = 0;
  cuda::check(cudaMemPoolSetAttribute(cuda::scratch_pool("reset_workspace_peak", device),
                                      cudaMemPoolAttrUsedMemHigh, &zero),
              "reset_workspace_peak", "cudaMemPoolSetAttribute(UsedMemHigh)");
}

}  // namespace kiln
