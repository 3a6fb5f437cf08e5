// matmul's gate and residual epilogue, out = residual + gate * ((a . w^T) * scales + bias), on
// every path: the CPU reference against a direct f64 sum written here; the GEMV (plain and
// split-K), the GEMM (mma.sync, and the wgmma kernel on sm_90a, plain and split-K), fp8_native
// (residual as cuBLASLt's C, a single gate folded into the scale vector, and the product pass)
// against the CPU reference; gates [N] and [B, N] (strided chunks of a modulation output), residual
// dtypes and strided rows, the in-place add (out is the residual), K = 0; the argument checks.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/numeric.hpp"
#include "kiln/matmul.hpp"
#include "ops/matmul/matmul.hpp"
#include "support/harness.hpp"

namespace kiln::test {
namespace {

using matmul_detail::float_to_fp8;
using matmul_detail::fp8_to_float;

bool is_fp8(DType d) { return d == DType::f8_e4m3fn || d == DType::f8_e5m2; }

struct Case {
  MatmulPath path = MatmulPath::gemv;
  std::int64_t m = 1, n = 77, k = 208;
  WeightFormat format = WeightFormat::f8_e4m3fn;  // e4m3 with per-channel scales, or bf16
  DType a = DType::bf16;                          // or f8_e4m3fn with per-token scales
  DType out = DType::bf16;
  std::int64_t gate = 0;  // 0: none; -1: [N]; B > 0: [B, N], a chunk of a [B, 3 N] output
  DType gate_dtype = DType::bf16;
  std::optional<DType> residual = DType::bf16;
  bool in_place = false;  // out is the residual (its dtype then out's)
  std::int64_t residual_pad = 0;
  std::optional<DType> bias = std::nullopt;

  std::string name() const {
    return cat(matmul_path_name(path), "_M", m, "_N", n, "_K", k, "_", weight_format_name(format),
               "_a_", dtype_name(a), "_out_", dtype_name(out),
               gate == 0  ? ""
               : gate < 0 ? cat("_gate_", dtype_name(gate_dtype))
                          : cat("_gate", gate, "x_", dtype_name(gate_dtype)),
               in_place   ? "_in_place"
               : residual ? cat("_residual_", dtype_name(*residual))
                          : "",
               residual_pad ? cat("_pad", residual_pad) : "",
               bias ? cat("_bias_", dtype_name(*bias)) : "");
  }
};

struct Epilogue {
  using Case = test::Case;

  static void build(const Case& c, Tensors& t, Rng& rng) {
    const TensorView a = t.input("a", c.a, {c.m, c.k});
    if (is_fp8(c.a)) {
      std::uniform_real_distribution<float> dist(-4.f, 4.f);
      auto* codes = static_cast<std::uint8_t*>(a.data());
      for (std::int64_t i = 0; i < c.m * c.k; ++i) codes[i] = float_to_fp8(dist(rng.engine()), c.a);
      t.input("a_scale", DType::f32, {c.m});
      t.fill("a_scale", rng, 0.25f, 2.f);
    } else {
      t.fill("a", rng);
    }
    if (c.format == WeightFormat::bf16) {
      t.input("w", DType::bf16, {c.n, c.k});
      t.fill("w", rng);
    } else {
      const TensorView w = t.input("w", DType::f8_e4m3fn, {c.n, c.k});
      std::uniform_real_distribution<float> dist(-200.f, 200.f);
      auto* codes = static_cast<std::uint8_t*>(w.data());
      for (std::int64_t i = 0; i < c.n * c.k; ++i) {
        codes[i] = float_to_fp8(dist(rng.engine()), DType::f8_e4m3fn);
      }
      t.input("w_scale", DType::f32, {c.n});
      t.fill("w_scale", rng, 1e-3f, 4e-3f);
    }
    if (c.bias) {
      t.input("bias", *c.bias, {c.n});
      t.fill("bias", rng, -2.f, 2.f);
    }
    if (c.gate < 0) {
      t.input("gate", c.gate_dtype, {c.n});
      t.fill("gate", rng, -2.f, 2.f);
    } else if (c.gate > 0) {
      t.parent("emb", c.gate_dtype, c.gate * 3 * c.n);
      t.view("gate", "emb", c.gate_dtype, {c.gate, c.n}, {3 * c.n, 1}, c.n);
      t.fill("emb", rng, -2.f, 2.f);
    }
    if (c.in_place) {
      // out starts as the residual; the oracle keeps a copy.
      const TensorView out = t.output("out", c.out, {c.m, c.n});
      t.fill("out", rng, -4.f, 4.f);
      const TensorView copy = t.host("residual0", c.out, {c.m, c.n});
      std::copy_n(static_cast<const char*>(out.data()), c.m * c.n * std::int64_t(dtype_size(c.out)),
                  static_cast<char*>(copy.data()));
      return;
    }
    if (c.residual) {
      const std::int64_t ld = c.n + c.residual_pad;
      t.input("residual", *c.residual, {c.m, c.n}, {ld, 1});
      t.fill("residual", rng, -4.f, 4.f);
    }
    t.output("out", c.out, {c.m, c.n});
  }

  static Weight weight(const Case& c, const Views& v) {
    Weight w;
    w.format = c.format;
    w.n = c.n;
    w.k = c.k;
    w.data = v["w"];
    w.scale = v.optional("w_scale");
    return w;
  }

  static MatmulOptions options(const Case& c, const Views& v, MatmulPath path) {
    MatmulOptions o;
    o.path = path;
    o.a_scale = v.optional("a_scale");
    o.bias = v.optional("bias");
    o.gate = v.optional("gate");
    o.residual = c.in_place ? v.optional("out") : v.optional("residual");
    return o;
  }

  static void run(const Case& c, const Views& v, Stream stream) {
    const bool cuda = v["out"].device().type == DeviceType::cuda;
    const MatmulPath ran = matmul(v["a"], weight(c, v), v["out"],
                                  options(c, v, cuda ? c.path : MatmulPath::automatic), stream);
    EXPECT_EQ(ran, cuda ? c.path : MatmulPath::reference);
  }

  // residual + gate * (sum_k a w * a_scale * w_scale + bias) in f64.
  static std::vector<double> direct(const Case& c, const Views& host) {
    const TensorView a = host["a"], w = host["w"];
    const auto a_scale = host.optional("a_scale"), w_scale = host.optional("w_scale");
    const auto bias = host.optional("bias"), gate = host.optional("gate");
    const auto residual = c.in_place ? host.optional("residual0") : host.optional("residual");
    std::vector<double> want(std::size_t(c.m * c.n));
    for (std::int64_t i = 0; i < c.m; ++i) {
      for (std::int64_t j = 0; j < c.n; ++j) {
        double sum = 0;
        for (std::int64_t kk = 0; kk < c.k; ++kk) {
          const double av =
              is_fp8(c.a)
                  ? fp8_to_float(static_cast<const std::uint8_t*>(a.data())[i * c.k + kk], c.a)
                  : numeric::load_float(a.data(), c.a, i * c.k + kk);
          const double wv =
              c.format == WeightFormat::bf16
                  ? numeric::load_float(w.data(), DType::bf16, j * c.k + kk)
                  : double(fp8_to_float(static_cast<const std::uint8_t*>(w.data())[j * c.k + kk],
                                        DType::f8_e4m3fn)) *
                        static_cast<const float*>(w_scale->data())[j];
          sum += av * wv;
        }
        if (a_scale) sum *= static_cast<const float*>(a_scale->data())[i];
        if (bias) sum += numeric::load_float(bias->data(), bias->dtype(), j);
        if (gate) {
          const std::int64_t b = gate->dim() == 2 ? i / (c.m / c.gate) : 0;
          const std::int64_t at = gate->dim() == 2 ? b * gate->stride(0) + j : j;
          sum *= numeric::load_float(gate->data(), c.gate_dtype, at);
        }
        if (residual) {
          sum +=
              numeric::load_float(residual->data(), residual->dtype(), i * residual->stride(0) + j);
        }
        want[std::size_t(i * c.n + j)] = sum;
      }
    }
    return want;
  }

  static std::vector<Expected> expect(const Case& c, CaseRun& r) {
    if (r.backend() == Backend::cpu) {
      // f64 sums rounded once to out's dtype (over weights q * scale rounded to f32).
      return {{"out", direct(c, r.host()), Tolerance::rounding(c.out, 4.0)}};
    }
    // As test_matmul.cpp's tolerance(): fp8 tensor cores accumulate in reduced precision.
    const double tol = c.path == MatmulPath::fp8_native ? (c.out == DType::f32 ? 5e-4 : 3e-3)
                       : c.out != DType::f32            ? 1e-3
                                                        : 2e-5;
    return {{"out", values(r.cpu()["out"]), Tolerance::relative(tol)}};
  }

  static std::string skip(const Case& c) {
    if (c.path != MatmulPath::fp8_native) return "";
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
    return major * 10 + minor >= 89 ? "" : "fp8_native needs sm_89+, device is " + cuda_arch(0);
  }

  static double flops(const Case& c) { return 2.0 * double(c.m * c.n * c.k); }
};

std::vector<Case> cases() {
  using P = MatmulPath;
  const DType bf = DType::bf16, hf = DType::f16, f32 = DType::f32, e4m3 = DType::f8_e4m3fn;
  const auto bf16_w = WeightFormat::bf16;
  std::vector<Case> all;
  // The CPU reference (and the CUDA GEMV): every gate form, residual dtype, bias, out dtype.
  for (std::int64_t gate : {0, -1, 3}) {
    for (std::optional<DType> residual : {std::optional<DType>(), std::optional<DType>(bf),
                                          std::optional<DType>(f32), std::optional<DType>(hf)}) {
      if (gate == 0 && !residual) continue;
      Case c{P::gemv, 3, 77, 208};
      c.gate = gate, c.residual = residual, c.bias = f32;
      all.push_back(c);
    }
  }
  for (DType out : {f32, hf}) {
    Case c{P::gemv, 6, 33, 128};
    c.out = out, c.gate = 2, c.gate_dtype = f32, c.residual = bf;
    all.push_back(c);
  }
  // GEMV: both kernels (bf16 weight at M 1-2 runs the CUDA-core one), strided residual rows,
  // M = 16 with [M, N] gates (one a token), split-K (few rows, long K).
  for (std::int64_t m : {1, 2, 16}) {
    Case c{P::gemv, m, 130, 256};
    c.gate = m, c.residual_pad = 64;
    all.push_back(c);
    c.format = bf16_w, c.gate = -1;
    all.push_back(c);
  }
  Case split{P::gemv, 8, 7, 4352};
  split.gate = 2, split.bias = bf;
  all.push_back(split);
  // GEMM: M off and on the tiles, [B, N] gates, residual of another dtype than out, bf16 weight;
  // on sm_90a the e4m3 weights with bf16 a run the wgmma kernel (split-K at M = 64, K = 4096).
  for (std::int64_t m : {17, 130, 257}) {
    Case c{P::gemm, m, 200, 320};
    c.gate = m == 130 ? 2 : -1, c.residual = m == 17 ? f32 : bf, c.bias = bf;
    all.push_back(c);
    c.format = bf16_w, c.out = f32;
    all.push_back(c);
  }
  Case hopper_split{P::gemm, 64, 256, 4096};
  hopper_split.gate = 4;
  all.push_back(hopper_split);
  // fp8_native: the residual as C (out's dtype) with tensor-like a scales, a single gate folded
  // into the scale vector (M >= 128), a gate per batch element and a residual of another dtype
  // (the product pass).
  for (std::int64_t m : {16, 128, 256}) {
    for (std::int64_t gate : {0, -1, 1, 2}) {
      Case c{P::fp8_native, m, 96, 256};
      c.a = e4m3, c.gate = gate, c.residual = bf;
      all.push_back(c);
    }
    Case c{P::fp8_native, m, 96, 256};
    c.a = e4m3, c.gate = -1, c.residual = f32;
    all.push_back(c);
  }
  // In place: out is the residual.
  for (P path : {P::gemv, P::gemm}) {
    Case c{path, path == P::gemv ? 3 : 40, 72, 128};
    c.gate = 1, c.in_place = true;
    all.push_back(c);
  }
  Case in_place{P::fp8_native, 128, 96, 256};
  in_place.a = e4m3, in_place.in_place = true;
  all.push_back(in_place);
  // K = 0: out = residual + gate * bias.
  Case empty{P::gemv, 4, 8, 0};
  empty.format = bf16_w, empty.gate = 2, empty.bias = f32, empty.out = f32;
  all.push_back(empty);
  return all;
}

KILN_CASES(Epilogue, "MatmulEpilogue", cases, .sanitize = true);

// ---- argument checks ----------------------------------------------------------------------------

struct Args {
  ArgArray a_{6 * 64, DType::f32, 1.f}, w_{16 * 64, DType::f32, 1.f};
  ArgArray out_{6 * 16, DType::f32, 0.f}, v_{256, DType::f32, 1.f};
  Weight weight() {
    Weight w;
    w.format = WeightFormat::bf16;
    w.n = 16;
    w.k = 64;
    w.data = w_({16, 64}, DType::bf16);
    return w;
  }
  bool untouched() const { return a_.unchanged() && out_.unchanged(); }
};

void errors(ErrorTable<Args>& t) {
  const auto invalid = ErrorCode::invalid_argument;
  t.add("GateBatchesDoNotDivideM", invalid, {"gate", "[4, 16]", "B dividing M = 6"}, [](Args& a) {
    MatmulOptions o;
    o.gate = a.v_({4, 16});
    matmul(a.a_({6, 64}), a.weight(), a.out_({6, 16}), o);
  });
  t.add("GateWidth", invalid, {"gate", "[17]", "[16]"}, [](Args& a) {
    MatmulOptions o;
    o.gate = a.v_({17});
    matmul(a.a_({6, 64}), a.weight(), a.out_({6, 16}), o);
  });
  t.add("GateStrideAlongN", invalid, {"gate", "stride 2 along N"}, [](Args& a) {
    MatmulOptions o;
    o.gate = a.v_({2, 16}, DType::f32, {32, 2});
    matmul(a.a_({6, 64}), a.weight(), a.out_({6, 16}), o);
  });
  t.add("ResidualShape", invalid, {"residual", "[6, 15]", "[6, 16]"}, [](Args& a) {
    MatmulOptions o;
    o.residual = a.v_({6, 15});
    matmul(a.a_({6, 64}), a.weight(), a.out_({6, 16}), o);
  });
  t.add("ResidualDtype", invalid, {"residual", "i32"}, [](Args& a) {
    MatmulOptions o;
    o.residual = a.v_({6, 16}, DType::i32);
    matmul(a.a_({6, 64}), a.weight(), a.out_({6, 16}), o);
  });
  t.add("ResidualOverlapsOut", invalid, {"out", "overlaps", "residual"}, [](Args& a) {
    MatmulOptions o;
    o.residual = a.out_({5, 16});  // rows 0-4 of the buffer; out is rows 1-5
    const TensorView out(static_cast<float*>(a.out_({6, 16}).data()) + 16, DType::f32, {5, 16});
    matmul(a.a_({5, 64}), a.weight(), out, o);
  });
  t.add("GateOverlapsOut", invalid, {"out", "overlaps", "gate"}, [](Args& a) {
    MatmulOptions o;
    o.gate = a.out_({16});
    matmul(a.a_({6, 64}), a.weight(), a.out_({6, 16}), o);
  });
}

KILN_ERRORS(Args, "MatmulEpilogueErrors", "kiln::matmul", errors);

}  // namespace
}  // namespace kiln::test
