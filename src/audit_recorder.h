// Audit records appended inside a transaction that a store or an engine opens itself (issue 7:
// each key-state change is appended to the audit table in one transaction with the action it
// records). audit::Trail does the chain and the anchor; this keeps one Batch across the calls
// of one transaction, so that many changes committed together (an engine batch) cost one chain
// head read, one finish and at most one anchor update, not one per change.
//
//   GS_TRY(rec.start());                              // before BEGIN IMMEDIATE
//   GS_ASSIGN(auto tx, db::Transaction::begin(db));
//   ... the change ...; GS_TRY(rec.add(event));       // any number, or none
//   GS_TRY(rec.finish());
//   GS_TRY(tx.commit());
//   rec.committed();
//
// A transaction that rolls back takes its records with it; the next start() forgets the batch.
// Like audit::Writer's batches it writes no checkpoint (the process's Writer signs them and
// seals the anchor at its stop) and updates the HSM anchor at most once per anchor_interval.
#pragma once

#include <chrono>
#include <functional>
#include <optional>

#include "gridseal/result.h"
#include "hsm/session.h"
#include "src/audit.h"
#include "src/sqlite.h"

namespace gs::audit {

class TxRecorder {
 public:
  // The HSM session the trail checks and updates the anchor with (the caller's own, taken
  // before SQLite's write lock, as audit::Writer orders them). An error refuses the change.
  using SessionFn = std::function<Result<hsm::Session*>()>;

  // `db` (the connection the transactions run on) must outlive the recorder.
  static Result<TxRecorder> over(db::Db& db, SessionFn session,
                                 std::chrono::milliseconds anchor_interval);

  // Before BEGIN IMMEDIATE: takes the session and forgets what an unfinished transaction left.
  Status start();
  // Inside the transaction: appends `e` (actor "system" when empty). The first add() of a
  // transaction reads the chain head and checks it against the anchor.
  Status add(Event e);
  // Inside, before COMMIT: ends the batch (writes the anchor when due). No-op without records.
  Status finish();
  // After COMMIT succeeded: marks the anchor written by finish() committed (a failure leaves it
  // pending, reported as lost_batch after a crash; logged, the records are durable).
  void committed();
  // Records appended since start().
  std::size_t added() const noexcept { return added_; }

 private:
  TxRecorder(Trail trail, SessionFn session, std::chrono::milliseconds anchor_interval)
      : trail_(std::move(trail)), session_(std::move(session)), anchor_interval_(anchor_interval) {}

  Trail trail_;
  SessionFn session_;
  std::chrono::milliseconds anchor_interval_;
  std::chrono::steady_clock::time_point last_anchor_{};
  hsm::Session* s_ = nullptr;
  std::optional<Batch> batch_;
  bool anchor_ = false;
  bool finished_ = false;
  std::size_t added_ = 0;
};

}  // namespace gs::audit
