// The automatic path and prepared layout, by M, K, N, format, layout and architecture.
//
// Measured on an H200 (NOTES.md "GEMV v2"; bf16 a and out, ms; gemm = the mma.sync GEMM):
//   e4m3 row-scaled   M      1       2       4       8       12      16
//     4096 x 14336    gemv   0.0215  0.0216  0.0257  0.0268  0.0336  0.0346
//                     gemm   0.0534  0.0534  0.0533  0.0533  0.0535  0.0533
//     14336 x 4096    gemv   0.0251  0.0256  0.0274  0.0280  0.0308  0.0313
//                     gemm   0.1681  0.1685  0.1685  0.1686  0.1687  0.1682
// (4096 x 4096 and 3072 x 9216 alike; bf16 weights at M = 16: 0.039 against 0.042 at
// 4096 x 14336, 0.045 against 0.128 at 14336 x 4096), so every M <= kGemvMaxM (16) takes the GEMV
// where its tensor-core kernel runs: f16 / bf16 a with an fp8 weight, a 16-bit weight of a's type,
// or Q8_0. f32 a, and a 16-bit weight of the other type, run its CUDA-core kernel, which lost to
// the GEMM above M = 6 (K 4096, N 14336: M 4 0.0396, 8 0.0624 against 0.055): gemv up to
// kGemvCudaCoreUpToM there. Q8_0 row-major weights take the GEMV up to 16 in every case: the
// GEMM gathers ggml's 2-byte-aligned blocks element by element (0.249 ms at 16 x 4096 x 14336).
// fp8 a on sm_89+: fp8_native (cuBLASLt) at every M wherever K, N % 16 == 0 (M 128, K 4096,
// N 4096: 0.054 ms against 0.074 for the GEMM; at M = 4608 0.24 ms against 1.56; at M = 1 to 4
// the GEMV, which decodes fp8 a on the CUDA cores, took 0.018-0.118 ms where torch._scaled_mm's
// cuBLASLt call took 0.009-0.021 (kiln bench matmul, H200)).
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
// large-M form of an fp8 or Q8_0 weight (NOTES.md "GEMM vs cuBLAS": 705-741 TFLOP/s at Flux.2's
// M = 4608 linears, where the mma.sync GEMM reaches 158-169); elsewhere (sm_80, not measured here)
// the packed layout, which keeps one byte a weight and feeds the mma.sync GEMM.
WeightLayout prepared_layout_cuda(WeightFormat format, const std::string& arch) {
  if (format == WeightFormat::f16 || format == WeightFormat::bf16) return WeightLayout::row_major;
  if (arch_number(arch) >= 90) return WeightLayout::dequantized;
  return WeightLayout::gemm_packed;
}

}  // namespace kiln::matmul_detail
