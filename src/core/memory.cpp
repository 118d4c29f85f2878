#include "core/memory.h"

#include <cstdio>
#include <fstream>
#include <sstream>

namespace dk {

uint64_t AvailableMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return 0;
}

std::string HumanBytes(uint64_t bytes) {
  char buf[32];
  const double b = static_cast<double>(bytes);
  if (b >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof(buf), "%.1f GiB", b / (1024.0 * 1024 * 1024));
  else if (b >= 1024.0 * 1024) std::snprintf(buf, sizeof(buf), "%.1f MiB", b / (1024.0 * 1024));
  else std::snprintf(buf, sizeof(buf), "%.1f KiB", b / 1024.0);
  return buf;
}

Status CheckMemory(uint64_t bytes, const std::string& what) {
  const uint64_t avail = AvailableMemoryBytes();
  if (avail == 0 || bytes <= avail) return Status::Ok();
  return ResourceExhausted(what + " needs " + HumanBytes(bytes) + ", but only " + HumanBytes(avail) +
                           " of memory is available");
}

}  // namespace dk
