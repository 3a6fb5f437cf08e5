#include "ops/matmul/support.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "ops/matmul/matmul.hpp"

namespace kiln::test {

void fill_fp8(void* data, DType format, std::size_t n, Rng& rng, float range) {
  std::uniform_real_distribution<float> dist(-range, range);
  auto* bytes = static_cast<std::uint8_t*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    bytes[i] = matmul_detail::float_to_fp8(dist(rng.engine()), format);
  }
}

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) return std::numeric_limits<double>::infinity();
    const double d = double(got[i]) - double(want[i]);
    num += d * d;
    den += double(want[i]) * double(want[i]);
  }
  EXPECT_GT(den, 0.0) << "the reference is all zeros: the comparison cannot fail";
  return std::sqrt(num / den);
}

}  // namespace kiln::test
