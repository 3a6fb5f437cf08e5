// conv2d: argument checks, dispatch by device, the kernel plan and its launch.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <utility>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "ops/conv2d/conv2d.hpp"
#include "ops/conv2d/kernels/params.cuh"

namespace kiln {
namespace conv2d_detail {
namespace {

constexpr const char* kOp = "conv2d";
constexpr const char* kSource = "ops/conv2d/kernels/implicit_gemm.cuh";
// The direct kernel for few output channels (direct.cuh): up to 16 of them, 8 input channels a
// chunk, 128 threads of 4 output pixels a block.
constexpr const char* kDirectSource = "ops/conv2d/kernels/direct.cuh";
constexpr std::int64_t kDirectMaxOc = 16;
constexpr std::int64_t kDirectChannels = 8;
// The largest kernel the CUDA path is instantiated for (KH and KW are template parameters).
constexpr std::int64_t kMaxKernel = 7;

std::string pair_str(const std::array<std::int64_t, 2>& v) {
  std::string s = "(";
  s += std::to_string(v[0]);
  s += ", ";
  s += std::to_string(v[1]);
  return s + ")";
}

// Strides of a contiguous [N, C, H, W] tensor in NCHW and in channels-last memory.
std::array<std::int64_t, 4> nchw_strides(std::int64_t C, std::int64_t H, std::int64_t W) {
  return {C * H * W, H * W, W, 1};
}
std::array<std::int64_t, 4> nhwc_strides(std::int64_t C, std::int64_t H, std::int64_t W) {
  return {H * W * C, 1, W * C, C};
}

// Whether the view's strides are `expected` wherever the size is not 1 (a size-1 dim's stride
// never matters).
bool has_strides(const TensorView& t, const std::array<std::int64_t, 4>& expected) {
  for (int d = 0; d < 4; ++d) {
    if (t.size(d) != 1 && t.stride(d) != expected[std::size_t(d)]) return false;
  }
  return true;
}

void validate(const TensorView& x, const TensorView& w, const std::optional<TensorView>& bias,
              const TensorView& out, const Conv2dOptions& options) {
  static constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::f16, DType::bf16};
  check::dims(kOp, "x", x, 4);
  check::dtype_in(kOp, "x", x, kFloat);
  check::dims(kOp, "w", w, 4);
  check::dtype_in(kOp, "w", w, kFloat);
  check::dtype_in(kOp, "out", out, kFloat);
  if (options.groups != 1) {
    check::fail(kOp, ErrorCode::unsupported,
                "groups = " + std::to_string(options.groups) +
                    ": grouped and depthwise convolutions are not supported, expected groups = 1");
  }
  const std::int64_t C = x.size(1), OC = w.size(0);
  if (w.size(1) != C) {
    if (w.size(1) > 0 && C % w.size(1) == 0) {
      check::fail(kOp, ErrorCode::unsupported,
                  "w has shape " + w.shape_str() + " for x with C = " + std::to_string(C) +
                      ": a grouped convolution (groups = " + std::to_string(C / w.size(1)) +
                      "), which is not supported; expected w [OC, " + std::to_string(C) +
                      ", KH, KW]");
    }
    check::fail(kOp, ErrorCode::invalid_argument,
                "w has shape " + w.shape_str() + ", expected [OC, " + std::to_string(C) +
                    ", KH, KW] (C = " + std::to_string(C) + " from x " + x.shape_str() + ")");
  }
  if (C < 1 || x.size(2) < 1 || x.size(3) < 1) {
    // As torch: an empty batch (N = 0) or no output channel (OC = 0) gives an empty out, an
    // empty channel or spatial dim has no defined convolution.
    check::fail(kOp, ErrorCode::invalid_argument,
                "x has shape " + x.shape_str() + ", expected C, H and W >= 1 (N = 0 is allowed)");
  }
  for (int d = 0; d < 2; ++d) {
    if (options.stride[std::size_t(d)] < 1 || options.dilation[std::size_t(d)] < 1 ||
        options.padding[std::size_t(d)] < 0) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "stride " + pair_str(options.stride) + ", padding " + pair_str(options.padding) +
                      ", dilation " + pair_str(options.dilation) +
                      ", expected stride >= 1, padding >= 0, dilation >= 1");
    }
  }
  if (w.size(2) < 1 || w.size(3) < 1) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "w has shape " + w.shape_str() + ", expected a kernel of at least 1x1");
  }
  const std::int64_t OH = conv2d_out_size(x.size(2), w.size(2), options.stride[0],
                                          options.padding[0], options.dilation[0]);
  const std::int64_t OW = conv2d_out_size(x.size(3), w.size(3), options.stride[1],
                                          options.padding[1], options.dilation[1]);
  if (OH < 1 || OW < 1) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "the " + std::to_string(w.size(2)) + "x" + std::to_string(w.size(3)) +
                    " kernel (dilation " + pair_str(options.dilation) + ") does not fit x " +
                    x.shape_str() + " with padding " + pair_str(options.padding) +
                    ": the output would be " + std::to_string(OH) + "x" + std::to_string(OW));
  }
  if (bias) {
    check::dtype_in(kOp, "bias", *bias, kFloat);
    const std::int64_t expected[] = {OC};
    check::shape(kOp, "bias", *bias, expected, "OC = " + std::to_string(OC));
    check::non_null(kOp, "bias", *bias);
    check::no_overlap(kOp, "out", out, "bias", *bias);
  }
  const std::int64_t out_shape[] = {x.size(0), OC, OH, OW};
  check::shape(kOp, "out", out, out_shape,
               "[N, OC, OH, OW] with OH = (H + 2 pad - dilation (KH - 1) - 1) / stride + 1");
  if (out.numel() > 0 && !has_strides(out, nchw_strides(OC, OH, OW)) &&
      !has_strides(out, nhwc_strides(OC, OH, OW))) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "out has strides " + check::shape_str(out.strides()) + " for shape " +
                    out.shape_str() + ", expected contiguous NCHW " +
                    check::shape_str(nchw_strides(OC, OH, OW)) + " or channels-last " +
                    check::shape_str(nhwc_strides(OC, OH, OW)));
  }
  check::non_null(kOp, "x", x);
  check::non_null(kOp, "w", w);
  check::non_null(kOp, "out", out);
  check::no_overlap(kOp, "out", out, "x", x);
  check::no_overlap(kOp, "out", out, "w", w);
}

void validate_cuda(const Problem& p) {
  if (p.KH > kMaxKernel || p.KW > kMaxKernel) {
    check::fail(kOp, ErrorCode::unsupported,
                "w has a " + std::to_string(p.KH) + "x" + std::to_string(p.KW) +
                    " kernel, expected at most " + std::to_string(kMaxKernel) + "x" +
                    std::to_string(kMaxKernel) + " on CUDA");
  }
  const std::int64_t M = p.N * p.OH * p.OW;
  const std::int64_t K = p.C * p.KH * p.KW;
  const std::pair<const char*, std::int64_t> sizes[] = {
      {"N * OH * OW", M}, {"C * KH * KW", K}, {"H", p.H}, {"W", p.W}, {"OC", p.OC}};
  for (const auto& [what, value] : sizes) {
    if (value > INT_MAX) {
      check::fail(kOp, ErrorCode::unsupported,
                  std::string(what) + " = " + std::to_string(value) + ", expected at most " +
                      std::to_string(INT_MAX) + " on CUDA (offsets are 64-bit, indices 32-bit)");
    }
  }
}

// Whether w, read in the kernel's k order, is a row-major [OC, K] matrix: (kh, kw, c) when
// `x_nhwc`, else (c, kh, kw).
bool w_is_k_contiguous(const TensorView& w, bool x_nhwc) {
  const std::int64_t C = w.size(1), KH = w.size(2), KW = w.size(3);
  const std::array<std::int64_t, 4> expected =
      x_nhwc ? std::array<std::int64_t, 4>{KH * KW * C, 1, KW * C, C}
             : std::array<std::int64_t, 4>{C * KH * KW, KH * KW, KW, 1};
  for (int d = 1; d < 4; ++d) {
    if (w.size(d) != 1 && w.stride(d) != expected[std::size_t(d)]) return false;
  }
  return true;
}

// Blocks of the grid: one per (BM, BN) tile of the [M, OC] output.
std::int64_t blocks_of(const Problem& p, const TileConfig& t) {
  const std::int64_t M = p.N * p.OH * p.OW;
  return ((M + t.bm - 1) / t.bm) * ((p.OC + t.bn - 1) / t.bn);
}

// Says once when a layout (not a dtype) sends an operand down the strided-load path.
void log_strided_loads(const Plan& plan, const Problem& p) {
  if (plan.x_nhwc && !plan.x_async && plan.x == plan.compute && p.C % 8 == 0) {
    log::warning_once("conv2d_x_strided",
                      "conv2d: channels-last x is not 16-byte aligned or its pixel strides are not "
                      "multiples of 8: strided loads, slower than cp.async");
  }
  if (!plan.w_async && plan.w == plan.compute && (p.C * p.KH * p.KW) % 8 == 0) {
    log::warning_once(
        "conv2d_w_strided",
        std::string(
            "conv2d: w is not 16-byte aligned or not contiguous in the k order of x's layout (") +
            (plan.x_nhwc ? "channels-last w for channels-last x" : "contiguous OIHW w for NCHW x") +
            "): strided weight loads, slower than cp.async");
  }
}

}  // namespace

// Dynamic shared memory of implicit_gemm_conv2d: the pipeline's stages of 2-byte T, or the
// epilogue's f32 tile ((BM, BN + 8) or (BN, BM + 4)) when that is larger.
int Plan::smem_bytes() const {
  const int a_stage =
      x_nhwc ? tile.bm * (tile.bk + kConv2dSmemPad) : tile.bk * (tile.bm + kConv2dSmemPad);
  const int pipeline = tile.stages * (a_stage + tile.bn * (tile.bk + kConv2dSmemPad)) * 2;
  const int epilogue = out_nhwc ? tile.bm * (tile.bn + 8) * 4 : tile.bn * (tile.bm + 4) * 4;
  return std::max(pipeline, epilogue);
}

DType compute_type(DType x, DType w) {
  if (x == DType::bf16 || w == DType::bf16) return DType::bf16;
  if (x == DType::f16 || w == DType::f16) return DType::f16;
  return DType::bf16;  // f32 x f32: bf16 keeps f32's range (f16 would overflow past 65504)
}

Problem problem_of(const TensorView& x, const TensorView& w, const Conv2dOptions& options) {
  Problem p{};
  p.N = x.size(0), p.C = x.size(1), p.H = x.size(2), p.W = x.size(3);
  p.OC = w.size(0), p.KH = w.size(2), p.KW = w.size(3);
  p.OH = conv2d_out_size(p.H, p.KH, options.stride[0], options.padding[0], options.dilation[0]);
  p.OW = conv2d_out_size(p.W, p.KW, options.stride[1], options.padding[1], options.dilation[1]);
  p.options = options;
  return p;
}

TileConfig choose_tile(const Problem& p, int sm_count) {
  // OC decides the block's width: the narrowest of 16, 32, 64, 128 that covers it.
  TileConfig t;
  if (p.OC <= 16) {
    t.bn = 16, t.warps_m = 4, t.warps_n = 1;
  } else if (p.OC <= 32) {
    t.bn = 32, t.warps_m = 4, t.warps_n = 1;
  } else if (p.OC <= 64) {
    t.bn = 64, t.warps_m = 2, t.warps_n = 2;
  }
  // Fewer blocks than SMs: halve the block's height so that more SMs get work.
  if (blocks_of(p, t) < sm_count) t.bm = 64, t.warps_m = std::max(1, t.warps_m / 2);
  return t;
}

Plan make_plan(const Problem& p, const TensorView& x, const TensorView& w,
               const std::optional<TensorView>& bias, const TensorView& out,
               const TileConfig& tile) {
  Plan plan;
  plan.x = x.dtype();
  plan.w = w.dtype();
  plan.bias = bias ? bias->dtype() : DType::f32;
  plan.out = out.dtype();
  plan.compute = compute_type(x.dtype(), w.dtype());
  plan.kh = int(p.KH);
  plan.kw = int(p.KW);
  plan.tile = tile;
  plan.has_bias = bias.has_value();
  plan.x_nhwc = p.C > 1 && x.stride(1) == 1;
  plan.row_chunks = !plan.x_nhwc && p.OW % 8 == 0;
  plan.im2col = !(p.KH == 1 && p.KW == 1 && p.options.stride == std::array<std::int64_t, 2>{1, 1} &&
                  p.options.padding == std::array<std::int64_t, 2>{0, 0});
  plan.x_async = plan.x_nhwc && x.dtype() == plan.compute && p.C % 8 == 0 && x.stride(0) % 8 == 0 &&
                 x.stride(2) % 8 == 0 && x.stride(3) % 8 == 0 && aligned(x.data(), 16);
  const std::int64_t K = p.C * p.KH * p.KW;
  plan.w_async = w.dtype() == plan.compute && K % 8 == 0 && w.stride(0) % 8 == 0 &&
                 aligned(w.data(), 16) && w_is_k_contiguous(w, plan.x_nhwc);
  // Both formats fit when OC == 1 or OH * OW == 1; the offsets are then the same.
  plan.out_nhwc = !has_strides(out, nchw_strides(p.OC, p.OH, p.OW));
  const std::int64_t vec = 16 / std::int64_t(dtype_size(out.dtype()));
  plan.out_vec =
      aligned(out.data(), 16) && (plan.out_nhwc ? p.OC % vec == 0 : (p.OH * p.OW) % vec == 0);
  return plan;
}

jit::KernelSpec kernel_spec(const Plan& plan) {
  const TileConfig& t = plan.tile;
  return {kSource,
          "kiln::implicit_gemm_conv2d",
          {{"Tx", jit::cpp_type(kOp, plan.x)},
           {"Tw", jit::cpp_type(kOp, plan.w)},
           {"Tb", jit::cpp_type(kOp, plan.bias)},
           {"Tout", jit::cpp_type(kOp, plan.out)},
           {"T", jit::cpp_type(kOp, plan.compute)},
           {"KH", std::to_string(plan.kh)},
           {"KW", std::to_string(plan.kw)},
           {"BM", std::to_string(t.bm)},
           {"BN", std::to_string(t.bn)},
           {"BK", std::to_string(t.bk)},
           {"WARPS_M", std::to_string(t.warps_m)},
           {"WARPS_N", std::to_string(t.warps_n)},
           {"STAGES", std::to_string(t.stages)},
           {"X_NHWC", jit::cpp_bool(plan.x_nhwc)},
           {"ROW_CHUNKS", jit::cpp_bool(plan.row_chunks)},
           {"X_ASYNC", jit::cpp_bool(plan.x_async)},
           {"W_ASYNC", jit::cpp_bool(plan.w_async)},
           {"IM2COL", jit::cpp_bool(plan.im2col)},
           {"OUT_NHWC", jit::cpp_bool(plan.out_nhwc)},
           {"OUT_VEC", jit::cpp_bool(plan.out_vec)},
           {"HAS_BIAS", jit::cpp_bool(plan.has_bias)}}};
}

namespace {

// The kernel parameters both CUDA kernels (implicit_gemm.cuh, direct.cuh) read: pointers,
// strides, sizes and the options.
Conv2dParams params_of(const Problem& p, const TensorView& x, const TensorView& w,
                       const std::optional<TensorView>& bias, const TensorView& out) {
  Conv2dParams params{};
  params.x = x.data();
  params.w = w.data();
  params.bias = bias ? bias->data() : nullptr;
  params.out = out.data();
  std::copy_n(x.strides().begin(), 4, params.x_stride);
  std::copy_n(w.strides().begin(), 4, params.w_stride);
  params.bias_stride = bias ? bias->stride(0) : 0;
  params.N = int(p.N), params.C = int(p.C), params.H = int(p.H), params.W = int(p.W);
  params.OC = int(p.OC), params.OH = int(p.OH), params.OW = int(p.OW);
  params.stride_h = int(p.options.stride[0]), params.stride_w = int(p.options.stride[1]);
  params.pad_h = int(p.options.padding[0]), params.pad_w = int(p.options.padding[1]);
  params.dilation_h = int(p.options.dilation[0]), params.dilation_w = int(p.options.dilation[1]);
  params.M = int(p.N * p.OH * p.OW);
  params.K = int(p.C * p.KH * p.KW);
  return params;
}

}  // namespace

bool direct_takes(const Problem& p, bool x_nhwc) {
  const Conv2dOptions& o = p.options;
  return !x_nhwc && p.OC <= kDirectMaxOc && o.stride[0] == 1 && o.stride[1] == 1 &&
         o.dilation[0] == 1 && o.dilation[1] == 1 && p.OH <= 65535 && p.N <= 65535;
}

jit::KernelSpec direct_spec(DType x, DType w, DType bias, DType out, int oc, int kh, int kw,
                            int channels, bool vec, bool out_nhwc, bool has_bias) {
  return {kDirectSource,
          "kiln::conv2d_direct",
          {{"Tx", jit::cpp_type(kOp, x)},
           {"Tw", jit::cpp_type(kOp, w)},
           {"Tb", jit::cpp_type(kOp, bias)},
           {"Tout", jit::cpp_type(kOp, out)},
           {"OC", std::to_string(oc)},
           {"KH", std::to_string(kh)},
           {"KW", std::to_string(kw)},
           {"CC", std::to_string(channels)},
           {"VEC", jit::cpp_bool(vec)},
           {"OUT_NHWC", jit::cpp_bool(out_nhwc)},
           {"HAS_BIAS", jit::cpp_bool(has_bias)}}};
}

void launch_direct(const Problem& p, const TensorView& x, const TensorView& w,
                   const std::optional<TensorView>& bias, const TensorView& out, Stream stream) {
  Conv2dParams params = params_of(p, x, w, bias, out);
  const int channels = int(std::min<std::int64_t>(p.C, kDirectChannels));
  const bool out_nhwc = !has_strides(out, nchw_strides(p.OC, p.OH, p.OW));
  // 16-byte loads along x's rows: unit W stride, W and the other strides whole 16-byte groups.
  const std::int64_t vec = 16 / std::int64_t(dtype_size(x.dtype()));
  const bool vec_loads = x.stride(3) == 1 && p.W % vec == 0 && x.stride(0) % vec == 0 &&
                         x.stride(1) % vec == 0 && x.stride(2) % vec == 0 && aligned(x.data(), 16);
  const jit::KernelSpec spec =
      direct_spec(x.dtype(), w.dtype(), bias ? bias->dtype() : DType::f32, out.dtype(), int(p.OC),
                  int(p.KH), int(p.KW), channels, vec_loads, out_nhwc, bias.has_value());
  const auto kernel = jit::process_cache().kernel(spec, x.device().index);
  void* args[] = {&params};
  const dim3 grid(unsigned((p.OW + kConv2dDirectPixels - 1) / kConv2dDirectPixels), unsigned(p.OH),
                  unsigned(p.N));
  jit::launch(kOp, kernel, grid, dim3(kConv2dDirectThreads),
              std::size_t(conv2d_direct_smem_bytes(int(p.OC), int(p.KH), int(p.KW), channels)),
              stream, args);
}

void launch(const Plan& plan, const Problem& p, const TensorView& x, const TensorView& w,
            const std::optional<TensorView>& bias, const TensorView& out, Stream stream) {
  Conv2dParams params = params_of(p, x, w, bias, out);
  params.k_tile_taps = p.C > 0 ? plan.tile.bk / int(p.C) : 0;  // C = 0: K = 0, bias only
  params.k_tile_channels = p.C > 0 ? plan.tile.bk % int(p.C) : 0;

  const std::int64_t blocks = blocks_of(p, plan.tile);
  if (blocks > INT_MAX) {
    check::fail(kOp, ErrorCode::unsupported,
                std::to_string(blocks) + " blocks of " + std::to_string(plan.tile.bm) + "x" +
                    std::to_string(plan.tile.bn) + ", expected at most " + std::to_string(INT_MAX));
  }
  const auto kernel = jit::process_cache().kernel(kernel_spec(plan), x.device().index);
  void* args[] = {&params};
  jit::launch(kOp, kernel, dim3(unsigned(blocks)), dim3(unsigned(plan.threads())),
              std::size_t(plan.smem_bytes()), stream, args);
}

// Kernel variants a workload needs ("flux-vae": the Flux VAE decoder's convolutions, bf16);
// jit/variants.hpp.
std::vector<jit::KernelSpec> variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  if (workload != "flux-vae") return specs;
  // The Flux VAE decoder at 1024² output, bf16, in both memory formats (weights in the input's
  // format, as model.to(memory_format=...) leaves them), with bias: its 3x3 convolutions, the 1x1
  // shortcuts and conv_out (OC = 3).
  struct Conv {
    std::int64_t C, OC, HW, K;
  };
  const Conv convs[] = {{512, 512, 128, 3},  {512, 512, 256, 3},  {512, 256, 512, 3},
                        {256, 256, 512, 3},  {512, 512, 512, 3},  {256, 128, 1024, 3},
                        {128, 128, 1024, 3}, {256, 256, 1024, 3}, {128, 3, 1024, 3},
                        {512, 256, 512, 1},  {256, 128, 1024, 1}, {16, 512, 128, 3}};
  for (bool nhwc : {true, false}) {
    for (const Conv& c : convs) {
      Problem p{};
      p.N = 1, p.C = c.C, p.H = c.HW, p.W = c.HW, p.OC = c.OC, p.KH = c.K, p.KW = c.K;
      p.OH = c.HW, p.OW = c.HW;
      p.options.padding = {c.K / 2, c.K / 2};
      if (direct_takes(p, nhwc)) {
        specs.push_back(direct_spec(DType::bf16, DType::bf16, DType::bf16, DType::bf16, int(c.OC),
                                    int(c.K), int(c.K), int(kDirectChannels), true, false, true));
        continue;
      }
      Plan plan;
      plan.kh = plan.kw = int(c.K);
      plan.bias = DType::bf16;
      plan.has_bias = true;
      plan.tile = choose_tile(p, 132);
      plan.x_nhwc = nhwc;
      plan.row_chunks = !nhwc;
      plan.x_async = nhwc;
      plan.w_async = true;
      plan.im2col = c.K != 1;
      plan.out_nhwc = nhwc;
      plan.out_vec = nhwc ? c.OC % 8 == 0 : true;
      specs.push_back(kernel_spec(plan));
      if (c.OC % 128 == 0 && c.C % 8 == 0) {
        specs.push_back(sm90_spec(DType::bf16, DType::bf16, DType::bf16, sm90_block_n(c.OC), true,
                                  !nhwc, !nhwc && c.K == 1));
      }
    }
  }
  // NCHW x and OIHW w: their channels-last copies.
  specs.push_back(sm90_copy_spec(DType::bf16, false, true));
  specs.push_back(sm90_copy_spec(DType::bf16, true, false));
  return specs;
}

}  // namespace conv2d_detail

std::int64_t conv2d_out_size(std::int64_t in, std::int64_t kernel, std::int64_t stride,
                             std::int64_t padding, std::int64_t dilation) {
  const std::int64_t span = dilation * (kernel - 1) + 1;
  const std::int64_t room = in + 2 * padding - span;
  return room < 0 ? 0 : room / stride + 1;
}

void conv2d(const TensorView& x, const TensorView& w, const std::optional<TensorView>& bias,
            const TensorView& out, const Conv2dOptions& options, Stream stream) {
  using namespace conv2d_detail;
  validate(x, w, bias, out, options);
  const Device device = check::common_device(
      kOp, {{"x", &x}, {"w", &w}, {"bias", bias ? &*bias : nullptr}, {"out", &out}});
  if (out.numel() == 0) return;
  if (device.type == DeviceType::cpu) {
    reference(x, w, bias, out, options);
    return;
  }
  cuda::require_device(kOp, device);
  const Problem problem = problem_of(x, w, options);
  validate_cuda(problem);
  cuda::DeviceGuard guard(kOp, device.index);
  if (const auto layout = sm90_layout(problem, x, w, out)) {
    launch_sm90(*layout, problem, x, w, bias, out, cuda::sm_count(kOp, device.index), stream);
    return;
  }
  if (direct_takes(problem, problem.C > 1 && x.stride(1) == 1)) {
    launch_direct(problem, x, w, bias, out, stream);
    return;
  }
  const TileConfig tile = choose_tile(problem, cuda::sm_count(kOp, device.index));
  const Plan plan = make_plan(problem, x, w, bias, out, tile);
  log_strided_loads(plan, problem);
  launch(plan, problem, x, w, bias, out, stream);
}

}  // namespace kiln
