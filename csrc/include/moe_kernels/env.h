// Integer settings from the environment (tuning knobs and sanitizer modes). Callers read theirs once,
// into a function-local static, so no launch pays for getenv.
#pragma once

#include <cstdlib>

namespace moe_kernels {

// The value of `name` as a decimal integer; `fallback` when it is unset, empty or not a number.
inline int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return fallback;
  }
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  return *end == '\0' ? static_cast<int>(parsed) : fallback;
}

}  // namespace moe_kernels
