// Perplexity computed as llama.cpp's perplexity tool does it: the tokenized text (BOS first) is cut
// into chunks of n_ctx tokens, each chunk's first token is replaced by BOS, each chunk runs from an
// empty cache, and only the second half of each chunk is scored. Optionally, a reference cache
// (e.g. the full cache) runs beside the tested one to measure KL(reference || tested) per token.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"
#include "kv/kv_cache.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace dk {

struct PerplexityOptions {
  int n_ctx = 512;
  int n_batch = 512;
  int max_chunks = -1;  // -1: all
  // Eviction-aware protocol: each chunk's first half (the context) is a prompt, compressed by the
  // cache when it ends (KvCache::EndPrompt); the second half, the scored tokens, follows in batches
  // of decode_batch, so every scored token sees the compressed context. For caches that compress
  // each token as it is written (DynaKV, quantized) the numbers equal the plain protocol's.
  bool prompt_then_decode = false;
  int decode_batch = 1;
  // Tokens of each chunk that are context only (the prompt, compressed when it ends); the rest are
  // scored. 0: n_ctx / 2, llama.cpp's split. A long-context evaluation compresses, say, 3072 tokens
  // of a 4096-token chunk and scores the last 1024.
  int n_prompt = 0;
};

// The reference's logits of the scored rows of each chunk, computed once and reused by every
// tested cache of an evaluation (the reference is the same full cache each time). Keyed by what
// determines them: the chunk's tokens come from the same text, so (n_ctx, n_prompt, chunk) does.
struct ReferenceLogits {
  int n_ctx = 0, n_prompt = 0;
  std::vector<std::vector<float>> chunks;  // [chunk][(n_ctx - n_prompt - 1) * n_vocab], empty until computed
};

struct PerplexityResult {
  int n_chunks = 0;
  int64_t n_scored = 0;
  std::vector<double> running_ppl;  // after each chunk
  double ppl = 0.0;
  double ppl_err = 0.0;             // llama.cpp's estimate: ppl * sqrt(var(nll) / (count - 1))
  bool has_kl = false;
  double kl_mean = 0.0;             // mean KL(reference || tested) per scored token, nats
  double kl_err = 0.0;              // standard error of that mean
  double same_top1 = 0.0;           // fraction of scored tokens where both argmaxes agree
  double kv_fraction = 0.0;         // mean over chunks of tested BytesUsed / fp16 full-cache bytes
  double kv_fraction_prompt = 0.0;  // the same after each chunk's first half (prompt_then_decode)
  double kv_bytes_per_token = 0.0;  // tested cache bytes per token, averaged over chunks
  double seconds = 0.0;             // wall time of the tested model's forward passes
};

// A text file's ids as Tokenizer::Encode(whole text, true) gives them, read and encoded a piece at
// a time (Tokenizer::PieceEncoder), so memory follows the ids kept, not the text. With min_tokens
// > 0, reading stops once at least that many ids exist: they are the first ids of the whole
// text's, and `whole` is false. Errors (a missing file, one over the 1 GiB cap) name the file.
struct TextTokens {
  std::vector<int32_t> ids;
  bool whole = true;        // the whole text was encoded (false: stopped after min_tokens)
  uint64_t bytes_encoded = 0;
};
StatusOr<TextTokens> TokenizeTextFile(const Tokenizer& tokenizer, const std::string& path, size_t min_tokens = 0,
                                      size_t piece_bytes = size_t{1} << 18);

using PerplexityProgress = std::function<void(int chunk, int n_chunks, double running_ppl)>;

// `tokens` is the whole tokenized text. Needs at least 2 * n_ctx tokens. With `stored`, the
// reference's logits are taken from it where a previous call left them (same n_ctx and n_prompt),
// and left there otherwise; `reference` is then only run for chunks not yet stored.
StatusOr<PerplexityResult> ComputePerplexity(const Model& model, const std::vector<int32_t>& tokens, KvCache& cache,
                                             KvCache* reference, const PerplexityOptions& options, ThreadPool& pool,
                                             const PerplexityProgress& progress = nullptr,
                                             ReferenceLogits* stored = nullptr);

}  // namespace dk
