// CPU reference of the matmul family (fp8 and Q8_0 codecs, quantize, dequantize, matmul): the
// CPU backend and the oracle of every GPU test. Written to be read, not to be fast.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/numeric.hpp"
#include "ops/matmul/kernels/params.cuh"
#include "ops/matmul/matmul.hpp"

namespace kiln::matmul_detail {
namespace {

// The layout of an fp8 format: mantissa bits, exponent bias, largest finite code (magnitude).
struct Fp8Format {
  int mant;
  int bias;
  std::uint8_t max_code;
  bool has_inf;
};

Fp8Format fp8_format(DType format) {
  if (format == DType::f8_e4m3fn) return {3, 7, 0x7E, false};
  if (format == DType::f8_e5m2) return {2, 15, 0x7B, true};
  check::fail("matmul", ErrorCode::invalid_argument,
              std::string("fp8 format ") + dtype_name(format) + ", expected f8_e4m3fn or f8_e5m2");
}

// Element (r, c) of a 2-D f32/f16/bf16 view as f32.
float load2(const TensorView& t, std::int64_t r, std::int64_t c) {
  return numeric::load_float(t.data(), t.dtype(), r * t.stride(0) + c * t.stride(1));
}

// The scale that applies to element (r, c) of a matrix with a scale of `kind`.
float scale_at(const float* scale, ScaleKind kind, std::int64_t r, std::int64_t c,
               std::int64_t cols) {
  switch (kind) {
    case ScaleKind::none:
      return 1.f;
    case ScaleKind::tensor:
      return scale[0];
    case ScaleKind::row:
      return scale[r];
    case ScaleKind::block128:
      return scale[(r / kScaleBlock) * ceil_div(cols, kScaleBlock) + c / kScaleBlock];
  }
  return 1.f;
}

ScaleKind kind_of(ScaleGranularity granularity) {
  switch (granularity) {
    case ScaleGranularity::tensor:
      return ScaleKind::tensor;
    case ScaleGranularity::row:
      return ScaleKind::row;
    case ScaleGranularity::block128:
      return ScaleKind::block128;
  }
  return ScaleKind::none;
}

// The gate of output element (m, n) of M rows: gate [N], or [B, N] with row b covering rows
// b * M / B .. (b + 1) * M / B - 1; 1 without a gate.
double gate_at(const std::optional<TensorView>& gate, std::int64_t m, std::int64_t n,
               std::int64_t rows) {
  if (!gate) return 1.0;
  if (gate->dim() == 1)
    return numeric::load_float(gate->data(), gate->dtype(), n * gate->stride(0));
  const std::int64_t b = m / (rows / gate->size(0));
  return load2(*gate, b, n);
}

double residual_at(const std::optional<TensorView>& residual, std::int64_t m, std::int64_t n) {
  return residual ? load2(*residual, m, n) : 0.0;
}

// Q8_0 value `c` of row `r` of a block matrix (u8 [R, C/32*34], contiguous rows of `row_bytes`).
float q8_0_value(const std::uint8_t* base, std::int64_t row_bytes, std::int64_t r, std::int64_t c) {
  const std::uint8_t* block = base + r * row_bytes + (c / kQ8Block) * kQ8BlockBytes;
  std::uint16_t d_bits;
  std::memcpy(&d_bits, block, 2);
  const auto q = static_cast<std::int8_t>(block[2 + c % kQ8Block]);
  return numeric::f16_to_float(d_bits) * float(q);
}

}  // namespace

// ---- codecs -------------------------------------------------------------------------------------

float fp8_to_float(std::uint8_t code, DType format) {
  const Fp8Format f = fp8_format(format);
  const bool negative = code & 0x80;
  const int exp = (code & 0x7F) >> f.mant;
  const int mant = code & ((1 << f.mant) - 1);
  const int exp_max = (1 << (7 - f.mant)) - 1;
  float magnitude;
  if (f.has_inf && exp == exp_max) {
    magnitude = mant == 0 ? INFINITY : NAN;
  } else if (!f.has_inf && (code & 0x7F) == 0x7F) {
    magnitude = NAN;
  } else if (exp == 0) {
    magnitude = std::ldexp(float(mant), 1 - f.bias - f.mant);  // subnormal
  } else {
    magnitude = std::ldexp(float((1 << f.mant) + mant), exp - f.bias - f.mant);
  }
  return negative ? -magnitude : magnitude;
}

std::uint8_t float_to_fp8(float value, DType format) {
  const Fp8Format f = fp8_format(format);
  const std::uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  if (std::isnan(value)) return sign | 0x7F;
  const double a = std::fabs(double(value));
  if (a >= double(fp8_max(format))) return sign | f.max_code;  // saturate (inf too)
  const double min_normal = std::ldexp(1.0, 1 - f.bias);
  if (a < min_normal) {
    // Multiples of the subnormal step; 2^mant steps is the smallest normal, the same code.
    const double steps = std::nearbyint(a / std::ldexp(1.0, 1 - f.bias - f.mant));
    return sign | static_cast<std::uint8_t>(steps);
  }
  int e2;
  const double fraction = std::frexp(a, &e2);  // a = fraction * 2^e2, fraction in [0.5, 1)
  int exp = e2 - 1 + f.bias;
  double mant = std::nearbyint((fraction * 2 - 1) * double(1 << f.mant));  // ties to even
  if (mant == double(1 << f.mant)) {
    mant = 0;
    ++exp;
  }
  const int code = (exp << f.mant) | int(mant);
  return sign | static_cast<std::uint8_t>(std::min(code, int(f.max_code)));
}

float fp8_max(DType format) { return format == DType::f8_e4m3fn ? kE4m3Max : kE5m2Max; }

void store_row_reference(const TensorView& out, float* out_scale, std::int64_t r,
                         std::span<const float> y) {
  const auto cols = std::int64_t(y.size());
  if (!is_fp8(out.dtype())) {
    for (std::int64_t c = 0; c < cols; ++c) {
      numeric::store_float(out.data(), out.dtype(), r * cols + c, y[std::size_t(c)]);
    }
    return;
  }
  float amax = 0.f;
  for (float v : y) amax = std::fmax(amax, std::fabs(v));
  float scale = amax / fp8_max(out.dtype());
  if (scale == 0.f) scale = 1.f;
  auto* codes = static_cast<std::uint8_t*>(out.data()) + r * cols;
  for (std::int64_t c = 0; c < cols; ++c) {
    codes[c] = float_to_fp8(y[std::size_t(c)] / scale, out.dtype());
  }
  out_scale[r] = scale;
}

bool is_fp8(DType dtype) { return dtype == DType::f8_e4m3fn || dtype == DType::f8_e5m2; }

bool is_fp8(WeightFormat format) {
  return format == WeightFormat::f8_e4m3fn || format == WeightFormat::f8_e5m2;
}

DType fp8_dtype(WeightFormat format) {
  return format == WeightFormat::f8_e5m2 ? DType::f8_e5m2 : DType::f8_e4m3fn;
}

std::int64_t weight_row_bytes(WeightFormat format, std::int64_t k) {
  switch (format) {
    case WeightFormat::f16:
    case WeightFormat::bf16:
      return 2 * k;
    case WeightFormat::f8_e4m3fn:
    case WeightFormat::f8_e5m2:
      return k;
    case WeightFormat::q8_0:
      return k / kQ8Block * kQ8BlockBytes;
  }
  return 0;
}

void quantize_q8_0_block(const float* x, std::uint8_t* block) {
  // ggml's quantize_row_q8_0_ref, step for step: amax with its MAX(a, b) = a > b ? a : b.
  float amax = 0.f;
  bool has_nan = false;
  for (int j = 0; j < kQ8Block; ++j) {
    const float v = std::fabs(x[j]);
    has_nan = has_nan || std::isnan(v);
    amax = amax > v ? amax : v;
  }
  std::uint16_t d_bits = kQ8NanScale;
  float d = 0.f;
  bool saturate = false;
  if (!has_nan) {
    d = amax / 127.f;
    d_bits = numeric::float_to_f16(d);
    // d past f16's range (ggml stores inf): the largest finite f16, and the codes saturate.
    saturate = (d_bits & 0x7FFF) == 0x7C00;
    if (saturate) d = numeric::f16_to_float(d_bits = kQ8MaxScale);
  }
  std::memcpy(block, &d_bits, 2);
  const float id = d != 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < kQ8Block; ++j) {
    float code = has_nan ? 0.f : std::round(x[j] * id);
    if (saturate) code = std::clamp(code, -127.f, 127.f);
    block[2 + j] = static_cast<std::uint8_t>(static_cast<std::int8_t>(code));
  }
}

// ---- ops ----------------------------------------------------------------------------------------

void quantize_fp8_reference(const TensorView& x, const TensorView& q, const TensorView& scale,
                            ScaleGranularity granularity, bool compute_scale) {
  const std::int64_t R = x.size(0), C = x.size(1);
  const ScaleKind kind = kind_of(granularity);
  auto* scales = static_cast<float*>(scale.data());
  if (compute_scale) {
    // amax per group (NaN ignored, as fmaxf does), scale = amax / max; 1 for an all-zero group.
    const std::vector<std::int64_t> shape = scale_shape(granularity, R, C);
    const std::int64_t groups = shape.size() == 1 ? shape[0] : shape[0] * shape[1];
    std::vector<float> amax(std::size_t(groups), 0.f);
    for (std::int64_t r = 0; r < R; ++r) {
      for (std::int64_t c = 0; c < C; ++c) {
        std::int64_t g = 0;
        if (kind == ScaleKind::row) g = r;
        if (kind == ScaleKind::block128) {
          g = (r / kScaleBlock) * ceil_div(C, kScaleBlock) + c / kScaleBlock;
        }
        amax[std::size_t(g)] = std::fmax(amax[std::size_t(g)], std::fabs(load2(x, r, c)));
      }
    }
    const float max = fp8_max(q.dtype());
    for (std::int64_t g = 0; g < groups; ++g) {
      const float s = amax[std::size_t(g)] / max;
      scales[g] = s == 0.f ? 1.f : s;
    }
  }
  auto* codes = static_cast<std::uint8_t*>(q.data());
  for (std::int64_t r = 0; r < R; ++r) {
    for (std::int64_t c = 0; c < C; ++c) {
      const float s = scale_at(scales, kind, r, c, C);
      codes[r * C + c] = float_to_fp8(load2(x, r, c) / s, q.dtype());
    }
  }
}

void quantize_q8_0_reference(const TensorView& x, const TensorView& q) {
  const std::int64_t R = x.size(0), C = x.size(1);
  const std::int64_t row_bytes = C / kQ8Block * kQ8BlockBytes;
  std::vector<float> block(kQ8Block);
  for (std::int64_t r = 0; r < R; ++r) {
    for (std::int64_t b = 0; b < C / kQ8Block; ++b) {
      for (int j = 0; j < kQ8Block; ++j) block[std::size_t(j)] = load2(x, r, b * kQ8Block + j);
      quantize_q8_0_block(block.data(),
                          static_cast<std::uint8_t*>(q.data()) + r * row_bytes + b * kQ8BlockBytes);
    }
  }
}

void dequantize_reference(const TensorView& q, const std::optional<TensorView>& scale,
                          const TensorView& out) {
  const std::int64_t R = out.size(0), C = out.size(1);
  const auto* codes = static_cast<const std::uint8_t*>(q.data());
  if (q.dtype() == DType::u8) {
    for (std::int64_t r = 0; r < R; ++r) {
      for (std::int64_t c = 0; c < C; ++c) {
        numeric::store_float(out.data(), out.dtype(), r * C + c,
                             q8_0_value(codes, q.size(1), r, c));
      }
    }
    return;
  }
  const ScaleKind kind =
      scale ? scale_kind("dequantize", "scale", *scale, R, C, true) : ScaleKind::none;
  const float* scales = scale ? static_cast<const float*>(scale->data()) : nullptr;
  for (std::int64_t r = 0; r < R; ++r) {
    for (std::int64_t c = 0; c < C; ++c) {
      const float v = fp8_to_float(codes[r * C + c], q.dtype()) * scale_at(scales, kind, r, c, C);
      numeric::store_float(out.data(), out.dtype(), r * C + c, v);
    }
  }
}

void matmul_reference(const TensorView& a, const Weight& w, const TensorView& out,
                      const MatmulOptions& options) {
  const std::int64_t M = a.size(0), K = a.size(1), N = w.n;
  // a as f32 [M, K] (fp8 codes decoded; a_scale goes to the epilogue).
  std::vector<float> a_f32(std::size_t(M * K));
  for (std::int64_t m = 0; m < M; ++m) {
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t i = m * a.stride(0) + k * a.stride(1);
      a_f32[std::size_t(m * K + k)] =
          is_fp8(a.dtype()) ? fp8_to_float(static_cast<const std::uint8_t*>(a.data())[i], a.dtype())
                            : numeric::load_float(a.data(), a.dtype(), i);
    }
  }
  const float* w_scale = w.scale ? static_cast<const float*>(w.scale->data()) : nullptr;
  const ScaleKind w_kind =
      w.scale ? scale_kind("matmul", "w.scale", *w.scale, N, K, true) : ScaleKind::none;
  const float* a_scale =
      options.a_scale ? static_cast<const float*>(options.a_scale->data()) : nullptr;
  const ScaleKind a_kind = options.a_scale
                               ? scale_kind("matmul", "a_scale", *options.a_scale, M, K, false)
                               : ScaleKind::none;
  const std::int64_t row_bytes = weight_row_bytes(w.format, K);
  const auto* w_bytes = static_cast<const std::uint8_t*>(w.data.data());

  std::vector<float> w_row(static_cast<std::size_t>(K));
  for (std::int64_t n = 0; n < N; ++n) {
    // Row n of the weight dequantized to f32: q * scale rounded to f32.
    for (std::int64_t k = 0; k < K; ++k) {
      float v = 0.f;
      switch (w.format) {
        case WeightFormat::f16:
        case WeightFormat::bf16:
          v = numeric::load_float(w.data.data(), w.data.dtype(), n * K + k);
          break;
        case WeightFormat::f8_e4m3fn:
        case WeightFormat::f8_e5m2:
          v = fp8_to_float(w_bytes[n * K + k], fp8_dtype(w.format)) *
              scale_at(w_scale, w_kind, n, k, K);
          break;
        case WeightFormat::q8_0:
          v = q8_0_value(w_bytes, row_bytes, n, k);
          break;
      }
      w_row[std::size_t(k)] = v;
    }
    const float bias =
        options.bias ? numeric::load_float(options.bias->data(), options.bias->dtype(), n) : 0.f;
    for (std::int64_t m = 0; m < M; ++m) {
      double sum = 0;
      for (std::int64_t k = 0; k < K; ++k) {
        sum += double(a_f32[std::size_t(m * K + k)]) * double(w_row[std::size_t(k)]);
      }
      double value = sum * double(scale_at(a_scale, a_kind, m, 0, K)) + double(bias);
      value = value * gate_at(options.gate, m, n, M) + residual_at(options.residual, m, n);
      numeric::store_float(out.data(), out.dtype(), m * N + n, float(value));
    }
  }
}

}  // namespace kiln::matmul_detail
