// Training checkpoints: the parameters, AdamW's moments and the step, tied to the run's
// configuration by a hash so a run resumes only from its own checkpoint. Little-endian binary:
//   "DKVCKPT\0" | u32 version = 1 | u64 config hash | i64 step | u64 n |
//   f32 params[n] | f32 m[n] | f32 v[n] | u32 CRC-32 of everything after the version
// Written to a temporary file and renamed (WriteFileAtomically): a kill never leaves half a file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace dk {

struct Checkpoint {
  uint64_t config_hash = 0;
  int64_t step = 0;                 // steps completed
  std::vector<float> params, m, v;  // [n] each
};

Status SaveCheckpoint(const Checkpoint& c, const std::string& path);
// Refuses a damaged file (size, CRC) with a message naming it; n is checked against the file size
// before anything is allocated.
StatusOr<Checkpoint> LoadCheckpoint(const std::string& path);

}  // namespace dk
