// A calibrated DynaKV profile: per layer, for keys and for values, an orthonormal basis shared by
// all KV heads (columns by decreasing eigenvalue of the centred covariance), the mean, the
// eigenvalues, and the model-wide rank levels; optionally the learned router (version 2).
// File format: docs/profile_format.md.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "kv/router.h"

namespace dk {

struct KvModelInfo;

// One of K or V in one layer. D = n_head_kv * head_dim.
struct BasisSet {
  std::vector<float> basis;        // [D][D] row-major: basis[i * D + j] = component i of direction j
  std::vector<float> mean;         // [D]
  std::vector<double> eigenvalues; // [D], decreasing (variance along each direction)
};

struct DynaKvProfile {
  static constexpr uint32_t kFormatVersion = 2;  // 1: bases only; 2: adds flags and the router
  static constexpr uint32_t kFlagTrainedBases = 1;  // bases and means refined by train-router --train-bases
  static constexpr uint32_t kFlagTcRouter = 2;      // the router was trained for tc latents (rank x precision)
  uint64_t model_fingerprint = 0;  // Model::fingerprint() of the calibrated model
  std::string model_name;          // for messages only
  int n_layer = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  std::vector<int> levels;         // increasing ranks, each in [1, D], last == D
  int64_t n_calib_tokens = 0;      // tokens the statistics were taken over
  std::vector<BasisSet> k, v;      // [n_layer]
  uint32_t flags = 0;              // kFlag* bits
  uint32_t file_version = kFormatVersion;  // the version of the file it was loaded from (messages only)
  std::optional<Router> router;    // the learned router, when trained

  bool trained_bases() const { return (flags & kFlagTrainedBases) != 0; }
  bool tc_router() const { return (flags & kFlagTcRouter) != 0; }

  int kv_dim() const { return n_head_kv * head_dim; }
  // Fraction of variance kept by the first r directions (sum of top-r eigenvalues / total).
  double ExplainedVariance(const BasisSet& b, int r) const;
};

// Default rank levels for width D: roughly geometric from 1 to D (for D = 128:
// 1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128).
std::vector<int> DefaultLevels(int D);
// Checks structure: sizes, levels increasing and ending at D, finite numbers; the router's shapes
// and its budget table (beta increasing, fractions in (0, 1]).
Status ValidateProfile(const DynaKvProfile& p, const std::string& origin);

// Checks user-given levels for width D: each in [1, D], strictly increasing; D is appended when the
// last is below D. InvalidArgument names the offending value. Empty input gives DefaultLevels(D).
StatusOr<std::vector<int>> NormalizeLevels(std::vector<int> levels, int D);
// Exact size in bytes of the file SaveProfile writes for p.
uint64_t ProfileFileBytes(const DynaKvProfile& p);
// The serialized file contents (what SaveProfile writes).
std::vector<uint8_t> SerializeProfile(const DynaKvProfile& p);
// Human-readable table: explained variance per layer and level, for K and V.
std::string ExplainedVarianceTable(const DynaKvProfile& p);

// Written to a temporary file, then renamed. Little-endian, with a CRC-32 over the payload.
Status SaveProfile(const DynaKvProfile& p, const std::string& path);
// Rejects bad magic/version, truncation, checksum mismatch; every message names the file.
StatusOr<DynaKvProfile> LoadProfile(const std::string& path);
// What LoadProfile runs on the file's bytes: parses `size` bytes at `data` (a whole profile file),
// `name` standing for the path in messages. Nothing is kept pointing into `data`.
StatusOr<DynaKvProfile> ParseProfile(const uint8_t* data, size_t size, const std::string& name);
// Refuses a profile calibrated for another model (fingerprint or shape mismatch), with a clear message.
Status CheckProfileMatchesModel(const DynaKvProfile& p, const KvModelInfo& model, const std::string& profile_path);

}  // namespace dk
