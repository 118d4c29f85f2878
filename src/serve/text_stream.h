// Generated text on its way to a client: stop strings end it (the stop string itself is not
// sent), and text is held back while it could still be the start of a stop string or while it
// ends inside a UTF-8 character (a character may span byte tokens), so a streamed answer and a
// whole one are always the same text.
#pragma once

#include <string>
#include <vector>

namespace dk {

class TextStream {
 public:
  explicit TextStream(std::vector<std::string> stops) : stops_(std::move(stops)) {}

  // Appends a token's text; returns what may be sent now (possibly empty). After a stop string
  // has appeared, returns the text before it and stopped() is true; later calls return "".
  std::string Push(const std::string& piece);
  // The end of generation: what was held back (a partial stop string is text after all).
  std::string Flush();
  bool stopped() const { return stopped_; }

 private:
  // Bytes at the end of pending_ that must wait: a proper prefix of a stop string, or an
  // incomplete UTF-8 sequence.
  size_t HoldBack() const;

  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

// Length of the incomplete UTF-8 sequence at the end of s (0 when it ends on a whole character).
size_t IncompleteUtf8Tail(const std::string& s);

}  // namespace dk
