// Named operators with roles, and signed single-use operator requests (issue 7): the registry
// (table `operators`), the command -> role table, store-issued nonces (table `operator_nonces`)
// and the canonical request that an operator signs with their own EC P-256 key.
//
// Request (what is signed; README "Operators and roles"):
//   bytes  = "GSO1" || lp(operator) || lp(command) || u32(n) || n * (lp(name) || lp(value))
//            || lp(nonce) || i64(time)
//   digest = SHA-256(bytes); signature = ECDSA P-256 (r || s, 64 bytes) over the digest.
//   u32/i64: big-endian; lp(x) = u32 big-endian byte length || bytes. `command` is the CLI path
//   ("meters revoke"); the arguments are the command's options and positionals as given (name
//   "--reason", "ID"), sorted by name, each value its own entry, and for a file argument one more
//   entry "<name>#sha256" holding the SHA-256 of the file's content (so a signed `meters import`
//   binds the fleet file, not only its path). `nonce` is 16 random bytes issued by the store,
//   single-use and expiring; `time` is the signer's UTC seconds (informational, bounded).
//
// Verification (authorize()) runs inside the caller's BEGIN IMMEDIATE transaction, which also
// consumes the nonce and appends the audit record of the decision: a request is accepted or
// refused exactly once, and a captured request cannot be replayed (its nonce is gone).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/host_ecdsa.h"
#include "src/sqlite.h"

namespace gs::operators {

inline constexpr std::size_t kMaxName = 64;           // [A-Za-z0-9._-]{1,64}
inline constexpr std::size_t kNonceSize = 16;
inline constexpr std::int64_t kDefaultNonceTtl = 300;  // seconds
inline constexpr std::int64_t kMaxNonceTtl = 3600;     // offline signing: fetch, carry, sign, return
inline constexpr std::int64_t kMaxClockSkew = 300;     // request time vs the store's clock
inline constexpr std::int64_t kMaxOutstandingNonces = 10000;
inline constexpr std::size_t kMaxArgs = 64;             // arguments in one request
inline constexpr std::size_t kMaxArgBytes = 4096;       // one argument name or value
inline constexpr std::size_t kMaxRequestFile = 1 << 20;  // --request file
inline constexpr char kRequestDomain[] = "GSO1";

enum class Role : std::uint8_t { security_officer, key_custodian, operator_, auditor };
inline constexpr Role kAllRoles[] = {Role::security_officer, Role::key_custodian,
                                     Role::operator_, Role::auditor};
const char* to_string(Role r) noexcept;
std::optional<Role> role_from(std::string_view s) noexcept;

bool valid_name(std::string_view name) noexcept;

// ---- which command needs which role --------------------------------------------------------

// One state-changing command and the roles that may run it (bit 1 << Role).
struct CommandRule {
  std::string_view command;  // CLI path, e.g. "meters revoke"
  std::uint8_t roles;
  std::string_view file_args;  // space-separated argument names whose file content is bound
};
// Every state-changing command. A CLI command that is neither here nor in open_commands() is
// treated as state-changing and allowed to the security officer only (default deny).
std::span<const CommandRule> command_rules() noexcept;
// Read-only commands (no signature needed, also once operators exist).
std::span<const std::string_view> open_commands() noexcept;
const CommandRule* rule_for(std::string_view command) noexcept;
// The rule for commands in neither list.
const CommandRule& unclassified_rule() noexcept;
bool allows(const CommandRule& rule, Role r) noexcept;
// "security-officer, key-custodian"
std::string roles_text(std::uint8_t roles);

// ---- keys ------------------------------------------------------------------------------------

// A P-256 public key from a SubjectPublicKeyInfo PEM file or a 65-byte hex point.
Result<Bytes> load_public_key(const std::string& path);
// A P-256 private key from a PEM file (PKCS#8 or SEC1, unencrypted). The scalar is wiped after
// it is loaded into the key; the path is named in errors, the content never.
Result<HostEcKey> load_private_key(const std::string& path);

// ---- the request -------------------------------------------------------------------------

struct Request {
  std::string operator_name;
  std::string command;
  std::vector<std::pair<std::string, std::string>> args;  // sorted by name (canonicalize())
  Bytes nonce;
  std::int64_t time = 0;
};

// Sorts the arguments (stable: values of one name keep their order) and bounds them.
Status canonicalize(Request& r);
Bytes request_encoding(const Request& r);
Result<Sha256Digest> request_digest(const Request& r);
Result<EcSignature> sign_request(const Request& r, const HostEcKey& key);
// The SHA-256 of a file's content in hex (streamed; for file arguments).
Result<std::string> file_sha256_hex(const std::string& path);

// The text form of a signed request (`operators sign-request` writes it, `--request` reads it):
//   gridseal-operator-request 1
//   operator <name>
//   command <hex of the command>
//   arg <hex of the name> <hex of the value>      (zero or more, canonical order)
//   nonce <hex>
//   time <UTC seconds>
//   signature <hex r||s>
// Hex keeps any argument byte-exact; `describe()` is the human form.
std::string request_file_text(const Request& r, const EcSignature& sig);
Result<std::pair<Request, EcSignature>> parse_request_file(std::string_view text);
// "meters revoke ID=M1 --reason=lost" for messages.
std::string describe(const Request& r);

// ---- the registry and nonces (one connection, schema with the operator tables) ----------------

struct Operator {
  std::string name;
  Role role = Role::operator_;
  Bytes public_key;  // 65-byte uncompressed point
  std::int64_t enrolled_at = 0;
  std::string enrolled_by;
  std::optional<std::int64_t> removed_at;
  std::string removed_by;
  bool active() const noexcept { return !removed_at.has_value(); }
};

struct Nonce {
  Bytes value;
  std::int64_t expires_at = 0;
};

class Registry {
 public:
  explicit Registry(db::Db& db) : db_(&db) {}

  Result<std::vector<Operator>> list(bool include_removed);
  Result<std::optional<Operator>> find(std::string_view name);
  // Operators not removed (of `role` when given).
  Result<std::int64_t> active_count(std::optional<Role> role = std::nullopt);

  // Inside the caller's transaction. A name is never reused (removed operators stay listed so
  // that audit records keep one meaning): Errc::conflict. The very first operator must be a
  // security officer (otherwise nobody could enrol the next one).
  Status enroll(const Operator& op);
  // Inside the caller's transaction. Errc::conflict for the last active security officer.
  Status remove(std::string_view name, std::string_view by, std::int64_t now);

  // A fresh nonce valid for `ttl` seconds (1..kMaxNonceTtl), committed at once; expired nonces
  // are deleted first and at most kMaxOutstandingNonces may be outstanding (Errc::busy).
  Result<Nonce> issue_nonce(std::int64_t ttl, std::int64_t now);
  // Inside the caller's transaction: deletes the nonce. Errc::not_found when unknown or already
  // used, Errc::conflict when it expired (deleted all the same).
  Status consume_nonce(ByteView nonce, std::int64_t now);

 private:
  db::Db* db_;
};

// The decision on one signed request, taken inside the caller's BEGIN IMMEDIATE transaction:
// the nonce is consumed whatever the outcome (single use), then the operator must exist and not
// be removed, their role must allow `rule`, the signature must verify with their registered key,
// the nonce must have been valid and the time within kMaxClockSkew of `now`. The error's detail
// is the reason, fit for the operator and the audit record.
Result<Operator> authorize(Registry& reg, const Request& r, const EcSignature& sig,
                           const CommandRule& rule, std::int64_t now);

}  // namespace gs::operators
