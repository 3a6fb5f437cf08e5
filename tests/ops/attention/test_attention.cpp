// attention: the CPU reference against closed forms, the CUDA kernels against the CPU reference,
// and argument checks. Inputs are random and fresh every run (seed in the test's XML record).
//
// The GPU bound follows FlashAttention's tests: kiln's error against the f64 reference may be at
// most kErrorFactor times the error of the same reference computed the way a low-precision
// kernel must (q rounded to k's dtype, f32 scores, probabilities rounded to k's dtype before
// P V, the output rounded to out's dtype), plus a small floor.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/attention.hpp"
#include "kiln/device.hpp"
#include "kiln/error.hpp"
#include "ops/attention/attention.hpp"
#include "ops/attention/kernels/params.cuh"
#include "support/buffers.hpp"

namespace kiln::test {
namespace {

constexpr double kErrorFactor = 3.0;

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

  std::string name() const {
    static const char* layouts[] = {"contiguous", "packed_qkv", "kv_cache"};
    static const char* masks[] = {"", "_mask_f32_2d", "_mask_f16_batched", "_mask_bf16_padding"};
    static const char* lens[] = {"", "_kvlen_i32", "_kvlen_i64"};
    std::string s = "N" + std::to_string(N) + "_Hq" + std::to_string(Hq) + "_Hkv" +
                    std::to_string(Hkv) + "_Lq" + std::to_string(Lq) + "_Lk" + std::to_string(Lk) +
                    "_D" + std::to_string(D) + "_Dv" + std::to_string(Dv) + "_" + dtype_name(kv);
    if (q != kv) s += std::string("_q") + dtype_name(q);
    if (out != kv) s += std::string("_out") + dtype_name(out);
    if (causal) s += "_causal";
    s += masks[int(mask)];
    s += lens[int(kv_len)];
    if (softcap > 0) s += "_softcap" + std::to_string(int(softcap));
    if (scale > 0) s += "_scale" + std::to_string(int(scale * 100));
    if (input_range != 1.f) s += "_range" + std::to_string(int(input_range));
    if (lse) s += "_lse";
    if (kv_len_cap > 0) s += "_kvlencap" + std::to_string(kv_len_cap);
    return s + "_" + layouts[int(layout)];
  }
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

// A host tensor inside a guard-banded buffer, with the view the op sees.
struct Tensor {
  std::unique_ptr<HostBuffer> storage;
  TensorView view;
};

Tensor make_tensor(DType dtype, std::initializer_list<std::int64_t> shape) {
  std::int64_t count = 1;
  for (std::int64_t s : shape) count *= s;
  Tensor t{std::make_unique<HostBuffer>(std::size_t(std::max<std::int64_t>(count, 1)) *
                                        dtype_size(dtype)),
           {}};
  t.view = TensorView(t.storage->data(), dtype, shape);
  return t;
}

// All host tensors of one case.
struct Inputs {
  Tensor qkv;  // packed storage (packed_qkv), or unused
  Tensor q, k, v, mask, kv_len;
  std::optional<TensorView> mask_view, kv_len_view;
  float scale = 0.f;
};

std::unique_ptr<Inputs> make_inputs(const Case& c, Rng& rng) {
  auto in = std::make_unique<Inputs>();
  const float r = c.input_range;
  if (c.layout == Layout::packed_qkv) {
    // [N, L, 3, H, D] viewed as q/k/v [N, H, L, D] with strides (3LHD, D, 3HD, 1).
    const std::int64_t L = c.Lq, H = c.Hq, D = c.D;
    in->qkv = make_tensor(c.kv, {c.N, L, 3, H, D});
    fill_uniform(in->qkv.storage->data(), c.kv, std::size_t(c.N * L * 3 * H * D), rng, -r, r);
    const std::int64_t shape[] = {c.N, H, L, D};
    const std::int64_t strides[] = {L * 3 * H * D, D, 3 * H * D, 1};
    char* base = static_cast<char*>(in->qkv.storage->data());
    const std::size_t esz = dtype_size(c.kv);
    in->q.view = TensorView(base, c.kv, shape, strides);
    in->k.view = TensorView(base + std::size_t(H * D) * esz, c.kv, shape, strides);
    in->v.view = TensorView(base + std::size_t(2 * H * D) * esz, c.kv, shape, strides);
  } else if (c.layout == Layout::kv_cache) {
    const std::int64_t cap = c.Lk + 37;
    in->q = make_tensor(c.q, {c.N, c.Lq, c.Hq, c.D});  // memory [N, Lq, Hq, D]
    fill_uniform(in->q.storage->data(), c.q, std::size_t(c.N * c.Lq * c.Hq * c.D), rng, -r, r);
    const std::int64_t q_shape[] = {c.N, c.Hq, c.Lq, c.D};
    const std::int64_t q_strides[] = {c.Lq * c.Hq * c.D, c.D, c.Hq * c.D, 1};
    in->q.view = TensorView(in->q.storage->data(), c.q, q_shape, q_strides);
    in->k = make_tensor(c.kv, {c.N, c.Hkv, cap, c.D});
    in->v = make_tensor(c.kv, {c.N, c.Hkv, cap, c.Dv});
    // The whole cache is filled, the rows past Lk with huge values that must stay unread.
    fill_uniform(in->k.storage->data(), c.kv, std::size_t(c.N * c.Hkv * cap * c.D), rng, -r, r);
    fill_uniform(in->v.storage->data(), c.kv, std::size_t(c.N * c.Hkv * cap * c.Dv), rng, -r, r);
    for (std::int64_t n = 0; n < c.N * c.Hkv; ++n) {
      for (std::int64_t j = c.Lk; j < cap; ++j) {
        for (std::int64_t d = 0; d < c.D; ++d) {
          numeric::store_float(in->k.storage->data(), c.kv, (n * cap + j) * c.D + d, 6e4f);
        }
        for (std::int64_t d = 0; d < c.Dv; ++d) {
          numeric::store_float(in->v.storage->data(), c.kv, (n * cap + j) * c.Dv + d, 6e4f);
        }
      }
    }
    const std::int64_t k_shape[] = {c.N, c.Hkv, c.Lk, c.D};
    const std::int64_t k_strides[] = {c.Hkv * cap * c.D, cap * c.D, c.D, 1};
    const std::int64_t v_shape[] = {c.N, c.Hkv, c.Lk, c.Dv};
    const std::int64_t v_strides[] = {c.Hkv * cap * c.Dv, cap * c.Dv, c.Dv, 1};
    in->k.view = TensorView(in->k.storage->data(), c.kv, k_shape, k_strides);
    in->v.view = TensorView(in->v.storage->data(), c.kv, v_shape, v_strides);
  } else {
    in->q = make_tensor(c.q, {c.N, c.Hq, c.Lq, c.D});
    in->k = make_tensor(c.kv, {c.N, c.Hkv, c.Lk, c.D});
    in->v = make_tensor(c.kv, {c.N, c.Hkv, c.Lk, c.Dv});
    fill_uniform(in->q.storage->data(), c.q, std::size_t(c.N * c.Hq * c.Lq * c.D), rng, -r, r);
    fill_uniform(in->k.storage->data(), c.kv, std::size_t(c.N * c.Hkv * c.Lk * c.D), rng, -r, r);
    fill_uniform(in->v.storage->data(), c.kv, std::size_t(c.N * c.Hkv * c.Lk * c.Dv), rng, -r, r);
  }

  // Masks: random values in [-2, 2), whole rows (or a batch's keys) at -inf.
  const float inf = std::numeric_limits<float>::infinity();
  std::uniform_real_distribution<float> value(-2.f, 2.f);
  std::uniform_int_distribution<int> coin(0, 5);
  switch (c.mask) {
    case MaskKind::none:
      break;
    case MaskKind::f32_2d:
      in->mask = make_tensor(DType::f32, {c.Lq, c.Lk});
      for (std::int64_t i = 0; i < c.Lq; ++i) {
        const bool hidden_row = i % 5 == 2;
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          const bool hidden = hidden_row || (j / 8) % 7 == 3;
          numeric::store_float(in->mask.storage->data(), DType::f32, i * c.Lk + j,
                               hidden ? -inf : value(rng.engine()));
        }
      }
      break;
    case MaskKind::f16_batched:
      in->mask = make_tensor(DType::f16, {c.N, 1, c.Lq, c.Lk});
      for (std::int64_t n = 0; n < c.N; ++n) {
        for (std::int64_t i = 0; i < c.Lq; ++i) {
          const bool hidden_row = (i + n) % 3 == 1;
          for (std::int64_t j = 0; j < c.Lk; ++j) {
            numeric::store_float(
                in->mask.storage->data(), DType::f16, (n * c.Lq + i) * c.Lk + j,
                hidden_row || coin(rng.engine()) == 0 ? -inf : value(rng.engine()));
          }
        }
      }
      break;
    case MaskKind::bf16_padding:
      in->mask = make_tensor(DType::bf16, {c.N, c.Hq, 1, c.Lk});
      for (std::int64_t nh = 0; nh < c.N * c.Hq; ++nh) {
        const std::int64_t valid = (nh * 7) % (c.Lk + 1);  // 0 valid keys for nh = 0
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          numeric::store_float(in->mask.storage->data(), DType::bf16, nh * c.Lk + j,
                               j < valid ? 0.f : -inf);
        }
      }
      break;
  }
  if (c.mask != MaskKind::none) in->mask_view = in->mask.view;

  if (c.kv_len != KvLen::none) {
    const DType dtype = c.kv_len == KvLen::i32 ? DType::i32 : DType::i64;
    in->kv_len = make_tensor(dtype, {c.N});
    std::uniform_int_distribution<std::int64_t> len(1, c.kv_len_cap > 0 ? c.kv_len_cap : c.Lk);
    for (std::int64_t n = 0; n < c.N; ++n) {
      // Batch 0 sees no key at all; the last sees all of them.
      const std::int64_t value_n = n == 0 ? 0 : n == c.N - 1 ? c.Lk : len(rng.engine());
      if (dtype == DType::i32) {
        static_cast<std::int32_t*>(in->kv_len.storage->data())[n] = std::int32_t(value_n);
      } else {
        static_cast<std::int64_t*>(in->kv_len.storage->data())[n] = value_n;
      }
    }
    in->kv_len_view = in->kv_len.view;
  }
  in->scale = c.scale > 0 ? c.scale : float(1.0 / std::sqrt(double(c.D)));
  return in;
}

AttentionOptions options_for(const Case& c, const Inputs& in) {
  AttentionOptions o;
  o.scale = c.scale > 0 ? std::optional<float>(c.scale) : std::nullopt;
  o.causal = c.causal;
  o.mask = in.mask_view;
  o.kv_len = in.kv_len_view;
  if (c.softcap > 0) o.softcap = c.softcap;
  return o;
}

double round_to(double x, DType dtype) {
  float f = float(x);
  std::uint32_t word = 0;
  numeric::store_float(&word, dtype, 0, f);
  return numeric::load_float(&word, dtype, 0);
}

// The reference computed the way a low-precision kernel must: q rounded to k's dtype, scores
// and sums in f32, each probability rounded to k's dtype before P V, the output rounded to
// out's dtype.
std::vector<double> low_precision_reference(const Case& c, const Inputs& in) {
  const std::int64_t group = c.Hq / c.Hkv;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<double> out(std::size_t(c.N * c.Hq * c.Lq * c.Dv), 0.0);
  std::vector<float> s(static_cast<std::size_t>(c.Lk)), q_row(static_cast<std::size_t>(c.D)),
      o(static_cast<std::size_t>(c.Dv));
  const auto at = [](const TensorView& t, std::int64_t a, std::int64_t b, std::int64_t i,
                     std::int64_t d) {
    return numeric::load_float(
        t.data(), t.dtype(), a * t.stride(0) + b * t.stride(1) + i * t.stride(2) + d * t.stride(3));
  };
  const TensorView& q = in.q.view;
  const TensorView& k = in.k.view;
  const TensorView& v = in.v.view;
  for (std::int64_t n = 0; n < c.N; ++n) {
    std::int64_t keys = c.Lk;
    if (in.kv_len_view) {
      keys = in.kv_len_view->dtype() == DType::i32
                 ? std::int64_t(static_cast<const std::int32_t*>(in.kv_len_view->data())[n])
                 : static_cast<const std::int64_t*>(in.kv_len_view->data())[n];
    }
    for (std::int64_t h = 0; h < c.Hq; ++h) {
      for (std::int64_t i = 0; i < c.Lq; ++i) {
        for (std::int64_t d = 0; d < c.D; ++d) {
          q_row[std::size_t(d)] = float(round_to(at(q, n, h, i, d), c.kv));
        }
        float row_max = -inf;
        for (std::int64_t j = 0; j < c.Lk; ++j) {
          float x = -inf;
          if (j < keys && (!c.causal || j <= i + keys - c.Lq)) {
            float dot = 0.f;
            for (std::int64_t d = 0; d < c.D; ++d) {
              dot += q_row[std::size_t(d)] * at(k, n, h / group, j, d);
            }
            x = in.scale * dot;
            if (c.softcap > 0) x = c.softcap * std::tanh(x / c.softcap);
            if (in.mask_view) {
              const TensorView& m = *in.mask_view;
              const std::int64_t idx[4] = {n, h, i, j};
              std::int64_t off = 0;
              for (int dd = 0; dd < m.dim(); ++dd) {
                if (m.size(dd) != 1) off += idx[4 - m.dim() + dd] * m.stride(dd);
              }
              x += numeric::load_float(m.data(), m.dtype(), off);
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
            const float p_low = float(round_to(p, c.kv));
            if (p_low == 0.f) continue;
            for (std::int64_t d = 0; d < c.Dv; ++d)
              o[std::size_t(d)] += p_low * at(v, n, h / group, j, d);
          }
        }
        const std::int64_t row = (n * c.Hq + h) * c.Lq + i;
        for (std::int64_t d = 0; d < c.Dv; ++d) {
          out[std::size_t(row * c.Dv + d)] =
              round_to(sum > 0.f ? o[std::size_t(d)] / sum : 0.f, c.out);
        }
      }
    }
  }
  return out;
}

struct ErrorStats {
  double max_abs = 0, mean_abs = 0;
  bool nan = false;
};

ErrorStats error_of(const std::vector<double>& got, const std::vector<double>& want) {
  ErrorStats e;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) e.nan = true;
    const double d = std::abs(got[i] - want[i]);
    e.max_abs = std::max(e.max_abs, d);
    e.mean_abs += d;
  }
  e.mean_abs /= double(std::max<std::size_t>(got.size(), 1));
  return e;
}

std::vector<double> to_doubles(const void* data, DType dtype, std::size_t count) {
  const std::vector<float> f = to_floats(data, dtype, count);
  return {f.begin(), f.end()};
}

// Runs the case on the GPU and checks it against the f64 CPU reference with the FlashAttention
// bound; out and lse are poisoned before the run and their guard bands checked after. The call
// runs twice on its stream and must give the same bits both times (split-KV decode leaves its
// arrival counters at zero for the next call); `graph`: both runs are replays of a CUDA graph
// that captured the call.
void check_gpu(const Case& c, bool graph = false) {
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const auto in = make_inputs(c, rng);
  const AttentionOptions options = options_for(c, *in);
  const std::int64_t out_count = c.N * c.Hq * c.Lq * c.Dv;
  const std::int64_t rows = c.N * c.Hq * c.Lq;

  // The f64 reference (out in f32, one rounding) and its LSE.
  Tensor ref = make_tensor(DType::f32, {c.N, c.Hq, c.Lq, c.Dv});
  Tensor ref_lse = make_tensor(DType::f32, {c.N, c.Hq, c.Lq});
  AttentionOptions ref_options = options;
  ref_options.lse = ref_lse.view;
  attention(in->q.view, in->k.view, in->v.view, ref.view, ref_options);
  const std::vector<double> want = to_doubles(ref.view.data(), DType::f32, std::size_t(out_count));
  double sum_sq = 0;
  for (double w : want) sum_sq += w * w;
  ASSERT_GT(sum_sq, 0.0) << "the reference output is all zeros: the test cannot fail";

  // Device copies with the same strides and offsets.
  const auto upload = [](const Tensor& t, std::optional<DeviceBuffer>& buffer) {
    buffer.emplace(t.storage->bytes());
    buffer->upload(t.storage->data(), t.storage->bytes());
    const auto offset =
        static_cast<const char*>(t.view.data()) - static_cast<const char*>(t.storage->data());
    return TensorView(static_cast<char*>(buffer->data()) + offset, t.view.dtype(), t.view.shape(),
                      t.view.strides(), Device::cuda(0));
  };
  std::optional<DeviceBuffer> d_q, d_k, d_v, d_mask, d_len, d_qkv;
  TensorView q, k, v;
  if (c.layout == Layout::packed_qkv) {
    d_qkv.emplace(in->qkv.storage->bytes());
    d_qkv->upload(in->qkv.storage->data(), in->qkv.storage->bytes());
    const auto on_device = [&](const TensorView& t) {
      const auto offset =
          static_cast<const char*>(t.data()) - static_cast<const char*>(in->qkv.storage->data());
      return TensorView(static_cast<char*>(d_qkv->data()) + offset, t.dtype(), t.shape(),
                        t.strides(), Device::cuda(0));
    };
    q = on_device(in->q.view), k = on_device(in->k.view), v = on_device(in->v.view);
  } else {
    q = upload(in->q, d_q), k = upload(in->k, d_k), v = upload(in->v, d_v);
  }
  AttentionOptions gpu_options = options;
  if (in->mask_view) gpu_options.mask = upload(in->mask, d_mask);
  if (in->kv_len_view) gpu_options.kv_len = upload(in->kv_len, d_len);
  DeviceBuffer out(std::size_t(out_count) * dtype_size(c.out)), lse(std::size_t(rows) * 4);
  if (c.lse) {
    gpu_options.lse = TensorView(lse.data(), DType::f32, {c.N, c.Hq, c.Lq}, Device::cuda(0));
  }

  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const TensorView out_view(out.data(), c.out, {c.N, c.Hq, c.Lq, c.Dv}, Device::cuda(0));
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t captured = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), cudaSuccess);
    attention(q, k, v, out_view, gpu_options, stream);
    ASSERT_EQ(cudaStreamEndCapture(stream, &captured), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, captured, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphDestroy(captured), cudaSuccess);
  }
  const auto run = [&] {
    if (graph) {
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    } else {
      attention(q, k, v, out_view, gpu_options, stream);
    }
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  };
  run();
  HostBuffer actual(out.bytes()), again(out.bytes());
  out.download(actual.data(), out.bytes());
  run();
  out.download(again.data(), out.bytes());
  if (exec != nullptr) {
    ASSERT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  }
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
  EXPECT_EQ(std::memcmp(actual.data(), again.data(), out.bytes()), 0)
      << c.name() << ": a second call on the stream gave other bits";
  EXPECT_TRUE(out.guards_intact()) << "attention wrote outside out";
  const std::vector<double> got = to_doubles(actual.data(), c.out, std::size_t(out_count));
  const ErrorStats kiln_error = error_of(got, want);
  const ErrorStats low_error = error_of(low_precision_reference(c, *in), want);
  const double rms = std::sqrt(sum_sq / double(out_count));
  const double floor = 1e-5 * rms;
  EXPECT_FALSE(kiln_error.nan) << c.name() << ": NaN in the output";
  EXPECT_LE(kiln_error.max_abs, kErrorFactor * low_error.max_abs + floor)
      << c.name() << ": max error " << kiln_error.max_abs << ", low-precision reference "
      << low_error.max_abs;
  EXPECT_LE(kiln_error.mean_abs, kErrorFactor * low_error.mean_abs + floor)
      << c.name() << ": mean error " << kiln_error.mean_abs << ", low-precision reference "
      << low_error.mean_abs;

  if (c.lse) {
    EXPECT_TRUE(lse.guards_intact()) << "attention wrote outside lse";
    std::vector<float> got_lse(static_cast<std::size_t>(rows));
    lse.download(got_lse.data(), lse.bytes());
    const float* want_lse = static_cast<const float*>(ref_lse.view.data());
    std::size_t bad = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      const double w = want_lse[r], g = got_lse[std::size_t(r)];
      const bool ok = std::isinf(w) ? g == w : std::abs(g - w) <= 2e-4 * (1 + std::abs(w));
      if (!ok && ++bad <= 5) ADD_FAILURE() << "lse row " << r << " is " << g << ", expected " << w;
    }
    EXPECT_EQ(bad, 0u) << c.name() << ": lse";
  }
}

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
  return all;
}

class Attention : public ::testing::TestWithParam<Case> {};

TEST_P(Attention, CudaMatchesCpu) {
  KILN_REQUIRE_GPU();
  check_gpu(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, Attention, ::testing::ValuesIn(cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

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
  };
}

class AttentionSanitize : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionSanitize, CudaMatchesCpu) {
  KILN_REQUIRE_GPU();
  check_gpu(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionSanitize, ::testing::ValuesIn(sanitizer_cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

// Sets an environment variable for a scope, then restores it (the launcher reads it on every
// call).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() { old_ ? ::setenv(name_, old_->c_str(), 1) : ::unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// On sm_90a, decode with head dims of whole 64-element panels loads K/V by TMA (the case table
// above runs that); this suite runs the table's decode cases (Lq * Hq / Hkv <= 16) again through
// the cp.async loads that sm_80 uses, selected by KILN_ATTENTION_LOADS.
std::vector<Case> decode_cases() {
  std::vector<Case> decode;
  for (const Case& c : cases()) {
    if (c.Lq * (c.Hq / c.Hkv) <= 16) decode.push_back(c);
  }
  return decode;
}

class AttentionDecodeCpAsync : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionDecodeCpAsync, CudaMatchesCpu) {
  KILN_REQUIRE_GPU();
  if (cuda_arch(0) != "sm_90a")
    GTEST_SKIP() << "cp.async is the only decode path on " << cuda_arch(0);
  const ScopedEnv loads("KILN_ATTENTION_LOADS", "cp.async");
  check_gpu(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionDecodeCpAsync, ::testing::ValuesIn(decode_cases()),
                         [](const auto& param_info) { return param_info.param.name(); });

// Split-KV decode captured into a CUDA graph (its arrival counters then come from the call's
// workspace, zeroed by a memset node) and replayed twice; GQA 4:1, 3000 keys.
TEST(AttentionSplitKvCuda, CapturedInAGraph) {
  KILN_REQUIRE_GPU();
  check_gpu({2, 8, 2, 1, 3000, 128, 128}, true);
}

// KILN_ATTENTION_LOADS=tma where TMA cannot serve the call is an error, not a silent fallback.
TEST(AttentionSm90Cuda, TmaLoadsRequestedForHeadDim80) {
  KILN_REQUIRE_GPU();
  if (cuda_arch(0) != "sm_90a") GTEST_SKIP() << "not an sm_90a device: " << cuda_arch(0);
  DeviceBuffer buffer(std::size_t(4) * 2 * 256 * 80 * 2);
  const auto view = [&](std::int64_t l, int i) {
    return TensorView(static_cast<char*>(buffer.data()) + std::size_t(i) * 2 * 256 * 80 * 2,
                      DType::bf16, {1, 2, l, 80}, Device::cuda(0));
  };
  const ScopedEnv loads("KILN_ATTENTION_LOADS", "tma");
  test::expect_error("kiln::attention",
                     [&] { attention(view(1, 0), view(256, 1), view(256, 2), view(1, 3)); },
                     ErrorCode::unsupported, {"KILN_ATTENTION_LOADS=tma", "D = 80", "Dv = 80"});
}

// KILN_ATTENTION_TILE's optional fifth field sets the split count: 47 tiles of 64 keys in 7
// chunks; batch 0 sees no key, batch 1 at most 900 (most of its chunks see none), batch 2 all.
// Out-of-range values are errors.
TEST(AttentionTileOverrideCuda, FifthFieldSetsTheSplits) {
  KILN_REQUIRE_GPU();
  {
    const ScopedEnv tile("KILN_ATTENTION_TILE", "1,4,64,3,7");
    check_gpu({3, 8, 2, 1, 3000, 128, 128, DType::bf16, DType::bf16, DType::bf16, false,
               MaskKind::none, KvLen::i32, 0, 0, 1, Layout::kv_cache, true, 900});
  }
  DeviceBuffer buffer(std::size_t(4) * 64 * 64 * 2);
  const auto view = [&](std::int64_t l, int i) {
    return TensorView(static_cast<char*>(buffer.data()) + std::size_t(i) * 64 * 64 * 2, DType::bf16,
                      {1, 1, l, 64}, Device::cuda(0));
  };
  const ScopedEnv tile("KILN_ATTENTION_TILE", "1,4,64,3,0");
  test::expect_error(
      "kiln::attention", [&] { attention(view(1, 0), view(64, 1), view(64, 2), view(1, 3)); },
      ErrorCode::invalid_argument, {"KILN_ATTENTION_TILE is '1,4,64,3,0'", "splits"});
}

// CPU reference against closed forms: with q = 0 every visible key has the same score, so the
// output is the mean of the visible values and the LSE is log(count) (causal, kv_len and GQA
// decide which values and how many).
TEST(AttentionCpu, ZeroQueryAveragesVisibleValues) {
  Rng rng;
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
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
  SCOPED_TRACE("seed " + std::to_string(rng.seed()));
  const auto in = make_inputs(c, rng);
  Tensor ref = make_tensor(DType::f32, {c.N, c.Hq, c.Lq, c.Dv});
  attention(in->q.view, in->k.view, in->v.view, ref.view, options_for(c, *in));
  const auto want = to_doubles(ref.view.data(), DType::f32, std::size_t(c.N * c.Hq * c.Lq * c.Dv));
  const ErrorStats e = error_of(low_precision_reference(c, *in), want);
  EXPECT_GT(e.max_abs, 0.0);
  EXPECT_LT(e.max_abs, 4 * unit_roundoff(DType::bf16));
  EXPECT_TRUE(ref.storage->guards_intact());
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

// Argument checks: each names the op, the argument, what was expected and what came.
class AttentionErrors : public ::testing::Test {
 protected:
  std::vector<std::uint16_t> q_ = std::vector<std::uint16_t>(2 * 4 * 3 * 16, 0x3f80);
  std::vector<std::uint16_t> k_ = std::vector<std::uint16_t>(2 * 2 * 5 * 16, 0x3f80);
  std::vector<std::uint16_t> v_ = std::vector<std::uint16_t>(2 * 2 * 5 * 8, 0x3f80);
  std::vector<float> out_ = std::vector<float>(2 * 4 * 3 * 8, 0.f);
  TensorView q() { return TensorView(q_.data(), DType::bf16, {2, 4, 3, 16}); }
  TensorView k() { return TensorView(k_.data(), DType::bf16, {2, 2, 5, 16}); }
  TensorView v() { return TensorView(v_.data(), DType::bf16, {2, 2, 5, 8}); }
  TensorView out() { return TensorView(out_.data(), DType::f32, {2, 4, 3, 8}); }

  static void expect_error(const std::function<void()>& call, ErrorCode code,
                           const std::vector<std::string>& fragments) {
    test::expect_error("kiln::attention", call, code, fragments);
  }
};

TEST_F(AttentionErrors, Works) {
  attention(q(), k(), v(), out());
  for (float x : out_) EXPECT_NEAR(x, 1.f, 1e-6);
}

TEST_F(AttentionErrors, HeadDimNotMultipleOf8) {
  std::vector<std::uint16_t> q12(2 * 4 * 3 * 12), k12(2 * 2 * 5 * 12);
  expect_error(
      [&] {
        attention(TensorView(q12.data(), DType::bf16, {2, 4, 3, 12}),
                  TensorView(k12.data(), DType::bf16, {2, 2, 5, 12}), v(), out());
      },
      ErrorCode::invalid_argument, {"q", "head dim 12", "multiple of 8"});
}

TEST_F(AttentionErrors, HeadsNotAMultiple) {
  std::vector<std::uint16_t> k3(2 * 3 * 5 * 16), v3(2 * 3 * 5 * 8);
  expect_error(
      [&] {
        attention(q(), TensorView(k3.data(), DType::bf16, {2, 3, 5, 16}),
                  TensorView(v3.data(), DType::bf16, {2, 3, 5, 8}), out());
      },
      ErrorCode::invalid_argument, {"k", "3 heads", "divisor", "4"});
}

TEST_F(AttentionErrors, VShape) {
  expect_error(
      [&] {
        attention(q(), k(), TensorView(v_.data(), DType::bf16, {2, 2, 4, 8}), out());
      },
      ErrorCode::invalid_argument, {"v", "[2, 2, 4, 8]", "[2, 2, 5, 8]"});
}

TEST_F(AttentionErrors, KvDtypeMismatch) {
  expect_error(
      [&] {
        attention(q(), k(), TensorView(v_.data(), DType::f16, {2, 2, 5, 8}), out());
      },
      ErrorCode::invalid_argument, {"v", "f16"});
}

TEST_F(AttentionErrors, QDtype) {
  expect_error(
      [&] {
        attention(TensorView(q_.data(), DType::f16, {2, 4, 3, 16}), k(), v(), out());
      },
      ErrorCode::invalid_argument, {"q", "f16", "bf16", "f32"});
}

TEST_F(AttentionErrors, OutShape) {
  expect_error(
      [&] {
        attention(q(), k(), v(), TensorView(out_.data(), DType::f32, {2, 4, 3, 16}));
      },
      ErrorCode::invalid_argument, {"out", "[2, 4, 3, 16]", "[2, 4, 3, 8]"});
}

TEST_F(AttentionErrors, MaskNotBroadcastable) {
  std::vector<float> m(3 * 4);
  AttentionOptions options;
  options.mask = TensorView(m.data(), DType::f32, {3, 4});
  expect_error([&] { attention(q(), k(), v(), out(), options); }, ErrorCode::invalid_argument,
               {"mask", "[3, 4]", "[2, 4, 3, 5]"});
}

TEST_F(AttentionErrors, KvLenShape) {
  std::vector<std::int32_t> l(3);
  AttentionOptions options;
  options.kv_len = TensorView(l.data(), DType::i32, {3});
  expect_error([&] { attention(q(), k(), v(), out(), options); }, ErrorCode::invalid_argument,
               {"kv_len", "[3]", "[2]"});
}

TEST_F(AttentionErrors, LseShape) {
  std::vector<float> l(2 * 4 * 4);
  AttentionOptions options;
  options.lse = TensorView(l.data(), DType::f32, {2, 4, 4});
  expect_error([&] { attention(q(), k(), v(), out(), options); }, ErrorCode::invalid_argument,
               {"lse", "[2, 4, 4]", "[2, 4, 3]"});
}

TEST_F(AttentionErrors, BadScaleAndSoftcap) {
  AttentionOptions options;
  options.scale = -1.f;
  expect_error([&] { attention(q(), k(), v(), out(), options); }, ErrorCode::invalid_argument,
               {"scale", "> 0"});
  options.scale = std::nullopt;
  options.softcap = 0.f;
  expect_error([&] { attention(q(), k(), v(), out(), options); }, ErrorCode::invalid_argument,
               {"softcap", "> 0"});
}

TEST_F(AttentionErrors, OutOverlapsQ) {
  expect_error(
      [&] {
        attention(q(), k(), v(), TensorView(q_.data(), DType::bf16, {2, 4, 3, 8}));
      },
      ErrorCode::invalid_argument, {"out", "overlaps", "q"});
}

TEST_F(AttentionErrors, UntouchedOutputOnError) {
  std::vector<float> m(3 * 4);
  AttentionOptions options;
  options.mask = TensorView(m.data(), DType::f32, {3, 4});
  EXPECT_THROW(attention(q(), k(), v(), out(), options), Error);
  for (float x : out_) EXPECT_EQ(x, 0.f);
}

TEST(AttentionCudaErrors, MisalignedStrides) {
  KILN_REQUIRE_GPU();
  DeviceBuffer buf(1 << 16);
  const std::int64_t shape[] = {1, 2, 3, 16};
  const std::int64_t strides[] = {2 * 3 * 20, 3 * 20, 20, 1};  // rows of 20: not 16-byte chunks
  const TensorView q(buf.data(), DType::bf16, shape, strides, Device::cuda(0));
  const TensorView k(static_cast<char*>(buf.data()) + 4096, DType::bf16, {1, 2, 3, 16},
                     Device::cuda(0));
  const TensorView v(static_cast<char*>(buf.data()) + 8192, DType::bf16, {1, 2, 3, 16},
                     Device::cuda(0));
  const TensorView o(static_cast<char*>(buf.data()) + 12288, DType::bf16, {1, 2, 3, 16},
                     Device::cuda(0));
  try {
    attention(q, k, v, o);
    ADD_FAILURE() << "no kiln::Error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::unsupported);
    EXPECT_NE(std::string(e.what()).find("q has strides [120, 60, 20, 1]"), std::string::npos)
        << e.what();
  }
}

// Which calls the Hopper prefill kernel takes (on sm_90a; the case table checks its results
// there: every case with D = Dv in {64, 128}, Lq > 16 and no mask runs it).
TEST(AttentionSm90Cuda, TakesUnmaskedPrefillAtHeadDims64And128) {
  KILN_REQUIRE_GPU();
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
