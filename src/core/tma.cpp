#include "core/tma.hpp"

#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "core/check.hpp"

namespace kiln::tma {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
using EncodeIm2col = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                  const cuuint64_t*, const cuuint64_t*, const int*, const int*,
                                  cuuint32_t, cuuint32_t, const cuuint32_t*, CUtensorMapInterleave,
                                  CUtensorMapSwizzle, CUtensorMapL2promotion,
                                  CUtensorMapFloatOOBfill);

void* driver_entry(const char* op, const char* symbol) {
  void* entry = nullptr;
  cudaDriverEntryPointQueryResult found{};
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(symbol, &entry, 12000, cudaEnableDefault, &found);
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || entry == nullptr) {
    check::fail(op, ErrorCode::unsupported,
                std::string("the CUDA driver does not provide ") + symbol + " (" +
                    cudaGetErrorString(err) + ")");
  }
  return entry;
}

CUtensorMapDataType data_type(const char* op, const char* arg, DType dtype) {
  if (dtype == DType::bf16) return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  if (dtype == DType::f16) return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  if (dtype == DType::u8 || dtype == DType::f8_e4m3fn || dtype == DType::f8_e5m2) {
    return CU_TENSOR_MAP_DATA_TYPE_UINT8;
  }
  check::fail(op, ErrorCode::unsupported,
              std::string(arg) + " has dtype " + dtype_name(dtype) +
                  ", TMA maps take f16, bf16 or bytes (u8, fp8)");
}

void check_result(const char* op, const char* arg, CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) {
    check::fail(op, ErrorCode::invalid_argument,
                std::string(what) + " rejected the layout of " + arg + " (CUresult " +
                    std::to_string(int(r)) + ")");
  }
}

}  // namespace

TensorMapBytes tiled(const char* op, const char* arg, DType dtype, const void* base,
                     std::span<const std::uint64_t> dims, std::span<const std::uint64_t> strides,
                     std::span<const std::uint32_t> box) {
  static const auto encode =
      reinterpret_cast<EncodeTiled>(driver_entry(op, "cuTensorMapEncodeTiled"));
  const std::size_t rank = dims.size();
  cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const std::size_t row_bytes = box[0] * dtype_size(dtype);
  if (row_bytes != 128 && row_bytes != 64 && row_bytes != 32) {
    check::fail(op, ErrorCode::invalid_argument,
                std::string("a TMA box row of ") + arg + " has " + std::to_string(row_bytes) +
                    " bytes, expected 32, 64 or 128 (the swizzle span)");
  }
  const CUtensorMapSwizzle swizzle = row_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : row_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                       : CU_TENSOR_MAP_SWIZZLE_32B;
  TensorMapBytes map{};
  check_result(op, arg,
               encode(reinterpret_cast<CUtensorMap*>(&map), data_type(op, arg, dtype),
                      cuuint32_t(rank), const_cast<void*>(base), dims.data(), strides.data(),
                      box.data(), element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               "cuTensorMapEncodeTiled");
  return map;
}

TensorMapBytes im2col(const char* op, const char* arg, DType dtype, const void* base,
                      std::span<const std::uint64_t, 4> dims,
                      std::span<const std::uint64_t, 3> strides, int channels, int pixels,
                      int kernel, int stride, int pad, int dilation) {
  static const auto encode =
      reinterpret_cast<EncodeIm2col>(driver_entry(op, "cuTensorMapEncodeIm2col"));
  // Corners of the window's top-left tap: from -pad to (extent - 1) + pad - dilation (kernel - 1).
  const int lower[2] = {-pad, -pad};
  const int upper[2] = {pad - dilation * (kernel - 1), pad - dilation * (kernel - 1)};
  const cuuint32_t traversal[4] = {1, cuuint32_t(stride), cuuint32_t(stride), 1};
  TensorMapBytes map{};
  check_result(op, arg,
               encode(reinterpret_cast<CUtensorMap*>(&map), data_type(op, arg, dtype), 4,
                      const_cast<void*>(base), dims.data(), strides.data(), lower, upper,
                      cuuint32_t(channels), cuuint32_t(pixels), traversal,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               "cuTensorMapEncodeIm2col");
  return map;
}

bool compatible(const TensorView& t, int inner) {
  const std::int64_t bytes = std::int64_t(dtype_size(t.dtype()));
  if (reinterpret_cast<std::uintptr_t>(t.data()) % 16 != 0) return false;
  if (t.stride(inner) != 1) return false;
  for (int i = 0; i < t.dim(); ++i) {
    if (i == inner) continue;
    const std::int64_t stride = t.stride(i) * bytes;
    if (t.size(i) > 1 && (stride <= 0 || stride % 16 != 0 || stride >= (std::int64_t(1) << 40))) {
      return false;
    }
  }
  return true;
}

}  // namespace kiln::tma
