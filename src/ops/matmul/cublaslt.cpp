#include "ops/matmul/cublaslt.hpp"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "core/check.hpp"
#include "core/cuda.hpp"

namespace kiln::matmul_detail {
namespace {

// Workspace for cuBLASLt's split-K and stream-K kernels (torch gives it 32 MiB on Hopper too).
constexpr std::size_t kWorkspaceBytes = std::size_t(32) << 20;

void lt_check(cublasStatus_t status, const char* op, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    check::fail(op, ErrorCode::cuda_error,
                std::string("cuBLASLt ") + what + " failed with status " + std::to_string(status));
  }
}

cudaDataType_t cuda_type(const char* op, DType dtype) {
  switch (dtype) {
    case DType::f32:
      return CUDA_R_32F;
    case DType::f16:
      return CUDA_R_16F;
    case DType::bf16:
      return CUDA_R_16BF;
    case DType::f8_e4m3fn:
      return CUDA_R_8F_E4M3;
    case DType::f8_e5m2:
      return CUDA_R_8F_E5M2;
    default:
      check::fail(op, ErrorCode::unsupported,
                  std::string("no cuBLASLt type for ") + dtype_name(dtype));
  }
}

// One handle per device, created on first use and kept for the process.
cublasLtHandle_t handle(const char* op, int device) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t h = nullptr;
  lt_check(cublasLtCreate(&h), op, "cublasLtCreate");
  handles.emplace(device, h);
  return h;
}

template <typename T>
void set(const char* op, cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
         const T& value) {
  lt_check(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), op,
           "cublasLtMatmulDescSetAttribute");
}

// The descriptors and algorithm of one problem shape, built once: creating them and querying the
// heuristic costs tens of microseconds of host time a call (NOTES.md, "fp8_native"). Kept for the
// process.
struct Plan {
  cublasLtMatmulDesc_t op_desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;  // c: C unlike D
  cublasLtMatmulAlgo_t algo{};
  std::mutex mutex;  // the pointer attributes are set per call, then the call is enqueued
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op_desc) cublasLtMatmulDescDestroy(op_desc);
  }
};

using PlanKey = std::tuple<int, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                           std::int64_t, int, int, int, int, int, int, int, std::int64_t>;

// Whether C needs a layout of its own (a dtype or row stride unlike out's).
bool c_differs(const LtMatmul& p) {
  return p.c != nullptr && (p.c_dtype != p.out_dtype || p.c_stride != p.n);
}

// Descriptors (cuBLASLt is column-major: D^T [N, M] = W [N, K] . A^T, with cuBLASLt's A := w,
// transposed, K-major, ld = w_stride, and B := a, not transposed, ld = a_stride; D column-major
// [N, M] with ld = N is out row-major [M, N]) and the heuristic's first algorithm.
void build_plan(const char* op, const LtMatmul& p, bool fp8, Plan& plan) {
  lt_check(cublasLtMatmulDescCreate(&plan.op_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), op,
           "cublasLtMatmulDescCreate");
  set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  if (fp8) {
    if (p.outer) {
      const std::int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, mode);
      set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, mode);
    }
    set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, p.w_scale);
    set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, p.a_scale);
  }
  if (p.bias) {
    set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias);
    set(op, plan.op_desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
        static_cast<std::int32_t>(cuda_type(op, p.bias_dtype)));
  }
  lt_check(cublasLtMatrixLayoutCreate(&plan.a, cuda_type(op, p.w_dtype), std::uint64_t(p.k),
                                      std::uint64_t(p.n), p.w_stride),
           op, "cublasLtMatrixLayoutCreate(w)");
  lt_check(cublasLtMatrixLayoutCreate(&plan.b, cuda_type(op, p.a_dtype), std::uint64_t(p.k),
                                      std::uint64_t(p.m), p.a_stride),
           op, "cublasLtMatrixLayoutCreate(a)");
  lt_check(cublasLtMatrixLayoutCreate(&plan.d, cuda_type(op, p.out_dtype), std::uint64_t(p.n),
                                      std::uint64_t(p.m), p.n),
           op, "cublasLtMatrixLayoutCreate(out)");
  if (c_differs(p)) {
    lt_check(cublasLtMatrixLayoutCreate(&plan.c, cuda_type(op, p.c_dtype), std::uint64_t(p.n),
                                        std::uint64_t(p.m), p.c_stride),
             op, "cublasLtMatrixLayoutCreate(c)");
  }
  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), op, "cublasLtMatmulPreferenceCreate");
  const std::uint64_t workspace_bytes = kWorkspaceBytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                       &workspace_bytes, sizeof(workspace_bytes));
  cublasLtMatmulHeuristicResult_t result{};
  int count = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle(op, p.device), plan.op_desc, plan.a, plan.b,
                                     plan.c ? plan.c : plan.d, plan.d, pref, 1, &result, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_SUCCESS || count == 0) {
    check::fail(op, ErrorCode::unsupported,
                std::string("cuBLASLt has no algorithm for ") + dtype_name(p.a_dtype) + " x " +
                    dtype_name(p.w_dtype) + " -> " + dtype_name(p.out_dtype) +
                    " at M = " + std::to_string(p.m) + ", N = " + std::to_string(p.n) +
                    ", K = " + std::to_string(p.k) + (p.outer ? " with per-row scales" : "") +
                    (p.bias ? std::string(" with a ") + dtype_name(p.bias_dtype) + " bias"
                            : std::string()) +
                    (p.c ? std::string(" with a ") + dtype_name(p.c_dtype) + " C (beta = 1)"
                         : std::string()) +
                    " (status " + std::to_string(status) + ")");
  }
  plan.algo = result.algo;
}

}  // namespace

void lt_matmul(const char* op, const LtMatmul& p) {
  const bool fp8 = p.a_dtype == DType::f8_e4m3fn || p.a_dtype == DType::f8_e5m2;
  const auto address_bits = [](const void* ptr) {
    return int(reinterpret_cast<std::uintptr_t>(ptr) % 256);  // the heuristic looks at alignment
  };
  const PlanKey key{p.device,
                    p.m,
                    p.n,
                    p.k,
                    p.a_stride,
                    p.w_stride,
                    int(p.a_dtype),
                    int(p.w_dtype),
                    int(p.out_dtype),
                    p.bias ? int(p.bias_dtype) : -1,
                    (p.a_scale ? 1 : 0) | (p.w_scale ? 2 : 0) | (p.outer ? 4 : 0),
                    address_bits(p.a) | address_bits(p.w) | address_bits(p.out) |
                        address_bits(p.bias) | address_bits(p.c),
                    p.c ? int(p.c_dtype) : -1,
                    p.c ? p.c_stride : 0};
  static std::mutex plans_mutex;
  static std::map<PlanKey, std::unique_ptr<Plan>> plans;
  static std::map<PlanKey, std::string> refused;  // problems without an algorithm: the message
  Plan* plan = nullptr;
  {
    std::lock_guard<std::mutex> lock(plans_mutex);
    auto it = plans.find(key);
    if (it != plans.end()) plan = it->second.get();
    auto no = refused.find(key);
    if (no != refused.end()) throw Error(ErrorCode::unsupported, no->second);
  }
  if (plan == nullptr) {
    auto built = std::make_unique<Plan>();
    try {
      build_plan(op, p, fp8, *built);
    } catch (const Error& e) {
      if (e.code() == ErrorCode::unsupported) {
        std::lock_guard<std::mutex> lock(plans_mutex);
        refused.emplace(key, e.what());
      }
      throw;
    }
    std::lock_guard<std::mutex> lock(plans_mutex);
    plan = plans.emplace(key, std::move(built)).first->second.get();
  }

  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const cuda::StreamScratch space(op, p.device, kWorkspaceBytes, p.stream);
  const float alpha = 1.f, beta = p.c ? 1.f : 0.f;
  const void* c = p.c ? p.c : p.out;
  const cublasLtMatrixLayout_t c_layout = plan->c ? plan->c : plan->d;
  cublasStatus_t status;
  {
    std::lock_guard<std::mutex> lock(plan->mutex);
    if (fp8) {
      set(op, plan->op_desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, p.w_scale);
      set(op, plan->op_desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, p.a_scale);
    }
    if (p.bias) set(op, plan->op_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias);
    status = cublasLtMatmul(handle(op, p.device), plan->op_desc, &alpha, p.w, plan->a, p.a, plan->b,
                            &beta, c, c_layout, p.out, plan->d, &plan->algo, space.get(),
                            kWorkspaceBytes, stream);
  }
  lt_check(status, op, "cublasLtMatmul");
}

}  // namespace kiln::matmul_detail
