// A decorator that times another cache's Attend calls (for benchmarks: "attention time per token").
// Wrappers compose: any backend can be timed without knowing it is.
#pragma once

#include <chrono>
#include <memory>

#include "kv/kv_cache.h"

namespace dk {

class TimedKvCache final : public KvCache {
 public:
  explicit TimedKvCache(std::unique_ptr<KvCache> inner)
      : KvCache(inner->shape(), inner->capacity()), inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }

  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override {
    SyncInner(plan);
    inner_->Write(layer, plan, k, v, x);
  }
  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override {
    const auto t0 = std::chrono::steady_clock::now();
    inner_->Attend(layer, plan, q, out, pool);
    attend_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  size_t BytesUsed() const override { return inner_->BytesUsed(); }
  size_t BytesReserved() const override { return inner_->BytesReserved(); }

  double attend_seconds() const { return attend_seconds_; }
  void ResetTimer() { attend_seconds_ = 0.0; }
  KvCache& inner() { return *inner_; }

 protected:
  void OnClear() override { inner_->Clear(); }

 private:
  // The outer cache's Plan/Apply did the bookkeeping; mirror it on the inner cache once per batch.
  void SyncInner(const KvPlan& plan) {
    if (inner_->n_tokens() == plan.first) {
      auto p = inner_->Plan(plan.n);
      if (p.ok()) (void)inner_->Apply(*p);
    }
  }

  std::unique_ptr<KvCache> inner_;
  double attend_seconds_ = 0.0;
};

}  // namespace dk
