#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/numeric.hpp"
#include "support/buffers.hpp"

namespace kiln::test {
namespace {

// Calls f(offset) for every element of the view in logical (row-major) order.
template <typename F>
void for_each_element(const TensorView& v, F f) {
  if (v.numel() == 0) return;
  std::int64_t index[kMaxDims] = {};
  std::int64_t offset = 0;
  while (true) {
    f(offset);
    int d = v.dim() - 1;
    for (; d >= 0; --d) {
      offset += v.stride(d);
      if (++index[d] < v.size(d)) break;
      offset -= index[d] * v.stride(d);
      index[d] = 0;
    }
    if (d < 0) return;
  }
}

struct Errors {
  double max = 0, sum = 0, sum_sq = 0;
  void add(double e) {
    max = std::max(max, e);
    sum += e;
    sum_sq += e * e;
  }
  double stat(LowStat s, double n) const {
    return s == kMaxError ? max : s == kMeanError ? sum / n : std::sqrt(sum_sq / n);
  }
};

void report(std::size_t& bad, const std::string& what, std::size_t i, double got, double want,
            const std::string& why) {
  if (++bad <= 5) {
    ADD_FAILURE() << what << ": element " << i << " is " << got << ", expected " << want << " ("
                  << why << ")";
  }
}

}  // namespace

Tolerance Tolerance::rounding(DType out, double slack) {
  const double u = unit_roundoff(out);
  Tolerance t;
  t.rel = (1 + slack) * 2 * u;
  t.floor = std::ldexp(1.0, -18);  // f32 math differs from f64 by a few 2^-24 of the magnitude
  t.nmse = std::max(1e-10, (1 + slack) * (1 + slack) * u * u);
  return t;
}

Tolerance Tolerance::relative(double e) {
  Tolerance t;
  t.nmse = e * e;
  return t;
}

Tolerance Tolerance::same_bits() {
  Tolerance t;
  t.bits = true;
  return t;
}

Expected same_bits(const std::string& output, const TensorView& want) {
  return {.output = output, .tolerance = Tolerance::same_bits(), .bits = bytes(want)};
}

std::vector<double> values(const TensorView& view) {
  std::vector<double> out;
  out.reserve(std::size_t(view.numel()));
  for_each_element(view, [&](std::int64_t offset) {
    out.push_back(numeric::load_float(view.data(), view.dtype(), offset));
  });
  return out;
}

std::vector<std::uint8_t> bytes(const TensorView& view) {
  const std::size_t size = dtype_size(view.dtype());
  std::vector<std::uint8_t> out;
  out.reserve(std::size_t(view.numel()) * size);
  const auto* base = static_cast<const std::uint8_t*>(view.data());
  for_each_element(view, [&](std::int64_t offset) {
    out.insert(out.end(), base + offset * std::int64_t(size),
               base + (offset + 1) * std::int64_t(size));
  });
  return out;
}

void expect_match(const std::string& what, const TensorView& got, const Expected& e) {
  if (e.tolerance.bits) {
    const std::vector<std::uint8_t> have = bytes(got);
    ASSERT_EQ(have.size(), e.bits.size()) << what;
    const auto first = std::mismatch(have.begin(), have.end(), e.bits.begin()).first;
    EXPECT_TRUE(first == have.end())
        << what << ": other bits from element " << (first - have.begin()) / dtype_size(got.dtype())
        << " on (byte " << int(*first) << ", expected " << int(e.bits[first - have.begin()]) << ")";
    return;
  }
  const std::vector<double> all = values(got);
  if (e.at.empty()) return expect_values(what, all, e);
  // A sample of the elements is compared; every element must have been written.
  const auto nans = std::count_if(all.begin(), all.end(), [](double v) { return std::isnan(v); });
  EXPECT_EQ(nans, 0) << what << ": " << nans << " elements NaN (not written: still poisoned)";
  std::vector<double> sample;
  for (std::int64_t i : e.at) sample.push_back(all[std::size_t(i)]);
  expect_values(what, sample, e);
}

void expect_values(const std::string& what, const std::vector<double>& got, const Expected& e) {
  const Tolerance& t = e.tolerance;
  ASSERT_EQ(got.size(), e.exact.size()) << what;
  ASSERT_TRUE(e.low.empty() || e.low.size() == got.size()) << what;
  ASSERT_TRUE(e.magnitude.empty() || e.magnitude.size() == got.size()) << what;
  ASSERT_TRUE(e.low.size() == got.size() || (t.factor < 0 && !t.against_low)) << what;
  std::size_t bad = 0, finite = 0;
  double ref_sq = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double want = e.exact[i];
    if (std::isfinite(want)) {
      ref_sq += want * want;
      ++finite;
    } else if (std::isnan(want) ? !std::isnan(got[i]) : got[i] != want) {
      report(bad, what, i, got[i], want, "non-finite, expected exactly");
    }
  }
  if (finite == 0) {
    EXPECT_EQ(bad, 0u) << what;
    return;
  }
  const double rms = std::sqrt(ref_sq / double(finite));
  ASSERT_GT(rms, 0.0) << what << ": the expected output is all zeros; the test cannot fail";
  Errors err, low_err;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double want = e.exact[i];
    if (!std::isfinite(want)) continue;
    if (std::isnan(got[i])) {
      report(bad, what, i, got[i], want, "NaN: not written, or made by the op");
      continue;
    }
    err.add(std::abs(got[i] - want));
    if (!e.low.empty()) low_err.add(std::abs(e.low[i] - want));
    if (t.rel >= 0) {
      const double target = t.against_low ? e.low[i] : want;
      const double mag = e.magnitude.empty() ? 0.0 : e.magnitude[i];
      const double bound = t.rel * std::abs(target) + t.accum * mag + t.abs + t.floor * rms;
      if (!(std::abs(got[i] - target) <= bound)) {
        report(bad, what, i, got[i], target, "bound " + std::to_string(bound));
      }
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off";
  if (t.nmse >= 0) {
    EXPECT_LE(err.sum_sq / ref_sq, t.nmse) << what << ": NMSE";
  }
  if (t.factor >= 0) {
    const double n = double(finite);
    for (LowStat s : {kMaxError, kMeanError, kRmsError}) {
      if (!(t.low_stats & s)) continue;
      const char* name = s == kMaxError ? "max" : s == kMeanError ? "mean" : "rms";
      EXPECT_LE(err.stat(s, n), t.factor * low_err.stat(s, n) + t.low_floor * rms)
          << what << ": " << name << " error " << err.stat(s, n) << ", low-precision reference's "
          << low_err.stat(s, n);
    }
  }
}

}  // namespace kiln::test
