// End-to-end tests of gridseal-dkusd: the real daemon (supervisor + 2 workers) on loopback plain
// TCP with a SoftHSM2 token made by `gridseal hsm init` and meters imported with plain keys and
// ECC public keys. Messages are sealed by the codec on the host as a meter would seal them; what
// comes back is checked against the host's own opening of the same message.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "c1222/message.h"
#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "src/client.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"
#include "src/sqlite.h"
#include "tests/unit/dkusd_fixture.h"

namespace {

using gs::Bytes;
using gs::test::MeterMessage;

class Dkusd : public ::testing::Test {
 protected:
  void start_with(gs::test::DkusdOptions o) {
    daemon_ = std::make_unique<gs::test::DkusdDaemon>(std::move(o));
    auto st = daemon_->setup();
    ASSERT_TRUE(st.ok()) << st.error().message();
    st = daemon_->start();
    ASSERT_TRUE(st.ok()) << st.error().message();
  }
  void SetUp() override {}
  void TearDown() override { daemon_.reset(); }

  std::unique_ptr<gs::server::Client> connect() {
    auto c = daemon_->connect();
    GS_CHECK(c.ok());
    return std::move(c).value();
  }

  // The host's own opening of a sealed message with meter i's key (the expected answer).
  Bytes host_open(std::size_t i, const Bytes& wire) {
    auto aes = gs::HostAes::make(gs::test::hex_bytes(daemon_->meter(i).key_hex)).value();
    auto eax = gs::c1222::EaxPrime::make(*aes).value();
    auto o = gs::c1222::open(wire, [&](std::uint8_t) { return &eax; });
    GS_CHECK(o.ok());
    return o->wire;
  }

  // The error code of a response (negative when it is not an error response), checking that
  // it comes from the DKUS to the collection engine and answers `id`.
  static int error_code(const Bytes& wire, std::uint64_t id) {
    const gs::test::ErrorReply r = gs::test::error_reply(wire);
    if (r.code >= 0 && r.calling == ".1.11") {
      EXPECT_EQ(r.called, ".1.9");
      EXPECT_EQ(r.called_id_hex, gs::to_hex(gs::test::integer_content(id)));
      return r.code;
    }
    return -1;
  }

  double metric(const std::string& name, const std::vector<std::string>& labels = {}) {
    return gs::test::metric_sum(daemon_->http_get("/metrics"), name, labels);
  }

  std::unique_ptr<gs::test::DkusdDaemon> daemon_;
};

TEST_F(Dkusd, OpensToModeZeroWithTheSameEpsem) {
  start_with({});
  auto c = connect();
  for (std::uint64_t id : {5u, 6u, 300u, 70000u}) {
    MeterMessage mm;
    mm.meter = daemon_->meter(1).title;
    mm.id = id;
    mm.services = {Bytes{0x00, 0x00, 0x03, 0x01, 0x02, 0x03, 0xFA}, Bytes{0x00}};
    const Bytes sealed = daemon_->seal(1, mm);
    auto r = c->call(sealed);
    ASSERT_TRUE(r.ok()) << r.error().message() << daemon_->err_log();
    EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(1, sealed))) << daemon_->err_log();
    auto m = gs::c1222::decode(*r);
    ASSERT_TRUE(m.ok());
    auto e = gs::c1222::split_epsem(m->epsem);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(gs::c1222::security_mode(e->control), gs::c1222::SecurityMode::cleartext);
    EXPECT_FALSE(e->mac.has_value());
    // The EPSEM in clear is exactly what the meter sealed.
    const Bytes clear_wire = gs::test::meter_cleartext(mm);
    auto clear = gs::c1222::decode(clear_wire);
    ASSERT_TRUE(clear.ok());
    EXPECT_EQ(gs::to_hex(m->epsem), gs::to_hex(clear->epsem));
    EXPECT_EQ(m->calling_ap_title->dotted(), ".7.1");
  }
  // Mode 1 (authenticated only) comes back in mode 0 too.
  MeterMessage m1;
  m1.id = 70001;
  m1.mode = gs::c1222::SecurityMode::authenticated;
  const Bytes sealed1 = daemon_->seal(1, m1);
  auto r1 = c->call(sealed1);
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(gs::to_hex(*r1), gs::to_hex(host_open(1, sealed1)));
  EXPECT_EQ(metric("gridseal_dkus_requests_total", {"result=\"ok\""}), 5);
  EXPECT_GE(metric("gridseal_dkus_group_commits_total"), 1);
  // One key lookup per message: the first in each handler's session unwraps the key.
  const auto misses = metric("gridseal_hsm_key_cache_misses_total");
  EXPECT_GE(misses, 1);
  const auto hits = metric("gridseal_hsm_key_cache_hits_total");
  EXPECT_EQ(hits + misses, 5);
  // A key is bound on its first hit: two sessions of the worker that saw it again.
  const auto bound_open = metric("gridseal_hsm_bound_aes_sessions", {"state=\"open\""});
  const auto bound_in_use = metric("gridseal_hsm_bound_aes_sessions", {"state=\"in_use\""});
  EXPECT_LE(bound_in_use, bound_open);
  if (hits > 0) {
    EXPECT_GE(bound_in_use, 2);
  }
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->err_log();
  const std::string err = daemon_->err_log();
  EXPECT_EQ(err.find(daemon_->meter(1).key_hex), std::string::npos) << "key in the log";
}

TEST_F(Dkusd, TamperedAtEveryBytePositionIsNeverOpened) {
  start_with({});
  MeterMessage mm;
  mm.id = 1000;
  const Bytes sealed = daemon_->seal(1, mm);
  auto parsed = gs::c1222::decode(sealed);
  ASSERT_TRUE(parsed.ok());
  const std::size_t epsem_at = parsed->epsem_offset;  // control byte .. MAC: always sme
  auto c = connect();
  std::map<int, int> seen;  // code (-1: connection closed) -> count
  for (std::size_t pos = 0; pos < sealed.size(); ++pos) {
    Bytes bad = sealed;
    bad[pos] ^= 0x01;
    if (!c) c = connect();
    auto r = c->call(bad);
    int code = -1;
    if (r.ok()) {
      ASSERT_NE(gs::to_hex(*r), gs::to_hex(host_open(1, sealed)))
          << "tampered byte " << pos << " was accepted";
      code = gs::test::error_reply(*r).code;
      ASSERT_TRUE(code == gs::c1222::kRespSme || code == gs::c1222::kRespUat ||
                  code == gs::c1222::kRespErr)
          << "byte " << pos << ": code " << code;
    } else {
      c.reset();  // unframeable: that connection was closed
    }
    if (pos >= epsem_at) {
      EXPECT_EQ(code, gs::c1222::kRespSme) << "byte " << pos;
    }
    ++seen[code];
  }
  // Bytes outside the EPSEM: A8, AC (key id, IV) and the called title are bound by the MAC
  // (sme); the calling title names another, unknown meter (uat); structure bytes break the
  // decoding (err) or the framing (closed).
  EXPECT_GT(seen[gs::c1222::kRespSme], static_cast<int>(sealed.size() - epsem_at));
  // The untampered message still opens: refusals did not consume its id.
  if (!c) c = connect();
  auto ok = c->call(sealed);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(gs::to_hex(*ok), gs::to_hex(host_open(1, sealed)));
  // One connection, one worker: more than mac_failure_threshold MAC failures in a row.
  EXPECT_GE(metric("gridseal_dkus_meters_flagged_total"), 1);
  EXPECT_NE(daemon_->err_log().find("meter flagged meter=.7.1"), std::string::npos);
}

TEST_F(Dkusd, ReplayedAndReorderedAreRefusedAcrossWorkers) {
  start_with({});
  auto c = connect();
  MeterMessage mm;
  mm.id = 20;
  const Bytes m20 = daemon_->seal(2, mm);
  mm.id = 19;
  const Bytes m19 = daemon_->seal(2, mm);
  mm.id = 21;
  const Bytes m21 = daemon_->seal(2, mm);
  auto r = c->call(m20);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(2, m20)));
  r = c->call(m20);  // replayed
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 20), gs::c1222::kRespSme);
  r = c->call(m19);  // reordered: lower after higher, inside dkus.reorder_window: opened once
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(2, m19)));
  r = c->call(m19);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 19), gs::c1222::kRespSme);
  r = c->call(m21);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(2, m21)));
  // On fresh connections (spread over both workers by SO_REUSEPORT) the replay stays refused.
  for (int i = 0; i < 8; ++i) {
    auto ci = connect();
    auto ri = ci->call(m21);
    ASSERT_TRUE(ri.ok());
    EXPECT_EQ(error_code(*ri, 21), gs::c1222::kRespSme) << "connection " << i;
  }
  // The same fresh message on 8 connections at once: exactly one is opened.
  mm.id = 500;
  const Bytes m500 = daemon_->seal(2, mm);
  std::vector<std::unique_ptr<gs::server::Client>> cs;
  for (int i = 0; i < 8; ++i) cs.push_back(connect());
  std::atomic<int> opened{0}, refused{0};
  std::vector<std::thread> ts;
  for (auto& ci : cs) {
    ts.emplace_back([&, cl = ci.get()] {
      auto ri = cl->call(m500);
      if (!ri.ok()) return;
      if (gs::test::error_reply(*ri).code == gs::c1222::kRespSme) {
        ++refused;
      } else if (gs::to_hex(*ri) == gs::to_hex(host_open(2, m500))) {
        ++opened;
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(opened.load(), 1);
  EXPECT_EQ(refused.load(), 7);
  EXPECT_GE(metric("gridseal_dkus_requests_total", {"result=\"replay\""}), 8 + 2);
}

TEST_F(Dkusd, WrongKeyIdUnknownMeterRevokedAndStale) {
  start_with({});
  auto c = connect();
  MeterMessage mm;
  mm.id = 40;
  mm.key_id = 1;  // M1 has slot 0 only
  auto r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 40), gs::c1222::kRespSme);
  // Unknown meter (sealed under some key).
  mm.key_id = 0;
  mm.meter = ".7.99";
  r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 40), gs::c1222::kRespUat);
  // Another meter's key: the MAC fails.
  mm.meter = daemon_->meter(2).title;
  r = c->call(gs::test::seal_meter_message(mm, daemon_->meter(1).key_hex));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 40), gs::c1222::kRespSme);
  // Stale and future IV times.
  mm = MeterMessage{};
  mm.id = 41;
  mm.iv_time = gs::test::utc_now_s() - 3600;
  r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 41), gs::c1222::kRespSme);
  mm.iv_time = gs::test::utc_now_s() + 3600;
  r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 41), gs::c1222::kRespSme);
  // A message in mode 0 is not a secured message.
  mm.iv_time = 0;
  r = c->call(gs::test::meter_cleartext(
      MeterMessage{.meter = daemon_->meter(1).title, .id = 42, .answers = {}}));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 42), gs::c1222::kRespSme);
  // Revoked meter: isc (meter_cache_ttl_ms = 0 in the fixture).
  mm = MeterMessage{};
  mm.id = 43;
  r = c->call(daemon_->seal(3, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(3, daemon_->seal(3, mm))));
  auto cli = daemon_->gridseal("meters revoke M3 --reason test");
  ASSERT_EQ(cli.code, 0) << cli.out;
  mm.id = 44;
  r = c->call(daemon_->seal(3, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 44), gs::c1222::kRespIsc);
  const std::string err = daemon_->err_log();
  for (const char* code : {"code=sme", "code=uat", "code=isc"}) {
    EXPECT_NE(err.find(code), std::string::npos) << code << "\n" << err;
  }
}

TEST_F(Dkusd, MessagesSealedBeforeStartAreRefused) {
  start_with({});
  auto c = connect();
  MeterMessage mm;
  mm.id = 50;
  mm.iv_time = gs::test::utc_now_s() - 60;  // inside the window, but before the daemon started
  auto r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 50), gs::c1222::kRespSme);
  EXPECT_NE(daemon_->err_log().find("sealed before this DKUS started"), std::string::npos);
}

TEST_F(Dkusd, MalformedFrameClosesOnlyThatConnection) {
  start_with({});
  auto good = connect();
  auto bad = connect();
  ASSERT_TRUE(bad->send(gs::test::hex_bytes("ff00112233")).ok());
  EXPECT_FALSE(bad->receive().ok());
  // Over max_frame: closed too.
  auto big = connect();
  ASSERT_TRUE(big->send(gs::test::hex_bytes("60837fffff00")).ok());
  EXPECT_FALSE(big->receive().ok());
  // Well framed, not decodable: err, and the connection still serves.
  auto e = good->call(gs::test::hex_bytes("6003a20100"));
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(gs::test::error_reply(*e).code, gs::c1222::kRespErr);
  MeterMessage mm;
  mm.id = 60;
  const Bytes m60 = daemon_->seal(1, mm);
  auto r = good->call(m60);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(1, m60)));
}

TEST_F(Dkusd, ReplayStateSurvivesKillNine) {
  gs::test::DkusdOptions o;
  // Only the durable marks may refuse the replays below (not the restart rule of DESIGN §5).
  o.dkus_lines = {"refuse_sealed_before_start = false"};
  start_with(o);
  // A pipelined burst; the daemon is killed (every process, SIGKILL) in the middle of it.
  constexpr int kBurst = 400;
  std::vector<Bytes> msgs;
  for (int i = 0; i < kBurst; ++i) {
    MeterMessage mm;
    mm.id = 1000 + static_cast<std::uint64_t>(i);
    msgs.push_back(daemon_->seal(1 + static_cast<std::size_t>(i % 3), mm));
  }
  auto c = connect();
  Bytes all;
  for (const Bytes& m : msgs) all.insert(all.end(), m.begin(), m.end());
  ASSERT_TRUE(c->send(all).ok());
  std::vector<int> answered;  // indexes opened by the daemon
  for (int i = 0; i < kBurst; ++i) {
    auto r = c->receive();
    if (!r.ok()) break;
    const std::size_t meter = 1 + static_cast<std::size_t>(i % 3);
    ASSERT_EQ(gs::to_hex(*r), gs::to_hex(host_open(meter, msgs[static_cast<std::size_t>(i)])))
        << "message " << i;
    answered.push_back(i);
    if (answered.size() == 100) daemon_->kill_group();
  }
  ASSERT_GE(answered.size(), 100u);
  c.reset();
  auto st = daemon_->start();
  ASSERT_TRUE(st.ok()) << st.error().message();
  // Every answered message is a replay now; so is each lower id of the same meter.
  auto c2 = connect();
  for (int i : answered) {
    auto r = c2->call(msgs[static_cast<std::size_t>(i)]);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(error_code(*r, 1000 + static_cast<std::uint64_t>(i)), gs::c1222::kRespSme)
        << "answered message " << i << " accepted again after kill -9";
  }
  // Fresh ids go through after the restart.
  MeterMessage mm;
  mm.id = 5000;
  const Bytes fresh = daemon_->seal(1, mm);
  auto r = c2->call(fresh);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(1, fresh)));
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->err_log();
}

TEST_F(Dkusd, SignedReceiptsAreVerifiedStoredAndForgeriesRefused) {
  start_with({});
  auto c = connect();
  const auto& m1 = daemon_->meter(1);
  // A response to command 0x0F4241 with MT-2042 (ok for the signed write, ok, receipt).
  MeterMessage mm;
  mm.id = 70;
  mm.answers = 0x0F4241;
  mm.services = {Bytes{0x00}, Bytes{0x00},
                 gs::test::receipt_service(m1.title, *m1.ecc, 0x0F4241)};
  const Bytes good = daemon_->seal(1, mm);
  auto r = c->call(good);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(1, good))) << daemon_->err_log();

  // Forged: signed by a key that is not the registered one.
  auto other = gs::HostEcKey::generate().value();
  mm.id = 71;
  mm.answers = 0x0F4242;
  mm.services = {Bytes{0x00}, gs::test::receipt_service(m1.title, other, 0x0F4242)};
  r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 71), gs::c1222::kRespSme);
  // Forged: a valid receipt with one signature bit flipped.
  Bytes flipped = gs::test::receipt_service(m1.title, *m1.ecc, 0x0F4242);
  const std::uint8_t before = flipped[flipped.size() - 10];
  flipped[flipped.size() - 10] ^= 0x01;
  // Keep the C12.19 checksum (two's complement of the data sum) right.
  flipped.back() = static_cast<std::uint8_t>(flipped.back() + before -
                                             flipped[flipped.size() - 10]);
  mm.id = 72;
  mm.services = {flipped};
  r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 72), gs::c1222::kRespSme);
  // Valid signature, but for another command than the one this response answers.
  mm.id = 73;
  mm.answers = 0x0F4243;
  mm.services = {gs::test::receipt_service(m1.title, *m1.ecc, 0x0F4242)};
  r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 73), gs::c1222::kRespSme);
  // Another meter's valid receipt carried in M1's message: signed by M2's key, refused.
  mm.id = 74;
  mm.answers = 0x0F4244;
  mm.services = {gs::test::receipt_service(m1.title, *daemon_->meter(2).ecc, 0x0F4244)};
  r = c->call(daemon_->seal(1, mm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 74), gs::c1222::kRespSme);
  EXPECT_NE(daemon_->err_log().find("forged receipt meter=.7.1"), std::string::npos);

  // Only the valid receipt is stored.
  auto show = daemon_->gridseal("receipts show M1 --json");
  ASSERT_EQ(show.code, 0) << show.out;
  EXPECT_NE(show.out.find("\"invocation_id\":1000001"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("\"message_id\":70"), std::string::npos) << show.out;
  EXPECT_EQ(show.out.find("1000002"), std::string::npos) << show.out;
  EXPECT_EQ(show.out.find("1000003"), std::string::npos) << show.out;
  auto human = daemon_->gridseal("receipts show M1");
  ASSERT_EQ(human.code, 0) << human.out;
  EXPECT_NE(human.out.find("1 receipt"), std::string::npos) << human.out;
  auto none = daemon_->gridseal("receipts show M2 --json");
  ASSERT_EQ(none.code, 0);
  EXPECT_EQ(none.out, "[]\n");
  EXPECT_NE(daemon_->gridseal("receipts show M99").code, 0);
  EXPECT_EQ(metric("gridseal_dkus_receipts_stored_total"), 1);
  EXPECT_EQ(metric("gridseal_dkus_requests_total", {"result=\"forged_receipt\""}), 4);
}

// ---- audit trail (issue 7) and the failing-MAC flag -------------------------------------------

struct AuditRow {
  std::int64_t seq = 0;
  std::string actor, event, subject, detail;
};

// The audit table of the daemon's store, read by the test's own connection.
std::vector<AuditRow> audit_rows(const gs::test::DkusdDaemon& d, const std::string& event = "") {
  std::vector<AuditRow> out;
  auto db = gs::db::Db::open(d.dir() + "/gridseal.db", {.create = false});
  if (!db.ok()) return out;
  auto st = db->prepare("SELECT seq, actor, event, subject, detail FROM audit ORDER BY seq");
  if (!st.ok()) return out;
  while (true) {
    auto s = st->step();
    if (!s.ok() || *s != gs::db::Step::row) break;
    AuditRow r{st->int64(0), st->text(1), st->text(2), st->text(3), st->text(4)};
    if (event.empty() || r.event == event) out.push_back(std::move(r));
  }
  st->reset();
  return out;
}

bool has(const std::string& detail, const std::string& part) {
  return detail.find(part) != std::string::npos;
}

// Every refusal is recorded (code, result, reason) before it is answered; a stored receipt is
// recorded with its command's invocation id and result; start/stop per worker; the chain
// verifies with the real `gridseal audit verify`; nothing of the keys in any record.
TEST_F(Dkusd, AuditRecordsRefusalsReceiptsStartAndStop) {
  gs::test::DkusdOptions o;
  o.dkus_lines = {"[audit]", "checkpoint_interval_s = 1"};
  start_with(o);
  auto c = connect();
  const auto& m1 = daemon_->meter(1);
  struct Case {
    const char* what;
    Bytes wire;
    std::uint64_t id;
    int code;
    const char* result;
    const char* subject;
  };
  MeterMessage unknown;
  unknown.meter = ".7.99";
  unknown.id = 10;
  MeterMessage forged;  // M2's message under M1's key
  forged.meter = daemon_->meter(2).title;
  forged.id = 11;
  MeterMessage stale;
  stale.id = 12;
  stale.iv_time = gs::test::utc_now_s() - 3600;
  MeterMessage good;
  good.id = 13;
  std::vector<Case> cases = {
      {"unknown meter", daemon_->seal(1, unknown), 10, gs::c1222::kRespUat, "unknown_meter",
       ".7.99"},
      {"bad MAC", gs::test::seal_meter_message(forged, m1.key_hex), 11, gs::c1222::kRespSme,
       "bad_mac", "M2"},
      {"stale", daemon_->seal(1, stale), 12, gs::c1222::kRespSme, "stale", "M1"},
  };
  for (const Case& k : cases) {
    auto r = c->call(k.wire);
    ASSERT_TRUE(r.ok()) << k.what;
    EXPECT_EQ(error_code(*r, k.id), k.code) << k.what;
    // Answered, so recorded: the record is in the file while the daemon runs.
    const std::vector<AuditRow> refusals = audit_rows(*daemon_, "refusal");
    ASSERT_FALSE(refusals.empty()) << k.what;
    const AuditRow& last = refusals.back();
    EXPECT_EQ(last.subject, k.subject) << k.what;
    EXPECT_EQ(last.actor, "plain:127.0.0.1") << last.actor;
    EXPECT_TRUE(has(last.detail, std::string("\"result\":\"") + k.result + "\"")) << last.detail;
    EXPECT_TRUE(has(last.detail, std::string("\"code\":\"") +
                                     gs::c1222::response_code_name(
                                         static_cast<std::uint8_t>(k.code)) +
                                     "\""))
        << last.detail;
    EXPECT_TRUE(has(last.detail, "\"invocation_id\":" + std::to_string(k.id))) << last.detail;
    EXPECT_TRUE(has(last.detail, "\"reason\":\"")) << last.detail;
  }
  // A replay of an accepted message.
  const Bytes g = daemon_->seal(1, good);
  auto r = c->call(g);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(1, g)));
  r = c->call(g);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 13), gs::c1222::kRespSme);
  EXPECT_TRUE(has(audit_rows(*daemon_, "refusal").back().detail, "\"result\":\"replay\""));
  // Revoked (compromised): isc. Through the store API (what `meters revoke --no-rekey` does),
  // so that this test does not depend on the CLI's operator checks.
  {
    auto ks = gs::store::KeyStore::open(daemon_->dir() + "/gridseal.db", {.create = false});
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    ASSERT_TRUE(ks->revoke("M3", "test").ok());
  }
  MeterMessage m3;
  m3.id = 14;
  r = c->call(daemon_->seal(3, m3));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 14), gs::c1222::kRespIsc);
  EXPECT_EQ(audit_rows(*daemon_, "refusal").back().subject, "M3");
  EXPECT_TRUE(has(audit_rows(*daemon_, "refusal").back().detail, "\"code\":\"isc\""));
  EXPECT_EQ(audit_rows(*daemon_, "refusal").size(), 5U);
  // An accepted message without a receipt is not recorded; one with a receipt is, once.
  EXPECT_TRUE(audit_rows(*daemon_, "receipt").empty());
  MeterMessage rm;
  rm.id = 15;
  rm.answers = 0x0F4241;
  rm.services = {Bytes{0x00}, gs::test::receipt_service(m1.title, *m1.ecc, 0x0F4241, 3)};
  const Bytes withr = daemon_->seal(1, rm);
  r = c->call(withr);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(1, withr))) << daemon_->err_log();
  std::vector<AuditRow> receipts = audit_rows(*daemon_, "receipt");
  ASSERT_EQ(receipts.size(), 1U);
  EXPECT_EQ(receipts[0].subject, "M1");
  EXPECT_TRUE(has(receipts[0].detail, "\"invocation_id\":1000001")) << receipts[0].detail;
  EXPECT_TRUE(has(receipts[0].detail, "\"result\":3")) << receipts[0].detail;
  EXPECT_TRUE(has(receipts[0].detail, "\"message_id\":15")) << receipts[0].detail;
  EXPECT_TRUE(has(receipts[0].detail, "\"signature\":\"")) << receipts[0].detail;
  // The same receipt again in a later message: stored once, recorded once.
  rm.id = 16;
  r = c->call(daemon_->seal(1, rm));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(audit_rows(*daemon_, "receipt").size(), 1U);
  c.reset();
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->err_log();

  const std::vector<AuditRow> all = audit_rows(*daemon_);
  ASSERT_FALSE(all.empty());
  EXPECT_EQ(audit_rows(*daemon_, "start").size(), 2U);  // two workers
  EXPECT_EQ(audit_rows(*daemon_, "stop").size(), 2U);
  EXPECT_EQ(all.back().event, "stop");
  EXPECT_EQ(audit_rows(*daemon_, "start")[0].subject, "gridseal-dkusd");
  auto v = daemon_->gridseal("audit verify --json");
  EXPECT_EQ(v.code, 0) << v.out;
  EXPECT_TRUE(has(v.out, "\"ok\":true")) << v.out;
  EXPECT_TRUE(has(v.out, "\"last_checkpoint_seq\":" + std::to_string(all.back().seq))) << v.out;
  EXPECT_TRUE(has(v.out, "\"anchor\":\"sealed\"")) << v.out;
  const std::string pin = gs::test::slurp(daemon_->dir() + "/hsm/user.pin").substr(0, 32);
  for (const AuditRow& row : all) {
    for (std::size_t i = 1; i <= 3; ++i) {
      EXPECT_FALSE(has(row.detail, daemon_->meter(i).key_hex)) << row.detail;
    }
    EXPECT_FALSE(has(row.detail, pin));
  }
}

// N bad MACs in a row flag the meter once (metric, gauge, one audit record, a log line without
// the key); a good MAC clears it; N more flag it again.
TEST_F(Dkusd, RepeatedBadMacsFlagTheMeterOnceUntilAGoodMac) {
  gs::test::DkusdOptions o;
  o.server_lines = {"processes = 1"};  // the counts are per worker process
  o.dkus_lines = {"mac_failure_threshold = 3"};
  start_with(o);
  auto c = connect();
  const auto& m1 = daemon_->meter(1);
  std::uint64_t id = 100;
  auto bad = [&](int n) {
    for (int i = 0; i < n; ++i) {
      MeterMessage mm;
      mm.meter = daemon_->meter(2).title;
      mm.id = ++id;
      auto r = c->call(gs::test::seal_meter_message(mm, m1.key_hex));  // not M2's key
      ASSERT_TRUE(r.ok());
      EXPECT_EQ(error_code(*r, id), gs::c1222::kRespSme);
    }
  };
  bad(2);
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged_total"), 0);
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged"), 0);
  bad(5);  // the third flags, the next four do not flag again
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged_total"), 1);
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged"), 1);
  std::vector<AuditRow> flags = audit_rows(*daemon_, "meter_flagged");
  for (int i = 0; i < 100 && flags.empty(); ++i) {  // queued, not awaited: bounded wait
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    flags = audit_rows(*daemon_, "meter_flagged");
  }
  ASSERT_EQ(flags.size(), 1U);
  EXPECT_EQ(flags[0].subject, "M2");
  EXPECT_TRUE(has(flags[0].detail, "\"mac_failures\":3")) << flags[0].detail;
  EXPECT_TRUE(has(flags[0].detail, "\"threshold\":3")) << flags[0].detail;
  EXPECT_EQ(audit_rows(*daemon_, "refusal").size(), 7U);
  // A good message from M2 clears the flag.
  MeterMessage good;
  good.id = ++id;
  const Bytes g = daemon_->seal(2, good);
  auto r = c->call(g);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(2, g)));
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged"), 0);
  EXPECT_EQ(metric("gridseal_dkus_meters_unflagged_total"), 1);
  // Fewer than N again: no new flag; then N in a row: flagged a second time.
  bad(2);
  good.id = ++id;
  ASSERT_TRUE(c->call(daemon_->seal(2, good)).ok());
  bad(3);
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged_total"), 2);
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged"), 1);
  c.reset();
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->err_log();
  EXPECT_EQ(audit_rows(*daemon_, "meter_flagged").size(), 2U);
  EXPECT_EQ(audit_rows(*daemon_, "meter_flag_cleared").size(), 1U);
  const std::string err = daemon_->err_log();
  EXPECT_TRUE(has(err, "meter flagged meter=.7.2 meter_id=M2 mac_failures=3")) << err;
  EXPECT_FALSE(has(err, m1.key_hex));
  EXPECT_FALSE(has(err, daemon_->meter(2).key_hex));
  auto v = daemon_->gridseal("audit verify --json");
  EXPECT_EQ(v.code, 0) << v.out;
}

TEST_F(Dkusd, AuditDisabledRecordsNothing) {
  gs::test::DkusdOptions o;
  o.server_lines = {"processes = 1"};
  o.dkus_lines = {"mac_failure_threshold = 1", "[audit]", "enabled = false"};
  start_with(o);
  auto c = connect();
  const auto& m1 = daemon_->meter(1);
  MeterMessage forged;
  forged.meter = daemon_->meter(2).title;
  forged.id = 5;
  auto r = c->call(gs::test::seal_meter_message(forged, m1.key_hex));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 5), gs::c1222::kRespSme);
  MeterMessage rm;
  rm.id = 6;
  rm.answers = 0x0F4241;
  rm.services = {gs::test::receipt_service(m1.title, *m1.ecc, 0x0F4241)};
  const Bytes withr = daemon_->seal(1, rm);
  r = c->call(withr);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(gs::to_hex(*r), gs::to_hex(host_open(1, withr)));
  EXPECT_EQ(metric("gridseal_dkus_meters_flagged_total"), 1);  // the flag does not need it
  EXPECT_EQ(metric("gridseal_dkus_receipts_stored_total"), 1);
  c.reset();
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->err_log();
  EXPECT_TRUE(audit_rows(*daemon_).empty());
}

TEST_F(Dkusd, ConfigErrorsNameTheKey) {
  char tmpl[] = "/tmp/gs-dkusd-conf-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const std::string conf = dir + "/dkus.toml";
  // The daemon refuses the config, naming `key`; returns what it printed.
  auto refused = [&](const std::string& text, const std::string& key) {
    std::ofstream(conf) << text;
    auto r = gs::test::run_command(std::string(GS_BIN_DIR) + "/gridseal-dkusd --config " + conf +
                                   " --check");
    EXPECT_NE(r.code, 0) << key;
    EXPECT_NE(r.out.find(key), std::string::npos) << r.out;
    return r.out;
  };
  refused("[hsm]\npin_file = \"pin\"\n[server]\nplain_tcp = true\n[dkus]\ndkus_title = \".1.11\"\n"
          "head_end_title = \".1.9\"\niv_window_s = 0\n",
          "dkus.iv_window_s");
  refused("[hsm]\npin_file = \"pin\"\n[server]\nplain_tcp = true\n[dkus]\ndkus_title = \".1.11\"\n"
          "head_end_title = \".1.9\"\nreplay_window = 3\n",
          "dkus.replay_window: unknown key");
  refused("[hsm]\npin_file = \"pin\"\n[server]\nplain_tcp = true\n[dkus]\n"
          "dkus_title = \".1.11\"\nhead_end_title = \".1.9\"\n[audit]\n"
          "enabled = true\nbatch_max = 0\n",
          "audit.batch_max");
  refused("[hsm]\npin_file = \"pin\"\n[server]\nplain_tcp = true\n[dkus]\n"
          "dkus_title = \".1.11\"\nhead_end_title = \".1.9\"\n[audit]\n"
          "anchor = 1\n",
          "audit.anchor: unknown key");
  refused("[hsm]\npin_file = \"pin\"\n[server]\nplain_tcp = true\n[dkus]\n"
          "dkus_title = \".1.11\"\nhead_end_title = \".1.9\"\n[audit]\n"
          "commit_on_handler = true\n",
          "audit.commit_on_handler: is a gridseal-sesd setting");
  refused("[hsm]\npin_file = \"pin\"\n[server]\nplain_tcp = true\n[dkus]\n"
          "dkus_title = \".1.11\"\nhead_end_title = \".1.9\"\n[audit]\n"
          "fsync_thread = true\n",
          "audit.fsync_thread: needs audit.fsync_outside_lock = true");
  const std::string out =
      refused("[hsm]\npin_file = \"pin\"\ncommand_key_session_copy = 1\n[server]\n"
              "plain_tcp = true\n[dkus]\ndkus_title = \".1.11\"\nhead_end_title = \".1.9\"\n",
              "hsm.command_key_session_copy");
  EXPECT_NE(out.find("true or false"), std::string::npos) << out;
  refused("[hsm]\npin_file = \"pin\"\nbound_aes_sessions = -2\n[server]\n"
          "plain_tcp = true\n[dkus]\ndkus_title = \".1.11\"\nhead_end_title = \".1.9\"\n",
          "hsm.bound_aes_sessions");
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

// A quick figure, not a benchmark: opened messages per second over pipelined connections.
// GS_DKUS_QUICK_N sets the number of messages (default 4000).
TEST_F(Dkusd, QuickThroughput) {
  gs::test::DkusdOptions o;
  o.meters = 64;
  o.server_lines = {"max_in_flight = 256"};
  start_with(o);
  std::size_t n = 4000;
  if (const char* e = std::getenv("GS_DKUS_QUICK_N")) n = std::strtoul(e, nullptr, 10);
  constexpr std::size_t kConns = 8;
  std::vector<std::vector<Bytes>> per(kConns);
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t meter = 1 + i % 64;
    MeterMessage mm;
    mm.id = 1 + i / 64;
    per[(i % 64) % kConns].push_back(daemon_->seal(meter, mm));
  }
  std::atomic<std::size_t> ok{0};
  std::mutex why_mu;
  std::map<std::string, std::size_t> why;  // what the messages that did not open got instead
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (std::size_t k = 0; k < kConns; ++k) {
    ts.emplace_back([&, k] {
      auto c = daemon_->connect();
      if (!c.ok()) return;
      std::thread writer([&] {
        for (const Bytes& m : per[k]) {
          if (!(*c)->send(m).ok()) return;
        }
      });
      for (std::size_t i = 0; i < per[k].size(); ++i) {
        auto r = (*c)->receive();
        if (!r.ok()) {
          std::lock_guard<std::mutex> lock(why_mu);
          why["connection: " + r.error().message()] += per[k].size() - i;
          break;
        }
        const int code = gs::test::error_reply(*r).code;
        if (code < 0) {
          ++ok;
        } else {
          std::lock_guard<std::mutex> lock(why_mu);
          ++why[gs::c1222::response_code_name(static_cast<std::uint8_t>(code))];
        }
      }
      writer.join();
    });
  }
  for (auto& t : ts) t.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("gridseal-dkusd: %zu of %zu messages opened in %.3f s: %.0f msgs/s "
              "(%zu connections, 2 workers, plain TCP, client on the same cores)\n",
              ok.load(), n, s, static_cast<double>(ok.load()) / s, kConns);
  std::string refused;
  for (const auto& [reason, count] : why) refused += " " + reason + " x" + std::to_string(count);
  EXPECT_EQ(ok.load(), n) << "not opened:" << refused << "\n" << daemon_->err_log();
  std::printf("group commits: %.0f, updates: %.0f, time in commits: %.3f s\n",
              metric("gridseal_dkus_group_commits_total"),
              metric("gridseal_dkus_group_commit_updates_total"),
              metric("gridseal_dkus_group_commit_seconds_sum"));
}

}  // namespace
