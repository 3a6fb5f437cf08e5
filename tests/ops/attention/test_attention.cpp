// attention: the CPU reference against closed forms, the CUDA kernels against the CPU reference
// (prefill, split-KV decode by TMA and by cp.async, graph replays, tile overrides), the
// launcher's plans, and the argument checks.
//
// The GPU bound follows FlashAttention's tests: kiln's error against the f64 reference may be at
// most 3 times the error of the same reference computed the way a low-precision kernel must
// (q rounded to k's dtype, f32 scores, probabilities rounded to k's dtype before P V, the output
// rounded to out's dtype), plus a small floor.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/attention.hpp"
#include "ops/attention/attention.hpp"
#include "ops/attention/kernels/params.cuh"
#include "support/harness.hpp"

namespace kiln::test {
namespace {

enum class Layout {
  contiguous,  // [N, H, L, D]
  packed_qkv,  // q, k, v: slices of one [N, L, 3, H, D] tensor (needs Hq = Hkv, Lq = Lk, D = Dv)
  kv_cache,    // k, v: the first Lk rows of a [N, Hkv, Lk + 37, D] cache; q [N, Lq, Hq, D] memory
};

enum class MaskKind {
  none,
  f32_2d,        // [Lq, Lk] f32, -inf over whole rows and random key blocks
  f16_batched,   // [N, 1, Lq, Lk] f16, -inf over whole rows
  bf16_padding,  // [N, Hq, 1, Lk] bf16: key padding per (n, h), the last keys of each -inf
};

enum class KvLen { none, i32, i64 };

// Non-finite inputs (contiguous layout): a NaN in q row (0, 1 % Hq, 0), and +inf in k[N-1, 0,
// Lk/2, 0] met by q[N-1, h, :, 0] = 1 for the heads h of kv head 0: those rows' scores hold +inf
// (where the key is visible), so they are NaN as in SDPA.
enum class Specials { none, nonfinite };

struct Case {
  std::int64_t N, Hq, Hkv, Lq, Lk, D, Dv;
  DType kv = DType::bf16;
  DType q = DType::bf16;  // kv or f32
  DType out = DType::bf16;
  bool causal = false;
  MaskKind mask = MaskKind::none;
  KvLen kv_len = KvLen::none;
  float softcap = 0.f;      // 0: none
  float scale = 0.f;        // 0: 1 / sqrt(D)
  float input_range = 1.f;  // q, k, v uniform in [-range, range)
  Layout layout = Layout::contiguous;
  bool lse = false;
  std::int64_t kv_len_cap = 0;  // > 0: batches between the first and the last see <= this many keys
  Specials specials = Specials::none;
  // out as a [N, Lq, Hq, Dv] buffer seen transposed (strides (Lq Hq Dv, Dv, Hq Dv, 1)): the rows
  // land as an output projection reads them.
  bool out_transposed = false;

  std::string name() const {
    static const char* layouts[] = {"contiguous", "packed_qkv", "kv_cache"};
    static const char* masks[] = {"", "_mask_f32_2d", "_mask_f16_batched", "_mask_bf16_padding"};
    static const char* lens[] = {"", "_kvlen_i32", "_kvlen_i64"};
    return cat("N", N, "_Hq", Hq, "_Hkv", Hkv, "_Lq", Lq, "_Lk", Lk, "_D", D, "_Dv", Dv, "_",
               dtype_name(kv), q != kv ? cat("_q", dtype_name(q)) : "",
               out != kv ? cat("_out", dtype_name(out)) : "", causal ? "_causal" : "",
               masks[int(mask)], lens[int(kv_len)],
               softcap > 0 ? cat("_softcap", int(softcap)) : "",
               scale > 0 ? cat("_scale", int(scale * 100)) : "",
               input_range != 1.f ? cat("_range", int(input_range)) : "", lse ? "_lse" : "",
               kv_len_cap > 0 ? cat("_kvlencap", kv_len_cap) : "",
               specials == Specials::nonfinite ? "_nonfinite" : "",
               out_transposed ? "_out_transposed" : "", "_", layouts[int(layout)]);
  }
  float softmax_scale() const { return scale > 0 ? scale : float(1.0 / std::sqrt(double(D))); }
};

// The f64 reference (out in f32, one rounding) and its LSE.
struct Reference {
  std::vector<double> out, lse;
};

AttentionOptions options_of(const Case& c, const Views& v) {
  AttentionOptions o;
  o.scale = c.scale > 0 ? std::optional<float>(c.scale) : std::nullopt;
  o.causal = c.causal;
  o.mask = v.optional("mask");
  o.kv_len = v.optional("kv_len");
  if (c.softcap > 0) o.softcap = c.softcap;
  o.lse = v.optional("lse");
  return o;
}

Reference reference(const Case& c, const Views& host) {
  HostBuffer out(std::size_t(c.N * c.Hq * c.Lq * c.Dv) * 4),
      lse(std::size_t(c.N * c.Hq * c.Lq) * 4);
  AttentionOptions o = options_of(c, host);
  const TensorView out_view(out.data(), DType::f32, {c.N, c.Hq, c.Lq, c.Dv});
  o.lse = TensorView(lse.data(), DType::f32, {c.N, c.Hq, c.Lq});
  attention(host["q"], host["k"], host["v"], out_view, o);
  EXPECT_TRUE(out.guards_intact() && lse.guards_intact()) << "the CPU reference wrote outside";
  return {values(out_view), values(*o.lse)};
}

// The reference computed the way a low-precision kernel must: q rounded to k's dtype, scores
// and sums in f32, each probability rounded to k's dtype before P V, the output rounded to
// out's dtype.
std::vector<double> low_precision_reference(const Case& c, const Views& host) {
  const std::int64_t group = c.Hq / c.Hkv;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<double> out(std::size_t(c.N * c.Hq * c.Lq * c.Dv), 0.0);
  std::vector<float> s(std::size_t(c.Lk)), q_row(std::size_t(c.D)), o(std::size_t(c.Dv));
  const auto at = [](const TensorView& t, std::int64_t a, std::int64_t b, std::int64_t i,
                     std::int64_t d) {
    return numeric::load_float(
        t.data(), t.dtype(), a * t.stride(0) + b * t.stride(1) + i * t.stride(2) + d * t.stride(3));
  };
  const TensorView q = host["q"], k = host["k"], v = host["v"];
  const auto mask = host.optional("mask"), kv_len = host.optional("kv_len");
  for (std::int64_t n = 0; n < c.N; ++n) {
    std::int64_t keys = c.Lk;
    if (kv_len) {
      keys = kv_len->dtype() == DType::i32
                 ? std::int64_t(static_cast<const std::int32_t*>(kv_len->data())[n])
                 : static_cast<const std::int64_t*>(kv_len->data())[n];
    }
    for (std::int64_t h = 0; h < c.Hq; ++h) {
      for (std::int64_t i = 0; i < c.Lq; ++i) {
        for (std::int64_t d = 0; d < c.D; ++d) {
          q_row[std::size_t(d)] = float(round_to(c.kv, at(q, n, h, i, d)));
        }
        float row_max = -inf;
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          float x = -inf;
          if (j < keys && (!c.causal || j <= i + keys - c.Lq)) {
            float dot = 0.f;
            for (std::int64_t d = 0; d < c.D; ++d) {
              dot += q_row[std::size_t(d)] * at(k, n, h / group, j, d);
            }
            x = c.softmax_scale() * dot;
            if (c.softcap > 0) x = c.softcap * std::tanh(x / c.softcap);
            if (mask) {
              const std::int64_t idx[4] = {n, h, i, j};
              std::int64_t off = 0;
              for (int dd = 0; dd < mask->dim(); ++dd) {
                if (mask->size(dd) != 1) off += idx[4 - mask->dim() + dd] * mask->stride(dd);
              }
              x += numeric::load_float(mask->data(), mask->dtype(), off);
            }
          }
          s[std::size_t(j)] = x;
          row_max = std::max(row_max, x);
        }
        std::fill(o.begin(), o.end(), 0.f);
        float sum = 0.f;
        if (row_max > -inf) {
          for (std::int64_t j = 0; j < c.Lk; ++j) {
            const float p = std::exp(s[std::size_t(j)] - row_max);
            sum += p;
            const float p_low = float(round_to(c.kv, p));
            if (p_low == 0.f) continue;
            for (std::int64_t d = 0; d < c.Dv; ++d)
              o[std::size_t(d)] += p_low * at(v, n, h / group, j, d);
          }
        }
        const std::int64_t row = (n * c.Hq + h) * c.Lq + i;
        for (std::int64_t d = 0; d < c.Dv; ++d) {
          out[std::size_t(row * c.Dv + d)] =
              round_to(c.out, sum > 0.f ? o[std::size_t(d)] / sum : 0.f);
        }
      }
    }
  }
  return out;
}

struct Attention {
  using Case = test::Case;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    const float r = c.input_range;
    if (c.layout == Layout::packed_qkv) {
      // [N, L, 3, H, D] viewed as q/k/v [N, H, L, D] with strides (3LHD, D, 3HD, 1).
      const std::int64_t L = c.Lq, H = c.Hq, D = c.D;
      t.parent("qkv", c.kv, c.N * L * 3 * H * D);
      t.fill("qkv", rng, -r, r);
      const Dims strides = {L * 3 * H * D, D, 3 * H * D, 1};
      t.view("q", "qkv", c.kv, {c.N, H, L, D}, strides, 0);
      t.view("k", "qkv", c.kv, {c.N, H, L, D}, strides, H * D);
      t.view("v", "qkv", c.kv, {c.N, H, L, D}, strides, 2 * H * D);
    } else if (c.layout == Layout::kv_cache) {
      const std::int64_t cap = c.Lk + 37;
      t.input("q", c.q, {c.N, c.Hq, c.Lq, c.D}, {c.Lq * c.Hq * c.D, c.D, c.Hq * c.D, 1});
      t.fill("q", rng, -r, r);
      // The whole cache is filled, the rows past Lk with huge values that must stay unread.
      for (const auto& [name, d] : {std::pair{"k", c.D}, std::pair{"v", c.Dv}}) {
        const TensorView cache =
            t.input(name, c.kv, {c.N, c.Hkv, c.Lk, d}, {c.Hkv * cap * d, cap * d, d, 1}, 0,
                    c.N * c.Hkv * cap * d);
        t.fill(name, rng, -r, r);
        for (std::int64_t n = 0; n < c.N * c.Hkv; ++n) {
          for (std::int64_t e = (n * cap + c.Lk) * d; e < (n + 1) * cap * d; ++e) {
            numeric::store_float(cache.data(), c.kv, e, 6e4f);
          }
        }
      }
    } else {
      t.input("q", c.q, {c.N, c.Hq, c.Lq, c.D});
      t.input("k", c.kv, {c.N, c.Hkv, c.Lk, c.D});
      t.input("v", c.kv, {c.N, c.Hkv, c.Lk, c.Dv});
      for (const char* name : {"q", "k", "v"}) t.fill(name, rng, -r, r);
      if (c.specials == Specials::nonfinite) {
        const TensorView q = t.views()["q"], k = t.views()["k"];
        const auto q_at = [&](std::int64_t n, std::int64_t h, std::int64_t i, std::int64_t d) {
          return ((n * c.Hq + h) * c.Lq + i) * c.D + d;
        };
        numeric::store_float(q.data(), c.q, q_at(0, 1 % c.Hq, 0, 5 % c.D), NAN);
        numeric::store_float(k.data(), c.kv, ((c.N - 1) * c.Hkv * c.Lk + c.Lk / 2) * c.D, INFINITY);
        for (std::int64_t h = 0; h < c.Hq / c.Hkv; ++h) {
          for (std::int64_t i = 0; i < c.Lq; ++i) {
            numeric::store_float(q.data(), c.q, q_at(c.N - 1, h, i, 0), 1.f);
          }
        }
      }
    }

    // Masks: random values in [-2, 2), whole rows (or a batch's keys) at -inf.
    const float inf = std::numeric_limits<float>::infinity();
    std::uniform_real_distribution<float> value(-2.f, 2.f);
    std::uniform_int_distribution<int> coin(0, 5);
    switch (c.mask) {
      case MaskKind::none:
        break;
      case MaskKind::f32_2d: {
        void* m = t.input("mask", DType::f32, {c.Lq, c.Lk}).data();
        for (std::int64_t i = 0; i < c.Lq; ++i) {
          const bool hidden_row = i % 5 == 2;
          for (std::int64_t j = 0; j < c.Lk; ++j) {
            const bool hidden = hidden_row || (j / 8) % 7 == 3;
            numeric::store_float(m, DType::f32, i * c.Lk + j, hidden ? -inf : value(rng.engine()));
          }
        }
        break;
      }
      case MaskKind::f16_batched: {
        void* m = t.input("mask", DType::f16, {c.N, 1, c.Lq, c.Lk}).data();
        for (std::int64_t n = 0; n < c.N; ++n) {
          for (std::int64_t i = 0; i < c.Lq; ++i) {
            const bool hidden_row = (i + n) % 3 == 1;
            for (std::int64_t j = 0; j < c.Lk; ++j) {
              numeric::store_float(
                  m, DType::f16, (n * c.Lq + i) * c.Lk + j,
                  hidden_row || coin(rng.engine()) == 0 ? -inf : value(rng.engine()));
            }
          }
        }
        break;
      }
      case MaskKind::bf16_padding: {
        void* m = t.input("mask", DType::bf16, {c.N, c.Hq, 1, c.Lk}).data();
        for (std::int64_t nh = 0; nh < c.N * c.Hq; ++nh) {
          const std::int64_t valid = (nh * 7) % (c.Lk + 1);  // 0 valid keys for nh = 0
          for (std::int64_t j = 0; j < c.Lk; ++j) {
            numeric::store_float(m, DType::bf16, nh * c.Lk + j, j < valid ? 0.f : -inf);
          }
        }
        break;
      }
    }

    if (c.kv_len != KvLen::none) {
      const DType dtype = c.kv_len == KvLen::i32 ? DType::i32 : DType::i64;
      void* lens = t.input("kv_len", dtype, {c.N}).data();
      std::uniform_int_distribution<std::int64_t> len(1, c.kv_len_cap > 0 ? c.kv_len_cap : c.Lk);
      for (std::int64_t n = 0; n < c.N; ++n) {
        // Batch 0 sees no key at all; the last sees all of them.
        const std::int64_t value_n = n == 0 ? 0 : n == c.N - 1 ? c.Lk : len(rng.engine());
        if (dtype == DType::i32) {
          static_cast<std::int32_t*>(lens)[n] = std::int32_t(value_n);
        } else {
          static_cast<std::int64_t*>(lens)[n] = value_n;
        }
      }
    }
    if (c.out_transposed) {
      t.output("out", c.out, {c.N, c.Hq, c.Lq, c.Dv}, {c.Lq * c.Hq * c.Dv, c.Dv, c.Hq * c.Dv, 1});
    } else {
      t.output("out", c.out, {c.N, c.Hq, c.Lq, c.Dv});
    }
    if (c.lse) t.output("lse", DType::f32, {c.N, c.Hq, c.Lq});
  }

  static void run(const Case& c, const Views& v, Stream stream) {
    attention(v["q"], v["k"], v["v"], v["out"], options_of(c, v), stream);
  }

  // The f64 reference and, for the bound, the low-precision one; the LSE within 2e-4 (1 + |lse|),
  // -inf for rows with no visible key.
  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    Reference ref = reference(c, r.host());
    Tolerance bound;
    bound.factor = 3.0, bound.low_floor = 1e-5, bound.low_stats = kMaxError | kMeanError;
    std::vector<Expected> e = {{"out", ref.out, bound, low_precision_reference(c, r.host())}};
    Tolerance lse_bound;
    lse_bound.rel = 2e-4, lse_bound.abs = 2e-4;
    if (c.lse) e.push_back({"lse", ref.lse, lse_bound});
    return e;
  }

  static double flops(const Case& c) {
    return 2.0 * double(c.N * c.Hq * c.Lq * c.Lk * (c.D + c.Dv)) / (c.causal ? 2 : 1);
  }
};

std::vector<Case> cases() {
  const DType bf = DType::bf16, hf = DType::f16, f32 = DType::f32;
  std::vector<Case> all = {
      // Lq x Lk over {1, 7, 64, 129, 1000, 4608}: decode, prefill, Lq != Lk.
      {3, 4, 4, 1, 1, 64, 64},
      {3, 4, 4, 7, 7, 64, 64},
      {3, 2, 2, 64, 64, 128, 128},
      {3, 2, 2, 129, 129, 128, 128},
      {1, 2, 2, 1000, 1000, 64, 64},
      {1, 1, 1, 4608, 4608, 64, 64},
      {3, 4, 4, 1, 1000, 128, 128},
      {3, 4, 4, 7, 129, 64, 64},
      {3, 2, 2, 129, 64, 64, 64},
      {2, 2, 2, 1000, 7, 128, 128},
      {1, 2, 2, 1, 4608, 128, 128},
      {1, 2, 2, 64, 4608, 64, 64},
      {3, 4, 4, 16, 1000, 128, 128, bf, bf, bf, false, MaskKind::none, KvLen::none, 0, 0, 1,
       Layout::contiguous, true},
      // Causal, aligned bottom right (Lq < Lk), and Lq > Lk (leading rows see nothing).
      {3, 4, 4, 64, 64, 64, 64, bf, bf, bf, true},
      {3, 2, 2, 129, 129, 128, 128, hf, hf, hf, true},
      {2, 4, 4, 64, 1000, 128, 128, bf, bf, bf, true},
      {3, 4, 4, 7, 129, 64, 64, bf, bf, bf, true},
      {3, 4, 4, 129, 7, 64, 64, bf, bf, bf, true, MaskKind::none, KvLen::none, 0, 0, 1,
       Layout::contiguous, true},
      {1, 2, 2, 1000, 1000, 128, 128, bf, bf, bf, true},
      // GQA 4:1 and 8:1, MQA: prefill and decode (split-KV).
      {3, 8, 2, 129, 129, 64, 64, bf, bf, bf, true},
      {3, 16, 2, 7, 1000, 128, 128},
      {1, 32, 8, 1, 4608, 128, 128},
      {3, 8, 1, 1, 1000, 64, 64, hf, hf, hf},
      {2, 16, 2, 4, 777, 128, 128, bf, bf, bf, true},
      // Masks with fully masked rows; per-batch kv lengths (one batch sees no key).
      {3, 4, 4, 64, 129, 64, 64, bf, bf, bf, false, MaskKind::f32_2d},
      {3, 2, 2, 129, 1000, 128, 128, hf, hf, hf, false, MaskKind::f16_batched, KvLen::none, 0, 0, 1,
       Layout::contiguous, true},
      {3, 4, 2, 7, 129, 64, 64, bf, bf, bf, true, MaskKind::bf16_padding},
      {3, 8, 2, 1, 1000, 128, 128, bf, bf, bf, false, MaskKind::none, KvLen::i32, 0, 0, 1,
       Layout::contiguous, true},
      {3, 4, 4, 64, 1000, 64, 64, hf, hf, hf, true, MaskKind::none, KvLen::i64},
      {3, 4, 1, 129, 129, 64, 64, bf, bf, bf, false, MaskKind::f32_2d, KvLen::i32},
      // Large logits (scale * |q . k| around 100) and soft-capping.
      {3, 2, 2, 129, 129, 64, 64, bf, bf, bf, false, MaskKind::none, KvLen::none, 0, 2.f, 3.f},
      {3, 4, 4, 1, 1000, 128, 128, hf, hf, hf, false, MaskKind::none, KvLen::none, 0, 1.f, 3.f,
       Layout::contiguous, true},
      {3, 2, 2, 129, 129, 64, 64, bf, bf, bf, true, MaskKind::none, KvLen::none, 30.f, 2.f, 3.f,
       Layout::contiguous, true},
      // Strided views: packed QKV, a KV cache with capacity > length, f32 q, f32 out.
      {3, 4, 4, 129, 129, 64, 64, bf, bf, bf, true, MaskKind::none, KvLen::none, 0, 0, 1,
       Layout::packed_qkv},
      {3, 8, 2, 1, 1000, 128, 128, bf, f32, bf, false, MaskKind::none, KvLen::i32, 0, 0, 1,
       Layout::kv_cache},
      {3, 4, 4, 64, 129, 128, 128, hf, f32, f32, true, MaskKind::none, KvLen::none, 0, 0, 1,
       Layout::kv_cache},
      {3, 2, 2, 7, 64, 96, 96, bf, f32, f32},
      // Split-KV decode: 71 tiles of 128 keys in 18 chunks of 3 or 4 (the chunks do not divide
      // the tiles), per-batch lengths ending inside a chunk, and lengths shorter than one tile
      // (most chunks of those batches see no key); the LSE comes from the combine.
      {3, 8, 2, 1, 9000, 128, 128, bf, bf, bf, false, MaskKind::none, KvLen::i32, 0, 0, 1,
       Layout::contiguous, true},
      {3, 8, 2, 1, 9000, 64, 64, hf, hf, f32, false, MaskKind::none, KvLen::i64, 0, 0, 1,
       Layout::kv_cache, true, 100},
      {3, 8, 2, 1, 9000, 64, 64, bf, bf, bf, false, MaskKind::bf16_padding, KvLen::none, 0, 0, 1,
       Layout::contiguous, true},
  };
  // Every head dim in use and odd multiples of 8, D != Dv.
  for (std::int64_t d : {40, 64, 72, 80, 96, 128, 192, 256}) {
    all.push_back({2, 2, 2, 129, 129, d, d});
    all.push_back({2, 2, 2, 64, 129, d, d, hf, hf, hf, true});
    all.push_back({2, 4, 1, 1, 129, d, d});
  }
  all.push_back({2, 2, 2, 129, 129, 128, 64});
  all.push_back({2, 4, 2, 7, 129, 72, 40, hf, hf, hf, true});
  all.push_back({2, 4, 4, 1, 200, 192, 128});
  // out seen transposed through every kernel: the sm_90a prefill (D 128 and 64), the mma.sync
  // prefill (a mask; D 96), split-KV decode with its combine (TMA loads at D 128, cp.async at
  // D 72), f32 out.
  for (Case c :
       std::initializer_list<Case>{{1, 4, 4, 200, 200, 128, 128},
                                   {2, 4, 2, 129, 300, 64, 64, bf, bf, bf, true},
                                   {2, 4, 2, 129, 129, 64, 64, bf, bf, bf, false, MaskKind::f32_2d},
                                   {2, 4, 4, 129, 129, 96, 96, hf, hf, f32},
                                   {3, 8, 2, 1, 9000, 128, 128, bf, bf, bf, false, MaskKind::none,
                                    KvLen::i32, 0, 0, 1, Layout::contiguous, true},
                                   {2, 8, 2, 1, 3000, 72, 72, hf, hf, hf}}) {
    c.out_transposed = true;
    all.push_back(c);
  }
  return all;
}

// Every table runs twice on its stream and must give the same bits both times (split-KV decode
// leaves its arrival counters at zero for the next call).
KILN_CASES(Attention, "Attention", cases, .backends = {Backend::cuda}, .twice = true);

// The sanitizer subset: small cases through every code path (prefill, decode with split-KV and
// combine, masks, kv_len, softcap, f32 q, odd head dims).
std::vector<Case> sanitizer_cases() {
  const DType bf = DType::bf16, hf = DType::f16, f32 = DType::f32;
  return {
      {2, 2, 2, 70, 70, 64, 64, bf, bf, bf, true},
      {2, 8, 2, 1, 300, 128, 128, bf, f32, bf, false, MaskKind::none, KvLen::i32, 0, 0, 1,
       Layout::kv_cache, true},
      {2, 2, 2, 33, 65, 72, 40, hf, hf, f32, false, MaskKind::f16_batched, KvLen::none, 30.f},
      {1, 2, 2, 40, 40, 256, 256, bf, bf, bf, true},
      {2, 4, 1, 1, 3000, 64, 64, bf, bf, bf, false, MaskKind::none, KvLen::i32, 0, 0, 1,
       Layout::contiguous, true, 200},
      // out seen transposed: the sm_90a prefill and split-KV decode with its combine.
      {2,
       4,
       2,
       70,
       70,
       128,
       128,
       bf,
       bf,
       bf,
       true,
       MaskKind::none,
       KvLen::none,
       0,
       0,
       1,
       Layout::contiguous,
       false,
       0,
       Specials::none,
       true},
      {2,
       4,
       1,
       1,
       3000,
       64,
       64,
       bf,
       bf,
       bf,
       false,
       MaskKind::none,
       KvLen::i32,
       0,
       0,
       1,
       Layout::contiguous,
       true,
       200,
       Specials::none,
       true},
  };
}

KILN_CASES(Attention, "AttentionSanitize", sanitizer_cases, .backends = {Backend::cuda},
           .sanitize = true, .twice = true);

// NaN and +inf through every kernel: split-KV decode (Lq = 1, 4096 keys; TMA loads on sm_90a),
// the sm_90a prefill (Lq = 200, D = 64 and 128), the mma.sync prefill at D = 40 and 256. The CPU
// reference's NaN rows, zero rows and -inf LSEs must come back as they are (the tolerance
// policy), with batch 0 seeing no key through kv_len in the i32 cases.
std::vector<Case> nonfinite_cases() {
  const DType bf = DType::bf16, hf = DType::f16;
  std::vector<Case> all;
  for (const Case& shape : std::initializer_list<Case>{{2, 4, 2, 1, 4096, 64, 64},
                                                       {2, 4, 2, 1, 4096, 128, 128},
                                                       {2, 4, 2, 200, 300, 64, 64},
                                                       {2, 4, 2, 200, 300, 128, 128},
                                                       {2, 4, 2, 40, 50, 40, 40},
                                                       {2, 4, 2, 3, 1000, 256, 256}}) {
    for (KvLen lens : {KvLen::none, KvLen::i32}) {
      Case c = shape;
      c.kv = c.q = c.out = shape.D == 128 ? hf : bf;
      c.kv_len = lens;
      c.lse = true;
      c.specials = Specials::nonfinite;
      all.push_back(c);
    }
  }
  return all;
}

KILN_CASES(Attention, "AttentionNonFinite", nonfinite_cases, .backends = {Backend::cuda},
           .sanitize = true);

// kv_len lives in device memory on CUDA: not read on the host, so values outside [0, Lk] are
// clamped by the kernels rather than refused: [Lk + 8, -3] gives the bits of [Lk, 0].
KILN_CUDA_TEST(AttentionCudaEdges, KvLenOutsideTheKeysIsClamped, true) {
  Rng rng;
  for (const std::int64_t lq : {1, 33}) {
    SCOPED_TRACE(cat("Lq = ", lq));
    const Case c{2,         2,           1,           lq,          96,    64,
                 64,        DType::bf16, DType::bf16, DType::bf16, false, MaskKind::none,
                 KvLen::i32};
    CaseRun r(Backend::cuda, rng, [&](Tensors& t, Rng& g) { Attention::build(c, t, g); });
    const Views& v = r.views();
    const auto run_with = [&](std::int32_t first, std::int32_t second) {
      const std::int32_t lens[2] = {first, second};
      DeviceBuffer kv_len(sizeof lens);
      kv_len.upload(lens, sizeof lens);
      AttentionOptions o;
      o.kv_len = TensorView(kv_len.data(), DType::i32, {2}, Device::cuda(0));
      attention(v["q"], v["k"], v["v"], v["out"], o);
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      return bytes(r.got()["out"]);
    };
    EXPECT_TRUE(run_with(96 + 8, -3) == run_with(96, 0));
  }
}

// On sm_90a, decode with head dims of whole 64-element panels loads K/V by TMA (the case table
// above runs that); this table runs the table's decode cases (Lq * Hq / Hkv <= 16) again through
// the cp.async loads that sm_80 uses, selected by KILN_ATTENTION_LOADS.
std::vector<Case> decode_cases() {
  std::vector<Case> decode;
  for (const Case& c : cases()) {
    if (c.Lq * (c.Hq / c.Hkv) <= 16) decode.push_back(c);
  }
  return decode;
}

std::string unless_sm90a() {
  const std::string arch = cuda_arch(0);
  return arch == "sm_90a" ? "" : "cp.async is the only decode path on " + arch;
}

KILN_CASES(Attention, "AttentionDecodeCpAsync", decode_cases, .backends = {Backend::cuda},
           .twice = true, .env = {{"KILN_ATTENTION_LOADS", "cp.async"}}, .skip = unless_sm90a);

// Split-KV decode captured into a CUDA graph (its arrival counters then come from the call's
// workspace, zeroed by a memset node) and replayed twice; GQA 4:1, 3000 keys.
std::vector<Case> graph_cases() { return {{2, 8, 2, 1, 3000, 128, 128}}; }

KILN_CASES(Attention, "AttentionGraph", graph_cases, .backends = {Backend::cuda}, .twice = true,
           .graph = true);

// KILN_ATTENTION_TILE's optional fifth field sets the split count: 47 tiles of 64 keys in 7
// chunks; batch 0 sees no key, batch 1 at most 900 (most of its chunks see none), batch 2 all.
std::vector<Case> tile_override_cases() {
  return {{3, 8, 2, 1, 3000, 128, 128, DType::bf16, DType::bf16, DType::bf16, false, MaskKind::none,
           KvLen::i32, 0, 0, 1, Layout::kv_cache, true, 900}};
}

KILN_CASES(Attention, "AttentionTileOverride", tile_override_cases, .backends = {Backend::cuda},
           .sanitize = true, .twice = true, .env = {{"KILN_ATTENTION_TILE", "1,4,64,3,7"}});

// Out-of-range split counts are errors.
KILN_CUDA_TEST(AttentionTileOverride, ZeroSplitsIsAnError, true) {
  DeviceBuffer buffer(std::size_t(4) * 64 * 64 * 2);
  const auto view = [&](std::int64_t l, int i) {
    return TensorView(static_cast<char*>(buffer.data()) + std::size_t(i) * 64 * 64 * 2, DType::bf16,
                      {1, 1, l, 64}, Device::cuda(0));
  };
  const ScopedEnv tile("KILN_ATTENTION_TILE", "1,4,64,3,0");
  expect_error("kiln::attention",
               [&] { attention(view(1, 0), view(64, 1), view(64, 2), view(1, 3)); },
               ErrorCode::invalid_argument, {"KILN_ATTENTION_TILE is '1,4,64,3,0'", "splits"});
}

// KILN_ATTENTION_LOADS=tma where TMA cannot serve the call is an error, not a silent fallback.
KILN_CUDA_TEST(AttentionSm90, TmaLoadsRequestedForHeadDim80, true) {
  if (cuda_arch(0) != "sm_90a") GTEST_SKIP() << "not an sm_90a device: " << cuda_arch(0);
  DeviceBuffer buffer(std::size_t(4) * 2 * 256 * 80 * 2);
  const auto view = [&](std::int64_t l, int i) {
    return TensorView(static_cast<char*>(buffer.data()) + std::size_t(i) * 2 * 256 * 80 * 2,
                      DType::bf16, {1, 2, l, 80}, Device::cuda(0));
  };
  const ScopedEnv loads("KILN_ATTENTION_LOADS", "tma");
  expect_error("kiln::attention",
               [&] { attention(view(1, 0), view(256, 1), view(256, 2), view(1, 3)); },
               ErrorCode::unsupported, {"KILN_ATTENTION_LOADS=tma", "D = 80", "Dv = 80"});
}

// CPU reference against closed forms: with q = 0 every visible key has the same score, so the
// output is the mean of the visible values and the LSE is log(count) (causal, kv_len and GQA
// decide which values and how many).
TEST(AttentionCpu, ZeroQueryAveragesVisibleValues) {
  Rng rng;
  constexpr std::int64_t N = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 9, D = 16, Dv = 8;
  std::vector<float> q(N * Hq * Lq * D, 0.f), k(N * Hkv * Lk * D), v(N * Hkv * Lk * Dv);
  fill_uniform(k.data(), DType::f32, k.size(), rng);
  fill_uniform(v.data(), DType::f32, v.size(), rng);
  std::vector<std::uint16_t> k16(k.size()), v16(v.size());
  for (std::size_t i = 0; i < k.size(); ++i) k16[i] = numeric::float_to_bf16(k[i]);
  for (std::size_t i = 0; i < v.size(); ++i) v16[i] = numeric::float_to_bf16(v[i]);
  const std::int32_t lens[N] = {6, 9};
  std::vector<float> out(N * Hq * Lq * Dv), lse(N * Hq * Lq);
  AttentionOptions options;
  options.causal = true;
  options.kv_len = TensorView(const_cast<std::int32_t*>(lens), DType::i32, {N});
  options.lse = TensorView(lse.data(), DType::f32, {N, Hq, Lq});
  attention(TensorView(q.data(), DType::f32, {N, Hq, Lq, D}),
            TensorView(k16.data(), DType::bf16, {N, Hkv, Lk, D}),
            TensorView(v16.data(), DType::bf16, {N, Hkv, Lk, Dv}),
            TensorView(out.data(), DType::f32, {N, Hq, Lq, Dv}), options);
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t h = 0; h < Hq; ++h) {
      for (std::int64_t i = 0; i < Lq; ++i) {
        const std::int64_t count = std::min<std::int64_t>(lens[n], i + lens[n] - Lq + 1);
        const std::int64_t row = (n * Hq + h) * Lq + i;
        EXPECT_NEAR(lse[std::size_t(row)], std::log(double(count)), 1e-6);
        for (std::int64_t d = 0; d < Dv; ++d) {
          double mean = 0;
          for (std::int64_t j = 0; j < count; ++j) {
            mean += numeric::bf16_to_float(v16[std::size_t(((n * Hkv + h / 2) * Lk + j) * Dv + d)]);
          }
          EXPECT_NEAR(out[std::size_t(row * Dv + d)], mean / double(count), 1e-6);
        }
      }
    }
  }
}

// One visible key with a huge score and the rest far below: the output is that key's value,
// exactly, and a fully masked row is zeros with LSE -inf.
TEST(AttentionCpu, LargeLogitsAndMaskedRows) {
  constexpr std::int64_t Lk = 4, D = 8;
  std::vector<float> q(2 * D, 1.f), k(Lk * D, 0.f), v(Lk * D), mask(2 * Lk, 0.f);
  for (std::int64_t d = 0; d < D; ++d) k[std::size_t(2 * D + d)] = 50.f;  // key 2: score 400
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = float(i);
  std::vector<std::uint16_t> k16(k.size()), v16(v.size());
  for (std::size_t i = 0; i < k.size(); ++i) k16[i] = numeric::float_to_bf16(k[i]);
  for (std::size_t i = 0; i < v.size(); ++i) v16[i] = numeric::float_to_bf16(v[i]);
  for (std::int64_t j = 0; j < Lk; ++j) mask[std::size_t(Lk + j)] = -INFINITY;  // row 1 hidden
  std::vector<float> out(2 * D, -1.f), lse(2);
  AttentionOptions options;
  options.scale = 1.f;
  options.mask = TensorView(mask.data(), DType::f32, {2, Lk});
  options.lse = TensorView(lse.data(), DType::f32, {1, 1, 2});
  attention(TensorView(q.data(), DType::f32, {1, 1, 2, D}),
            TensorView(k16.data(), DType::bf16, {1, 1, Lk, D}),
            TensorView(v16.data(), DType::bf16, {1, 1, Lk, D}),
            TensorView(out.data(), DType::f32, {1, 1, 2, D}), options);
  for (std::int64_t d = 0; d < D; ++d) {
    EXPECT_EQ(out[std::size_t(d)], float(2 * D + d));
    EXPECT_EQ(out[std::size_t(D + d)], 0.f);
  }
  EXPECT_NEAR(lse[0], 400.0, 1e-3);
  EXPECT_EQ(lse[1], -INFINITY);
}

// The low-precision reference is the bound's yardstick: it must differ from the f64 reference
// (else the bound would be the floor alone) by about bf16's rounding, not more.
TEST(AttentionCpu, LowPrecisionReferenceIsCloseButNotExact) {
  const Case c{2, 2, 2, 33, 65, 64, 64};
  Rng rng;
  CaseRun r(Backend::cpu, rng, [&](Tensors& t, Rng& g) { Attention::build(c, t, g); });
  const std::vector<double> want = reference(c, r.host()).out;
  const std::vector<double> low = low_precision_reference(c, r.host());
  double max_error = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    max_error = std::max(max_error, std::abs(low[i] - want[i]));
  }
  EXPECT_GT(max_error, 0.0);
  EXPECT_LT(max_error, 4 * unit_roundoff(DType::bf16));
}

// Small CPU problems for the tests of edge inputs: q f32, k and v bf16 [N, H, L, D] from floats,
// out and lse f32 (poisoned), one call.
struct Small {
  std::int64_t N, Hq, Hkv, Lq, Lk, D, Dv;
  std::vector<float> q, k, v;
  std::vector<float> out, lse;

  Small(std::int64_t n, std::int64_t hq, std::int64_t hkv, std::int64_t lq, std::int64_t lk,
        std::int64_t d, std::int64_t dv, Rng& rng)
      : N(n), Hq(hq), Hkv(hkv), Lq(lq), Lk(lk), D(d), Dv(dv) {
    q.resize(std::size_t(N * Hq * Lq * D));
    k.resize(std::size_t(N * Hkv * Lk * D));
    v.resize(std::size_t(N * Hkv * Lk * Dv));
    for (std::vector<float>* x : {&q, &k, &v}) fill_uniform(x->data(), DType::f32, x->size(), rng);
  }
  float& q_at(std::int64_t n, std::int64_t h, std::int64_t i, std::int64_t d) {
    return q[std::size_t(((n * Hq + h) * Lq + i) * D + d)];
  }
  float& k_at(std::int64_t n, std::int64_t h, std::int64_t j, std::int64_t d) {
    return k[std::size_t(((n * Hkv + h) * Lk + j) * D + d)];
  }
  float row_out(std::int64_t n, std::int64_t h, std::int64_t i, std::int64_t d) const {
    return out[std::size_t(((n * Hq + h) * Lq + i) * Dv + d)];
  }
  float row_lse(std::int64_t n, std::int64_t h, std::int64_t i) const {
    return lse[std::size_t((n * Hq + h) * Lq + i)];
  }
  void run(AttentionOptions options = {}, bool with_lse = true) {
    std::vector<std::uint16_t> k16(k.size()), v16(v.size());
    for (std::size_t i = 0; i < k.size(); ++i) k16[i] = numeric::float_to_bf16(k[i]);
    for (std::size_t i = 0; i < v.size(); ++i) v16[i] = numeric::float_to_bf16(v[i]);
    out.assign(std::size_t(N * Hq * Lq * Dv), NAN);
    lse.assign(std::size_t(N * Hq * Lq), NAN);
    if (with_lse) options.lse = TensorView(lse.data(), DType::f32, {N, Hq, Lq});
    attention(TensorView(q.data(), DType::f32, {N, Hq, Lq, D}),
              TensorView(k16.data(), DType::bf16, {N, Hkv, Lk, D}),
              TensorView(v16.data(), DType::bf16, {N, Hkv, Lk, Dv}),
              TensorView(out.data(), DType::f32, {N, Hq, Lq, Dv}), options);
  }
  // Whether row (n, h, i) of out is all NaN (and its lse NaN), all zeros (lse -inf), or finite.
  bool nan_row(std::int64_t n, std::int64_t h, std::int64_t i) const {
    for (std::int64_t d = 0; d < Dv; ++d) {
      if (!std::isnan(row_out(n, h, i, d))) return false;
    }
    return std::isnan(row_lse(n, h, i));
  }
  bool zero_row(std::int64_t n, std::int64_t h, std::int64_t i) const {
    for (std::int64_t d = 0; d < Dv; ++d) {
      if (row_out(n, h, i, d) != 0.f) return false;
    }
    return row_lse(n, h, i) == -INFINITY;
  }
  bool finite_row(std::int64_t n, std::int64_t h, std::int64_t i) const {
    bool any_nonzero = false;
    for (std::int64_t d = 0; d < Dv; ++d) {
      if (!std::isfinite(row_out(n, h, i, d))) return false;
      any_nonzero = any_nonzero || row_out(n, h, i, d) != 0.f;
    }
    return any_nonzero && std::isfinite(row_lse(n, h, i));
  }
};

// A +inf score makes its row NaN, as in SDPA (inf - inf in the softmax), not 0: with q[..., 0] = 1
// and k[0, 0, 2, 0] = +inf every row of that head meets it.
TEST(AttentionCpu, InfScoreMakesItsRowsNaN) {
  Rng rng;
  Small a(1, 2, 1, 3, 4, 8, 8, rng);
  for (std::int64_t h = 0; h < 2; ++h) {
    for (std::int64_t i = 0; i < 3; ++i) a.q_at(0, h, i, 0) = 1.f;
  }
  a.k_at(0, 0, 2, 0) = INFINITY;
  a.run();
  for (std::int64_t h = 0; h < 2; ++h) {
    for (std::int64_t i = 0; i < 3; ++i) EXPECT_TRUE(a.nan_row(0, h, i)) << h << ", " << i;
  }
}

// A NaN in one query row makes that row NaN and no other.
TEST(AttentionCpu, NanQueryRowStaysInItsRow) {
  Rng rng;
  Small a(2, 2, 2, 4, 6, 8, 8, rng);
  a.q_at(1, 0, 2, 3) = NAN;
  a.run();
  for (std::int64_t n = 0; n < 2; ++n) {
    for (std::int64_t h = 0; h < 2; ++h) {
      for (std::int64_t i = 0; i < 4; ++i) {
        const bool hit = n == 1 && h == 0 && i == 2;
        EXPECT_TRUE(hit ? a.nan_row(n, h, i) : a.finite_row(n, h, i)) << n << h << i;
      }
    }
  }
}

// A mask row of -inf hides every key: zeros and lse -inf. A NaN mask entry makes its row NaN.
TEST(AttentionCpu, MaskRowsAllHiddenAndNan) {
  Rng rng;
  Small a(1, 1, 1, 4, 5, 8, 8, rng);
  std::vector<float> mask(4 * 5, 0.f);
  for (std::int64_t j = 0; j < 5; ++j) mask[std::size_t(1 * 5 + j)] = -INFINITY;
  mask[std::size_t(2 * 5 + 3)] = NAN;
  mask[std::size_t(3 * 5 + 0)] = -INFINITY;  // one key hidden: still a finite row
  AttentionOptions o;
  o.mask = TensorView(mask.data(), DType::f32, {4, 5});
  a.run(o);
  EXPECT_TRUE(a.finite_row(0, 0, 0));
  EXPECT_TRUE(a.zero_row(0, 0, 1));
  EXPECT_TRUE(a.nan_row(0, 0, 2));
  EXPECT_TRUE(a.finite_row(0, 0, 3));
}

// causal with Lq = 9 > Lk = 7, aligned bottom right: query i sees keys j <= i - 2, so rows 0 and
// 1 see none (zeros, lse -inf); kv_len = 0 hides every key of its batch.
TEST(AttentionCpu, RowsThatSeeNoKeyAreZeros) {
  Rng rng;
  Small a(2, 2, 1, 9, 7, 8, 16, rng);
  AttentionOptions o;
  o.causal = true;
  a.run(o);
  for (std::int64_t n = 0; n < 2; ++n) {
    for (std::int64_t h = 0; h < 2; ++h) {
      for (std::int64_t i = 0; i < 9; ++i) {
        EXPECT_TRUE(i < 2 ? a.zero_row(n, h, i) : a.finite_row(n, h, i)) << n << h << i;
      }
    }
  }
  const std::int64_t lens[2] = {0, 7};
  AttentionOptions with_len;
  with_len.kv_len = TensorView(const_cast<std::int64_t*>(lens), DType::i64, {2});
  a.run(with_len);
  for (std::int64_t h = 0; h < 2; ++h) {
    for (std::int64_t i = 0; i < 9; ++i) {
      EXPECT_TRUE(a.zero_row(0, h, i)) << h << i;
      EXPECT_TRUE(a.finite_row(1, h, i)) << h << i;
    }
  }
}

// Empty problems: Lq, N, heads or Dv = 0 return without error and write nothing; Dv = 0 with an
// lse to write is an error naming v (the lse is computed from the values' pass); Lk = 0 gives
// zeros and lse -inf (every key hidden).
TEST(AttentionCpu, EmptyProblems) {
  Rng rng;
  for (const Small& shape : {Small(1, 2, 2, 0, 5, 8, 8, rng), Small(0, 2, 2, 3, 5, 8, 8, rng),
                             Small(1, 0, 0, 3, 5, 8, 8, rng)}) {
    Small a = shape;
    EXPECT_NO_THROW(a.run());
    EXPECT_TRUE(a.out.empty() && a.lse.empty());
  }
  Small no_values(1, 2, 2, 3, 5, 8, 0, rng);
  EXPECT_NO_THROW(no_values.run({}, false));
  expect_error("kiln::attention", [&] { no_values.run(); }, ErrorCode::invalid_argument, {"v"});
  Small no_keys(2, 2, 1, 3, 0, 8, 8, rng);
  no_keys.run();
  for (std::int64_t n = 0; n < 2; ++n) {
    for (std::int64_t h = 0; h < 2; ++h) {
      for (std::int64_t i = 0; i < 3; ++i) EXPECT_TRUE(no_keys.zero_row(n, h, i)) << n << h << i;
    }
  }
}

// The launcher's plans: decode splits the keys until the GPU is full, large prefill does not, and
// the JIT key names every specialization (what KILN_JIT_LOG prints).
constexpr int kH200Smem = 228 * 1024;  // shared memory of an sm_90 SM
constexpr int kA100Smem = 164 * 1024;  // ... of an sm_80 SM

TEST(AttentionPlan, DecodeSplitsPrefillDoesNot) {
  using attention_detail::make_plan;
  using attention_detail::resident_blocks;
  const DType bf = DType::bf16;
  // Decode, B1 H32 D128, 32768 keys on 132 SMs: 32 keys a warp, a 3-deep ring of 128-key tiles
  // (208 KB: one block an SM), 4 splits of 64 tiles = 128 blocks in one wave.
  const auto decode = make_plan(bf, bf, bf, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 32, 1,
                                32768, 132, kH200Smem, false);
  EXPECT_EQ(decode.warps_m, 1);
  EXPECT_EQ(decode.block_n / decode.warps_n, 32);
  EXPECT_EQ(decode.stages, 3);
  EXPECT_EQ(resident_blocks(decode, kH200Smem), 1);
  EXPECT_EQ(decode.splits, 4);
  // On an sm_80 SM (164 KB) the ring is 2 deep.
  const auto a100 = make_plan(bf, bf, bf, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 32, 1,
                              32768, 108, kA100Smem, false);
  EXPECT_EQ(a100.stages, 2);
  // 10 splits: 320 blocks in 3 waves of 108, 26 tiles each (84), against 3 splits in one (88).
  EXPECT_EQ(a100.splits, 10);
  // GQA 8:1 decode packs the group into one row tile: 4 KV heads, 32 splits.
  const auto gqa = make_plan(bf, bf, bf, 128, 128, 8, false, kMaskNone, kKvLenI32, false, 4, 1,
                             32768, 132, kH200Smem, false);
  EXPECT_EQ(gqa.warps_m, 1);
  EXPECT_EQ(gqa.splits, 32);
  // Batch 8 fills two waves without splitting (2 splits: 4 waves of 32 tiles).
  const auto batch = make_plan(bf, bf, bf, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 256, 1,
                               8192, 132, kH200Smem, false);
  EXPECT_EQ(batch.splits, 1);
  // Few keys: at most one split per KV tile.
  const auto short_kv = make_plan(bf, bf, bf, 64, 64, 1, false, kMaskNone, kKvLenNone, false, 8, 1,
                                  200, 132, kH200Smem, false);
  EXPECT_EQ(short_kv.splits, 2);  // 2 tiles of 128 keys
  // Splits that do not divide the tiles: 71 tiles in 18 chunks.
  const auto uneven = make_plan(bf, bf, bf, 128, 128, 4, false, kMaskNone, kKvLenI32, false, 6, 1,
                                9000, 132, kH200Smem, false);
  EXPECT_EQ(uneven.splits, 18);
  // Flux at 1024^2: 24 heads x 36 row tiles fill the GPU without splitting.
  const auto flux = make_plan(bf, bf, bf, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 24,
                              4608, 4608, 132, kH200Smem, false);
  EXPECT_EQ(flux.splits, 1);
  EXPECT_EQ(flux.warps_n, 1);
  // Every plan fits the shared memory a block may opt in to (the SM's less 1 KB).
  for (int smem : {kH200Smem, kA100Smem}) {
    for (int d = 8; d <= 256; d += 8) {
      for (long long lq : {1LL, 4096LL}) {
        for (bool has_tma : {false, true}) {
          const auto plan = make_plan(bf, bf, bf, d, d, 1, true, kMaskNone, kKvLenNone, false, 1,
                                      lq, 4096, 132, smem, has_tma);
          EXPECT_LE(plan.smem_bytes(), smem - 1024) << "D " << d << " Lq " << lq;
          EXPECT_GE(resident_blocks(plan, smem), 1);
        }
      }
    }
  }
}

TEST(AttentionPlan, HopperDecodeLoadsByTmaAtWholePanels) {
  using attention_detail::make_plan;
  const DType bf = DType::bf16;
  // B1 H32 D128 KV 32768 on an H200: 2 x 64-key tiles (the measured best), 4 math warps and the
  // producer; registers count one block an SM, so 4 splits: 128 blocks in one wave.
  const auto decode = make_plan(bf, bf, bf, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 32, 1,
                                32768, 132, kH200Smem, true);
  EXPECT_TRUE(decode.tma);
  EXPECT_EQ(decode.threads(), 5 * 32);
  EXPECT_EQ(decode.block_n, 64);
  EXPECT_EQ(decode.stages, 2);
  EXPECT_EQ(decode.splits, 4);
  EXPECT_EQ(attention_detail::resident_blocks(decode, kH200Smem), 1);
  // Above D 128 the tiles follow the cp.async rule: 64 keys, the ring as deep as fits.
  const auto wide = make_plan(bf, bf, bf, 256, 256, 1, false, kMaskNone, kKvLenNone, false, 32, 1,
                              32768, 132, kH200Smem, true);
  EXPECT_TRUE(wide.tma);
  EXPECT_EQ(wide.block_n, 64);
  EXPECT_EQ(wide.stages, 3);
  // Head dims of whole 64-element panels take TMA (D 192 with Dv 128 too); others keep cp.async,
  // and so does prefill.
  for (int d : {64, 128, 192, 256}) {
    EXPECT_TRUE(make_plan(bf, bf, bf, d, d, 4, false, kMaskNone, kKvLenI32, false, 8, 1, 4096, 132,
                          kH200Smem, true)
                    .tma)
        << "D " << d;
  }
  EXPECT_TRUE(make_plan(bf, bf, bf, 192, 128, 1, false, kMaskNone, kKvLenNone, false, 8, 1, 200,
                        132, kH200Smem, true)
                  .tma);
  for (int d : {40, 80, 96}) {
    EXPECT_FALSE(make_plan(bf, bf, bf, d, d, 1, false, kMaskNone, kKvLenNone, false, 8, 1, 4096,
                           132, kH200Smem, true)
                     .tma)
        << "D " << d;
  }
  EXPECT_FALSE(make_plan(bf, bf, bf, 128, 128, 1, true, kMaskNone, kKvLenNone, false, 32, 8192,
                         8192, 132, kH200Smem, true)
                   .tma);
  const std::string key = attention_detail::kernel_spec(decode).key();
  EXPECT_NE(key.find("TMA=true"), std::string::npos) << key;
  EXPECT_EQ(attention_detail::kernel_spec(decode).archs, std::vector<std::string>{"sm_90a"});
}

TEST(AttentionPlan, JitKeyNamesTheSpecialization) {
  const auto plan =
      attention_detail::make_plan(DType::f32, DType::f16, DType::bf16, 72, 40, 4, true, kMaskF16,
                                  kKvLenI64, true, 6, 1, 5000, 132, kH200Smem, false);
  const std::string key = attention_detail::kernel_spec(plan).key();
  for (const char* part :
       {"T=kiln::f16", "TQ=float", "TO=kiln::bf16", "D=72", "DV=40", "G=4", "CAUSAL=true",
        "MASK=kiln::kMaskF16", "KV_LEN=kiln::kKvLenI64", "SOFTCAP=true", "SPLIT=true", "TMA=false",
        "WARPS_M=", "WARPS_N=", "BLOCK_N=", "STAGES="}) {
    EXPECT_NE(key.find(part), std::string::npos) << part << " not in " << key;
  }
}

// Small valid arguments; each error row breaks one.
struct Args {
  // k_ and v_ hold room for a third head.
  ArgArray q_{2 * 4 * 3 * 16, DType::bf16, 1.f}, k_{2 * 3 * 5 * 16, DType::bf16, 1.f};
  ArgArray v_{2 * 3 * 5 * 8, DType::bf16, 1.f}, out_{2 * 4 * 3 * 8, DType::f32, 0.f};
  ArgArray other_{2 * 4 * 3 * 16, DType::f32, 0.f};
  TensorView q() { return q_({2, 4, 3, 16}, DType::bf16); }
  TensorView k() { return k_({2, 2, 5, 16}, DType::bf16); }
  TensorView v() { return v_({2, 2, 5, 8}, DType::bf16); }
  TensorView out() { return out_({2, 4, 3, 8}); }
  bool untouched() const { return q_.unchanged() && out_.unchanged(); }
  // The valid call with one option set.
  template <typename T, typename V>
  void with(T AttentionOptions::*option, V value) {
    AttentionOptions options;
    options.*option = value;
    attention(q(), k(), v(), out(), options);
  }
  // The valid call with Lk = 4 keys and kv_len = {first, second} of type I.
  template <typename I>
  void with_lengths(I first, I second) {
    const TensorView lens = other_({2}, std::is_same_v<I, std::int32_t> ? DType::i32 : DType::i64);
    static_cast<I*>(lens.data())[0] = first;
    static_cast<I*>(lens.data())[1] = second;
    AttentionOptions options;
    options.kv_len = lens;
    attention(q(), k_({2, 2, 4, 16}, DType::bf16), v_({2, 2, 4, 8}, DType::bf16), out(), options);
  }
};

TEST(AttentionArgs, Work) {
  Args a;
  attention(a.q(), a.k(), a.v(), a.out());
  for (double x : values(a.out())) EXPECT_NEAR(x, 1.0, 1e-6);
}

// out seen transposed ([N, Lq, Hq, Dv] memory) and as a row range of a longer buffer: the same
// values as a contiguous out, and the buffer's rows outside the range keep their poison.
TEST(AttentionArgs, StridedOutMatchesContiguous) {
  const std::int64_t N = 2, H = 3, L = 5, D = 16, pad = 2;
  Rng rng;
  std::uniform_real_distribution<float> value(-1.f, 1.f);
  std::vector<float> qkv(std::size_t(3 * N * H * L * D));
  for (float& x : qkv) x = value(rng.engine());
  const auto input = [&](int i) {
    return TensorView(qkv.data() + i * N * H * L * D, DType::f32, {N, H, L, D});
  };
  // f32 q against f32 k is not a call kiln takes: k and v as bf16 copies.
  std::vector<std::uint16_t> kv(std::size_t(2 * N * H * L * D));
  for (std::size_t e = 0; e < kv.size(); ++e) {
    numeric::store_float(kv.data(), DType::bf16, std::int64_t(e), qkv[N * H * L * D + e]);
  }
  const TensorView k(kv.data(), DType::bf16, {N, H, L, D});
  const TensorView v(kv.data() + N * H * L * D, DType::bf16, {N, H, L, D});
  std::vector<float> plain(std::size_t(N * H * L * D));
  attention(input(0), k, v, TensorView(plain.data(), DType::f32, {N, H, L, D}));

  const std::int64_t shape[] = {N, H, L, D}, rows = L + 2 * pad;
  const std::int64_t transposed_strides[] = {L * H * D, D, H * D, 1};
  const std::int64_t ranged_strides[] = {H * rows * D, rows * D, D, 1};
  std::vector<float> transposed(plain.size(), NAN);
  attention(input(0), k, v, TensorView(transposed.data(), DType::f32, shape, transposed_strides));
  std::vector<float> ranged(std::size_t(N * H * rows * D), -7.f);
  attention(input(0), k, v, TensorView(ranged.data() + pad * D, DType::f32, shape, ranged_strides));
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t i = 0; i < rows; ++i) {
        for (std::int64_t d = 0; d < D; ++d) {
          const float got = ranged[std::size_t(((n * H + h) * rows + i) * D + d)];
          if (i < pad || i >= pad + L) {
            EXPECT_EQ(got, -7.f) << "wrote row " << i << " outside the range";
            continue;
          }
          const float want = plain[std::size_t(((n * H + h) * L + i - pad) * D + d)];
          EXPECT_EQ(got, want);
          EXPECT_EQ(transposed[std::size_t(((n * L + i - pad) * H + h) * D + d)], want);
        }
      }
    }
  }
}

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("HeadDimNotMultipleOf8", invalid, {"q", "head dim 12", "multiple of 8"}, [](Args& a) {
    attention(a.other_({2, 4, 3, 12}, DType::bf16), a.k_({2, 2, 5, 12}, DType::bf16), a.v(),
              a.out());
  });
  t.add("HeadsNotAMultiple", invalid, {"k", "3 heads", "divisor", "4"}, [](Args& a) {
    attention(a.q(), a.k_({2, 3, 5, 16}, DType::bf16), a.v_({2, 3, 5, 8}, DType::bf16), a.out());
  });
  t.add("VShape", invalid, {"v", "[2, 2, 4, 8]", "[2, 2, 5, 8]"}, [](Args& a) {
    attention(a.q(), a.k(), a.v_({2, 2, 4, 8}, DType::bf16), a.out());
  });
  t.add("KvDtypeMismatch", invalid, {"v", "f16"}, [](Args& a) {
    attention(a.q(), a.k(), a.v_({2, 2, 5, 8}, DType::f16), a.out());
  });
  t.add("QDtype", invalid, {"q", "f16", "bf16", "f32"}, [](Args& a) {
    attention(a.q_({2, 4, 3, 16}, DType::f16), a.k(), a.v(), a.out());
  });
  t.add("OutShape", invalid, {"out", "[2, 4, 3, 16]", "[2, 4, 3, 8]"}, [](Args& a) {
    attention(a.q(), a.k(), a.v(), a.out_({2, 4, 3, 16}));
  });
  t.add("MaskNotBroadcastable", invalid, {"mask", "[3, 4]", "[2, 4, 3, 5]"}, [](Args& a) {
    a.with(&AttentionOptions::mask, a.other_({3, 4}));
  });
  t.add("KvLenShape", invalid, {"kv_len", "[3]", "[2]"},
        [](Args& a) { a.with(&AttentionOptions::kv_len, a.other_({3}, DType::i32)); });
  t.add("LseShape", invalid, {"lse", "[2, 4, 4]", "[2, 4, 3]"}, [](Args& a) {
    a.with(&AttentionOptions::lse, a.other_({2, 4, 4}));
  });
  t.add("BadScale", invalid, {"scale", "> 0"},
        [](Args& a) { a.with(&AttentionOptions::scale, -1.f); });
  t.add("BadSoftcap", invalid, {"softcap", "> 0"},
        [](Args& a) { a.with(&AttentionOptions::softcap, 0.f); });
  t.add("OutLastDimStrided", invalid, {"out", "last dim contiguous"}, [](Args& a) {
    attention(a.q(), a.k(), a.v(), a.other_({2, 4, 3, 8}, DType::f32, {96, 24, 8, 2}));
  });
  t.add("OutRowsOverlap", invalid, {"out", "strides [24, 0, 8, 1]", "do not overlap"}, [](Args& a) {
    attention(a.q(), a.k(), a.v(), a.out_({2, 4, 3, 8}, DType::f32, {24, 0, 8, 1}));
  });
  t.add("OutOverlapsQ", invalid, {"out", "overlaps", "q"}, [](Args& a) {
    attention(a.q(), a.k(), a.v(), a.q_({2, 4, 3, 8}, DType::bf16));
  });
  // On CPU the lengths are read on the host: outside [0, Lk] is an error (CUDA clamps).
  t.add("KvLenAboveLkI32", invalid, {"kv_len[1] = 5, expected 0 <= kv_len <= Lk = 4"},
        [](Args& a) { a.with_lengths<std::int32_t>(2, 5); });
  t.add("KvLenAboveLkI64", invalid, {"kv_len[1] = 5, expected 0 <= kv_len <= Lk = 4"},
        [](Args& a) { a.with_lengths<std::int64_t>(2, 5); });
  t.add("KvLenNegativeI32", invalid, {"kv_len[0] = -1, expected 0 <= kv_len <= Lk = 4"},
        [](Args& a) { a.with_lengths<std::int32_t>(-1, 3); });
  t.add("KvLenNegativeI64", invalid, {"kv_len[1] = -1, expected 0 <= kv_len <= Lk = 4"},
        [](Args& a) { a.with_lengths<std::int64_t>(4, -1); });
}

KILN_ERRORS(Args, "AttentionErrors", "kiln::attention", errors);

KILN_CUDA_TEST(AttentionCudaErrors, MisalignedStrides, true) {
  DeviceBuffer buf(1 << 16);
  const std::int64_t shape[] = {1, 2, 3, 16};
  const std::int64_t strides[] = {2 * 3 * 20, 3 * 20, 20, 1};  // rows of 20: not 16-byte chunks
  const TensorView q(buf.data(), DType::bf16, shape, strides, Device::cuda(0));
  const auto at = [&](std::size_t offset) {
    return TensorView(static_cast<char*>(buf.data()) + offset, DType::bf16, {1, 2, 3, 16},
                      Device::cuda(0));
  };
  expect_error("kiln::attention", [&] { attention(q, at(4096), at(8192), at(12288)); },
               ErrorCode::unsupported, {"q has strides [120, 60, 20, 1]"});
}

// Which calls the Hopper prefill kernel takes (on sm_90a; the case table checks its results
// there: every case with D = Dv in {64, 128}, Lq > 16 and no mask runs it).
KILN_CUDA_TEST(AttentionSm90, TakesUnmaskedPrefillAtHeadDims64And128, true) {
  if (cuda_arch(0) != "sm_90a") GTEST_SKIP() << "not an sm_90a device: " << cuda_arch(0);
  DeviceBuffer buffer(std::size_t(2) * 8 * 256 * 128 * 4);
  const auto view = [&](DType t, std::int64_t h, std::int64_t l, std::int64_t d) {
    return TensorView(buffer.data(), t, {2, h, l, d}, Device::cuda(0));
  };
  const auto takes = [&](DType t, std::int64_t lq, std::int64_t d, const AttentionOptions& o) {
    return attention_detail::prefill_sm90_takes(view(t, 8, lq, d), view(DType::bf16, 2, 256, d),
                                                view(DType::bf16, 2, 256, d), o);
  };
  const AttentionOptions plain;
  EXPECT_TRUE(takes(DType::bf16, 256, 128, plain));
  EXPECT_TRUE(takes(DType::bf16, 17, 64, plain));
  AttentionOptions causal_capped;
  causal_capped.causal = true;
  causal_capped.softcap = 30.f;
  EXPECT_TRUE(takes(DType::bf16, 256, 128, causal_capped));
  EXPECT_FALSE(takes(DType::bf16, 16, 128, plain));  // decode: the split-KV kernel
  EXPECT_FALSE(takes(DType::bf16, 256, 96, plain));  // head dim not a whole 64-wide panel
  EXPECT_FALSE(takes(DType::f32, 256, 128, plain));  // f32 q is converted by the sm_80 kernel
  AttentionOptions masked;
  masked.mask = TensorView(buffer.data(), DType::f32, {256, 256}, Device::cuda(0));
  EXPECT_FALSE(takes(DType::bf16, 256, 128, masked));
}

}  // namespace
}  // namespace kiln::test
