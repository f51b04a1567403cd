// M-of-N approvals (`gridseal approvals`) against a real SoftHSM2 token and store: a command the
// policy's [[quorum]] names is refused when run directly; a request collects signatures from
// distinct operators of the rule's role only; the M-th runs it exactly once, as actor
// "approval:<id>"; a file edited after the request, an expired or cancelled request never run;
// every step is in the audit trail, which still verifies.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "src/sqlite.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;
using gs::test::CmdResult;

bool has(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

class CliApprovals : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-cli-appr-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "policy = \"policy.toml\"\n"
                            "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-cli-appr\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
    write_policy(2);
    for (const char* n : {"alice", "bob", "carol", "dave", "kate", "audrey"}) {
      ASSERT_EQ(sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + key(n) +
                   " && openssl pkey -in " + key(n) + " -pubout -out " + pub(n))
                    .code,
                0);
    }
  }
  void TearDown() override { fs::remove_all(dir_); }

  void write_policy(int m, const std::string& extra = "") {
    std::ofstream(dir_ + "/policy.toml")
        << "[[quorum]]\nname = \"fleet-import\"\ncommand = \"meters import\"\nrole = "
           "\"operator\"\napprovals = "
        << m << "\nexpires = 3600\n"
        << "[[quorum]]\nname = \"permanent-revocation\"\ncommand = \"meters revoke\"\n"
           "when = [\"--permanent\"]\nrole = \"operator\"\napprovals = 3\n"
        << extra;
  }

  static CmdResult sh(const std::string& line) { return gs::test::run_command(line); }
  std::string key(const std::string& n) const { return dir_ + "/" + n + ".pem"; }
  std::string pub(const std::string& n) const { return dir_ + "/" + n + ".pub"; }
  CmdResult run(const std::string& args) const {
    return gs::test::run_gridseal(args + " --config " + conf_);
  }
  CmdResult as(const std::string& who, const std::string& args) const {
    return run(args + " --operator " + who + " --operator-key " + key(who));
  }
  // `approvals request` by `who` for `command` (everything after `--`).
  CmdResult request(const std::string& who, const std::string& command,
                    const std::string& opts = "") const {
    return gs::test::run_gridseal("approvals request --config " + conf_ + " --operator " + who +
                                  " --operator-key " + key(who) + " " + opts + " -- " + command);
  }
  CmdResult approve(const std::string& who, int id) const {
    return as(who, "approvals approve " + std::to_string(id));
  }

  // alice (security-officer), bob, carol, dave (operators), kate (key-custodian), audrey
  // (auditor).
  void enrol_team() {
    CmdResult i = run("hsm init --officer alice --officer-pubkey " + pub("alice"));
    ASSERT_EQ(i.code, 0) << i.out;
    for (auto [n, r] : {std::pair{"bob", "operator"},
                        {"carol", "operator"},
                        {"dave", "operator"},
                        {"kate", "key-custodian"},
                        {"audrey", "auditor"}}) {
      CmdResult e = as(
          "alice", std::string("operators enroll ") + n + " --role " + r + " --pubkey " + pub(n));
      ASSERT_EQ(e.code, 0) << e.out;
    }
  }

  void write_fleet(const std::string& path, int first, int n) {
    std::ofstream f(path);
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (int i = first; i < first + n; ++i) {
      f << "M" << i << ",.7." << (i + 1) << ",,0,plain:000102030405060708090a0b0c0d0e" << (i % 10)
        << "f\n";
    }
  }

  int meter_count() const {
    CmdResult l = run("meters list --json");
    int n = 0;
    for (std::size_t p = l.out.find("\"meter_id\""); p != std::string::npos;
         p = l.out.find("\"meter_id\"", p + 1)) {
      ++n;
    }
    return n;
  }

  std::string dir_, conf_;
};

TEST_F(CliApprovals, AQuorumRunsTheCommandOnceAfterDistinctOperatorsOfItsRoleSign) {
  enrol_team();
  const std::string fleet = dir_ + "/fleet.csv";
  write_fleet(fleet, 0, 3);

  // Run directly: refused, recorded, nothing imported.
  CmdResult direct = as("bob", "meters import " + fleet);
  EXPECT_EQ(direct.code, 3) << direct.out;
  EXPECT_TRUE(has(direct.out, "needs 2 approvals from operators")) << direct.out;
  EXPECT_EQ(meter_count(), 0);

  // Only operators (the rule's role) may ask; the auditor may not even sign the request.
  EXPECT_EQ(request("kate", "meters import " + fleet).code, 1);
  EXPECT_EQ(request("audrey", "meters import " + fleet).code, 3);
  // A command that needs no quorum is not taken.
  CmdResult none = request("bob", "meters revoke M1 --reason lost");
  EXPECT_EQ(none.code, 1) << none.out;
  EXPECT_TRUE(has(none.out, "needs no approval")) << none.out;

  CmdResult req = request("bob", "meters import " + fleet);
  ASSERT_EQ(req.code, 0) << req.out;
  EXPECT_TRUE(has(req.out, "approval request 1: `meters import FILE=")) << req.out;
  EXPECT_TRUE(has(req.out, "needs 2 approvals from operators (1 so far: bob)")) << req.out;
  CmdResult list = run("approvals list");
  EXPECT_TRUE(has(list.out, "pending") && has(list.out, "1/2")) << list.out;

  // The requester cannot sign twice; another role cannot count; the auditor is refused.
  CmdResult twice = approve("bob", 1);
  EXPECT_EQ(twice.code, 1) << twice.out;
  EXPECT_TRUE(has(twice.out, "bob already signed")) << twice.out;
  CmdResult kc = approve("kate", 1);
  EXPECT_EQ(kc.code, 1) << kc.out;
  EXPECT_TRUE(has(kc.out, "needs signatures of operators; kate is key-custodian")) << kc.out;
  EXPECT_EQ(approve("audrey", 1).code, 3);
  EXPECT_EQ(meter_count(), 0);

  // The second distinct operator completes it: it runs, once.
  CmdResult ok = approve("carol", 1);
  ASSERT_EQ(ok.code, 0) << ok.out;
  EXPECT_TRUE(has(ok.out, "quorum reached, running `meters import")) << ok.out;
  EXPECT_TRUE(has(ok.out, "approval request 1: done (exit 0)")) << ok.out;
  EXPECT_EQ(meter_count(), 3);
  CmdResult late = approve("dave", 1);
  EXPECT_EQ(late.code, 1) << late.out;
  EXPECT_TRUE(has(late.out, "is done, no longer open")) << late.out;

  CmdResult show = run("approvals show 1");
  ASSERT_EQ(show.code, 0) << show.out;
  EXPECT_TRUE(has(show.out, "approval request 1: done")) << show.out;
  EXPECT_TRUE(has(show.out, "completed by carol, exit 0")) << show.out;
  EXPECT_TRUE(has(show.out, "by bob (operator)") && has(show.out, "by carol (operator)"))
      << show.out;

  CmdResult v = run("audit verify");
  EXPECT_EQ(v.code, 0) << v.out;
  CmdResult exp = run("audit export --since 0");
  ASSERT_EQ(exp.code, 0) << exp.out;
  for (const char* e : {"\"approval_requested\"", "\"approval_signed\"", "\"approval_run_started\"",
                        "\"approval_run_done\""}) {
    EXPECT_TRUE(has(exp.out, e)) << e;
  }
  // What the import itself records names the quorum as its actor.
  EXPECT_TRUE(has(exp.out, "\"actor\":\"approval:1\"")) << exp.out;
}

TEST_F(CliApprovals, AFileChangedAfterTheRequestIsNeverRun) {
  enrol_team();
  const std::string fleet = dir_ + "/fleet.csv";
  write_fleet(fleet, 0, 2);
  ASSERT_EQ(request("bob", "meters import " + fleet).code, 0);
  write_fleet(fleet, 0, 5);  // swapped after bob signed
  CmdResult r = approve("carol", 1);
  EXPECT_EQ(r.code, 3) << r.out;
  EXPECT_TRUE(has(r.out, "changed since it was requested")) << r.out;
  EXPECT_EQ(meter_count(), 0);
  CmdResult show = run("approvals show 1");
  EXPECT_TRUE(has(show.out, "approval request 1: failed")) << show.out;
  // Claimed once: it does not run again.
  write_fleet(fleet, 0, 2);
  EXPECT_EQ(approve("dave", 1).code, 1);
  EXPECT_EQ(meter_count(), 0);
}

TEST_F(CliApprovals, ExpiredAndCancelledRequestsCannotBeCompleted) {
  enrol_team();
  const std::string fleet = dir_ + "/fleet.csv";
  write_fleet(fleet, 0, 2);
  ASSERT_EQ(request("bob", "meters import " + fleet).code, 0);
  ASSERT_EQ(request("bob", "meters import " + fleet).code, 0);
  {
    // The passage of a day: the first request's expiry moves into the past.
    auto db = gs::db::Db::open(dir_ + "/gridseal.db");
    ASSERT_TRUE(db.ok());
    ASSERT_TRUE(db->exec("UPDATE approval_requests SET expires_at = 1 WHERE id = 1").ok());
  }
  CmdResult exp = approve("carol", 1);
  EXPECT_EQ(exp.code, 1) << exp.out;
  EXPECT_TRUE(has(exp.out, "expired")) << exp.out;
  EXPECT_TRUE(has(run("approvals list --all").out, "expired"));

  // Only the requester or a security officer cancels.
  CmdResult other = as("carol", "approvals cancel 2");
  EXPECT_EQ(other.code, 1) << other.out;
  EXPECT_TRUE(has(other.out, "only its requester (bob)")) << other.out;
  CmdResult c = as("bob", "approvals cancel 2");
  ASSERT_EQ(c.code, 0) << c.out;
  EXPECT_EQ(approve("carol", 2).code, 1);
  EXPECT_EQ(meter_count(), 0);
  EXPECT_EQ(run("audit verify").code, 0);
}

TEST_F(CliApprovals, RulesCanDependOnArgumentsAndABadPolicyFailsClosed) {
  enrol_team();
  const std::string fleet = dir_ + "/fleet.csv";
  write_fleet(fleet, 0, 4);
  write_policy(2, "");
  ASSERT_EQ(request("bob", "meters import " + fleet).code, 0);
  ASSERT_EQ(approve("carol", 1).code, 0);
  // `meters revoke` needs a quorum of 3 only with --permanent.
  // (authorized without a quorum; the command then refuses on its own: no public key to rekey)
  CmdResult plain = as("bob", "meters revoke M1 --reason lost");
  EXPECT_NE(plain.code, 3) << plain.out;
  EXPECT_TRUE(has(plain.out, "operator bob (operator) authorized `meters revoke`")) << plain.out;
  CmdResult perm = as("bob", "meters revoke M2 --reason stolen --permanent");
  EXPECT_EQ(perm.code, 3) << perm.out;
  EXPECT_TRUE(has(perm.out, "needs 3 approvals")) << perm.out;
  ASSERT_EQ(request("bob", "meters revoke M2 --reason stolen --permanent").code, 0);
  CmdResult second = approve("carol", 2);
  EXPECT_EQ(second.code, 0) << second.out;
  EXPECT_TRUE(has(second.out, "(2 of 3)")) << second.out;
  CmdResult third = approve("dave", 2);
  EXPECT_EQ(third.code, 0) << third.out;
  EXPECT_TRUE(has(run("meters show M2").out, "compromised")) << run("meters show M2").out;

  // An invalid quorum policy stops every state-changing command (the read-only ones still work).
  write_policy(2, "[[quorum]]\ncommand = \"meters import\"\nrole = \"auditor\"\n");
  CmdResult bad = as("bob", "meters revoke M3 --reason lost");
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_TRUE(has(bad.out, "quorum[2].role")) << bad.out;
  EXPECT_EQ(run("meters list").code, 0);
}

TEST_F(CliApprovals, OnceAPolicyIsAppliedItsRulesHoldWhateverTheFileOnDiskSays) {
  enrol_team();
  const std::string fleet = dir_ + "/fleet.csv";
  write_fleet(fleet, 0, 2);
  // alice applies the policy (no rule covers `policy apply` in it).
  CmdResult applied = as("alice", "policy apply " + dir_ + "/policy.toml");
  ASSERT_EQ(applied.code, 0) << applied.out;
  // Someone edits the file on disk to drop the quorum: the applied policy still rules.
  std::ofstream(dir_ + "/policy.toml") << "clock_skew = 60\n";
  CmdResult direct = as("bob", "meters import " + fleet);
  EXPECT_EQ(direct.code, 3) << direct.out;
  EXPECT_TRUE(has(direct.out, "needs 2 approvals")) << direct.out;
  EXPECT_EQ(meter_count(), 0);
  ASSERT_EQ(request("bob", "meters import " + fleet).code, 0);
  ASSERT_EQ(approve("carol", 1).code, 0);
  EXPECT_EQ(meter_count(), 2);
}

}  // namespace
