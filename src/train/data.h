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
  int skipped_docs = 0;                    // documents longer than seq_len - 1 (not used)
};

// Tokenizes `plain_text` (at least seq_len tokens needed) and `docs_text` (documents separated by
// blank lines; may be empty).
StatusOr<TrainData> MakeTrainData(const Tokenizer& tok, const std::string& plain_text, const std::string& docs_text,
                                  int seq_len);

// Writes sequence `index` of a run: BOS, then plain text from an offset drawn from (seed, index);
// with probability doc_ratio (drawn the same way, when there are documents) the last tokens are a
// whole document instead. out: [seq_len].
void MakeSequence(const TrainData& data, uint64_t seed, uint64_t index, int seq_len, double doc_ratio, int32_t bos,
                  int32_t* out);

}  // namespace dk
