// A one-line progress bar on stderr ("[=====>    ] 12/344 chunks, 3.1 s, eta 85 s, ppl 61.2").
// Redrawn at most every 100 ms; on a non-terminal stderr it prints a line every 10 %.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace dk {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, bool enabled = true);
  ~ProgressBar();
  void Update(int64_t done, const std::string& suffix = "");
  void Finish();

 private:
  void Draw(int64_t done, const std::string& suffix);
  std::string label_;
  int64_t total_;
  bool enabled_, tty_, finished_ = false;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace dk
