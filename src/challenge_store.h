// MT-2043 meter challenges in SQLite (DESIGN §3.4): what `gridseal meters challenge` queues, what
// the DKUS rollover engine issues and settles, and the proofs it records. Every state change is
// one committed transaction (or part of the engine's answer transaction), so a kill -9 leaves
// each challenge queued, sent (re-issued with a FRESH challenge once its lease runs out) or done:
//
//   queued ──issue──► sent ──answer verified──► proven   (challenge consumed, proof recorded)
//                      │  ├──wrong signature / challenge──► failed  (the meter is flagged)
//                      │  └──no usable answer, retry──► sent (new challenge, attempts + 1)
//                      └──max attempts / cannot be sent──► unanswered
//
// One row per meter: the current challenge. A challenge is single use (consumed when proven, and
// replaced by each re-issue) and expires (expires_at_ms); a proof is kept per challenge. A meter
// is "proven" while it has a proof and its current challenge did not fail; the rollover engine
// rekeys no meter before that (DESIGN §3.4: before its first key update).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "c1222/profile.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/key_store.h"
#include "src/sqlite.h"

namespace gs::store {

enum class ChallengeState : std::uint8_t { queued, sent, proven, failed, unanswered };
// Who asked: an operator (`gridseal meters challenge`) or the rollover engine before a meter's
// first key update.
enum class ChallengeOrigin : std::uint8_t { operator_request, rollover };
const char* to_string(ChallengeState s) noexcept;
const char* to_string(ChallengeOrigin o) noexcept;  // "operator" / "rollover", as stored
std::optional<ChallengeState> challenge_state_from(std::string_view s) noexcept;

inline constexpr std::size_t kMaxChallengeErrorLength = 256;
inline constexpr std::size_t kMaxChallengeRequester = 128;
inline constexpr std::size_t kMaxChallengeSkippedListed = 1000;

// A meter's current challenge (the row of meter_challenges).
struct ChallengeStatus {
  std::int64_t meter_row = 0;
  std::string meter_id;
  ChallengeState state = ChallengeState::queued;
  ChallengeOrigin origin = ChallengeOrigin::operator_request;
  std::string requested_by;
  std::int64_t requested_at_ms = 0;  // UTC milliseconds
  Bytes challenge;                   // 16 bytes while sent; empty when queued or consumed
  std::int64_t issued_at_ms = 0;
  std::int64_t expires_at_ms = 0;
  std::uint32_t invocation_id = 0;  // of the command that carried it
  std::uint32_t attempts = 0;
  std::int64_t next_attempt_at_ms = 0;
  std::string last_error;
  std::int64_t changed_at_ms = 0;

  bool live() const noexcept {
    return state == ChallengeState::queued || state == ChallengeState::sent;
  }
};

// What a meter answered, verified and kept: non-repudiable evidence that the holder of the
// registered key signed this challenge.
struct ChallengeProof {
  std::int64_t meter_row = 0;
  Bytes challenge;         // 16 bytes
  std::int64_t meter_time = 0;  // the meter's clock in the answer, UTC seconds
  Bytes signature;         // r || s (64 bytes) over challenge_signed_bytes()
  std::uint64_t message_id = 0;  // calling-AP-invocation-id of the answer
  std::int64_t verified_at_ms = 0;
};

struct ChallengeRequestOutcome {
  std::int64_t queued = 0;   // new challenges queued
  std::int64_t already = 0;  // a challenge was already queued or sent: left as it is
  // Meters that cannot be challenged (revoked for good, no registered public key), with why;
  // only the first kMaxChallengeSkippedListed are kept.
  std::vector<std::pair<std::string, std::string>> skipped;
  std::int64_t skipped_total = 0;
  std::vector<std::string> meter_ids;  // every meter whose challenge is now queued or sent
};

// One challenge about to be sent, committed by issue() before it leaves.
struct IssuedChallenge {
  std::int64_t meter_row = 0;
  c1222::Challenge challenge{};
  std::int64_t issued_at_ms = 0;
  std::int64_t expires_at_ms = 0;
  std::uint32_t invocation_id = 0;
  std::int64_t next_attempt_at_ms = 0;  // the lease: due again then if nothing settled it
};

// How a meter's answer to a challenge checks out (check_challenge_answer).
enum class ChallengeCheck : std::uint8_t {
  ok,
  wrong_challenge,  // not the challenge outstanding (a replayed or stale answer)
  expired,          // verified too late (answered after expires_at_ms)
  bad_signature,    // does not verify with the meter's registered public key
  no_public_key,
};
const char* to_string(ChallengeCheck c) noexcept;  // "ok", "wrong challenge", ...

// The checks of DESIGN §3.4 on an MT-2043 answer from `meter` against the challenge outstanding
// (`expected`, `expires_at_ms`) at `now_ms`, in this order: the challenge, then the signature
// (ECDSA P-256, SHA-256 of challenge_signed_bytes with the meter's absolute title), then expiry.
// An answer whose signature fails is reported as such even when late: a forgery is a forgery.
ChallengeCheck check_challenge_answer(const Meter& meter, ByteView expected,
                                      std::int64_t expires_at_ms, const c1222::ChallengeAnswer& a,
                                      std::int64_t now_ms);

// One connection's view of the challenge tables (shares the KeyStore's connection). Not
// thread-safe, like KeyStore.
class ChallengeStore {
 public:
  explicit ChallengeStore(KeyStore& ks) : ks_(ks) {}

  // ---- operators ------------------------------------------------------------------------
  // Queues a challenge for each meter named (or, with all_unproven, for every meter not
  // compromised that has no proof and no live challenge), in one transaction. A meter whose
  // challenge is already queued or sent is left alone. Errc::not_found naming the first unknown
  // meter id (nothing is queued then).
  Result<ChallengeRequestOutcome> request(std::span<const std::string> meter_ids,
                                          bool all_unproven, std::string_view requested_by,
                                          std::int64_t now_ms);

  Result<std::optional<ChallengeStatus>> status(std::int64_t meter_row);
  Result<std::optional<ChallengeStatus>> status_by_id(std::string_view meter_id);
  // The newest proof of a meter, and only its time (the rollover engine's check).
  Result<std::optional<ChallengeProof>> last_proof(std::int64_t meter_row);
  Result<std::optional<std::int64_t>> last_proof_at_ms(std::int64_t meter_row);
  Result<std::int64_t> count_in_state(ChallengeState s);

  // ---- the engine -------------------------------------------------------------------------
  // Queues challenges for meters before their first key update (origin rollover), unless one
  // is live; one transaction. Returns how many were queued.
  Result<std::int64_t> request_rows(std::span<const std::int64_t> meter_rows,
                                    std::string_view requested_by, std::int64_t now_ms);
  // Up to `limit` queued or sent challenges due (next_attempt_at <= now_ms).
  Result<std::vector<ChallengeStatus>> due(std::int64_t now_ms, std::size_t limit);
  // Commits each challenge as sent (attempts + 1, the new challenge replacing the old one:
  // single use even across retries) in one transaction, before anything is sent. Returns, per
  // input, whether it was committed (false when the row is no longer live).
  Result<std::vector<bool>> issue(std::span<const IssuedChallenge> items);

  // Inside the caller's transaction. prove: the verified answer consumes the challenge: only
  // when it is still the one sent and not expired at proof.verified_at_ms (re-checked here, in
  // one statement); the proof is recorded. False when nothing matched (no change).
  Result<bool> prove(const ChallengeProof& proof);
  // The challenge ends `state` (failed or unanswered) with `why`, the challenge value erased;
  // only a live row whose current challenge is `challenge` (empty: any live row).
  Result<bool> settle(std::int64_t meter_row, ChallengeState state, std::string_view why,
                      ByteView challenge, std::int64_t now_ms);
  // A sent challenge will be re-issued at `next_attempt_at_ms` (the answer was unusable).
  Status retry_later(std::int64_t meter_row, std::int64_t next_attempt_at_ms,
                     std::string_view why);

 private:
  Result<db::Stmt*> stmt(const char* sql);

  KeyStore& ks_;
  std::unordered_map<const char*, std::shared_ptr<db::Stmt>> stmts_;
  std::shared_ptr<db::Stmt> by_id_;
};

}  // namespace gs::store
