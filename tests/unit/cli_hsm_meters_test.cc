// End-to-end tests of `gridseal hsm` and `gridseal meters` against a real SoftHSM2 token created
// in a temp dir: idempotent init, attributes, import idempotence/conflicts/line numbers, no key
// bytes in any output, clear errors, kill -9 during a large import, and revocation (key
// compromise with a rekey, or permanent).
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "gridseal/bytes.h"
#include "src/host_ecdsa.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;

using gs::test::CmdResult;

CmdResult run(const std::string& args) { return gs::test::run_gridseal(args); }

class CliHsm : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-cli-hsm-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-test\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string cfg() const { return " --config " + conf_; }

  // Writes a fleet file; returns the plain keys it contains (hex).
  std::vector<std::string> write_fleet(const std::string& path, int n, int first = 0) {
    std::mt19937_64 rng(42 + static_cast<unsigned>(first));
    std::vector<std::string> keys;
    std::ofstream f(path);
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (int i = first; i < first + n; ++i) {
      gs::Bytes k(16);
      for (auto& b : k) b = static_cast<std::uint8_t>(rng());
      keys.push_back(gs::to_hex(k));
      f << "M" << i << ",.7." << (i + 1) << ",,0,plain:" << keys.back() << "\n";
    }
    return keys;
  }

  std::string dir_;
  std::string conf_;
};

// With hsm.command_key_session_copy = false the command keys are made CKA_MODIFIABLE=false
// like the others (the daemons then sign with the token key).
TEST_F(CliHsm, InitWithoutSessionCopiesMakesFixedCommandKeys) {
  std::ofstream(conf_, std::ios::trunc)
      << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-test\"\n"
         "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
         "command_key_session_copy = false\n[store]\npath = \"gridseal.db\"\n";
  CmdResult a = run("hsm init" + cfg());
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_EQ(a.out.find("session-copyable"), std::string::npos) << a.out;
  CmdResult s = run("hsm status --json" + cfg());
  ASSERT_EQ(s.code, 0) << s.out;
  EXPECT_NE(s.out.find("\"label\":\"gs-cmd-1\",\"class\":\"private\",\"token\":true,"
                       "\"private\":true,\"modifiable\":false"),
            std::string::npos)
      << s.out;
  EXPECT_EQ(s.out.find("\"class\":\"private\",\"token\":true,\"private\":true,"
                       "\"modifiable\":true"),
            std::string::npos)
      << s.out;
}

TEST_F(CliHsm, InitIsIdempotentAndObjectsAreLockedDown) {
  CmdResult a = run("hsm init" + cfg());
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("created gs-kek"), std::string::npos) << a.out;
  EXPECT_NE(a.out.find("created gs-cmd-2"), std::string::npos);
  struct stat st {};
  ASSERT_EQ(stat((dir_ + "/hsm/user.pin").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  CmdResult b = run("hsm init" + cfg());
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_NE(b.out.find("nothing to do"), std::string::npos) << b.out;
  EXPECT_EQ(b.out.find("created"), std::string::npos);

  CmdResult s = run("hsm status --json" + cfg());
  ASSERT_EQ(s.code, 0) << s.out;
  // Every private/secret object is sensitive and non-extractable; the KEK is trusted.
  EXPECT_NE(s.out.find("\"label\":\"gs-kek\",\"class\":\"secret\",\"token\":true,\"private\":true,"
                       "\"modifiable\":false,\"sensitive\":true,\"extractable\":false,"
                       "\"trusted\":true,\"encrypt\":false,\"decrypt\":false"),
            std::string::npos)
      << s.out;
  EXPECT_EQ(s.out.find("\"extractable\":true"), std::string::npos) << s.out;
  // The command keys are session-copyable (hsm.command_key_session_copy, the default); the
  // keys that sign rarely stay CKA_MODIFIABLE=false.
  const std::string copyable = "\"class\":\"private\",\"token\":true,\"private\":true,"
                               "\"modifiable\":true,\"sensitive\":true,\"extractable\":false";
  const std::string fixed = "\"class\":\"private\",\"token\":true,\"private\":true,"
                            "\"modifiable\":false,\"sensitive\":true,\"extractable\":false";
  EXPECT_NE(s.out.find("\"label\":\"gs-cmd-1\"," + copyable), std::string::npos) << s.out;
  EXPECT_NE(s.out.find("\"label\":\"gs-cmd-2\"," + copyable), std::string::npos) << s.out;
  EXPECT_NE(s.out.find("\"label\":\"gs-audit\"," + fixed), std::string::npos) << s.out;
  EXPECT_NE(s.out.find("\"label\":\"gs-revocation\"," + fixed), std::string::npos) << s.out;

  CmdResult hex = run("hsm export-pubkey gs-cmd-1 --hex" + cfg());
  ASSERT_EQ(hex.code, 0);
  EXPECT_EQ(hex.out.size(), 131u) << hex.out;  // 130 hex digits + newline
  EXPECT_EQ(hex.out.substr(0, 2), "04");
  CmdResult pem = run("hsm export-pubkey gs-audit --pem" + cfg());
  ASSERT_EQ(pem.code, 0);
  EXPECT_NE(pem.out.find("BEGIN PUBLIC KEY"), std::string::npos);
  EXPECT_EQ(run("hsm export-pubkey gs-nope" + cfg()).code, 1);
}

TEST_F(CliHsm, ClearErrorsForWrongPinMissingModuleAndToken) {
  ASSERT_EQ(run("hsm init" + cfg()).code, 0);
  {
    std::ofstream(dir_ + "/hsm/user.pin") << "0000wrong\n";
    CmdResult r = run("hsm status" + cfg());
    EXPECT_EQ(r.code, 1);
    EXPECT_NE(r.out.find("CKR_PIN_INCORRECT"), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("0000wrong"), std::string::npos) << "PIN leaked: " << r.out;
  }
  std::ofstream(dir_ + "/other.toml")
      << "[hsm]\nmodule = \"/nonexistent/libpkcs11.so\"\npin_file = \"hsm/user.pin\"\n";
  CmdResult m = run("hsm status --config " + dir_ + "/other.toml");
  EXPECT_EQ(m.code, 1);
  EXPECT_NE(m.out.find("/nonexistent/libpkcs11.so"), std::string::npos) << m.out;
  std::ofstream(dir_ + "/third.toml") << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"absent\"\n"
                                         "pin_file = \"hsm/user.pin\"\n";
  CmdResult t = run("hsm status --config " + dir_ + "/third.toml");
  EXPECT_EQ(t.code, 1);
  EXPECT_NE(t.out.find("absent"), std::string::npos) << t.out;
  std::ofstream(dir_ + "/typo.toml") << "[hsm]\npin_fiel = \"x\"\n";
  CmdResult y = run("hsm status --config " + dir_ + "/typo.toml");
  EXPECT_EQ(y.code, 1);
  EXPECT_NE(y.out.find("hsm.pin_fiel"), std::string::npos) << y.out;
}

TEST_F(CliHsm, ImportIsIdempotentNamesBadLinesAndNeverPrintsKeys) {
  ASSERT_EQ(run("hsm init" + cfg()).code, 0);
  auto keys = write_fleet(dir_ + "/fleet.csv", 500);
  CmdResult a = run("meters import " + dir_ + "/fleet.csv --batch 100" + cfg());
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("500 imported"), std::string::npos) << a.out;
  CmdResult b = run("meters import " + dir_ + "/fleet.csv" + cfg());
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_NE(b.out.find("0 imported, 500 already present"), std::string::npos) << b.out;

  std::ofstream(dir_ + "/bad.csv")
      << "meter_id,ap_title,ecc_public_key,key_slot,key\n"
      << "N1,.8.1,,0,plain:00112233445566778899aabbccddeeff\n"
      << "N2,.8.2,,9,plain:00112233445566778899aabbccddeeff\n"
      << "N3,.8.3,0102,0,plain:00112233445566778899aabbccddeeff\n"
      << "N4,.8.4,,0,ecdh\n"
      << "N5,not-an-oid,,0,plain:00112233445566778899aabbccddeeff\n";
  CmdResult c = run("meters import " + dir_ + "/bad.csv" + cfg());
  EXPECT_EQ(c.code, 1);
  for (const char* l : {":3:", ":4:", ":5:", ":6:"}) {
    EXPECT_NE(c.out.find(l), std::string::npos) << l << "\n" << c.out;
  }
  CmdResult n1 = run("meters show N1" + cfg());
  EXPECT_EQ(n1.code, 1) << "a row of an invalid batch was written: " << n1.out;

  // The same meter id with another key is a conflict naming the meter.
  std::ofstream(dir_ + "/conflict.csv") << "meter_id,ap_title,ecc_public_key,key_slot,key\n"
                                        << "M7,.7.8,,0,plain:ffeeddccbbaa99887766554433221100\n";
  CmdResult d = run("meters import " + dir_ + "/conflict.csv" + cfg());
  EXPECT_EQ(d.code, 1);
  EXPECT_NE(d.out.find("M7"), std::string::npos) << d.out;

  CmdResult show = run("meters show M7 --json" + cfg());
  ASSERT_EQ(show.code, 0) << show.out;
  EXPECT_NE(show.out.find("\"state\":\"active\""), std::string::npos);
  CmdResult list = run("meters list --limit 1000" + cfg());
  ASSERT_EQ(list.code, 0);
  for (const auto& k : keys) {
    for (const CmdResult* r : {&a, &b, &c, &d, &show, &list}) {
      ASSERT_EQ(r->out.find(k), std::string::npos) << "key bytes in output";
    }
  }
  // Nor in the database: only wrapped forms are stored.
  std::ifstream db(dir_ + "/gridseal.db", std::ios::binary);
  std::stringstream raw;
  raw << db.rdbuf();
  std::string hexdb = gs::to_hex(gs::as_bytes(raw.str()));
  EXPECT_EQ(hexdb.find(keys[0]), std::string::npos);

  // Without a registered public key the meter cannot be rekeyed: only --permanent works.
  CmdResult nk = run("meters revoke M7 --reason stolen" + cfg());
  EXPECT_EQ(nk.code, 1) << nk.out;
  EXPECT_NE(nk.out.find("no registered public key"), std::string::npos) << nk.out;
  EXPECT_NE(nk.out.find("--permanent"), std::string::npos) << nk.out;
  EXPECT_NE(run("meters show M7" + cfg()).out.find("state       active"), std::string::npos);
  CmdResult rv = run("meters revoke M7 --reason stolen --permanent" + cfg());
  ASSERT_EQ(rv.code, 0) << rv.out;
  CmdResult after = run("meters show M7" + cfg());
  EXPECT_NE(after.out.find("compromised: stolen"), std::string::npos) << after.out;
  EXPECT_NE(after.out.find("version 1, compromised"), std::string::npos) << after.out;
}

// `meters revoke` of a meter with a registered public key: a key compromise by default
// (quarantine + a one-meter rollover under the compromised key), --permanent for a meter that
// must never be served again.
class CliHsmMetersRevoke : public CliHsm {
 protected:
  void SetUp() override {
    CliHsm::SetUp();
    CmdResult init = run("hsm init" + cfg());
    ASSERT_EQ(init.code, 0) << init.out;
    std::ofstream f(dir_ + "/fleet.csv");
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (int i = 1; i <= 3; ++i) {
      auto k = gs::HostEcKey::generate();
      ASSERT_TRUE(k.ok());
      f << "M" << i << ",.7." << i << "," << gs::to_hex(k->public_point())
        << ",0,plain:00112233445566778899aabbccddee0" << i << "\n";
    }
    f << "N1,.8.1,,0,plain:ffeeddccbbaa99887766554433221100\n";
    f.close();
    CmdResult imp = run("meters import " + dir_ + "/fleet.csv" + cfg());
    ASSERT_EQ(imp.code, 0) << imp.out;
  }
};

TEST_F(CliHsmMetersRevoke, ImportWithChallengeQueuesTheProvisioningProof) {
  // M1..M3 have public keys and no proof; N1 has no public key and cannot be challenged.
  CmdResult imp = run("meters import " + dir_ + "/fleet.csv --challenge" + cfg());
  ASSERT_EQ(imp.code, 0) << imp.out;
  EXPECT_NE(imp.out.find("3 challenges queued"), std::string::npos) << imp.out;
  CmdResult show = run("meters show M2 --json" + cfg());
  ASSERT_EQ(show.code, 0) << show.out;
  EXPECT_NE(show.out.find("\"state\":\"queued\""), std::string::npos) << show.out;
  // Queued once: a second import queues nothing new.
  CmdResult again = run("meters import " + dir_ + "/fleet.csv --challenge" + cfg());
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("0 challenges queued"), std::string::npos) << again.out;
}

TEST_F(CliHsmMetersRevoke, KeyCompromiseQuarantinesAndStartsARevocationRollover) {
  CmdResult rv = run("meters revoke M1 --reason \"key seen on a laptop\"" + cfg());
  ASSERT_EQ(rv.code, 0) << rv.out;
  EXPECT_NE(rv.out.find("meter M1 quarantined: 1 key compromised"), std::string::npos) << rv.out;
  EXPECT_NE(rv.out.find("rollover campaign 1 rekeys it"), std::string::npos) << rv.out;
  EXPECT_NE(rv.out.find("compromised key (slot 0)"), std::string::npos) << rv.out;
  CmdResult show = run("meters show M1 --json" + cfg());
  ASSERT_EQ(show.code, 0) << show.out;
  EXPECT_NE(show.out.find("\"state\":\"quarantined\",\"state_reason\":\"key seen on a laptop\""),
            std::string::npos)
      << show.out;
  EXPECT_NE(show.out.find("\"slot\":0,\"key_id\":0,\"state\":\"compromised\""),
            std::string::npos)
      << show.out;
  CmdResult list = run("rollover list --json" + cfg());
  ASSERT_EQ(list.code, 0) << list.out;
  EXPECT_NE(list.out.find("\"id\":1,\"state\":\"running\",\"reason\":\"revocation\""),
            std::string::npos)
      << list.out;
  EXPECT_NE(list.out.find("\"total\":1},\"queued\":1"), std::string::npos) << list.out;
  // A quarantined meter joins no operator campaign.
  CmdResult st = run("rollover start --meters M1" + cfg());
  EXPECT_EQ(st.code, 1) << st.out;
  EXPECT_NE(st.out.find("already in campaign 1"), std::string::npos) << st.out;

  // Revoked again: the revocation rollover restarts (campaign 2 supersedes 1).
  CmdResult again = run("meters revoke M1 --reason again --json" + cfg());
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("\"state\":\"quarantined\",\"permanent\":false,\"campaign\":2,"
                           "\"seal_slot\":0,\"slots_compromised\":0,\"slots_destroyed\":0,"
                           "\"superseded_campaign\":1"),
            std::string::npos)
      << again.out;
  CmdResult s1 = run("rollover status 1" + cfg());
  EXPECT_NE(s1.out.find("campaign 1: done (revocation of a compromised key)"), std::string::npos) << s1.out;
}

TEST_F(CliHsmMetersRevoke, PermanentAndRefusals) {
  CmdResult p = run("meters revoke M2 --reason destroyed --permanent" + cfg());
  ASSERT_EQ(p.code, 0) << p.out;
  EXPECT_NE(p.out.find("revoked permanently"), std::string::npos) << p.out;
  EXPECT_NE(run("meters show M2" + cfg()).out.find("compromised: destroyed"), std::string::npos);
  EXPECT_NE(run("rollover list" + cfg()).out.find("no rollover campaigns"), std::string::npos);
  // A permanently revoked meter is never rekeyed.
  CmdResult k = run("meters revoke M2 --reason oops" + cfg());
  EXPECT_EQ(k.code, 1) << k.out;
  EXPECT_NE(k.out.find("already revoked permanently"), std::string::npos) << k.out;
  // Unknown meter, no public key, bad reason.
  CmdResult u = run("meters revoke nope --reason x" + cfg());
  EXPECT_EQ(u.code, 1) << u.out;
  EXPECT_NE(u.out.find("no meter nope"), std::string::npos) << u.out;
  CmdResult n = run("meters revoke N1 --reason x" + cfg());
  EXPECT_EQ(n.code, 1) << n.out;
  EXPECT_NE(n.out.find("use --permanent"), std::string::npos) << n.out;
  EXPECT_EQ(run("meters revoke M3 --reason \"\"" + cfg()).code, 2);
  EXPECT_EQ(run("meters revoke M3 --reason " + std::string(300, 'r') + cfg()).code, 2);
  EXPECT_EQ(run("meters revoke M3" + cfg()).code, 2);
  CmdResult m3 = run("meters show M3" + cfg());
  EXPECT_NE(m3.out.find("state       active"), std::string::npos) << m3.out;
  // A permanent revocation of a meter in a rollover aborts its step.
  ASSERT_EQ(run("rollover start --meters M3" + cfg()).code, 0);
  ASSERT_EQ(run("meters revoke M3 --reason stolen --permanent" + cfg()).code, 0);
  CmdResult s = run("rollover status 1 --json" + cfg());
  EXPECT_NE(s.out.find("\"state\":\"done\""), std::string::npos) << s.out;
  EXPECT_NE(s.out.find("\"aborted\":1"), std::string::npos) << s.out;
}

TEST_F(CliHsm, KillDuringLargeImportThenReimportCompletes) {
  ASSERT_EQ(run("hsm init" + cfg()).code, 0);
  constexpr int kRows = 100000;
  write_fleet(dir_ + "/big.csv", kRows);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::string bin = std::string(GS_BIN_DIR) + "/gridseal";
    std::string file = dir_ + "/big.csv";
    int devnull = ::open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    execl(bin.c_str(), bin.c_str(), "meters", "import", file.c_str(), "--config", conf_.c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  // Kill it mid-way: once some rows are committed, or after a bounded wait.
  bool seen_rows = false;
  for (int i = 0; i < 600 && !seen_rows; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CmdResult l = run("meters list --limit 1" + cfg());
    seen_rows = l.code == 0 && l.out.find("M") != std::string::npos;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  kill(pid, SIGKILL);
  int st = 0;
  waitpid(pid, &st, 0);
  ASSERT_TRUE(seen_rows);
  EXPECT_TRUE(WIFSIGNALED(st)) << "import finished before the kill; test proves nothing";

  CmdResult again = run("meters import " + dir_ + "/big.csv" + cfg());
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("100000 rows"), std::string::npos) << again.out;
  EXPECT_EQ(again.out.find(", 0 already present"), std::string::npos)
      << "nothing was committed before the kill: " << again.out;
  CmdResult last = run("meters show M99999 --json" + cfg());
  ASSERT_EQ(last.code, 0) << last.out;
  EXPECT_NE(last.out.find("\"state\":\"active\""), std::string::npos);
  CmdResult count = run("meters list --limit 1 --after M99998" + cfg());
  EXPECT_NE(count.out.find("of 100000 meters"), std::string::npos) << count.out;
}

}  // namespace
