#include "common/harness.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>
#include <utility>

#include "core/numeric.hpp"
#include "kiln/device.hpp"
#include "kiln/jit.hpp"

namespace kiln::dev {

namespace {

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + "\"";
}

bool is_number(const std::string& text) {
  if (text.empty()) return false;
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  return end == text.c_str() + text.size() && std::isfinite(value);
}

}  // namespace

void Args::option(const std::string& name, const std::string& fallback, const std::string& help) {
  order_.push_back(name);
  entries_[name] = {fallback, help, false, false};
}

void Args::flag(const std::string& name, const std::string& help) {
  order_.push_back(name);
  entries_[name] = {"", help, true, false};
}

bool Args::parse(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf("%s\noptions:\n", usage_.c_str());
      for (const std::string& name : order_) {
        const Entry& e = entries_.at(name);
        std::printf("  --%-12s %s%s\n", (name + (e.is_flag ? "" : " V")).c_str(), e.help.c_str(),
                    e.is_flag || e.value.empty() ? "" : (" (default " + e.value + ")").c_str());
      }
      return false;
    }
    const auto it = arg.rfind("--", 0) == 0 ? entries_.find(arg.substr(2)) : entries_.end();
    if (it == entries_.end()) throw std::invalid_argument("unknown argument '" + arg + "'");
    if (it->second.is_flag) {
      it->second.given = true;
    } else if (i + 1 < argc) {
      it->second.value = argv[++i];
    } else {
      throw std::invalid_argument(arg + " needs a value");
    }
  }
  return true;
}

std::string Args::get(const std::string& name) const { return entries_.at(name).value; }

int Args::get_int(const std::string& name) const {
  const std::string text = get(name);
  char* end = nullptr;
  const long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0') {
    throw std::invalid_argument("--" + name + " is '" + text + "', expected an integer");
  }
  return int(value);
}

bool Args::has(const std::string& name) const {
  const Entry& e = entries_.at(name);
  return e.is_flag ? e.given : !e.value.empty();
}

std::vector<std::string> Args::list(const std::string& name) const {
  std::vector<std::string> items;
  const std::string text = get(name);
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    if (comma > start) items.push_back(text.substr(start, comma - start));
    start = comma + 1;
  }
  return items;
}

void add_common_options(Args& args) {
  args.option("warmup", "5", "untimed calls before timing");
  args.option("reps", "50", "timed calls (the median is reported)");
  args.option("json", "", "JSON output path (default $OUT/<harness>.json when OUT is set)");
}

Rng::Rng(const char* harness)
    : engine_(std::random_device{}() ^ (std::uint64_t(std::random_device{}()) << 32)) {
  const std::uint64_t seed = engine_();
  engine_.seed(seed);
  std::printf("%s: seed %llu\n", harness, static_cast<unsigned long long>(seed));
}

std::vector<std::uint8_t> random_host(DType dtype, std::size_t count, Rng& rng, float mean,
                                      float stddev) {
  std::vector<std::uint8_t> bytes(count * dtype_size(dtype));
  std::normal_distribution<float> normal(mean, stddev);
  for (std::size_t i = 0; i < count; ++i) {
    numeric::store_float(bytes.data(), dtype, std::int64_t(i), normal(rng.engine()));
  }
  return bytes;
}

DeviceBuffer::DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
  cuda_check(cudaMalloc(&ptr_, std::max<std::size_t>(bytes, 1)), "cudaMalloc");
}

DeviceBuffer::DeviceBuffer(const std::vector<std::uint8_t>& host) : DeviceBuffer(host.size()) {
  cuda_check(cudaMemcpy(ptr_, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy");
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(other.bytes_) {}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) cudaFree(ptr_);
}

void DeviceBuffer::poison() { cuda_check(cudaMemset(ptr_, 0xFF, bytes_), "cudaMemset"); }

std::vector<std::uint8_t> DeviceBuffer::download() const {
  std::vector<std::uint8_t> host(bytes_);
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cuda_check(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy");
  return host;
}

double relative_error(const void* got, DType got_dtype, const void* want, DType want_dtype,
                      std::size_t count) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const double g = numeric::load_float(got, got_dtype, std::int64_t(i));
    const double w = numeric::load_float(want, want_dtype, std::int64_t(i));
    if (std::isnan(g)) throw std::runtime_error("NaN at element " + std::to_string(i));
    diff += (g - w) * (g - w);
    norm += w * w;
  }
  if (!(norm > 0)) throw std::runtime_error("the reference output is all zeros");
  return std::sqrt(diff / norm);
}

int rotation_count(std::size_t set_bytes) {
  constexpr std::size_t kMinSets = 4;
  constexpr std::size_t kMinRotationBytes = std::size_t(200) << 20;
  const std::size_t sets =
      (kMinRotationBytes + set_bytes - 1) / std::max<std::size_t>(set_bytes, 1);
  return int(std::max(kMinSets, sets));
}

namespace {

struct Gate {
  std::atomic<bool> open{false};
  std::atomic<bool> timed_out{false};
};

void CUDART_CB wait_for_host(void* data) {
  Gate& gate = *static_cast<Gate*>(data);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (!gate.open.load()) {
    if (std::chrono::steady_clock::now() > deadline) {
      gate.timed_out = true;
      return;
    }
    std::this_thread::yield();
  }
}

}  // namespace

double median_ms(int sets, const std::function<void(int set)>& call, int warmup, int reps) {
  for (int i = 0; i < std::max(warmup, 3); ++i) call(i % sets);
  cuda_check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t start = nullptr, end = nullptr;
  cuda_check(cudaEventCreate(&start), "cudaEventCreate");
  cuda_check(cudaEventCreate(&end), "cudaEventCreate");
  std::vector<float> samples;
  for (int i = 0; i < reps; ++i) {
    Gate gate;
    cuda_check(cudaLaunchHostFunc(nullptr, wait_for_host, &gate), "cudaLaunchHostFunc");
    cuda_check(cudaEventRecord(start, nullptr), "cudaEventRecord");
    call(i % sets);
    cuda_check(cudaEventRecord(end, nullptr), "cudaEventRecord");
    gate.open = true;
    cuda_check(cudaEventSynchronize(end), "cudaEventSynchronize");
    if (gate.timed_out) {
      throw std::runtime_error("the timed call waited for its own stream: it cannot be timed");
    }
    float ms = 0;
    cuda_check(cudaEventElapsedTime(&ms, start, end), "cudaEventElapsedTime");
    samples.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  std::nth_element(samples.begin(), samples.begin() + reps / 2, samples.end());
  const float upper = samples[std::size_t(reps / 2)];
  if (reps % 2 == 1) return upper;
  return 0.5 * (upper + *std::max_element(samples.begin(), samples.begin() + reps / 2));
}

std::string device_description(int device) {
  cudaDeviceProp prop{};
  cuda_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return std::string(prop.name) + " (" + cuda_arch(device) + ", " +
         std::to_string(prop.multiProcessorCount) + " SMs)";
}

void Results::add(std::map<std::string, std::string> row, std::vector<std::string> columns) {
  std::string line;
  for (const std::string& column : columns) {
    if (!line.empty()) line += "  ";
    line += column;
    line += ' ';
    line += row.at(column);
  }
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  rows_.push_back(std::move(row));
}

void Results::write_json(const std::string& path, int device) const {
  if (path.empty()) return;
  std::string text = "{\"harness\": ";
  text += json_string(harness_);
  text += ", \"command\": ";
  text += json_string(command_);
  text += ", \"device\": ";
  text += json_string(device_description(device));
  text += ", \"kiln\": ";
  text += json_string(jit::version());
  text += ", \"rows\": [";
  for (std::size_t r = 0; r < rows_.size(); ++r) {
    text += r == 0 ? "\n  {" : ",\n  {";
    bool first = true;
    for (const auto& [key, value] : rows_[r]) {
      if (!first) text += ", ";
      text += json_string(key);
      text += ": ";
      text += is_number(value) ? value : json_string(value);
      first = false;
    }
    text += "}";
  }
  text += "\n]}\n";
  std::ofstream file(path);
  file << text;
  if (!file) throw std::runtime_error("could not write " + path);
  std::printf("wrote %s\n", path.c_str());
}

int run_harness(const char* harness, Args& args, int argc, char** argv,
                const std::function<void()>& prepare,
                const std::function<void(Rng& rng, Results& results)>& run) {
  try {
    if (!args.parse(argc, argv)) return 0;
    prepare();
    if (cuda_device_count() == 0) {
      std::printf("%s: no CUDA device (%s): nothing to time\n", harness,
                  cuda_unavailable_reason().c_str());
      return 0;
    }
    std::printf("%s on %s\n", harness, device_description(0).c_str());
    std::string command;
    for (int i = 0; i < argc; ++i) {
      if (i > 0) command += ' ';
      command += argv[i];
    }
    Rng rng(harness);
    Results results(harness, command);
    run(rng, results);
    std::string path = args.get("json");
    const char* out = std::getenv("OUT");
    if (path.empty() && out != nullptr && *out != '\0') {
      path = out;
      path += '/';
      path += harness;
      path += ".json";
    }
    results.write_json(path, 0);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s: %s\n", harness, error.what());
    return 1;
  }
  return 0;
}

void not_run(const std::string& what, const std::exception& error) {
  const std::string text = error.what();
  std::printf("%s: not run: %s\n", what.c_str(), text.substr(0, text.find('\n')).c_str());
}

std::string fixed(double value, int digits) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", digits, value);
  return text;
}

}  // namespace kiln::dev
