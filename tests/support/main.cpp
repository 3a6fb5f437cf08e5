// kiln_tests: GoogleTest's main, with the registry's selections and the perf mode.
#include <cstdio>
#include <cstring>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "support/harness.hpp"

namespace {

using kiln::test::Backend;
using kiln::test::Entry;

constexpr const char* kUsage =
    R"(kiln_tests: GoogleTest's flags, and the registry's (tests/README.md):
  --kiln_select=cuda|sanitize|cpu  run what needs a GPU | the sanitizers' subset | the rest
  --kiln_list[=cuda|sanitize|cpu]  print the registry (or that subset) and exit
  --kiln_perf[=TEXT]               time the CUDA op cases whose name holds TEXT
  KILN_SEED=N                      replay a failure's random inputs (its message names the seed)
)";

class EntryTest : public ::testing::Test {
 public:
  explicit EntryTest(const Entry* entry) : entry_(entry) {}
  void TestBody() override {
    if (entry_->backend == Backend::cuda) KILN_REQUIRE_GPU();
    entry_->body();
  }

 private:
  const Entry* entry_;
};

bool in(const Entry& e, const std::string& subset) {
  return subset == "all" || (subset == "sanitize" && e.sanitize) ||
         subset == kiln::test::backend_name(e.backend);
}

// "--name=value": value; "--name": `bare`; absent: nullptr.
const char* flag(int argc, char** argv, const char* name, const char* bare) {
  for (int i = 1; i < argc; ++i) {
    const std::size_t n = std::strlen(name);
    if (std::strncmp(argv[i], name, n) == 0 && argv[i][n] == '=') return argv[i] + n + 1;
    if (std::strcmp(argv[i], name) == 0) return bare;
  }
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  const bool help = flag(argc, argv, "--help", "") || flag(argc, argv, "-h", "");
  ::testing::InitGoogleTest(&argc, argv);
  bool unknown = false;
  for (int i = 1; i < argc; ++i) unknown |= std::strncmp(argv[i], "--kiln_", 7) != 0;
  if (help || unknown) {
    std::printf("%s", kUsage);
    return help ? 0 : 2;
  }
  std::vector<Entry>& entries = kiln::test::entries();
  std::set<std::string> seen;
  for (const Entry& e : entries) {
    const std::string name = e.suite + "." + e.name;
    if (!seen.insert(name).second || name.find_first_of(":-*?") != std::string::npos) {
      std::fprintf(stderr, "kiln_tests: %s is registered twice or holds : - * ?\n", name.c_str());
      return 2;
    }
    ::testing::RegisterTest(e.suite.c_str(), e.name.c_str(), nullptr, nullptr, e.file, e.line,
                            [&e]() -> ::testing::Test* { return new EntryTest(&e); });
  }
  if (const char* subset = flag(argc, argv, "--kiln_list", "all")) {
    for (const Entry& e : entries) {
      if (in(e, subset)) {
        std::printf("%-4s %-8s %s.%s\n", kiln::test::backend_name(e.backend),
                    e.sanitize ? "sanitize" : "", e.suite.c_str(), e.name.c_str());
      }
    }
    return 0;
  }
  if (const char* text = flag(argc, argv, "--kiln_perf", "")) {
    if (kiln::cuda_device_count() == 0) {
      std::printf("no CUDA device (%s): nothing timed\n", kiln::cuda_unavailable_reason().c_str());
      return 0;
    }
    for (const Entry& e : entries) {
      if (e.time && (e.suite + "." + e.name).find(text) != std::string::npos) e.time();
    }
    return 0;
  }
  if (const char* subset = flag(argc, argv, "--kiln_select", "all")) {
    // GoogleTest's filter, from the registry: the subset's names (cpu: all but the CUDA ones).
    const bool cpu = std::strcmp(subset, "cpu") == 0;
    std::string names;
    for (const Entry& e : entries) {
      if (in(e, cpu ? "cuda" : subset)) names += e.suite + "." + e.name + ":";
    }
    ::testing::GTEST_FLAG(filter) = cpu ? "*-" + names : names.empty() ? "-*" : names;
  }
  return RUN_ALL_TESTS();
}
