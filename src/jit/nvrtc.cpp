#include "jit/nvrtc.hpp"

#include <nvrtc.h>

#include <algorithm>
#include <cctype>

#include "core/check.hpp"
#include "jit/sources.hpp"

namespace kiln::jit {

namespace {

// Every embedded source as an NVRTC header, so that `#include "device/numeric.cuh"` resolves
// against the table and never against the toolkit: kernels must compile on machines that have
// only the library. Copied once into std::string so every text and name is NUL-terminated.
struct HeaderTable {
  std::vector<std::string> names;
  std::vector<std::string> texts;
  std::vector<const char*> name_ptrs;
  std::vector<const char*> text_ptrs;

  HeaderTable() {
    for (const EmbeddedSource& s : embedded_sources()) {
      names.emplace_back(s.path);
      texts.emplace_back(s.text);
    }
    for (std::size_t i = 0; i < names.size(); ++i) {
      name_ptrs.push_back(names[i].c_str());
      text_ptrs.push_back(texts[i].c_str());
    }
  }
};

const HeaderTable& headers() {
  static const HeaderTable table;
  return table;
}

// Destroys the program on every exit path, including throws.
struct Program {
  nvrtcProgram handle = nullptr;
  ~Program() {
    if (handle != nullptr) nvrtcDestroyProgram(&handle);
  }
};

std::string what(const KernelSpec& spec, const std::string& arch) {
  return spec.key() + " for " + arch;
}

void check_nvrtc(nvrtcResult status, const char* call, const KernelSpec& spec,
                 const std::string& arch) {
  if (status == NVRTC_SUCCESS) return;
  check::fail(
      "jit", ErrorCode::compile_error,
      std::string(call) + " failed for " + what(spec, arch) + ": " + nvrtcGetErrorString(status));
}

std::string program_log(nvrtcProgram program) {
  std::size_t size = 0;
  if (nvrtcGetProgramLogSize(program, &size) != NVRTC_SUCCESS || size <= 1) return "";
  std::string log(size, '\0');
  if (nvrtcGetProgramLog(program, log.data()) != NVRTC_SUCCESS) return "";
  log.resize(std::min(log.find('\0'), log.size()));  // up to the first NUL (-v leaves two)
  return log;
}

}  // namespace

void check_arch(const std::string& arch) {
  // "sm_" + at least two digits + at most one suffix letter ("a" arch-specific, "f" family).
  std::size_t i = 3;
  bool ok = arch.rfind("sm_", 0) == 0;
  while (ok && i < arch.size() && std::isdigit(static_cast<unsigned char>(arch[i]))) ++i;
  ok = ok && i >= 5 &&
       (i == arch.size() ||
        (i + 1 == arch.size() && std::islower(static_cast<unsigned char>(arch[i]))));
  if (!ok) {
    check::fail("jit", ErrorCode::invalid_argument,
                "arch \"" + arch + "\" is not a CUDA target, expected one like \"sm_90a\"");
  }
}

std::vector<std::string> compile_options(const std::string& arch) {
  // No -I: the toolkit's headers are not a run-time dependency (see HeaderTable).
  return {"--gpu-architecture=" + arch, "-std=c++20", "-lineinfo"};
}

const std::string& nvrtc_version() {
  static const std::string version = [] {
    int major = 0;
    int minor = 0;
    nvrtcVersion(&major, &minor);
    return std::to_string(major) + "." + std::to_string(minor);
  }();
  return version;
}

Cubin compile(const KernelSpec& spec, const std::string& arch, std::string& log,
              const CompileExtras& extras) {
  // The translation unit only includes the kernel's source; the name expression below makes
  // NVRTC instantiate the template and tells us its mangled name.
  const std::string unit = "#include \"" + spec.source + "\"\n";
  const HeaderTable& table = headers();
  Program program;
  check_nvrtc(nvrtcCreateProgram(&program.handle, unit.c_str(), "kiln_jit.cu",
                                 static_cast<int>(table.text_ptrs.size()), table.text_ptrs.data(),
                                 table.name_ptrs.data()),
              "nvrtcCreateProgram", spec, arch);
  const std::string name = spec.name_expression();
  check_nvrtc(nvrtcAddNameExpression(program.handle, name.c_str()), "nvrtcAddNameExpression", spec,
              arch);

  std::vector<std::string> options = compile_options(arch);
  if (extras.ptxas_verbose) options.emplace_back("-Xptxas=-v");  // a report, the same code
  std::vector<const char*> option_ptrs;
  for (const std::string& o : options) option_ptrs.push_back(o.c_str());
  const nvrtcResult status =
      nvrtcCompileProgram(program.handle, static_cast<int>(option_ptrs.size()), option_ptrs.data());
  log = program_log(program.handle);
  if (status != NVRTC_SUCCESS) {
    check::fail("jit", ErrorCode::compile_error,
                "NVRTC failed to compile " + what(spec, arch) + " (" + nvrtcGetErrorString(status) +
                    "):\n" + log);
  }

  if (extras.ptx != nullptr) {
    std::size_t ptx_size = 0;
    check_nvrtc(nvrtcGetPTXSize(program.handle, &ptx_size), "nvrtcGetPTXSize", spec, arch);
    extras.ptx->assign(ptx_size, '\0');
    check_nvrtc(nvrtcGetPTX(program.handle, extras.ptx->data()), "nvrtcGetPTX", spec, arch);
    if (!extras.ptx->empty() && extras.ptx->back() == '\0') extras.ptx->pop_back();
  }

  Cubin cubin;
  cubin.arch = arch;
  cubin.key = spec.key();
  const char* lowered = nullptr;
  check_nvrtc(nvrtcGetLoweredName(program.handle, name.c_str(), &lowered), "nvrtcGetLoweredName",
              spec, arch);
  cubin.lowered_name = lowered;  // owned by the program: copy before it is destroyed
  std::size_t size = 0;
  check_nvrtc(nvrtcGetCUBINSize(program.handle, &size), "nvrtcGetCUBINSize", spec, arch);
  cubin.image.resize(size);
  check_nvrtc(nvrtcGetCUBIN(program.handle, cubin.image.data()), "nvrtcGetCUBIN", spec, arch);
  return cubin;
}

PtxasReport parse_ptxas_report(const std::string& log) {
  // "ptxas info    : Compiling entry function '_Z...' for 'sm_90a'"
  // "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads"
  // "ptxas info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]"
  // The number that ends just before `what` in `line` (0 when there is none).
  const auto number_before = [](const std::string& line, const std::string& what) {
    std::size_t end = line.find(what);
    if (end == std::string::npos) return 0;
    while (end > 0 && line[end - 1] == ' ') --end;
    std::size_t first = end;
    while (first > 0 && std::isdigit(static_cast<unsigned char>(line[first - 1]))) --first;
    return first == end ? 0 : std::stoi(line.substr(first, end - first));
  };
  PtxasReport report;
  std::size_t start = 0;
  while (start < log.size()) {
    std::size_t end = log.find('\n', start);
    if (end == std::string::npos) end = log.size();
    const std::string line = log.substr(start, end - start);
    start = end + 1;
    if (line.find("warning") != std::string::npos) report.warnings.push_back(line);
    if (line.find("Compiling entry function") != std::string::npos) ++report.functions;
    if (line.find(" stack frame") != std::string::npos) {
      report.stack_bytes += number_before(line, " bytes stack frame");
      report.spill_store_bytes += number_before(line, " bytes spill stores");
      report.spill_load_bytes += number_before(line, " bytes spill loads");
    }
    if (line.find("ptxas info") != std::string::npos &&
        line.find(" registers") != std::string::npos) {
      report.registers = std::max(report.registers, number_before(line, " registers"));
    }
  }
  return report;
}

}  // namespace kiln::jit
