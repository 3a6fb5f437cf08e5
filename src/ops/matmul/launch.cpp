// matmul: argument checks (weights, scales, bias, out), dispatch to a path, the public names,
// and the family's JIT variant lists.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "jit/variants.hpp"
#include "kiln/device.hpp"
#include "ops/matmul/matmul.hpp"

namespace kiln {
namespace matmul_detail {
namespace {

constexpr const char* kOp = "matmul";
constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::f16, DType::bf16};

// Why `path` cannot run `p` ("" when it can).
std::string unsupported(MatmulPath path, const MatmulProblem& p) {
  switch (path) {
    case MatmulPath::gemv:
      return gemv_unsupported(p);
    case MatmulPath::gemm:
      return gemm_unsupported(p);
    case MatmulPath::fp8_native:
      return fp8_native_unsupported(p);
    default:
      return "not a CUDA path";
  }
}

// What `automatic` runs: the selector's path (by shape, format, layout, arch), or the GEMM, which
// takes every problem, when the problem's scales or pointers rule that path out (logged once).
// select_path() asks the same function with aligned (null) pointers.
MatmulPath automatic_path(const MatmulProblem& p) {
  const MatmulPath chosen =
      select_path_cuda(p.m, p.n, p.k, p.w_format, p.w_layout, p.a_dtype, p.arch);
  const std::string why = unsupported(chosen, p);
  if (why.empty()) return chosen;
  log::warning_once(std::string("matmul_fallback_") + matmul_path_name(chosen),
                    std::string("matmul: auto: ") + matmul_path_name(chosen) +
                        " cannot run this problem (" + why + "), running gemm");
  return MatmulPath::gemm;
}

void validate(const TensorView& a, const Weight& w, const TensorView& out,
              const MatmulOptions& options) {
  check::dims(kOp, "a", a, 2);
  check::dtype_in(kOp, "a", a,
                  {DType::f32, DType::f16, DType::bf16, DType::f8_e4m3fn, DType::f8_e5m2});
  const std::int64_t M = a.size(0), K = a.size(1);
  if (K > 1 && M > 0 && a.stride(1) != 1) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "a has column stride " + std::to_string(a.stride(1)) + " (shape " + a.shape_str() +
                    "), expected 1 (rows may be strided, columns contiguous)");
  }
  validate_weight(kOp, w);
  if (w.k != K) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "a has K = " + std::to_string(K) + " (shape " + a.shape_str() +
                    "), expected the weight's K = " + std::to_string(w.k));
  }
  if (is_fp8(a.dtype()) && !is_fp8(w.format)) {
    check::fail(kOp, ErrorCode::unsupported,
                std::string("a is ") + dtype_name(a.dtype()) + " with a " +
                    weight_format_name(w.format) +
                    " weight, expected an fp8 weight for fp8 a (or f32/f16/bf16 a)");
  }
  check::dims(kOp, "out", out, 2);
  check::dtype_in(kOp, "out", out, kFloat);
  const std::int64_t out_shape[] = {M, w.n};
  check::shape(kOp, "out", out, out_shape, "[M, N] with M = a's rows, N = the weight's rows");
  check::contiguous(kOp, "out", out);
  if (options.a_scale) {
    if (!is_fp8(a.dtype())) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  std::string("a_scale given for ") + dtype_name(a.dtype()) +
                      " a, expected it only with fp8 a");
    }
    scale_kind(kOp, "a_scale", *options.a_scale, M, K, false);
  }
  if (options.bias) {
    const TensorView& b = *options.bias;
    check::dims(kOp, "bias", b, 1);
    check::dtype_in(kOp, "bias", b, kFloat);
    const std::int64_t bias_shape[] = {w.n};
    check::shape(kOp, "bias", b, bias_shape, "[N], N = the weight's rows");
    check::contiguous(kOp, "bias", b);
  }
  if (options.gate) {
    const TensorView& g = *options.gate;
    check::dtype_in(kOp, "gate", g, kFloat);
    // B divides M; B = 0 only with M = 0 (an empty batch, as torch's broadcast gives).
    const bool batched = g.dim() == 2 && (g.size(0) >= 1 ? M % g.size(0) == 0 : M == 0);
    if (!(g.dim() == 1 && g.size(0) == w.n) && !(batched && g.size(1) == w.n)) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "gate has shape " + g.shape_str() + ", expected [" + std::to_string(w.n) +
                      "] or [B, " + std::to_string(w.n) + "] with B dividing M = " +
                      std::to_string(M) + " (rows b * M / B .. (b + 1) * M / B - 1 use gate[b])");
    }
    if (g.dim() == 1) check::contiguous(kOp, "gate", g);
    if (g.dim() == 2 && w.n > 1 && g.stride(1) != 1) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "gate has stride " + std::to_string(g.stride(1)) +
                      " along N, expected 1 (rows may be strided)");
    }
    if (M > INT_MAX) {
      check::fail(kOp, ErrorCode::unsupported,
                  "a gate with M = " + std::to_string(M) + " rows, expected M < 2^31");
    }
  }
  if (options.residual) {
    const TensorView& r = *options.residual;
    check::dims(kOp, "residual", r, 2);
    check::dtype_in(kOp, "residual", r, kFloat);
    check::shape(kOp, "residual", r, out_shape, "out's shape [M, N]");
    if (w.n > 1 && M > 0 && r.stride(1) != 1) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "residual has stride " + std::to_string(r.stride(1)) +
                      " along N, expected 1 (rows may be strided)");
    }
  }
}

// out may be the residual itself (the same elements, dtype and layout): an in-place add.
bool same_view(const TensorView& a, const TensorView& b) {
  if (a.data() != b.data() || a.dtype() != b.dtype() || a.dim() != b.dim()) return false;
  for (int d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d) || (a.size(d) > 1 && a.stride(d) != b.stride(d))) return false;
  }
  return a.device() == b.device();
}

}  // namespace

std::vector<std::int64_t> scale_shape(ScaleGranularity granularity, std::int64_t rows,
                                      std::int64_t cols) {
  switch (granularity) {
    case ScaleGranularity::tensor:
      return {1};
    case ScaleGranularity::row:
      return {rows};
    case ScaleGranularity::block128:
      return {ceil_div(rows, kScaleBlock), ceil_div(cols, kScaleBlock)};
  }
  return {1};
}

int operand_kind(const void* data, DType dtype) {
  if (data == nullptr) return kOperandNone;
  switch (dtype) {
    case DType::f32:
      return kOperandF32;
    case DType::f16:
      return kOperandF16;
    case DType::bf16:
      return kOperandBf16;
    default:
      check::fail(kOp, ErrorCode::unsupported,
                  std::string("an epilogue operand of dtype ") + dtype_name(dtype) +
                      ", expected f32, f16 or bf16");
  }
}

GateResidual gate_residual_of(const MatmulProblem& p) {
  GateResidual e{};
  e.gate = p.gate;
  e.residual = p.residual;
  e.gate_stride = p.gate_stride;
  e.residual_stride = p.residual_stride;
  e.gate_rows = int(p.gate_rows);
  return e;
}

ScaleKind scale_kind(const char* op, const char* arg, const TensorView& scale, std::int64_t rows,
                     std::int64_t cols, bool allow_block) {
  check::dtype_in(op, arg, scale, {DType::f32});
  check::contiguous(op, arg, scale);
  if (scale.dim() == 1 && scale.size(0) == 1) return ScaleKind::tensor;
  if (scale.dim() == 1 && scale.size(0) == rows) return ScaleKind::row;
  const std::int64_t br = ceil_div(rows, kScaleBlock), bc = ceil_div(cols, kScaleBlock);
  if (allow_block && scale.dim() == 2 && scale.size(0) == br && scale.size(1) == bc) {
    return ScaleKind::block128;
  }
  std::string expected = "[1] (per tensor) or [" + std::to_string(rows) + "] (per row)";
  if (allow_block) {
    expected += " or [" + std::to_string(br) + ", " + std::to_string(bc) + "] (128x128 blocks)";
  }
  check::fail(op, ErrorCode::invalid_argument,
              std::string(arg) + " has shape " + scale.shape_str() + ", expected " + expected +
                  " for a matrix [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
}

void validate_weight(const char* op, const Weight& w) {
  if (w.n < 0 || w.k < 0) {
    check::fail(op, ErrorCode::invalid_argument,
                "weight has N = " + std::to_string(w.n) + ", K = " + std::to_string(w.k) +
                    ", expected sizes >= 0");
  }
  if (w.layout != WeightLayout::row_major) {
    // A prepared copy: caller-owned u8 storage written by prepare_weight.
    check::dtype_in(op, "w.data", w.data, {DType::u8});
    check::contiguous(op, "w.data", w.data);
  } else {
    const DType expected_dtype = storage_dtype(w.format);
    if (w.data.dtype() != expected_dtype) {
      check::fail(op, ErrorCode::invalid_argument,
                  std::string("w.data has dtype ") + dtype_name(w.data.dtype()) + ", expected " +
                      dtype_name(expected_dtype) + " for format " + weight_format_name(w.format));
    }
    check::dims(op, "w.data", w.data, 2);
    if (w.format == WeightFormat::q8_0 && w.k % kQ8Block != 0) {
      check::fail(
          op, ErrorCode::invalid_argument,
          "weight has K = " + std::to_string(w.k) + ", expected a multiple of 32 (the Q8_0 block)");
    }
    const std::int64_t cols = w.format == WeightFormat::q8_0 ? w.k / kQ8Block * kQ8BlockBytes : w.k;
    const std::int64_t shape[] = {w.n, cols};
    check::shape(op, "w.data", w.data, shape,
                 w.format == WeightFormat::q8_0 ? "[N, K / 32 * 34] Q8_0 blocks" : "[N, K]");
    check::contiguous(op, "w.data", w.data);
  }
  if (w.scale) {
    if (!is_fp8(w.format)) {
      check::fail(op, ErrorCode::invalid_argument,
                  std::string("w.scale given for a ") + weight_format_name(w.format) +
                      " weight, expected a scale only with fp8 weights");
    }
    scale_kind(op, "w.scale", *w.scale, w.n, w.k, true);
  }
}

// Kernel variants a workload needs ("llm": ANCHORS' LLM shapes; "flux": Flux.2 klein linears),
// Q's kernels (quantize, dequantize, gemv) and G's (gemm_variants, in launch_gemm.cpp);
// jit/variants.hpp.
std::vector<jit::KernelSpec> variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  if (workload != "llm" && workload != "flux") return specs;
  specs = quantize_variants(DType::bf16);
  if (workload == "llm") {
    // Decode (M = 1) and small batches (M = 4, 16) of ANCHORS' LLM shapes, bf16 activations and
    // out: fp8 weights with each scale kind, Q8_0, and bf16 (M = 16: the GEMV's tensor-core kernel
    // for every format, with two token fragments).
    struct WeightCase {
      WeightFormat format;
      ScaleKind scale;
    };
    const WeightCase weights[] = {
        {WeightFormat::f8_e4m3fn, ScaleKind::tensor},   {WeightFormat::f8_e4m3fn, ScaleKind::row},
        {WeightFormat::f8_e4m3fn, ScaleKind::block128}, {WeightFormat::f8_e5m2, ScaleKind::tensor},
        {WeightFormat::q8_0, ScaleKind::none},          {WeightFormat::bf16, ScaleKind::none}};
    alignas(16) static const unsigned char kAligned[16] = {};
    for (std::int64_t m : {1, 4, 16}) {
      for (const WeightCase& wc : weights) {
        MatmulProblem p;
        p.m = m;
        p.n = 4096;
        p.k = 4096;
        p.a_dtype = DType::bf16;
        p.w_format = wc.format;
        p.w_scale_kind = wc.scale;
        p.out_dtype = DType::bf16;
        specs.push_back(gemv_spec_for(p));
        if (m == 1) {
          // Decode's o_proj and down_proj add the residual stream (bf16) in the epilogue.
          p.residual = kAligned;
          p.residual_dtype = DType::bf16;
          specs.push_back(gemv_spec_for(p));
        }
      }
    }
  }
  for (auto& spec : gemm_variants(workload)) specs.push_back(std::move(spec));
  for (auto& spec : fp8_native_variants(workload)) specs.push_back(std::move(spec));
  return specs;
}

DType storage_dtype(WeightFormat format) {
  switch (format) {
    case WeightFormat::f16:
      return DType::f16;
    case WeightFormat::bf16:
      return DType::bf16;
    case WeightFormat::f8_e4m3fn:
      return DType::f8_e4m3fn;
    case WeightFormat::f8_e5m2:
      return DType::f8_e5m2;
    case WeightFormat::q8_0:
      return DType::u8;
  }
  return DType::u8;
}

}  // namespace matmul_detail

const char* matmul_path_name(MatmulPath path) {
  switch (path) {
    case MatmulPath::automatic:
      return "auto";
    case MatmulPath::gemv:
      return "gemv";
    case MatmulPath::gemm:
      return "gemm";
    case MatmulPath::fp8_native:
      return "fp8_native";
    case MatmulPath::reference:
      return "reference";
  }
  return "?";
}

const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::f16:
      return "f16";
    case WeightFormat::bf16:
      return "bf16";
    case WeightFormat::f8_e4m3fn:
      return "f8_e4m3fn";
    case WeightFormat::f8_e5m2:
      return "f8_e5m2";
    case WeightFormat::q8_0:
      return "q8_0";
  }
  return "?";
}

const char* weight_layout_name(WeightLayout layout) {
  switch (layout) {
    case WeightLayout::row_major:
      return "row_major";
    case WeightLayout::gemm_packed:
      return "gemm_packed";
    case WeightLayout::dequantized:
      return "dequantized";
  }
  return "?";
}

MatmulPath select_path(std::int64_t m, const Weight& w, DType a_dtype, const Device& device) {
  using namespace matmul_detail;
  if (m < 0 || w.n < 0 || w.k < 0) {
    check::fail("select_path", ErrorCode::invalid_argument,
                "m = " + std::to_string(m) + " for a weight [" + std::to_string(w.n) + ", " +
                    std::to_string(w.k) + "], expected sizes >= 0");
  }
  if (device.type == DeviceType::cpu) return MatmulPath::reference;
  cuda::require_device("select_path", device);
  MatmulProblem p;
  p.m = m;
  p.n = w.n;
  p.k = w.k;
  p.a_dtype = a_dtype;
  p.w_format = w.format;
  p.w_layout = w.layout;
  p.w_row_bytes = weight_row_bytes(w.format, w.k);
  if (w.scale) p.w_scale_kind = scale_kind("select_path", "w.scale", *w.scale, w.n, w.k, true);
  p.device = device.index;
  p.arch = cuda_arch(device.index);
  return automatic_path(p);
}

MatmulPath matmul(const TensorView& a, const Weight& w, const TensorView& out,
                  const MatmulOptions& options, Stream stream) {
  using namespace matmul_detail;
  validate(a, w, out, options);
  const TensorView* a_scale = options.a_scale ? &*options.a_scale : nullptr;
  const TensorView* bias = options.bias ? &*options.bias : nullptr;
  const TensorView* w_scale = w.scale ? &*w.scale : nullptr;
  const TensorView* gate = options.gate ? &*options.gate : nullptr;
  const TensorView* residual = options.residual ? &*options.residual : nullptr;
  const Device device = check::common_device(kOp, {{"a", &a},
                                                   {"w.data", &w.data},
                                                   {"w.scale", w_scale},
                                                   {"a_scale", a_scale},
                                                   {"bias", bias},
                                                   {"gate", gate},
                                                   {"residual", residual},
                                                   {"out", &out}});
  check::no_overlap(kOp, "out", out, "a", a);
  check::no_overlap(kOp, "out", out, "w.data", w.data);
  if (w_scale) check::no_overlap(kOp, "out", out, "w.scale", *w_scale);
  if (a_scale) check::no_overlap(kOp, "out", out, "a_scale", *a_scale);
  if (bias) check::no_overlap(kOp, "out", out, "bias", *bias);
  if (gate) check::no_overlap(kOp, "out", out, "gate", *gate);
  if (residual && !same_view(out, *residual)) {
    check::no_overlap(kOp, "out", out, "residual", *residual);
  }

  if (device.type == DeviceType::cpu) {
    // The CPU backend is the reference, whatever path was asked for (the paths are CUDA kernels).
    if (w.layout != WeightLayout::row_major) {
      check::fail(kOp, ErrorCode::unsupported,
                  std::string("weight layout ") + weight_layout_name(w.layout) +
                      " on CPU, expected row_major (prepared layouts are CUDA-only)");
    }
    if (out.numel() > 0) matmul_reference(a, w, out, options);
    return MatmulPath::reference;
  }
  if (options.path == MatmulPath::reference) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "path reference runs on CPU tensors, got CUDA tensors");
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);

  MatmulProblem p;
  p.m = a.size(0);
  p.n = w.n;
  p.k = w.k;
  p.a = a.data();
  p.a_dtype = a.dtype();
  p.a_row_stride = a.size(0) > 1 ? a.stride(0) : a.size(1);
  p.w = w.data.data();
  p.w_format = w.format;
  p.w_layout = w.layout;
  p.w_row_bytes = weight_row_bytes(w.format, w.k);
  if (w_scale) {
    p.w_scale = static_cast<const float*>(w_scale->data());
    p.w_scale_kind = scale_kind(kOp, "w.scale", *w_scale, w.n, w.k, true);
  }
  if (a_scale) {
    p.a_scale = static_cast<const float*>(a_scale->data());
    p.a_scale_kind = scale_kind(kOp, "a_scale", *a_scale, p.m, p.k, false);
  }
  if (bias) {
    p.bias = bias->data();
    p.bias_dtype = bias->dtype();
  }
  p.out = out.data();
  p.out_dtype = out.dtype();
  if (gate) {
    check::non_null(kOp, "gate", *gate);
    p.gate = gate->data();
    p.gate_dtype = gate->dtype();
    p.gate_stride = gate->dim() == 2 ? gate->stride(0) : 0;
    p.gate_rows = gate->dim() == 2 && p.m > 0 ? p.m / gate->size(0) : 1;
  }
  if (residual) {
    check::non_null(kOp, "residual", *residual);
    p.residual = residual->data();
    p.residual_dtype = residual->dtype();
    p.residual_stride = residual->stride(0);
  }
  p.device = device.index;
  p.arch = cuda_arch(device.index);
  p.stream = stream;

  if (p.m == 0 || p.n == 0 || p.k == 0) {
    // Nothing to multiply: an empty out, or out = bias (or 0) written by the GEMV's epilogue.
    if (p.m > 0 && p.n > 0) {
      check::non_null(kOp, "out", out);
      launch_gemv(p);
    }
    return options.path != MatmulPath::automatic
               ? options.path
               : select_path_cuda(p.m, p.n, p.k, p.w_format, p.w_layout, p.a_dtype, p.arch);
  }
  const MatmulPath path = options.path == MatmulPath::automatic ? automatic_path(p) : options.path;
  check::non_null(kOp, "out", out);
  check::non_null(kOp, "a", a);
  check::non_null(kOp, "w.data", w.data);
  const std::string why = unsupported(path, p);
  if (!why.empty()) {
    check::fail(kOp, ErrorCode::unsupported,
                std::string("path ") + matmul_path_name(path) +
                    " cannot run M = " + std::to_string(p.m) + ", N = " + std::to_string(p.n) +
                    ", K = " + std::to_string(p.k) + ": " + why);
  }
  switch (path) {
    case MatmulPath::gemv:
      launch_gemv(p);
      break;
    case MatmulPath::gemm:
      launch_gemm(p);
      break;
    case MatmulPath::fp8_native:
      launch_fp8_native(p);
      break;
    default:
      break;
  }
  return path;
}

}  // namespace kiln
