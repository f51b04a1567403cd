// gridseal-bench load engine: C connections (TLS 1.3 with a client certificate, or plain TCP),
// each keeping up to D C12.22 requests in flight, closed loop or paced open loop, with
// per-request latency and responses sorted by C12.22 response code. Scenarios (ses, and later
// read, disconnect, dr, rollover, mixed) supply the requests and the verdict on each response.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::bench {

// What a scenario makes of one response.
inline constexpr int kVerdictOk = -1;         // the expected answer (e.g. a secured command)
inline constexpr int kVerdictMalformed = 256;  // does not decode
inline constexpr int kVerdictUnexpected = 257;  // decodes, but is not the expected answer
// 0..255: a C12.22 error response with that response code.
using Verdict = int;

struct Target {
  std::string host = "127.0.0.1";
  std::uint16_t port = 1153;
  bool plain = false;
  std::string ca_file, cert_file, key_file;  // TLS
};

class Args;
// --plain, or the TLS files --ca, --cert and --key (all three when `need_tls`); the error says
// what is missing (empty: fine).
std::string read_tls_target(const Args& a, bool need_tls, Target& t);

struct LoadOptions {
  Target target;
  std::size_t connections = 16;
  std::size_t depth = 8;             // requests in flight per connection
  double duration_s = 10;            // measured part
  double warmup_s = 1;               // before it (sent, answered, not counted)
  double rate = 0;                   // offered requests/s over all connections; 0: closed loop
  // Open loop: run the warm-up closed loop (as fast as the server answers, e.g. to fill its
  // caches), then pace from the start of the measured part; only requests due in the measured
  // part are counted.
  bool closed_warmup = false;
  std::size_t io_threads = 1;        // event-loop threads of the generator
  // Open loop: each generator thread wakes every pace_tick and sends what fell due on each of
  // its connections (latency still counts from each request's own intended send time, so the
  // tick's delay is in the figures). 0: one timer per connection, a wake-up per request, which
  // on 2 cores costs the generator several times the CPU of the closed loop.
  std::chrono::microseconds pace_tick{1000};
  bool progress = true;              // one line a second on stderr
  // End as soon as every connection ran out of requests and every answer is in (or at the end
  // of the duration); running out is then the plan, not counted in LoadResult::exhausted.
  bool until_done = false;
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds drain_timeout{5000};  // after the end, for the requests in flight
  // When set: after the run, one line per counted response, "SENT_S LATENCY_MS" (its intended
  // send time from the start of the measured part, and its latency), in send order: to see
  // whether a p99 comes from steady queueing or from stalls, and when they happen.
  std::string latency_log;
  // Request number `seq` (0, 1, ...) of connection `conn`; called on that connection's thread.
  // Either make_request (built on demand) or request_view (prepared before the run, the view
  // valid until run_load returns). An empty request: this connection has no more to send.
  std::function<Bytes(std::size_t conn, std::uint64_t seq)> make_request;
  std::function<ByteView(std::size_t conn, std::uint64_t seq)> request_view;
  // The verdict on a response; called on the connection's thread. judge_request, when set, is
  // used instead and also gets which request (connection, seq) the response answers.
  std::function<Verdict(ByteView response)> judge;
  std::function<Verdict(std::size_t conn, std::uint64_t seq, ByteView response)> judge_request;
};

struct LoadResult {
  double measured_s = 0;           // length of the counted window
  std::uint64_t ok = 0;            // kVerdictOk responses in the window
  std::uint64_t answered = 0;      // all responses in the window
  std::map<std::string, std::uint64_t> errors;  // by response code name, "malformed"
  std::uint64_t sent = 0;          // requests written (whole run)
  std::uint64_t unanswered = 0;    // still in flight after the drain
  std::uint64_t connect_failures = 0;
  std::uint64_t connection_errors = 0;  // connections lost during the run
  std::uint64_t late = 0;  // open loop: sent later than intended time + pace_tick + 1 ms
  std::uint64_t exhausted = 0;     // connections that ran out of requests before the end
  double connect_s = 0;            // time to open (and hand-shake) every connection
  std::vector<std::uint64_t> latency_ns;  // one per counted response, sorted
  double ok_per_s() const { return measured_s > 0 ? static_cast<double>(ok) / measured_s : 0; }
  std::uint64_t error_count() const;
  // q in [0, 1]; 0 when there are no samples.
  double percentile_ms(double q) const;
};

// Runs the load; an error when no connection could be opened.
Result<LoadResult> run_load(const LoadOptions& options);

}  // namespace gs::bench
