// Relay routing (by called AP title), simulated network faults, and the delayed-answer server.
#include "tools/metersim/relay.h"

#include <condition_variable>
#include <functional>
#include <mutex>
#include <queue>
#include <thread>
#include <vector>

#include "c1222/services.h"
#include "src/invocation_ids.h"

namespace gs::metersim {

namespace {

std::uint64_t splitmix(std::uint64_t x) noexcept {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

double unit(std::uint64_t x) noexcept {
  return static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
}

}  // namespace

Status validate(const RelayOptions& o) {
  if (o.latency_ms > 60000) return Status(Errc::invalid_argument, "--latency-ms must be 0..60000");
  if (!(o.loss >= 0.0 && o.loss <= 1.0))
    return Status(Errc::invalid_argument, "--loss must be 0..1");
  if (!(o.offline >= 0.0 && o.offline <= 1.0)) {
    return Status(Errc::invalid_argument, "--offline must be 0..1");
  }
  if (o.loss_timeout_ms > 600000) {
    return Status(Errc::invalid_argument, "--loss-timeout-ms must be 0..600000");
  }
  return {};
}

Result<std::unique_ptr<Relay>> Relay::create(Fleet& fleet, const RelayOptions& opt) {
  GS_TRY(validate(opt));
  auto title = c1222::OwnedApTitle::parse(opt.relay_title);
  if (!title.ok())
    return Error(Errc::invalid_argument, "--relay-title: " + title.error().message());
  return std::unique_ptr<Relay>(new Relay(fleet, opt, std::move(title).value()));
}

double Relay::draw() noexcept {
  return unit(splitmix(opt_.seed ^ splitmix(draws_.fetch_add(1, std::memory_order_relaxed))));
}

bool Relay::offline(std::size_t meter) const noexcept {
  if (opt_.offline <= 0.0) return false;
  return unit(splitmix(splitmix(opt_.seed + 0x5EED) ^ meter)) < opt_.offline;
}

RelayStats Relay::stats() const noexcept {
  RelayStats s;
  s.requests = requests_.load();
  s.executed = executed_.load();
  s.refused = refused_.load();
  s.relay_errors = relay_errors_.load();
  s.lost = lost_.load();
  s.offline = offline_.load();
  return s;
}

// A mode-0 answer from the relay's own title to the caller, with one response code.
Bytes Relay::error(const c1222::Message* request, std::uint8_t code, ByteView extra) {
  c1222::Message m;
  if (request != nullptr) {
    if (request->calling_ap_title) m.called_ap_title = *request->calling_ap_title;
    m.called_ap_invocation_id = request->calling_ap_invocation_id;
  }
  m.calling_ap_title = title_.view();
  const Bytes a8 = ids::encode_id(ids::id_for_counter(counter_.fetch_add(1)));
  m.calling_ap_invocation_id = ByteView(a8);
  Bytes service{code};
  service.insert(service.end(), extra.begin(), extra.end());
  Bytes epsem{c1222::kEpsemReserved};
  c1222::append_service(epsem, service);
  m.epsem = epsem;
  auto out = c1222::encode(m);
  GS_CHECK(out.ok());
  return std::move(out).value();
}

Bytes Relay::frame_error(const Error& e, std::size_t max_frame) {
  relay_errors_.fetch_add(1);
  if (e.code == Errc::too_large) {
    const auto n = static_cast<std::uint32_t>(max_frame);
    const std::uint8_t size[4] = {static_cast<std::uint8_t>(n >> 24),
                                  static_cast<std::uint8_t>(n >> 16),
                                  static_cast<std::uint8_t>(n >> 8), static_cast<std::uint8_t>(n)};
    return error(nullptr, c1222::kRespRqtl, ByteView(size, 4));
  }
  return error(nullptr, c1222::kRespErr);
}

Relay::Routed Relay::route(ByteView wire, std::uint32_t now) {
  requests_.fetch_add(1, std::memory_order_relaxed);
  const std::chrono::milliseconds latency(opt_.latency_ms);
  auto m = c1222::decode(wire);
  if (!m.ok()) {
    relay_errors_.fetch_add(1);
    return {error(nullptr, c1222::kRespErr), latency};
  }
  if (!m->called_ap_title) {
    relay_errors_.fetch_add(1);
    return {error(&*m, c1222::kRespErr), latency};
  }
  const Bytes title = m->called_ap_title->absolute(c1222::default_base_oid());
  const auto index = fleet_.find(title);
  if (!index) {
    relay_errors_.fetch_add(1);
    return {error(&*m, c1222::kRespUat), latency};
  }
  if (offline(*index)) {
    offline_.fetch_add(1);
    return {error(&*m, c1222::kRespNetr), latency};
  }
  const bool lost = opt_.loss > 0.0 && draw() < opt_.loss;
  // Half of the lost messages never reach the meter, the other half lose the meter's answer
  // (the meter executed the command: a retry must meet its replay rule).
  if (lost && draw() < 0.5) {
    lost_.fetch_add(1);
    return {error(&*m, c1222::kRespNett), std::chrono::milliseconds(opt_.loss_timeout_ms)};
  }
  MeterReply reply = fleet_.handle(*index, *m, now);
  (reply.outcome == Outcome::executed ? executed_ : refused_).fetch_add(1);
  if (lost) {
    lost_.fetch_add(1);
    return {error(&*m, c1222::kRespNett), std::chrono::milliseconds(opt_.loss_timeout_ms)};
  }
  return {std::move(reply.wire), latency};
}

// --- delayed answers ---------------------------------------------------------------------------

namespace {

using Clock = std::chrono::steady_clock;

// Calls each Done at its due time from one thread.
class Delayer {
 public:
  Delayer() : thread_([this] { run(); }) {}
  ~Delayer() { stop(); }
  Delayer(const Delayer&) = delete;
  Delayer& operator=(const Delayer&) = delete;

  void schedule(Clock::time_point due, server::Done done, Bytes response) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      q_.push(Item{due, seq_++, std::move(done), std::move(response)});
    }
    cv_.notify_one();
  }

  // Answers everything still queued at once, then ends the thread.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Item {
    Clock::time_point due;
    std::uint64_t seq;
    server::Done done;
    Bytes response;
  };
  struct Later {
    bool operator()(const Item& a, const Item& b) const {
      return a.due != b.due ? a.due > b.due : a.seq > b.seq;
    }
  };

  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (q_.empty()) {
        if (stopping_) return;
        cv_.wait(lock);
        continue;
      }
      if (!stopping_ && q_.top().due > Clock::now()) {
        // A copy: schedule() may grow the queue's vector while the lock is released, and
        // wait_until keeps reading the deadline it was given.
        const Clock::time_point due = q_.top().due;
        cv_.wait_until(lock, due);
        continue;
      }
      Item it = std::move(const_cast<Item&>(q_.top()));
      q_.pop();
      lock.unlock();
      it.done(std::move(it.response));
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::priority_queue<Item, std::vector<Item>, Later> q_;
  std::uint64_t seq_ = 0;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

struct RelayServer::Impl {
  // Declared first, destroyed last: queued Done callbacks need the server's event loop alive.
  std::unique_ptr<server::Server> server;
  Delayer delayer;
  bool stopped = false;
};

RelayServer::RelayServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

RelayServer::~RelayServer() { stop(std::chrono::milliseconds(0)); }

Result<std::unique_ptr<RelayServer>> RelayServer::start(Relay& relay, server::ServerConfig config) {
  auto impl = std::make_unique<Impl>();
  Delayer* delayer = &impl->delayer;
  const std::size_t max_frame = config.max_frame;
  server::Handler handler = [&relay, delayer](const server::RequestContext& ctx, Bytes request,
                                              server::Done done) {
    const auto now =
        static_cast<std::uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                       std::chrono::system_clock::now().time_since_epoch())
                                       .count());
    Relay::Routed r = relay.route(request, now);
    if (r.delay.count() <= 0) {
      done(std::move(r.response));
      return;
    }
    delayer->schedule(ctx.received + r.delay, std::move(done), std::move(r.response));
  };
  server::FrameErrorHook on_frame_error = [&relay, max_frame](const server::RequestContext&,
                                                              const Error& e) {
    return std::optional<Bytes>(relay.frame_error(e, max_frame));
  };
  GS_ASSIGN(impl->server, server::Server::create(std::move(config), std::move(handler),
                                                 std::move(on_frame_error)));
  GS_TRY(impl->server->start());
  return std::unique_ptr<RelayServer>(new RelayServer(std::move(impl)));
}

std::uint16_t RelayServer::port() const noexcept { return impl_->server->port(); }

void RelayServer::stop(std::chrono::milliseconds drain) {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  impl_->server->shutdown(drain);
  impl_->server->wait();
  impl_->delayer.stop();
}

}  // namespace gs::metersim
