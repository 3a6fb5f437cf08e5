// attention: argument checks, dispatch by device, tile plans and launches.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numbers>
#include <string>

#include "core/check.hpp"
#include "core/cuda.hpp"
#include "core/log.hpp"
#include "core/tma.hpp"
#include "jit/kernel_cache.hpp"
#include "jit/variants.hpp"
#include "kiln/device.hpp"
#include "ops/attention/attention.hpp"
#include "ops/attention/kernels/params.cuh"

namespace kiln {
namespace attention_detail {
namespace {

constexpr const char* kOp = "attention";
constexpr const char* kKernelSource = "ops/attention/kernels/attention.cuh";
constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 128;

const char* mask_name(int mask) {
  static const char* names[] = {"kiln::kMaskNone", "kiln::kMaskF32", "kiln::kMaskF16",
                                "kiln::kMaskBF16"};
  return names[mask];
}

const char* kv_len_name(int kv_len) {
  static const char* names[] = {"kiln::kKvLenNone", "kiln::kKvLenI32", "kiln::kKvLenI64"};
  return names[kv_len];
}

std::string dims_str(const char* names, std::int64_t a, std::int64_t b, std::int64_t c,
                     std::int64_t d) {
  return std::string(names) + " = " + std::to_string(a) + ", " + std::to_string(b) + ", " +
         std::to_string(c) + ", " + std::to_string(d);
}

void check_head_dim(const char* arg, const TensorView& t, std::int64_t dim) {
  if (dim <= 0 || dim % 8 != 0 || dim > kMaxHeadDim) {
    check::fail(kOp, ErrorCode::invalid_argument,
                std::string(arg) + " has head dim " + std::to_string(dim) + " (shape " +
                    t.shape_str() + "), expected a multiple of 8 in [8, 256]");
  }
}

void check_positive(const char* name, float value) {
  if (!(value > 0.f) || !std::isfinite(value)) {
    check::fail(
        kOp, ErrorCode::invalid_argument,
        std::string(name) + " = " + std::to_string(value) + ", expected a finite value > 0");
  }
}

// Elements the call writes: out's and lse's (validate() checks their shapes first).
std::int64_t out_elements(const TensorView& q, const TensorView& v,
                          const AttentionOptions& options) {
  const std::int64_t rows = q.size(0) * q.size(1) * q.size(2);
  return rows * v.size(3) + (options.lse ? rows : 0);
}

void validate(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
              const AttentionOptions& options) {
  check::dims(kOp, "q", q, 4);
  check::dims(kOp, "k", k, 4);
  check::dims(kOp, "v", v, 4);
  check::dtype_in(kOp, "q", q, {DType::f32, DType::f16, DType::bf16});
  check::dtype_in(kOp, "k", k, {DType::f16, DType::bf16});
  check::dtype_in(kOp, "v", v, {k.dtype()});
  if (q.dtype() != DType::f32 && q.dtype() != k.dtype()) {
    check::fail(kOp, ErrorCode::invalid_argument,
                std::string("q has dtype ") + dtype_name(q.dtype()) + ", expected k's dtype (" +
                    dtype_name(k.dtype()) + ") or f32");
  }
  const std::int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const std::int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  const std::string q_dims = dims_str("N, Hq, Lq, D", N, Hq, Lq, D);
  const std::int64_t k_shape[] = {N, Hkv, Lk, D};
  check::shape(kOp, "k", k, k_shape, "[N, Hkv, Lk, D] with N and D from q (" + q_dims + ")");
  const std::int64_t v_shape[] = {N, Hkv, Lk, Dv};
  check::shape(kOp, "v", v, v_shape, "[N, Hkv, Lk, Dv] with N, Hkv, Lk from k");
  if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0) {
    check::fail(kOp, ErrorCode::invalid_argument,
                "k has " + std::to_string(Hkv) + " heads (shape " + k.shape_str() +
                    "), expected a divisor of q's " + std::to_string(Hq) + " heads (GQA/MQA)");
  }
  // The head-dim limits are the kernels': a call with nothing to compute (no out element, no
  // lse element) returns at once, whatever D and Dv are, as torch does.
  if (out_elements(q, v, options) > 0) {
    check_head_dim("q", q, D);
    check_head_dim("v", v, Dv);
  }
  check::dtype_in(kOp, "out", out, {DType::f32, DType::f16, DType::bf16});
  const std::int64_t out_shape[] = {N, Hq, Lq, Dv};
  check::shape(kOp, "out", out, out_shape, "[N, Hq, Lq, Dv] with " + q_dims + ", Dv from v");
  check::distinct_rows(kOp, "out", out,
                       "a contiguous [N, Hq, Lq, Dv] or a [N, Lq, Hq, Dv] buffer seen transposed");
  check::non_null(kOp, "q", q);
  check::non_null(kOp, "k", k);
  check::non_null(kOp, "v", v);
  check::non_null(kOp, "out", out);
  check::no_overlap(kOp, "out", out, "q", q);
  check::no_overlap(kOp, "out", out, "k", k);
  check::no_overlap(kOp, "out", out, "v", v);
  if (options.scale) check_positive("scale", *options.scale);
  if (options.softcap) check_positive("softcap", *options.softcap);
  if (options.mask) {
    const TensorView& m = *options.mask;
    check::dtype_in(kOp, "mask", m, {DType::f32, DType::f16, DType::bf16});
    const std::int64_t full[] = {N, Hq, Lq, Lk};
    bool ok = m.dim() >= 2 && m.dim() <= 4;
    for (int d = 0; ok && d < m.dim(); ++d) {
      const std::int64_t want = full[4 - m.dim() + d];
      ok = m.size(d) == want || m.size(d) == 1;
    }
    if (!ok) {
      check::fail(kOp, ErrorCode::invalid_argument,
                  "mask has shape " + m.shape_str() + ", expected 2 to 4 dims broadcastable to " +
                      check::shape_str(full) + " [N, Hq, Lq, Lk]");
    }
    check::non_null(kOp, "mask", m);
    check::no_overlap(kOp, "out", out, "mask", m);
  }
  if (options.kv_len) {
    const TensorView& l = *options.kv_len;
    check::dtype_in(kOp, "kv_len", l, {DType::i32, DType::i64});
    const std::int64_t l_shape[] = {N};
    check::shape(kOp, "kv_len", l, l_shape, "[N], N = " + std::to_string(N));
    check::contiguous(kOp, "kv_len", l);
    check::non_null(kOp, "kv_len", l);
    // On CPU the lengths are host memory and checked here; on CUDA they are device memory,
    // which only a synchronization could read, so the kernels clamp them to [0, Lk] instead.
    if (l.device().type == DeviceType::cpu) {
      for (std::int64_t n = 0; n < N; ++n) {
        const std::int64_t keys = l.dtype() == DType::i32
                                      ? std::int64_t(static_cast<const std::int32_t*>(l.data())[n])
                                      : static_cast<const std::int64_t*>(l.data())[n];
        if (keys < 0 || keys > Lk) {
          check::fail(kOp, ErrorCode::invalid_argument,
                      "kv_len[" + std::to_string(n) + "] = " + std::to_string(keys) +
                          ", expected 0 <= kv_len <= Lk = " + std::to_string(Lk));
        }
      }
    }
  }
  if (options.lse) {
    const TensorView& l = *options.lse;
    check::dtype_in(kOp, "lse", l, {DType::f32});
    const std::int64_t l_shape[] = {N, Hq, Lq};
    check::shape(kOp, "lse", l, l_shape, "[N, Hq, Lq] with " + q_dims);
    check::contiguous(kOp, "lse", l);
    check::non_null(kOp, "lse", l);
    check::no_overlap(kOp, "lse", l, "out", out);
    check::no_overlap(kOp, "lse", l, "q", q);
    check::no_overlap(kOp, "lse", l, "k", k);
    check::no_overlap(kOp, "lse", l, "v", v);
  }
}

// The CUDA kernels move 16-byte chunks of rows: the last dim contiguous, every other stride a
// whole number of chunks, the start 16-byte aligned.
void check_rows_16b(const char* arg, const TensorView& t) {
  if (t.numel() == 0) return;  // nothing to load
  const std::int64_t per_chunk = 16 / std::int64_t(dtype_size(t.dtype()));
  bool ok = t.stride(3) == 1 && aligned(t.data(), 16);
  for (int d = 0; ok && d < 3; ++d) ok = t.size(d) == 1 || t.stride(d) % per_chunk == 0;
  if (!ok) {
    std::string strides;
    for (std::int64_t s : t.strides()) strides += (strides.empty() ? "" : ", ") + std::to_string(s);
    check::fail(kOp, ErrorCode::unsupported,
                std::string(arg) + " has strides [" + strides +
                    "] and a start 16-byte aligned: " + (aligned(t.data(), 16) ? "yes" : "no") +
                    "; the CUDA kernel expects the last dim contiguous, the other strides "
                    "multiples of " +
                    std::to_string(per_chunk) + " elements and a 16-byte-aligned start");
  }
}

int mask_kind(const AttentionOptions& options) {
  if (!options.mask) return kMaskNone;
  switch (options.mask->dtype()) {
    case DType::f32:
      return kMaskF32;
    case DType::f16:
      return kMaskF16;
    default:
      return kMaskBF16;
  }
}

int kv_len_kind(const AttentionOptions& options) {
  if (!options.kv_len) return kKvLenNone;
  return options.kv_len->dtype() == DType::i32 ? kKvLenI32 : kKvLenI64;
}

// KILN_ATTENTION_TILE="warps_m,warps_n,block_n,stages[,splits]" replaces the launcher's tile
// choice and, with a fifth field, its split count (for tuning sweeps; see NOTES.md); a malformed
// value is an error, not ignored. The splits are sized again for the new tile unless given.
void apply_tile_override(Plan& plan, long long batch_kv_heads, long long lq, long long lk,
                         int sm_count, int smem_per_sm) {
  const char* text = std::getenv("KILN_ATTENTION_TILE");
  if (text == nullptr || *text == '\0') return;
  int wm = 0, wn = 0, bn = 0, st = 0, splits = 0;
  char tail = 0;
  const int got = std::sscanf(text, "%d,%d,%d,%d,%d%c", &wm, &wn, &bn, &st, &splits, &tail);
  const bool ok = (got == 4 || (got == 5 && splits >= 1 && splits <= kMaxSplits)) &&
                  (wm == 1 || wm == 2 || wm == 4 || wm == 8) &&
                  (wn == 1 || wn == 2 || wn == 4 || wn == 8) && bn % (16 * wn) == 0 && bn > 0 &&
                  bn <= 256 && st >= 2 && st <= 6;
  if (!ok) {
    check::fail(kOp, ErrorCode::invalid_argument,
                std::string("KILN_ATTENTION_TILE is '") + text +
                    "', expected 'warps_m,warps_n,block_n,stages[,splits]' with warps in {1, 2, 4, "
                    "8}, block_n a multiple of 16 * warps_n up to 256, 2 to 6 stages and 1 to " +
                    std::to_string(kMaxSplits) + " splits");
  }
  log::warning_once(std::string("attention_tile_") + text,
                    std::string("attention: tile from KILN_ATTENTION_TILE=") + text);
  plan.warps_m = wm, plan.warps_n = wn, plan.block_n = bn, plan.stages = st;
  size_splits(plan, batch_kv_heads, lq, lk, sm_count, smem_per_sm);
  if (got == 5) plan.splits = splits;
}

// KILN_ATTENTION_LOADS picks how decode loads K/V on sm_90a: "tma" (the default where the call
// allows it: D and Dv multiples of 64, views a tensor map can describe; an error where it does
// not) or "cp.async" (the sm_80 path, for tests and comparisons); unset or empty: the default.
enum class Loads { automatic, cp_async, tma };

Loads requested_loads() {
  const char* text = std::getenv("KILN_ATTENTION_LOADS");
  if (text == nullptr || *text == '\0') return Loads::automatic;
  const std::string value = text;
  if (value != "tma" && value != "cp.async") {
    check::fail(kOp, ErrorCode::invalid_argument,
                "KILN_ATTENTION_LOADS is '" + value + "', expected 'tma' or 'cp.async'");
  }
  log::warning_once("attention_loads_" + value,
                    "attention: decode K/V loads from KILN_ATTENTION_LOADS=" + value);
  return value == "tma" ? Loads::tma : Loads::cp_async;
}

int smem_per_sm(int device) {
  int bytes = 0;
  cuda::check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
              kOp, "cudaDeviceGetAttribute(MaxSharedMemoryPerMultiprocessor)");
  return bytes;
}

void run_cuda(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
              const AttentionOptions& options, float scale, Stream stream) {
  check_rows_16b("q", q);
  check_rows_16b("k", k);
  check_rows_16b("v", v);
  check_rows_16b("out", out);
  // Lk = 0 (every row gives zeros) takes the mma.sync kernel: a TMA map needs sizes > 0.
  if (k.size(2) > 0 && prefill_sm90_takes(q, k, v, options)) {
    run_prefill_sm90(q, k, v, out, options, scale, stream);
    return;
  }
  const std::int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2);
  const std::int64_t Hkv = k.size(1), Lk = k.size(2);
  const int group = int(Hq / Hkv);
  if (N * Hkv > 65535 || Lq * group > std::int64_t(INT_MAX) * 16) {
    check::fail(kOp, ErrorCode::unsupported,
                "N * Hkv = " + std::to_string(N * Hkv) +
                    " and Lq * Hq / Hkv = " + std::to_string(Lq * group) +
                    ", expected at most 65535 and 2^31 * 16 (the grid's y and x)");
  }
  const int device = q.device().index;
  const int sms = cuda::sm_count(kOp, device), smem = smem_per_sm(device);
  const Loads loads = requested_loads();
  const bool has_tma = Lk > 0 && loads != Loads::cp_async && cuda_arch(device) == "sm_90a" &&
                       tma::compatible(k, 3) && tma::compatible(v, 3) && Lk <= INT_MAX;
  Plan plan = make_plan(q.dtype(), k.dtype(), out.dtype(), int(q.size(3)), int(v.size(3)), group,
                        options.causal, mask_kind(options), kv_len_kind(options),
                        bool(options.softcap), N * Hkv, Lq, Lk, sms, smem, has_tma);
  if (loads == Loads::tma && Lq * group <= 16 && !plan.tma) {
    check::fail(kOp, ErrorCode::unsupported,
                "KILN_ATTENTION_LOADS=tma, but this decode call cannot load K/V by TMA (it needs "
                "an sm_90a device, D and Dv multiples of 64 and K/V views with 16-byte-multiple "
                "strides); got " +
                    cuda_arch(device) + ", D = " + std::to_string(q.size(3)) +
                    ", Dv = " + std::to_string(v.size(3)));
  }
  apply_tile_override(plan, N * Hkv, Lq, Lk, sms, smem);

  AttentionParams params{};
  params.q = q.data();
  params.k = k.data();
  params.v = v.data();
  params.out = out.data();
  params.lse = options.lse ? static_cast<float*>(options.lse->data()) : nullptr;
  params.mask = options.mask ? options.mask->data() : nullptr;
  params.kv_len = options.kv_len ? options.kv_len->data() : nullptr;
  for (int d = 0; d < 4; ++d) {
    params.q_stride[d] = q.stride(d);
    params.k_stride[d] = k.stride(d);
    params.v_stride[d] = v.stride(d);
  }
  std::copy_n(out.strides().begin(), 3, params.out_stride);
  if (options.mask) {
    const TensorView& m = *options.mask;
    for (int d = 0; d < m.dim(); ++d) {
      params.mask_stride[4 - m.dim() + d] = m.size(d) == 1 ? 0 : m.stride(d);
    }
  }
  params.N = N;
  params.Hq = Hq;
  params.Hkv = Hkv;
  params.Lq = Lq;
  params.Lk = Lk;
  constexpr float kLog2e = std::numbers::log2e_v<float>;
  params.scale_log2 = scale * kLog2e;
  if (options.softcap) {
    params.softcap_log2 = *options.softcap * kLog2e;
    params.scale_over_softcap = scale / *options.softcap;
  }
  params.splits = plan.splits;
  if (plan.tma) decode_tma_maps(k, v, plan.block_n, params);

  const std::int64_t rows = N * Hq * Lq;
  const dim3 grid(unsigned((Lq * group + plan.block_m() - 1) / plan.block_m()), unsigned(N * Hkv),
                  unsigned(plan.splits));
  std::optional<cuda::StreamScratch> workspace;  // the split-KV partials
  if (plan.splits > 1) {
    // [splits, rows, Dv] partial outputs, [splits, rows] LSEs; one arrival counter per row tile
    // (the kernel's last block per row tile combines and returns the counter to zero), from the
    // stream's counters, or zeroed here after the partials while the stream is being captured.
    const std::size_t floats = std::size_t(plan.splits) * std::size_t(rows) * (v.size(3) + 1);
    const std::size_t counters = std::size_t(grid.x) * grid.y;
    params.arrivals = cuda::stream_counters(kOp, device, stream, counters);
    workspace.emplace(kOp, device, (floats + (params.arrivals ? 0 : counters)) * 4, stream);
    params.o_part = static_cast<float*>(workspace->get());
    params.lse_part = params.o_part + std::size_t(plan.splits) * std::size_t(rows) * v.size(3);
    if (params.arrivals == nullptr) {
      params.arrivals = reinterpret_cast<unsigned*>(params.o_part + floats);
      cuda::check(
          cudaMemsetAsync(params.arrivals, 0, counters * 4, static_cast<cudaStream_t>(stream)), kOp,
          "cudaMemsetAsync(arrival counters)");
    }
  }
  const auto kernel = jit::process_cache().kernel(kernel_spec(plan), device);
  void* args[] = {&params};
  jit::launch(kOp, kernel, grid, dim3(unsigned(plan.threads())), std::size_t(plan.smem_bytes()),
              stream, args);
}

}  // namespace

int resident_blocks(const Plan& plan, int smem_per_sm) {
  // Shared memory (the runtime reserves 1 KB a block) and registers (up to 255 a thread, fewer
  // when the block is too large for that).
  const int threads = plan.threads();
  const int by_smem = smem_per_sm / (plan.smem_bytes() + 1024);
  const int by_registers = 65536 / (threads * std::min(255, 65536 / threads));
  return std::max(1, std::min({by_smem, by_registers, 2048 / threads}));
}

void size_splits(Plan& plan, long long batch_kv_heads, long long lq, long long lk, int sm_count,
                 int smem_per_sm) {
  const long long blocks = (lq * plan.group + plan.block_m() - 1) / plan.block_m() * batch_kv_heads;
  const long long tiles = (lk + plan.block_n - 1) / plan.block_n;
  plan.splits = 1;
  if (lq * plan.group > 16) {
    // Prefill: split only when the row tiles leave SMs idle; aim at two blocks per SM, at least
    // two KV tiles per split.
    if (blocks < sm_count) {
      const long long want = (2LL * sm_count + blocks - 1) / blocks;
      plan.splits = int(std::clamp<long long>(std::min(want, tiles / 2), 1, kMaxSplits));
    }
    return;
  }
  // Decode: the split whose busiest SM streams the fewest tiles, counting whole waves of resident
  // blocks and a fixed cost of two tiles' time a block (pipeline fill, epilogue, combine); ties
  // go to fewer splits. B1 H32 KV 4096 on 132 SMs, 1 block an SM: 4 splits of 8 tiles (10)
  // beat 8 splits in 2 waves (12).
  constexpr long long kBlockCost = 2;
  const long long slots = (long long)sm_count * resident_blocks(plan, smem_per_sm);
  long long best_cost = LLONG_MAX;
  for (long long s = 1; s <= std::min<long long>(tiles, kMaxSplits); ++s) {
    const long long waves = (blocks * s + slots - 1) / slots;
    const long long cost = waves * ((tiles + s - 1) / s + kBlockCost);
    if (cost < best_cost) best_cost = cost, plan.splits = int(s);
  }
}

int Plan::smem_bytes() const {
  return attention_smem_bytes(head_dim, head_dim_v, warps_m, warps_n, block_n, stages, tma);
}

Plan make_plan(DType q, DType kv, DType out, int head_dim, int head_dim_v, int group, bool causal,
               int mask, int kv_len, bool softcap, long long batch_kv_heads, long long lq,
               long long lk, int sm_count, int smem_per_sm, bool has_tma) {
  Plan plan;
  plan.kv = kv;
  plan.q = q;
  plan.out = out;
  plan.head_dim = head_dim;
  plan.head_dim_v = head_dim_v;
  plan.group = group;
  plan.causal = causal;
  plan.mask = mask;
  plan.kv_len = kv_len;
  plan.softcap = softcap;
  // Prefill tiles: the fastest of the v1 sweep (NOTES.md; dev/attention/tiles.py reruns it), 8
  // warps of rows for 64 < D <= 128 (K/V tiles shared by 128 rows) and 2 stages everywhere (the
  // ring's shared memory, not latency, limited blocks per SM). Head dims above 128 keep 32-key
  // tiles (registers).
  const int widest = std::max(head_dim, head_dim_v);
  if (lq * group <= 16) {
    // Decode: one row tile; 4 warps split each KV tile. cp.async: 32 keys a warp (16 above
    // D 128, for registers) and the ring as deep as one block's shared memory allows, up to 4
    // tiles: the fastest of the decode v2 sweep, well ahead of 64-key tiles with the same bytes
    // in flight. TMA: 2 x 64 keys, 16 a warp, the fastest of the decode v4 sweep (ahead of
    // 3 x 128, 6 x 64 and 3 x 64; above D 128 the cp.async rule's tiles, not measured). NOTES.md
    // "decode v2", "decode v4"; dev/attention/tiles.py reruns both sweeps.
    plan.warps_m = 1, plan.warps_n = 4, plan.block_n = widest <= 128 ? 128 : 64;
    plan.tma = has_tma && head_dim % 64 == 0 && head_dim_v % 64 == 0;
    plan.stages = 2;
    if (plan.tma && widest <= 128) {
      plan.block_n = 64;
    } else {
      while (plan.stages < 4) {
        Plan deeper = plan;
        ++deeper.stages;
        if (deeper.smem_bytes() + 1024 > smem_per_sm) break;
        plan = deeper;
      }
    }
  } else if (widest <= 64) {
    plan.warps_m = 4, plan.warps_n = 1, plan.block_n = 64, plan.stages = 2;
  } else if (widest <= 128) {
    plan.warps_m = 8, plan.warps_n = 1, plan.block_n = 64, plan.stages = 2;
  } else {
    plan.warps_m = 4, plan.warps_n = 1, plan.block_n = 32, plan.stages = 2;
  }
  size_splits(plan, batch_kv_heads, lq, lk, sm_count, smem_per_sm);
  return plan;
}

jit::KernelSpec kernel_spec(const Plan& plan) {
  jit::KernelSpec spec{kKernelSource,
                       "kiln::attention_kernel",
                       {{"T", jit::cpp_type(kOp, plan.kv)},
                        {"TQ", jit::cpp_type(kOp, plan.q)},
                        {"TO", jit::cpp_type(kOp, plan.out)},
                        {"D", std::to_string(plan.head_dim)},
                        {"DV", std::to_string(plan.head_dim_v)},
                        {"WARPS_M", std::to_string(plan.warps_m)},
                        {"WARPS_N", std::to_string(plan.warps_n)},
                        {"BLOCK_N", std::to_string(plan.block_n)},
                        {"STAGES", std::to_string(plan.stages)},
                        {"G", std::to_string(plan.group)},
                        {"CAUSAL", jit::cpp_bool(plan.causal)},
                        {"MASK", mask_name(plan.mask)},
                        {"KV_LEN", kv_len_name(plan.kv_len)},
                        {"SOFTCAP", jit::cpp_bool(plan.softcap)},
                        {"SPLIT", jit::cpp_bool(plan.splits > 1)},
                        {"TMA", jit::cpp_bool(plan.tma)}}};
  if (plan.tma) spec.archs = {"sm_90a"};
  return spec;
}

// Kernel variants a workload needs ("flux", "llm", "attention-head-dims"); jit/variants.hpp.
std::vector<jit::KernelSpec> variants(const std::string& workload) {
  std::vector<jit::KernelSpec> specs;
  // H100 / H200: 132 SMs, 228 KB of shared memory each; the plan is made again on each device.
  constexpr int kSms = 132;
  constexpr int kSmem = 228 * 1024;
  // Decode shapes also get their TMA variant (sm_90a only).
  const auto add = [&](auto... problem) {
    specs.push_back(kernel_spec(make_plan(problem..., kSms, kSmem, false)));
    const Plan hopper = make_plan(problem..., kSms, kSmem, true);
    if (hopper.tma) specs.push_back(kernel_spec(hopper));
  };
  const DType bf = DType::bf16;
  if (workload == "flux") {
    // Flux.1/Flux.2: 24 heads of 128, non-causal, bf16 (and f32 q, as stable-diffusion.cpp
    // passes it); 1536 to 13056 tokens.
    for (long long length : {1536LL, 4608LL, 13056LL}) {
      add(bf, bf, bf, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 24, length, length);
    }
    add(DType::f32, bf, DType::f32, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 24, 4608,
        4608);
    specs.push_back(prefill_sm90_spec(bf, bf, 128, false, kKvLenNone, false));
  } else if (workload == "llm") {
    // Llama-style prefill (causal, D 64 and 128, GQA 1, 4 and 8) and decode with a KV cache
    // (kv_len i32, one new token, GQA 1, 4 and 8).
    for (int d : {64, 128}) {
      for (int group : {1, 4, 8}) {
        add(bf, bf, bf, d, d, group, true, kMaskNone, kKvLenNone, false, 32 / group, 8192, 8192);
        if (group == 1) specs.push_back(prefill_sm90_spec(bf, bf, d, true, kKvLenNone, false));
        add(bf, bf, bf, d, d, group, false, kMaskNone, kKvLenI32, false, 32 / group, 1, 32768);
      }
    }
    add(bf, bf, bf, 128, 128, 1, false, kMaskNone, kKvLenNone, false, 32, 1, 4096);
    add(bf, bf, bf, 128, 128, 4, false, kMaskNone, kKvLenNone, false, 8, 1, 4096);
    add(bf, bf, bf, 64, 64, 1, false, kMaskNone, kKvLenNone, false, 64, 4096, 4096);
    // Gemma 2: softcap 50, head dim 256, GQA 2.
    add(bf, bf, bf, 256, 256, 2, true, kMaskNone, kKvLenNone, true, 8, 4096, 4096);
  } else if (workload == "attention-head-dims") {
    // The head dims in use (SD/SDXL 64 and 40 in fp16, 80, 96, 128, 192, 256) with an additive
    // f16 mask on the fp16 ones.
    for (int d : {40, 64, 80, 96, 128, 192, 256}) {
      add(bf, bf, bf, d, d, 1, false, kMaskNone, kKvLenNone, false, 16, 4096, 4096);
      add(DType::f16, DType::f16, DType::f16, d, d, 1, false, kMaskF16, kKvLenNone, false, 16, 4096,
          77);
    }
  }
  return specs;
}

}  // namespace attention_detail

void attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const AttentionOptions& options, Stream stream) {
  using namespace attention_detail;
  validate(q, k, v, out, options);
  const Device device =
      check::common_device(kOp, {{"q", &q},
                                 {"k", &k},
                                 {"v", &v},
                                 {"out", &out},
                                 {"mask", options.mask ? &*options.mask : nullptr},
                                 {"kv_len", options.kv_len ? &*options.kv_len : nullptr},
                                 {"lse", options.lse ? &*options.lse : nullptr}});
  if (out_elements(q, v, options) == 0) return;
  const float scale = options.scale ? *options.scale : float(1.0 / std::sqrt(double(q.size(3))));
  if (device.type == DeviceType::cpu) {
    reference(q, k, v, out, options, scale);
    return;
  }
  cuda::require_device(kOp, device);
  cuda::DeviceGuard guard(kOp, device.index);
  run_cuda(q, k, v, out, options, scale, stream);
}

}  // namespace kiln
