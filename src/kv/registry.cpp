#include "kv/registry.h"

#include "core/memory.h"
#include "kv/eviction.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace dk {

const std::vector<const KvMethod*>& KvMethods() {
  static const std::vector<const KvMethod*> methods = {
      &FullKvMethod(),
      &DynaKvMethod(),
      &Q8_0KvMethod(),
      &Q4_0KvMethod(),
      &KiviKvMethod(),
      &SnapKvMethod(),
      &StreamingLlmMethod(),
      &H2oMethod(),
  };
  return methods;
}

const KvMethod* FindKvMethod(const std::string& name) {
  for (const KvMethod* m : KvMethods())
    if (name == m->name) return m;
  return nullptr;
}

namespace {

std::string KnownNames(bool wrappers) {
  std::string known;
  for (const KvMethod* m : KvMethods())
    if (m->is_wrapper() == wrappers) known += (known.empty() ? "" : ", ") + std::string(m->name);
  return known;
}

bool Declares(const KvMethod* m, const std::string& flag) {
  if (m == nullptr) return false;
  for (const KvFlag& f : m->flags)
    if (f.name == flag) return true;
  return false;
}

}  // namespace

std::string KvOptions::String(const std::string& flag, const std::string& fallback) const {
  auto it = values_.find(flag);
  return it == values_.end() ? fallback : it->second;
}

StatusOr<double> KvOptions::Double(const std::string& flag, double fallback, double lo, double hi) const {
  auto it = values_.find(flag);
  if (it == values_.end()) return fallback;
  char* end = nullptr;
  errno = 0;
  const double x = std::strtod(it->second.c_str(), &end);
  if (it->second.empty() || *end != '\0' || errno != 0 || !std::isfinite(x) || x < lo || x > hi)
    return InvalidArgument(flag + ": expected a number in " + RangeText(lo, hi) + ", found '" + it->second + "'");
  return x;
}

StatusOr<int> KvOptions::Int(const std::string& flag, int fallback, int lo, int hi) const {
  auto it = values_.find(flag);
  if (it == values_.end()) return fallback;
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(it->second.c_str(), &end, 10);
  if (it->second.empty() || *end != '\0' || errno != 0 || x < lo || x > hi)
    return InvalidArgument(flag + ": expected an integer in " + RangeText(lo, hi) + ", found '" + it->second + "'");
  return static_cast<int>(x);
}

std::string KvConfig::Describe() const {
  std::string s = method;
  if (!evict.empty()) s += " + " + evict;
  for (const auto& [flag, value] : options.values()) s += " " + flag + " " + value;
  return s;
}

Status ValidateKvConfig(const KvConfig& config) {
  const KvMethod* m = FindKvMethod(config.method);
  if (m == nullptr || m->is_wrapper())
    return InvalidArgument("--kv: unknown cache method '" + config.method + "' (known: " + KnownNames(false) + ")");
  const KvMethod* w = nullptr;
  if (!config.evict.empty()) {
    w = FindKvMethod(config.evict);
    if (w == nullptr || !w->is_wrapper())
      return InvalidArgument("--evict: unknown eviction method '" + config.evict + "' (known: " + KnownNames(true) +
                             ")");
  }
  for (const auto& [flag, value] : config.options.values()) {
    if (Declares(m, flag) || Declares(w, flag)) continue;
    std::string owners;
    for (const KvMethod* other : KvMethods())
      if (Declares(other, flag))
        owners += (owners.empty() ? "" : " or ") + std::string(other->is_wrapper() ? "--evict " : "--kv ") + other->name;
    if (owners.empty()) return InvalidArgument(flag + ": not a KV cache flag");
    return InvalidArgument(flag + ": only meaningful with " + owners + " (the cache is " + config.Describe() + ")");
  }
  return Status::Ok();
}

StatusOr<std::unique_ptr<KvCache>> CreateKvCache(const KvConfig& config, const KvModelInfo& model, int capacity) {
  if (capacity <= 0) return InvalidArgument("KV cache capacity must be positive, found " + std::to_string(capacity));
  DK_RETURN_IF_ERROR(ValidateKvConfig(config));
  // Before any allocation: what the cache could reserve at most (fp32 rows, or fp16 ones for every
  // other storage), against the memory the machine has.
  const uint64_t elem = config.options.String("--kv-dtype", "f16") == "f32" ? 4 : 2;
  const uint64_t bound = static_cast<uint64_t>(capacity) * model.shape.n_layer * 2 * model.shape.kv_dim() * elem;
  DK_RETURN_IF_ERROR(CheckMemory(bound, "-c " + std::to_string(capacity) + ": a " + config.method +
                                            " KV cache for " + std::to_string(capacity) + " tokens"));
  std::unique_ptr<KvCache> cache;
  DK_ASSIGN_OR_RETURN(cache, FindKvMethod(config.method)->create(config, model, capacity));
  if (config.evict.empty()) return cache;
  return FindKvMethod(config.evict)->wrap(config, std::move(cache), model);
}

}  // namespace dk
