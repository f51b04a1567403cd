// Key-rollover campaigns and steps in SQLite: the queries behind src/rollover_store.h.
#include "src/rollover_store.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <unordered_set>

#include "gridseal/clock.h"
#include "src/audit_recorder.h"

namespace gs::store {

namespace {

std::int64_t now_s() { return static_cast<std::int64_t>(utc_now()); }

// An audit record of a key-state change by the rollover engine (identities and numbers only).
audit::Event key_event(const char* event, std::string_view meter_id, const audit::Detail& d) {
  return audit::Event{0, audit::kSystemActor, event,
                      audit::clip(meter_id, audit::kMaxSubject), d.str()};
}

// The SQLite wrapper binds integers, text and blobs only: a campaign's rate (REAL) travels as
// an integer count of micro-meters per second and is converted in SQL.
constexpr double kRateScale = 1e6;
std::int64_t rate_to_micro(double rate) { return std::llround(rate * kRateScale); }
double rate_from_micro(std::int64_t micro) { return static_cast<double>(micro) / kRateScale; }
constexpr const char* kCampaignColumns =
    "SELECT id, state, reason, CAST(round(rate * 1000000.0) AS INTEGER), created_by, "
    "created_at, changed_at, total FROM rollover_campaigns ";

std::string clip(std::string_view s, std::size_t max) {
  return std::string(s.substr(0, std::min(s.size(), max)));
}

const char* meter_state_needed(CampaignReason r) {
  return r == CampaignReason::revocation ? "quarantined" : "active";
}

bool live_key(KeyState s) { return s == KeyState::active || s == KeyState::pending; }

Campaign read_campaign(const db::Stmt& st) {
  Campaign c;
  c.id = st.int64(0);
  c.state = campaign_state_from(st.text(1)).value_or(CampaignState::aborted);
  c.reason = campaign_reason_from(st.text(2)).value_or(CampaignReason::operator_request);
  c.rate = rate_from_micro(st.int64(3));
  c.created_by = st.text(4);
  c.created_at = st.int64(5);
  c.changed_at = st.int64(6);
  c.total = st.int64(7);
  return c;
}

// A running campaign with no queued or prepared step left becomes done (failed steps may
// remain: `resume` takes them up again). Both probes seek rollover_steps_by_state, whose
// entries end with the primary key (campaign, meter); queued steps always have
// next_attempt_at 0, so that probe is a point seek, and the prepared one scans only the steps
// in flight, never a whole campaign.
constexpr const char* kFinishSql =
    "UPDATE rollover_campaigns SET state = 'done', changed_at = ?2 WHERE id = ?1 AND state = "
    "'running' AND NOT EXISTS (SELECT 1 FROM rollover_steps INDEXED BY rollover_steps_by_state "
    "WHERE state = 'queued' AND next_attempt_at = 0 AND campaign = ?1) AND NOT EXISTS (SELECT 1 "
    "FROM rollover_steps INDEXED BY rollover_steps_by_state WHERE state = 'prepared' AND "
    "campaign = ?1)";

Status finish_if_done(db::Stmt& st, std::int64_t campaign, std::int64_t now) {
  st.bind(1, campaign).bind(2, now);
  return st.run();
}

// Resets a cached statement however the scope is left (a SELECT left unreset would hold its
// read transaction open).
struct ResetOnExit {
  db::Stmt* st;
  ~ResetOnExit() { st->reset(); }
};

// The live step (queued, prepared or failed; at most one per meter) of a meter.
struct LiveStep {
  std::int64_t campaign = 0;
  StepState state = StepState::queued;
};

Result<std::optional<LiveStep>> live_step_of(db::Stmt& st, std::int64_t meter_row) {
  ResetOnExit guard{&st};
  st.bind(1, meter_row);
  GS_ASSIGN(db::Step s, st.step());
  std::optional<LiveStep> out;
  if (s == db::Step::row) {
    out = LiveStep{st.int64(0), step_state_from(st.text(1)).value_or(StepState::failed)};
  }
  return out;
}

constexpr const char* kLiveStepSql =
    "SELECT campaign, state FROM rollover_steps WHERE meter = ?1 AND "
    "state IN ('queued','prepared','failed')";

// Why a meter cannot join an operator's campaign, or "" when it can.
std::string why_not_eligible(const Meter& m, const std::optional<LiveStep>& live) {
  if (m.state == MeterState::compromised) return "revoked (meter compromised)";
  if (live) {
    return "already in campaign " + std::to_string(live->campaign) + " (step " +
           to_string(live->state) + ")";
  }
  if (m.state == MeterState::quarantined) return "quarantined (key revoked)";
  if (m.public_key.size() != kPublicKeySize) return "no registered public key";
  if (m.active_slot() == nullptr) return "no active key";
  if (!choose_rollover_slot(m, CampaignReason::operator_request)) return "no usable key slot";
  return {};
}

StepWork read_step(const db::Stmt& st) {
  // Columns: campaign, meter, state, reason, attempts, target_slot, key_version,
  // ephemeral_point, seal_slot, changed_at.
  StepWork w;
  w.campaign = st.int64(0);
  w.meter_row = st.int64(1);
  w.state = step_state_from(st.text(2)).value_or(StepState::failed);
  w.reason = campaign_reason_from(st.text(3)).value_or(CampaignReason::operator_request);
  w.attempts = static_cast<std::uint32_t>(std::clamp<std::int64_t>(st.int64(4), 0, UINT32_MAX));
  if (!st.is_null(5)) w.target_slot = static_cast<std::uint8_t>(st.int64(5));
  if (!st.is_null(6)) w.key_version = static_cast<std::uint32_t>(st.int64(6));
  w.ephemeral_point = st.blob(7);
  if (!st.is_null(8)) w.seal_slot = static_cast<std::uint8_t>(st.int64(8));
  w.changed_at = st.int64(9);
  return w;
}

}  // namespace

const char* to_string(CampaignState s) noexcept {
  switch (s) {
    case CampaignState::running: return "running";
    case CampaignState::aborted: return "aborted";
    case CampaignState::done: return "done";
  }
  return "?";
}

const char* to_string(StepState s) noexcept {
  switch (s) {
    case StepState::queued: return "queued";
    case StepState::prepared: return "prepared";
    case StepState::confirmed: return "confirmed";
    case StepState::failed: return "failed";
    case StepState::aborted: return "aborted";
  }
  return "?";
}

const char* to_string(CampaignReason r) noexcept {
  switch (r) {
    case CampaignReason::operator_request: return "operator";
    case CampaignReason::revocation: return "revocation";
  }
  return "?";
}

std::optional<CampaignState> campaign_state_from(std::string_view s) noexcept {
  for (auto v : {CampaignState::running, CampaignState::aborted, CampaignState::done}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

std::optional<StepState> step_state_from(std::string_view s) noexcept {
  for (auto v : {StepState::queued, StepState::prepared, StepState::confirmed, StepState::failed,
                 StepState::aborted}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

std::optional<CampaignReason> campaign_reason_from(std::string_view s) noexcept {
  for (auto v : {CampaignReason::operator_request, CampaignReason::revocation}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

std::optional<SlotChoice> choose_rollover_slot(const Meter& m, CampaignReason reason) {
  const KeySlot* seal = nullptr;
  std::uint32_t max_version = 0;
  int active = 0;
  for (const KeySlot& s : m.slots) {
    if (s.slot < 0 || s.slot >= kSlotsPerMeter) return std::nullopt;  // not a valid key id
    max_version = std::max(max_version, s.key_version);
    if (s.state == KeyState::active) {
      ++active;
      if (reason == CampaignReason::operator_request) seal = &s;
    } else if (reason == CampaignReason::revocation && s.state == KeyState::compromised &&
               (seal == nullptr || s.key_version > seal->key_version)) {
      // The compromised key that was active: every key older than it has a lower version,
      // and pending keys of an unfinished rollover are destroyed, not kept, by revoke_key.
      seal = &s;
    }
  }
  // An operator's rollover seals under the one active key; a revocation only while the meter
  // has no active key (once a new key is confirmed, the compromised one is never used again).
  if (reason == CampaignReason::operator_request ? active != 1 : active != 0) return std::nullopt;
  if (seal == nullptr || seal->wrapped.empty()) return std::nullopt;
  if (max_version == std::numeric_limits<std::uint32_t>::max()) return std::nullopt;

  // Rank the candidates: 0 empty, destroyed or deactivated; 1 standby (oldest first);
  // 2 compromised (oldest first). Active, pending and the seal slot are never replaced.
  int best = -1;
  int best_rank = 3;
  std::int64_t best_changed = 0;
  std::uint32_t best_version = 0;
  for (int slot = 0; slot < kSlotsPerMeter; ++slot) {
    const KeySlot* s = m.slot_for_key_id(static_cast<std::uint8_t>(slot));
    int rank = 0;
    std::int64_t changed = 0;
    std::uint32_t version = 0;
    if (s != nullptr) {
      if (s == seal || live_key(s->state)) continue;
      switch (s->state) {
        case KeyState::destroyed:
        case KeyState::deactivated: rank = 0; break;
        case KeyState::standby: rank = 1; break;
        default: rank = 2; break;  // compromised
      }
      changed = s->changed_at;
      version = s->key_version;
    }
    const bool better =
        best < 0 || rank < best_rank ||
        (rank == best_rank && rank > 0 &&
         (changed < best_changed || (changed == best_changed && version < best_version)));
    if (better) {
      best = slot;
      best_rank = rank;
      best_changed = changed;
      best_version = version;
    }
  }
  if (best < 0) return std::nullopt;
  return SlotChoice{static_cast<std::uint8_t>(best), max_version + 1,
                    static_cast<std::uint8_t>(seal->slot)};
}

// ---- operator verbs -------------------------------------------------------------------------

Result<StartOutcome> RolloverStore::start(const CampaignSpec& spec,
                                          std::span<const std::string> meter_ids, bool all) {
  if (!std::isfinite(spec.rate) || spec.rate < 0 || spec.rate > kMaxCampaignRate) {
    return {Errc::invalid_argument, "rate must be 0..1000000 meters per second"};
  }
  if (all != meter_ids.empty()) {
    return {Errc::invalid_argument,
            all ? "name meters or all of them, not both" : "no meters named"};
  }
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  GS_ASSIGN(auto ins_campaign,
            db.prepare("INSERT INTO rollover_campaigns (state, reason, rate, created_by, "
                       "created_at, changed_at, total) VALUES ('running', ?1, ?2 / 1000000.0, "
                       "?3, ?4, ?4, 0)"));
  ins_campaign.bind(1, to_string(spec.reason))
      .bind(2, rate_to_micro(spec.rate))
      .bind(3, clip(spec.created_by, kMaxCreatedByLength))
      .bind(4, now);
  GS_TRY(ins_campaign.run());
  StartOutcome out;
  out.campaign = db.last_insert_rowid();

  GS_ASSIGN(auto ins_step, db.prepare("INSERT INTO rollover_steps (campaign, meter, state, "
                                      "changed_at) VALUES (?1, ?2, 'queued', ?3)"));
  auto add = [&](std::int64_t row) -> Status {
    ins_step.bind(1, out.campaign).bind(2, row).bind(3, now);
    GS_TRY(ins_step.run());
    ++out.added;
    return {};
  };
  auto skip = [&](const std::string& id, std::string why) {
    if (out.skipped.size() < kMaxSkippedListed) out.skipped.emplace_back(id, std::move(why));
    ++out.skipped_total;
  };

  if (!all) {
    GS_ASSIGN(db::Stmt* live_st, stmt(kLiveStepSql));
    std::unordered_set<std::string_view> seen;
    seen.reserve(meter_ids.size());
    for (const std::string& id : meter_ids) {
      if (!seen.insert(id).second) continue;  // named twice: once is enough
      std::optional<Meter> m;
      if (!id.empty() && id.size() <= kMaxMeterIdLength) {
        GS_ASSIGN(m, ks_.meter_by_id(id));
      }
      if (!m) return {Errc::not_found, "no meter " + clip(id, kMaxMeterIdLength + 1)};
      GS_ASSIGN(auto live, live_step_of(*live_st, m->row));
      std::string why = why_not_eligible(*m, live);
      if (!why.empty()) {
        skip(id, std::move(why));
        continue;
      }
      GS_TRY(add(m->row));
    }
  } else {
    // Every meter in state active, read in one pass over meters and their slots; the live
    // steps are loaded first (rollover_steps is written during the pass).
    std::unordered_map<std::int64_t, LiveStep> live;
    GS_ASSIGN(auto ls, db.prepare("SELECT meter, campaign, state FROM rollover_steps WHERE "
                                  "state IN ('queued','prepared','failed')"));
    while (true) {
      GS_ASSIGN(db::Step s, ls.step());
      if (s == db::Step::done) break;
      live.emplace(ls.int64(0),
                   LiveStep{ls.int64(1), step_state_from(ls.text(2)).value_or(StepState::failed)});
    }
    GS_ASSIGN(auto scan,
              db.prepare("SELECT m.row, m.meter_id, m.public_key, s.slot, s.wrapped, "
                         "s.key_version, s.state, s.changed_at FROM meters m LEFT JOIN key_slots "
                         "s ON s.meter = m.row WHERE m.state = 'active' ORDER BY m.row, s.slot"));
    std::optional<Meter> cur;
    auto flush = [&]() -> Status {
      if (!cur) return {};
      auto it = live.find(cur->row);
      std::string why = why_not_eligible(
          *cur, it == live.end() ? std::nullopt : std::optional<LiveStep>(it->second));
      if (why.empty()) return add(cur->row);
      skip(cur->meter_id, std::move(why));
      return {};
    };
    while (true) {
      GS_ASSIGN(db::Step s, scan.step());
      if (s == db::Step::done) break;
      const std::int64_t row = scan.int64(0);
      if (!cur || cur->row != row) {
        GS_TRY(flush());
        cur.emplace();
        cur->row = row;
        cur->meter_id = scan.text(1);
        cur->public_key = scan.blob(2);
        cur->state = MeterState::active;
      }
      if (scan.is_null(3)) continue;
      KeySlot k;
      k.slot = static_cast<int>(scan.int64(3));
      k.wrapped = scan.blob(4);
      k.key_version = static_cast<std::uint32_t>(scan.int64(5));
      k.state = key_state_from(scan.text(6)).value_or(KeyState::compromised);
      k.changed_at = scan.int64(7);
      cur->slots.push_back(std::move(k));
    }
    GS_TRY(flush());
  }

  if (out.added == 0) {
    std::string d = all ? "no active meter can join a rollover" : "none of the meters can join";
    for (std::size_t i = 0; i < out.skipped.size() && i < 3; ++i) {
      d += i == 0 ? ": " : "; ";
      d += out.skipped[i].first + " " + out.skipped[i].second;
    }
    if (out.skipped_total > 3) d += "; ...";
    return {Errc::invalid_argument, std::move(d)};  // the transaction rolls back
  }
  GS_ASSIGN(auto total, db.prepare("UPDATE rollover_campaigns SET total = ?2 WHERE id = ?1"));
  total.bind(1, out.campaign).bind(2, out.added);
  GS_TRY(total.run());
  GS_TRY(tx.commit());
  return out;
}

Result<std::optional<Campaign>> RolloverStore::campaign(std::int64_t id) {
  GS_ASSIGN(auto st, ks_.db().prepare(std::string(kCampaignColumns) + "WHERE id = ?1"));
  st.bind(1, id);
  GS_ASSIGN(db::Step s, st.step());
  if (s == db::Step::done) return std::optional<Campaign>();
  return std::optional<Campaign>(read_campaign(st));
}

Result<std::vector<Campaign>> RolloverStore::campaigns(std::size_t limit) {
  GS_ASSIGN(auto st, ks_.db().prepare(std::string(kCampaignColumns) + "ORDER BY id DESC LIMIT ?1"));
  st.bind(1, static_cast<std::int64_t>(std::min<std::size_t>(limit, INT64_MAX)));
  std::vector<Campaign> out;
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    out.push_back(read_campaign(st));
  }
  return out;
}

Result<CampaignProgress> RolloverStore::progress(std::int64_t id) {
  // The campaign row and its step counts from one snapshot: read apart, a step confirmed in
  // between showed a finished campaign still running.
  db::ReadTransaction snapshot(ks_.db());
  GS_TRY(snapshot.begin());
  GS_ASSIGN(auto c, campaign(id));
  if (!c) return {Errc::not_found, "no rollover campaign " + std::to_string(id)};
  CampaignProgress p;
  p.campaign = std::move(*c);
  GS_ASSIGN(auto st, ks_.db().prepare("SELECT state, count(*), sum(attempts > 0), "
                                      "min(confirmed_at), max(confirmed_at) FROM rollover_steps "
                                      "WHERE campaign = ?1 GROUP BY state"));
  st.bind(1, id);
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    const auto state = step_state_from(st.text(0));
    const std::int64_t n = st.int64(1);
    if (!state) continue;
    switch (*state) {
      case StepState::queued: p.queued = n; break;
      case StepState::prepared:
        p.prepared = n;
        p.sent = st.int64(2);
        break;
      case StepState::confirmed:
        p.confirmed = n;
        p.first_confirm_at = st.is_null(3) ? 0 : st.int64(3);
        p.last_confirm_at = st.is_null(4) ? 0 : st.int64(4);
        break;
      case StepState::failed: p.failed = n; break;
      case StepState::aborted: p.aborted = n; break;
    }
  }
  return p;
}

Result<std::vector<std::pair<std::string, std::string>>> RolloverStore::steps_in_state(
    std::int64_t id, StepState s, std::size_t limit) {
  GS_ASSIGN(auto st, ks_.db().prepare("SELECT m.meter_id, s.last_error FROM rollover_steps s "
                                      "JOIN meters m ON m.row = s.meter WHERE s.campaign = ?1 "
                                      "AND s.state = ?2 ORDER BY s.meter LIMIT ?3"));
  st.bind(1, id)
      .bind(2, to_string(s))
      .bind(3, static_cast<std::int64_t>(std::min<std::size_t>(limit, INT64_MAX)));
  std::vector<std::pair<std::string, std::string>> out;
  while (true) {
    GS_ASSIGN(db::Step r, st.step());
    if (r == db::Step::done) break;
    out.emplace_back(st.text(0), st.text(1));
  }
  return out;
}

Result<std::int64_t> RolloverStore::resume(std::int64_t id) {
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  GS_ASSIGN(auto c, campaign(id));
  if (!c) return {Errc::not_found, "no rollover campaign " + std::to_string(id)};
  std::int64_t changed = 0;
  // Failed steps that never had a key (their meter failed its challenge) are queued again: the
  // engine challenges the meter anew before any key update.
  GS_ASSIGN(auto unkeyed,
            db.prepare("UPDATE rollover_steps SET state = 'queued', attempts = 0, "
                       "next_attempt_at = 0, last_error = '', changed_at = ?2 WHERE "
                       "campaign = ?1 AND state = 'failed' AND target_slot IS NULL AND meter IN "
                       "(SELECT row FROM meters WHERE state = ?3)"));
  unkeyed.bind(1, id).bind(2, now).bind(3, meter_state_needed(c->reason));
  GS_TRY(unkeyed.run());
  changed += db.changes();
  // Failed steps go back to prepared when the meter still holds their pending key (the same
  // payload is re-sent); if that key is gone (nothing should remove it while the step is
  // live), the step can never finish and is aborted instead.
  GS_ASSIGN(auto back,
            db.prepare("UPDATE rollover_steps SET state = 'prepared', attempts = 0, "
                       "next_attempt_at = 0, last_error = '', changed_at = ?2 WHERE "
                       "campaign = ?1 AND state = 'failed' AND EXISTS (SELECT 1 FROM key_slots "
                       "k WHERE k.meter = rollover_steps.meter AND k.slot = "
                       "rollover_steps.target_slot AND k.key_version = "
                       "rollover_steps.key_version AND k.state = 'pending') AND meter IN "
                       "(SELECT row FROM meters WHERE state = ?3)"));
  back.bind(1, id).bind(2, now).bind(3, meter_state_needed(c->reason));
  GS_TRY(back.run());
  changed += db.changes();
  GS_ASSIGN(auto lost, db.prepare("UPDATE rollover_steps SET state = 'aborted', last_error = "
                                  "'pending key no longer held', changed_at = ?2 WHERE "
                                  "campaign = ?1 AND state = 'failed'"));
  lost.bind(1, id).bind(2, now);
  GS_TRY(lost.run());
  changed += db.changes();
  // Aborted steps that were never prepared are queued again when their meter can still join
  // (not revoked, not in another live step).
  std::string requeue_sql =
      "UPDATE rollover_steps SET state = 'queued', next_attempt_at = 0, last_error = '', "
      "changed_at = ?2 WHERE campaign = ?1 AND state = 'aborted' AND target_slot IS NULL AND "
      "NOT EXISTS (SELECT 1 FROM rollover_steps o WHERE o.meter = rollover_steps.meter AND "
      "o.state IN ('queued','prepared','failed')) AND meter IN (SELECT row FROM meters WHERE "
      "state = ?3";
  requeue_sql += c->reason == CampaignReason::operator_request
                     ? " AND length(public_key) = 65 AND EXISTS (SELECT 1 FROM key_slots k "
                       "WHERE k.meter = meters.row AND k.state = 'active'))"
                     : ")";
  GS_ASSIGN(auto requeue, db.prepare(requeue_sql));
  requeue.bind(1, id).bind(2, now).bind(3, meter_state_needed(c->reason));
  GS_TRY(requeue.run());
  changed += db.changes();
  GS_ASSIGN(auto run, db.prepare("UPDATE rollover_campaigns SET state = 'running', changed_at = "
                                 "?2 WHERE id = ?1 AND state <> 'running'"));
  run.bind(1, id).bind(2, now);
  GS_TRY(run.run());
  GS_ASSIGN(db::Stmt* finish_st, stmt(kFinishSql));
  GS_TRY(finish_if_done(*finish_st, id, now));
  GS_TRY(tx.commit());
  return changed;
}

Result<std::int64_t> RolloverStore::abort(std::int64_t id) {
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  GS_ASSIGN(auto c, campaign(id));
  if (!c) return {Errc::not_found, "no rollover campaign " + std::to_string(id)};
  std::int64_t changed = 0;
  GS_ASSIGN(auto q, db.prepare("UPDATE rollover_steps SET state = 'aborted', last_error = "
                               "'aborted by operator', changed_at = ?2 WHERE campaign = ?1 AND "
                               "state = 'queued'"));
  q.bind(1, id).bind(2, now);
  GS_TRY(q.run());
  changed += db.changes();
  // Failed steps keep the error that failed them.
  GS_ASSIGN(auto f, db.prepare("UPDATE rollover_steps SET state = 'aborted', changed_at = ?2 "
                               "WHERE campaign = ?1 AND state = 'failed'"));
  f.bind(1, id).bind(2, now);
  GS_TRY(f.run());
  changed += db.changes();
  // A running campaign is aborted; a done one only when this took failed steps out of it.
  if (c->state == CampaignState::running || (c->state == CampaignState::done && changed > 0)) {
    GS_ASSIGN(auto up, db.prepare("UPDATE rollover_campaigns SET state = 'aborted', "
                                  "changed_at = ?2 WHERE id = ?1"));
    up.bind(1, id).bind(2, now);
    GS_TRY(up.run());
  }
  GS_TRY(tx.commit());
  return changed;
}

// ---- the engine -----------------------------------------------------------------------------

namespace {

// rollover_steps_by_state holds (state, next_attempt_at, campaign, meter): queued steps
// (next_attempt_at 0) come out oldest campaign first, prepared ones by due time, without a sort.
// A queued step whose meter is being challenged (MT-2043, before its first key update) waits
// for the challenge to end.
constexpr const char* kNextQueuedSql =
    "SELECT s.campaign, s.meter, s.state, c.reason, s.attempts, s.target_slot, s.key_version, "
    "s.ephemeral_point, s.seal_slot, s.changed_at FROM rollover_steps s JOIN "
    "rollover_campaigns c ON c.id = s.campaign WHERE s.state = 'queued' AND c.state = "
    "'running' AND NOT EXISTS (SELECT 1 FROM meter_challenges ch WHERE ch.meter = s.meter AND "
    "ch.state IN ('queued','sent')) ORDER BY s.next_attempt_at, s.campaign, s.meter LIMIT ?1";
constexpr const char* kDuePreparedSql =
    "SELECT s.campaign, s.meter, s.state, c.reason, s.attempts, s.target_slot, s.key_version, "
    "s.ephemeral_point, s.seal_slot, s.changed_at FROM rollover_steps s JOIN rollover_campaigns c ON "
    "c.id = s.campaign WHERE s.state = 'prepared' AND s.next_attempt_at <= ?1 ORDER BY "
    "s.next_attempt_at, s.campaign, s.meter LIMIT ?2";
constexpr const char* kStepStateSql =
    "SELECT s.state, c.reason FROM rollover_steps s JOIN rollover_campaigns c ON c.id = "
    "s.campaign WHERE s.campaign = ?1 AND s.meter = ?2";
constexpr const char* kPendingSlotSql =
    "INSERT OR REPLACE INTO key_slots (meter, slot, wrapped, key_version, state, origin, "
    "created_at, changed_at, kek) VALUES (?1, ?2, ?3, ?4, 'pending', 'rollover', ?5, ?5, ?6)";
constexpr const char* kStepPreparedSql =
    "UPDATE rollover_steps SET state = 'prepared', target_slot = ?3, key_version = ?4, "
    "ephemeral_point = ?5, seal_slot = ?6, attempts = 0, next_attempt_at = 0, last_error = '', "
    "changed_at = ?7 WHERE campaign = ?1 AND meter = ?2 AND state = 'queued'";
constexpr const char* kDropQueuedSql =
    "UPDATE rollover_steps SET state = 'aborted', last_error = ?3, changed_at = ?4 WHERE "
    "campaign = ?1 AND meter = ?2 AND state = 'queued'";
constexpr const char* kAttemptSql =
    "UPDATE rollover_steps SET attempts = attempts + 1, next_attempt_at = ?3, last_error = ?4, "
    "changed_at = ?5 WHERE campaign = ?1 AND meter = ?2 AND state = 'prepared'";
constexpr const char* kFailSql =
    "UPDATE rollover_steps SET state = 'failed', next_attempt_at = ?3, last_error = ?4, "
    "changed_at = ?5 WHERE campaign = ?1 AND meter = ?2 AND state = 'prepared'";
// A queued step whose meter failed its challenge: failed without a key (resume queues it again).
// ?3 (next_attempt_at in kFailSql) is unused: both take the same bindings.
constexpr const char* kFailQueuedSql =
    "UPDATE rollover_steps SET state = 'failed', last_error = ?4, changed_at = ?5 WHERE "
    "campaign = ?1 AND meter = ?2 AND state = 'queued' AND ?3 = ?3";
// DESIGN §3.4: a meter is rekeyed only once it proved it holds its registered private key
// (a recorded MT-2043 proof) and its latest challenge did not fail.
constexpr const char* kProvenSql =
    "SELECT 1 WHERE EXISTS (SELECT 1 FROM challenge_proofs WHERE meter = ?1) AND NOT EXISTS "
    "(SELECT 1 FROM meter_challenges WHERE meter = ?1 AND state = 'failed')";
constexpr const char* kIsPendingSql =
    "SELECT 1 FROM key_slots WHERE meter = ?1 AND slot = ?2 AND key_version = ?3 AND state = "
    "'pending'";
// Active and pending slots other than the confirmed one step down to standby (existing standby
// keys keep their changed_at, which retire_standby ages them by).
constexpr const char* kStepDownSql =
    "UPDATE key_slots SET state = 'standby', changed_at = ?3 WHERE meter = ?1 AND slot <> ?2 AND "
    "state IN ('active','pending')";
constexpr const char* kActivateSql =
    "UPDATE key_slots SET state = 'active', changed_at = ?3 WHERE meter = ?1 AND slot = ?2";
constexpr const char* kUnquarantineSql =
    "UPDATE meters SET state = 'active', state_reason = '' WHERE row = ?1 AND state = "
    "'quarantined'";
// The live step that sent this key (a failed one too: the meter answered after all).
constexpr const char* kSentStepSql =
    "SELECT campaign FROM rollover_steps WHERE meter = ?1 AND state IN ('prepared','failed') AND "
    "target_slot = ?2 AND key_version = ?3";
constexpr const char* kConfirmStepSql =
    "UPDATE rollover_steps SET state = 'confirmed', confirmed_at = ?3, last_error = '', "
    "changed_at = ?3 WHERE campaign = ?1 AND meter = ?2";

std::int64_t as_limit(std::size_t limit) {
  return static_cast<std::int64_t>(std::min<std::size_t>(limit, INT64_MAX));
}

Result<std::vector<StepWork>> read_steps(db::Stmt& st) {
  ResetOnExit guard{&st};
  std::vector<StepWork> out;
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    out.push_back(read_step(st));
  }
  return out;
}

}  // namespace

Result<db::Stmt*> RolloverStore::stmt(const char* sql) {
  if (auto it = stmts_.find(sql); it != stmts_.end()) return it->second.get();
  GS_ASSIGN(auto st, ks_.db().prepare(sql));
  auto p = std::make_shared<db::Stmt>(std::move(st));
  stmts_.emplace(sql, p);
  return p.get();
}

Result<std::vector<StepWork>> RolloverStore::next_queued(std::size_t limit) {
  GS_ASSIGN(db::Stmt* st, stmt(kNextQueuedSql));
  st->bind(1, as_limit(limit));
  return read_steps(*st);
}

Result<std::vector<StepWork>> RolloverStore::due_prepared(std::int64_t now_ms, std::size_t limit) {
  GS_ASSIGN(db::Stmt* st, stmt(kDuePreparedSql));
  st->bind(1, now_ms).bind(2, as_limit(limit));
  return read_steps(*st);
}

Result<std::vector<bool>> RolloverStore::prepare(std::span<const PreparedKey> keys) {
  for (const PreparedKey& k : keys) {
    if (k.ephemeral_point.size() != kPublicKeySize || k.ephemeral_point[0] != 0x04) {
      return {Errc::invalid_argument, "ephemeral point must be 65 bytes, uncompressed"};
    }
    if (k.wrapped.empty() || k.wrapped.size() > 64) {
      return {Errc::invalid_argument, "wrapped key must be 1..64 bytes"};
    }
    if (k.target_slot >= kSlotsPerMeter || k.seal_slot >= kSlotsPerMeter) {
      return {Errc::invalid_argument, "key slot must be 0..3"};
    }
  }
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(db::Stmt* step_st, stmt(kStepStateSql));
  GS_ASSIGN(db::Stmt* slot_st, stmt(kPendingSlotSql));
  GS_ASSIGN(db::Stmt* up_st, stmt(kStepPreparedSql));
  GS_ASSIGN(db::Stmt* drop_st, stmt(kDropQueuedSql));
  GS_ASSIGN(db::Stmt* finish_st, stmt(kFinishSql));
  GS_ASSIGN(db::Stmt* proven_st, stmt(kProvenSql));
  if (audit_ != nullptr) GS_TRY(audit_->start());
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  std::vector<bool> out(keys.size(), false);
  std::unordered_set<std::int64_t> dropped_campaigns;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const PreparedKey& k = keys[i];
    std::optional<StepState> state;
    std::optional<CampaignReason> reason;
    {
      ResetOnExit guard{step_st};
      step_st->bind(1, k.campaign).bind(2, k.meter_row);
      GS_ASSIGN(db::Step s, step_st->step());
      if (s == db::Step::row) {
        state = step_state_from(step_st->text(0));
        reason = campaign_reason_from(step_st->text(1));
      }
    }
    if (state != StepState::queued || !reason) continue;
    GS_ASSIGN(auto m, ks_.meter_by_row(k.meter_row));
    if (!m) continue;
    if (m->state == MeterState::compromised) {
      // Revoked for good since it was queued: it will never be prepared.
      drop_st->bind(1, k.campaign).bind(2, k.meter_row).bind(3, "meter revoked").bind(4, now);
      GS_TRY(drop_st->run());
      dropped_campaigns.insert(k.campaign);
      if (audit_ != nullptr && db.changes() > 0) {
        audit::Detail d;
        d.add("campaign", k.campaign).add("reason", "meter revoked");
        GS_TRY(audit_->add(key_event("rollover_dropped", m->meter_id, d)));
      }
      continue;
    }
    if (std::string_view(to_string(m->state)) != meter_state_needed(*reason)) continue;
    {
      ResetOnExit guard{proven_st};
      proven_st->bind(1, k.meter_row);
      GS_ASSIGN(db::Step s, proven_st->step());
      if (s != db::Step::row) continue;  // not proven (or flagged): no key update
    }
    const auto choice = choose_rollover_slot(*m, *reason);
    if (!choice || choice->target_slot != k.target_slot || choice->key_version != k.key_version ||
        choice->seal_slot != k.seal_slot) {
      continue;
    }
    slot_st->bind(1, k.meter_row)
        .bind(2, std::int64_t{k.target_slot})
        .bind(3, ByteView(k.wrapped))
        .bind(4, std::int64_t{k.key_version})
        .bind(5, now)
        .bind(6, std::int64_t{k.kek});
    GS_TRY(slot_st->run());
    up_st->bind(1, k.campaign)
        .bind(2, k.meter_row)
        .bind(3, std::int64_t{k.target_slot})
        .bind(4, std::int64_t{k.key_version})
        .bind(5, ByteView(k.ephemeral_point))
        .bind(6, std::int64_t{k.seal_slot})
        .bind(7, now);
    GS_TRY(up_st->run());
    if (db.changes() != 1) return {Errc::storage_failure, "rollover step changed under prepare"};
    if (audit_ != nullptr) {
      // The slot, its version and the campaign; the wrapped key and the ephemeral point are
      // not audit material.
      audit::Detail d;
      d.add("campaign", k.campaign)
          .add("reason", to_string(*reason))
          .add("slot", unsigned{k.target_slot})
          .add("key_version", std::uint64_t{k.key_version})
          .add("seal_slot", unsigned{k.seal_slot})
          .add("state", "pending");
      GS_TRY(audit_->add(key_event("key_pending", m->meter_id, d)));
    }
    out[i] = true;
  }
  for (std::int64_t c : dropped_campaigns) GS_TRY(finish_if_done(*finish_st, c, now));
  if (audit_ != nullptr) GS_TRY(audit_->finish());
  GS_TRY(tx.commit());
  if (audit_ != nullptr) audit_->committed();
  return out;
}

Status RolloverStore::record_attempts(std::span<const Attempt> attempts) {
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(db::Stmt* st, stmt(kAttemptSql));
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  for (const Attempt& a : attempts) {
    st->bind(1, a.campaign)
        .bind(2, a.meter_row)
        .bind(3, a.next_attempt_at_ms)
        .bind(4, clip(a.last_error, kMaxStepErrorLength))
        .bind(5, now);
    GS_TRY(st->run());
  }
  return tx.commit();
}

Status RolloverStore::fail(std::span<const Attempt> steps) {
  return fail_in(steps, kFailSql, "prepared");
}

Status RolloverStore::fail_queued(std::span<const Attempt> steps) {
  return fail_in(steps, kFailQueuedSql, "queued");
}

Result<std::string> RolloverStore::meter_id_of(std::int64_t meter_row) {
  GS_ASSIGN(db::Stmt* st, stmt("SELECT meter_id FROM meters WHERE row = ?1"));
  ResetOnExit guard{st};
  st->bind(1, meter_row);
  GS_ASSIGN(db::Step s, st->step());
  return s == db::Step::row ? st->text(0) : std::string("-");
}

Status RolloverStore::fail_in(std::span<const Attempt> steps, const char* sql, const char* from) {
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(db::Stmt* st, stmt(sql));
  GS_ASSIGN(db::Stmt* finish_st, stmt(kFinishSql));
  if (audit_ != nullptr) GS_TRY(audit_->start());
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  std::unordered_set<std::int64_t> campaigns;
  for (const Attempt& a : steps) {
    const std::string why = clip(a.last_error, kMaxStepErrorLength);
    st->bind(1, a.campaign).bind(2, a.meter_row).bind(3, a.next_attempt_at_ms).bind(4, why).bind(
        5, now);
    GS_TRY(st->run());
    if (db.changes() == 0) continue;
    campaigns.insert(a.campaign);
    if (audit_ != nullptr) {
      GS_ASSIGN(std::string id, meter_id_of(a.meter_row));
      audit::Detail d;
      d.add("campaign", a.campaign).add("from", from).add("reason", why);
      GS_TRY(audit_->add(key_event("rollover_failed", id, d)));
    }
  }
  for (std::int64_t c : campaigns) GS_TRY(finish_if_done(*finish_st, c, now));
  if (audit_ != nullptr) GS_TRY(audit_->finish());
  GS_TRY(tx.commit());
  if (audit_ != nullptr) audit_->committed();
  return {};
}

Status RolloverStore::drop_queued(std::span<const Attempt> steps) {
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(db::Stmt* st, stmt(kDropQueuedSql));
  GS_ASSIGN(db::Stmt* finish_st, stmt(kFinishSql));
  if (audit_ != nullptr) GS_TRY(audit_->start());
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  std::unordered_set<std::int64_t> campaigns;
  for (const Attempt& a : steps) {
    const std::string why = clip(a.last_error, kMaxStepErrorLength);
    st->bind(1, a.campaign).bind(2, a.meter_row).bind(3, why).bind(4, now);
    GS_TRY(st->run());
    if (db.changes() == 0) continue;
    campaigns.insert(a.campaign);
    if (audit_ != nullptr) {
      GS_ASSIGN(std::string id, meter_id_of(a.meter_row));
      audit::Detail d;
      d.add("campaign", a.campaign).add("reason", why);
      GS_TRY(audit_->add(key_event("rollover_dropped", id, d)));
    }
  }
  for (std::int64_t c : campaigns) GS_TRY(finish_if_done(*finish_st, c, now));
  if (audit_ != nullptr) GS_TRY(audit_->finish());
  GS_TRY(tx.commit());
  if (audit_ != nullptr) audit_->committed();
  return {};
}

Result<bool> RolloverStore::confirm(std::int64_t meter_row, std::uint8_t slot,
                                    std::uint32_t key_version, bool in_transaction) {
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(db::Stmt* chk, stmt(kIsPendingSql));
  GS_ASSIGN(db::Stmt* down, stmt(kStepDownSql));
  GS_ASSIGN(db::Stmt* up, stmt(kActivateSql));
  GS_ASSIGN(db::Stmt* meter, stmt(kUnquarantineSql));
  GS_ASSIGN(db::Stmt* live, stmt(kSentStepSql));
  GS_ASSIGN(db::Stmt* done, stmt(kConfirmStepSql));
  GS_ASSIGN(db::Stmt* finish_st, stmt(kFinishSql));
  std::optional<db::Transaction> tx;
  if (!in_transaction) {
    if (audit_ != nullptr) GS_TRY(audit_->start());
    GS_ASSIGN(auto t, db::Transaction::begin(db));
    tx.emplace(std::move(t));
  }
  {
    ResetOnExit guard{chk};
    chk->bind(1, meter_row).bind(2, std::int64_t{slot}).bind(3, std::int64_t{key_version});
    GS_ASSIGN(db::Step s, chk->step());
    if (s != db::Step::row) return false;  // already confirmed, or not this key: no change
  }
  down->bind(1, meter_row).bind(2, std::int64_t{slot}).bind(3, now);
  GS_TRY(down->run());
  up->bind(1, meter_row).bind(2, std::int64_t{slot}).bind(3, now);
  GS_TRY(up->run());
  meter->bind(1, meter_row);
  GS_TRY(meter->run());
  std::optional<std::int64_t> campaign;
  {
    ResetOnExit guard{live};
    live->bind(1, meter_row).bind(2, std::int64_t{slot}).bind(3, std::int64_t{key_version});
    GS_ASSIGN(db::Step ls, live->step());
    if (ls == db::Step::row) campaign = live->int64(0);
  }
  if (campaign) {
    done->bind(1, *campaign).bind(2, meter_row).bind(3, now);
    GS_TRY(done->run());
    GS_TRY(finish_if_done(*finish_st, *campaign, now));
  }
  if (audit_ != nullptr) {
    GS_ASSIGN(std::string id, meter_id_of(meter_row));
    audit::Detail d;
    d.add("slot", unsigned{slot}).add("key_version", std::uint64_t{key_version});
    d.add("state", "active").add("others", "standby");
    if (campaign) d.add("campaign", *campaign);
    GS_TRY(audit_->add(key_event("key_confirmed", id, d)));
    if (tx) GS_TRY(audit_->finish());
  }
  if (tx) {
    GS_TRY(tx->commit());
    if (audit_ != nullptr) audit_->committed();
  }
  return true;
}

Result<std::int64_t> RolloverStore::retire_standby(std::int64_t older_than) {
  // KeyStore::open sets secure_delete=FAST: the freed wrapped keys are overwritten with zeros
  // in their pages, not left in free space.
  db::Db& db = ks_.db();
  if (audit_ != nullptr) GS_TRY(audit_->start());
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  if (audit_ != nullptr) {
    // The records first, of exactly the slots the UPDATE below destroys (same transaction).
    GS_ASSIGN(auto sel, db.prepare("SELECT m.meter_id, s.slot, s.key_version FROM key_slots s "
                                   "JOIN meters m ON m.row = s.meter WHERE s.state = 'standby' "
                                   "AND s.changed_at < ?1 ORDER BY s.meter, s.slot"));
    sel.bind(1, older_than);
    while (true) {
      GS_ASSIGN(db::Step s, sel.step());
      if (s == db::Step::done) break;
      audit::Detail d;
      d.add("slot", sel.int64(1)).add("key_version", sel.int64(2));
      d.add("state", "destroyed").add("from", "standby");
      GS_TRY(audit_->add(key_event("key_retired", sel.text(0), d)));
    }
  }
  GS_ASSIGN(auto st, db.prepare("UPDATE key_slots SET state = 'destroyed', wrapped = NULL, "
                                "changed_at = ?2 WHERE state = 'standby' AND changed_at < ?1"));
  st.bind(1, older_than).bind(2, now_s());
  GS_TRY(st.run());
  const std::int64_t n = db.changes();
  if (audit_ != nullptr) GS_TRY(audit_->finish());
  GS_TRY(tx.commit());
  if (audit_ != nullptr) audit_->committed();
  return n;
}

// ---- key compromise -------------------------------------------------------------------------

Result<RevokeOutcome> RolloverStore::revoke_key(std::string_view meter_id, std::string_view reason,
                                                std::string_view created_by) {
  db::Db& db = ks_.db();
  const std::int64_t now = now_s();
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  std::optional<Meter> m;
  if (!meter_id.empty() && meter_id.size() <= kMaxMeterIdLength) {
    GS_ASSIGN(m, ks_.meter_by_id(meter_id));
  }
  if (!m) return {Errc::not_found, "no meter " + clip(meter_id, kMaxMeterIdLength + 1)};
  if (m->state == MeterState::compromised) {
    return {Errc::conflict, "meter " + m->meter_id + " is already revoked permanently"};
  }
  if (m->public_key.size() != kPublicKeySize) {
    return {Errc::invalid_argument,
            "meter " + m->meter_id + " has no registered public key, so it cannot be rekeyed"};
  }
  if (m->state == MeterState::active && m->active_slot() == nullptr) {
    return {Errc::conflict, "meter " + m->meter_id + " has no active key"};
  }
  RevokeOutcome out;

  GS_ASSIGN(db::Stmt* live_st, stmt(kLiveStepSql));
  GS_ASSIGN(auto live, live_step_of(*live_st, m->row));
  if (live) {
    GS_ASSIGN(auto ab, db.prepare("UPDATE rollover_steps SET state = 'aborted', last_error = "
                                  "'superseded by key revocation', changed_at = ?3 WHERE "
                                  "campaign = ?1 AND meter = ?2"));
    ab.bind(1, live->campaign).bind(2, m->row).bind(3, now);
    GS_TRY(ab.run());
    GS_ASSIGN(db::Stmt* finish_st, stmt(kFinishSql));
    GS_TRY(finish_if_done(*finish_st, live->campaign, now));
    out.superseded = live->campaign;
  }
  GS_ASSIGN(auto comp, db.prepare("UPDATE key_slots SET state = 'compromised', changed_at = ?2 "
                                  "WHERE meter = ?1 AND state IN ('active','standby')"));
  comp.bind(1, m->row).bind(2, now);
  GS_TRY(comp.run());
  out.slots_compromised = db.changes();
  GS_ASSIGN(auto destroy, db.prepare("UPDATE key_slots SET state = 'destroyed', wrapped = NULL, "
                                     "changed_at = ?2 WHERE meter = ?1 AND state = 'pending'"));
  destroy.bind(1, m->row).bind(2, now);
  GS_TRY(destroy.run());
  out.slots_destroyed = db.changes();
  GS_ASSIGN(auto q, db.prepare("UPDATE meters SET state = 'quarantined', state_reason = ?2 WHERE "
                               "row = ?1"));
  q.bind(1, m->row).bind(2, reason);
  GS_TRY(q.run());

  GS_ASSIGN(auto after, ks_.meter_by_row(m->row));
  if (!after) return {Errc::storage_failure, "meter vanished during revocation"};
  const auto choice = choose_rollover_slot(*after, CampaignReason::revocation);
  if (!choice) {
    return {Errc::conflict, "meter " + m->meter_id + " has no key slot a rekey could use"};
  }
  out.seal_slot = choice->seal_slot;
  GS_ASSIGN(auto ins_campaign,
            db.prepare("INSERT INTO rollover_campaigns (state, reason, rate, created_by, "
                       "created_at, changed_at, total) VALUES ('running', 'revocation', 0, ?1, "
                       "?2, ?2, 1)"));
  ins_campaign.bind(1, clip(created_by, kMaxCreatedByLength)).bind(2, now);
  GS_TRY(ins_campaign.run());
  out.campaign = db.last_insert_rowid();
  // The seal slot is recorded from the start (StepWork::seal_slot of a queued step).
  GS_ASSIGN(auto ins_step, db.prepare("INSERT INTO rollover_steps (campaign, meter, state, "
                                      "seal_slot, changed_at) VALUES (?1, ?2, 'queued', ?3, ?4)"));
  ins_step.bind(1, out.campaign).bind(2, m->row).bind(3, std::int64_t{out.seal_slot}).bind(4, now);
  GS_TRY(ins_step.run());
  GS_TRY(tx.commit());
  return out;
}

}  // namespace gs::store
