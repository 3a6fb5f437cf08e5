// CPU reference of attention: written to be read, not to be fast.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/numeric.hpp"
#include "ops/attention/attention.hpp"

namespace kiln::attention_detail {

namespace {

double element(const TensorView& t, std::int64_t a, std::int64_t b, std::int64_t c,
               std::int64_t d) {
  const std::int64_t i = a * t.stride(0) + b * t.stride(1) + c * t.stride(2) + d * t.stride(3);
  return numeric::load_float(t.data(), t.dtype(), i);
}

// mask[n, h, i, j] with the mask's dims aligned to the right and size-1 dims broadcast.
double mask_value(const TensorView& mask, std::int64_t n, std::int64_t h, std::int64_t i,
                  std::int64_t j) {
  const std::int64_t index[4] = {n, h, i, j};
  std::int64_t offset = 0;
  for (int d = 0; d < mask.dim(); ++d) {
    const int axis = 4 - mask.dim() + d;
    if (mask.size(d) != 1) offset += index[axis] * mask.stride(d);
  }
  return numeric::load_float(mask.data(), mask.dtype(), offset);
}

}  // namespace

void reference(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const AttentionOptions& options, float scale) {
  const std::int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const std::int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const std::int64_t group = Hq / Hkv;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  std::vector<double> q_row(static_cast<std::size_t>(D));
  std::vector<double> s(static_cast<std::size_t>(Lk));
  std::vector<double> o(static_cast<std::size_t>(Dv));

  for (std::int64_t n = 0; n < N; ++n) {
    // Keys at or past kv_len[n] are hidden (validate() has checked 0 <= kv_len <= Lk on CPU).
    std::int64_t keys = Lk;
    if (options.kv_len) {
      keys = options.kv_len->dtype() == DType::i32
                 ? std::int64_t(static_cast<const std::int32_t*>(options.kv_len->data())[n])
                 : static_cast<const std::int64_t*>(options.kv_len->data())[n];
    }
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t kv_head = h / group;
      for (std::int64_t i = 0; i < Lq; ++i) {
        for (std::int64_t d = 0; d < D; ++d) q_row[std::size_t(d)] = element(q, n, h, i, d);
        // s_j = scale * q . k_j, soft-capped, plus the mask; -inf for keys hidden by kv_len and
        // causal. The row's max ignores NaN (as fmaxf does in the kernels).
        double row_max = -kInf;
        for (std::int64_t j = 0; j < Lk; ++j) {
          const bool visible = j < keys && (!options.causal || j <= i + keys - Lq);
          double x = -kInf;
          if (visible) {
            double dot = 0;
            for (std::int64_t d = 0; d < D; ++d)
              dot += q_row[std::size_t(d)] * element(k, n, kv_head, j, d);
            x = scale * dot;
            if (options.softcap) x = *options.softcap * std::tanh(x / *options.softcap);
            if (options.mask) x += mask_value(*options.mask, n, h, i, j);
          }
          s[std::size_t(j)] = x;
          row_max = std::fmax(row_max, x);
        }
        // softmax(s) v as the kernels compute it: exponents relative to the max (0 when every
        // score is -inf), so a row whose scores are all -inf sums to exactly 0 and gives zeros
        // and lse -inf, while a NaN score, or a +inf one (inf - inf), makes the sum NaN and the
        // row NaN, as in SDPA. A key whose score is -inf never contributes, whatever v holds.
        const double shift = row_max == -kInf ? 0.0 : row_max;
        double sum = 0;
        std::fill(o.begin(), o.end(), 0.0);
        for (std::int64_t j = 0; j < Lk; ++j) {
          if (s[std::size_t(j)] == -kInf) continue;
          const double p = std::exp(s[std::size_t(j)] - shift);
          sum += p;
          for (std::int64_t d = 0; d < Dv; ++d)
            o[std::size_t(d)] += p * element(v, n, kv_head, j, d);
        }
        const std::int64_t row = (n * Hq + h) * Lq + i;  // of lse, contiguous
        const std::int64_t out_row = n * out.stride(0) + h * out.stride(1) + i * out.stride(2);
        for (std::int64_t d = 0; d < Dv; ++d) {
          numeric::store_float(out.data(), out.dtype(), out_row + d * out.stride(3),
                               float(sum == 0 ? 0.0 : o[std::size_t(d)] / sum));
        }
        if (options.lse) {
          static_cast<float*>(options.lse->data())[row] =
              float(sum == 0 ? -kInf : shift + std::log(sum));
        }
      }
    }
  }
}

}  // namespace kiln::attention_detail
