// Retrieval from a long context, three tasks on haystacks of held-out text:
//  - passkey: a key sentence ("The pass key is 48213. Remember it. 48213 is the pass key.") hidden
//    at a chosen depth, then asked for at the end (" What is the pass key? The pass key is"); the
//    model must continue with the key.
//  - keys: the same among distractor keys (0 to max_distractors key sentences under other phrases,
//    at random places), and with word keys under word phrases ("The secret word is harbor. ...").
//  - records: a block of records ("Records: oak 4821; river 1234; ... .") after a haystack of
//    `length` words, then " The number for river is"; the model must continue with " 1234". The
//    depth is where the asked record sits in the block (v3 reads a block the question follows, as
//    it was trained; a block buried in text it reads about half the time even with the full cache).
// They measure whether a cache keeps what a later query needs: a cache that drops or blurs the key
// sentence or the record loses the answer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/threads.h"
#include "kv/kv_cache.h"
#include "model/llama.h"

namespace dk {

struct PasskeyOptions {
  std::string task = "passkey";  // passkey, keys or records (above)
  std::vector<int> lengths = {150, 300, 500};  // haystack length in words
  std::vector<double> depths = {0.1, 0.3, 0.5, 0.7, 0.9};  // where the key sentence goes, in [0, 1]
  int per_cell = 2;  // cases per (length, depth) cell
  uint64_t seed = 1;
  int n_predict = 8;  // most tokens decoded per answer (" 48213." is about 7)
  std::vector<std::string> phrases = {"pass key", "secret code", "magic number", "access code"};
  // keys: phrases whose key is a lower-case word (taken in turn with `phrases`), and the most
  // distractor key sentences per case (each case draws 0..max_distractors, under other phrases).
  std::vector<std::string> word_phrases = {"secret word"};
  int max_distractors = 2;
  // records: records per block, drawn in [records_min, records_max].
  int records_min = 20, records_max = 60;
};

// The options of each task as `dynakv eval` and `dynakv passkey --task` use them by default.
PasskeyOptions DefaultRetrievalOptions(const std::string& task);

struct PasskeyCase {
  int length = 0;        // haystack words (the key sentence not counted)
  double depth = 0.0;
  std::string phrase;    // e.g. "pass key"; records: "records"
  std::string key;       // the answer: 5 digits (10000..99999), a lower-case word, or a record's 4 digits
  int distractors = 0;   // keys: distractor key sentences; records: records in the block
  int key_word = 0;      // haystack words before the key sentence: round(depth * length)
  int64_t offset = 0;    // first word of the window in the source text's words
  int redraws = 0;       // windows drawn and rejected because the prompt did not fit (see below)
  std::string prompt;    // haystack with the key sentence, then " What is the <phrase>? The <phrase> is"
};

struct PasskeyResult {
  // Copied from the case so that results summarize on their own.
  int length = 0;
  double depth = 0.0;
  std::string phrase, key;
  int distractors = 0;
  std::string continuation;  // the greedy continuation as text
  int n_prompt = 0;          // prompt tokens, BOS included
  int n_generated = 0;
  bool correct = false;
  size_t kv_bytes = 0;       // cache BytesUsed after the prompt
  double kv_fraction = 0.0;  // kv_bytes / (fp16 full-cache bytes for n_prompt tokens)
  double seconds = 0.0;      // prefill + decode
};

struct PasskeyBucket {
  double value = 0.0;  // the length or the depth
  int n = 0;
  int correct = 0;
  double accuracy() const { return n > 0 ? static_cast<double>(correct) / n : 0.0; }
};

struct PasskeySummary {
  int n = 0;
  int correct = 0;
  double accuracy = 0.0;
  double mean_kv_fraction = 0.0;
  double seconds = 0.0;
  int64_t n_prompt_tokens = 0;
  std::vector<PasskeyBucket> by_length;  // ascending
  std::vector<PasskeyBucket> by_depth;   // ascending
  std::vector<PasskeyBucket> by_tokens;  // prompt tokens, in buckets of 1024 (value: the bucket's upper end)
  std::vector<PasskeyBucket> by_distractors;  // keys: distractor count; records: records per block
};

// Checks the options alone (no text). InvalidArgument names the option by its CLI flag.
Status ValidatePasskeyOptions(const PasskeyOptions& options);

// Splits `text` into whitespace-separated words (newlines and blank lines count as one space).
std::vector<std::string> SplitWords(const std::string& text);

// The key sentence: "The <phrase> is <key>. Remember it. <key> is the <phrase>."
std::string PasskeySentence(const std::string& phrase, const std::string& key);

// Builds lengths x depths x per_cell cases (in that order) from `text`, deterministically for a
// seed. Refuses bad options and texts with fewer words than the longest length.
//
// With a tokenizer and max_prompt_tokens > 0, a window whose prompt has more tokens than that
// (BOS included) is redrawn at another offset, so that every case fits a context: words cost
// very different numbers of tokens (500 words of valid.txt are 700-1250 tokens; tables of race
// times are the long ones). Each case draws from its own generator, so a redraw changes no other
// case, and without a tokenizer the cases are the same as with one whose limit is never hit.
// InvalidArgument naming the case when no window fits in 100 draws.
StatusOr<std::vector<PasskeyCase>> MakePasskeyCases(const std::string& text, const PasskeyOptions& options,
                                                    const Tokenizer* tokenizer = nullptr, int max_prompt_tokens = 0);

// The first run of ASCII digits in `text` ("" when there is none).
std::string FirstDigitRun(const std::string& text);
// The first run of ASCII letters in `text` ("" when there is none).
std::string FirstWordRun(const std::string& text);
// Exact retrieval: for a numeric key, the first digit run of the continuation is the key, all of it
// (" 48213." is right; " 4821", " 482130" and " 48213 7" with a different first run are wrong);
// for a word key, the first run of letters is the key (" harbor." right, " harbors" wrong).
bool PasskeyCorrect(const std::string& continuation, const std::string& key);

// Called after each case with its index into `cases`.
using PasskeyProgress = std::function<void(int index, const PasskeyResult& result)>;

// Runs every case through `model` with `cache` (cleared before each case): the prompt (with BOS)
// is prefilled, then greedy decoding runs for up to n_predict tokens, stopping early once the
// continuation has a non-digit after its digits. Every prompt is tokenized and checked against
// the cache's capacity before any runs: a case that does not fit (prompt plus n_predict - 1
// decoded tokens) is InvalidArgument naming the case.
StatusOr<std::vector<PasskeyResult>> RunPasskey(const Model& model, const std::vector<PasskeyCase>& cases,
                                                int n_predict, KvCache& cache, ThreadPool& pool,
                                                const PasskeyProgress& progress = nullptr);

// Accuracy overall, by length and by depth; mean KV fraction over cases.
PasskeySummary SummarizePasskey(const std::vector<PasskeyResult>& results);

}  // namespace dk
