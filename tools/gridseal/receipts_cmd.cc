// `gridseal receipts show`: the MT-2042 signed receipts the DKUS verified and kept for a meter.
#include <cstdio>
#include <ctime>
#include <memory>

#include "c1222/profile.h"
#include "src/config.h"
#include "src/key_store.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"

namespace gs::cli {

namespace {

std::string utc_text(std::int64_t t) {
  const std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  if (gmtime_r(&tt, &tm) == nullptr) return std::to_string(t);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

int run_show(const std::string& config_path, const std::string& id, bool json,
             std::size_t limit) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  auto m = store->meter_by_id(id);
  if (!m.ok()) return fail(m.error().message());
  if (!m->has_value()) return fail("no meter " + id);
  auto receipts = store->receipts_for_meter((*m)->row, limit);
  if (!receipts.ok()) return fail(receipts.error().message());
  if (json) {
    JsonWriter w;
    w.begin_array();
    for (const auto& r : *receipts) {
      w.begin_object().key("meter_id").value(r.meter_id);
      w.key("invocation_id").value(r.invocation_id).key("result").value(unsigned{r.result});
      w.key("executed_at").value(r.executed_at).key("command_digest").value(to_hex(r.command_digest));
      w.key("signature").value(to_hex(r.signature)).key("message_id").value(r.message_id);
      w.key("received_at").value(r.received_at).end_object();
    }
    w.end_array();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("meter %s (%s): %zu receipt%s\n", (*m)->meter_id.c_str(),
              (*m)->ap_title_text.c_str(), receipts->size(), receipts->size() == 1 ? "" : "s");
  if (receipts->empty()) return kExitOk;
  std::printf("%-12s %-6s %-21s %-21s %s\n", "command id", "result", "executed at",
              "received at", "command digest");
  for (const auto& r : *receipts) {
    std::printf("%-12llu %-6u %-21s %-21s %s\n", static_cast<unsigned long long>(r.invocation_id),
                unsigned{r.result}, utc_text(r.executed_at).c_str(),
                utc_text(r.received_at).c_str(), to_hex(r.command_digest).c_str());
  }
  return kExitOk;
}

}  // namespace

void register_receipts(CLI::App& app, int& exit_code) {
  auto* receipts = app.add_subcommand("receipts", "MT-2042 signed receipts kept by the DKUS");
  receipts->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);
  auto id = std::make_shared<std::string>();
  auto limit = std::make_shared<std::size_t>(100);

  auto* show = receipts->add_subcommand("show", "a meter's receipts, newest command first");
  show->add_option("METER", *id, "meter id")->required();
  show->add_option("--config", *config, "configuration file")->capture_default_str();
  show->add_flag("--json", *json, "machine-readable output");
  show->add_option("--limit", *limit, "at most this many")->check(CLI::Range(1, 1000000));
  show->callback([=, &exit_code] { exit_code = run_show(*config, *id, *json, *limit); });
}

}  // namespace gs::cli
