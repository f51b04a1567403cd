// Error codes and Result<T>: how every gridseal function reports failure without exceptions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace gs {

enum class Errc : std::uint8_t {
  ok = 0,
  truncated,          // input ended before a length promised
  bad_tag,            // unexpected tag byte
  bad_length,         // indefinite, overlong or inconsistent length
  too_large,          // a length, count or size above a configured bound
  too_deep,           // nesting above the bound
  bad_value,          // a field whose value is not allowed
  wrong_order,        // ACSE elements out of order or duplicated
  missing_element,    // a required element is absent
  trailing_data,      // bytes after the end of a structure
  bad_checksum,       // C12.19 table checksum mismatch
  bad_mac,            // EAX' MAC verification failed
  short_cleartext,    // canonified cleartext of 16 bytes or less (EAX' forgeries)
  unsupported,        // a well-formed input gridseal does not handle
  bad_signature,      // ECDSA signature invalid
  crypto_failure,     // the crypto provider failed
  invalid_argument,   // a caller passed something unusable
  not_found,
  storage_failure,    // the database failed (I/O, corruption, schema)
  busy,               // a resource is busy (database lock, HSM session)
  conflict,           // input contradicts stored state
  hsm_failure,        // the PKCS#11 module reported an error
  os_failure,         // a system call failed (fork, memfd, sockets outside the server)
};

const std::error_category& gridseal_category() noexcept;
std::error_code make_error_code(Errc e) noexcept;
const char* errc_name(Errc e) noexcept;

// An error with where it happened (byte offset into the input, when known) and what.
struct Error {
  static constexpr std::size_t kNoOffset = static_cast<std::size_t>(-1);

  Errc code = Errc::ok;
  std::size_t offset = kNoOffset;
  std::string detail;  // short English phrase, never secret material

  Error() = default;
  Error(Errc c, std::string d = {}, std::size_t off = kNoOffset)
      : code(c), offset(off), detail(std::move(d)) {}

  // "bad_tag at byte 12: expected A8 (calling-AP-invocation-id)"
  std::string message() const;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT(implicit)
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT(implicit)
  Result(Errc code, std::string detail = {}, std::size_t offset = Error::kNoOffset)
      : v_(std::in_place_index<1>, Error(code, std::move(detail), offset)) {}

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : err_(std::move(error)) {}  // NOLINT(implicit)
  Result(Errc code, std::string detail = {}, std::size_t offset = Error::kNoOffset)
      : err_(code, std::move(detail), offset) {}

  bool ok() const noexcept { return err_.code == Errc::ok; }
  explicit operator bool() const noexcept { return ok(); }
  const Error& error() const& { return err_; }
  Error&& error() && { return std::move(err_); }

 private:
  Error err_;
};

using Status = Result<void>;

// Propagates an error: GS_TRY(status_expr); or GS_ASSIGN(auto x, result_expr);
#define GS_TRY(expr)                        \
  do {                                      \
    auto gs_try_r_ = (expr);                \
    if (!gs_try_r_.ok()) {                  \
      return std::move(gs_try_r_).error();  \
    }                                       \
  } while (0)

#define GS_CONCAT_INNER(a, b) a##b
#define GS_CONCAT(a, b) GS_CONCAT_INNER(a, b)
#define GS_ASSIGN_IMPL(tmp, decl, expr) \
  auto tmp = (expr);                    \
  if (!tmp.ok()) {                      \
    return std::move(tmp).error();      \
  }                                     \
  decl = std::move(tmp).value()
#define GS_ASSIGN(decl, expr) GS_ASSIGN_IMPL(GS_CONCAT(gs_assign_r_, __LINE__), decl, expr)

// A broken internal invariant: abort loudly with file and line.
[[noreturn]] void check_failed(const char* expr, const char* file, int line) noexcept;
#define GS_CHECK(cond)                                \
  do {                                                \
    if (!(cond)) {                                    \
      ::gs::check_failed(#cond, __FILE__, __LINE__);  \
    }                                                 \
  } while (0)

}  // namespace gs

namespace std {
template <>
struct is_error_code_enum<gs::Errc> : true_type {};
}  // namespace std
