#include "train/checkpoint.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "core/crc32.h"
#include "core/mapped_file.h"

namespace dk {

namespace {

constexpr char kMagic[8] = {'D', 'K', 'V', 'C', 'K', 'P', 'T', '\0'};
constexpr uint32_t kVersion = 2;
constexpr size_t kPreamble = 12;            // magic + version, outside the CRC
constexpr size_t kHeaderV1 = kPreamble + 24;  // + hash, step, n
constexpr size_t kHeader = kHeaderV1 + 32;    // + the last step's four metrics (version 2)

template <typename T>
void Put(std::vector<uint8_t>& out, const T& x) {
  const auto* b = reinterpret_cast<const uint8_t*>(&x);
  out.insert(out.end(), b, b + sizeof(T));
}

}  // namespace

Status SaveCheckpoint(const Checkpoint& c, const std::string& path) {
  const size_t n = c.params.size();
  if (c.m.size() != n || c.v.size() != n)
    return Internal("checkpoint: parameters and moments differ in size (" + std::to_string(n) + ", " +
                    std::to_string(c.m.size()) + ", " + std::to_string(c.v.size()) + ")");
  std::vector<uint8_t> out;
  out.reserve(kHeader + 12 * n + 4);
  out.insert(out.end(), kMagic, kMagic + sizeof(kMagic));
  Put(out, kVersion);
  Put(out, c.config_hash);
  Put(out, c.step);
  Put(out, static_cast<uint64_t>(n));
  const double none = std::numeric_limits<double>::quiet_NaN();
  for (const double x : {c.last ? c.last->loss : none, c.last ? c.last->kl : none, c.last ? c.last->ce : none,
                         c.last ? c.last->fraction : none})
    Put(out, x);
  for (const std::vector<float>* a : {&c.params, &c.m, &c.v}) {
    const auto* b = reinterpret_cast<const uint8_t*>(a->data());
    out.insert(out.end(), b, b + n * sizeof(float));
  }
  Put(out, Crc32(out.data() + kPreamble, out.size() - kPreamble));
  return WriteFileAtomically(path, out.data(), out.size());
}

StatusOr<Checkpoint> LoadCheckpoint(const std::string& path) {
  DK_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> file, MappedFile::Open(path));
  const uint8_t* d = file->data();
  const size_t size = file->size();
  if (size < kHeaderV1 + 4 || std::memcmp(d, kMagic, sizeof(kMagic)) != 0)
    return Corrupt(path + ": not a dynakv training checkpoint (magic 'DKVCKPT')");
  uint32_t version;
  std::memcpy(&version, d + 8, 4);
  if (version != 1 && version != kVersion)
    return Unimplemented(path + ": checkpoint version " + std::to_string(version) + ", this build reads versions 1 and " +
                         std::to_string(kVersion));
  const size_t header = version == 1 ? kHeaderV1 : kHeader;
  if (size < header + 4) return Corrupt(path + ": checkpoint of " + std::to_string(size) + " bytes is truncated");
  Checkpoint c;
  uint64_t n;
  std::memcpy(&c.config_hash, d + 12, 8);
  std::memcpy(&c.step, d + 20, 8);
  std::memcpy(&n, d + 28, 8);
  if (n > (size - header - 4) / 12 || header + 12 * n + 4 != size)
    return Corrupt(path + ": checkpoint of " + std::to_string(size) + " bytes cannot hold " + std::to_string(n) +
                   " parameters (truncated or damaged)");
  uint32_t stored;
  std::memcpy(&stored, d + size - 4, 4);
  if (Crc32(d + kPreamble, size - 4 - kPreamble) != stored)
    return Corrupt(path + ": checksum mismatch (the checkpoint is damaged)");
  if (c.step < 0) return Corrupt(path + ": negative step " + std::to_string(c.step));
  if (version >= 2) {
    double x[4];
    std::memcpy(x, d + kHeaderV1, sizeof(x));
    if (!std::isnan(x[0])) c.last = LastStepMetrics{x[0], x[1], x[2], x[3]};
  }
  const uint8_t* p = d + header;
  for (std::vector<float>* a : {&c.params, &c.m, &c.v}) {
    a->resize(n);
    std::memcpy(a->data(), p, n * sizeof(float));
    p += n * sizeof(float);
  }
  return c;
}

}  // namespace dk
