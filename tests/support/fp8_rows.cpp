#include "support/fp8_rows.hpp"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "kiln/matmul.hpp"
#include "ops/matmul/matmul.hpp"

namespace kiln::test {

void expect_fp8_rows(CaseRun& r, const std::function<void(const TensorView& y32, Stream)>& run_f32,
                     const std::vector<double>& exact) {
  const Views& got = r.got();
  const TensorView out = got["out"];
  const DType format = out.dtype();
  const std::int64_t cols = out.size(out.dim() - 1);
  const std::int64_t rows = cols > 0 ? out.numel() / cols : 0;
  if (rows == 0 || cols == 0) return;
  const std::size_t n = std::size_t(rows * cols);
  const bool cuda = r.backend() == Backend::cuda;
  const Device device = cuda ? Device::cuda(0) : Device::cpu();

  // 1. The op into f32, then quantize_fp8 with per-row scales, on the same backend.
  HostBuffer y(n * 4), q(n), s(std::size_t(rows) * 4);
  std::optional<DeviceBuffer> dy, dq, ds;
  if (cuda) dy.emplace(n * 4), dq.emplace(n), ds.emplace(std::size_t(rows) * 4);
  void* y_data = cuda ? dy->data() : y.data();
  void* q_data = cuda ? dq->data() : q.data();
  void* s_data = cuda ? ds->data() : s.data();
  const TensorView y_rows(y_data, DType::f32, {rows, cols}, device);
  std::vector<std::int64_t> shape(out.shape().begin(), out.shape().end());
  run_f32(TensorView::contiguous(y_data, DType::f32, shape, device), r.stream());
  quantize_fp8(y_rows, TensorView(q_data, format, {rows, cols}, device),
               TensorView(s_data, DType::f32, {rows}, device), ScaleGranularity::row, true,
               r.stream());
  if (cuda) {
    ASSERT_EQ(cudaStreamSynchronize(static_cast<cudaStream_t>(r.stream())), cudaSuccess);
    dq->download(q.data(), n);
    ds->download(s.data(), std::size_t(rows) * 4);
  }
  const auto* codes = static_cast<const std::uint8_t*>(out.data());
  const auto* scales = static_cast<const float*>(got["out_scale"].data());
  const auto* want_codes = static_cast<const std::uint8_t*>(q.data());
  const auto* want_scales = static_cast<const float*>(s.data());
  for (std::int64_t i = 0; i < rows; ++i) {
    ASSERT_EQ(std::memcmp(&scales[i], &want_scales[i], 4), 0)
        << "row " << i << ": scale " << scales[i] << ", quantize_fp8 of the f32 result gives "
        << want_scales[i];
    ASSERT_GT(scales[i], 0.f) << "row " << i;
  }
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_EQ(codes[i], want_codes[i])
        << "element " << i << ": code differs from quantize_fp8 of the f32 result";
  }

  // 2. Against the oracle.
  const bool e4m3 = format == DType::f8_e4m3fn;
  const double rel = (e4m3 ? 0x1p-4 : 0x1p-3) + 1e-5, sub = e4m3 ? 0x1p-10 : 0x1p-17;
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const std::size_t e = std::size_t(i * cols + c);
      const double v = double(matmul_detail::fp8_to_float(codes[e], format)) * scales[i];
      ASSERT_LE(std::fabs(v - exact[e]), rel * std::fabs(exact[e]) + sub * scales[i])
          << "row " << i << ", column " << c << ": " << v << " against " << exact[e];
    }
  }
}

}  // namespace kiln::test
