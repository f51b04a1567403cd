// The DKUS request path: see dkus_service.h; replay defence in replay.h.
#include "dkus/dkus_service.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <unordered_map>

#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "gridseal/clock.h"
#include "hsm/ops.h"
#include "src/audit_recorder.h"
#include "src/host_ecdsa.h"
#include "src/rollover_store.h"

namespace gs::dkus {

namespace {

// The result label (metrics, audit) and the reason of a replay refusal (store::ReplayMark).
const char* replay_result(store::ReplayVerdict v) {
  return v == store::ReplayVerdict::too_old ? "too_old" : "replay";
}

std::string replay_why(std::uint64_t id, store::ReplayVerdict v, std::uint32_t window) {
  if (v == store::ReplayVerdict::too_old) {
    return "invocation id " + std::to_string(id) + " older than the reorder window (" +
           std::to_string(window) + " ids)";
  }
  return "invocation id " + std::to_string(id) + " replayed";
}

// A read response of exactly the MT-2042 shape: `00 006E <110 data bytes> <checksum>`.
bool receipt_shaped(ByteView service) {
  return service.size() == 1 + 2 + c1222::kReceiptDataSize + 1 && service[0] == c1222::kRespOk &&
         service[1] == 0x00 && service[2] == c1222::kReceiptDataSize;
}

bool usable_for_decryption(store::KeyState s) {
  // Active, or during a rollover the pending (new) and standby (previous) slots (DESIGN §1.3).
  return s == store::KeyState::active || s == store::KeyState::pending ||
         s == store::KeyState::standby;
}

}  // namespace

// A request whose answer may be given by the writer thread.
struct DkusService::Request {
  server::RequestContext ctx;
  server::Done done;
  std::chrono::steady_clock::time_point t0;
  std::optional<c1222::OwnedApTitle> called;  // the request's called title (error addressing)
  Bytes request_id;                           // its A8 content (A4 of an error response)
  std::string meter = "-";                    // dotted calling title, for logs
  std::string meter_id;                       // once the meter is known (audit subject)
  std::int64_t meter_row = 0;
  bool has_id = false;  // invocation_id was read from the message
  int key_id = -1;
  std::uint64_t invocation_id = 0;
  Bytes opened;  // the mode-0 answer, released after the commit
};

Result<Bytes> error_response(const c1222::ApTitle& called, ByteView request_invocation_id,
                             const c1222::ApTitle& dkus_title, std::uint8_t code,
                             std::uint32_t invocation_id) {
  c1222::Message m;
  m.called_ap_title = called;
  if (!request_invocation_id.empty()) m.called_ap_invocation_id = request_invocation_id;
  m.calling_ap_title = dkus_title;
  const Bytes id = ids::encode_id(invocation_id);
  m.calling_ap_invocation_id = ByteView(id);
  Bytes epsem{c1222::kEpsemReserved};  // mode 0, response control bits 0
  const std::uint8_t service[1] = {code};
  c1222::append_service(epsem, ByteView(service, 1));
  m.epsem = epsem;
  return c1222::encode(m);
}

ReceiptCheck check_receipts(const store::Meter& meter, const c1222::Message& opened,
                            std::uint64_t message_id, std::int64_t received_at) {
  ReceiptCheck out;
  auto oe = c1222::split_epsem(opened.epsem, opened.epsem_offset);
  auto services = oe.ok() ? c1222::split_services(oe->body, opened.epsem_offset)
                          : Result<std::vector<c1222::ServiceSpan>>(oe.error());
  if (!services.ok()) return out;
  for (const c1222::ServiceSpan& s : *services) {
    if (!receipt_shaped(s.bytes)) continue;
    auto r = c1222::decode_receipt_response(s.bytes);
    if (!r.ok()) continue;  // not a receipt (other table, other version): claims nothing
    auto forged = [&](std::string why) {
      out.receipts.clear();
      out.forged = true;
      out.command_id = r->invocation_id;
      out.why = std::move(why);
      return out;
    };
    if (meter.public_key.size() != c1222::kPublicPointSize) {
      return forged("the meter has no registered public key");
    }
    if (opened.called_ap_invocation_id) {
      auto a4 = c1222::invocation_id_value(*opened.called_ap_invocation_id);
      if (!a4.ok() || *a4 != r->invocation_id) {
        return forged("it is for invocation id " + std::to_string(r->invocation_id) +
                      ", the response answers another");
      }
    }
    auto signed_bytes = c1222::receipt_signed_bytes(meter.ap_title, *r);
    if (!signed_bytes.ok()) return forged(signed_bytes.error().message());
    auto digest = sha256(*signed_bytes);
    auto pub = HostEcKey::from_public(meter.public_key);
    if (!digest.ok() || !pub.ok()) return forged("cannot check it");
    if (auto st = pub->verify(*digest, r->signature); !st.ok()) {
      return forged("signature does not verify with the registered key");
    }
    if (out.receipts.size() >= c1222::kMaxServices) break;
    store::Receipt rec;
    rec.meter_row = meter.row;
    rec.invocation_id = r->invocation_id;
    rec.result = r->result;
    rec.executed_at = r->executed_at;
    rec.command_digest.assign(r->command_digest.begin(), r->command_digest.end());
    rec.signature.assign(r->signature.begin(), r->signature.end());
    rec.message_id = message_id;
    rec.received_at = received_at;
    out.receipts.push_back(std::move(rec));
  }
  return out;
}

DkusService::DkusService(const DkusConfig& cfg, HsmContext& hsm, metrics::Registry& registry,
                         std::unique_ptr<store::KeyStore> id_store, ids::InvocationIdAllocator ids,
                         std::unique_ptr<GroupCommitter> committer, std::uint32_t started_at)
    : cfg_(cfg),
      hsm_(hsm),
      registry_(registry),
      id_store_(std::move(id_store)),
      ids_(std::move(ids)),
      committer_(std::move(committer)),
      started_at_(started_at),
      dkus_title_abs_(cfg.dkus_title.view().absolute(cfg.base_oid)),
      marks_(cfg.replay_marks, cfg.reorder_window),
      mac_failures_(cfg.replay_marks, cfg.mac_failure_threshold),
      latency_(registry.histogram("gridseal_dkus_request_seconds",
                                  "Time from request received to response released",
                                  metrics::latency_buckets())),
      hsm_errors_(registry.counter("gridseal_dkus_hsm_errors_total",
                                   "HSM operations that failed")),
      flagged_(registry.counter("gridseal_dkus_meters_flagged_total",
                                "Meters whose MAC failed mac_failure_threshold times in a row")),
      receipts_(registry.counter("gridseal_dkus_receipts_stored_total",
                                 "MT-2042 signed receipts verified and stored")),
      confirmations_(registry.counter("gridseal_rollover_confirmations_total",
                                      kRolloverConfirmationsHelp, {{"via", "message"}})),
      unflagged_(registry.counter("gridseal_dkus_meters_unflagged_total",
                                  "Flagged meters whose next message had a good MAC")),
      audit_failures_(registry.counter("gridseal_dkus_audit_failures_total",
                                       "Audit records (refusals, flags) not written")) {}

DkusService::~DkusService() {
  stop();
  if (audit_) audit_->stop();
  states_.drain([](ThreadState& w) { w.drop_hsm(); });
}

Result<std::unique_ptr<DkusService>> DkusService::create(const DkusConfig& cfg, HsmContext& hsm,
                                                         metrics::Registry& registry,
                                                         std::size_t threads,
                                                         std::uint32_t started_at) {
  db::OpenOptions opt;
  opt.create = false;
  auto open_store = [&]() -> Result<store::KeyStore> {
    auto ks = store::KeyStore::open(cfg.base.store.path, opt);
    if (!ks.ok()) {
      return Error(ks.error().code, cfg.base.store.path + ": " + ks.error().message());
    }
    return ks;
  };
  GS_ASSIGN(auto ks, open_store());
  auto id_store = std::make_unique<store::KeyStore>(std::move(ks));
  ids::AllocatorOptions aopt;
  aopt.block_size = cfg.id_block_size;
  GS_ASSIGN(auto alloc, ids::InvocationIdAllocator::over(*id_store, aopt));
  GS_ASSIGN(auto writer_store, open_store());
  CommitterOptions copt;
  copt.max_delay = std::chrono::microseconds(cfg.commit_max_delay_us);
  copt.max_batch = cfg.commit_max_batch;
  copt.max_pending = cfg.max_pending;
  copt.reorder_window = cfg.reorder_window;
  copt.around_done = server::run_batched;  // a commit's responses reach the loop together
  auto committer = std::make_unique<GroupCommitter>(std::move(writer_store), copt, registry);
  GS_TRY(committer->checkpoint_off_the_commit_path(cfg.base.store.path));
  if (cfg.audit.enabled) {
    GS_TRY(committer->enable_audit(hsm, std::chrono::milliseconds(cfg.audit.anchor_interval_ms)));
  }
  std::unique_ptr<DkusService> s(new DkusService(cfg, hsm, registry, std::move(id_store),
                                                 std::move(alloc), std::move(committer),
                                                 started_at));
  for (std::size_t i = 0; i < threads; ++i) {
    auto w = std::make_unique<ThreadState>(cfg.meter_cache,
                                           std::chrono::milliseconds(cfg.meter_cache_ttl_ms),
                                           std::chrono::milliseconds(cfg.meter_cache_poll_ms));
    w->count_key_lookups(registry);
    s->states_.add(std::move(w));
  }
  DkusService* raw = s.get();
  registry.gauge_fn("gridseal_dkus_commit_queue", "Replay-mark updates waiting for a commit", {},
                    [raw] { return static_cast<double>(raw->committer_->pending()); });
  registry.gauge_fn("gridseal_dkus_replay_marks", "Meters with an in-memory replay mark", {},
                    [raw] { return static_cast<double>(raw->marks_.size()); });
  registry.gauge_fn("gridseal_dkus_meters_flagged",
                    "Meters flagged now: MAC failed mac_failure_threshold times in a row (this "
                    "worker), no good MAC since",
                    {}, [raw] { return static_cast<double>(raw->mac_failures_.flagged()); });
  if (cfg.audit.enabled) {
    auto w = audit::Writer::open(cfg.base.store.path, hsm,
                                 daemon::audit_writer_options(cfg.audit, "gridseal-dkusd",
                                                              cfg.server.sched_batch),
                                 &registry);
    if (!w.ok()) return Error(w.error().code, cfg.base.store.path + ": " + w.error().message());
    s->audit_ = std::move(w).value();
  }
  return s;
}

void DkusService::start() { committer_->start(); }
void DkusService::stop() {
  if (committer_) committer_->stop();
}

Status DkusService::warm_up() {
  auto w = states_.take();
  Status st = w->ensure_store(cfg_.base.store.path);
  if (st.ok()) st = w->ensure_hsm(hsm_, cfg_.base.hsm.key_cache);
  states_.give(std::move(w));
  return st;
}

metrics::Health DkusService::health() const {
  if (!hsm_ok_.load()) return {false, "HSM operations failing"};
  if (!store_ok_.load() || !committer_->healthy()) return {false, "database failing"};
  if (audit_ && !audit_->healthy()) return {false, "audit trail failing"};
  return {true, "ok"};
}

Status DkusService::record_start(int worker) {
  return audit_ ? audit::record_worker_start(*audit_, "gridseal-dkusd", worker) : Status{};
}

void DkusService::record_stop(int worker) {
  if (audit_) audit::record_worker_stop(*audit_, "gridseal-dkusd", worker);
}

// What the audit keeps of a request: who (the TLS client subject of the collection engine), the
// meter, and what the message claimed (invocation id, key id). Never key material or message
// contents.
audit::Event DkusService::event(const Request& req, const char* name) const {
  audit::Event e;
  e.actor = audit::clip(req.ctx.client_identity.empty() ? "-" : req.ctx.client_identity,
                        audit::kMaxActor);
  e.event = name;
  e.subject = audit::clip(req.meter_id.empty() ? req.meter : req.meter_id, audit::kMaxSubject);
  return e;
}

void DkusService::record(audit::Event e) {
  if (!audit_) return;
  audit::Item item;
  item.event = std::move(e);
  item.done = [this](const Status& st) {
    if (!st.ok()) audit_failures_.inc();
  };
  if (Status st = audit_->submit(std::move(item)); !st.ok()) audit_failures_.inc();
}

void DkusService::answer_refusal(const std::shared_ptr<Request>& req, Bytes response,
                                 const char* result, std::uint8_t code,
                                 const std::string& reason) {
  if (!audit_) {
    finish(*req, std::move(response), result);
    return;
  }
  audit::Event e = event(*req, "refusal");
  audit::Detail d;
  if (req->meter != "-") d.add("title", req->meter);
  d.add("code", c1222::response_code_name(code)).add("result", result).add("reason", reason);
  if (req->has_id) d.add("invocation_id", req->invocation_id);
  if (req->key_id >= 0) d.add("key_id", req->key_id);
  if (response.empty()) d.add("connection", "closed");
  d.add("peer", req->ctx.peer);
  if (!req->ctx.client_cert_sha256.empty()) {
    d.add("client_cert_sha256", req->ctx.client_cert_sha256);
  }
  e.detail = d.str();
  // The response waits in the item (shared: submit() may refuse the item, keeping nothing).
  auto answer = std::make_shared<Bytes>(std::move(response));
  audit::Item item;
  item.event = std::move(e);
  item.done = [this, req, answer, result](const Status& st) {
    if (!st.ok()) audit_failures_.inc();
    finish(*req, std::move(*answer), result);
  };
  if (Status st = audit_->submit(std::move(item)); !st.ok()) {
    audit_failures_.inc();
    finish(*req, std::move(*answer), result);
  }
}

void DkusService::mac_failed(const Request& req, const store::Meter& meter, std::uint32_t fails) {
  if (fails != cfg_.mac_failure_threshold) return;  // once per run of failures
  flagged_.inc();
  std::fprintf(stderr,
               "gridseal-dkusd: meter flagged meter=%s meter_id=%s mac_failures=%u: MAC "
               "failed %u times in a row\n",
               req.meter.c_str(), meter.meter_id.c_str(), fails, fails);
  audit::Event e = event(req, "meter_flagged");
  audit::Detail d;
  d.add("title", req.meter).add("mac_failures", fails);
  d.add("threshold", cfg_.mac_failure_threshold);
  if (req.has_id) d.add("invocation_id", req.invocation_id);
  if (req.key_id >= 0) d.add("key_id", req.key_id);
  d.add("peer", req.ctx.peer).add("pid", static_cast<std::int64_t>(::getpid()));
  e.detail = d.str();
  record(std::move(e));
}

void DkusService::mac_good(const Request& req, const store::Meter& meter,
                           std::uint32_t had_failed) {
  if (had_failed < cfg_.mac_failure_threshold) return;
  unflagged_.inc();
  std::fprintf(stderr,
               "gridseal-dkusd: meter flag cleared meter=%s meter_id=%s: good MAC after %u "
               "failures in a row\n",
               req.meter.c_str(), meter.meter_id.c_str(), had_failed);
  audit::Event e = event(req, "meter_flag_cleared");
  audit::Detail d;
  d.add("title", req.meter).add("mac_failures", had_failed);
  if (req.has_id) d.add("invocation_id", req.invocation_id);
  if (req.key_id >= 0) d.add("key_id", req.key_id);
  d.add("peer", req.ctx.peer).add("pid", static_cast<std::int64_t>(::getpid()));
  e.detail = d.str();
  record(std::move(e));
}

Bytes DkusService::error_pdu(const c1222::ApTitle* called, ByteView request_id,
                             std::uint8_t code) {
  auto id = ids_.next(dkus_title_abs_, static_cast<std::int64_t>(utc_now()));
  if (!id.ok()) {
    store_ok_ = false;
    return {};  // empty: the connection closes
  }
  auto pdu = error_response(called != nullptr ? *called : cfg_.head_end_title.view(), request_id,
                            cfg_.dkus_title.view(), code, *id);
  return pdu.ok() ? std::move(pdu).value() : Bytes{};
}

DkusService::Outcome DkusService::refuse(const server::RequestContext& ctx,
                                         const c1222::Message* request, const std::string& meter,
                                         std::uint8_t code, const char* result,
                                         const std::string& reason) {
  server::log_refusal("gridseal-dkusd", ctx, meter, c1222::response_code_name(code), reason);
  Outcome o;
  o.result = result;
  o.code = code;
  o.reason = reason;
  const c1222::ApTitle* called = nullptr;
  ByteView request_id;
  if (request != nullptr) {
    if (request->called_ap_title) called = &*request->called_ap_title;
    if (request->calling_ap_invocation_id) request_id = *request->calling_ap_invocation_id;
  }
  o.response = error_pdu(called, request_id, code);
  return o;
}

void DkusService::finish(const Request& req, Bytes response, const char* result) {
  latency_.observe(std::chrono::steady_clock::now() - req.t0);
  // The registry lookup takes a mutex: remember each result's counter per thread (results are
  // string literals; a literal seen under two addresses just gets two cache entries).
  thread_local std::unordered_map<const char*, metrics::Counter*> counters;
  thread_local const metrics::Registry* owner = nullptr;
  if (owner != &registry_) {
    counters.clear();
    owner = &registry_;
  }
  auto it = counters.find(result);
  if (it == counters.end()) {
    it = counters
             .emplace(result, &registry_.counter("gridseal_dkus_requests_total",
                                                 "Meter messages by result",
                                                 {{"result", result}}))
             .first;
  }
  it->second->inc();
  req.done(std::move(response));
}

void DkusService::handle(const server::RequestContext& ctx, Bytes request, server::Done done) {
  auto req = std::make_shared<Request>();
  req->ctx = ctx;
  req->done = std::move(done);
  req->t0 = std::chrono::steady_clock::now();
  auto w = states_.take();
  Outcome o = process(ctx, request, *w, req);
  states_.give(std::move(w));
  if (o.response) answer_refusal(req, std::move(*o.response), o.result, o.code, o.reason);
}

void DkusService::confirm_pending(const store::Meter& meter, const store::KeySlot& slot,
                                  ThreadState& w, ByteView title_abs,
                                  const std::string& meter_name) {
  store::RolloverStore rollover(*w.store);
  // The key-state change and its audit record in one transaction, as the rollover engine does
  // (rare: once per meter and rollover, so a recorder of its own each time).
  std::optional<audit::TxRecorder> rec;
  if (cfg_.audit.enabled) {
    auto r = audit::TxRecorder::over(
        w.store->db(),
        [&w]() -> Result<hsm::Session*> {
          if (!w.hsm_ready()) return Error(Errc::hsm_failure, "audit: HSM session lost");
          return &w.lease->session();
        },
        std::chrono::milliseconds(cfg_.audit.anchor_interval_ms));
    if (!r.ok()) {
      std::fprintf(stderr, "gridseal-dkusd: rollover confirm not recorded meter=%s: %s\n",
                   meter_name.c_str(), r.error().message().c_str());
      return;  // the key stays pending (usable); the engine confirms later
    }
    rec.emplace(std::move(r).value());
    rollover.set_audit(&*rec);
  }
  auto confirmed = rollover.confirm(meter.row, static_cast<std::uint8_t>(slot.slot),
                                    slot.key_version);
  w.meters.invalidate(title_abs);  // the slot states changed (here or in another process)
  if (!confirmed.ok()) {
    // Not fatal for this message: the key stays pending (usable), the engine confirms later.
    std::fprintf(stderr,
                 "gridseal-dkusd: rollover confirm failed meter=%s meter_id=%s slot=%d: %s\n",
                 meter_name.c_str(), meter.meter_id.c_str(), slot.slot,
                 confirmed.error().message().c_str());
    return;
  }
  if (*confirmed) confirmations_.inc();
}

DkusService::Outcome DkusService::process(const server::RequestContext& ctx, ByteView request,
                                          ThreadState& w, const std::shared_ptr<Request>& req) {
  c1222::DecodeLimits limits;
  limits.max_message = cfg_.server.max_frame;
  auto decoded = c1222::decode(request, limits);
  if (!decoded.ok()) {
    return refuse(ctx, nullptr, "-", c1222::kRespErr, "malformed",
                  "cannot decode: " + decoded.error().message());
  }
  const c1222::Message& m = *decoded;
  if (!m.calling_ap_title) {
    return refuse(ctx, &m, "-", c1222::kRespUat, "unknown_meter", "no calling AP title");
  }
  const std::string meter_name = m.calling_ap_title->dotted();
  req->meter = meter_name;
  if (audit_ && m.calling_ap_invocation_id) {  // for the record of an early refusal
    auto claimed = c1222::invocation_id_value(*m.calling_ap_invocation_id);
    if (claimed.ok()) {
      req->invocation_id = *claimed;
      req->has_id = true;
    }
  }
  auto sme = [&](const char* result, const std::string& why) {
    return refuse(ctx, &m, meter_name, c1222::kRespSme, result, why);
  };

  // The meter, by its (calling) AP title.
  if (auto st = w.ensure_store(cfg_.base.store.path); !st.ok()) {
    store_ok_ = false;
    return refuse(ctx, &m, meter_name, c1222::kRespBsy, "store_error", st.error().message());
  }
  const Bytes title_abs = m.calling_ap_title->absolute(cfg_.base_oid);
  const std::uint64_t hits_before = w.meters.hits();
  auto cached = w.meters.by_title(*w.store, title_abs);
  if (!cached.ok()) {
    store_ok_ = false;
    return refuse(ctx, &m, meter_name, c1222::kRespBsy, "store_error", cached.error().message());
  }
  store_ok_ = true;
  const bool from_cache = w.meters.hits() != hits_before;
  std::shared_ptr<const store::Meter> meter = *cached;  // alive for the whole request
  if (meter == nullptr) {
    return refuse(ctx, &m, meter_name, c1222::kRespUat, "unknown_meter", "unknown meter");
  }
  if (audit_) req->meter_id = meter->meter_id;
  // A quarantined meter (its key revoked, a rekey under way) is heard only under its new,
  // pending key: that message confirms the rekey (below). Anything else from it is refused.
  auto meter_refused = [&] {
    return refuse(ctx, &m, meter_name, c1222::kRespIsc, "meter_refused",
                  std::string("meter ") + meter->meter_id + " is " + store::to_string(meter->state));
  };
  if (meter->state == store::MeterState::compromised) return meter_refused();

  // Cheap checks first: security mode, AC, invocation id, IV time, the in-memory mark.
  auto epsem = c1222::split_epsem(m.epsem, m.epsem_offset);
  if (!epsem.ok()) {
    return refuse(ctx, &m, meter_name, c1222::kRespErr, "malformed", epsem.error().message());
  }
  if (c1222::security_mode(epsem->control) == c1222::SecurityMode::cleartext) {
    return sme("not_secured", "message is not secured (mode 0)");
  }
  if (!m.auth || !m.auth->iv) return sme("bad_security", "no IV in calling-authentication-value");
  const std::uint8_t key_id = m.auth->key_id.value_or(0);
  req->key_id = key_id;
  auto id = c1222::invocation_id_value(*m.calling_ap_invocation_id);
  if (!id.ok() || *id > static_cast<std::uint64_t>(INT64_MAX)) {
    return sme("bad_security", "calling-AP-invocation-id not usable");
  }
  req->invocation_id = *id;
  req->has_id = true;
  const auto& iv = *m.auth->iv;
  const std::uint32_t iv_time = (std::uint32_t{iv[0]} << 24) | (std::uint32_t{iv[1]} << 16) |
                                (std::uint32_t{iv[2]} << 8) | std::uint32_t{iv[3]};
  const std::uint32_t now = utc_now();
  const std::int64_t skew = static_cast<std::int64_t>(iv_time) - static_cast<std::int64_t>(now);
  if (skew < -static_cast<std::int64_t>(cfg_.iv_window_s) ||
      skew > static_cast<std::int64_t>(cfg_.iv_window_s)) {
    return sme("stale", "IV time " + std::to_string(iv_time) + " is " + std::to_string(skew) +
                            " s from now (window " + std::to_string(cfg_.iv_window_s) + " s)");
  }
  if (cfg_.refuse_sealed_before_start && iv_time < started_at_) {
    return sme("stale", "sealed before this DKUS started (IV time " + std::to_string(iv_time) +
                            ")");
  }
  if (const store::ReplayVerdict v = marks_.check(meter->row, *id);
      v != store::ReplayVerdict::accepted) {
    return sme(replay_result(v), replay_why(*id, v, cfg_.reorder_window));
  }

  // The key by key id: active, or pending/standby during a rollover. A record from the meter
  // cache may predate a rollover step (a new pending slot, a slot reused for a new key): when
  // the key id or the MAC does not fit it, the record is read from the store once more.
  auto hsm_refusal = [&](const std::string& why) {
    hsm_errors_.inc();
    hsm_ok_ = false;
    w.drop_hsm();  // rebuilt (session, handles, key cache) on the next request
    return refuse(ctx, &m, meter_name, c1222::kRespBsy, "hsm_error", why);
  };
  auto usable = [&meter](const store::KeySlot* k) {
    return k != nullptr && usable_for_decryption(k->state) && !k->wrapped.empty() &&
           (meter->state == store::MeterState::active || k->state == store::KeyState::pending);
  };
  c1222::SealOptions sopt;
  sopt.base_oid = cfg_.base_oid;
  const store::KeySlot* slot = meter->slot_for_key_id(key_id);
  Result<c1222::Opened> opened = Error(Errc::bad_mac, "MAC does not verify");
  std::optional<std::string> key_error;
  for (bool reread = !from_cache;;) {
    if (usable(slot)) {
      // MAC (constant time, in the codec) and decryption, under the key in the HSM.
      if (auto st = w.ensure_hsm(hsm_, cfg_.base.hsm.key_cache); !st.ok()) {
        return hsm_refusal(st.error().message());
      }
      const std::uint64_t key_ref =
          static_cast<std::uint64_t>(meter->row) * store::kSlotsPerMeter +
          static_cast<std::uint64_t>(slot->slot);
      hsm::KeyAux* aux = nullptr;
      auto handle = w.meter_key(key_ref, *slot, &aux);
      if (!handle.ok()) {
        // A cached record may name a KEK generation destroyed since a rotation re-wrapped the
        // slot (src/kek_rotation.h): read once more before this counts as an HSM failure.
        if (reread || (w.lease && (*w.lease)->lost())) {
          return hsm_refusal(handle.error().message());
        }
        key_error = handle.error().message();
      } else {
        key_error.reset();
        auto eax = eax_for_key(*w.aes, *handle, aux);
        if (!eax.ok()) return hsm_refusal(eax.error().message());
        opened = c1222::open(m, [&](std::uint8_t) { return &*eax; }, sopt);
        if (opened.ok() || opened.error().code != Errc::bad_mac) break;
      }
    }
    if (reread) break;
    reread = true;
    w.meters.invalidate(title_abs);
    auto fresh = w.meters.by_title(*w.store, title_abs);
    if (!fresh.ok() || *fresh == nullptr || (*fresh)->state == store::MeterState::compromised) {
      break;
    }
    const bool was_usable = usable(slot);
    const Bytes was_wrapped = slot != nullptr ? slot->wrapped : Bytes{};
    meter = *fresh;
    slot = meter->slot_for_key_id(key_id);
    if (!usable(slot) || (was_usable && slot->wrapped == was_wrapped)) break;  // nothing new
  }
  if (key_error) return hsm_refusal(*key_error);
  if (!usable(slot)) {
    if (meter->state != store::MeterState::active) return meter_refused();
    return sme("bad_key_id", "no usable key for key id " + std::to_string(key_id) +
                                 (slot != nullptr ? std::string(" (") +
                                                        store::to_string(slot->state) + ")"
                                                  : std::string()));
  }
  if (!opened.ok()) {
    const Errc e = opened.error().code;
    if (e == Errc::bad_mac) {
      req->meter_id = meter->meter_id;
      mac_failed(*req, *meter, mac_failures_.fail(meter->row));
      return sme("bad_mac", "MAC does not verify");
    }
    if (e == Errc::short_cleartext) return sme("bad_security", opened.error().message());
    if (e == Errc::hsm_failure || e == Errc::crypto_failure || e == Errc::busy ||
        (w.lease && (*w.lease)->lost())) {
      return hsm_refusal(opened.error().message());
    }
    return refuse(ctx, &m, meter_name, c1222::kRespErr, "malformed", opened.error().message());
  }
  hsm_ok_ = true;
  if (const std::uint32_t had = mac_failures_.success(meter->row); had > 0) {
    req->meter_id = meter->meter_id;
    mac_good(*req, *meter, had);
  }
  // A good MAC under a pending key: the meter proved it derived the new key (DESIGN §3.2, only
  // its private key and the HSM can), so its rollover step is confirmed. Rare (once per meter
  // and rollover, usually the engine confirms first), so it commits here on its own.
  if (slot->state == store::KeyState::pending) {
    confirm_pending(*meter, *slot, w, title_abs, meter_name);
  }

  // MT-2042 signed receipts in the cleartext: each one must verify with the meter's own key.
  auto om = c1222::decode(opened->wire, limits);
  if (!om.ok()) {
    return refuse(ctx, &m, meter_name, c1222::kRespErr, "malformed", om.error().message());
  }
  ReceiptCheck rc = check_receipts(*meter, *om, *id, now);
  if (rc.forged) {
    std::fprintf(stderr,
                 "gridseal-dkusd: forged receipt meter=%s meter_id=%s command_id=%llu: %s\n",
                 meter_name.c_str(), meter->meter_id.c_str(),
                 static_cast<unsigned long long>(rc.command_id), rc.why.c_str());
    return sme("forged_receipt", "MT-2042 receipt refused: " + rc.why);
  }
  std::vector<store::Receipt> receipts = std::move(rc.receipts);
  // Their audit records, appended in the transaction that stores them (replay.h).
  std::vector<audit::Event> receipt_records;
  if (audit_) {
    for (const store::Receipt& r : receipts) {
      audit::Event e = event(*req, "receipt");
      audit::Detail d;
      d.add("title", meter_name).add("invocation_id", r.invocation_id);
      d.add("result", std::uint64_t{r.result}).add("executed_at", r.executed_at);
      d.add("command_digest", to_hex(r.command_digest)).add("signature", to_hex(r.signature));
      d.add("message_id", r.message_id).add("key_id", key_id).add("peer", ctx.peer);
      e.detail = d.str();
      receipt_records.push_back(std::move(e));
    }
  }

  // Claim the id in memory, then make it durable; the answer leaves after the commit.
  if (const store::ReplayVerdict v = marks_.claim(meter->row, *id);
      v != store::ReplayVerdict::accepted) {
    return sme(replay_result(v), replay_why(*id, v, cfg_.reorder_window));
  }
  req->called.reset();
  if (m.called_ap_title) {
    req->called = c1222::OwnedApTitle{m.called_ap_title->form,
                                      Bytes(m.called_ap_title->oid.begin(),
                                            m.called_ap_title->oid.end())};
  }
  req->request_id.assign(m.calling_ap_invocation_id->begin(), m.calling_ap_invocation_id->end());
  req->meter_row = meter->row;
  req->invocation_id = *id;
  req->opened = std::move(opened->wire);
  const std::size_t n_receipts = receipts.size();

  MarkUpdate u;
  u.meter = meter->row;
  u.invocation_id = *id;
  u.iv_time = iv_time;
  u.receipts = std::move(receipts);
  u.receipt_records = std::move(receipt_records);
  u.done = [this, req, n_receipts](CommitOutcome c) {
    const c1222::ApTitle called_view = req->called ? req->called->view() : c1222::ApTitle{};
    const c1222::ApTitle* called = req->called ? &called_view : nullptr;
    switch (c) {
      case CommitOutcome::committed:
        if (n_receipts > 0) receipts_.inc(n_receipts);
        finish(*req, std::move(req->opened), "ok");
        return;
      case CommitOutcome::replayed:
      case CommitOutcome::too_old: {
        // The claim stays: the stored window refuses this id from now on too (replay.h).
        const store::ReplayVerdict v = c == CommitOutcome::replayed
                                           ? store::ReplayVerdict::replayed
                                           : store::ReplayVerdict::too_old;
        const std::string why = replay_why(req->invocation_id, v, cfg_.reorder_window);
        server::log_refusal("gridseal-dkusd", req->ctx, req->meter, "sme", why);
        answer_refusal(req, error_pdu(called, req->request_id, c1222::kRespSme),
                       replay_result(v), c1222::kRespSme, why);
        return;
      }
      case CommitOutcome::failed: {
        marks_.release(req->meter_row, req->invocation_id);
        store_ok_ = false;
        const std::string why = n_receipts > 0 ? "replay state (and receipts) not committed"
                                               : "replay state not committed";
        server::log_refusal("gridseal-dkusd", req->ctx, req->meter, "bsy", why);
        answer_refusal(req, error_pdu(called, req->request_id, c1222::kRespBsy), "store_error",
                       c1222::kRespBsy, why);
        return;
      }
    }
  };
  if (auto st = committer_->submit(std::move(u)); !st.ok()) {
    marks_.release(meter->row, *id);
    return refuse(ctx, &m, meter_name, c1222::kRespBsy, "busy", st.error().message());
  }
  return Outcome{};  // answered by the replay-state writer
}

}  // namespace gs::dkus
