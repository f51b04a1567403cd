// The DKUS request path (DESIGN §1.2): a secured message from a meter in, the same message in
// mode 0 out (MAC verified in the HSM, EPSEM decrypted, replay defended durably, MT-2042
// receipts verified and stored), or a C12.22 error response from the DKUS AP title.
//
// Audit (issue 7, [audit] in dkus.toml): each refusal (code, result, reason) is appended by the
// batching audit::Writer and answered once its record committed (the handler thread does not
// wait: the writer thread answers, as the replay-state writer does for accepted messages); each
// stored MT-2042 receipt is recorded in the replay-state transaction that stores it
// (GroupCommitter); a meter flagged for failed MACs and its flag cleared by a good MAC are
// recorded; each worker's start and stop. A refusal whose record cannot be queued or written
// is still answered (counted in gridseal_dkus_audit_failures_total, health fails with the
// writer): refusing to refuse would keep nothing safer.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "c1222/message.h"
#include "dkus/dkus_config.h"
#include "dkus/replay.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "hsm/hsm_aes.h"
#include "hsm/key_cache.h"
#include "hsm/session.h"
#include "src/audit.h"
#include "src/hsm_context.h"
#include "src/invocation_ids.h"
#include "src/handler_state.h"
#include "src/key_store.h"
#include "src/meter_cache.h"
#include "src/metrics.h"
#include "src/server.h"

namespace gs::dkus {

// What one handler thread uses exclusively while it serves a request (src/handler_state.h).
struct ThreadState : HsmThreadState, StoreThreadState {
  ThreadState(std::size_t meter_cache, std::chrono::milliseconds ttl,
              std::chrono::milliseconds poll = store::MeterCache::kDefaultPoll)
      : StoreThreadState(meter_cache, ttl, poll) {}
};

class DkusService {
 public:
  // `started_at`: UTC seconds when the daemon (supervisor) started; with
  // dkus.refuse_sealed_before_start, messages sealed before it are refused (DESIGN §5).
  static Result<std::unique_ptr<DkusService>> create(const DkusConfig& cfg, HsmContext& hsm,
                                                     metrics::Registry& registry,
                                                     std::size_t threads,
                                                     std::uint32_t started_at);
  ~DkusService();

  // Opens one thread state now (HSM session, KEK, store) so that start-up fails loudly.
  Status warm_up();
  // Starts the replay-state writer.
  void start();
  // Commits what is queued and stops the writer (after the server drained).
  void stop();
  // The worker's start and stop records (no-ops with the audit off). record_stop: after stop();
  // appends the stop record, then flushes the audit writer, signs a final checkpoint and seals
  // the anchor.
  Status record_start(int worker);
  void record_stop(int worker);

  // One framed request in; `done` gets the response, possibly later from the writer thread
  // (an accepted message is answered only once its replay mark is durable).
  void handle(const server::RequestContext& ctx, Bytes request, server::Done done);

  metrics::Health health() const;

 private:
  DkusService(const DkusConfig& cfg, HsmContext& hsm, metrics::Registry& registry,
              std::unique_ptr<store::KeyStore> id_store, ids::InvocationIdAllocator ids,
              std::unique_ptr<GroupCommitter> committer, std::uint32_t started_at);

  // The result of the synchronous part: an immediate response, or an update handed to the
  // writer (response == nullopt) whose callback answers.
  struct Outcome {
    std::optional<Bytes> response;
    const char* result = "ok";
    std::uint8_t code = 0;  // of a refusal, with its reason (for the audit record)
    std::string reason;
  };
  struct Request;
  Outcome process(const server::RequestContext& ctx, ByteView request, ThreadState& w,
                  const std::shared_ptr<Request>& req);
  Outcome refuse(const server::RequestContext& ctx, const c1222::Message* request,
                 const std::string& meter, std::uint8_t code, const char* result,
                 const std::string& reason);
  Bytes error_pdu(const c1222::ApTitle* called, ByteView request_id, std::uint8_t code);
  void finish(const Request& req, Bytes response, const char* result);
  // Answers a refusal once its audit record is durable (at once with the audit off, or when
  // the record cannot be queued).
  void answer_refusal(const std::shared_ptr<Request>& req, Bytes response, const char* result,
                      std::uint8_t code, const std::string& reason);
  audit::Event event(const Request& req, const char* name) const;
  // Queues a record nobody waits for (flags); counts a failure to queue it.
  void record(audit::Event e);
  // After the count of MAC failures in a row of the meter changed: flag at the threshold.
  void mac_failed(const Request& req, const store::Meter& meter, std::uint32_t fails);
  void mac_good(const Request& req, const store::Meter& meter, std::uint32_t had_failed);
  // The rollover hook: a message opened under the pending `slot` confirms the meter's step.
  void confirm_pending(const store::Meter& meter, const store::KeySlot& slot, ThreadState& w,
                       ByteView title_abs, const std::string& meter_name);

  const DkusConfig& cfg_;
  HsmContext& hsm_;
  metrics::Registry& registry_;
  std::unique_ptr<store::KeyStore> id_store_;  // used only under the allocator's mutex
  ids::InvocationIdAllocator ids_;
  std::unique_ptr<GroupCommitter> committer_;
  const std::uint32_t started_at_;
  const Bytes dkus_title_abs_;
  ReplayMarks marks_;
  MacFailures mac_failures_;

  StatePool<ThreadState> states_;

  metrics::Histogram& latency_;
  metrics::Counter& hsm_errors_;
  metrics::Counter& flagged_;
  metrics::Counter& receipts_;
  metrics::Counter& confirmations_;  // rollover steps confirmed by a meter message
  metrics::Counter& unflagged_;
  metrics::Counter& audit_failures_;
  std::atomic<bool> hsm_ok_{true};
  std::atomic<bool> store_ok_{true};
  // Last: destroyed first, after the replay-state writer (whose callbacks record refusals) is
  // stopped.
  std::unique_ptr<audit::Writer> audit_;
};

// HELP of gridseal_rollover_confirmations_total, registered by the service (via="message")
// and the rollover engine (via="answer").
inline constexpr const char* kRolloverConfirmationsHelp =
    "Rollover steps confirmed: by the meter's answer to its key update (via=answer), or by a "
    "meter message under the new key (via=message)";

// The MT-2042 signed receipts in an opened (mode-0) meter message (DESIGN §3.3), each verified
// with the meter's registered ECC key and checked to be for the command the message answers
// (A4), in the form the DKUS stores them. One receipt that fails makes the whole message
// forged: then `forged`, with that receipt's command id and why (for the log and the refusal).
// Read responses of another shape claim nothing and are skipped.
struct ReceiptCheck {
  std::vector<store::Receipt> receipts;
  bool forged = false;
  std::uint64_t command_id = 0;
  std::string why;
};
ReceiptCheck check_receipts(const store::Meter& meter, const c1222::Message& opened,
                            std::uint64_t message_id, std::int64_t received_at);

// The error PDU: from `dkus_title` to `called` (the collection engine: the request's called
// title, or the configured head-end title), A4 = the request's A8 when it has one, one
// response-code service in a mode-0 EPSEM.
Result<Bytes> error_response(const c1222::ApTitle& called, ByteView request_invocation_id,
                             const c1222::ApTitle& dkus_title, std::uint8_t code,
                             std::uint32_t invocation_id);

}  // namespace gs::dkus
