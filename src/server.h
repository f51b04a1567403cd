// The C12.22 server scaffold both daemons use: TLS 1.3 (client certificate required) or
// loopback plain TCP, framing, pipelining with in-order responses, limits, timeouts, a
// bounded handler pool and a graceful drain. The request handlers live in ses/ and dkus/.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/conn_balance.h"

namespace gs::metrics {
class Registry;
}

namespace gs::server {

namespace detail {
struct ServerImpl;
}

struct TlsFiles {
  std::string ca_file;    // PEM CA certificate(s) that client certificates must chain to
  std::string cert_file;  // PEM server certificate chain
  std::string key_file;   // PEM server private key
};

struct ServerConfig {
  std::string address = "127.0.0.1";
  std::uint16_t port = 1153;  // 0: any free port (see Server::port())
  bool reuse_port = true;     // SO_REUSEPORT: several worker processes share the port
  int backlog = 1024;

  // TLS 1.3 with a required client certificate unless plain_tcp is set. Plain TCP is refused
  // on a non-loopback address unless plain_tcp_remote is also set.
  bool plain_tcp = false;
  bool plain_tcp_remote = false;
  TlsFiles tls;

  std::size_t max_frame = 8192;         // bytes of one C12.22 PDU (tag + length + body)
  std::size_t max_in_flight = 32;       // pipelined requests per connection not yet answered
  std::size_t max_connections = 1024;   // per process; beyond it new connections are closed
  std::chrono::milliseconds handshake_timeout{5000};
  std::chrono::milliseconds idle_timeout{60000};     // nothing in flight, nothing received
  std::chrono::milliseconds read_timeout{10000};     // a started frame must complete within
  std::chrono::milliseconds write_timeout{10000};    // one write must complete within
  std::chrono::milliseconds request_timeout{30000};  // a handler must answer within

  std::size_t io_threads = 1;      // event loop threads
  std::size_t worker_threads = 2;  // handler pool; 0 runs handlers inline on the event loop
  // The event loop threads run under SCHED_BATCH (gs::use_batch_scheduling): their wake-ups
  // wait for the running handler's time slice instead of preempting it.
  bool sched_batch = false;

  // Several worker processes: spread connections evenly over them (conn_balance.h). The
  // supervisor creates the balancer when this is set; a worker sets `balancer` to its slot.
  bool balance_connections = true;
  std::shared_ptr<Balancer> balancer;
};

// Checks a configuration without opening anything (limits, TLS files named, plain TCP rules).
Status validate(const ServerConfig& config);

// What the handler knows about a request.
struct RequestContext {
  // Who the policy sees: the client certificate subject in RFC 2253 form
  // ("CN=head-end-1,O=Utility") over TLS, "plain:<address>" over plain TCP.
  std::string client_identity;
  std::string client_cert_sha256;  // hex SHA-256 of the client certificate DER ("" when plain)
  std::string peer;                // "address:port"
  std::uint64_t connection_id = 0;
  std::uint64_t sequence = 0;  // 0, 1, 2 … per connection
  std::chrono::steady_clock::time_point received;
  // Runs a function on a handler thread after the requests already queued for the handlers
  // (on the event loop when the server has no handler pool): a handler that gathers work over
  // requests (the SES's audit records) finishes it once the queue has run empty. Set by the
  // server for as long as it runs; null in a context made elsewhere.
  const std::function<void(std::function<void()>)>* defer = nullptr;
};

// One stderr line for a refused request: program, client identity, peer, meter, response
// code and reason. Callers pass no key material or PINs.
void log_refusal(const char* program, const RequestContext& ctx, const std::string& meter,
                 const char* code_name, const std::string& reason);

// Hands a response back; call exactly once, from any thread. Responses are written in request
// order. An empty response closes the connection after the earlier responses are written
// (for a client that must be cut off); a Done dropped without being called does the same.
using Done = std::function<void(Bytes response)>;

// While one is alive on a thread, the responses that thread completes through Done reach the
// event loop together when it ends: one hand-over and one wake-up of the loop for the lot,
// instead of one per response. For a thread that completes many requests at once (an audit
// writer releasing a committed batch). Nests; not movable.
class CompletionBatch {
 public:
  CompletionBatch();
  ~CompletionBatch();
  CompletionBatch(const CompletionBatch&) = delete;
  CompletionBatch& operator=(const CompletionBatch&) = delete;
};

// run() inside a CompletionBatch: the around_done hook of audit::WriterOptions and of the DKUS's
// replay committer.
void run_batched(const std::function<void()>& run);

// Runs on the worker pool (may block on the HSM or SQLite), or inline when worker_threads is 0.
// `request` is one whole, framed PDU (60 <len> …), not yet parsed.
using Handler = std::function<void(const RequestContext& ctx, Bytes request, Done done)>;

// Called on the event loop when the stream cannot be framed (bad first byte, bad length,
// above max_frame). It may return an error PDU to write (after the responses to the earlier
// requests) before the connection closes. Must be quick and must not block.
using FrameErrorHook = std::function<std::optional<Bytes>(const RequestContext& ctx,
                                                          const Error& error)>;

// A synchronous handler, for work that naturally returns a value.
using BlockingHandler = std::function<Bytes(const RequestContext& ctx, Bytes request)>;
Handler make_handler(BlockingHandler fn);

struct ServerStats {
  std::uint64_t connections_active = 0;
  std::uint64_t connections_accepted = 0;
  std::uint64_t connections_refused = 0;  // over max_connections
  std::uint64_t handshakes_failed = 0;    // includes clients without a valid certificate
  std::uint64_t frames_rejected = 0;
  std::uint64_t timeouts = 0;             // connections closed by any timeout
  std::uint64_t requests = 0;
  std::uint64_t responses = 0;
};

class Server {
 public:
  // Validates the configuration and loads the TLS files; nothing listens yet. When metrics is
  // given, the server registers gridseal_server_* series in it (it must outlive the server).
  static Result<std::unique_ptr<Server>> create(ServerConfig config, Handler handler,
                                                FrameErrorHook on_frame_error = {},
                                                metrics::Registry* metrics = nullptr);
  ~Server();  // stop(0) when still running
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and listens, then starts the event-loop threads and the handler pool.
  Status start();
  // The bound port (after start).
  std::uint16_t port() const noexcept;

  // Starts a graceful stop from any thread, including a handler or signal callback: stop
  // accepting, stop reading new requests, finish and write the requests in flight, close.
  // Connections still busy after `drain` are closed. Returns at once.
  void shutdown(std::chrono::milliseconds drain);
  // Blocks until the server has stopped (after shutdown) and joins its threads. Not from a
  // server thread.
  void wait();
  // shutdown(drain) then wait().
  void stop(std::chrono::milliseconds drain = std::chrono::milliseconds(0));

  ServerStats stats() const noexcept;

 private:
  explicit Server(std::unique_ptr<detail::ServerImpl> impl);
  std::unique_ptr<detail::ServerImpl> impl_;
};

}  // namespace gs::server
