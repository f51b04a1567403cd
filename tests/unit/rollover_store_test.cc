// Rollover campaigns over a real SQLite file: start rules, slot choice, prepare/confirm and the
// key-slot states they leave, fail/resume/abort, done detection, standby retirement, key
// revocation (quarantine + one-meter campaign), and persistence across a reopen.
#include "src/rollover_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>

#include "c1222/oid.h"
#include "gridseal/clock.h"

namespace gs::store {
namespace {

Bytes wrapped_of(int meter, std::uint32_t version) {
  // Distinctive 24-byte "wrapped keys" (splitmix64 of meter and version), so that the file can
  // be searched for them.
  std::uint64_t x = (static_cast<std::uint64_t>(meter) << 32) | version;
  Bytes b;
  while (b.size() < 24) {
    x += 0x9E3779B97F4A7C15ULL;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<std::uint8_t>(z >> (8 * i)));
  }
  return b;
}

Bytes point(std::uint8_t fill) {
  Bytes p(65, fill);
  p[0] = 0x04;
  return p;
}

class RolloverStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-rollover-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/gridseal.db";
    reopen();
  }
  void TearDown() override {
    rs_.reset();
    ks_.reset();
    std::filesystem::remove_all(dir_);
  }

  void reopen() {
    rs_.reset();
    ks_.reset();
    auto ks = KeyStore::open(path_);
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    ks_.emplace(std::move(*ks));
    rs_.emplace(*ks_);
  }

  // Meters M<first>..M<first+n-1>, slot 0 active, version 1; with a public key unless told;
  // with a recorded MT-2043 proof (what the engine needs before a first key update) unless told.
  void import(int first, int n, bool with_public_key = true, bool proven = true) {
    std::vector<NewMeter> batch;
    for (int i = first; i < first + n; ++i) {
      NewMeter m;
      m.meter_id = "M" + std::to_string(i);
      m.ap_title_text = "2.16.124.113620.1.22.0.7." + std::to_string(i);
      m.ap_title = c1222::oid_from_dotted(m.ap_title_text).value();
      if (with_public_key) m.public_key = point(0x30);
      m.slot = 0;
      m.wrapped_key = wrapped_of(i, 1);
      m.origin = "plain";
      batch.push_back(std::move(m));
    }
    auto r = ks_->import_meters(batch);
    ASSERT_TRUE(r.ok()) << r.error().message();
    if (proven) {
      for (int i = first; i < first + n; ++i) prove("M" + std::to_string(i));
    }
  }

  // A proof as the engine records it (the signature is not checked by the store).
  void prove(const std::string& id) {
    const Meter m = meter(id);
    auto st = ks_->db().prepare(
        "INSERT OR IGNORE INTO challenge_proofs VALUES (?1, zeroblob(16), 0, zeroblob(64), 0, "
        "0)");
    ASSERT_TRUE(st.ok());
    st->bind(1, m.row);
    ASSERT_TRUE(st->run().ok());
  }

  Meter meter(const std::string& id) {
    auto m = ks_->meter_by_id(id);
    EXPECT_TRUE(m.ok() && m->has_value()) << id;
    return m.ok() && m->has_value() ? **m : Meter{};
  }

  const KeySlot& slot(const Meter& m, int s) {
    const KeySlot* k = m.slot_for_key_id(static_cast<std::uint8_t>(s));
    EXPECT_NE(k, nullptr) << m.meter_id << " slot " << s;
    static const KeySlot none;
    return k != nullptr ? *k : none;
  }

  StartOutcome start(std::vector<std::string> ids, double rate = 0) {
    CampaignSpec spec;
    spec.rate = rate;
    spec.created_by = "tester";
    auto r = rs_->start(spec, ids, ids.empty());
    EXPECT_TRUE(r.ok()) << r.error().message();
    return r.ok() ? *r : StartOutcome{};
  }

  // What the engine does for a queued step: choose, "derive", prepare.
  PreparedKey key_for(const StepWork& w) {
    auto m = ks_->meter_by_row(w.meter_row);
    EXPECT_TRUE(m.ok() && m->has_value());
    auto c = choose_rollover_slot(**m, w.reason);
    EXPECT_TRUE(c.has_value());
    PreparedKey k;
    k.campaign = w.campaign;
    k.meter_row = w.meter_row;
    k.target_slot = c->target_slot;
    k.key_version = c->key_version;
    k.seal_slot = c->seal_slot;
    k.wrapped = wrapped_of(static_cast<int>(w.meter_row) + 1000, c->key_version);
    k.ephemeral_point = point(static_cast<std::uint8_t>(c->key_version));
    return k;
  }

  // Prepares every queued step; returns them.
  std::vector<StepWork> prepare_all() {
    auto q = rs_->next_queued(1000);
    EXPECT_TRUE(q.ok());
    std::vector<PreparedKey> keys;
    for (const auto& w : *q) keys.push_back(key_for(w));
    auto r = rs_->prepare(keys);
    EXPECT_TRUE(r.ok()) << r.error().message();
    for (bool b : *r) EXPECT_TRUE(b);
    return *q;
  }

  StepWork due(std::int64_t meter_row) {
    auto d = rs_->due_prepared(std::numeric_limits<std::int64_t>::max(), 1000);
    EXPECT_TRUE(d.ok());
    for (const auto& w : *d) {
      if (w.meter_row == meter_row) return w;
    }
    ADD_FAILURE() << "meter row " << meter_row << " has no prepared step";
    return {};
  }

  CampaignProgress progress(std::int64_t id) {
    auto p = rs_->progress(id);
    EXPECT_TRUE(p.ok()) << p.error().message();
    return p.ok() ? *p : CampaignProgress{};
  }

  std::string dir_;
  std::string path_;
  std::optional<KeyStore> ks_;
  std::optional<RolloverStore> rs_;
};

TEST_F(RolloverStoreTest, StartNamedAllUnknownAndSkippedMeters) {
  import(1, 3);
  import(4, 1, /*with_public_key=*/false);
  import(5, 2);
  ASSERT_TRUE(ks_->revoke("M5", "stolen").ok());

  StartOutcome a = start({"M1", "M2", "M1"}, 2.5);
  EXPECT_EQ(a.campaign, 1);
  EXPECT_EQ(a.added, 2);  // named twice counts once
  EXPECT_EQ(a.skipped_total, 0);
  auto c = rs_->campaign(a.campaign);
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->state, CampaignState::running);
  EXPECT_EQ((*c)->reason, CampaignReason::operator_request);
  EXPECT_DOUBLE_EQ((*c)->rate, 2.5);
  EXPECT_EQ((*c)->created_by, "tester");
  EXPECT_EQ((*c)->total, 2);
  EXPECT_GT((*c)->created_at, 0);

  // Unknown meter: not_found naming it, nothing created.
  CampaignSpec spec;
  std::vector<std::string> bad = {"M3", "nope"};
  auto u = rs_->start(spec, bad, false);
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.error().code, Errc::not_found);
  EXPECT_NE(u.error().detail.find("nope"), std::string::npos);
  std::vector<std::string> too_long = {std::string(200, 'x')};
  EXPECT_EQ(rs_->start(spec, too_long, false).error().code, Errc::not_found);
  // Nobody can join: invalid_argument with the reasons, nothing created.
  std::vector<std::string> busy = {"M1", "M5"};
  auto b = rs_->start(spec, busy, false);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.error().code, Errc::invalid_argument);
  EXPECT_NE(b.error().detail.find("already in campaign 1"), std::string::npos) << b.error().detail;
  EXPECT_EQ(rs_->campaigns(10)->size(), 1u);
  // Bad arguments.
  spec.rate = -1;
  std::vector<std::string> one = {"M3"};
  EXPECT_EQ(rs_->start(spec, one, false).error().code, Errc::invalid_argument);
  spec.rate = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(rs_->start(spec, one, false).error().code, Errc::invalid_argument);
  spec.rate = 0;
  EXPECT_EQ(rs_->start(spec, one, true).error().code, Errc::invalid_argument);
  EXPECT_EQ(rs_->start(spec, {}, false).error().code, Errc::invalid_argument);

  // A revoked meter named with a good one: skipped with the reason.
  StartOutcome s = start({"M5", "M6"});
  EXPECT_EQ(s.added, 1);
  ASSERT_EQ(s.skipped.size(), 1u);
  EXPECT_EQ(s.skipped[0].first, "M5");
  EXPECT_NE(s.skipped[0].second.find("revoked"), std::string::npos);

  // All: every active meter not already in a live step (M5 is compromised, not active).
  StartOutcome all = start({});
  EXPECT_EQ(all.added, 1);  // M3
  EXPECT_EQ(all.skipped_total, 4);
  std::map<std::string, std::string> why(all.skipped.begin(), all.skipped.end());
  EXPECT_NE(why["M1"].find("already in campaign 1"), std::string::npos);
  EXPECT_NE(why["M2"].find("already in campaign 1"), std::string::npos);
  EXPECT_NE(why["M4"].find("no registered public key"), std::string::npos);
  EXPECT_NE(why["M6"].find("already in campaign 2"), std::string::npos);
  EXPECT_EQ(why.count("M5"), 0u);

  auto list = rs_->campaigns(10);
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 3u);
  EXPECT_EQ((*list)[0].id, 3);  // newest first
  EXPECT_EQ((*list)[2].id, 1);
  EXPECT_EQ(rs_->campaigns(1)->size(), 1u);
  // Queued steps come out oldest campaign first.
  auto q = rs_->next_queued(10);
  ASSERT_TRUE(q.ok());
  ASSERT_EQ(q->size(), 4u);
  EXPECT_EQ((*q)[0].campaign, 1);
  EXPECT_EQ((*q)[1].campaign, 1);
  EXPECT_EQ((*q)[2].campaign, 2);
  EXPECT_EQ((*q)[3].campaign, 3);
  EXPECT_EQ((*q)[0].state, StepState::queued);
  EXPECT_EQ(rs_->next_queued(2)->size(), 2u);
}

TEST_F(RolloverStoreTest, SlotChoiceRules) {
  auto ks = [](int slot, KeyState st, std::uint32_t v, std::int64_t changed = 0) {
    KeySlot k;
    k.slot = slot;
    k.state = st;
    k.key_version = v;
    k.changed_at = changed;
    k.wrapped = Bytes(24, 1);
    return k;
  };
  const auto op = CampaignReason::operator_request;
  Meter m;
  m.slots = {ks(0, KeyState::active, 1)};
  auto c = choose_rollover_slot(m, op);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->target_slot, 1);  // empty slot first
  EXPECT_EQ(c->key_version, 2u);
  EXPECT_EQ(c->seal_slot, 0);

  // Active in slot 2: the lowest empty slot is taken.
  m.slots = {ks(2, KeyState::active, 7)};
  c = choose_rollover_slot(m, op);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->target_slot, 0);
  EXPECT_EQ(c->key_version, 8u);
  EXPECT_EQ(c->seal_slot, 2);

  // Destroyed/deactivated before standby, standby before compromised.
  m.slots = {ks(0, KeyState::compromised, 1), ks(1, KeyState::standby, 2, 50),
             ks(2, KeyState::active, 4), ks(3, KeyState::deactivated, 3)};
  EXPECT_EQ(choose_rollover_slot(m, op)->target_slot, 3);
  m.slots[3].state = KeyState::destroyed;
  EXPECT_EQ(choose_rollover_slot(m, op)->target_slot, 3);
  m.slots[3].state = KeyState::pending;  // never replaced
  c = choose_rollover_slot(m, op);
  EXPECT_EQ(c->target_slot, 1);
  EXPECT_EQ(c->key_version, 5u);  // 1 + the highest version, the pending one's included
  // The oldest standby is reused.
  m.slots = {ks(0, KeyState::standby, 3, 100), ks(1, KeyState::standby, 2, 40),
             ks(2, KeyState::active, 4), ks(3, KeyState::standby, 1, 40)};
  EXPECT_EQ(choose_rollover_slot(m, op)->target_slot, 3);  // same age: lower version
  m.slots[3].changed_at = 41;
  EXPECT_EQ(choose_rollover_slot(m, op)->target_slot, 1);
  // Only a compromised slot left.
  m.slots = {ks(0, KeyState::compromised, 1), ks(1, KeyState::pending, 3),
             ks(2, KeyState::active, 2), ks(3, KeyState::pending, 4)};
  EXPECT_EQ(choose_rollover_slot(m, op)->target_slot, 0);
  // Nothing left: active + 3 pending.
  m.slots = {ks(0, KeyState::pending, 2), ks(1, KeyState::pending, 3), ks(2, KeyState::active, 1),
             ks(3, KeyState::pending, 4)};
  EXPECT_FALSE(choose_rollover_slot(m, op));
  // No active key, two active keys, an active key without key material, version exhausted.
  m.slots = {ks(0, KeyState::standby, 1)};
  EXPECT_FALSE(choose_rollover_slot(m, op));
  m.slots = {ks(0, KeyState::active, 1), ks(1, KeyState::active, 2)};
  EXPECT_FALSE(choose_rollover_slot(m, op));
  m.slots = {ks(0, KeyState::active, 1)};
  m.slots[0].wrapped.clear();
  EXPECT_FALSE(choose_rollover_slot(m, op));
  m.slots = {ks(0, KeyState::active, std::numeric_limits<std::uint32_t>::max())};
  EXPECT_FALSE(choose_rollover_slot(m, op));

  // Revocation: sealed under the compromised key with the highest version (the one that was
  // active), never replacing it; not while the meter has an active key.
  const auto rv = CampaignReason::revocation;
  m.slots = {ks(0, KeyState::compromised, 5), ks(1, KeyState::compromised, 3),
             ks(2, KeyState::destroyed, 6)};
  c = choose_rollover_slot(m, rv);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->seal_slot, 0);
  EXPECT_EQ(c->target_slot, 2);
  EXPECT_EQ(c->key_version, 7u);
  m.slots = {ks(0, KeyState::compromised, 5), ks(1, KeyState::compromised, 3),
             ks(2, KeyState::compromised, 4), ks(3, KeyState::compromised, 1)};
  c = choose_rollover_slot(m, rv);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->seal_slot, 0);
  EXPECT_EQ(c->target_slot, 3);  // oldest (same changed_at: lowest version)
  m.slots = {ks(0, KeyState::compromised, 5), ks(1, KeyState::active, 6)};
  EXPECT_FALSE(choose_rollover_slot(m, rv));
  m.slots = {ks(0, KeyState::standby, 5)};
  EXPECT_FALSE(choose_rollover_slot(m, rv));
  // The operator's rule never seals under a compromised key.
  m.slots = {ks(0, KeyState::compromised, 5)};
  EXPECT_FALSE(choose_rollover_slot(m, op));
}

TEST_F(RolloverStoreTest, PrepareConfirmAndTheSlotStatesTheyLeave) {
  import(1, 1);
  StartOutcome s = start({"M1"});
  auto q = rs_->next_queued(10);
  ASSERT_TRUE(q.ok());
  ASSERT_EQ(q->size(), 1u);
  const StepWork w = (*q)[0];
  EXPECT_EQ(w.reason, CampaignReason::operator_request);
  PreparedKey k = key_for(w);
  EXPECT_EQ(k.target_slot, 1);
  EXPECT_EQ(k.key_version, 2u);
  EXPECT_EQ(k.seal_slot, 0);

  // A key that no longer fits the meter (stale slot or version) is left out, the step stays
  // queued; malformed input is refused outright.
  PreparedKey stale = k;
  stale.key_version = 9;
  PreparedKey other_slot = k;
  other_slot.target_slot = 2;
  std::vector<PreparedKey> bad = {stale, other_slot};
  auto r = rs_->prepare(bad);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<bool>{false, false}));
  EXPECT_EQ(rs_->next_queued(10)->size(), 1u);
  PreparedKey short_point = k;
  short_point.ephemeral_point.resize(33);
  std::vector<PreparedKey> sp = {short_point};
  EXPECT_EQ(rs_->prepare(sp).error().code, Errc::invalid_argument);
  PreparedKey bad_slot = k;
  bad_slot.target_slot = 4;
  std::vector<PreparedKey> bs = {bad_slot};
  EXPECT_EQ(rs_->prepare(bs).error().code, Errc::invalid_argument);

  // Prepared: a pending slot with the new key and the step with its payload.
  std::vector<PreparedKey> good = {k, k};
  r = rs_->prepare(good);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(*r, (std::vector<bool>{true, false}));  // the second is no longer queued
  Meter m = meter("M1");
  ASSERT_EQ(m.slots.size(), 2u);
  EXPECT_EQ(slot(m, 0).state, KeyState::active);
  EXPECT_EQ(slot(m, 1).state, KeyState::pending);
  EXPECT_EQ(slot(m, 1).key_version, 2u);
  EXPECT_EQ(slot(m, 1).origin, "rollover");
  EXPECT_EQ(slot(m, 1).wrapped, k.wrapped);
  EXPECT_GT(slot(m, 1).created_at, 0);
  EXPECT_TRUE(rs_->next_queued(10)->empty());
  StepWork p = due(m.row);
  EXPECT_EQ(p.state, StepState::prepared);
  EXPECT_EQ(p.target_slot, 1);
  EXPECT_EQ(p.key_version, 2u);
  EXPECT_EQ(p.seal_slot, 0);
  EXPECT_EQ(p.ephemeral_point, k.ephemeral_point);
  EXPECT_EQ(p.attempts, 0u);
  EXPECT_EQ(progress(s.campaign).prepared, 1);

  // Wrong version, wrong slot: refused, nothing changes.
  EXPECT_FALSE(rs_->confirm(m.row, 1, 3).value());
  EXPECT_FALSE(rs_->confirm(m.row, 0, 1).value());
  EXPECT_EQ(slot(meter("M1"), 1).state, KeyState::pending);
  // Confirmed: the new key active, the old one standby, the step confirmed, the campaign done.
  ASSERT_TRUE(rs_->confirm(m.row, 1, 2).value());
  m = meter("M1");
  EXPECT_EQ(slot(m, 0).state, KeyState::standby);
  EXPECT_EQ(slot(m, 1).state, KeyState::active);
  EXPECT_EQ(m.active_slot()->slot, 1);
  const std::int64_t standby_since = slot(m, 0).changed_at;
  CampaignProgress pr = progress(s.campaign);
  EXPECT_EQ(pr.confirmed, 1);
  EXPECT_EQ(pr.prepared, 0);
  EXPECT_GT(pr.first_confirm_at, 0);
  EXPECT_EQ(pr.first_confirm_at, pr.last_confirm_at);
  EXPECT_EQ(pr.campaign.state, CampaignState::done);
  // Idempotent: confirming again changes nothing.
  EXPECT_FALSE(rs_->confirm(m.row, 1, 2).value());
  EXPECT_EQ(slot(meter("M1"), 1).state, KeyState::active);

  // A second rollover takes the empty slot 2 with version 3; confirming it leaves slot 1
  // standby and slot 0 standby as it was (its age kept for retire_standby).
  StartOutcome s2 = start({"M1"});
  auto w2 = prepare_all();
  ASSERT_EQ(w2.size(), 1u);
  StepWork p2 = due(m.row);
  EXPECT_EQ(p2.target_slot, 2);
  EXPECT_EQ(p2.key_version, 3u);
  EXPECT_EQ(p2.seal_slot, 1);
  // Inside the caller's transaction.
  {
    auto tx = db::Transaction::begin(ks_->db());
    ASSERT_TRUE(tx.ok());
    ASSERT_TRUE(rs_->confirm(m.row, 2, 3, /*in_transaction=*/true).value());
    ASSERT_TRUE(tx->commit().ok());
  }
  m = meter("M1");
  EXPECT_EQ(slot(m, 0).state, KeyState::standby);
  EXPECT_EQ(slot(m, 0).changed_at, standby_since);
  EXPECT_EQ(slot(m, 1).state, KeyState::standby);
  EXPECT_EQ(slot(m, 2).state, KeyState::active);
  EXPECT_EQ(rs_->campaign(s2.campaign)->value().state, CampaignState::done);
  // Third: every slot is used; the oldest standby (slot 0, version 1) is replaced.
  start({"M1"});
  prepare_all();
  StepWork p3 = due(m.row);
  EXPECT_EQ(p3.target_slot, 3);
  ASSERT_TRUE(rs_->confirm(m.row, 3, 4).value());
  start({"M1"});
  prepare_all();
  StepWork p4 = due(m.row);
  EXPECT_EQ(p4.target_slot, 0);
  EXPECT_EQ(p4.key_version, 5u);
  EXPECT_EQ(slot(meter("M1"), 0).state, KeyState::pending);
}

TEST_F(RolloverStoreTest, AttemptsFailResumeAndAbort) {
  import(1, 3);
  StartOutcome s = start({"M1", "M2", "M3"});
  const std::int64_t r1 = meter("M1").row, r2 = meter("M2").row, r3 = meter("M3").row;
  auto q = rs_->next_queued(2);
  ASSERT_EQ(q->size(), 2u);
  std::vector<PreparedKey> keys = {key_for((*q)[0]), key_for((*q)[1])};
  ASSERT_TRUE(rs_->prepare(keys).ok());

  const std::int64_t now_ms = static_cast<std::int64_t>(utc_now()) * 1000;
  std::vector<RolloverStore::Attempt> a = {{s.campaign, r1, now_ms + 60000, "timeout"},
                                           {s.campaign, r3, now_ms, "not prepared"}};
  ASSERT_TRUE(rs_->record_attempts(a).ok());
  CampaignProgress p = progress(s.campaign);
  EXPECT_EQ(p.queued, 1);
  EXPECT_EQ(p.prepared, 2);
  EXPECT_EQ(p.sent, 1);  // only prepared steps count attempts
  auto d = rs_->due_prepared(now_ms, 10);
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ((*d)[0].meter_row, r2);
  EXPECT_EQ(due(r1).attempts, 1u);
  EXPECT_EQ(rs_->due_prepared(now_ms + 60000, 10)->size(), 2u);

  std::vector<RolloverStore::Attempt> f = {{s.campaign, r1, 0, std::string(1000, 'e')}};
  ASSERT_TRUE(rs_->fail(f).ok());
  p = progress(s.campaign);
  EXPECT_EQ(p.failed, 1);
  EXPECT_EQ(p.prepared, 1);
  auto failed = rs_->steps_in_state(s.campaign, StepState::failed, 20);
  ASSERT_EQ(failed->size(), 1u);
  EXPECT_EQ((*failed)[0].first, "M1");
  EXPECT_EQ((*failed)[0].second.size(), kMaxStepErrorLength);
  // Its pending key stays (the meter may hold it), and it keeps the meter out of new campaigns.
  EXPECT_EQ(slot(meter("M1"), 1).state, KeyState::pending);
  CampaignSpec spec;
  std::vector<std::string> m1 = {"M1"};
  auto again = rs_->start(spec, m1, false);
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.error().detail.find("step failed"), std::string::npos) << again.error().detail;

  // Abort: queued (M3) and failed (M1) steps; the prepared one (M2) is still finished.
  auto ab = rs_->abort(s.campaign);
  ASSERT_TRUE(ab.ok());
  EXPECT_EQ(*ab, 2);
  p = progress(s.campaign);
  EXPECT_EQ(p.campaign.state, CampaignState::aborted);
  EXPECT_EQ(p.aborted, 2);
  EXPECT_EQ(p.prepared, 1);
  EXPECT_TRUE(rs_->next_queued(10)->empty());
  EXPECT_EQ(due(r2).campaign, s.campaign);
  EXPECT_EQ(rs_->abort(s.campaign).value(), 0);  // nothing more to abort
  ASSERT_TRUE(rs_->confirm(r2, 1, 2).value());
  EXPECT_EQ(rs_->campaign(s.campaign)->value().state, CampaignState::aborted);  // stays aborted

  // Resume: the never-prepared aborted step (M3) is queued again; M1, aborted after being
  // prepared, stays aborted.
  auto rr = rs_->resume(s.campaign);
  ASSERT_TRUE(rr.ok()) << rr.error().message();
  EXPECT_EQ(*rr, 1);
  p = progress(s.campaign);
  EXPECT_EQ(p.campaign.state, CampaignState::running);
  EXPECT_EQ(p.queued, 1);
  EXPECT_EQ(p.aborted, 1);
  EXPECT_EQ(p.confirmed, 1);
  auto nq = rs_->next_queued(10);
  ASSERT_EQ(nq->size(), 1u);
  EXPECT_EQ((*nq)[0].meter_row, r3);

  // A failed step is resumed to prepared with attempts 0 and the same payload.
  prepare_all();
  StepWork before = due(r3);
  std::vector<RolloverStore::Attempt> a3 = {{s.campaign, r3, now_ms + 5000, "timeout"}};
  ASSERT_TRUE(rs_->record_attempts(a3).ok());
  ASSERT_TRUE(rs_->fail(a3).ok());
  EXPECT_EQ(rs_->campaign(s.campaign)->value().state, CampaignState::done);  // nothing in flight
  EXPECT_EQ(rs_->resume(s.campaign).value(), 1);
  StepWork after = due(r3);
  EXPECT_EQ(after.state, StepState::prepared);
  EXPECT_EQ(after.attempts, 0u);
  EXPECT_EQ(after.ephemeral_point, before.ephemeral_point);
  EXPECT_EQ(after.target_slot, before.target_slot);
  EXPECT_EQ(after.key_version, before.key_version);
  EXPECT_EQ(rs_->campaign(s.campaign)->value().state, CampaignState::running);
  ASSERT_TRUE(rs_->confirm(r3, after.target_slot, after.key_version).value());
  EXPECT_EQ(rs_->campaign(s.campaign)->value().state, CampaignState::done);

  // A failed step answered late is confirmed all the same.
  StartOutcome s2 = start({"M2"});
  prepare_all();
  StepWork w2 = due(r2);
  std::vector<RolloverStore::Attempt> f2 = {{s2.campaign, r2, 0, "gave up"}};
  ASSERT_TRUE(rs_->fail(f2).ok());
  ASSERT_TRUE(rs_->confirm(r2, w2.target_slot, w2.key_version).value());
  EXPECT_EQ(progress(s2.campaign).confirmed, 1);

  // Unknown campaigns.
  EXPECT_EQ(rs_->resume(99).error().code, Errc::not_found);
  EXPECT_EQ(rs_->abort(99).error().code, Errc::not_found);
  EXPECT_EQ(rs_->progress(99).error().code, Errc::not_found);
  EXPECT_FALSE(rs_->campaign(99).value().has_value());
}

TEST_F(RolloverStoreTest, DoneDetectionAndDroppedSteps) {
  import(1, 3);
  StartOutcome s = start({"M1", "M2", "M3"});
  const std::int64_t r1 = meter("M1").row, r2 = meter("M2").row, r3 = meter("M3").row;
  auto q = rs_->next_queued(2);
  std::vector<PreparedKey> keys = {key_for((*q)[0]), key_for((*q)[1])};
  ASSERT_TRUE(rs_->prepare(keys).ok());
  ASSERT_TRUE(rs_->confirm(r1, 1, 2).value());
  EXPECT_EQ(rs_->campaign(s.campaign)->value().state, CampaignState::running);  // M2, M3 left
  // The engine cannot prepare M3: dropped (aborted with the reason).
  std::vector<RolloverStore::Attempt> drop = {{s.campaign, r3, 0, "no usable key slot"},
                                              {s.campaign, r2, 0, "not queued: ignored"}};
  ASSERT_TRUE(rs_->drop_queued(drop).ok());
  CampaignProgress p = progress(s.campaign);
  EXPECT_EQ(p.aborted, 1);
  EXPECT_EQ(p.prepared, 1);
  EXPECT_EQ(p.campaign.state, CampaignState::running);
  auto ab = rs_->steps_in_state(s.campaign, StepState::aborted, 10);
  ASSERT_EQ(ab->size(), 1u);
  EXPECT_EQ((*ab)[0], (std::pair<std::string, std::string>("M3", "no usable key slot")));
  ASSERT_TRUE(rs_->confirm(r2, 1, 2).value());
  EXPECT_EQ(rs_->campaign(s.campaign)->value().state, CampaignState::done);
  EXPECT_EQ(progress(s.campaign).confirmed, 2);
}

TEST_F(RolloverStoreTest, RetireStandbyErasesTheWrappedKey) {
  import(1, 2);
  start({"M1", "M2"});
  prepare_all();
  const Meter before = meter("M1");
  ASSERT_TRUE(rs_->confirm(before.row, 1, 2).value());
  ASSERT_TRUE(rs_->confirm(meter("M2").row, 1, 2).value());
  const std::int64_t now = static_cast<std::int64_t>(utc_now());
  EXPECT_EQ(rs_->retire_standby(now - 3600).value(), 0);  // too recent
  EXPECT_EQ(slot(meter("M1"), 0).state, KeyState::standby);
  EXPECT_EQ(rs_->retire_standby(now + 1).value(), 2);
  Meter m = meter("M1");
  EXPECT_EQ(slot(m, 0).state, KeyState::destroyed);
  EXPECT_TRUE(slot(m, 0).wrapped.empty());
  EXPECT_EQ(slot(m, 0).key_version, 1u);  // the version history stays
  EXPECT_EQ(slot(m, 1).state, KeyState::active);
  EXPECT_EQ(rs_->retire_standby(now + 1).value(), 0);
  // The next rollover takes the destroyed slot with a version above every earlier one.
  start({"M1"});
  prepare_all();
  StepWork w = due(m.row);
  EXPECT_EQ(w.target_slot, 0);
  EXPECT_EQ(w.key_version, 3u);

  // The old wrapped key is gone from the file (checkpointed on close), not just unreferenced.
  rs_.reset();
  ks_.reset();
  std::ifstream f(path_, std::ios::binary);
  std::stringstream raw;
  raw << f.rdbuf();
  const std::string bytes = raw.str();
  const Bytes old_key = wrapped_of(1, 1);
  EXPECT_EQ(bytes.find(std::string(old_key.begin(), old_key.end())), std::string::npos);
  const Bytes m2_old_key = wrapped_of(2, 1);
  EXPECT_EQ(bytes.find(std::string(m2_old_key.begin(), m2_old_key.end())), std::string::npos);
  // Live keys are still there (the search would find them).
  const Bytes active = wrapped_of(static_cast<int>(m.row) + 1000, 2);
  EXPECT_NE(bytes.find(std::string(active.begin(), active.end())), std::string::npos);
  reopen();
}

TEST_F(RolloverStoreTest, RevokeKeyQuarantinesAndRekeysUnderTheCompromisedKey) {
  import(1, 3);
  import(4, 1, /*with_public_key=*/false);
  // M1: one rollover done (slot 1 active v2, slot 0 standby v1), a second in flight (slot 2).
  start({"M1"});
  prepare_all();
  const std::int64_t r1 = meter("M1").row;
  ASSERT_TRUE(rs_->confirm(r1, 1, 2).value());
  StartOutcome inflight = start({"M1", "M2"});
  prepare_all();
  ASSERT_EQ(slot(meter("M1"), 2).state, KeyState::pending);

  auto rv = rs_->revoke_key("M1", "key seen on a stolen laptop", "alice");
  ASSERT_TRUE(rv.ok()) << rv.error().message();
  EXPECT_EQ(rv->superseded, inflight.campaign);
  EXPECT_EQ(rv->seal_slot, 1);
  EXPECT_EQ(rv->slots_compromised, 2);
  EXPECT_EQ(rv->slots_destroyed, 1);
  Meter m = meter("M1");
  EXPECT_EQ(m.state, MeterState::quarantined);
  EXPECT_EQ(m.state_reason, "key seen on a stolen laptop");
  EXPECT_EQ(slot(m, 0).state, KeyState::compromised);
  EXPECT_EQ(slot(m, 1).state, KeyState::compromised);
  EXPECT_EQ(slot(m, 2).state, KeyState::destroyed);
  EXPECT_TRUE(slot(m, 2).wrapped.empty());
  EXPECT_EQ(m.active_slot(), nullptr);
  // The superseded step is aborted; its campaign goes on with M2.
  auto sup = rs_->steps_in_state(inflight.campaign, StepState::aborted, 10);
  ASSERT_EQ(sup->size(), 1u);
  EXPECT_EQ((*sup)[0].first, "M1");
  EXPECT_NE((*sup)[0].second.find("revocation"), std::string::npos);
  EXPECT_EQ(rs_->campaign(inflight.campaign)->value().state, CampaignState::running);
  // A confirmation of the destroyed key is refused.
  EXPECT_FALSE(rs_->confirm(r1, 2, 3).value());

  auto c = rs_->campaign(rv->campaign);
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->reason, CampaignReason::revocation);
  EXPECT_EQ((*c)->total, 1);
  EXPECT_EQ((*c)->created_by, "alice");
  // A quarantined meter joins no operator campaign.
  CampaignSpec spec;
  std::vector<std::string> m1 = {"M1"};
  EXPECT_FALSE(rs_->start(spec, m1, false).ok());

  auto q = rs_->next_queued(10);
  ASSERT_EQ(q->size(), 1u);
  EXPECT_EQ((*q)[0].reason, CampaignReason::revocation);
  EXPECT_EQ((*q)[0].seal_slot, 1);
  PreparedKey k = key_for((*q)[0]);
  EXPECT_EQ(k.seal_slot, 1);
  EXPECT_EQ(k.target_slot, 2);   // the destroyed slot
  EXPECT_EQ(k.key_version, 4u);  // above the destroyed pending key's 3
  std::vector<PreparedKey> ks = {k};
  ASSERT_TRUE(rs_->prepare(ks).value()[0]);
  ASSERT_TRUE(rs_->confirm(r1, 2, 4).value());
  m = meter("M1");
  EXPECT_EQ(m.state, MeterState::active);
  EXPECT_EQ(m.state_reason, "");
  EXPECT_EQ(slot(m, 2).state, KeyState::active);
  EXPECT_EQ(slot(m, 0).state, KeyState::compromised);  // never used again
  EXPECT_EQ(slot(m, 1).state, KeyState::compromised);
  EXPECT_EQ(rs_->campaign(rv->campaign)->value().state, CampaignState::done);

  // Refusals: unknown, no public key, permanently revoked.
  EXPECT_EQ(rs_->revoke_key("nope", "x", "alice").error().code, Errc::not_found);
  auto np = rs_->revoke_key("M4", "x", "alice");
  ASSERT_FALSE(np.ok());
  EXPECT_EQ(np.error().code, Errc::invalid_argument);
  EXPECT_NE(np.error().detail.find("public key"), std::string::npos);
  EXPECT_EQ(meter("M4").state, MeterState::active);  // nothing changed
  EXPECT_EQ(slot(meter("M4"), 0).state, KeyState::active);
  ASSERT_TRUE(ks_->revoke("M3", "destroyed").ok());
  EXPECT_EQ(rs_->revoke_key("M3", "x", "alice").error().code, Errc::conflict);

  // Revoking a quarantined meter again restarts its rollover (the queued step superseded).
  auto first = rs_->revoke_key("M1", "again", "alice");
  ASSERT_TRUE(first.ok());
  auto second = rs_->revoke_key("M1", "and again", "bob");
  ASSERT_TRUE(second.ok()) << second.error().message();
  EXPECT_EQ(second->superseded, first->campaign);
  EXPECT_EQ(second->seal_slot, 2);
  EXPECT_EQ(rs_->campaign(first->campaign)->value().state, CampaignState::done);

  // A permanent revocation aborts the meter's live step (M2 in the in-flight campaign).
  ASSERT_TRUE(ks_->revoke("M2", "stolen").ok());
  auto p = progress(inflight.campaign);
  EXPECT_EQ(p.aborted, 2);
  EXPECT_EQ(p.campaign.state, CampaignState::done);
  EXPECT_EQ(slot(meter("M2"), 1).state, KeyState::compromised);
}

TEST_F(RolloverStoreTest, EverythingPersistsAcrossAReopen) {
  import(1, 3);
  StartOutcome s = start({"M1", "M2", "M3"}, 0.25);
  auto q = rs_->next_queued(2);
  std::vector<PreparedKey> keys = {key_for((*q)[0]), key_for((*q)[1])};
  ASSERT_TRUE(rs_->prepare(keys).ok());
  const std::int64_t r1 = meter("M1").row, r2 = meter("M2").row;
  ASSERT_TRUE(rs_->confirm(r1, 1, 2).value());
  std::vector<RolloverStore::Attempt> a = {{s.campaign, r2, 123456, "no answer"}};
  ASSERT_TRUE(rs_->record_attempts(a).ok());

  reopen();
  auto c = rs_->campaign(s.campaign);
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->state, CampaignState::running);
  EXPECT_DOUBLE_EQ((*c)->rate, 0.25);
  CampaignProgress p = progress(s.campaign);
  EXPECT_EQ(p.confirmed, 1);
  EXPECT_EQ(p.prepared, 1);
  EXPECT_EQ(p.sent, 1);
  EXPECT_EQ(p.queued, 1);
  StepWork w = due(r2);
  EXPECT_EQ(w.attempts, 1u);
  EXPECT_EQ(w.ephemeral_point, keys[1].ephemeral_point);
  EXPECT_EQ(w.target_slot, keys[1].target_slot);
  EXPECT_EQ(rs_->due_prepared(123455, 10)->size(), 0u);
  EXPECT_EQ(rs_->due_prepared(123456, 10)->size(), 1u);
  Meter m1 = meter("M1");
  EXPECT_EQ(slot(m1, 1).state, KeyState::active);
  EXPECT_EQ(slot(m1, 0).state, KeyState::standby);
  Meter m2 = meter("M2");
  EXPECT_EQ(slot(m2, 1).state, KeyState::pending);
  EXPECT_EQ(slot(m2, 1).wrapped, keys[1].wrapped);
  // The engine picks up where it was after the "restart".
  ASSERT_TRUE(rs_->confirm(r2, 1, 2).value());
  prepare_all();
  ASSERT_TRUE(rs_->confirm(meter("M3").row, 1, 2).value());
  reopen();
  EXPECT_EQ(rs_->campaign(s.campaign)->value().state, CampaignState::done);
  EXPECT_EQ(progress(s.campaign).confirmed, 3);
}

}  // namespace
}  // namespace gs::store
