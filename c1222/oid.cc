// OID and RELATIVE-OID conversions and the AP title forms of C12.22 (PROTOCOL §2.3).
#include "c1222/oid.h"

#include <charconv>

namespace gs::c1222 {

namespace {
// 2.16.124.113620.1.22.0
constexpr std::uint8_t kBaseOid[] = {0x60, 0x7C, 0x86, 0xF7, 0x54, 0x01, 0x16, 0x00};

void append_arc(Bytes& out, std::uint64_t arc) {
  std::uint8_t tmp[10];
  int n = 0;
  do {
    tmp[n++] = static_cast<std::uint8_t>(arc & 0x7F);
    arc >>= 7;
  } while (arc != 0);
  while (n-- > 0) out.push_back(static_cast<std::uint8_t>(tmp[n] | (n > 0 ? 0x80 : 0)));
}

Result<std::vector<std::uint64_t>> parse_arcs(std::string_view s) {
  std::vector<std::uint64_t> arcs;
  if (s.empty()) return {Errc::invalid_argument, "empty OID"};
  std::size_t pos = 0;
  while (true) {
    std::size_t dot = s.find('.', pos);
    std::string_view part = s.substr(pos, dot == std::string_view::npos ? s.npos : dot - pos);
    if (part.empty()) return {Errc::invalid_argument, "empty arc in OID"};
    std::uint64_t v = 0;
    auto [p, ec] = std::from_chars(part.data(), part.data() + part.size(), v);
    if (ec != std::errc() || p != part.data() + part.size()) {
      return {Errc::invalid_argument, "OID arc '" + std::string(part) + "' is not a number"};
    }
    if (v > (std::uint64_t{1} << 63)) return {Errc::invalid_argument, "OID arc too large"};
    arcs.push_back(v);
    if (arcs.size() > kMaxOidLength) return {Errc::too_large, "OID has too many arcs"};
    if (dot == std::string_view::npos) break;
    pos = dot + 1;
  }
  return arcs;
}
}  // namespace

ByteView c1222_context_oid() noexcept { return ByteView(kBaseOid, sizeof kBaseOid - 1); }
ByteView default_base_oid() noexcept { return ByteView(kBaseOid, sizeof kBaseOid); }

Result<Bytes> oid_from_dotted(std::string_view dotted) {
  GS_ASSIGN(auto arcs, parse_arcs(dotted));
  if (arcs.size() < 2) return {Errc::invalid_argument, "an OID needs at least two arcs"};
  if (arcs[0] > 2) return {Errc::invalid_argument, "first OID arc must be 0, 1 or 2"};
  if (arcs[0] < 2 && arcs[1] >= 40) return {Errc::invalid_argument, "second OID arc must be < 40"};
  if (arcs[0] == 2 && arcs[1] > (std::uint64_t{1} << 62)) {
    return {Errc::invalid_argument, "OID arc too large"};
  }
  Bytes out;
  append_arc(out, arcs[0] * 40 + arcs[1]);
  for (std::size_t i = 2; i < arcs.size(); ++i) append_arc(out, arcs[i]);
  if (out.size() > kMaxOidLength) return {Errc::too_large, "OID longer than 64 bytes"};
  return out;
}

Result<Bytes> relative_oid_from_dotted(std::string_view dotted) {
  if (!dotted.empty() && dotted.front() == '.') dotted.remove_prefix(1);
  GS_ASSIGN(auto arcs, parse_arcs(dotted));
  Bytes out;
  for (auto a : arcs) append_arc(out, a);
  if (out.size() > kMaxOidLength) return {Errc::too_large, "relative OID longer than 64 bytes"};
  return out;
}

Status validate_oid(ByteView content, bool relative) {
  if (content.empty()) return {Errc::bad_value, relative ? "empty relative OID" : "empty OID"};
  if (content.size() > kMaxOidLength) return {Errc::too_large, "OID longer than 64 bytes"};
  bool arc_start = true;
  std::size_t arc_len = 0;
  for (std::uint8_t b : content) {
    if (arc_start && b == 0x80) return {Errc::bad_value, "OID arc not minimally encoded"};
    arc_start = !(b & 0x80);
    if (++arc_len > 9) return {Errc::bad_value, "OID arc above 2^63"};
    if (arc_start) arc_len = 0;
  }
  if (!arc_start) return {Errc::bad_value, "OID ends inside an arc"};
  return {};
}

std::string oid_to_dotted(ByteView content, bool relative) {
  std::string s;
  std::uint64_t v = 0;
  bool first = !relative;
  for (std::uint8_t b : content) {
    v = (v << 7) | (b & 0x7F);
    if (b & 0x80) continue;
    if (first) {
      std::uint64_t a = v < 40 ? 0 : (v < 80 ? 1 : 2);
      s += std::to_string(a);
      s += '.';
      s += std::to_string(v - a * 40);
      first = false;
    } else {
      s += '.';
      s += std::to_string(v);
    }
    v = 0;
  }
  if (v != 0 || (!content.empty() && (content.back() & 0x80))) s += ".?";  // cut-off arc
  return s;
}

Bytes ApTitle::absolute(ByteView base) const {
  Bytes out;
  if (form == TitleForm::relative) {
    out.reserve(base.size() + oid.size());
    out.insert(out.end(), base.begin(), base.end());
  }
  out.insert(out.end(), oid.begin(), oid.end());
  return out;
}

Result<OwnedApTitle> OwnedApTitle::parse(std::string_view dotted) {
  OwnedApTitle t;
  if (!dotted.empty() && dotted.front() == '.') {
    t.form = TitleForm::relative;
    GS_ASSIGN(t.oid, relative_oid_from_dotted(dotted));
  } else {
    t.form = TitleForm::absolute;
    GS_ASSIGN(t.oid, oid_from_dotted(dotted));
  }
  return t;
}

}  // namespace gs::c1222
