// `gridseal audit verify|export|archive|reset-anchor`: check the hash chain, the gs-audit
// checkpoint signatures and the HSM anchor (src/audit.h); export records with checkpoints as JSON
// Lines for a third party; move old records to archive files; accept a table after a restore
// (recorded in the chain itself).
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <thread>

#include "gridseal/thread_sched.h"
#include "hsm/ops.h"
#include "src/audit.h"
#include "src/config.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

// The store, migrated to the current schema (the audit tables exist from v4 on).
Result<store::KeyStore> open_store(const config::Config& cfg) {
  auto ks = store::KeyStore::open(cfg.store.path, {.create = false});
  if (!ks.ok()) return Error(ks.error().code, cfg.store.path + ": " + ks.error().message());
  return ks;
}

// What a command that writes the trail opens: the configuration, the store, the HSM.
struct Opened {
  config::Config cfg;
  store::KeyStore store;
  HsmContext hsm;
};

Result<Opened> open_for_writing(const std::string& config_path) {
  GS_ASSIGN(config::Config cfg, config::load(config_path));
  GS_ASSIGN(store::KeyStore store, open_store(cfg));
  GS_ASSIGN(HsmContext hsm, open_hsm(cfg.hsm));
  return Opened{std::move(cfg), std::move(store), std::move(hsm)};
}

// gs-audit's public point from a file: SubjectPublicKeyInfo PEM, or the 65-byte point in hex.
Result<Bytes> load_public_key(const std::string& path) {
  std::ifstream f(path);
  if (!f) return Error(Errc::not_found, "cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  if (text.size() > 16384) return Error(Errc::too_large, path + ": too large for a public key");
  if (text.find("-----BEGIN PUBLIC KEY-----") == std::string::npos) {
    auto b = from_hex(text.substr(0, text.find_last_not_of(" \r\n\t") + 1));
    if (!b || b->size() != 65) {
      return Error(Errc::bad_value, path + ": neither a PEM public key nor a 65-byte hex point");
    }
    return *b;
  }
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), BIO_free);
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(
      bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr, EVP_PKEY_free);
  if (!key) return Error(Errc::bad_value, path + ": not a PEM public key");
  Bytes point(65);
  std::size_t n = 0;
  if (EVP_PKEY_get_octet_string_param(key.get(), OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point.data(),
                                      point.size(), &n) != 1 ||
      n != 65) {
    return Error(Errc::bad_value, path + ": not an uncompressed P-256 public key");
  }
  return point;
}

// T as UTC seconds, "YYYY-MM-DD" or "YYYY-MM-DDTHH:MM:SSZ".
Result<std::int64_t> parse_time(const std::string& t, const char* option = "--since") {
  if (!t.empty() && t.find_first_not_of("0123456789") == std::string::npos && t.size() <= 12) {
    return static_cast<std::int64_t>(std::stoll(t));
  }
  std::tm tm{};
  const char* end = strptime(t.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (end == nullptr || *end != '\0') {
    tm = {};
    end = strptime(t.c_str(), "%Y-%m-%d", &tm);
  }
  if (end == nullptr || *end != '\0') {
    return Error(Errc::invalid_argument,
                 std::string(option) + ": '" + t +
                     "' is not UTC seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ");
  }
  return static_cast<std::int64_t>(timegm(&tm));
}

// The signed operator when the gate accepted one (operator_gate.h), else the Unix user.
std::string operator_name() {
  if (const Gate* g = current_gate(); g != nullptr && g->authorized()) return g->actor();
  const passwd* pw = getpwuid(geteuid());
  return "operator:" + audit::clip(pw != nullptr ? pw->pw_name : std::to_string(geteuid()), 64);
}

void print_json(const audit::VerifyReport& r) {
  JsonWriter w;
  w.begin_object().key("ok").value(r.ok);
  if (r.failure) {
    w.key("first_bad_seq").value(r.failure->seq).key("kind").value(r.failure->kind);
    w.key("message").value(r.failure->message);
  }
  w.key("records").value(r.records).key("first_seq").value(r.first_seq);
  w.key("last_seq").value(r.last_seq).key("checkpoints").value(r.checkpoints);
  w.key("last_checkpoint_seq").value(r.last_checkpoint_seq);
  w.key("archived_through").value(r.archived_through);
  w.key("anchor");
  if (r.anchor) {
    w.value(audit::anchor_state_name(r.anchor->state));
  } else {
    w.null();
  }
  w.key("notes").begin_array();
  for (const auto& n : r.notes) {
    w.begin_object().key("seq").value(n.seq).key("kind").value(n.kind);
    w.key("message").value(n.message).end_object();
  }
  w.end_array().end_object();
  std::printf("%s\n", w.str().c_str());
}

void print_text(const audit::VerifyReport& r) {
  if (r.failure) {
    std::printf("audit verify: FAILED at record %lld (%s): %s\n",
                static_cast<long long>(r.failure->seq), r.failure->kind.c_str(),
                r.failure->message.c_str());
  }
  std::printf("records %lld..%lld (%lld checked), %lld checkpoints verified (newest at %lld)",
              static_cast<long long>(r.first_seq), static_cast<long long>(r.last_seq),
              static_cast<long long>(r.records), static_cast<long long>(r.checkpoints),
              static_cast<long long>(r.last_checkpoint_seq));
  if (r.anchor) std::printf(", HSM anchor: %s", audit::anchor_state_name(r.anchor->state));
  std::printf("\n");
  for (const auto& n : r.notes) std::printf("note: %s\n", n.message.c_str());
  if (r.ok) std::printf("audit verify: OK\n");
}

// What verify needs from the HSM: gs-audit's public key (unless opt has one), the anchors read
// under the write lock held by `lock` (a second connection, kept by the caller).
Status verify_with_hsm(const config::Config& cfg, HsmContext& hsm, std::optional<db::Db>& lock,
                       audit::VerifyOptions& opt) {
  GS_ASSIGN(auto lease, hsm.pool->acquire());
  if (opt.public_key.empty()) {
    auto pub = hsm::find_object(lease.session(), hsm::ObjectClass::public_key, kLabelAudit);
    if (!pub.ok()) {
      return Error(pub.error().code, std::string(kLabelAudit) + ": " + pub.error().message());
    }
    GS_ASSIGN(auto point, hsm::export_ec_point(lease.session(), *pub));
    opt.public_key.assign(point.begin(), point.end());
  }
  GS_ASSIGN(auto l, db::Db::open(cfg.store.path, {.create = false}));
  lock.emplace(std::move(l));
  opt.lock = &*lock;
  HsmContext* ctx = &hsm;
  opt.read_anchors = [ctx]() -> Result<audit::Anchors> {
    GS_ASSIGN(auto ls, ctx->pool->acquire());
    return audit::read_anchors(ls.session());
  };
  return {};
}

int run_verify(const std::string& config_path, std::int64_t from, bool json,
               const std::string& pubkey_file, bool no_hsm) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = open_store(*cfg);
  if (!store.ok()) return fail(store.error().message());
  audit::VerifyOptions opt;
  opt.from = from;
  if (!pubkey_file.empty()) {
    auto k = load_public_key(pubkey_file);
    if (!k.ok()) return fail(k.error().message());
    opt.public_key = std::move(k).value();
  }
  std::optional<HsmContext> hsm;
  std::optional<db::Db> lock;
  if (!no_hsm) {
    auto h = open_hsm(cfg->hsm);
    if (!h.ok()) return fail(h.error().message() + " (--no-hsm checks the chain alone)");
    hsm.emplace(std::move(h).value());
    if (auto st = verify_with_hsm(*cfg, *hsm, lock, opt); !st.ok()) {
      return fail(st.error().message());
    }
  }
  auto rep = audit::verify(store->db(), opt);
  if (!rep.ok()) return fail(rep.error().message());
  if (json) {
    print_json(*rep);
  } else {
    print_text(*rep);
  }
  return rep->ok ? kExitOk : kExitFailed;
}

int run_export(const std::string& config_path, const std::string& since, const std::string& format,
               const std::string& out_path, const std::string& pubkey_file) {
  if (format != "jsonl") return fail("--format: only jsonl is supported");
  auto t = parse_time(since);
  if (!t.ok()) return fail(t.error().message());
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = open_store(*cfg);
  if (!store.ok()) return fail(store.error().message());
  audit::ExportOptions opt;
  opt.since = *t;
  if (!pubkey_file.empty()) {
    auto k = load_public_key(pubkey_file);
    if (!k.ok()) return fail(k.error().message());
    opt.public_key = std::move(k).value();
  }
  std::FILE* out = stdout;
  if (!out_path.empty() && out_path != "-") {
    out = std::fopen(out_path.c_str(), "wx");  // never overwrite an earlier export
    if (out == nullptr) return fail("cannot create " + out_path + " (does it exist?)");
  }
  auto sum = audit::export_jsonl(store->db(), opt, out);
  if (out != stdout && std::fclose(out) != 0 && sum.ok()) return fail("cannot write " + out_path);
  if (!sum.ok()) return fail(sum.error().message());
  std::fprintf(stderr, "gridseal: exported records %lld..%lld (%lld) with %lld checkpoints\n",
               static_cast<long long>(sum->first_seq), static_cast<long long>(sum->last_seq),
               static_cast<long long>(sum->records), static_cast<long long>(sum->checkpoints));
  return kExitOk;
}

// Verifies the whole trail (as `audit verify` does, with the HSM), writes what was signed before
// `before` to a file, registers it and deletes it from the table (src/audit.h "archives"). The
// reading part runs on a thread under SCHED_IDLE (CPU the daemons leave over); the transactions
// that take the write lock run on this one, short and spaced out.
int run_archive(const std::string& config_path, const std::string& before, const std::string& dir,
                std::int64_t chunk) {
  auto t = parse_time(before, "--before");
  if (!t.ok()) return fail(t.error().message());
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return fail("--dir: " + dir + " is not a directory");
  }
  auto opened = open_for_writing(config_path);
  if (!opened.ok()) return fail(opened.error().message());
  const config::Config* cfg = &opened->cfg;
  store::KeyStore* store = &opened->store;
  HsmContext* hsm = &opened->hsm;

  audit::ArchiveOptions opt;
  opt.before = *t;
  opt.dir = dir;
  opt.actor = operator_name();
  opt.delete_chunk = chunk;
  audit::ArchiveResult res;
  if (auto s = audit::prune_archived(store->db(), opt, res); !s.ok()) {
    return fail(s.error().message());
  }
  res.left_by_earlier_run = res.deleted;

  std::optional<audit::VerifyReport> bad;
  std::optional<audit::Archive> written;
  Status reading;
  std::thread bg([&] {
    (void)use_idle_scheduling();
    reading = [&]() -> Status {
      GS_ASSIGN(db::Db conn, db::Db::open(cfg->store.path, {.create = false}));
      audit::VerifyOptions vopt;
      std::optional<db::Db> lock;
      GS_TRY(verify_with_hsm(*cfg, *hsm, lock, vopt));
      GS_ASSIGN(audit::VerifyReport rep, audit::verify(conn, vopt));
      lock.reset();
      if (!rep.ok) {
        bad = std::move(rep);
        return Error(Errc::conflict, "the audit trail does not verify: nothing archived");
      }
      opt.public_key = vopt.public_key;
      GS_ASSIGN(written, audit::write_archive(conn, opt, res.path));
      return {};
    }();
  });
  bg.join();
  if (res.left_by_earlier_run > 0) {
    std::printf("deleted %lld records an earlier archive run left in the table\n",
                static_cast<long long>(res.left_by_earlier_run));
  }
  if (bad) print_text(*bad);
  if (!reading.ok()) return fail(reading.error().message());
  if (!written) {
    std::printf("nothing to archive: no checkpoint signed before %s after the last archive\n",
                before.c_str());
    return kExitOk;
  }
  auto lease = hsm->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());
  if (auto s = audit::register_archive(store->db(), lease->session(), *written, opt, res);
      !s.ok()) {
    return fail(s.error().message());
  }
  const audit::Archive& a = *res.archive;
  std::printf("archived records %lld..%lld (%lld records, %lld checkpoints) to %s\n"
              "sha256 %s\nregistered by record %lld; %lld records and %lld checkpoints deleted "
              "from the table in %lld transactions (the longest %.1f ms)\n",
              static_cast<long long>(a.first_seq), static_cast<long long>(a.through),
              static_cast<long long>(a.records), static_cast<long long>(a.checkpoints),
              res.path.c_str(), to_hex(a.sha256).c_str(), static_cast<long long>(a.record_seq),
              static_cast<long long>(res.deleted), static_cast<long long>(res.deleted_checkpoints),
              static_cast<long long>(res.delete_transactions),
              static_cast<double>(res.longest_delete.count()) / 1000.0);
  return kExitOk;
}

int run_reset_anchor(const std::string& config_path, const std::string& reason) {
  auto opened = open_for_writing(config_path);
  if (!opened.ok()) return fail(opened.error().message());
  store::KeyStore* store = &opened->store;
  auto lease = opened->hsm.pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());
  auto trail = audit::Trail::over(store->db());
  if (!trail.ok()) return fail(trail.error().message());
  Result<audit::Head> head = Errc::storage_failure;
  {
    auto tx = db::Transaction::begin(store->db());
    if (!tx.ok()) return fail(tx.error().message());
    auto before = trail->check(lease->session());
    if (!before.ok()) return fail(before.error().message());
    std::printf("before: %s\n", before->message.c_str());
    head = trail->reset_anchor(
        lease->session(), {0, operator_name(), "audit_anchor_reset", "", audit::clip(reason, 256)});
    if (!head.ok()) return fail(head.error().message());
    if (auto st = tx->commit(); !st.ok()) return fail(st.error().message());
  }
  std::printf("audit anchor reset: the chain now ends at record %lld (this reset, signed)\n",
              static_cast<long long>(head->seq));
  return kExitOk;
}

}  // namespace

void register_audit(CLI::App& app, int& exit_code) {
  auto* audit = app.add_subcommand("audit", "the tamper-evident audit trail");
  audit->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");

  auto* verify = audit->add_subcommand(
      "verify",
      "check every record's hash and link, every checkpoint signature and the HSM "
      "anchor; exit 1 naming the first bad record");
  auto from = std::make_shared<std::int64_t>(1);
  auto json = std::make_shared<bool>(false);
  auto pubkey = std::make_shared<std::string>();
  auto no_hsm = std::make_shared<bool>(false);
  verify->add_option("--from", *from, "start at this record")
      ->check(CLI::Range(std::int64_t{1}, std::numeric_limits<std::int64_t>::max()));
  verify->add_flag("--json", *json, "machine-readable output");
  verify->add_option("--pubkey", *pubkey,
                     "gs-audit public key (PEM or hex point) instead of the HSM's");
  verify->add_flag("--no-hsm", *no_hsm,
                   "do not open the HSM: no anchor check (truncation is then not detected)");
  verify->add_option("--config", *config, "configuration file")->capture_default_str();
  verify->callback(
      [=, &exit_code] { exit_code = run_verify(*config, *from, *json, *pubkey, *no_hsm); });

  auto* exp = audit->add_subcommand(
      "export",
      "records from a time on, with their checkpoints, as JSON Lines (README: how a "
      "third party verifies them)");
  auto since = std::make_shared<std::string>();
  auto format = std::make_shared<std::string>("jsonl");
  auto out = std::make_shared<std::string>();
  auto epub = std::make_shared<std::string>();
  exp->add_option("--since", *since, "UTC seconds, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ")->required();
  exp->add_option("--format", *format, "jsonl")->capture_default_str();
  exp->add_option("--out", *out, "write to this new file instead of stdout");
  exp->add_option("--pubkey", *epub, "gs-audit public key: its fingerprint goes in the header");
  exp->add_option("--config", *config, "configuration file")->capture_default_str();
  exp->callback([=, &exit_code] { exit_code = run_export(*config, *since, *format, *out, *epub); });

  auto* arch = audit->add_subcommand(
      "archive",
      "after a full verify, move the records signed before a time to a JSON Lines file in a "
      "directory, register its SHA-256 in the chain, and delete them from the table");
  auto abefore = std::make_shared<std::string>();
  auto adir = std::make_shared<std::string>();
  auto chunk = std::make_shared<std::int64_t>(1000);
  arch->add_option("--before", *abefore,
                   "archive up to the newest checkpoint signed before this time (UTC seconds, "
                   "YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ)")
      ->required();
  arch->add_option("--dir", *adir, "directory for the archive file")->required();
  arch->add_option("--chunk", *chunk, "records deleted per transaction")
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1000000}))
      ->capture_default_str();
  arch->add_option("--config", *config, "configuration file")->capture_default_str();
  arch->callback(
      [=, &exit_code] { exit_code = run_archive(*config, *abefore, *adir, *chunk); });

  auto* reset =
      audit->add_subcommand("reset-anchor",
                            "accept the audit table as it is (after a restore or a lost anchor): "
                            "recorded in the chain, signed, and anchored");
  auto reason = std::make_shared<std::string>();
  reset->add_option("--reason", *reason, "why (kept in the record)")->required();
  reset->add_option("--config", *config, "configuration file")->capture_default_str();
  reset->callback([=, &exit_code] { exit_code = run_reset_anchor(*config, *reason); });
}

}  // namespace gs::cli
