// Test fixture for the real gridseal-sesd: temp dir, SoftHSM2 token (`gridseal hsm init`), a
// generated fleet of N meters with plain keys (`gridseal meters import`), config and policy
// writers, plain TCP or TLS (test PKI), start/stop by SIGTERM with bounded waits, clients, and
// independent checks of what the daemon returns. Relies only on the daemon's stdout lines
// "listening on ADDR:PORT" and "metrics on ADDR:PORT" and on SIGTERM stopping all of it.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/client.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"
#include "src/test_pki.h"
#include "tests/unit/daemon_process.h"
#include "tests/unit/run_command.h"

namespace gs::test {

struct SesdOptions {
  bool tls = false;  // TLS 1.3 with client certificates (PKI in DIR/pki), else loopback plain TCP
  std::size_t meters = 2;             // meters PREFIX.1 .. PREFIX.N, ids M1 .. MN, slot 0
  std::string title_prefix = ".7";
  std::vector<std::string> keys;      // hex keys of the first meters; the others are generated
  std::string policy;                 // policy.toml text; empty: default_policy()
  // Extra lines inside [server] / [ses] ("max_connections = 600", "processes = 2"). A key set
  // here replaces the fixture's default for it.
  std::vector<std::string> server_lines;
  std::vector<std::string> ses_lines;
  std::string import_args;            // extra `gridseal meters import` arguments
  std::chrono::seconds start_timeout{20};
};

// A client certificate and key (PEM files).
struct ClientCert {
  std::string cert;
  std::string key;
};

inline std::string slurp(const std::string& path) { return read_text(path); }

inline Bytes hex_bytes(std::string_view h) {
  auto b = from_hex(h);
  GS_CHECK(b.has_value());
  return *b;
}

// The plain key of meter `i` (1-based) in a fleet made with `keys` first.
inline std::string meter_key_hex(const std::vector<std::string>& keys, std::size_t i) {
  if (i >= 1 && i <= keys.size()) return keys[i - 1];
  const std::uint64_t a = (i + 1) * 0x9E3779B97F4A7C15ULL;
  const std::uint64_t b = (i + 7) * 0xC2B2AE3D27D4EB4FULL;
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(a),
                static_cast<unsigned long long>(b));
  return buf;
}

// The fleet CSV of `gridseal meters import`: M<i>, PREFIX.<i>, slot 0, plain keys.
inline void write_fleet_csv(std::ostream& out, std::size_t meters, const std::string& prefix,
                            const std::vector<std::string>& keys) {
  out << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
  for (std::size_t i = 1; i <= meters; ++i) {
    out << 'M' << i << ',' << prefix << '.' << i << ",,0,plain:" << meter_key_hex(keys, i)
        << '\n';
  }
}

// A mode-0 request from `calling` to `meter` with invocation id `id` (minimal BER content) and
// the given services (each code + data).
inline Bytes sesd_request(const std::string& meter, std::uint32_t id,
                          const std::vector<Bytes>& services,
                          const std::string& calling = ".1.9") {
  auto called_t = c1222::OwnedApTitle::parse(meter).value();
  auto calling_t = c1222::OwnedApTitle::parse(calling).value();
  c1222::Message m;
  m.called_ap_title = called_t.view();
  m.calling_ap_title = calling_t.view();
  Bytes a8;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const auto b = static_cast<std::uint8_t>(id >> shift);
    if (!a8.empty() || b != 0 || shift == 0) a8.push_back(b);
  }
  if ((a8[0] & 0x80) != 0) a8.insert(a8.begin(), 0);
  m.calling_ap_invocation_id = ByteView(a8);
  Bytes epsem{0x80};
  for (const Bytes& s : services) c1222::append_service(epsem, s);
  m.epsem = epsem;
  return c1222::encode(m).value();
}

// What a mode-0 error response says: its one response code and addressing.
struct ErrorReply {
  int code = -1;              // the response code; negative when not an error response
  std::string called;         // dotted
  std::string calling;        // dotted
  std::string called_id_hex;  // A4
};
inline ErrorReply error_reply(ByteView wire) {
  ErrorReply r;
  auto m = c1222::decode(wire);
  if (!m.ok()) return r;
  if (m->called_ap_title) r.called = m->called_ap_title->dotted();
  if (m->calling_ap_title) r.calling = m->calling_ap_title->dotted();
  if (m->called_ap_invocation_id) r.called_id_hex = to_hex(*m->called_ap_invocation_id);
  auto e = c1222::split_epsem(m->epsem);
  if (!e.ok() || c1222::security_mode(e->control) != c1222::SecurityMode::cleartext) {
    r.code = -2;
    return r;
  }
  auto s = c1222::split_services(e->body);
  if (!s.ok() || s->size() != 1 || s->front().bytes.size() != 1) {
    r.code = -3;
    return r;
  }
  r.code = s->front().bytes[0];
  return r;
}

// A secured command checked independently of the daemon: EAX' opened on the host with the
// meter's key, MT-2040 verified with the exported gs-cmd public key.
struct SecuredCheck {
  c1222::SecurityMode mode{};
  std::uint8_t key_id = 0;
  std::string called;
  std::string calling;
  std::uint64_t invocation_id = 0;
  std::uint8_t signer_key_id = 0;
  c1222::CommandClass command_class{};
  std::string following_hex;  // the plaintext EPSEM bytes after MT-2040
};
inline Result<SecuredCheck> check_secured(ByteView wire, const std::string& meter_key_hex,
                                          const std::string& pub_hex) {
  GS_ASSIGN(auto aes, HostAes::make(hex_bytes(meter_key_hex)));
  GS_ASSIGN(auto eax, c1222::EaxPrime::make(*aes));
  GS_ASSIGN(auto opened,
            c1222::open(wire, [&](std::uint8_t) -> c1222::EaxPrime* { return &eax; }));
  SecuredCheck c;
  c.mode = opened.mode;
  c.key_id = opened.key_id;
  GS_ASSIGN(auto m, c1222::decode(opened.wire));
  if (m.called_ap_title) c.called = m.called_ap_title->dotted();
  if (m.calling_ap_title) c.calling = m.calling_ap_title->dotted();
  GS_ASSIGN(auto ac, c1222::extract_authorization(m));
  c.invocation_id = ac.invocation_id;
  c.signer_key_id = ac.authorization.signer_key_id;
  c.command_class = ac.authorization.command_class;
  c.following_hex = to_hex(ac.following);
  GS_ASSIGN(auto pub, HostEcKey::from_public(hex_bytes(pub_hex)));
  GS_ASSIGN(auto digest, sha256(ac.signing_input));
  if (auto st = pub.verify(digest, ac.authorization.signature); !st.ok()) {
    return Error(Errc::bad_signature, "MT-2040 does not verify: " + st.error().message());
  }
  return c;
}

// Raises RLIMIT_NOFILE (soft) to at least `want` (up to the hard limit); the new soft limit.
inline rlim_t raise_nofile(rlim_t want) {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
  if (rl.rlim_cur < want) {
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ? want : std::min(want, rl.rlim_max);
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  return rl.rlim_cur;
}

// GET `path` from 127.0.0.1:`port` (HTTP/1.1, reads until close or 5 s); "" on failure.
inline std::string http_get(std::uint16_t port, const std::string& path) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    std::string req = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if (::write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof buf)) > 0 && out.size() < (1U << 20)) {
        out.append(buf, static_cast<std::size_t>(n));
      }
    }
  }
  ::close(fd);
  return out;
}

// The sum of the samples of `name` in a Prometheus exposition whose labels include every one of
// `labels` (each `key="value"`); other labels (e.g. one per worker process) are summed over.
inline double metric_sum(const std::string& exposition, const std::string& name,
                         const std::vector<std::string>& labels) {
  double sum = 0;
  std::istringstream in(exposition);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#' || line.compare(0, name.size(), name) != 0) continue;
    const std::size_t after = name.size();
    if (after >= line.size() || (line[after] != '{' && line[after] != ' ')) continue;
    const auto close = line.find('}', after);
    const std::string set = line[after] == '{' && close != std::string::npos
                                ? line.substr(after + 1, close - after - 1)
                                : std::string();
    bool match = true;
    for (const std::string& l : labels) {
      // Whole label: at the start or after a comma, followed by a comma or the end.
      std::size_t at = 0;
      bool found = false;
      while ((at = set.find(l, at)) != std::string::npos) {
        const bool starts = at == 0 || set[at - 1] == ',';
        const bool ends = at + l.size() == set.size() || set[at + l.size()] == ',';
        if (starts && ends) {
          found = true;
          break;
        }
        ++at;
      }
      match = match && found;
    }
    if (!match) continue;
    const auto value_at = line.rfind(' ');
    try {
      sum += std::stod(line.substr(value_at + 1));
    } catch (...) {
    }
  }
  return sum;
}

// One daemon with its own temp dir (removed by the destructor, which also stops the daemon).
class SesdDaemon {
 public:
  explicit SesdDaemon(SesdOptions options = {}) : opt_(std::move(options)) {}
  ~SesdDaemon() {
    stop();
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }
  SesdDaemon(const SesdDaemon&) = delete;
  SesdDaemon& operator=(const SesdDaemon&) = delete;

  // The default policy: one client (`subject`) allowed read and demand_response, DR group .3.1.
  static std::string default_policy(const std::string& subject) {
    return "[[client]]\nname = \"head-end\"\nsubject = \"" + subject +
           "\"\n"
           "classes = [\"read\", \"demand_response\"]\n"
           "[table_writes]\ndemand_response = [\"MT-40\"]\n"
           "[[demand_response_group]]\nname = \"feeder-3\"\ntitle = \".3.1\"\n"
           "max_event_window = 600\n";
  }
  // The identity the daemon sees for the default client.
  std::string client_subject() const {
    return opt_.tls ? "CN=head-end-test,O=gridseal test" : "plain:127.0.0.1";
  }

  // Temp dir, PKI (TLS), ses.toml, policy.toml, token, fleet import, exported gs-cmd-1 key.
  Status setup() {
    char tmpl[] = "/tmp/gs-sesd-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return Error(Errc::storage_failure, "mkdtemp");
    dir_ = tmpl;
    conf_ = dir_ + "/ses.toml";
    if (opt_.tls) {
      GS_ASSIGN(pki_, pki::make_test_pki(dir_ + "/pki"));
    }
    write_config();
    write_policy(opt_.policy.empty() ? default_policy(client_subject()) : opt_.policy);
    {
      std::ofstream f(dir_ + "/fleet.csv");
      write_fleet_csv(f, opt_.meters, opt_.title_prefix, opt_.keys);
    }
    auto r = gridseal("hsm init");
    if (r.code != 0) return Error(Errc::hsm_failure, "hsm init: " + r.out);
    r = gridseal("meters import " + dir_ + "/fleet.csv " + opt_.import_args);
    if (r.code != 0) return Error(Errc::storage_failure, "meters import: " + r.out);
    r = gridseal("hsm export-pubkey gs-cmd-1 --hex");
    if (r.code != 0) return Error(Errc::hsm_failure, "export-pubkey: " + r.out);
    pub_hex_ = r.out;
    while (!pub_hex_.empty() && (pub_hex_.back() == '\n' || pub_hex_.back() == '\r')) {
      pub_hex_.pop_back();
    }
    return {};
  }

  // Replaces policy.toml (before start).
  void write_policy(const std::string& text) const { std::ofstream(dir_ + "/policy.toml") << text; }

  // Starts the daemon (own process group, stdout/stderr to DIR/sesd.out, sesd.err) and waits,
  // bounded, for its "listening on" line.
  Status start() {
    const std::string bin = std::string(GS_BIN_DIR) + "/gridseal-sesd";
    return proc_.start({bin, "--config", conf_}, dir_ + "/sesd.out", dir_ + "/sesd.err",
                       opt_.start_timeout);
  }

  // SIGTERM and a bounded wait for the exit; the exit code, or -1 when it had to be killed (the
  // whole process group then) or was not running.
  int stop(std::chrono::milliseconds timeout = std::chrono::milliseconds(10000)) {
    return proc_.stop(timeout);
  }

  bool running() { return proc_.running(); }

  // A client config for the daemon: plain, or TLS with `cert` (default: the PKI's client
  // certificate; a ClientCert with empty paths connects without a certificate).
  server::ClientConfig client_config(std::optional<ClientCert> cert = std::nullopt) const {
    server::ClientConfig cc;
    cc.port = proc_.port();
    cc.timeout = std::chrono::milliseconds(5000);
    if (!opt_.tls) {
      cc.plain_tcp = true;
      return cc;
    }
    cc.plain_tcp = false;
    cc.tls.ca_file = pki_.ca_cert;
    const ClientCert c = cert.value_or(ClientCert{pki_.client_cert, pki_.client_key});
    cc.tls.cert_file = c.cert;
    cc.tls.key_file = c.key;
    cc.server_name = "127.0.0.1";
    return cc;
  }
  Result<std::unique_ptr<server::Client>> connect(std::optional<ClientCert> cert = std::nullopt) const {
    return server::Client::connect(client_config(std::move(cert)));
  }

  // Issues another client certificate (subject "CN=<cn>,O=gridseal test") from the test CA.
  Result<ClientCert> issue_client_cert(const std::string& cn) const {
    ClientCert c{dir_ + "/pki/" + cn + ".pem", dir_ + "/pki/" + cn + ".key"};
    GS_TRY(pki::issue_certificate(pki_, cn, false, c.cert, c.key));
    return c;
  }

  std::string http_get(const std::string& path) const { return test::http_get(proc_.metrics_port(), path); }

  // `gridseal ARGS --config DIR/ses.toml`.
  CmdResult gridseal(const std::string& args) const {
    return run_gridseal(args + " --config " + conf_);
  }

  std::string meter_title(std::size_t i) const { return opt_.title_prefix + "." + std::to_string(i); }
  std::string meter_key(std::size_t i) const { return meter_key_hex(opt_.keys, i); }

  std::string err_log() const { return slurp(dir_ + "/sesd.err"); }
  std::string out_log() const { return slurp(dir_ + "/sesd.out"); }
  const std::string& dir() const { return dir_; }
  const std::string& conf() const { return conf_; }
  const std::string& pub_hex() const { return pub_hex_; }
  const pki::TestPki& pki() const { return pki_; }
  const SesdOptions& options() const { return opt_; }
  std::uint16_t port() const { return proc_.port(); }
  std::uint16_t metrics_port() const { return proc_.metrics_port(); }
  pid_t pid() const { return proc_.pid(); }

 private:
  static bool sets_key(const std::vector<std::string>& lines, const std::string& key) {
    for (const std::string& l : lines) {
      const auto b = l.find_first_not_of(" \t");
      if (b == std::string::npos || l.compare(b, key.size(), key) != 0) continue;
      const auto after = l.find_first_not_of(" \t", b + key.size());
      if (after != std::string::npos && l[after] == '=') return true;
    }
    return false;
  }

  void write_config() const {
    std::ofstream f(conf_);
    f << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-sesd\"\n"
         "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
         "[store]\npath = \"gridseal.db\"\n[server]\n";
    auto def = [&](const std::string& key, const std::string& value) {
      if (!sets_key(opt_.server_lines, key)) f << key << " = " << value << '\n';
    };
    def("address", "\"127.0.0.1\"");
    def("port", "0");
    def("plain_tcp", opt_.tls ? "false" : "true");
    if (opt_.tls) {
      def("tls_ca", "\"" + pki_.ca_cert + "\"");
      def("tls_cert", "\"" + pki_.server_cert + "\"");
      def("tls_key", "\"" + pki_.server_key + "\"");
    }
    def("worker_threads", "2");
    def("drain_ms", "2000");
    for (const std::string& l : opt_.server_lines) f << l << '\n';
    f << "[ses]\n";
    auto ses = [&](const std::string& key, const std::string& value) {
      if (!sets_key(opt_.ses_lines, key)) f << key << " = " << value << '\n';
    };
    ses("head_end_title", "\".1.9\"");
    ses("ses_title", "\".1.10\"");
    ses("policy", "\"policy.toml\"");
    ses("metrics_port", "0");
    ses("meter_cache_ttl_ms", "0");
    for (const std::string& l : opt_.ses_lines) f << l << '\n';
  }

  SesdOptions opt_;
  std::string dir_, conf_, pub_hex_;
  pki::TestPki pki_;
  DaemonProcess proc_;
};

}  // namespace gs::test
