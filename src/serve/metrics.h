// The server's counters and the Prometheus text (exposition format 0.0.4) /metrics returns.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace dk {

// What the slots and the queue look like at one moment.
struct ServeGauges {
  int slots_total = 0;
  int slots_busy = 0;
  int queue_length = 0;
  size_t kv_bytes_used = 0;      // summed over the slots' caches
  size_t kv_bytes_reserved = 0;
  int64_t kv_tokens = 0;         // tokens the slots' caches hold (positions seen)
  size_t fp16_bytes_per_token = 0;  // of the full fp16 cache: the denominator of the fraction
};

// Everything /metrics reports, apart from the gauges.
struct ServeCounters {
  std::map<std::pair<std::string, int>, uint64_t> requests;  // (endpoint, HTTP status) -> count
  uint64_t prompt_tokens = 0;
  uint64_t prompt_tokens_reused = 0;  // prompt tokens a slot's cache already held
  uint64_t tokens_generated = 0;
  double tokens_per_second = 0.0;     // generated over the last window
};

// Thread-safe counters. Requests are counted by endpoint label (unknown paths as "other", so a
// scan of random URLs cannot grow the label set).
class ServeMetrics {
 public:
  static constexpr double kWindowSeconds = 10.0;

  void CountRequest(const std::string& path, int status);
  void CountPrompt(int tokens, int reused);
  void CountGenerated(int tokens);
  ServeCounters Snapshot() const;

  // "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", or "other".
  static std::string EndpointLabel(const std::string& path);

 private:
  using Clock = std::chrono::steady_clock;
  int64_t Second(Clock::time_point t) const;

  mutable std::mutex mu_;
  ServeCounters counters_;
  // Tokens per second: one bucket per whole second of the last window (ring indexed by second).
  static constexpr int kBuckets = static_cast<int>(kWindowSeconds);
  int64_t bucket_second_[kBuckets] = {};
  uint64_t bucket_tokens_[kBuckets] = {};
  Clock::time_point start_ = Clock::now();
};

// The Prometheus text of a snapshot (pure: the unit tests check it line by line).
std::string FormatMetrics(const ServeCounters& counters, const ServeGauges& gauges);

}  // namespace dk
