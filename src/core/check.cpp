#include "core/check.hpp"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace kiln::check {

void fail(const char* op, ErrorCode code, const std::string& message) {
  throw Error(code, std::string("kiln::") + op + ": " + message);
}

std::string shape_str(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

void dtype_in(const char* op, const char* arg, const TensorView& t,
              std::initializer_list<DType> allowed) {
  for (DType d : allowed) {
    if (t.dtype() == d) return;
  }
  std::string names;
  for (DType d : allowed) {
    if (!names.empty()) names += ", ";
    names += dtype_name(d);
  }
  fail(op, ErrorCode::invalid_argument,
       std::string(arg) + " has dtype " + dtype_name(t.dtype()) + ", expected one of " + names);
}

void dims(const char* op, const char* arg, const TensorView& t, int expected) {
  if (t.dim() != expected) {
    fail(op, ErrorCode::invalid_argument,
         std::string(arg) + " has " + std::to_string(t.dim()) + " dims " + t.shape_str() +
             ", expected " + std::to_string(expected));
  }
}

void shape(const char* op, const char* arg, const TensorView& t,
           std::span<const std::int64_t> expected, const std::string& why) {
  bool same = t.dim() == static_cast<int>(expected.size());
  for (int d = 0; same && d < t.dim(); ++d) same = t.size(d) == expected[std::size_t(d)];
  if (!same) {
    fail(op, ErrorCode::invalid_argument,
         std::string(arg) + " has shape " + t.shape_str() + ", expected " + shape_str(expected) +
             (why.empty() ? "" : " (" + why + ")"));
  }
}

void contiguous(const char* op, const char* arg, const TensorView& t) {
  if (!t.is_contiguous()) {
    fail(op, ErrorCode::invalid_argument,
         std::string(arg) + " must be contiguous, got strides " + shape_str(t.strides()) +
             " for shape " + t.shape_str());
  }
}

void distinct_rows(const char* op, const char* arg, const TensorView& t,
                   const std::string& examples) {
  if (t.numel() == 0 || t.dim() == 0) return;
  const int last = t.dim() - 1;
  const auto fail_rows = [&] {
    fail(op, ErrorCode::invalid_argument,
         std::string(arg) + " has shape " + t.shape_str() + " and strides " +
             shape_str(t.strides()) +
             ", expected the last dim contiguous (stride 1) and rows that do not overlap, such "
             "as " +
             examples);
  };
  if (t.size(last) > 1 && t.stride(last) != 1) fail_rows();
  std::vector<std::pair<std::int64_t, std::int64_t>> dims;  // (stride, size) of the row dims
  for (int d = 0; d < last; ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  std::int64_t span = t.size(last);  // elements covered by one step of the next dim up
  for (const auto& [stride, size] : dims) {
    if (stride < span) fail_rows();
    span = stride * size;
  }
}

void no_overlap(const char* op, const char* out_arg, const TensorView& out, const char* in_arg,
                const TensorView& in) {
  if (may_overlap(out, in)) {
    fail(op, ErrorCode::invalid_argument,
         std::string(out_arg) + " overlaps " + in_arg + " in memory; expected separate buffers");
  }
}

void non_null(const char* op, const char* arg, const TensorView& t) {
  if (t.numel() > 0 && t.data() == nullptr) {
    fail(op, ErrorCode::invalid_argument,
         std::string(arg) + " has a null data pointer for " + std::to_string(t.numel()) +
             " elements");
  }
}

bool row_scaled_out(const char* op, const TensorView& out,
                    const std::optional<TensorView>& out_scale, std::int64_t rows) {
  dtype_in(op, "out", out, {DType::f32, DType::f16, DType::bf16, DType::f8_e4m3fn, DType::f8_e5m2});
  const bool fp8 = out.dtype() == DType::f8_e4m3fn || out.dtype() == DType::f8_e5m2;
  if (!fp8) {
    if (out_scale) {
      fail(op, ErrorCode::invalid_argument,
           std::string("out_scale given with ") + dtype_name(out.dtype()) +
               " out, expected it only with an fp8 out (f8_e4m3fn or f8_e5m2)");
    }
    return false;
  }
  if (!out_scale) {
    fail(op, ErrorCode::invalid_argument,
         std::string("out is ") + dtype_name(out.dtype()) +
             " without out_scale, expected an f32 [" + std::to_string(rows) +
             "] out_scale for its per-row scales");
  }
  dtype_in(op, "out_scale", *out_scale, {DType::f32});
  const std::int64_t expected[] = {rows};
  shape(op, "out_scale", *out_scale, expected, "one scale per row of out");
  contiguous(op, "out_scale", *out_scale);
  return true;
}

Device common_device(const char* op,
                     std::initializer_list<std::pair<const char*, const TensorView*>> args) {
  const auto* first = args.begin();
  for (const auto& [name, view] : args) {
    if (view != nullptr && !(view->device() == first->second->device())) {
      fail(op, ErrorCode::invalid_argument,
           std::string(name) + " is on " + view->device().str() + ", expected " +
               first->second->device().str() + " like " + first->first);
    }
  }
  return first->second->device();
}

}  // namespace kiln::check
