// KILN_JIT_DUMP without a GPU: what a dump folder holds after a compile, that its translation unit
// compiles alone, and that the disk cache does not hide a kernel from the dump.
#include <gtest/gtest.h>
#include <nvrtc.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "jit/dump.hpp"
#include "jit/kernel_cache.hpp"

namespace kiln::jit {
namespace {

namespace fs = std::filesystem;

const KernelSpec kProbe{"jit/kernels/jit_probe.cuh", "kiln::jit_probe_kernel", {{"N", "7"}}};
// A kernel whose source includes headers that include headers.
const KernelSpec kPrefill{"ops/attention/kernels/prefill_sm90.cuh",
                          "kiln::attention_prefill_sm90",
                          {{"T", "kiln::bf16"},
                           {"TO", "kiln::bf16"},
                           {"D", "64"},
                           {"STAGES", "3"},
                           {"CAUSAL", "false"},
                           {"KV_LEN", "0"},
                           {"SOFTCAP", "false"}},
                          {"sm_90a"}};

std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + file.string());
  return {std::istreambuf_iterator<char>(in), {}};
}

// Whether `word` occurs in `text` exactly once.
bool once(const std::string& text, const std::string& word) {
  const std::size_t at = text.find(word);
  return at != std::string::npos && text.find(word, at + 1) == std::string::npos;
}

class JitDumpTest : public testing::Test {
 protected:
  JitDumpTest() {
    std::string pattern = testing::TempDir() + "kiln-dump-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    root_ = pattern;
  }
  ~JitDumpTest() override {
    std::error_code ignored;
    fs::remove_all(root_, ignored);
  }
  fs::path dump() const { return root_ / "dump"; }
  fs::path file(const KernelSpec& spec, const std::string& arch, const char* extension) const {
    return dump() / (dump_stem(spec, arch) + extension);
  }

  fs::path root_;
};

TEST_F(JitDumpTest, WritesSourcePtxCubinLogAndSass) {
  KernelCache cache({"", false, dump().string()});
  const auto cubin = cache.cubin(kProbe, "sm_80");
  EXPECT_EQ(dump_stem(kProbe, "sm_80").rfind("jit_probe_kernel.sm_80.", 0), 0u);

  const std::string source = read_text(file(kProbe, "sm_80", ".cu"));
  EXPECT_NE(source.find("kiln::jit_probe_kernel<N=7> for sm_80"), std::string::npos);
  EXPECT_NE(source.find("(void)&kiln::jit_probe_kernel<7>;"), std::string::npos);
  const std::string ptx = read_text(file(kProbe, "sm_80", ".ptx"));
  EXPECT_NE(ptx.find(".entry " + cubin->lowered_name), std::string::npos) << ptx;
  const std::string image = read_text(file(kProbe, "sm_80", ".cubin"));
  EXPECT_EQ(image, std::string(cubin->image.begin(), cubin->image.end()));
  const std::string log = read_text(file(kProbe, "sm_80", ".log"));
  EXPECT_NE(log.find("Used "), std::string::npos) << log;  // ptxas's report
  EXPECT_EQ(log.find('\0'), std::string::npos);

  if (disassembler().empty()) {
    EXPECT_FALSE(fs::exists(file(kProbe, "sm_80", ".sass")));
  } else {
    const std::string sass = read_text(file(kProbe, "sm_80", ".sass"));
    EXPECT_NE(sass.find(cubin->lowered_name), std::string::npos);
    EXPECT_NE(sass.find("EXIT"), std::string::npos) << sass;
  }
}

TEST_F(JitDumpTest, TranslationUnitPastesEachHeaderOnceAndCompilesAlone) {
  const std::string unit = translation_unit(kPrefill);
  EXPECT_EQ(unit.find("#include"), std::string::npos);
  EXPECT_EQ(unit.find("#pragma once"), std::string::npos);
  EXPECT_TRUE(once(unit, "// ---- device/numeric.cuh\n"));
  EXPECT_TRUE(once(unit, "// ---- ops/attention/kernels/prefill_sm90.cuh\n"));

  // NVRTC with no headers at all: the unit must stand alone.
  nvrtcProgram program = nullptr;
  ASSERT_EQ(nvrtcCreateProgram(&program, unit.c_str(), "unit.cu", 0, nullptr, nullptr),
            NVRTC_SUCCESS);
  ASSERT_EQ(nvrtcAddNameExpression(program, kPrefill.name_expression().c_str()), NVRTC_SUCCESS);
  const char* options[] = {"--gpu-architecture=sm_90a", "-std=c++20"};
  const nvrtcResult status = nvrtcCompileProgram(program, 2, options);
  std::size_t log_size = 0;
  nvrtcGetProgramLogSize(program, &log_size);
  std::string log(log_size, '\0');
  nvrtcGetProgramLog(program, log.data());
  EXPECT_EQ(status, NVRTC_SUCCESS) << log;
  std::size_t ptx_size = 0;
  nvrtcGetPTXSize(program, &ptx_size);
  std::string ptx(ptx_size, '\0');
  nvrtcGetPTX(program, ptx.data());
  nvrtcDestroyProgram(&program);
  EXPECT_NE(ptx.find(".entry _ZN4kiln22attention_prefill_sm90"), std::string::npos);
}

TEST_F(JitDumpTest, DiskCacheIsWrittenButNotReadWhileDumping) {
  const std::string dir = (root_ / "cache").string();
  {
    KernelCache cold({dir, false});
    cold.cubin(kProbe, "sm_80");
  }
  KernelCache dumping({dir, false, dump().string()});
  dumping.cubin(kProbe, "sm_80");
  EXPECT_EQ(dumping.stats().compiles, 1u);
  EXPECT_EQ(dumping.stats().disk_hits, 0u);
  EXPECT_TRUE(fs::exists(file(kProbe, "sm_80", ".cu")));
}

TEST_F(JitDumpTest, DumpingIntoACacheFolderNotMadeYetStoresTheEntry) {
  const fs::path dir = root_ / "cache" / "new";
  KernelCache dumping({dir.string(), false, dump().string()});
  dumping.cubin(kProbe, "sm_80");
  EXPECT_EQ(dumping.stats().compiles, 1u);
  EXPECT_EQ(dumping.stats().disk_writes, 1u);
  EXPECT_EQ(dumping.list().size(), 1u);
  EXPECT_TRUE(fs::exists(file(kProbe, "sm_80", ".cu")));
}

TEST(JitDumpConfigTest, FolderFromEnvironment) {
  const char* old = std::getenv("KILN_JIT_DUMP");
  const std::string saved = old ? old : "";
  ::setenv("KILN_JIT_DUMP", "/x/dump", 1);
  EXPECT_EQ(config_from_env().dump, "/x/dump");
  ::unsetenv("KILN_JIT_DUMP");
  EXPECT_EQ(config_from_env().dump, "");
  if (old) ::setenv("KILN_JIT_DUMP", saved.c_str(), 1);
}

}  // namespace
}  // namespace kiln::jit
