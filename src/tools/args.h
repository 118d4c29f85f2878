// A small declarative flag parser for the CLI. Flags take llama.cpp's names where one exists.
// Any error is one line naming the flag; the caller prints usage and exits with code 2.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/status.h"

namespace dk::cli {

class ArgParser {
 public:
  ArgParser(std::string command, std::string summary);

  void AddString(std::vector<std::string> names, std::string* target, std::string metavar, std::string help);
  void AddInt(std::vector<std::string> names, int* target, long lo, long hi, std::string help);
  void AddUInt64(std::vector<std::string> names, unsigned long long* target, std::string help);
  void AddDouble(std::vector<std::string> names, double* target, double lo, double hi, std::string help);
  void AddFlag(std::vector<std::string> names, bool* target, std::string help);
  // A flag with a value handed to `apply` (which checks it; its error names the flag); with an
  // empty metavar, a switch that applies "1".
  void AddCallback(std::vector<std::string> names, std::string metavar, std::string help,
                   std::function<Status(const std::string& value)> apply);

  // One positional argument (e.g. an input file), written to *target; without it, positional
  // arguments are refused.
  void AddPositional(std::string* target, std::string metavar, std::string help);

  // Parses argv[first..argc).
  Status Parse(int argc, char** argv, int first);
  bool WasSet(const std::string& name) const;
  std::string Usage() const;

 private:
  struct Flag {
    std::vector<std::string> names;
    std::string metavar, help;
    bool takes_value = true;
    bool set = false;
    std::function<Status(const std::string& name, const std::string& value)> apply;
  };
  Flag* Find(const std::string& name);

  std::string command_, summary_;
  std::vector<Flag> flags_;
  std::string* positional_ = nullptr;
  std::string positional_metavar_, positional_help_;
};

// "a,b,c" -> {"a", "b", "c"} (empty parts kept, so "1,,2" is refused by the parsers below).
std::vector<std::string> SplitCommas(const std::string& s);
// Comma-separated integers in [1, 2^24] / finite numbers; errors name the flag and the value.
Status ParseInts(const std::string& flag, const std::string& value, std::vector<int>* out);
Status ParseDoubles(const std::string& flag, const std::string& value, std::vector<double>* out);

}  // namespace dk::cli
