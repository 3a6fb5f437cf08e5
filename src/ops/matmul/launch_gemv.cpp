// The small-M path: plan (tensor-core or CUDA-core kernel, warps, split-K, vector loads), JIT spec
// and launch of kernels/gemv.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "jit/kernel_cache.hpp"
#include "ops/matmul/kernels/params.cuh"
#include "ops/matmul/matmul.hpp"

namespace kiln::matmul_detail {
namespace {

constexpr const char* kOp = "matmul";
constexpr const char* kSource = "ops/matmul/kernels/gemv.cuh";
constexpr int kWarps = 4;      // warps per block (CUDA-core kernel)
constexpr int kUnroll = 2;     // chunks of each row in flight (gemv.cuh's U)
constexpr int kQ8Step = 1024;  // K covered by one q8_0 stage of 32 blocks
constexpr int kMmaRows = 16;   // weight rows of one tensor-core block (the mma's M)
constexpr int kMmaK = 128;     // granule of a warp's K slice (block128's chunk, 2-4 segments)
// Where the CUDA-core kernel stays, measured faster there (NOTES.md, "GEMV v2"): q8_0 at M <= 4,
// its 16-byte staged loads against the tensor-core kernel's 4-byte ones; f16 / bf16 weights at
// M <= 2, one integer op a value to decode.
constexpr std::int64_t kQ8CudaCoreUpToM = 4;
constexpr std::int64_t k16BitCudaCoreUpToM = 2;

int format_value(WeightFormat format) {
  switch (format) {
    case WeightFormat::f16:
      return 0;
    case WeightFormat::bf16:
      return 1;
    case WeightFormat::f8_e4m3fn:
      return 2;
    case WeightFormat::f8_e5m2:
      return 3;
    case WeightFormat::q8_0:
      return 4;
  }
  return -1;
}

// K values of one 16-byte weight chunk.
int chunk_values(WeightFormat format) { return is_fp8(format) ? 16 : 8; }

// The tensor-core kernel takes f16 / bf16 a with 16-byte-aligned rows, and 16-byte weight chunks
// of an fp8 format or of a's own type, or q8_0 rows of whole 64-value block pairs (4-byte
// aligned); f32 and fp8 a, f16 weights under bf16 a (and the reverse), unaligned operands, and
// q8_0 and 16-bit weights at the small M above take the CUDA-core kernel.
bool mma_applies(const MatmulProblem& p, bool vec, bool a_vec) {
  if (p.a_dtype != DType::f16 && p.a_dtype != DType::bf16) return false;
  if (p.w_format == WeightFormat::q8_0) {
    return p.m > kQ8CudaCoreUpToM && a_vec && aligned(p.w, 4) && p.k % 64 == 0;
  }
  if (is_fp8(p.w_format)) return vec && a_vec;
  return p.m > k16BitCudaCoreUpToM && vec && a_vec && storage_dtype(p.w_format) == p.a_dtype;
}

struct GemvPlan {
  bool mma = false;       // gemv_mma_kernel (else gemv_kernel)
  int warps = kWarps;     // per block (mma: along K)
  int segments = 4;       // mma: segments of each row in flight (gemv.cuh's U)
  int rows_per_warp = 4;  // R (CUDA-core kernel)
  bool vec = false;       // 16-byte weight loads
  bool a_vec = false;     // 16-byte loads of a
  bool split = false;
  std::int64_t k_per_split = 0;
  std::int64_t splits = 1;
  std::int64_t row_blocks = 0;  // grid x
};

GemvPlan plan_gemv(const MatmulProblem& p) {
  GemvPlan plan;
  // R = 4 keeps four 16-byte loads of a lane in flight at small M; at M > 4 the R x M f32
  // accumulators (and decoded chunks) would spill, R = 2 keeps M = 16 at 226 registers.
  plan.rows_per_warp = p.m <= 4 ? 4 : 2;
  // q8_0 rows are K / 32 * 34 bytes: 16-byte multiples when K % 256 == 0.
  const bool w_rows_aligned = p.w_row_bytes % 16 == 0;
  plan.vec = aligned(p.w, 16) && w_rows_aligned;
  const std::size_t a_elem = dtype_size(p.a_dtype);
  const bool a_aligned =
      aligned(p.a, 16) && (p.m == 1 || (p.a_row_stride * std::int64_t(a_elem)) % 16 == 0);
  plan.a_vec = plan.vec && a_aligned;
  plan.mma = mma_applies(p, plan.vec, a_aligned);
  int sms = 0;
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device), kOp,
              "cudaDeviceGetAttribute (SM count)");
  if (plan.mma) {
    // A block per 16 rows, its warps along K, each warp with U segments of both its rows in
    // flight (fp8 / 16-bit: 4 segments, 8 KiB a warp; q8_0: 2, of 14 loads each). 4 warps where
    // the tiles give many blocks an SM, else 8: fp8 from 4 blocks an SM (N >= 8448 on 132 SMs),
    // q8_0 and 16-bit from 6, as the warps x segments sweep found (NOTES.md "GEMV v2"). Fewer
    // than 8 warps an SM in all (small N): split K over grid y too.
    const std::int64_t tiles = ceil_div(p.n, kMmaRows);
    plan.segments = p.w_format == WeightFormat::q8_0 ? 2 : 4;
    plan.warps = tiles >= (is_fp8(p.w_format) ? 4LL : 6LL) * sms ? 4 : 8;
    plan.row_blocks = tiles;
    const std::int64_t granule = std::int64_t(plan.warps) * kMmaK;
    std::int64_t splits = 1;
    if (tiles * plan.warps < 8LL * sms) {
      splits = std::min(ceil_div(p.k, granule), ceil_div(8LL * sms, tiles * plan.warps));
    }
    plan.k_per_split = ceil_div(ceil_div(p.k, splits), granule) * granule;
    plan.splits = ceil_div(p.k, plan.k_per_split);
    plan.split = plan.splits > 1;
    return plan;
  }
  plan.row_blocks = ceil_div(p.n, std::int64_t(kWarps) * plan.rows_per_warp);

  // Split K when the rows alone give fewer blocks than SMs (small N, long K): each split's partial
  // sums in its slice of an f32 buffer, then an epilogue kernel adds them in order.
  const std::int64_t unit =
      p.w_format == WeightFormat::q8_0
          ? kQ8Step
          : std::int64_t(32) * (plan.vec ? chunk_values(p.w_format) : 1) * kUnroll;
  const std::int64_t units = ceil_div(p.k, unit);
  std::int64_t splits = 1;
  if (plan.row_blocks < sms) splits = std::min(units, ceil_div(4LL * sms, plan.row_blocks));
  plan.k_per_split = ceil_div(units, splits) * unit;
  plan.splits = ceil_div(p.k, plan.k_per_split);
  plan.split = plan.splits > 1;
  return plan;
}

jit::KernelSpec gemv_spec(const MatmulProblem& p, const GemvPlan& plan) {
  const bool bias = p.bias != nullptr;
  // The split-K partials take no gate or residual: the epilogue kernel applies them.
  const std::string gate =
      std::to_string(plan.split ? kOperandNone : operand_kind(p.gate, p.gate_dtype));
  const std::string residual =
      std::to_string(plan.split ? kOperandNone : operand_kind(p.residual, p.residual_dtype));
  if (plan.mma) {
    return {kSource,
            "kiln::gemv_mma_kernel",
            {{"Ta", jit::cpp_type(kOp, p.a_dtype)},
             {"WFMT", std::to_string(format_value(p.w_format))},
             {"Tout", jit::cpp_type(kOp, p.out_dtype)},
             {"Tbias", bias ? jit::cpp_type(kOp, p.bias_dtype) : "float"},
             {"M", std::to_string(p.m)},
             {"WARPS", std::to_string(plan.warps)},
             {"U", std::to_string(plan.segments)},
             {"WKIND", std::to_string(int(p.w_scale_kind))},
             {"BIAS", bias ? "true" : "false"},
             {"SPLIT", plan.split ? "true" : "false"},
             {"GATE", gate},
             {"RESIDUAL", residual}}};
  }
  return {kSource,
          "kiln::gemv_kernel",
          {{"Ta", jit::cpp_type(kOp, p.a_dtype)},
           {"WFMT", std::to_string(format_value(p.w_format))},
           {"Tout", jit::cpp_type(kOp, p.out_dtype)},
           {"Tbias", bias ? jit::cpp_type(kOp, p.bias_dtype) : "float"},
           {"M", std::to_string(p.m)},
           {"R", std::to_string(plan.rows_per_warp)},
           {"WARPS", std::to_string(kWarps)},
           {"WKIND", std::to_string(int(p.w_scale_kind))},
           {"AKIND", std::to_string(int(p.a_scale_kind))},
           {"BIAS", bias ? "true" : "false"},
           {"SPLIT", plan.split ? "true" : "false"},
           {"VEC", plan.vec ? "true" : "false"},
           {"A_VEC", plan.a_vec ? "true" : "false"},
           {"GATE", gate},
           {"RESIDUAL", residual}}};
}

jit::KernelSpec epilogue_spec(const MatmulProblem& p) {
  const bool bias = p.bias != nullptr;
  return {kSource,
          "kiln::gemv_epilogue_kernel",
          {{"Tout", jit::cpp_type(kOp, p.out_dtype)},
           {"Tbias", bias ? jit::cpp_type(kOp, p.bias_dtype) : "float"},
           {"WKIND", std::to_string(int(p.w_scale_kind))},
           {"AKIND", std::to_string(int(p.a_scale_kind))},
           {"BIAS", bias ? "true" : "false"},
           {"GATE", std::to_string(operand_kind(p.gate, p.gate_dtype))},
           {"RESIDUAL", std::to_string(operand_kind(p.residual, p.residual_dtype))}}};
}

// Split-K partial sums, f32 [splits, M, N], in stream-ordered memory freed (stream-ordered) when
// it goes. Every element is written by the GEMV before the epilogue reads it: no clearing.
class Partial {
 public:
  Partial(std::size_t bytes, Stream stream) : stream_(stream) {
    cuda::check(cudaMallocAsync(&ptr_, bytes, static_cast<cudaStream_t>(stream)), kOp,
                "cudaMallocAsync (split-K partial sums)");
  }
  ~Partial() { cudaFreeAsync(ptr_, static_cast<cudaStream_t>(stream_)); }
  Partial(const Partial&) = delete;
  Partial& operator=(const Partial&) = delete;
  float* get() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  Stream stream_;
};

}  // namespace

void launch_split_epilogue(const MatmulProblem& p, const float* partial, std::int64_t splits) {
  GemvEpilogueParams e{};
  e.partial = partial;
  e.splits = splits;
  e.w_scale = p.w_scale;
  e.a_scale = p.a_scale;
  e.bias = p.bias;
  e.out = p.out;
  e.m = p.m;
  e.n = p.n;
  e.epilogue = gate_residual_of(p);
  const auto kernel = jit::process_cache().kernel(epilogue_spec(p), p.device);
  void* args[] = {&e};
  constexpr int kThreads = 256;
  jit::launch(kOp, kernel, dim3(unsigned(ceil_div(p.m * p.n, kThreads))), dim3(kThreads), 0,
              p.stream, args);
}

std::string gemv_unsupported(const MatmulProblem& p) {
  if (p.m > kGemvMaxM) {
    return "M = " + std::to_string(p.m) + " exceeds the GEMV's " + std::to_string(kGemvMaxM);
  }
  if (p.w_layout != WeightLayout::row_major) {
    return std::string("the GEMV reads row_major weights, got layout ") +
           weight_layout_name(p.w_layout);
  }
  if (is_fp8(p.a_dtype) && !is_fp8(p.w_format)) {
    return std::string("fp8 a needs an fp8 weight, got ") + weight_format_name(p.w_format);
  }
  return "";
}

jit::KernelSpec gemv_spec_for(const MatmulProblem& problem) {
  GemvPlan plan;
  plan.rows_per_warp = problem.m <= 4 ? 4 : 2;
  plan.vec = true;
  plan.a_vec = true;
  plan.mma = mma_applies(problem, plan.vec, plan.a_vec);
  plan.warps = plan.mma ? 8 : kWarps;  // the plan at N < 8448 on 132 SMs
  plan.segments = problem.w_format == WeightFormat::q8_0 ? 2 : 4;
  return gemv_spec(problem, plan);
}

void launch_gemv(const MatmulProblem& p) {
  if (p.k == 0) {
    // out = bias (or 0), any M and layout: the split-K epilogue over no splits.
    launch_split_epilogue(p, nullptr, 0);
    return;
  }
  const std::string why = gemv_unsupported(p);
  if (!why.empty()) check::fail(kOp, ErrorCode::unsupported, "path gemv: " + why);
  const GemvPlan plan = plan_gemv(p);
  if (!plan.vec && !plan.mma) {
    log::warning_once("gemv_scalar_" + std::string(weight_format_name(p.w_format)),
                      "matmul: GEMV weight rows are not 16-byte aligned (format " +
                          std::string(weight_format_name(p.w_format)) +
                          ", K = " + std::to_string(p.k) +
                          "): element-wise loads, several times slower than 16-byte loads");
  }
  if (plan.splits > 65535 || plan.row_blocks > INT_MAX) {
    check::fail(
        kOp, ErrorCode::unsupported,
        "N = " + std::to_string(p.n) + ", K = " + std::to_string(p.k) + " exceed the GEMV grid");
  }
  GemvParams g{};
  g.a = p.a;
  g.w = p.w;
  g.w_scale = p.w_scale;
  g.a_scale = p.a_scale;
  g.bias = p.bias;
  g.out = p.out;
  g.n = p.n;
  g.k = p.k;
  g.a_stride = p.a_row_stride;
  g.w_row_bytes = p.w_row_bytes;
  g.k_per_split = plan.k_per_split;
  g.scale_cols = ceil_div(p.k, kScaleBlock);
  g.epilogue = gate_residual_of(p);
  const auto kernel = jit::process_cache().kernel(gemv_spec(p, plan), p.device);
  void* args[] = {&g};
  const dim3 grid(unsigned(plan.row_blocks), unsigned(plan.splits));
  const dim3 block(unsigned(plan.warps * 32));
  if (!plan.split) {
    jit::launch(kOp, kernel, grid, block, 0, p.stream, args);
    return;
  }
  Partial partial(std::size_t(plan.splits * p.m * p.n) * sizeof(float), p.stream);
  g.partial = partial.get();
  jit::launch(kOp, kernel, grid, block, 0, p.stream, args);
  launch_split_epilogue(p, partial.get(), plan.splits);
}

}  // namespace kiln::matmul_detail
