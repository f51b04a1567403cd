// The DKUS key-rollover engine (DESIGN §1.3, §3.2; storage contract in src/rollover_store.h):
// takes the queued steps of running campaigns, derives each meter's next key in the HSM by ECDH
// with an ephemeral key pair, commits it as a `pending` slot, sends the signed (class 4) MT-2041
// key update sealed under the meter's current key through the collection engine's relay, and
// confirms the step when the meter answers under the new key.
//
// Crash safety comes from the order of the durable steps, each one committed transaction:
//   prepare (pending key + MT-2041 payload) -> record_attempts (a lease: the step is due again
//   after answer timeout + backoff) -> send -> answer -> confirm (pending -> active, the old
//   key -> standby) | retry later | fail after max_attempts.
// A kill -9 anywhere leaves the step prepared; after a restart it is re-sent with the same
// payload (fresh invocation id, window, signature), the meter derives the same key into the
// same slot, and every message it sends is decryptable under the active or pending key
// meanwhile. A meter that never answers keeps its old key (and the pending one) and its step
// ends `failed`, reported by `gridseal rollover status`.
//
// Runs in exactly one process (worker 0 of gridseal-dkusd) on its own threads: one driver
// thread that owns an HSM session, its store connections and every state change, and
// rollover.connections relay connections, each on a thread with up to rollover.pipeline_depth
// key updates in flight (answers come back in request order, matched by A4).
#pragma once

#include <memory>

#include "dkus/dkus_config.h"
#include "gridseal/result.h"
#include "src/hsm_context.h"
#include "src/metrics.h"

namespace gs::dkus {

class RolloverEngine {
 public:
  // Registers the engine's metrics (gridseal_rollover_*). Nothing is opened yet.
  static Result<std::unique_ptr<RolloverEngine>> create(const DkusConfig& cfg, HsmContext& hsm,
                                                        metrics::Registry& registry);
  ~RolloverEngine();  // stop()
  RolloverEngine(const RolloverEngine&) = delete;
  RolloverEngine& operator=(const RolloverEngine&) = delete;

  // Opens the store connections, an HSM session, gs-kek and the command key now, so that a
  // configuration or token problem fails the start loudly. Does not contact the relay.
  Status warm_up();
  // Starts the driver and relay threads.
  void start();
  // Stops taking new work and joins the threads: at most rollover.answer_timeout_ms when a
  // relay connection waits for an answer. Key updates in flight are re-sent after their lease
  // by the next run (idempotent). Idempotent.
  void stop();

  // Unhealthy while the engine's HSM session or database operations fail (the relay being
  // unreachable is reported by metrics and logs, not as ill health).
  metrics::Health health() const;

 private:
  struct Impl;
  explicit RolloverEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gs::dkus
