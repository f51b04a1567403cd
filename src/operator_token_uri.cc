// PKCS#11 URIs of operator keys (src/operator_token.h). No HSM code here, so that a fuzz target
// builds with it alone (tests/fuzz/operator_request_fuzz.cc).
#include "src/operator_token.h"

#include <algorithm>

namespace gs::operators {

namespace {

Result<std::string> percent_decode(std::string_view s, std::string_view attr) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    const int hi = i + 2 < s.size() ? hex_value(s[i + 1]) : -1;
    const int lo = i + 2 < s.size() ? hex_value(s[i + 2]) : -1;
    if (hi < 0 || lo < 0) {
      return Error(Errc::invalid_argument, "PKCS#11 URI: bad %-escape in " + std::string(attr));
    }
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

// Splits "a=1;b=2" (sep ';') or "a=1&b=2" (sep '&') and stores the known attributes.
Status parse_attributes(std::string_view part, char sep, TokenKeyUri& out) {
  while (!part.empty()) {
    const std::size_t end = std::min(part.find(sep), part.size());
    const std::string_view kv = part.substr(0, end);
    part.remove_prefix(std::min(end + 1, part.size()));
    if (kv.empty()) continue;
    const std::size_t eq = kv.find('=');
    if (eq == std::string_view::npos) {
      return Error(Errc::invalid_argument,
                   "PKCS#11 URI: attribute without a value: " + std::string(kv.substr(0, 64)));
    }
    const std::string_view name = kv.substr(0, eq);
    GS_ASSIGN(std::string value, percent_decode(kv.substr(eq + 1), name));
    if (sep == ';' && name == "token") {
      out.token = std::move(value);
    } else if (sep == ';' && name == "object") {
      out.object = std::move(value);
    } else if (sep == '&' && name == "module-path") {
      out.module_path = std::move(value);
    } else if (sep == '&' && name == "pin-source") {
      if (value.starts_with("file:")) {
        out.pin_file = value.substr(5);
      } else if (value.starts_with("env:")) {
        out.pin_env = value.substr(4);
      } else {
        return Error(Errc::invalid_argument, "PKCS#11 URI: pin-source must be file:PATH or env:VAR");
      }
    } else if (sep == ';' && (name == "type" || name == "manufacturer" || name == "model" ||
                              name == "serial" || name == "id")) {
      // Accepted for compatibility with URIs other tools print; the labels select the key.
    } else {
      return Error(Errc::invalid_argument,
                   "PKCS#11 URI: unsupported attribute " + std::string(name.substr(0, 64)));
    }
  }
  return {};
}

}  // namespace

bool is_token_uri(std::string_view key_spec) noexcept { return key_spec.starts_with(kPkcs11Scheme); }

Result<TokenKeyUri> parse_token_uri(std::string_view uri) {
  if (!is_token_uri(uri)) return Error(Errc::invalid_argument, "not a pkcs11: URI");
  if (uri.size() > kMaxTokenUri) return Error(Errc::too_large, "PKCS#11 URI too long");
  uri.remove_prefix(kPkcs11Scheme.size());
  const std::size_t q = uri.find('?');
  TokenKeyUri out;
  GS_TRY(parse_attributes(uri.substr(0, q), ';', out));
  if (q != std::string_view::npos) GS_TRY(parse_attributes(uri.substr(q + 1), '&', out));
  if (out.token.empty()) return Error(Errc::invalid_argument, "PKCS#11 URI: token= is required");
  if (out.object.empty()) return Error(Errc::invalid_argument, "PKCS#11 URI: object= is required");
  if (out.module_path.empty()) {
    return Error(Errc::invalid_argument, "PKCS#11 URI: module-path= is required");
  }
  if (out.pin_file.empty() == out.pin_env.empty()) {
    return Error(Errc::invalid_argument,
                 "PKCS#11 URI: pin-source=file:PATH or pin-source=env:VAR is required");
  }
  return out;
}

}  // namespace gs::operators
