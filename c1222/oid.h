// Object identifiers and C12.22 AP titles: dotted text <-> BER content, relative -> absolute.
#pragma once

#include <string>
#include <string_view>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::c1222 {

// Longest OID content accepted anywhere (AP titles in practice are under 20 bytes).
inline constexpr std::size_t kMaxOidLength = 64;

// 2.16.124.113620.1.22: the C12.22 application context.
ByteView c1222_context_oid() noexcept;
// 2.16.124.113620.1.22.0: base of relative AP titles.
ByteView default_base_oid() noexcept;

// Absolute OID content for "2.16.124...". Refuses empty arcs, a first arc > 2, a second arc
// >= 40 under arcs 0/1, arcs above 2^63 and results longer than kMaxOidLength.
Result<Bytes> oid_from_dotted(std::string_view dotted);
// RELATIVE-OID content for ".123.4" or "123.4" (arcs only).
Result<Bytes> relative_oid_from_dotted(std::string_view dotted);

// Checks that content is a well-formed OID / RELATIVE-OID (non-empty, each arc minimal and
// terminated, not longer than kMaxOidLength).
Status validate_oid(ByteView content, bool relative);

// "2.16.124.113620.1.22.0.4" for absolute content, ".123.4" for relative content.
std::string oid_to_dotted(ByteView content, bool relative);

enum class TitleForm : std::uint8_t { absolute, relative };

// A called or calling AP title as on the wire: the form and the OID content bytes.
struct ApTitle {
  TitleForm form = TitleForm::absolute;
  ByteView oid;  // content only, no tag/length

  // The absolute OID content: relative titles are appended to base (DESIGN §2).
  Bytes absolute(ByteView base) const;
  std::string dotted() const { return oid_to_dotted(oid, form == TitleForm::relative); }
};

// An AP title that owns its bytes (configuration, registries).
struct OwnedApTitle {
  TitleForm form = TitleForm::absolute;
  Bytes oid;

  ApTitle view() const { return {form, oid}; }
  std::string dotted() const { return view().dotted(); }
  // "2.16.124.113620.1.22.0.7" (absolute) or ".7" (relative, leading dot).
  static Result<OwnedApTitle> parse(std::string_view dotted);
  friend bool operator==(const OwnedApTitle&, const OwnedApTitle&) = default;
};

}  // namespace gs::c1222
