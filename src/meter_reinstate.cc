// Lifting a meter's revocation (meter_reinstate.h): a new revocation rekey,
// never the old keys.
#include "src/meter_reinstate.h"

#include <ctime>

#include "src/rollover_store.h"

namespace gs::store {

namespace {

std::string clip(std::string_view s, std::size_t max) {
  return std::string(s.substr(0, std::min(s.size(), max)));
}

} // namespace

Result<ReinstateOutcome> reinstate_meter(KeyStore &ks,
                                         std::string_view meter_id,
                                         std::string_view reason,
                                         std::string_view created_by,
                                         bool lift_permanent) {
  db::Db &db = ks.db();
  const std::int64_t now = static_cast<std::int64_t>(std::time(nullptr));
  std::optional<Meter> m;
  if (!meter_id.empty() && meter_id.size() <= kMaxMeterIdLength) {
    GS_ASSIGN(m, ks.meter_by_id(meter_id));
  }
  if (!m)
    return Error(Errc::not_found,
                 "no meter " + clip(meter_id, kMaxMeterIdLength + 1));
  ReinstateOutcome out;
  out.before = m->state;
  const std::string &id = m->meter_id;
  if (m->state == MeterState::active) {
    return Error(Errc::conflict,
                 "meter " + id + " is not revoked (state active)");
  }
  if (m->state == MeterState::compromised && !lift_permanent) {
    return Error(
        Errc::conflict,
        "meter " + id +
            " was revoked permanently (the device itself is not trusted): "
            "it stays refused. Only if that revocation was an error and the "
            "meter never "
            "left custody, --lift-permanent rekeys it; otherwise re-provision "
            "it");
  }
  // A live step: its rekey (or, for a compromised meter, a step revoke left) is
  // under way.
  GS_ASSIGN(
      auto live,
      db.prepare("SELECT campaign, state FROM rollover_steps WHERE meter = ?1 "
                 "AND state IN ('queued','prepared','failed')"));
  live.bind(1, m->row);
  GS_ASSIGN(db::Step ls, live.step());
  if (ls == db::Step::row) {
    return Error(
        Errc::conflict,
        "meter " + id + " is already being rekeyed (campaign " +
            std::to_string(live.int64(0)) + ", step " + live.text(1) +
            "): it is served again once it answers under its new key (gridseal "
            "rollover status " +
            std::to_string(live.int64(0)) + ")");
  }
  live.reset();
  if (m->state == MeterState::quarantined && m->active_slot() != nullptr) {
    // Its key was replaced already: nothing revoked is in use, so it may be
    // served again.
    GS_ASSIGN(auto up,
              db.prepare(
                  "UPDATE meters SET state = 'active', state_reason = '' WHERE "
                  "row = ?1 AND state = 'quarantined'"));
    up.bind(1, m->row);
    GS_TRY(up.run());
    out.after = MeterState::active;
    return out;
  }
  if (m->public_key.size() != kPublicKeySize) {
    return Error(
        Errc::invalid_argument,
        "meter " + id +
            " has no registered public key, so it cannot be rekeyed: it "
            "stays " +
            to_string(m->state));
  }
  // Pending keys of an unfinished rollover were never confirmed: erased, as
  // revoke_key does (after a permanent revocation they are compromised and stay
  // so).
  GS_ASSIGN(
      auto destroy,
      db.prepare("UPDATE key_slots SET state = 'destroyed', wrapped = NULL, "
                 "changed_at = ?2 WHERE meter = ?1 AND state = 'pending'"));
  destroy.bind(1, m->row).bind(2, now);
  GS_TRY(destroy.run());
  out.slots_destroyed = db.changes();
  GS_ASSIGN(
      auto q,
      db.prepare(
          "UPDATE meters SET state = 'quarantined', state_reason = ?2 WHERE "
          "row = ?1"));
  q.bind(1, m->row).bind(2, "reinstated: " + clip(reason, kMaxReinstateReason));
  GS_TRY(q.run());
  GS_ASSIGN(auto after, ks.meter_by_row(m->row));
  if (!after)
    return Error(Errc::storage_failure, "meter vanished during reinstatement");
  const auto choice = choose_rollover_slot(*after, CampaignReason::revocation);
  if (!choice) {
    return Error(Errc::conflict,
                 "meter " + id +
                     " has no key slot a rekey could use (no "
                     "compromised key left to seal the update)");
  }
  out.seal_slot = choice->seal_slot;
  GS_ASSIGN(
      auto ins_campaign,
      db.prepare(
          "INSERT INTO rollover_campaigns (state, reason, rate, created_by, "
          "created_at, changed_at, total) VALUES ('running', 'revocation', 0, "
          "?1, "
          "?2, ?2, 1)"));
  ins_campaign.bind(1, clip(created_by, kMaxCreatedByLength)).bind(2, now);
  GS_TRY(ins_campaign.run());
  out.campaign = db.last_insert_rowid();
  GS_ASSIGN(
      auto ins_step,
      db.prepare("INSERT INTO rollover_steps (campaign, meter, state, "
                 "seal_slot, changed_at) VALUES (?1, ?2, 'queued', ?3, ?4)"));
  ins_step.bind(1, out.campaign)
      .bind(2, m->row)
      .bind(3, std::int64_t{out.seal_slot})
      .bind(4, now);
  GS_TRY(ins_step.run());
  GS_ASSIGN(
      auto proven,
      db.prepare(
          "SELECT 1 WHERE EXISTS (SELECT 1 FROM challenge_proofs WHERE meter = "
          "?1) "
          "AND NOT EXISTS (SELECT 1 FROM meter_challenges WHERE meter = ?1 AND "
          "state = 'failed')"));
  proven.bind(1, m->row);
  GS_ASSIGN(db::Step ps, proven.step());
  out.proven = ps == db::Step::row;
  out.after = MeterState::quarantined;
  return out;
}

} // namespace gs::store
