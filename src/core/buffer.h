// A zero-initialised byte buffer whose pages the OS provides on first touch (calloc of a large
// size maps fresh zero pages): reserving a cache for a long context costs address space, not
// memory, until tokens are written. Move-only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

namespace dk {

class LazyBuffer {
 public:
  LazyBuffer() = default;
  explicit LazyBuffer(size_t size) : size_(size) {
    if (size_ == 0) return;
    data_ = static_cast<uint8_t*>(std::calloc(size_, 1));
    if (data_ == nullptr) throw std::bad_alloc();  // callers check sizes against memory first
  }
  ~LazyBuffer() { std::free(data_); }
  LazyBuffer(LazyBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  LazyBuffer& operator=(LazyBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  LazyBuffer(const LazyBuffer&) = delete;
  LazyBuffer& operator=(const LazyBuffer&) = delete;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace dk
