// attention on Hopper: the sm_90a prefill kernel (prefill_sm90.cuh), its TMA tensor maps, its
// specializations and when it takes a call; the tensor maps of the TMA decode (attention.cuh).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "core/tma.hpp"
#include "jit/kernel_cache.hpp"
#include "kiln/device.hpp"
#include "ops/attention/attention.hpp"
#include "ops/attention/kernels/params.cuh"
#include "ops/attention/kernels/prefill_sm90_params.cuh"

namespace kiln::attention_detail {
namespace {

constexpr const char* kOp = "attention";
constexpr const char* kSource = "ops/attention/kernels/prefill_sm90.cuh";
constexpr int kBlockM = 128;               // query rows per block
constexpr int kBlockN = 128;               // keys per tile
constexpr std::uint32_t kBlockRows = 128;  // rows of every TMA box (= kBlockM = kBlockN)
constexpr int kThreads = 384;
// K/V ring depth: with 2 slots, a slot freed only after its PV, the producer could not run ahead
// and the consumers waited on loads; 3 slots gave the overlap its speed (NOTES.md "sm_90a
// prefill", v2 -> v3).
constexpr int kStages = 3;

int smem_bytes(int d) {
  const int tile = 2 * d;  // bytes per row of a tile
  // Q + STAGES x (K + V) + 1024 for aligning the swizzled tiles + the mbarriers (full and empty
  // for Q and for each K and V slot).
  return kBlockM * tile + 2 * kStages * kBlockN * tile + 1024 + 8 * (2 + 4 * kStages);
}

// A 4-D map of a [N, H, L, D] view with boxes of 64 (D) x `rows` (L): dims (D, L, H, N), or
// (D, H, L, N) when the H stride is the smaller (the slices of a packed QKV), so that the map's
// strides grow outwards. Returns whether L is the second dim (the kernel's coordinate order).
TensorMapBytes tensor_map(const char* arg, const TensorView& t, std::uint32_t rows, bool& l_inner) {
  const std::uint64_t bytes = dtype_size(t.dtype());
  // A size-1 dim's stride is never stepped along; give it the largest stride so the order holds.
  std::uint64_t stride[3];  // of N, H, L in bytes
  std::uint64_t largest = 16;
  for (int i = 0; i < 3; ++i) {
    if (t.size(i) > 1) largest = std::max<std::uint64_t>(largest, t.stride(i) * bytes);
  }
  for (int i = 0; i < 3; ++i) stride[i] = t.size(i) > 1 ? t.stride(i) * bytes : largest;
  l_inner = stride[2] <= stride[1];
  const std::uint64_t d = t.size(3), l = t.size(2), h = t.size(1), n = t.size(0);
  if (l_inner) {
    const std::uint64_t dims[4] = {d, l, h, n};
    const std::uint64_t strides[3] = {stride[2], stride[1], stride[0]};
    const std::uint32_t box[4] = {64, rows, 1, 1};
    return tma::tiled(kOp, arg, t.dtype(), t.data(), dims, strides, box);
  }
  const std::uint64_t dims[4] = {d, h, l, n};
  const std::uint64_t strides[3] = {stride[1], stride[2], stride[0]};
  const std::uint32_t box[4] = {64, 1, rows, 1};
  return tma::tiled(kOp, arg, t.dtype(), t.data(), dims, strides, box);
}

// Work tiles of the prefill kernel: 128 query rows of one (batch, head) each.
std::int64_t work_tiles(const TensorView& q) {
  return (q.size(2) + kBlockM - 1) / kBlockM * q.size(1) * q.size(0);
}

// Blocks of the persistent grid: one an SM (its 384 threads' registers fill the register file),
// each walking the work tiles. KILN_ATTENTION_PREFILL_BLOCKS=<n> caps it at n, so that tests see
// blocks that take many tiles at any shape; a malformed value is an error.
int prefill_blocks(int tiles, int device) {
  const int blocks = std::min(tiles, cuda::sm_count(kOp, device));
  const char* text = std::getenv("KILN_ATTENTION_PREFILL_BLOCKS");
  if (text == nullptr || *text == '\0') return blocks;
  int cap = 0;
  char tail = 0;
  if (std::sscanf(text, "%d%c", &cap, &tail) != 1 || cap < 1) {
    check::fail(kOp, ErrorCode::invalid_argument,
                std::string("KILN_ATTENTION_PREFILL_BLOCKS is '") + text +
                    "', expected a positive block count");
  }
  log::warning_once(std::string("attention_prefill_blocks_") + text,
                    std::string("attention: sm_90a prefill grid capped by "
                                "KILN_ATTENTION_PREFILL_BLOCKS=") +
                        text);
  return std::min(blocks, cap);
}

}  // namespace

jit::KernelSpec prefill_sm90_spec(DType t, DType out, int head_dim, bool causal, int kv_len,
                                  bool softcap) {
  jit::KernelSpec spec{kSource,
                       "kiln::attention_prefill_sm90",
                       {{"T", jit::cpp_type(kOp, t)},
                        {"TO", jit::cpp_type(kOp, out)},
                        {"D", std::to_string(head_dim)},
                        {"STAGES", std::to_string(kStages)},
                        {"CAUSAL", causal ? "true" : "false"},
                        {"KV_LEN", std::to_string(kv_len)},
                        {"SOFTCAP", softcap ? "true" : "false"}}};
  spec.archs = {"sm_90a"};
  return spec;
}

bool prefill_sm90_takes(const TensorView& q, const TensorView& k, const TensorView& v,
                        const AttentionOptions& options) {
  if (cuda_arch(q.device().index) != "sm_90a") return false;
  const std::int64_t d = q.size(3);
  return (d == 64 || d == 128) && v.size(3) == d && q.dtype() == k.dtype() &&
         !options.mask.has_value() && q.size(2) > 16 && work_tiles(q) <= INT32_MAX &&
         tma::compatible(q, 3) && tma::compatible(k, 3) && tma::compatible(v, 3);
}

void run_prefill_sm90(const TensorView& q, const TensorView& k, const TensorView& v,
                      const TensorView& out, const AttentionOptions& options, float scale,
                      Stream stream) {
  const int d = int(q.size(3));
  AttentionSm90Params params{};
  bool l_inner[3];
  params.map_q = tensor_map("q", q, kBlockRows, l_inner[0]);
  params.map_k = tensor_map("k", k, kBlockRows, l_inner[1]);
  params.map_v = tensor_map("v", v, kBlockRows, l_inner[2]);
  params.q_l_inner = l_inner[0];
  params.k_l_inner = l_inner[1];
  params.v_l_inner = l_inner[2];
  params.out = out.data();
  std::copy_n(out.strides().begin(), 3, params.out_stride);
  params.lse = options.lse ? static_cast<float*>(options.lse->data()) : nullptr;
  int kv_len = kKvLenNone;
  if (options.kv_len) {
    params.kv_len = options.kv_len->data();
    kv_len = options.kv_len->dtype() == DType::i32 ? kKvLenI32 : kKvLenI64;
  }
  params.Hq = q.size(1);
  params.Lq = q.size(2);
  params.Lk = k.size(2);
  params.group = int(q.size(1) / k.size(1));
  params.tiles = int(work_tiles(q));
  constexpr float kLog2e = 1.4426950408889634f;
  params.scale_log2 = scale * kLog2e;
  if (options.softcap) {
    params.softcap_log2 = *options.softcap * kLog2e;
    params.scale_over_softcap = scale / *options.softcap;
  }
  const jit::KernelSpec spec = prefill_sm90_spec(q.dtype(), out.dtype(), d, options.causal, kv_len,
                                                 options.softcap.has_value());
  const auto kernel = jit::process_cache().kernel(spec, q.device().index);
  void* args[] = {&params};
  const dim3 grid(unsigned(prefill_blocks(params.tiles, q.device().index)));
  jit::launch(kOp, kernel, grid, dim3(kThreads), std::size_t(smem_bytes(d)), stream, args);
}

void decode_tma_maps(const TensorView& k, const TensorView& v, int block_n,
                     AttentionParams& params) {
  bool l_inner[2];
  params.map_k = tensor_map("k", k, std::uint32_t(block_n), l_inner[0]);
  params.map_v = tensor_map("v", v, std::uint32_t(block_n), l_inner[1]);
  params.k_l_inner = l_inner[0];
  params.v_l_inner = l_inner[1];
}

}  // namespace kiln::attention_detail
