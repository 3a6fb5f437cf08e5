#include "jit/dump.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string_view>

#include "core/log.hpp"
#include "jit/disk_cache.hpp"
#include "jit/sources.hpp"

extern char** environ;

namespace kiln::jit {

namespace fs = std::filesystem;

namespace {

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

// The path inside `#include "path"`, or "" when `line` is no quoted include.
std::string_view quoted_include(std::string_view line) {
  std::size_t i = line.find_first_not_of(" \t");
  if (i == std::string_view::npos || line[i] != '#') return {};
  i = line.find_first_not_of(" \t", i + 1);
  if (i == std::string_view::npos || line.substr(i, 7) != "include") return {};
  const std::size_t open = line.find('"', i + 7);
  const std::size_t close = open == std::string_view::npos ? open : line.find('"', open + 1);
  if (close == std::string_view::npos) return {};
  return line.substr(open + 1, close - open - 1);
}

void paste(std::string_view path, std::set<std::string, std::less<>>& pasted, std::string& out) {
  const EmbeddedSource* source = find_source(path);
  if (source == nullptr) {  // not kiln's: NVRTC would fail on it too; keep it as written
    out += "#include \"" + std::string(path) + "\"\n";
    return;
  }
  if (!pasted.emplace(path).second) return;
  out += "// ---- " + std::string(path) + "\n";
  std::string_view text = source->text;
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    const std::string_view line = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    if (const std::string_view include = quoted_include(line); !include.empty()) {
      paste(include, pasted, out);
    } else if (line.find_first_not_of(" \t") != std::string_view::npos &&
               line.substr(line.find_first_not_of(" \t")) == "#pragma once") {
      continue;
    } else {
      out.append(line).append(1, '\n');
    }
  }
}

bool executable(const fs::path& file) { return ::access(file.c_str(), X_OK) == 0; }

std::string find_disassembler() {
  std::vector<fs::path> dirs;
  const std::string path = env("PATH");
  for (std::size_t start = 0; start <= path.size();) {
    const std::size_t end = std::min(path.find(':', start), path.size());
    if (end > start) dirs.emplace_back(path.substr(start, end - start));
    start = end + 1;
  }
  for (const char* root : {"CUDA_HOME", "CUDA_PATH"}) {
    if (const std::string dir = env(root); !dir.empty()) dirs.push_back(fs::path(dir) / "bin");
  }
  dirs.emplace_back("/usr/local/cuda/bin");
  for (const char* tool : {"nvdisasm", "cuobjdump"}) {
    for (const fs::path& dir : dirs) {
      if (executable(dir / tool)) return (dir / tool).string();
    }
  }
  return "";
}

// Runs `argv` with its standard output into `out_file`; returns "" or what failed.
std::string run(const std::vector<std::string>& argv, const fs::path& out_file) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_file.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int error = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) return argv[0] + " could not be started";
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return argv[0] + " failed on " + argv.back();
  }
  return "";
}

std::string write_file(const fs::path& file, std::string_view bytes) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return out ? "" : "cannot write " + file.string();
}

}  // namespace

std::string dump_dir_from_env() { return env("KILN_JIT_DUMP"); }

std::string translation_unit(const KernelSpec& spec) {
  std::string out;
  std::set<std::string, std::less<>> pasted;
  paste(spec.source, pasted, out);
  // NVRTC is given the name to instantiate; nvcc (host code) takes the address instead.
  out += "\n#ifndef __CUDACC_RTC__  // the specialization kiln compiles, for nvcc\n";
  out += "[[maybe_unused]] static void kiln_instantiate() { (void)&" + spec.name_expression() +
         "; }\n#endif\n";
  return out;
}

std::string dump_stem(const KernelSpec& spec, const std::string& arch) {
  const std::size_t colon = spec.kernel.rfind("::");
  const std::string name = colon == std::string::npos ? spec.kernel : spec.kernel.substr(colon + 2);
  char hash[17];
  std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(fnv1a(spec.key())));
  return name + "." + arch + "." + hash;
}

const std::string& disassembler() {
  static const std::string tool = find_disassembler();
  return tool;
}

std::string write_dump(const std::string& dir, const KernelSpec& spec, const Cubin& cubin,
                       const std::string& ptx, const std::string& log) {
  std::error_code error;
  fs::create_directories(dir, error);
  const fs::path stem = fs::path(dir) / dump_stem(spec, cubin.arch);
  const auto with = [&](const char* extension) { return fs::path(stem).concat(extension); };
  const std::string header = "// " + spec.key() + " for " + cubin.arch + " (" + spec.source +
                             "), written by KILN_JIT_DUMP\n";
  for (const std::string& problem :
       {write_file(with(".cu"), header + translation_unit(spec)), write_file(with(".ptx"), ptx),
        write_file(with(".log"), log),
        write_file(with(".cubin"), std::string_view(cubin.image.data(), cubin.image.size()))}) {
    if (!problem.empty()) return problem;
  }
  const std::string& tool = disassembler();
  if (tool.empty()) {
    log::warning_once("jit-dump-sass",
                      "jit: KILN_JIT_DUMP writes no SASS: neither nvdisasm nor cuobjdump is on "
                      "PATH or in $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin");
    return "";
  }
  const bool nvdisasm = fs::path(tool).filename() == "nvdisasm";
  return run(nvdisasm ? std::vector<std::string>{tool, with(".cubin").string()}
                      : std::vector<std::string>{tool, "-sass", with(".cubin").string()},
             with(".sass"));
}

}  // namespace kiln::jit
