// A decorator that times another cache's Attend calls (for benchmarks: "attention time per token").
// Wrappers compose: any backend can be timed without knowing it is.
#pragma once

#include <chrono>
#include <memory>

#include "kv/kv_cache.h"

namespace dk {

class TimedKvCache final : public KvCacheWrapper {
 public:
  explicit TimedKvCache(std::unique_ptr<KvCache> inner) : KvCacheWrapper(std::move(inner)) {}

  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override {
    const auto t0 = std::chrono::steady_clock::now();
    KvCacheWrapper::Attend(layer, plan, q, out, pool);
    attend_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  double attend_seconds() const { return attend_seconds_; }
  void ResetTimer() { attend_seconds_ = 0.0; }

 private:
  double attend_seconds_ = 0.0;
};

}  // namespace dk
