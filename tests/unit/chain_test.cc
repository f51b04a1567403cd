// End to end through the three real daemons on loopback (plain TCP): a command secured by
// gridseal-sesd is accepted and executed by its simulated meter (gridseal-metersim serve), and
// the meter's response opens in gridseal-dkusd. Driven by `gridseal-bench read|disconnect|
// forged|replay --json`, whose cleartext checks are the verdict; the test checks the JSON
// (something verified, no error, no failed check) and that receipts reached the DKUS store.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/unit/daemon_process.h"
#include "tests/unit/run_command.h"

namespace gs::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

// A daemon of the chain (gs::test::DaemonProcess): stdout/stderr to PREFIX.out/.err.
class Daemon {
 public:
  bool start(const std::vector<std::string>& argv, const std::string& prefix, std::string* why) {
    auto st = proc_.start(argv, prefix + ".out", prefix + ".err", std::chrono::seconds(20));
    if (!st.ok()) *why = st.error().message();
    return st.ok();
  }
  int stop() { return proc_.stop(); }
  int port() const { return proc_.port(); }
  std::string err() const { return proc_.err_log(); }

 private:
  gs::test::DaemonProcess proc_;
};

// The number after "\"key\":" in a flat JSON text (the first occurrence); -1 when absent.
long long json_number(const std::string& json, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  const auto at = json.find(k);
  if (at == std::string::npos) return -1;
  return std::atoll(json.c_str() + at + k.size());
}

class ChainTest : public ::testing::Test {
 protected:
  static constexpr int kMeters = 16;

  void SetUp() override {
    char tmpl[] = "/tmp/gs-chain-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    const std::string common =
        "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-chain\"\n"
        "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
        "[store]\npath = \"gridseal.db\"\n"
        "[server]\naddress = \"127.0.0.1\"\nport = 0\nplain_tcp = true\nprocesses = 1\n"
        "drain_ms = 2000\n";
    std::ofstream(dir_ + "/ses.toml")
        << common
        << "[ses]\nhead_end_title = \".1.9\"\nses_title = \".1.10\"\npolicy = \"policy.toml\"\n"
           "metrics_port = 0\nmeter_cache_ttl_ms = 0\n";
    std::ofstream(dir_ + "/dkus.toml")
        << common
        << "[dkus]\ndkus_title = \".1.11\"\nhead_end_title = \".1.9\"\nmetrics_port = 0\n";
    std::ofstream(dir_ + "/policy.toml")
        << "[classes.connect_disconnect]\nwindow = 300\nfleet = { count = 6000, per = 60 }\n"
           "meter = { count = 600, per = 60 }\n"
           "[procedures]\nconnect_disconnect = [\"SP-26\"]\n"
           "[[client]]\nname = \"loopback\"\nsubject = \"plain:127.0.0.1\"\n"
           "classes = [\"read\", \"connect_disconnect\"]\n";
    auto r = run_gridseal("hsm init --config " + dir_ + "/ses.toml");
    ASSERT_EQ(r.code, 0) << r.out;
    auto cmd1 = run_gridseal("hsm export-pubkey gs-cmd-1 --hex --config " + dir_ + "/ses.toml");
    ASSERT_EQ(cmd1.code, 0) << cmd1.out;
    auto prov = run_gridseal("hsm export-pubkey gs-provision --hex --config " + dir_ + "/ses.toml");
    ASSERT_EQ(prov.code, 0) << prov.out;
    r = run_command(bin("gridseal-metersim") + " export --meters " + std::to_string(kMeters) +
                    " --keys ecdh --provision-pub " + trim(prov.out) + " --trust-cmd1 " +
                    trim(cmd1.out) + " --seed 5 --out " + dir_ + "/fleet.csv --state " + dir_ +
                    "/fleet.state");
    ASSERT_EQ(r.code, 0) << r.out;
    r = run_gridseal("meters import " + dir_ + "/fleet.csv --config " + dir_ + "/ses.toml");
    ASSERT_EQ(r.code, 0) << r.out;

    std::string why;
    ASSERT_TRUE(
        ses_.start({bin("gridseal-sesd"), "--config", dir_ + "/ses.toml"}, dir_ + "/sesd", &why))
        << why;
    ASSERT_TRUE(dkus_.start({bin("gridseal-dkusd"), "--config", dir_ + "/dkus.toml"},
                            dir_ + "/dkusd", &why))
        << why;
    ASSERT_TRUE(relay_.start({bin("gridseal-metersim"), "serve", "--state", dir_ + "/fleet.state",
                              "--listen", "127.0.0.1:0", "--plain"},
                             dir_ + "/metersim", &why))
        << why;
  }

  void TearDown() override {
    relay_.stop();
    dkus_.stop();
    ses_.stop();
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  static std::string bin(const std::string& name) { return std::string(GS_BIN_DIR) + "/" + name; }

  // `gridseal-bench SCENARIO` against the three daemons with --json --quiet, bounded by its
  // own options (and `timeout` as a last resort).
  CmdResult bench(const std::string& scenario, const std::string& args) {
    return run_command("timeout 60 " + bin("gridseal-bench") + " " + scenario +
                       " --plain --ses 127.0.0.1:" + std::to_string(ses_.port()) +
                       " --relay 127.0.0.1:" + std::to_string(relay_.port()) +
                       " --dkus 127.0.0.1:" + std::to_string(dkus_.port()) + " --meters " +
                       std::to_string(kMeters) + " --json --quiet " + args);
  }

  std::string logs() const {
    return "\n--- sesd.err\n" + ses_.err() + "\n--- dkusd.err\n" + dkus_.err() +
           "\n--- metersim.err\n" + relay_.err();
  }

  std::string dir_;
  Daemon ses_, dkus_, relay_;
};

TEST_F(ChainTest, ReadsAreSecuredExecutedAndOpened) {
  // Paced: a simulated meter answers bsy to more than 16 commands within one second (its
  // replay table), and this fleet is small.
  auto r = bench("read", "--connections 2 --depth 4 --duration 1.5 --rate 120");
  EXPECT_EQ(r.code, 0) << r.out << logs();
  EXPECT_GT(json_number(r.out, "count"), 0) << r.out;
  EXPECT_EQ(json_number(r.out, "errors_total"), 0) << r.out;
  EXPECT_EQ(json_number(r.out, "checks_failed"), 0) << r.out;
  EXPECT_NE(r.out.find("\"scenario\":\"read\""), std::string::npos) << r.out;
}

TEST_F(ChainTest, DisconnectAndConnectLeaveStoredReceipts) {
  auto r =
      bench("disconnect", "--connections 2 --depth 2 --rounds 2 --store " + dir_ + "/gridseal.db");
  EXPECT_EQ(r.code, 0) << r.out << logs();
  // 2 lanes x 2 rounds x 2 meters x (disconnect + connect)
  EXPECT_EQ(json_number(r.out, "count"), 16) << r.out;
  EXPECT_EQ(json_number(r.out, "errors_total"), 0) << r.out;
  EXPECT_EQ(json_number(r.out, "receipts_verified"), 16) << r.out;
  EXPECT_EQ(json_number(r.out, "receipts_stored"), 16) << r.out;
  // And `gridseal receipts show` sees them: meter 1 was disconnected and connected once.
  auto shown = run_gridseal("receipts show SIM00000001 --json --config " + dir_ + "/dkus.toml");
  ASSERT_EQ(shown.code, 0) << shown.out;
  std::size_t n = 0;
  for (auto at = shown.out.find("\"invocation_id\""); at != std::string::npos;
       at = shown.out.find("\"invocation_id\"", at + 1)) {
    ++n;
  }
  EXPECT_EQ(n, 2u) << shown.out;
}

TEST_F(ChainTest, ForgedAndReplayedMessagesAreRefused) {
  for (const char* scenario : {"forged", "replay"}) {
    auto r = bench(scenario, "--rounds 2");
    EXPECT_EQ(r.code, 0) << scenario << ": " << r.out << logs();
    EXPECT_EQ(json_number(r.out, "checks_failed"), 0) << r.out;
    EXPECT_EQ(json_number(r.out, "errors_total"), 0) << r.out;
    EXPECT_NE(r.out.find("\"passed\":2"), std::string::npos) << r.out;
  }
}

}  // namespace
}  // namespace gs::test
