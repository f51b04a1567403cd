// End-to-end tests of `gridseal rollover` against a real SoftHSM2 token and a fleet imported with
// `gridseal meters import`: start (named, file, all), status (human, --json, --watch), list,
// abort, resume, and the refusals (bad arguments, unknown meters and campaigns).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "gridseal/bytes.h"
#include "src/host_ecdsa.h"
#include "src/rollover_store.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;

using gs::test::CmdResult;

class RolloverCli : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-cli-rollover-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-test\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
    CmdResult init = run("hsm init");
    ASSERT_EQ(init.code, 0) << init.out;
    // M0..M4 with a registered public key, M9 without.
    std::ofstream f(dir_ + "/fleet.csv");
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (int i = 0; i < 5; ++i) {
      auto k = gs::HostEcKey::generate();
      ASSERT_TRUE(k.ok());
      f << "M" << i << ",.7." << (i + 1) << "," << gs::to_hex(k->public_point())
        << ",0,plain:00112233445566778899aabbccddee" << (10 + i) << "\n";
    }
    f << "M9,.7.99,,0,plain:ffeeddccbbaa99887766554433221100\n";
    f.close();
    CmdResult imp = run("meters import " + dir_ + "/fleet.csv");
    ASSERT_EQ(imp.code, 0) << imp.out;
  }
  void TearDown() override { fs::remove_all(dir_); }

  CmdResult run(const std::string& args) {
    // Bounded: a --watch that never ends fails the test instead of hanging it.
    return gs::test::run_command("timeout 60 " + std::string(GS_BIN_DIR) + "/gridseal " + args +
                                 " --config " + conf_);
  }

  // The engine's side, through the same store (as gridseal-dkusd would do it).
  gs::store::KeyStore store() {
    auto ks = gs::store::KeyStore::open(dir_ + "/gridseal.db", {.create = false});
    EXPECT_TRUE(ks.ok()) << ks.error().message();
    return std::move(*ks);
  }
  static void prepare_queued(gs::store::KeyStore& ks) {
    // The meters proved their keys first (MT-2043), as the engine requires before a first key
    // update; recorded as the engine records a proof.
    ASSERT_TRUE(ks.db()
                    .exec("INSERT OR IGNORE INTO challenge_proofs SELECT row, randomblob(16), 0, "
                          "zeroblob(64), 0, 0 FROM meters")
                    .ok());
    gs::store::RolloverStore rs(ks);
    auto q = rs.next_queued(100);
    ASSERT_TRUE(q.ok());
    std::vector<gs::store::PreparedKey> keys;
    for (const auto& w : *q) {
      auto m = ks.meter_by_row(w.meter_row);
      ASSERT_TRUE(m.ok() && m->has_value());
      auto c = gs::store::choose_rollover_slot(**m, w.reason);
      ASSERT_TRUE(c);
      gs::store::PreparedKey k;
      k.campaign = w.campaign;
      k.meter_row = w.meter_row;
      k.target_slot = c->target_slot;
      k.key_version = c->key_version;
      k.seal_slot = c->seal_slot;
      k.wrapped = gs::Bytes(24, 0x42);
      k.ephemeral_point = gs::Bytes(65, 0x04);
      keys.push_back(std::move(k));
    }
    auto r = rs.prepare(keys);
    ASSERT_TRUE(r.ok()) << r.error().message();
  }
  static std::int64_t row_of(gs::store::KeyStore& ks, const std::string& id) {
    auto m = ks.meter_by_id(id);
    EXPECT_TRUE(m.ok() && m->has_value());
    return m.ok() && m->has_value() ? (*m)->row : 0;
  }

  std::string dir_;
  std::string conf_;
};

bool has(const std::string& out, const std::string& what) {
  return out.find(what) != std::string::npos;
}

TEST_F(RolloverCli, StartStatusListAbortResume) {
  CmdResult none = run("rollover list");
  ASSERT_EQ(none.code, 0) << none.out;
  EXPECT_TRUE(has(none.out, "no rollover campaigns")) << none.out;
  EXPECT_EQ(run("rollover list --json").out, "[]\n");
  CmdResult nost = run("rollover status");
  EXPECT_EQ(nost.code, 1);
  EXPECT_TRUE(has(nost.out, "no rollover campaign yet")) << nost.out;

  CmdResult a = run("rollover start --meters M0 M1 --rate 5");
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_TRUE(has(a.out, "campaign 1 started: 2 meters queued, 0 skipped")) << a.out;
  EXPECT_TRUE(has(a.out, "gridseal-dkusd")) << a.out;
  EXPECT_TRUE(has(a.out, "5 meters/s")) << a.out;

  CmdResult b = run("rollover start --all --json");
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_TRUE(has(b.out, "{\"campaign\":2,\"added\":3,\"skipped_total\":3,\"skipped\":[")) << b.out;
  EXPECT_TRUE(
      has(b.out, "{\"meter_id\":\"M0\",\"reason\":\"already in campaign 1 (step queued)\"}"))
      << b.out;
  EXPECT_TRUE(has(b.out, "{\"meter_id\":\"M9\",\"reason\":\"no registered public key\"}")) << b.out;

  CmdResult s1 = run("rollover status 1 --json");
  ASSERT_EQ(s1.code, 0) << s1.out;
  EXPECT_TRUE(has(s1.out,
                  "\"campaign\":{\"id\":1,\"state\":\"running\",\"reason\":\"operator\","
                  "\"rate_per_hour\":18000,\"created_by\":\"bootstrap:"))
      << s1.out;
  EXPECT_TRUE(has(s1.out,
                  "\"total\":2},\"queued\":2,\"prepared\":0,\"in_flight\":0,\"sent\":0,"
                  "\"confirmed\":0,\"failed\":0,\"aborted\":0"))
      << s1.out;
  EXPECT_TRUE(has(s1.out, "\"eta_seconds\":null,\"finished\":false,\"failed_meters\":[]"))
      << s1.out;

  CmdResult s2 = run("rollover status");  // the newest: 2
  ASSERT_EQ(s2.code, 0) << s2.out;
  EXPECT_TRUE(has(s2.out, "campaign 2: running (operator rollover)")) << s2.out;
  EXPECT_TRUE(has(s2.out, "0/3 confirmed | queued 3, in flight 0")) << s2.out;
  EXPECT_TRUE(has(s2.out, "as fast as the DKUS goes")) << s2.out;

  CmdResult l = run("rollover list --json");
  ASSERT_EQ(l.code, 0) << l.out;
  EXPECT_LT(l.out.find("\"id\":2"), l.out.find("\"id\":1")) << "newest first: " << l.out;
  CmdResult lh = run("rollover list");
  ASSERT_EQ(lh.code, 0) << lh.out;
  EXPECT_TRUE(has(lh.out, "running")) << lh.out;

  CmdResult ab = run("rollover abort 1");
  ASSERT_EQ(ab.code, 0) << ab.out;
  EXPECT_TRUE(has(ab.out, "campaign 1: running -> aborted; 2 steps aborted")) << ab.out;
  CmdResult ab2 = run("rollover abort 1 --json");
  ASSERT_EQ(ab2.code, 0) << ab2.out;
  EXPECT_TRUE(has(ab2.out, "\"changed\":0,\"state_before\":\"aborted\",\"state\":\"aborted\""))
      << ab2.out;
  // Aborted with nothing in flight: --watch ends at once with the report.
  CmdResult w = run("rollover status 1 --watch --interval-ms 100");
  ASSERT_EQ(w.code, 0) << w.out;
  EXPECT_TRUE(has(w.out, "campaign 1: aborted")) << w.out;
  EXPECT_TRUE(has(w.out, "aborted 2")) << w.out;

  // M0 is free again.
  CmdResult c = run("rollover start --meters M0");
  ASSERT_EQ(c.code, 0) << c.out;
  EXPECT_TRUE(has(c.out, "campaign 3 started: 1 meter queued")) << c.out;
  // Resume of 1 re-queues M1 only (M0 is in campaign 3 now).
  CmdResult r = run("rollover resume 1 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(has(r.out,
                  "{\"campaign\":1,\"changed\":1,\"state_before\":\"aborted\","
                  "\"state\":\"running\",\"queued\":1"))
      << r.out;
  CmdResult r2 = run("rollover resume 1");
  ASSERT_EQ(r2.code, 0) << r2.out;
  EXPECT_TRUE(has(r2.out, "campaign 1: running -> running; 0 steps back in work")) << r2.out;
}

TEST_F(RolloverCli, WatchFollowsTheEngineAndListsFailedMeters) {
  CmdResult a = run("rollover start --meters M0 M1 M2");
  ASSERT_EQ(a.code, 0) << a.out;
  auto ks = store();
  prepare_queued(ks);
  CmdResult s = run("rollover status 1");
  EXPECT_TRUE(has(s.out, "0/3 confirmed | queued 0, in flight 3 (sent 0)")) << s.out;

  gs::store::RolloverStore rs(ks);
  std::vector<gs::store::RolloverStore::Attempt> f = {
      {1, row_of(ks, "M2"), 0, "no answer after 5 attempts"}};
  ASSERT_TRUE(rs.fail(f).ok());
  ASSERT_TRUE(rs.confirm(row_of(ks, "M0"), 1, 2).value());

  // --watch (stdout is a pipe: one line per refresh) until the last meter in flight confirms.
  auto watch = std::async(std::launch::async,
                          [&] { return run("rollover status --watch --interval-ms 100"); });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  ASSERT_EQ(watch.wait_for(std::chrono::milliseconds(0)), std::future_status::timeout)
      << "--watch ended while a meter was in flight";
  ASSERT_TRUE(rs.confirm(row_of(ks, "M1"), 1, 2).value());
  CmdResult w = watch.get();
  ASSERT_EQ(w.code, 0) << w.out;
  EXPECT_TRUE(has(w.out, "1/3 confirmed | queued 0, in flight 1")) << w.out;
  EXPECT_TRUE(has(w.out, "campaign 1: done")) << w.out;
  EXPECT_TRUE(has(w.out, "2/3 confirmed")) << w.out;
  EXPECT_TRUE(has(w.out, "failed meters (1; `gridseal rollover resume 1` retries them):")) << w.out;
  EXPECT_TRUE(has(w.out, "  M2: no answer after 5 attempts")) << w.out;
  CmdResult j = run("rollover status 1 --json");
  EXPECT_TRUE(has(j.out, "\"confirmed\":2,\"failed\":1")) << j.out;
  EXPECT_TRUE(has(j.out,
                  "\"failed_meters\":[{\"meter_id\":\"M2\",\"error\":\"no answer after 5 "
                  "attempts\"}]"))
      << j.out;
  EXPECT_TRUE(has(j.out, "\"eta_seconds\":0,\"finished\":true")) << j.out;

  // Resume puts the failed meter back in flight; the campaign runs again.
  CmdResult r = run("rollover resume");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(has(r.out, "campaign 1: done -> running; 1 step back in work (failed: 1 -> 0"))
      << r.out;
  CmdResult m = run("meters show M0");
  EXPECT_TRUE(has(m.out, "slot 1      key id 1, version 2, active, from rollover")) << m.out;
  EXPECT_TRUE(has(m.out, "slot 0      key id 0, version 1, standby")) << m.out;
}

TEST_F(RolloverCli, FileOfMeterIds) {
  std::ofstream(dir_ + "/ids.txt") << "# meters of feeder 12\nM0   # first\n\n  M1\t\r\nM2";
  CmdResult a = run("rollover start --file " + dir_ + "/ids.txt --json");
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_TRUE(has(a.out, "\"added\":3,\"skipped_total\":0")) << a.out;

  std::ofstream(dir_ + "/long.txt") << "M3\n" << std::string(65, 'x') << "\n";
  CmdResult l = run("rollover start --file " + dir_ + "/long.txt");
  EXPECT_EQ(l.code, 1);
  EXPECT_TRUE(has(l.out, "long.txt:2: meter id longer than 64")) << l.out;
  std::ofstream(dir_ + "/huge-line.txt") << "M3 #" << std::string(10000, 'c') << "\n";
  CmdResult h = run("rollover start --file " + dir_ + "/huge-line.txt");
  EXPECT_EQ(h.code, 1);
  EXPECT_TRUE(has(h.out, "huge-line.txt:1: line longer than 4096 bytes")) << h.out;
  std::ofstream(dir_ + "/empty.txt") << "# nothing\n\n";
  CmdResult e = run("rollover start --file " + dir_ + "/empty.txt");
  EXPECT_EQ(e.code, 1);
  EXPECT_TRUE(has(e.out, "no meter ids")) << e.out;
  CmdResult m = run("rollover start --file " + dir_ + "/missing.txt");
  EXPECT_EQ(m.code, 1);
  EXPECT_TRUE(has(m.out, "cannot read")) << m.out;
  // Nothing of the refused files was started.
  CmdResult list = run("rollover list --json");
  EXPECT_FALSE(has(list.out, "\"id\":2")) << list.out;
}

TEST_F(RolloverCli, BadArgumentsUnknownMetersAndCampaigns) {
  for (const char* args :
       {"rollover start", "rollover start --meters M0 --all", "rollover start --all --file x",
        "rollover start --all --rate -1", "rollover start --all --rate abc",
        "rollover start --all --rate 0.0001", "rollover start --all --rate 2000000",
        "rollover abort", "rollover abort 0", "rollover status abc", "rollover status -3",
        "rollover status --interval-ms 5 --watch", "rollover nope", "rollover list --limit 0"}) {
    CmdResult r = run(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.out;
  }
  CmdResult u = run("rollover start --meters M0 nope");
  EXPECT_EQ(u.code, 1);
  EXPECT_TRUE(has(u.out, "no meter nope")) << u.out;
  CmdResult n = run("rollover start --meters M9");
  EXPECT_EQ(n.code, 1);
  EXPECT_TRUE(has(n.out, "M9 no registered public key")) << n.out;
  EXPECT_EQ(run("rollover list --json").out, "[]\n") << "a refused start created a campaign";
  for (const char* args : {"rollover abort 99", "rollover resume 99", "rollover status 99"}) {
    CmdResult r = run(args);
    EXPECT_EQ(r.code, 1) << args << "\n" << r.out;
    EXPECT_TRUE(has(r.out, "no rollover campaign 99")) << args << "\n" << r.out;
  }
  CmdResult cfg = gs::test::run_gridseal("rollover list --config " + dir_ + "/absent.toml");
  EXPECT_EQ(cfg.code, 1) << cfg.out;
}

}  // namespace
