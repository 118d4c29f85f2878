#include "serve/metrics.h"

#include <algorithm>
#include <array>
#include <cstdio>

namespace dk {

std::string ServeMetrics::EndpointLabel(const std::string& path) {
  static const std::array<const char*, 5> kKnown = {"/v1/completions", "/v1/chat/completions", "/v1/models",
                                                    "/health", "/metrics"};
  for (const char* p : kKnown) {
    if (path == p) return p;
  }
  return "other";
}

int64_t ServeMetrics::Second(Clock::time_point t) const {
  // +1 so that second 0 differs from the zeroed buckets.
  return std::chrono::duration_cast<std::chrono::seconds>(t - start_).count() + 1;
}

void ServeMetrics::CountRequest(const std::string& path, int status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++counters_.requests[{EndpointLabel(path), status}];
}

void ServeMetrics::CountPrompt(int tokens, int reused) {
  std::lock_guard<std::mutex> lock(mu_);
  counters_.prompt_tokens += tokens;
  counters_.prompt_tokens_reused += reused;
}

void ServeMetrics::CountGenerated(int tokens) {
  const int64_t sec = Second(Clock::now());
  std::lock_guard<std::mutex> lock(mu_);
  counters_.tokens_generated += tokens;
  const int b = static_cast<int>(sec % kBuckets);
  if (bucket_second_[b] != sec) {
    bucket_second_[b] = sec;
    bucket_tokens_[b] = 0;
  }
  bucket_tokens_[b] += tokens;
}

ServeCounters ServeMetrics::Snapshot() const {
  const auto now = Clock::now();
  const int64_t sec = Second(now);
  std::lock_guard<std::mutex> lock(mu_);
  ServeCounters c = counters_;
  // The window is the last kBuckets whole seconds (fewer right after the start).
  uint64_t tokens = 0;
  for (int b = 0; b < kBuckets; ++b) {
    if (bucket_second_[b] > sec - kBuckets) tokens += bucket_tokens_[b];
  }
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  c.tokens_per_second = static_cast<double>(tokens) / std::clamp(elapsed, 1.0, kWindowSeconds);
  return c;
}

namespace {

void Metric(std::string& out, const char* name, const char* type, const char* help) {
  out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

std::string Number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.10g", v);
  return buf;
}

void Sample(std::string& out, const char* name, double v) { out += std::string(name) + " " + Number(v) + "\n"; }

}  // namespace

std::string FormatMetrics(const ServeCounters& c, const ServeGauges& g) {
  std::string out;
  Metric(out, "dynakv_requests_total", "counter", "HTTP requests answered, by endpoint and status.");
  for (const auto& [key, n] : c.requests) {
    out += "dynakv_requests_total{endpoint=\"" + key.first + "\",status=\"" + std::to_string(key.second) + "\"} " +
           std::to_string(n) + "\n";
  }
  Metric(out, "dynakv_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.");
  Sample(out, "dynakv_prompt_tokens_total", static_cast<double>(c.prompt_tokens));
  Metric(out, "dynakv_prompt_tokens_reused_total", "counter",
         "Prompt tokens a slot's cache already held (prefix reuse: not computed again).");
  Sample(out, "dynakv_prompt_tokens_reused_total", static_cast<double>(c.prompt_tokens_reused));
  Metric(out, "dynakv_tokens_generated_total", "counter", "Tokens generated.");
  Sample(out, "dynakv_tokens_generated_total", static_cast<double>(c.tokens_generated));
  Metric(out, "dynakv_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.");
  Sample(out, "dynakv_tokens_per_second", c.tokens_per_second);
  Metric(out, "dynakv_kv_bytes_used", "gauge", "KV cache bytes in use, summed over the slots.");
  Sample(out, "dynakv_kv_bytes_used", static_cast<double>(g.kv_bytes_used));
  Metric(out, "dynakv_kv_bytes_reserved", "gauge", "KV cache bytes allocated, summed over the slots.");
  Sample(out, "dynakv_kv_bytes_reserved", static_cast<double>(g.kv_bytes_reserved));
  Metric(out, "dynakv_kv_tokens", "gauge", "Tokens the slots' caches hold.");
  Sample(out, "dynakv_kv_tokens", static_cast<double>(g.kv_tokens));
  Metric(out, "dynakv_kv_fraction", "gauge",
         "KV bytes in use over those of the full fp16 cache for the same tokens (0 when none are held).");
  const double full = static_cast<double>(g.kv_tokens) * static_cast<double>(g.fp16_bytes_per_token);
  Sample(out, "dynakv_kv_fraction", full > 0 ? static_cast<double>(g.kv_bytes_used) / full : 0.0);
  Metric(out, "dynakv_queue_length", "gauge", "Requests waiting for a free slot.");
  Sample(out, "dynakv_queue_length", g.queue_length);
  Metric(out, "dynakv_slots_busy", "gauge", "Slots running a request.");
  Sample(out, "dynakv_slots_busy", g.slots_busy);
  Metric(out, "dynakv_slots_total", "gauge", "Slots (--parallel).");
  Sample(out, "dynakv_slots_total", g.slots_total);
  return out;
}

}  // namespace dk
