// Argument checks shared by every op. Each failure throws kiln::Error with a message
// "kiln::<op>: <argument> ..., expected ..., got ...".
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>

#include "kiln/error.hpp"
#include "kiln/tensor.hpp"

namespace kiln::check {

[[noreturn]] void fail(const char* op, ErrorCode code, const std::string& message);

void dtype_in(const char* op, const char* arg, const TensorView& t,
              std::initializer_list<DType> allowed);
void dims(const char* op, const char* arg, const TensorView& t, int expected);
// `expected` must have t.dim() entries; `why` explains where the expected sizes come from.
void shape(const char* op, const char* arg, const TensorView& t,
           std::span<const std::int64_t> expected, const std::string& why);
void contiguous(const char* op, const char* arg, const TensorView& t);
void no_overlap(const char* op, const char* out_arg, const TensorView& out, const char* in_arg,
                const TensorView& in);
void non_null(const char* op, const char* arg, const TensorView& t);

// The device every view lives on (null entries, absent optional arguments, are skipped); mixed
// devices are an error naming both arguments. The first entry must not be null.
Device common_device(const char* op,
                     std::initializer_list<std::pair<const char*, const TensorView*>> args);

std::string shape_str(std::span<const std::int64_t> shape);

}  // namespace kiln::check

namespace kiln {

// Whether `p` is a multiple of `bytes` (vector loads, TMA maps).
inline bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace kiln
