// The DKUS request path: see dkus_service.h; replay defence in replay.h.
#include "dkus/dkus_service.h"

#include <chrono>
#include <cstdio>
#include <unordered_map>

#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "gridseal/clock.h"
#include "hsm/ops.h"
#include "src/host_ecdsa.h"
#include "src/rollover_store.h"

namespace gs::dkus {

namespace {


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
  std::int64_t meter_row = 0;
  std::uint64_t invocation_id = 0;
  std::uint64_t previous_mark = 0;
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
      marks_(cfg.replay_marks),
      mac_failures_(cfg.replay_marks),
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
                                      kRolloverConfirmationsHelp, {{"via", "message"}})) {}

DkusService::~DkusService() {
  stop();
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
  auto committer = std::make_unique<GroupCommitter>(std::move(writer_store), copt, registry);
  std::unique_ptr<DkusService> s(new DkusService(cfg, hsm, registry, std::move(id_store),
                                                 std::move(alloc), std::move(committer),
                                                 started_at));
  for (std::size_t i = 0; i < threads; ++i) {
    s->states_.add(std::make_unique<ThreadState>(
        cfg.meter_cache, std::chrono::milliseconds(cfg.meter_cache_ttl_ms)));
  }
  DkusService* raw = s.get();
  registry.gauge_fn("gridseal_dkus_commit_queue", "Replay-mark updates waiting for a commit", {},
                    [raw] { return static_cast<double>(raw->committer_->pending()); });
  registry.gauge_fn("gridseal_dkus_replay_marks", "Meters with an in-memory replay mark", {},
                    [raw] { return static_cast<double>(raw->marks_.size()); });
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
  return {true, "ok"};
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
  if (o.response) finish(*req, std::move(*o.response), o.result);
}

void DkusService::confirm_pending(const store::Meter& meter, const store::KeySlot& slot,
                                  ThreadState& w, ByteView title_abs,
                                  const std::string& meter_name) {
  store::RolloverStore rollover(*w.store);
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
  auto id = c1222::invocation_id_value(*m.calling_ap_invocation_id);
  if (!id.ok() || *id > static_cast<std::uint64_t>(INT64_MAX)) {
    return sme("bad_security", "calling-AP-invocation-id not usable");
  }
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
  if (marks_.refuses(meter->row, *id)) {
    return sme("replay", "invocation id " + std::to_string(*id) + " not above the last accepted");
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
      auto handle = w.keys->get(key_ref, slot->wrapped, &aux);
      if (!handle.ok()) return hsm_refusal(handle.error().message());
      auto eax = eax_for_key(*w.aes, *handle, aux);
      if (!eax.ok()) return hsm_refusal(eax.error().message());
      opened = c1222::open(m, [&](std::uint8_t) { return &*eax; }, sopt);
      if (opened.ok() || opened.error().code != Errc::bad_mac) break;
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
      const std::uint32_t fails = mac_failures_.fail(meter->row);
      if (fails == cfg_.mac_failure_threshold) {
        flagged_.inc();
        std::fprintf(stderr,
                     "gridseal-dkusd: meter flagged meter=%s meter_id=%s mac_failures=%u: MAC "
                     "failed %u times in a row\n",
                     meter_name.c_str(), meter->meter_id.c_str(), fails, fails);
      }
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
  mac_failures_.success(meter->row);
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

  // Claim the id in memory, then make it durable; the answer leaves after the commit.
  std::uint64_t previous = 0;
  if (!marks_.claim(meter->row, *id, &previous)) {
    return sme("replay", "invocation id " + std::to_string(*id) + " not above the last accepted");
  }
  req->called.reset();
  if (m.called_ap_title) {
    req->called = c1222::OwnedApTitle{m.called_ap_title->form,
                                      Bytes(m.called_ap_title->oid.begin(),
                                            m.called_ap_title->oid.end())};
  }
  req->request_id.assign(m.calling_ap_invocation_id->begin(), m.calling_ap_invocation_id->end());
  req->meter = meter_name;
  req->meter_row = meter->row;
  req->invocation_id = *id;
  req->previous_mark = previous;
  req->opened = std::move(opened->wire);
  const std::size_t n_receipts = receipts.size();

  MarkUpdate u;
  u.meter = meter->row;
  u.invocation_id = *id;
  u.iv_time = iv_time;
  u.receipts = std::move(receipts);
  u.done = [this, req, n_receipts](CommitOutcome c) {
    const c1222::ApTitle called_view = req->called ? req->called->view() : c1222::ApTitle{};
    const c1222::ApTitle* called = req->called ? &called_view : nullptr;
    switch (c) {
      case CommitOutcome::committed:
        if (n_receipts > 0) receipts_.inc(n_receipts);
        finish(*req, std::move(req->opened), "ok");
        return;
      case CommitOutcome::replay:
        server::log_refusal("gridseal-dkusd", req->ctx, req->meter, "sme",
                    "invocation id " + std::to_string(req->invocation_id) +
                        " not above the stored mark");
        finish(*req, error_pdu(called, req->request_id, c1222::kRespSme), "replay");
        return;
      case CommitOutcome::failed:
        marks_.release(req->meter_row, req->invocation_id, req->previous_mark);
        store_ok_ = false;
        server::log_refusal("gridseal-dkusd", req->ctx, req->meter, "bsy", "replay state not committed");
        finish(*req, error_pdu(called, req->request_id, c1222::kRespBsy), "store_error");
        return;
    }
  };
  if (auto st = committer_->submit(std::move(u)); !st.ok()) {
    marks_.release(meter->row, *id, previous);
    return refuse(ctx, &m, meter_name, c1222::kRespBsy, "busy", st.error().message());
  }
  return Outcome{std::nullopt, "ok"};
}

}  // namespace gs::dkus
