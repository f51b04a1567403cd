// The gridseal error category, error names and messages, and the GS_CHECK failure handler.
#include <cstdio>
#include <cstdlib>

#include "gridseal/result.h"

namespace gs {

const char* errc_name(Errc e) noexcept {
  switch (e) {
    case Errc::ok: return "ok";
    case Errc::truncated: return "truncated";
    case Errc::bad_tag: return "bad tag";
    case Errc::bad_length: return "bad length";
    case Errc::too_large: return "too large";
    case Errc::too_deep: return "too deep";
    case Errc::bad_value: return "bad value";
    case Errc::wrong_order: return "wrong order";
    case Errc::missing_element: return "missing element";
    case Errc::trailing_data: return "trailing data";
    case Errc::bad_checksum: return "bad checksum";
    case Errc::bad_mac: return "bad MAC";
    case Errc::short_cleartext: return "cleartext too short";
    case Errc::unsupported: return "unsupported";
    case Errc::bad_signature: return "bad signature";
    case Errc::crypto_failure: return "crypto failure";
    case Errc::invalid_argument: return "invalid argument";
    case Errc::not_found: return "not found";
    case Errc::storage_failure: return "storage failure";
    case Errc::busy: return "busy";
    case Errc::conflict: return "conflict";
    case Errc::hsm_failure: return "HSM failure";
    case Errc::os_failure: return "system call failed";
  }
  return "unknown error";
}

namespace {
class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "gridseal"; }
  std::string message(int ev) const override { return errc_name(static_cast<Errc>(ev)); }
};
}  // namespace

const std::error_category& gridseal_category() noexcept {
  static const Category category;
  return category;
}

std::error_code make_error_code(Errc e) noexcept {
  return {static_cast<int>(e), gridseal_category()};
}

std::string Error::message() const {
  std::string s = errc_name(code);
  if (offset != kNoOffset) {
    s += " at byte ";
    s += std::to_string(offset);
  }
  if (!detail.empty()) {
    s += ": ";
    s += detail;
  }
  return s;
}

void check_failed(const char* expr, const char* file, int line) noexcept {
  std::fprintf(stderr, "gridseal: internal check failed: %s (%s:%d)\n", expr, file, line);
  std::abort();
}

}  // namespace gs
