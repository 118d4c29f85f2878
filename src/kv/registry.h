// KV cache methods by name. Adding a method = one source file + one line in registry.cpp.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "kv/kv_cache.h"

namespace dk {

// Everything a user can say about the cache on the command line.
struct KvConfig {
  std::string method = "full";       // a registered name: "full", "dynakv"
  std::string dtype = "f16";         // storage of full rows / latents: "f16" or "f32"
  std::string profile_path;          // dynakv: calibrated profile (.dkv)
  std::string rank_policy = "uniform";  // dynakv: "uniform", "energy", "router"
  int rank = -1;                     // uniform: rank r in [1, D]; -1 = unset
  double tau = -1.0;                 // energy: kept fraction of the token's latent energy; -1 = unset
  double kv_budget = -1.0;           // target cache bytes / fp16 full-cache bytes; -1 = unset
};

// What a factory learns about the model it will serve.
struct KvModelInfo {
  KvShape shape;
  uint64_t fingerprint = 0;  // Model::fingerprint(), checked against profiles
  std::string model_path;
};

using KvFactory = StatusOr<std::unique_ptr<KvCache>> (*)(const KvConfig& config, const KvModelInfo& model,
                                                         int capacity);

struct KvMethod {
  const char* name;
  const char* summary;
  KvFactory create;
};

const std::vector<KvMethod>& KvMethods();
// Creates the cache that config.method names; unknown names list the known ones.
StatusOr<std::unique_ptr<KvCache>> CreateKvCache(const KvConfig& config, const KvModelInfo& model, int capacity);

}  // namespace dk
