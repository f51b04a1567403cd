// `gridseal audit verify|export|archive|reset-anchor` against a real token and store: verify
// passes on a good chain and names the first bad record (text and --json) after tampering;
// truncation is caught through the HSM anchor (and not without it, which the output says); an
// export and an archive are verified the way a third party would, with the README's Python
// script and with the OpenSSL command line, using only the exported gs-audit public key; an
// archive killed while pruning is finished by the next run; nothing secret is printed.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "src/audit.h"
#include "src/config.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;
using gs::test::CmdResult;

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class CliAudit : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-cli-audit-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-cli-audit\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
    ASSERT_EQ(run("hsm init").code, 0);
  }
  void TearDown() override { fs::remove_all(dir_); }

  CmdResult run(const std::string& args) const {
    return gs::test::run_gridseal(args + " --config " + conf_);
  }

  // n records through the library's writer (a checkpoint every transaction), stopped cleanly.
  void write_records(int n, const std::string& detail_extra = "") {
    auto cfg = gs::config::load(conf_);
    ASSERT_TRUE(cfg.ok());
    ASSERT_TRUE(gs::store::KeyStore::open(cfg->store.path).ok());  // creates and migrates
    auto hsm = gs::open_hsm(cfg->hsm);
    ASSERT_TRUE(hsm.ok()) << hsm.error().message();
    gs::audit::WriterOptions o;
    o.checkpoint_interval = std::chrono::seconds(0);
    o.max_batch = 7;
    auto w = gs::audit::Writer::open(cfg->store.path, *hsm, o, nullptr);
    ASSERT_TRUE(w.ok()) << w.error().message();
    for (int i = 1; i <= n; ++i) {
      gs::audit::Detail d;
      d.add("class", "read").add("invocation_id", i);
      if (!detail_extra.empty()) d.add("note", detail_extra);
      gs::audit::Item it;
      it.event = {0, "CN=head-end,O=Utility \xc3\xa9", "command", "M" + std::to_string(i), d.str()};
      ASSERT_TRUE((*w)->submit(std::move(it)).ok());
    }
    (*w)->stop();
    db_ = cfg->store.path;
  }

  void tamper(const std::string& sql) {
    auto db = gs::db::Db::open(db_);
    ASSERT_TRUE(db.ok());
    ASSERT_TRUE(
        db->exec("DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete;"
                 "DROP TRIGGER IF EXISTS audit_checkpoints_no_delete;" +
                 sql)
            .ok());
  }

  std::string dir_, conf_, db_;
};

TEST_F(CliAudit, VerifyPassesThenNamesTheFirstBadRecord) {
  write_records(30);
  CmdResult ok = run("audit verify");
  ASSERT_EQ(ok.code, 0) << ok.out;
  EXPECT_NE(ok.out.find("records 1..30 (30 checked)"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find("HSM anchor: sealed"), std::string::npos) << ok.out;
  EXPECT_NE(ok.out.find("audit verify: OK"), std::string::npos);
  CmdResult js = run("audit verify --json");
  ASSERT_EQ(js.code, 0) << js.out;
  EXPECT_NE(js.out.find("\"ok\":true"), std::string::npos) << js.out;
  EXPECT_NE(js.out.find("\"last_checkpoint_seq\":30"), std::string::npos) << js.out;
  CmdResult part = run("audit verify --from 20");
  EXPECT_EQ(part.code, 0) << part.out;
  EXPECT_NE(part.out.find("records 20..30 (11 checked)"), std::string::npos) << part.out;

  tamper("UPDATE audit SET subject = 'M999' WHERE seq = 12;");
  CmdResult bad = run("audit verify");
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_NE(bad.out.find("FAILED at record 12 (changed)"), std::string::npos) << bad.out;
  CmdResult bad_js = run("audit verify --json");
  EXPECT_EQ(bad_js.code, 1);
  EXPECT_NE(bad_js.out.find("\"ok\":false,\"first_bad_seq\":12,\"kind\":\"changed\""),
            std::string::npos)
      << bad_js.out;
  // --from after the bad record does not see it.
  EXPECT_EQ(run("audit verify --from 13").code, 0);

  tamper("UPDATE audit SET subject = 'M12' WHERE seq = 12; DELETE FROM audit WHERE seq = 5;");
  CmdResult gap = run("audit verify");
  EXPECT_EQ(gap.code, 1);
  EXPECT_NE(gap.out.find("FAILED at record 5 (deleted)"), std::string::npos) << gap.out;
}

TEST_F(CliAudit, TruncationIsCaughtByTheAnchorAndAResetIsRecorded) {
  write_records(20);
  tamper("DELETE FROM audit_checkpoints WHERE seq > 14; DELETE FROM audit WHERE seq > 14;");
  CmdResult bad = run("audit verify");
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_NE(bad.out.find("FAILED at record 15 (truncated)"), std::string::npos) << bad.out;
  // Without the HSM the shortened chain is consistent, and the output says what was not checked.
  CmdResult blind = run("audit verify --no-hsm --pubkey " + dir_ + "/none.pem");
  EXPECT_EQ(blind.code, 1);  // no such file
  ASSERT_EQ(run("hsm export-pubkey gs-audit --pem > " + dir_ + "/pub.pem").code, 0);
  blind = run("audit verify --no-hsm --pubkey " + dir_ + "/pub.pem");
  EXPECT_EQ(blind.code, 0) << blind.out;
  EXPECT_NE(blind.out.find("truncation of the tail cannot be detected"), std::string::npos);

  CmdResult reset = run("audit reset-anchor --reason 'restored from backup 2025-01-02'");
  ASSERT_EQ(reset.code, 0) << reset.out;
  EXPECT_NE(reset.out.find("audit table truncated"), std::string::npos) << reset.out;
  EXPECT_NE(reset.out.find("chain now ends at record 15"), std::string::npos) << reset.out;
  CmdResult after = run("audit verify");
  EXPECT_EQ(after.code, 0) << after.out;
  ASSERT_EQ(run("audit export --since 0 --out " + dir_ + "/e.jsonl").code, 0);
  const std::string e = slurp(dir_ + "/e.jsonl");
  EXPECT_NE(e.find("\"event\":\"audit_anchor_reset\""), std::string::npos);
  EXPECT_NE(e.find("restored from backup 2025-01-02"), std::string::npos);
  EXPECT_NE(e.find("\"actor\":\"operator:"), std::string::npos);
}

// The README's verification script, extracted from the README itself.
std::string readme_script() {
  const std::string readme = slurp(std::string(GS_SOURCE_DIR) + "/README.md");
  const auto begin = readme.find("<!-- audit-verify.py -->");
  if (begin == std::string::npos) return "";
  const auto code = readme.find("```python\n", begin);
  const auto end = readme.find("\n```", code + 10);
  if (code == std::string::npos || end == std::string::npos) return "";
  return readme.substr(code + 10, end - code - 10 + 1);
}

TEST_F(CliAudit, ExportIsVerifiableWithOnlyThePublicKey) {
  write_records(25, "tab\there, quote \" and \xe2\x82\xac");
  const std::string out = dir_ + "/audit.jsonl";
  const std::string pem = dir_ + "/gs-audit.pem";
  CmdResult ex = run("audit export --since 1970-01-02 --format jsonl --out " + out);
  ASSERT_EQ(ex.code, 0) << ex.out;
  EXPECT_NE(ex.out.find("exported records 1..25 (25)"), std::string::npos) << ex.out;
  EXPECT_EQ(run("audit export --since 0 --out " + out).code, 1);  // never overwritten
  ASSERT_EQ(run("hsm export-pubkey gs-audit --pem > " + pem).code, 0);

  // OpenSSL command line: the newest checkpoint.
  const std::string sh =
      "cd " + dir_ +
      " && jq -r 'select(.type==\"checkpoint\") | .signed' audit.jsonl | tail -1 "
      "| xxd -r -p > cp.bin && jq -r 'select(.type==\"checkpoint\") | .signature_der' "
      "audit.jsonl | tail -1 | xxd -r -p > cp.sig && "
      "openssl dgst -sha256 -verify gs-audit.pem -signature cp.sig cp.bin";
  CmdResult ossl = gs::test::run_command(sh);
  EXPECT_EQ(ossl.code, 0) << ossl.out;
  EXPECT_NE(ossl.out.find("Verified OK"), std::string::npos) << ossl.out;

  if (gs::test::run_command("python3 -c 'import cryptography'").code != 0) {
    GTEST_SKIP() << "python3 with the cryptography package is not available";
  }
  const std::string script = readme_script();
  ASSERT_FALSE(script.empty()) << "README: no audit-verify.py block";
  std::ofstream(dir_ + "/verify.py") << script;
  CmdResult py = gs::test::run_command("python3 " + dir_ + "/verify.py " + out + " " + pem);
  EXPECT_EQ(py.code, 0) << py.out;
  EXPECT_NE(py.out.find("OK: records 1..25 chain correctly, signed up to 25"), std::string::npos)
      << py.out;

  // A changed detail, a dropped record, a forged checkpoint: each fails the script.
  const std::string text = slurp(out);
  auto check_bad = [&](std::string t, const std::string& expect) {
    std::ofstream(dir_ + "/bad.jsonl") << t;
    CmdResult r =
        gs::test::run_command("python3 " + dir_ + "/verify.py " + dir_ + "/bad.jsonl " + pem);
    EXPECT_NE(r.code, 0) << r.out;
    EXPECT_NE(r.out.find(expect), std::string::npos) << r.out;
  };
  std::string t1 = text;
  const std::string id9 = "\\\"invocation_id\\\":9,";
  ASSERT_NE(t1.find(id9), std::string::npos);
  t1.replace(t1.find(id9), id9.size(), "\\\"invocation_id\\\":8,");
  check_bad(t1, "record 9");
  std::string t2 = text;
  const auto r3 = t2.find("{\"type\":\"record\",\"seq\":3,");
  t2.erase(r3, t2.find('\n', r3) + 1 - r3);
  check_bad(t2, "record 4");
  std::string t3 = text;
  const auto cp = t3.find("\"time\":", t3.rfind("{\"type\":\"checkpoint\""));
  t3[cp + 8] = t3[cp + 8] == '1' ? '2' : '1';
  check_bad(t3, "InvalidSignature");

  // Nothing secret in what the commands print or write.
  const std::string pin = slurp(dir_ + "/hsm/user.pin").substr(0, 32);
  ASSERT_EQ(pin.size(), 32U);
  EXPECT_EQ(text.find(pin), std::string::npos);
  EXPECT_EQ(run("audit verify --json").out.find(pin), std::string::npos);
}

// What `sha256sum` says of a file (an implementation other than gridseal's).
std::string sha256sum(const std::string& path) {
  CmdResult r = gs::test::run_command("sha256sum " + path);
  return r.code == 0 ? r.out.substr(0, 64) : "";
}

// The one file in `dir` (empty when there is not exactly one).
std::string only_file(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().string());
  return files.size() == 1 ? files.front() : "";
}

std::int64_t count_of(const std::string& db_path, const std::string& sql) {
  auto db = gs::db::Db::open(db_path, {.create = false});
  if (!db.ok()) return -1;
  auto st = db->prepare(sql);
  if (!st.ok()) return -1;
  auto step = st->step();
  const std::int64_t v = step.ok() && *step == gs::db::Step::row ? st->int64(0) : -1;
  st->reset();
  return v;
}

TEST_F(CliAudit, ArchiveWritesAVerifiableFileAndPrunesTheTable) {
  write_records(30);
  const std::string adir = dir_ + "/archive";
  fs::create_directory(adir);
  const std::string later = std::to_string(std::time(nullptr) + 3600);
  CmdResult a = run("audit archive --before " + later + " --dir " + adir);
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("archived records 1..30 (30 records, "), std::string::npos) << a.out;
  const std::string file = only_file(adir);
  EXPECT_NE(file.find("/audit-1-30-"), std::string::npos) << file;
  ASSERT_TRUE(fs::exists(file)) << a.out;
  EXPECT_NE(a.out.find("sha256 " + sha256sum(file)), std::string::npos) << a.out;
  EXPECT_NE(a.out.find("registered by record 31; 30 records"), std::string::npos) << a.out;
  EXPECT_EQ(count_of(db_, "SELECT count(*) FROM audit"), 1);

  CmdResult v = run("audit verify");
  ASSERT_EQ(v.code, 0) << v.out;
  EXPECT_NE(v.out.find("records 31..31 (1 checked)"), std::string::npos) << v.out;
  EXPECT_NE(v.out.find("note: records 1..30 are archived"), std::string::npos) << v.out;
  EXPECT_NE(run("audit verify --json").out.find("\"archived_through\":30"), std::string::npos);
  CmdResult none = run("audit archive --before 2020-01-01 --dir " + adir);
  EXPECT_EQ(none.code, 0) << none.out;
  EXPECT_NE(none.out.find("nothing to archive"), std::string::npos) << none.out;

  // More records after the archive: a writer starts on the pruned table.
  write_records(10);
  EXPECT_EQ(run("audit verify").code, 0);

  // The archive file alone, as a third party checks it.
  const std::string pem = dir_ + "/gs-audit.pem";
  ASSERT_EQ(run("hsm export-pubkey gs-audit --pem > " + pem).code, 0);
  if (gs::test::run_command("python3 -c 'import cryptography'").code != 0) {
    GTEST_SKIP() << "python3 with the cryptography package is not available";
  }
  std::ofstream(dir_ + "/verify.py") << readme_script();
  CmdResult py = gs::test::run_command("python3 " + dir_ + "/verify.py " + file + " " + pem);
  EXPECT_EQ(py.code, 0) << py.out;
  EXPECT_NE(py.out.find("OK: records 1..30 chain correctly, signed up to 30"), std::string::npos)
      << py.out;
}

TEST_F(CliAudit, ArchiveKilledWhilePruningIsFinishedByTheNextRun) {
  write_records(300);
  const std::string adir = dir_ + "/archive";
  fs::create_directory(adir);
  const std::string later = std::to_string(std::time(nullptr) + 3600);
  // One record per delete transaction, at least 10 ms apart: seconds of pruning to kill in.
  const pid_t pid = gs::test::spawn_gridseal(
      {"audit", "archive", "--before", later, "--dir", adir, "--chunk", "1", "--config", conf_});
  ASSERT_GE(pid, 0);
  std::int64_t left = -1;
  for (int i = 0; i < 500; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (count_of(db_, "SELECT count(*) FROM audit_archives") != 1) continue;
    left = count_of(db_, "SELECT count(*) FROM audit WHERE seq <= 300");
    if (left >= 0 && left <= 280) break;
  }
  kill(pid, SIGKILL);
  int wst = 0;
  waitpid(pid, &wst, 0);
  ASSERT_TRUE(WIFSIGNALED(wst)) << "the archive finished before the kill; the test proves nothing";
  ASSERT_GT(left, 0);

  // Registered, partly pruned: the table verifies, and says what is left.
  CmdResult v = run("audit verify");
  ASSERT_EQ(v.code, 0) << v.out;
  EXPECT_NE(v.out.find("archived records are still in the table"), std::string::npos) << v.out;
  CmdResult again = run("audit archive --before " + later + " --dir " + adir);
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("records an earlier archive run left in the table"), std::string::npos)
      << again.out;
  EXPECT_EQ(count_of(db_, "SELECT count(*) FROM audit WHERE seq <= 300"), 0);
  // This run also archived the first one's registration (signed since): the archives chain.
  EXPECT_NE(again.out.find("archived records 301..301"), std::string::npos) << again.out;
  CmdResult after = run("audit verify");
  ASSERT_EQ(after.code, 0) << after.out;
  EXPECT_EQ(after.out.find("still in the table"), std::string::npos) << after.out;
  for (const auto& e : fs::directory_iterator(adir)) {
    EXPECT_EQ(sha256sum(e.path().string()).size(), 64U) << e.path();
  }
}

TEST_F(CliAudit, UsageErrors) {
  write_records(2);
  CmdResult t = run("audit export --since yesterday");
  EXPECT_EQ(t.code, 1);
  EXPECT_NE(t.out.find("is not UTC seconds"), std::string::npos) << t.out;
  CmdResult f = run("audit export --since 0 --format csv");
  EXPECT_EQ(f.code, 1);
  EXPECT_NE(f.out.find("only jsonl"), std::string::npos);
  EXPECT_EQ(run("audit export").code, 2);  // --since is required
  EXPECT_EQ(run("audit verify --from 0").code, 2);
  EXPECT_EQ(run("audit reset-anchor").code, 2);  // --reason is required
  EXPECT_EQ(run("audit archive --dir " + dir_).code, 2);  // --before is required
  CmdResult nodir = run("audit archive --before 0 --dir " + dir_ + "/none");
  EXPECT_EQ(nodir.code, 1);
  EXPECT_NE(nodir.out.find("is not a directory"), std::string::npos) << nodir.out;
  CmdResult when = run("audit archive --before soon --dir " + dir_);
  EXPECT_EQ(when.code, 1);
  EXPECT_NE(when.out.find("--before: 'soon' is not UTC seconds"), std::string::npos) << when.out;
  // Another key than gs-audit's: every checkpoint is refused.
  ASSERT_EQ(run("hsm export-pubkey gs-cmd-1 --pem > " + dir_ + "/cmd.pem").code, 0);
  CmdResult wrong = run("audit verify --pubkey " + dir_ + "/cmd.pem");
  EXPECT_EQ(wrong.code, 1);
  EXPECT_NE(wrong.out.find("(bad_checkpoint)"), std::string::npos) << wrong.out;
  std::ofstream(dir_ + "/junk.pem") << "not a key";
  EXPECT_EQ(run("audit verify --pubkey " + dir_ + "/junk.pem").code, 1);
}

}  // namespace
