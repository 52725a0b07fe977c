// fastlstm C++ CPU backend: its environment knobs, read strictly. atoll had read "abc" and "true" as 0 and "-5" as
// a negative size, so a misspelt value silently turned a path off; now a value that is not what the knob takes
// warns and leaves the default.
#pragma once

#include <c10/util/Exception.h>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

namespace fastlstm {
namespace {

// The environment variable `name`, spaces around it trimmed; nullopt when unset or blank (`NAME=` in a shell or a
// job's file clears a knob, as it clears the Python side's variables).
inline std::optional<std::string> env_text(const char* name) {
  const char* raw = std::getenv(name);
  if (raw == nullptr) return std::nullopt;
  std::string text(raw);
  const auto space = [](char ch) { return std::isspace(static_cast<unsigned char>(ch)) != 0; };
  while (!text.empty() && space(text.back())) text.pop_back();
  size_t first = 0;
  while (first < text.size() && space(text[first])) ++first;
  if (first == text.size()) return std::nullopt;
  return text.substr(first);
}

// A whole number in [lo, hi] from the environment variable `name`: nullopt when it is unset, or (with a warning
// naming the unit and the default, where given) when it is anything else.
inline std::optional<int64_t> env_int(const char* name, int64_t lo = 0,
                                      int64_t hi = std::numeric_limits<int64_t>::max(), const std::string& unit = "",
                                      const std::string& fallback = "") {
  const auto given = env_text(name);
  if (!given) return std::nullopt;
  const char* text = given->c_str();
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || errno != 0 || value < lo || value > hi) {
    TORCH_WARN(name, "=", std::getenv(name), " is not a whole number", unit.empty() ? "" : " of " + unit, " from ", lo,
               hi == std::numeric_limits<int64_t>::max() ? "" : " to " + std::to_string(hi),
               "; fastlstm keeps its default", fallback.empty() ? "" : ", " + fallback);
    return std::nullopt;
  }
  return value;
}

// A switch from the environment variable `name`: 1 or 0 (also true/false, on/off, yes/no, any case); nullopt when
// it is unset, or (with a warning) when it is anything else.
inline std::optional<bool> env_flag(const char* name) {
  const auto given = env_text(name);
  if (!given) return std::nullopt;
  std::string word = *given;
  for (char& ch : word) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (word == "1" || word == "true" || word == "on" || word == "yes") return true;
  if (word == "0" || word == "false" || word == "off" || word == "no") return false;
  TORCH_WARN(name, "=", std::getenv(name), " is not 1 or 0; fastlstm keeps its default");
  return std::nullopt;
}

}  // namespace
}  // namespace fastlstm
