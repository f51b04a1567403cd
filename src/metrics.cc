// Prometheus metrics registry, text exposition and the local /metrics + /healthz HTTP endpoint.
#include <utility>  // before Asio

#include "src/metrics.h"

#include <algorithm>
#include <boost/asio.hpp>
#include <cmath>
#include <cstdio>
#include <thread>

#include "gridseal/thread_name.h"

namespace gs::metrics {

namespace asio = boost::asio;
using asio::ip::tcp;

void Gauge::add(double d) noexcept { v_.fetch_add(d, std::memory_order_relaxed); }

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)) {
  std::sort(bounds_.begin(), bounds_.end());
  bounds_.erase(std::unique(bounds_.begin(), bounds_.end()), bounds_.end());
  bounds_.erase(std::remove_if(bounds_.begin(), bounds_.end(),
                               [](double b) { return !std::isfinite(b); }),
                bounds_.end());
  counts_ = std::make_unique<std::atomic<std::uint64_t>[]>(bounds_.size() + 1);
  for (std::size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0);
}

void Histogram::observe(double v) noexcept {
  if (std::isnan(v)) return;
  // First bucket whose upper bound is >= v ("le" semantics).
  auto it = std::lower_bound(bounds_.begin(), bounds_.end(), v);
  counts_[static_cast<std::size_t>(it - bounds_.begin())].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

std::vector<double> latency_buckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
          0.01,    0.025,  0.05,    0.1,    0.25,  0.5,    1.0, 2.5, 5.0, 10.0};
}

namespace {

enum Type { kCounter = 0, kGauge = 1, kHistogram = 2 };
const char* type_name(int t) {
  switch (t) {
    case kCounter: return "counter";
    case kGauge: return "gauge";
    default: return "histogram";
  }
}

bool valid_name(const std::string& s, bool allow_colon) {
  if (s.empty() || s.size() > 200) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
              (allow_colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

void append_escaped(std::string& out, const std::string& v, bool quote_too) {
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && quote_too) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
}

void append_number(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
  } else if (std::isinf(v)) {
    out += v > 0 ? "+Inf" : "-Inf";
  } else {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    out += buf;
  }
}

// {a="x",b="y"} with an optional extra label (le) at the end.
void append_labels(std::string& out, const Labels& labels, const char* extra_name = nullptr,
                   const std::string& extra_value = {}) {
  if (labels.empty() && extra_name == nullptr) return;
  out += '{';
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) out += ',';
    first = false;
    out += k;
    out += "=\"";
    append_escaped(out, v, true);
    out += '"';
  }
  if (extra_name != nullptr) {
    if (!first) out += ',';
    out += extra_name;
    out += "=\"";
    out += extra_value;
    out += '"';
  }
  out += '}';
}

Labels normalize(Labels labels) {
  std::sort(labels.begin(), labels.end());
  for (std::size_t i = 0; i < labels.size(); ++i) {
    GS_CHECK(valid_name(labels[i].first, false) && labels[i].first != "le");
    GS_CHECK(i == 0 || labels[i].first != labels[i - 1].first);
  }
  return labels;
}

}  // namespace

struct Registry::Family {
  std::string name;
  std::string help;
  int type = kCounter;
  // One metric per label set. Only one of the pointers is set, by type (gauge_fn: fn).
  struct Series {
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
    std::function<double()> fn;
  };
  std::map<Labels, Series> series;
};

Registry::Registry() = default;
Registry::~Registry() = default;

Registry::Family& Registry::family(const std::string& name, const std::string& help, int type) {
  GS_CHECK(valid_name(name, true));
  auto& f = families_[name];
  if (!f) {
    f = std::make_unique<Family>();
    f->name = name;
    f->help = help;
    f->type = type;
  }
  GS_CHECK(f->type == type);
  return *f;
}

Counter& Registry::counter(const std::string& name, const std::string& help, Labels labels) {
  std::lock_guard lock(mu_);
  auto& s = family(name, help, kCounter).series[normalize(std::move(labels))];
  if (!s.counter) s.counter = std::make_unique<Counter>();
  return *s.counter;
}

Gauge& Registry::gauge(const std::string& name, const std::string& help, Labels labels) {
  std::lock_guard lock(mu_);
  auto& s = family(name, help, kGauge).series[normalize(std::move(labels))];
  GS_CHECK(!s.fn);
  if (!s.gauge) s.gauge = std::make_unique<Gauge>();
  return *s.gauge;
}

void Registry::gauge_fn(const std::string& name, const std::string& help, Labels labels,
                        std::function<double()> fn) {
  std::lock_guard lock(mu_);
  auto& s = family(name, help, kGauge).series[normalize(std::move(labels))];
  GS_CHECK(!s.gauge);
  s.fn = std::move(fn);
}

Histogram& Registry::histogram(const std::string& name, const std::string& help,
                               const std::vector<double>& bounds, Labels labels) {
  std::lock_guard lock(mu_);
  auto& s = family(name, help, kHistogram).series[normalize(std::move(labels))];
  if (!s.histogram) s.histogram = std::make_unique<Histogram>(bounds);
  return *s.histogram;
}

std::string Registry::expose() const {
  std::string out;
  std::lock_guard lock(mu_);
  out.reserve(families_.size() * 256);
  for (const auto& [name, f] : families_) {
    out += "# HELP ";
    out += name;
    out += ' ';
    append_escaped(out, f->help, false);
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type_name(f->type);
    out += '\n';
    for (const auto& [labels, s] : f->series) {
      if (s.counter) {
        out += name;
        append_labels(out, labels);
        out += ' ';
        out += std::to_string(s.counter->value());
        out += '\n';
      } else if (s.gauge || s.fn) {
        out += name;
        append_labels(out, labels);
        out += ' ';
        append_number(out, s.gauge ? s.gauge->value() : s.fn());
        out += '\n';
      } else if (s.histogram) {
        const Histogram& h = *s.histogram;
        std::uint64_t cumulative = 0;
        for (std::size_t i = 0; i <= h.bounds().size(); ++i) {
          cumulative += h.bucket(i);
          std::string le;
          if (i == h.bounds().size()) {
            le = "+Inf";
          } else {
            append_number(le, h.bounds()[i]);
          }
          out += name;
          out += "_bucket";
          append_labels(out, labels, "le", le);
          out += ' ';
          out += std::to_string(cumulative);
          out += '\n';
        }
        out += name;
        out += "_sum";
        append_labels(out, labels);
        out += ' ';
        append_number(out, h.sum());
        out += '\n';
        out += name;
        out += "_count";
        append_labels(out, labels);
        out += ' ';
        // The count is the cumulative total so that it always matches the +Inf bucket.
        out += std::to_string(cumulative);
        out += '\n';
      }
    }
  }
  return out;
}

// --- HTTP endpoint ------------------------------------------------------------------------

struct HttpEndpoint::Impl {
  std::function<std::string()> expose;
  std::function<Health()> health;
  HttpConfig config;
  asio::io_context io{1};
  tcp::acceptor acceptor{io};
  std::thread thread;
  std::atomic<std::uint16_t> port{0};
  std::size_t active = 0;  // touched only on the io thread
  bool stopped = false;

  Impl(std::function<std::string()> e, std::function<Health()> h)
      : expose(std::move(e)), health(std::move(h)) {}

  std::string respond(const std::string& head) {
    // Request line: METHOD SP TARGET SP VERSION
    auto line_end = head.find("\r\n");
    std::string line = head.substr(0, line_end);
    auto sp1 = line.find(' ');
    auto sp2 = sp1 == std::string::npos ? std::string::npos : line.find(' ', sp1 + 1);
    if (sp1 == std::string::npos || sp2 == std::string::npos ||
        line.compare(sp2 + 1, 5, "HTTP/") != 0) {
      return reply(400, "Bad Request", "text/plain", "bad request\n", true);
    }
    std::string method = line.substr(0, sp1);
    std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    if (auto q = target.find('?'); q != std::string::npos) target.resize(q);
    bool head_only = method == "HEAD";
    if (method != "GET" && !head_only) {
      return reply(405, "Method Not Allowed", "text/plain", "method not allowed\n", head_only);
    }
    if (target == "/metrics") {
      return reply(200, "OK", "text/plain; version=0.0.4; charset=utf-8", expose(), head_only);
    }
    if (target == "/healthz") {
      Health h = health ? health() : Health{};
      if (h.ok) return reply(200, "OK", "text/plain", "ok\n", head_only);
      return reply(503, "Service Unavailable", "text/plain", "unhealthy: " + h.detail + "\n",
                   head_only);
    }
    return reply(404, "Not Found", "text/plain", "not found\n", head_only);
  }

  static std::string reply(int code, const char* reason, const char* type,
                           const std::string& body, bool head_only) {
    std::string r = "HTTP/1.1 " + std::to_string(code) + " " + reason +
                    "\r\nContent-Type: " + type +
                    "\r\nContent-Length: " + std::to_string(body.size()) +
                    "\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n";
    if (!head_only) r += body;
    return r;
  }

  asio::awaitable<void> serve(tcp::socket sock) {
    auto exec = co_await asio::this_coro::executor;
    asio::steady_timer timer(exec);
    timer.expires_after(config.timeout);
    // Watchdog: closing the socket ends whatever the session is waiting for.
    timer.async_wait([&sock](boost::system::error_code ec) {
      if (!ec) {
        boost::system::error_code ignored;
        sock.close(ignored);
      }
    });
    std::string head;
    std::string buf(1024, '\0');
    boost::system::error_code ec;
    bool complete = false;
    while (head.size() <= config.max_request) {
      std::size_t n = co_await sock.async_read_some(asio::buffer(buf),
                                                    asio::redirect_error(asio::use_awaitable, ec));
      if (ec) break;
      head.append(buf.data(), n);
      if (head.find("\r\n\r\n") != std::string::npos) {
        complete = true;
        break;
      }
    }
    std::string out;
    if (complete && head.size() <= config.max_request + 1024) {
      out = respond(head);
    } else if (!ec) {
      out = reply(431, "Request Header Fields Too Large", "text/plain", "too large\n", false);
    }
    if (!out.empty() && sock.is_open()) {
      co_await asio::async_write(sock, asio::buffer(out),
                                 asio::redirect_error(asio::use_awaitable, ec));
      if (!ec) sock.shutdown(tcp::socket::shutdown_send, ec);
    }
    timer.cancel();
    sock.close(ec);
    --active;
  }

  asio::awaitable<void> accept_loop() {
    for (;;) {
      boost::system::error_code ec;
      tcp::socket sock = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (stopped || !acceptor.is_open()) co_return;
      if (ec) {
        // Out of descriptors and the like: back off instead of spinning.
        asio::steady_timer t(io, std::chrono::milliseconds(50));
        co_await t.async_wait(asio::redirect_error(asio::use_awaitable, ec));
        continue;
      }
      if (active >= config.max_connections) {
        sock.close(ec);
        continue;
      }
      ++active;
      asio::co_spawn(io, serve(std::move(sock)), asio::detached);
    }
  }
};

HttpEndpoint::HttpEndpoint(const Registry& registry, std::function<Health()> health)
    : impl_(std::make_unique<Impl>([&registry] { return registry.expose(); },
                                   std::move(health))) {}

HttpEndpoint::HttpEndpoint(std::function<std::string()> expose, std::function<Health()> health)
    : impl_(std::make_unique<Impl>(std::move(expose), std::move(health))) {}

HttpEndpoint::~HttpEndpoint() { stop(); }

std::uint16_t HttpEndpoint::port() const noexcept { return impl_->port.load(); }

Status HttpEndpoint::start(const HttpConfig& config, bool allow_remote) {
  if (impl_->thread.joinable()) return {Errc::invalid_argument, "metrics endpoint already started"};
  if (config.max_request < 64 || config.max_connections == 0 || config.timeout.count() <= 0) {
    return {Errc::invalid_argument, "metrics endpoint limits must be positive"};
  }
  impl_->config = config;
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(config.address, ec);
  if (ec) return {Errc::invalid_argument, "metrics address is not an IP address: " + config.address};
  if (!addr.is_loopback() && !allow_remote) {
    return {Errc::invalid_argument, "metrics address must be loopback: " + config.address};
  }
  tcp::endpoint ep(addr, config.port);
  auto& acc = impl_->acceptor;
  acc.open(ep.protocol(), ec);
  if (!ec) acc.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acc.bind(ep, ec);
  if (!ec) acc.listen(64, ec);
  if (ec) {
    acc.close(ec);
    return {Errc::invalid_argument, "cannot listen on " + config.address + ":" +
                                        std::to_string(config.port) + ": " + ec.message()};
  }
  impl_->port = acc.local_endpoint(ec).port();
  asio::co_spawn(impl_->io, impl_->accept_loop(), asio::detached);
  impl_->thread = std::thread([this] {
    name_this_thread("gs-metrics");
    impl_->io.run();
  });
  return {};
}

void HttpEndpoint::stop() {
  if (!impl_ || !impl_->thread.joinable()) return;
  asio::post(impl_->io, [this] {
    impl_->stopped = true;
    boost::system::error_code ec;
    impl_->acceptor.close(ec);
    impl_->io.stop();  // in-progress sessions are abandoned; their sockets close on destruction
  });
  impl_->thread.join();
}

}  // namespace gs::metrics
