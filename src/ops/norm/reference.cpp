// CPU reference of the norm family: written to be read, not to be fast.
#include <cmath>
#include <vector>

#include "core/numeric.hpp"
#include "core/rows.hpp"
#include "ops/matmul/matmul.hpp"
#include "ops/norm/norm.hpp"

namespace kiln::norm_detail {
namespace {

// Element i of a [D] vector (weight, bias) as f32, or `absent` without one.
float at(const std::optional<TensorView>& v, std::int64_t i, float absent) {
  return v ? numeric::load_float(v->data(), v->dtype(), i * v->stride(0)) : absent;
}

// Element i of the modulation vector of batch element b: [D] or [B, D].
float mod_at(const std::optional<TensorView>& v, std::int64_t b, std::int64_t i) {
  if (!v) return 0.f;
  const std::int64_t offset =
      v->dim() == 2 ? b * v->stride(0) + i * v->stride(1) : i * v->stride(0);
  return numeric::load_float(v->data(), v->dtype(), offset);
}

// Row r of x [..., D] as f32.
void load_row(const TensorView& x, const RowLayout& layout, std::int64_t r,
              std::vector<float>& row) {
  const std::int64_t base = row_offset(layout, r);
  const std::int64_t step = x.stride(x.dim() - 1);
  for (std::size_t d = 0; d < row.size(); ++d) {
    row[d] = numeric::load_float(x.data(), x.dtype(), base + std::int64_t(d) * step);
  }
}

float* out_scale_of(const std::optional<TensorView>& out_scale) {
  return out_scale ? static_cast<float*>(out_scale->data()) : nullptr;
}

}  // namespace

void rms_norm_reference(const TensorView& x, const TensorView& out, const RmsNormOptions& options) {
  const RowLayout layout = row_layout(x);
  const std::int64_t D = x.size(x.dim() - 1);
  std::vector<float> row(static_cast<std::size_t>(D)), y(static_cast<std::size_t>(D));
  for (std::int64_t r = 0; r < layout.rows; ++r) {
    load_row(x, layout, r, row);
    double sum_sq = 0;
    for (float v : row) sum_sq += double(v) * double(v);
    const auto inv_rms = float(1.0 / std::sqrt(sum_sq / double(D) + double(options.eps)));
    for (std::int64_t d = 0; d < D; ++d) {
      y[std::size_t(d)] = row[std::size_t(d)] * inv_rms * at(options.weight, d, 1.f);
    }
    matmul_detail::store_row_reference(out, out_scale_of(options.out_scale), r, y);
  }
}

void layer_norm_reference(const TensorView& x, const TensorView& out,
                          const LayerNormOptions& options) {
  const RowLayout layout = row_layout(x);
  const std::int64_t D = x.size(x.dim() - 1);
  // Rows of one modulation vector: [B, D] shift / scale cover R / B rows each.
  const bool batched =
      (options.shift && options.shift->dim() == 2) || (options.scale && options.scale->dim() == 2);
  const std::int64_t rows_per_batch = batched ? layout.rows / x.size(0) : layout.rows;
  std::vector<float> row(static_cast<std::size_t>(D)), y(static_cast<std::size_t>(D));
  for (std::int64_t r = 0; r < layout.rows; ++r) {
    load_row(x, layout, r, row);
    double sum = 0;
    for (float v : row) sum += double(v);
    const double mean = sum / double(D);
    double sum_sq = 0;
    for (float v : row) sum_sq += (double(v) - mean) * (double(v) - mean);
    const auto rstd = float(1.0 / std::sqrt(sum_sq / double(D) + double(options.eps)));
    const auto mean_f = float(mean);
    const std::int64_t b = r / rows_per_batch;
    for (std::int64_t d = 0; d < D; ++d) {
      float t = (row[std::size_t(d)] - mean_f) * rstd;
      t = t * at(options.weight, d, 1.f) + at(options.bias, d, 0.f);
      t = t * (1.f + mod_at(options.scale, b, d)) + mod_at(options.shift, b, d);
      y[std::size_t(d)] = t;
    }
    matmul_detail::store_row_reference(out, out_scale_of(options.out_scale), r, y);
  }
}

void group_norm_reference(const TensorView& x, const TensorView& out,
                          const GroupNormOptions& options) {
  const std::int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const std::int64_t G = options.num_groups, cg = C / G;
  // Element (n, c, h, w) of a 4-D view with any strides.
  const auto offset = [](const TensorView& t, std::int64_t n, std::int64_t c, std::int64_t h,
                         std::int64_t w) {
    return n * t.stride(0) + c * t.stride(1) + h * t.stride(2) + w * t.stride(3);
  };
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t g = 0; g < G; ++g) {
      // Mean, then the biased variance around it, over C / G channels x H x W, in f64.
      double sum = 0;
      for (std::int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        for (std::int64_t h = 0; h < H; ++h) {
          for (std::int64_t w = 0; w < W; ++w) {
            sum += numeric::load_float(x.data(), x.dtype(), offset(x, n, c, h, w));
          }
        }
      }
      const double count = double(cg * H * W);
      const double mean = sum / count;
      double sum_sq = 0;
      for (std::int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        for (std::int64_t h = 0; h < H; ++h) {
          for (std::int64_t w = 0; w < W; ++w) {
            const double d = numeric::load_float(x.data(), x.dtype(), offset(x, n, c, h, w)) - mean;
            sum_sq += d * d;
          }
        }
      }
      const auto rstd = float(1.0 / std::sqrt(sum_sq / count + double(options.eps)));
      const auto mean_f = float(mean);
      for (std::int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const float weight = at(options.weight, c, 1.f), bias = at(options.bias, c, 0.f);
        for (std::int64_t h = 0; h < H; ++h) {
          for (std::int64_t w = 0; w < W; ++w) {
            const float v = numeric::load_float(x.data(), x.dtype(), offset(x, n, c, h, w));
            float y = (v - mean_f) * rstd * weight + bias;
            if (options.silu) y = y / (1.f + std::exp(-y));
            numeric::store_float(out.data(), out.dtype(), offset(out, n, c, h, w), y);
          }
        }
      }
    }
  }
}

}  // namespace kiln::norm_detail
