// End-to-end tests of gridseal-sesd: the real daemon on loopback plain TCP with a SoftHSM2 token
// made by `gridseal hsm init` and meters imported with plain keys. Outputs are checked
// independently: opened with the meter's key on the host, MT-2040 verified with the exported key.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "src/client.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr const char* kKeys[] = {"00112233445566778899aabbccddeeff",
                                 "0f0e0d0c0b0a09080706050403020100"};

std::string run_cli(const std::string& args, int* code) {
  std::string cmd = std::string(GS_BIN_DIR) + "/gridseal " + args + " 2>&1";
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  *code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

gs::Bytes hex(std::string_view h) {
  auto b = gs::from_hex(h);
  GS_CHECK(b.has_value());
  return *b;
}

// A mode-0 request from the head-end (.1.9) to `meter` with invocation id `id` and one service.
gs::Bytes request(const std::string& meter, std::uint8_t id, const gs::Bytes& service) {
  auto called = gs::c1222::OwnedApTitle::parse(meter).value();
  auto calling = gs::c1222::OwnedApTitle::parse(".1.9").value();
  gs::c1222::Message m;
  m.called_ap_title = called.view();
  m.calling_ap_title = calling.view();
  const std::uint8_t a8[1] = {id};
  m.calling_ap_invocation_id = gs::ByteView(a8, 1);
  gs::Bytes epsem{0x80};
  gs::c1222::append_service(epsem, service);
  m.epsem = epsem;
  return gs::c1222::encode(m).value();
}

const gs::Bytes kRead = {0x30, 0x00, 0x01};  // full read of ST-1
// Full write of ST-2 with one byte (checksum = two's complement of the data sum).
const gs::Bytes kWrite = {0x40, 0x00, 0x02, 0x00, 0x01, 0xAA, 0x56};

class Sesd : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-sesd-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/ses.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-sesd\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n"
                            "[server]\naddress = \"127.0.0.1\"\nport = 0\nplain_tcp = true\n"
                            "worker_threads = 2\ndrain_ms = 2000\n"
                            "[ses]\nhead_end_title = \".1.9\"\nses_title = \".1.10\"\n"
                            "policy = \"policy.toml\"\nmetrics_port = 0\nmeter_cache_ttl_ms = 0\n";
    std::ofstream(dir_ + "/policy.toml")
        << "[[client]]\nname = \"loopback\"\nsubject = \"plain:127.0.0.1\"\n"
           "classes = [\"read\", \"demand_response\"]\n"
           "[table_writes]\ndemand_response = [\"MT-40\"]\n"
           "[[demand_response_group]]\nname = \"feeder-3\"\ntitle = \".3.1\"\n"
           "max_event_window = 600\n";
    std::ofstream(dir_ + "/fleet.csv")
        << "meter_id,ap_title,ecc_public_key,key_slot,key\n"
        << "M1,.7.1,,0,plain:" << kKeys[0] << "\n"
        << "M2,.7.2,,0,plain:" << kKeys[1] << "\n";
    int code = -1;
    std::string out = run_cli("hsm init --config " + conf_, &code);
    ASSERT_EQ(code, 0) << out;
    out = run_cli("meters import " + dir_ + "/fleet.csv --config " + conf_, &code);
    ASSERT_EQ(code, 0) << out;
    pub_hex_ = run_cli("hsm export-pubkey gs-cmd-1 --hex --config " + conf_, &code);
    ASSERT_EQ(code, 0) << pub_hex_;
    while (!pub_hex_.empty() && (pub_hex_.back() == '\n')) pub_hex_.pop_back();
    start_daemon();
  }

  void start_daemon() {
    pid_ = fork();
    ASSERT_GE(pid_, 0);
    if (pid_ == 0) {
      std::freopen((dir_ + "/sesd.out").c_str(), "w", stdout);
      std::freopen((dir_ + "/sesd.err").c_str(), "w", stderr);
      std::string bin = std::string(GS_BIN_DIR) + "/gridseal-sesd";
      execl(bin.c_str(), bin.c_str(), "--config", conf_.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + 15s;
    while (std::chrono::steady_clock::now() < deadline) {
      std::string out = slurp(dir_ + "/sesd.out");
      auto at = out.find("listening on 127.0.0.1:");
      if (at != std::string::npos) {
        port_ = static_cast<std::uint16_t>(std::stoi(out.substr(at + 23)));
        auto mt = out.find("metrics on 127.0.0.1:");
        if (mt != std::string::npos) {
          metrics_port_ = static_cast<std::uint16_t>(std::stoi(out.substr(mt + 21)));
        }
        return;
      }
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        FAIL() << "daemon exited: " << slurp(dir_ + "/sesd.err");
      }
      std::this_thread::sleep_for(50ms);
    }
    FAIL() << "daemon did not start: " << slurp(dir_ + "/sesd.err");
  }

  // SIGTERM; returns the exit code (-1 when it had to be killed).
  int stop_daemon() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    int st = 0;
    while (std::chrono::steady_clock::now() < deadline) {
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      }
      std::this_thread::sleep_for(20ms);
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, &st, 0);
    pid_ = -1;
    return -1;
  }

  void TearDown() override {
    stop_daemon();
    fs::remove_all(dir_);
  }

  std::unique_ptr<gs::server::Client> connect() {
    gs::server::ClientConfig cc;
    cc.port = port_;
    cc.plain_tcp = true;
    cc.timeout = 5000ms;
    auto c = gs::server::Client::connect(cc);
    GS_CHECK(c.ok());
    return std::move(c).value();
  }

  // The response code of a mode-0 error response, checking its addressing.
  static int error_code(const gs::Bytes& wire, std::uint8_t request_id) {
    auto m = gs::c1222::decode(wire);
    if (!m.ok()) return -1;
    EXPECT_TRUE(m->calling_ap_title.has_value());
    if (m->calling_ap_title) {
      EXPECT_EQ(m->calling_ap_title->dotted(), ".1.10");
    }
    EXPECT_TRUE(m->called_ap_title && m->called_ap_title->dotted() == ".1.9");
    EXPECT_TRUE(m->called_ap_invocation_id &&
                gs::to_hex(*m->called_ap_invocation_id) == gs::to_hex(gs::Bytes{request_id}));
    auto e = gs::c1222::split_epsem(m->epsem);
    if (!e.ok() || gs::c1222::security_mode(e->control) != gs::c1222::SecurityMode::cleartext) {
      return -2;
    }
    auto s = gs::c1222::split_services(e->body);
    if (!s.ok() || s->size() != 1 || s->front().bytes.size() != 1) return -3;
    return s->front().bytes[0];
  }

  std::string dir_, conf_, pub_hex_;
  pid_t pid_ = -1;
  std::uint16_t port_ = 0;
  std::uint16_t metrics_port_ = 0;
};

// GET `path` from the daemon's HTTP endpoint; the whole response ("" on failure).
std::string http_get(std::uint16_t port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    std::string req = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
    if (::write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof buf)) > 0 && out.size() < (1U << 20)) {
        out.append(buf, static_cast<std::size_t>(n));
      }
    }
  }
  ::close(fd);
  return out;
}

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
  std::string out = run_cli("meters revoke M2 --reason test --config " + conf_, &code);
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
  EXPECT_NE(metrics.find("gridseal_ses_requests_total{class=\"read\",result=\"ok\"} 1"),
            std::string::npos) << metrics;
  EXPECT_NE(metrics.find("result=\"meter_refused\"} 1"), std::string::npos) << metrics;
  EXPECT_EQ(stop_daemon(), 0);
}

}  // namespace
