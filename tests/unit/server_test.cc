// Server scaffold on 127.0.0.1 port 0: pipelining order, limits, timeouts, TLS client
// certificates, drain on stop, and the /metrics + /healthz endpoint.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <thread>

#include "src/client.h"
#include "src/metrics.h"
#include "src/server.h"
#include "src/test_pki.h"

namespace gs::server {
namespace {

using namespace std::chrono_literals;

// A well-framed PDU: 60 <len> tag n filler bytes (the server does not parse beyond framing).
Bytes frame(std::uint8_t tag, std::size_t body = 8) {
  Bytes b;
  b.push_back(0x60);
  std::size_t len = body + 1;
  if (len < 0x80) {
    b.push_back(static_cast<std::uint8_t>(len));
  } else {
    b.push_back(0x82);
    b.push_back(static_cast<std::uint8_t>(len >> 8));
    b.push_back(static_cast<std::uint8_t>(len));
  }
  b.push_back(tag);
  b.resize(b.size() + body, 0xAB);
  return b;
}

std::uint8_t tag_of(const Bytes& pdu) {
  if (pdu.size() < 3) return 0;
  std::size_t hdr = pdu[1] < 0x80 ? 2 : 2 + (pdu[1] & 0x7F);
  return pdu.size() > hdr ? pdu[hdr] : 0;
}

ServerConfig plain_config() {
  ServerConfig c;
  c.address = "127.0.0.1";
  c.port = 0;
  c.plain_tcp = true;
  c.worker_threads = 4;
  c.idle_timeout = 5000ms;
  c.read_timeout = 2000ms;
  return c;
}

ClientConfig client_for(const Server& s) {
  ClientConfig c;
  c.port = s.port();
  c.plain_tcp = true;
  c.timeout = 3000ms;
  return c;
}

// Echo; a request whose tag is T sleeps (T & 0x0F) * 15 ms first.
Handler echo_handler() {
  return [](const RequestContext&, Bytes req, Done done) {
    std::this_thread::sleep_for(std::chrono::milliseconds((tag_of(req) & 0x0F) * 15));
    done(std::move(req));
  };
}

std::unique_ptr<Server> start(ServerConfig cfg, Handler h, FrameErrorHook hook = {},
                              metrics::Registry* reg = nullptr) {
  auto s = Server::create(std::move(cfg), std::move(h), std::move(hook), reg);
  EXPECT_TRUE(s.ok()) << s.error().message();
  if (!s.ok()) return nullptr;
  auto st = (*s)->start();
  EXPECT_TRUE(st.ok()) << st.error().message();
  EXPECT_NE((*s)->port(), 0);
  return std::move(*s);
}

TEST(Server, ValidatesConfiguration) {
  ServerConfig c = plain_config();
  EXPECT_TRUE(validate(c).ok());
  c.address = "0.0.0.0";
  EXPECT_FALSE(validate(c).ok());  // plain TCP off loopback
  c.plain_tcp_remote = true;
  EXPECT_TRUE(validate(c).ok());
  c = plain_config();
  c.plain_tcp = false;
  EXPECT_FALSE(validate(c).ok());  // TLS without files
  c = plain_config();
  c.max_frame = 0;
  EXPECT_FALSE(validate(c).ok());
  c = plain_config();
  c.address = "localhost:1";
  EXPECT_FALSE(validate(c).ok());
  c = plain_config();
  c.plain_tcp = false;
  c.tls = {"/nonexistent/ca.pem", "/nonexistent/c.pem", "/nonexistent/k.pem"};
  auto s = Server::create(c, echo_handler());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.error().message().find("/nonexistent/ca.pem"), std::string::npos);
}

TEST(Server, EchoAndPipelinedResponsesInRequestOrder) {
  std::mutex mu;
  std::vector<std::string> identities;
  std::vector<std::uint8_t> completion_order;
  auto h = [&](const RequestContext& ctx, Bytes req, Done done) {
    // Earlier requests take longer: handlers finish in reverse order.
    std::this_thread::sleep_for(std::chrono::milliseconds((8 - (tag_of(req) & 0x0F)) * 20));
    {
      std::lock_guard lock(mu);
      identities.push_back(ctx.client_identity);
      completion_order.push_back(tag_of(req));
    }
    done(std::move(req));
  };
  auto server = start(plain_config(), h);
  ASSERT_TRUE(server);
  auto client = Client::connect(client_for(*server));
  ASSERT_TRUE(client.ok()) << client.error().message();
  Bytes all;
  for (std::uint8_t i = 0; i < 8; ++i) {
    Bytes f = frame(i, 10 + i);
    all.insert(all.end(), f.begin(), f.end());
  }
  ASSERT_TRUE((*client)->send(all).ok());
  for (std::uint8_t i = 0; i < 8; ++i) {
    auto r = (*client)->receive();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(*r, frame(i, 10 + i)) << "response " << int(i);
  }
  std::lock_guard lock(mu);
  ASSERT_EQ(identities.size(), 8u);
  EXPECT_EQ(identities[0], "plain:127.0.0.1");
  EXPECT_NE(completion_order.front(), 0);  // the handlers really did finish out of order
  EXPECT_EQ(server->stats().requests, 8u);
  // The counter moves when the write completes, which may be just after the client read it.
  for (int i = 0; i < 100 && server->stats().responses < 8; ++i) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(server->stats().responses, 8u);
}

// server.sched_batch: the event loop threads run under SCHED_BATCH (seen by a handler running
// inline on one), and under the default policy without it.
TEST(Server, SchedBatchPutsTheEventLoopsUnderSchedBatch) {
  for (const bool batch : {true, false}) {
    ServerConfig cfg = plain_config();
    cfg.worker_threads = 0;  // the handler runs on the event loop
    cfg.io_threads = 2;
    cfg.sched_batch = batch;
    std::atomic<int> policy{-1};
    auto server = start(cfg, [&policy](const RequestContext&, Bytes req, Done done) {
      policy = sched_getscheduler(0);
      done(std::move(req));
    });
    ASSERT_TRUE(server);
    auto client = Client::connect(client_for(*server));
    ASSERT_TRUE(client.ok()) << client.error().message();
    ASSERT_TRUE((*client)->send(frame(1)).ok());
    auto r = (*client)->receive();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(policy.load(), batch ? SCHED_BATCH : SCHED_OTHER) << "sched_batch " << batch;
  }
}

// Responses completed inside a CompletionBatch (as the SES's audit writer completes a committed
// batch) reach the event loop only when the outermost batch ends, then go out in request order
// on each connection; a Done dropped inside the batch still closes its connection after the
// responses before it.
TEST(Server, CompletionBatchHandsResponsesOverWhenItEnds) {
  std::mutex mu;
  std::vector<std::pair<std::uint8_t, Done>> parked;
  auto h = [&](const RequestContext&, Bytes req, Done done) {
    std::lock_guard lock(mu);
    parked.emplace_back(tag_of(req), std::move(done));
  };
  ServerConfig cfg = plain_config();
  auto server = start(cfg, h);
  ASSERT_TRUE(server);
  auto a = Client::connect(client_for(*server));
  auto b = Client::connect(client_for(*server));
  ASSERT_TRUE(a.ok() && b.ok());
  Bytes to_a, to_b;
  for (std::uint8_t i = 0; i < 6; ++i) {
    Bytes fa = frame(i), fb = frame(static_cast<std::uint8_t>(0x10 + i));
    to_a.insert(to_a.end(), fa.begin(), fa.end());
    to_b.insert(to_b.end(), fb.begin(), fb.end());
  }
  ASSERT_TRUE((*a)->send(to_a).ok());
  ASSERT_TRUE((*b)->send(to_b).ok());
  for (int i = 0; i < 300; ++i) {
    {
      std::lock_guard lock(mu);
      if (parked.size() == 12) break;
    }
    std::this_thread::sleep_for(10ms);
  }
  std::vector<std::pair<std::uint8_t, Done>> all;
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(parked.size(), 12u);
    all = std::move(parked);
  }
  std::thread completer([&] {
    CompletionBatch outer;
    {
      CompletionBatch inner;  // nested: its end hands nothing over
      for (auto it = all.rbegin(); it != all.rend(); ++it) {
        if (it->first == 0x14) {
          Done dropped = std::move(it->second);  // b's request 4: dropped, closes b after 0x13
          continue;
        }
        it->second(frame(it->first, 3));
      }
    }
    std::this_thread::sleep_for(200ms);
    EXPECT_EQ(server->stats().responses, 0u) << "a response left before the batch ended";
  });
  completer.join();
  for (std::uint8_t i = 0; i < 6; ++i) {
    auto r = (*a)->receive();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(*r, frame(i, 3));
  }
  for (std::uint8_t i = 0; i < 4; ++i) {
    auto r = (*b)->receive();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(*r, frame(static_cast<std::uint8_t>(0x10 + i), 3));
  }
  auto closed = (*b)->receive();
  ASSERT_FALSE(closed.ok());
  EXPECT_EQ(closed.error().code, Errc::truncated);
}

TEST(Server, HalfCloseStillAnswersEverything) {
  auto server = start(plain_config(), echo_handler());
  ASSERT_TRUE(server);
  auto client = Client::connect(client_for(*server));
  ASSERT_TRUE(client.ok());
  Bytes all;
  for (std::uint8_t i : {std::uint8_t{3}, std::uint8_t{1}, std::uint8_t{2}}) {
    Bytes f = frame(i);
    all.insert(all.end(), f.begin(), f.end());
  }
  ASSERT_TRUE((*client)->send(all).ok());
  (*client)->shutdown_send();
  for (std::uint8_t i : {std::uint8_t{3}, std::uint8_t{1}, std::uint8_t{2}}) {
    auto r = (*client)->receive();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(tag_of(*r), i);
  }
  auto end = (*client)->receive();
  ASSERT_FALSE(end.ok());
  EXPECT_EQ(end.error().code, Errc::truncated);
}

TEST(Server, OversizedFrameClosesOnlyThatConnection) {
  ServerConfig cfg = plain_config();
  cfg.max_frame = 64;
  std::atomic<int> hook_calls{0};
  FrameErrorHook hook = [&](const RequestContext&, const Error& e) -> std::optional<Bytes> {
    ++hook_calls;
    return e.code == Errc::too_large ? Bytes{0x60, 0x02, 0xEE, 0x01} : Bytes{0x60, 0x02, 0xEE, 0x02};
  };
  auto server = start(cfg, echo_handler(), hook);
  ASSERT_TRUE(server);
  auto good = Client::connect(client_for(*server));
  auto bad = Client::connect(client_for(*server));
  auto junk = Client::connect(client_for(*server));
  ASSERT_TRUE(good.ok() && bad.ok() && junk.ok());
  ASSERT_TRUE((*good)->call(frame(1)).ok());

  // A valid request, then one above the cap: the first is answered, then the error, then close.
  Bytes two = frame(2);
  Bytes big = frame(3, 100);
  two.insert(two.end(), big.begin(), big.end());
  ASSERT_TRUE((*bad)->send(two).ok());
  auto r1 = (*bad)->receive();
  ASSERT_TRUE(r1.ok()) << r1.error().message();
  EXPECT_EQ(tag_of(*r1), 2);
  auto r2 = (*bad)->receive();
  ASSERT_TRUE(r2.ok()) << r2.error().message();
  EXPECT_EQ(*r2, (Bytes{0x60, 0x02, 0xEE, 0x01}));
  EXPECT_EQ((*bad)->receive().error().code, Errc::truncated);

  // Not C12.22 at all.
  ASSERT_TRUE((*junk)->send(Bytes{0x16, 0x03, 0x01, 0x00, 0x10}).ok());
  auto j = (*junk)->receive();
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(*j, (Bytes{0x60, 0x02, 0xEE, 0x02}));
  EXPECT_EQ((*junk)->receive().error().code, Errc::truncated);

  // The other connection is unaffected.
  auto r = (*good)->call(frame(4));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(tag_of(*r), 4);
  EXPECT_EQ(hook_calls.load(), 2);
  EXPECT_EQ(server->stats().frames_rejected, 2u);
}

TEST(Server, IdleAndSlowFrameTimeoutsClose) {
  ServerConfig cfg = plain_config();
  cfg.idle_timeout = 200ms;
  cfg.read_timeout = 200ms;
  auto server = start(cfg, echo_handler());
  ASSERT_TRUE(server);
  auto idle = Client::connect(client_for(*server));
  auto slow = Client::connect(client_for(*server));
  ASSERT_TRUE(idle.ok() && slow.ok());
  // Slow loris: the start of a frame, and then nothing.
  ASSERT_TRUE((*slow)->send(Bytes{0x60, 0x20, 0x01}).ok());
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ((*idle)->receive().error().code, Errc::truncated);
  EXPECT_EQ((*slow)->receive().error().code, Errc::truncated);
  auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(took, 150ms);
  EXPECT_LT(took, 2000ms);
  EXPECT_GE(server->stats().timeouts, 2u);
  EXPECT_EQ(server->stats().connections_active, 0u);
}

TEST(Server, RequestTimeoutClosesAndAbandonedDoneCloses) {
  ServerConfig cfg = plain_config();
  cfg.request_timeout = 200ms;
  auto h = [](const RequestContext&, Bytes req, Done done) {
    if (tag_of(req) == 1) return;  // drops Done without calling it
    if (tag_of(req) == 2) {
      std::this_thread::sleep_for(600ms);  // too slow
    }
    if (tag_of(req) == 3) {
      done({});  // empty: cut the client off
      return;
    }
    done(std::move(req));
  };
  auto server = start(cfg, h);
  ASSERT_TRUE(server);
  for (std::uint8_t tag : {std::uint8_t{1}, std::uint8_t{2}, std::uint8_t{3}}) {
    auto c = Client::connect(client_for(*server));
    ASSERT_TRUE(c.ok());
    auto r = (*c)->call(frame(tag));
    ASSERT_FALSE(r.ok()) << "tag " << int(tag);
    EXPECT_EQ(r.error().code, Errc::truncated) << "tag " << int(tag);
  }
}

TEST(Server, InFlightCapAndSlowReaderDoNotStarveOthers) {
  ServerConfig cfg = plain_config();
  cfg.max_in_flight = 4;
  auto server = start(cfg, echo_handler());
  ASSERT_TRUE(server);
  // A client that pipelines far more than the cap of slow (30 ms) requests and never reads.
  auto hog = Client::connect(client_for(*server));
  ASSERT_TRUE(hog.ok());
  Bytes lots;
  for (int i = 0; i < 60; ++i) {
    Bytes f = frame(0x12, 4000);
    lots.insert(lots.end(), f.begin(), f.end());
  }
  ASSERT_TRUE((*hog)->send(lots).ok());
  std::this_thread::sleep_for(20ms);
  auto other = Client::connect(client_for(*server));
  ASSERT_TRUE(other.ok());
  // The hog holds at most 4 workers' worth of requests; every call of the other client waits
  // for at most about one hog request, never for the hog's backlog (60 x 30 ms / 4 workers).
  auto t0 = std::chrono::steady_clock::now();
  auto worst = std::chrono::steady_clock::duration::zero();
  for (std::uint8_t i = 0; i < 20; ++i) {
    auto c0 = std::chrono::steady_clock::now();
    auto r = (*other)->call(frame(0x20));
    ASSERT_TRUE(r.ok()) << r.error().message();
    worst = std::max(worst, std::chrono::steady_clock::now() - c0);
  }
  EXPECT_LT(worst, 150ms);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1000ms);
  // The hog got its answers in order despite never reading while it was throttled.
  for (int i = 0; i < 60; ++i) {
    auto r = (*hog)->receive();
    ASSERT_TRUE(r.ok()) << i << ": " << r.error().message();
    EXPECT_EQ(tag_of(*r), 0x12);
  }
}

TEST(Server, ClientThatNeverReadsIsCutOffByWriteTimeout) {
  ServerConfig cfg = plain_config();
  cfg.write_timeout = 300ms;
  cfg.max_in_flight = 8;
  auto server = start(cfg, echo_handler());
  ASSERT_TRUE(server);
  // Large requests echoed back fill both socket buffers; the server's write then stalls.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  int small = 4096;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(server->port());
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  timeval tv{0, 200000};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  Bytes f = frame(0x10, 8000);
  auto t0 = std::chrono::steady_clock::now();
  bool reset = false;
  while (!reset && std::chrono::steady_clock::now() - t0 < 3000ms) {
    ssize_t n = ::send(fd, f.data(), f.size(), MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) reset = true;
    if (server->stats().timeouts > 0) break;
  }
  ::close(fd);
  EXPECT_GE(server->stats().timeouts, 1u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3000ms);
}

TEST(Server, ConnectionCap) {
  ServerConfig cfg = plain_config();
  cfg.max_connections = 2;
  auto server = start(cfg, echo_handler());
  ASSERT_TRUE(server);
  auto a = Client::connect(client_for(*server));
  auto b = Client::connect(client_for(*server));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE((*a)->call(frame(1)).ok());
  ASSERT_TRUE((*b)->call(frame(1)).ok());
  auto c = Client::connect(client_for(*server));  // TCP accepts; the server then closes it
  if (c.ok()) {
    auto r = (*c)->call(frame(1));
    EXPECT_FALSE(r.ok());
  }
  EXPECT_GE(server->stats().connections_refused, 1u);
  (*a)->close();
  bool served = false;
  for (int i = 0; i < 40 && !served; ++i) {
    std::this_thread::sleep_for(25ms);
    auto d = Client::connect(client_for(*server));
    served = d.ok() && (*d)->call(frame(2)).ok();
  }
  EXPECT_TRUE(served);
  EXPECT_TRUE((*b)->call(frame(1)).ok());
}

TEST(Server, StopDrainsInFlightRequests) {
  ServerConfig cfg = plain_config();
  std::atomic<int> started{0};
  auto h = [&](const RequestContext&, Bytes req, Done done) {
    ++started;
    std::this_thread::sleep_for(std::chrono::milliseconds(tag_of(req) * 10));
    done(std::move(req));
  };
  auto server = start(cfg, h);
  ASSERT_TRUE(server);
  auto client = Client::connect(client_for(*server));
  auto idle = Client::connect(client_for(*server));
  ASSERT_TRUE(client.ok() && idle.ok());
  ASSERT_TRUE((*client)->call(frame(0)).ok());  // both connections are established
  ASSERT_TRUE((*client)->send(frame(30)).ok());  // 300 ms of work
  while (started.load() < 2) std::this_thread::sleep_for(1ms);
  auto t0 = std::chrono::steady_clock::now();
  server->shutdown(3000ms);
  auto r = (*client)->receive();
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(tag_of(*r), 30);
  EXPECT_EQ((*client)->receive().error().code, Errc::truncated);
  EXPECT_EQ((*idle)->receive().error().code, Errc::truncated);
  server->wait();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2000ms);
  auto late = Client::connect(client_for(*server));
  EXPECT_FALSE(late.ok() && (*late)->call(frame(1)).ok());
}

TEST(Server, StopForceClosesAfterDeadline) {
  auto h = [](const RequestContext&, Bytes req, Done done) {
    std::this_thread::sleep_for(800ms);
    done(std::move(req));
  };
  auto server = start(plain_config(), h);
  ASSERT_TRUE(server);
  auto client = Client::connect(client_for(*server));
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE((*client)->send(frame(1)).ok());
  std::this_thread::sleep_for(50ms);
  auto t0 = std::chrono::steady_clock::now();
  server->shutdown(200ms);
  EXPECT_EQ((*client)->receive().error().code, Errc::truncated);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1000ms);
  server->wait();  // joins the pool: waits for the slow handler
}

class TlsServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-server-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto p = pki::make_test_pki(dir_ + "/pki");
    ASSERT_TRUE(p.ok()) << p.error().message();
    pki_ = *p;
    pki::TestPkiOptions other;
    other.ca_cn = "rogue CA";
    auto q = pki::make_test_pki(dir_ + "/rogue", other);
    ASSERT_TRUE(q.ok()) << q.error().message();
    rogue_ = *q;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  ServerConfig tls_config() const {
    ServerConfig c = plain_config();
    c.plain_tcp = false;
    c.tls = {pki_.ca_cert, pki_.server_cert, pki_.server_key};
    return c;
  }
  ClientConfig tls_client(const Server& s, bool with_cert = true) const {
    ClientConfig c = client_for(s);
    c.plain_tcp = false;
    c.tls.ca_file = pki_.ca_cert;
    if (with_cert) {
      c.tls.cert_file = pki_.client_cert;
      c.tls.key_file = pki_.client_key;
    }
    c.server_name = "127.0.0.1";
    return c;
  }

  std::string dir_;
  pki::TestPki pki_;
  pki::TestPki rogue_;
};

TEST_F(TlsServerTest, ClientCertificateIdentityIsSeen) {
  std::mutex mu;
  std::string identity, fingerprint;
  auto h = [&](const RequestContext& ctx, Bytes req, Done done) {
    {
      std::lock_guard lock(mu);
      identity = ctx.client_identity;
      fingerprint = ctx.client_cert_sha256;
    }
    done(std::move(req));
  };
  auto server = start(tls_config(), h);
  ASSERT_TRUE(server);
  auto client = Client::connect(tls_client(*server));
  ASSERT_TRUE(client.ok()) << client.error().message();
  Bytes all;
  for (std::uint8_t i = 0; i < 5; ++i) {
    Bytes f = frame(i, 300);
    all.insert(all.end(), f.begin(), f.end());
  }
  ASSERT_TRUE((*client)->send(all).ok());
  for (std::uint8_t i = 0; i < 5; ++i) {
    auto r = (*client)->receive();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(*r, frame(i, 300));
  }
  {
    std::lock_guard lock(mu);
    EXPECT_EQ(identity, "CN=head-end-test,O=gridseal test");
    EXPECT_EQ(fingerprint.size(), 64u);
  }

  // Another client certificate from the same CA is another identity.
  ASSERT_TRUE(pki::issue_certificate(pki_, "head-end-2", false, dir_ + "/c2.pem",
                                     dir_ + "/c2.key")
                  .ok());
  ClientConfig c2 = tls_client(*server);
  c2.tls.cert_file = dir_ + "/c2.pem";
  c2.tls.key_file = dir_ + "/c2.key";
  auto client2 = Client::connect(c2);
  ASSERT_TRUE(client2.ok()) << client2.error().message();
  ASSERT_TRUE((*client2)->call(frame(9)).ok());
  std::lock_guard lock(mu);
  EXPECT_EQ(identity, "CN=head-end-2,O=gridseal test");
}

// In TLS 1.3 the client may finish its handshake before the server rejects its certificate, so
// a refusal shows up either at connect or at the first exchange.
bool refused(const Result<std::unique_ptr<Client>>& c) {
  if (!c.ok()) return true;
  return !(*c)->call(frame(1)).ok();
}

TEST_F(TlsServerTest, ClientsWithoutAValidCertificateAreRefused) {
  std::atomic<int> calls{0};
  auto h = [&](const RequestContext&, Bytes req, Done done) {
    ++calls;
    done(std::move(req));
  };
  auto server = start(tls_config(), h);
  ASSERT_TRUE(server);
  EXPECT_TRUE(refused(Client::connect(tls_client(*server, false))));  // no certificate
  ClientConfig rogue = tls_client(*server);
  rogue.tls.cert_file = rogue_.client_cert;  // a certificate from another CA
  rogue.tls.key_file = rogue_.client_key;
  EXPECT_TRUE(refused(Client::connect(rogue)));
  ClientConfig plain = client_for(*server);  // not TLS at all
  EXPECT_TRUE(refused(Client::connect(plain)));
  ClientConfig wrong_ca = tls_client(*server);  // the client does not trust the server
  wrong_ca.tls.ca_file = rogue_.ca_cert;
  EXPECT_FALSE(Client::connect(wrong_ca).ok());
  EXPECT_EQ(calls.load(), 0);
  EXPECT_GE(server->stats().handshakes_failed, 3u);
  // And a good client still works.
  auto good = Client::connect(tls_client(*server));
  ASSERT_TRUE(good.ok());
  EXPECT_TRUE((*good)->call(frame(1)).ok());
}

TEST_F(TlsServerTest, HandshakeTimeout) {
  ServerConfig cfg = tls_config();
  cfg.handshake_timeout = 200ms;
  auto server = start(cfg, echo_handler());
  ASSERT_TRUE(server);
  auto c = Client::connect(client_for(*server));  // plain TCP: never sends a ClientHello
  ASSERT_TRUE(c.ok());
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE((*c)->receive().ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1500ms);
}

// --- metrics -----------------------------------------------------------------------------

TEST(Metrics, TextExposition) {
  metrics::Registry reg;
  reg.counter("gs_test_total", "Test \"counter\"", {{"result", "ok"}}).inc(3);
  reg.counter("gs_test_total", "Test \"counter\"", {{"result", "a\"b\\c\nd"}}).inc();
  EXPECT_EQ(&reg.counter("gs_test_total", "", {{"result", "ok"}}),
            &reg.counter("gs_test_total", "", {{"result", "ok"}}));
  reg.gauge("gs_temp", "A gauge").set(-1.5);
  auto& h = reg.histogram("gs_lat_seconds", "Latency", {0.1, 1.0}, {{"b", "2"}, {"a", "1"}});
  h.observe(0.05);
  h.observe(0.1);
  h.observe(0.5);
  h.observe(7.0);
  reg.gauge_fn("gs_fn", "From a function", {}, [] { return 42.0; });
  std::string text = reg.expose();
  EXPECT_NE(text.find("# TYPE gs_test_total counter\n"), std::string::npos) << text;
  EXPECT_NE(text.find("gs_test_total{result=\"ok\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("gs_test_total{result=\"a\\\"b\\\\c\\nd\"} 1\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("gs_temp -1.5\n"), std::string::npos) << text;
  EXPECT_NE(text.find("gs_lat_seconds_bucket{a=\"1\",b=\"2\",le=\"0.10000000000000001\"} 2\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("gs_lat_seconds_bucket{a=\"1\",b=\"2\",le=\"1\"} 3\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("gs_lat_seconds_bucket{a=\"1\",b=\"2\",le=\"+Inf\"} 4\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("gs_lat_seconds_count{a=\"1\",b=\"2\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("gs_lat_seconds_sum{a=\"1\",b=\"2\"} 7.6"), std::string::npos) << text;
  EXPECT_NE(text.find("gs_fn 42\n"), std::string::npos) << text;
}

TEST(Metrics, ConcurrentUpdatesAreNotLost) {
  metrics::Registry reg;
  auto& c = reg.counter("gs_c_total", "c");
  auto& g = reg.gauge("gs_g", "g");
  auto& h = reg.histogram("gs_h", "h", {1.0});
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        c.inc();
        g.add(1.0);
        h.observe(0.5);
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(c.value(), 80000u);
  EXPECT_EQ(g.value(), 80000.0);
  EXPECT_EQ(h.count(), 80000u);
  EXPECT_EQ(h.bucket(0), 80000u);
}

// One HTTP exchange over a raw socket; returns everything the server sent.
std::string http(std::uint16_t port, const std::string& request) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return {};
  timeval tv{2, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    (void)::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
    char buf[4096];
    for (;;) {
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      out.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  return out;
}

TEST(Metrics, HttpEndpointServesMetricsAndHealth) {
  metrics::Registry reg;
  std::atomic<bool> healthy{true};
  metrics::HttpEndpoint ep(reg, [&] {
    return healthy ? metrics::Health{} : metrics::Health{false, "hsm not logged in"};
  });
  metrics::HttpConfig hc;
  hc.port = 0;
  hc.timeout = 300ms;
  hc.max_request = 1024;
  metrics::HttpConfig remote = hc;
  remote.address = "0.0.0.0";
  EXPECT_FALSE(metrics::HttpEndpoint(reg, {}).start(remote).ok());
  ASSERT_TRUE(ep.start(hc).ok());
  ASSERT_NE(ep.port(), 0);

  // A C12.22 server feeding the same registry.
  auto server = start(plain_config(), echo_handler(), {}, &reg);
  ASSERT_TRUE(server);
  auto client = Client::connect(client_for(*server));
  ASSERT_TRUE(client.ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*client)->call(frame(1)).ok());

  // The server records a request's latency after its response is written, so the client can
  // see the third answer before the third observation: poll, bounded.
  std::string m;
  for (int i = 0; i < 100; ++i) {
    m = http(ep.port(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    if (m.find("gridseal_server_request_seconds_count 3\n") != std::string::npos) break;
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(m.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << m;
  EXPECT_NE(m.find("text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(m.find("gridseal_server_requests_total 3\n"), std::string::npos) << m;
  EXPECT_NE(m.find("gridseal_server_connections_active 1\n"), std::string::npos) << m;
  EXPECT_NE(m.find("gridseal_server_request_seconds_count 3\n"), std::string::npos) << m;

  std::string h = http(ep.port(), "GET /healthz HTTP/1.1\r\n\r\n");
  EXPECT_EQ(h.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << h;
  healthy = false;
  h = http(ep.port(), "GET /healthz HTTP/1.1\r\n\r\n");
  EXPECT_EQ(h.rfind("HTTP/1.1 503", 0), 0u) << h;
  EXPECT_NE(h.find("hsm not logged in"), std::string::npos);

  EXPECT_EQ(http(ep.port(), "GET /nope HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(http(ep.port(), "POST /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 405", 0), 0u);
  EXPECT_EQ(http(ep.port(), "garbage\r\n\r\n").rfind("HTTP/1.1 400", 0), 0u);
  std::string huge = "GET /metrics HTTP/1.1\r\nX: " + std::string(4000, 'a') + "\r\n\r\n";
  EXPECT_EQ(http(ep.port(), huge).rfind("HTTP/1.1 431", 0), 0u);
  // A client that sends half a request and waits is cut off by the timeout.
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(http(ep.port(), "GET /metr"), "");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1500ms);
  ep.stop();
  EXPECT_EQ(http(ep.port(), "GET /healthz HTTP/1.1\r\n\r\n"), "");
}

}  // namespace
}  // namespace gs::server
