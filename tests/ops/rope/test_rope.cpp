// rope (LLM RoPE): the CPU reference against the definition in f64 written here (and a closed form
// of the two pairings), the CUDA kernel against the CPU reference; Llama-3-8B and Qwen3-8B shapes
// (decode and prefill, the Q, K and V slices of a packed QKV), every dtype pair, i32 and i64
// positions (random, non-monotone, strided), the V path, KV-cache writes into poisoned caches
// whose other rows must stay poison; the argument checks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/rope.hpp"
#include "support/harness.hpp"

namespace kiln::test {
namespace {

struct Case {
  std::int64_t N, T, H, D;
  std::int64_t S = 0;  // > 0: rope_cache into a [N, H, S, D] cache; 0: rope into [N, H, T, D]
  RopeStyle style = RopeStyle::normal;
  std::optional<double> theta = 10000.0;  // std::nullopt: the V path (norm, permute, copy)
  bool norm = false;
  DType x = DType::bf16;
  DType out = DType::bf16;
  DType pos = DType::i32;
  DType weight = DType::bf16;
  std::int64_t qkv_heads = 0;   // > 0: x is heads [first_head, first_head + H) of a packed
  std::int64_t first_head = 0;  // [N, T, qkv_heads, D] projection
  bool strided_d = false;       // x: every other element of [N, T, H, 2D] (the scalar path)
  bool strided_pos = false;     // positions: [T, N] memory viewed as [N, T]
  bool tokens_major = false;    // cache: [N, S, H, D] memory viewed as [N, H, S, D]

  std::string name() const {
    return cat("N", N, "_T", T, "_H", H, "_D", D, S ? cat("_cache_S", S) : "",
               style == RopeStyle::normal ? "_normal" : "_neox",
               theta ? cat("_theta", std::int64_t(*theta)) : "_copy",
               norm ? cat("_norm_w", dtype_name(weight)) : "", "_", dtype_name(x), "_to_",
               dtype_name(out), "_", dtype_name(pos),
               qkv_heads ? cat("_qkv", qkv_heads, "_at", first_head) : "",
               strided_d ? "_strided_d" : "", strided_pos ? "_strided_pos" : "",
               tokens_major ? "_tokens_major" : "");
  }
};

std::int64_t position(const TensorView& positions, std::int64_t n, std::int64_t t) {
  const std::int64_t i = n * positions.stride(0) + t * positions.stride(1);
  if (positions.dtype() == DType::i32) return static_cast<const std::int32_t*>(positions.data())[i];
  return static_cast<const std::int64_t*>(positions.data())[i];
}

// The definition in f64, in the logical order of out [N, H, T, D] or of the cache [N, H, S, D]
// (rows no token names: NaN, the poison they must keep):
//   y = x * 1 / sqrt(mean(x^2) + eps) * w   (with the norm)
//   pair i, (a, b) = (y[2i], y[2i+1]) (normal) or (y[i], y[i + D/2]) (neox), turned by
//   angle = position * theta^(-2i / D): (a cos - b sin, a sin + b cos).
std::vector<double> definition(const Case& c, const Views& host) {
  const TensorView x = host["x"], positions = host["positions"];
  const auto w = host.optional("weight");
  const std::int64_t N = c.N, T = c.T, H = c.H, D = c.D, S = c.S ? c.S : c.T;
  std::vector<double> out(std::size_t(N * H * S * D), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> y(static_cast<std::size_t>(D));
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t p = position(positions, n, t);
      for (std::int64_t h = 0; h < H; ++h) {
        double sum_sq = 0;
        for (std::int64_t d = 0; d < D; ++d) {
          y[std::size_t(d)] = numeric::load_float(
              x.data(), c.x, n * x.stride(0) + t * x.stride(1) + h * x.stride(2) + d * x.stride(3));
          sum_sq += y[std::size_t(d)] * y[std::size_t(d)];
        }
        const double inv_rms = 1.0 / std::sqrt(sum_sq / double(D) + double(RopeOptions{}.eps));
        for (std::int64_t d = 0; w && d < D; ++d) {
          y[std::size_t(d)] *= inv_rms * numeric::load_float(w->data(), c.weight, d);
        }
        double* dst = out.data() + ((n * H + h) * S + (c.S ? p : t)) * D;  // [D]
        std::copy(y.begin(), y.end(), dst);
        for (std::int64_t i = 0; c.theta && i < D / 2; ++i) {
          const std::int64_t a = c.style == RopeStyle::normal ? 2 * i : i;
          const std::int64_t b = c.style == RopeStyle::normal ? 2 * i + 1 : i + D / 2;
          const double angle = double(p) * std::pow(*c.theta, -2.0 * double(i) / double(D));
          dst[a] = y[std::size_t(a)] * std::cos(angle) - y[std::size_t(b)] * std::sin(angle);
          dst[b] = y[std::size_t(a)] * std::sin(angle) + y[std::size_t(b)] * std::cos(angle);
        }
      }
    }
  }
  return out;
}

struct Rope {
  using Case = test::Case;

  // x (a view of its allocation as the case lays it out), positions (random; in cache mode
  // distinct within a sequence, in random order), the norm weight, and out or the poisoned cache.
  static void build(const Case& c, Tensors& t, Rng& rng) {
    const std::int64_t N = c.N, T = c.T, H = c.H, D = c.D, S = c.S;
    if (c.qkv_heads) {
      const std::int64_t P = c.qkv_heads;
      t.parent("qkv", c.x, N * T * P * D);
      t.view("x", "qkv", c.x, {N, T, H, D}, {T * P * D, P * D, D, 1}, c.first_head * D);
      t.fill("qkv", rng);
    } else if (c.strided_d) {
      t.input("x", c.x, {N, T, H, D}, {T * H * 2 * D, H * 2 * D, 2 * D, 2}, 0, N * T * H * 2 * D);
      t.fill("x", rng);
    } else {
      t.input("x", c.x, {N, T, H, D});
      t.fill("x", rng);
    }
    const TensorView positions =
        t.input("positions", c.pos, {N, T}, c.strided_pos ? Dims{1, N} : Dims{});
    std::vector<std::int64_t> rows(static_cast<std::size_t>(S));
    std::uniform_int_distribution<std::int64_t> anywhere(0, (1 << 17) - 1);  // 128k context
    for (std::int64_t n = 0; n < N; ++n) {
      std::iota(rows.begin(), rows.end(), 0);
      std::shuffle(rows.begin(), rows.end(), rng.engine());
      for (std::int64_t i = 0; i < T; ++i) {
        const std::int64_t p = S ? rows.at(std::size_t(i)) : anywhere(rng.engine());
        const std::int64_t at = n * positions.stride(0) + i * positions.stride(1);
        if (c.pos == DType::i32) {
          static_cast<std::int32_t*>(positions.data())[at] = std::int32_t(p);
        } else {
          static_cast<std::int64_t*>(positions.data())[at] = p;
        }
      }
    }
    if (c.norm) {
      t.input("weight", c.weight, {D});
      t.fill("weight", rng, 0.5f, 1.5f);
    }
    if (S) {
      t.output("cache", c.out, {N, H, S, D},
               c.tokens_major ? Dims{S * H * D, D, H * D, 1} : Dims{});
    } else {
      t.output("out", c.out, {N, H, T, D});
    }
  }

  static void run(const Case& c, const Views& v, Stream stream) {
    RopeOptions options;
    options.theta = c.theta;
    options.style = c.style;
    options.norm_weight = v.optional("weight");
    if (c.S) {
      rope_cache(v["x"], v["positions"], v["cache"], options, stream);
    } else {
      rope(v["x"], v["positions"], v["out"], options, stream);
    }
  }

  // The CPU reference against the definition in f64, the CUDA kernel against the CPU reference;
  // in the cache, the rows no token names must come back as the poison (NaN) they started as.
  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    const char* output = c.S ? "cache" : "out";
    if (r.backend() == Backend::cuda) {
      return {{output, values(r.cpu()[output]), Tolerance::rounding(c.out, 4.0)}};
    }
    // The reference's f32 math: a few roundings of f32 beyond the output's.
    return {{output, definition(c, r.host()), Tolerance::rounding(c.out, 2.0)}};
  }
};

// Llama-3-8B (normal, theta 500000) and Qwen3-8B (neox, theta 1e6, QK-norm with a bf16 weight):
// 32 query and 8 KV heads of 128, sliced from the packed [N, T, 48, 128] QKV projection. Q is
// rotated into [N, H, T, D]; K (rotated) and V (the copy path) are written into a poisoned cache of
// S > T rows at the tokens' positions.
std::vector<Case> llm(std::int64_t N, std::int64_t T) {
  constexpr std::int64_t kQ = 32, kKv = 8, kD = 128, kPacked = kQ + 2 * kKv;
  const std::int64_t S = T + 13;
  std::vector<Case> all;
  for (RopeStyle style : {RopeStyle::normal, RopeStyle::neox}) {
    const bool qwen = style == RopeStyle::neox;
    Case q{.N = N, .T = T, .H = kQ, .D = kD, .style = style};
    q.theta = qwen ? 1e6 : 500000.0;
    q.norm = qwen;
    q.qkv_heads = kPacked;
    Case k = q;
    k.H = kKv, k.S = S, k.first_head = kQ;
    Case v = k;
    v.first_head = kQ + kKv, v.theta = std::nullopt, v.norm = false;
    all.insert(all.end(), {q, k, v});
  }
  return all;
}

// Small shapes through every path: each dtype pair in both modes and styles (with and without the
// norm, i32 and i64 positions), odd head dims, strided x, positions and caches, the V path, empty
// inputs, and the LLM decode steps.
std::vector<Case> cases() {
  std::vector<Case> all;
  const DType floats[] = {DType::f32, DType::f16, DType::bf16};
  int i = 0;
  for (DType x : floats) {
    for (DType out : floats) {
      for (RopeStyle style : {RopeStyle::normal, RopeStyle::neox}) {
        for (std::int64_t S : {0, 11}) {
          Case c{.N = 3, .T = 7, .H = 4, .D = 64, .S = S, .style = style, .x = x, .out = out};
          c.norm = (i + i / 4) % 2 == 1;  // each (style, mode) with and without, over the pairs
          c.pos = i % 3 == 0 ? DType::i64 : DType::i32;
          c.weight = floats[i % 3];
          all.push_back(c);
          ++i;
        }
      }
    }
  }
  // Odd head dims (D / 2 odd, the smallest), one head, one token, a wide head.
  all.push_back({.N = 1, .T = 5, .H = 3, .D = 6, .style = RopeStyle::neox, .norm = true});
  all.push_back({.N = 3, .T = 9, .H = 5, .D = 34, .S = 20, .x = DType::f32, .out = DType::f16});
  all.push_back({.N = 2, .T = 3, .H = 1, .D = 2, .x = DType::f32, .out = DType::f32});
  all.push_back({.N = 1, .T = 1, .H = 2, .D = 256, .style = RopeStyle::neox, .pos = DType::i64});
  // Strided x (the scalar path), positions and caches; the V path with and without the norm.
  all.push_back({.N = 3, .T = 7, .H = 4, .D = 64, .S = 9, .strided_d = true, .strided_pos = true});
  all.push_back({.N = 3,
                 .T = 7,
                 .H = 4,
                 .D = 64,
                 .style = RopeStyle::neox,
                 .norm = true,
                 .x = DType::f16,
                 .pos = DType::i64,
                 .strided_d = true});
  all.push_back({.N = 3,
                 .T = 5,
                 .H = 8,
                 .D = 128,
                 .S = 17,
                 .style = RopeStyle::neox,
                 .norm = true,
                 .pos = DType::i64,
                 .strided_pos = true,
                 .tokens_major = true});
  all.push_back({.N = 2, .T = 6, .H = 3, .D = 32, .S = 8, .theta = std::nullopt, .norm = true});
  all.push_back({.N = 2, .T = 6, .H = 3, .D = 32, .theta = std::nullopt, .x = DType::f32});
  // Empty: no token (the cache keeps every row), no sequence.
  all.push_back({.N = 2, .T = 0, .H = 3, .D = 16, .S = 4});
  all.push_back({.N = 0, .T = 5, .H = 3, .D = 16});
  // Decode: one token per sequence.
  for (std::int64_t N : {1, 3}) {
    for (const Case& c : llm(N, 1)) all.push_back(c);
  }
  return all;
}

// Prefill: an odd and a round prompt (512: one sequence, to keep the CPU backend quick).
std::vector<Case> prefill_cases() {
  std::vector<Case> all = llm(1, 37);
  for (auto [N, T] : {std::pair<std::int64_t, std::int64_t>{3, 37}, {1, 512}}) {
    for (const Case& c : llm(N, T)) all.push_back(c);
  }
  // i64 positions and f32 outputs on a prefill.
  for (Case c : llm(3, 37)) {
    c.pos = DType::i64, c.out = DType::f32, c.strided_pos = true;
    all.push_back(c);
  }
  return all;
}

// Decode steps captured in a CUDA graph: the positions are read on the device at each replay.
std::vector<Case> decode_cases() {
  std::vector<Case> all = llm(1, 1);
  for (const Case& c : llm(3, 1)) all.push_back(c);
  return all;
}

KILN_CASES(Rope, "Rope", cases, .sanitize = true);
KILN_CASES(Rope, "RopePrefill", prefill_cases);
KILN_CASES(Rope, "RopeGraph", decode_cases, .backends = {Backend::cuda}, .twice = true,
           .graph = true);

// The two pairings in closed form: a unit vector on element 2i (normal) or i (neox) of a row at
// position p turns by angle p * theta^(-2i / D) into its pair's partner, 2i + 1 or i + D / 2.
TEST(RopeReference, PairingsAndFrequencies) {
  Rng rng;
  constexpr std::int64_t D = 8;
  constexpr double kTheta = 10000.0;
  std::uniform_int_distribution<std::int32_t> draw(0, 1 << 20);
  for (RopeStyle style : {RopeStyle::normal, RopeStyle::neox}) {
    for (std::int64_t i = 0; i < D / 2; ++i) {
      const std::int64_t a = style == RopeStyle::normal ? 2 * i : i;
      const std::int64_t b = style == RopeStyle::normal ? 2 * i + 1 : i + D / 2;
      std::vector<float> x(D, 0.f), out(D, std::numeric_limits<float>::quiet_NaN());
      x[std::size_t(a)] = 1.f;
      std::int32_t p = draw(rng.engine());
      RopeOptions options;
      options.theta = kTheta;
      options.style = style;
      rope(TensorView(x.data(), DType::f32, {1, 1, 1, D}), TensorView(&p, DType::i32, {1, 1}),
           TensorView(out.data(), DType::f32, {1, 1, 1, D}), options);
      const double angle = p * std::pow(kTheta, -2.0 * double(i) / double(D));
      for (std::int64_t d = 0; d < D; ++d) {
        const double want = d == a ? std::cos(angle) : d == b ? std::sin(angle) : 0.0;
        EXPECT_NEAR(out[std::size_t(d)], want, 1e-6)
            << (style == RopeStyle::normal ? "normal" : "neox") << " pair " << i << " position "
            << p << " element " << d;
      }
    }
  }
}

// Small valid arguments (positions: zero bits, all 0, inside the cache's 6 rows); each error row
// breaks one.
struct Args {
  ArgArray x_{2 * 4 * 3 * 8, DType::f32, 1.f}, pos_{2 * 4, DType::f32, 0.f};
  ArgArray out_{2 * 3 * 4 * 8, DType::f32, 0.f}, cache_{2 * 3 * 6 * 8, DType::f32, 0.f};
  ArgArray w_{8, DType::f32, 1.f}, other_{1024, DType::f32, 0.f};
  TensorView x() { return x_({2, 4, 3, 8}); }
  TensorView pos() { return pos_({2, 4}, DType::i32); }
  TensorView out() { return out_({2, 3, 4, 8}); }
  TensorView cache() { return cache_({2, 3, 6, 8}); }
  static RopeOptions rotate() {
    RopeOptions options;
    options.theta = 10000.0;
    return options;
  }
  bool untouched() const {
    return x_.unchanged() && out_.unchanged() && cache_.unchanged() && pos_.unchanged();
  }
};

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("OddHeadDim", invalid, {"x", "D = 7", "even"}, [](Args& a) {
    rope(a.other_({2, 4, 3, 7}), a.pos(), a.out_({2, 3, 4, 7}), Args::rotate());
  });
  t.add("XDtype", invalid, {"x", "i32", "f32, f16, bf16"}, [](Args& a) {
    rope(a.x_({2, 4, 3, 8}, DType::i32), a.pos(), a.out(), Args::rotate());
  });
  t.add("PositionsDtype", invalid, {"positions", "f32", "i32, i64"}, [](Args& a) {
    rope(a.x(), a.pos_({2, 4}, DType::f32), a.out(), Args::rotate());
  });
  t.add("PositionsShape", invalid, {"positions", "[4, 2]", "[2, 4]", "N = 2, T = 4"}, [](Args& a) {
    rope(a.x(), a.pos_({4, 2}, DType::i32), a.out(), Args::rotate());
  });
  t.add("PositionsFlat", invalid, {"positions", "[8]", "[2, 4]"},
        [](Args& a) { rope(a.x(), a.pos_({8}, DType::i32), a.out(), Args::rotate()); });
  t.add("OutShape", invalid, {"out", "[2, 4, 3, 8]", "[2, 3, 4, 8]", "[N, H, T, D]"}, [](Args& a) {
    rope(a.x(), a.pos(), a.out_({2, 4, 3, 8}), Args::rotate());
  });
  t.add("OutDtype", invalid, {"out", "i32"}, [](Args& a) {
    rope(a.x(), a.pos(), a.out_({2, 3, 4, 8}, DType::i32), Args::rotate());
  });
  t.add("OutNotContiguous", invalid, {"out", "contiguous", "[192, 32, 8, 1]"}, [](Args& a) {
    rope(a.x(), a.pos(), a.other_({2, 3, 4, 8}, DType::f32, {192, 32, 8, 1}), Args::rotate());
  });
  t.add("OutOverlapsX", invalid, {"out", "overlaps", "x"}, [](Args& a) {
    rope(a.x(), a.pos(), a.x_({2, 3, 4, 8}), Args::rotate());
  });
  t.add("OutOverlapsPositions", invalid, {"out", "overlaps", "positions"}, [](Args& a) {
    rope(a.x(), a.other_({2, 4}, DType::i32), a.other_({2, 3, 4, 8}), Args::rotate());
  });
  t.add("OutOverlapsNormWeight", invalid, {"out", "overlaps", "norm_weight"}, [](Args& a) {
    RopeOptions options = Args::rotate();
    options.norm_weight = a.other_({8});
    rope(a.x(), a.pos(), a.other_({2, 3, 4, 8}), options);
  });
  t.add("NormWeightShape", invalid, {"norm_weight", "[7]", "[8]", "D = 8"}, [](Args& a) {
    RopeOptions options = Args::rotate();
    options.norm_weight = a.w_({7});
    rope(a.x(), a.pos(), a.out(), options);
  });
  t.add("NormWeightDtype", invalid, {"norm_weight", "i32"}, [](Args& a) {
    RopeOptions options = Args::rotate();
    options.norm_weight = a.w_({8}, DType::i32);
    rope(a.x(), a.pos(), a.out(), options);
  });
  t.add("NegativeEps", invalid, {"eps", "-1", ">= 0"}, [](Args& a) {
    RopeOptions options = Args::rotate();
    options.norm_weight = a.w_({8});
    options.eps = -1.f;
    rope(a.x(), a.pos(), a.out(), options);
  });
  t.add("ThetaZero", invalid, {"theta = 0", "finite value > 0"}, [](Args& a) {
    RopeOptions options;
    options.theta = 0.0;
    rope(a.x(), a.pos(), a.out(), options);
  });
  t.add("ThetaNaN", invalid, {"theta = nan", "finite value > 0"}, [](Args& a) {
    RopeOptions options;
    options.theta = std::numeric_limits<double>::quiet_NaN();
    rope(a.x(), a.pos(), a.out(), options);
  });
  t.add("MixedDevices", invalid, {"out", "cuda:0", "cpu", "like x"}, [](Args& a) {
    rope(a.x(), a.pos(), a.out_({2, 3, 4, 8}, DType::f32, {}, Device::cuda(0)), Args::rotate());
  });
  t.add("NormWeightOnOtherDevice", invalid, {"norm_weight", "cuda:0", "cpu"}, [](Args& a) {
    RopeOptions options = Args::rotate();
    options.norm_weight = a.w_({8}, DType::f32, {}, Device::cuda(0));
    rope(a.x(), a.pos(), a.out(), options);
  });
}

void cache_errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("HeadDim", invalid, {"cache", "[2, 3, 6, 4]", "[2, 3, 6, 8]", "[N, H, S, D]"}, [](Args& a) {
    rope_cache(a.x(), a.pos(), a.cache_({2, 3, 6, 4}), Args::rotate());
  });
  t.add("Heads", invalid, {"cache", "[2, 2, 6, 8]", "[2, 3, 6, 8]"}, [](Args& a) {
    rope_cache(a.x(), a.pos(), a.cache_({2, 2, 6, 8}), Args::rotate());
  });
  t.add("Batch", invalid, {"cache", "[1, 3, 6, 8]", "[2, 3, 6, 8]"}, [](Args& a) {
    rope_cache(a.x(), a.pos(), a.cache_({1, 3, 6, 8}), Args::rotate());
  });
  t.add("Dims", invalid, {"cache", "3 dims", "expected 4"}, [](Args& a) {
    rope_cache(a.x(), a.pos(), a.cache_({6, 6, 8}), Args::rotate());
  });
  t.add("StridedD", invalid, {"cache", "[288, 96, 16, 2]", "unit stride in D"}, [](Args& a) {
    rope_cache(a.x(), a.pos(), a.other_({2, 3, 6, 8}, DType::f32, {288, 96, 16, 2}),
               Args::rotate());
  });
  t.add("OverlapsX", invalid, {"cache", "overlaps", "x"}, [](Args& a) {
    rope_cache(a.x(), a.pos(), a.x_({2, 3, 4, 8}), Args::rotate());
  });
  // Past the cache at the last token, and before it at the first: nothing written either way.
  t.add("PositionPastCache", invalid, {"positions[1, 3] = 6", "[0, 6)"}, [](Args& a) {
    const TensorView positions = a.other_({2, 4}, DType::i32);
    static_cast<std::int32_t*>(positions.data())[7] = 6;
    rope_cache(a.x(), positions, a.cache(), Args::rotate());
  });
  t.add("NegativePosition", invalid, {"positions[0, 0] = -1", "[0, 6)"}, [](Args& a) {
    const TensorView positions = a.other_({2, 4}, DType::i64);
    static_cast<std::int64_t*>(positions.data())[0] = -1;
    rope_cache(a.x(), positions, a.cache(), Args::rotate());
  });
  t.add("MixedDevices", invalid, {"positions", "cuda:0", "cpu"}, [](Args& a) {
    rope_cache(a.x(), a.pos_({2, 4}, DType::i32, {}, Device::cuda(0)), a.cache(), Args::rotate());
  });
}

KILN_ERRORS(Args, "RopeErrors", "kiln::rope", errors);
KILN_ERRORS(Args, "RopeCacheErrors", "kiln::rope_cache", cache_errors);

}  // namespace
}  // namespace kiln::test
