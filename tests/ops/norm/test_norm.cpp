// norm: rms_norm and layer_norm (affine, AdaLN modulation from chunks of a modulation output, fp8
// outputs) and group_norm (NCHW and channels-last, SiLU): the CPU reference against the
// definitions in f64 written here, the CUDA kernels against the CPU reference; the fp8 outputs bit
// for bit against quantize_fp8 of the op's own f32 result; strided, misaligned and empty inputs;
// the argument checks.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/norm.hpp"
#include "support/fp8_rows.hpp"
#include "support/harness.hpp"

namespace kiln::test {
namespace {

// ---- rms_norm and layer_norm --------------------------------------------------------------------

enum class Mod { none, vector, batched /* [B, D] chunks of a [B, 3 D] modulation output */ };

struct RowCase {
  bool layer = false;  // layer_norm, else rms_norm
  std::int64_t B, L, D;
  DType x = DType::bf16;
  DType out = DType::bf16;
  std::optional<DType> weight =
      std::nullopt;  // weight (and bias, for layer_norm with `bias`) dtype
  bool bias = false;
  Mod mod = Mod::none;
  DType mod_dtype = DType::bf16;
  std::int64_t pad = 0;     // x's row stride is D + pad
  std::int64_t offset = 0;  // elements before x in its allocation (misaligned rows)
  float eps = 1e-6f;

  std::string name() const {
    static const char* mods[] = {"", "_mod_vector", "_mod_batched"};
    return cat(layer ? "layer" : "rms", "_B", B, "_L", L, "_D", D, "_", dtype_name(x), "_to_",
               dtype_name(out), weight ? cat("_w", dtype_name(*weight)) : "", bias ? "_bias" : "",
               mods[int(mod)], mod != Mod::none ? cat("_", dtype_name(mod_dtype)) : "",
               pad ? cat("_pad", pad) : "", offset ? cat("_off", offset) : "",
               eps != 1e-6f ? "_eps1" : "");
  }
};

double at(const std::optional<TensorView>& v, std::int64_t i, double absent) {
  return v ? numeric::load_float(v->data(), v->dtype(), i * v->stride(0)) : absent;
}

// Element d of batch b's modulation vector ([D] or [B, D]).
double mod_at(const std::optional<TensorView>& v, std::int64_t b, std::int64_t d) {
  if (!v) return 0.0;
  const std::int64_t i = v->dim() == 2 ? b * v->stride(0) + d : d;
  return numeric::load_float(v->data(), v->dtype(), i);
}

struct RowNorm : RowOutputChecks<RowNorm> {
  using Case = RowCase;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    const std::int64_t ld = c.D + c.pad;
    t.input("x", c.x, {c.B, c.L, c.D}, {c.L * ld, ld, 1}, c.offset);
    t.fill("x", rng, -2.f, 2.f);
    if (c.weight) {
      t.input("weight", *c.weight, {c.D});
      t.fill("weight", rng, 0.5f, 1.5f);
      if (c.bias) {
        t.input("bias", *c.weight, {c.D});
        t.fill("bias", rng);
      }
    }
    if (c.mod == Mod::batched) {
      t.parent("emb", c.mod_dtype, c.B * 3 * c.D);
      t.view("shift", "emb", c.mod_dtype, {c.B, c.D}, {3 * c.D, 1}, 0);
      t.view("scale", "emb", c.mod_dtype, {c.B, c.D}, {3 * c.D, 1}, c.D);
      t.fill("emb", rng);
    } else if (c.mod == Mod::vector) {
      t.input("shift", c.mod_dtype, {c.D});
      t.input("scale", c.mod_dtype, {c.D});
      t.fill("shift", rng);
      t.fill("scale", rng);
    }
    t.output("out", c.out, {c.B, c.L, c.D});
    if (is_fp8(c.out)) t.output("out_scale", DType::f32, {c.B * c.L});
  }

  static void call(const Case& c, const Views& v, const TensorView& out, Stream stream) {
    const std::optional<TensorView> out_scale =
        is_fp8(out.dtype()) ? v.optional("out_scale") : std::nullopt;
    if (c.layer) {
      LayerNormOptions o;
      o.weight = v.optional("weight");
      o.bias = v.optional("bias");
      o.shift = v.optional("shift");
      o.scale = v.optional("scale");
      o.eps = c.eps;
      o.out_scale = out_scale;
      layer_norm(v["x"], out, o, stream);
    } else {
      RmsNormOptions o;
      o.weight = v.optional("weight");
      o.eps = c.eps;
      o.out_scale = out_scale;
      rms_norm(v["x"], out, o, stream);
    }
  }

  static void run(const Case& c, const Views& v, Stream stream) { call(c, v, v["out"], stream); }

  // The definitions in f64, row-major [B, L, D].
  static std::vector<double> oracle(const Case& c, const Views& host) {
    const TensorView x = host["x"];
    const auto w = host.optional("weight"), b = host.optional("bias");
    const auto shift = host.optional("shift"), scale = host.optional("scale");
    std::vector<double> y(std::size_t(c.B * c.L * c.D));
    std::vector<double> row(std::size_t(c.D));
    for (std::int64_t bi = 0; bi < c.B; ++bi) {
      for (std::int64_t l = 0; l < c.L; ++l) {
        for (std::int64_t d = 0; d < c.D; ++d) {
          row[std::size_t(d)] =
              numeric::load_float(x.data(), c.x, bi * x.stride(0) + l * x.stride(1) + d);
        }
        double* dst = y.data() + (bi * c.L + l) * c.D;
        if (!c.layer) {
          double sum_sq = 0;
          for (double v : row) sum_sq += v * v;
          const double inv = 1.0 / std::sqrt(sum_sq / double(c.D) + c.eps);
          for (std::int64_t d = 0; d < c.D; ++d) dst[d] = row[std::size_t(d)] * inv * at(w, d, 1);
          continue;
        }
        double sum = 0;
        for (double v : row) sum += v;
        const double mean = sum / double(c.D);
        double var = 0;
        for (double v : row) var += (v - mean) * (v - mean);
        const double rstd = 1.0 / std::sqrt(var / double(c.D) + c.eps);
        for (std::int64_t d = 0; d < c.D; ++d) {
          const double t = (row[std::size_t(d)] - mean) * rstd * at(w, d, 1) + at(b, d, 0);
          dst[d] = t * (1 + mod_at(scale, bi, d)) + mod_at(shift, bi, d);
        }
      }
    }
    return y;
  }
};

std::vector<RowCase> row_cases() {
  const DType f32 = DType::f32, hf = DType::f16, bf = DType::bf16;
  const DType e4m3 = DType::f8_e4m3fn, e5m2 = DType::f8_e5m2;
  std::vector<RowCase> all;
  // Every dtype pair and out kind on an odd size, with and without a weight.
  for (bool layer : {false, true}) {
    for (DType x : {f32, hf, bf}) {
      for (DType out : {f32, hf, bf, e4m3, e5m2}) {
        RowCase c{layer, 2, 5, 100, x, out};
        all.push_back(c);
        c.weight = x == f32 ? bf : f32;
        c.bias = layer;
        if (layer) c.mod = Mod::batched;
        all.push_back(c);
      }
    }
  }
  // Row widths: tiny, odd, the models' (Flux hidden 3072 / 4096, per-head 128), and wide rows
  // (TPR 512 and 1024) with bf16 and f32 x.
  for (std::int64_t d : {1, 2, 7, 64, 128, 129, 1000, 3072, 4096, 12288, 30000}) {
    all.push_back({false, 1, 3, d, DType::bf16, DType::bf16, DType::f32});
    all.push_back({true, 2, 3, d, DType::f32, DType::f8_e4m3fn, std::nullopt, false, Mod::batched});
  }
  // Flux's norm1: LayerNorm without affine, AdaLN [B, D] chunks, to bf16 and to fp8.
  for (DType out : {bf, e4m3}) {
    all.push_back({true, 2, 65, 3072, bf, out, std::nullopt, false, Mod::batched});
    all.push_back({true, 1, 33, 4096, bf, out, std::nullopt, false, Mod::vector, f32});
  }
  // Modulation alone (shift or scale missing is covered by the Python tests), f16 modulation.
  all.push_back({true, 3, 4, 48, hf, hf, hf, true, Mod::vector, hf});
  // Strided rows (a column slice of a wider tensor), and rows off 16 bytes (element loads).
  all.push_back({false, 2, 9, 256, bf, bf, bf, false, Mod::none, bf, 64});
  all.push_back({true, 2, 9, 256, bf, e4m3, std::nullopt, false, Mod::batched, bf, 64});
  all.push_back({false, 2, 9, 256, bf, f32, f32, false, Mod::none, bf, 3, 1});
  all.push_back({true, 2, 9, 256, f32, e4m3, f32, true, Mod::batched, bf, 1, 1});
  // A large eps.
  RowCase eps{false, 1, 4, 32, f32, f32, f32};
  eps.eps = 1.f;
  all.push_back(eps);
  // Empty: no rows, and rows of no elements.
  all.push_back({false, 2, 0, 64, bf, bf, bf});
  all.push_back({true, 3, 2, 0, bf, f32});
  return all;
}

KILN_CASES(RowNorm, "RowNorm", row_cases, .sanitize = true);

// ---- group_norm ---------------------------------------------------------------------------------

struct GroupCase {
  std::int64_t N, C, H, W, G;
  DType x = DType::bf16;
  DType out = DType::bf16;
  bool nhwc = false;
  std::optional<DType> weight = std::nullopt;  // and bias, of the same dtype
  bool silu = false;
  float offset = 0.f;  // added to x: a large mean

  std::string name() const {
    return cat("N", N, "_C", C, "_", H, "x", W, "_G", G, "_", dtype_name(x), "_to_",
               dtype_name(out), nhwc ? "_nhwc" : "_nchw",
               weight ? cat("_affine_", dtype_name(*weight)) : "", silu ? "_silu" : "",
               offset != 0.f ? "_offset" : "");
  }
};

struct GroupNorm {
  using Case = GroupCase;

  static Dims strides(const Case& c) {
    if (c.nhwc) return {c.H * c.W * c.C, 1, c.W * c.C, c.C};
    return {c.C * c.H * c.W, c.H * c.W, c.W, 1};
  }

  static void build(const Case& c, Tensors& t, Rng& rng) {
    t.input("x", c.x, {c.N, c.C, c.H, c.W}, strides(c));
    t.fill("x", rng, -2.f + c.offset, 2.f + c.offset);
    if (c.weight) {
      t.input("weight", *c.weight, {c.C});
      t.input("bias", *c.weight, {c.C});
      t.fill("weight", rng, 0.5f, 1.5f);
      t.fill("bias", rng);
    }
    t.output("out", c.out, {c.N, c.C, c.H, c.W}, strides(c));
  }

  static void run(const Case& c, const Views& v, Stream stream) {
    GroupNormOptions o;
    o.num_groups = c.G;
    o.weight = v.optional("weight");
    o.bias = v.optional("bias");
    o.silu = c.silu;
    group_norm(v["x"], v["out"], o, stream);
  }

  // torch.nn.functional.group_norm (+ SiLU) in f64, in logical (NCHW) order.
  static std::vector<double> oracle(const Case& c, const Views& host) {
    const std::vector<double> x = values(host["x"]);
    const auto w = host.optional("weight"), b = host.optional("bias");
    const std::int64_t cg = c.C / c.G, hw = c.H * c.W;
    std::vector<double> y(x.size());
    for (std::int64_t n = 0; n < c.N; ++n) {
      for (std::int64_t g = 0; g < c.G; ++g) {
        const std::size_t first = std::size_t((n * c.C + g * cg) * hw),
                          count = std::size_t(cg * hw);
        double sum = 0, var = 0;
        for (std::size_t i = 0; i < count; ++i) sum += x[first + i];
        const double mean = sum / double(count);
        for (std::size_t i = 0; i < count; ++i)
          var += (x[first + i] - mean) * (x[first + i] - mean);
        const double rstd = 1.0 / std::sqrt(var / double(count) + 1e-6);
        for (std::size_t i = 0; i < count; ++i) {
          const std::int64_t ch = g * cg + std::int64_t(i) / hw;
          double v = (x[first + i] - mean) * rstd * at(w, ch, 1) + at(b, ch, 0);
          if (c.silu) v = v / (1 + std::exp(-v));
          y[first + i] = v;
        }
      }
    }
    return y;
  }

  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    if (r.backend() == Backend::cuda) {
      return {{"out", values(r.cpu()["out"]), Tolerance::rounding(c.out, 4.0)}};
    }
    return {{"out", oracle(c, r.host()), Tolerance::rounding(c.out, 8.0)}};
  }
};

std::vector<GroupCase> group_cases() {
  const DType f32 = DType::f32, hf = DType::f16, bf = DType::bf16;
  std::vector<GroupCase> all;
  for (bool nhwc : {false, true}) {
    // Every dtype pair, with and without the affine transform and SiLU.
    for (DType x : {f32, hf, bf}) {
      for (DType out : {f32, hf, bf}) {
        all.push_back({2, 64, 9, 11, 32, x, out, nhwc, x, true});
        all.push_back({1, 48, 5, 7, 4, x, out, nhwc});
      }
    }
    // The VAE's channel counts (C / G = 16, 8, 4) at small sizes; groups of many slices; odd
    // sizes (C / G off the 16-byte chunk: element loads); one group; a large mean.
    all.push_back({1, 512, 16, 16, 32, bf, bf, nhwc, bf, true});
    all.push_back({1, 256, 24, 40, 32, bf, bf, nhwc, bf, false});
    all.push_back({1, 128, 64, 64, 32, bf, f32, nhwc, f32, true});
    all.push_back({1, 32, 128, 160, 32, f32, f32, nhwc, std::nullopt, true});
    all.push_back({2, 96, 7, 5, 32, bf, bf, nhwc, bf, true});
    all.push_back({3, 6, 5, 7, 3, f32, f32, nhwc});
    all.push_back({1, 3, 1, 1, 1, f32, f32, nhwc});
    all.push_back({1, 32, 40, 40, 8, f32, f32, nhwc, std::nullopt, false, 100.f});
    // Empty.
    all.push_back({0, 64, 4, 4, 32, bf, bf, nhwc});
    all.push_back({2, 64, 0, 4, 32, bf, bf, nhwc});
  }
  return all;
}

KILN_CASES(GroupNorm, "GroupNorm", group_cases, .sanitize = true);

// ---- argument checks ----------------------------------------------------------------------------

struct Args {
  ArgArray x_{2 * 3 * 16, DType::f32, 1.f}, w_{16, DType::f32, 1.f};
  ArgArray out_{2 * 3 * 16, DType::f32, 0.f}, s_{64, DType::f32, 0.f};
  TensorView x() { return x_({2, 3, 16}); }
  TensorView out() { return out_({2, 3, 16}); }
  bool untouched() const { return x_.unchanged() && out_.unchanged() && s_.unchanged(); }
};

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("RmsWeightShape", invalid, {"kiln::rms_norm", "weight", "[15]", "[16]"}, [](Args& a) {
    RmsNormOptions o;
    o.weight = a.w_({15});
    rms_norm(a.x(), a.out(), o);
  });
  t.add("RmsStrideAlongD", invalid, {"kiln::rms_norm", "x", "stride 2 along D"}, [](Args& a) {
    rms_norm(a.x_({2, 3, 8}, DType::f32, {48, 16, 2}), a.out_({2, 3, 8}));
  });
  t.add("RmsOutShape", invalid, {"kiln::rms_norm", "out", "[2, 3, 15]"}, [](Args& a) {
    rms_norm(a.x(), a.out_({2, 3, 15}));
  });
  t.add("RmsOutOverlapsX", invalid, {"kiln::rms_norm", "out", "overlaps", "x"}, [](Args& a) {
    rms_norm(a.x(), a.x_({2, 3, 16}));
  });
  t.add("RmsFp8WithoutScale", invalid, {"kiln::rms_norm", "out", "f8_e4m3fn", "out_scale"},
        [](Args& a) {
          rms_norm(a.x(), a.out_({2, 3, 16}, DType::f8_e4m3fn));
        });
  t.add("RmsScaleShape", invalid, {"kiln::rms_norm", "out_scale", "[5]", "[6]"}, [](Args& a) {
    RmsNormOptions o;
    o.out_scale = a.s_({5});
    rms_norm(a.x(), a.out_({2, 3, 16}, DType::f8_e4m3fn), o);
  });
  t.add("RmsScaleWithBf16Out", invalid, {"kiln::rms_norm", "out_scale", "bf16"}, [](Args& a) {
    RmsNormOptions o;
    o.out_scale = a.s_({6});
    rms_norm(a.x(), a.out_({2, 3, 16}, DType::bf16), o);
  });
  t.add("RmsEps", invalid, {"kiln::rms_norm", "eps"}, [](Args& a) {
    RmsNormOptions o;
    o.eps = -1.f;
    rms_norm(a.x(), a.out(), o);
  });
  t.add("LayerShiftShape", invalid, {"kiln::layer_norm", "shift", "[3, 16]", "[2, 16]"},
        [](Args& a) {
          LayerNormOptions o;
          o.shift = a.s_({3, 16});
          layer_norm(a.x(), a.out(), o);
        });
  t.add("LayerModDtypes", invalid, {"kiln::layer_norm", "scale", "bf16", "shift"}, [](Args& a) {
    LayerNormOptions o;
    o.shift = a.s_({2, 16});
    o.scale = a.w_({16}, DType::bf16);
    layer_norm(a.x(), a.out(), o);
  });
  t.add("LayerBiasDtype", invalid, {"kiln::layer_norm", "bias", "f16", "weight"}, [](Args& a) {
    LayerNormOptions o;
    o.weight = a.w_({16});
    o.bias = a.s_({16}, DType::f16);
    layer_norm(a.x(), a.out(), o);
  });
  t.add("GroupNotDividing", invalid, {"kiln::group_norm", "num_groups = 5", "C = 16"}, [](Args& a) {
    GroupNormOptions o;
    o.num_groups = 5;
    group_norm(a.x_({1, 16, 2, 3}), a.out_({1, 16, 2, 3}), o);
  });
  t.add("GroupLayout", invalid, {"kiln::group_norm", "x", "strides", "channels-last"}, [](Args& a) {
    group_norm(a.x_({1, 4, 2, 3}, DType::f32, {24, 6, 1, 2}), a.out_({1, 4, 2, 3}));
  });
  t.add("GroupOutFormat", invalid, {"kiln::group_norm", "out", "channels-last"}, [](Args& a) {
    group_norm(a.x_({1, 4, 2, 3}, DType::f32, {24, 1, 12, 4}), a.out_({1, 4, 2, 3}));
  });
  t.add("GroupDims", invalid, {"kiln::group_norm", "x", "3 dims"},
        [](Args& a) { group_norm(a.x(), a.out()); });
  t.add("MixedDevices", invalid, {"kiln::rms_norm", "out", "cuda:0", "cpu"}, [](Args& a) {
    rms_norm(a.x(), a.out_({2, 3, 16}, DType::f32, {}, Device::cuda(0)));
  });
}

KILN_ERRORS(Args, "NormErrors", "kiln::", errors);

}  // namespace
}  // namespace kiln::test
