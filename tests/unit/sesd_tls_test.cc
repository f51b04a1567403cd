// gridseal-sesd over TLS 1.3 with client certificates from the test PKI: secured reads checked on
// the host and by Wireshark, refused clients (no certificate, unknown subject, class not
// allowed), the fleet rate limit, framing errors, pipelining and 500 concurrent connections.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "c1222/services.h"
#include "src/client.h"
#include "tests/unit/sesd_fixture.h"

namespace {

using namespace std::chrono_literals;
using gs::Bytes;
using gs::test::ClientCert;
using gs::test::SesdDaemon;

constexpr std::size_t kMeters = 40;
constexpr std::size_t kMaxFrame = 1024;
constexpr std::uint32_t kTimeFleetLimit = 5;

// Full read of ST-<table>.
Bytes full_read(std::uint16_t table) {
  return {0x30, static_cast<std::uint8_t>(table >> 8), static_cast<std::uint8_t>(table)};
}
// Full write of ST-53 (class `time` in this policy) with one byte.
const Bytes kTimeWrite = {0x40, 0x00, 0x35, 0x00, 0x01, 0xAA, 0x56};

std::string policy_text() {
  return "[classes.time]\nwindow = 120\nfleet = { count = " + std::to_string(kTimeFleetLimit) +
         ", per = 3600, burst = " + std::to_string(kTimeFleetLimit) +
         " }\n"
         "[table_writes]\ndemand_response = [\"MT-40\"]\ntime = [\"ST-53\"]\n"
         "[[client]]\nname = \"head-end\"\nsubject = \"CN=head-end-test,O=gridseal test\"\n"
         "classes = [\"read\", \"demand_response\", \"time\"]\n"
         "[[client]]\nname = \"reader\"\nsubject = \"CN=reader-only,O=gridseal test\"\n"
         "classes = [\"read\"]\n";
}

// One daemon for the suite (token, fleet and PKI are the slow part).
class SesdTls : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // 500 client + 500 server descriptors in this process and the daemon (which inherits it).
    gs::test::raise_nofile(4096);
    gs::test::SesdOptions o;
    o.tls = true;
    o.meters = kMeters;
    o.policy = policy_text();
    o.server_lines = {"max_connections = 700", "max_frame = " + std::to_string(kMaxFrame),
                      "max_in_flight = 32"};
    daemon_ = new SesdDaemon(o);
    auto st = daemon_->setup();
    if (!st.ok()) {
      setup_error_ = new std::string(st.error().message());
      return;
    }
    st = daemon_->start();
    if (!st.ok()) setup_error_ = new std::string(st.error().message());
  }
  static void TearDownTestSuite() {
    delete daemon_;
    daemon_ = nullptr;
    delete setup_error_;
    setup_error_ = nullptr;
  }
  void SetUp() override {
    ASSERT_EQ(setup_error_, nullptr) << *setup_error_;
    ASSERT_TRUE(daemon_->running()) << daemon_->err_log();
  }

  static std::unique_ptr<gs::server::Client> connect(std::optional<ClientCert> cert = {}) {
    auto c = daemon_->connect(std::move(cert));
    if (!c.ok()) {
      ADD_FAILURE() << "connect: " << c.error().message();
      return nullptr;
    }
    return std::move(c).value();
  }

  // A read of meter i comes back secured, verified and addressed to it.
  static void expect_secured_read(gs::server::Client& c, std::size_t meter, std::uint32_t id,
                                  std::uint16_t table = 1) {
    auto r = c.call(gs::test::sesd_request(daemon_->meter_title(meter), id, {full_read(table)}));
    ASSERT_TRUE(r.ok()) << r.error().message() << daemon_->err_log();
    auto chk = gs::test::check_secured(*r, daemon_->meter_key(meter), daemon_->pub_hex());
    ASSERT_TRUE(chk.ok()) << chk.error().message() << " " << gs::to_hex(*r);
    EXPECT_EQ(chk->mode, gs::c1222::SecurityMode::encrypted);
    EXPECT_EQ(chk->called, daemon_->meter_title(meter));
  }

  static int error_code_of(const Bytes& wire, std::uint32_t request_id) {
    const gs::test::ErrorReply e = gs::test::error_reply(wire);
    if (e.code >= 0) {
      EXPECT_EQ(e.calling, ".1.10");
      EXPECT_EQ(e.called, ".1.9");
      Bytes want;
      if (request_id > 0xFF) want.push_back(static_cast<std::uint8_t>(request_id >> 8));
      want.push_back(static_cast<std::uint8_t>(request_id));
      if ((want[0] & 0x80) != 0) want.insert(want.begin(), 0);
      EXPECT_EQ(e.called_id_hex, gs::to_hex(want));
    }
    return e.code;
  }

  static SesdDaemon* daemon_;
  static std::string* setup_error_;
};

SesdDaemon* SesdTls::daemon_ = nullptr;
std::string* SesdTls::setup_error_ = nullptr;

TEST_F(SesdTls, ReadComesBackInMode2WithAVerifyingSignature) {
  auto c = connect();
  ASSERT_NE(c, nullptr);
  std::uint64_t last_id = 0;
  for (std::uint32_t i = 1; i <= 3; ++i) {
    auto r = c->call(gs::test::sesd_request(daemon_->meter_title(1), i, {full_read(23)}));
    ASSERT_TRUE(r.ok()) << r.error().message() << daemon_->err_log();
    auto chk = gs::test::check_secured(*r, daemon_->meter_key(1), daemon_->pub_hex());
    ASSERT_TRUE(chk.ok()) << chk.error().message() << " " << gs::to_hex(*r);
    EXPECT_EQ(chk->mode, gs::c1222::SecurityMode::encrypted);
    EXPECT_EQ(chk->key_id, 0);
    EXPECT_EQ(chk->called, daemon_->meter_title(1));
    EXPECT_EQ(chk->calling, ".1.9");
    EXPECT_EQ(chk->signer_key_id, 1);
    EXPECT_EQ(chk->command_class, gs::c1222::CommandClass::read);
    EXPECT_GT(chk->invocation_id, last_id);
    last_id = chk->invocation_id;
    EXPECT_NE(chk->following_hex.find("033000" "17"), std::string::npos) << chk->following_hex;
    // Another meter's key does not open it.
    EXPECT_FALSE(gs::test::check_secured(*r, daemon_->meter_key(2), daemon_->pub_hex()).ok());
  }
}

TEST_F(SesdTls, WiresharkVerifiesTheSecuredCommands) {
  const std::string check = std::string(GS_SHARED_DIR) + "/tools/c1222-tshark-check";
  if (gs::test::run_command("command -v tshark").code != 0) {
    GTEST_SKIP() << "tshark is not installed";
  }
  auto c = connect();
  ASSERT_NE(c, nullptr);
  const std::string file = daemon_->dir() + "/secured.txt";
  {
    std::ofstream out(file);
    const std::vector<Bytes> services = {full_read(23), {0x3F, 0x00, 0x40, 0x00, 0x00, 0x10, 0x00, 0x20}};
    for (std::uint32_t i = 1; i <= 4; ++i) {
      auto r = c->call(gs::test::sesd_request(daemon_->meter_title(3), 0x100 + i,
                                              {services[0], services[i % 2]}));
      ASSERT_TRUE(r.ok()) << r.error().message();
      ASSERT_TRUE(gs::test::check_secured(*r, daemon_->meter_key(3), daemon_->pub_hex()).ok());
      out << gs::to_hex(*r) << " sesd-" << i << "\n";
    }
  }
  const auto res = gs::test::run_command("python3 " + check + " --key 0:" +
                                         daemon_->meter_key(3) +
                                         " --require-mac --strict-oracle < " + file);
  EXPECT_EQ(res.code, 0) << res.out;
  EXPECT_NE(res.out.find("summary: 4 message(s), 4 OK, 0 failed"), std::string::npos) << res.out;
  std::size_t verified = 0;
  for (auto at = res.out.find("MAC VERIFIED by Wireshark"); at != std::string::npos;
       at = res.out.find("MAC VERIFIED by Wireshark", at + 1)) {
    ++verified;
  }
  EXPECT_EQ(verified, 4u) << res.out;
}

TEST_F(SesdTls, ClientWithoutCertificateIsRefusedOthersAreServed) {
  auto good = connect();
  ASSERT_NE(good, nullptr);
  auto bare = daemon_->connect(ClientCert{"", ""});
  // TLS 1.3: the refusal shows up at connect or at the first exchange.
  if (bare.ok()) {
    EXPECT_FALSE((*bare)->call(gs::test::sesd_request(daemon_->meter_title(1), 1,
                                                      {full_read(1)})).ok());
  }
  // A plain TCP client on the TLS port gets nothing either.
  gs::server::ClientConfig plain = daemon_->client_config();
  plain.plain_tcp = true;
  plain.timeout = 1000ms;
  auto p = gs::server::Client::connect(plain);
  if (p.ok()) {
    EXPECT_FALSE((*p)->call(gs::test::sesd_request(daemon_->meter_title(1), 2,
                                                   {full_read(1)})).ok());
  }
  expect_secured_read(*good, 1, 3);
  auto fresh = connect();
  ASSERT_NE(fresh, nullptr);
  expect_secured_read(*fresh, 2, 4);
  EXPECT_TRUE(daemon_->running());
}

TEST_F(SesdTls, SubjectNotInPolicyOrClassNotAllowedGetsIsc) {
  auto stranger_cert = daemon_->issue_client_cert("stranger");
  ASSERT_TRUE(stranger_cert.ok()) << stranger_cert.error().message();
  auto reader_cert = daemon_->issue_client_cert("reader-only");
  ASSERT_TRUE(reader_cert.ok()) << reader_cert.error().message();

  auto stranger = connect(*stranger_cert);
  ASSERT_NE(stranger, nullptr);
  auto r = stranger->call(gs::test::sesd_request(daemon_->meter_title(1), 0x21, {full_read(1)}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(error_code_of(*r, 0x21), gs::c1222::kRespIsc);

  auto reader = connect(*reader_cert);
  ASSERT_NE(reader, nullptr);
  expect_secured_read(*reader, 4, 0x22);  // read is allowed for it
  r = reader->call(gs::test::sesd_request(daemon_->meter_title(4), 0x23, {kTimeWrite}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(error_code_of(*r, 0x23), gs::c1222::kRespIsc);
  // The same connection still serves what is allowed.
  expect_secured_read(*reader, 4, 0x24);
  const std::string err = daemon_->err_log();
  EXPECT_NE(err.find("client=\"CN=stranger,O=gridseal test\""), std::string::npos) << err;
}

TEST_F(SesdTls, FleetRateLimitRefusesTheExcessWithIsc) {
  auto c = connect();
  ASSERT_NE(c, nullptr);
  constexpr std::uint32_t kSent = kTimeFleetLimit + 4;
  std::uint32_t secured = 0, refused = 0;
  for (std::uint32_t i = 0; i < kSent; ++i) {
    // Spread over meters: only the fleet limit applies.
    auto r = c->call(gs::test::sesd_request(daemon_->meter_title(5 + i), 0x30 + i, {kTimeWrite}));
    ASSERT_TRUE(r.ok()) << r.error().message();
    if (gs::test::check_secured(*r, daemon_->meter_key(5 + i), daemon_->pub_hex()).ok()) {
      EXPECT_EQ(refused, 0u) << "a command was secured after the limit was reached";
      ++secured;
    } else {
      EXPECT_EQ(error_code_of(*r, 0x30 + i), gs::c1222::kRespIsc);
      ++refused;
    }
  }
  EXPECT_EQ(secured, kTimeFleetLimit);
  EXPECT_EQ(refused, kSent - kTimeFleetLimit);
  // Reads have no limit and still pass.
  expect_secured_read(*c, 5, 0x50);
  EXPECT_NE(daemon_->err_log().find("fleet_rate_limited"), std::string::npos);
}

TEST_F(SesdTls, MalformedFrameClosesOnlyThatConnection) {
  auto good = connect();
  auto bad = connect();
  ASSERT_TRUE(good && bad);
  ASSERT_TRUE(bad->send(gs::test::hex_bytes("ff00112233")).ok());
  EXPECT_FALSE(bad->receive().ok());
  expect_secured_read(*good, 6, 0x61);
  // A well-framed PDU that does not decode gets `err` and the connection stays.
  auto e = good->call(gs::test::hex_bytes("6003a20100"));
  ASSERT_TRUE(e.ok()) << e.error().message();
  EXPECT_EQ(gs::test::error_reply(*e).code, gs::c1222::kRespErr);
  expect_secured_read(*good, 6, 0x62);
}

TEST_F(SesdTls, OversizedFrameClosesOnlyThatConnection) {
  auto good = connect();
  auto big = connect();
  ASSERT_TRUE(good && big);
  // A header announcing more than max_frame, then some of the body.
  Bytes frame = {0x60, 0x82, static_cast<std::uint8_t>((kMaxFrame * 2) >> 8),
                 static_cast<std::uint8_t>(kMaxFrame * 2)};
  frame.resize(frame.size() + 256, 0xA5);
  ASSERT_TRUE(big->send(frame).ok());
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(big->receive().ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s) << "closed by a timeout, not the limit";
  expect_secured_read(*good, 7, 0x71);
  // New connections are still served.
  auto fits = connect();
  ASSERT_NE(fits, nullptr);
  expect_secured_read(*fits, 7, 0x72);
}

TEST_F(SesdTls, ThirtyTwoPipelinedRequestsComeBackInOrder) {
  auto c = connect();
  ASSERT_NE(c, nullptr);
  constexpr std::uint32_t kN = 32;
  Bytes all;
  for (std::uint32_t i = 0; i < kN; ++i) {
    // Even: a secured read of ST-(100+i) for meter 8+i/2; odd: an unknown meter (`uat`, A4 =
    // the request's id). Both kinds carry what identifies their request.
    const std::string meter =
        i % 2 == 0 ? daemon_->meter_title(8 + i / 2) : daemon_->options().title_prefix + ".99999";
    Bytes req = gs::test::sesd_request(meter, 0x200 + i, {full_read(static_cast<std::uint16_t>(100 + i))});
    all.insert(all.end(), req.begin(), req.end());
  }
  ASSERT_TRUE(c->send(all).ok());
  for (std::uint32_t i = 0; i < kN; ++i) {
    auto r = c->receive();
    ASSERT_TRUE(r.ok()) << i << ": " << r.error().message();
    if (i % 2 == 0) {
      auto chk = gs::test::check_secured(*r, daemon_->meter_key(8 + i / 2), daemon_->pub_hex());
      ASSERT_TRUE(chk.ok()) << i << ": " << chk.error().message();
      EXPECT_EQ(chk->called, daemon_->meter_title(8 + i / 2));
      char want[16];
      std::snprintf(want, sizeof want, "0330%04x", 100 + i);
      EXPECT_NE(chk->following_hex.find(want), std::string::npos) << i << " " << chk->following_hex;
    } else {
      EXPECT_EQ(error_code_of(*r, 0x200 + i), gs::c1222::kRespUat) << i;
    }
  }
}

TEST_F(SesdTls, FiveHundredConcurrentConnectionsEachGetAnAnswer) {
  constexpr std::size_t kConns = 500;
  constexpr std::size_t kThreads = 4;
  std::vector<std::unique_ptr<gs::server::Client>> clients(kConns);
  std::atomic<std::size_t> connect_failures{0};
  std::string first_error;
  std::mutex mu;
  const auto t0 = std::chrono::steady_clock::now();
  {
    std::vector<std::thread> ts;
    for (std::size_t t = 0; t < kThreads; ++t) {
      ts.emplace_back([&, t] {
        for (std::size_t i = t; i < kConns; i += kThreads) {
          auto c = daemon_->connect();
          if (!c.ok()) {
            ++connect_failures;
            std::lock_guard<std::mutex> lock(mu);
            if (first_error.empty()) first_error = c.error().message();
            continue;
          }
          clients[i] = std::move(c).value();
        }
      });
    }
    for (auto& t : ts) t.join();
  }
  ASSERT_EQ(connect_failures.load(), 0u) << first_error;
  const auto t_connected = std::chrono::steady_clock::now();
  // All 500 are open at once: each sends one read, then each answer is collected.
  for (std::size_t i = 0; i < kConns; ++i) {
    const std::size_t meter = 1 + i % kMeters;
    ASSERT_TRUE(clients[i]->send(gs::test::sesd_request(daemon_->meter_title(meter),
                                                        static_cast<std::uint32_t>(1 + i),
                                                        {full_read(1)}))
                    .ok())
        << i;
  }
  std::size_t answered = 0;
  for (std::size_t i = 0; i < kConns; ++i) {
    auto r = clients[i]->receive();
    ASSERT_TRUE(r.ok()) << i << ": " << r.error().message();
    const std::size_t meter = 1 + i % kMeters;
    auto chk = gs::test::check_secured(*r, daemon_->meter_key(meter), daemon_->pub_hex());
    EXPECT_TRUE(chk.ok()) << i << ": " << chk.error().message() << ", C12.22 response code "
                          << gs::test::error_reply(*r).code;
    if (chk.ok()) ++answered;
  }
  EXPECT_EQ(answered, kConns) << "refusals logged by the daemon:\n" << daemon_->err_log();
  const auto ms = [](auto d) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
  };
  std::printf("500 TLS connections: %lld ms to connect, %lld ms for the answers\n",
              static_cast<long long>(ms(t_connected - t0)),
              static_cast<long long>(ms(std::chrono::steady_clock::now() - t_connected)));
}

}  // namespace
