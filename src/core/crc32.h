// CRC-32 (IEEE 802.3 / zlib / PNG): guards profiles and checkpoints against damage.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dk {

uint32_t Crc32(const uint8_t* data, size_t n);

}  // namespace dk
