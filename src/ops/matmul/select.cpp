// The automatic path and prepared layout, by M, K, N, format, layout and architecture.
//
// Measured on the GPU (NOTES.md "Selection" and "GEMV v2"; dev/matmul/paths.py reruns the
// comparison): the GEMV's tensor-core kernel beat the mma.sync GEMM at every M <= 16 on every
// shape measured, so every M <= kGemvMaxM (16) takes the GEMV where that kernel runs: f16 / bf16 a
// with an fp8 weight, a 16-bit weight of a's type, or Q8_0. f32 a, and a 16-bit weight of the
// other type, run its CUDA-core kernel, which lost to the GEMM above M = 6: gemv up to
// kGemvCudaCoreUpToM there. Q8_0 row-major weights take the GEMV up to 16 in every case: the
// GEMM gathers ggml's 2-byte-aligned blocks element by element. fp8 a on sm_89+: fp8_native
// (cuBLASLt) at every M wherever K, N % 16 == 0: faster than the GEMM at M >= 128, and at M <= 4
// faster than the GEMV, which decodes fp8 a on the CUDA cores.
// Prepared layouts: the GEMM (which hands a dequantized copy to cuBLASLt, see launch_gemm.cpp).
#include <cstdint>
#include <string>

#include "ops/matmul/matmul.hpp"
#include "ops/matmul/select.hpp"

namespace kiln::matmul_detail {
int arch_number(const std::string& arch) {
  int value = 0;
  for (char c : arch) {
    if (c >= '0' && c <= '9') value = value * 10 + (c - '0');
  }
  return value;
}

MatmulPath select_path_cuda(std::int64_t m, std::int64_t n, std::int64_t k, WeightFormat format,
                            WeightLayout layout, DType a_dtype, const std::string& arch) {
  if (layout != WeightLayout::row_major) return MatmulPath::gemm;
  const bool fp8_pair = is_fp8(a_dtype) && is_fp8(format) &&
                        !(a_dtype == DType::f8_e5m2 && format == WeightFormat::f8_e5m2);
  if (fp8_pair && arch_number(arch) >= 89 && n % 16 == 0 && k % 16 == 0) {
    return MatmulPath::fp8_native;
  }
  constexpr std::int64_t kGemvCudaCoreUpToM = 6;
  const bool a16 = a_dtype == DType::f16 || a_dtype == DType::bf16;
  const bool tensor_core_gemv =
      a16 && (is_fp8(format) || format == WeightFormat::q8_0 || storage_dtype(format) == a_dtype);
  const bool gemv_to_max = tensor_core_gemv || format == WeightFormat::q8_0 || is_fp8(a_dtype);
  if (m <= (gemv_to_max ? kGemvMaxM : kGemvCudaCoreUpToM)) return MatmulPath::gemv;
  return MatmulPath::gemm;
}

// Prepared layout: on sm_90 the dequantized bf16 copy, multiplied by cuBLASLt, is the fastest
// large-M form of an fp8 or Q8_0 weight (NOTES.md "GEMM vs cuBLAS": at cuBLAS bf16's rate, ahead
// of the mma.sync GEMM and the wgmma GEMM); elsewhere (sm_80, not measured) the packed layout,
// which keeps one byte a weight and feeds the mma.sync GEMM.
WeightLayout prepared_layout_cuda(WeightFormat format, const std::string& arch) {
  if (format == WeightFormat::f16 || format == WeightFormat::bf16) return WeightLayout::row_major;
  if (arch_number(arch) >= 90) return WeightLayout::dequantized;
  return WeightLayout::gemm_packed;
}

}  // namespace kiln::matmul_detail
