// MT-2043 meter challenges (DESIGN §3.4): the store's single-use / expiry / replay rules with a
// real SQLite file and real ECDSA keys, then end to end with the real gridseal-dkusd (its
// rollover engine sends the challenges), a real SoftHSM2 token, gridseal-metersim as the relay
// in front of the simulated fleet, and the real `gridseal meters challenge` CLI.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "src/challenge_store.h"
#include "src/host_ecdsa.h"
#include "src/rollover_store.h"
#include "tests/unit/audit_rows.h"
#include "tests/unit/dkusd_fixture.h"

namespace gs::test {
namespace {

using namespace std::chrono_literals;
using store::ChallengeCheck;
using store::ChallengeState;

long long json_number(const std::string& json, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  const auto at = json.find(k);
  if (at == std::string::npos) return -1;
  return std::atoll(json.c_str() + at + k.size());
}

std::int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The answer a meter holding `key` gives to challenge `c` (signed over the profile's bytes).
c1222::ChallengeAnswer answer(const store::Meter& m, const HostEcKey& key,
                              const c1222::Challenge& c) {
  c1222::ChallengeAnswer a;
  a.challenge = c;
  a.meter_time = utc_now_s();
  const Bytes sb = c1222::challenge_signed_bytes(m.ap_title, a).value();
  a.signature = key.sign(sha256(sb).value()).value();
  return a;
}

store::ChallengeProof proof_of(const store::Meter& m, const c1222::ChallengeAnswer& a,
                               std::int64_t at_ms) {
  store::ChallengeProof p;
  p.meter_row = m.row;
  p.challenge.assign(a.challenge.begin(), a.challenge.end());
  p.meter_time = a.meter_time;
  p.signature.assign(a.signature.begin(), a.signature.end());
  p.message_id = 7;
  p.verified_at_ms = at_ms;
  return p;
}

// ---- the store and the checks ---------------------------------------------------------------

class ChallengeStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-challenge-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto ks = store::KeyStore::open(dir_ + "/gridseal.db");
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    ks_.emplace(std::move(*ks));
    key_.emplace(HostEcKey::generate().value());
    std::vector<store::NewMeter> batch;
    for (int i = 1; i <= 3; ++i) {
      store::NewMeter m;
      m.meter_id = "M" + std::to_string(i);
      m.ap_title_text = "2.16.124.113620.1.22.0.7." + std::to_string(i);
      m.ap_title = c1222::oid_from_dotted(m.ap_title_text).value();
      if (i != 3) m.public_key.assign(key_->public_point().begin(), key_->public_point().end());
      m.wrapped_key = Bytes(40, static_cast<std::uint8_t>(i));
      m.origin = "plain";
      batch.push_back(std::move(m));
    }
    ASSERT_TRUE(ks_->import_meters(batch).ok());
    cs_.emplace(*ks_);
  }
  void TearDown() override {
    cs_.reset();
    ks_.reset();
    std::filesystem::remove_all(dir_);
  }

  store::Meter meter(const std::string& id) { return ks_->meter_by_id(id).value().value(); }

  // Issues a fresh challenge to `m`, valid for `ttl_ms`.
  c1222::Challenge issue(const store::Meter& m, std::int64_t ttl_ms, std::uint8_t fill) {
    store::IssuedChallenge ic;
    ic.meter_row = m.row;
    ic.challenge.fill(fill);
    ic.issued_at_ms = wall_ms();
    ic.expires_at_ms = ic.issued_at_ms + ttl_ms;
    ic.invocation_id = 100 + fill;
    ic.next_attempt_at_ms = ic.issued_at_ms + 60000;
    auto r = cs_->issue(std::vector<store::IssuedChallenge>{ic});
    EXPECT_TRUE(r.ok() && (*r)[0]);
    return ic.challenge;
  }

  ChallengeState state(const store::Meter& m) {
    auto s = cs_->status(m.row);
    EXPECT_TRUE(s.ok() && s->has_value());
    return s.ok() && *s ? (*s)->state : ChallengeState::queued;
  }

  std::string dir_;
  std::optional<store::KeyStore> ks_;
  std::optional<store::ChallengeStore> cs_;
  std::optional<HostEcKey> key_;
};

TEST_F(ChallengeStoreTest, RequestsNameUnknownSkipUnchallengeableAndKeepLiveOnes) {
  std::vector<std::string> ids = {"M1", "nope"};
  auto r = cs_->request(ids, false, "tester", wall_ms());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::not_found);
  EXPECT_NE(r.error().message().find("nope"), std::string::npos);
  auto none = cs_->status(meter("M1").row);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value()) << "an unknown id must leave nothing queued";

  ids = {"M1", "M3", "M1"};
  r = cs_->request(ids, false, "tester", wall_ms());
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->queued, 1);
  EXPECT_EQ(r->skipped_total, 1);
  ASSERT_EQ(r->skipped.size(), 1u);
  EXPECT_EQ(r->skipped[0].first, "M3");  // no registered public key
  r = cs_->request(ids, false, "tester", wall_ms());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->queued, 0);
  EXPECT_EQ(r->already, 1);
  // All unproven: M2 (M1 is live, M3 has no key).
  r = cs_->request({}, true, "tester", wall_ms());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->queued, 1);
  ASSERT_EQ(r->meter_ids.size(), 1u);
  EXPECT_EQ(r->meter_ids[0], "M2");
  auto due = cs_->due(wall_ms(), 10);
  ASSERT_TRUE(due.ok());
  EXPECT_EQ(due->size(), 2u);
}

TEST_F(ChallengeStoreTest, ExpiredWrongAndReplayedAnswersNeverProve) {
  const store::Meter m = meter("M1");
  std::vector<std::string> ids = {"M1"};
  ASSERT_TRUE(cs_->request(ids, false, "tester", wall_ms()).ok());

  // 1. Expired: a perfect answer arriving after expires_at is refused by the check and by the
  // store's own conditional update.
  const auto c1 = issue(m, 1000, 0x11);
  const auto a1 = answer(m, *key_, c1);
  const auto st1 = cs_->status(m.row).value().value();
  EXPECT_EQ(store::check_challenge_answer(m, st1.challenge, st1.expires_at_ms, a1, wall_ms()),
            ChallengeCheck::ok);
  EXPECT_EQ(store::check_challenge_answer(m, st1.challenge, st1.expires_at_ms, a1,
                                          st1.expires_at_ms + 1),
            ChallengeCheck::expired);
  EXPECT_FALSE(cs_->prove(proof_of(m, a1, st1.expires_at_ms + 1)).value());
  EXPECT_EQ(state(m), ChallengeState::sent);

  // 2. A retry draws a new challenge: the old (valid, signed) answer replayed does not prove it.
  const auto c2 = issue(m, 60000, 0x22);
  const auto st2 = cs_->status(m.row).value().value();
  EXPECT_EQ(st2.attempts, 2u);
  EXPECT_EQ(store::check_challenge_answer(m, st2.challenge, st2.expires_at_ms, a1, wall_ms()),
            ChallengeCheck::wrong_challenge);
  EXPECT_FALSE(cs_->prove(proof_of(m, a1, wall_ms())).value());

  // 3. Signed by another key: bad signature, whatever the challenge.
  auto other = HostEcKey::generate().value();
  const auto forged = answer(m, other, c2);
  EXPECT_EQ(store::check_challenge_answer(m, st2.challenge, st2.expires_at_ms, forged, wall_ms()),
            ChallengeCheck::bad_signature);
  // A signature over another meter's title does not carry over either.
  const store::Meter m2 = meter("M2");
  EXPECT_EQ(store::check_challenge_answer(m, st2.challenge, st2.expires_at_ms,
                                          answer(m2, *key_, c2), wall_ms()),
            ChallengeCheck::bad_signature);

  // 4. The right answer proves it once: the challenge is consumed, a replay proves nothing.
  const auto a2 = answer(m, *key_, c2);
  ASSERT_EQ(store::check_challenge_answer(m, st2.challenge, st2.expires_at_ms, a2, wall_ms()),
            ChallengeCheck::ok);
  const std::int64_t t = wall_ms();
  {
    auto tx = db::Transaction::begin(ks_->db()).value();
    EXPECT_TRUE(cs_->prove(proof_of(m, a2, t)).value());
    ASSERT_TRUE(tx.commit().ok());
  }
  const auto st3 = cs_->status(m.row).value().value();
  EXPECT_EQ(st3.state, ChallengeState::proven);
  EXPECT_TRUE(st3.challenge.empty()) << "a proven challenge must be consumed";
  EXPECT_FALSE(cs_->prove(proof_of(m, a2, wall_ms())).value());
  auto p = cs_->last_proof(m.row).value();
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(p->challenge, Bytes(c2.begin(), c2.end()));
  EXPECT_EQ(p->verified_at_ms, t);
  // A new request after a proof starts again from queued, with no challenge value.
  ASSERT_TRUE(cs_->request(ids, false, "tester", wall_ms()).ok());
  EXPECT_EQ(state(m), ChallengeState::queued);
  EXPECT_FALSE(cs_->prove(proof_of(m, a2, wall_ms())).value());
}

TEST_F(ChallengeStoreTest, KeyUpdatesNeedAProofAndNoFailedChallenge) {
  const store::Meter m = meter("M1");
  store::RolloverStore rs(*ks_);
  store::CampaignSpec spec;
  spec.created_by = "tester";
  std::vector<std::string> ids = {"M1"};
  auto started = rs.start(spec, ids, false);
  ASSERT_TRUE(started.ok()) << started.error().message();
  auto prepare = [&] {
    auto q = rs.next_queued(10).value();
    EXPECT_EQ(q.size(), 1u);
    if (q.empty()) return false;
    auto c = store::choose_rollover_slot(meter("M1"), q[0].reason).value();
    store::PreparedKey k;
    k.campaign = q[0].campaign;
    k.meter_row = q[0].meter_row;
    k.target_slot = c.target_slot;
    k.key_version = c.key_version;
    k.seal_slot = c.seal_slot;
    k.wrapped = Bytes(40, 0x5A);
    k.ephemeral_point.assign(key_->public_point().begin(), key_->public_point().end());
    return static_cast<bool>(rs.prepare(std::vector<store::PreparedKey>{k}).value()[0]);
  };
  EXPECT_FALSE(prepare()) << "no proof yet: no key update";
  // While its challenge is live, the step is not even handed out.
  ASSERT_TRUE(cs_->request(ids, false, "tester", wall_ms()).ok());
  EXPECT_TRUE(rs.next_queued(10).value().empty());
  const auto c = issue(m, 60000, 0x33);
  {
    auto tx = db::Transaction::begin(ks_->db()).value();
    ASSERT_TRUE(cs_->prove(proof_of(m, answer(m, *key_, c), wall_ms())).value());
    ASSERT_TRUE(tx.commit().ok());
  }
  // A later challenge that fails flags the meter: no key update despite the older proof.
  ASSERT_TRUE(cs_->request(ids, false, "tester", wall_ms()).ok());
  const auto c2 = issue(m, 60000, 0x44);
  ASSERT_TRUE(cs_->settle(m.row, ChallengeState::failed, "bad signature", ByteView(c2), wall_ms())
                  .value());
  EXPECT_FALSE(prepare()) << "a flagged meter must not be rekeyed";
  // The engine fails the step; resume queues it again (to be challenged anew).
  auto q = rs.next_queued(10).value();
  ASSERT_EQ(q.size(), 1u);
  std::vector<store::RolloverStore::Attempt> f = {
      {q[0].campaign, q[0].meter_row, 0, "challenge failed: bad signature"}};
  ASSERT_TRUE(rs.fail_queued(f).ok());
  auto failed = rs.steps_in_state(started->campaign, store::StepState::failed, 10).value();
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].second, "challenge failed: bad signature");
  EXPECT_EQ(rs.resume(started->campaign).value(), 1);
  EXPECT_EQ(rs.progress(started->campaign).value().queued, 1);
  // Proven again: now it may be prepared.
  ASSERT_TRUE(cs_->request(ids, false, "tester", wall_ms()).ok());
  const auto c3 = issue(m, 60000, 0x55);
  {
    auto tx = db::Transaction::begin(ks_->db()).value();
    ASSERT_TRUE(cs_->prove(proof_of(m, answer(m, *key_, c3), wall_ms())).value());
    ASSERT_TRUE(tx.commit().ok());
  }
  EXPECT_TRUE(prepare());
}

// ---- end to end -----------------------------------------------------------------------------

RolloverRigOptions rig_options(std::size_t meters) {
  RolloverRigOptions o;
  o.meters = meters;
  o.processes = 1;
  return o;
}

TEST(Challenge, OneMeterIsProvenAndItsProofVerifiesIndependently) {
  RolloverRig rig(rig_options(3));
  ASSERT_TRUE(rig.setup().ok());
  ASSERT_TRUE(rig.start_dkusd().ok()) << rig.logs();
  auto r = rig.gridseal("meters challenge SIM00000001 --wait --timeout 20 --json");
  ASSERT_EQ(r.code, 0) << r.out << rig.logs();
  EXPECT_EQ(json_number(r.out, "queued"), 1) << r.out;
  EXPECT_EQ(json_number(r.out, "proven"), 1) << r.out;
  EXPECT_EQ(json_number(r.out, "failed"), 0) << r.out;
  EXPECT_NE(r.out.find("\"signature\":\""), std::string::npos) << r.out;

  // The stored proof, checked here with the registered public key and nothing of gridseal's
  // but the profile's byte layout.
  auto ks = rig.store();
  ASSERT_TRUE(ks.ok());
  const store::Meter m = ks->meter_by_id("SIM00000001").value().value();
  store::ChallengeStore cs(*ks);
  auto proof = cs.last_proof(m.row).value();
  ASSERT_TRUE(proof.has_value());
  ASSERT_EQ(proof->challenge.size(), 16u);
  ASSERT_EQ(proof->signature.size(), 64u);
  EXPECT_NE(proof->challenge, Bytes(16, 0)) << "challenge not random";
  Bytes signed_bytes = {'G', 'S', 'C', '1', static_cast<std::uint8_t>(m.ap_title.size())};
  signed_bytes.insert(signed_bytes.end(), m.ap_title.begin(), m.ap_title.end());
  signed_bytes.insert(signed_bytes.end(), proof->challenge.begin(), proof->challenge.end());
  for (int shift = 24; shift >= 0; shift -= 8) {
    signed_bytes.push_back(static_cast<std::uint8_t>(proof->meter_time >> shift));
  }
  auto pub = HostEcKey::from_public(m.public_key).value();
  EXPECT_TRUE(pub.verify(sha256(signed_bytes).value(), proof->signature).ok());
  EXPECT_LE(std::llabs(proof->meter_time - static_cast<long long>(utc_now_s())), 60);
  const auto st = cs.status(m.row).value().value();
  EXPECT_EQ(st.state, ChallengeState::proven);
  EXPECT_TRUE(st.challenge.empty());
  // The other meters were not challenged.
  EXPECT_FALSE(cs.status(ks->meter_by_id("SIM00000002").value()->row).value().has_value());

  auto show = rig.gridseal("meters show SIM00000001");
  EXPECT_EQ(show.code, 0);
  EXPECT_NE(show.out.find("challenge   proven"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find(to_hex(proof->signature)), std::string::npos) << show.out;
  const std::string metrics = rig.metrics();
  EXPECT_NE(metrics.find("gridseal_challenge_results_total{worker=\"0\",outcome=\"proven\"} 1"),
            std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("gridseal_challenge_sent_total{worker=\"0\"} 1"), std::string::npos);
  // Issue 7: the proof is in the audit trail (committed with it), and so is the receipt the
  // answer carried; the chain verifies.
  const auto proven = audit_records(ks->db(), "challenge_proven");
  ASSERT_EQ(proven.size(), 1u);
  EXPECT_EQ(proven[0].subject, "SIM00000001");
  EXPECT_EQ(proven[0].actor, "system");
  EXPECT_EQ(count_for(audit_records(ks->db(), "receipt"), "SIM00000001"), 1u);
  auto v = rig.gridseal("audit verify --json");
  EXPECT_EQ(v.code, 0) << v.out;
  EXPECT_NE(v.out.find("\"ok\":true"), std::string::npos) << v.out;
}

TEST(Challenge, MeterWithoutTheRegisteredKeyIsFlaggedAndNotRekeyed) {
  RolloverRig rig(rig_options(3));
  ASSERT_TRUE(rig.setup().ok());
  // SIM00000002's registration carries someone else's public key: the meter cannot sign for it.
  {
    auto ks = rig.store();
    ASSERT_TRUE(ks.ok());
    auto wrong = HostEcKey::generate().value();
    auto up = ks->db().prepare("UPDATE meters SET public_key = ?1 WHERE meter_id = 'SIM00000002'");
    ASSERT_TRUE(up.ok());
    up->bind(1, ByteView(wrong.public_point()));
    ASSERT_TRUE(up->run().ok());
  }
  ASSERT_TRUE(rig.start_dkusd().ok()) << rig.logs();
  auto r = rig.gridseal("meters challenge SIM00000002 --wait --timeout 20 --json");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(json_number(r.out, "failed"), 1) << r.out << rig.logs();
  EXPECT_NE(r.out.find("\"flagged\":true"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("bad signature"), std::string::npos) << r.out;
  auto list = rig.gridseal("meters list");
  EXPECT_NE(list.out.find("FLAGGED"), std::string::npos) << list.out;
  EXPECT_NE(
      rig.metrics().find("gridseal_challenge_results_total{worker=\"0\",outcome=\"flagged\"} 1"),
      std::string::npos);

  // A rollover of both: SIM00000001 is challenged automatically first, then rekeyed;
  // SIM00000002 is challenged again (its failure predates the campaign), fails again, and its
  // step fails without any key having been derived or sent.
  auto start = rig.gridseal("rollover start --meters SIM00000001 SIM00000002 --json");
  ASSERT_EQ(start.code, 0) << start.out;
  const std::int64_t campaign = json_number(start.out, "campaign");
  auto p = rig.wait_campaign(campaign, 30s);
  ASSERT_TRUE(p.ok()) << p.error().message() << rig.logs();
  EXPECT_EQ(p->confirmed, 1);
  EXPECT_EQ(p->failed, 1);
  auto ks = rig.store();
  ASSERT_TRUE(ks.ok());
  store::RolloverStore rs(*ks);
  auto failed = rs.steps_in_state(campaign, store::StepState::failed, 10).value();
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0].first, "SIM00000002");
  EXPECT_EQ(failed[0].second, "challenge failed: bad signature");
  const store::Meter m2 = ks->meter_by_id("SIM00000002").value().value();
  ASSERT_EQ(m2.slots.size(), 1u) << "no pending key may exist for a flagged meter";
  EXPECT_EQ(m2.slots[0].state, store::KeyState::active);
  EXPECT_EQ(m2.slots[0].key_version, 1u);
  const store::Meter m1 = ks->meter_by_id("SIM00000001").value().value();
  ASSERT_NE(m1.active_slot(), nullptr);
  EXPECT_EQ(m1.active_slot()->key_version, 2u);
  store::ChallengeStore cs(*ks);
  auto st1 = cs.status(m1.row).value();
  ASSERT_TRUE(st1.has_value());
  EXPECT_EQ(st1->state, ChallengeState::proven);
  EXPECT_EQ(st1->origin, store::ChallengeOrigin::rollover);
  // Issue 7: each failure is an audit record naming the reason (the operator's challenge; the
  // campaign's too unless the first failure fell in the second the step was queued, which then
  // counts as this step's), and so is the failed step; no key_pending record for the flagged
  // meter.
  const auto failed_records = audit_records(ks->db(), "challenge_failed");
  ASSERT_GE(count_for(failed_records, "SIM00000002"), 1u);
  EXPECT_EQ(count_for(failed_records, "SIM00000002"), failed_records.size());
  EXPECT_NE(failed_records[0].detail.find("bad signature"), std::string::npos)
      << failed_records[0].detail;
  EXPECT_EQ(count_for(audit_records(ks->db(), "rollover_failed"), "SIM00000002"), 1u);
  EXPECT_EQ(count_for(audit_records(ks->db(), "key_pending"), "SIM00000002"), 0u);
  EXPECT_EQ(count_for(audit_records(ks->db(), "key_pending"), "SIM00000001"), 1u);
  EXPECT_EQ(count_for(audit_records(ks->db(), "key_confirmed"), "SIM00000001"), 1u);
  EXPECT_EQ(count_for(audit_records(ks->db(), "challenge_proven"), "SIM00000001"), 1u);
  auto v = rig.gridseal("audit verify --json");
  EXPECT_EQ(v.code, 0) << v.out;
  EXPECT_NE(v.out.find("\"ok\":true"), std::string::npos) << v.out;
}

TEST(Challenge, AnAnswerAfterTheChallengeExpiredIsRefused) {
  RolloverRigOptions o = rig_options(2);
  o.latency_ms = 1500;  // every answer arrives after the 1 s the challenge is valid
  o.rollover_lines = {"challenge_ttl_s = 1", "max_attempts = 2"};
  RolloverRig rig(o);
  ASSERT_TRUE(rig.setup().ok());
  ASSERT_TRUE(rig.start_dkusd().ok()) << rig.logs();
  auto r = rig.gridseal("meters challenge SIM00000001 --wait --timeout 30 --json");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(json_number(r.out, "unanswered"), 1) << r.out << rig.logs();
  EXPECT_EQ(json_number(r.out, "proven"), 0) << r.out;
  EXPECT_NE(r.out.find("challenge expired"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"flagged\":false"), std::string::npos) << "late is not forged";
  auto ks = rig.store();
  ASSERT_TRUE(ks.ok());
  store::ChallengeStore cs(*ks);
  const store::Meter m = ks->meter_by_id("SIM00000001").value().value();
  EXPECT_FALSE(cs.last_proof(m.row).value().has_value());
  EXPECT_EQ(cs.status(m.row).value()->attempts, 2u);
}

}  // namespace
}  // namespace gs::test
