// Command keys gs-cmd-<n> and their replacement (issue 7, `gridseal cmdkeys`, README "Command
// keys"): the registry of the keys, the MT-2044 statements gs-revocation signs to move a key into
// a meter trust slot (c1222/profile.h), which key each slot holds, and the checks the daemons make
// before they sign with a command key and before the SES relays a statement.
//
// Trust slots: meters trust two signer key ids (DESIGN §4: active + standby). Until the first
// statement slot 0 holds key 1 and slot 1 key 2 (the keys `hsm init` makes); after it, the
// statement with the highest sequence for a slot names the key meters accept there. gridseal does
// not know which meters received a statement (distribution is the collection engine's job), so
// "holds" means "what the latest statement tells the fleet".
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "c1222/message.h"
#include "c1222/profile.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "hsm/session.h"
#include "src/host_ecdsa.h"
#include "src/sqlite.h"

namespace gs::cmdkeys {

inline constexpr std::uint8_t kFirstGeneratedId = 3;  // 1 and 2 come from `hsm init`
inline constexpr std::uint8_t kMaxKeyId = 255;
inline constexpr std::uint8_t kInitialSlotKey[c1222::kTrustSlotCount] = {1, 2};
// created_by of keys 1 and 2 (registered when found in the HSM).
inline constexpr char kCreatedByInit[] = "hsm init";
inline constexpr char kStatementDomain[] = "GSV1";

enum class KeyState : std::uint8_t { generated, retired };
const char* to_string(KeyState s) noexcept;

// "gs-cmd-<id>".
std::string label_for(std::uint8_t key_id);
// Lowercase hex SHA-256 of the 65-byte public point (what `cmdkeys list` shows).
std::string fingerprint(ByteView point);

struct CommandKey {
  std::uint8_t key_id = 0;
  std::string label;
  Bytes public_key;  // 65 bytes
  KeyState state = KeyState::generated;
  std::string created_by;
  std::int64_t created_at = 0;
  std::string retired_by;
  std::optional<std::int64_t> retired_at;
};

// A stored statement: the signed fields, the 141 data bytes as written to meters, who issued it.
struct Statement {
  c1222::CommandKeyReplacement r;
  Bytes data;  // encode_replacement_data(r)
  std::string issued_by;
};

// Which key each trust slot holds and the statement that put it there (0: the initial state).
struct TrustSlots {
  std::array<std::uint8_t, c1222::kTrustSlotCount> key{kInitialSlotKey[0], kInitialSlotKey[1]};
  std::array<std::uint32_t, c1222::kTrustSlotCount> seq{0, 0};
  // The slot holding `key_id`, or nullopt.
  std::optional<std::uint8_t> slot_of(std::uint8_t key_id) const noexcept;
};

// SHA-256("GSV1" | the 77 signed data bytes).
Result<Sha256Digest> statement_digest(const c1222::CommandKeyReplacement& r);
// Errc::bad_signature unless r.signature is gs-revocation's signature of r's fields; also refuses
// a public key that is not a P-256 point.
Status verify_statement(const c1222::CommandKeyReplacement& r, const HostEcKey& revocation);

// The tables `command_keys` and `command_key_statements` on one connection (not thread-safe, like
// db::Db). Writers run inside the caller's BEGIN IMMEDIATE transaction (the audit record commits
// with them).
class CommandKeyStore {
 public:
  explicit CommandKeyStore(db::Db& db) : db_(&db) {}

  Result<std::vector<CommandKey>> list();
  Result<std::optional<CommandKey>> find(std::uint8_t key_id);
  // Adds a key in state generated. The same id with the same point again is a no-op (false);
  // with another point (or its label taken) Errc::conflict.
  Result<bool> register_key(std::uint8_t key_id, ByteView point, std::string_view created_by,
                            std::int64_t now);
  // The smallest id >= 3 neither registered nor rejected by `taken` (a label already in the
  // HSM); Errc::too_large when all of 3..255 are used.
  Result<std::uint8_t> next_free_id(const std::function<bool(std::uint8_t)>& taken);

  Result<TrustSlots> slots();
  Result<std::optional<Statement>> statement(std::uint32_t seq);
  // The highest sequence stored (0 when none).
  Result<std::uint32_t> last_sequence();
  // Why key `key_id` may not go into `slot` now (Errc::not_found: unknown key; conflict: retired,
  // held by the other slot, or already in this slot), or ok.
  Status check_replacement(std::uint8_t slot, std::uint8_t key_id);
  // Stores a statement that check_replacement allowed, whose sequence is last_sequence() + 1 and
  // whose public key is the registered one (checked here again). Not verified here: the caller
  // verified the signature.
  Status insert_statement(const Statement& s);
  // Marks a key retired; Errc::conflict while a trust slot holds it or when retired already,
  // Errc::not_found when unknown.
  Status retire(std::uint8_t key_id, std::string_view by, std::int64_t now);

 private:
  db::Db* db_;
};

// ---- HSM operations (the caller holds the transaction) -----------------------------------------

// Registers gs-cmd-1 and gs-cmd-2 from the HSM (created_by "hsm init") when they are in the token
// and not yet in the registry: the ids registered.
Result<std::vector<std::uint8_t>> register_initial_keys(db::Db& db, hsm::Session& s,
                                                        std::int64_t now);

// Generates the next free key (>= 3, skipping labels already in the token) as gs-cmd-<id> with the
// attributes `hsm init` gives command keys (hsm::generate_ec_p256, sign only, session-copyable
// when `session_copyable`: hsm.command_key_session_copy) and registers it.
Result<CommandKey> generate_key(db::Db& db, hsm::Session& s, std::string_view actor,
                                std::int64_t now, bool session_copyable);

// The public point of the token's EC public key `label` (Errc::not_found when absent).
Result<EcPoint> token_public_point(hsm::Session& s, const std::string& label);

// gs-revocation's public key from the HSM.
Result<HostEcKey> revocation_public_key(hsm::Session& s);

// Builds, signs (gs-revocation, CKM_ECDSA over the SHA-256 digest, in the HSM), verifies with
// gs-revocation's exported public key and stores the statement putting key `key_id` into trust
// slot `slot`, with sequence last + 1, all inside the caller's transaction.
Result<Statement> issue_replacement(db::Db& db, hsm::Session& s, std::uint8_t slot,
                                    std::uint8_t key_id, std::string_view actor,
                                    std::int64_t now);

// ---- daemons ------------------------------------------------------------------------------------

// Refuses (Errc::conflict, naming the key, `setting` and the statement) to sign with command key
// `key_id` when it is retired or no trust slot holds it (the latest statements displaced it, or
// none ever put it there). One read of two small tables; a database error is an error too (fail
// closed).
Status check_signing_key(db::Db& db, std::uint8_t key_id, std::string_view setting);

// For the SES: every write of MT-2044 in the cleartext command `m` must be a partial write at
// offset 0 that decodes strictly and whose statement verifies with `revocation` (nullptr: the key
// is unavailable, every such write is refused). Ok when there is none. Errc::bad_value or
// bad_signature with the reason otherwise.
Status check_replacement_writes(const c1222::Message& m, const HostEcKey* revocation);

}  // namespace gs::cmdkeys
