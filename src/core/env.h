// The environment variables the library reads, in one table: each knob's name, what it sets and
// the values it accepts. A knob is read where it is used (EnvInt / EnvChoice); a malformed value
// is ignored there (the default holds), and EnvironmentProblems() names it, so the command line
// refuses to start with it (exit 2) instead of running with a setting the user did not ask for
// (DYNAKV_DOT_MAX_ROWS=abc meant 0 rows before).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dk {

struct EnvKnob {
  std::string_view name;
  std::string_view help;
  long lo = 0, hi = 0;                    // an integer knob: accepted range
  std::vector<std::string_view> choices;  // a word knob: accepted words (then lo/hi are unused)
};

// Every DYNAKV_* variable the library reads.
const std::vector<EnvKnob>& EnvKnobs();

// The integer value of a knob of the table; nullopt when unset, empty or malformed.
std::optional<long> EnvInt(std::string_view name);
// The word value of a knob of the table; nullopt when unset, empty or not one of its choices.
std::optional<std::string> EnvChoice(std::string_view name);

// One message per set knob whose value is malformed, naming the variable, the value and what it
// accepts; empty when all are well-formed.
std::vector<std::string> EnvironmentProblems();

}  // namespace dk
