// Read-only memory map of a whole file. Move-only; unmaps on destruction. View() gives the same
// interface over memory the caller owns (parsers that take a buffer: fuzzers, in-memory files).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "core/status.h"

namespace dk {

class MappedFile {
 public:
  // Maps `path` read-only; only a regular file (a pipe, device or folder is refused without
  // blocking). Errors name the path and the OS reason.
  static StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  // A non-owning view of `size` bytes at `data`, named `name` in messages; nothing is unmapped.
  // The caller keeps the memory alive (and unchanged) for the view's lifetime.
  static std::unique_ptr<MappedFile> View(const uint8_t* data, size_t size, const std::string& name);
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
  bool owned_ = true;  // false for View(): the memory is not ours to unmap
  std::string path_;
};

// Writes `bytes` to `path` atomically: a nameless (O_TMPFILE) or temporary file in the same
// folder, fsync, then linked / renamed into place; nothing is left behind on an error or a kill.
// A name that is there must be a regular file (a folder, device or pipe is refused: renaming over
// /dev/null would replace the device).
Status WriteFileAtomically(const std::string& path, const void* bytes, size_t size);
// The same for a file too large to hold in memory: `write` streams it to the open descriptor
// (its errors name what failed). Nothing named is left behind when the process is killed meanwhile
// (where O_TMPFILE exists).
Status WriteFileAtomicallyWith(const std::string& path, const std::function<Status(int fd)>& write);
// Whether WriteFileAtomically(path, ...) can succeed, checked before the work that produces the
// bytes: the name is not a folder, device or pipe, its folder exists, and a file can be made there
// (tried for real: a nameless file, or a temporary one removed at once). IoError naming the path
// and the folder.
Status CheckWritableFile(const std::string& path);
// Reads a whole regular file (not a pipe, device or folder: refused without blocking) into a
// string; larger than max_bytes is InvalidArgument naming the file.
constexpr size_t kMaxTextBytes = size_t{1} << 30;
StatusOr<std::string> ReadWholeFile(const std::string& path, size_t max_bytes = kMaxTextBytes);
// The same file, refused in the same cases, read a part of at most part_bytes at a time: `consume`
// gets the parts in order and returns false to stop early (the rest is not read). Memory is one
// part, however large the file.
Status ReadFileInParts(const std::string& path, size_t part_bytes, const std::function<bool(std::string_view)>& consume,
                       size_t max_bytes = kMaxTextBytes);

}  // namespace dk
