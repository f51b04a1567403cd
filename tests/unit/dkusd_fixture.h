// Test fixture for the real gridseal-dkusd, built on the gridseal-sesd fixture's helpers: temp
// dir, SoftHSM2 token (`gridseal hsm init`), a fleet of meters with plain keys and host-generated
// ECC key pairs (`gridseal meters import`), dkus.toml, start / SIGTERM / SIGKILL of the whole
// process group with bounded waits, and messages sealed by the codec as a meter would seal them.
// RolloverRig: the same daemon with its key-rollover engine pointed at a gridseal-metersim relay
// whose fleet (`gridseal-metersim export`) is imported into the store.
#pragma once

#include "src/invocation_ids.h"
#include "src/key_store.h"
#include "src/rollover_store.h"
#include "tests/unit/sesd_fixture.h"
#include "tools/metersim/fleet.h"

namespace gs::test {

struct DkusdOptions {
  std::size_t meters = 3;  // meters PREFIX.1 .. PREFIX.N, ids M1 .. MN, slot 0, ECC key pairs
  std::string title_prefix = ".7";
  // Extra lines inside [server] / [dkus]; a key set here replaces the fixture's default.
  std::vector<std::string> server_lines;
  std::vector<std::string> dkus_lines;
  std::chrono::seconds start_timeout{30};
};

// What a meter needs to seal its messages and sign its receipts.
struct TestMeter {
  std::string id;     // M<i>
  std::string title;  // PREFIX.<i>
  std::string key_hex;
  std::unique_ptr<HostEcKey> ecc;  // private key of the meter (public one registered)
};

// `id` as minimal BER INTEGER content (a leading 00 when the top bit is set).
inline Bytes integer_content(std::uint64_t id) {
  Bytes b;
  for (int shift = 56; shift >= 0; shift -= 8) {
    const auto v = static_cast<std::uint8_t>(id >> shift);
    if (!b.empty() || v != 0 || shift == 0) b.push_back(v);
  }
  if ((b[0] & 0x80) != 0) b.insert(b.begin(), 0);
  return b;
}

inline std::uint32_t utc_now_s() {
  return static_cast<std::uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// A message from a meter as the meter seals it: from `meter` (calling) to `called` (the
// collection engine), A8 = `id`, AC with `key_id` and IV = `iv_time`, the services in a
// response EPSEM, mode 2 (or 1) under `key_hex`. `answers` (when set) becomes A4.
struct MeterMessage {
  std::string meter;
  std::string called = ".1.9";
  std::uint64_t id = 1;
  std::uint8_t key_id = 0;
  std::uint32_t iv_time = 0;  // 0: now
  std::vector<Bytes> services = {Bytes{0x00, 0x00, 0x02, 0x12, 0x34, 0xBA}};  // read response
  std::optional<std::uint64_t> answers;
  c1222::SecurityMode mode = c1222::SecurityMode::encrypted;
};

// The cleartext (mode-0) form of a meter message, before sealing.
inline Bytes meter_cleartext(const MeterMessage& mm) {
  auto called = c1222::OwnedApTitle::parse(mm.called).value();
  auto calling = c1222::OwnedApTitle::parse(mm.meter).value();
  c1222::Message m;
  m.called_ap_title = called.view();
  const Bytes a4 = integer_content(mm.answers.value_or(0));
  if (mm.answers) m.called_ap_invocation_id = ByteView(a4);
  m.calling_ap_title = calling.view();
  const Bytes a8 = integer_content(mm.id);
  m.calling_ap_invocation_id = ByteView(a8);
  c1222::AuthValue av;
  av.key_id = mm.key_id;
  const std::uint32_t t = mm.iv_time != 0 ? mm.iv_time : utc_now_s();
  av.iv = std::array<std::uint8_t, 4>{static_cast<std::uint8_t>(t >> 24),
                                      static_cast<std::uint8_t>(t >> 16),
                                      static_cast<std::uint8_t>(t >> 8),
                                      static_cast<std::uint8_t>(t)};
  m.auth = av;
  Bytes epsem{0x80};
  for (const Bytes& s : mm.services) c1222::append_service(epsem, s);
  m.epsem = epsem;
  return c1222::encode(m).value();
}

inline Bytes seal_meter_message(const MeterMessage& mm, const std::string& key_hex) {
  auto aes = HostAes::make(hex_bytes(key_hex)).value();
  auto eax = c1222::EaxPrime::make(*aes).value();
  return c1222::seal(ByteView(meter_cleartext(mm)), mm.mode, eax).value();
}

// The MT-2042 read-response service a meter appends: receipt for command `command_id`, signed
// with `signer` over the exact signing input of c1222/profile.h.
inline Bytes receipt_service(const std::string& meter_title, const HostEcKey& signer,
                             std::uint64_t command_id, std::uint8_t result = 0) {
  c1222::SignedReceipt r;
  r.invocation_id = command_id;
  r.result = result;
  r.executed_at = utc_now_s();
  const std::string what = "command " + std::to_string(command_id);
  r.command_digest = sha256(ByteView(reinterpret_cast<const std::uint8_t*>(what.data()),
                                     what.size()))
                         .value();
  const Bytes abs = c1222::OwnedApTitle::parse(meter_title).value().view().absolute(
      c1222::default_base_oid());
  const Bytes signed_bytes = c1222::receipt_signed_bytes(abs, r).value();
  r.signature = signer.sign(sha256(signed_bytes).value()).value();
  return c1222::encode_receipt_response(r);
}

class DkusdDaemon {
 public:
  explicit DkusdDaemon(DkusdOptions options = {}) : opt_(std::move(options)) {}
  ~DkusdDaemon() {
    stop();
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }
  DkusdDaemon(const DkusdDaemon&) = delete;
  DkusdDaemon& operator=(const DkusdDaemon&) = delete;

  // Temp dir, dkus.toml, token, meter key pairs, fleet import.
  Status setup() {
    char tmpl[] = "/tmp/gs-dkusd-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return Error(Errc::storage_failure, "mkdtemp");
    dir_ = tmpl;
    conf_ = dir_ + "/dkus.toml";
    write_config();
    std::ofstream f(dir_ + "/fleet.csv");
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (std::size_t i = 1; i <= opt_.meters; ++i) {
      TestMeter m;
      m.id = "M" + std::to_string(i);
      m.title = opt_.title_prefix + "." + std::to_string(i);
      m.key_hex = meter_key_hex({}, i);
      GS_ASSIGN(auto k, HostEcKey::generate());
      m.ecc = std::make_unique<HostEcKey>(std::move(k));
      f << m.id << ',' << m.title << ',' << to_hex(m.ecc->public_point()) << ",0,plain:"
        << m.key_hex << '\n';
      meters_.push_back(std::move(m));
    }
    f.close();
    auto r = gridseal("hsm init");
    if (r.code != 0) return Error(Errc::hsm_failure, "hsm init: " + r.out);
    r = gridseal("meters import " + dir_ + "/fleet.csv");
    if (r.code != 0) return Error(Errc::storage_failure, "meters import: " + r.out);
    return {};
  }

  // Starts the daemon in its own process group (stdout/stderr appended to DIR/dkusd.out/.err)
  // and waits, bounded, for its "listening on" line.
  Status start() {
    const std::string bin = std::string(GS_BIN_DIR) + "/gridseal-dkusd";
    return proc_.start({bin, "--config", conf_}, dir_ + "/dkusd.out", dir_ + "/dkusd.err",
                       opt_.start_timeout, true);
  }

  // SIGTERM and a bounded wait; the exit code, or -1 when it had to be killed / was not running.
  int stop(std::chrono::milliseconds timeout = std::chrono::milliseconds(15000)) {
    return proc_.stop(timeout);
  }

  // kill -9 of the supervisor and every worker at once (the whole process group), reaped.
  void kill_group() { proc_.kill_group(); }

  server::ClientConfig client_config() const {
    server::ClientConfig cc;
    cc.port = proc_.port();
    cc.plain_tcp = true;
    cc.timeout = std::chrono::milliseconds(5000);
    return cc;
  }
  Result<std::unique_ptr<server::Client>> connect() const {
    return server::Client::connect(client_config());
  }

  CmdResult gridseal(const std::string& args) const {
    return run_gridseal(args + " --config " + conf_);
  }
  std::string http_get(const std::string& path) const {
    return test::http_get(proc_.metrics_port(), path);
  }

  const TestMeter& meter(std::size_t i) const { return meters_.at(i - 1); }
  // Meter i's message sealed under its key (the key of `mm.meter` when that is one of ours).
  Bytes seal(std::size_t i, MeterMessage mm) const {
    if (mm.meter.empty()) mm.meter = meter(i).title;
    return seal_meter_message(mm, meter(i).key_hex);
  }

  std::string err_log() const { return slurp(dir_ + "/dkusd.err"); }
  const std::string& dir() const { return dir_; }
  const std::string& conf() const { return conf_; }
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
    f << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-dkusd\"\n"
         "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
         "[store]\npath = \"gridseal.db\"\n[server]\n";
    auto def = [&](const std::vector<std::string>& lines, const std::string& key,
                   const std::string& value) {
      if (!sets_key(lines, key)) f << key << " = " << value << '\n';
    };
    def(opt_.server_lines, "address", "\"127.0.0.1\"");
    def(opt_.server_lines, "port", "0");
    def(opt_.server_lines, "plain_tcp", "true");
    def(opt_.server_lines, "processes", "2");
    def(opt_.server_lines, "drain_ms", "2000");
    def(opt_.server_lines, "read_timeout_ms", "500");
    for (const std::string& l : opt_.server_lines) f << l << '\n';
    f << "[dkus]\n";
    def(opt_.dkus_lines, "dkus_title", "\".1.11\"");
    def(opt_.dkus_lines, "head_end_title", "\".1.9\"");
    def(opt_.dkus_lines, "metrics_port", "0");
    def(opt_.dkus_lines, "meter_cache_ttl_ms", "0");
    for (const std::string& l : opt_.dkus_lines) f << l << '\n';
  }

  DkusdOptions opt_;
  std::string dir_, conf_;
  std::vector<TestMeter> meters_;
  DaemonProcess proc_;
};

// ---- key rollover against the simulated fleet ---------------------------------------------------

struct RolloverRigOptions {
  std::size_t meters = 10;  // metersim fleet .7.1 .. .7.N, ids SIM00000001 ..
  bool tls = false;         // DKUS -> relay over TLS 1.3 (test PKI) instead of plain TCP
  // gridseal-metersim serve options.
  double loss = 0;
  std::uint32_t loss_timeout_ms = 50;
  std::uint32_t save_every_s = 0;
  std::uint32_t latency_ms = 0;  // every relay answer delayed by this much
  std::uint64_t relay_seed = 1;
  std::uint32_t processes = 2;  // DKUS worker processes
  // Extra lines in [rollover] / [dkus]; a key set here replaces the rig's default.
  std::vector<std::string> rollover_lines;
  std::vector<std::string> dkus_lines;
  std::chrono::seconds start_timeout{30};
};

// A temp dir with a SoftHSM2 token, a metersim fleet trusting gs-cmd-1 imported into the store,
// the metersim relay, and gridseal-dkusd with [rollover] enabled towards that relay.
class RolloverRig {
 public:
  explicit RolloverRig(RolloverRigOptions o = {}) : opt_(std::move(o)) {}
  ~RolloverRig() {
    dkusd_.kill_group();
    relay_.stop(std::chrono::milliseconds(20000));
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }
  RolloverRig(const RolloverRig&) = delete;
  RolloverRig& operator=(const RolloverRig&) = delete;

  static std::string bin(const std::string& name) { return std::string(GS_BIN_DIR) + "/" + name; }

  // Token, fleet export + import, relay started (its port goes into dkus.toml).
  Status setup() {
    char tmpl[] = "/tmp/gs-rollover-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return Error(Errc::storage_failure, "mkdtemp");
    dir_ = tmpl;
    conf_ = dir_ + "/dkus.toml";
    if (opt_.tls) {
      GS_ASSIGN(pki_, pki::make_test_pki(dir_ + "/pki"));
    }
    write_config(1);  // a placeholder relay port until the relay runs
    auto r = gridseal("hsm init");
    if (r.code != 0) return Error(Errc::hsm_failure, "hsm init: " + r.out);
    auto cmd1 = gridseal("hsm export-pubkey gs-cmd-1 --hex");
    if (cmd1.code != 0) return Error(Errc::hsm_failure, "export-pubkey: " + cmd1.out);
    r = run_command(bin("gridseal-metersim") + " export --meters " +
                    std::to_string(opt_.meters) + " --trust-cmd1 " + trim(cmd1.out) +
                    " --seed 7 --out " + dir_ + "/fleet.csv --state " + state_path());
    if (r.code != 0) return Error(Errc::invalid_argument, "metersim export: " + r.out);
    r = gridseal("meters import " + dir_ + "/fleet.csv");
    if (r.code != 0) return Error(Errc::storage_failure, "meters import: " + r.out);
    GS_TRY(start_relay());
    write_config(relay_.port());
    return {};
  }

  Status start_relay() {
    std::vector<std::string> argv = {bin("gridseal-metersim"), "serve", "--state", state_path(),
                                     "--listen", "127.0.0.1:0", "--seed",
                                     std::to_string(opt_.relay_seed)};
    if (opt_.tls) {
      for (const std::string& a : {std::string("--tls-ca"), pki_.ca_cert,
                                   std::string("--tls-cert"), pki_.server_cert,
                                   std::string("--tls-key"), pki_.server_key}) {
        argv.push_back(a);
      }
    } else {
      argv.push_back("--plain");
    }
    if (opt_.loss > 0) {
      argv.insert(argv.end(), {"--loss", std::to_string(opt_.loss), "--loss-timeout-ms",
                               std::to_string(opt_.loss_timeout_ms)});
    }
    if (opt_.save_every_s > 0) {
      argv.insert(argv.end(), {"--save-every", std::to_string(opt_.save_every_s)});
    }
    if (opt_.latency_ms > 0) {
      argv.insert(argv.end(), {"--latency-ms", std::to_string(opt_.latency_ms)});
    }
    return relay_.start(argv, dir_ + "/metersim.out", dir_ + "/metersim.err",
                        std::chrono::seconds(60), true);
  }
  // SIGTERM: the relay drains and writes the state file back. Its exit code.
  int stop_relay() { return relay_.stop(std::chrono::milliseconds(30000)); }

  Status start_dkusd() {
    return dkusd_.start({bin("gridseal-dkusd"), "--config", conf_}, dir_ + "/dkusd.out",
                        dir_ + "/dkusd.err", opt_.start_timeout, true);
  }
  int stop_dkusd() { return dkusd_.stop(); }
  // kill -9 of the supervisor and every worker at once.
  void kill_dkusd() { dkusd_.kill_group(); }
  bool dkusd_running() { return dkusd_.running(); }

  CmdResult gridseal(const std::string& args) const {
    return run_gridseal(args + " --config " + conf_);
  }

  // A store connection of the test's own (the daemons keep theirs).
  Result<store::KeyStore> store() const {
    db::OpenOptions o;
    o.create = false;
    return store::KeyStore::open(dir_ + "/gridseal.db", o);
  }
  // The fleet as the relay last saved it.
  Result<std::unique_ptr<metersim::Fleet>> fleet() const {
    return metersim::Fleet::load(state_path());
  }

  // Polls the store (bounded) until no step of campaign `id` is queued or prepared.
  Result<store::CampaignProgress> wait_campaign(std::int64_t id, std::chrono::milliseconds limit) {
    GS_ASSIGN(auto ks, store());
    store::RolloverStore rs(ks);
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      GS_ASSIGN(auto p, rs.progress(id));
      if (p.queued == 0 && p.prepared == 0) return p;
      if (std::chrono::steady_clock::now() > deadline) {
        return Error(Errc::busy, "campaign " + std::to_string(id) + " not finished: queued " +
                                     std::to_string(p.queued) + ", prepared " +
                                     std::to_string(p.prepared) + ", confirmed " +
                                     std::to_string(p.confirmed) + ", failed " +
                                     std::to_string(p.failed));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  server::ClientConfig dkus_client() const {
    server::ClientConfig cc;
    cc.port = dkusd_.port();
    cc.plain_tcp = true;
    cc.timeout = std::chrono::milliseconds(5000);
    return cc;
  }

  std::string metrics() const { return http_get(dkusd_.metrics_port(), "/metrics"); }
  std::string logs() const {
    return "\n--- dkusd.err (tail)\n" + tail(slurp(dir_ + "/dkusd.err")) +
           "\n--- metersim.err (tail)\n" + tail(slurp(dir_ + "/metersim.err"));
  }
  const std::string& dir() const { return dir_; }
  const std::string& conf() const { return conf_; }
  std::string state_path() const { return dir_ + "/fleet.state"; }
  std::uint16_t relay_port() const { return relay_.port(); }

 private:
  static std::string trim(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
    return s;
  }
  static std::string tail(const std::string& s) {
    return s.size() > 6000 ? s.substr(s.size() - 6000) : s;
  }
  static bool sets_key(const std::vector<std::string>& lines, const std::string& key) {
    for (const std::string& l : lines) {
      const auto b = l.find_first_not_of(" \t");
      if (b == std::string::npos || l.compare(b, key.size(), key) != 0) continue;
      const auto after = l.find_first_not_of(" \t", b + key.size());
      if (after != std::string::npos && l[after] == '=') return true;
    }
    return false;
  }

  void write_config(std::uint16_t relay_port) const {
    std::ofstream f(conf_);
    f << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-rollover\"\n"
         "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
         "[store]\npath = \"gridseal.db\"\n"
         "[server]\naddress = \"127.0.0.1\"\nport = 0\nplain_tcp = true\nprocesses = "
      << opt_.processes << "\ndrain_ms = 2000\n";
    f << "[dkus]\n";
    auto def = [&](const std::vector<std::string>& lines, const std::string& key,
                   const std::string& value) {
      if (!sets_key(lines, key)) f << key << " = " << value << '\n';
    };
    def(opt_.dkus_lines, "dkus_title", "\".1.11\"");
    def(opt_.dkus_lines, "head_end_title", "\".1.9\"");
    def(opt_.dkus_lines, "metrics_port", "0");
    for (const std::string& l : opt_.dkus_lines) f << l << '\n';
    f << "[rollover]\nenabled = true\nrelay_address = \"127.0.0.1\"\nrelay_port = " << relay_port
      << '\n';
    if (opt_.tls) {
      f << "relay_tls_ca = \"" << pki_.ca_cert << "\"\nrelay_tls_cert = \"" << pki_.client_cert
        << "\"\nrelay_tls_key = \"" << pki_.client_key << "\"\n";
    } else {
      f << "relay_plain_tcp = true\n";
    }
    const std::vector<std::string>& r = opt_.rollover_lines;
    def(r, "answer_timeout_ms", "3000");
    def(r, "backoff_initial_ms", "100");
    def(r, "backoff_max_ms", "1000");
    def(r, "poll_ms", "50");
    def(r, "max_attempts", "20");
    def(r, "standby_retention_s", "3600");
    for (const std::string& l : r) f << l << '\n';
  }

  RolloverRigOptions opt_;
  std::string dir_, conf_;
  pki::TestPki pki_;
  DaemonProcess relay_;
  DaemonProcess dkusd_;
};

}  // namespace gs::test
