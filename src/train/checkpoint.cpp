#include "train/checkpoint.h"

#include <cstring>
#include <memory>

#include "core/crc32.h"
#include "core/mapped_file.h"

namespace dk {

namespace {

constexpr char kMagic[8] = {'D', 'K', 'V', 'C', 'K', 'P', 'T', '\0'};
constexpr uint32_t kVersion = 1;
constexpr size_t kPreamble = 12;            // magic + version, outside the CRC
constexpr size_t kHeader = kPreamble + 24;  // + hash, step, n

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
  if (size < kHeader + 4 || std::memcmp(d, kMagic, sizeof(kMagic)) != 0)
    return Corrupt(path + ": not a dynakv training checkpoint (magic 'DKVCKPT')");
  uint32_t version;
  std::memcpy(&version, d + 8, 4);
  if (version != kVersion)
    return Unimplemented(path + ": checkpoint version " + std::to_string(version) + ", this build reads version " +
                         std::to_string(kVersion));
  Checkpoint c;
  uint64_t n;
  std::memcpy(&c.config_hash, d + 12, 8);
  std::memcpy(&c.step, d + 20, 8);
  std::memcpy(&n, d + 28, 8);
  if (n > (size - kHeader - 4) / 12 || kHeader + 12 * n + 4 != size)
    return Corrupt(path + ": checkpoint of " + std::to_string(size) + " bytes cannot hold " + std::to_string(n) +
                   " parameters (truncated or damaged)");
  uint32_t stored;
  std::memcpy(&stored, d + size - 4, 4);
  if (Crc32(d + kPreamble, size - 4 - kPreamble) != stored)
    return Corrupt(path + ": checksum mismatch (the checkpoint is damaged)");
  if (c.step < 0) return Corrupt(path + ": negative step " + std::to_string(c.step));
  const uint8_t* p = d + kHeader;
  for (std::vector<float>* a : {&c.params, &c.m, &c.v}) {
    a->resize(n);
    std::memcpy(a->data(), p, n * sizeof(float));
    p += n * sizeof(float);
  }
  return c;
}

}  // namespace dk
