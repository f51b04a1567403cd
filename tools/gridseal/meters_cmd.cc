// `gridseal meters import|list|show|revoke|reinstate|challenge`: the meter registry.
#include <pwd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <map>
#include <set>
#include <thread>

#include "src/challenge_store.h"
#include "src/hsm_context.h"
#include "src/meter_import.h"
#include "src/meter_reinstate.h"
#include "src/rollover_store.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

struct Opened {
  config::Config cfg;
  Bytes base;
};

Result<Opened> load(const std::string& path) {
  Opened o;
  GS_ASSIGN(o.cfg, config::load(path));
  GS_ASSIGN(o.base, c1222::oid_from_dotted(o.cfg.base_oid));
  return o;
}

std::size_t count_lines(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::size_t n = 0;
  char buf[1 << 16];
  while (f.read(buf, sizeof buf) || f.gcount() > 0) {
    for (std::streamsize i = 0; i < f.gcount(); ++i) n += buf[i] == '\n';
  }
  return n;
}

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int run_import(const std::string& config_path, const std::string& file, std::size_t batch,
               const std::string& transport_key, bool challenge) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  std::ifstream in(file);
  if (!in) return fail("cannot read " + file);
  auto ctx = open_hsm(o->cfg.hsm);
  if (!ctx.ok()) return fail(ctx.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path);
  if (!store.ok()) return fail(store.error().message());
  auto lease = ctx->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());

  const bool tty = ::isatty(STDERR_FILENO) != 0;
  const std::size_t total = tty ? (count_lines(file) > 0 ? count_lines(file) - 1 : 0) : 0;
  const auto start = std::chrono::steady_clock::now();
  auto rate = [&](std::size_t rows) {
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return s > 0 ? static_cast<double>(rows) / s : 0.0;
  };
  ImportOptions opt;
  opt.batch = batch;
  opt.base_oid = o->base;
  opt.transport_key = transport_key;
  opt.on_error = [&](std::size_t line, const std::string& why) {
    if (tty) std::fprintf(stderr, "\r\033[K");
    if (line != 0) {
      std::fprintf(stderr, "%s:%zu: %s\n", file.c_str(), line, why.c_str());
    } else {
      std::fprintf(stderr, "%s: %s\n", file.c_str(), why.c_str());
    }
  };
  opt.on_progress = [&](const ImportProgress& p) {
    if (!tty) return;
    double frac = total > 0 ? static_cast<double>(p.rows) / static_cast<double>(total) : 0;
    if (frac > 1) frac = 1;
    int filled = static_cast<int>(frac * 30);
    std::fprintf(stderr, "\r[%.*s%*s] %3d%% %zu/%zu rows  %.0f rows/s", filled,
                 "##############################", 30 - filled, "",
                 static_cast<int>(frac * 100), p.rows, total, rate(p.rows));
    std::fflush(stderr);
  };
  auto r = import_fleet(in, lease->session(), *store, opt);
  if (tty) std::fprintf(stderr, "\n");
  if (!r.ok()) return fail(file + ": " + r.error().message());
  std::printf("%zu rows: %zu imported, %zu already present, %zu refused (%.0f rows/s)\n", r->rows,
              r->inserted, r->unchanged, r->failed, rate(r->rows));
  if (challenge) {
    // Provisioning proof (DESIGN §3.4): every meter that has a public key and no proof yet gets
    // a challenge, which gridseal-dkusd sends through the relay.
    store::ChallengeStore cs(*store);
    auto q = cs.request({}, /*all_unproven=*/true, current_actor(), now_ms());
    if (!q.ok()) {
      return fail("meters imported, but their challenges were not queued: " +
                  error_text(q.error()));
    }
    std::printf("%lld challenge%s queued (meters without a proof of their private key); "
                "gridseal-dkusd sends them: gridseal meters show ID\n",
                static_cast<long long>(q->queued), q->queued == 1 ? "" : "s");
  }
  return r->failed == 0 ? kExitOk : kExitFailed;
}

// What `meters list` shows of a meter's challenge: "-" never challenged, "FLAGGED" failed.
std::string challenge_label(const std::optional<store::ChallengeStatus>& c) {
  if (!c) return "-";
  if (c->state == store::ChallengeState::failed) return "FLAGGED";
  return store::to_string(c->state);
}

void challenge_json(JsonWriter& w, const store::ChallengeStatus& c) {
  w.begin_object().key("state").value(store::to_string(c.state));
  w.key("flagged").value(c.state == store::ChallengeState::failed);
  w.key("origin").value(store::to_string(c.origin)).key("requested_by").value(c.requested_by);
  w.key("requested_at_ms").value(c.requested_at_ms).key("attempts").value(c.attempts);
  w.key("expires_at_ms").value(c.expires_at_ms).key("last_error").value(c.last_error);
  w.key("changed_at_ms").value(c.changed_at_ms).end_object();
}

void proof_json(JsonWriter& w, const store::ChallengeProof& p) {
  w.begin_object().key("challenge").value(to_hex(p.challenge));
  w.key("meter_time").value(p.meter_time).key("signature").value(to_hex(p.signature));
  w.key("message_id").value(p.message_id).key("verified_at_ms").value(p.verified_at_ms);
  w.end_object();
}

void meter_json(JsonWriter& w, const store::Meter& m,
                const std::optional<store::ChallengeStatus>& chal = std::nullopt,
                const std::optional<store::ChallengeProof>& proof = std::nullopt,
                bool with_proof = false) {
  w.begin_object().key("meter_id").value(m.meter_id).key("ap_title").value(m.ap_title_text);
  w.key("ap_title_absolute").value(c1222::oid_to_dotted(m.ap_title, false));
  w.key("public_key").value(to_hex(m.public_key)).key("state").value(store::to_string(m.state));
  w.key("state_reason").value(m.state_reason).key("created_at").value(m.created_at);
  w.key("slots").begin_array();
  for (const auto& s : m.slots) {
    w.begin_object().key("slot").value(s.slot).key("key_id").value(s.slot);
    w.key("state").value(store::to_string(s.state)).key("key_version").value(s.key_version);
    w.key("origin").value(s.origin).key("changed_at").value(s.changed_at).end_object();
  }
  w.end_array();
  w.key("challenge");
  if (chal) {
    challenge_json(w, *chal);
  } else {
    w.null();
  }
  if (with_proof) {
    w.key("proof");
    if (proof) {
      proof_json(w, *proof);
    } else {
      w.null();
    }
  }
  w.end_object();
}

int run_list(const std::string& config_path, bool json, std::size_t limit,
             const std::string& after) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  auto meters = store->list_meters(after, limit);
  if (!meters.ok()) return fail(meters.error().message());
  store::ChallengeStore cs(*store);
  std::vector<std::optional<store::ChallengeStatus>> chals;
  for (const auto& m : *meters) {
    auto c = cs.status(m.row);
    if (!c.ok()) return fail(c.error().message());
    chals.push_back(std::move(c).value());
  }
  if (json) {
    JsonWriter w;
    w.begin_array();
    for (std::size_t i = 0; i < meters->size(); ++i) meter_json(w, (*meters)[i], chals[i]);
    w.end_array();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("%-20s %-36s %-12s %-14s %s\n", "meter", "ap_title", "state", "active key",
              "challenge");
  for (std::size_t i = 0; i < meters->size(); ++i) {
    const store::Meter& m = (*meters)[i];
    const auto* a = m.active_slot();
    std::string key = a ? "slot " + std::to_string(a->slot) + " v" + std::to_string(a->key_version)
                        : "none";
    std::printf("%-20s %-36s %-12s %-14s %s\n", m.meter_id.c_str(), m.ap_title_text.c_str(),
                store::to_string(m.state), key.c_str(), challenge_label(chals[i]).c_str());
  }
  auto total = store->count_meters();
  if (total.ok() && static_cast<std::size_t>(*total) > meters->size()) {
    std::printf("(%zu of %lld meters; --after %s for more)\n", meters->size(),
                static_cast<long long>(*total),
                meters->empty() ? "" : meters->back().meter_id.c_str());
  }
  return kExitOk;
}

int run_show(const std::string& config_path, const std::string& id, bool json) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  auto m = store->meter_by_id(id);
  if (!m.ok()) return fail(m.error().message());
  if (!m->has_value()) return fail("no meter " + id);
  const auto& v = **m;
  store::ChallengeStore cs(*store);
  auto chal = cs.status(v.row);
  if (!chal.ok()) return fail(chal.error().message());
  auto proof = cs.last_proof(v.row);
  if (!proof.ok()) return fail(proof.error().message());
  if (json) {
    JsonWriter w;
    meter_json(w, v, *chal, *proof, true);
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("meter       %s\nap_title    %s (%s)\nstate       %s%s%s\npublic key  %s\n",
              v.meter_id.c_str(), v.ap_title_text.c_str(),
              c1222::oid_to_dotted(v.ap_title, false).c_str(), store::to_string(v.state),
              v.state_reason.empty() ? "" : ": ", v.state_reason.c_str(),
              v.public_key.empty() ? "(none)" : to_hex(v.public_key).c_str());
  for (const auto& s : v.slots) {
    std::printf("slot %d      key id %d, version %u, %s, from %s\n", s.slot, s.slot,
                s.key_version, store::to_string(s.state), s.origin.c_str());
  }
  if (const auto& c = *chal) {
    std::printf("challenge   %s%s (%s, by %s, %u attempt%s)%s%s\n", store::to_string(c->state),
                c->state == store::ChallengeState::failed ? ", METER FLAGGED" : "",
                store::to_string(c->origin), c->requested_by.c_str(), c->attempts,
                c->attempts == 1 ? "" : "s", c->last_error.empty() ? "" : ": ",
                c->last_error.c_str());
  } else {
    std::printf("challenge   never challenged\n");
  }
  if (const auto& p = *proof) {
    std::printf("last proof  verified at %lld ms, meter time %lld, message id %llu\n"
                "            challenge %s\n            signature %s\n",
                static_cast<long long>(p->verified_at_ms), static_cast<long long>(p->meter_time),
                static_cast<unsigned long long>(p->message_id), to_hex(p->challenge).c_str(),
                to_hex(p->signature).c_str());
  } else {
    std::printf("last proof  none\n");
  }
  return kExitOk;
}


int run_revoke(const std::string& config_path, const std::string& id, const std::string& reason,
               bool permanent, bool json) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  if (permanent) {
    auto st = store->revoke(id, reason);
    if (!st.ok()) return fail(st.error().message());
    if (json) {
      JsonWriter w;
      w.begin_object().key("meter_id").value(id).key("state").value("compromised");
      w.key("permanent").value(true).end_object();
      std::printf("%s\n", w.str().c_str());
      return kExitOk;
    }
    std::printf("meter %s revoked permanently: state compromised, it is never served again and "
                "its keys are never used again\n",
                id.c_str());
    return kExitOk;
  }
  // Key compromise: quarantine and rekey under the compromised key (a one-meter campaign).
  store::RolloverStore rs(*store);
  auto r = rs.revoke_key(id, reason, current_actor());
  if (!r.ok()) {
    if (r.error().code == Errc::invalid_argument) {
      return fail(r.error().detail + "; use --permanent to revoke it for good");
    }
    return fail(error_text(r.error()));
  }
  if (json) {
    JsonWriter w;
    w.begin_object().key("meter_id").value(id).key("state").value("quarantined");
    w.key("permanent").value(false).key("campaign").value(r->campaign);
    w.key("seal_slot").value(unsigned{r->seal_slot});
    w.key("slots_compromised").value(r->slots_compromised);
    w.key("slots_destroyed").value(r->slots_destroyed);
    w.key("superseded_campaign").value(r->superseded).end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("meter %s quarantined: %lld key%s compromised and never used again",
              id.c_str(), static_cast<long long>(r->slots_compromised),
              r->slots_compromised == 1 ? "" : "s");
  if (r->slots_destroyed > 0) {
    std::printf(", %lld pending key%s destroyed", static_cast<long long>(r->slots_destroyed),
                r->slots_destroyed == 1 ? "" : "s");
  }
  std::printf("\n");
  if (r->superseded != 0) {
    std::printf("its step in rollover campaign %lld is superseded\n",
                static_cast<long long>(r->superseded));
  }
  std::printf("rollover campaign %lld rekeys it: gridseal-dkusd sends the key update sealed under "
              "the compromised key (slot %u), the only one the meter holds; the meter is served "
              "again once it answers under its new key. Until then commands to it are refused. "
              "Follow it with: gridseal rollover status %lld\n",
              static_cast<long long>(r->campaign), unsigned{r->seal_slot},
              static_cast<long long>(r->campaign));
  return kExitOk;
}

// `meters reinstate`: lifts a revocation by a new revocation rekey (src/meter_reinstate.h),
// recorded in the audit trail in the same transaction. A refusal changes nothing and records
// nothing itself (the operator gate records the command and its exit code).
int run_reinstate(const std::string& config_path, const std::string& id,
                  const std::string& reason, bool lift_permanent, bool json) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  const std::string actor = current_actor();
  store::ReinstateOutcome r;
  Status st = audited(o->cfg, store->db(),
                      [&](db::Db&, std::vector<audit::Event>& events) -> Status {
    GS_ASSIGN(r, store::reinstate_meter(*store, id, reason, actor, lift_permanent));
    audit::Detail d;
    d.add("from", store::to_string(r.before)).add("to", store::to_string(r.after));
    d.add("reason", audit::clip(reason, audit::kMaxDetailValue));
    if (r.campaign != 0) d.add("campaign", r.campaign).add("seal_slot", unsigned{r.seal_slot});
    if (r.slots_destroyed != 0) d.add("slots_destroyed", r.slots_destroyed);
    events.push_back({0, actor, "meter_reinstated", audit::clip(id, audit::kMaxSubject), d.str()});
    return Status{};
  });
  if (!st.ok()) {
    return fail(error_text(st.error()));
  }
  if (json) {
    JsonWriter w;
    w.begin_object().key("meter_id").value(id).key("from").value(store::to_string(r.before));
    w.key("state").value(store::to_string(r.after)).key("campaign").value(r.campaign);
    w.key("seal_slot").value(unsigned{r.seal_slot}).key("slots_destroyed").value(r.slots_destroyed);
    w.key("proven").value(r.proven).end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  if (r.after == store::MeterState::active) {
    std::printf("meter %s reinstated: its key was already replaced, it is served again\n",
                id.c_str());
    return kExitOk;
  }
  std::printf("meter %s reinstated from %s: rollover campaign %lld rekeys it under its "
              "compromised key (slot %u), whose keys stay compromised and are never used for "
              "anything else; the meter is served again once it answers under its new key. "
              "Follow it with: gridseal rollover status %lld\n",
              id.c_str(), store::to_string(r.before), static_cast<long long>(r.campaign),
              unsigned{r.seal_slot}, static_cast<long long>(r.campaign));
  if (!r.proven) {
    std::printf("it has no MT-2043 proof (or its last challenge failed): the rekey waits for "
                "one; run: gridseal meters challenge %s --wait\n",
                id.c_str());
  }
  return kExitOk;
}

// Bounds on what an operator hands in.
constexpr std::size_t kMaxChallengeIds = 1000000;
constexpr auto kChallengePoll = std::chrono::milliseconds(200);

// Meter ids from a file: one per line, blank lines and # comments skipped.
Result<std::vector<std::string>> ids_from_file(const std::string& file) {
  std::ifstream in(file);
  if (!in) return Error(Errc::not_found, "cannot read " + file);
  std::vector<std::string> out;
  std::string line;
  std::size_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) {
      line.pop_back();
    }
    const auto b = line.find_first_not_of(" \t");
    if (b == std::string::npos || line[b] == '#') continue;
    line.erase(0, b);
    if (line.size() > store::kMaxMeterIdLength) {
      return Error(Errc::invalid_argument,
                   file + ":" + std::to_string(n) + ": meter id longer than 64 characters");
    }
    if (out.size() >= kMaxChallengeIds) {
      return Error(Errc::too_large, file + ": more than 1000000 meter ids");
    }
    out.push_back(line);
  }
  return out;
}

bool settled(store::ChallengeState s) {
  return s == store::ChallengeState::proven || s == store::ChallengeState::failed ||
         s == store::ChallengeState::unanswered;
}

int run_challenge(const std::string& config_path, std::vector<std::string> ids,
                  const std::string& file, bool all_unproven, bool wait, std::uint32_t timeout_s,
                  bool json) {
  if (!file.empty()) {
    auto more = ids_from_file(file);
    if (!more.ok()) return fail(more.error().message());
    ids.insert(ids.end(), more->begin(), more->end());
  }
  if (all_unproven == !ids.empty()) {
    std::fprintf(stderr, "gridseal: name meters (ID... or --file F) or --all-unproven\n");
    return kExitUsage;
  }
  if (ids.size() > kMaxChallengeIds) return fail("more than 1000000 meter ids");
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  store::ChallengeStore cs(*store);
  auto r = cs.request(ids, all_unproven, current_actor(), now_ms());
  if (!r.ok()) return fail(error_text(r.error()));
  if (!json) {
    std::printf("%lld challenge%s queued, %lld already pending", static_cast<long long>(r->queued),
                r->queued == 1 ? "" : "s", static_cast<long long>(r->already));
    if (r->skipped_total > 0) {
      std::printf(", %lld meter%s cannot be challenged", static_cast<long long>(r->skipped_total),
                  r->skipped_total == 1 ? "" : "s");
    }
    std::printf("\n");
    for (const auto& [id, why] : r->skipped) std::printf("  %s: %s\n", id.c_str(), why.c_str());
    if (!wait && !r->meter_ids.empty()) {
      std::printf("gridseal-dkusd sends them through the relay (its rollover engine); follow "
                  "with: gridseal meters show ID, or run again with --wait\n");
    }
  }
  // Waits (bounded) until every challenge is proven, failed or unanswered.
  std::map<std::string, store::ChallengeStatus> results;
  std::set<std::string> pending(r->meter_ids.begin(), r->meter_ids.end());
  if (wait) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    for (;;) {
      for (auto it = pending.begin(); it != pending.end();) {
        auto st = cs.status_by_id(*it);
        if (!st.ok()) return fail(st.error().message());
        if (*st && settled((*st)->state)) {
          results[*it] = std::move(**st);
          it = pending.erase(it);
        } else {
          ++it;
        }
      }
      if (pending.empty() || std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(kChallengePoll);
    }
  }
  std::int64_t proven = 0, failed = 0, unanswered = 0;
  for (const auto& [id, st] : results) {
    proven += st.state == store::ChallengeState::proven;
    failed += st.state == store::ChallengeState::failed;
    unanswered += st.state == store::ChallengeState::unanswered;
  }
  if (json) {
    JsonWriter w;
    w.begin_object().key("queued").value(r->queued).key("already_pending").value(r->already);
    w.key("skipped").begin_array();
    for (const auto& [id, why] : r->skipped) {
      w.begin_object().key("meter_id").value(id).key("reason").value(why).end_object();
    }
    w.end_array().key("skipped_total").value(r->skipped_total);
    w.key("waited").value(wait);
    if (wait) {
      w.key("proven").value(proven).key("failed").value(failed);
      w.key("unanswered").value(unanswered);
      w.key("pending").value(static_cast<std::int64_t>(pending.size()));
      w.key("results").begin_array();
      for (const auto& [id, st] : results) {
        w.begin_object().key("meter_id").value(id).key("state").value(store::to_string(st.state));
        w.key("flagged").value(st.state == store::ChallengeState::failed);
        w.key("attempts").value(st.attempts).key("error").value(st.last_error);
        if (st.state == store::ChallengeState::proven) {
          auto p = cs.last_proof(st.meter_row);
          if (p.ok() && *p) {
            w.key("proof");
            proof_json(w, **p);
          }
        }
        w.end_object();
      }
      for (const std::string& id : pending) {
        w.begin_object().key("meter_id").value(id).key("state").value("pending").end_object();
      }
      w.end_array();
    }
    w.end_object();
    std::printf("%s\n", w.str().c_str());
  } else if (wait) {
    for (const auto& [id, st] : results) {
      if (st.state == store::ChallengeState::proven) continue;
      std::printf("  %s: %s%s: %s\n", id.c_str(), store::to_string(st.state),
                  st.state == store::ChallengeState::failed ? " (METER FLAGGED)" : "",
                  st.last_error.c_str());
    }
    std::printf("%lld proven, %lld failed, %lld unanswered", static_cast<long long>(proven),
                static_cast<long long>(failed), static_cast<long long>(unanswered));
    if (!pending.empty()) {
      std::printf(", %zu still pending after %u s (is gridseal-dkusd running with "
                  "[rollover] enabled?)",
                  pending.size(), timeout_s);
    }
    std::printf("\n");
  }
  const bool bad = r->skipped_total > 0 || (wait && (failed + unanswered > 0 || !pending.empty()));
  return bad ? kExitFailed : kExitOk;
}

}  // namespace

void register_meters(CLI::App& app, int& exit_code) {
  auto* meters = app.add_subcommand("meters", "the meter registry");
  meters->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);

  auto* imp = meters->add_subcommand("import", "import a manufacturer's fleet file (CSV)");
  auto file = std::make_shared<std::string>();
  auto batch = std::make_shared<std::size_t>(1000);
  imp->add_option("FILE", *file, "meter_id,ap_title,ecc_public_key,key_slot,key")->required();
  imp->add_option("--config", *config, "configuration file")->capture_default_str();
  imp->add_option("--batch", *batch, "rows per transaction")->check(CLI::Range(1, 100000));
  auto transport = std::make_shared<std::string>();
  imp->add_option("--transport-key", *transport,
                  "label of the transport key that wrapped:<hex> keys are wrapped under");
  auto challenge = std::make_shared<bool>(false);
  imp->add_flag("--challenge", *challenge,
                "then queue an MT-2043 challenge for every meter with a public key and no proof "
                "(the provisioning proof, sent by gridseal-dkusd)");
  imp->callback([=, &exit_code] {
    exit_code = run_import(*config, *file, *batch, *transport, *challenge);
  });

  auto* list = meters->add_subcommand("list", "list meters");
  auto limit = std::make_shared<std::size_t>(100);
  auto after = std::make_shared<std::string>();
  list->add_option("--config", *config, "configuration file")->capture_default_str();
  list->add_flag("--json", *json, "machine-readable output");
  list->add_option("--limit", *limit, "at most this many")->check(CLI::Range(1, 1000000));
  list->add_option("--after", *after, "start after this meter id");
  list->callback([=, &exit_code] { exit_code = run_list(*config, *json, *limit, *after); });

  auto* show = meters->add_subcommand("show", "one meter and its key slots");
  auto id = std::make_shared<std::string>();
  show->add_option("ID", *id, "meter id")->required();
  show->add_option("--config", *config, "configuration file")->capture_default_str();
  show->add_flag("--json", *json, "machine-readable output");
  show->callback([=, &exit_code] { exit_code = run_show(*config, *id, *json); });

  auto* revoke = meters->add_subcommand(
      "revoke", "revoke a meter's key: quarantine and rekey it (--permanent: never serve it again)");
  auto reason = std::make_shared<std::string>();
  auto permanent = std::make_shared<bool>(false);
  revoke->add_option("ID", *id, "meter id")->required();
  revoke->add_option("--reason", *reason, "why")
      ->required()
      ->check([](const std::string& r) -> std::string {
        return r.empty() || r.size() > 256 ? "the reason must be 1..256 characters" : "";
      });
  revoke->add_flag("--permanent", *permanent,
                   "the meter itself is stolen or destroyed: mark it compromised, never rekey it");
  revoke->add_option("--config", *config, "configuration file")->capture_default_str();
  revoke->add_flag("--json", *json, "machine-readable output");
  revoke->callback([=, &exit_code] {
    exit_code = run_revoke(*config, *id, *reason, *permanent, *json);
  });

  auto* reinstate = meters->add_subcommand(
      "reinstate",
      "lift a revocation: put a revoked meter back on the road to service under a NEW key. Its "
      "revoked keys are never used again (they only seal the update, as for `revoke`): a "
      "quarantined meter whose rekey was aborted gets a new revocation rekey, and is served "
      "again only once it answers under its new key. A meter revoked --permanent stays refused "
      "unless --lift-permanent. Refused (exit 1, nothing changed) for an active meter or one "
      "already being rekeyed");
  auto lift = std::make_shared<bool>(false);
  reinstate->add_option("ID", *id, "meter id")->required();
  reinstate->add_option("--reason", *reason, "why")
      ->required()
      ->check([](const std::string& r) -> std::string {
        return r.empty() || r.size() > 256 ? "the reason must be 1..256 characters" : "";
      });
  reinstate->add_flag("--lift-permanent", *lift,
                      "also lift a --permanent revocation: ONLY when it was an error and the "
                      "meter never left custody (a stolen meter's private key may be known, and "
                      "so then would its new key be: re-provision it instead)");
  reinstate->add_option("--config", *config, "configuration file")->capture_default_str();
  reinstate->add_flag("--json", *json, "machine-readable output");
  reinstate->callback([=, &exit_code] {
    exit_code = run_reinstate(*config, *id, *reason, *lift, *json);
  });

  auto* chal = meters->add_subcommand(
      "challenge",
      "prove that meters hold their registered private key (MT-2043, sent by gridseal-dkusd)");
  auto ids = std::make_shared<std::vector<std::string>>();
  auto id_file = std::make_shared<std::string>();
  auto all_unproven = std::make_shared<bool>(false);
  auto wait = std::make_shared<bool>(false);
  auto timeout = std::make_shared<std::uint32_t>(300);
  chal->add_option("ID", *ids, "meter ids");
  chal->add_option("--file", *id_file, "meter ids, one per line");
  chal->add_flag("--all-unproven", *all_unproven, "every meter without a recorded proof");
  chal->add_flag("--wait", *wait,
                 "wait until each challenge is proven, failed or unanswered; exit 1 unless all "
                 "are proven");
  chal->add_option("--timeout", *timeout, "seconds --wait waits at most")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
  chal->add_option("--config", *config, "configuration file")->capture_default_str();
  chal->add_flag("--json", *json, "machine-readable output");
  chal->callback([=, &exit_code] {
    exit_code = run_challenge(*config, *ids, *id_file, *all_unproven, *wait, *timeout, *json);
  });
}

}  // namespace gs::cli
