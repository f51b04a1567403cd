// `gridseal c1222 decode|seal|open`: inspect, protect and verify C12.22 messages given as hex.
#include <charconv>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "c1222/eax_prime.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/host_aes.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/describe.h"
#include "tools/gridseal/json.h"

namespace gs::cli {

namespace {

// Keys given with --key ID:HEX, each an in-process AES key with its EAX' subkeys.
class KeyRing {
 public:
  // Parses "ID:HEX" (ID decimal or 0x-hex, 0..255; HEX 32 hex digits).
  Status add(const std::string& spec) {
    auto colon = spec.find(':');
    if (colon == std::string::npos || colon == 0) {
      return {Errc::invalid_argument, "--key '" + spec + "': expected ID:HEX"};
    }
    std::string id_text = spec.substr(0, colon);
    unsigned id = 0;
    std::string_view digits = id_text;
    int radix = 10;
    if (digits.size() > 2 && digits[0] == '0' && (digits[1] == 'x' || digits[1] == 'X')) {
      digits.remove_prefix(2);
      radix = 16;
    }
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), id, radix);
    if (ec != std::errc() || end != digits.data() + digits.size()) {
      return {Errc::invalid_argument, "--key '" + id_text + ":...': key id is not a number"};
    }
    if (id > 255) {
      return {Errc::invalid_argument, "--key " + id_text + ": key id above 255"};
    }
    auto key = from_hex(std::string_view(spec).substr(colon + 1));
    if (!key || key->size() != 16) {
      if (key) secure_zero(key->data(), key->size());
      return {Errc::invalid_argument,
              "--key " + id_text + ": key must be 32 hex digits (AES-128)"};
    }
    auto aes = HostAes::make(*key);
    secure_zero(key->data(), key->size());
    if (!aes.ok()) return aes.error();
    Entry e;
    e.aes = std::move(aes).value();
    auto eax = c1222::EaxPrime::make(*e.aes);
    if (!eax.ok()) return eax.error();
    e.eax = std::make_unique<c1222::EaxPrime>(std::move(eax).value());
    keys_[static_cast<std::uint8_t>(id)] = std::move(e);
    return {};
  }

  c1222::EaxPrime* find(std::uint8_t id) const {
    auto it = keys_.find(id);
    return it == keys_.end() ? nullptr : it->second.eax.get();
  }
  c1222::KeyLookup lookup() const {
    return [this](std::uint8_t id) { return find(id); };
  }

 private:
  struct Entry {
    std::unique_ptr<HostAes> aes;
    std::unique_ptr<c1222::EaxPrime> eax;
  };
  std::map<std::uint8_t, Entry> keys_;
};

struct CommonArgs {
  std::vector<std::string> keys;
  std::string base_oid;
  std::vector<std::string> hex;
};

// Key ring and base OID from the common options; false (after printing) on a usage error.
bool prepare(const char* cmd, const CommonArgs& a, KeyRing& ring, Bytes& base) {
  for (const std::string& k : a.keys) {
    Status st = ring.add(k);
    if (!st.ok()) {
      std::fprintf(stderr, "gridseal c1222 %s: %s\n", cmd, st.error().message().c_str());
      return false;
    }
  }
  if (!a.base_oid.empty()) {
    auto oid = c1222::oid_from_dotted(a.base_oid);
    if (!oid.ok()) {
      std::fprintf(stderr, "gridseal c1222 %s: --base-oid '%s': %s\n", cmd, a.base_oid.c_str(),
                   oid.error().message().c_str());
      return false;
    }
    base = std::move(oid).value();
  }
  return true;
}

struct Input {
  std::size_t number = 0;  // 1-based
  std::string text;
};

// The hex arguments, or, when none, one message per stdin line (blank lines and lines starting
// with '#' skipped; anything after a tab or '#' on a line is a label and ignored).
std::vector<Input> gather(const std::vector<std::string>& args) {
  std::vector<Input> out;
  if (!args.empty()) {
    for (const std::string& s : args) out.push_back({out.size() + 1, s});
    return out;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    auto cut = line.find_first_of("\t#");
    if (cut != std::string::npos) line.resize(cut);
    auto first = line.find_first_not_of(" \r\n");
    if (first == std::string::npos) continue;
    auto last = line.find_last_not_of(" \r\n");
    out.push_back({out.size() + 1, line.substr(first, last - first + 1)});
  }
  return out;
}

// from_hex with a message that says where the text stops being hex.
Result<Bytes> parse_hex(const std::string& text) {
  auto b = from_hex(text);
  if (b) {
    if (b->empty()) return {Errc::invalid_argument, "empty message"};
    return std::move(*b);
  }
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    bool hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    bool sep = c == ' ' || c == '\t' || c == ':' || c == '-';
    if (!hex && !sep) {
      return {Errc::invalid_argument, "not hex: character '" + std::string(1, c) + "'", i};
    }
  }
  return {Errc::invalid_argument, "not hex: odd number of digits"};
}

std::string indent(const std::string& text) {
  std::string out;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t nl = text.find('\n', start);
    if (nl == std::string::npos) nl = text.size();
    out += "  ";
    out.append(text, start, nl - start);
    out += '\n';
    start = nl + 1;
  }
  return out;
}

int run_decode(const CommonArgs& a, bool json) {
  KeyRing ring;
  Bytes base;
  if (!prepare("decode", a, ring, base)) return kExitUsage;
  AnalyzeOptions opt;
  opt.base_oid = base;
  opt.keys = ring.lookup();
  int rc = kExitOk;
  std::vector<Input> inputs = gather(a.hex);
  if (inputs.empty()) {
    std::fprintf(stderr, "gridseal c1222 decode: no messages given\n");
    return kExitUsage;
  }
  for (const Input& in : inputs) {
    auto wire = parse_hex(in.text);
    if (!wire.ok()) {
      rc = kExitFailed;
      std::string msg = "input is " + wire.error().message();
      if (json) {
        JsonWriter w;
        w.begin_object().key("index").value(static_cast<std::uint64_t>(in.number));
        w.key("error").value(msg).key("ok").value(false).end_object();
        std::printf("%s\n", w.str().c_str());
      } else {
        std::printf("message %zu: MALFORMED\n  error: %s\n", in.number, msg.c_str());
      }
      continue;
    }
    Analysis an = analyze(std::move(wire).value(), opt);
    if (!an.ok()) rc = kExitFailed;
    if (json) {
      JsonWriter w;
      w.begin_object().key("index").value(static_cast<std::uint64_t>(in.number));
      describe_json_fields(an, base, w);
      w.end_object();
      std::printf("%s\n", w.str().c_str());
    } else {
      const char* verdict = an.error ? "MALFORMED"
                            : an.mac == MacVerdict::bad ? "MAC BAD"
                                                        : "ok";
      std::printf("message %zu: %s\n%s", in.number, verdict,
                  indent(describe_text(an, base)).c_str());
    }
  }
  std::fflush(stdout);
  return rc;
}

int run_seal(const CommonArgs& a, int mode_number) {
  KeyRing ring;
  Bytes base;
  if (!prepare("seal", a, ring, base)) return kExitUsage;
  c1222::SecurityMode mode =
      mode_number == 1 ? c1222::SecurityMode::authenticated : c1222::SecurityMode::encrypted;
  c1222::SealOptions so;
  so.base_oid = base;
  int rc = kExitOk;
  std::vector<Input> inputs = gather(a.hex);
  if (inputs.empty()) {
    std::fprintf(stderr, "gridseal c1222 seal: no messages given\n");
    return kExitUsage;
  }
  for (const Input& in : inputs) {
    auto fail = [&](const std::string& what) {
      std::fprintf(stderr, "error: message %zu: %s\n", in.number, what.c_str());
      rc = kExitFailed;
    };
    auto wire = parse_hex(in.text);
    if (!wire.ok()) {
      fail("input is " + wire.error().message());
      continue;
    }
    auto m = c1222::decode(*wire);
    if (!m.ok()) {
      fail(m.error().message());
      continue;
    }
    if (!m->auth || !m->auth->key_id || !m->auth->iv) {
      fail("no key id and IV (calling-authentication-value AC) to seal with");
      continue;
    }
    c1222::EaxPrime* key = ring.find(*m->auth->key_id);
    if (key == nullptr) {
      fail("no --key for key id " + std::to_string(*m->auth->key_id));
      continue;
    }
    auto sealed = c1222::seal(*m, mode, *key, so);
    if (!sealed.ok()) {
      fail(sealed.error().message());
      continue;
    }
    std::printf("%s\n", to_hex(*sealed).c_str());
  }
  std::fflush(stdout);
  return rc;
}

int run_open(const CommonArgs& a) {
  KeyRing ring;
  Bytes base;
  if (!prepare("open", a, ring, base)) return kExitUsage;
  c1222::SealOptions so;
  so.base_oid = base;
  int rc = kExitOk;
  std::vector<Input> inputs = gather(a.hex);
  if (inputs.empty()) {
    std::fprintf(stderr, "gridseal c1222 open: no messages given\n");
    return kExitUsage;
  }
  c1222::KeyLookup lookup = ring.lookup();
  for (const Input& in : inputs) {
    auto wire = parse_hex(in.text);
    if (!wire.ok()) {
      std::fprintf(stderr, "error: message %zu: input is %s\n", in.number,
                   wire.error().message().c_str());
      rc = kExitFailed;
      continue;
    }
    auto m = c1222::decode(*wire);
    if (m.ok()) {
      std::uint8_t kid = (m->auth && m->auth->key_id) ? *m->auth->key_id : 0;
      if (c1222::security_mode(m->epsem.empty() ? 0 : m->epsem[0]) !=
              c1222::SecurityMode::cleartext &&
          ring.find(kid) == nullptr) {
        std::fprintf(stderr, "error: message %zu: no --key for key id %u\n", in.number,
                     static_cast<unsigned>(kid));
        rc = kExitFailed;
        continue;
      }
    }
    auto opened = c1222::open(*wire, lookup, so);
    if (!opened.ok()) {
      std::fprintf(stderr, "error: message %zu: %s\n", in.number,
                   opened.error().message().c_str());
      rc = kExitFailed;
      continue;
    }
    std::printf("%s\n", to_hex(opened->wire).c_str());
  }
  std::fflush(stdout);
  return rc;
}

void add_common(CLI::App* cmd, CommonArgs& a, bool key_required) {
  auto* key = cmd->add_option("--key", a.keys,
                              "key as ID:HEX (key id 0..255, 16-byte AES key); repeatable");
  key->allow_extra_args(false);
  if (key_required) key->required();
  cmd->add_option("--base-oid", a.base_oid,
                  "base OID of relative AP titles (default 2.16.124.113620.1.22.0)");
  cmd->add_option("hex", a.hex, "messages as hex (default: one per line on stdin)");
}

}  // namespace

void register_c1222(CLI::App& app, int& exit_code) {
  auto* group = app.add_subcommand("c1222", "decode, seal and open C12.22 messages (hex)");
  group->require_subcommand(1);

  auto decode_args = std::make_shared<CommonArgs>();
  auto json = std::make_shared<bool>(false);
  auto* decode = group->add_subcommand(
      "decode", "print every element and service of each message, verify MACs with --key");
  add_common(decode, *decode_args, false);
  decode->add_flag("--json", *json, "one JSON object per message");
  decode->callback([decode_args, json, &exit_code] {
    exit_code = run_decode(*decode_args, *json);
  });

  auto seal_args = std::make_shared<CommonArgs>();
  auto mode = std::make_shared<int>(2);
  auto* seal = group->add_subcommand(
      "seal", "secure mode-0 messages (with AC key id + IV) in mode 1 or 2; prints hex");
  seal->add_option("--mode", *mode, "security mode: 1 authenticate, 2 encrypt")
      ->required()
      ->check(CLI::IsMember({1, 2}));
  add_common(seal, *seal_args, true);
  seal->callback([seal_args, mode, &exit_code] { exit_code = run_seal(*seal_args, *mode); });

  auto open_args = std::make_shared<CommonArgs>();
  auto* open = group->add_subcommand(
      "open", "verify and decrypt secured messages; prints the mode-0 message as hex");
  add_common(open, *open_args, true);
  open->callback([open_args, &exit_code] { exit_code = run_open(*open_args); });
}

}  // namespace gs::cli
