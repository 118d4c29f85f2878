#include "core/env.h"

#include <cerrno>
#include <cstdlib>
#include <stdexcept>

namespace dk {

const std::vector<EnvKnob>& EnvKnobs() {
  static const std::vector<EnvKnob> knobs = {
      {"DYNAKV_ISA", "highest instruction set of the quantized dot kernels", 0, 0, {"scalar", "avx2", "avx512vnni"}},
      {"DYNAKV_ACTS", "activations of quantized matrix products: q8 (default, as llama.cpp) or f32", 0, 0,
       {"q8", "f32"}},
      {"DYNAKV_DOT_MAX_ROWS", "most batch rows a matrix product computes by dot kernels before BLAS", 0, 1L << 30, {}},
      {"DYNAKV_BLAS_THREADS", "OpenBLAS threads (0: the pool's -t; default 1)", 0, 4096, {}},
  };
  return knobs;
}

namespace {

const EnvKnob& Knob(std::string_view name) {
  for (const EnvKnob& k : EnvKnobs())
    if (k.name == name) return k;
  throw std::logic_error("environment knob " + std::string(name) + " is not in EnvKnobs()");
}

// The variable's value; nullopt when unset or empty.
std::optional<std::string> Raw(std::string_view name) {
  const char* v = std::getenv(std::string(name).c_str());
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

std::optional<long> ParseInt(const EnvKnob& k, const std::string& v) {
  errno = 0;
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (end == v.c_str() || *end != '\0' || errno != 0 || x < k.lo || x > k.hi) return std::nullopt;
  return x;
}

bool IsChoice(const EnvKnob& k, const std::string& v) {
  for (std::string_view c : k.choices)
    if (c == v) return true;
  return false;
}

}  // namespace

std::optional<long> EnvInt(std::string_view name) {
  const EnvKnob& k = Knob(name);
  const std::optional<std::string> v = Raw(name);
  return v ? ParseInt(k, *v) : std::nullopt;
}

std::optional<std::string> EnvChoice(std::string_view name) {
  const EnvKnob& k = Knob(name);
  const std::optional<std::string> v = Raw(name);
  return v && IsChoice(k, *v) ? v : std::nullopt;
}

std::vector<std::string> EnvironmentProblems() {
  std::vector<std::string> out;
  for (const EnvKnob& k : EnvKnobs()) {
    const std::optional<std::string> v = Raw(k.name);
    if (!v) continue;
    if (k.choices.empty()) {
      if (!ParseInt(k, *v))
        out.push_back(std::string(k.name) + ": expected an integer in [" + std::to_string(k.lo) + ", " +
                      std::to_string(k.hi) + "], found '" + *v + "' (" + std::string(k.help) + ")");
    } else if (!IsChoice(k, *v)) {
      std::string words;
      for (std::string_view c : k.choices) words += (words.empty() ? "" : ", ") + std::string(c);
      out.push_back(std::string(k.name) + ": expected one of " + words + ", found '" + *v + "' (" +
                    std::string(k.help) + ")");
    }
  }
  return out;
}

}  // namespace dk
