// Argument checks shared by every op. Each failure throws kiln::Error with a message
// "kiln::<op>: <argument> ..., expected ..., got ...".
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
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
// An output written row by row: the last dim contiguous, the rows (every other dim) any strides
// such that no two rows share an element (sorted by stride, each dim of more than one row steps
// past everything the dims below it span). An empty t has no element to place: any strides
// (torch gives empty tensors odd ones). `examples` names layouts the op's callers use.
void distinct_rows(const char* op, const char* arg, const TensorView& t,
                   const std::string& examples);
void no_overlap(const char* op, const char* out_arg, const TensorView& out, const char* in_arg,
                const TensorView& in);
void non_null(const char* op, const char* arg, const TensorView& t);

// The device every view lives on (null entries, absent optional arguments, are skipped); mixed
// devices are an error naming both arguments. The first entry must not be null.
Device common_device(const char* op,
                     std::initializer_list<std::pair<const char*, const TensorView*>> args);

// The output of an op that may write fp8 for the next GEMM: `out` f32/f16/bf16, or f8_e4m3fn /
// f8_e5m2 with `out_scale` f32 [rows] contiguous (one scale per row); out_scale must be absent
// for a 16/32-bit out. Returns whether out is fp8.
bool row_scaled_out(const char* op, const TensorView& out,
                    const std::optional<TensorView>& out_scale, std::int64_t rows);

std::string shape_str(std::span<const std::int64_t> shape);

}  // namespace kiln::check

namespace kiln {

// Whether `p` is a multiple of `bytes` (vector loads, TMA maps).
inline bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace kiln
