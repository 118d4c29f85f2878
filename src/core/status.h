// Status and StatusOr: how every library function reports failure.
// The library never exits or aborts on bad input; only the CLI decides to exit.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace dk {

enum class Code {
  kOk = 0,
  kInvalidArgument,   // caller passed a bad value (flag, shape, option)
  kNotFound,          // file, key or tensor missing
  kIoError,           // open/read/write/rename failed
  kCorrupt,           // file contents fail validation
  kOutOfRange,        // index, size or value past a limit (e.g. activations that overflowed fp32)
  kResourceExhausted, // a cache or buffer is full, or a size exceeds what the machine has
  kFailedPrecondition,// valid inputs that do not go together (a profile for another model)
  kUnimplemented,     // valid input we do not support (yet)
  kInternal,          // a bug in dynakv
};

const char* CodeName(Code code);

// `text` safe to print in a message: printable ASCII kept, everything else (control characters,
// escape sequences, NUL, bytes >= 0x7f) as \xNN, and at most max_chars of it.
std::string Printable(const std::string& text, size_t max_chars = 200);
// "[lo, hi]" for messages, each bound as its shortest text that reads back the same: integers as
// integers ([1, 16777216], not [1, 1.67772e+07]), fractions as written ([0, 0.95]).
std::string RangeText(double lo, double hi);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "kCorrupt: file.gguf: tensor 'x': ..." style text for humans.
  std::string ToString() const;
  // Prefixes context ("while loading m.gguf") to the message; no-op when ok.
  Status WithContext(const std::string& context) const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return Status(Code::kInvalidArgument, std::move(m)); }
inline Status NotFound(std::string m) { return Status(Code::kNotFound, std::move(m)); }
inline Status IoError(std::string m) { return Status(Code::kIoError, std::move(m)); }
inline Status Corrupt(std::string m) { return Status(Code::kCorrupt, std::move(m)); }
inline Status OutOfRange(std::string m) { return Status(Code::kOutOfRange, std::move(m)); }
inline Status ResourceExhausted(std::string m) { return Status(Code::kResourceExhausted, std::move(m)); }
inline Status FailedPrecondition(std::string m) { return Status(Code::kFailedPrecondition, std::move(m)); }
inline Status Unimplemented(std::string m) { return Status(Code::kUnimplemented, std::move(m)); }
inline Status Internal(std::string m) { return Status(Code::kInternal, std::move(m)); }

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(T value) : v_(std::move(value)) {}                // NOLINT: implicit by design
  StatusOr(Status status) : v_(std::move(status)) {           // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status(Code::kInternal, "StatusOr built from an ok Status");
  }
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace dk

#define DK_CONCAT_INNER(a, b) a##b
#define DK_CONCAT(a, b) DK_CONCAT_INNER(a, b)

#define DK_RETURN_IF_ERROR(expr)              \
  do {                                        \
    ::dk::Status dk_status_ = (expr);         \
    if (!dk_status_.ok()) return dk_status_;  \
  } while (0)

#define DK_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()

#define DK_ASSIGN_OR_RETURN(lhs, expr) DK_ASSIGN_OR_RETURN_IMPL(DK_CONCAT(dk_sor_, __LINE__), lhs, expr)
