// conv2d on Hopper: when the sm_90a implicit GEMM (implicit_gemm_sm90.cuh) takes a call, its TMA
// maps, its specializations and its launch.
#include <algorithm>
#include <cstdint>
#include <string>

#include "core/check.hpp"
#include "core/tma.hpp"
#include "jit/kernel_cache.hpp"
#include "kiln/device.hpp"
#include "ops/conv2d/conv2d.hpp"
#include "ops/conv2d/kernels/implicit_gemm_sm90_params.cuh"

namespace kiln::conv2d_detail {
namespace {

constexpr const char* kOp = "conv2d";
constexpr const char* kSource = "ops/conv2d/kernels/implicit_gemm_sm90.cuh";
constexpr int kBlockM = 128;
constexpr int kBlockK = 64;
constexpr int kThreads = 384;

// Ring depth by output channels per tile (sm90_block_n). Measured on an H200 (bf16, 3x3): 256
// channels with 3 stages is best where OC allows (512 @ 256^2: 704 TFLOP/s, 689 with 4 stages, 625
// at 128 channels); OC = 128 takes 128 with 4 stages (128 @ 1024^2: 538, 523 with 6).
int stages(int bn) { return bn == 256 ? 3 : 4; }

int smem_bytes(int bn) {
  return stages(bn) * (kBlockM + bn) * kBlockK * 2 + 1024 + 16 * stages(bn);
}

}  // namespace

int sm90_block_n(std::int64_t oc) { return oc % 256 == 0 ? 256 : 128; }

jit::KernelSpec sm90_spec(DType t, DType bias, DType out, int bn, bool has_bias) {
  jit::KernelSpec spec{kSource,
                       "kiln::implicit_gemm_conv2d_sm90",
                       {{"T", jit::cpp_type(kOp, t)},
                        {"TB", jit::cpp_type(kOp, bias)},
                        {"TO", jit::cpp_type(kOp, out)},
                        {"BN", std::to_string(bn)},
                        {"STAGES", std::to_string(stages(bn))},
                        {"HAS_BIAS", has_bias ? "true" : "false"}}};
  spec.archs = {"sm_90a"};
  return spec;
}

bool sm90_takes(const Problem& p, const TensorView& x, const TensorView& w, const TensorView& out) {
  if (cuda_arch(x.device().index) != "sm_90a") return false;
  const Conv2dOptions& o = p.options;
  const bool square = p.KH == p.KW && o.stride[0] == o.stride[1] && o.padding[0] == o.padding[1] &&
                      o.dilation[0] == o.dilation[1];
  // The im2col map's window corners are 8-bit offsets; its traversal stride is at most 8.
  const std::int64_t upper = o.padding[0] - o.dilation[0] * (p.KH - 1);
  const bool corners = o.padding[0] <= 127 && upper >= -128 && o.stride[0] <= 8;
  const bool dtypes =
      (x.dtype() == DType::bf16 || x.dtype() == DType::f16) && w.dtype() == x.dtype();
  // w [OC, C, KH, KW] stored OHWI: k = (kh, kw, c) contiguous.
  const bool w_ohwi = w.stride(1) == 1 && w.stride(3) == p.C && w.stride(2) == p.KW * p.C;
  const bool out_nhwc = out.stride(1) == 1 && out.stride(3) == p.OC &&
                        out.stride(2) == p.OW * p.OC && out.stride(0) == p.OH * p.OW * p.OC;
  return square && corners && dtypes && w_ohwi && out_nhwc && p.C % 8 == 0 && p.OC % 128 == 0 &&
         tma::compatible(x, 1) && tma::compatible(w, 1) && p.N * p.OH * p.OW < (1LL << 31);
}

void launch_sm90(const Problem& p, const TensorView& x, const TensorView& w,
                 const std::optional<TensorView>& bias, const TensorView& out, int sm_count,
                 Stream stream) {
  const Conv2dOptions& o = p.options;
  const int bn = sm90_block_n(p.OC);
  const std::uint64_t bytes = dtype_size(x.dtype());
  Conv2dSm90Params params{};
  {
    const std::uint64_t dims[4] = {std::uint64_t(p.C), std::uint64_t(p.W), std::uint64_t(p.H),
                                   std::uint64_t(p.N)};
    const std::uint64_t strides[3] = {x.stride(3) * bytes, x.stride(2) * bytes,
                                      x.stride(0) * bytes};
    params.map_x = tma::im2col(kOp, "x", x.dtype(), x.data(), dims, strides, kBlockK, kBlockM,
                               int(p.KH), int(o.stride[0]), int(o.padding[0]), int(o.dilation[0]));
  }
  {
    const std::uint64_t dims[2] = {std::uint64_t(p.KH * p.KW * p.C), std::uint64_t(p.OC)};
    const std::uint64_t strides[1] = {w.stride(0) * bytes};
    const std::uint32_t box[2] = {kBlockK, std::uint32_t(bn)};
    params.map_w = tma::tiled(kOp, "w", w.dtype(), w.data(), dims, strides, box);
  }
  params.bias = bias ? bias->data() : nullptr;
  params.bias_stride = bias ? bias->stride(0) : 0;
  params.out = out.data();
  params.M = int(p.N * p.OH * p.OW);
  params.OC = int(p.OC);
  params.OH = int(p.OH);
  params.OW = int(p.OW);
  params.C = int(p.C);
  params.KH = int(p.KH);
  params.KW = int(p.KW);
  params.stride = int(o.stride[0]);
  params.pad = int(o.padding[0]);
  params.dilation = int(o.dilation[0]);

  const jit::KernelSpec spec =
      sm90_spec(x.dtype(), bias ? bias->dtype() : DType::f32, out.dtype(), bn, bias.has_value());
  const auto kernel = jit::process_cache().kernel(spec, x.device().index);
  const std::int64_t tiles = (p.N * p.OH * p.OW + kBlockM - 1) / kBlockM * (p.OC / bn);
  void* args[] = {&params};
  jit::launch(kOp, kernel, dim3(unsigned(std::min<std::int64_t>(tiles, sm_count))), dim3(kThreads),
              std::size_t(smem_bytes(bn)), stream, args);
}

}  // namespace kiln::conv2d_detail
