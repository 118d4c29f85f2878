// Training sequences for the router: windows of plain text, some ending with a retrieval document
// (a key hidden in a haystack and asked for at the end), so the router learns what a cache must
// keep for the questions users ask of long contexts. Sequence i of a run depends only on (seed, i):
// a resumed run sees exactly the sequences an uninterrupted one would.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/tokenizer.h"

namespace dk {

struct TrainData {
  std::vector<int32_t> plain;              // the plain text's tokens (no BOS)
  std::vector<std::vector<int32_t>> docs;  // each document's tokens (no BOS), at most seq_len - 1
  int shortened_docs = 0;                  // documents longer than seq_len - 1, shortened (ShortenDocument)
  int skipped_docs = 0;                    // documents that could not be shortened enough (not used)
};

// A retrieval document cut to at most max_tokens tokens: each key sentence (around its "Remember"),
// the question and answer at the end and the first words are kept whole; every stretch of haystack
// between them keeps its first part, the same fraction of each, as large as fits. "" when even the
// kept parts do not fit.
std::string ShortenDocument(const std::string& doc, const Tokenizer& tok, int max_tokens);

// Tokenizes `plain_text` (at least seq_len tokens needed) and `docs_text` (documents separated by
// blank lines; may be empty). Documents longer than seq_len - 1 tokens are shortened to fit.
StatusOr<TrainData> MakeTrainData(const Tokenizer& tok, const std::string& plain_text, const std::string& docs_text,
                                  int seq_len);

// Writes sequence `index` of a run: BOS, then plain text from an offset drawn from (seed, index);
// with probability doc_ratio (drawn the same way, when there are documents) the last tokens are a
// whole document instead. out: [seq_len].
void MakeSequence(const TrainData& data, uint64_t seed, uint64_t index, int seq_len, double doc_ratio, int32_t bos,
                  int32_t* out);

}  // namespace dk
