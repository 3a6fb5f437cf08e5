// The op-case harness, after ggml's test-backend-ops: each op family registers tables of cases,
// and one driver runs every case on every backend it names (the CPU backend, kiln's reference
// path; CUDA where a GPU exists, "skipped" where none does) against the case's oracle, with the
// one tolerance policy of tolerance.hpp. Inputs are random and fresh every run (KILN_SEED replays
// a failure's), outputs start poisoned (NaN), every allocation has guard bands, and a perf mode
// times the CUDA cases. tests/README.md says how to add an op; kiln_tests --help lists the
// selections scripts/gpu_check.sh makes (the GPU set, the sanitizer subset).
//
// An op is a struct of static functions (tests/ops/rope_flux/test_rope_flux.cpp is one):
//   using Case = ...;   a row of its case tables, with std::string name() const
//   build(const Case&, Tensors&, Rng&)                 declares the tensors, fills the inputs
//   run(const Case&, const Views&, Stream)             calls kiln on the views (host or device)
//   expect(const Case&, CaseRun&) -> vector<Expected>  what each output must match, how closely
// and, where the op needs them:
//   runs_on(const Case&, Backend) -> bool   which of the table's backends take the case
//   skip(const Case&) -> string             why this CUDA device cannot run it ("": it can)
//   prepare(const Case&, Views&, Stream)    work done once before the op, not timed
//   also(const Case&, CaseRun&)             more checks on the backend after the comparison
//   flops(const Case&) -> double            floating-point operations, for the perf mode
#pragma once

#include <any>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kiln/tensor.hpp"
#include "support/buffers.hpp"
#include "support/tolerance.hpp"

namespace kiln::test {

enum class Backend { cpu, cuda };
const char* backend_name(Backend backend);  // "cpu", "cuda"

using Dims = std::vector<std::int64_t>;

// The parts written one after the other ("N", 2, "_", dtype_name(d)): case names.
template <typename... T>
std::string cat(const T&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

// Tensors by name, as one backend sees them.
struct Views {
  TensorView operator[](const std::string& name) const { return views.at(name); }
  std::optional<TensorView> optional(const std::string& name) const {
    const auto it = views.find(name);
    return it == views.end() ? std::nullopt : std::optional<TensorView>(it->second);
  }
  std::map<std::string, TensorView> views;
  std::any prepared;  // what the op's prepare() left for run() (a prepared weight, say)
};

// The tensors of one case, in host memory: each an allocation (guard bands on both sides,
// poisoned) and the view the op sees into it. On the CUDA backend every allocation is mirrored
// with the same offsets and strides.
class Tensors {
 public:
  enum class Role { input, output, host };
  explicit Tensors(Device device) : device_(device) {}
  // The device the op will run on (the tensors here are host memory either way).
  Device device() const { return device_; }

  // A new allocation of `extent` elements (0: just the view's reach) seen as `shape` with
  // `strides` (empty: row-major) from element `offset`; returns the host view.
  TensorView input(const std::string& name, DType dtype, const Dims& shape,
                   const Dims& strides = {}, std::int64_t offset = 0, std::int64_t extent = 0) {
    return add(name, Role::input, dtype, shape, strides, offset, extent);
  }
  // The same, left poisoned for the op to write.
  TensorView output(const std::string& name, DType dtype, const Dims& shape,
                    const Dims& strides = {}, std::int64_t offset = 0, std::int64_t extent = 0) {
    return add(name, Role::output, dtype, shape, strides, offset, extent);
  }
  // An allocation of `extent` elements seen only through views (a packed tensor's slices).
  void parent(const std::string& name, DType dtype, std::int64_t extent);
  // A view into `parent`'s allocation, from element `offset` (of `dtype`) of it.
  TensorView view(const std::string& name, const std::string& parent, DType dtype,
                  const Dims& shape, const Dims& strides, std::int64_t offset) {
    return attach(name, allocation_of(parent), dtype, shape, strides, offset);
  }
  // Data for the oracle only, never uploaded (positions behind a rotation table, say).
  TensorView host(const std::string& name, DType dtype, const Dims& shape) {
    return add(name, Role::host, dtype, shape, {}, 0, 0);
  }
  // Fills every element of the allocation `name` (or of the view `name`) with uniform values in
  // [lo, hi).
  void fill(const std::string& name, Rng& rng, float lo = -1.f, float hi = 1.f);

  const Views& views() const { return views_; }

  struct Allocation {
    std::unique_ptr<HostBuffer> buffer;
    Role role;
    DType dtype;
    std::vector<std::string> names;  // its own, then its views'
  };
  struct Entry {
    std::string name;
    std::size_t allocation;
    std::int64_t byte_offset;
  };
  const std::vector<Allocation>& allocations() const { return allocations_; }
  const std::vector<Entry>& entries() const { return entries_; }

 private:
  TensorView add(const std::string& name, Role role, DType dtype, const Dims& shape,
                 const Dims& strides, std::int64_t offset, std::int64_t extent);
  TensorView attach(const std::string& name, std::size_t allocation, DType dtype, const Dims& shape,
                    const Dims& strides, std::int64_t offset);
  std::size_t allocation_of(const std::string& name) const;
  Device device_;
  std::vector<Allocation> allocations_;
  std::vector<Entry> entries_;
  Views views_;
};

// One case on one backend: the host tensors, their device mirror and a stream (on CUDA), the op.
class CaseRun {
 public:
  using Build = std::function<void(Tensors&, Rng&)>;
  using Op = std::function<void(const Views&, Stream)>;
  using Prepare = std::function<void(Views&, Stream)>;
  CaseRun(Backend backend, Rng& rng, const Build& build, Op op = {}, Prepare prepare = {});
  ~CaseRun();
  CaseRun(const CaseRun&) = delete;
  CaseRun& operator=(const CaseRun&) = delete;

  Backend backend() const { return backend_; }
  Rng& rng() { return rng_; }
  Stream stream() const { return stream_; }
  // The host tensors: inputs as built (on the CPU backend, also what the op wrote).
  const Views& host() const { return host_views_; }
  // The tensors the op runs on (device pointers on CUDA).
  Views& views() { return backend_ == Backend::cpu ? host_views_ : device_views_; }
  // Host copies of views() as they are now: the backend's outputs.
  const Views& got();
  // The op on the CPU backend over host(): kiln's reference path, run once (CUDA backend only).
  const Views& cpu();
  // prepare() once, then the op on views(), synchronized.
  void prepare();
  void run();
  // The names of the outputs.
  std::vector<std::string> outputs() const;
  // The names of the tensors sharing an allocation whose guard bands were written.
  std::vector<std::string> written_guards() const;
  // Bytes of the inputs and outputs the op sees (views, not allocations).
  double bytes_moved() const;

 private:
  // host_views_ with the allocations that have a base moved there.
  Views rebased(const std::vector<void*>& bases, Device device) const;
  Backend backend_;
  Rng& rng_;
  Op op_;
  Prepare prepare_;
  bool prepared_ = false, cpu_ran_ = false;
  Stream stream_ = nullptr;
  Tensors host_;
  Views host_views_;  // host_.views(), with what prepare() leaves on the CPU backend
  std::vector<std::unique_ptr<DeviceBuffer>> device_;
  Views device_views_;
  std::vector<std::unique_ptr<HostBuffer>> downloads_;
  Views got_;
};

// How a table's cases run. Designated initializers keep this order.
struct TableOptions {
  std::vector<Backend> backends = {Backend::cpu, Backend::cuda};
  bool sanitize = false;  // its CUDA runs are in the sanitizer subset
  bool twice = false;     // CUDA: the op runs again and every output must keep its bits
  bool graph = false;     // CUDA: the op is captured in a CUDA graph and run by replays
  std::vector<std::pair<std::string, std::string>> env = {};  // set while the op runs
  std::string (*skip)() = nullptr;  // CUDA: a reason this device cannot run the table ("": can)
};

// One case of a table on one backend, as the driver runs it.
struct OpCase {
  std::string table, name;
  Backend backend;
  TableOptions options;
  CaseRun::Build build;
  CaseRun::Op run;
  CaseRun::Prepare prepare;
  std::function<std::vector<Expected>(CaseRun&)> expect;
  std::function<void(CaseRun&)> also;
  std::function<std::string()> skip;
  double flops = 0;
};
void check_case(const OpCase& c);  // the test: run, compare, guard bands
void time_case(const OpCase& c);   // the perf mode: median device time, bandwidth, FLOP rate

// The registry: every op case and every test that needs a GPU, what scripts/gpu_check.sh selects.
struct Entry {
  std::string suite, name;
  Backend backend;
  bool sanitize;
  std::function<void()> body;
  std::function<void()> time;  // the perf mode (op cases on CUDA)
  const char* file;
  int line;
};
// Adds entries; `expand` runs once, in main, before the tests are registered with GoogleTest.
bool add_entries(std::function<void(std::vector<Entry>&)> expand);
std::vector<Entry>& entries();

// Registers a table: each case on each backend of `options` (that the op's runs_on takes) is the
// test "<table>.<backend>/<case name>".
template <typename Op>
bool register_cases(const char* table, std::vector<typename Op::Case> (*cases)(),
                    TableOptions options, const char* file, int line) {
  return add_entries([=](std::vector<Entry>& out) {
    for (const typename Op::Case& c : cases()) {
      for (Backend b : options.backends) {
        if constexpr (requires { Op::runs_on(c, b); }) {
          if (!Op::runs_on(c, b)) continue;
        }
        OpCase oc{table, c.name(), b, options, {}, {}, {}, {}, {}, {}, 0};
        oc.build = [c](Tensors& t, Rng& rng) { Op::build(c, t, rng); };
        oc.run = [c](const Views& v, Stream s) { Op::run(c, v, s); };
        oc.expect = [c](CaseRun& r) { return Op::expect(c, r); };
        if constexpr (requires(Views & v) { Op::prepare(c, v, nullptr); }) {
          oc.prepare = [c](Views& v, Stream s) { Op::prepare(c, v, s); };
        }
        if constexpr (requires(CaseRun & r) { Op::also(c, r); }) {
          oc.also = [c](CaseRun& r) { Op::also(c, r); };
        }
        if constexpr (requires { Op::skip(c); }) oc.skip = [c] { return Op::skip(c); };
        if constexpr (requires { Op::flops(c); }) oc.flops = Op::flops(c);
        const bool timed = b == Backend::cuda;
        out.push_back({table, std::string(backend_name(b)) + "/" + oc.name, b,
                       options.sanitize && timed, [oc] { check_case(oc); },
                       timed ? std::function<void()>([oc] { time_case(oc); }) : nullptr, file,
                       line});
      }
    }
  });
}

// An op's argument checks: each row is a call that breaks one argument of `Args` (small valid
// arguments), the error code and the fragments its message must hold.
template <typename Args>
struct ErrorTable {
  struct Row {
    const char* name;
    ErrorCode code;
    std::vector<std::string> fragments;
    void (*call)(Args&);
  };
  void add(const char* name, ErrorCode code, std::vector<std::string> fragments,
           void (*call)(Args&)) {
    rows.push_back({name, code, std::move(fragments), call});
  }
  std::vector<Row> rows;
};

// Registers the rows as CPU tests "<suite>.<name>": each call throws kiln::Error naming `op`
// and the fragments, and leaves the arguments untouched (Args::untouched()).
template <typename Args>
bool register_errors(const char* suite, const char* op, void (*fill)(ErrorTable<Args>&),
                     const char* file, int line) {
  return add_entries([=](std::vector<Entry>& out) {
    ErrorTable<Args> table;
    fill(table);
    for (const auto& row : table.rows) {
      const auto body = [op, row] {
        Args args;
        expect_error(
            op, [&] { row.call(args); }, row.code, row.fragments);
        EXPECT_TRUE(args.untouched()) << "an argument was written before the error";
      };
      out.push_back({suite, row.name, Backend::cpu, false, body, nullptr, file, line});
    }
  });
}

bool register_test(const char* suite, const char* name, Backend backend, bool sanitize,
                   void (*body)(), const char* file, int line);

#define KILN_CONCAT_(a, b) a##b
#define KILN_CONCAT(a, b) KILN_CONCAT_(a, b)
#define KILN_REGISTERED [[maybe_unused]] const bool KILN_CONCAT(kiln_registered_, __COUNTER__)

// KILN_CASES(Op, "Table", cases, .backends = {...}, .sanitize = true, ...): a case table.
#define KILN_CASES(op, table, cases, ...)             \
  KILN_REGISTERED = ::kiln::test::register_cases<op>( \
      table, cases, ::kiln::test::TableOptions{__VA_ARGS__}, __FILE__, __LINE__)

// KILN_ERRORS(Args, "Suite", "kiln::op", rows): an error table.
#define KILN_ERRORS(args, suite, op, rows) \
  KILN_REGISTERED = ::kiln::test::register_errors<args>(suite, op, rows, __FILE__, __LINE__)

// KILN_CUDA_TEST(Suite, Name, sanitize) { body }: a test that needs a GPU ("skipped" without
// one); `sanitize` (true / false) puts it in the sanitizer subset.
#define KILN_CUDA_TEST(suite, name, sanitize)                                           \
  void kiln_cuda_test_##suite##_##name();                                               \
  KILN_REGISTERED =                                                                     \
      ::kiln::test::register_test(#suite, #name, ::kiln::test::Backend::cuda, sanitize, \
                                  kiln_cuda_test_##suite##_##name, __FILE__, __LINE__); \
  void kiln_cuda_test_##suite##_##name()

}  // namespace kiln::test
