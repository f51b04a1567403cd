// Key-rollover campaigns in SQLite (DESIGN §1.3, §5): what `gridseal rollover ...` writes and
// the DKUS rollover engine drives. Every state change is one committed transaction, so a kill -9
// at any instant leaves each meter in a state the engine can finish from:
//
//   step:  queued ──prepare──► prepared ──(send, retry)──► confirmed
//             │                   │  └──────────────────► failed ──resume──► prepared
//             └──abort──► aborted  (a prepared step is never aborted: the meter may hold the key)
//
// prepare commits the new key (wrapped under gs-kek) as a `pending` key slot together with the
// MT-2041 payload (target slot, key version, ephemeral public point) BEFORE anything is sent, so
// whatever the meter installs, the DKUS can decrypt. Every (re)send of a prepared step carries the
// same payload (a fresh invocation id, window and signature): the meter derives the same key into
// the same slot, so re-sending after a crash or a lost answer is idempotent. confirm makes the
// pending slot `active` and every other live slot `standby` (later destroyed by retire_standby).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/key_store.h"
#include "src/sqlite.h"

namespace gs::audit {
class TxRecorder;
}

namespace gs::store {

enum class CampaignState : std::uint8_t { running, aborted, done };
enum class StepState : std::uint8_t { queued, prepared, confirmed, failed, aborted };
const char* to_string(CampaignState s) noexcept;
const char* to_string(StepState s) noexcept;
std::optional<CampaignState> campaign_state_from(std::string_view s) noexcept;
std::optional<StepState> step_state_from(std::string_view s) noexcept;

// Why a campaign exists: an operator's rollover, or the revocation of a meter's key
// (`gridseal meters revoke`), whose update is sealed under the compromised key (the only one the
// meter holds; the update reveals nothing to whoever knows that key, DESIGN §3.2).
enum class CampaignReason : std::uint8_t { operator_request, revocation };
// "operator" / "revocation", as stored.
const char* to_string(CampaignReason r) noexcept;
std::optional<CampaignReason> campaign_reason_from(std::string_view s) noexcept;

// Bounds on what callers hand in (operator input, engine errors).
inline constexpr std::size_t kMaxSkippedListed = 1000;  // StartOutcome::skipped entries kept
inline constexpr std::size_t kMaxCreatedByLength = 128;
inline constexpr std::size_t kMaxStepErrorLength = 256;  // longer last_error text is cut
inline constexpr double kMaxCampaignRate = 1e6;         // meters per second

struct CampaignSpec {
  CampaignReason reason = CampaignReason::operator_request;
  double rate = 0;          // meters prepared per second, 0 = as fast as the engine goes
  std::string created_by;   // operator / client identity, for status and audit
};

struct Campaign {
  std::int64_t id = 0;
  CampaignState state = CampaignState::running;
  CampaignReason reason = CampaignReason::operator_request;
  double rate = 0;
  std::string created_by;
  std::int64_t created_at = 0;  // UTC seconds
  std::int64_t changed_at = 0;
  std::int64_t total = 0;  // steps
};

// Counts by step state (what `rollover status` shows).
struct CampaignProgress {
  Campaign campaign;
  std::int64_t queued = 0, prepared = 0, confirmed = 0, failed = 0, aborted = 0;
  std::int64_t sent = 0;  // prepared steps sent at least once (attempts > 0)
  std::int64_t first_confirm_at = 0, last_confirm_at = 0;  // UTC seconds, 0 when none
};

struct StartOutcome {
  std::int64_t campaign = 0;
  std::int64_t added = 0;
  // Meters named that could not join: already in a live step of another campaign, revoked
  // (compromised meter), no registered public key, no active key. Each with the reason.
  std::vector<std::pair<std::string, std::string>> skipped;
  // How many were skipped in all: `skipped` keeps only the first kMaxSkippedListed. With `all`,
  // the active meters that could not join are reported the same way.
  std::int64_t skipped_total = 0;
};

// What RolloverStore::revoke_key did.
struct RevokeOutcome {
  std::int64_t campaign = 0;       // the one-meter revocation campaign created
  std::uint8_t seal_slot = 0;      // the compromised key that will seal the update
  std::int64_t superseded = 0;     // campaign whose live step for this meter was aborted, or 0
  std::int64_t slots_compromised = 0;
  std::int64_t slots_destroyed = 0;  // pending keys of an unfinished rollover, erased
};

// What the engine needs to work on one step.
struct StepWork {
  std::int64_t campaign = 0;
  std::int64_t meter_row = 0;
  StepState state = StepState::queued;
  CampaignReason reason = CampaignReason::operator_request;
  std::uint32_t attempts = 0;
  // Set once prepared:
  std::uint8_t target_slot = 0;
  std::uint32_t key_version = 0;
  Bytes ephemeral_point;  // 65 bytes, public
  std::uint8_t seal_slot = 0;  // the slot whose key seals the update (active, or the revoked one)
  std::int64_t changed_at = 0;  // UTC seconds: when the step last changed (queued, resumed ...)
};

// The result of deriving a meter's next key in the HSM, to be committed by prepare().
struct PreparedKey {
  std::int64_t campaign = 0;
  std::int64_t meter_row = 0;
  std::uint8_t target_slot = 0;
  std::uint32_t key_version = 0;
  Bytes wrapped;          // the new key under KEK generation `kek`
  std::uint32_t kek = 1;  // src/kek_rotation.h
  Bytes ephemeral_point;  // 65 bytes
  std::uint8_t seal_slot = 0;
};

// Where the next key goes (chosen by the engine before deriving, re-checked by prepare()): a slot
// that is neither active nor pending (nor the seal slot), preferring an empty, destroyed or
// deactivated one, then the oldest standby, then a compromised one; and the version =
// 1 + the highest key version the meter ever had. nullopt when no slot can be used.
struct SlotChoice {
  std::uint8_t target_slot = 0;
  std::uint32_t key_version = 0;
  std::uint8_t seal_slot = 0;
};
std::optional<SlotChoice> choose_rollover_slot(const Meter& m, CampaignReason reason);

// One connection's view of the campaign tables (shares the KeyStore's connection and schema).
// Not thread-safe, like KeyStore.
class RolloverStore {
 public:
  explicit RolloverStore(KeyStore& ks) : ks_(ks) {}

  // Issue 7: with a recorder (on this store's connection, outliving the store), every key-state
  // change appends its audit records (actor "system", subject the meter id, never key
  // material) in the transaction that makes it, and does not commit when they cannot be:
  //   key_pending (prepare), key_confirmed (confirm), key_retired (retire_standby),
  //   rollover_failed (fail, fail_queued), rollover_dropped (drop_queued).
  // A transaction this store opens starts and finishes the recorder's batch; confirm() with
  // `in_transaction` only adds to the caller's (who starts, finishes and reports committed()).
  // record_attempts (a lease, no key state) records nothing. revoke_key is recorded by the
  // CLI's operator gate (tools/gridseal/operator_gate.cc), not here.
  void set_audit(audit::TxRecorder* recorder) noexcept { audit_ = recorder; }

  // Creates a campaign over `meter_ids` (empty + all = every meter in state active) in one
  // transaction. Errc::not_found naming the first unknown meter id (nothing is created then);
  // Errc::invalid_argument when nothing at all could be added.
  Result<StartOutcome> start(const CampaignSpec& spec, std::span<const std::string> meter_ids,
                             bool all);

  Result<std::optional<Campaign>> campaign(std::int64_t id);
  // Campaigns newest first (at most `limit`).
  Result<std::vector<Campaign>> campaigns(std::size_t limit);
  Result<CampaignProgress> progress(std::int64_t id);
  // Steps of a campaign in a state (meter ids with their last error), for reports.
  Result<std::vector<std::pair<std::string, std::string>>> steps_in_state(std::int64_t id,
                                                                           StepState s,
                                                                           std::size_t limit);

  // Operator verbs. resume: a running or aborted campaign becomes running, its failed steps go
  // back to prepared with attempts 0 (aborted steps that were never prepared back to queued).
  // abort: running -> aborted, queued and failed steps -> aborted; prepared steps are still
  // finished by the engine (the meter may already hold their key). A failed step keeps its meter
  // out of new campaigns until it is resumed or aborted.
  // Both return the number of steps they changed. Errc::not_found for an unknown campaign.
  Result<std::int64_t> resume(std::int64_t id);
  Result<std::int64_t> abort(std::int64_t id);

  // ---- the engine -------------------------------------------------------------------------
  // Up to `limit` queued steps of running campaigns, oldest campaign first (rate limiting is
  // the engine's job).
  Result<std::vector<StepWork>> next_queued(std::size_t limit);
  // Up to `limit` prepared steps (any campaign state) with next_attempt_at <= now_ms.
  Result<std::vector<StepWork>> due_prepared(std::int64_t now_ms, std::size_t limit);

  // Commits each key as a `pending` slot (replacing what the slot held) and its step as
  // prepared, all in one transaction. A step no longer queued, whose slot/version no longer
  // fit the meter (choose_rollover_slot), or whose meter has no MT-2043 proof or was flagged by
  // a failed challenge (src/challenge_store.h), is left out: the returned vector says, per
  // input, whether it was committed.
  Result<std::vector<bool>> prepare(std::span<const PreparedKey> keys);
  // Records that an update was sent (attempts + 1, next_attempt_at, last error) for many steps
  // in one transaction.
  struct Attempt {
    std::int64_t campaign = 0;
    std::int64_t meter_row = 0;
    std::int64_t next_attempt_at_ms = 0;
    std::string last_error;  // "" when none
  };
  Status record_attempts(std::span<const Attempt> attempts);
  // Gives up on steps (-> failed with the error); their pending slot stays (the meter may hold
  // the key, so its messages stay decryptable).
  Status fail(std::span<const Attempt> steps);
  // Gives up on queued steps whose meter failed (or never answered) the MT-2043 challenge that
  // must precede its first key update: queued -> failed with the error, no key derived. resume
  // queues them again (and the meter is challenged anew).
  Status fail_queued(std::span<const Attempt> steps);
  // Gives up on queued steps that can never be prepared (the meter has no usable key slot, no
  // public key, was revoked...): queued -> aborted with the error, in one transaction, then the
  // same done rule as confirm. Steps no longer queued are left alone.
  Status drop_queued(std::span<const Attempt> steps);

  // The meter proved it holds the pending key `slot`/`key_version` (its OK answer, or any
  // message under that key id with a good MAC). In one transaction: that slot -> active, every
  // other live slot (active, pending, standby) -> standby, a quarantined meter (revocation)
  // -> active, the meter's live step -> confirmed, campaigns with no queued/prepared step left
  // -> done. Idempotent: false when that slot was not pending with that version (nothing
  // changed). Call it in the caller's transaction when `in_transaction`.
  Result<bool> confirm(std::int64_t meter_row, std::uint8_t slot, std::uint32_t key_version,
                       bool in_transaction = false);

  // Standby slots whose changed_at is older than `older_than` (UTC seconds) -> destroyed, the
  // wrapped key erased. Returns how many.
  Result<std::int64_t> retire_standby(std::int64_t older_than);

  // ---- key compromise (`gridseal meters revoke` without --permanent) -----------------------
  // In one transaction: the meter's active and standby slots -> compromised, its pending slots
  // (keys of an unfinished rollover, never confirmed) -> destroyed with the wrapped key erased,
  // its live rollover step (if any) -> aborted, the meter -> quarantined with `reason`, and a
  // one-meter campaign with reason revocation whose update is sealed under the compromised key
  // that was active (choose_rollover_slot(m, revocation) picks it: the compromised slot with the
  // highest key version). Errc::not_found for an unknown meter; Errc::conflict for a meter
  // already revoked permanently or without an active key; Errc::invalid_argument for a meter
  // without a registered public key (it cannot be rekeyed). Revoking a quarantined meter again
  // restarts its revocation rollover (the previous step is superseded).
  Result<RevokeOutcome> revoke_key(std::string_view meter_id, std::string_view reason,
                                   std::string_view created_by);

 private:
  // The engine's statements, prepared once on this connection and kept (reset after each use).
  Result<db::Stmt*> stmt(const char* sql);
  Status fail_in(std::span<const Attempt> steps, const char* sql, const char* from);
  // The meter id of a row (for audit subjects); "-" when the row is gone.
  Result<std::string> meter_id_of(std::int64_t meter_row);

  KeyStore& ks_;
  audit::TxRecorder* audit_ = nullptr;
  std::unordered_map<const char*, std::shared_ptr<db::Stmt>> stmts_;
};

}  // namespace gs::store
