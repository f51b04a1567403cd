// Configuration shared by the CLI and both daemons: TOML files validated at start, with errors
// that name the key. Secrets (PINs) are never in the file: only where to read them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "gridseal/result.h"

namespace gs::config {

struct HsmConfig {
  std::string module = "/usr/lib/softhsm/libsofthsm2.so";  // PKCS#11 library
  std::string token_label = "gridseal";
  std::string pin_file;        // user PIN: a file readable only by the service user...
  std::string pin_env;         // ...or an environment variable name
  std::string so_pin_file;     // security officer PIN (hsm init only)
  // When set, gridseal manages an embedded SoftHSM2 token in this directory: it writes its own
  // softhsm2.conf there and points SOFTHSM2_CONF at it before loading the module.
  std::string softhsm_dir;
  std::uint32_t sessions = 4;  // PKCS#11 sessions per process
  std::uint32_t key_cache = 4096;  // unwrapped meter keys kept per session (LRU)
  // Command keys (gs-cmd-N) are made copyable (CKA_MODIFIABLE=true) by `hsm init` and `cmdkeys
  // generate`, and the daemons sign with a session copy of theirs (hsm::signing_handle).
  bool command_key_session_copy = true;
  // Each cached meter key keeps an ECB and a CBC encryption operation open in two sessions of
  // its own, so EAX' costs C_EncryptUpdate calls only (hsm/bound_aes.h): two sessions and some
  // token memory per cached key. Turn off on a token that limits sessions.
  bool bound_aes = true;
  // At most this many sessions per process for bound operations (two per bound key); 0: as
  // many as the key caches need. Keeps sessions free for the rest on an HSM that limits them.
  std::uint32_t bound_aes_sessions = 0;
};

struct StoreConfig {
  std::string path = "gridseal.db";
};

struct Config {
  std::string source;  // file it came from
  std::string base_oid = "2.16.124.113620.1.22.0";
  HsmConfig hsm;
  StoreConfig store;
  // The policy file (conf/policy.toml): the SES's rules, and the [[quorum]] rules the `gridseal`
  // CLI enforces. Empty: no quorum rules.
  std::string policy;
};

// Reads a TOML file. Unknown keys in known tables are errors (typos must not pass silently).
// Relative paths are resolved against the file's directory.
Result<Config> load(const std::string& path);

}  // namespace gs::config
