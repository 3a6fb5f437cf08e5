#include "kiln/tensor.hpp"

#include <algorithm>

#include "core/check.hpp"

namespace kiln {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f8_e4m3fn:
    case DType::f8_e5m2:
    case DType::i8:
    case DType::u8:
      return 1;
    case DType::i64:
      return 8;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "f32";
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::f8_e4m3fn:
      return "f8_e4m3fn";
    case DType::f8_e5m2:
      return "f8_e5m2";
    case DType::i8:
      return "i8";
    case DType::u8:
      return "u8";
    case DType::i32:
      return "i32";
    case DType::i64:
      return "i64";
  }
  return "?";
}

bool is_floating(DType dtype) {
  return dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16 ||
         dtype == DType::f8_e4m3fn || dtype == DType::f8_e5m2;
}

std::string Device::str() const {
  return type == DeviceType::cpu ? std::string("cpu") : "cuda:" + std::to_string(index);
}

TensorView::TensorView(void* data, DType dtype, std::span<const std::int64_t> shape,
                       std::span<const std::int64_t> strides, Device device)
    : data_(data), dtype_(dtype), device_(device), ndim_(static_cast<int>(shape.size())) {
  if (shape.size() > kMaxDims || strides.size() != shape.size()) {
    check::fail("TensorView", ErrorCode::invalid_argument,
                "shape " + check::shape_str(shape) + " with strides " + check::shape_str(strides) +
                    ": expected equal ranks of at most " + std::to_string(kMaxDims));
  }
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0) {
      check::fail("TensorView", ErrorCode::invalid_argument,
                  "shape " + check::shape_str(shape) + " has a negative size");
    }
    shape_[d] = shape[d];
    strides_[d] = strides[d];
  }
}

TensorView::TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                       Device device)
    : TensorView(contiguous(data, dtype, {shape.begin(), shape.size()}, device)) {}

TensorView TensorView::contiguous(void* data, DType dtype, std::span<const std::int64_t> shape,
                                  Device device) {
  std::array<std::int64_t, kMaxDims> strides{};
  std::int64_t s = 1;
  const std::size_t n = std::min<std::size_t>(shape.size(), kMaxDims);
  for (std::size_t d = n; d-- > 0;) {
    strides[d] = s;
    s *= shape[d];
  }
  return TensorView(data, dtype, shape, {strides.data(), shape.size()}, device);
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int d = 0; d < ndim_; ++d) n *= shape_[std::size_t(d)];
  return n;
}

bool TensorView::is_contiguous() const {
  // An empty view touches no memory: any strides describe it (torch calls it contiguous too).
  if (numel() == 0) return true;
  std::int64_t expected = 1;
  for (int d = ndim_; d-- > 0;) {
    if (shape_[std::size_t(d)] != 1 && strides_[std::size_t(d)] != expected) return false;
    expected *= shape_[std::size_t(d)];
  }
  return true;
}

std::int64_t TensorView::byte_begin() const {
  std::int64_t lo = 0;
  for (int d = 0; d < ndim_; ++d) {
    const auto i = std::size_t(d);
    if (shape_[i] > 0 && strides_[i] < 0) lo += (shape_[i] - 1) * strides_[i];
  }
  return numel() == 0 ? 0 : lo * static_cast<std::int64_t>(dtype_size(dtype_));
}

std::int64_t TensorView::byte_end() const {
  if (numel() == 0) return 0;
  std::int64_t hi = 0;
  for (int d = 0; d < ndim_; ++d) {
    const auto i = std::size_t(d);
    if (strides_[i] > 0) hi += (shape_[i] - 1) * strides_[i];
  }
  return (hi + 1) * static_cast<std::int64_t>(dtype_size(dtype_));
}

std::string TensorView::shape_str() const { return check::shape_str(shape()); }

bool may_overlap(const TensorView& a, const TensorView& b) {
  if (!(a.device() == b.device()) || a.numel() == 0 || b.numel() == 0) return false;
  const auto* pa = static_cast<const char*>(a.data());
  const auto* pb = static_cast<const char*>(b.data());
  return pa + a.byte_begin() < pb + b.byte_end() && pb + b.byte_begin() < pa + a.byte_end();
}

}  // namespace kiln
