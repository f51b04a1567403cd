// The signed operator request: canonical form, the bytes an operator signs, and the request file
// (src/operators.h). No store, HSM or audit code here, so that a fuzz target builds with it
// alone (tests/fuzz/operator_request_fuzz.cc).
#include "src/operators.h"

#include <algorithm>
#include <sstream>

namespace gs::operators {

namespace {

std::optional<std::string> text_of_hex(std::string_view h) {
  auto b = from_hex(h);
  if (!b) return std::nullopt;
  return std::string(b->begin(), b->end());
}

}  // namespace

Status canonicalize(Request& r) {
  if (!valid_name(r.operator_name)) {
    return {Errc::invalid_argument, "operator name must be 1..64 of A-Z a-z 0-9 . _ -"};
  }
  if (r.command.empty() || r.command.size() > 128) {
    return {Errc::invalid_argument, "command path missing or too long"};
  }
  if (r.args.size() > kMaxArgs) return {Errc::too_large, "too many arguments to sign"};
  for (const auto& [n, v] : r.args) {
    if (n.size() > kMaxArgBytes || v.size() > kMaxArgBytes) {
      return {Errc::too_large, "argument " + n.substr(0, 64) + " is too long to sign"};
    }
  }
  std::stable_sort(r.args.begin(), r.args.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  return {};
}

Bytes request_encoding(const Request& r) {
  Bytes b(kRequestDomain, kRequestDomain + sizeof kRequestDomain - 1);
  append_length_prefixed(b, as_bytes(r.operator_name));
  append_length_prefixed(b, as_bytes(r.command));
  append_u32be(b, static_cast<std::uint32_t>(r.args.size()));
  for (const auto& [n, v] : r.args) {
    append_length_prefixed(b, as_bytes(n));
    append_length_prefixed(b, as_bytes(v));
  }
  append_length_prefixed(b, r.nonce);
  auto t = static_cast<std::uint64_t>(r.time);
  for (int i = 7; i >= 0; --i) b.push_back(static_cast<std::uint8_t>(t >> (8 * i)));
  return b;
}

Result<Sha256Digest> request_digest(const Request& r) { return sha256(request_encoding(r)); }

std::string request_file_text(const Request& r, const EcSignature& sig) {
  std::string t = "gridseal-operator-request 1\noperator " + r.operator_name + "\ncommand " +
                  to_hex(as_bytes(r.command)) + "\n";
  for (const auto& [n, v] : r.args) t += "arg " + to_hex(as_bytes(n)) + " " + to_hex(as_bytes(v)) + "\n";
  t += "nonce " + to_hex(r.nonce) + "\ntime " + std::to_string(r.time) + "\nsignature " +
       to_hex(sig) + "\n";
  return t;
}

Result<std::pair<Request, EcSignature>> parse_request_file(std::string_view text) {
  if (text.size() > kMaxRequestFile) return Error(Errc::too_large, "request file too large");
  Request r;
  EcSignature sig{};
  bool have_sig = false, have_nonce = false, have_time = false, have_header = false;
  std::istringstream in{std::string(text)};
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    auto bad = [&](const std::string& why) {
      return Error(Errc::bad_value, "request file line " + std::to_string(n) + ": " + why);
    };
    auto sp = line.find(' ');
    std::string key = line.substr(0, sp);
    std::string val = sp == std::string::npos ? "" : line.substr(sp + 1);
    if (!have_header) {
      if (line != "gridseal-operator-request 1") return bad("not a gridseal operator request");
      have_header = true;
    } else if (key == "operator") {
      r.operator_name = val;
    } else if (key == "command") {
      auto c = text_of_hex(val);
      if (!c) return bad("command is not hex");
      r.command = *c;
    } else if (key == "arg") {
      auto sp2 = val.find(' ');
      if (sp2 == std::string::npos) return bad("arg needs a name and a value");
      auto an = text_of_hex(val.substr(0, sp2));
      auto av = text_of_hex(val.substr(sp2 + 1));
      if (!an || !av) return bad("arg is not hex");
      if (r.args.size() >= kMaxArgs) return bad("too many arguments");
      r.args.emplace_back(*an, *av);
    } else if (key == "nonce") {
      auto b = from_hex(val);
      if (!b || b->size() != kNonceSize) return bad("nonce must be 16 bytes in hex");
      r.nonce = *b;
      have_nonce = true;
    } else if (key == "time") {
      if (val.empty() || val.size() > 12 || val.find_first_not_of("0123456789") != val.npos) {
        return bad("time must be UTC seconds");
      }
      r.time = std::stoll(val);
      have_time = true;
    } else if (key == "signature") {
      auto b = from_hex(val);
      if (!b || b->size() != kEcSignatureSize) return bad("signature must be 64 bytes in hex");
      std::copy(b->begin(), b->end(), sig.begin());
      have_sig = true;
    } else {
      return bad("unknown field '" + key.substr(0, 32) + "'");
    }
  }
  if (!have_header || !have_sig || !have_nonce || !have_time || r.command.empty()) {
    return Error(Errc::missing_element,
                 "request file incomplete (needs operator, command, nonce, time, signature)");
  }
  GS_TRY(canonicalize(r));
  return std::pair{std::move(r), sig};
}

}  // namespace gs::operators
