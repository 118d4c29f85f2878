#include "eval/perplexity.h"

#include <chrono>
#include <cmath>

#include "core/mapped_file.h"
#include "core/threads.h"

namespace dk {

namespace {

// log-softmax of one row at `tok`, as llama.cpp: max in float, sum of exp in double.
double LogProb(const float* logits, int n_vocab, int tok) {
  float mx = logits[0];
  for (int i = 1; i < n_vocab; ++i) mx = logits[i] > mx ? logits[i] : mx;
  double sum = 0.0;
  for (int i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  return static_cast<double>(logits[tok] - mx) - std::log(sum);
}

// KL(p || q) for two logit rows, in double.
double KlDivergence(const float* p_logits, const float* q_logits, int n, std::vector<double>& lp) {
  lp.resize(n);
  double mp = p_logits[0], mq = q_logits[0];
  for (int i = 1; i < n; ++i) {
    mp = std::max<double>(mp, p_logits[i]);
    mq = std::max<double>(mq, q_logits[i]);
  }
  double sp = 0.0, sq = 0.0;
  for (int i = 0; i < n; ++i) {
    sp += std::exp(p_logits[i] - mp);
    sq += std::exp(q_logits[i] - mq);
  }
  const double lsp = std::log(sp) + mp, lsq = std::log(sq) + mq;
  double kl = 0.0;
  for (int i = 0; i < n; ++i) {
    const double logp = p_logits[i] - lsp, logq = q_logits[i] - lsq;
    kl += std::exp(logp) * (logp - logq);
  }
  return kl > 0.0 ? kl : 0.0;
}

int ArgMax(const float* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

int PromptTokens(const PerplexityOptions& opt) { return opt.n_prompt > 0 ? opt.n_prompt : opt.n_ctx / 2; }

// Runs one chunk through the model in batches; logits: [n_ctx][n_vocab]. With the eviction-aware
// protocol, the first n_prompt tokens are a prompt (then EndPrompt; its bytes go to *prompt_bytes)
// and the rest follows in batches of decode_batch.
Status RunChunk(const Model& model, std::vector<int32_t>& chunk, KvCache& cache, ForwardState& st, float* logits,
                const PerplexityOptions& opt, int n_batch, ThreadPool& pool, size_t* prompt_bytes) {
  cache.Clear();
  const int n_ctx = static_cast<int>(chunk.size()), V = model.config().n_vocab;
  const int prompt = opt.prompt_then_decode ? PromptTokens(opt) : n_ctx;
  for (int b = 0; b < n_ctx;) {
    const int n = b < prompt ? std::min(n_batch, prompt - b) : std::min(opt.decode_batch, n_ctx - b);
    DK_RETURN_IF_ERROR(model.Forward(chunk.data() + b, n, cache, st, logits + static_cast<size_t>(b) * V, true, pool));
    b += n;
    if (b == prompt && opt.prompt_then_decode) {
      DK_RETURN_IF_ERROR(cache.EndPrompt(pool));
      if (prompt_bytes != nullptr) *prompt_bytes = cache.BytesUsed();
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<TextTokens> TokenizeTextFile(const Tokenizer& tokenizer, const std::string& path, size_t min_tokens,
                                      size_t piece_bytes) {
  TextTokens t;
  Tokenizer::PieceEncoder enc(tokenizer, true, piece_bytes);
  bool stopped = false;
  DK_RETURN_IF_ERROR(ReadFileInParts(path, piece_bytes, [&](std::string_view part) {
    enc.Add(part, t.ids);
    stopped = min_tokens > 0 && t.ids.size() >= min_tokens;
    return !stopped;
  }));
  if (!stopped) enc.Finish(t.ids);
  t.whole = !stopped;
  t.bytes_encoded = enc.bytes_encoded();
  return t;
}

StatusOr<PerplexityResult> ComputePerplexity(const Model& model, const std::vector<int32_t>& tokens, KvCache& cache,
                                             KvCache* reference, const PerplexityOptions& opt, ThreadPool& pool,
                                             const PerplexityProgress& progress, ReferenceLogits* stored) {
  const int n_ctx = opt.n_ctx, V = model.config().n_vocab;
  if (n_ctx < 4) return InvalidArgument("-c: context size must be at least 4, found " + std::to_string(n_ctx));
  if (opt.n_prompt < 0 || opt.n_prompt > n_ctx - 2)
    return InvalidArgument("perplexity: the prompt part of a chunk must be in [1, " + std::to_string(n_ctx - 2) +
                           "] tokens (-c " + std::to_string(n_ctx) + "), found " + std::to_string(opt.n_prompt));
  if (opt.n_batch < 1) return InvalidArgument("-b: batch size must be positive");
  if (opt.prompt_then_decode && opt.decode_batch < 1)
    return InvalidArgument("perplexity: the decode batch must be positive, found " + std::to_string(opt.decode_batch));
  if (static_cast<int64_t>(tokens.size()) < 2LL * n_ctx) {
    return InvalidArgument("perplexity: the text has " + std::to_string(tokens.size()) + " tokens; at least 2 * n_ctx = " +
                           std::to_string(2 * n_ctx) + " are needed (use a smaller -c)");
  }
  if (cache.capacity() < n_ctx || (reference != nullptr && reference->capacity() < n_ctx))
    return InvalidArgument("perplexity: KV cache smaller than the context size");
  int n_chunks = static_cast<int>(tokens.size() / n_ctx);
  if (opt.max_chunks > 0) n_chunks = std::min(n_chunks, opt.max_chunks);
  const int n_batch = std::min(opt.n_batch, n_ctx);
  ForwardState st(model.config(), std::max(n_batch, opt.prompt_then_decode ? opt.decode_batch : 1));
  std::vector<float> logits(static_cast<size_t>(n_ctx) * V), ref_logits;
  if (reference != nullptr) ref_logits.resize(logits.size());
  std::vector<int32_t> chunk(n_ctx);
  std::vector<double> scratch;
  const int first = PromptTokens(opt);
  const size_t scored_rows = static_cast<size_t>(n_ctx - 1 - first);
  if (stored != nullptr && (stored->n_ctx != n_ctx || stored->n_prompt != first)) {
    stored->n_ctx = n_ctx;
    stored->n_prompt = first;
    stored->chunks.clear();
  }
  if (stored != nullptr && static_cast<int>(stored->chunks.size()) < n_chunks) stored->chunks.resize(n_chunks);
  const int32_t bos = model.tokenizer().bos_id();

  PerplexityResult r;
  r.n_chunks = n_chunks;
  r.has_kl = reference != nullptr;
  double nll = 0.0, nll2 = 0.0, kl = 0.0, kl2 = 0.0, frac = 0.0, frac_prompt = 0.0, bpt = 0.0;
  int64_t count = 0, agree = 0;
  const double full_bytes = static_cast<double>(Fp16FullBytesPerToken(cache.shape()));
  for (int c = 0; c < n_chunks; ++c) {
    std::copy(tokens.begin() + static_cast<int64_t>(c) * n_ctx, tokens.begin() + static_cast<int64_t>(c + 1) * n_ctx,
              chunk.begin());
    if (bos >= 0) chunk[0] = bos;
    const auto t0 = std::chrono::steady_clock::now();
    size_t prompt_bytes = 0;
    DK_RETURN_IF_ERROR(RunChunk(model, chunk, cache, st, logits.data(), opt, n_batch, pool, &prompt_bytes));
    r.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bpt += static_cast<double>(cache.BytesUsed()) / n_ctx;
    frac += static_cast<double>(cache.BytesUsed()) / (full_bytes * n_ctx);
    frac_prompt += static_cast<double>(prompt_bytes) / (full_bytes * first);
    const float* ref_rows = nullptr;  // the reference's logits of row `first` onwards
    if (reference != nullptr) {
      std::vector<float>* keep = stored != nullptr ? &stored->chunks[c] : nullptr;
      if (keep != nullptr && keep->size() == scored_rows * V) {
        ref_rows = keep->data();
      } else {
        PerplexityOptions plain = opt;
        plain.prompt_then_decode = false;  // the reference is exact either way; one batch is fastest
        DK_RETURN_IF_ERROR(RunChunk(model, chunk, *reference, st, ref_logits.data(), plain, n_batch, pool, nullptr));
        ref_rows = ref_logits.data() + static_cast<size_t>(first) * V;
        if (keep != nullptr) keep->assign(ref_rows, ref_rows + scored_rows * V);
      }
    }
    for (int j = first; j < n_ctx - 1; ++j) {
      const float* row = logits.data() + static_cast<size_t>(j) * V;
      const double lp = LogProb(row, V, tokens[static_cast<int64_t>(c) * n_ctx + j + 1]);
      nll -= lp;
      nll2 += lp * lp;
      ++count;
      if (reference != nullptr) {
        const float* ref = ref_rows + static_cast<size_t>(j - first) * V;
        const double d = KlDivergence(ref, row, V, scratch);
        kl += d;
        kl2 += d * d;
        agree += ArgMax(ref, V) == ArgMax(row, V);
      }
    }
    r.running_ppl.push_back(std::exp(nll / static_cast<double>(count)));
    if (progress) progress(c + 1, n_chunks, r.running_ppl.back());
  }
  r.n_scored = count;
  const double mean = nll / count;
  r.ppl = std::exp(mean);
  const double var = nll2 / count - mean * mean;
  r.ppl_err = var > 0 ? r.ppl * std::sqrt(var / (count - 1)) : 0.0;
  if (reference != nullptr) {
    r.kl_mean = kl / count;
    const double kvar = kl2 / count - r.kl_mean * r.kl_mean;
    r.kl_err = kvar > 0 ? std::sqrt(kvar / (count - 1)) : 0.0;
    r.same_top1 = static_cast<double>(agree) / count;
  }
  r.kv_fraction = frac / n_chunks;
  r.kv_fraction_prompt = opt.prompt_then_decode ? frac_prompt / n_chunks : r.kv_fraction;
  r.kv_bytes_per_token = bpt / n_chunks;
  return r;
}

}  // namespace dk
