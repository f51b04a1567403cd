// gridseal-bench load engine (see load.h): Boost.Asio, one io_context per generator thread, each
// connection owned by one thread; no locks on the request path.
#include <utility>  // before Asio (Boost 1.81 + GCC 12)

#include "tools/bench/load.h"

#include <openssl/ssl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <cmath>
#include <cstdio>
#include <deque>
#include <memory>
#include <optional>
#include <thread>

#include "c1222/services.h"
#include "tools/bench/args.h"

namespace gs::bench {

namespace {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

constexpr std::size_t kMaxPending = 1'000'000;  // open loop: requests queued in the generator

// Shared by every thread; written by the coordinator before "go", read-only afterwards (except
// the atomics).
struct Shared {
  const LoadOptions* opt = nullptr;
  ssl::context* tls = nullptr;
  tcp::endpoint endpoint;
  std::atomic<std::size_t> connected{0};
  std::atomic<std::size_t> failed{0};
  std::atomic<std::uint64_t> ok{0};      // every ok response (progress)
  std::atomic<std::uint64_t> errors{0};  // every error response (progress)
  std::atomic<std::int64_t> in_flight{0};
  std::atomic<std::size_t> ran_out{0};     // connections with no more requests
  std::atomic<std::size_t> lost_conns{0};  // connections lost before they ran out
  std::atomic<bool> stop_sending{false};
  Clock::time_point start, count_from, end;
  // Open loop with a closed-loop warm-up: no request is added to the closed loop from here on,
  // so that what it left in flight is answered before the paced, measured requests are due
  // (otherwise the first of them queue behind up to connections x depth warm-up requests).
  Clock::time_point refill_until;
};

// Per generator thread; touched only by that thread until it is joined.
struct ThreadStats {
  std::uint64_t ok = 0, answered = 0, sent = 0, late = 0, lost = 0, conn_errors = 0;
  std::uint64_t exhausted = 0;
  std::map<int, std::uint64_t> errors;
  std::vector<std::uint64_t> latency_ns;
  std::vector<std::pair<double, double>> log;  // LoadOptions::latency_log: (sent s, latency ms)
};

class Conn : public std::enable_shared_from_this<Conn> {
 public:
  Conn(asio::io_context& io, Shared& sh, ThreadStats& st, std::size_t index)
      : sh_(sh), st_(st), index_(index), timer_(io), pace_(io) {
    if (sh_.tls != nullptr) {
      tls_.emplace(io, *sh_.tls);
    } else {
      plain_.emplace(io);
    }
  }

  void open() {
    auto self = shared_from_this();
    timer_.expires_after(sh_.opt->connect_timeout);
    timer_.async_wait([self](error_code ec) {
      if (!ec && !self->ready_) {
        error_code ignore;
        self->lowest().close(ignore);
      }
    });
    lowest().async_connect(sh_.endpoint, [self](error_code ec) {
      if (ec) return self->connect_failed();
      error_code ignore;
      self->lowest().set_option(tcp::no_delay(true), ignore);
      if (!self->tls_) return self->connected();
      self->tls_->async_handshake(ssl::stream_base::client, [self](error_code hec) {
        if (hec) return self->connect_failed();
        self->connected();
      });
    });
  }

  // Starts sending (on this connection's thread).
  void go() {
    if (dead_) return;
    const double rate = sh_.opt->rate;
    if (rate <= 0 || closed_phase()) {
      const auto now = Clock::now();
      for (std::size_t i = 0; i < sh_.opt->depth; ++i) pending_.push_back(now);
      maybe_write();
      if (rate <= 0) return;
      // Closed-loop warm-up: pacing starts with the measured part.
      auto self = shared_from_this();
      pace_.expires_at(sh_.count_from);
      pace_.async_wait([self](error_code ec) {
        if (!ec) self->start_pacing(self->sh_.count_from);
      });
      return;
    }
    start_pacing(sh_.start);
  }

  // Each connection offers rate / C from `from`, staggered so that the sends spread evenly.
  void start_pacing(Clock::time_point from) {
    if (dead_ || exhausted_) return;
    pending_.clear();  // warm-up requests not yet written: dropped
    const double per_conn = sh_.opt->rate / static_cast<double>(sh_.opt->connections);
    interval_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(1.0 / per_conn));
    next_due_ = from + interval_ * static_cast<long>(index_) / static_cast<long>(sh_.opt->connections);
    pacing_ = true;
    if (sh_.opt->pace_tick.count() == 0) tick();  // else the thread's pacer calls pace()
  }

  // Queues what is due by `now` and writes it (called by the thread's pacer, or by this
  // connection's own timer with no pace tick); false once the connection no longer paces.
  bool pace(Clock::time_point now) {
    if (!pacing_ || dead_ || exhausted_ || sh_.stop_sending.load(std::memory_order_relaxed)) {
      return false;
    }
    queue_due(now);
    maybe_write();
    return true;
  }

  // True while an open-loop run's warm-up runs closed loop.
  bool closed_phase() const {
    return sh_.opt->rate > 0 && sh_.opt->closed_warmup && Clock::now() < sh_.count_from;
  }
  // True while that closed loop is still refilled (see Shared::refill_until).
  bool refilling_warmup() const {
    return sh_.opt->rate > 0 && sh_.opt->closed_warmup && Clock::now() < sh_.refill_until;
  }

  // Stops offering new requests (those in flight are still read).
  void stop_sending() {
    pacing_ = false;
    pending_.clear();
    pace_.cancel();
  }

  void close() {
    dead_ = true;
    pacing_ = false;
    error_code ignore;
    timer_.cancel();
    pace_.cancel();
    lowest().close(ignore);
  }

 private:
  tcp::socket::lowest_layer_type& lowest() {
    return tls_ ? tls_->lowest_layer() : plain_->lowest_layer();
  }

  void connect_failed() {
    dead_ = true;
    timer_.cancel();
    ++sh_.failed;
  }

  void connected() {
    ready_ = true;
    timer_.cancel();
    ++sh_.connected;
    read();
  }

  void tick() {
    if (!pace(Clock::now())) return;
    auto self = shared_from_this();
    pace_.expires_at(next_due_);
    pace_.async_wait([self](error_code ec) {
      if (!ec) self->tick();
    });
  }

  // Open loop: every request due by `now` joins the queue with its intended send time.
  void queue_due(Clock::time_point now) {
    while (next_due_ <= now) {
      if (pending_.size() < kMaxPending) pending_.push_back(next_due_);
      next_due_ += interval_;
    }
  }

  void maybe_write() {
    if (writing_ || dead_ || pending_.empty() || in_flight_.size() >= sh_.opt->depth) return;
    wbuf_.clear();
    const auto now = Clock::now();
    std::size_t n = 0;
    while (!pending_.empty() && in_flight_.size() < sh_.opt->depth) {
      Bytes built;
      ByteView req;
      if (sh_.opt->request_view) {
        req = sh_.opt->request_view(index_, seq_);
      } else {
        built = sh_.opt->make_request(index_, seq_);
        req = built;
      }
      if (req.empty()) {
        run_out();
        break;
      }
      wbuf_.insert(wbuf_.end(), req.begin(), req.end());
      const auto intended = pending_.front();
      pending_.pop_front();
      if (now - intended > late_after_) ++st_.late;
      in_flight_.push_back(Sent{intended, seq_++});
      ++n;
    }
    if (n == 0) return;
    st_.sent += n;
    sh_.in_flight.fetch_add(static_cast<std::int64_t>(n), std::memory_order_relaxed);
    writing_ = true;
    auto self = shared_from_this();
    auto done = [self](error_code ec, std::size_t) {
      self->writing_ = false;
      if (ec) return self->fail();
      self->maybe_write();
    };
    if (tls_) {
      asio::async_write(*tls_, asio::buffer(wbuf_), done);
    } else {
      asio::async_write(*plain_, asio::buffer(wbuf_), done);
    }
  }

  void read() {
    if (dead_) return;
    auto self = shared_from_this();
    auto done = [self](error_code ec, std::size_t n) {
      if (ec) return self->fail();
      self->rx_.insert(self->rx_.end(), self->chunk_.begin(),
                       self->chunk_.begin() + static_cast<std::ptrdiff_t>(n));
      if (!self->consume()) return self->fail();
      self->maybe_write();
      self->read();
    };
    if (tls_) {
      tls_->async_read_some(asio::buffer(chunk_), done);
    } else {
      plain_->async_read_some(asio::buffer(chunk_), done);
    }
  }

  // Handles every whole frame in rx_; false when the stream does not frame.
  bool consume() {
    std::size_t off = 0;
    for (;;) {
      const std::size_t avail = rx_.size() - off;
      if (avail < 2) break;
      const std::uint8_t* p = rx_.data() + off;
      if (p[0] != 0x60) return false;
      std::size_t hdr = 2, len = p[1];
      if (len & 0x80) {
        const std::size_t octets = len & 0x7F;
        if (octets == 0 || octets > 3) return false;
        if (avail < 2 + octets) break;
        len = 0;
        for (std::size_t i = 0; i < octets; ++i) len = (len << 8) | p[2 + i];
        hdr = 2 + octets;
      }
      if (hdr + len > (1U << 20)) return false;
      if (avail < hdr + len) break;
      if (!on_frame(ByteView(p, hdr + len))) return false;
      off += hdr + len;
    }
    rx_.erase(rx_.begin(), rx_.begin() + static_cast<std::ptrdiff_t>(off));
    return true;
  }

  bool on_frame(ByteView frame) {
    if (in_flight_.empty()) return false;  // an answer to nothing
    const auto now = Clock::now();
    const Sent sent = in_flight_.front();
    const auto intended = sent.intended;
    in_flight_.pop_front();
    sh_.in_flight.fetch_sub(1, std::memory_order_relaxed);
    const Verdict v = sh_.opt->judge_request ? sh_.opt->judge_request(index_, sent.seq, frame)
                                             : sh_.opt->judge(frame);
    if (v == kVerdictOk) {
      sh_.ok.fetch_add(1, std::memory_order_relaxed);
    } else {
      sh_.errors.fetch_add(1, std::memory_order_relaxed);
    }
    // Counted: answered in the measured part; with a closed-loop warm-up, also due in it.
    if (now >= sh_.count_from && now <= sh_.end &&
        (!sh_.opt->closed_warmup || sh_.opt->rate <= 0 || intended >= sh_.count_from)) {
      ++st_.answered;
      st_.latency_ns.push_back(static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(now - intended).count()));
      if (!sh_.opt->latency_log.empty()) {
        st_.log.emplace_back(std::chrono::duration<double>(intended - sh_.count_from).count(),
                             std::chrono::duration<double, std::milli>(now - intended).count());
      }
      if (v == kVerdictOk) {
        ++st_.ok;
      } else {
        ++st_.errors[v];
      }
    }
    if ((sh_.opt->rate <= 0 || refilling_warmup()) && !exhausted_ &&
        !sh_.stop_sending.load(std::memory_order_relaxed)) {
      pending_.push_back(now);
    }
    return true;
  }

  // The scenario has no more requests for this connection: stop offering (those in flight are
  // still read). Counted when it happens before the end of the run.
  void run_out() {
    if (!exhausted_) {
      ++sh_.ran_out;
      if (!sh_.opt->until_done && !sh_.stop_sending.load(std::memory_order_relaxed)) {
        ++st_.exhausted;
      }
    }
    exhausted_ = true;
    pacing_ = false;
    pending_.clear();
    pace_.cancel();
  }

  void fail() {
    if (dead_) return;
    // A connection with nothing in flight and nothing left to send that the server closes (its
    // idle timeout, e.g. between a warm-up pass and the end of the run) ended cleanly.
    const bool idle_close = in_flight_.empty() && exhausted_;
    if (!sh_.stop_sending.load() && !idle_close) ++st_.conn_errors;
    if (!exhausted_) ++sh_.lost_conns;
    st_.lost += in_flight_.size();
    sh_.in_flight.fetch_sub(static_cast<std::int64_t>(in_flight_.size()));
    in_flight_.clear();
    pending_.clear();
    close();
  }

  Shared& sh_;
  ThreadStats& st_;
  std::size_t index_;
  std::optional<ssl::stream<tcp::socket>> tls_;
  std::optional<tcp::socket> plain_;
  asio::steady_timer timer_;  // connect timeout
  asio::steady_timer pace_;   // open-loop pacing
  struct Sent {
    Clock::time_point intended;  // intended send time
    std::uint64_t seq;           // request number on this connection
  };
  bool ready_ = false, dead_ = false, writing_ = false, exhausted_ = false;
  bool pacing_ = false;  // open loop, measured part: requests fall due
  // A request written later than this after its intended time counts as late (the generator
  // or the connection's depth held it back), beyond the pace tick's own delay.
  Clock::duration late_after_ = sh_.opt->pace_tick + std::chrono::milliseconds(1);
  std::uint64_t seq_ = 0;
  std::deque<Clock::time_point> pending_;  // intended send times not yet written
  std::deque<Sent> in_flight_;             // unanswered requests, in order
  Clock::duration interval_{};
  Clock::time_point next_due_{};
  Bytes wbuf_, rx_;
  std::array<std::uint8_t, 16384> chunk_{};
};

struct Worker {
  asio::io_context io{1};
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
  std::vector<std::shared_ptr<Conn>> conns;
  ThreadStats stats;
  std::thread thread;
  asio::steady_timer pacer{io};  // LoadOptions::pace_tick
  Clock::time_point next_tick{};
};

// Open loop with a pace tick: one timer per generator thread wakes every tick and lets each of
// its connections send what fell due, instead of one timer expiry (and one thread wake-up) per
// request. Ends with the sending (Shared::stop_sending) or when cancelled.
void pace_worker(Worker& w, const Shared& sh) {
  if (sh.stop_sending.load(std::memory_order_relaxed)) return;
  const auto now = Clock::now();
  for (auto& c : w.conns) c->pace(now);
  w.next_tick += sh.opt->pace_tick;
  if (w.next_tick < now) w.next_tick = now + sh.opt->pace_tick;  // fell behind: no burst of ticks
  w.pacer.expires_at(w.next_tick);
  w.pacer.async_wait([&w, &sh](error_code ec) {
    if (!ec) pace_worker(w, sh);
  });
}

void post_all(std::vector<std::unique_ptr<Worker>>& ws, void (Conn::*fn)()) {
  for (auto& w : ws) {
    asio::post(w->io, [&w, fn] {
      for (auto& c : w->conns) ((*c).*fn)();
    });
  }
}

const char* code_name(int v) {
  if (v == kVerdictMalformed) return "malformed";
  if (v == kVerdictUnexpected) return "unexpected";
  return c1222::response_code_name(static_cast<std::uint8_t>(v));
}

}  // namespace

std::uint64_t LoadResult::error_count() const {
  std::uint64_t n = 0;
  for (const auto& [k, v] : errors) n += v;
  return n;
}

double LoadResult::percentile_ms(double q) const {
  if (latency_ns.empty()) return 0;
  const double pos = q * static_cast<double>(latency_ns.size() - 1);
  const auto i = static_cast<std::size_t>(std::ceil(pos));
  return static_cast<double>(latency_ns[std::min(i, latency_ns.size() - 1)]) / 1e6;
}

Result<LoadResult> run_load(const LoadOptions& o) {
  if (o.connections == 0 || o.depth == 0 || o.io_threads == 0 ||
      (!o.make_request && !o.request_view) || (!o.judge && !o.judge_request)) {
    return Error(Errc::invalid_argument, "connections, depth, threads, requests and judge needed");
  }
  std::unique_ptr<FILE, int (*)(FILE*)> log(nullptr, &std::fclose);
  if (!o.latency_log.empty()) {
    log.reset(std::fopen(o.latency_log.c_str(), "w"));
    if (!log) return Error(Errc::invalid_argument, "cannot write " + o.latency_log);
  }
  Shared sh;
  sh.opt = &o;
  error_code ec;
  const auto addr = asio::ip::make_address(o.target.host, ec);
  if (ec) return Error(Errc::invalid_argument, "--host: not an IP address: " + o.target.host);
  sh.endpoint = tcp::endpoint(addr, o.target.port);

  std::optional<ssl::context> tls;
  if (!o.target.plain) {
    tls.emplace(ssl::context::tls_client);
    SSL_CTX_set_min_proto_version(tls->native_handle(), TLS1_3_VERSION);
    tls->set_verify_mode(ssl::verify_peer, ec);
    if (!ec) tls->load_verify_file(o.target.ca_file, ec);
    if (ec) return Error(Errc::invalid_argument, "--ca " + o.target.ca_file + ": " + ec.message());
    tls->use_certificate_chain_file(o.target.cert_file, ec);
    if (ec) return Error(Errc::invalid_argument, "--cert " + o.target.cert_file + ": " + ec.message());
    tls->use_private_key_file(o.target.key_file, ssl::context::pem, ec);
    if (ec) return Error(Errc::invalid_argument, "--key " + o.target.key_file + ": " + ec.message());
    sh.tls = &*tls;
  }

  std::vector<std::unique_ptr<Worker>> ws;
  for (std::size_t t = 0; t < o.io_threads; ++t) {
    ws.push_back(std::make_unique<Worker>());
    ws.back()->guard.emplace(ws.back()->io.get_executor());
    ws.back()->stats.latency_ns.reserve(1U << 16);
  }
  for (std::size_t i = 0; i < o.connections; ++i) {
    Worker& w = *ws[i % ws.size()];
    w.conns.push_back(std::make_shared<Conn>(w.io, sh, w.stats, i));
  }
  for (auto& w : ws) {
    Worker* wp = w.get();
    wp->thread = std::thread([wp] { wp->io.run(); });
  }

  // Close every connection on its thread; each loop then runs out of work and returns.
  auto finish = [&] {
    post_all(ws, &Conn::close);
    for (auto& w : ws) asio::post(w->io, [wp = w.get()] { wp->pacer.cancel(); });
    for (auto& w : ws) {
      w->guard.reset();
      w->thread.join();
      w->conns.clear();
    }
  };

  // Connect everything first; the clock starts once all are up (or failed).
  const auto t_connect = Clock::now();
  post_all(ws, &Conn::open);
  while (sh.connected.load() + sh.failed.load() < o.connections &&
         Clock::now() - t_connect < o.connect_timeout + std::chrono::seconds(1)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  LoadResult r;
  r.connect_s = std::chrono::duration<double>(Clock::now() - t_connect).count();
  r.connect_failures = o.connections - sh.connected.load();
  if (sh.connected.load() == 0) {
    finish();
    return Error(Errc::busy, "no connection could be opened to " + o.target.host + ":" +
                                 std::to_string(o.target.port));
  }

  sh.start = Clock::now();
  sh.count_from = sh.start + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(o.warmup_s));
  sh.end = sh.count_from + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(o.duration_s));
  // The last second of the warm-up (its last half when shorter than 2 s) drains the closed loop.
  sh.refill_until = sh.count_from - std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(std::min(1.0, o.warmup_s / 2)));
  post_all(ws, &Conn::go);
  if (o.rate > 0 && o.pace_tick.count() > 0) {
    for (auto& w : ws) {
      asio::post(w->io, [wp = w.get(), &sh] {
        wp->next_tick = Clock::now();
        pace_worker(*wp, sh);
      });
    }
  }

  const bool tty = isatty(2) != 0;
  std::uint64_t last_ok = 0, last_err = 0;
  auto next_line = sh.start + std::chrono::seconds(1);
  auto stopped = sh.end;
  auto all_done = [&] {
    return sh.ran_out.load() + sh.lost_conns.load() >= sh.connected.load() &&
           sh.in_flight.load() == 0;
  };
  while (Clock::now() < sh.end) {
    auto wake = std::min(next_line, sh.end);
    if (o.until_done) wake = std::min(wake, Clock::now() + std::chrono::milliseconds(20));
    std::this_thread::sleep_until(wake);
    if (o.until_done && all_done()) {
      stopped = Clock::now();
      break;
    }
    if (Clock::now() < next_line) continue;
    if (o.progress) {
      const std::uint64_t okn = sh.ok.load(), errn = sh.errors.load();
      const double t = std::chrono::duration<double>(Clock::now() - sh.start).count();
      std::fprintf(stderr, "%s[%5.1f s]%s %9.0f ok/s  %6llu errors/s  in flight %5lld  total ok %llu%s",
                   tty ? "\r" : "", t, Clock::now() < sh.count_from ? " warm-up" : "",
                   static_cast<double>(okn - last_ok),
                   static_cast<unsigned long long>(errn - last_err),
                   static_cast<long long>(sh.in_flight.load()),
                   static_cast<unsigned long long>(okn), tty ? "   " : "\n");
      last_ok = okn;
      last_err = errn;
    }
    next_line += std::chrono::seconds(1);
  }
  if (o.progress && tty) std::fprintf(stderr, "\n");

  sh.stop_sending = true;
  post_all(ws, &Conn::stop_sending);
  const auto drain_until = Clock::now() + o.drain_timeout;
  while (sh.in_flight.load() > 0 && Clock::now() < drain_until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  r.unanswered = static_cast<std::uint64_t>(std::max<std::int64_t>(0, sh.in_flight.load()));
  finish();

  r.measured_s = std::max(0.0, std::chrono::duration<double>(stopped - sh.count_from).count());
  for (auto& w : ws) {
    const ThreadStats& s = w->stats;
    r.ok += s.ok;
    r.answered += s.answered;
    r.sent += s.sent;
    r.late += s.late;
    r.exhausted += s.exhausted;
    r.unanswered += s.lost;
    r.connection_errors += s.conn_errors;
    for (const auto& [code, n] : s.errors) r.errors[code_name(code)] += n;
    r.latency_ns.insert(r.latency_ns.end(), s.latency_ns.begin(), s.latency_ns.end());
  }
  std::sort(r.latency_ns.begin(), r.latency_ns.end());
  if (log) {
    std::vector<std::pair<double, double>> all;
    for (auto& w : ws) all.insert(all.end(), w->stats.log.begin(), w->stats.log.end());
    std::sort(all.begin(), all.end());
    for (const auto& [sent, ms] : all) std::fprintf(log.get(), "%.6f %.3f\n", sent, ms);
    if (std::fflush(log.get()) != 0) {
      return Error(Errc::storage_failure, "cannot write " + o.latency_log);
    }
  }
  return r;
}

std::string read_tls_target(const Args& a, bool need_tls, Target& t) {
  t.plain = a.has("plain");
  if (t.plain || !need_tls) return {};
  t.ca_file = a.str("ca");
  t.cert_file = a.str("cert");
  t.key_file = a.str("key");
  if (t.ca_file.empty() || t.cert_file.empty() || t.key_file.empty()) {
    return "TLS needs --ca, --cert and --key (or --plain)";
  }
  return {};
}

}  // namespace gs::bench
