// activation: glu (SwiGLU, GEGLU) and gelu_tanh: the CPU reference against the definitions in f64
// written here, the CUDA kernel against the CPU reference; the fp8 outputs bit for bit against
// quantize_fp8 of the op's own f32 result; strided (a fused projection's MLP slice), misaligned and
// empty inputs, extreme values; the argument checks.
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/activation.hpp"
#include "support/fp8_rows.hpp"
#include "support/harness.hpp"

namespace kiln::test {
namespace {

struct Case {
  bool gated = true;  // glu, else gelu_tanh
  Activation act = Activation::silu;
  std::int64_t R, F;
  DType x = DType::bf16;
  DType out = DType::bf16;
  std::int64_t lead = 0;    // elements of x's rows before the op's columns (a fused projection)
  std::int64_t pad = 0;     // elements of x's rows after them
  std::int64_t offset = 0;  // elements before x in its allocation (misaligned rows)
  float range = 4.f;        // x uniform in [-range, range)

  std::int64_t cols() const { return gated ? 2 * F : F; }
  std::string name() const {
    return cat(gated ? "glu_" : "", activation_name(act), "_R", R, "_F", F, "_", dtype_name(x),
               "_to_", dtype_name(out), lead ? cat("_lead", lead) : "", pad ? cat("_pad", pad) : "",
               offset ? cat("_off", offset) : "", range != 4.f ? cat("_range", int(range)) : "");
  }
};

struct Act : RowOutputChecks<Act> {
  using Case = test::Case;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    const std::int64_t ld = c.lead + c.cols() + c.pad;
    t.parent("rows", c.x, c.offset + c.R * ld);
    t.view("x", "rows", c.x, {c.R, c.cols()}, {ld, 1}, c.offset + c.lead);
    t.fill("rows", rng, -c.range, c.range);
    t.output("out", c.out, {c.R, c.F});
    if (is_fp8(c.out)) t.output("out_scale", DType::f32, {c.R});
  }

  static void call(const Case& c, const Views& v, const TensorView& out, Stream stream) {
    const std::optional<TensorView> out_scale =
        is_fp8(out.dtype()) ? v.optional("out_scale") : std::nullopt;
    if (c.gated) {
      GluOptions o;
      o.activation = c.act;
      o.out_scale = out_scale;
      glu(v["x"], out, o, stream);
    } else {
      GeluOptions o;
      o.out_scale = out_scale;
      gelu_tanh(v["x"], out, o, stream);
    }
  }

  static void run(const Case& c, const Views& v, Stream stream) { call(c, v, v["out"], stream); }

  // The definitions in f64: silu(g) = g / (1 + e^-g), gelu_tanh(g) = g (1 + tanh(sqrt(2 / pi)
  // (g + 0.044715 g^3))) / 2; glu multiplies by the second half.
  static std::vector<double> oracle(const Case& c, const Views& host) {
    const std::vector<double> x = values(host["x"]);  // [R, cols]
    std::vector<double> y(std::size_t(c.R * c.F));
    for (std::int64_t r = 0; r < c.R; ++r) {
      for (std::int64_t f = 0; f < c.F; ++f) {
        const double g = x[std::size_t(r * c.cols() + f)];
        double v =
            c.act == Activation::silu
                ? g / (1 + std::exp(-g))
                : 0.5 * g *
                      (1 + std::tanh(std::sqrt(2 / std::numbers::pi) * (g + 0.044715 * g * g * g)));
        if (c.gated) v *= x[std::size_t(r * c.cols() + c.F + f)];
        y[std::size_t(r * c.F + f)] = v;
      }
    }
    return y;
  }
};

std::vector<Case> cases() {
  const DType f32 = DType::f32, hf = DType::f16, bf = DType::bf16;
  const DType e4m3 = DType::f8_e4m3fn, e5m2 = DType::f8_e5m2;
  const auto silu = Activation::silu, gelu = Activation::gelu_tanh;
  std::vector<Case> all;
  // Every dtype pair and out kind, each activation, gated and not.
  for (DType x : {f32, hf, bf}) {
    for (DType out : {f32, hf, bf, e4m3, e5m2}) {
      all.push_back({true, silu, 7, 96, x, out});
      all.push_back({true, gelu, 5, 40, x, out});
      all.push_back({false, gelu, 6, 80, x, out});
    }
  }
  // Row widths: tiny, odd, and the models' (Flux.2 9216 / 12288, FLUX.1 GELU 12288, Llama-3
  // 14336), to bf16 and to fp8; one row (decode).
  for (std::int64_t f : {1, 3, 8, 129, 1000, 9216, 12288, 14336}) {
    all.push_back({true, silu, 3, f, bf, bf});
    all.push_back({true, silu, 2, f, f32, e4m3});
    all.push_back({false, gelu, 2, f, bf, e4m3});
  }
  all.push_back({true, silu, 1, 14336, bf, e4m3});
  // Flux's single block: the MLP part of a fused [3 D + 2 F] projection (strided rows).
  all.push_back({true, silu, 17, 192, bf, e4m3, 3 * 64});
  all.push_back({true, silu, 17, 192, bf, bf, 3 * 64, 8});
  // Rows off 16 bytes (element loads), odd padding.
  all.push_back({true, silu, 9, 256, bf, bf, 0, 3, 1});
  all.push_back({false, gelu, 9, 256, f32, e4m3, 1, 0, 1});
  // Extreme inputs: exp and tanh saturate, no NaN or inf from the f32 math.
  all.push_back({true, silu, 4, 64, f32, f32, 0, 0, 0, 200.f});
  all.push_back({false, gelu, 4, 64, f32, bf, 0, 0, 0, 200.f});
  // Empty.
  all.push_back({true, silu, 0, 64, bf, bf});
  all.push_back({true, silu, 3, 0, bf, bf});
  return all;
}

KILN_CASES(Act, "Activation", cases, .sanitize = true);

struct Args {
  ArgArray x_{6 * 16, DType::f32, 1.f}, out_{6 * 16, DType::f32, 0.f}, s_{16, DType::f32, 0.f};
  bool untouched() const { return x_.unchanged() && out_.unchanged() && s_.unchanged(); }
};

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("GluOddWidth", invalid, {"kiln::glu", "x", "[6, 15]", "2F"}, [](Args& a) {
    glu(a.x_({6, 15}), a.out_({6, 7}));
  });
  t.add("GluOutShape", invalid, {"kiln::glu", "out", "[6, 16]", "[6, 8]"}, [](Args& a) {
    glu(a.x_({6, 16}), a.out_({6, 16}));
  });
  t.add("GeluOutShape", invalid, {"kiln::gelu_tanh", "out", "[6, 8]", "[6, 16]"}, [](Args& a) {
    gelu_tanh(a.x_({6, 16}), a.out_({6, 8}));
  });
  t.add("StrideAlongLastDim", invalid, {"kiln::gelu_tanh", "x", "stride 2"}, [](Args& a) {
    gelu_tanh(a.x_({6, 8}, DType::f32, {16, 2}), a.out_({6, 8}));
  });
  t.add("XDtype", invalid, {"kiln::glu", "x", "i32"}, [](Args& a) {
    glu(a.x_({6, 16}, DType::i32), a.out_({6, 8}));
  });
  t.add("OutOverlapsX", invalid, {"kiln::gelu_tanh", "out", "overlaps", "x"}, [](Args& a) {
    gelu_tanh(a.x_({6, 16}), a.x_({6, 16}));
  });
  t.add("Fp8WithoutScale", invalid, {"kiln::glu", "out", "f8_e5m2", "out_scale"}, [](Args& a) {
    glu(a.x_({6, 16}), a.out_({6, 8}, DType::f8_e5m2));
  });
  t.add("ScaleShape", invalid, {"kiln::glu", "out_scale", "[5]", "[6]"}, [](Args& a) {
    GluOptions o;
    o.out_scale = a.s_({5});
    glu(a.x_({6, 16}), a.out_({6, 8}, DType::f8_e4m3fn), o);
  });
}

KILN_ERRORS(Args, "ActivationErrors", "kiln::", errors);

}  // namespace
}  // namespace kiln::test
