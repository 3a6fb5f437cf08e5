// CPU reference of rope_flux: written to be read, not to be fast.
#include <vector>

#include "core/numeric.hpp"
#include "ops/rope/heads.hpp"
#include "ops/rope_flux/rope_flux.hpp"

namespace kiln::rope_flux_detail {

void reference(const TensorView& x, const std::optional<TensorView>& pe, const TensorView& out,
               const RopeFluxOptions& options) {
  const std::int64_t N = x.size(0);
  const std::int64_t L = x.size(1);
  const std::int64_t H = x.size(2);
  const std::int64_t D = x.size(3);
  const bool batched_pe = pe && pe->dim() == 5;
  std::vector<float> row(static_cast<std::size_t>(D));

  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t l = 0; l < L; ++l) {
      for (std::int64_t h = 0; h < H; ++h) {
        // row = x[n, l, h, :]
        for (std::int64_t d = 0; d < D; ++d) {
          const std::int64_t i =
              n * x.stride(0) + l * x.stride(1) + h * x.stride(2) + d * x.stride(3);
          row[std::size_t(d)] = numeric::load_float(x.data(), x.dtype(), i);
        }
        if (options.norm_weight) rope_heads::rms_norm_row(row, *options.norm_weight, options.eps);
        if (pe) {
          // pe[(n,) l, p, r, c]: the 2x2 rotation of pair p.
          const int o = batched_pe ? 1 : 0;
          const std::int64_t base = (batched_pe ? n * pe->stride(0) : 0) + l * pe->stride(o);
          for (std::int64_t p = 0; p < D / 2; ++p) {
            auto m = [&](int r, int c) {
              return numeric::load_float(
                  pe->data(), DType::f32,
                  base + p * pe->stride(o + 1) + r * pe->stride(o + 2) + c * pe->stride(o + 3));
            };
            const float x0 = row[std::size_t(2 * p)];
            const float x1 = row[std::size_t(2 * p + 1)];
            row[std::size_t(2 * p)] = m(0, 0) * x0 + m(0, 1) * x1;
            row[std::size_t(2 * p + 1)] = m(1, 0) * x0 + m(1, 1) * x1;
          }
        }
        // out[n, h, l, :] = row
        for (std::int64_t d = 0; d < D; ++d) {
          numeric::store_float(out.data(), out.dtype(),
                               n * out.stride(0) + h * out.stride(1) + l * out.stride(2) + d,
                               row[std::size_t(d)]);
        }
      }
    }
  }
}

}  // namespace kiln::rope_flux_detail
