// rope: argument checks, dispatch by device, the kernel plan and its launch.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "ops/rope/heads.hpp"
#include "ops/rope/kernels/params.cuh"
#include "ops/rope/rope.hpp"

namespace kiln {
namespace rope_detail {
namespace {

constexpr const char* kSource = "ops/rope/kernels/rope.cuh";

// `op` names the entry point in messages: "rope" or "rope_cache"; `out_arg` its output.
void validate(const char* op, const char* out_arg, const TensorView& x, const TensorView& positions,
              const TensorView& out, bool at_positions, const RopeOptions& options) {
  static constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::f16, DType::bf16};
  rope_heads::check_x(op, x);
  const std::int64_t N = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  const std::string nthd = "N = " + std::to_string(N) + ", T = " + std::to_string(T) +
                           ", H = " + std::to_string(H) + ", D = " + std::to_string(D);
  check::dtype_in(op, "positions", positions, {DType::i32, DType::i64});
  const std::int64_t pos_shape[] = {N, T};
  check::shape(op, "positions", positions, pos_shape, "[N, T] with " + nthd);
  check::dtype_in(op, out_arg, out, kFloat);
  check::dims(op, out_arg, out, 4);
  if (at_positions) {
    const std::int64_t cache_shape[] = {N, H, out.size(2), D};
    check::shape(op, out_arg, out, cache_shape, "[N, H, S, D] with " + nthd);
    if (out.stride(3) != 1 && D > 1 && out.numel() > 0) {
      check::fail(op, ErrorCode::invalid_argument,
                  std::string(out_arg) + " has strides " + check::shape_str(out.strides()) +
                      ", expected a unit stride in D");
    }
  } else {
    const std::int64_t out_shape[] = {N, H, T, D};
    check::shape(op, out_arg, out, out_shape, "[N, H, T, D] with " + nthd);
    // An empty output has no layout to check (frameworks give empty tensors arbitrary strides).
    if (out.numel() > 0) check::contiguous(op, out_arg, out);
  }
  check::non_null(op, "x", x);
  check::non_null(op, "positions", positions);
  check::non_null(op, out_arg, out);
  check::no_overlap(op, out_arg, out, "x", x);
  check::no_overlap(op, out_arg, out, "positions", positions);
  if (x.device().type == DeviceType::cuda && N * T > INT_MAX) {
    check::fail(op, ErrorCode::unsupported,
                "x has N * T = " + std::to_string(N * T) + " tokens, expected at most " +
                    std::to_string(INT_MAX) + " on CUDA (one block per token)");
  }
  if (options.theta && !(std::isfinite(*options.theta) && *options.theta > 0)) {
    check::fail(op, ErrorCode::invalid_argument,
                "theta = " + std::to_string(*options.theta) + ", expected a finite value > 0");
  }
  if (options.norm_weight) {
    rope_heads::check_norm_weight(op, out_arg, out, *options.norm_weight, D, options.eps);
  }
}

// Whether the kernel may load and store whole chunks of `pairs` pairs with vector accesses.
bool vector_ok(const TensorView& x, const TensorView& out, RopeStyle style, int pairs) {
  const int D = int(x.size(3));
  if ((D / 2) % pairs != 0) return false;
  // Elements of one access: a normal chunk is 2P contiguous elements, a neox run P.
  const int run = style == RopeStyle::normal ? 2 * pairs : pairs;
  const auto run_ok = [&](const TensorView& t, int first_dim, int dims) {
    const std::size_t bytes = std::min<std::size_t>(16, std::size_t(run) * dtype_size(t.dtype()));
    if (bytes < 4 || !aligned(t.data(), bytes)) return false;
    for (int d = first_dim; d < first_dim + dims; ++d) {
      if (t.size(d) > 1 && t.stride(d) % run != 0) return false;
    }
    return true;
  };
  if (x.stride(3) != 1 || !run_ok(x, 0, 3)) return false;
  // The norm weights are read element by element (once per thread): any alignment.
  return run_ok(out, 0, 3);
}

void run_kernel(const TensorView& x, const TensorView& positions, const TensorView& out,
                bool at_positions, const RopeOptions& options, Stream stream) {
  const int D = int(x.size(3));
  // Without a rotation the pairing is immaterial: both styles run the normal kernel.
  const RopeStyle style = options.theta ? options.style : RopeStyle::normal;
  const bool vector = vector_ok(x, out, style, vector_pairs(x.dtype(), style));
  const DType weight = options.norm_weight ? options.norm_weight->dtype() : DType::f32;
  const Plan plan =
      plan_kernel(x.dtype(), out.dtype(), weight, positions.dtype(), D, x.size(2), style,
                  options.theta.has_value(), options.norm_weight.has_value(), vector);
  RopeParams params{};
  params.x = x.data();
  params.positions = positions.data();
  params.norm_weight = options.norm_weight ? options.norm_weight->data() : nullptr;
  params.out = out.data();
  params.N = x.size(0);
  params.T = x.size(1);
  params.H = x.size(2);
  params.S = out.size(2);
  std::copy_n(x.strides().begin(), 4, params.x_stride);
  std::copy_n(positions.strides().begin(), 2, params.pos_stride);
  std::copy_n(out.strides().begin(), 3, params.out_stride);
  params.log2_theta = options.theta ? std::log2(*options.theta) : 0.0;
  params.eps = options.eps;
  params.at_positions = at_positions ? 1 : 0;

  const auto kernel = jit::process_cache().kernel(kernel_spec(plan), x.device().index);
  void* args[] = {&params};
  jit::launch(at_positions ? "rope_cache" : "rope", kernel, dim3(unsigned(x.size(0) * x.size(1))),
              dim3(unsigned(plan.threads())), 0, stream, args);
}

void dispatch(const char* op, const char* out_arg, const TensorView& x, const TensorView& positions,
              const TensorView& out, bool at_positions, const RopeOptions& options, Stream stream) {
  validate(op, out_arg, x, positions, out, at_positions, options);
  const TensorView* weight = options.norm_weight ? &*options.norm_weight : nullptr;
  const Device device = check::common_device(
      op, {{"x", &x}, {"positions", &positions}, {out_arg, &out}, {"norm_weight", weight}});
  if (x.numel() == 0) return;
  if (device.type == DeviceType::cpu) {
    reference(x, positions, out, at_positions, options);
    return;
  }
  cuda::require_device(op, device);
  cuda::DeviceGuard guard(op, device.index);
  run_kernel(x, positions, out, at_positions, options, stream);
}

}  // namespace

int vector_pairs(DType x, RopeStyle style) {
  const int bytes = int(dtype_size(x));
  return style == RopeStyle::normal ? 8 / bytes : 16 / bytes;
}

Plan plan_kernel(DType x, DType out, DType weight, DType positions, int head_dim, long long heads,
                 RopeStyle style, bool rotate, bool norm, bool vector) {
  Plan plan;
  plan.x = x;
  plan.out = out;
  plan.weight = norm ? weight : DType::f32;
  plan.positions = positions;
  plan.head_dim = head_dim;
  plan.style = style;
  plan.rotate = rotate;
  plan.norm = norm;
  plan.vector = vector;
  plan.pairs = vector ? vector_pairs(x, style) : 1;
  const rope_heads::HeadBlock block = rope_heads::head_block(head_dim / 2 / plan.pairs, heads);
  plan.lanes = block.lanes;
  plan.head_groups = block.head_groups;
  plan.hpt = block.hpt;
  return plan;
}

jit::KernelSpec kernel_spec(const Plan& plan) {
  const char* op = "rope";
  return {kSource,
          "kiln::rope_kernel",
          {{"Tin", jit::cpp_type(op, plan.x)},
           {"Tout", jit::cpp_type(op, plan.out)},
           {"Tw", jit::cpp_type(op, plan.weight)},
           {"TPos", plan.positions == DType::i32 ? "int" : "long long"},
           {"D", std::to_string(plan.head_dim)},
           {"NEOX", jit::cpp_bool(plan.style == RopeStyle::neox)},
           {"P", std::to_string(plan.pairs)},
           {"LANES", std::to_string(plan.lanes)},
           {"HEAD_GROUPS", std::to_string(plan.head_groups)},
           {"HPT", std::to_string(plan.hpt)},
           {"VECTOR", jit::cpp_bool(plan.vector)},
           {"ROTATE", jit::cpp_bool(plan.rotate)},
           {"NORM", jit::cpp_bool(plan.norm)}}};
}

// Kernel variants a workload needs ("llm": Llama-3-8B and Qwen3-8B, 32 query and 8 KV heads of
// 128, bf16).
std::vector<jit::KernelSpec> variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  if (workload != "llm") return specs;
  // Llama-3-8B (normal) and Qwen3-8B (neox, QK-norm): bf16 projections, i32 positions, 32 query
  // heads (Q: rotated into [N, H, T, D]) and 8 KV heads (K rotated, V as it is, into the cache).
  constexpr int kHeadDim = 128;
  for (RopeStyle style : {RopeStyle::normal, RopeStyle::neox}) {
    const bool norm = style == RopeStyle::neox;
    for (int heads : {32, 8}) {
      specs.push_back(kernel_spec(plan_kernel(DType::bf16, DType::bf16, DType::f32, DType::i32,
                                              kHeadDim, heads, style, true, norm, true)));
    }
  }
  specs.push_back(kernel_spec(plan_kernel(DType::bf16, DType::bf16, DType::f32, DType::i32,
                                          kHeadDim, 8, RopeStyle::normal, false, false, true)));
  return specs;
}

}  // namespace rope_detail

void rope(const TensorView& x, const TensorView& positions, const TensorView& out,
          const RopeOptions& options, Stream stream) {
  rope_detail::dispatch("rope", "out", x, positions, out, false, options, stream);
}

void rope_cache(const TensorView& x, const TensorView& positions, const TensorView& cache,
                const RopeOptions& options, Stream stream) {
  rope_detail::dispatch("rope_cache", "cache", x, positions, cache, true, options, stream);
}

}  // namespace kiln
