// StreamingLLM (Xiao et al., 2023): keep the first s tokens (attention sinks) and the most recent
// ones. At the end of the prompt each layer keeps its sinks and the last B - s tokens; then, for
// every decoded token, the oldest token after the sinks goes.
#include <algorithm>

#include "kv/eviction.h"

namespace dk {

namespace {

class StreamingLlmCache final : public EvictingKvCache {
 public:
  StreamingLlmCache(std::unique_ptr<KvCache> inner, double keep, int sinks)
      : EvictingKvCache(std::move(inner), keep, /*global=*/true), sinks_(sinks) {}

 protected:
  std::string method() const override { return "streamingllm(sinks=" + std::to_string(sinks_) + ")"; }

  // Position-based, so the same set for every head.
  std::vector<std::vector<int>> Choose(int layer, int budget, bool /*at_prompt_end*/) override {
    const int T = Stored(layer), s = std::min(sinks_, budget);
    std::vector<int> keep;
    for (int t = 0; t < s; ++t) keep.push_back(t);
    for (int t = T - (budget - s); t < T; ++t) keep.push_back(t);
    return {keep};
  }

 private:
  int sinks_;
};

StatusOr<std::unique_ptr<KvCache>> WrapStreaming(const KvConfig& config, std::unique_ptr<KvCache> inner,
                                                 const KvModelInfo& /*model*/) {
  double keep;
  int sinks;
  DK_ASSIGN_OR_RETURN(keep, EvictKeep(config));
  DK_ASSIGN_OR_RETURN(sinks, config.options.Int("--sinks", 4, 0, 1 << 20));
  return std::unique_ptr<KvCache>(new StreamingLlmCache(std::move(inner), keep, sinks));
}

}  // namespace

const KvMethod& StreamingLlmMethod() {
  static const KvMethod m{"streamingllm", "StreamingLLM: attention sinks plus a window of recent tokens",
                          EvictFlags({{"--sinks", "N", "streamingllm: attention-sink tokens always kept (4)"}}),
                          nullptr, &WrapStreaming};
  return m;
}

}  // namespace dk
