// The collection-engine relay of the simulator: routes each C12.22 message by its called AP
// title to a meter of the fleet, with simulated latency, loss and offline meters, behind the
// gridseal server scaffold (TLS 1.3 or loopback plain TCP).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "c1222/oid.h"
#include "src/server.h"
#include "tools/metersim/fleet.h"

namespace gs::metersim {

struct RelayOptions {
  std::string relay_title = ".9.1";      // calling AP title of the relay's own error answers
  std::uint32_t latency_ms = 0;          // added before every answer (0..60000)
  double loss = 0.0;                     // probability a message gets no meter answer (0..1)
  std::uint32_t loss_timeout_ms = 2000;  // after which a lost message is answered `nett`
  double offline = 0.0;                  // fraction of meters offline, answered `netr` (0..1)
  std::uint64_t seed = 1;                // loss draws and the offline set
};
Status validate(const RelayOptions& opt);

struct RelayStats {
  std::uint64_t requests = 0;
  std::uint64_t executed = 0;      // verified and executed by a meter
  std::uint64_t refused = 0;       // refused by a meter (sme, isc, ...)
  std::uint64_t relay_errors = 0;  // malformed, unknown title
  std::uint64_t lost = 0;
  std::uint64_t offline = 0;
};

class Relay {
 public:
  static Result<std::unique_ptr<Relay>> create(Fleet& fleet, const RelayOptions& opt);

  // What to answer to one framed message, and after how long.
  struct Routed {
    Bytes response;
    std::chrono::milliseconds delay{0};
  };
  Routed route(ByteView wire, std::uint32_t now);
  // The answer to a stream that cannot be framed (rqtl for an oversized frame, else err).
  Bytes frame_error(const Error& e, std::size_t max_frame);

  bool offline(std::size_t meter) const noexcept;
  RelayStats stats() const noexcept;

 private:
  Relay(Fleet& fleet, const RelayOptions& opt, c1222::OwnedApTitle title)
      : fleet_(fleet), opt_(opt), title_(std::move(title)) {}
  Bytes error(const c1222::Message* request, std::uint8_t code, ByteView extra = {});
  double draw() noexcept;

  Fleet& fleet_;
  RelayOptions opt_;
  c1222::OwnedApTitle title_;
  std::atomic<std::uint64_t> counter_{0};  // the relay's own invocation ids
  std::atomic<std::uint64_t> draws_{0};
  std::atomic<std::uint64_t> requests_{0}, executed_{0}, refused_{0}, relay_errors_{0}, lost_{0},
      offline_{0};
};

// The relay behind a listening server: answers are handed back after their delay by a timer
// thread, so latency never blocks the handler threads.
class RelayServer {
 public:
  static Result<std::unique_ptr<RelayServer>> start(Relay& relay, server::ServerConfig config);
  ~RelayServer();
  RelayServer(const RelayServer&) = delete;
  RelayServer& operator=(const RelayServer&) = delete;

  std::uint16_t port() const noexcept;
  // Stops accepting, lets requests in flight finish within `drain`, then stops the timer.
  void stop(std::chrono::milliseconds drain);

 private:
  struct Impl;
  explicit RelayServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gs::metersim
