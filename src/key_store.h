// The meter registry and key-slot store in SQLite (DESIGN §5): what both daemons and the CLI
// use instead of SQL in handlers. Keys are stored only wrapped under the HSM's gs-kek.
#pragma once

#include <array>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "src/sqlite.h"

namespace gs::store {

inline constexpr int kSlotsPerMeter = 4;
inline constexpr int kSchemaVersion = 14;
inline constexpr std::size_t kMaxMeterIdLength = 64;
inline constexpr std::size_t kPublicKeySize = 65;  // uncompressed P-256 point

// A meter's registry state.
enum class MeterState : std::uint8_t { active, compromised, quarantined };
// Key states of NIST SP 800-57 (pending = pre-activation).
enum class KeyState : std::uint8_t { pending, active, standby, deactivated, compromised, destroyed };

const char* to_string(MeterState s) noexcept;
const char* to_string(KeyState s) noexcept;
std::optional<MeterState> meter_state_from(std::string_view s) noexcept;
std::optional<KeyState> key_state_from(std::string_view s) noexcept;

struct KeySlot {
  int slot = 0;  // also the C12.22 key id
  Bytes wrapped;  // AES-KWP under the KEK of generation `kek`
  std::uint32_t kek = 1;  // KEK generation (src/kek_rotation.h): 1 = gs-kek, n = gs-kek-<n>
  std::uint32_t key_version = 0;
  KeyState state = KeyState::pending;
  std::string origin;  // plain | wrapped | ecdh | rollover
  std::int64_t created_at = 0;
  std::int64_t changed_at = 0;
};

struct Meter {
  std::int64_t row = 0;
  std::string meter_id;
  Bytes ap_title;          // absolute OID content (relative titles converted on import)
  std::string ap_title_text;  // dotted, as given at import
  Bytes public_key;        // 65 bytes or empty
  MeterState state = MeterState::active;
  std::string state_reason;
  std::int64_t created_at = 0;
  std::vector<KeySlot> slots;  // ordered by slot

  const KeySlot* active_slot() const noexcept;
  const KeySlot* slot_for_key_id(std::uint8_t key_id) const noexcept;
};

// One meter to bring in: its identity and its initial key, already wrapped.
struct NewMeter {
  std::string meter_id;
  Bytes ap_title;
  std::string ap_title_text;
  Bytes public_key;
  int slot = 0;
  Bytes wrapped_key;
  std::uint32_t kek = 1;  // the KEK generation wrapped_key is wrapped under
  std::uint32_t key_version = 1;
  std::string origin;
};

// Replay window of one meter (DESIGN §2, §5), exact once in the manner of RFC 4303 §3.4.3 and
// DTLS: the highest calling-AP-invocation-id the DKUS accepted from the meter (the mark) and which
// of the W-1 ids just below it were accepted too. One meter's messages can reach the DKUS out of
// order (several collection-engine connections, a relay, the rollover engine verifying a later
// answer before the collection engine hands over an earlier one); each is accepted exactly once.
// With a window of W: an id above the mark is accepted (the window slides up); an id in
// mark-W+1 .. mark-1 whose bit is clear is accepted (its bit set); everything else is refused: the
// mark itself or a set bit is `replayed`, mark-W and below (or at or below the floor) `too_old`.
// W = 0 (or 1) keeps ids strictly rising.
inline constexpr unsigned kMaxReplayWindow = 64;

enum class ReplayVerdict : std::uint8_t { accepted, replayed, too_old };
const char* to_string(ReplayVerdict v) noexcept;

struct ReplayMark {
  std::uint64_t invocation_id = 0;  // the mark: the highest accepted id
  std::int64_t iv_time = 0;         // the IV time of the message that set it
  // Bit i (i <= W-2 <= 62): id invocation_id-1-i was accepted. The mark needs no bit of its own,
  // so 63 bits hold a window of 64 and the column stays a non-negative SQLite INTEGER (no sign
  // bit, no shift of a negative value).
  std::uint64_t below = 0;
  // Ids at or below it are too old whatever the window: a mark stored before windows existed
  // (nothing is known below it), or a window made larger since the bits were written.
  std::int64_t floor = 0;

  // What the window says of `id` (W = min(window, kMaxReplayWindow)).
  ReplayVerdict judge(std::uint64_t id, unsigned window) const noexcept;
  // Records `id`, which judge() accepted: slides the window or sets its bit.
  void accept(std::uint64_t id, std::int64_t iv, unsigned window) noexcept;
  // The first mark of a meter: `id` accepted, nothing below it yet.
  static ReplayMark first(std::uint64_t id, std::int64_t iv, unsigned window) noexcept;
};

// An MT-2042 signed receipt (DESIGN §3.3) as the DKUS stores it after verifying the signature
// with the meter's registered public key. The receipt does not carry the command class: the
// digest of the command's signing input (which binds it) is kept instead.
struct Receipt {
  std::int64_t meter_row = 0;
  std::string meter_id;               // filled by receipts_for_meter()
  std::uint64_t invocation_id = 0;    // of the command the meter executed
  std::uint8_t result = 0;            // the meter's result code
  std::int64_t executed_at = 0;       // meter time, UTC seconds
  Bytes command_digest;               // SHA-256 of the command's signing input (32 bytes)
  Bytes signature;                    // r || s (64 bytes)
  std::uint64_t message_id = 0;       // calling-AP-invocation-id of the message that carried it
  std::int64_t received_at = 0;       // DKUS time, UTC seconds
};

struct ImportOutcome {
  std::size_t inserted = 0;
  std::size_t unchanged = 0;
};

// For tests of migrations: creates the schema of an older `version` (its first `version`
// migrations) in an empty database, as a gridseal of that version left it.
Status create_schema_version(db::Db& db, int version);

// One connection to the store. Not thread-safe: one per thread or worker process.
class KeyStore {
 public:
  // Opens (creating when allowed) and migrates the schema to kSchemaVersion.
  static Result<KeyStore> open(const std::string& path, const db::OpenOptions& opt = {});

  // The meter with its slots, or nullopt.
  Result<std::optional<Meter>> meter_by_title(ByteView absolute_title);
  Result<std::optional<Meter>> meter_by_id(std::string_view meter_id);
  Result<std::optional<Meter>> meter_by_row(std::int64_t row);
  // Up to `limit` meters ordered by meter id, starting after `after`.
  Result<std::vector<Meter>> list_meters(std::string_view after, std::size_t limit);
  Result<std::int64_t> count_meters();

  // Adds meters in one transaction: all or nothing. A row equal to what is stored is a no-op;
  // one that differs (title, public key, slot, key) is Errc::conflict naming the meter.
  Result<ImportOutcome> import_meters(std::span<const NewMeter> batch);

  // Marks the meter compromised and every live key slot compromised (never used again), and
  // aborts its live rollover step if any (a permanent revocation: the meter is never served
  // again). RolloverStore::revoke_key is the key-compromise variant that rekeys the meter.
  Status revoke(std::string_view meter_id, std::string_view reason);

  // Reserves `count` consecutive values of the invocation counter of `calling_title`, durably,
  // and returns the first. A crash after this loses the block; it is never handed out again.
  Result<std::uint64_t> reserve_counter_block(ByteView calling_title, std::uint64_t count);

  // Replay marks (DKUS). raise_replay_mark accepts `invocation_id` from `meter_row` into the
  // meter's replay window of `window` ids (ReplayMark above; no row yet: accepted) in one
  // conditional upsert, so that two connections can never both accept the same id: `accepted`
  // when it recorded the id, otherwise why not (the row unchanged). Call it inside the caller's
  // transaction (group commit). Ids above 2^63-1 and windows above kMaxReplayWindow are
  // invalid_argument.
  Result<ReplayVerdict> raise_replay_mark(std::int64_t meter_row, std::uint64_t invocation_id,
                                          std::int64_t iv_time, unsigned window);
  Result<std::optional<ReplayMark>> replay_mark(std::int64_t meter_row);

  // Stores a verified receipt (inside the caller's transaction). The same (meter, invocation id)
  // again keeps the first one: false then.
  Result<bool> insert_receipt(const Receipt& r);
  // The meter's receipts, newest command first, at most `limit`.
  Result<std::vector<Receipt>> receipts_for_meter(std::int64_t meter_row, std::size_t limit);

  db::Db& db() noexcept { return db_; }

 private:
  explicit KeyStore(db::Db db) : db_(std::move(db)) {}
  Status migrate();
  Status prepare_statements();
  Result<std::optional<Meter>> load(db::Stmt& st);

  db::Db db_;
  std::optional<db::Stmt> by_title_;
  std::optional<db::Stmt> by_id_;
  std::optional<db::Stmt> by_row_;
  std::optional<db::Stmt> raise_mark_;     // prepared on first use
  std::optional<db::Stmt> read_mark_;      // prepared on first use
  std::optional<db::Stmt> insert_receipt_;
};

}  // namespace gs::store
