// Analysis of one C12.22 message for humans and scripts: decode, verify/decrypt, render.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "c1222/message.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "tools/gridseal/json.h"

namespace gs::cli {

enum class MacVerdict : std::uint8_t { none, good, bad, no_key };  // none: mode 0
const char* mac_verdict_name(MacVerdict v) noexcept;  // "none", "good", "bad", "no key"

struct AnalyzeOptions {
  ByteView base_oid;          // content; empty: c1222::default_base_oid()
  c1222::KeyLookup keys;      // may be empty (no keys)
  c1222::ServiceOptions services;
};

// Everything learnt about one input message. The views inside point into `wire` and `opened`,
// whose heap buffers survive a move; the type is move-only so they are never copied away.
struct Analysis {
  Bytes wire;
  std::optional<c1222::Message> message;       // views into wire
  std::optional<c1222::Epsem> epsem;           // as received (mode 2: ciphertext body)
  MacVerdict mac = MacVerdict::none;
  Bytes opened;                                // mode-0 form after a successful open
  std::optional<c1222::Epsem> clear_epsem;     // the readable EPSEM (ED class, services)
  bool services_from_opened = false;           // service offsets refer to `opened`
  std::vector<c1222::DecodedService> services;
  bool services_hidden = false;                // mode 2 and not decrypted
  std::optional<Error> error;                  // malformed input (first problem found)

  Analysis() = default;
  Analysis(Analysis&&) noexcept = default;
  Analysis& operator=(Analysis&&) noexcept = default;
  Analysis(const Analysis&) = delete;
  Analysis& operator=(const Analysis&) = delete;

  // Well formed and no MAC that could be checked failed.
  bool ok() const noexcept { return !error && mac != MacVerdict::bad; }
};

Analysis analyze(Bytes wire, const AnalyzeOptions& opt);

// Indented human text, one element per line, ending with a newline.
std::string describe_text(const Analysis& a, ByteView base_oid);
// The same content as one JSON object.
void describe_json(const Analysis& a, ByteView base_oid, JsonWriter& out);
// The fields only, into an object the caller has opened (to add its own fields).
void describe_json_fields(const Analysis& a, ByteView base_oid, JsonWriter& out);

// "2024-01-12T21:29:07Z" for UTC seconds since 1970.
std::string utc_time(std::uint32_t seconds);
// Printable ASCII kept, anything else as \xNN.
std::string printable(ByteView b);

}  // namespace gs::cli
