// C12.22 server scaffold: acceptor, TLS 1.3 with client certificates, per-connection coroutines
// on strands, framing, in-order pipelined responses, limits, timeouts and graceful drain.
#include <cstdio>
#include <utility>  // before Asio

#include "src/server.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "c1222/framer.h"
#include "gridseal/thread_name.h"
#include "gridseal/thread_sched.h"
#include "src/metrics.h"

namespace gs::server {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using asio::ip::tcp;
using boost::system::error_code;
using Clock = std::chrono::steady_clock;
using Strand = asio::strand<asio::io_context::executor_type>;
using ReusePort = asio::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>;

namespace {
constexpr auto kNever = Clock::time_point::max();
constexpr std::size_t kReadChunk = 16384;
constexpr std::size_t kMaxIdentity = 1024;
constexpr std::size_t kLingerBytes = 65536;
constexpr auto kLinger = std::chrono::milliseconds(500);
}  // namespace

Status validate(const ServerConfig& c) {
  error_code ec;
  auto addr = asio::ip::make_address(c.address, ec);
  if (ec) return {Errc::invalid_argument, "server address is not an IP address: " + c.address};
  if (c.max_frame < 16 || c.max_frame > (1u << 24)) {
    return {Errc::invalid_argument, "max_frame must be between 16 bytes and 16 MiB"};
  }
  if (c.max_in_flight == 0 || c.max_in_flight > 4096) {
    return {Errc::invalid_argument, "max_in_flight must be between 1 and 4096"};
  }
  if (c.max_connections == 0 || c.max_connections > 1000000) {
    return {Errc::invalid_argument, "max_connections must be between 1 and 1000000"};
  }
  for (auto t : {c.handshake_timeout, c.idle_timeout, c.read_timeout, c.write_timeout,
                 c.request_timeout}) {
    if (t.count() <= 0) return {Errc::invalid_argument, "timeouts must be positive"};
  }
  if (c.io_threads == 0 || c.io_threads > 256 || c.worker_threads > 1024) {
    return {Errc::invalid_argument, "io_threads must be 1..256 and worker_threads 0..1024"};
  }
  if (c.backlog <= 0) return {Errc::invalid_argument, "backlog must be positive"};
  if (c.plain_tcp) {
    if (!addr.is_loopback() && !c.plain_tcp_remote) {
      return {Errc::invalid_argument,
              "plain TCP is only allowed on a loopback address (set plain_tcp_remote to "
              "override): " + c.address};
    }
  } else if (c.tls.ca_file.empty() || c.tls.cert_file.empty() || c.tls.key_file.empty()) {
    return {Errc::invalid_argument, "TLS needs ca_file, cert_file and key_file"};
  }
  return {};
}

Handler make_handler(BlockingHandler fn) {
  return [fn = std::move(fn)](const RequestContext& ctx, Bytes request, Done done) {
    done(fn(ctx, std::move(request)));
  };
}

namespace {

// Loads the TLS 1.3 server context: required, verified client certificates.
Result<std::unique_ptr<ssl::context>> make_tls_context(const TlsFiles& files) {
  auto ctx = std::make_unique<ssl::context>(ssl::context::tls_server);
  SSL_CTX* c = ctx->native_handle();
  if (SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION) != 1 ||
      SSL_CTX_set_max_proto_version(c, TLS1_3_VERSION) != 1) {
    return {Errc::crypto_failure, "TLS 1.3 is not available"};
  }
  // An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
  SSL_CTX_set_default_passwd_cb(c, [](char*, int, int, void*) { return 0; });
  SSL_CTX_set_num_tickets(c, 0);  // no resumption: every connection presents its certificate
  SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_verify_depth(c, 4);
  error_code ec;
  ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert, ec);
  if (!ec) ctx->load_verify_file(files.ca_file, ec);
  if (ec) return {Errc::invalid_argument, "cannot load CA file " + files.ca_file + ": " + ec.message()};
  if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(files.ca_file.c_str())) {
    SSL_CTX_set_client_CA_list(c, names);
  }
  ctx->use_certificate_chain_file(files.cert_file, ec);
  if (ec) {
    return {Errc::invalid_argument,
            "cannot load certificate " + files.cert_file + ": " + ec.message()};
  }
  ctx->use_private_key_file(files.key_file, ssl::context::pem, ec);
  if (ec || SSL_CTX_check_private_key(c) != 1) {
    // The message names the file only: never anything read from it.
    return {Errc::invalid_argument,
            "cannot load private key " + files.key_file + " or it does not match the certificate"};
  }
  return ctx;
}

std::string peer_subject(X509* cert) {
  std::string out;
  BIO* bio = BIO_new(BIO_s_mem());
  if (bio == nullptr) return out;
  if (X509_NAME_print_ex(bio, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
    char* data = nullptr;
    long n = BIO_get_mem_data(bio, &data);
    if (n > 0 && data != nullptr) {
      out.assign(data, std::min(static_cast<std::size_t>(n), kMaxIdentity));
    }
  }
  BIO_free(bio);
  return out;
}

std::string cert_sha256(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert, EVP_sha256(), md, &len) != 1) return {};
  return to_hex(ByteView(md, len));
}

std::string endpoint_text(const tcp::endpoint& ep) {
  auto a = ep.address();
  std::string s = a.is_v6() ? "[" + a.to_string() + "]" : a.to_string();
  return s + ":" + std::to_string(ep.port());
}

}  // namespace

namespace detail {
class ConnectionBase : public std::enable_shared_from_this<ConnectionBase> {
 public:
  virtual ~ConnectionBase() = default;
  virtual void begin_drain() = 0;  // on the strand
  virtual void close_now() = 0;    // on the strand
  virtual void complete(std::uint64_t seq, Bytes response) = 0;  // on the strand
  virtual Strand strand() const = 0;
};

}
using detail::ConnectionBase;

// --- server state -----------------------------------------------------------------------------

namespace detail {
struct ServerImpl {
  ServerConfig cfg;
  Handler handler;
  FrameErrorHook on_frame_error;
  std::unique_ptr<ssl::context> tls;  // null for plain TCP

  // Own counters, or the registry's when one is given.
  metrics::Counter own_accepted, own_refused, own_hs_failed, own_frames, own_timeouts,
      own_requests, own_responses, own_passed_out, own_passed_in;
  metrics::Counter* accepted = &own_accepted;
  metrics::Counter* refused = &own_refused;
  metrics::Counter* hs_failed = &own_hs_failed;
  metrics::Counter* frames_rejected = &own_frames;
  metrics::Counter* timeouts = &own_timeouts;
  metrics::Counter* requests = &own_requests;
  metrics::Counter* responses = &own_responses;
  metrics::Counter* passed_out = &own_passed_out;  // handed to another worker (cfg.balancer)
  metrics::Counter* passed_in = &own_passed_in;    // taken from another worker
  metrics::Histogram* latency = nullptr;

  std::atomic<std::uint64_t> open_conns{0};
  std::atomic<std::uint64_t> next_conn_id{1};
  std::atomic<bool> stopping{false};
  std::atomic<bool> io_stopped{false};
  std::mutex conns_mu;
  std::unordered_map<std::uint64_t, std::weak_ptr<ConnectionBase>> conns;

  // Declared after everything connections touch: io's destructor destroys pending handlers,
  // which may own the last reference to a connection.
  asio::io_context io;
  // Responses finished off the event loop (the handler pool, an audit writer's commit) reach
  // their connections in batches (hand_over, CompletionBatch): one post to the loop per batch,
  // then a strand post per response from inside the loop (a private queue: no lock, no wake).
  // A strand post from another thread takes the scheduler's lock and interrupts the loop's
  // epoll_wait; an SES audit commit releasing 30 responses made 30 of those (18-24 % of the
  // audit writer's CPU samples).
  // Declared after io: destroyed first, with the connections it may still hold.
  struct Completion {
    std::shared_ptr<ConnectionBase> conn;
    std::uint64_t seq;
    Bytes response;
  };
  std::mutex handover_mu;
  std::vector<Completion> handover;
  bool handover_posted = false;

  Strand accept_strand{asio::make_strand(io)};
  tcp::acceptor acceptor{accept_strand};
  std::optional<asio::posix::stream_descriptor> inbox;  // cfg.balancer's, on accept_strand
  bool v6 = false;  // the listener's address family (set by start)
  asio::steady_timer drain_timer{io};
  std::optional<asio::thread_pool> pool;
  std::function<void(std::function<void()>)> defer;  // RequestContext::defer
  std::vector<std::thread> threads;
  std::atomic<std::uint16_t> port{0};
  bool started = false;

  explicit ServerImpl(int hint) : io(hint) {}

  asio::awaitable<void> accept_loop();
  // Connections other workers passed to this one (cfg.balancer).
  asio::awaitable<void> inbox_loop();
  // A safety net under inbox_loop: takes what waits every 100 ms. Asio's reactor registers the
  // inbox edge-triggered and a readiness wait is never tried speculatively, so an edge that came
  // while no wait was queued would leave a passed connection unserved until the next pass.
  asio::awaitable<void> inbox_sweep();
  void drain_inbox();  // up to 64 passed connections
  void adopt(int fd);
  // Passes an accepted socket to worker `to` (cfg.balancer); false when it left this worker
  // (passed, or lost to an error), true when this worker serves it after all.
  bool pass_on(int to, tcp::socket& sock);
  void start_connection(tcp::socket sock);
  void connection_closed(std::uint64_t id);
  void check_drained();
  void shutdown(std::chrono::milliseconds drain);
  // From any thread: complete(seq, response) on the connection's strand.
  void hand_over(std::shared_ptr<ConnectionBase> conn, std::uint64_t seq, Bytes response);
  // Under handover_mu, push(handover) adds responses; the loop gets one post when none is pending.
  template <typename Push>
  void queue_for_loop(Push push) {
    bool post = false;
    {
      std::lock_guard lock(handover_mu);
      push(handover);
      post = !handover_posted;
      handover_posted = true;
    }
    if (post) asio::post(io, [this] { deliver_handed_over(); });
  }
  void deliver_handed_over();
};
}  // namespace detail

namespace {

struct Slot {
  Clock::time_point received;
  bool ready = false;
  bool close_after = false;  // close the connection after writing data
  Bytes data;
};

// Calls complete() on the connection's strand exactly once: with the response, or with an empty
// response (close) when the handler dropped Done without calling it.
struct DoneState {
  detail::ServerImpl* srv;
  std::shared_ptr<ConnectionBase> conn;
  std::uint64_t seq;
  std::atomic<bool> called{false};

  DoneState(detail::ServerImpl* s, std::shared_ptr<ConnectionBase> c, std::uint64_t q)
      : srv(s), conn(std::move(c)), seq(q) {}
  ~DoneState() {
    if (!called.load()) srv->hand_over(std::move(conn), seq, {});
  }
  void finish(Bytes response) {
    if (called.exchange(true)) return;
    srv->hand_over(conn, seq, std::move(response));
  }
};

template <typename Stream>
class Connection final : public ConnectionBase {
  static constexpr bool kTls = !std::is_same_v<Stream, tcp::socket>;

 public:
  Connection(detail::ServerImpl* srv, std::uint64_t id, Stream stream, Strand strand)
      : srv_(srv),
        stream_(std::move(stream)),
        strand_(std::move(strand)),
        watchdog_(strand_),
        reader_wake_(strand_),
        writer_wake_(strand_),
        framer_(srv->cfg.max_frame) {
    base_.connection_id = id;
    base_.defer = &srv_->defer;
  }

  Strand strand() const override { return strand_; }

  asio::awaitable<void> run() {
    auto self = shared_from_this();
    error_code ec;
    base_.peer = endpoint_text(lowest().remote_endpoint(ec));
    last_activity_ = Clock::now();
    asio::co_spawn(strand_, watchdog(), asio::detached);
    if constexpr (kTls) {
      handshaking_ = true;
      handshake_deadline_ = Clock::now() + srv_->cfg.handshake_timeout;
      poke();
      co_await stream_.async_handshake(ssl::stream_base::server,
                                       asio::redirect_error(asio::use_awaitable, ec));
      handshaking_ = false;
      X509* cert = ec ? nullptr : SSL_get0_peer_certificate(stream_.native_handle());
      if (ec || cert == nullptr || SSL_get_verify_result(stream_.native_handle()) != X509_V_OK) {
        srv_->hs_failed->inc();
        close_now();
        co_return;
      }
      base_.client_identity = peer_subject(cert);
      base_.client_cert_sha256 = cert_sha256(cert);
      if (base_.client_identity.empty()) {
        srv_->hs_failed->inc();
        close_now();
        co_return;
      }
    } else {
      auto ep = lowest().remote_endpoint(ec);
      base_.client_identity = "plain:" + (ec ? std::string("?") : ep.address().to_string());
    }
    if (closed_) co_return;
    asio::co_spawn(strand_, writer(), asio::detached);
    if (srv_->stopping.load()) begin_drain();
    co_await reader();
  }

  void begin_drain() override {
    if (closed_ || draining_) return;
    draining_ = true;
    if (handshaking_) {
      close_now();
      return;
    }
    // Wake a reader blocked on a read with EOF; writes still go out.
    error_code ec;
    if (reading_now_) lowest().shutdown(tcp::socket::shutdown_receive, ec);
    reader_wake_.cancel();
    writer_wake_.cancel();
  }

  void close_now() override {
    if (closed_) return;
    closed_ = true;
    // Counted as closed before the peer can see it.
    srv_->connection_closed(base_.connection_id);
    error_code ec;
    lowest().close(ec);
    watchdog_.cancel();
    reader_wake_.cancel();
    writer_wake_.cancel();
  }

  void complete(std::uint64_t seq, Bytes response) override {
    if (closed_ || seq < head_seq_ || seq - head_seq_ >= slots_.size()) return;
    Slot& s = slots_[seq - head_seq_];
    if (s.ready) return;
    s.ready = true;
    if (response.empty()) {
      s.close_after = true;
    } else {
      s.data = std::move(response);
    }
    if (seq == head_seq_) writer_wake_.cancel();
  }

 private:
  tcp::socket& lowest() {
    if constexpr (kTls) {
      return stream_.next_layer();
    } else {
      return stream_;
    }
  }

  static void wait_on(asio::steady_timer& t) { t.expires_at(kNever); }

  // The earliest instant at which the connection must be closed, given its state.
  Clock::time_point deadline() const {
    if (closed_) return kNever;
    if (handshaking_) return handshake_deadline_;
    Clock::time_point d = kNever;
    const auto& c = srv_->cfg;
    if (reading_now_) {
      if (framer_.buffered() > 0) {
        d = std::min(d, partial_since_ + c.read_timeout);
      } else if (slots_.empty()) {
        d = std::min(d, last_activity_ + c.idle_timeout);
      }
    }
    if (writing_) d = std::min(d, write_started_ + c.write_timeout);
    if (!slots_.empty() && !slots_.front().ready) {
      d = std::min(d, slots_.front().received + c.request_timeout);
    }
    if (lingering_) d = std::min(d, linger_until_);
    return d;
  }

  // Re-arms the watchdog when the deadline moved earlier than its current expiry.
  void poke() {
    if (deadline() < armed_at_) watchdog_.cancel();
  }

  asio::awaitable<void> watchdog() {
    auto self = shared_from_this();
    error_code ec;
    while (!closed_) {
      auto d = deadline();
      if (d <= Clock::now()) {
        if (!lingering_) srv_->timeouts->inc();
        close_now();
        break;
      }
      armed_at_ = d;
      watchdog_.expires_at(d);
      co_await watchdog_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      armed_at_ = kNever;
    }
  }

  void dispatch(Bytes request) {
    auto now = Clock::now();
    std::uint64_t seq = next_seq_++;
    slots_.push_back(Slot{now, false, false, {}});
    srv_->requests->inc();
    RequestContext ctx = base_;
    ctx.sequence = seq;
    ctx.received = now;
    auto st = std::make_shared<DoneState>(srv_, shared_from_this(), seq);
    Done done = [st](Bytes r) { st->finish(std::move(r)); };
    if (srv_->pool) {
      asio::post(*srv_->pool, [h = &srv_->handler, ctx = std::move(ctx), req = std::move(request),
                               done = std::move(done)]() mutable {
        // asio::thread_pool makes its threads itself: each names itself on its first request.
        static thread_local const bool named = (name_this_thread("gs-handler"), true);
        (void)named;
        try {
          (*h)(ctx, std::move(req), std::move(done));
        } catch (...) {
          // A throwing handler abandons Done: the connection is closed, the process lives.
        }
      });
    } else {
      try {
        srv_->handler(ctx, std::move(request), std::move(done));
      } catch (...) {
      }
    }
    poke();
  }

  void frame_error(const Error& err) {
    srv_->frames_rejected->inc();
    RequestContext ctx = base_;
    ctx.sequence = next_seq_;
    ctx.received = Clock::now();
    std::optional<Bytes> reply;
    if (srv_->on_frame_error) {
      try {
        reply = srv_->on_frame_error(ctx, err);
      } catch (...) {
      }
    }
    Slot s{ctx.received, true, true, {}};
    if (reply) s.data = std::move(*reply);
    ++next_seq_;
    slots_.push_back(std::move(s));
    writer_wake_.cancel();
  }

  asio::awaitable<void> reader() {
    auto self = shared_from_this();
    std::vector<std::uint8_t> buf(kReadChunk);
    error_code ec;
    const auto& c = srv_->cfg;
    while (!closed_ && !draining_) {
      // Hand out every complete frame, waiting for room when the pipeline is full.
      bool progressed = false;
      for (;;) {
        while (slots_.size() >= c.max_in_flight && !closed_ && !draining_) {
          wait_on(reader_wake_);
          co_await reader_wake_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        }
        if (closed_ || draining_) break;
        auto r = framer_.next();
        if (!r.ok()) {
          frame_error(r.error());
          reading_done_ = true;
          break;
        }
        if (!r->has_value()) break;
        progressed = true;
        dispatch(std::move(**r));
      }
      if (closed_ || draining_ || reading_done_) break;
      auto now = Clock::now();
      if (framer_.buffered() == 0) {
        partial_since_ = kNever;
      } else if (progressed || partial_since_ == kNever) {
        partial_since_ = now;
      }
      reading_now_ = true;
      poke();
      std::size_t n = co_await stream_.async_read_some(
          asio::buffer(buf), asio::redirect_error(asio::use_awaitable, ec));
      reading_now_ = false;
      if (ec || closed_) break;  // EOF (client done sending), drain, reset: stop reading
      last_activity_ = Clock::now();
      framer_.feed(ByteView(buf.data(), n));
    }
    reading_done_ = true;
    reader_exited_ = true;
    if (!closed_ && ec && ec != asio::error::eof && !draining_ &&
        ec != ssl::error::stream_truncated) {
      close_now();  // a broken connection: nothing can be written either
      co_return;
    }
    writer_wake_.cancel();
  }

  asio::awaitable<void> writer() {
    auto self = shared_from_this();
    error_code ec;
    std::vector<Bytes> batch;
    std::vector<asio::const_buffer> bufs;
    std::vector<Clock::time_point> received;
    for (;;) {
      while (!closed_ && (slots_.empty() || !slots_.front().ready) &&
             !(slots_.empty() && (reading_done_ || draining_))) {
        wait_on(writer_wake_);
        co_await writer_wake_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      }
      if (closed_) co_return;
      if (slots_.empty()) break;  // reading stopped and everything answered
      bool close_after = false;
      batch.clear();
      received.clear();
      while (!slots_.empty() && slots_.front().ready) {
        Slot s = std::move(slots_.front());
        slots_.pop_front();
        ++head_seq_;
        if (!s.data.empty()) {
          batch.push_back(std::move(s.data));
          received.push_back(s.received);
        }
        if (s.close_after) {
          close_after = true;
          break;
        }
      }
      reader_wake_.cancel();
      if (!batch.empty()) {
        bufs.clear();
        for (const auto& b : batch) bufs.emplace_back(asio::buffer(b));
        writing_ = true;
        write_started_ = Clock::now();
        poke();
        co_await asio::async_write(stream_, bufs, asio::redirect_error(asio::use_awaitable, ec));
        writing_ = false;
        if (closed_) co_return;
        if (ec) {
          close_now();
          co_return;
        }
        auto now = Clock::now();
        last_activity_ = now;
        srv_->responses->inc(batch.size());
        if (srv_->latency != nullptr) {
          for (auto t : received) srv_->latency->observe(now - t);
        }
      }
      if (close_after) break;
    }
    co_await graceful_close();
  }

  // Sends FIN after the last response, then reads and discards what the client still sends
  // for a moment, so that closing does not reset the connection before it read our reply.
  asio::awaitable<void> graceful_close() {
    error_code ec;
    reading_done_ = true;
    lowest().shutdown(tcp::socket::shutdown_send, ec);
    if (!reader_exited_ || ec) {
      close_now();
      co_return;
    }
    lingering_ = true;
    linger_until_ = Clock::now() + std::min<Clock::duration>(kLinger, srv_->cfg.write_timeout);
    poke();
    std::vector<std::uint8_t> sink(4096);
    std::size_t total = 0;
    while (!closed_ && total < kLingerBytes) {
      std::size_t n = co_await lowest().async_read_some(
          asio::buffer(sink), asio::redirect_error(asio::use_awaitable, ec));
      if (ec) break;
      total += n;
    }
    close_now();
  }

  detail::ServerImpl* srv_;
  Stream stream_;
  Strand strand_;
  asio::steady_timer watchdog_;
  asio::steady_timer reader_wake_;
  asio::steady_timer writer_wake_;
  c1222::Framer framer_;
  RequestContext base_;
  std::deque<Slot> slots_;
  std::uint64_t head_seq_ = 0;  // sequence of slots_.front()
  std::uint64_t next_seq_ = 0;
  bool closed_ = false;
  bool draining_ = false;
  bool handshaking_ = false;
  bool reading_now_ = false;
  bool reading_done_ = false;
  bool reader_exited_ = false;
  bool writing_ = false;
  bool lingering_ = false;
  Clock::time_point handshake_deadline_ = kNever;
  Clock::time_point last_activity_{};
  Clock::time_point partial_since_ = kNever;
  Clock::time_point write_started_{};
  Clock::time_point linger_until_ = kNever;
  Clock::time_point armed_at_ = kNever;
};

}  // namespace

// --- detail::ServerImpl -----------------------------------------------------------------------------

asio::awaitable<void> detail::ServerImpl::accept_loop() {
  for (;;) {
    tcp::socket sock(asio::make_strand(io));
    error_code ec;
    co_await acceptor.async_accept(sock, asio::redirect_error(asio::use_awaitable, ec));
    if (stopping.load() || !acceptor.is_open()) co_return;
    if (ec) {
      // Out of descriptors or a connection reset before accept: back off instead of spinning.
      asio::steady_timer t(accept_strand, std::chrono::milliseconds(20));
      co_await t.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      continue;
    }
    // A worker with more connections than another passes the socket on before the handshake.
    if (cfg.balancer) {
      const int to = cfg.balancer->choose();
      if (to >= 0 && !pass_on(to, sock)) continue;
    }
    if (open_conns.load() >= cfg.max_connections) {
      refused->inc();
      sock.close(ec);
      continue;
    }
    start_connection(std::move(sock));
  }
}

bool detail::ServerImpl::pass_on(int to, tcp::socket& sock) {
  // Out of this loop's epoll, explicitly (release): the receiver's copy shares the open file,
  // and the kernel drops an epoll registration by itself only when the open file goes, so a
  // registration left here would wake this loop for every byte the receiver gets (test
  // SesdSupervisor.ConnectionsAreSpreadEvenlyOverTheWorkers looks for one).
  error_code ec;
  const int fd = sock.release(ec);
  if (ec || fd < 0) {  // still registered here: serve it
    cfg.balancer->withdraw(to);
    return true;
  }
  if (cfg.balancer->pass(to, fd)) {
    passed_out->inc();
    ::close(fd);
    return false;
  }
  sock.assign(v6 ? tcp::v6() : tcp::v4(), fd, ec);
  if (ec) {
    ::close(fd);
    return false;
  }
  return true;
}

asio::awaitable<void> detail::ServerImpl::inbox_loop() {
  for (;;) {
    error_code ec;
    co_await inbox->async_wait(asio::posix::descriptor_base::wait_read,
                               asio::redirect_error(asio::use_awaitable, ec));
    if (stopping.load() || !inbox->is_open()) co_return;
    if (ec) {
      asio::steady_timer t(accept_strand, std::chrono::milliseconds(20));
      co_await t.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      continue;
    }
    drain_inbox();
  }
}

asio::awaitable<void> detail::ServerImpl::inbox_sweep() {
  asio::steady_timer t(accept_strand);
  while (!stopping.load()) {
    t.expires_after(std::chrono::milliseconds(100));
    error_code ec;
    co_await t.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (stopping.load() || !inbox || !inbox->is_open()) co_return;
    drain_inbox();
  }
}

void detail::ServerImpl::drain_inbox() {
  for (int n = 0; n < 64; ++n) {
    const int fd = cfg.balancer->take();
    if (fd < 0) break;
    adopt(fd);
  }
}

void detail::ServerImpl::adopt(int fd) {
  // Only a connected TCP socket of the listener's address family is served.
  int type = 0, domain = 0, listening = 1;
  socklen_t len = sizeof(int);
  bool ok = ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
  len = sizeof(int);
  ok = ok && ::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 &&
       domain == (v6 ? AF_INET6 : AF_INET);
  len = sizeof(int);
  ok = ok && ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening == 0;
  tcp::socket sock(asio::make_strand(io));
  error_code ec;
  if (ok) sock.assign(v6 ? tcp::v6() : tcp::v4(), fd, ec);
  if (!ok || ec) {
    ::close(fd);
    return;
  }
  passed_in->inc();
  if (open_conns.load() >= cfg.max_connections) {
    refused->inc();
    sock.close(ec);
    return;
  }
  start_connection(std::move(sock));
}

void detail::ServerImpl::start_connection(tcp::socket sock) {
  error_code ec;
  sock.set_option(tcp::no_delay(true), ec);
  accepted->inc();
  open_conns.fetch_add(1);
  if (cfg.balancer) cfg.balancer->opened();
  std::uint64_t id = next_conn_id.fetch_add(1);
  Strand strand = *sock.get_executor().target<Strand>();
  std::shared_ptr<ConnectionBase> conn;
  if (tls) {
    auto c = std::make_shared<Connection<ssl::stream<tcp::socket>>>(
        this, id, ssl::stream<tcp::socket>(std::move(sock), *tls), strand);
    asio::co_spawn(strand, c->run(), asio::detached);
    conn = c;
  } else {
    auto c = std::make_shared<Connection<tcp::socket>>(this, id, std::move(sock), strand);
    asio::co_spawn(strand, c->run(), asio::detached);
    conn = c;
  }
  std::lock_guard lock(conns_mu);
  conns.emplace(id, conn);
}

void detail::ServerImpl::connection_closed(std::uint64_t id) {
  {
    std::lock_guard lock(conns_mu);
    conns.erase(id);
  }
  open_conns.fetch_sub(1);
  if (cfg.balancer) cfg.balancer->closed();
  if (stopping.load()) check_drained();
}

namespace {
// The thread's open CompletionBatch: its responses, with the server each goes to.
struct ThreadBatch {
  int depth = 0;
  std::vector<std::pair<detail::ServerImpl*, detail::ServerImpl::Completion>> items;
};
thread_local ThreadBatch t_batch;
}  // namespace

CompletionBatch::CompletionBatch() { ++t_batch.depth; }

CompletionBatch::~CompletionBatch() {
  if (--t_batch.depth > 0 || t_batch.items.empty()) return;
  auto items = std::move(t_batch.items);
  t_batch.items.clear();
  // Almost always one server per process; handed over per run of the same server.
  std::size_t i = 0;
  while (i < items.size()) {
    detail::ServerImpl* srv = items[i].first;
    srv->queue_for_loop([&](std::vector<detail::ServerImpl::Completion>& q) {
      for (; i < items.size() && items[i].first == srv; ++i) q.push_back(std::move(items[i].second));
    });
  }
}

void run_batched(const std::function<void()>& run) {
  CompletionBatch batch;
  run();
}

void detail::ServerImpl::hand_over(std::shared_ptr<ConnectionBase> conn, std::uint64_t seq,
                                   Bytes response) {
  if (t_batch.depth > 0) {
    t_batch.items.emplace_back(this, Completion{std::move(conn), seq, std::move(response)});
    return;
  }
  queue_for_loop([&](std::vector<Completion>& q) {
    q.push_back(Completion{std::move(conn), seq, std::move(response)});
  });
}

void detail::ServerImpl::deliver_handed_over() {
  std::vector<Completion> batch;
  {
    std::lock_guard lock(handover_mu);
    batch.swap(handover);
    handover_posted = false;
  }
  for (auto& c : batch) {
    Strand strand = c.conn->strand();
    asio::post(strand, [c = std::move(c)]() mutable { c.conn->complete(c.seq, std::move(c.response)); });
  }
}

void detail::ServerImpl::check_drained() {
  if (open_conns.load() == 0 && !io_stopped.exchange(true)) {
    asio::post(io, [this] { io.stop(); });
  }
}

void detail::ServerImpl::shutdown(std::chrono::milliseconds drain) {
  if (stopping.exchange(true)) return;
  if (!started) return;
  if (cfg.balancer) cfg.balancer->set_serving(false);
  asio::post(accept_strand, [this] {
    error_code ec;
    acceptor.close(ec);
    if (inbox) inbox->close(ec);
  });
  asio::post(io, [this, drain] {
    std::vector<std::shared_ptr<ConnectionBase>> live;
    {
      std::lock_guard lock(conns_mu);
      for (auto& [id, w] : conns) {
        if (auto c = w.lock()) live.push_back(std::move(c));
      }
    }
    for (auto& c : live) asio::post(c->strand(), [c] { c->begin_drain(); });
    drain_timer.expires_after(drain);
    drain_timer.async_wait([this](error_code ec) {
      if (ec) return;
      std::vector<std::shared_ptr<ConnectionBase>> rest;
      {
        std::lock_guard lock(conns_mu);
        for (auto& [id, w] : conns) {
          if (auto c = w.lock()) rest.push_back(std::move(c));
        }
      }
      for (auto& c : rest) asio::post(c->strand(), [c] { c->close_now(); });
      // Whatever still holds a connection then, stop anyway shortly after.
      drain_timer.expires_after(std::chrono::seconds(1));
      drain_timer.async_wait([this](error_code e) {
        if (!e && !io_stopped.exchange(true)) io.stop();
      });
    });
    check_drained();
  });
}

// --- Server -----------------------------------------------------------------------------------

Server::Server(std::unique_ptr<detail::ServerImpl> impl) : impl_(std::move(impl)) {}

Server::~Server() {
  if (impl_) stop(std::chrono::milliseconds(0));
}

Result<std::unique_ptr<Server>> Server::create(ServerConfig config, Handler handler,
                                               FrameErrorHook on_frame_error,
                                               metrics::Registry* metrics) {
  GS_TRY(validate(config));
  if (!handler) return {Errc::invalid_argument, "server needs a handler"};
  auto impl = std::make_unique<detail::ServerImpl>(static_cast<int>(config.io_threads));
  if (!config.plain_tcp) {
    GS_ASSIGN(impl->tls, make_tls_context(config.tls));
  }
  impl->cfg = std::move(config);
  impl->handler = std::move(handler);
  impl->on_frame_error = std::move(on_frame_error);
  if (metrics != nullptr) {
    const std::string conns = "gridseal_server_connections_total";
    const std::string conns_help = "Connections by outcome of accept and handshake";
    impl->accepted = &metrics->counter(conns, conns_help, {{"result", "accepted"}});
    impl->refused = &metrics->counter(conns, conns_help, {{"result", "refused_limit"}});
    impl->hs_failed = &metrics->counter(conns, conns_help, {{"result", "handshake_failed"}});
    impl->frames_rejected = &metrics->counter("gridseal_server_frames_rejected_total",
                                              "Connections closed for an unframeable stream");
    impl->timeouts = &metrics->counter("gridseal_server_timeouts_total",
                                       "Connections closed by a handshake/idle/read/write/request timeout");
    impl->requests = &metrics->counter("gridseal_server_requests_total", "Framed requests received");
    impl->responses = &metrics->counter("gridseal_server_responses_total", "Responses written");
    const std::string passed = "gridseal_server_connections_passed_total";
    const std::string passed_help =
        "Connections passed to another worker process (out) or taken from one (in) to even out "
        "the workers' connection counts";
    impl->passed_out = &metrics->counter(passed, passed_help, {{"direction", "out"}});
    impl->passed_in = &metrics->counter(passed, passed_help, {{"direction", "in"}});
    impl->latency = &metrics->histogram("gridseal_server_request_seconds",
                                        "From a whole request read to its response written",
                                        metrics::latency_buckets());
    detail::ServerImpl* raw = impl.get();
    metrics->gauge_fn("gridseal_server_connections_active", "Open connections", {},
                      [raw] { return static_cast<double>(raw->open_conns.load()); });
  }
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Status Server::start() {
  detail::ServerImpl& s = *impl_;
  if (s.started) return {Errc::invalid_argument, "server already started"};
  if (s.stopping.load()) return {Errc::invalid_argument, "server was stopped"};
  error_code ec;
  tcp::endpoint ep(asio::ip::make_address(s.cfg.address, ec), s.cfg.port);
  if (ec) return {Errc::invalid_argument, "bad server address: " + s.cfg.address};
  s.acceptor.open(ep.protocol(), ec);
  if (!ec) s.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec && s.cfg.reuse_port) s.acceptor.set_option(ReusePort(true), ec);
  if (!ec) s.acceptor.bind(ep, ec);
  if (!ec) s.acceptor.listen(s.cfg.backlog, ec);
  if (ec) {
    error_code ignored;
    s.acceptor.close(ignored);
    return {Errc::invalid_argument, "cannot listen on " + s.cfg.address + ":" +
                                        std::to_string(s.cfg.port) + ": " + ec.message()};
  }
  s.port = s.acceptor.local_endpoint(ec).port();
  s.v6 = ep.protocol() == tcp::v6();
  if (s.cfg.worker_threads > 0) s.pool.emplace(s.cfg.worker_threads);
  s.defer = [impl = &s](std::function<void()> fn) {
    if (impl->pool) {
      asio::post(*impl->pool, std::move(fn));
    } else {
      asio::post(impl->io, std::move(fn));
    }
  };
  if (s.cfg.balancer) {
    const int fd = ::dup(s.cfg.balancer->inbox_fd());  // the inherited one stays open
    if (fd < 0) {
      error_code ignored;
      s.acceptor.close(ignored);
      return {Errc::os_failure, "connection inbox: " + std::string(std::strerror(errno))};
    }
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    s.inbox.emplace(s.accept_strand, fd);
    asio::co_spawn(s.accept_strand, s.inbox_loop(), asio::detached);
    asio::co_spawn(s.accept_strand, s.inbox_sweep(), asio::detached);
  }
  asio::co_spawn(s.accept_strand, s.accept_loop(), asio::detached);
  s.started = true;
  for (std::size_t i = 0; i < s.cfg.io_threads; ++i) {
    s.threads.emplace_back([&s] {
      name_this_thread("gs-io");
      if (s.cfg.sched_batch && !use_batch_scheduling()) {
        std::fprintf(stderr, "gridseal: server.sched_batch: SCHED_BATCH refused; default policy\n");
      }
      s.io.run();
    });
  }
  if (s.cfg.balancer) s.cfg.balancer->set_serving(true);
  return {};
}

std::uint16_t Server::port() const noexcept { return impl_->port.load(); }

void Server::shutdown(std::chrono::milliseconds drain) { impl_->shutdown(drain); }

void Server::wait() {
  detail::ServerImpl& s = *impl_;
  for (auto& t : s.threads) {
    if (t.joinable()) t.join();
  }
  s.threads.clear();
  if (s.pool) s.pool->join();
}

void Server::stop(std::chrono::milliseconds drain) {
  shutdown(drain);
  wait();
}

ServerStats Server::stats() const noexcept {
  const detail::ServerImpl& s = *impl_;
  ServerStats st;
  st.connections_active = s.open_conns.load();
  st.connections_accepted = s.accepted->value();
  st.connections_refused = s.refused->value();
  st.handshakes_failed = s.hs_failed->value();
  st.frames_rejected = s.frames_rejected->value();
  st.timeouts = s.timeouts->value();
  st.requests = s.requests->value();
  st.responses = s.responses->value();
  return st;
}

void log_refusal(const char* program, const RequestContext& ctx, const std::string& meter,
                 const char* code_name, const std::string& reason) {
  std::fprintf(stderr, "%s: refused client=\"%s\" peer=%s meter=%s code=%s: %s\n", program,
               ctx.client_identity.c_str(), ctx.peer.c_str(), meter.c_str(), code_name,
               reason.c_str());
}

}  // namespace gs::server
