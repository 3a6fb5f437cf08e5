// prepare_weight / prepared_weight_bytes: one-time repacks of a weight into caller-owned memory.
//
//   gemm         gemm_packed: rows padded to 16 bytes (fp8 / f16 / bf16: one cudaMemcpy2D), or
//                Q8_0 split into int8 [N, K] + an f32 scale table (pack_q8_0), so that the GEMM
//                copies every tile with 16-byte cp.async instead of gathering ggml's 2-byte-aligned
//                blocks.
//   automatic    the layout the large-M path reads fastest on this device (select.cpp has the
//                measured choice): the dequantized bf16 copy that cuBLASLt multiplies, or
//                gemm_packed.
//   gemv,        the row-major weight itself (these paths read the checkpoint layout at full
//   fp8_native   speed): a plain copy.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "jit/kernel_cache.hpp"
#include "kiln/device.hpp"
#include "ops/matmul/gemm.hpp"
#include "ops/matmul/kernels/gemm_params.cuh"
#include "ops/matmul/matmul.hpp"
#include "ops/matmul/select.hpp"

namespace kiln {
namespace {

using namespace matmul_detail;

constexpr const char* kOp = "prepare_weight";

bool sixteen_bit(WeightFormat format) {
  return format == WeightFormat::f16 || format == WeightFormat::bf16;
}

// The layout `path` asks for on the weight's device.
WeightLayout target_layout(const Weight& w, MatmulPath path) {
  switch (path) {
    case MatmulPath::gemm:
      return WeightLayout::gemm_packed;
    case MatmulPath::automatic:
      if (w.data.device().type != DeviceType::cuda) return WeightLayout::row_major;
      return prepared_layout_cuda(w.format, cuda_arch(w.data.device().index));
    case MatmulPath::gemv:
    case MatmulPath::fp8_native:
    case MatmulPath::reference:
      return WeightLayout::row_major;
  }
  return WeightLayout::row_major;
}

std::int64_t row_major_bytes(const Weight& w) { return w.n * weight_row_bytes(w.format, w.k); }

std::size_t layout_bytes(const Weight& w, WeightLayout layout) {
  switch (layout) {
    case WeightLayout::row_major:
      return std::size_t(row_major_bytes(w));
    case WeightLayout::dequantized:
      return std::size_t(w.n * w.k * 2);
    case WeightLayout::gemm_packed:
      if (w.format == WeightFormat::q8_0) {
        const std::int64_t tiles = (w.k + kGemmTileK - 1) / kGemmTileK;
        return std::size_t(packed_q8_scale_offset(w.n, w.k) +
                           tiles * 2 * packed_q8_n_pad(w.n) * std::int64_t(sizeof(float)));
      }
      return std::size_t(w.n * packed_row_bytes(w.format, w.k));
  }
  return 0;
}

void check_source(const Weight& w) {
  validate_weight(kOp, w);
  if (w.layout != WeightLayout::row_major) {
    check::fail(kOp, ErrorCode::invalid_argument,
                std::string("w has layout ") + weight_layout_name(w.layout) +
                    ", expected row_major (prepare the checkpoint's weight once)");
  }
}

}  // namespace

std::size_t prepared_weight_bytes(const Weight& w, MatmulPath path) {
  check_source(w);
  return layout_bytes(w, target_layout(w, path));
}

Weight prepare_weight(const Weight& w, MatmulPath path, const TensorView& storage, Stream stream) {
  check_source(w);
  const WeightLayout layout = target_layout(w, path);
  const std::size_t bytes = layout_bytes(w, layout);
  check::dtype_in(kOp, "storage", storage, {DType::u8});
  check::contiguous(kOp, "storage", storage);
  check::non_null(kOp, "storage", storage);
  if (std::size_t(storage.numel()) < bytes) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "storage has " + std::to_string(storage.numel()) + " bytes, expected at least " +
                    std::to_string(bytes) + " (prepared_weight_bytes for layout " +
                    weight_layout_name(layout) + ")");
  }
  if (!(storage.device() == w.data.device())) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "storage is on " + storage.device().str() + ", expected w's device " +
                    w.data.device().str());
  }
  check::no_overlap(kOp, "storage", storage, "w", w.data);
  if (layout != WeightLayout::row_major && !aligned(storage.data(), 16)) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "storage must start at a 16-byte boundary for layout " +
                    std::string(weight_layout_name(layout)));
  }

  Weight out = w;
  out.layout = layout;
  const bool cuda = storage.device().type == DeviceType::cuda;
  if (layout == WeightLayout::row_major) {
    out.data = TensorView(storage.data(), w.data.dtype(), w.data.shape(), w.data.strides(),
                          storage.device());
    if (!cuda) {
      std::memcpy(storage.data(), w.data.data(), bytes);
      return out;
    }
  } else if (!cuda) {
    check::fail(kOp, ErrorCode::unsupported,
                std::string("layout ") + weight_layout_name(layout) +
                    " is for CUDA weights; w is on " + w.data.device().str());
  }
  cuda::require_device(kOp, storage.device());
  cuda::DeviceGuard guard(kOp, storage.device().index);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);

  switch (layout) {
    case WeightLayout::row_major:
      cuda::check(
          cudaMemcpyAsync(storage.data(), w.data.data(), bytes, cudaMemcpyDeviceToDevice, s), kOp,
          "cudaMemcpyAsync");
      break;
    case WeightLayout::dequantized: {
      if (sixteen_bit(w.format)) {
        check::fail(kOp, ErrorCode::invalid_argument,
                    std::string("w is ") + weight_format_name(w.format) +
                        " already; the dequantized layout is for fp8 and Q8_0 weights");
      }
      dequantize(w.data, w.scale,
                 TensorView(storage.data(), DType::bf16, {w.n, w.k}, storage.device()), stream);
      out.data = TensorView(storage.data(), DType::u8, {std::int64_t(bytes)}, storage.device());
      out.scale.reset();
      break;
    }
    case WeightLayout::gemm_packed: {
      out.data = TensorView(storage.data(), DType::u8, {std::int64_t(bytes)}, storage.device());
      cuda::check(cudaMemsetAsync(storage.data(), 0, bytes, s), kOp, "cudaMemsetAsync");
      if (w.format == WeightFormat::q8_0) {
        auto* base = static_cast<unsigned char*>(storage.data());
        PackQ8Params params{};
        params.src = static_cast<const unsigned char*>(w.data.data());
        params.qs = reinterpret_cast<signed char*>(base);
        params.d = reinterpret_cast<float*>(base + packed_q8_scale_offset(w.n, w.k));
        params.src_stride = weight_row_bytes(w.format, w.k);
        params.n = w.n;
        params.k = w.k;
        params.n_pad = packed_q8_n_pad(w.n);
        const std::int64_t blocks = w.n * (w.k / 32);
        if (blocks > 0) {
          constexpr int kBlock = 256;
          const auto kernel = jit::process_cache().kernel(
              {"ops/matmul/kernels/prepare.cuh", "kiln::pack_q8_0", {}}, storage.device().index);
          void* args[] = {&params};
          jit::launch(kOp, kernel, dim3(unsigned((blocks + kBlock - 1) / kBlock)), dim3(kBlock), 0,
                      stream, args);
        }
      } else {
        const std::size_t row = std::size_t(weight_row_bytes(w.format, w.k));
        const std::size_t pitch = std::size_t(packed_row_bytes(w.format, w.k));
        if (w.n > 0 && row > 0) {
          cuda::check(cudaMemcpy2DAsync(storage.data(), pitch, w.data.data(), row, row,
                                        std::size_t(w.n), cudaMemcpyDeviceToDevice, s),
                      kOp, "cudaMemcpy2DAsync");
        }
      }
      break;
    }
  }
  return out;
}

}  // namespace kiln
