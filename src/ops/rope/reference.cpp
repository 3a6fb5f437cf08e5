// CPU reference of rope: written to be read, not to be fast.
#include <cmath>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "core/numeric.hpp"
#include "ops/rope/heads.hpp"
#include "ops/rope/rope.hpp"

namespace kiln::rope_detail {

namespace {

std::int64_t load_position(const TensorView& positions, std::int64_t n, std::int64_t t) {
  const std::int64_t i = n * positions.stride(0) + t * positions.stride(1);
  if (positions.dtype() == DType::i32) return static_cast<const std::int32_t*>(positions.data())[i];
  return static_cast<const std::int64_t*>(positions.data())[i];
}

}  // namespace

void reference(const TensorView& x, const TensorView& positions, const TensorView& out,
               bool at_positions, const RopeOptions& options) {
  const std::int64_t N = x.size(0);
  const std::int64_t T = x.size(1);
  const std::int64_t H = x.size(2);
  const std::int64_t D = x.size(3);
  const std::int64_t S = out.size(2);
  const std::int64_t half = D / 2;
  std::vector<float> row(static_cast<std::size_t>(D));

  // Every position is checked before the first row is written: an error leaves the cache as it
  // was.
  for (std::int64_t n = 0; at_positions && n < N; ++n) {
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t pos = load_position(positions, n, t);
      if (pos < 0 || pos >= S) {
        check::fail("rope_cache", ErrorCode::invalid_argument,
                    "positions[" + std::to_string(n) + ", " + std::to_string(t) +
                        "] = " + std::to_string(pos) + ", expected a row of the cache: [0, " +
                        std::to_string(S) + ")");
      }
    }
  }
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t pos = load_position(positions, n, t);
      const std::int64_t s = at_positions ? pos : t;
      for (std::int64_t h = 0; h < H; ++h) {
        // row = x[n, t, h, :]
        for (std::int64_t d = 0; d < D; ++d) {
          const std::int64_t i =
              n * x.stride(0) + t * x.stride(1) + h * x.stride(2) + d * x.stride(3);
          row[std::size_t(d)] = numeric::load_float(x.data(), x.dtype(), i);
        }
        if (options.norm_weight) rope_heads::rms_norm_row(row, *options.norm_weight, options.eps);
        if (options.theta) {
          for (std::int64_t i = 0; i < half; ++i) {
            // Pair i: adjacent elements (normal) or one from each half (neox).
            const std::int64_t a = options.style == RopeStyle::normal ? 2 * i : i;
            const std::int64_t b = options.style == RopeStyle::normal ? 2 * i + 1 : i + half;
            const double angle =
                double(pos) * std::pow(*options.theta, -2.0 * double(i) / double(D));
            const float c = static_cast<float>(std::cos(angle));
            const float sn = static_cast<float>(std::sin(angle));
            const float xa = row[std::size_t(a)];
            const float xb = row[std::size_t(b)];
            row[std::size_t(a)] = xa * c - xb * sn;
            row[std::size_t(b)] = xa * sn + xb * c;
          }
        }
        // out[n, h, s, :] = row
        for (std::int64_t d = 0; d < D; ++d) {
          const std::int64_t i =
              n * out.stride(0) + h * out.stride(1) + s * out.stride(2) + d * out.stride(3);
          numeric::store_float(out.data(), out.dtype(), i, row[std::size_t(d)]);
        }
      }
    }
  }
}

}  // namespace kiln::rope_detail
