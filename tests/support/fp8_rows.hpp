// The per-token fp8 outputs of the row ops (norm and activation families): codes "out" [..., C]
// and scales "out_scale" [R], checked on the case's backend.
#pragma once

#include <functional>
#include <vector>

#include "support/harness.hpp"

namespace kiln::test {

// What an fp8 output must be:
//   1. bit for bit quantize_fp8(y, row granularity) of the f32 y that `run_f32` writes (the same
//      op with an f32 out, on the same backend and stream): the fused quantization rounds the f32
//      result once, as the plain output does;
//   2. codes times scales within fp8's rounding of `exact` (the f64 oracle of y, row-major):
//      |q s - y| <= (2^-mant + 1e-5) |y| + half the subnormal step times s;
//   3. every scale positive (1 for an all-zero row).
void expect_fp8_rows(CaseRun& r, const std::function<void(const TensorView& y32, Stream)>& run_f32,
                     const std::vector<double>& exact);

}  // namespace kiln::test
