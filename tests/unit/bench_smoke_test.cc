// Smoke test of gridseal-bench: `ses` and `dkus` for about 2 s against the real daemons (plain
// TCP) must secure / open messages and see no error. No performance assertion.
#include <gtest/gtest.h>

#include <string>

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

TEST(BenchSmoke, SesAgainstTheRealDaemon) {
  gs::test::SesdOptions o;
  o.meters = 50;
  gs::test::SesdDaemon d(o);
  auto st = d.setup();
  ASSERT_TRUE(st.ok()) << st.error().message();
  st = d.start();
  ASSERT_TRUE(st.ok()) << st.error().message();
  const std::string cmd = std::string(GS_BIN_DIR) + "/gridseal-bench ses --host 127.0.0.1 --port " +
                          std::to_string(d.port()) +
                          " --plain --connections 4 --depth 4 --duration 1.5 --warmup 0.5"
                          " --meters 50 --title-prefix .7 --json --quiet";
  const auto r = gs::test::run_command(cmd);
  EXPECT_EQ(r.code, 0) << r.out << d.err_log();
  const auto open = r.out.find('{');
  ASSERT_NE(open, std::string::npos) << r.out;
  const std::string json = r.out.substr(open);
  EXPECT_GT(json_number(json, "count"), 0) << json;
  EXPECT_EQ(json_number(json, "errors_total"), 0) << json;
  EXPECT_EQ(json_number(json, "unanswered"), 0) << json;
  EXPECT_GT(json_number(json, "secured_per_s"), 0) << json;
  EXPECT_GT(json_number(json, "p99"), 0) << json;
  EXPECT_EQ(d.stop(), 0) << d.err_log();
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
}

}  // namespace
