// The automatic path and prepared layout, by M, K, N, format, layout and architecture.
//
// Measured on an H200 (NOTES.md "Selection"; K 4096, N 14336, e4m3fn weight with per-channel
// scales, bf16 a and out; Q's GEMV as of this session):
//   M        1       2       4       8       12      16      17-32   48-64   96-128
//   gemv     0.0245  0.0278  0.0396  0.0624  0.0836  0.1251  -       -       -       ms
//   gemm     0.0553  0.0548  0.0550  0.0550  0.0549  0.0551  0.0555  0.0754  0.1360  ms
// so fp8 / f16 / bf16 weights take the GEMV up to M = kGemvUpToM (6, between the measured 4 and
// 8) and the GEMM above. Q8_0 row-major weights take the GEMV up to its limit (16): the GEMM
// gathers ggml's 2-byte-aligned blocks element by element (prepare_weight repacks them).
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
  constexpr std::int64_t kGemvUpToM = 6;
  if (m <= (format == WeightFormat::q8_0 || is_fp8(a_dtype) ? kGemvMaxM : kGemvUpToM)) {
    return MatmulPath::gemv;
  }
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
