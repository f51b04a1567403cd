// Prometheus metrics: lock-free counters, gauges and histograms with labels, the text exposition
// format, and a tiny local HTTP/1.1 endpoint serving /metrics and /healthz.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "gridseal/result.h"

namespace gs::metrics {

// Label pairs; order does not matter (sorted by name on registration).
using Labels = std::vector<std::pair<std::string, std::string>>;

// A monotonically increasing count. Updates are a relaxed atomic add.
class Counter {
 public:
  void inc(std::uint64_t n = 1) noexcept { v_.fetch_add(n, std::memory_order_relaxed); }
  std::uint64_t value() const noexcept { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> v_{0};
};

// A value that goes up and down. Updates are atomic (add is a compare-and-swap loop).
class Gauge {
 public:
  void set(double v) noexcept { v_.store(v, std::memory_order_relaxed); }
  void add(double d) noexcept;
  void inc() noexcept { add(1.0); }
  void dec() noexcept { add(-1.0); }
  double value() const noexcept { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0.0};
};

// Cumulative histogram with fixed upper bounds (+Inf implied). observe() is lock-free: one
// binary search, two relaxed adds and a compare-and-swap for the sum.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v) noexcept;
  // Observes a duration in seconds.
  void observe(std::chrono::nanoseconds d) noexcept {
    observe(static_cast<double>(d.count()) * 1e-9);
  }
  const std::vector<double>& bounds() const noexcept { return bounds_; }
  // Non-cumulative count of bucket i (i == bounds().size() is the +Inf bucket).
  std::uint64_t bucket(std::size_t i) const noexcept {
    return counts_[i].load(std::memory_order_relaxed);
  }
  std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }
  double sum() const noexcept { return sum_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> counts_;
  std::atomic<std::uint64_t> count_{0};
  std::atomic<double> sum_{0.0};
};

// Latency buckets in seconds from 50 µs to 10 s.
std::vector<double> latency_buckets();

// Owns every metric. Registration (counter/gauge/histogram) takes a mutex and returns a
// reference that stays valid for the registry's lifetime: look it up once, update it often.
// Asking again with the same name and labels returns the same metric. Names must match
// [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]*, and one name has one type;
// violations are programming errors (GS_CHECK).
class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  Counter& counter(const std::string& name, const std::string& help, Labels labels = {});
  Gauge& gauge(const std::string& name, const std::string& help, Labels labels = {});
  // A gauge whose value is read from fn at exposition time (fn must be thread-safe and quick).
  void gauge_fn(const std::string& name, const std::string& help, Labels labels,
                std::function<double()> fn);
  Histogram& histogram(const std::string& name, const std::string& help,
                       const std::vector<double>& bounds, Labels labels = {});

  // The Prometheus text exposition format (version 0.0.4), families sorted by name.
  std::string expose() const;

 private:
  struct Family;
  Family& family(const std::string& name, const std::string& help, int type);

  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<Family>> families_;
};

// What /healthz reports: 200 "ok" when healthy, 503 with the detail otherwise.
struct Health {
  bool ok = true;
  std::string detail;  // short English phrase; never secrets
};

struct HttpConfig {
  std::string address = "127.0.0.1";
  std::uint16_t port = 9153;  // 0: any free port (see HttpEndpoint::port())
  std::size_t max_request = 8192;  // bytes of request line + headers
  std::size_t max_connections = 32;
  std::chrono::milliseconds timeout{5000};  // whole request/response exchange
};

// A minimal HTTP/1.1 server (own thread, one response per connection, then close) serving
// GET /metrics from a Registry and GET /healthz from a callback. Anything else: 404/405/400.
// The health callback runs on the endpoint's thread; keep it quick (cache slow probes).
class HttpEndpoint {
 public:
  HttpEndpoint(const Registry& registry, std::function<Health()> health);
  // Serves whatever `expose` returns as /metrics (e.g. several processes' metrics merged).
  HttpEndpoint(std::function<std::string()> expose, std::function<Health()> health);
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  // Binds, listens and starts the thread. Refuses a non-loopback address unless
  // allow_remote is set (metrics are meant for a local scraper or reverse proxy).
  Status start(const HttpConfig& config, bool allow_remote = false);
  std::uint16_t port() const noexcept;
  // Stops accepting, closes connections, joins the thread. Idempotent.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gs::metrics
