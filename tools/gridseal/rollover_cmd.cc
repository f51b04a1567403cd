// `gridseal rollover start|status|resume|abort|list`: key-rollover campaigns (DESIGN §1.3) that
// gridseal-dkusd carries out.
#include <pwd.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <thread>

#include "src/config.h"
#include "src/rollover_store.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/operator_gate.h"
#include "tools/gridseal/json.h"

namespace gs::cli {

namespace {

constexpr std::size_t kMaxFileIds = 10'000'000;
constexpr std::size_t kMaxFileLine = 4096;  // bytes, comment included
constexpr std::size_t kListedInReport = 20;

int usage(const std::string& what) {
  std::fprintf(stderr, "gridseal: %s\n", what.c_str());
  return kExitUsage;
}

std::string utc_text(std::int64_t t) {
  const auto tt = static_cast<std::time_t>(t);
  std::tm tm{};
  if (gmtime_r(&tt, &tm) == nullptr) return std::to_string(t);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}


Result<store::KeyStore> open_store(const std::string& config_path) {
  GS_ASSIGN(auto cfg, config::load(config_path));
  return store::KeyStore::open(cfg.store.path, {.create = false});
}

// Meter ids from a file: one per line, '#' starts a comment, blank lines ignored. Bounded:
// lines over kMaxFileLine bytes, ids over kMaxMeterIdLength characters and files with more than
// kMaxFileIds ids are refused, naming the line.
Result<std::vector<std::string>> read_id_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {Errc::not_found, "cannot read " + path};
  std::vector<std::string> ids;
  std::string line;
  std::size_t line_no = 0;
  auto finish_line = [&]() -> Status {
    ++line_no;
    std::string_view v(line);
    if (auto hash = v.find('#'); hash != std::string_view::npos) v = v.substr(0, hash);
    const auto first = v.find_first_not_of(" \t\r");
    if (first == std::string_view::npos) return {};
    v = v.substr(first, v.find_last_not_of(" \t\r") - first + 1);
    if (v.size() > store::kMaxMeterIdLength) {
      return {Errc::too_large, path + ":" + std::to_string(line_no) + ": meter id longer than " +
                                   std::to_string(store::kMaxMeterIdLength) + " characters"};
    }
    if (ids.size() == kMaxFileIds) {
      return {Errc::too_large, path + ": more than " + std::to_string(kMaxFileIds) + " meters"};
    }
    ids.emplace_back(v);
    return {};
  };
  char buf[1 << 16];
  bool pending = false;
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    const auto n = static_cast<std::size_t>(in.gcount());
    for (std::size_t i = 0; i < n; ++i) {
      if (buf[i] == '\n') {
        GS_TRY(finish_line());
        line.clear();
        pending = false;
        continue;
      }
      if (line.size() == kMaxFileLine) {
        return {Errc::too_large, path + ":" + std::to_string(line_no + 1) + ": line longer than " +
                                     std::to_string(kMaxFileLine) + " bytes"};
      }
      line.push_back(buf[i]);
      pending = true;
    }
  }
  if (in.bad()) return {Errc::storage_failure, "cannot read " + path};
  if (pending) GS_TRY(finish_line());
  return ids;
}

void campaign_json(JsonWriter& w, const store::Campaign& c) {
  w.begin_object().key("id").value(c.id).key("state").value(store::to_string(c.state));
  w.key("reason").value(store::to_string(c.reason));
  // JSON numbers here are integers: the configured rate in meters per hour, 0 = unthrottled.
  w.key("rate_per_hour").value(static_cast<std::int64_t>(std::llround(c.rate * 3600)));
  w.key("created_by").value(c.created_by).key("created_at").value(c.created_at);
  w.key("changed_at").value(c.changed_at).key("total").value(c.total).end_object();
}

std::string rate_text(double rate) {
  if (rate <= 0) return "as fast as the DKUS goes";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g meters/s", rate);
  return buf;
}

// ---- start ----------------------------------------------------------------------------------

int run_start(const std::string& config_path, const std::vector<std::string>& meters,
              const std::string& file, bool all, double rate, bool json) {
  std::vector<std::string> ids = meters;
  if (!file.empty()) {
    auto r = read_id_file(file);
    if (!r.ok()) return fail(r.error().detail);
    ids = std::move(*r);
    if (ids.empty()) return fail(file + ": no meter ids");
  }
  for (const auto& id : ids) {
    if (id.empty() || id.size() > store::kMaxMeterIdLength) {
      return usage("meter ids are 1.." + std::to_string(store::kMaxMeterIdLength) + " characters");
    }
  }
  auto ks = open_store(config_path);
  if (!ks.ok()) return fail(ks.error().message());
  store::RolloverStore rs(*ks);
  store::CampaignSpec spec;
  spec.rate = rate;
  spec.created_by = current_actor();
  auto r = rs.start(spec, ids, all);
  if (!r.ok()) return fail(error_text(r.error()));
  if (json) {
    JsonWriter w;
    w.begin_object().key("campaign").value(r->campaign).key("added").value(r->added);
    w.key("skipped_total").value(r->skipped_total).key("skipped").begin_array();
    for (const auto& [id, why] : r->skipped) {
      w.begin_object().key("meter_id").value(id).key("reason").value(why).end_object();
    }
    w.end_array().end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("campaign %lld started: %lld meter%s queued, %lld skipped\n",
              static_cast<long long>(r->campaign), static_cast<long long>(r->added),
              r->added == 1 ? "" : "s", static_cast<long long>(r->skipped_total));
  for (std::size_t i = 0; i < r->skipped.size() && i < kListedInReport; ++i) {
    std::printf("  skipped %s: %s\n", r->skipped[i].first.c_str(), r->skipped[i].second.c_str());
  }
  if (r->skipped_total > static_cast<std::int64_t>(kListedInReport)) {
    std::printf(
        "  ... and %lld more skipped\n",
        static_cast<long long>(r->skipped_total - static_cast<std::int64_t>(kListedInReport)));
  }
  std::printf(
      "gridseal-dkusd picks the campaign up and rolls the keys over (%s).\n"
      "Follow it with: gridseal rollover status %lld --watch\n",
      rate_text(rate).c_str(), static_cast<long long>(r->campaign));
  return kExitOk;
}

// ---- status ---------------------------------------------------------------------------------

struct View {
  store::CampaignProgress p;
  double confirm_rate = 0;  // meters/s over the confirmations so far, 0 unknown
  std::int64_t eta = -1;    // seconds, -1 unknown
  bool finished = false;    // done/aborted with nothing in flight
};

View make_view(store::CampaignProgress p) {
  View v;
  const auto& c = p.campaign;
  if (p.confirmed >= 2 && p.last_confirm_at > p.first_confirm_at) {
    v.confirm_rate = static_cast<double>(p.confirmed - 1) /
                     static_cast<double>(p.last_confirm_at - p.first_confirm_at);
  } else if (p.confirmed >= 1) {
    v.confirm_rate = static_cast<double>(p.confirmed) / static_cast<double>(std::max<std::int64_t>(
                                                            1, p.last_confirm_at - c.created_at));
  }
  const std::int64_t left = p.queued + p.prepared;
  if (left == 0) {
    v.eta = 0;
  } else if (v.confirm_rate > 0 && c.state == store::CampaignState::running) {
    v.eta = static_cast<std::int64_t>(std::ceil(static_cast<double>(left) / v.confirm_rate));
  }
  v.finished = c.state != store::CampaignState::running && p.prepared == 0;
  v.p = std::move(p);
  return v;
}

std::string duration_text(std::int64_t s) {
  char buf[48];
  if (s < 120) {
    std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(s));
  } else if (s < 7200) {
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  } else {
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(s / 3600),
                  static_cast<long long>((s % 3600) / 60));
  }
  return buf;
}

// One line: bar, counts, rate, ETA.
std::string status_line(const View& v) {
  const auto& p = v.p;
  const std::int64_t total = std::max<std::int64_t>(p.campaign.total, 1);
  const double frac = std::min(1.0, static_cast<double>(p.confirmed) / static_cast<double>(total));
  const int filled = static_cast<int>(frac * 30);
  char buf[512];
  char rate[48] = "rate n/a";
  if (v.confirm_rate > 0) std::snprintf(rate, sizeof rate, "%.1f meters/s", v.confirm_rate);
  std::string eta = v.finished   ? std::string("finished")
                    : v.eta >= 0 ? "ETA " + duration_text(v.eta)
                                 : std::string("ETA n/a");
  std::snprintf(buf, sizeof buf,
                "[%.*s%*s] %3d%% %lld/%lld confirmed | queued %lld, in flight %lld (sent %lld), "
                "failed %lld, aborted %lld | %s, %s | %s",
                filled, "##############################", 30 - filled, "",
                static_cast<int>(frac * 100), static_cast<long long>(p.confirmed),
                static_cast<long long>(p.campaign.total), static_cast<long long>(p.queued),
                static_cast<long long>(p.prepared), static_cast<long long>(p.sent),
                static_cast<long long>(p.failed), static_cast<long long>(p.aborted), rate,
                eta.c_str(), store::to_string(p.campaign.state));
  return buf;
}

void status_json(JsonWriter& w, const View& v,
                 const std::vector<std::pair<std::string, std::string>>& failed) {
  const auto& p = v.p;
  w.begin_object().key("campaign");
  campaign_json(w, p.campaign);
  w.key("queued").value(p.queued).key("prepared").value(p.prepared);
  w.key("in_flight").value(p.prepared).key("sent").value(p.sent);
  w.key("confirmed").value(p.confirmed).key("failed").value(p.failed);
  w.key("aborted").value(p.aborted);
  w.key("first_confirm_at")
      .value(p.first_confirm_at)
      .key("last_confirm_at")
      .value(p.last_confirm_at);
  w.key("confirm_rate_per_hour")
      .value(static_cast<std::int64_t>(std::llround(v.confirm_rate * 3600)));
  w.key("eta_seconds");
  if (v.eta >= 0) {
    w.value(v.eta);
  } else {
    w.null();
  }
  w.key("finished").value(v.finished);
  w.key("failed_meters").begin_array();
  for (const auto& [id, err] : failed) {
    w.begin_object().key("meter_id").value(id).key("error").value(err).end_object();
  }
  w.end_array().end_object();
}

void status_report(const View& v, const std::vector<std::pair<std::string, std::string>>& failed) {
  const auto& c = v.p.campaign;
  std::printf("campaign %lld: %s (%s), started %s by %s, %lld meter%s, %s\n",
              static_cast<long long>(c.id), store::to_string(c.state),
              c.reason == store::CampaignReason::revocation ? "revocation of a compromised key"
                                                            : "operator rollover",
              utc_text(c.created_at).c_str(), c.created_by.c_str(), static_cast<long long>(c.total),
              c.total == 1 ? "" : "s", rate_text(c.rate).c_str());
  std::printf("%s\n", status_line(v).c_str());
  if (c.state != store::CampaignState::running && v.p.prepared > 0) {
    std::printf(
        "%lld meter%s in flight are still finished by gridseal-dkusd (they may already "
        "hold their new key)\n",
        static_cast<long long>(v.p.prepared), v.p.prepared == 1 ? "" : "s");
  }
  if (v.p.failed > 0) {
    std::printf("failed meters (%lld; `gridseal rollover resume %lld` retries them):\n",
                static_cast<long long>(v.p.failed), static_cast<long long>(c.id));
    for (const auto& [id, err] : failed) {
      std::printf("  %s: %s\n", id.c_str(), err.empty() ? "(no error recorded)" : err.c_str());
    }
    if (v.p.failed > static_cast<std::int64_t>(failed.size())) {
      std::printf("  ... and %lld more\n",
                  static_cast<long long>(v.p.failed - static_cast<std::int64_t>(failed.size())));
    }
  }
}

Result<std::int64_t> newest_campaign(store::RolloverStore& rs) {
  GS_ASSIGN(auto list, rs.campaigns(1));
  if (list.empty()) return {Errc::not_found, "no rollover campaign yet"};
  return list.front().id;
}

int run_status(const std::string& config_path, std::int64_t id, bool watch,
               std::int64_t interval_ms, bool json) {
  auto ks = open_store(config_path);
  if (!ks.ok()) return fail(ks.error().message());
  store::RolloverStore rs(*ks);
  if (id == 0) {
    auto n = newest_campaign(rs);
    if (!n.ok()) return fail(n.error().detail);
    id = *n;
  }
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  bool drew = false;
  while (true) {
    auto p = rs.progress(id);
    if (!p.ok()) {
      if (drew) std::printf("\n");
      return fail(p.error().code == Errc::not_found ? p.error().detail : p.error().message());
    }
    View v = make_view(std::move(*p));
    std::vector<std::pair<std::string, std::string>> failed;
    const bool last = !watch || v.finished;
    if (v.p.failed > 0 && (json || last)) {
      auto f = rs.steps_in_state(id, store::StepState::failed, kListedInReport);
      if (!f.ok()) return fail(f.error().message());
      failed = std::move(*f);
    }
    if (json) {
      JsonWriter w;
      status_json(w, v, failed);
      std::printf("%s\n", w.str().c_str());  // with --watch: one object per line
      std::fflush(stdout);
      if (last) return kExitOk;
    } else if (last) {
      if (drew && tty) std::printf("\r\033[K");
      status_report(v, failed);
      return kExitOk;
    } else if (tty) {
      std::printf("\r\033[K%s", status_line(v).c_str());
      drew = true;
      std::fflush(stdout);
    } else {
      std::printf("%s %s\n", utc_text(static_cast<std::int64_t>(std::time(nullptr))).c_str(),
                  status_line(v).c_str());
      std::fflush(stdout);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(interval_ms));
  }
}

// ---- resume / abort / list ------------------------------------------------------------------

int run_resume(const std::string& config_path, std::int64_t id, bool json) {
  auto ks = open_store(config_path);
  if (!ks.ok()) return fail(ks.error().message());
  store::RolloverStore rs(*ks);
  if (id == 0) {
    auto n = newest_campaign(rs);
    if (!n.ok()) return fail(n.error().detail);
    id = *n;
  }
  auto before = rs.progress(id);
  if (!before.ok()) return fail(before.error().detail);
  auto changed = rs.resume(id);
  if (!changed.ok()) return fail(changed.error().message());
  auto after = rs.progress(id);
  if (!after.ok()) return fail(after.error().message());
  if (json) {
    JsonWriter w;
    w.begin_object().key("campaign").value(id).key("changed").value(*changed);
    w.key("state_before").value(store::to_string(before->campaign.state));
    w.key("state").value(store::to_string(after->campaign.state));
    w.key("queued").value(after->queued).key("prepared").value(after->prepared);
    w.key("failed").value(after->failed).end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf(
      "campaign %lld: %s -> %s; %lld step%s back in work (failed: %lld -> %lld, queued: "
      "%lld -> %lld, in flight: %lld -> %lld)\n",
      static_cast<long long>(id), store::to_string(before->campaign.state),
      store::to_string(after->campaign.state), static_cast<long long>(*changed),
      *changed == 1 ? "" : "s", static_cast<long long>(before->failed),
      static_cast<long long>(after->failed), static_cast<long long>(before->queued),
      static_cast<long long>(after->queued), static_cast<long long>(before->prepared),
      static_cast<long long>(after->prepared));
  if (*changed > 0) std::printf("gridseal-dkusd picks the steps up again.\n");
  return kExitOk;
}

int run_abort(const std::string& config_path, std::int64_t id, bool json) {
  auto ks = open_store(config_path);
  if (!ks.ok()) return fail(ks.error().message());
  store::RolloverStore rs(*ks);
  auto before = rs.progress(id);
  if (!before.ok()) return fail(before.error().detail);
  auto changed = rs.abort(id);
  if (!changed.ok()) return fail(changed.error().message());
  auto after = rs.progress(id);
  if (!after.ok()) return fail(after.error().message());
  if (json) {
    JsonWriter w;
    w.begin_object().key("campaign").value(id).key("changed").value(*changed);
    w.key("state_before").value(store::to_string(before->campaign.state));
    w.key("state").value(store::to_string(after->campaign.state));
    w.key("in_flight").value(after->prepared).key("aborted").value(after->aborted).end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("campaign %lld: %s -> %s; %lld step%s aborted (%lld queued, %lld failed before)\n",
              static_cast<long long>(id), store::to_string(before->campaign.state),
              store::to_string(after->campaign.state), static_cast<long long>(*changed),
              *changed == 1 ? "" : "s", static_cast<long long>(before->queued),
              static_cast<long long>(before->failed));
  if (after->prepared > 0) {
    std::printf(
        "%lld meter%s in flight are still finished by gridseal-dkusd (they may already "
        "hold their new key)\n",
        static_cast<long long>(after->prepared), after->prepared == 1 ? "" : "s");
  }
  if (after->campaign.reason == store::CampaignReason::revocation && after->confirmed == 0) {
    std::printf(
        "the meter stays quarantined: revoke it again to rekey it, or with --permanent "
        "to retire it\n");
  }
  return kExitOk;
}

int run_list(const std::string& config_path, std::size_t limit, bool json) {
  auto ks = open_store(config_path);
  if (!ks.ok()) return fail(ks.error().message());
  store::RolloverStore rs(*ks);
  auto list = rs.campaigns(limit);
  if (!list.ok()) return fail(list.error().message());
  std::vector<store::CampaignProgress> ps;
  ps.reserve(list->size());
  for (const auto& c : *list) {
    auto p = rs.progress(c.id);
    if (!p.ok()) return fail(p.error().message());
    ps.push_back(std::move(*p));
  }
  if (json) {
    JsonWriter w;
    w.begin_array();
    for (const auto& p : ps) {
      w.begin_object().key("campaign");
      campaign_json(w, p.campaign);
      w.key("queued").value(p.queued).key("prepared").value(p.prepared);
      w.key("confirmed").value(p.confirmed).key("failed").value(p.failed);
      w.key("aborted").value(p.aborted).end_object();
    }
    w.end_array();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  if (ps.empty()) {
    std::printf("no rollover campaigns\n");
    return kExitOk;
  }
  std::printf("%-6s %-8s %-10s %-21s %-16s %8s %9s %9s %7s %7s\n", "id", "state", "reason",
              "created", "by", "meters", "confirmed", "in flight", "failed", "aborted");
  for (const auto& p : ps) {
    const auto& c = p.campaign;
    std::printf("%-6lld %-8s %-10s %-21s %-16s %8lld %9lld %9lld %7lld %7lld\n",
                static_cast<long long>(c.id), store::to_string(c.state), store::to_string(c.reason),
                utc_text(c.created_at).c_str(), c.created_by.c_str(),
                static_cast<long long>(c.total), static_cast<long long>(p.confirmed),
                static_cast<long long>(p.prepared), static_cast<long long>(p.failed),
                static_cast<long long>(p.aborted));
  }
  return kExitOk;
}

}  // namespace

void register_rollover(CLI::App& app, int& exit_code) {
  auto* ro = app.add_subcommand("rollover", "key-rollover campaigns run by gridseal-dkusd");
  ro->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);
  auto id = std::make_shared<std::int64_t>(0);

  auto* start = ro->add_subcommand("start", "roll the keys of meters over");
  auto meters = std::make_shared<std::vector<std::string>>();
  auto file = std::make_shared<std::string>();
  auto all = std::make_shared<bool>(false);
  auto rate = std::make_shared<double>(0);
  auto* which = start->add_option_group("meters", "which meters (exactly one)");
  which->add_option("--meters", *meters, "meter ids")->expected(1, 1'000'000);
  which->add_option("--file", *file, "file of meter ids, one a line, '#' comments");
  which->add_flag("--all", *all, "every active meter");
  which->require_option(1);
  start->add_option("--rate", *rate, "meters per second (0: as fast as the DKUS goes)")
      ->check([](const std::string& v) -> std::string {
        // 0, or at least 0.001 (3.6 meters an hour): --json reports whole meters per hour.
        char* end = nullptr;
        const double r = std::strtod(v.c_str(), &end);
        if (end == v.c_str() || *end != '\0' || !std::isfinite(r) ||
            (r != 0 && (r < 0.001 || r > store::kMaxCampaignRate))) {
          return "the rate must be 0 or 0.001..1000000 meters per second";
        }
        return "";
      });
  start->add_option("--config", *config, "configuration file")->capture_default_str();
  start->add_flag("--json", *json, "machine-readable output");
  start->callback(
      [=, &exit_code] { exit_code = run_start(*config, *meters, *file, *all, *rate, *json); });

  auto* status = ro->add_subcommand("status", "progress of a campaign (default: the newest)");
  auto watch = std::make_shared<bool>(false);
  auto interval = std::make_shared<std::int64_t>(1000);
  status->add_option("ID", *id, "campaign id")->check(CLI::PositiveNumber);
  status->add_flag("--watch", *watch, "refresh until the campaign is finished");
  status->add_option("--interval-ms", *interval, "refresh interval with --watch")
      ->check(CLI::Range(std::int64_t{100}, std::int64_t{3'600'000}))
      ->capture_default_str();
  status->add_option("--config", *config, "configuration file")->capture_default_str();
  status->add_flag("--json", *json, "machine-readable output (one object per refresh)");
  status->callback(
      [=, &exit_code] { exit_code = run_status(*config, *id, *watch, *interval, *json); });

  auto* resume = ro->add_subcommand("resume", "retry failed steps, restart an aborted campaign");
  resume->add_option("ID", *id, "campaign id (default: the newest)")->check(CLI::PositiveNumber);
  resume->add_option("--config", *config, "configuration file")->capture_default_str();
  resume->add_flag("--json", *json, "machine-readable output");
  resume->callback([=, &exit_code] { exit_code = run_resume(*config, *id, *json); });

  auto* abort = ro->add_subcommand("abort", "stop a campaign (meters in flight are finished)");
  abort->add_option("ID", *id, "campaign id")->required()->check(CLI::PositiveNumber);
  abort->add_option("--config", *config, "configuration file")->capture_default_str();
  abort->add_flag("--json", *json, "machine-readable output");
  abort->callback([=, &exit_code] { exit_code = run_abort(*config, *id, *json); });

  auto* list = ro->add_subcommand("list", "campaigns, newest first");
  auto limit = std::make_shared<std::size_t>(50);
  list->add_option("--limit", *limit, "at most this many")->check(CLI::Range(1, 100000));
  list->add_option("--config", *config, "configuration file")->capture_default_str();
  list->add_flag("--json", *json, "machine-readable output");
  list->callback([=, &exit_code] { exit_code = run_list(*config, *limit, *json); });
}

}  // namespace gs::cli
