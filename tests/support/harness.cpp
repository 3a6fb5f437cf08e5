#include "support/harness.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace kiln::test {
namespace {

void cuda_ok(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

// The element reach of a view: offset + sum (size - 1) * stride + 1 (0 when empty).
std::int64_t reach(std::int64_t offset, const Dims& shape, const Dims& strides) {
  std::int64_t last = offset;
  for (std::size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 0) return 0;
    last += (shape[d] - 1) * strides[d];
  }
  return last + 1;
}

Dims row_major(const Dims& shape) {
  Dims strides(shape.size(), 1);
  for (std::size_t d = shape.size(); d-- > 1;) strides[d - 1] = strides[d] * shape[d];
  return strides;
}

}  // namespace

const char* backend_name(Backend backend) { return backend == Backend::cpu ? "cpu" : "cuda"; }

TensorView Tensors::add(const std::string& name, Role role, DType dtype, const Dims& shape,
                        const Dims& strides, std::int64_t offset, std::int64_t extent) {
  const Dims s = strides.empty() ? row_major(shape) : strides;
  const std::int64_t elements = std::max(extent, reach(offset, shape, s));
  allocations_.push_back(
      {std::make_unique<HostBuffer>(std::size_t(elements) * dtype_size(dtype)), role, dtype, {}});
  return attach(name, allocations_.size() - 1, dtype, shape, s, offset);
}

void Tensors::parent(const std::string& name, DType dtype, std::int64_t extent) {
  allocations_.push_back({std::make_unique<HostBuffer>(std::size_t(extent) * dtype_size(dtype)),
                          Role::input,
                          dtype,
                          {name}});
}

std::size_t Tensors::allocation_of(const std::string& name) const {
  for (std::size_t i = allocations_.size(); i-- > 0;) {
    const auto& names = allocations_[i].names;
    if (std::find(names.begin(), names.end(), name) != names.end()) return i;
  }
  throw std::out_of_range("no tensor named " + name);
}

TensorView Tensors::attach(const std::string& name, std::size_t index, DType dtype,
                           const Dims& shape, const Dims& strides, std::int64_t offset) {
  Allocation& a = allocations_[index];
  const std::int64_t byte_offset = offset * std::int64_t(dtype_size(dtype));
  const std::int64_t end = reach(offset, shape, strides) * std::int64_t(dtype_size(dtype));
  if (end > std::int64_t(a.buffer->bytes())) {
    throw std::out_of_range(name + " reaches past its allocation");
  }
  a.names.push_back(name);
  entries_.push_back({name, index, byte_offset});
  const TensorView v(static_cast<char*>(a.buffer->data()) + byte_offset, dtype, shape, strides);
  views_.views[name] = v;
  return v;
}

void Tensors::fill(const std::string& name, Rng& rng, float lo, float hi) {
  const Allocation& a = allocations_[allocation_of(name)];
  fill_uniform(a.buffer->data(), a.dtype, a.buffer->bytes() / dtype_size(a.dtype), rng, lo, hi);
}

CaseRun::CaseRun(Backend backend, Rng& rng, const Build& build, Op op, Prepare prepare)
    : backend_(backend),
      rng_(rng),
      op_(std::move(op)),
      prepare_(std::move(prepare)),
      host_(backend == Backend::cpu ? Device::cpu() : Device::cuda(0)) {
  build(host_, rng_);
  host_views_ = host_.views();
  if (backend_ == Backend::cpu) return;
  cudaStream_t stream = nullptr;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  stream_ = stream;
  // The device mirror: the same bytes (inputs as filled, outputs poisoned), offsets and strides.
  std::vector<void*> bases;
  for (const Tensors::Allocation& a : host_.allocations()) {
    device_.push_back(a.role == Tensors::Role::host
                          ? nullptr
                          : std::make_unique<DeviceBuffer>(a.buffer->bytes()));
    if (device_.back()) device_.back()->upload(a.buffer->data(), a.buffer->bytes());
    bases.push_back(device_.back() ? device_.back()->data() : nullptr);
  }
  device_views_ = rebased(bases, Device::cuda(0));
  // The poison and the uploads ran on the legacy stream, which the op's stream does not wait for.
  cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

Views CaseRun::rebased(const std::vector<void*>& bases, Device device) const {
  Views v = host_views_;
  for (const Tensors::Entry& e : host_.entries()) {
    if (!bases[e.allocation]) continue;
    const TensorView h = host_views_[e.name];
    v.views[e.name] = TensorView(static_cast<char*>(bases[e.allocation]) + e.byte_offset, h.dtype(),
                                 h.shape(), h.strides(), device);
  }
  return v;
}

CaseRun::~CaseRun() {
  if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

void CaseRun::prepare() {
  if (prepared_) return;
  prepared_ = true;
  if (prepare_) prepare_(views(), stream_);
  cuda_ok(backend_ == Backend::cuda ? cudaStreamSynchronize(static_cast<cudaStream_t>(stream_))
                                    : cudaSuccess,
          "cudaStreamSynchronize");
}

void CaseRun::run() {
  prepare();
  op_(views(), stream_);
  if (backend_ == Backend::cuda) {
    cuda_ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)), "cudaStreamSynchronize");
  }
}

const Views& CaseRun::got() {
  if (backend_ == Backend::cpu) return host_views_;
  downloads_.clear();
  std::vector<void*> bases;
  for (std::size_t i = 0; i < device_.size(); ++i) {
    const bool output = host_.allocations()[i].role == Tensors::Role::output;
    downloads_.push_back(output ? std::make_unique<HostBuffer>(device_[i]->bytes()) : nullptr);
    if (output) device_[i]->download(downloads_.back()->data(), device_[i]->bytes());
    bases.push_back(output ? downloads_.back()->data() : nullptr);
  }
  got_ = rebased(bases, Device::cpu());
  return got_;
}

const Views& CaseRun::cpu() {
  if (backend_ == Backend::cpu) {
    throw std::logic_error("CaseRun::cpu() on the CPU backend: compare it with an oracle instead");
  }
  if (!cpu_ran_) {
    cpu_ran_ = true;
    if (prepare_) prepare_(host_views_, nullptr);
    op_(host_views_, nullptr);
  }
  return host_views_;
}

std::vector<std::string> CaseRun::written_guards() const {
  std::vector<std::string> written;
  const auto& allocations = host_.allocations();
  for (std::size_t i = 0; i < allocations.size(); ++i) {
    const bool host_ok = allocations[i].buffer->guards_intact();
    const bool device_ok = i >= device_.size() || !device_[i] || device_[i]->guards_intact();
    if (!host_ok || !device_ok) {
      for (const std::string& n : allocations[i].names) {
        written.push_back(n + (device_ok ? " (host)" : " (device)"));
      }
    }
  }
  return written;
}

std::vector<std::string> CaseRun::outputs() const {
  std::vector<std::string> names;
  for (const Tensors::Entry& e : host_.entries()) {
    if (host_.allocations()[e.allocation].role == Tensors::Role::output) names.push_back(e.name);
  }
  return names;
}

double CaseRun::bytes_moved() const {
  double bytes = 0;
  for (const Tensors::Entry& e : host_.entries()) {
    if (host_.allocations()[e.allocation].role == Tensors::Role::host) continue;
    const TensorView v = host_.views()[e.name];
    bytes += double(v.numel()) * double(dtype_size(v.dtype()));
  }
  return bytes;
}

namespace {

// The reason a case cannot run here ("": it can).
std::string skip_reason(const OpCase& c) {
  if (c.backend == Backend::cpu) return "";
  if (cuda_device_count() == 0) return "no CUDA device: " + cuda_unavailable_reason();
  if (c.options.skip) {
    if (std::string why = c.options.skip(); !why.empty()) return why;
  }
  return c.skip ? c.skip() : "";
}

// The op on the backend: captured in a graph and replayed, or called; twice when asked, every
// output keeping its bits.
void run_on_backend(const OpCase& c, CaseRun& r) {
  const ScopedEnv env(c.options.env);
  r.prepare();
  if (c.backend == Backend::cpu) return r.run();
  const auto stream = static_cast<cudaStream_t>(r.stream());
  cudaGraphExec_t exec = nullptr;
  if (c.options.graph) {
    cudaGraph_t graph = nullptr;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed), cudaSuccess);
    c.run(r.views(), stream);
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphDestroy(graph), cudaSuccess);
  }
  const auto once = [&] {
    if (exec) {
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    } else {
      r.run();
    }
  };
  once();
  if (c.options.twice) {
    const std::vector<std::string> names = r.outputs();
    std::vector<std::vector<std::uint8_t>> first;
    for (const std::string& n : names) first.push_back(bytes(r.got()[n]));
    once();
    const Views& again = r.got();
    for (std::size_t i = 0; i < names.size(); ++i) {
      EXPECT_TRUE(bytes(again[names[i]]) == first[i])
          << names[i] << ": a second call on the stream gave other bits";
    }
  }
  if (exec) {
    ASSERT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  }
}

}  // namespace

void check_case(const OpCase& c) {
  if (const std::string why = skip_reason(c); !why.empty()) GTEST_SKIP() << why;
  Rng rng;
  CaseRun r(c.backend, rng, c.build, c.run, c.prepare);
  run_on_backend(c, r);
  if (::testing::Test::HasFatalFailure()) return;
  const std::string what = c.table + "." + backend_name(c.backend) + "/" + c.name;
  const std::vector<Expected> expected = c.expect(r);
  const Views& got = r.got();
  for (const Expected& e : expected) expect_match(what + ": " + e.output, got[e.output], e);
  if (c.also) c.also(r);
  const std::vector<std::string> written = r.written_guards();
  for (const std::string& n : written) ADD_FAILURE() << what << ": wrote outside " << n;
}

void time_case(const OpCase& c) {
  const std::string what = c.table + "." + backend_name(c.backend) + "/" + c.name;
  if (const std::string why = skip_reason(c); !why.empty()) {
    return void(std::printf("%-100s skipped: %s\n", what.c_str(), why.c_str()));
  }
  Rng rng;
  CaseRun r(c.backend, rng, c.build, c.run, c.prepare);
  const ScopedEnv env(c.options.env);
  const auto stream = static_cast<cudaStream_t>(r.stream());
  // Before each timed call, memsets of twice the L2 evict the inputs from it and keep the GPU busy
  // while the host enqueues the call (for 4x its enqueue time, measured in the warm-up, whose
  // first call compiles), so that launch overhead stays out of the device time.
  int l2 = 0;
  cuda_ok(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0), "cudaDeviceGetAttribute");
  const DeviceBuffer flush(std::max<std::size_t>(2 * std::size_t(l2), 1 << 26));
  constexpr int kReps = 25, kWarmup = 5;
  std::vector<cudaEvent_t> events(2 * kReps + 2);
  for (cudaEvent_t& e : events) cuda_ok(cudaEventCreate(&e), "cudaEventCreate");
  const auto time = [&](int event) {
    float ms = 0;
    cuda_ok(cudaEventElapsedTime(&ms, events[std::size_t(event)], events[std::size_t(event) + 1]),
            "cudaEventElapsedTime");
    return double(ms);
  };
  r.prepare();
  std::vector<double> host_ms, device_ms;
  for (int i = 0; i < kWarmup; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    c.run(r.views(), stream);
    host_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    cuda_ok(cudaEventRecord(events[2 * kReps], stream), "cudaEventRecord");
    cuda_ok(cudaMemsetAsync(flush.data(), 0, flush.bytes(), stream), "cudaMemsetAsync");
    cuda_ok(cudaEventRecord(events[2 * kReps + 1], stream), "cudaEventRecord");
    cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }
  std::sort(host_ms.begin(), host_ms.end());
  const int flushes = 1 + int(4 * host_ms[kWarmup / 2] / std::max(time(2 * kReps), 1e-3));
  for (int i = 0; i < kReps; ++i) {
    for (int f = 0; f < flushes; ++f) {
      cuda_ok(cudaMemsetAsync(flush.data(), 0, flush.bytes(), stream), "cudaMemsetAsync");
    }
    cuda_ok(cudaEventRecord(events[std::size_t(2 * i)], stream), "cudaEventRecord");
    c.run(r.views(), stream);
    cuda_ok(cudaEventRecord(events[std::size_t(2 * i + 1)], stream), "cudaEventRecord");
  }
  cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  for (int i = 0; i < kReps; ++i) device_ms.push_back(time(2 * i));
  for (cudaEvent_t e : events) cudaEventDestroy(e);
  std::sort(device_ms.begin(), device_ms.end());
  const double ms = device_ms[kReps / 2];
  std::printf("%-100s %10.4f ms %9.1f GB/s", what.c_str(), ms, r.bytes_moved() / ms / 1e6);
  if (c.flops > 0) std::printf(" %8.1f TFLOP/s", c.flops / ms / 1e9);
  std::printf("\n");
}

// The registrations, expanded into entries on the first call to entries().
std::vector<std::function<void(std::vector<Entry>&)>> registrations;

bool add_entries(std::function<void(std::vector<Entry>&)> expand) {
  registrations.push_back(std::move(expand));
  return true;
}

std::vector<Entry>& entries() {
  static std::vector<Entry> all;
  for (const auto& expand : registrations) expand(all);
  registrations.clear();
  return all;
}

bool register_test(const char* suite, const char* name, Backend backend, bool sanitize,
                   void (*body)(), const char* file, int line) {
  return add_entries([=](std::vector<Entry>& out) {
    out.push_back({suite, name, backend, sanitize, body, nullptr, file, line});
  });
}

}  // namespace kiln::test
