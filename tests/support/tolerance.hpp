// The tolerance policy every op's output is held to, and the oracle it is held against.
//
// A result is compared with `exact`, the oracle (a closed form, a direct f64 sum, or kiln's CPU
// reference path), element by element in the output's logical (row-major) order:
//   - a non-finite expected value must come back as it is (NaN as any NaN, +-inf exactly); a NaN
//     anywhere else fails (outputs start poisoned with NaN, so this also catches unwritten ones);
//   - the expected values must not all be zero (a comparison with zeros cannot fail);
//   - then every term the Tolerance sets must hold: NMSE (ggml's measure), an elementwise bound
//     relative to the expected magnitude, and bounds relative to what the reference computes in low
//     precision (FlashAttention's tests: kiln's error may be at most `factor` times the error of
//     the same reference computed the way a low-precision kernel must);
//   - or, for codes and anything computed the same way on both sides, the same bits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kiln/tensor.hpp"

namespace kiln::test {

// Error statistics the low-precision bound compares.
enum LowStat : unsigned { kMaxError = 1, kMeanError = 2, kRmsError = 4 };

struct Tolerance {
  bool bits = false;  // bit for bit
  // sum (got - exact)^2 / sum exact^2 <= nmse (< 0: not checked).
  double nmse = -1;
  // Elementwise, |got - t| <= rel |t| + accum * magnitude + abs + floor * rms(exact), with t the
  // low-precision reference when `against_low`, else exact (rel < 0: not checked).
  double rel = -1, accum = 0, abs = 0, floor = 0;
  bool against_low = false;
  // For each statistic in `low_stats` of |got - exact|: at most `factor` times that of
  // |low - exact|, plus low_floor * rms(exact) (factor < 0: not checked).
  double factor = -1, low_floor = 0;
  unsigned low_stats = 0;

  // Within the rounding of `out` (plus `slack` ulps for differently ordered f32 math): every
  // element within (1 + slack) * 2u |exact| + 2^-18 rms, NMSE within (1 + slack)^2 u^2.
  static Tolerance rounding(DType out, double slack);
  // ||got - exact|| / ||exact|| <= e (Frobenius).
  static Tolerance relative(double e);
  static Tolerance same_bits();
};

// What one output of a case must match.
struct Expected {
  std::string output;              // the output's name
  std::vector<double> exact = {};  // the oracle, in logical order (or at `at`)
  Tolerance tolerance = {};
  std::vector<double> low = {};         // the reference computed in low precision
  std::vector<double> magnitude = {};   // per element: sum of |terms| (accumulation bounds)
  std::vector<std::int64_t> at = {};    // the logical indices compared (empty: all)
  std::vector<std::uint8_t> bits = {};  // Tolerance::same_bits: the expected bytes
};

// An output that must equal `want` (a host view) bit for bit.
Expected same_bits(const std::string& output, const TensorView& want);

// The elements of a host view, in logical order: as numbers (f32, f16, bf16) or as bytes.
std::vector<double> values(const TensorView& view);
std::vector<std::uint8_t> bytes(const TensorView& view);

// Checks a host view of the output against `e` (every element of the view must be written).
void expect_match(const std::string& what, const TensorView& got, const Expected& e);
// Checks values against `e.exact` (e.bits unused).
void expect_values(const std::string& what, const std::vector<double>& got, const Expected& e);

}  // namespace kiln::test
