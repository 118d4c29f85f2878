// libFuzzer target for the DynaKV profile reader: ParseProfile on arbitrary bytes. A rejected
// input must come back as kCorrupt (or kUnimplemented for a newer version) naming the file; an
// accepted one must pass ValidateProfile, and serializing it must reproduce the input exactly
// (version 2 as SerializeProfile writes it; version 1 rebuilt from it, see profile_v1.h): the
// reader neither loses nor invents a byte. A mismatch is a bug.
// The checksum would stop nearly every mutation at the CRC check, so each input is also parsed
// with its last four bytes replaced by the CRC-32 of its payload, which lets mutations reach the
// bases, the router and validation.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/crc32.h"
#include "fuzz_check.h"
#include "kv/profile.h"
#include "profile_v1.h"

namespace {

using namespace dk;

constexpr char kName[] = "fuzz.dkv";
constexpr size_t kPreamble = 12;  // magic and version, outside the CRC

void CheckOne(const uint8_t* data, size_t size) {
  auto parsed = ParseProfile(data, size, kName);
  if (!parsed.ok()) {
    const Status& st = parsed.status();
    FUZZ_CHECK(st.code() == Code::kCorrupt || st.code() == Code::kUnimplemented, "rejected with " + st.ToString());
    FUZZ_CHECK(st.message().find(kName) != std::string::npos, "message lacks the file name: " + st.ToString());
    return;
  }
  const DynaKvProfile& p = *parsed;
  const Status valid = ValidateProfile(p, kName);
  FUZZ_CHECK(valid.ok(), "accepted, then refused by ValidateProfile: " + valid.ToString());
  FUZZ_CHECK(p.file_version == 1 || p.file_version == 2, "file_version " + std::to_string(p.file_version));
  if (p.file_version == 1) FUZZ_CHECK(p.flags == 0 && !p.router, "a version-1 file with flags or a router");
  const std::vector<uint8_t> out = p.file_version == 2 ? SerializeProfile(p) : fuzz::ProfileAsVersion1(p);
  if (p.file_version == 2) FUZZ_CHECK(out.size() == ProfileFileBytes(p), "ProfileFileBytes disagrees");
  size_t diff = 0;
  while (diff < out.size() && diff < size && out[diff] == data[diff]) ++diff;
  FUZZ_CHECK(out.size() == size && diff == size,
             "round trip of a version-" + std::to_string(p.file_version) + " file: " + std::to_string(size) +
                 " bytes in, " + std::to_string(out.size()) + " out, first difference at byte " +
                 std::to_string(diff));
  (void)ExplainedVarianceTable(p);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  CheckOne(data, size);
  if (size >= kPreamble + 4) {
    std::vector<uint8_t> fixed(data, data + size);
    const uint32_t crc = Crc32(fixed.data() + kPreamble, size - 4 - kPreamble);
    std::memcpy(fixed.data() + size - 4, &crc, 4);
    if (std::memcmp(fixed.data() + size - 4, data + size - 4, 4) != 0) CheckOne(fixed.data(), size);
  }
  return 0;
}
