// Logging to stderr ("kiln: ...") and the environment switches every op reads.
#pragma once

#include <string>
#include <string_view>

namespace kiln::log {

void info(const std::string& message);
void warning(const std::string& message);
// Prints `message` once per process for each distinct `key`.
void warning_once(const std::string& key, const std::string& message);

// True when the variable is set to something other than "", "0", "false", "off".
bool env_flag(const char* name);

// KILN_DISABLE is a comma-separated list of op names whose fused kernels are bypassed in favour
// of their unfused chain (for A/B checks). Read on every call, so tests may change it.
bool op_disabled(std::string_view op);

}  // namespace kiln::log
