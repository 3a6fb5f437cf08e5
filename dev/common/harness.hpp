// What the C++ tuning harnesses share: argument parsing, the no-GPU exit, device buffers, random
// inputs, the error measure against the CPU reference, the timer and the JSON output.
//
// The C++ harnesses exist where only C++ reaches the kernel variant a NOTES figure came from (a
// plan the launcher does not choose); everything else is timed from Python over kiln's public
// API with python/kiln/bench/timing.py. The timer here follows that file's method (see
// median_ms below), so that a figure from either kind of harness means the same thing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kiln/tensor.hpp"

namespace kiln::dev {

// Command-line options "--name value" and flags "--name"; --help prints the usage (the harness's
// header: what it times and how to run it) and the options.
class Args {
 public:
  explicit Args(std::string usage) : usage_(std::move(usage)) {}
  void option(const std::string& name, const std::string& fallback, const std::string& help);
  void flag(const std::string& name, const std::string& help);
  // false after printing the usage for --help; throws std::invalid_argument on a bad argument.
  bool parse(int argc, char** argv);
  std::string get(const std::string& name) const;
  int get_int(const std::string& name) const;
  bool has(const std::string& name) const;  // a flag given, or an option with a value
  // A comma-separated option as its items.
  std::vector<std::string> list(const std::string& name) const;

 private:
  struct Entry {
    std::string value;
    std::string help;
    bool is_flag = false;
    bool given = false;  // a flag on the command line
  };
  std::string usage_;
  std::vector<std::string> order_;
  std::map<std::string, Entry> entries_;
};

// The options every C++ harness takes: --warmup, --reps, --json.
void add_common_options(Args& args);

// A seeded generator whose seed is fresh each run and printed.
class Rng {
 public:
  explicit Rng(const char* harness);
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

// Host bytes of `count` elements of `dtype` (f32 / f16 / bf16), normal with the given mean and
// standard deviation, rounded to the dtype.
std::vector<std::uint8_t> random_host(DType dtype, std::size_t count, Rng& rng, float mean = 0.f,
                                      float stddev = 1.f);

// Device memory, uploaded from host bytes or left uninitialized.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes);
  explicit DeviceBuffer(const std::vector<std::uint8_t>& host);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  void* data() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }
  // Fills every byte with 0xFF: NaN in f32, f16 and bf16, so that an output element a kernel does
  // not write shows up as NaN in the check.
  void poison();
  std::vector<std::uint8_t> download() const;

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// ||got - want|| / ||want|| over `count` elements in f64; throws std::runtime_error when the
// reference is all zeros or `got` holds a NaN.
double relative_error(const void* got, DType got_dtype, const void* want, DType want_dtype,
                      std::size_t count);

// How many input sets of `set_bytes` to cycle through: timing.py's rotation_count (at least 4
// sets and 200 MiB in all, past the L2 of an H100 / H200).
int rotation_count(std::size_t set_bytes);

// timing.py's CudaTimer for a call enqueued on the legacy default stream: `warmup` untimed calls,
// then `reps` calls, each queued behind a gate that holds the stream until the call and its two
// events are enqueued (a host function that waits for the host, where timing.py queues a sleep
// kernel: launch overhead is left out either way), timed by CUDA events; returns the median in
// ms. Call i takes input set i % sets. A call that waits for the stream itself (a synchronous
// copy) would wait on the gate: the gate gives up after 2 s and the timer throws.
double median_ms(int sets, const std::function<void(int set)>& call, int warmup, int reps);

// "NVIDIA H200 (sm_90a, 132 SMs)".
std::string device_description(int device);

// The results of one harness run: rows of fields, printed as a table and written as JSON.
class Results {
 public:
  Results(std::string harness, std::string command) : harness_(harness), command_(command) {}
  void add(std::map<std::string, std::string> row, std::vector<std::string> columns);
  // Writes {"harness", "command", "device", "rows"} to `path` ("" writes nothing); numbers that
  // parse as numbers are written as numbers.
  void write_json(const std::string& path, int device) const;

 private:
  std::string harness_;
  std::string command_;
  std::vector<std::map<std::string, std::string>> rows_;
};

// A harness's main around its two parts: `prepare` reads the parsed options (so that a bad option
// fails with or without a GPU), `run` times, adding rows to `results`. --help prints the usage and
// exits 0; without a CUDA device it prints so and exits 0; the JSON goes to --json, else to
// $OUT/<harness>.json when OUT is set; an exception prints "<harness>: <what>" and exits 1.
int run_harness(const char* harness, Args& args, int argc, char** argv,
                const std::function<void()>& prepare,
                const std::function<void(Rng& rng, Results& results)>& run);

// Prints "<what>: not run: <the error's first line>" for a configuration the kernel refused (a tile
// outside its limits: a compile error or a launch error).
void not_run(const std::string& what, const std::exception& error);

// "%.4f"-style formatting without iostreams.
std::string fixed(double value, int digits);

}  // namespace kiln::dev
