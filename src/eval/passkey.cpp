#include "eval/passkey.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <random>

#include "eval/generate.h"
#include "eval/sampler.h"

namespace dk {

namespace {

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

std::string FormatDouble(double x) {
  std::string s = std::to_string(x);
  while (s.size() > 1 && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

std::string Join(const std::vector<std::string>& words, size_t begin, size_t end) {
  std::string s;
  for (size_t i = begin; i < end; ++i) {
    if (i > begin) s += ' ';
    s += words[i];
  }
  return s;
}

// Uniform in [0, n) from one 64-bit draw. Modulo rather than std::uniform_int_distribution, whose
// algorithm is left to the standard library (the same seed would give other cases elsewhere); the
// bias is at most n / 2^64, far below anything measurable here.
uint64_t Below(std::mt19937_64& rng, uint64_t n) { return rng() % n; }

std::string Describe(int index, const PasskeyCase& c) {
  return "case " + std::to_string(index) + " (length " + std::to_string(c.length) + ", depth " + FormatDouble(c.depth) +
         ", " + c.phrase + ")";
}

std::vector<PasskeyBucket> Buckets(const std::map<double, PasskeyBucket>& m) {
  std::vector<PasskeyBucket> v;
  for (const auto& [value, b] : m) v.push_back(b);
  return v;
}

}  // namespace

Status ValidatePasskeyOptions(const PasskeyOptions& o) {
  if (o.lengths.empty()) return InvalidArgument("--lengths: the list is empty");
  for (int l : o.lengths)
    if (l < 1) return InvalidArgument("--lengths: lengths are words and must be positive, found " + std::to_string(l));
  if (o.depths.empty()) return InvalidArgument("--depths: the list is empty");
  for (double d : o.depths)
    if (!(d >= 0.0 && d <= 1.0)) return InvalidArgument("--depths: depth " + FormatDouble(d) + " is outside [0, 1]");
  if (o.per_cell < 1) return InvalidArgument("--per-cell: must be at least 1, found " + std::to_string(o.per_cell));
  if (o.n_predict < 1) return InvalidArgument("-n: must be at least 1, found " + std::to_string(o.n_predict));
  if (o.phrases.empty()) return InvalidArgument("phrases: the list is empty");
  for (const std::string& p : o.phrases)
    if (p.empty()) return InvalidArgument("phrases: a phrase is empty");
  return Status::Ok();
}

std::vector<std::string> SplitWords(const std::string& text) {
  std::vector<std::string> words;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && IsSpace(text[i])) ++i;
    const size_t start = i;
    while (i < text.size() && !IsSpace(text[i])) ++i;
    if (i > start) words.emplace_back(text, start, i - start);
  }
  return words;
}

std::string PasskeySentence(const std::string& phrase, const std::string& key) {
  return "The " + phrase + " is " + key + ". Remember it. " + key + " is the " + phrase + ".";
}

StatusOr<std::vector<PasskeyCase>> MakePasskeyCases(const std::string& text, const PasskeyOptions& o,
                                                    const Tokenizer* tokenizer, int max_prompt_tokens) {
  DK_RETURN_IF_ERROR(ValidatePasskeyOptions(o));
  const bool fit = tokenizer != nullptr && max_prompt_tokens > 0;
  const std::vector<std::string> words = SplitWords(text);
  const int longest = *std::max_element(o.lengths.begin(), o.lengths.end());
  if (static_cast<int64_t>(words.size()) < longest) {
    return InvalidArgument("the text has " + std::to_string(words.size()) +
                           " words, fewer than the longest of --lengths (" + std::to_string(longest) + ")");
  }
  constexpr int kMaxDraws = 100;
  std::mt19937_64 seeds(o.seed);
  std::vector<PasskeyCase> cases;
  cases.reserve(o.lengths.size() * o.depths.size() * static_cast<size_t>(o.per_cell));
  for (int length : o.lengths) {
    for (double depth : o.depths) {
      for (int rep = 0; rep < o.per_cell; ++rep) {
        PasskeyCase c;
        c.length = length;
        c.depth = depth;
        // Phrases in turn rather than drawn, so every phrase gets its share of each length.
        c.phrase = o.phrases[cases.size() % o.phrases.size()];
        c.key_word = static_cast<int>(std::lround(depth * length));
        // The case's own generator: redrawing its window leaves every other case as it was.
        std::mt19937_64 rng(seeds());
        c.key = std::to_string(10000 + Below(rng, 90000));
        for (int draw = 0;; ++draw) {
          c.offset = static_cast<int64_t>(Below(rng, words.size() - length + 1));
          const size_t begin = static_cast<size_t>(c.offset), at = begin + c.key_word, end = begin + length;
          std::string hay = Join(words, begin, at);
          if (!hay.empty()) hay += ' ';
          hay += PasskeySentence(c.phrase, c.key);
          if (at < end) hay += ' ' + Join(words, at, end);
          c.prompt = hay + " What is the " + c.phrase + "? The " + c.phrase + " is";
          if (!fit || static_cast<int>(tokenizer->Encode(c.prompt, true).size()) <= max_prompt_tokens) break;
          if (draw + 1 == kMaxDraws) {
            return InvalidArgument(Describe(static_cast<int>(cases.size()), c) + ": no window of " +
                                   std::to_string(length) + " words gave a prompt of at most " +
                                   std::to_string(max_prompt_tokens) + " tokens in " + std::to_string(kMaxDraws) +
                                   " draws (raise -c or use shorter --lengths)");
          }
          ++c.redraws;
        }
        cases.push_back(std::move(c));
      }
    }
  }
  return cases;
}

std::string FirstDigitRun(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && !IsDigit(text[i])) ++i;
  size_t j = i;
  while (j < text.size() && IsDigit(text[j])) ++j;
  return text.substr(i, j - i);
}

bool PasskeyCorrect(const std::string& continuation, const std::string& key) {
  return !key.empty() && FirstDigitRun(continuation) == key;
}

StatusOr<std::vector<PasskeyResult>> RunPasskey(const Model& model, const std::vector<PasskeyCase>& cases,
                                                int n_predict, KvCache& cache, ThreadPool& pool,
                                                const PasskeyProgress& progress) {
  if (n_predict < 1) return InvalidArgument("-n: must be at least 1, found " + std::to_string(n_predict));
  const Tokenizer& tok = model.tokenizer();
  // Tokenize and check every case first: a context too small for the longest haystack should
  // fail at once, not after the shorter ones have run.
  std::vector<std::vector<int32_t>> prompts;
  prompts.reserve(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    prompts.push_back(tok.Encode(cases[i].prompt, true));
    const int64_t need = static_cast<int64_t>(prompts.back().size()) + n_predict - 1;
    if (need > cache.capacity()) {
      return InvalidArgument("passkey: " + Describe(static_cast<int>(i), cases[i]) + ": the prompt has " +
                             std::to_string(prompts.back().size()) + " tokens and the answer up to " +
                             std::to_string(n_predict) + ", more than the KV cache holds (" +
                             std::to_string(cache.capacity()) + "; raise -c or use shorter --lengths)");
    }
  }
  const double full_bytes_per_token = static_cast<double>(Fp16FullBytesPerToken(cache.shape()));
  // generate's default batch, so that 'dynakv generate --temp 0' on a case's prompt reproduces it.
  constexpr int n_batch = 512;

  std::vector<PasskeyResult> results;
  results.reserve(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    const PasskeyCase& c = cases[i];
    PasskeyResult r;
    r.length = c.length;
    r.depth = c.depth;
    r.phrase = c.phrase;
    r.key = c.key;
    r.n_prompt = static_cast<int>(prompts[i].size());
    cache.Clear();
    Sampler greedy(SamplerOptions{0.0f, 0, 1.0f, 0});
    std::vector<int32_t> generated;
    std::string text;  // pieces so far, for the stopping rule
    bool seen_digit = false;
    const auto t0 = std::chrono::steady_clock::now();
    auto stats = Generate(model, prompts[i], n_predict, n_batch, cache, greedy, pool, [&](int32_t t) {
      // The first token is sampled from the prefill's logits, before any decode step: the cache
      // then holds exactly the prompt.
      if (generated.empty()) r.kv_bytes = cache.BytesUsed();
      generated.push_back(t);
      for (char ch : tok.TokenToPiece(t)) {
        if (IsDigit(ch)) {
          seen_digit = true;
        } else if (seen_digit) {
          return false;  // the number has ended: nothing after it is scored
        }
      }
      return true;
    });
    if (!stats.ok()) return stats.status().WithContext("passkey: " + Describe(static_cast<int>(i), c));
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.n_generated = static_cast<int>(generated.size());
    r.continuation = tok.Decode(generated);
    r.correct = PasskeyCorrect(r.continuation, c.key);
    r.kv_fraction = static_cast<double>(r.kv_bytes) / (full_bytes_per_token * r.n_prompt);
    results.push_back(std::move(r));
    if (progress) progress(static_cast<int>(i), results.back());
  }
  return results;
}

PasskeySummary SummarizePasskey(const std::vector<PasskeyResult>& results) {
  PasskeySummary s;
  std::map<double, PasskeyBucket> by_length, by_depth;
  double frac = 0.0;
  for (const PasskeyResult& r : results) {
    ++s.n;
    s.correct += r.correct;
    frac += r.kv_fraction;
    s.seconds += r.seconds;
    s.n_prompt_tokens += r.n_prompt;
    for (auto [m, value] : {std::pair{&by_length, static_cast<double>(r.length)}, std::pair{&by_depth, r.depth}}) {
      PasskeyBucket& b = (*m)[value];
      b.value = value;
      ++b.n;
      b.correct += r.correct;
    }
  }
  if (s.n > 0) {
    s.accuracy = static_cast<double>(s.correct) / s.n;
    s.mean_kv_fraction = frac / s.n;
  }
  s.by_length = Buckets(by_length);
  s.by_depth = Buckets(by_depth);
  return s;
}

}  // namespace dk
