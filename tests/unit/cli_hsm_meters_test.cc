// End-to-end tests of `gridseal hsm` and `gridseal meters` against a real SoftHSM2 token created
// in a temp dir: idempotent init, attributes, import idempotence/conflicts/line numbers, no key
// bytes in any output, clear errors, and kill -9 during a large import.
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

  CmdResult rv = run("meters revoke M7 --reason stolen" + cfg());
  ASSERT_EQ(rv.code, 0) << rv.out;
  CmdResult after = run("meters show M7" + cfg());
  EXPECT_NE(after.out.find("compromised: stolen"), std::string::npos) << after.out;
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
