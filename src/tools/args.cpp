#include "tools/args.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace dk::cli {

ArgParser::ArgParser(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void ArgParser::AddString(std::vector<std::string> names, std::string* target, std::string metavar, std::string help) {
  flags_.push_back({std::move(names), std::move(metavar), std::move(help), true, false,
                    [target](const std::string&, const std::string& v) {
                      *target = v;
                      return Status::Ok();
                    }});
}

void ArgParser::AddInt(std::vector<std::string> names, int* target, long lo, long hi, std::string help) {
  flags_.push_back({std::move(names), "N", std::move(help), true, false,
                    [target, lo, hi](const std::string& name, const std::string& v) {
                      char* end = nullptr;
                      errno = 0;
                      const long x = std::strtol(v.c_str(), &end, 10);
                      if (v.empty() || *end != '\0' || errno != 0 || x < lo || x > hi)
                        return InvalidArgument(name + ": expected an integer in " + RangeText(lo, hi) + ", found '" + v + "'");
                      *target = static_cast<int>(x);
                      return Status::Ok();
                    }});
}

void ArgParser::AddUInt64(std::vector<std::string> names, unsigned long long* target, std::string help) {
  flags_.push_back({std::move(names), "N", std::move(help), true, false,
                    [target](const std::string& name, const std::string& v) {
                      char* end = nullptr;
                      errno = 0;
                      const unsigned long long x = std::strtoull(v.c_str(), &end, 10);
                      if (v.empty() || v[0] == '-' || *end != '\0' || errno != 0)
                        return InvalidArgument(name + ": expected a non-negative integer, found '" + v + "'");
                      *target = x;
                      return Status::Ok();
                    }});
}

void ArgParser::AddDouble(std::vector<std::string> names, double* target, double lo, double hi, std::string help) {
  flags_.push_back({std::move(names), "X", std::move(help), true, false,
                    [target, lo, hi](const std::string& name, const std::string& v) {
                      char* end = nullptr;
                      errno = 0;
                      const double x = std::strtod(v.c_str(), &end);
                      if (v.empty() || *end != '\0' || errno != 0 || !std::isfinite(x) || x < lo || x > hi)
                        return InvalidArgument(name + ": expected a number in " + RangeText(lo, hi) + ", found '" + v + "'");
                      *target = x;
                      return Status::Ok();
                    }});
}

void ArgParser::AddFlag(std::vector<std::string> names, bool* target, std::string help) {
  flags_.push_back({std::move(names), "", std::move(help), false, false, [target](const std::string&, const std::string&) {
                      *target = true;
                      return Status::Ok();
                    }});
}

void ArgParser::AddPositional(std::string* target, std::string metavar, std::string help) {
  positional_ = target;
  positional_metavar_ = std::move(metavar);
  positional_help_ = std::move(help);
}

void ArgParser::AddCallback(std::vector<std::string> names, std::string metavar, std::string help,
                            std::function<Status(const std::string& value)> apply) {
  const bool takes_value = !metavar.empty();  // no metavar: a switch, applied with "1"
  flags_.push_back({std::move(names), std::move(metavar), std::move(help), takes_value, false,
                    [apply, takes_value](const std::string&, const std::string& v) {
                      return apply(takes_value ? v : std::string("1"));
                    }});
}

ArgParser::Flag* ArgParser::Find(const std::string& name) {
  for (Flag& f : flags_)
    for (const std::string& n : f.names)
      if (n == name) return &f;
  return nullptr;
}

Status ArgParser::Parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool has_inline = false;
    if (arg.rfind("--", 0) == 0) {
      const size_t eq = arg.find('=');
      if (eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_inline = true;
      }
    }
    if (arg.empty() || arg[0] != '-') {
      if (positional_ == nullptr || !positional_->empty()) return InvalidArgument("unexpected argument '" + arg + "'");
      *positional_ = arg;
      continue;
    }
    Flag* f = Find(arg);
    if (f == nullptr) return InvalidArgument("unknown flag '" + arg + "'");
    if (f->takes_value && !has_inline) {
      if (i + 1 >= argc) return InvalidArgument(arg + ": missing value");
      value = argv[++i];
    } else if (!f->takes_value && has_inline) {
      return InvalidArgument(arg + ": takes no value");
    }
    DK_RETURN_IF_ERROR(f->apply(arg, value));
    f->set = true;
  }
  return Status::Ok();
}

bool ArgParser::WasSet(const std::string& name) const {
  for (const Flag& f : flags_)
    for (const std::string& n : f.names)
      if (n == name) return f.set;
  return false;
}

std::string ArgParser::Usage() const {
  std::ostringstream s;
  s << "usage: dynakv " << command_ << (positional_ ? " " + positional_metavar_ : "") << " [flags]\n  " << summary_
    << "\n";
  if (positional_) s << "  " << positional_metavar_ << ": " << positional_help_ << "\n";
  s << "flags:\n";
  for (const Flag& f : flags_) {
    std::string names;
    for (const std::string& n : f.names) names += (names.empty() ? "" : ", ") + n;
    if (f.takes_value) names += " " + f.metavar;
    s << "  " << names;
    if (names.size() < 26) s << std::string(26 - names.size(), ' ');
    else s << "\n" << std::string(28, ' ');
    s << f.help << "\n";
  }
  return s.str();
}

std::vector<std::string> SplitCommas(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t comma = s.find(',', start);
    parts.push_back(s.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) return parts;
    start = comma + 1;
  }
}

Status ParseInts(const std::string& flag, const std::string& value, std::vector<int>* out) {
  out->clear();
  for (const std::string& part : SplitCommas(value)) {
    char* end = nullptr;
    errno = 0;
    const long x = std::strtol(part.c_str(), &end, 10);
    if (part.empty() || *end != '\0' || errno != 0 || x < 1 || x > (1 << 24))
      return InvalidArgument(flag + ": expected comma-separated integers in [1, 16777216], found '" + value + "'");
    out->push_back(static_cast<int>(x));
  }
  return Status::Ok();
}

Status ParseDoubles(const std::string& flag, const std::string& value, std::vector<double>* out) {
  out->clear();
  for (const std::string& part : SplitCommas(value)) {
    char* end = nullptr;
    errno = 0;
    const double x = std::strtod(part.c_str(), &end);
    if (part.empty() || *end != '\0' || errno != 0 || !std::isfinite(x))
      return InvalidArgument(flag + ": expected comma-separated numbers, found '" + value + "'");
    out->push_back(x);
  }
  return Status::Ok();
}

}  // namespace dk::cli
