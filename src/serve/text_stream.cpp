#include "serve/text_stream.h"

#include <algorithm>

namespace dk {

size_t IncompleteUtf8Tail(const std::string& s) {
  // Walk back over at most 3 continuation bytes to the lead byte; the tail is incomplete when the
  // lead announces more bytes than follow it.
  const size_t n = s.size();
  for (size_t back = 1; back <= std::min<size_t>(4, n); ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    const size_t len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
    return len > back ? back : 0;
  }
  return 0;  // only continuation bytes: invalid, not incomplete; send them as they are
}

size_t TextStream::HoldBack() const {
  size_t hold = IncompleteUtf8Tail(pending_);
  for (const std::string& stop : stops_) {
    if (stop.empty()) continue;
    // Longest proper prefix of the stop string that pending_ ends with.
    for (size_t k = std::min(stop.size() - 1, pending_.size()); k > hold; --k) {
      if (pending_.compare(pending_.size() - k, k, stop, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  return hold;
}

std::string TextStream::Push(const std::string& piece) {
  if (stopped_) return "";
  pending_ += piece;
  size_t first = std::string::npos;
  for (const std::string& stop : stops_) {
    if (!stop.empty()) first = std::min(first, pending_.find(stop));
  }
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, first);
    pending_.clear();
    return out;
  }
  const size_t keep = HoldBack();
  std::string out = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string TextStream::Flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace dk
