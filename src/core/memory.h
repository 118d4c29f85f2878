// What the machine can still give, so that sizes that come from input (a context length, a batch,
// a text) are refused before anything is allocated rather than by an allocation failing.
#pragma once

#include <cstdint>
#include <string>

#include "core/status.h"

namespace dk {

// MemAvailable from /proc/meminfo, in bytes; 0 when it cannot be read (then nothing is refused).
uint64_t AvailableMemoryBytes();
// kResourceExhausted naming `what` when `bytes` exceeds the memory available.
Status CheckMemory(uint64_t bytes, const std::string& what);
// "1.5 GiB", "12.0 MiB", ...
std::string HumanBytes(uint64_t bytes);

}  // namespace dk
