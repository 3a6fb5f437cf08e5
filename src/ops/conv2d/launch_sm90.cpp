// conv2d on Hopper: when the sm_90a implicit GEMM (implicit_gemm_sm90.cuh) takes a call and in
// which layout, its TMA maps, its weight repack, its specializations and its launch.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
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

// Ring depth by output channels per tile (sm90_block_n): 256 channels with 3 stages is the best
// measured where OC allows (ahead of 4 stages and of 128 channels); OC = 128 takes 128 channels
// with 4 stages (ahead of 6). NOTES.md, "sm_90a implicit GEMM".
int stages(int bn) { return bn == 256 ? 3 : 4; }

int smem_bytes(int bn) {
  return stages(bn) * (kBlockM + bn) * kBlockK * 2 + 1024 + 16 * stages(bn);
}

}  // namespace

int sm90_block_n(std::int64_t oc) { return oc % 256 == 0 ? 256 : 128; }

jit::KernelSpec sm90_spec(DType t, DType bias, DType out, int bn, bool has_bias, bool out_nchw,
                          bool a_mn_major) {
  jit::KernelSpec spec{kSource,
                       "kiln::implicit_gemm_conv2d_sm90",
                       {{"T", jit::cpp_type(kOp, t)},
                        {"TB", jit::cpp_type(kOp, bias)},
                        {"TO", jit::cpp_type(kOp, out)},
                        {"BN", std::to_string(bn)},
                        {"STAGES", std::to_string(stages(bn))},
                        {"HAS_BIAS", jit::cpp_bool(has_bias)},
                        {"OUT_NCHW", jit::cpp_bool(out_nchw)},
                        {"A_MN_MAJOR", jit::cpp_bool(a_mn_major)}}};
  spec.archs = {"sm_90a"};
  return spec;
}

jit::KernelSpec sm90_copy_spec(DType t, bool weight, bool vec) {
  jit::KernelSpec spec{kSource, "kiln::conv2d_w_ohwi", {{"T", jit::cpp_type(kOp, t)}}};
  if (!weight) {
    spec.kernel = "kiln::conv2d_x_nhwc";
    spec.params.emplace_back("VEC", jit::cpp_bool(vec));
  }
  spec.archs = {"sm_90a"};
  return spec;
}

std::optional<Sm90Layout> sm90_layout(const Problem& p, const TensorView& x, const TensorView& w,
                                      const TensorView& out) {
  if (cuda_arch(x.device().index) != "sm_90a") return std::nullopt;
  const Conv2dOptions& o = p.options;
  const bool square = p.KH == p.KW && o.stride[0] == o.stride[1] && o.padding[0] == o.padding[1] &&
                      o.dilation[0] == o.dilation[1];
  // The im2col map's window corners are 8-bit offsets; its traversal stride is at most 8.
  const std::int64_t upper = o.padding[0] - o.dilation[0] * (p.KH - 1);
  const bool corners = o.padding[0] <= 127 && upper >= -128 && o.stride[0] <= 8;
  const bool dtypes =
      (x.dtype() == DType::bf16 || x.dtype() == DType::f16) && w.dtype() == x.dtype();
  const bool out_nhwc = out.stride(1) == 1 && out.stride(3) == p.OC &&
                        out.stride(2) == p.OW * p.OC && out.stride(0) == p.OH * p.OW * p.OC;
  if (!square || !corners || !dtypes || (!out_nhwc && out.stride(3) != 1) || p.C % 8 != 0 ||
      p.OC % 128 != 0 || p.N * p.OH * p.OW >= (1LL << 31) || p.H > 65535 ||
      p.N * ((p.C + 63) / 64) > 65535) {
    return std::nullopt;
  }
  Sm90Layout layout;
  // A 1x1 conv of an NCHW x with flat (H W) pixels reads x in place, pixel-contiguous.
  layout.a_mn_major = p.KH == 1 && p.KW == 1 && o.stride[0] == 1 && o.padding[0] == 0 &&
                      !tma::compatible(x, 1) && tma::compatible(x, 3) &&
                      (p.H == 1 || x.stride(2) == p.W);
  layout.x_copy = !tma::compatible(x, 1) && !layout.a_mn_major;
  layout.w_copy = !(w.stride(1) == 1 && w.stride(3) == p.C && w.stride(2) == p.KW * p.C &&
                    tma::compatible(w, 1));
  layout.out_nchw = !out_nhwc;
  return layout;
}

namespace {

// Launches conv2d_x_nhwc or conv2d_w_ohwi: src [N, C, H, W] (any strides) into dst, contiguous
// [N, H, W, C].
void copy_channels_last(bool weight, const TensorView& src, void* dst, Stream stream) {
  Conv2dCopyParams params{};
  params.src = src.data();
  params.dst = dst;
  std::copy_n(src.strides().begin(), 4, params.src_stride);
  params.N = int(src.size(0)), params.C = int(src.size(1));
  params.H = int(src.size(2)), params.W = int(src.size(3));
  // 16-byte loads of 8 pixels: unit W stride, 16-byte-aligned rows, whole chunks in a row.
  const bool vec = src.stride(3) == 1 && src.stride(2) % 8 == 0 && src.stride(1) % 8 == 0 &&
                   src.stride(0) % 8 == 0 && src.size(3) % 8 == 0 && aligned(src.data(), 16);
  const auto kernel =
      jit::process_cache().kernel(sm90_copy_spec(src.dtype(), weight, vec), src.device().index);
  void* args[] = {&params};
  const dim3 grid = weight ? dim3(unsigned(src.size(0)))
                           : dim3(unsigned((src.size(3) + 63) / 64), unsigned(src.size(2)),
                                  unsigned(src.size(0) * ((src.size(1) + 63) / 64)));
  jit::launch(kOp, kernel, grid, dim3(256), 0, stream, args);
}

}  // namespace

void launch_sm90(const Sm90Layout& layout, const Problem& p, const TensorView& x,
                 const TensorView& w, const std::optional<TensorView>& bias, const TensorView& out,
                 int sm_count, Stream stream) {
  const Conv2dOptions& o = p.options;
  const int bn = sm90_block_n(p.OC);
  const std::uint64_t bytes = dtype_size(x.dtype());
  const std::int64_t k = p.KH * p.KW * p.C;
  const int device = x.device().index;
  Conv2dSm90Params params{};

  // x as TMA im2col reads it: in place when channels-last, else a channels-last copy in a
  // workspace of x's size (the NCHW case: 16-256 MiB for the Flux VAE decoder at 1024^2, bf16).
  std::optional<cuda::StreamScratch> x_copy;
  {
    const void* base = x.data();
    std::uint64_t strides[3] = {x.stride(3) * bytes, x.stride(2) * bytes, x.stride(0) * bytes};
    if (layout.x_copy) {
      x_copy.emplace(kOp, device, std::size_t(p.N * p.H * p.W * p.C) * bytes, stream);
      copy_channels_last(false, x, x_copy->get(), stream);
      base = x_copy->get();
      strides[0] = std::uint64_t(p.C) * bytes;
      strides[1] = std::uint64_t(p.W * p.C) * bytes;
      strides[2] = std::uint64_t(p.H * p.W * p.C) * bytes;
    }
    if (layout.a_mn_major) {  // (H W, C, N), boxes of 64 pixels x 64 channels
      const std::uint64_t dims[3] = {std::uint64_t(p.H * p.W), std::uint64_t(p.C),
                                     std::uint64_t(p.N)};
      const std::uint64_t pixel_strides[2] = {x.stride(1) * bytes, x.stride(0) * bytes};
      const std::uint32_t box[3] = {kBlockM / 2, kBlockK, 1};
      params.map_x = tma::tiled(kOp, "x", x.dtype(), base, dims, pixel_strides, box);
    } else {
      const std::uint64_t dims[4] = {std::uint64_t(p.C), std::uint64_t(p.W), std::uint64_t(p.H),
                                     std::uint64_t(p.N)};
      params.map_x =
          tma::im2col(kOp, "x", x.dtype(), base, dims, strides, kBlockK, kBlockM, int(p.KH),
                      int(o.stride[0]), int(o.padding[0]), int(o.dilation[0]));
    }
  }
  // w as [OC, K] rows of (kh, kw, c): in place when stored OHWI, else an OHWI copy in a workspace
  // of w's size (4.5 MiB for the largest Flux VAE conv, 512 -> 512 3x3 bf16).
  std::optional<cuda::StreamScratch> w_copy;
  {
    const void* base = w.data();
    std::uint64_t row_stride = w.stride(0) * bytes;
    if (layout.w_copy) {
      w_copy.emplace(kOp, device, std::size_t(p.OC * k) * bytes, stream);
      copy_channels_last(true, w, w_copy->get(), stream);
      base = w_copy->get();
      row_stride = std::uint64_t(k) * bytes;
    }
    const std::uint64_t dims[2] = {std::uint64_t(k), std::uint64_t(p.OC)};
    const std::uint64_t strides[1] = {row_stride};
    const std::uint32_t box[2] = {kBlockK, std::uint32_t(bn)};
    params.map_w = tma::tiled(kOp, "w", w.dtype(), base, dims, strides, box);
  }
  params.bias = bias ? bias->data() : nullptr;
  params.bias_stride = bias ? bias->stride(0) : 0;
  params.out = out.data();
  params.out_stride[0] = out.stride(0);
  params.out_stride[1] = out.stride(1);
  params.out_stride[2] = out.stride(2);
  params.M = int(p.N * p.OH * p.OW);
  params.N = int(p.N);
  params.OC = int(p.OC);
  params.OH = int(p.OH);
  params.OW = int(p.OW);
  params.C = int(p.C);
  params.KH = int(p.KH);
  params.KW = int(p.KW);
  params.stride = int(o.stride[0]);
  params.pad = int(o.padding[0]);
  params.dilation = int(o.dilation[0]);

  const jit::KernelSpec spec = sm90_spec(x.dtype(), bias ? bias->dtype() : DType::f32, out.dtype(),
                                         bn, bias.has_value(), layout.out_nchw, layout.a_mn_major);
  const auto kernel = jit::process_cache().kernel(spec, device);
  const std::int64_t m_tiles = layout.a_mn_major ? p.N * ((p.OH * p.OW + kBlockM - 1) / kBlockM)
                                                 : (p.N * p.OH * p.OW + kBlockM - 1) / kBlockM;
  const std::int64_t tiles = m_tiles * (p.OC / bn);
  void* args[] = {&params};
  jit::launch(kOp, kernel, dim3(unsigned(std::min<std::int64_t>(tiles, sm_count))), dim3(kThreads),
              std::size_t(smem_bytes(bn)), stream, args);
}

}  // namespace kiln::conv2d_detail
