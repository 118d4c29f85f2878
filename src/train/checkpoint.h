// Training checkpoints: the parameters, AdamW's moments and the step, tied to the run's
// configuration by a hash so a run resumes only from its own checkpoint. Little-endian binary:
//   "DKVCKPT\0" | u32 version = 2 | u64 config hash | i64 step | u64 n |
//   f64 last step's loss, kl, ce, realised fraction (NaN before the first step) |
//   f32 params[n] | f32 m[n] | f32 v[n] | u32 CRC-32 of everything after the version
// Version 1 (no last-step metrics) is still read.
// Written to a temporary file and renamed (WriteFileAtomically): a kill never leaves half a file.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"

namespace dk {

// What the profile's training info reports of the last step: kept in the checkpoint so that a run
// resumed after its last step (nothing left to train) still reports it.
struct LastStepMetrics {
  double loss = 0.0, kl = 0.0, ce = 0.0, fraction = 0.0;
};

struct Checkpoint {
  uint64_t config_hash = 0;
  int64_t step = 0;                 // steps completed
  std::vector<float> params, m, v;  // [n] each
  std::optional<LastStepMetrics> last;  // absent before the first step, and in version 1 files
};

Status SaveCheckpoint(const Checkpoint& c, const std::string& path);
// Refuses a damaged file (size, CRC) with a message naming it; n is checked against the file size
// before anything is allocated.
StatusOr<Checkpoint> LoadCheckpoint(const std::string& path);

}  // namespace dk
