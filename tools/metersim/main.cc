// gridseal-metersim: creates a simulated meter fleet (export) and serves it behind a simulated
// collection-engine relay (serve); `info` summarises a state file.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "tools/metersim/fleet.h"
#include "tools/metersim/relay.h"

namespace {

using namespace gs;
using namespace gs::metersim;

constexpr const char* kUsage =
    "usage:\n"
    "  gridseal-metersim export --meters N --out FLEET.csv --state FLEET.state\n"
    "        [--keys plain|ecdh] [--provision-pub HEX] [--title-prefix .7] [--first N]\n"
    "        [--id-prefix SIM] [--trust-cmd1 HEX] [--trust-cmd2 HEX] [--trust-revocation HEX]\n"
    "        [--seed S]\n"
    "      --trust-cmd1/2 HEX: gs-cmd-1/2 public key (65-byte point), signer key id 1/2\n"
    "      --trust-revocation HEX: gs-revocation public key (65-byte point); the meters then\n"
    "        accept MT-2044 command-key replacements it signs (without it they answer sns)\n"
    "  gridseal-metersim serve --state FLEET.state --listen ADDR:PORT\n"
    "        (--plain | --tls-ca CA.pem --tls-cert CERT.pem --tls-key KEY.pem)\n"
    "        [--latency-ms N] [--loss P] [--loss-timeout-ms N] [--offline F] [--seed S]\n"
    "        [--relay-title .9.1] [--threads N] [--save-every SECONDS]\n"
    "  gridseal-metersim info --state FLEET.state [--meter INDEX]\n";

int usage(const std::string& why) {
  std::fprintf(stderr, "gridseal-metersim: %s\n%s", why.c_str(), kUsage);
  return 2;
}

int fail(const std::string& why) {
  std::fprintf(stderr, "gridseal-metersim: %s\n", why.c_str());
  return 1;
}

// --name value pairs and bare flags.
struct Args {
  std::map<std::string, std::string> values;
  std::map<std::string, bool> flags;

  bool has(const std::string& k) const { return values.count(k) != 0; }
  std::string get(const std::string& k, const std::string& def = {}) const {
    auto it = values.find(k);
    return it == values.end() ? def : it->second;
  }
};

bool parse_args(int argc, char** argv, int from, const std::vector<std::string>& valued,
                const std::vector<std::string>& bare, Args* out, std::string* err) {
  for (int i = from; i < argc; ++i) {
    const std::string a = argv[i];
    bool known = false;
    for (const auto& v : valued) {
      if (a == v) {
        if (i + 1 >= argc) {
          *err = a + " needs a value";
          return false;
        }
        out->values[a] = argv[++i];
        known = true;
      }
    }
    for (const auto& b : bare) {
      if (a == b) {
        out->flags[a] = true;
        known = true;
      }
    }
    if (!known) {
      *err = "unknown argument " + a;
      return false;
    }
  }
  return true;
}

bool parse_u64(const std::string& s, std::uint64_t max, std::uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  std::uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    const std::uint64_t d = static_cast<std::uint64_t>(c - '0');
    if (v > (max - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

bool parse_fraction(const std::string& s, double* out) {
  if (s.empty() || s.size() > 32) return false;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size() || !(v >= 0.0 && v <= 1.0)) return false;
  *out = v;
  return true;
}

bool parse_point(std::string s, EcPoint* out) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  auto b = from_hex(s);
  if (!b || b->size() != out->size()) return false;
  std::copy(b->begin(), b->end(), out->begin());
  return true;
}

std::uint32_t unix_now() { return static_cast<std::uint32_t>(std::time(nullptr)); }

int cmd_export(int argc, char** argv) {
  Args a;
  std::string err;
  if (!parse_args(argc, argv, 2,
                  {"--meters", "--out", "--state", "--keys", "--provision-pub", "--title-prefix",
                   "--first", "--id-prefix", "--trust-cmd1", "--trust-cmd2", "--trust-revocation",
                   "--seed"},
                  {}, &a, &err)) {
    return usage(err);
  }
  if (!a.has("--meters") || !a.has("--out") || !a.has("--state")) {
    return usage("export needs --meters, --out and --state");
  }
  ExportOptions o;
  std::uint64_t v = 0;
  if (!parse_u64(a.get("--meters"), kMaxMeters, &v) || v == 0) {
    return usage("--meters must be 1.." + std::to_string(kMaxMeters));
  }
  o.meters = v;
  const std::string keys = a.get("--keys", "plain");
  if (keys == "plain") {
    o.keys = KeyMode::plain;
  } else if (keys == "ecdh") {
    o.keys = KeyMode::ecdh;
  } else {
    return usage("--keys must be plain or ecdh");
  }
  if (a.has("--provision-pub")) {
    EcPoint p{};
    if (!parse_point(a.get("--provision-pub"), &p)) {
      return usage("--provision-pub must be a 65-byte point in hex");
    }
    o.provision_key = p;
  }
  for (int n : {1, 2}) {
    const std::string k = "--trust-cmd" + std::to_string(n);
    if (!a.has(k)) continue;
    EcPoint p{};
    if (!parse_point(a.get(k), &p)) return usage(k + " must be a 65-byte point in hex");
    (n == 1 ? o.trust_cmd1 : o.trust_cmd2) = p;
  }
  if (a.has("--trust-revocation")) {
    EcPoint p{};
    if (!parse_point(a.get("--trust-revocation"), &p)) {
      return usage("--trust-revocation must be a 65-byte point in hex");
    }
    o.trust_revocation = p;  // checked on the curve by Fleet::generate
  }
  if (!o.trust_cmd1 && !o.trust_cmd2) {
    std::fprintf(stderr,
                 "gridseal-metersim: warning: no --trust-cmd1/--trust-cmd2: the meters will "
                 "refuse every command (sme)\n");
  }
  o.title_prefix = a.get("--title-prefix", ".7");
  o.id_prefix = a.get("--id-prefix", "SIM");
  if (a.has("--first") && !parse_u64(a.get("--first"), 0xFFFFFFFFULL, &o.first)) {
    return usage("--first must be 0..4294967295");
  }
  if (a.has("--seed")) {
    std::uint64_t s = 0;
    if (!parse_u64(a.get("--seed"), ~0ULL, &s)) return usage("--seed must be an integer");
    o.seed = s;
  }
  o.now = unix_now();

  const auto t0 = std::chrono::steady_clock::now();
  const std::string out_path = a.get("--out");
  const std::string tmp = out_path + ".tmp";
  std::ofstream csv(tmp, std::ios::binary | std::ios::trunc);
  if (!csv) return fail(tmp + ": cannot create");
  auto fleet = Fleet::generate(o, &csv);
  csv.close();
  if (!fleet.ok()) {
    std::remove(tmp.c_str());
    return fail(fleet.error().message());
  }
  if (!csv || std::rename(tmp.c_str(), out_path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return fail(out_path + ": cannot write");
  }
  auto st = (*fleet)->save(a.get("--state"));
  if (!st.ok()) return fail(st.error().message());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "gridseal-metersim: exported %zu meters (%s keys) in %.2f s\n", o.meters,
               keys.c_str(), s);
  return 0;
}

int cmd_serve(int argc, char** argv) {
  Args a;
  std::string err;
  if (!parse_args(argc, argv, 2,
                  {"--state", "--listen", "--tls-ca", "--tls-cert", "--tls-key", "--latency-ms",
                   "--loss", "--loss-timeout-ms", "--offline", "--seed", "--relay-title",
                   "--threads", "--save-every"},
                  {"--plain"}, &a, &err)) {
    return usage(err);
  }
  if (!a.has("--state") || !a.has("--listen")) return usage("serve needs --state and --listen");
  server::ServerConfig sc;
  const std::string listen = a.get("--listen");
  const auto colon = listen.rfind(':');
  std::uint64_t port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !parse_u64(listen.substr(colon + 1), 65535, &port)) {
    return usage("--listen must be ADDRESS:PORT");
  }
  sc.address = listen.substr(0, colon);
  if (sc.address.size() > 2 && sc.address.front() == '[' && sc.address.back() == ']') {
    sc.address = sc.address.substr(1, sc.address.size() - 2);
  }
  sc.port = static_cast<std::uint16_t>(port);
  sc.reuse_port = false;
  const bool plain = a.flags.count("--plain") != 0;
  if (plain) {
    if (a.has("--tls-ca") || a.has("--tls-cert") || a.has("--tls-key")) {
      return usage("--plain and --tls-* exclude each other");
    }
    sc.plain_tcp = true;
  } else {
    if (!a.has("--tls-ca") || !a.has("--tls-cert") || !a.has("--tls-key")) {
      return usage("give --plain or all of --tls-ca, --tls-cert, --tls-key");
    }
    sc.tls = {a.get("--tls-ca"), a.get("--tls-cert"), a.get("--tls-key")};
  }
  RelayOptions ro;
  std::uint64_t v = 0;
  if (a.has("--latency-ms")) {
    if (!parse_u64(a.get("--latency-ms"), 60000, &v)) return usage("--latency-ms must be 0..60000");
    ro.latency_ms = static_cast<std::uint32_t>(v);
  }
  if (a.has("--loss-timeout-ms")) {
    if (!parse_u64(a.get("--loss-timeout-ms"), 600000, &v)) {
      return usage("--loss-timeout-ms must be 0..600000");
    }
    ro.loss_timeout_ms = static_cast<std::uint32_t>(v);
  }
  if (a.has("--loss") && !parse_fraction(a.get("--loss"), &ro.loss)) {
    return usage("--loss must be a probability 0..1");
  }
  if (a.has("--offline") && !parse_fraction(a.get("--offline"), &ro.offline)) {
    return usage("--offline must be a fraction 0..1");
  }
  if (a.has("--seed") && !parse_u64(a.get("--seed"), ~0ULL, &ro.seed)) {
    return usage("--seed must be an integer");
  }
  ro.relay_title = a.get("--relay-title", ro.relay_title);
  if (a.has("--threads")) {
    if (!parse_u64(a.get("--threads"), 64, &v) || v == 0) return usage("--threads must be 1..64");
    sc.worker_threads = v;
  }
  std::uint64_t save_every = 0;
  if (a.has("--save-every") && !parse_u64(a.get("--save-every"), 86400, &save_every)) {
    return usage("--save-every must be 0..86400 seconds");
  }
  // The latency is simulated by a timer thread: the server must not time requests out first.
  sc.request_timeout = std::chrono::milliseconds(
      std::max<std::uint64_t>(30000, 2ULL * std::max(ro.latency_ms, ro.loss_timeout_ms) + 5000));
  if (auto st = server::validate(sc); !st.ok()) return usage(st.error().message());

  const std::string state_path = a.get("--state");
  auto fleet = Fleet::load(state_path);
  if (!fleet.ok()) return fail(fleet.error().message());
  auto relay = Relay::create(**fleet, ro);
  if (!relay.ok()) return usage(relay.error().message());

  // Signals are taken synchronously by this thread; every thread started later inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto srv = RelayServer::start(**relay, sc);
  if (!srv.ok()) return fail("listen on " + listen + ": " + srv.error().message());
  std::printf("gridseal-metersim: listening on %s:%u\n", sc.address.c_str(),
              static_cast<unsigned>((*srv)->port()));
  std::fflush(stdout);
  std::fprintf(
      stderr, "gridseal-metersim: %zu meters, %s, latency %u ms, loss %.3f, offline %.3f\n",
      (*fleet)->size(), plain ? "plain TCP" : "TLS 1.3", ro.latency_ms, ro.loss, ro.offline);

  auto last_save = std::chrono::steady_clock::now();
  for (;;) {
    timespec ts{1, 0};
    const int sig = sigtimedwait(&sigs, nullptr, &ts);
    if (sig == SIGTERM || sig == SIGINT) break;
    if (save_every > 0 &&
        std::chrono::steady_clock::now() - last_save >= std::chrono::seconds(save_every)) {
      if (auto st = (*fleet)->save(state_path); !st.ok()) {
        std::fprintf(stderr, "gridseal-metersim: periodic save: %s\n",
                     st.error().message().c_str());
      }
      last_save = std::chrono::steady_clock::now();
    }
  }
  (*srv)->stop(std::chrono::milliseconds(2000));
  const RelayStats s = (*relay)->stats();
  std::fprintf(
      stderr,
      "gridseal-metersim: stopping: requests=%llu executed=%llu refused=%llu "
      "relay_errors=%llu lost=%llu offline=%llu\n",
      static_cast<unsigned long long>(s.requests), static_cast<unsigned long long>(s.executed),
      static_cast<unsigned long long>(s.refused), static_cast<unsigned long long>(s.relay_errors),
      static_cast<unsigned long long>(s.lost), static_cast<unsigned long long>(s.offline));
  if (auto st = (*fleet)->save(state_path); !st.ok()) return fail(st.error().message());
  return 0;
}

int cmd_info(int argc, char** argv) {
  Args a;
  std::string err;
  if (!parse_args(argc, argv, 2, {"--state", "--meter"}, {}, &a, &err)) return usage(err);
  if (!a.has("--state")) return usage("info needs --state");
  auto fleet = Fleet::load(a.get("--state"));
  if (!fleet.ok()) return fail(fleet.error().message());
  const Fleet& f = **fleet;
  std::printf("meters: %zu\ncommand keys: %zu\n", f.size(), f.trust().size());
  for (std::size_t i = 0; i < f.trust().size(); ++i) {
    std::printf("  key %zu: %s\n", i, to_hex(f.trust().key(i).public_point()).c_str());
  }
  std::printf("gs-revocation key: %s\n",
              f.revocation() != nullptr ? to_hex(f.revocation()->public_point()).c_str() : "none");
  if (a.has("--meter")) {
    std::uint64_t i = 0;
    if (!parse_u64(a.get("--meter"), f.size() - 1, &i)) return usage("--meter out of range");
    const MeterRecord& r = f.record(i);
    std::printf("meter %llu: id %s title %s active slot %u relay %s energy %llu Wh counter %u\n",
                static_cast<unsigned long long>(i), r.serial_text().c_str(),
                c1222::oid_to_dotted(r.title_view(), false).c_str(), r.active_slot,
                r.connected != 0 ? "connected" : "disconnected",
                static_cast<unsigned long long>(energy_at(r, unix_now()) / 1000), r.out_counter);
    for (std::size_t t = 0; t < kTrustSlots; ++t) {
      if (r.trust[t].present != 0) {
        std::printf("  trust slot %zu: signer key id %u = key %u\n", t, r.trust[t].key_id,
                    r.trust[t].key_index);
      }
    }
    std::printf("  last MT-2044 sequence: %u\n", r.replacement_seq);
    for (std::size_t s = 0; s < kKeySlots; ++s) {
      if (r.slots[s].installed != 0) {
        std::printf("  slot %zu: key version %u\n", s, r.slots[s].version);
      }
    }
    for (const ReplayEntry& e : r.replay) {
      if (e.not_after != 0) {
        std::printf("  accepted id %llu until %u\n", static_cast<unsigned long long>(e.id),
                    e.not_after);
      }
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage("no command");
  const std::string_view cmd = argv[1];
  if (cmd == "export") return cmd_export(argc, argv);
  if (cmd == "serve") return cmd_serve(argc, argv);
  if (cmd == "info") return cmd_info(argc, argv);
  if (cmd == "--help" || cmd == "help" || cmd == "-h") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  return usage("unknown command " + std::string(cmd));
}
