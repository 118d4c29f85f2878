#include "train/data.h"

#include <algorithm>

#include "core/hash.h"             // Mix64
#include "train/relaxed_cache.h"  // Uniform01

namespace dk {

namespace {

std::vector<std::string> Words(const std::string& text) {
  std::vector<std::string> w;
  size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && text[i] == ' ') ++i;
    const size_t b = i;
    while (i < text.size() && text[i] != ' ') ++i;
    if (i > b) w.emplace_back(text, b, i - b);
  }
  return w;
}

}  // namespace

std::string ShortenDocument(const std::string& doc, const Tokenizer& tok, int max_tokens) {
  const std::vector<std::string> words = Words(doc);
  const int n = static_cast<int>(words.size());
  // Protected: each key sentence ("The <phrase> is <key>. Remember it. <key> is the <phrase>.",
  // found by its "Remember"), the question and answer at the end, and the first words.
  std::vector<char> keep(n, 0);
  auto protect = [&](int b, int e) {
    for (int i = std::max(0, b); i < std::min(n, e); ++i) keep[i] = 1;
  };
  for (int i = 0; i < n; ++i)
    if (words[i] == "Remember") protect(i - 6, i + 8);
  int question = n;
  for (int i = n - 1; i >= 0 && i >= n - 40; --i)
    if (words[i] == "What") {
      question = i;
      break;
    }
  protect(question, n);
  protect(0, 4);
  // Gaps between protected words keep their first part, a fraction r of their words, with r
  // lowered until the document fits: the key sentences, the distractors and the question stay
  // where they are relative to each other, with less haystack between them.
  auto join = [&](double r) {
    std::string out;
    for (int i = 0; i < n;) {
      if (keep[i]) {
        out += (out.empty() ? "" : " ") + words[i];
        ++i;
        continue;
      }
      int j = i;
      while (j < n && !keep[j]) ++j;
      const int kept = static_cast<int>(r * (j - i));
      for (int k = i; k < i + kept; ++k) out += (out.empty() ? "" : " ") + words[k];
      i = j;
    }
    return out;
  };
  const int total = static_cast<int>(tok.Encode(doc, false).size());
  double r = std::min(1.0, 0.95 * max_tokens / std::max(1, total));
  for (int attempt = 0; attempt < 40; ++attempt, r *= 0.9) {
    std::string out = join(r);
    if (static_cast<int>(tok.Encode(out, false).size()) <= max_tokens) return out;
  }
  return "";
}

StatusOr<TrainData> MakeTrainData(const Tokenizer& tok, const std::string& plain_text, const std::string& docs_text,
                                  int seq_len) {
  if (seq_len < 2) return InvalidArgument("--seq-len: expected at least 2 tokens, found " + std::to_string(seq_len));
  TrainData d;
  d.plain = tok.Encode(plain_text, false);
  if (static_cast<int64_t>(d.plain.size()) < seq_len) {
    return InvalidArgument("-f: the training text has " + std::to_string(d.plain.size()) +
                           " tokens; at least --seq-len = " + std::to_string(seq_len) + " are needed");
  }
  // Documents: paragraphs separated by one or more blank lines.
  size_t start = 0;
  while (start < docs_text.size()) {
    size_t end = docs_text.find("\n\n", start);
    if (end == std::string::npos) end = docs_text.size();
    std::string doc = docs_text.substr(start, end - start);
    start = end + 2;
    std::replace(doc.begin(), doc.end(), '\n', ' ');
    const size_t first = doc.find_first_not_of(' ');
    if (first == std::string::npos) continue;
    doc = doc.substr(first, doc.find_last_not_of(' ') - first + 1);
    // Tokenized on its own: with a space-prefixing (SentencePiece) tokenizer it starts with a word
    // boundary, as it would continuing the text before it.
    std::vector<int32_t> ids = tok.Encode(doc, false);
    if (static_cast<int>(ids.size()) > seq_len - 1) {
      // Too long for a sequence: the haystack is shortened around what the question needs.
      const std::string shorter = ShortenDocument(doc, tok, seq_len - 1);
      if (shorter.empty()) {
        ++d.skipped_docs;
        continue;
      }
      ids = tok.Encode(shorter, false);
      ++d.shortened_docs;
    }
    if (!ids.empty()) d.docs.push_back(std::move(ids));
  }
  return d;
}

void MakeSequence(const TrainData& data, uint64_t seed, uint64_t index, int seq_len, double doc_ratio, int32_t bos,
                  int32_t* out) {
  const uint64_t key = Mix64(seed ^ 0x5EC0E7CEull);
  const std::vector<int32_t>* doc = nullptr;
  if (!data.docs.empty() && Uniform01(key, 3 * index) < doc_ratio)
    doc = &data.docs[Mix64(key + 3 * index + 1) % data.docs.size()];
  const int n_doc = doc == nullptr ? 0 : static_cast<int>(doc->size());
  const int n_plain = seq_len - 1 - n_doc;
  out[0] = bos;
  if (n_plain > 0) {
    const uint64_t span = data.plain.size() - static_cast<uint64_t>(n_plain) + 1;
    const uint64_t off = Mix64(key + 3 * index + 2) % span;
    std::copy(data.plain.begin() + static_cast<int64_t>(off), data.plain.begin() + static_cast<int64_t>(off) + n_plain,
              out + 1);
  }
  if (doc != nullptr) std::copy(doc->begin(), doc->end(), out + 1 + n_plain);
}

}  // namespace dk
