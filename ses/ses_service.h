// The SES request path (DESIGN §1.1): decode, meter lookup, policy, invocation id, MT-2040
// signature and EAX' mode 2 through the HSM; C12.22 error responses for every refusal; an audit
// record of every secured command and every refusal, durable before the response leaves.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "c1222/message.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "hsm/hsm_aes.h"
#include "hsm/key_cache.h"
#include "hsm/session.h"
#include "ses/ses_config.h"
#include "src/audit.h"
#include "src/command_keys.h"
#include "src/command_signer.h"
#include "src/grants.h"
#include "src/handler_state.h"
#include "src/hsm_context.h"
#include "src/invocation_ids.h"
#include "src/key_store.h"
#include "src/meter_cache.h"
#include "src/metrics.h"
#include "src/policy.h"
#include "src/server.h"

namespace gs::ses {

// What one handler thread uses exclusively: session, KEK, cipher and key cache, store (shared
// with the DKUS, src/handler_state.h), plus the command-signing key.
struct WorkerState : HsmThreadState, StoreThreadState {
  WorkerState(std::size_t meter_cache, std::chrono::milliseconds ttl,
              std::chrono::milliseconds poll = store::MeterCache::kDefaultPoll)
      : StoreThreadState(meter_cache, ttl, poll) {}
  std::unique_ptr<HsmSigner> signer;
};

class SesService {
 public:
  // Opens the invocation-id allocator's own store connection; HSM and per-thread stores are
  // opened lazily by the handler threads (at most `threads` of them).
  // `limiter` holds the rate-limit buckets (shared memory when several workers run).
  static Result<std::unique_ptr<SesService>> create(const SesConfig& cfg, HsmContext& hsm,
                                                    policy::Policy policy,
                                                    policy::RateLimiter limiter,
                                                    metrics::Registry& registry,
                                                    std::size_t threads);
  ~SesService();

  // Opens one worker state now (HSM session, keys, store) so that start-up fails loudly.
  Status warm_up();

  // One framed request in, one framed response out (secured command or C12.22 error), handed
  // to `done`. With the audit on, the response is handed over only once the request's audit
  // record is durable (from the audit writer's thread); a secured command whose record cannot
  // be written is replaced by a `bsy` error, so no command leaves unrecorded.
  void handle(const server::RequestContext& ctx, Bytes request, server::Done done);

  // Audit records of this worker's start and stop ("system", gridseal-sesd). record_stop also
  // flushes the audit writer, signs a final checkpoint and seals the anchor; call it after the
  // server drained (responses in flight wait for their records).
  Status record_start(int worker);
  void record_stop(int worker);
  // A policy record of this worker ("system", subject the policy file; detail with its SHA-256):
  // policy_reloaded, or policy_reload_refused when SIGHUP kept the current policy.
  Status record_policy(std::string_view event, std::string_view file, std::string detail);

  metrics::Health health() const;

  // SIGHUP: requests that start after this call see `p`; those in flight finish under the old
  // policy. The rate-limit table size (meter_rate_slots) must not change (Errc::conflict).
  // Rate-limit grants are re-read at their next use, whatever the outcome.
  Status reload_policy(policy::Policy p);

 private:
  SesService(const SesConfig& cfg, HsmContext& hsm, policy::Policy policy,
             metrics::Registry& registry, policy::RateLimiter limiter,
             std::unique_ptr<store::KeyStore> id_store, ids::InvocationIdAllocator ids);

  struct Outcome {
    Bytes response;
    const char* result = "ok";  // metrics label
    std::optional<c1222::CommandClass> cls;
    // For the audit record.
    bool secured = false;            // a signed command is in `response`
    std::string subject;             // meter id or DR group name; empty when unknown
    std::string title;               // called AP title, dotted
    std::string request_id;          // the request's calling-AP-invocation-id, hex
    std::uint32_t invocation_id = 0; // of the secured command, or of the error response
    int key_id = -1;                 // meter key slot of a secured command
    std::uint8_t code = 0;           // refusals: the C12.22 response code
    std::string reason;              // refusals
    std::string grant;               // the rate-limit grant that admitted it beyond a limit
  };
  struct Pending;
  audit::Event audit_event(const server::RequestContext& ctx, const Outcome& o) const;
  void recorded(Pending& p, const Status& st);
  void finish(Outcome& o, std::chrono::steady_clock::time_point t0, server::Done& done);
  Outcome process(const server::RequestContext& ctx, ByteView request, WorkerState& w,
                  const policy::Policy& policy);
  // The signed-command parameters of a class and validity window (invocation id left 0).
  CommandParams params_for(c1222::CommandClass cls, const policy::Validity& v,
                           std::uint32_t now) const;
  // Rate limit (or a unit of a rate-limit grant of the client beyond it: its id into `grant`),
  // invocation id (into params) and HSM session for a command the policy allows; the refusal
  // when one of them fails.
  std::optional<Outcome> admit(const server::RequestContext& ctx, const c1222::Message& m,
                               const policy::Policy& pol, ByteView called, CommandParams& params,
                               WorkerState& w, std::string& grant);
  Outcome refuse(const server::RequestContext& ctx, const c1222::Message* request,
                 std::uint8_t code, const char* result, const std::string& reason);
  Status ensure_hsm(WorkerState& w);
  void drop_hsm(WorkerState& w);
  // Opens the rate-limit grant ledger with gs-audit's public key (no key: grants not honoured).
  Status open_grants(HsmContext& hsm);
  // Reads gs-revocation's public key (MT-2044 statements are verified with it; no key: every
  // statement is refused).
  Status open_revocation_key(HsmContext& hsm);

  const SesConfig& cfg_;
  HsmContext& hsm_;
  std::shared_ptr<const policy::Policy> current_policy() const;

  mutable std::mutex policy_mu_;
  std::shared_ptr<const policy::Policy> policy_;
  metrics::Registry& registry_;
  policy::RateLimiter limiter_;
  // Used only by the allocator, one reservation at a time (from its prefetch thread too).
  std::unique_ptr<store::KeyStore> id_store_;
  ids::InvocationIdAllocator ids_;
  // Rate-limit grants (src/grants.h): verified with gs-audit's public key, spent in blocks.
  std::unique_ptr<grants::GrantLedger> grants_;
  metrics::Counter& grant_units_;
  // gs-revocation's public key, read once from the HSM at start (src/command_keys.h).
  std::optional<HostEcKey> revocation_;

  StatePool<WorkerState> states_;

  metrics::Histogram& latency_;
  metrics::Counter& hsm_errors_;
  metrics::Counter& audit_failures_;
  // gridseal_ses_requests_total by (class, result): looked up once per pair, not per request
  // (a registry lookup builds its label strings). `result` is always a string literal.
  metrics::Counter& requests_counter(const Outcome& o);
  std::mutex requests_mu_;
  std::map<std::pair<int, const char*>, metrics::Counter*> requests_;
  std::atomic<bool> hsm_ok_{true};
  std::once_flag signing_noted_;  // the first worker state says how the command key signs
  std::atomic<bool> store_ok_{true};
  // Last member: stopped (its callbacks use the members above) before anything else goes.
  std::unique_ptr<audit::Writer> audit_;
  // audit.commit_on_handler (else empty): the commit of the queued records that is posted
  // behind the requests queued for the handler (RequestContext::defer), unless one is already
  // waiting (commit_posted_).
  std::function<void()> commit_queued_;
  std::atomic<bool> commit_posted_{false};
};

// The error PDU: from `ses_title` to the request's calling title (or `head_end`), A4 = the
// request's A8 when there is one, one response-code service in a mode-0 EPSEM.
Result<Bytes> error_response(const c1222::Message* request, const c1222::ApTitle& ses_title,
                             const c1222::ApTitle& head_end, std::uint8_t code,
                             std::uint32_t invocation_id);

}  // namespace gs::ses
