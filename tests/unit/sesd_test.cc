// End-to-end tests of gridseal-sesd: the real daemon on loopback plain TCP with a SoftHSM2 token
// made by `gridseal hsm init` and meters imported with plain keys. Outputs are checked
// independently: opened with the meter's key on the host, MT-2040 verified with the exported key.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "src/client.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"
#include "tests/unit/sesd_fixture.h"

namespace {

using gs::test::http_get;
using gs::test::slurp;

constexpr const char* kKeys[] = {"00112233445566778899aabbccddeeff",
                                 "0f0e0d0c0b0a09080706050403020100"};

gs::Bytes hex(std::string_view h) { return gs::test::hex_bytes(h); }

// A mode-0 request from the head-end (.1.9) to `meter` with invocation id `id` and one service.
gs::Bytes request(const std::string& meter, std::uint8_t id, const gs::Bytes& service) {
  return gs::test::sesd_request(meter, id, {service});
}

const gs::Bytes kRead = {0x30, 0x00, 0x01};  // full read of ST-1
// Full write of ST-2 with one byte (checksum = two's complement of the data sum).
const gs::Bytes kWrite = {0x40, 0x00, 0x02, 0x00, 0x01, 0xAA, 0x56};

class Sesd : public ::testing::Test {
 protected:
  void SetUp() override {
    gs::test::SesdOptions o;
    o.keys = {kKeys[0], kKeys[1]};
    o.meters = 2;
    daemon_ = std::make_unique<gs::test::SesdDaemon>(o);
    auto st = daemon_->setup();
    ASSERT_TRUE(st.ok()) << st.error().message();
    dir_ = daemon_->dir();
    conf_ = daemon_->conf();
    pub_hex_ = daemon_->pub_hex();
    st = daemon_->start();
    ASSERT_TRUE(st.ok()) << st.error().message();
    metrics_port_ = daemon_->metrics_port();
  }

  void TearDown() override { daemon_.reset(); }

  // SIGTERM; returns the exit code (-1 when it had to be killed).
  int stop_daemon() { return daemon_->stop(); }

  std::unique_ptr<gs::server::Client> connect() {
    auto c = daemon_->connect();
    GS_CHECK(c.ok());
    return std::move(c).value();
  }

  std::string run_cli(const std::string& args, int* code) {
    auto r = gs::test::run_gridseal(args);
    *code = r.code;
    return r.out;
  }

  // The response code of a mode-0 error response, checking its addressing.
  static int error_code(const gs::Bytes& wire, std::uint8_t request_id) {
    const gs::test::ErrorReply r = gs::test::error_reply(wire);
    if (r.code >= 0) {
      EXPECT_EQ(r.calling, ".1.10");
      EXPECT_EQ(r.called, ".1.9");
      EXPECT_EQ(r.called_id_hex, gs::to_hex(gs::Bytes{request_id}));
    }
    return r.code;
  }

  std::unique_ptr<gs::test::SesdDaemon> daemon_;
  std::string dir_, conf_, pub_hex_;
  std::uint16_t metrics_port_ = 0;
};

TEST_F(Sesd, ReadCommandIsSignedEncryptedAndIdsRise) {
  auto client = connect();
  auto aes = gs::HostAes::make(hex(kKeys[0])).value();
  auto eax = gs::c1222::EaxPrime::make(*aes).value();
  auto pub = gs::HostEcKey::from_public(hex(pub_hex_));
  ASSERT_TRUE(pub.ok()) << pub.error().message();
  std::uint64_t last_id = 0;
  for (std::uint8_t i = 1; i <= 3; ++i) {
    auto resp = client->call(request(".7.1", i, kRead));
    ASSERT_TRUE(resp.ok()) << resp.error().message() << slurp(dir_ + "/sesd.err");
    auto opened = gs::c1222::open(
        *resp, [&](std::uint8_t id) { return id == 0 ? &eax : nullptr; });
    ASSERT_TRUE(opened.ok()) << opened.error().message() << " " << gs::to_hex(*resp);
    EXPECT_EQ(opened->mode, gs::c1222::SecurityMode::encrypted);
    auto m = gs::c1222::decode(opened->wire);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->called_ap_title->dotted(), ".7.1");
    EXPECT_EQ(m->calling_ap_title->dotted(), ".1.9");
    auto ac = gs::c1222::extract_authorization(*m);
    ASSERT_TRUE(ac.ok()) << ac.error().message();
    EXPECT_EQ(ac->authorization.signer_key_id, 1);
    auto d = gs::sha256(ac->signing_input);
    ASSERT_TRUE(d.ok());
    EXPECT_TRUE(pub->verify(*d, ac->authorization.signature).ok()) << "MT-2040 does not verify";
    EXPECT_GT(ac->invocation_id, last_id) << "invocation ids must rise";
    last_id = ac->invocation_id;
    // The request's read follows the signed authorization.
    EXPECT_NE(gs::to_hex(ac->following).find("0330" "0001"), std::string::npos)
        << gs::to_hex(ac->following);
  }
  // A tampered byte makes the meter's key refuse it.
  auto resp = client->call(request(".7.1", 9, kRead));
  ASSERT_TRUE(resp.ok());
  gs::Bytes bad = *resp;
  bad[bad.size() - 6] ^= 1;
  EXPECT_FALSE(gs::c1222::open(bad, [&](std::uint8_t) { return &eax; }).ok());
  // The other meter's key does not open it.
  auto aes2 = gs::HostAes::make(hex(kKeys[1])).value();
  auto eax2 = gs::c1222::EaxPrime::make(*aes2).value();
  EXPECT_FALSE(gs::c1222::open(*resp, [&](std::uint8_t) { return &eax2; }).ok());
  EXPECT_EQ(stop_daemon(), 0) << slurp(dir_ + "/sesd.err");
  // `hsm init` made gs-cmd-1 session-copyable: the signatures above came from the session copy.
  const std::string log = slurp(dir_ + "/sesd.err");
  EXPECT_NE(log.find("gs-cmd-1: signing with a session copy of the token key"), std::string::npos)
      << log;
}

TEST_F(Sesd, RefusalsCarryOneResponseCode) {
  auto client = connect();
  auto r1 = client->call(request(".7.99", 0x21, kRead));
  ASSERT_TRUE(r1.ok()) << r1.error().message();
  EXPECT_EQ(error_code(*r1, 0x21), gs::c1222::kRespUat);
  auto r2 = client->call(request(".7.1", 0x22, kWrite));
  ASSERT_TRUE(r2.ok()) << r2.error().message();
  EXPECT_EQ(error_code(*r2, 0x22), gs::c1222::kRespIsc);
  // The connection still serves.
  auto r3 = client->call(request(".7.2", 0x23, kRead));
  ASSERT_TRUE(r3.ok());
  auto m3 = gs::c1222::decode(*r3);
  ASSERT_TRUE(m3.ok());
  EXPECT_TRUE(m3->auth.has_value());
  const std::string err = slurp(dir_ + "/sesd.err");
  EXPECT_NE(err.find("code=uat"), std::string::npos) << err;
  EXPECT_NE(err.find("code=isc"), std::string::npos) << err;
  for (const char* k : kKeys) EXPECT_EQ(err.find(k), std::string::npos) << "key in log";
}

TEST_F(Sesd, MalformedFrameClosesOnlyThatConnection) {
  auto good = connect();
  auto bad = connect();
  ASSERT_TRUE(bad->send(hex("ff00112233")).ok());
  auto closed = bad->receive();
  EXPECT_FALSE(closed.ok());
  auto r = good->call(request(".7.1", 0x31, kRead));
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto m = gs::c1222::decode(*r);
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(m->auth.has_value());
  // A well-framed PDU that does not decode gets `err`, and the connection stays usable.
  auto e = good->call(hex("6003a20100"));
  ASSERT_TRUE(e.ok()) << e.error().message();
  auto em = gs::c1222::decode(*e);
  ASSERT_TRUE(em.ok());
  auto ee = gs::c1222::split_epsem(em->epsem);
  ASSERT_TRUE(ee.ok());
  auto es = gs::c1222::split_services(ee->body);
  ASSERT_TRUE(es.ok());
  ASSERT_EQ(es->size(), 1u);
  EXPECT_EQ(es->front().bytes[0], gs::c1222::kRespErr);
  EXPECT_TRUE(good->call(request(".7.2", 0x32, kRead)).ok());
  EXPECT_EQ(stop_daemon(), 0);
}

TEST_F(Sesd, RevokedMeterIsRefusedAndBroadcastIsSignedOnce) {
  auto client = connect();
  ASSERT_TRUE(client->call(request(".7.2", 0x41, kRead)).ok());
  int code = -1;
  std::string out = run_cli("meters revoke M2 --reason test --permanent --config " + conf_, &code);
  ASSERT_EQ(code, 0) << out;
  auto r = client->call(request(".7.2", 0x42, kRead));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(error_code(*r, 0x42), gs::c1222::kRespIsc);

  // DR broadcast: a write of MT-40 to the group .3.1 comes back in mode 0 with MT-2040.
  const gs::Bytes dr = {0x40, 0x08, 0x28, 0x00, 0x01, 0xAA, 0x56};
  auto b = client->call(request(".3.1", 0x43, dr));
  ASSERT_TRUE(b.ok());
  auto m = gs::c1222::decode(*b);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->called_ap_title->dotted(), ".3.1");
  auto e = gs::c1222::split_epsem(m->epsem);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(gs::c1222::security_mode(e->control), gs::c1222::SecurityMode::cleartext);
  auto ac = gs::c1222::extract_authorization(*m);
  ASSERT_TRUE(ac.ok()) << ac.error().message() << " " << gs::to_hex(*b);
  EXPECT_EQ(ac->authorization.command_class, gs::c1222::CommandClass::demand_response);
  EXPECT_LE(ac->authorization.not_after - ac->authorization.not_before, 600u);
  auto pub = gs::HostEcKey::from_public(hex(pub_hex_)).value();
  EXPECT_TRUE(pub.verify(gs::sha256(ac->signing_input).value(), ac->authorization.signature).ok());

  ASSERT_NE(metrics_port_, 0);
  const std::string health = http_get(metrics_port_, "/healthz");
  EXPECT_NE(health.find("200"), std::string::npos) << health;
  const std::string metrics = http_get(metrics_port_, "/metrics");
  // Summed over any further labels (worker processes).
  EXPECT_EQ(gs::test::metric_sum(metrics, "gridseal_ses_requests_total",
                                 {"class=\"read\"", "result=\"ok\""}),
            1)
      << metrics;
  EXPECT_EQ(gs::test::metric_sum(metrics, "gridseal_ses_requests_total",
                                 {"result=\"meter_refused\""}),
            1)
      << metrics;
  // The one secured command looked its meter's key up once, in a cold session cache.
  EXPECT_EQ(gs::test::metric_sum(metrics, "gridseal_hsm_key_cache_misses_total", {}), 1)
      << metrics;
  EXPECT_EQ(gs::test::metric_sum(metrics, "gridseal_hsm_key_cache_hits_total", {}), 0) << metrics;
  EXPECT_EQ(stop_daemon(), 0);
}

}  // namespace
