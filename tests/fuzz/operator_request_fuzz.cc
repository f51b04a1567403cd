// libFuzzer target: what an operator hands the CLI and what the approval store gives back.
//   * parse_request_file (`gridseal ... --request FILE`, src/operator_request.cc): the text of a
//     signed operator request, written by whoever carries it from the signing workstation.
//   * approvals::decode_argv (src/approvals.cc): the command line of an M-of-N approval request
//     as the table holds it, replayed through the command tree once approved.
//   * parse_token_uri (src/operator_token_uri.cc): the pkcs11: URI naming an operator's own
//     signing key on a token.
// Properties:
//   * an accepted request is canonical (the rules authorize() relies on: operator name, command
//     and argument bounds, arguments sorted by name, 16-byte nonce, time in range), and
//     canonicalize() leaves it as it is;
//   * written back with request_file_text it parses to the same request and signature;
//   * the bytes the operator signs (request_encoding) decode, by the independent reader below,
//     to exactly that request with nothing left over: no two requests share signed bytes;
//   * an accepted argv is within kMaxArgv and encode_argv gives back exactly the input;
//   * an accepted URI names a token, a key, a module and exactly one PIN source, and its values,
//     percent-encoded byte by byte into a URI of their own, parse back to the same values.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gridseal/bytes.h"
#include "src/approvals.h"
#include "src/operator_token.h"
#include "src/operators.h"

namespace {

namespace op = gs::operators;

void must(bool ok) {
  if (!ok) __builtin_trap();
}

// Reads the GSO1 encoding (src/operators.h) on its own terms.
class Reader {
 public:
  explicit Reader(const gs::Bytes& b) : b_(b) {}
  std::optional<std::uint64_t> u(int bytes) {
    if (b_.size() - at_ < static_cast<std::size_t>(bytes)) return std::nullopt;
    std::uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v = (v << 8) | b_[at_++];
    return v;
  }
  std::optional<std::string> lp() {
    auto n = u(4);
    if (!n || *n > b_.size() - at_) return std::nullopt;
    std::string s(reinterpret_cast<const char*>(b_.data() + at_), *n);
    at_ += *n;
    return s;
  }
  bool literal(std::string_view s) {
    if (b_.size() - at_ < s.size() ||
        !std::equal(s.begin(), s.end(), reinterpret_cast<const char*>(b_.data() + at_))) {
      return false;
    }
    at_ += s.size();
    return true;
  }
  bool done() const { return at_ == b_.size(); }

 private:
  const gs::Bytes& b_;
  std::size_t at_ = 0;
};

std::optional<op::Request> read_encoding(const gs::Bytes& b) {
  Reader rd(b);
  op::Request r;
  if (!rd.literal(op::kRequestDomain)) return std::nullopt;
  auto name = rd.lp();
  auto command = rd.lp();
  auto n = rd.u(4);
  if (!name || !command || !n || *n > op::kMaxArgs) return std::nullopt;
  r.operator_name = *name;
  r.command = *command;
  for (std::uint64_t i = 0; i < *n; ++i) {
    auto k = rd.lp();
    auto v = rd.lp();
    if (!k || !v) return std::nullopt;
    r.args.emplace_back(*k, *v);
  }
  auto nonce = rd.lp();
  auto t = rd.u(8);
  if (!nonce || !t || !rd.done()) return std::nullopt;
  r.nonce.assign(nonce->begin(), nonce->end());
  r.time = static_cast<std::int64_t>(*t);
  return r;
}

bool same(const op::Request& a, const op::Request& b) {
  return a.operator_name == b.operator_name && a.command == b.command && a.args == b.args &&
         a.nonce == b.nonce && a.time == b.time;
}

void check_request_file(std::string_view text) {
  auto parsed = op::parse_request_file(text);
  if (!parsed.ok()) return;
  const op::Request& r = parsed->first;
  must(op::valid_name(r.operator_name));
  must(!r.command.empty() && r.command.size() <= 128);
  must(r.args.size() <= op::kMaxArgs);
  for (const auto& [n, v] : r.args) {
    must(n.size() <= op::kMaxArgBytes && v.size() <= op::kMaxArgBytes);
  }
  must(std::is_sorted(r.args.begin(), r.args.end(),
                      [](const auto& a, const auto& b) { return a.first < b.first; }));
  must(r.nonce.size() == op::kNonceSize);
  must(r.time >= 0 && r.time <= 999'999'999'999);

  op::Request again = r;
  must(op::canonicalize(again).ok());
  must(same(again, r));

  auto back = op::parse_request_file(op::request_file_text(r, parsed->second));
  must(back.ok());
  must(same(back->first, r));
  must(back->second == parsed->second);

  const gs::Bytes enc = op::request_encoding(r);
  auto read = read_encoding(enc);
  must(read.has_value());
  must(same(*read, r));
  must(op::request_encoding(r) == enc);
}

void check_argv(const std::uint8_t* data, std::size_t size) {
  auto argv = gs::approvals::decode_argv(gs::ByteView(data, size));
  if (!argv.ok()) return;
  must(argv->size() <= gs::approvals::kMaxArgv);
  const gs::Bytes again = gs::approvals::encode_argv(*argv);
  must(again.size() == size && std::equal(again.begin(), again.end(), data));
}

std::string percent_all(std::string_view v) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (char c : v) {
    const auto b = static_cast<unsigned char>(c);
    out += '%';
    out += kHex[b >> 4];
    out += kHex[b & 15];
  }
  return out;
}

void check_token_uri(std::string_view text) {
  auto uri = op::parse_token_uri(text);
  if (!uri.ok()) return;
  must(op::is_token_uri(text) && text.size() <= op::kMaxTokenUri);
  must(!uri->token.empty() && !uri->object.empty() && !uri->module_path.empty());
  must(uri->pin_file.empty() != uri->pin_env.empty());
  const std::string pin = uri->pin_file.empty() ? "env:" + percent_all(uri->pin_env)
                                                : "file:" + percent_all(uri->pin_file);
  const std::string again = std::string(op::kPkcs11Scheme) + "token=" + percent_all(uri->token) +
                            ";object=" + percent_all(uri->object) +
                            "?module-path=" + percent_all(uri->module_path) + "&pin-source=" + pin;
  if (again.size() > op::kMaxTokenUri) return;  // three bytes per byte: may exceed the bound
  auto back = op::parse_token_uri(again);
  must(back.ok());
  must(back->token == uri->token && back->object == uri->object &&
       back->module_path == uri->module_path && back->pin_file == uri->pin_file &&
       back->pin_env == uri->pin_env);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  check_request_file(std::string_view(reinterpret_cast<const char*>(data), size));
  check_argv(data, size);
  check_token_uri(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
