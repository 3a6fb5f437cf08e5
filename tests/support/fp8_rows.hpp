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

// expect() and also() of a row op (the base of its harness struct, CRTP) whose Case has an `out`
// dtype and whose Op has oracle(case, host views) (f64, row-major) and call(case, views, out,
// stream) (the op into `out`): a 16/32-bit out against the oracle (CPU) or the CPU reference
// (CUDA); an fp8 out by expect_fp8_rows.
template <typename Op>
struct RowOutputChecks {
  template <typename Case>
  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    if (is_fp8(c.out)) return {};  // also(): the codes and scales
    if (r.backend() == Backend::cuda) {
      return {{"out", values(r.cpu()["out"]), Tolerance::rounding(c.out, 4.0)}};
    }
    return {{"out", Op::oracle(c, r.host()), Tolerance::rounding(c.out, 8.0)}};
  }

  template <typename Case>
  static void also(const Case& c, CaseRun& r) {
    if (!is_fp8(c.out)) return;
    Views& v = r.views();
    expect_fp8_rows(
        r, [&](const TensorView& y32, Stream s) { Op::call(c, v, y32, s); },
        Op::oracle(c, r.host()));
  }

  static bool is_fp8(DType d) { return d == DType::f8_e4m3fn || d == DType::f8_e5m2; }
};

}  // namespace kiln::test
