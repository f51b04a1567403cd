// `gridseal meters reinstate` (issue 7): lifting a revocation never returns a
// revoked key to service. The store rules (src/meter_reinstate.h) and, with the
// real gridseal-sesd, that the SES serves a reinstated meter again only when it
// holds a key that was never revoked.
#include <gtest/gtest.h>

#include <filesystem>

#include "src/key_store.h"
#include "src/meter_reinstate.h"
#include "src/rollover_store.h"
#include "tests/unit/sesd_fixture.h"

namespace {

using gs::store::MeterState;

const gs::Bytes kReadSt1 = {0x30, 0x00, 0x01};

class Reinstate : public ::testing::Test {
protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-reinstate-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto ks = gs::store::KeyStore::open(dir_ + "/s.db");
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    ks_.emplace(std::move(ks).value());
    std::vector<gs::store::NewMeter> fleet;
    for (int i = 1; i <= 4; ++i) {
      gs::store::NewMeter m;
      m.meter_id = "M" + std::to_string(i);
      m.ap_title = {0x2a, static_cast<std::uint8_t>(i)};
      m.ap_title_text = "1.2." + std::to_string(i);
      if (i != 4) { // M4 has no registered public key
        m.public_key.assign(65, static_cast<std::uint8_t>(i));
        m.public_key[0] = 0x04;
      }
      m.wrapped_key.assign(24, static_cast<std::uint8_t>(0x10 + i));
      m.origin = "plain";
      fleet.push_back(std::move(m));
    }
    ASSERT_TRUE(ks_->import_meters(fleet).ok());
  }
  void TearDown() override {
    ks_.reset();
    std::filesystem::remove_all(dir_);
  }

  // reinstate_meter inside a transaction committed only when it succeeds (as
  // `audited` does).
  gs::Result<gs::store::ReinstateOutcome> reinstate(const std::string &id,
                                                    bool lift = false) {
    GS_ASSIGN(auto tx, gs::db::Transaction::begin(ks_->db()));
    GS_ASSIGN(auto r, gs::store::reinstate_meter(*ks_, id, "false alarm",
                                                 "operator:ann", lift));
    GS_TRY(tx.commit());
    return r;
  }
  gs::store::Meter meter(const std::string &id) {
    return **ks_->meter_by_id(id);
  }

  std::string dir_;
  std::optional<gs::store::KeyStore> ks_;
};

TEST_F(Reinstate, QuarantinedMeterGetsANewRekeyNeverItsRevokedKey) {
  auto active = reinstate("M1");
  ASSERT_FALSE(active.ok());
  EXPECT_EQ(active.error().code, gs::Errc::conflict);
  EXPECT_NE(active.error().detail.find("not revoked"), std::string::npos);
  EXPECT_EQ(reinstate("nope").error().code, gs::Errc::not_found);

  gs::store::RolloverStore rs(*ks_);
  auto rv = rs.revoke_key("M1", "suspected", "operator:bob");
  ASSERT_TRUE(rv.ok());
  // Its rekey is under way: nothing to lift.
  auto busy = reinstate("M1");
  ASSERT_FALSE(busy.ok());
  EXPECT_NE(busy.error().detail.find("already being rekeyed (campaign 1"),
            std::string::npos)
      << busy.error().detail;
  ASSERT_TRUE(rs.abort(rv->campaign).ok());

  auto r = reinstate("M1");
  ASSERT_TRUE(r.ok()) << r.error().detail;
  EXPECT_EQ(r->before, MeterState::quarantined);
  EXPECT_EQ(r->after, MeterState::quarantined);
  EXPECT_EQ(r->campaign, 2);
  EXPECT_EQ(r->seal_slot, 0);
  EXPECT_FALSE(r->proven); // no MT-2043 proof yet: the rekey waits for one
  const auto m = meter("M1");
  EXPECT_EQ(m.state, MeterState::quarantined);
  EXPECT_EQ(m.state_reason, "reinstated: false alarm");
  ASSERT_EQ(m.slots.size(), 1U);
  EXPECT_EQ(m.slots[0].state,
            gs::store::KeyState::compromised); // never active again
  auto c = rs.campaign(2);
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->reason, gs::store::CampaignReason::revocation);
  EXPECT_EQ((*c)->created_by, "operator:ann");
  auto queued = rs.next_queued(10);
  ASSERT_TRUE(queued.ok());
  ASSERT_EQ(queued->size(), 1U);
  EXPECT_EQ((*queued)[0].campaign, 2);
  EXPECT_EQ((*queued)[0].seal_slot, 0);
  // The same request again is refused (an approved request run twice changes
  // nothing).
  EXPECT_EQ(reinstate("M1").error().code, gs::Errc::conflict);
}

TEST_F(Reinstate, PermanentRevocationStaysUnlessLiftedAndNeedsAPublicKey) {
  ASSERT_TRUE(ks_->revoke("M2", "stolen").ok());
  auto refused = reinstate("M2");
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().detail.find("revoked permanently"),
            std::string::npos);
  EXPECT_EQ(meter("M2").state, MeterState::compromised);

  auto lifted = reinstate("M2", true);
  ASSERT_TRUE(lifted.ok()) << lifted.error().detail;
  EXPECT_EQ(lifted->before, MeterState::compromised);
  EXPECT_EQ(lifted->after, MeterState::quarantined);
  EXPECT_GT(lifted->campaign, 0);
  const auto m = meter("M2");
  EXPECT_EQ(m.state, MeterState::quarantined);
  EXPECT_EQ(m.slots[0].state, gs::store::KeyState::compromised);
  EXPECT_EQ(m.active_slot(), nullptr);

  // No public key: it cannot be rekeyed, so it stays revoked and nothing is
  // written.
  ASSERT_TRUE(ks_->revoke("M4", "stolen").ok());
  auto nokey = reinstate("M4", true);
  ASSERT_FALSE(nokey.ok());
  EXPECT_EQ(nokey.error().code, gs::Errc::invalid_argument);
  EXPECT_EQ(meter("M4").state, MeterState::compromised);
  gs::store::RolloverStore rs(*ks_);
  auto all = rs.campaigns(10);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 1U); // only M2's
}

TEST_F(Reinstate, QuarantinedMeterWithAReplacedKeyIsServedAgain) {
  ASSERT_TRUE(
      ks_->db()
          .exec("UPDATE meters SET state = 'quarantined' WHERE meter_id = 'M3'")
          .ok());
  auto r = reinstate("M3");
  ASSERT_TRUE(r.ok()) << r.error().detail;
  EXPECT_EQ(r->after, MeterState::active);
  EXPECT_EQ(r->campaign, 0);
  EXPECT_EQ(meter("M3").state, MeterState::active);
}

// The CLI (operator gate, audit trail) and the real SES: a meter is served
// after reinstatement only when its key is one that was never revoked; a
// permanently revoked one stays refused.
TEST(ReinstateSesd, SesServesAReinstatedMeterOnlyWithAnUnrevokedKey) {
  gs::test::SesdOptions o;
  o.meters = 2;
  o.server_lines = {"processes = 1"};
  gs::test::SesdDaemon d(o);
  ASSERT_TRUE(d.setup().ok());
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  auto read_code = [&](std::size_t meter, std::uint32_t id) {
    auto c = d.connect();
    if (!c.ok())
      return -100;
    auto r = (*c)->call(
        gs::test::sesd_request(d.meter_title(meter), id, {kReadSt1}));
    if (!r.ok())
      return -101;
    if (gs::test::check_secured(*r, d.meter_key(meter), d.pub_hex()).ok())
      return 0;
    return gs::test::error_reply(*r).code;
  };
  EXPECT_EQ(read_code(1, 1), 0);

  // M1 quarantined while it holds its active key (what a confirmed rekey
  // leaves).
  {
    auto ks =
        gs::store::KeyStore::open(d.dir() + "/gridseal.db", {.create = false});
    ASSERT_TRUE(ks.ok());
    ASSERT_TRUE(
        ks->db()
            .exec(
                "UPDATE meters SET state = 'quarantined' WHERE meter_id = 'M1'")
            .ok());
  }
  EXPECT_EQ(read_code(1, 2), gs::c1222::kRespIsc);
  gs::test::CmdResult r =
      d.gridseal("meters reinstate M1 --reason \"key replaced\"");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("it is served again"), std::string::npos) << r.out;
  EXPECT_EQ(read_code(1, 3), 0);
  gs::test::CmdResult again = d.gridseal("meters reinstate M1 --reason again");
  EXPECT_EQ(again.code, 1) << again.out;
  EXPECT_NE(again.out.find("not revoked"), std::string::npos) << again.out;

  // M2 revoked for good: refused, with or without --lift-permanent (no key to
  // rekey it with).
  ASSERT_EQ(d.gridseal("meters revoke M2 --reason stolen --permanent").code, 0);
  gs::test::CmdResult p =
      d.gridseal("meters reinstate M2 --reason found --json");
  EXPECT_EQ(p.code, 1) << p.out;
  EXPECT_NE(p.out.find("stays refused"), std::string::npos) << p.out;
  gs::test::CmdResult l =
      d.gridseal("meters reinstate M2 --reason found --lift-permanent");
  EXPECT_EQ(l.code, 1) << l.out;
  EXPECT_NE(l.out.find("no registered public key"), std::string::npos) << l.out;
  EXPECT_EQ(read_code(2, 4), gs::c1222::kRespIsc);

  gs::test::CmdResult trail = d.gridseal("audit export --since 0");
  ASSERT_EQ(trail.code, 0) << trail.out;
  std::size_t n = 0;
  for (auto at = trail.out.find("meter_reinstated"); at != std::string::npos;
       at = trail.out.find("meter_reinstated", at + 1)) {
    ++n;
  }
  EXPECT_EQ(n, 1U) << trail.out;
  EXPECT_NE(trail.out.find("\\\"to\\\":\\\"active\\\""), std::string::npos)
      << trail.out;
  EXPECT_EQ(d.stop(), 0) << d.err_log();
}

} // namespace
