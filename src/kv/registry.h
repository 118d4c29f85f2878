// KV cache methods by name: storage backends (--kv) and eviction wrappers (--evict). A new method
// is one source file that defines its KvMethod (name, summary, the flags it reads, its factory) and
// one line in registry.cpp's list; the CLI's flags and eval's configurations come from that list,
// and tests/test_kv_conformance.cpp runs every registered method (and every wrapper over every
// storage method) through the same suite.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "kv/kv_cache.h"

namespace dk {

// A flag a method reads, declared beside the method.
struct KvFlag {
  std::string name;     // "--kv-budget"
  std::string metavar;  // "X"
  std::string help;
};

// The values given for a cache's flags, by flag name, as typed (each method parses its own; every
// parse error names the flag).
class KvOptions {
 public:
  void Set(const std::string& flag, const std::string& value) { values_[flag] = value; }
  bool Has(const std::string& flag) const { return values_.count(flag) != 0; }
  std::string String(const std::string& flag, const std::string& fallback) const;
  StatusOr<double> Double(const std::string& flag, double fallback, double lo, double hi) const;
  StatusOr<int> Int(const std::string& flag, int fallback, int lo, int hi) const;
  const std::map<std::string, std::string>& values() const { return values_; }

 private:
  std::map<std::string, std::string> values_;
};

// Everything a user can say about the cache.
struct KvConfig {
  std::string method = "full";  // storage method (--kv)
  std::string evict;            // eviction wrapper (--evict); empty: none
  KvOptions options;            // the methods' own flags

  KvConfig& Set(const std::string& flag, const std::string& value) {
    options.Set(flag, value);
    return *this;
  }
  // "dynakv --profile p.dkv --rank-policy router" style, for messages and result folders.
  std::string Describe() const;
};

// What a factory learns about the model it will serve.
struct KvModelInfo {
  KvShape shape;
  uint64_t fingerprint = 0;  // Model::fingerprint(), checked against profiles
  std::string model_path;
};

using KvFactory = StatusOr<std::unique_ptr<KvCache>> (*)(const KvConfig& config, const KvModelInfo& model,
                                                         int capacity);
using KvWrapFactory = StatusOr<std::unique_ptr<KvCache>> (*)(const KvConfig& config, std::unique_ptr<KvCache> inner,
                                                             const KvModelInfo& model);

struct KvMethod {
  const char* name;
  const char* summary;
  std::vector<KvFlag> flags;
  KvFactory create = nullptr;  // storage methods
  KvWrapFactory wrap = nullptr;  // eviction wrappers
  bool is_wrapper() const { return wrap != nullptr; }
};

// Every registered method, storage first (registry.cpp).
const std::vector<const KvMethod*>& KvMethods();
const KvMethod* FindKvMethod(const std::string& name);

// Checks the names and that every option given is a flag of the chosen method or wrapper; the
// error names the flag and which methods read it.
Status ValidateKvConfig(const KvConfig& config);
// Validates, creates the storage method, wraps it when config.evict is set.
StatusOr<std::unique_ptr<KvCache>> CreateKvCache(const KvConfig& config, const KvModelInfo& model, int capacity);

// The methods' own definitions (one per method file).
const KvMethod& FullKvMethod();
const KvMethod& DynaKvMethod();
const KvMethod& Q8_0KvMethod();  // qblock_cache.cpp
const KvMethod& Q4_0KvMethod();  // qblock_cache.cpp
const KvMethod& KiviKvMethod();  // kivi_cache.cpp

}  // namespace dk
