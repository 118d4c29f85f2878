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
bool IsLetter(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsLowerWord(const std::string& w) {
  if (w.size() < 3 || w.size() > 8) return false;
  for (char c : w)
    if (c < 'a' || c > 'z') return false;
  return true;
}

// Candidate key words and record names: the text's lower-case words of 3-8 letters, each once,
// in sorted order (deterministic for a text), less the words of the phrases.
std::vector<std::string> WordPool(const std::vector<std::string>& words, const PasskeyOptions& o) {
  std::vector<std::string> pool;
  for (const std::string& w : words)
    if (IsLowerWord(w)) pool.push_back(w);
  std::sort(pool.begin(), pool.end());
  pool.erase(std::unique(pool.begin(), pool.end()), pool.end());
  std::vector<std::string> banned = {"records", "number", "remember"};
  for (const auto* list : {&o.phrases, &o.word_phrases})
    for (const std::string& p : *list)
      for (const std::string& w : SplitWords(p)) banned.push_back(w);
  std::erase_if(pool, [&](const std::string& w) { return std::count(banned.begin(), banned.end(), w) > 0; });
  return pool;
}

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

PasskeyOptions DefaultRetrievalOptions(const std::string& task) {
  PasskeyOptions o;
  o.task = task;
  if (task == "keys" || task == "records") {
    // Haystacks up to about 3.6k tokens of v3's held-out text (about 2.85 tokens per word), key or
    // record block at five depths; 4 x 5 x 3 = 60 cases.
    o.lengths = {200, 500, 900, 1250};
    o.per_cell = 3;
  }
  if (task == "records") {
    o.n_predict = 6;                    // " 1234." is at most 6 tokens
    o.lengths = {100, 400, 800, 1100};  // and a block of up to 60 records, about 500 tokens
  }
  return o;
}

Status ValidatePasskeyOptions(const PasskeyOptions& o) {
  if (o.task != "passkey" && o.task != "keys" && o.task != "records")
    return InvalidArgument("--task: unknown retrieval task '" + o.task + "' (passkey, keys, records)");
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
  for (const std::string& p : o.word_phrases)
    if (p.empty()) return InvalidArgument("word_phrases: a phrase is empty");
  if (o.max_distractors < 0 || o.max_distractors > 16)
    return InvalidArgument("--distractors: must be in [0, 16], found " + std::to_string(o.max_distractors));
  if (o.task == "keys" && o.max_distractors > 0 && o.phrases.size() < 2)
    return InvalidArgument("--distractors: distractor keys need at least two number phrases");
  if (o.records_min < 1 || o.records_max < o.records_min || o.records_max > 1000)
    return InvalidArgument("records: the records per block must satisfy 1 <= min <= max <= 1000, found " +
                           std::to_string(o.records_min) + ".." + std::to_string(o.records_max));
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
  const bool keys = o.task == "keys", records = o.task == "records";
  std::vector<std::string> pool;
  if (keys || records) {
    pool = WordPool(words, o);
    const size_t need = records ? static_cast<size_t>(o.records_max) : 1;
    if (pool.size() < std::max<size_t>(need, 2))
      return InvalidArgument("the text has " + std::to_string(pool.size()) +
                             " distinct lower-case words of 3-8 letters, too few for the " + o.task + " task");
  }
  // keys: number phrases and word phrases in turn.
  std::vector<std::pair<std::string, bool>> turn;  // (phrase, word key)
  for (const std::string& p : o.phrases) turn.emplace_back(p, false);
  if (keys)
    for (const std::string& p : o.word_phrases) turn.emplace_back(p, true);
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
        c.key_word = static_cast<int>(std::lround(depth * length));
        // The case's own generator: redrawing its window leaves every other case as it was.
        std::mt19937_64 rng(seeds());
        // What goes into the haystack: (word position, text), inserted in position order.
        std::vector<std::pair<int, std::string>> inserts;
        std::string question;
        if (records) {
          c.phrase = "records";
          c.distractors = o.records_min + static_cast<int>(Below(rng, o.records_max - o.records_min + 1));
          std::vector<std::string> names;
          while (static_cast<int>(names.size()) < c.distractors) {
            const std::string& w = pool[Below(rng, pool.size())];
            if (std::find(names.begin(), names.end(), w) == names.end()) names.push_back(w);
          }
          std::string block = "Records:";
          std::vector<std::string> values;
          for (size_t k = 0; k < names.size(); ++k) {
            values.push_back(std::to_string(1000 + Below(rng, 9000)));
            block += (k == 0 ? " " : "; ") + names[k] + " " + values.back();
          }
          block += ".";
          // v3 reads a record block that the question follows (as it was trained), not one buried
          // in text: the block ends the haystack, and the depth is where the asked record sits in it.
          const size_t asked = static_cast<size_t>(std::lround(depth * static_cast<double>(names.size() - 1)));
          c.key = values[asked];
          c.key_word = length;
          inserts.emplace_back(length, block);
          question = " The number for " + names[asked] + " is";
        } else {
          // Phrases in turn rather than drawn, so every phrase gets its share of each length.
          const auto& [phrase, word] = turn[cases.size() % turn.size()];
          c.phrase = phrase;
          c.key = word ? pool[Below(rng, pool.size())] : std::to_string(10000 + Below(rng, 90000));
          inserts.emplace_back(c.key_word, PasskeySentence(c.phrase, c.key));
          if (keys && o.max_distractors > 0) {
            // Distractors: other number phrases, each with its own key, anywhere in the haystack.
            std::vector<std::string> others;
            for (const std::string& p : o.phrases)
              if (p != c.phrase) others.push_back(p);
            c.distractors = static_cast<int>(Below(rng, std::min<size_t>(o.max_distractors, others.size()) + 1));
            for (int d = 0; d < c.distractors; ++d) {
              const size_t pick = d + Below(rng, others.size() - d);
              std::swap(others[d], others[pick]);
              std::string value;
              do value = std::to_string(10000 + Below(rng, 90000));
              while (value == c.key);
              inserts.emplace_back(static_cast<int>(Below(rng, length + 1)), PasskeySentence(others[d], value));
            }
          }
          question = " What is the " + c.phrase + "? The " + c.phrase + " is";
        }
        std::stable_sort(inserts.begin(), inserts.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
        for (int draw = 0;; ++draw) {
          c.offset = static_cast<int64_t>(Below(rng, words.size() - length + 1));
          const size_t begin = static_cast<size_t>(c.offset), end = begin + length;
          std::string hay;
          size_t at = begin;
          for (const auto& [pos, insert] : inserts) {
            const size_t stop = begin + static_cast<size_t>(pos);
            if (stop > at) hay += (hay.empty() ? "" : " ") + Join(words, at, stop);
            at = std::max(at, stop);
            hay += (hay.empty() ? "" : " ") + insert;
          }
          if (at < end) hay += ' ' + Join(words, at, end);
          c.prompt = hay + question;
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

std::string FirstWordRun(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && !IsLetter(text[i])) ++i;
  size_t j = i;
  while (j < text.size() && IsLetter(text[j])) ++j;
  return text.substr(i, j - i);
}

bool PasskeyCorrect(const std::string& continuation, const std::string& key) {
  if (key.empty()) return false;
  return IsDigit(key[0]) ? FirstDigitRun(continuation) == key : FirstWordRun(continuation) == key;
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
    r.distractors = c.distractors;
    const bool numeric = !c.key.empty() && IsDigit(c.key[0]);
    r.n_prompt = static_cast<int>(prompts[i].size());
    cache.Clear();
    Sampler greedy(SamplerOptions{0.0f, 0, 1.0f, 0});
    std::vector<int32_t> generated;
    std::string text;  // pieces so far, for the stopping rule
    bool seen = false;  // a character of the answer's kind (digit or letter) has come
    const auto t0 = std::chrono::steady_clock::now();
    auto stats = Generate(model, prompts[i], n_predict, n_batch, cache, greedy, pool, [&](int32_t t) {
      // The first token is sampled from the prefill's logits, before any decode step: the cache
      // then holds exactly the prompt.
      if (generated.empty()) r.kv_bytes = cache.BytesUsed();
      generated.push_back(t);
      for (char ch : tok.TokenToPiece(t)) {
        if (numeric ? IsDigit(ch) : IsLetter(ch)) {
          seen = true;
        } else if (seen) {
          return false;  // the number (or word) has ended: nothing after it is scored
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
  std::map<double, PasskeyBucket> by_length, by_depth, by_tokens, by_distractors;
  double frac = 0.0;
  for (const PasskeyResult& r : results) {
    ++s.n;
    s.correct += r.correct;
    frac += r.kv_fraction;
    s.seconds += r.seconds;
    s.n_prompt_tokens += r.n_prompt;
    const double tokens_bucket = 1024.0 * std::ceil(r.n_prompt / 1024.0);
    for (auto [m, value] : {std::pair{&by_length, static_cast<double>(r.length)}, std::pair{&by_depth, r.depth},
                            std::pair{&by_tokens, tokens_bucket},
                            std::pair{&by_distractors, static_cast<double>(r.distractors)}}) {
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
  s.by_tokens = Buckets(by_tokens);
  s.by_distractors = Buckets(by_distractors);
  return s;
}

}  // namespace dk
