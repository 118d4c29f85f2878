#include "kv/registry.h"

#include "kv/dynakv_cache.h"
#include "kv/full_cache.h"

namespace dk {

namespace {

StatusOr<std::unique_ptr<KvCache>> CreateFull(const KvConfig& config, const KvModelInfo& model, int capacity) {
  if (config.dtype != "f16" && config.dtype != "f32")
    return InvalidArgument("--kv-dtype: expected f16 or f32, found '" + config.dtype + "'");
  const KvDtype dt = config.dtype == "f16" ? KvDtype::kF16 : KvDtype::kF32;
  return std::unique_ptr<KvCache>(new FullKvCache(model.shape, capacity, dt));
}

}  // namespace

const std::vector<KvMethod>& KvMethods() {
  static const std::vector<KvMethod> methods = {
      {"full", "uncompressed keys and values (fp16 or fp32)", &CreateFull},
      {"dynakv", "low-rank latents on a calibrated basis, each token its own rank (--profile)", &CreateDynaKvCache},
  };
  return methods;
}

StatusOr<std::unique_ptr<KvCache>> CreateKvCache(const KvConfig& config, const KvModelInfo& model, int capacity) {
  if (capacity <= 0) return InvalidArgument("KV cache capacity must be positive, found " + std::to_string(capacity));
  std::string known;
  for (const KvMethod& m : KvMethods()) {
    if (config.method == m.name) return m.create(config, model, capacity);
    known += (known.empty() ? "" : ", ") + std::string(m.name);
  }
  return InvalidArgument("--kv: unknown cache method '" + config.method + "' (known: " + known + ")");
}

}  // namespace dk
