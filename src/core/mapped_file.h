// Read-only memory map of a whole file. Move-only; unmaps on destruction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"

namespace dk {

class MappedFile {
 public:
  // Maps `path` read-only. Errors name the path and the OS reason.
  static StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
Status WriteFileAtomically(const std::string& path, const void* bytes, size_t size);
// Reads a whole (small) file into a string.
StatusOr<std::string> ReadWholeFile(const std::string& path);

}  // namespace dk
