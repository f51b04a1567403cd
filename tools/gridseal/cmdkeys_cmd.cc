// `gridseal cmdkeys list|generate|replace|statement|retire`: the command keys gs-cmd-<n> and the
// MT-2044 statements, signed by gs-revocation, that move them into the meters' trust slots
// (src/command_keys.h, README "Command keys").
#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>

#include "c1222/profile.h"
#include "hsm/ops.h"
#include "src/audit.h"
#include "src/command_keys.h"
#include "src/config.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

// Writes the 150 service bytes to `path` (created, never overwritten: a statement file handed to
// a collection engine is not replaced silently).
Status write_service(const std::string& path, ByteView bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wbx");
  if (f == nullptr) return Error(Errc::storage_failure, "cannot create " + path + " (exists?)");
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  if (std::fclose(f) != 0 || !ok) return Error(Errc::storage_failure, "cannot write " + path);
  return {};
}

// Prints (and writes) a statement: --hex alone prints only the service's hex; --out writes its
// bytes; otherwise a summary and the hex.
int emit_statement(const cmdkeys::Statement& s, const std::string& out, bool hex_only,
                   const char* verb) {
  const Bytes service = c1222::encode_replacement_write(s.r);
  if (!out.empty()) {
    if (auto st = write_service(out, service); !st.ok()) return fail(st.error().message());
  }
  if (hex_only) {
    std::printf("%s\n", to_hex(service).c_str());
    return kExitOk;
  }
  std::printf("statement %u %s: trust slot %u <- %s (fingerprint %s), issued %s by %s, signed "
              "by gs-revocation\n",
              s.r.sequence, verb, unsigned{s.r.trust_slot}, cmdkeys::label_for(s.r.key_id).c_str(),
              cmdkeys::fingerprint(s.r.public_key).c_str(), utc(s.r.issued_at).c_str(),
              s.issued_by.c_str());
  if (!out.empty()) {
    std::printf("wrote the MT-2044 partial write (%zu bytes) to %s\n", service.size(), out.c_str());
  } else {
    std::printf("MT-2044 partial write (%zu bytes): %s\n", service.size(), to_hex(service).c_str());
  }
  std::printf("send it to every meter inside a class key_management command through "
              "gridseal-sesd (the collection engine's job)\n");
  return kExitOk;
}

struct Opened {
  config::Config cfg;
  store::KeyStore store;
};

Result<Opened> open_all(const std::string& config_path) {
  GS_ASSIGN(auto cfg, config::load(config_path));
  auto store = store::KeyStore::open(cfg.store.path, {.create = false});
  if (!store.ok()) return Error(store.error().code, cfg.store.path + ": " + store.error().message());
  return Opened{std::move(cfg), std::move(store).value()};
}

int run_list(const std::string& config_path, bool json) {
  auto o = open_all(config_path);
  if (!o.ok()) return fail(o.error().message());
  cmdkeys::CommandKeyStore ks(o->store.db());
  auto keys = ks.list();
  if (!keys.ok()) return fail(keys.error().message());
  auto slots = ks.slots();
  if (!slots.ok()) return fail(slots.error().message());
  // Keys 1 and 2 of a token initialized before the registry existed: shown from the HSM (they
  // are registered by the next generate, replace or retire).
  bool have[3] = {false, false, false};
  for (const auto& k : *keys) {
    if (k.key_id <= 2) have[k.key_id] = true;
  }
  if (!have[1] || !have[2]) {
    auto hsm = open_hsm(o->cfg.hsm);
    if (!hsm.ok()) return fail(hsm.error().message());
    auto lease = hsm->pool->acquire();
    if (!lease.ok()) return fail(lease.error().message());
    for (std::uint8_t id : cmdkeys::kInitialSlotKey) {
      if (have[id]) continue;
      auto point = cmdkeys::token_public_point(lease->session(), cmdkeys::label_for(id));
      if (!point.ok() && point.error().code == Errc::not_found) continue;
      if (!point.ok()) return fail(point.error().message());
      cmdkeys::CommandKey k;
      k.key_id = id;
      k.label = cmdkeys::label_for(id);
      k.public_key.assign(point->begin(), point->end());
      k.created_by = cmdkeys::kCreatedByInit;
      keys->push_back(std::move(k));
    }
    std::sort(keys->begin(), keys->end(),
              [](const auto& a, const auto& b) { return a.key_id < b.key_id; });
  }
  auto slot_text = [&](std::uint8_t id) -> std::string {
    auto s = slots->slot_of(id);
    if (!s) return "-";
    return std::to_string(*s) + (slots->seq[*s] == 0 ? " (initial)"
                                                     : " (statement " +
                                                           std::to_string(slots->seq[*s]) + ")");
  };
  if (json) {
    JsonWriter w;
    w.begin_object().key("keys").begin_array();
    for (const auto& k : *keys) {
      w.begin_object().key("id").value(unsigned{k.key_id}).key("label").value(k.label);
      w.key("state").value(cmdkeys::to_string(k.state));
      w.key("fingerprint").value(cmdkeys::fingerprint(k.public_key));
      w.key("public_key").value(to_hex(k.public_key));
      w.key("trust_slot");
      if (auto s = slots->slot_of(k.key_id)) {
        w.value(unsigned{*s});
      } else {
        w.null();
      }
      w.key("created_by").value(k.created_by).key("created_at").value(k.created_at);
      w.key("retired_by").value(k.retired_by).key("retired_at");
      if (k.retired_at) {
        w.value(*k.retired_at);
      } else {
        w.null();
      }
      w.end_object();
    }
    w.end_array().key("trust_slots").begin_array();
    for (std::uint8_t s = 0; s < c1222::kTrustSlotCount; ++s) {
      w.begin_object().key("slot").value(unsigned{s}).key("key_id").value(unsigned{slots->key[s]});
      w.key("statement").value(std::uint64_t{slots->seq[s]}).end_object();
    }
    w.end_array().end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  if (keys->empty()) {
    std::printf("no command keys (run `gridseal hsm init`)\n");
    return kExitOk;
  }
  std::printf("%-4s %-11s %-10s %-18s %-16s %-20s %s\n", "id", "label", "state", "trust slot",
              "fingerprint", "created", "by");
  for (const auto& k : *keys) {
    std::printf("%-4u %-11s %-10s %-18s %-16s %-20s %s\n", unsigned{k.key_id}, k.label.c_str(),
                cmdkeys::to_string(k.state), slot_text(k.key_id).c_str(),
                cmdkeys::fingerprint(k.public_key).substr(0, 16).c_str(),
                k.created_at == 0 ? "-" : utc(k.created_at).c_str(), k.created_by.c_str());
  }
  return kExitOk;
}

int run_generate(const std::string& config_path, bool json) {
  auto o = open_all(config_path);
  if (!o.ok()) return fail(o.error().message());
  const std::string actor = current_actor();
  std::optional<cmdkeys::CommandKey> made;
  Status st = audited_hsm(
      o->cfg, o->store.db(),
      [&](db::Db& db, hsm::Session& s, std::vector<audit::Event>& events) -> Status {
        const std::int64_t now = now_s();
        GS_TRY(cmdkeys::register_initial_keys(db, s, now));
        auto k = cmdkeys::generate_key(db, s, actor, now, o->cfg.hsm.command_key_session_copy);
        audit::Detail d;
        if (k.ok()) {
          d.add("key_id", unsigned{k->key_id});
          d.add("fingerprint", cmdkeys::fingerprint(k->public_key));
          events.push_back({0, actor, "command_key_generated", k->label, d.str()});
          made = std::move(k).value();
          return Status{};
        }
        d.add("refused", audit::clip(error_text(k.error()), audit::kMaxDetailValue));
        events.push_back({0, actor, "command_key_generate_refused", "gs-cmd", d.str()});
        return std::move(k).error();
      });
  if (!st.ok()) return fail("cmdkeys generate: " + error_text(st.error()));
  if (json) {
    JsonWriter w;
    w.begin_object().key("id").value(unsigned{made->key_id}).key("label").value(made->label);
    w.key("fingerprint").value(cmdkeys::fingerprint(made->public_key));
    w.key("public_key").value(to_hex(made->public_key)).end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("generated command key %u (%s, EC P-256, sign only, non-extractable)\n"
              "fingerprint %s\n"
              "meters do not trust it yet: `gridseal cmdkeys replace --slot S --key %u` signs the "
              "statement that moves it into a trust slot\n",
              unsigned{made->key_id}, made->label.c_str(),
              cmdkeys::fingerprint(made->public_key).c_str(), unsigned{made->key_id});
  return kExitOk;
}

int run_replace(const std::string& config_path, unsigned slot, unsigned key,
                const std::string& out, bool hex) {
  auto o = open_all(config_path);
  if (!o.ok()) return fail(o.error().message());
  const std::string actor = current_actor();
  std::optional<cmdkeys::Statement> issued;
  Status st = audited_hsm(
      o->cfg, o->store.db(),
      [&](db::Db& db, hsm::Session& s, std::vector<audit::Event>& events) -> Status {
        const std::int64_t now = now_s();
        GS_TRY(cmdkeys::register_initial_keys(db, s, now));
        auto r = cmdkeys::issue_replacement(db, s, static_cast<std::uint8_t>(slot),
                                            static_cast<std::uint8_t>(key), actor, now);
        audit::Detail d;
        d.add("slot", slot).add("key_id", key);
        if (r.ok()) {
          d.add("sequence", std::uint64_t{r->r.sequence});
          d.add("fingerprint", cmdkeys::fingerprint(r->r.public_key));
          d.add("signature", to_hex(r->r.signature));
          events.push_back({0, actor, "command_key_replacement_signed",
                            cmdkeys::label_for(static_cast<std::uint8_t>(key)), d.str()});
          issued = std::move(r).value();
          return Status{};
        }
        d.add("refused", audit::clip(error_text(r.error()), audit::kMaxDetailValue));
        events.push_back({0, actor, "command_key_replacement_refused",
                          cmdkeys::label_for(static_cast<std::uint8_t>(key)), d.str()});
        return std::move(r).error();
      });
  if (!st.ok()) return fail("cmdkeys replace: " + error_text(st.error()));
  return emit_statement(*issued, out, hex, "signed and stored");
}

int run_statement(const std::string& config_path, std::uint32_t seq, const std::string& out,
                  bool hex) {
  auto o = open_all(config_path);
  if (!o.ok()) return fail(o.error().message());
  cmdkeys::CommandKeyStore ks(o->store.db());
  auto s = ks.statement(seq);
  if (!s.ok()) return fail(s.error().message());
  if (!*s) return fail("no statement " + std::to_string(seq));
  return emit_statement(**s, out, hex, "(stored)");
}

int run_retire(const std::string& config_path, unsigned key) {
  auto o = open_all(config_path);
  if (!o.ok()) return fail(o.error().message());
  const std::string actor = current_actor();
  const std::string label = cmdkeys::label_for(static_cast<std::uint8_t>(key));
  Status st = audited_hsm(
      o->cfg, o->store.db(),
      [&](db::Db& db, hsm::Session& s, std::vector<audit::Event>& events) -> Status {
        const std::int64_t now = now_s();
        GS_TRY(cmdkeys::register_initial_keys(db, s, now));
        cmdkeys::CommandKeyStore ks(db);
        Status r = ks.retire(static_cast<std::uint8_t>(key), actor, now);
        audit::Detail d;
        d.add("key_id", key);
        if (!r.ok()) d.add("refused", audit::clip(error_text(r.error()), audit::kMaxDetailValue));
        events.push_back(
            {0, actor, r.ok() ? "command_key_retired" : "command_key_retire_refused", label,
             d.str()});
        return r;
      });
  if (!st.ok()) return fail("cmdkeys retire: " + error_text(st.error()));
  std::printf("retired %s: gridseal-sesd and the DKUS rollover refuse to start with it; it stays "
              "in the HSM\n",
              label.c_str());
  return kExitOk;
}

}  // namespace

void register_cmdkeys(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand(
      "cmdkeys", "command keys gs-cmd-<n> and the MT-2044 statements that replace them in meters");
  cmd->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);
  auto out = std::make_shared<std::string>();
  auto hex = std::make_shared<bool>(false);

  auto* list = cmd->add_subcommand("list", "command keys, their state and trust slot");
  list->add_option("--config", *config, "configuration file")->capture_default_str();
  list->add_flag("--json", *json, "machine-readable output");
  list->callback([=, &exit_code] { exit_code = run_list(*config, *json); });

  auto* gen = cmd->add_subcommand(
      "generate", "create the next command key gs-cmd-<n> (n >= 3) in the HSM and register it");
  gen->add_option("--config", *config, "configuration file")->capture_default_str();
  gen->add_flag("--json", *json, "machine-readable output");
  gen->callback([=, &exit_code] { exit_code = run_generate(*config, *json); });

  auto* rep = cmd->add_subcommand(
      "replace",
      "sign (gs-revocation) and store the MT-2044 statement putting key N into trust slot S");
  auto slot = std::make_shared<unsigned>(0);
  auto key = std::make_shared<unsigned>(0);
  rep->add_option("--slot", *slot, "trust slot (0 or 1)")->required()->check(CLI::Range(0U, 1U));
  rep->add_option("--key", *key, "command key id (1..255)")->required()->check(CLI::Range(1U, 255U));
  rep->add_option("--out", *out, "write the 150-byte MT-2044 partial write to this new file");
  rep->add_flag("--hex", *hex, "print only the partial write, in hex");
  rep->add_option("--config", *config, "configuration file")->capture_default_str();
  rep->callback([=, &exit_code] { exit_code = run_replace(*config, *slot, *key, *out, *hex); });

  auto* stm = cmd->add_subcommand("statement", "print a stored MT-2044 statement again");
  auto seq = std::make_shared<std::uint32_t>(0);
  stm->add_option("SEQ", *seq, "statement sequence")->required()->check(
      CLI::Range(std::uint32_t{1}, UINT32_MAX));
  stm->add_option("--out", *out, "write the 150-byte MT-2044 partial write to this new file");
  stm->add_flag("--hex", *hex, "print only the partial write, in hex");
  stm->add_option("--config", *config, "configuration file")->capture_default_str();
  stm->callback([=, &exit_code] { exit_code = run_statement(*config, *seq, *out, *hex); });

  auto* ret = cmd->add_subcommand(
      "retire", "mark a command key no trust slot holds retired (the daemons refuse it)");
  auto rkey = std::make_shared<unsigned>(0);
  ret->add_option("KEY", *rkey, "command key id (1..255)")->required()->check(CLI::Range(1U, 255U));
  ret->add_option("--config", *config, "configuration file")->capture_default_str();
  ret->callback([=, &exit_code] { exit_code = run_retire(*config, *rkey); });
}

}  // namespace gs::cli
