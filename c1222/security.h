// C12.22 security modes 1 and 2: canonified cleartext, seal and open (PROTOCOL §4).
#pragma once

#include <functional>

#include "c1222/eax_prime.h"
#include "c1222/message.h"

namespace gs::c1222 {

// Canonified cleartext of a decoded message (PROTOCOL §4.2) using its raw header bytes.
// `base` converts relative AP titles. Fails without a called AP title or A8.
Result<Bytes> canonify(const Message& m, ByteView base);

// Finds the key for a key id: returns nullptr when it has none.
using KeyLookup = std::function<EaxPrime*(std::uint8_t key_id)>;

struct SealOptions {
  ByteView base_oid;  // empty: default_base_oid()
};

// Seals a mode-0 message (which must carry AC with key id and IV, and A8) in `mode` 1 or 2
// under `key`: returns the wire bytes. The control byte's mode bits are set; other bits kept.
// Refused when the canonified cleartext is 16 bytes or shorter.
Result<Bytes> seal(const Message& clear, SecurityMode mode, EaxPrime& key,
                   const SealOptions& opt = {});
// Same, from wire bytes.
Result<Bytes> seal(ByteView wire_mode0, SecurityMode mode, EaxPrime& key,
                   const SealOptions& opt = {});

struct Opened {
  Bytes wire;            // the message in mode 0: MAC removed, EPSEM in clear, AC kept
  SecurityMode mode{};   // the mode it arrived in
  std::uint8_t key_id = 0;
};

// Verifies and decrypts a mode 1 or 2 message. A message without AC uses key id 0 and adds no
// key id / IV to the cleartext (as Wireshark does). Errc::bad_mac on any MAC failure.
Result<Opened> open(ByteView wire, const KeyLookup& keys, const SealOptions& opt = {});
// Same, for an already decoded message (views into `wire`).
Result<Opened> open(const Message& m, const KeyLookup& keys, const SealOptions& opt = {});

}  // namespace gs::c1222
