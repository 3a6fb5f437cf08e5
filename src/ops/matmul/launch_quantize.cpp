// quantize_fp8, quantize_q8_0 and dequantize: argument checks, dispatch by device, kernel specs
// and launches (kernels/quantize.cuh, kernels/dequantize.cuh).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "jit/kernel_cache.hpp"
#include "ops/matmul/kernels/params.cuh"
#include "ops/matmul/matmul.hpp"

namespace kiln {
namespace matmul_detail {
namespace {

constexpr const char* kQuantizeSource = "ops/matmul/kernels/quantize.cuh";
constexpr const char* kDequantizeSource = "ops/matmul/kernels/dequantize.cuh";
constexpr int kThreads = 256;
constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::f16, DType::bf16};

int kind_value(ScaleGranularity granularity) {
  switch (granularity) {
    case ScaleGranularity::tensor:
      return kScaleTensor;
    case ScaleGranularity::row:
      return kScaleRow;
    case ScaleGranularity::block128:
      return kScaleBlock128;
  }
  return kScaleNone;
}

// 16-byte accesses of `per_thread` elements of a row of x: unit column stride, cols a multiple,
// rows and base aligned.
bool x_vector_ok(const TensorView& x, std::int64_t per_thread) {
  const std::int64_t cols = x.size(1);
  const std::size_t elem = dtype_size(x.dtype());
  return (cols == 1 || x.stride(1) == 1) && cols % per_thread == 0 && aligned(x.data(), 16) &&
         (x.size(0) == 1 || (x.stride(0) * std::int64_t(elem)) % 16 == 0);
}

QuantizeParams params_of(const TensorView& x, const TensorView& q, float* scale) {
  QuantizeParams p{};
  p.x = x.data();
  p.q = q.data();
  p.scale = scale;
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.x_stride[0] = x.stride(0);
  p.x_stride[1] = x.stride(1);
  p.scale_cols = ceil_div(p.cols, kScaleBlock);
  return p;
}

void launch(const jit::KernelSpec& spec, int device, std::int64_t blocks, QuantizeParams& p,
            Stream stream, const char* op) {
  const auto kernel = jit::process_cache().kernel(spec, device);
  void* args[] = {&p};
  jit::launch(op, kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, args);
}

// Blocks of a grid-stride loop over `chunks`: enough to fill the device a few times over.
std::int64_t grid_for(std::int64_t chunks) {
  return std::clamp<std::int64_t>(ceil_div(chunks, kThreads), 1, 65535);
}

// A given quantization scale divides x: it must be finite and > 0 (0 would turn x into +-max,
// NaN into NaN codes). Host memory only: CUDA scales are device memory, which kiln does not read
// on the host (that would synchronize the stream).
void check_scale_values(const char* op, const TensorView& scale) {
  check::non_null(op, "scale", scale);
  const auto* values = static_cast<const float*>(scale.data());
  for (std::int64_t i = 0; i < scale.numel(); ++i) {
    if (!(values[i] > 0.f) || !std::isfinite(values[i])) {
      check::fail(op, ErrorCode::invalid_argument,
                  "scale has value " + std::to_string(values[i]) + " at index " +
                      std::to_string(i) + ", expected a finite value > 0");
    }
  }
}

void check_2d_float(const char* op, const char* arg, const TensorView& t) {
  check::dims(op, arg, t, 2);
  check::dtype_in(op, arg, t, kFloat);
}

jit::KernelSpec quantize_fp8_spec(DType x, DType q, int kind, int vec, bool from_amax) {
  return {kQuantizeSource,
          "kiln::quantize_fp8_kernel",
          {{"Tin", jit::cpp_type("matmul", x)},
           {"Tq", jit::cpp_type("matmul", q)},
           {"KIND", std::to_string(kind)},
           {"VEC", std::to_string(vec)},
           {"FROM_AMAX", from_amax ? "true" : "false"}}};
}

jit::KernelSpec quantize_fp8_group_spec(DType x, DType q, int kind, int vec) {
  return {kQuantizeSource,
          "kiln::quantize_fp8_group_kernel",
          {{"Tin", jit::cpp_type("matmul", x)},
           {"Tq", jit::cpp_type("matmul", q)},
           {"KIND", std::to_string(kind)},
           {"VEC", std::to_string(vec)}}};
}

jit::KernelSpec amax_spec(DType x, int vec) {
  return {kQuantizeSource,
          "kiln::amax_kernel",
          {{"Tin", jit::cpp_type("matmul", x)}, {"VEC", std::to_string(vec)}}};
}

jit::KernelSpec finalize_scale_spec(DType q) {
  return {kQuantizeSource, "kiln::finalize_tensor_scale", {{"Tq", jit::cpp_type("matmul", q)}}};
}

jit::KernelSpec quantize_q8_0_spec(DType x, int vec) {
  return {kQuantizeSource,
          "kiln::quantize_q8_0_kernel",
          {{"Tin", jit::cpp_type("matmul", x)}, {"VEC", std::to_string(vec)}}};
}

jit::KernelSpec dequantize_fp8_spec(DType q, DType out, int kind, int vec) {
  return {kDequantizeSource,
          "kiln::dequantize_fp8_kernel",
          {{"Tq", jit::cpp_type("matmul", q)},
           {"Tout", jit::cpp_type("matmul", out)},
           {"KIND", std::to_string(kind)},
           {"VEC", std::to_string(vec)}}};
}

jit::KernelSpec dequantize_q8_0_spec(DType out, int vec) {
  return {kDequantizeSource,
          "kiln::dequantize_q8_0_kernel",
          {{"Tout", jit::cpp_type("matmul", out)}, {"VEC", std::to_string(vec)}}};
}

}  // namespace

std::vector<jit::KernelSpec> quantize_variants(DType x) {
  std::vector<jit::KernelSpec> specs;
  for (DType q : {DType::f8_e4m3fn, DType::f8_e5m2}) {
    for (int kind : {kScaleTensor, kScaleRow, kScaleBlock128}) {
      specs.push_back(quantize_fp8_spec(x, q, kind, 16, false));
      specs.push_back(dequantize_fp8_spec(q, x, kind, 16));
    }
    specs.push_back(quantize_fp8_spec(x, q, kScaleTensor, 16, true));
    specs.push_back(quantize_fp8_group_spec(x, q, kScaleRow, 16));
    specs.push_back(quantize_fp8_group_spec(x, q, kScaleBlock128, 16));
    specs.push_back(finalize_scale_spec(q));
  }
  specs.push_back(amax_spec(x, 16));
  specs.push_back(quantize_q8_0_spec(x, 32));
  specs.push_back(dequantize_q8_0_spec(x, 32));
  return specs;
}

}  // namespace matmul_detail

void quantize_fp8(const TensorView& x, const TensorView& q, const TensorView& scale,
                  ScaleGranularity granularity, bool compute_scale, Stream stream) {
  using namespace matmul_detail;
  constexpr const char* kOp = "quantize_fp8";
  check_2d_float(kOp, "x", x);
  check::dims(kOp, "q", q, 2);
  check::dtype_in(kOp, "q", q, {DType::f8_e4m3fn, DType::f8_e5m2});
  check::shape(kOp, "q", q, x.shape(), "the shape of x");
  check::contiguous(kOp, "q", q);
  check::dtype_in(kOp, "scale", scale, {DType::f32});
  const std::int64_t R = x.size(0), C = x.size(1);
  const std::vector<std::int64_t> expected = scale_shape(granularity, R, C);
  check::dims(kOp, "scale", scale, int(expected.size()));
  check::shape(kOp, "scale", scale, expected,
               granularity == ScaleGranularity::tensor ? "per-tensor scale"
               : granularity == ScaleGranularity::row  ? "one scale per row of x"
                                                       : "one scale per 128x128 block of x");
  check::contiguous(kOp, "scale", scale);
  const Device device = check::common_device(kOp, {{"x", &x}, {"q", &q}, {"scale", &scale}});
  if (!compute_scale && device.type == DeviceType::cpu) check_scale_values(kOp, scale);
  if (x.numel() == 0) return;
  check::non_null(kOp, "x", x);
  check::non_null(kOp, "q", q);
  check::non_null(kOp, "scale", scale);
  check::no_overlap(kOp, "q", q, "x", x);
  check::no_overlap(kOp, "q", q, "scale", scale);
  if (compute_scale) check::no_overlap(kOp, "scale", scale, "x", x);
  if (device.type == DeviceType::cpu) {
    quantize_fp8_reference(x, q, scale, granularity, compute_scale);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);
  const int vec = x_vector_ok(x, 16) && aligned(q.data(), 16) && C % 16 == 0 ? 16 : 1;
  QuantizeParams p = params_of(x, q, static_cast<float*>(scale.data()));
  const int kind = kind_value(granularity);
  const std::int64_t chunks = R * C / vec;
  if (!compute_scale) {
    launch(quantize_fp8_spec(x.dtype(), q.dtype(), kind, vec, false), device.index,
           grid_for(chunks), p, stream, kOp);
  } else if (granularity == ScaleGranularity::tensor) {
    cuda::check(cudaMemsetAsync(scale.data(), 0, sizeof(float), static_cast<cudaStream_t>(stream)),
                kOp, "cudaMemsetAsync (amax)");
    launch(amax_spec(x.dtype(), vec), device.index, grid_for(chunks), p, stream, kOp);
    launch(quantize_fp8_spec(x.dtype(), q.dtype(), kind, vec, true), device.index, grid_for(chunks),
           p, stream, kOp);
    const auto kernel = jit::process_cache().kernel(finalize_scale_spec(q.dtype()), device.index);
    void* args[] = {&p};
    jit::launch(kOp, kernel, dim3(1), dim3(1), 0, stream, args);
  } else {
    const std::int64_t groups =
        granularity == ScaleGranularity::row ? R : ceil_div(R, kScaleBlock) * p.scale_cols;
    if (groups > INT_MAX) {
      check::fail(kOp, ErrorCode::unsupported,
                  "x has " + std::to_string(groups) + " scale groups, expected at most " +
                      std::to_string(INT_MAX) + " on CUDA (one block per group)");
    }
    launch(quantize_fp8_group_spec(x.dtype(), q.dtype(), kind, vec), device.index, groups, p,
           stream, kOp);
  }
}

void quantize_q8_0(const TensorView& x, const TensorView& q, Stream stream) {
  using namespace matmul_detail;
  constexpr const char* kOp = "quantize_q8_0";
  check_2d_float(kOp, "x", x);
  const std::int64_t R = x.size(0), C = x.size(1);
  if (C % kQ8Block != 0) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "x has " + std::to_string(C) + " columns (shape " + x.shape_str() +
                    "), expected a multiple of 32 (the Q8_0 block)");
  }
  check::dims(kOp, "q", q, 2);
  check::dtype_in(kOp, "q", q, {DType::u8});
  const std::int64_t expected[] = {R, C / kQ8Block * kQ8BlockBytes};
  check::shape(kOp, "q", q, expected, "[R, C / 32 * 34] Q8_0 blocks of x");
  check::contiguous(kOp, "q", q);
  const Device device = check::common_device(kOp, {{"x", &x}, {"q", &q}});
  if (x.numel() == 0) return;
  check::non_null(kOp, "x", x);
  check::non_null(kOp, "q", q);
  check::no_overlap(kOp, "q", q, "x", x);
  if (device.type == DeviceType::cpu) {
    quantize_q8_0_reference(x, q);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);
  if (!aligned(q.data(), 2)) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "q is not 2-byte aligned, expected Q8_0 blocks at even addresses (f16 d)");
  }
  const int vec = x_vector_ok(x, kQ8Block) ? kQ8Block : 1;
  QuantizeParams p = params_of(x, q, nullptr);
  launch(quantize_q8_0_spec(x.dtype(), vec), device.index, ceil_div(R * C / kQ8Block, kThreads), p,
         stream, kOp);
}

void dequantize(const TensorView& q, const std::optional<TensorView>& scale, const TensorView& out,
                Stream stream) {
  using namespace matmul_detail;
  constexpr const char* kOp = "dequantize";
  check::dims(kOp, "q", q, 2);
  check::dtype_in(kOp, "q", q, {DType::f8_e4m3fn, DType::f8_e5m2, DType::u8});
  check::contiguous(kOp, "q", q);
  check::dims(kOp, "out", out, 2);
  check::dtype_in(kOp, "out", out, kFloat);
  check::contiguous(kOp, "out", out);
  const bool q8 = q.dtype() == DType::u8;
  const std::int64_t R = q.size(0);
  std::int64_t C = q.size(1);
  if (q8) {
    if (C % kQ8BlockBytes != 0) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "q (u8, Q8_0 blocks) has " + std::to_string(C) +
                      " bytes a row, expected a multiple of 34");
    }
    C = C / kQ8BlockBytes * kQ8Block;
    if (scale) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "scale given for Q8_0 blocks, expected none (each block carries its d)");
    }
  }
  const std::int64_t expected[] = {R, C};
  check::shape(kOp, "out", out, expected, q8 ? "[R, bytes / 34 * 32]" : "the shape of q");
  ScaleKind kind = ScaleKind::none;
  if (scale) {
    check::dtype_in(kOp, "scale", *scale, {DType::f32});
    check::contiguous(kOp, "scale", *scale);
    kind = scale_kind(kOp, "scale", *scale, R, C, true);
  }
  const Device device =
      check::common_device(kOp, {{"q", &q}, {"scale", scale ? &*scale : nullptr}, {"out", &out}});
  if (out.numel() == 0) return;
  check::non_null(kOp, "q", q);
  check::non_null(kOp, "out", out);
  check::no_overlap(kOp, "out", out, "q", q);
  if (scale) {
    check::non_null(kOp, "scale", *scale);
    check::no_overlap(kOp, "out", out, "scale", *scale);
  }
  if (device.type == DeviceType::cpu) {
    dequantize_reference(q, scale, out);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);
  QuantizeParams p = params_of(out, out, scale ? static_cast<float*>(scale->data()) : nullptr);
  p.x = q.data();
  p.q = out.data();
  if (q8) {
    if (!aligned(q.data(), 2)) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "q is not 2-byte aligned, expected Q8_0 blocks at even addresses (f16 d)");
    }
    const int vec = aligned(out.data(), 16) ? kQ8Block : 1;
    launch(dequantize_q8_0_spec(out.dtype(), vec), device.index,
           ceil_div(R * C / kQ8Block, kThreads), p, stream, kOp);
    return;
  }
  const int vec = C % 16 == 0 && aligned(q.data(), 16) && aligned(out.data(), 16) ? 16 : 1;
  launch(dequantize_fp8_spec(q.dtype(), out.dtype(), int(kind), vec), device.index,
         grid_for(R * C / vec), p, stream, kOp);
}

}  // namespace kiln
