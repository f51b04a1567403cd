// The SES request path: see ses_service.h.
#include "ses/ses_service.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "c1222/services.h"
#include "gridseal/clock.h"
#include "hsm/ops.h"

namespace gs::ses {

Result<Bytes> error_response(const c1222::Message* request, const c1222::ApTitle& ses_title,
                             const c1222::ApTitle& head_end, std::uint8_t code,
                             std::uint32_t invocation_id) {
  c1222::Message m;
  m.called_ap_title = (request != nullptr && request->calling_ap_title) ? *request->calling_ap_title
                                                                       : head_end;
  if (request != nullptr && request->calling_ap_invocation_id) {
    m.called_ap_invocation_id = *request->calling_ap_invocation_id;
  }
  m.calling_ap_title = ses_title;
  const Bytes id = ids::encode_id(invocation_id);
  m.calling_ap_invocation_id = ByteView(id);
  Bytes epsem{c1222::kEpsemReserved};  // mode 0, response control bits 0
  const std::uint8_t service[1] = {code};
  c1222::append_service(epsem, ByteView(service, 1));
  m.epsem = epsem;
  return c1222::encode(m);
}

SesService::SesService(const SesConfig& cfg, HsmContext& hsm, policy::Policy policy,
                       metrics::Registry& registry, policy::RateLimiter limiter,
                       std::unique_ptr<store::KeyStore> id_store, ids::InvocationIdAllocator ids)
    : cfg_(cfg),
      hsm_(hsm),
      policy_(std::make_shared<const policy::Policy>(std::move(policy))),
      registry_(registry),
      limiter_(std::move(limiter)),
      id_store_(std::move(id_store)),
      ids_(std::move(ids)),
      grant_units_(registry.counter("gridseal_ses_grant_units_used_total",
                                    "Commands admitted beyond a rate limit by a rate-limit grant")),
      latency_(registry.histogram("gridseal_ses_request_seconds",
                                  "Time from request decoded to response built",
                                  metrics::latency_buckets())),
      hsm_errors_(registry.counter("gridseal_ses_hsm_errors_total",
                                   "HSM operations that failed")),
      audit_failures_(registry.counter("gridseal_ses_audit_failures_total",
                                       "Requests whose audit record could not be written")) {}

SesService::~SesService() {
  if (audit_) audit_->stop();
  states_.drain([this](WorkerState& w) { drop_hsm(w); });
}

Result<std::unique_ptr<SesService>> SesService::create(const SesConfig& cfg, HsmContext& hsm,
                                                       policy::Policy policy,
                                                       policy::RateLimiter limiter,
                                                       metrics::Registry& registry,
                                                       std::size_t threads) {
  db::OpenOptions opt;
  opt.create = false;
  auto ks = store::KeyStore::open(cfg.base.store.path, opt);
  if (!ks.ok()) {
    return Error(ks.error().code, cfg.base.store.path + ": " + ks.error().message());
  }
  auto id_store = std::make_unique<store::KeyStore>(std::move(ks).value());
  // Never sign with a key meters no longer trust (retired, or displaced from both trust slots by
  // MT-2044 statements): refused at start, naming the key and the statement.
  GS_TRY(cmdkeys::check_signing_key(id_store->db(), cfg.command_key_id, "ses.command_key"));
  ids::AllocatorOptions aopt;
  aopt.block_size = cfg.id_block_size;
  aopt.max_block_age_s = policy.max_block_age_s;
  // The next block is reserved on the allocator's thread while this one lasts: a reservation
  // waits for the write lock behind the audit writers of every worker and then for an fsync,
  // which had stalled this worker's requests for 1-7 ms several times a second under load.
  aopt.prefetch = true;
  // With the audit on, its writer's Checkpointer copies the WAL into the database for every
  // connection; a reservation's commit then need not run a checkpoint of its own.
  if (cfg.audit.enabled) GS_TRY(db::disable_autocheckpoint(id_store->db()));
  GS_ASSIGN(auto alloc, ids::InvocationIdAllocator::over(*id_store, aopt));
  std::unique_ptr<SesService> s(new SesService(cfg, hsm, std::move(policy), registry,
                                               std::move(limiter), std::move(id_store),
                                               std::move(alloc)));
  for (std::size_t i = 0; i < threads; ++i) {
    auto w = std::make_unique<WorkerState>(cfg.meter_cache,
                                           std::chrono::milliseconds(cfg.meter_cache_ttl_ms),
                                           std::chrono::milliseconds(cfg.meter_cache_poll_ms));
    w->count_key_lookups(registry);
    s->states_.add(std::move(w));
  }
  SesService* raw = s.get();
  registry.gauge_fn("gridseal_ses_invocation_ids_issued", "Invocation ids issued", {},
                    [raw] { return static_cast<double>(raw->ids_.stats().ids_issued); });
  const char* blocks_help = "Invocation-id blocks reserved: ahead, or while a request waited";
  registry.gauge_fn("gridseal_ses_invocation_id_blocks", blocks_help, {{"reserved", "ahead"}},
                    [raw] {
                      const auto st = raw->ids_.stats();
                      return static_cast<double>(st.blocks_reserved - st.waited);
                    });
  registry.gauge_fn("gridseal_ses_invocation_id_blocks", blocks_help, {{"reserved", "waited"}},
                    [raw] { return static_cast<double>(raw->ids_.stats().waited); });
  GS_TRY(s->open_grants(hsm));
  GS_TRY(s->open_revocation_key(hsm));
  if (cfg.audit.enabled) {
    auto w = audit::Writer::open(cfg.base.store.path, hsm,
                                 daemon::audit_writer_options(cfg.audit, "gridseal-sesd",
                                                              cfg.server.sched_batch),
                                 &registry);
    if (!w.ok()) return Error(w.error().code, cfg.base.store.path + ": " + w.error().message());
    s->audit_ = std::move(w).value();
    if (cfg.audit.commit_on_handler) {
      s->commit_queued_ = [raw = s.get()] {
        raw->commit_posted_.store(false);
        try {
          raw->audit_->commit_queued();
        } catch (...) {
          // A throwing completion: what is left stays queued for the audit thread to commit.
        }
      };
    }
  }
  return s;
}

Status SesService::open_grants(HsmContext& hsm) {
  // gs-audit's public key from the HSM, never from the database: a grant row written by someone
  // with database access alone does not verify.
  GS_ASSIGN(auto lease, hsm.pool->acquire());
  auto pub = hsm::find_object(lease.session(), hsm::ObjectClass::public_key, kLabelAudit);
  if (!pub.ok()) {
    std::fprintf(stderr, "gridseal-sesd: %s public key: %s; rate-limit grants are not honoured\n",
                 kLabelAudit, pub.error().message().c_str());
    return {};
  }
  GS_ASSIGN(EcPoint point, hsm::export_ec_point(lease.session(), *pub));
  auto ledger = grants::GrantLedger::open(cfg_.base.store.path, point);
  if (!ledger.ok()) {
    return Error(ledger.error().code, "rate-limit grants: " + ledger.error().message());
  }
  grants_ = std::move(ledger).value();
  grants::GrantLedger* g = grants_.get();
  auto gauge = [&](const char* name, const char* help, auto field) {
    registry_.gauge_fn(name, help, {},
                       [g, field] { return static_cast<double>(g->stats().*field); });
  };
  gauge("gridseal_ses_grant_units_reserved", "Grant units this worker reserved in the store",
        &grants::LedgerStats::units_reserved);
  gauge("gridseal_ses_grant_blocks_reserved", "Grant unit blocks this worker reserved",
        &grants::LedgerStats::blocks_reserved);
  gauge("gridseal_ses_grants_refused", "Grant rows refused: not signed by gs-audit for their terms",
        &grants::LedgerStats::refused);
  gauge("gridseal_ses_grants_cached", "Verified unexpired grants held by this worker",
        &grants::LedgerStats::cached);
  gauge("gridseal_ses_grant_store_errors", "Grant reads or reservations that failed",
        &grants::LedgerStats::store_errors);
  return {};
}

Status SesService::open_revocation_key(HsmContext& hsm) {
  // From the HSM, never from the database (like gs-audit's for the grants).
  GS_ASSIGN(auto lease, hsm.pool->acquire());
  auto key = cmdkeys::revocation_public_key(lease.session());
  if (!key.ok()) {
    std::fprintf(stderr,
                 "gridseal-sesd: %s public key: %s; MT-2044 command-key statements are refused\n",
                 kLabelRevocation, key.error().message().c_str());
    return {};
  }
  revocation_.emplace(std::move(key).value());
  return {};
}

void SesService::drop_hsm(WorkerState& w) {
  w.signer.reset();
  w.drop_hsm();
}

Status SesService::ensure_hsm(WorkerState& w) {
  if (w.hsm_ready() && w.signer) return {};
  w.signer.reset();
  GS_TRY(w.ensure_hsm(hsm_, cfg_.base.hsm.key_cache));
  hsm::Session& s = w.lease->session();
  const std::string cmd_label = "gs-cmd-" + std::to_string(cfg_.command_key_id);
  GS_ASSIGN(const hsm::SigningHandle key,
            w.signing_key(cmd_label, cfg_.base.hsm.command_key_session_copy));
  std::call_once(signing_noted_, [&] {
    if (key.session_copy) {
      std::fprintf(stderr, "gridseal-sesd: %s: signing with a session copy of the token key\n",
                   cmd_label.c_str());
    } else {
      std::fprintf(stderr, "gridseal-sesd: %s: signing with the token key (%s)\n",
                   cmd_label.c_str(), key.note.c_str());
    }
  });
  w.signer = std::make_unique<HsmSigner>(s, key.handle, cfg_.command_key_id);
  return {};
}

Status SesService::warm_up() {
  auto w = states_.take();
  Status st = w->ensure_store(cfg_.base.store.path);
  if (st.ok()) st = ensure_hsm(*w);
  states_.give(std::move(w));
  return st;
}

metrics::Health SesService::health() const {
  if (!hsm_ok_.load()) return {false, "HSM operations failing"};
  if (!store_ok_.load()) return {false, "database failing"};
  if (audit_ && !audit_->healthy()) return {false, "audit trail failing"};
  return {true, "ok"};
}

CommandParams SesService::params_for(c1222::CommandClass cls, const policy::Validity& v,
                                     std::uint32_t now) const {
  CommandParams params;
  params.command_class = cls;
  params.not_before = v.not_before;
  params.not_after = v.not_after;
  params.now = now;
  params.head_end_title = cfg_.head_end_title.view();
  params.base_oid = cfg_.base_oid;
  return params;
}

SesService::Outcome SesService::refuse(const server::RequestContext& ctx,
                                       const c1222::Message* request, std::uint8_t code,
                                       const char* result, const std::string& reason) {
  std::string meter = "-";
  if (request != nullptr && request->called_ap_title) meter = request->called_ap_title->dotted();
  server::log_refusal("gridseal-sesd", ctx, meter, c1222::response_code_name(code), reason);
  Outcome o;
  o.result = result;
  o.code = code;
  o.reason = reason;
  if (request != nullptr) {
    if (request->called_ap_title) o.title = meter;
    if (request->calling_ap_invocation_id) {
      o.request_id = to_hex(*request->calling_ap_invocation_id);
    }
  }
  const Bytes ses_abs = cfg_.ses_title.view().absolute(cfg_.base_oid);
  auto id = ids_.next(ses_abs, static_cast<std::int64_t>(utc_now()));
  if (!id.ok()) {
    store_ok_ = false;
    return o;  // empty: the connection closes
  }
  o.invocation_id = *id;
  auto pdu = error_response(request, cfg_.ses_title.view(), cfg_.head_end_title.view(), code, *id);
  if (pdu.ok()) o.response = std::move(pdu).value();
  return o;
}

std::shared_ptr<const policy::Policy> SesService::current_policy() const {
  std::lock_guard<std::mutex> lock(policy_mu_);
  return policy_;
}

Status SesService::reload_policy(policy::Policy p) {
  if (grants_) grants_->invalidate();
  std::lock_guard<std::mutex> lock(policy_mu_);
  if (p.meter_rate_slots != policy_->meter_rate_slots) {
    return Error(Errc::conflict, "meter_rate_slots changed from " +
                                     std::to_string(policy_->meter_rate_slots) + " to " +
                                     std::to_string(p.meter_rate_slots) + "; restart to apply");
  }
  policy_ = std::make_shared<const policy::Policy>(std::move(p));
  return {};
}

std::optional<SesService::Outcome> SesService::admit(const server::RequestContext& ctx,
                                                     const c1222::Message& m,
                                                     const policy::Policy& pol, ByteView called,
                                                     CommandParams& params, WorkerState& w,
                                                     std::string& grant) {
  const c1222::CommandClass cls = params.command_class;
  const auto adm = limiter_.admit(pol, cls, called, mono_ns());
  if (adm != policy::Admission::allowed) {
    // Beyond the limit only with a unit of a valid grant for this client and class (only this,
    // the refused path, ever touches the grants).
    const policy::ClientRules* client = pol.client(ctx.client_identity);
    std::optional<std::string> g;
    if (grants_ && client != nullptr) g = grants_->take(client->name, cls, params.now);
    if (!g) {
      return refuse(ctx, &m, c1222::kRespIsc, "rate_limited",
                    std::string(c1222::command_class_name(cls)) + ": " +
                        policy::admission_name(adm));
    }
    grant_units_.inc();
    grant = std::move(*g);
  }
  auto id = ids_.next(calling_title_for(m, params).absolute(cfg_.base_oid), params.now);
  if (!id.ok()) {
    store_ok_ = false;
    return refuse(ctx, &m, c1222::kRespBsy, "store_error", id.error().message());
  }
  params.invocation_id = *id;
  if (auto st = ensure_hsm(w); !st.ok()) {
    hsm_errors_.inc();
    hsm_ok_ = false;
    return refuse(ctx, &m, c1222::kRespBsy, "hsm_error", st.error().message());
  }
  return std::nullopt;
}

SesService::Outcome SesService::process(const server::RequestContext& ctx, ByteView request,
                                        WorkerState& w, const policy::Policy& pol) {
  c1222::DecodeLimits limits;
  limits.max_message = cfg_.server.max_frame;
  auto decoded = c1222::decode(request, limits);
  if (!decoded.ok()) {
    return refuse(ctx, nullptr, c1222::kRespErr, "malformed",
                  "cannot decode: " + decoded.error().message());
  }
  const c1222::Message& m = *decoded;
  if (!m.called_ap_title) return refuse(ctx, &m, c1222::kRespErr, "malformed", "no called AP title");
  const Bytes called = m.called_ap_title->absolute(cfg_.base_oid);

  const policy::ClientRules* client = pol.client(ctx.client_identity);
  if (client == nullptr) {
    return refuse(ctx, &m, c1222::kRespIsc, "client_refused", "client not in the policy");
  }

  // A configured DR group: signed once, mode 0.
  if (const policy::GroupRules* group = pol.group(called)) {
    auto cls = policy::classify_message(m, pol);
    if (!cls.ok() || cls->command_class != c1222::CommandClass::demand_response) {
      return refuse(ctx, &m, c1222::kRespIsc, "class_refused",
                    "only demand-response commands may go to group " + group->name);
    }
    Outcome o;
    o.cls = c1222::CommandClass::demand_response;
    if (!client->allowed[policy::class_index(*o.cls)]) {
      return refuse(ctx, &m, c1222::kRespIsc, "class_refused", "demand_response not allowed for client");
    }
    const std::uint32_t now = utc_now();
    CommandParams params = params_for(*o.cls, pol.broadcast_validity(*group, now), now);
    if (auto refused = admit(ctx, m, pol, called, params, w, o.grant)) {
      return std::move(*refused);
    }
    auto out = sign_broadcast(m, params, *w.signer);
    if (!out.ok()) {
      return refuse(ctx, &m, c1222::kRespErr, "error", out.error().message());
    }
    hsm_ok_ = true;
    o.response = std::move(out).value();
    o.secured = true;
    o.subject = group->name;
    o.title = m.called_ap_title->dotted();
    o.invocation_id = params.invocation_id;
    if (m.calling_ap_invocation_id) o.request_id = to_hex(*m.calling_ap_invocation_id);
    return o;
  }

  if (auto st = w.ensure_store(cfg_.base.store.path); !st.ok()) {
    store_ok_ = false;
    return refuse(ctx, &m, c1222::kRespBsy, "store_error", st.error().message());
  }
  auto cached = w.meters.by_title(*w.store, called);
  if (!cached.ok()) {
    store_ok_ = false;
    return refuse(ctx, &m, c1222::kRespBsy, "store_error", cached.error().message());
  }
  store_ok_ = true;
  // Kept alive by this shared_ptr for the whole request; choice.slot points into it.
  const std::shared_ptr<const store::Meter> meter = *cached;
  const MeterKeyChoice choice = choose_meter_key(meter.get());
  if (choice.refusal != MeterRefusal::none) {
    return refuse(ctx, &m, response_code_for(choice.refusal),
                  choice.refusal == MeterRefusal::unknown_meter ? "unknown_meter" : "meter_refused",
                  meter_refusal_name(choice.refusal));
  }

  auto cls = policy::classify_message(m, pol);
  if (!cls.ok()) {
    const Errc e = cls.error().code;
    const std::uint8_t code = e == Errc::unsupported ? c1222::kRespSns
                              : e == Errc::bad_value ? c1222::kRespIsc
                                                     : c1222::kRespErr;
    return refuse(ctx, &m, code, "class_refused", cls.error().message());
  }
  Outcome o;
  o.cls = cls->command_class;
  if (!client->allowed[policy::class_index(*o.cls)]) {
    return refuse(ctx, &m, c1222::kRespIsc, "class_refused",
                  std::string(c1222::command_class_name(*o.cls)) + " not allowed for client " +
                      client->name);
  }
  if (*o.cls == c1222::CommandClass::key_management) {
    // An MT-2044 statement is signed only when gs-revocation signed it: a client cannot make
    // meters trust a key of its choosing through the SES.
    if (auto st = cmdkeys::check_replacement_writes(m, revocation_ ? &*revocation_ : nullptr);
        !st.ok()) {
      Outcome r = refuse(ctx, &m, c1222::kRespIsc, "statement_refused", st.error().message());
      r.cls = o.cls;
      return r;
    }
  }
  const std::uint32_t now = utc_now();
  CommandParams params = params_for(*o.cls, pol.validity(*o.cls, now), now);
  if (auto refused = admit(ctx, m, pol, called, params, w, o.grant)) return std::move(*refused);
  const std::uint64_t key_ref =
      static_cast<std::uint64_t>(meter->row) * store::kSlotsPerMeter +
      static_cast<std::uint64_t>(choice.slot->slot);
  hsm::KeyAux* aux = nullptr;
  auto handle = w.meter_key(key_ref, *choice.slot, &aux);
  if (!handle.ok() && !(w.lease && (*w.lease)->lost())) {
    // A cached record may name a KEK generation destroyed since a rotation re-wrapped the slot
    // (src/kek_rotation.h): the same key (slot and version) from a fresh read of the record.
    w.meters.invalidate(called);
    auto fresh = w.meters.by_title(*w.store, called);
    const store::KeySlot* k =
        fresh.ok() && *fresh != nullptr
            ? (*fresh)->slot_for_key_id(static_cast<std::uint8_t>(choice.slot->slot))
            : nullptr;
    if (k != nullptr && k->key_version == choice.slot->key_version &&
        k->kek != choice.slot->kek && !k->wrapped.empty()) {
      handle = w.meter_key(key_ref, *k, &aux);
    }
  }
  Result<Bytes> out = Errc::hsm_failure;
  if (handle.ok()) {
    auto eax = eax_for_key(*w.aes, *handle, aux);
    if (eax.ok()) {
      out = secure_command(m, *meter, params, *w.signer, *eax,
                           static_cast<std::uint8_t>(choice.slot->slot));
    } else {
      out = std::move(eax).error();
    }
  } else {
    out = std::move(handle).error();
  }
  if (!out.ok()) {
    const Errc e = out.error().code;
    if (e == Errc::hsm_failure || e == Errc::crypto_failure || e == Errc::busy ||
        (w.lease && (*w.lease)->lost())) {
      hsm_errors_.inc();
      hsm_ok_ = false;
      std::string why = out.error().message();
      drop_hsm(w);  // rebuilt (session, handles, key cache) on the next request
      return refuse(ctx, &m, c1222::kRespBsy, "hsm_error", why);
    }
    return refuse(ctx, &m, c1222::kRespErr, "error", out.error().message());
  }
  hsm_ok_ = true;
  o.response = std::move(out).value();
  o.secured = true;
  o.subject = meter->meter_id;
  o.title = m.called_ap_title->dotted();
  o.invocation_id = params.invocation_id;
  o.key_id = choice.slot->slot;
  if (m.calling_ap_invocation_id) o.request_id = to_hex(*m.calling_ap_invocation_id);
  return o;
}

// What the audit keeps of a request: who (the TLS client subject), the meter or group, and for a
// secured command its class and invocation id, for a refusal its code and reason. Never key
// material: the request's cleartext and the response are not recorded.
audit::Event SesService::audit_event(const server::RequestContext& ctx, const Outcome& o) const {
  audit::Event e;
  e.actor = audit::clip(ctx.client_identity.empty() ? "-" : ctx.client_identity, audit::kMaxActor);
  e.event = o.secured ? "command" : "refusal";
  e.subject = audit::clip(o.subject.empty() ? o.title : o.subject, audit::kMaxSubject);
  audit::Detail d;
  if (!o.title.empty()) d.add("title", o.title);
  if (o.cls) d.add("class", c1222::command_class_name(*o.cls));
  if (o.secured) {
    d.add("invocation_id", std::uint64_t{o.invocation_id});
    if (o.key_id >= 0) d.add("key_id", o.key_id);
    d.add("signer", "gs-cmd-" + std::to_string(cfg_.command_key_id));
    if (!o.grant.empty()) d.add("grant", o.grant);  // admitted beyond a rate limit by it
  } else {
    d.add("code", c1222::response_code_name(o.code)).add("result", o.result);
    d.add("reason", o.reason);
    if (o.response.empty()) {
      d.add("connection", "closed");
    } else {
      d.add("response_id", std::uint64_t{o.invocation_id});
    }
  }
  if (!o.request_id.empty()) d.add("request_id", o.request_id);
  d.add("peer", ctx.peer);
  if (!ctx.client_cert_sha256.empty()) d.add("client_cert_sha256", ctx.client_cert_sha256);
  e.detail = d.str();
  return e;
}

struct SesService::Pending {
  server::RequestContext ctx;
  Bytes request;
  Outcome outcome;
  std::chrono::steady_clock::time_point t0;
  server::Done done;
};

void SesService::finish(Outcome& o, std::chrono::steady_clock::time_point t0,
                        server::Done& done) {
  latency_.observe(std::chrono::steady_clock::now() - t0);
  requests_counter(o).inc();
  done(std::move(o.response));
}

metrics::Counter& SesService::requests_counter(const Outcome& o) {
  const std::pair<int, const char*> key{o.cls ? static_cast<int>(*o.cls) : -1, o.result};
  std::lock_guard lock(requests_mu_);
  metrics::Counter*& c = requests_[key];
  if (c == nullptr) {
    c = &registry_.counter("gridseal_ses_requests_total", "Requests by command class and result",
                           {{"class", o.cls ? c1222::command_class_name(*o.cls) : "none"},
                            {"result", o.result}});
  }
  return *c;
}

void SesService::recorded(Pending& p, const Status& st) {
  if (!st.ok()) {
    audit_failures_.inc();
    if (p.outcome.secured) {
      // The command must not leave without its record: a bsy error instead (not recorded
      // either: the trail is failing; the refusal log line says why).
      auto m = c1222::decode(p.request);
      const std::optional<c1222::CommandClass> cls = p.outcome.cls;
      p.outcome = refuse(p.ctx, m.ok() ? &*m : nullptr, c1222::kRespBsy, "audit_error",
                         "audit record not written: " + st.error().message());
      p.outcome.cls = cls;
    }
  }
  finish(p.outcome, p.t0, p.done);
}

void SesService::handle(const server::RequestContext& ctx, Bytes request, server::Done done) {
  const auto t0 = std::chrono::steady_clock::now();
  auto w = states_.take();
  const std::shared_ptr<const policy::Policy> policy = current_policy();
  Outcome o = process(ctx, request, *w, *policy);
  states_.give(std::move(w));
  if (!audit_) {
    finish(o, t0, done);
    return;
  }
  audit::Item item;
  item.event = audit_event(ctx, o);
  auto pending = std::make_shared<Pending>(
      Pending{ctx, o.secured ? std::move(request) : Bytes{}, std::move(o), t0, std::move(done)});
  item.done = [this, pending](const Status& st) { recorded(*pending, st); };
  if (Status st = audit_->submit(std::move(item)); !st.ok()) {
    recorded(*pending, st);
    return;
  }
  if (commit_queued_ && !commit_posted_.exchange(true)) {
    if (ctx.defer != nullptr) {
      (*ctx.defer)(commit_queued_);
    } else {
      commit_queued_();
    }
  }
}

Status SesService::record_start(int worker) {
  return audit_ ? audit::record_worker_start(*audit_, "gridseal-sesd", worker) : Status{};
}

void SesService::record_stop(int worker) {
  if (audit_) audit::record_worker_stop(*audit_, "gridseal-sesd", worker);
}

Status SesService::record_policy(std::string_view event, std::string_view file,
                                 std::string detail) {
  if (!audit_) return {};
  return audit_->append({0, audit::kSystemActor, std::string(event),
                         audit::clip(file, audit::kMaxSubject), std::move(detail)});
}

}  // namespace gs::ses
