// gridseal-dkusd's reorder window (dkus.reorder_window, store::ReplayMark) end to end: the real
// daemon (supervisor + 2 workers, SoftHSM2) as in dkusd_test.cc. A meter's messages that reach
// the DKUS out of order are each opened once; replays and ids below the window are refused `sme`
// with their own reason; the rollover engine's mark (written to the store by another connection)
// no longer refuses the read the meter answered just before; kill -9 keeps the window.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "c1222/security.h"
#include "src/client.h"
#include "src/host_aes.h"
#include "src/key_store.h"
#include "src/sqlite.h"
#include "tests/unit/dkusd_fixture.h"

namespace {

using gs::Bytes;
using gs::test::MeterMessage;

class DkusdReorder : public ::testing::Test {
 protected:
  void start_with(gs::test::DkusdOptions o) {
    daemon_ = std::make_unique<gs::test::DkusdDaemon>(std::move(o));
    auto st = daemon_->setup();
    ASSERT_TRUE(st.ok()) << st.error().message();
    st = daemon_->start();
    ASSERT_TRUE(st.ok()) << st.error().message();
  }
  void TearDown() override { daemon_.reset(); }

  std::unique_ptr<gs::server::Client> connect() {
    auto c = daemon_->connect();
    GS_CHECK(c.ok());
    return std::move(c).value();
  }

  Bytes seal(std::size_t meter, std::uint64_t id) {
    MeterMessage mm;
    mm.id = id;
    return daemon_->seal(meter, mm);
  }

  // The host's own opening of a sealed message with meter i's key (the expected answer).
  Bytes host_open(std::size_t i, const Bytes& wire) {
    auto aes = gs::HostAes::make(gs::test::hex_bytes(daemon_->meter(i).key_hex)).value();
    auto eax = gs::c1222::EaxPrime::make(*aes).value();
    auto o = gs::c1222::open(wire, [&](std::uint8_t) { return &eax; });
    GS_CHECK(o.ok());
    return o->wire;
  }

  // "opened", "sme", or what else came back.
  std::string outcome(gs::server::Client& c, std::size_t meter, const Bytes& wire) {
    auto r = c.call(wire);
    if (!r.ok()) return "call failed: " + r.error().message();
    if (*r == host_open(meter, wire)) return "opened";
    const int code = gs::test::error_reply(*r).code;
    return code == gs::c1222::kRespSme ? "sme" : "code " + std::to_string(code);
  }

  double metric(const std::string& name, const std::vector<std::string>& labels = {}) {
    return gs::test::metric_sum(daemon_->http_get("/metrics"), name, labels);
  }

  std::unique_ptr<gs::test::DkusdDaemon> daemon_;
};

TEST_F(DkusdReorder, LaterThenEarlierAreBothOpenedOnceAcrossWorkers) {
  start_with({});
  const Bytes m101 = seal(2, 101), m100 = seal(2, 100), m38 = seal(2, 38), m37 = seal(2, 37);
  auto c = connect();
  EXPECT_EQ(outcome(*c, 2, m101), "opened");
  EXPECT_EQ(outcome(*c, 2, m100), "opened");  // reordered: inside the window, never seen
  EXPECT_EQ(outcome(*c, 2, m100), "sme");     // replayed
  EXPECT_EQ(outcome(*c, 2, m37), "sme");      // 101 - 64: below the window
  EXPECT_EQ(outcome(*c, 2, m38), "opened");   // 101 - 63: the oldest id the window holds
  // On fresh connections (spread over both workers by SO_REUSEPORT) all of them stay refused.
  for (int i = 0; i < 8; ++i) {
    auto ci = connect();
    for (const Bytes* m : {&m101, &m100, &m38, &m37}) {
      EXPECT_EQ(outcome(*ci, 2, *m), "sme") << "connection " << i;
    }
  }
  const std::string log = daemon_->err_log();
  EXPECT_NE(log.find("invocation id 100 replayed"), std::string::npos) << log;
  EXPECT_NE(log.find("invocation id 37 older than the reorder window (64 ids)"), std::string::npos)
      << log;
  EXPECT_GE(metric("gridseal_dkus_requests_total", {"result=\"replay\""}), 1 + 3 * 8);
  EXPECT_GE(metric("gridseal_dkus_requests_total", {"result=\"too_old\""}), 1 + 8);
  EXPECT_EQ(metric("gridseal_dkus_requests_total", {"result=\"ok\""}), 3);
}

// The bug `gridseal-bench rollover` found: the rollover engine verifies the meter's answer k+1 to
// its key update and records it in the store (its own connection, KeyStore::raise_replay_mark as
// in dkus/rollover_engine.cc) before the collection engine hands the DKUS the meter's read
// answer k. That read is authentic and new: it is opened, once.
TEST_F(DkusdReorder, TheRolloverEnginesMarkNoLongerRefusesTheEarlierRead) {
  start_with({});
  const Bytes read6 = seal(1, 6), update7 = seal(1, 7);
  {
    auto ks = gs::store::KeyStore::open(daemon_->dir() + "/gridseal.db");
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    const std::int64_t row = ks->meter_by_id("M1").value().value().row;
    auto tx = gs::db::Transaction::begin(ks->db());
    ASSERT_TRUE(tx.ok());
    auto v = ks->raise_replay_mark(row, 7, gs::test::utc_now_s(), 64);
    ASSERT_TRUE(v.ok()) << v.error().message();
    EXPECT_EQ(*v, gs::store::ReplayVerdict::accepted);
    ASSERT_TRUE(tx->commit().ok());
  }
  auto c = connect();
  EXPECT_EQ(outcome(*c, 1, read6), "opened");
  EXPECT_EQ(outcome(*c, 1, read6), "sme");
  EXPECT_EQ(outcome(*c, 1, update7), "sme");  // the engine already accepted it
  auto c2 = connect();
  EXPECT_EQ(outcome(*c2, 1, read6), "sme");
  EXPECT_EQ(daemon_->err_log().find("not above"), std::string::npos);
}

// A reordered message handed over by several collection-engine connections at once: exactly one
// is opened, on whichever worker, the others refused.
TEST_F(DkusdReorder, RacingConnectionsOpenAReorderedMessageOnce) {
  start_with({});
  {
    auto c = connect();
    ASSERT_EQ(outcome(*c, 3, seal(3, 200)), "opened");
  }
  for (std::uint64_t id : {150u, 199u}) {
    const Bytes m = seal(3, id);
    std::vector<std::unique_ptr<gs::server::Client>> cs;
    for (int i = 0; i < 8; ++i) cs.push_back(connect());
    std::atomic<int> opened{0}, refused{0}, other{0};
    std::vector<std::thread> ts;
    for (auto& ci : cs) {
      ts.emplace_back([&, cl = ci.get()] {
        const std::string o = outcome(*cl, 3, m);
        if (o == "opened") {
          ++opened;
        } else if (o == "sme") {
          ++refused;
        } else {
          ++other;
        }
      });
    }
    for (auto& t : ts) t.join();
    EXPECT_EQ(opened.load(), 1) << "id " << id;
    EXPECT_EQ(refused.load(), 7) << "id " << id;
    EXPECT_EQ(other.load(), 0) << "id " << id;
  }
}

TEST_F(DkusdReorder, WindowZeroKeepsIdsStrictlyRising) {
  gs::test::DkusdOptions o;
  o.dkus_lines = {"reorder_window = 0"};
  start_with(o);
  auto c = connect();
  EXPECT_EQ(outcome(*c, 2, seal(2, 20)), "opened");
  EXPECT_EQ(outcome(*c, 2, seal(2, 19)), "sme");
  EXPECT_EQ(outcome(*c, 2, seal(2, 21)), "opened");
  EXPECT_NE(daemon_->err_log().find("invocation id 19 older than the reorder window (0 ids)"),
            std::string::npos)
      << daemon_->err_log();
  // Out of range: --check names the key.
  const std::string conf = daemon_->dir() + "/bad.toml";
  std::ofstream(conf) << "[hsm]\npin_file = \"pin\"\n[server]\nplain_tcp = true\n[dkus]\n"
                         "dkus_title = \".1.11\"\nhead_end_title = \".1.9\"\nreorder_window = 65\n";
  auto r = gs::test::run_command(std::string(GS_BIN_DIR) + "/gridseal-dkusd --config " + conf +
                                 " --check");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("dkus.reorder_window"), std::string::npos) << r.out;
}

// Pairs sent swapped (k+1, k) in one pipelined burst; the daemon is killed (every process,
// SIGKILL) in the middle. After the restart every answered message is refused: the ids accepted
// below the mark were durable with it.
TEST_F(DkusdReorder, WindowSurvivesKillNine) {
  gs::test::DkusdOptions o;
  // Only the durable windows may refuse the replays below (not the restart rule of DESIGN §5).
  o.dkus_lines = {"refuse_sealed_before_start = false"};
  start_with(o);
  constexpr int kBurst = 400;
  std::vector<Bytes> msgs;
  std::vector<std::size_t> meter_of;
  for (int i = 0; i < kBurst; ++i) {
    const std::size_t meter = 1 + static_cast<std::size_t>((i / 2) % 3);
    const std::uint64_t id = 1000 + static_cast<std::uint64_t>(i ^ 1);  // 1001, 1000, 1003, ...
    msgs.push_back(seal(meter, id));
    meter_of.push_back(meter);
  }
  auto c = connect();
  Bytes all;
  for (const Bytes& m : msgs) all.insert(all.end(), m.begin(), m.end());
  ASSERT_TRUE(c->send(all).ok());
  std::vector<std::size_t> answered;
  for (std::size_t i = 0; i < msgs.size(); ++i) {
    auto r = c->receive();
    if (!r.ok()) break;
    ASSERT_EQ(gs::to_hex(*r), gs::to_hex(host_open(meter_of[i], msgs[i]))) << "message " << i;
    answered.push_back(i);
    if (answered.size() == 100) daemon_->kill_group();
  }
  ASSERT_GE(answered.size(), 100u);
  c.reset();
  auto st = daemon_->start();
  ASSERT_TRUE(st.ok()) << st.error().message();
  auto c2 = connect();
  for (std::size_t i : answered) {
    EXPECT_EQ(outcome(*c2, meter_of[i], msgs[i]), "sme")
        << "answered message " << i << " accepted again after kill -9";
  }
  EXPECT_EQ(outcome(*c2, 1, seal(1, 5000)), "opened");
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->err_log();
}

}  // namespace
