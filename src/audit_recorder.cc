// Audit records inside a caller's transaction (see audit_recorder.h).
#include "src/audit_recorder.h"

#include <cstdio>

namespace gs::audit {

Result<TxRecorder> TxRecorder::over(db::Db& db, SessionFn session,
                                    std::chrono::milliseconds anchor_interval) {
  if (!session) return Error(Errc::invalid_argument, "audit recorder needs an HSM session");
  GS_ASSIGN(auto trail, Trail::over(db));
  return TxRecorder(std::move(trail), std::move(session), anchor_interval);
}

Status TxRecorder::start() {
  batch_.reset();
  finished_ = false;
  anchor_ = false;
  added_ = 0;
  s_ = nullptr;
  GS_ASSIGN(hsm::Session * s, session_());
  if (s == nullptr) return Error(Errc::hsm_failure, "audit: no HSM session");
  s_ = s;
  return {};
}

Status TxRecorder::add(Event e) {
  if (s_ == nullptr) return Error(Errc::invalid_argument, "audit: record added outside a transaction");
  if (finished_) return Error(Errc::invalid_argument, "audit: record added after finish");
  if (e.actor.empty()) e.actor = kSystemActor;
  GS_TRY(validate(e));
  if (!batch_) {
    anchor_ = anchor_interval_.count() == 0 ||
              std::chrono::steady_clock::now() - last_anchor_ >= anchor_interval_;
    GS_ASSIGN(auto b, trail_.begin(*s_, anchor_));
    batch_.emplace(std::move(b));
  }
  GS_ASSIGN(Head h, trail_.add(*batch_, e));
  (void)h;
  ++added_;
  return {};
}

Status TxRecorder::finish() {
  if (!batch_ || finished_) return {};
  GS_TRY(trail_.finish(*s_, *batch_, /*checkpoint=*/false, anchor_));
  finished_ = true;
  return {};
}

void TxRecorder::committed() {
  if (batch_ && finished_ && s_ != nullptr) {
    if (batch_->anchored) last_anchor_ = std::chrono::steady_clock::now();
    if (Status c = trail_.confirm(*s_, *batch_); !c.ok()) {
      std::fprintf(stderr, "gridseal: audit: confirming the anchor failed: %s\n",
                   c.error().message().c_str());
    }
  }
  batch_.reset();
  finished_ = false;
  s_ = nullptr;
}

}  // namespace gs::audit
