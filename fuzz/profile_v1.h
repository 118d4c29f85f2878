// The version-1 file of a profile without flags or router: SerializeProfile writes version 2,
// whose header differs from version 1 only by the version number and the two u32 fields after
// n_calib_tokens (flags, router hidden width = 0); the checksum is recomputed.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/crc32.h"
#include "kv/profile.h"

namespace dk::fuzz {

inline std::vector<uint8_t> ProfileAsVersion1(const DynaKvProfile& p) {
  std::vector<uint8_t> bytes = SerializeProfile(p);
  // magic 8, version 4, fingerprint 8, name length 4 + name, n_layer, n_head_kv, head_dim,
  // n_levels 4 each, levels, n_calib_tokens 8; then flags and hidden (version 2 only).
  const size_t flags_at = 8 + 4 + 8 + 4 + p.model_name.size() + 4 * 4 + 4 * p.levels.size() + 8;
  bytes.erase(bytes.begin() + static_cast<std::ptrdiff_t>(flags_at),
              bytes.begin() + static_cast<std::ptrdiff_t>(flags_at + 8));
  const uint32_t version = 1;
  std::memcpy(bytes.data() + 8, &version, 4);
  const uint32_t crc = Crc32(bytes.data() + 12, bytes.size() - 16);
  std::memcpy(bytes.data() + bytes.size() - 4, &crc, 4);
  return bytes;
}

}  // namespace dk::fuzz
