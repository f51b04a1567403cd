// `gridseal policy apply|show`: SES policy changes as an approved, recorded act
// (issue 7). `apply` validates a policy file with the SES's own parser and
// records its SHA-256, size and content with who applied it and when
// (src/policy_record.h) together with an audit record; gridseal-sesd with
// ses.require_approved_policy then serves only that file.
#include <cstdio>
#include <ctime>
#include <memory>

#include "c1222/oid.h"
#include "src/audit.h"
#include "src/config.h"
#include "src/key_store.h"
#include "src/policy_record.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

std::string hex(const Sha256Digest &d) {
  return to_hex(ByteView(d.data(), d.size()));
}

void applied_json(JsonWriter &w, const policy::AppliedPolicy &a,
                  bool with_content) {
  w.begin_object().key("seq").value(a.seq).key("sha256").value(hex(a.sha256));
  w.key("size").value(a.size).key("applied_by").value(a.applied_by);
  w.key("applied_at").value(a.applied_at);
  if (with_content)
    w.key("content").value(a.content);
  w.end_object();
}

int run_apply(const std::string &config_path, const std::string &file,
              bool json) {
  auto cfg = config::load(config_path);
  if (!cfg.ok())
    return fail(cfg.error().message());
  auto base = c1222::oid_from_dotted(cfg->base_oid);
  if (!base.ok())
    return fail(base.error().message());
  // The SES's own parser: a file gridseal-sesd would refuse is never approved.
  auto pf = policy::read_policy_file(file, *base);
  if (!pf.ok())
    return fail(pf.error().message());
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok())
    return fail(cfg->store.path + ": " + store.error().message());
  const std::string actor = current_actor();
  std::optional<policy::AppliedPolicy> previous;
  std::optional<policy::AppliedPolicy> applied;
  Status st = audited(
      *cfg, store->db(),
      [&](db::Db &db, std::vector<audit::Event> &events) -> Status {
        GS_ASSIGN(previous, policy::newest_applied(db));
        // Applying the policy that is already the newest changes nothing and
        // records nothing (a second run of an approved request is harmless).
        if (previous && previous->sha256 == pf->sha256)
          return Status{};
        GS_ASSIGN(applied, policy::record_applied(
                               db, pf->text, pf->sha256, actor,
                               static_cast<std::int64_t>(std::time(nullptr))));
        audit::Detail d;
        d.add("sha256", hex(pf->sha256))
            .add("size", applied->size)
            .add("seq", applied->seq);
        d.add("file", audit::clip(file, 256));
        d.add("previous_sha256",
              previous ? hex(previous->sha256) : std::string("none"));
        events.push_back({0, actor, "policy_applied", "policy", d.str()});
        return Status{};
      });
  if (!st.ok())
    return fail(st.error().message());
  const bool changed = applied.has_value();
  const policy::AppliedPolicy &now = changed ? *applied : *previous;
  if (json) {
    JsonWriter w;
    w.begin_object().key("changed").value(changed).key("file").value(file).key(
        "applied");
    applied_json(w, now, false);
    w.end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  if (!changed) {
    std::printf("%s is already the applied policy (#%lld, sha256 %s): nothing "
                "changed\n",
                file.c_str(), static_cast<long long>(now.seq),
                hex(now.sha256).c_str());
    return kExitOk;
  }
  std::printf("policy %s applied as #%lld (sha256 %s, %lld bytes, by %s); "
              "gridseal-sesd serves "
              "it after SIGHUP or a restart, and with "
              "ses.require_approved_policy refuses any "
              "other file\n",
              file.c_str(), static_cast<long long>(now.seq),
              hex(now.sha256).c_str(), static_cast<long long>(now.size),
              now.applied_by.c_str());
  return kExitOk;
}

int run_show(const std::string &config_path, bool content, bool json) {
  auto cfg = config::load(config_path);
  if (!cfg.ok())
    return fail(cfg.error().message());
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok())
    return fail(cfg->store.path + ": " + store.error().message());
  auto a = policy::newest_applied(store->db(), content);
  if (!a.ok())
    return fail(a.error().message());
  if (json) {
    JsonWriter w;
    if (*a) {
      applied_json(w, **a, content);
    } else {
      w.null();
    }
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  if (!*a) {
    std::printf("no policy applied yet: gridseal-sesd serves its policy file "
                "unapproved (with a "
                "warning) until the first `gridseal policy apply FILE`\n");
    return kExitOk;
  }
  const auto &p = **a;
  std::printf("applied policy #%lld\nsha256      %s\nsize        %lld "
              "bytes\napplied by  %s\n"
              "applied at  %s\n",
              static_cast<long long>(p.seq), hex(p.sha256).c_str(),
              static_cast<long long>(p.size), p.applied_by.c_str(),
              utc(p.applied_at).c_str());
  if (content)
    std::printf("----\n%s", p.content.c_str());
  return kExitOk;
}

} // namespace

void register_policy(CLI::App &app, int &exit_code) {
  auto *pol =
      app.add_subcommand("policy", "the SES policy: apply (approve) and show");
  pol->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);

  auto *apply = pol->add_subcommand(
      "apply",
      "validate a policy file with the SES's parser and record it as the "
      "approved policy "
      "(SHA-256, size, content, who, when; audited). gridseal-sesd with "
      "ses.require_approved_policy = true serves only the newest applied file; "
      "applying the current one "
      "again changes nothing");
  auto file = std::make_shared<std::string>();
  apply->add_option("FILE", *file, "the policy file (conf/policy.toml format)")
      ->required();
  apply->add_option("--config", *config, "configuration file")
      ->capture_default_str();
  apply->add_flag("--json", *json, "machine-readable output");
  apply->callback(
      [=, &exit_code] { exit_code = run_apply(*config, *file, *json); });

  auto *show = pol->add_subcommand("show", "the newest applied policy");
  auto content = std::make_shared<bool>(false);
  show->add_flag("--content", *content, "also print the policy text");
  show->add_option("--config", *config, "configuration file")
      ->capture_default_str();
  show->add_flag("--json", *json, "machine-readable output");
  show->callback(
      [=, &exit_code] { exit_code = run_show(*config, *content, *json); });
}

} // namespace gs::cli
