// `gridseal operators` and the operator gate against a real SoftHSM2 token and store: bootstrap
// mode until `hsm init --officer` enrols the first security officer; roles allowed and refused;
// unsigned, wrongly signed, replayed, expired, retargeted and removed-operator requests refused
// with exit 3 and a clear reason; the last security officer cannot be removed; requests signed
// elsewhere (`sign-request`, `--request`) bind the arguments and file contents; every decision
// is in the audit trail, which still verifies.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "src/sqlite.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;
using gs::test::CmdResult;

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

class CliOperators : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-cli-ops-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-cli-ops\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
    // PKCS#8 and SEC1 ("EC PRIVATE KEY") files: both are what operators have.
    for (const char* n : {"alice", "kate", "dora"}) {
      ASSERT_EQ(sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + key(n) +
                   " && openssl pkey -in " + key(n) + " -pubout -out " + pub(n))
                    .code,
                0);
    }
    for (const char* n : {"bob", "audrey", "mallory"}) {
      ASSERT_EQ(sh("openssl ecparam -name prime256v1 -genkey -noout -out " + key(n) +
                   " && openssl ec -in " + key(n) + " -pubout -out " + pub(n))
                    .code,
                0);
    }
  }
  void TearDown() override { fs::remove_all(dir_); }

  static CmdResult sh(const std::string& line) { return gs::test::run_command(line); }
  std::string key(const std::string& n) const { return dir_ + "/" + n + ".pem"; }
  std::string pub(const std::string& n) const { return dir_ + "/" + n + ".pub"; }
  CmdResult run(const std::string& args) const {
    return gs::test::run_gridseal(args + " --config " + conf_);
  }
  // `args` signed by operator `who` with key file of `keyname` (default: their own).
  CmdResult as(const std::string& who, const std::string& args, std::string keyname = "") const {
    if (keyname.empty()) keyname = who;
    return run(args + " --operator " + who + " --operator-key " + key(keyname));
  }
  std::string nonce() const {
    CmdResult c = run("operators challenge");
    EXPECT_EQ(c.code, 0) << c.out;
    auto p = c.out.find("nonce ");
    return p == std::string::npos ? "" : c.out.substr(p + 6, 32);
  }
  // A request signed "elsewhere" (no --config: the signer has no store).
  CmdResult sign(const std::string& who, const std::string& n, const std::string& out,
                 const std::string& command) const {
    return gs::test::run_gridseal("operators sign-request --operator " + who +
                                  " --operator-key " + key(who) + " --nonce " + n + " --out " +
                                  out + " -- " + command);
  }

  // alice (security-officer), bob (operator), kate (key-custodian), audrey (auditor).
  void enrol_team() {
    CmdResult i = run("hsm init --officer alice --officer-pubkey " + pub("alice"));
    ASSERT_EQ(i.code, 0) << i.out;
    ASSERT_TRUE(has(i.out, "enrolled alice as the first security-officer")) << i.out;
    for (auto [n, r] : {std::pair{"bob", "operator"}, {"kate", "key-custodian"},
                        {"audrey", "auditor"}}) {
      CmdResult e = as("alice", std::string("operators enroll ") + n + " --role " + r +
                                    " --pubkey " + pub(n));
      ASSERT_EQ(e.code, 0) << e.out;
      ASSERT_TRUE(has(e.out, std::string("enrolled ") + n + " as " + r)) << e.out;
    }
  }

  void write_fleet(const std::string& path, int first, int n) {
    std::ofstream f(path);
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (int i = first; i < first + n; ++i) {
      f << "M" << i << ",.7." << (i + 1) << ",,0,plain:000102030405060708090a0b0c0d0e"
        << (i % 10) << "f\n";
    }
  }

  std::string dir_, conf_;
};

TEST_F(CliOperators, BootstrapUntilHsmInitEnrolsTheFirstOfficer) {
  CmdResult i = run("hsm init");
  ASSERT_EQ(i.code, 0) << i.out;
  EXPECT_TRUE(has(i.out, "warning: bootstrap mode")) << i.out;
  CmdResult l = run("operators list");
  ASSERT_EQ(l.code, 0) << l.out;
  EXPECT_TRUE(has(l.out, "no operators enrolled")) << l.out;
  // Unsigned state-changing commands still run, with the warning.
  write_fleet(dir_ + "/fleet.csv", 0, 3);
  CmdResult imp = run("meters import " + dir_ + "/fleet.csv");
  ASSERT_EQ(imp.code, 0) << imp.out;
  EXPECT_TRUE(has(imp.out, "warning: bootstrap mode")) << imp.out;
  // Read-only commands say nothing.
  CmdResult ml = run("meters list");
  ASSERT_EQ(ml.code, 0) << ml.out;
  EXPECT_FALSE(has(ml.out, "bootstrap")) << ml.out;
  // The first operator must be a security officer, or nobody could enrol the next.
  CmdResult first = run("operators enroll bob --role operator --pubkey " + pub("bob"));
  EXPECT_EQ(first.code, 1) << first.out;
  EXPECT_TRUE(has(first.out, "the first operator must be a security-officer")) << first.out;
  // --officer alone, a bad key file: usage errors, nothing enrolled.
  EXPECT_NE(run("hsm init --officer alice").code, 0);
  CmdResult badkey = run("hsm init --officer alice --officer-pubkey " + conf_);
  EXPECT_EQ(badkey.code, 1) << badkey.out;
  EXPECT_TRUE(has(badkey.out, "--officer-pubkey")) << badkey.out;

  CmdResult o = run("hsm init --officer alice --officer-pubkey " + pub("alice"));
  ASSERT_EQ(o.code, 0) << o.out;
  EXPECT_TRUE(has(o.out, "enrolled alice as the first security-officer")) << o.out;
  // Closed: the same init unsigned is refused now; signed by alice it is a no-op.
  CmdResult again = run("hsm init --officer alice --officer-pubkey " + pub("alice"));
  EXPECT_EQ(again.code, 3) << again.out;
  EXPECT_TRUE(has(again.out, "refused: `hsm init` changes state")) << again.out;
  CmdResult signed_again =
      as("alice", "hsm init --officer alice --officer-pubkey " + pub("alice"));
  ASSERT_EQ(signed_again.code, 0) << signed_again.out;
  EXPECT_TRUE(has(signed_again.out, "exists  operator alice")) << signed_again.out;
  // A second "first" officer through init is refused: that is operators enroll's job.
  CmdResult second = as("alice", "hsm init --officer dora --officer-pubkey " + pub("dora"));
  EXPECT_EQ(second.code, 1) << second.out;
  EXPECT_TRUE(has(second.out, "operators are enrolled already")) << second.out;
  CmdResult unsigned_import = run("meters import " + dir_ + "/fleet.csv");
  EXPECT_EQ(unsigned_import.code, 3) << unsigned_import.out;
  EXPECT_TRUE(has(unsigned_import.out, "needs a signed request from an operator (operator)"))
      << unsigned_import.out;
  CmdResult js = run("operators list --json");
  ASSERT_EQ(js.code, 0) << js.out;
  EXPECT_TRUE(has(js.out, "[{\"name\":\"alice\",\"role\":\"security-officer\"")) << js.out;
  EXPECT_TRUE(has(js.out, "\"enrolled_by\":\"bootstrap:")) << js.out;
}

TEST_F(CliOperators, RolesAreEnforcedPerCommand) {
  enrol_team();
  write_fleet(dir_ + "/fleet.csv", 0, 4);
  // operator: fleet changes; nobody else.
  for (const char* who : {"alice", "kate", "audrey"}) {
    CmdResult r = as(who, "meters import " + dir_ + "/fleet.csv");
    EXPECT_EQ(r.code, 3) << who << ": " << r.out;
    EXPECT_TRUE(has(r.out, "may not run `meters import` (needs operator)")) << r.out;
  }
  CmdResult imp = as("bob", "meters import " + dir_ + "/fleet.csv");
  ASSERT_EQ(imp.code, 0) << imp.out;
  EXPECT_TRUE(has(imp.out, "operator bob (operator) authorized `meters import`")) << imp.out;
  CmdResult rev = as("bob", "meters revoke M1 --reason lost --permanent");
  EXPECT_EQ(rev.code, 0) << rev.out;
  EXPECT_EQ(as("audrey", "meters revoke M2 --reason lost").code, 3);
  EXPECT_NE(as("bob", "rollover abort 1").code, 3);  // allowed (then fails on its own: no campaign)
  EXPECT_EQ(as("kate", "rollover start --all").code, 3);

  // key-custodian: HSM key ceremonies; the operator may not.
  CmdResult tk = as("bob", "hsm import-transport-key --label mfr --ephemeral-pubkey 04 --wrapped 00");
  EXPECT_EQ(tk.code, 3) << tk.out;
  EXPECT_TRUE(has(tk.out, "(needs key-custodian)")) << tk.out;
  CmdResult tk2 = as("kate", "hsm import-transport-key --label mfr --ephemeral-pubkey 04 --wrapped 00");
  EXPECT_EQ(tk2.code, 1) << tk2.out;  // authorized, then the command refuses the bad point
  EXPECT_TRUE(has(tk2.out, "authorized `hsm import-transport-key`")) << tk2.out;
  EXPECT_EQ(as("kate", "hsm init").code, 0);

  // security-officer: people and the audit anchor.
  EXPECT_EQ(as("bob", "operators enroll dora --role operator --pubkey " + pub("dora")).code, 3);
  EXPECT_EQ(as("kate", "operators remove bob").code, 3);
  EXPECT_EQ(as("audrey", "audit reset-anchor --reason x").code, 3);
  CmdResult reset = as("alice", "audit reset-anchor --reason drill");
  EXPECT_EQ(reset.code, 0) << reset.out;
  // Archiving moves records out of the table: the security officer's too.
  EXPECT_EQ(as("bob", "audit archive --before 0 --dir " + dir_).code, 3);
  EXPECT_EQ(as("audrey", "audit archive --before 0 --dir " + dir_).code, 3);
  CmdResult arch = as("alice", "audit archive --before 0 --dir " + dir_);
  EXPECT_EQ(arch.code, 0) << arch.out;
  EXPECT_TRUE(has(arch.out, "nothing to archive")) << arch.out;

  // auditor and everyone: read-only commands need no signature.
  EXPECT_EQ(run("audit verify").code, 0);
  EXPECT_EQ(run("meters list").code, 0);
  CmdResult exp = run("audit export --since 0");
  ASSERT_EQ(exp.code, 0) << exp.out;

  // The role table names every command the CLI has: none falls to the default.
  CmdResult roles = gs::test::run_gridseal("operators roles");
  ASSERT_EQ(roles.code, 0) << roles.out;
  EXPECT_FALSE(has(roles.out, "unclassified")) << roles.out;
  EXPECT_TRUE(has(roles.out, "key-custodian     hsm init, hsm import-transport-key")) << roles.out;
}

TEST_F(CliOperators, UnsignedForgedReplayedExpiredAndRemovedRequestsAreRefused) {
  enrol_team();
  write_fleet(dir_ + "/fleet.csv", 0, 2);
  ASSERT_EQ(as("bob", "meters import " + dir_ + "/fleet.csv").code, 0);

  CmdResult none = run("meters revoke M0 --reason lost");
  EXPECT_EQ(none.code, 3) << none.out;
  EXPECT_TRUE(has(none.out, "needs a signed request")) << none.out;
  CmdResult nokey = run("meters revoke M0 --reason lost --operator bob");
  EXPECT_EQ(nokey.code, 2) << nokey.out;
  EXPECT_TRUE(has(nokey.out, "--operator-key FILE (or GS_OPERATOR_KEY=FILE)")) << nokey.out;
  CmdResult env = gs::test::run_command("GS_OPERATOR_KEY=" + key("bob") + " " GS_BIN_DIR
                                        "/gridseal meters revoke M9 --reason x --operator bob "
                                        "--config " + conf_);
  EXPECT_EQ(env.code, 1) << env.out;  // authorized, then: no meter M9
  EXPECT_TRUE(has(env.out, "operator bob (operator) authorized `meters revoke`")) << env.out;
  CmdResult forged = as("bob", "meters revoke M0 --reason lost", "mallory");
  EXPECT_EQ(forged.code, 3) << forged.out;
  EXPECT_TRUE(has(forged.out, "signature does not verify with the key of operator 'bob'"))
      << forged.out;
  CmdResult stranger = as("mallory", "meters revoke M0 --reason lost");
  EXPECT_EQ(stranger.code, 3) << stranger.out;
  EXPECT_TRUE(has(stranger.out, "unknown operator 'mallory'")) << stranger.out;

  // Signed elsewhere, then replayed.
  const std::string req = dir_ + "/revoke.req";
  CmdResult s = sign("bob", nonce(), req, "meters revoke M0 --reason lost");
  ASSERT_EQ(s.code, 0) << s.out;
  EXPECT_TRUE(has(s.out, "signed `meters revoke --reason=lost ID=M0` as bob")) << s.out;
  // ... used for another meter: refused (and the nonce is spent).
  CmdResult other = run("meters revoke M1 --reason lost --request " + req);
  EXPECT_EQ(other.code, 3) << other.out;
  EXPECT_TRUE(has(other.out, "signed for `meters revoke --reason=lost ID=M0`")) << other.out;
  const std::string req2 = dir_ + "/revoke2.req";
  ASSERT_EQ(sign("bob", nonce(), req2, "meters revoke M0 --reason lost --permanent").code, 0);
  CmdResult ok = run("meters revoke M0 --permanent --reason lost --request " + req2);
  ASSERT_EQ(ok.code, 0) << ok.out;
  EXPECT_TRUE(has(ok.out, "operator bob (operator) authorized `meters revoke`")) << ok.out;
  CmdResult replay = run("meters revoke M0 --reason lost --permanent --request " + req2);
  EXPECT_EQ(replay.code, 3) << replay.out;
  EXPECT_TRUE(has(replay.out, "nonce unknown or already used")) << replay.out;

  // A request file whose argument was edited (and the command line to match): bad signature.
  const std::string req3 = dir_ + "/revoke3.req";
  ASSERT_EQ(sign("bob", nonce(), req3, "meters revoke M1 --reason lost").code, 0);
  ASSERT_EQ(sh("sed -i 's/^arg 4944 4d31$/arg 4944 4d30/' " + req3).code, 0);
  CmdResult edited = run("meters revoke M0 --reason lost --request " + req3);
  EXPECT_EQ(edited.code, 3) << edited.out;
  EXPECT_TRUE(has(edited.out, "signature does not verify")) << edited.out;

  // A file argument is bound by content: a fleet file changed after signing is refused.
  write_fleet(dir_ + "/more.csv", 10, 2);
  const std::string req4 = dir_ + "/import.req";
  ASSERT_EQ(sign("bob", nonce(), req4, "meters import " + dir_ + "/more.csv").code, 0);
  write_fleet(dir_ + "/more.csv", 10, 3);
  CmdResult changed = run("meters import " + dir_ + "/more.csv --request " + req4);
  EXPECT_EQ(changed.code, 3) << changed.out;
  EXPECT_TRUE(has(changed.out, "FILE#sha256=")) << changed.out;

  // Expired nonce.
  const std::string req5 = dir_ + "/late.req";
  CmdResult c = run("operators challenge --ttl 60");
  ASSERT_EQ(c.code, 0) << c.out;
  const std::string n5 = c.out.substr(c.out.find("nonce ") + 6, 32);
  ASSERT_EQ(sign("bob", n5, req5, "meters revoke M1 --reason lost").code, 0);
  {
    auto db = gs::db::Db::open(dir_ + "/gridseal.db", {.create = false});
    ASSERT_TRUE(db.ok());
    ASSERT_TRUE(db->exec("UPDATE operator_nonces SET expires_at = expires_at - 120 WHERE "
                         "hex(nonce) = upper('" + n5 + "')")
                    .ok());
  }
  CmdResult late = run("meters revoke M1 --reason lost --request " + req5);
  EXPECT_EQ(late.code, 3) << late.out;
  EXPECT_TRUE(has(late.out, "nonce expired")) << late.out;

  // Removed operator; the last security officer stays.
  CmdResult last = as("alice", "operators remove alice");
  EXPECT_EQ(last.code, 1) << last.out;
  EXPECT_TRUE(has(last.out, "'alice' is the last security-officer")) << last.out;
  ASSERT_EQ(as("alice", "operators remove bob").code, 0);
  CmdResult gone = as("bob", "meters revoke M1 --reason lost");
  EXPECT_EQ(gone.code, 3) << gone.out;
  EXPECT_TRUE(has(gone.out, "operator 'bob' was removed by operator:alice")) << gone.out;
  CmdResult reuse = as("alice", "operators enroll bob --role operator --pubkey " + pub("dora"));
  EXPECT_EQ(reuse.code, 1) << reuse.out;
  EXPECT_TRUE(has(reuse.out, "names are never reused")) << reuse.out;
  ASSERT_EQ(as("alice", "operators enroll dora --role security-officer --pubkey " + pub("dora"))
                .code,
            0);
  EXPECT_EQ(as("dora", "operators remove alice").code, 0);
  CmdResult list = run("operators list --all");
  EXPECT_TRUE(has(list.out, "(removed ")) << list.out;

  // Every decision is in the trail, which verifies.
  CmdResult v = run("audit verify");
  EXPECT_EQ(v.code, 0) << v.out;
  CmdResult exp = run("audit export --since 0");
  ASSERT_EQ(exp.code, 0);
  EXPECT_TRUE(has(exp.out, "\"actor\":\"operator:bob\",\"event\":\"operator_request_refused\""))
      << exp.out;
  EXPECT_TRUE(has(exp.out, "nonce unknown or already used")) << exp.out;
  EXPECT_TRUE(has(exp.out, "\"event\":\"operator_removed\",\"subject\":\"bob\"")) << exp.out;
  EXPECT_TRUE(has(exp.out, "\"actor\":\"unsigned:")) << exp.out;
  EXPECT_TRUE(has(exp.out, "\"event\":\"operator_command_done\"")) << exp.out;
  // No private key material anywhere in what the CLI printed or recorded.
  std::ifstream kf(key("bob"));
  std::stringstream ks;
  ks << kf.rdbuf();
  std::string body = ks.str();
  body = body.substr(body.find('\n') + 1, 40);
  EXPECT_FALSE(has(exp.out, body));
}

// A tampered trail refuses appends, so every signed command is refused (nothing runs without
// its record) except the security officer's anchor reset, which records who made it.
TEST_F(CliOperators, ATamperedTrailStopsCommandsUntilTheOfficerResetsTheAnchor) {
  enrol_team();
  {
    auto db = gs::db::Db::open(dir_ + "/gridseal.db", {.create = false});
    ASSERT_TRUE(db.ok());
    ASSERT_TRUE(db->exec("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq > "
                         "(SELECT max(seq) - 2 FROM audit);")
                    .ok());
  }
  CmdResult refused = as("bob", "meters revoke M0 --reason lost");
  EXPECT_EQ(refused.code, 3) << refused.out;
  EXPECT_TRUE(has(refused.out, "refused: audit trail")) << refused.out;
  EXPECT_EQ(as("audrey", "audit reset-anchor --reason restored").code, 3);
  CmdResult reset = as("alice", "audit reset-anchor --reason restored");
  ASSERT_EQ(reset.code, 0) << reset.out;
  EXPECT_TRUE(has(reset.out, "this decision is not recorded")) << reset.out;
  CmdResult exp = run("audit export --since 0");
  ASSERT_EQ(exp.code, 0) << exp.out;
  EXPECT_TRUE(has(exp.out, "\"actor\":\"operator:alice\",\"event\":\"audit_anchor_reset\""))
      << exp.out;
  CmdResult after = as("bob", "meters revoke M0 --reason lost");
  EXPECT_EQ(after.code, 1) << after.out;  // authorized and recorded again; no meter M0
  EXPECT_TRUE(has(after.out, "authorized `meters revoke`")) << after.out;
  EXPECT_EQ(run("audit verify").code, 0);
}

}  // namespace
