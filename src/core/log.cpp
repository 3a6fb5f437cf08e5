#include "core/log.hpp"

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>

namespace kiln::log {

namespace {
std::mutex& log_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace

void info(const std::string& message) {
  std::lock_guard<std::mutex> lock(log_mutex());
  std::fprintf(stderr, "kiln: %s\n", message.c_str());
}

void warning(const std::string& message) {
  std::lock_guard<std::mutex> lock(log_mutex());
  std::fprintf(stderr, "kiln: warning: %s\n", message.c_str());
}

void warning_once(const std::string& key, const std::string& message) {
  static std::set<std::string> seen;
  {
    std::lock_guard<std::mutex> lock(log_mutex());
    if (!seen.insert(key).second) return;
  }
  warning(message);
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return false;
  const std::string_view s(v);
  return !(s.empty() || s == "0" || s == "false" || s == "off");
}

bool op_disabled(std::string_view op) {
  const char* v = std::getenv("KILN_DISABLE");
  if (v == nullptr) return false;
  std::string_view list(v);
  while (!list.empty()) {
    const auto comma = list.find(',');
    const auto item = list.substr(0, comma);
    if (item == op || item == "all") return true;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return false;
}

}  // namespace kiln::log
