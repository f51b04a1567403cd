// MT-2043 meter challenges in SQLite: the queries behind src/challenge_store.h.
#include "src/challenge_store.h"

#include <algorithm>
#include <unordered_set>

#include "src/host_ecdsa.h"

namespace gs::store {

namespace {

std::string clip(std::string_view s, std::size_t max) {
  return std::string(s.substr(0, std::min(s.size(), max)));
}

// Resets a cached statement however the scope is left.
struct ResetOnExit {
  db::Stmt* st;
  ~ResetOnExit() { st->reset(); }
};

constexpr const char* kStatusColumns =
    "SELECT c.meter, m.meter_id, c.state, c.origin, c.requested_by, c.requested_at_ms, "
    "c.challenge, c.issued_at_ms, c.expires_at_ms, c.invocation_id, c.attempts, "
    "c.next_attempt_at, c.last_error, c.changed_at_ms FROM meter_challenges c JOIN meters m ON "
    "m.row = c.meter ";

ChallengeStatus read_status(const db::Stmt& st) {
  ChallengeStatus s;
  s.meter_row = st.int64(0);
  s.meter_id = st.text(1);
  s.state = challenge_state_from(st.text(2)).value_or(ChallengeState::failed);
  s.origin = st.text(3) == "rollover" ? ChallengeOrigin::rollover
                                      : ChallengeOrigin::operator_request;
  s.requested_by = st.text(4);
  s.requested_at_ms = st.int64(5);
  if (!st.is_null(6)) s.challenge = st.blob(6);
  if (!st.is_null(7)) s.issued_at_ms = st.int64(7);
  if (!st.is_null(8)) s.expires_at_ms = st.int64(8);
  if (!st.is_null(9)) s.invocation_id = static_cast<std::uint32_t>(st.int64(9));
  s.attempts = static_cast<std::uint32_t>(std::clamp<std::int64_t>(st.int64(10), 0, UINT32_MAX));
  s.next_attempt_at_ms = st.int64(11);
  s.last_error = st.text(12);
  s.changed_at_ms = st.int64(13);
  return s;
}

// Queues a challenge unless one is live (queued or sent): a finished row is reset.
constexpr const char* kQueueSql =
    "INSERT INTO meter_challenges (meter, state, origin, requested_by, requested_at_ms, "
    "changed_at_ms) VALUES (?1, 'queued', ?2, ?3, ?4, ?4) ON CONFLICT (meter) DO UPDATE SET "
    "state = 'queued', origin = ?2, requested_by = ?3, requested_at_ms = ?4, challenge = NULL, "
    "issued_at_ms = NULL, expires_at_ms = NULL, invocation_id = NULL, attempts = 0, "
    "next_attempt_at = 0, last_error = '', changed_at_ms = ?4 WHERE state NOT IN "
    "('queued','sent')";
// In index order, without a sort (a campaign may queue a challenge per meter of the fleet):
// queued rows first, then sent ones whose lease ran out, each by due time.
constexpr const char* kDueSql =
    "SELECT c.meter, m.meter_id, c.state, c.origin, c.requested_by, c.requested_at_ms, "
    "c.challenge, c.issued_at_ms, c.expires_at_ms, c.invocation_id, c.attempts, "
    "c.next_attempt_at, c.last_error, c.changed_at_ms FROM meter_challenges c INDEXED BY "
    "meter_challenges_by_state JOIN meters m ON m.row = c.meter WHERE c.state IN "
    "('queued','sent') AND c.next_attempt_at <= ?1 LIMIT ?2";
constexpr const char* kIssueSql =
    "UPDATE meter_challenges SET state = 'sent', challenge = ?2, issued_at_ms = ?3, "
    "expires_at_ms = ?4, invocation_id = ?5, attempts = attempts + 1, next_attempt_at = ?6, "
    "changed_at_ms = ?3 WHERE meter = ?1 AND state IN ('queued','sent')";
// Single use: only the challenge sent, unexpired, is consumed; then it is gone.
constexpr const char* kProveSql =
    "UPDATE meter_challenges SET state = 'proven', challenge = NULL, last_error = '', "
    "next_attempt_at = 0, changed_at_ms = ?3 WHERE meter = ?1 AND state = 'sent' AND "
    "challenge = ?2 AND expires_at_ms >= ?3";
constexpr const char* kProofSql =
    "INSERT OR IGNORE INTO challenge_proofs (meter, challenge, meter_time, signature, "
    "message_id, verified_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
constexpr const char* kSettleSql =
    "UPDATE meter_challenges SET state = ?2, challenge = NULL, last_error = ?3, "
    "next_attempt_at = 0, changed_at_ms = ?4 WHERE meter = ?1 AND state IN ('queued','sent') "
    "AND (?5 = 0 OR challenge = ?6)";
constexpr const char* kRetrySql =
    "UPDATE meter_challenges SET next_attempt_at = ?2, last_error = ?3 WHERE meter = ?1 AND "
    "state = 'sent'";
constexpr const char* kLastProofSql =
    "SELECT meter, challenge, meter_time, signature, message_id, verified_at_ms FROM "
    "challenge_proofs WHERE meter = ?1 ORDER BY verified_at_ms DESC LIMIT 1";

std::int64_t as_limit(std::size_t limit) {
  return static_cast<std::int64_t>(std::min<std::size_t>(limit, INT64_MAX));
}

}  // namespace

const char* to_string(ChallengeState s) noexcept {
  switch (s) {
    case ChallengeState::queued: return "queued";
    case ChallengeState::sent: return "sent";
    case ChallengeState::proven: return "proven";
    case ChallengeState::failed: return "failed";
    case ChallengeState::unanswered: return "unanswered";
  }
  return "?";
}

const char* to_string(ChallengeOrigin o) noexcept {
  return o == ChallengeOrigin::rollover ? "rollover" : "operator";
}

std::optional<ChallengeState> challenge_state_from(std::string_view s) noexcept {
  for (auto v : {ChallengeState::queued, ChallengeState::sent, ChallengeState::proven,
                 ChallengeState::failed, ChallengeState::unanswered}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

const char* to_string(ChallengeCheck c) noexcept {
  switch (c) {
    case ChallengeCheck::ok: return "ok";
    case ChallengeCheck::wrong_challenge: return "wrong challenge";
    case ChallengeCheck::expired: return "challenge expired";
    case ChallengeCheck::bad_signature: return "bad signature";
    case ChallengeCheck::no_public_key: return "no registered public key";
  }
  return "?";
}

ChallengeCheck check_challenge_answer(const Meter& meter, ByteView expected,
                                      std::int64_t expires_at_ms, const c1222::ChallengeAnswer& a,
                                      std::int64_t now_ms) {
  if (expected.size() != a.challenge.size() ||
      !std::equal(expected.begin(), expected.end(), a.challenge.begin())) {
    return ChallengeCheck::wrong_challenge;
  }
  if (meter.public_key.size() != kPublicKeySize) return ChallengeCheck::no_public_key;
  auto pub = HostEcKey::from_public(meter.public_key);
  if (!pub.ok()) return ChallengeCheck::no_public_key;
  auto signed_bytes = c1222::challenge_signed_bytes(meter.ap_title, a);
  if (!signed_bytes.ok()) return ChallengeCheck::bad_signature;
  auto digest = sha256(*signed_bytes);
  if (!digest.ok() || !pub->verify(*digest, a.signature).ok()) {
    return ChallengeCheck::bad_signature;
  }
  if (now_ms > expires_at_ms) return ChallengeCheck::expired;
  return ChallengeCheck::ok;
}

Result<db::Stmt*> ChallengeStore::stmt(const char* sql) {
  if (auto it = stmts_.find(sql); it != stmts_.end()) return it->second.get();
  GS_ASSIGN(auto st, ks_.db().prepare(sql));
  auto p = std::make_shared<db::Stmt>(std::move(st));
  stmts_.emplace(sql, p);
  return p.get();
}

Result<ChallengeRequestOutcome> ChallengeStore::request(std::span<const std::string> meter_ids,
                                                        bool all_unproven,
                                                        std::string_view requested_by,
                                                        std::int64_t now_ms) {
  db::Db& db = ks_.db();
  ChallengeRequestOutcome out;
  GS_ASSIGN(db::Stmt* queue, stmt(kQueueSql));
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  const std::string by = clip(requested_by, kMaxChallengeRequester);
  auto skip = [&](const std::string& id, std::string why) {
    if (out.skipped.size() < kMaxChallengeSkippedListed) out.skipped.emplace_back(id, std::move(why));
    ++out.skipped_total;
  };
  auto one = [&](const Meter& m) -> Status {
    if (m.state == MeterState::compromised) {
      skip(m.meter_id, "meter revoked permanently");
      return {};
    }
    if (m.public_key.size() != kPublicKeySize) {
      skip(m.meter_id, "no registered public key");
      return {};
    }
    queue->bind(1, m.row).bind(2, "operator").bind(3, by).bind(4, now_ms);
    GS_TRY(queue->run());
    if (db.changes() > 0) {
      ++out.queued;
    } else {
      ++out.already;
    }
    out.meter_ids.push_back(m.meter_id);
    return {};
  };
  if (all_unproven) {
    GS_ASSIGN(auto sel,
              db.prepare("SELECT meter_id FROM meters m WHERE state <> 'compromised' AND NOT "
                         "EXISTS (SELECT 1 FROM challenge_proofs p WHERE p.meter = m.row) AND "
                         "NOT EXISTS (SELECT 1 FROM meter_challenges c WHERE c.meter = m.row "
                         "AND c.state IN ('queued','sent')) ORDER BY meter_id"));
    std::vector<std::string> ids;
    while (true) {
      GS_ASSIGN(db::Step s, sel.step());
      if (s == db::Step::done) break;
      ids.push_back(sel.text(0));
    }
    sel.reset();
    for (const std::string& id : ids) {
      GS_ASSIGN(auto m, ks_.meter_by_id(id));
      if (m) GS_TRY(one(*m));
    }
  } else {
    std::unordered_set<std::string> seen;
    for (const std::string& id : meter_ids) {
      if (!seen.insert(id).second) continue;
      GS_ASSIGN(auto m, ks_.meter_by_id(id));
      if (!m) return {Errc::not_found, "no meter " + id};
      GS_TRY(one(*m));
    }
  }
  GS_TRY(tx.commit());
  return out;
}

Result<std::optional<ChallengeStatus>> ChallengeStore::status(std::int64_t meter_row) {
  GS_ASSIGN(db::Stmt* st, stmt("SELECT c.meter, m.meter_id, c.state, c.origin, c.requested_by, "
                               "c.requested_at_ms, c.challenge, c.issued_at_ms, "
                               "c.expires_at_ms, c.invocation_id, c.attempts, "
                               "c.next_attempt_at, c.last_error, c.changed_at_ms FROM "
                               "meter_challenges c JOIN meters m ON m.row = c.meter WHERE "
                               "c.meter = ?1"));
  ResetOnExit guard{st};
  st->bind(1, meter_row);
  GS_ASSIGN(db::Step s, st->step());
  if (s != db::Step::row) return std::optional<ChallengeStatus>();
  return std::optional<ChallengeStatus>(read_status(*st));
}

Result<std::optional<ChallengeStatus>> ChallengeStore::status_by_id(std::string_view meter_id) {
  if (!by_id_) {
    GS_ASSIGN(auto st, ks_.db().prepare(std::string(kStatusColumns) + "WHERE m.meter_id = ?1"));
    by_id_ = std::make_shared<db::Stmt>(std::move(st));
  }
  db::Stmt* st = by_id_.get();
  ResetOnExit guard{st};
  st->bind(1, meter_id);
  GS_ASSIGN(db::Step s, st->step());
  if (s != db::Step::row) return std::optional<ChallengeStatus>();
  return std::optional<ChallengeStatus>(read_status(*st));
}

Result<std::optional<ChallengeProof>> ChallengeStore::last_proof(std::int64_t meter_row) {
  GS_ASSIGN(db::Stmt* st, stmt(kLastProofSql));
  ResetOnExit guard{st};
  st->bind(1, meter_row);
  GS_ASSIGN(db::Step s, st->step());
  if (s != db::Step::row) return std::optional<ChallengeProof>();
  ChallengeProof p;
  p.meter_row = st->int64(0);
  p.challenge = st->blob(1);
  p.meter_time = st->int64(2);
  p.signature = st->blob(3);
  p.message_id = static_cast<std::uint64_t>(st->int64(4));
  p.verified_at_ms = st->int64(5);
  return std::optional<ChallengeProof>(std::move(p));
}

Result<std::optional<std::int64_t>> ChallengeStore::last_proof_at_ms(std::int64_t meter_row) {
  GS_ASSIGN(db::Stmt* st, stmt("SELECT max(verified_at_ms) FROM challenge_proofs WHERE meter = ?1"));
  ResetOnExit guard{st};
  st->bind(1, meter_row);
  GS_ASSIGN(db::Step s, st->step());
  if (s != db::Step::row || st->is_null(0)) return std::optional<std::int64_t>();
  return std::optional<std::int64_t>(st->int64(0));
}

Result<std::int64_t> ChallengeStore::count_in_state(ChallengeState s) {
  GS_ASSIGN(db::Stmt* st, stmt("SELECT count(*) FROM meter_challenges WHERE state = ?1"));
  ResetOnExit guard{st};
  st->bind(1, to_string(s));
  GS_ASSIGN(db::Step r, st->step());
  return r == db::Step::row ? st->int64(0) : 0;
}

Result<std::int64_t> ChallengeStore::request_rows(std::span<const std::int64_t> meter_rows,
                                                  std::string_view requested_by,
                                                  std::int64_t now_ms) {
  if (meter_rows.empty()) return std::int64_t{0};
  db::Db& db = ks_.db();
  GS_ASSIGN(db::Stmt* queue, stmt(kQueueSql));
  const std::string by = clip(requested_by, kMaxChallengeRequester);
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  std::int64_t n = 0;
  for (std::int64_t row : meter_rows) {
    queue->bind(1, row).bind(2, "rollover").bind(3, by).bind(4, now_ms);
    GS_TRY(queue->run());
    n += db.changes();
  }
  GS_TRY(tx.commit());
  return n;
}

Result<std::vector<ChallengeStatus>> ChallengeStore::due(std::int64_t now_ms, std::size_t limit) {
  GS_ASSIGN(db::Stmt* st, stmt(kDueSql));
  ResetOnExit guard{st};
  st->bind(1, now_ms).bind(2, as_limit(limit));
  std::vector<ChallengeStatus> out;
  while (true) {
    GS_ASSIGN(db::Step s, st->step());
    if (s == db::Step::done) break;
    out.push_back(read_status(*st));
  }
  return out;
}

Result<std::vector<bool>> ChallengeStore::issue(std::span<const IssuedChallenge> items) {
  db::Db& db = ks_.db();
  GS_ASSIGN(db::Stmt* st, stmt(kIssueSql));
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  std::vector<bool> out(items.size(), false);
  for (std::size_t i = 0; i < items.size(); ++i) {
    const IssuedChallenge& c = items[i];
    st->bind(1, c.meter_row)
        .bind(2, ByteView(c.challenge))
        .bind(3, c.issued_at_ms)
        .bind(4, c.expires_at_ms)
        .bind(5, std::int64_t{c.invocation_id})
        .bind(6, c.next_attempt_at_ms);
    GS_TRY(st->run());
    out[i] = db.changes() == 1;
  }
  GS_TRY(tx.commit());
  return out;
}

Result<bool> ChallengeStore::prove(const ChallengeProof& p) {
  if (p.challenge.size() != c1222::kChallengeSize || p.signature.size() != 64) {
    return {Errc::invalid_argument, "a proof has a 16-byte challenge and a 64-byte signature"};
  }
  if (p.message_id > static_cast<std::uint64_t>(INT64_MAX)) {
    return {Errc::invalid_argument, "message id out of range"};
  }
  db::Db& db = ks_.db();
  GS_ASSIGN(db::Stmt* up, stmt(kProveSql));
  GS_ASSIGN(db::Stmt* ins, stmt(kProofSql));
  up->bind(1, p.meter_row).bind(2, ByteView(p.challenge)).bind(3, p.verified_at_ms);
  GS_TRY(up->run());
  if (db.changes() != 1) return false;
  ins->bind(1, p.meter_row)
      .bind(2, ByteView(p.challenge))
      .bind(3, p.meter_time)
      .bind(4, ByteView(p.signature))
      .bind(5, static_cast<std::int64_t>(p.message_id))
      .bind(6, p.verified_at_ms);
  GS_TRY(ins->run());
  return true;
}

Result<bool> ChallengeStore::settle(std::int64_t meter_row, ChallengeState state,
                                    std::string_view why, ByteView challenge,
                                    std::int64_t now_ms) {
  if (state != ChallengeState::failed && state != ChallengeState::unanswered) {
    return {Errc::invalid_argument, "a challenge settles failed or unanswered"};
  }
  db::Db& db = ks_.db();
  GS_ASSIGN(db::Stmt* st, stmt(kSettleSql));
  st->bind(1, meter_row)
      .bind(2, to_string(state))
      .bind(3, clip(why, kMaxChallengeErrorLength))
      .bind(4, now_ms)
      .bind(5, std::int64_t{challenge.empty() ? 0 : 1})
      .bind(6, challenge);
  GS_TRY(st->run());
  return db.changes() == 1;
}

Status ChallengeStore::retry_later(std::int64_t meter_row, std::int64_t next_attempt_at_ms,
                                   std::string_view why) {
  GS_ASSIGN(db::Stmt* st, stmt(kRetrySql));
  st->bind(1, meter_row).bind(2, next_attempt_at_ms).bind(3, clip(why, kMaxChallengeErrorLength));
  return st->run();
}

}  // namespace gs::store
