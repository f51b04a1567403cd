// Smoke test of gridseal-bench: `ses` and `dkus` for about 2 s against the real daemons (plain
// TCP) must secure / open messages and see no error; `rollover` rekeys a small fleet through
// the real DKUS engine while reads go SES -> relay/meter -> DKUS, and every meter must confirm
// with no read refused. No performance assertion.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "src/sqlite.h"
#include "tests/unit/daemon_process.h"
#include "tests/unit/dkusd_fixture.h"
#include "tests/unit/sesd_fixture.h"

namespace {

// The number after "\"key\":" in a flat JSON object (-1 when absent).
double json_number(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\":");
  if (at == std::string::npos) return -1;
  try {
    return std::stod(json.substr(at + key.size() + 3));
  } catch (...) {
    return -1;
  }
}

// Runs `gridseal-bench ses --plain ARGS --json --quiet` against `d` (meters .7.*); its exit must
// be 0. The JSON object it printed, or "" (a test failure) when there is none.
std::string ses_bench_json(const gs::test::SesdDaemon& d, const std::string& args) {
  const std::string cmd = std::string(GS_BIN_DIR) + "/gridseal-bench ses --host 127.0.0.1 --port " +
                          std::to_string(d.port()) + " --plain --title-prefix .7 " + args +
                          " --json --quiet";
  const auto r = gs::test::run_command(cmd);
  EXPECT_EQ(r.code, 0) << r.out << d.err_log();
  const auto open = r.out.find('{');
  EXPECT_NE(open, std::string::npos) << r.out;
  return open == std::string::npos ? std::string() : r.out.substr(open);
}

// A real SES with `meters` meters, started (the test fails when it cannot start).
std::unique_ptr<gs::test::SesdDaemon> started_sesd(std::size_t meters) {
  gs::test::SesdOptions o;
  o.meters = meters;
  auto d = std::make_unique<gs::test::SesdDaemon>(o);
  auto st = d->setup();
  if (st.ok()) st = d->start();
  EXPECT_TRUE(st.ok()) << st.error().message();
  return st.ok() ? std::move(d) : nullptr;
}

TEST(BenchSmoke, SesAgainstTheRealDaemon) {
  auto d = started_sesd(50);
  ASSERT_NE(d, nullptr);
  const std::string json =
      ses_bench_json(*d, "--connections 4 --depth 4 --duration 1.5 --warmup 0.5 --meters 50");
  ASSERT_FALSE(json.empty());
  EXPECT_GT(json_number(json, "count"), 0) << json;
  EXPECT_EQ(json_number(json, "errors_total"), 0) << json;
  EXPECT_EQ(json_number(json, "unanswered"), 0) << json;
  EXPECT_GT(json_number(json, "secured_per_s"), 0) << json;
  EXPECT_GT(json_number(json, "p99"), 0) << json;
  EXPECT_EQ(d->stop(), 0) << d->err_log();
}

// Open loop: with the per-thread pace tick (the default) and with a timer per connection
// (--pace-us 0), the measured part carries the offered rate, neither less (a pacer that stops)
// nor more (ticks that send twice what fell due), and every command is answered.
TEST(BenchSmoke, SesOpenLoopCarriesTheOfferedRate) {
  auto d = started_sesd(50);
  ASSERT_NE(d, nullptr);
  for (const char* pace : {"", " --pace-us 2000", " --pace-us 0"}) {
    const std::string json = ses_bench_json(
        *d, std::string("--connections 4 --depth 16 --duration 2 --warmup 0.3 --meters 50 --rate 300") +
                pace);
    ASSERT_FALSE(json.empty()) << pace;
    // 300/s over 2 s; a request due in the last milliseconds may still be on its way.
    EXPECT_GE(json_number(json, "count"), 540) << pace << json;
    EXPECT_LE(json_number(json, "count"), 603) << pace << json;
    EXPECT_EQ(json_number(json, "errors_total"), 0) << pace << json;
    EXPECT_EQ(json_number(json, "unanswered"), 0) << pace << json;
  }
  EXPECT_EQ(d->stop(), 0) << d->err_log();
}

// --sweep K: every meter exactly K times, then the run ends by itself. The SES's audit trail
// (one "command" record per secured command, subject the meter id) is the independent count.
TEST(BenchSmoke, SesSweepSendsEveryMeterExactlyKTimes) {
  auto d = started_sesd(30);
  ASSERT_NE(d, nullptr);
  const std::string json = ses_bench_json(
      *d, "--connections 4 --depth 4 --sweep 3 --duration 120 --warmup 0 --meters 30");
  ASSERT_FALSE(json.empty());
  EXPECT_EQ(json_number(json, "count"), 90) << json;
  EXPECT_EQ(json_number(json, "sweep"), 3) << json;
  EXPECT_EQ(json_number(json, "errors_total"), 0) << json;
  EXPECT_LT(json_number(json, "duration_s"), 60) << json;  // ended when done, not at --duration
  EXPECT_EQ(d->stop(), 0) << d->err_log();
  auto db = gs::db::Db::open(d->dir() + "/gridseal.db");
  ASSERT_TRUE(db.ok()) << db.error().message();
  auto q = db->prepare(
      "SELECT COUNT(*), MIN(n), MAX(n) FROM (SELECT subject, COUNT(*) AS n FROM audit "
      "WHERE event = 'command' GROUP BY subject)");
  ASSERT_TRUE(q.ok()) << q.error().message();
  ASSERT_EQ(q->step().value(), gs::db::Step::row);
  EXPECT_EQ(q->int64(0), 30);  // every meter
  EXPECT_EQ(q->int64(1), 3);   // each exactly three times
  EXPECT_EQ(q->int64(2), 3);
  // Bad combinations are usage errors.
  const std::string base = std::string(GS_BIN_DIR) +
                           "/gridseal-bench ses --host 127.0.0.1 --port 1 --plain --meters 30"
                           " --connections 4 ";
  EXPECT_EQ(gs::test::run_command(base + "--sweep 5").code, 2);
  EXPECT_EQ(gs::test::run_command(base + "--sweep 2 --rate 100").code, 2);
}

// Readings sealed by the bench under the fleet's plain keys, opened by the real DKUS: every
// answer must be the reading in clear, and the raw EAX' open of the same token is measured.
TEST(BenchSmoke, DkusAgainstTheRealDaemon) {
  gs::test::DkusdOptions o;
  o.meters = 40;
  gs::test::DkusdDaemon d(o);
  auto st = d.setup();
  ASSERT_TRUE(st.ok()) << st.error().message();
  st = d.start();
  ASSERT_TRUE(st.ok()) << st.error().message();
  const std::string cmd = std::string(GS_BIN_DIR) + "/gridseal-bench dkus --host 127.0.0.1 --port " +
                          std::to_string(d.port()) + " --plain --fleet " + d.dir() +
                          "/fleet.csv --meters 40 --connections 4 --depth 4 --duration 1.5"
                          " --warmup 0.5 --json --quiet --hsm-config " + d.conf() +
                          " --hsm-processes 1 --hsm-threads 1 --hsm-seconds 0.5";
  const auto r = gs::test::run_command(cmd);
  EXPECT_EQ(r.code, 0) << r.out << d.err_log();
  const auto open = r.out.find('{');
  ASSERT_NE(open, std::string::npos) << r.out;
  const std::string json = r.out.substr(open);
  EXPECT_GT(json_number(json, "count"), 0) << json;
  EXPECT_EQ(json_number(json, "errors_total"), 0) << json;
  EXPECT_EQ(json_number(json, "unanswered"), 0) << json;
  EXPECT_EQ(json_number(json, "exhausted"), 0) << json;
  EXPECT_GT(json_number(json, "opened_per_s"), 0) << json;
  EXPECT_GT(json_number(json, "p99"), 0) << json;
  EXPECT_GT(json_number(json, "per_s"), 0) << json;  // raw EAX' open
  EXPECT_GT(json_number(json, "opened_over_raw"), 0) << json;
  // A second run at once: the first sent far more than 10 messages per meter per second, so the
  // clock-derived ids would repeat; with --store the meters start above the stored replay
  // marks and again nothing is refused.
  const auto again = gs::test::run_command(
      std::string(GS_BIN_DIR) + "/gridseal-bench dkus --port " + std::to_string(d.port()) +
      " --plain --fleet " + d.dir() + "/fleet.csv --store " + d.dir() +
      "/gridseal.db --connections 2 --depth 2 --duration 0.3 --warmup 0 --rate 200 --json"
      " --quiet");
  EXPECT_EQ(again.code, 0) << again.out << d.err_log();
  EXPECT_EQ(d.stop(), 0) << d.err_log();
}

// `gridseal-bench echo` writes back exactly what it reads. `dkus --echo` against it counts every
// message echoed and sees no error; the ordinary judge (an answer must be the message opened,
// from the meter's title) refuses every echo, so an echo server can never pass for a DKUS. At
// SIGTERM it reports the bytes it echoed; it refuses a non-loopback address.
TEST(BenchSmoke, EchoServerIsTheCeilingAndNeverPassesForADkus) {
  char tmpl[] = "/tmp/gs-bench-echo-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  struct Cleanup {
    std::string path;
    ~Cleanup() { std::filesystem::remove_all(path); }
  } cleanup{dir};
  const std::string bin = std::string(GS_BIN_DIR) + "/gridseal-bench";
  ASSERT_EQ(gs::test::run_command(bin + " make-fleet --meters 40 --title-prefix .8 --out " + dir +
                                  "/fleet.csv")
                .code,
            0);
  gs::test::DaemonProcess echo;
  auto st = echo.start({bin, "echo", "--threads", "2"}, dir + "/echo.out", dir + "/echo.err",
                       std::chrono::seconds(10));
  ASSERT_TRUE(st.ok()) << st.error().message();
  const std::string load = bin + " dkus --host 127.0.0.1 --port " + std::to_string(echo.port()) +
                           " --plain --fleet " + dir + "/fleet.csv --connections 4 --depth 8"
                           " --per-meter 1000 --json --quiet";

  // Open loop with no (closed-loop) warm-up: a closed loop would send the 40,000 messages in a
  // fraction of a second and run out.
  const auto r = gs::test::run_command(load + " --echo --rate 10000 --duration 1 --warmup 0");
  EXPECT_EQ(r.code, 0) << r.out;
  const auto open = r.out.find('{');
  ASSERT_NE(open, std::string::npos) << r.out;
  const std::string json = r.out.substr(open);
  EXPECT_NE(json.find("\"echo\":true"), std::string::npos) << json;
  EXPECT_GT(json_number(json, "count"), 1000) << json;
  EXPECT_EQ(json_number(json, "errors_total"), 0) << json;
  EXPECT_EQ(json_number(json, "unanswered"), 0) << json;

  const auto judged = gs::test::run_command(load + " --rate 2000 --duration 0.3 --warmup 0");
  EXPECT_EQ(judged.code, 1) << judged.out;
  const auto jopen = judged.out.find('{');
  ASSERT_NE(jopen, std::string::npos) << judged.out;
  const std::string jjson = judged.out.substr(jopen);
  EXPECT_EQ(json_number(jjson, "count"), 0) << jjson;
  EXPECT_GT(json_number(jjson, "errors_total"), 0) << jjson;
  EXPECT_EQ(json_number(jjson, "errors_total"), json_number(jjson, "answered")) << jjson;

  EXPECT_EQ(echo.stop(), 0) << echo.err_log();
  const std::string summary = echo.out_log();
  const auto at = summary.find("echoed ");
  ASSERT_NE(at, std::string::npos) << summary;
  EXPECT_GT(std::stod(summary.substr(at + 7)), 1000.0 * 200) << summary;  // bytes

  EXPECT_EQ(gs::test::run_command(bin + " echo --address 10.1.2.3").code, 2);
  EXPECT_EQ(gs::test::run_command(bin + " echo --threads 0").code, 2);
}

// The text of the JSON object that follows "\"key\":{" (up to the matching brace), "" if absent.
std::string json_object(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\":{");
  if (at == std::string::npos) return "";
  const auto open = at + key.size() + 3;
  int depth = 0;
  for (auto i = open; i < json.size(); ++i) {
    if (json[i] == '{') ++depth;
    if (json[i] == '}' && --depth == 0) return json.substr(open, i - open + 1);
  }
  return "";
}

// `gridseal-bench rollover` against the real daemons: gridseal-dkusd with [rollover] enabled
// towards the gridseal-metersim relay (RolloverRig), gridseal-sesd on the same token and store
// with its default meter cache (so it keeps sealing under the old key for a while after a
// meter's new key is confirmed), the campaign started and followed with the real `gridseal`
// CLI. Every meter must confirm, and every read before, during and after must open and check.
TEST(BenchSmoke, RolloverUnderReadLoad) {
  constexpr int kMeters = 200;
  gs::test::RolloverRigOptions ro;
  ro.meters = kMeters;
  gs::test::RolloverRig rig(ro);
  auto st = rig.setup();
  ASSERT_TRUE(st.ok()) << st.error().message();
  st = rig.start_dkusd();
  ASSERT_TRUE(st.ok()) << st.error().message() << rig.logs();

  std::ofstream(rig.dir() + "/ses.toml")
      << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-rollover\"\n"
         "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
         "[store]\npath = \"gridseal.db\"\n"
         "[server]\naddress = \"127.0.0.1\"\nport = 0\nplain_tcp = true\nprocesses = 1\n"
         "drain_ms = 2000\n"
         "[ses]\nhead_end_title = \".1.9\"\nses_title = \".1.10\"\npolicy = \"policy.toml\"\n"
         "metrics_port = 0\n";
  std::ofstream(rig.dir() + "/policy.toml")
      << "[[client]]\nname = \"loopback\"\nsubject = \"plain:127.0.0.1\"\nclasses = [\"read\"]\n";
  gs::test::DaemonProcess ses;
  st = ses.start({std::string(GS_BIN_DIR) + "/gridseal-sesd", "--config", rig.dir() + "/ses.toml"},
                 rig.dir() + "/sesd.out", rig.dir() + "/sesd.err", std::chrono::seconds(30));
  ASSERT_TRUE(st.ok()) << st.error().message();

  // Paced reads (a simulated meter answers bsy to more than 16 commands within one second), a
  // second of baseline, the campaign, a second of reads after it.
  const std::string cmd =
      "timeout 170 " + std::string(GS_BIN_DIR) +
      "/gridseal-bench rollover --plain --ses 127.0.0.1:" + std::to_string(ses.port()) + " --relay 127.0.0.1:" + std::to_string(rig.relay_port()) +
      " --dkus 127.0.0.1:" + std::to_string(rig.dkus_client().port) + " --meters " +
      std::to_string(kMeters) + " --config " + rig.conf() +
      " --connections 2 --depth 4 --rate 300 --duration 1 --after 1 --rekey-timeout 120"
      " --poll-ms 100 --json --quiet";
  const auto r = gs::test::run_command(cmd);
  const std::string logs = r.out + rig.logs() + "\n--- sesd.err\n" + ses.err_log();
  EXPECT_EQ(r.code, 0) << logs;
  const auto open = r.out.find('{');
  ASSERT_NE(open, std::string::npos) << logs;
  const std::string json = r.out.substr(open);
  EXPECT_NE(json.find("\"scenario\":\"rollover\""), std::string::npos) << json;
  EXPECT_EQ(json_number(json, "errors_total"), 0) << logs;
  EXPECT_EQ(json_number(json, "checks_failed"), 0) << json;
  const std::string campaign = json_object(json, "campaign");
  EXPECT_EQ(json_number(campaign, "total"), kMeters) << json;
  EXPECT_EQ(json_number(campaign, "confirmed"), kMeters) << logs;
  EXPECT_EQ(json_number(campaign, "failed"), 0) << json;
  EXPECT_NE(campaign.find("\"finished\":true"), std::string::npos) << json;
  EXPECT_GT(json_number(campaign, "rekeyed_per_s"), 0) << json;
  for (const char* phase : {"baseline", "rollover", "after"}) {
    const std::string p = json_object(json, phase);
    EXPECT_GT(json_number(p, "count"), 0) << phase << ": " << json;
    EXPECT_EQ(json_number(p, "errors_total"), 0) << phase << ": " << json;
  }
  // The store agrees: the CLI reports the campaign done with every meter confirmed.
  const auto status = rig.gridseal("rollover status --json");
  EXPECT_EQ(status.code, 0) << status.out;
  EXPECT_EQ(json_number(status.out, "confirmed"), kMeters) << status.out;
  EXPECT_EQ(ses.stop(), 0) << ses.err_log();
}

TEST(BenchSmoke, UsageErrorsExitTwo) {
  const std::string bin = std::string(GS_BIN_DIR) + "/gridseal-bench";
  EXPECT_EQ(gs::test::run_command(bin + " nonsense").code, 2);
  EXPECT_EQ(gs::test::run_command(bin + " ses --plain --port 1 --bogus 3").code, 2);
  EXPECT_EQ(gs::test::run_command(bin + " ses --port 1 --meters 5").code, 2);  // no TLS files
  EXPECT_EQ(gs::test::run_command(bin + " ses --help").code, 0);
  EXPECT_EQ(gs::test::run_command(bin + " dkus --plain --port 1").code, 2);  // no --fleet
  EXPECT_EQ(gs::test::run_command(bin + " dkus --plain --port 1 --fleet f --epsem-bytes 7").code,
            2);
  EXPECT_EQ(gs::test::run_command(bin + " dkus --help").code, 0);
  EXPECT_EQ(gs::test::run_command(bin + " rollover --help").code, 0);
  const std::string chain = " --plain --ses 127.0.0.1:1 --relay 127.0.0.1:1 --dkus 127.0.0.1:1";
  EXPECT_EQ(gs::test::run_command(bin + " rollover" + chain + " --meters 5").code, 2);  // --config
  EXPECT_EQ(
      gs::test::run_command(bin + " rollover" + chain + " --meters 5 --config c --rounds 2").code,
      2);
  EXPECT_EQ(gs::test::run_command(bin + " rollover" + chain +
                                  " --meters 5 --config c --rekey-meters 6")
                .code,
            2);
  EXPECT_EQ(gs::test::run_command(bin + " rollover" + chain +
                                  " --meters 5 --config c --gridseal /nonexistent/gridseal")
                .code,
            2);
  EXPECT_EQ(gs::test::run_command(bin + " read" + chain + " --meters 5 --config c").code, 2);
}

}  // namespace
