// Tensor views: a data pointer with dtype, shape and strides (in elements, up to 6 dims) and
// the device that owns the memory. kiln never owns tensor memory; callers allocate.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>

namespace kiln {

enum class DType : std::uint8_t { f32, f16, bf16, f8_e4m3fn, f8_e5m2, i8, u8, i32, i64 };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // "f32", "bf16", "f8_e4m3fn", ...
bool is_floating(DType dtype);

enum class DeviceType : std::uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;  // CUDA ordinal; 0 for cpu

  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int index) { return {DeviceType::cuda, index}; }
  bool operator==(const Device&) const = default;
  std::string str() const;  // "cpu", "cuda:0"
};

// A CUDA stream handle (a cudaStream_t); nullptr is the legacy default stream. kiln enqueues
// work on the caller's stream and never synchronizes it.
using Stream = void*;

inline constexpr int kMaxDims = 6;

class TensorView {
 public:
  TensorView() = default;
  TensorView(void* data, DType dtype, std::span<const std::int64_t> shape,
             std::span<const std::int64_t> strides, Device device = Device::cpu());
  // Row-major contiguous strides.
  TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
             Device device = Device::cpu());
  static TensorView contiguous(void* data, DType dtype, std::span<const std::int64_t> shape,
                               Device device = Device::cpu());

  void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int dim() const { return ndim_; }
  std::int64_t size(int d) const { return shape_[static_cast<std::size_t>(d)]; }
  std::int64_t stride(int d) const { return strides_[static_cast<std::size_t>(d)]; }
  std::span<const std::int64_t> shape() const { return {shape_.data(), std::size_t(ndim_)}; }
  std::span<const std::int64_t> strides() const { return {strides_.data(), std::size_t(ndim_)}; }
  std::int64_t numel() const;
  // Row-major dense; size-1 dims may have any stride, and an empty view (numel() == 0) is
  // contiguous whatever its strides, as in torch.
  bool is_contiguous() const;
  // Byte range [first, last) that elements of the view can touch, relative to data().
  // Empty (first == last) when numel() == 0.
  std::int64_t byte_begin() const;
  std::int64_t byte_end() const;
  std::string shape_str() const;  // "[4608, 64, 2, 2]"

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  Device device_{};
  int ndim_ = 0;
  std::array<std::int64_t, kMaxDims> shape_{};
  std::array<std::int64_t, kMaxDims> strides_{};
};

// True when the byte ranges the two views can touch intersect (same device only).
bool may_overlap(const TensorView& a, const TensorView& b);

}  // namespace kiln
