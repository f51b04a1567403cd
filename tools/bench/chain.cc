// gridseal-bench chain scenarios (see chain.h). Each of C lanes holds one connection to the SES,
// one to the relay and one to the DKUS, and owns the meters FIRST+lane, FIRST+lane+C, ...: a
// meter's messages therefore always travel on one lane and at most one of its commands is in
// flight, which the DKUS needs (a meter's invocation ids must reach it in rising order). A lane
// sends a batch of up to D commands (distinct meters) to the SES pipelined, the secured
// commands to the relay pipelined, and the meter responses to the DKUS pipelined; latency per
// stage is measured from the batch's send to each answer.
#include "tools/bench/chain.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "c1222/services.h"
#include "src/client.h"
#include "src/host_ecdsa.h"
#include "src/key_store.h"
#include "tools/bench/args.h"
#include "tools/bench/campaign.h"

namespace gs::bench {

namespace {

using Clock = std::chrono::steady_clock;

enum class Scenario { read, disconnect, dr, forged, replay, mixed, rollover };

const char* scenario_name(Scenario s) {
  switch (s) {
    case Scenario::read:
      return "read";
    case Scenario::disconnect:
      return "disconnect";
    case Scenario::dr:
      return "dr";
    case Scenario::forged:
      return "forged";
    case Scenario::replay:
      return "replay";
    case Scenario::mixed:
      return "mixed";
    case Scenario::rollover:
      return "rollover";
  }
  return "?";
}

enum Stage : std::size_t { kSes = 0, kRelay = 1, kDkus = 2, kEndToEnd = 3, kStages = 4 };
const char* const kStageKeys[kStages] = {"ses", "relay", "dkus", "end_to_end"};
const char* const kStageLabels[kStages] = {"SES secure", "relay + meter", "DKUS open",
                                           "end to end"};

// rollover: reads before the campaign, while it runs (start to finished), and after it.
enum Phase : std::size_t { kBaseline = 0, kRekeying = 1, kAfter = 2, kPhases = 3 };
const char* const kPhaseKeys[kPhases] = {"baseline", "rollover", "after"};
const char* const kPhaseLabels[kPhases] = {"baseline", "during rollover", "after rollover"};

// What the simulated meter answers (tools/metersim/README.md): ST-23 26 bytes, ST-64 15-minute
// intervals of the last 24 h (6 + 96 x 2 bytes).
constexpr std::size_t kRegsSize = 26;
constexpr std::size_t kProfileSize = 6 + 2 * 96;
constexpr std::uint16_t kTableDrEvent = 0x0800 | 40;   // MT-40, the DR event table of the policy
constexpr std::uint8_t kConnect = 1, kDisconnect = 2;  // SP-26 actions

// SP-26 remote connect/disconnect: full write of ST-7, little-endian procedure number, sequence
// number, action, reserved byte, checksum.
Bytes sp26(std::uint8_t seq, std::uint8_t action) {
  const auto sum = static_cast<std::uint8_t>(0x1a + seq + action);
  return Bytes{0x40,
               0x00,
               0x07,
               0x00,
               0x05,
               0x1a,
               0x00,
               seq,
               action,
               0x00,
               static_cast<std::uint8_t>(0x100 - sum)};
}

Bytes minimal_id(std::uint32_t id) {
  Bytes a8;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const auto b = static_cast<std::uint8_t>(id >> shift);
    if (!a8.empty() || b != 0 || shift == 0) a8.push_back(b);
  }
  if ((a8[0] & 0x80) != 0) a8.insert(a8.begin(), 0);
  return a8;
}

// A mode-0 request from `calling` to `called` carrying `services`.
Bytes make_request(const c1222::OwnedApTitle& called, const c1222::OwnedApTitle& calling,
                   std::uint32_t id, const std::vector<Bytes>& services) {
  c1222::Message m;
  m.called_ap_title = called.view();
  m.calling_ap_title = calling.view();
  const Bytes a8 = minimal_id(id);
  m.calling_ap_invocation_id = ByteView(a8);
  Bytes epsem{c1222::kEpsemReserved};
  for (const Bytes& s : services) c1222::append_service(epsem, s);
  m.epsem = epsem;
  auto wire = c1222::encode(m);
  GS_CHECK(wire.ok());
  return std::move(wire).value();
}

// A decoded answer: its security mode, calling title (absolute) and, in mode 0, its services.
struct Answer {
  bool decoded = false;
  c1222::SecurityMode mode = c1222::SecurityMode::cleartext;
  Bytes calling_abs;
  std::optional<std::uint64_t> a8;
  std::vector<Bytes> services;  // mode 0 only
  // A mode-0 answer with one single-byte service: that response code.
  std::optional<std::uint8_t> error_code() const {
    if (!decoded || mode != c1222::SecurityMode::cleartext || services.size() != 1 ||
        services[0].size() != 1) {
      return std::nullopt;
    }
    return services[0][0];
  }
};

Answer inspect(ByteView wire) {
  Answer a;
  auto m = c1222::decode(wire);
  if (!m.ok()) return a;
  auto e = c1222::split_epsem(m->epsem);
  if (!e.ok()) return a;
  a.mode = c1222::security_mode(e->control);
  if (m->calling_ap_title) a.calling_abs = m->calling_ap_title->absolute(c1222::default_base_oid());
  if (m->calling_ap_invocation_id) {
    if (auto v = c1222::invocation_id_value(*m->calling_ap_invocation_id); v.ok()) a.a8 = *v;
  }
  if (a.mode == c1222::SecurityMode::cleartext) {
    auto s = c1222::split_services(e->body);
    if (!s.ok()) return a;
    for (const auto& sp : *s) a.services.emplace_back(sp.bytes.begin(), sp.bytes.end());
  }
  a.decoded = true;
  return a;
}

std::string code_name(std::uint8_t c) { return c1222::response_code_name(c); }

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    o += c;
  }
  return o;
}

double percentile_ms(const std::vector<std::uint64_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const auto i = static_cast<std::size_t>(std::ceil(pos));
  return static_cast<double>(sorted[std::min(i, sorted.size() - 1)]) / 1e6;
}

// ---- options --------------------------------------------------------------------------------

struct ChainOptions {
  Scenario scenario = Scenario::read;
  server::ClientConfig ses, relay, dkus;
  bool tls = false;
  std::size_t connections = 4;
  std::size_t depth = 8;
  double duration_s = 10;
  double rate = 0;           // commands/s offered over all lanes; 0: closed loop
  std::uint64_t rounds = 0;  // per lane; 0: until the duration is over
  std::uint64_t meters = 0;
  std::uint64_t first = 1;
  std::string prefix = ".7";
  c1222::OwnedApTitle calling;
  std::string store_path;      // receipts: check the DKUS stored them
  std::string group = ".3.1";  // dr
  std::uint64_t events = 1;    // dr
  Bytes cmd_pub;               // dr: gs-cmd-N public key, 65 bytes
  // rollover: the campaign over meters FIRST..FIRST+rekey_meters-1, started with the CLI.
  CampaignCli cli;
  std::uint64_t rekey_meters = 0;
  double rekey_rate = 0;          // meters/s asked of the DKUS, 0: as fast as it goes
  double rekey_timeout_s = 1800;  // the campaign must finish within this
  double after_s = 0;             // reads after the campaign finished
  std::chrono::milliseconds poll{250};
  bool tolerate = false;          // errors and failed meters reported, not the exit code
  bool progress = true;
  bool json = false;
};

// ---- results --------------------------------------------------------------------------------

struct Stats {
  std::array<std::uint64_t, kStages> ok{};
  std::array<std::vector<std::uint64_t>, kStages> lat;
  std::uint64_t verified = 0;           // commands whose cleartext passed its checks
  std::uint64_t receipts_verified = 0;  // MT-2042 receipts checked in the cleartext
  std::uint64_t receipts_stored = 0;    // ... and found in the DKUS store, signature verified
  std::map<std::string, std::uint64_t> errors;                 // "stage:code"
  std::map<std::string, std::array<std::uint64_t, 2>> checks;  // name -> passed, failed
  std::vector<std::string> notes;

  void merge(const Stats& o) {
    for (std::size_t i = 0; i < kStages; ++i) {
      ok[i] += o.ok[i];
      lat[i].insert(lat[i].end(), o.lat[i].begin(), o.lat[i].end());
    }
    verified += o.verified;
    receipts_verified += o.receipts_verified;
    receipts_stored += o.receipts_stored;
    for (const auto& [k, v] : o.errors) errors[k] += v;
    for (const auto& [k, v] : o.checks) {
      checks[k][0] += v[0];
      checks[k][1] += v[1];
    }
    for (const auto& n : o.notes) {
      if (std::find(notes.begin(), notes.end(), n) == notes.end()) notes.push_back(n);
    }
  }
  std::uint64_t error_total() const {
    std::uint64_t n = 0;
    for (const auto& [k, v] : errors) n += v;
    return n;
  }
  std::uint64_t checks_failed() const {
    std::uint64_t n = 0;
    for (const auto& [k, v] : checks) n += v[1];
    return n;
  }
};

struct Progress {
  std::atomic<std::uint64_t> verified{0};
  std::atomic<std::uint64_t> errors{0};
  std::atomic<bool> stop{false};
  // rollover: the phase new batches count in, and the campaign as last polled.
  std::atomic<std::size_t> phase{kBaseline};
  std::atomic<std::int64_t> rekey_total{0}, rekey_confirmed{0}, rekey_failed{0};
};

// ---- one lane ----------------------------------------------------------------------------------

enum class Kind : std::uint8_t { read, disconnect, connect };

struct Cmd {
  std::uint64_t meter = 0;
  c1222::OwnedApTitle title;
  Bytes title_abs;
  Kind kind = Kind::read;
  Bytes wire;                    // what goes to the next stage
  std::uint64_t command_id = 0;  // the SES's invocation id of the secured command
  Clock::time_point t0;
  bool alive = true;
};

class Lane {
 public:
  Lane(const ChainOptions& o, std::size_t index, Progress& progress)
      : o_(o), index_(index), progress_(progress) {}

  Status connect() {
    GS_ASSIGN(conn_[kSes], server::Client::connect(o_.ses));
    if (o_.scenario == Scenario::dr) return {};
    GS_ASSIGN(conn_[kRelay], server::Client::connect(o_.relay));
    GS_ASSIGN(conn_[kDkus], server::Client::connect(o_.dkus));
    return {};
  }

  bool broken() const { return broken_; }
  Stats& stats() { return st_; }

  // rollover: what was counted so far belongs to the current phase; from now on to `p`.
  std::size_t phase() const { return phase_; }
  void enter_phase(std::size_t p) {
    phase_stats_[phase_].merge(st_);
    st_ = Stats{};
    phase_ = p;
  }
  // After a final enter_phase(): the counts of phase `p`.
  const Stats& phase_stats(std::size_t p) const { return phase_stats_[p]; }

  // The lane's next `n` distinct meters (fewer when the lane owns fewer).
  std::vector<std::uint64_t> next_meters(std::size_t n) {
    const std::uint64_t owned = (o_.meters + o_.connections - 1 - index_) / o_.connections;
    n = static_cast<std::size_t>(std::min<std::uint64_t>(n, owned));
    std::vector<std::uint64_t> out;
    for (std::size_t i = 0; i < n; ++i) {
      out.push_back(o_.first + index_ + (cursor_ % owned) * o_.connections);
      ++cursor_;
    }
    return out;
  }

  Cmd make(std::uint64_t meter, Kind kind) {
    Cmd c;
    c.meter = meter;
    c.title = c1222::OwnedApTitle::parse(o_.prefix + "." + std::to_string(meter)).value();
    c.title_abs = c.title.view().absolute(c1222::default_base_oid());
    c.kind = kind;
    std::vector<Bytes> services;
    switch (kind) {
      case Kind::read:
        services = {c1222::encode_full_read(23), c1222::encode_full_read(64)};
        break;
      case Kind::disconnect:
        services = {sp26(static_cast<std::uint8_t>(seq_), kDisconnect)};
        break;
      case Kind::connect:
        services = {sp26(static_cast<std::uint8_t>(seq_), kConnect)};
        break;
    }
    c.wire = make_request(c.title, o_.calling, next_request_id(), services);
    return c;
  }

  // Runs commands through SES -> relay -> DKUS, each stage pipelined; every command ends
  // verified or with its error counted. End-to-end latency counts from `t0` (open loop: the
  // intended send time, so that a late send is not hidden).
  void run_batch(std::vector<Cmd>& cmds, Clock::time_point t0 = Clock::now()) {
    for (Cmd& c : cmds) c.t0 = t0;
    for (Stage s : {kSes, kRelay, kDkus}) {
      Bytes out;
      std::size_t n = 0;
      for (const Cmd& c : cmds) {
        if (!c.alive) continue;
        out.insert(out.end(), c.wire.begin(), c.wire.end());
        ++n;
      }
      if (n == 0 || broken_) return;
      const auto sent = Clock::now();
      if (auto st = conn_[s]->send(out); !st.ok()) return lost(s, cmds);
      for (Cmd& c : cmds) {
        if (!c.alive) continue;
        auto r = conn_[s]->receive();
        if (!r.ok()) return lost(s, cmds);
        const auto now = Clock::now();
        st_.lat[s].push_back(ns(now - sent));
        judge(s, c, *r, now);
      }
    }
  }

  // One request on one stage, not pipelined (the forged and replay checks).
  std::optional<Bytes> call(Stage s, ByteView request) {
    if (broken_) return std::nullopt;
    const auto sent = Clock::now();
    auto r = conn_[s]->call(request);
    if (!r.ok()) {
      broken_ = true;
      error(std::string("connection:") + kStageKeys[s]);
      return std::nullopt;
    }
    st_.lat[s].push_back(ns(Clock::now() - sent));
    return std::move(r).value();
  }

  void check(const std::string& name, bool passed) {
    ++st_.checks[name][passed ? 0 : 1];
    if (!passed) progress_.errors.fetch_add(1, std::memory_order_relaxed);
  }

  // What the DKUS made of a meter response: "" when it is the expected cleartext of `c`, else
  // the reason (meter:<code>, dkus:<code>, check:<what>).
  std::string verdict(const Cmd& c, ByteView clear) {
    const Answer a = inspect(clear);
    if (!a.decoded) return "dkus:malformed";
    if (a.calling_abs != c.title_abs) {
      auto code = a.error_code();
      return code ? "dkus:" + code_name(*code) : "dkus:unexpected";
    }
    if (a.mode != c1222::SecurityMode::cleartext) return "check:not-cleartext";
    if (auto code = a.error_code()) return "meter:" + code_name(*code);
    if (a.services.empty() || a.services[0] != Bytes{c1222::kRespOk}) return "check:mt2040";
    if (c.kind == Kind::read) {
      if (a.services.size() != 3) return "check:read-services";
      if (!c1222::decode_read_response(a.services[1], kRegsSize).ok()) return "check:st23";
      auto lp = c1222::decode_read_response(a.services[2], kProfileSize);
      if (!lp.ok() || (*lp)[0] != 15 || (*lp)[1] != 96) return "check:st64";
      return "";
    }
    // SP-26 then the MT-2042 receipt the SES appended.
    if (a.services.size() != 3) return "check:sp26-services";
    if (a.services[1] != Bytes{c1222::kRespOk}) return "check:sp26-result";
    auto r = c1222::decode_receipt_response(a.services[2]);
    if (!r.ok()) return "check:receipt";
    if (r->invocation_id != c.command_id || r->result != c1222::kRespOk)
      return "check:receipt-fields";
    ++st_.receipts_verified;
    if (!o_.store_path.empty()) {
      if (auto why = stored(c, *r); !why.empty()) return why;
      ++st_.receipts_stored;
    }
    return "";
  }

  // Forged: a tampered secured command is refused by its meter; a tampered meter response is
  // refused by the DKUS; the genuine ones still pass afterwards.
  void forged_round(std::uint64_t meter) {
    Cmd c = make(meter, Kind::read);
    auto secured = secure(c);
    if (!secured) return;
    Bytes bad = *secured;
    bad[bad.size() - 6] ^= 0x01;  // a ciphertext byte (the last 4 bytes are the MAC)
    auto refused = call(kRelay, bad);
    if (!refused) return;
    check("tampered command refused by its meter (sme)",
          meter_refusal(c, *refused) == c1222::kRespSme);
    auto response = call(kRelay, *secured);
    if (!response) return;
    const bool sealed = inspect(*response).mode == c1222::SecurityMode::encrypted;
    check("genuine command executed after the tampered one", sealed);
    if (!sealed) return;
    Bytes bad_response = *response;
    bad_response[bad_response.size() - 6] ^= 0x01;
    auto opened = call(kDkus, bad_response);
    if (!opened) return;
    check("tampered meter response refused by the DKUS (sme)",
          dkus_refusal(c, *opened) == c1222::kRespSme);
    opened = call(kDkus, *response);
    if (!opened) return;
    check("genuine response opens after the tampered one", verdict(c, *opened).empty());
  }

  // Replay: the same secured command twice is refused by its meter the second time; the same
  // meter response twice is refused by the DKUS the second time.
  void replay_round(std::uint64_t meter) {
    Cmd c = make(meter, Kind::read);
    auto secured = secure(c);
    if (!secured) return;
    auto first = call(kRelay, *secured);
    auto again = call(kRelay, *secured);
    if (!first || !again) return;
    auto opened = call(kDkus, *first);
    if (!opened) return;
    check("first delivery executed and opened", verdict(c, *opened).empty());
    check("replayed command refused by its meter (sme)",
          meter_refusal(c, *again) == c1222::kRespSme);
    opened = call(kDkus, *first);
    if (!opened) return;
    check("replayed meter response refused by the DKUS (sme)",
          dkus_refusal(c, *opened) == c1222::kRespSme);
  }

  // One DR broadcast: signed once by the SES in mode 0, addressed to the group.
  void dr_round(const c1222::OwnedApTitle& group, std::uint32_t event) {
    const std::uint32_t start = static_cast<std::uint32_t>(std::time(nullptr)) + 60;
    const std::uint8_t data[10] = {static_cast<std::uint8_t>(event >> 8),
                                   static_cast<std::uint8_t>(event),
                                   2 /*level*/,
                                   15 /*minutes*/,
                                   static_cast<std::uint8_t>(start >> 24),
                                   static_cast<std::uint8_t>(start >> 16),
                                   static_cast<std::uint8_t>(start >> 8),
                                   static_cast<std::uint8_t>(start),
                                   0,
                                   0};
    auto write = c1222::encode_partial_write(kTableDrEvent, ByteView(data, sizeof data));
    GS_CHECK(write.ok());
    const Bytes req = make_request(group, o_.calling, next_request_id(), {*write});
    const auto t0 = Clock::now();
    auto resp = call(kSes, req);
    if (!resp) return;
    const Answer a = inspect(*resp);
    if (auto code = a.error_code()) {
      error("ses:" + code_name(*code));
      return;
    }
    auto m = c1222::decode(*resp);
    const bool mode0 = m.ok() && a.decoded && a.mode == c1222::SecurityMode::cleartext;
    check("broadcast signed once by the SES (mode 0 + MT-2040)", mode0);
    if (!mode0) return;
    auto ac = c1222::extract_authorization(*m);
    const bool auth_ok =
        ac.ok() && ac->authorization.command_class == c1222::CommandClass::demand_response;
    check("MT-2040 class demand_response, addressed to the group",
          auth_ok && m->called_ap_title &&
              m->called_ap_title->absolute(c1222::default_base_oid()) ==
                  group.view().absolute(c1222::default_base_oid()));
    if (!auth_ok) return;
    Bytes body;
    c1222::append_service(body, *write);
    check("signed services are the event write",
          Bytes(ac->following.begin(), ac->following.end()) == body);
    if (!o_.cmd_pub.empty()) {
      auto pub = HostEcKey::from_public(o_.cmd_pub);
      auto digest = sha256(ac->signing_input);
      check("signature verifies with the exported gs-cmd public key",
            pub.ok() && digest.ok() && pub->verify(*digest, ac->authorization.signature).ok());
    }
    ++st_.ok[kSes];
    ++st_.verified;
    st_.lat[kEndToEnd].push_back(ns(Clock::now() - t0));
    progress_.verified.fetch_add(1, std::memory_order_relaxed);
  }

  std::uint8_t next_seq() { return static_cast<std::uint8_t>(++seq_); }

 private:
  static std::uint64_t ns(Clock::duration d) {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
  }

  std::uint32_t next_request_id() {
    // 1..0x7FFFFF per lane; the SES assigns the ids that matter.
    request_id_ = request_id_ % 0x7FFFFF + 1;
    return request_id_;
  }

  void error(const std::string& key) {
    ++st_.errors[key];
    progress_.errors.fetch_add(1, std::memory_order_relaxed);
  }

  void lost(Stage s, std::vector<Cmd>& cmds) {
    broken_ = true;
    for (Cmd& c : cmds) {
      if (!c.alive) continue;
      c.alive = false;
      error(std::string("connection:") + kStageKeys[s]);
    }
  }

  void judge(Stage s, Cmd& c, const Bytes& answer, Clock::time_point now) {
    const Answer a = inspect(answer);
    auto fail = [&](const std::string& key) {
      c.alive = false;
      error(key);
    };
    switch (s) {
      case kSes: {
        if (!a.decoded) return fail("ses:malformed");
        if (a.mode == c1222::SecurityMode::cleartext) {
          auto code = a.error_code();
          return fail(code ? "ses:" + code_name(*code) : "ses:unexpected");
        }
        ++st_.ok[kSes];
        c.command_id = a.a8.value_or(0);
        c.wire = answer;
        return;
      }
      case kRelay: {
        if (!a.decoded) return fail("relay:malformed");
        if (a.mode != c1222::SecurityMode::encrypted) {
          auto code = a.error_code();
          const char* who = a.calling_abs == c.title_abs ? "meter:" : "relay:";
          return fail(std::string(who) + (code ? code_name(*code) : "unexpected"));
        }
        ++st_.ok[kRelay];
        c.wire = answer;
        return;
      }
      case kDkus: {
        const std::string why = verdict(c, answer);
        if (why.rfind("dkus:", 0) != 0) ++st_.ok[kDkus];
        if (!why.empty()) return fail(why);
        ++st_.verified;
        st_.lat[kEndToEnd].push_back(ns(now - c.t0));
        progress_.verified.fetch_add(1, std::memory_order_relaxed);
        c.alive = false;
        return;
      }
      default:
        return;
    }
  }

  // The SES's secured command for `c`, with its invocation id, or nullopt (error counted).
  std::optional<Bytes> secure(Cmd& c) {
    auto r = call(kSes, c.wire);
    if (!r) return std::nullopt;
    const Answer a = inspect(*r);
    if (!a.decoded || a.mode == c1222::SecurityMode::cleartext) {
      auto code = a.error_code();
      error(code ? "ses:" + code_name(*code) : "ses:unexpected");
      return std::nullopt;
    }
    c.command_id = a.a8.value_or(0);
    return r;
  }

  // The code a meter refused with: its answer is sealed (opened here through the DKUS) or, when
  // it could not seal, a mode-0 error from its title. -1 when it was not a refusal.
  int meter_refusal(const Cmd& c, const Bytes& answer) {
    Answer a = inspect(answer);
    if (a.decoded && a.mode == c1222::SecurityMode::encrypted) {
      auto opened = call(kDkus, answer);
      if (!opened) return -1;
      a = inspect(*opened);
    }
    if (!a.decoded || a.calling_abs != c.title_abs) return -1;
    auto code = a.error_code();
    return code ? *code : -1;
  }

  // The code the DKUS refused with (an error from another title than the meter's), or -1.
  static int dkus_refusal(const Cmd& c, const Bytes& answer) {
    const Answer a = inspect(answer);
    if (!a.decoded || a.calling_abs == c.title_abs) return -1;
    auto code = a.error_code();
    return code ? *code : -1;
  }

  // "" when the DKUS store holds this receipt for the meter and its signature verifies with the
  // meter's registered public key.
  std::string stored(const Cmd& c, const c1222::SignedReceipt& r) {
    if (!store_) {
      auto s = store::KeyStore::open(o_.store_path, {.create = false, .read_only = true});
      if (!s.ok()) return "check:store-open";
      store_.emplace(std::move(s).value());
    }
    auto m = store_->meter_by_title(c.title_abs);
    if (!m.ok() || !m->has_value()) return "check:store-meter";
    auto list = store_->receipts_for_meter((*m)->row, 16);
    if (!list.ok()) return "check:store-receipts";
    for (const auto& rec : *list) {
      if (rec.invocation_id != r.invocation_id) continue;
      if (rec.signature != Bytes(r.signature.begin(), r.signature.end())) {
        return "check:receipt-stored-differs";
      }
      auto pub = HostEcKey::from_public((*m)->public_key);
      auto digest = sha256(c1222::receipt_signed_bytes(c.title_abs, r).value());
      if (!pub.ok() || !digest.ok() || !pub->verify(*digest, rec.signature).ok()) {
        return "check:receipt-signature";
      }
      return "";
    }
    return "check:receipt-not-stored";
  }

  const ChainOptions& o_;
  std::size_t index_;
  Progress& progress_;
  std::array<std::unique_ptr<server::Client>, 3> conn_;
  bool broken_ = false;
  std::uint64_t cursor_ = 0;
  std::uint32_t request_id_ = 0;
  std::uint32_t seq_ = 0;
  std::optional<store::KeyStore> store_;
  Stats st_;
  std::size_t phase_ = kBaseline;
  std::array<Stats, kPhases> phase_stats_;
};

// The work of one lane: rounds until the deadline (or `rounds` of them), paced when a rate is
// set. `commands` of a round is what pacing counts.
void run_lane(const ChainOptions& o, Lane& lane, Clock::time_point start,
              Clock::time_point deadline, Progress& progress) {
  const double per_lane = o.rate > 0 ? o.rate / static_cast<double>(o.connections) : 0;
  auto due = start;
  for (std::uint64_t round = 0; !lane.broken() && !progress.stop.load(); ++round) {
    if (o.rounds > 0 ? round >= o.rounds : Clock::now() >= deadline) break;
    if (per_lane > 0) {
      std::this_thread::sleep_until(due);
      if (Clock::now() >= deadline && o.rounds == 0) break;
    }
    Scenario kind = o.scenario;
    if (kind == Scenario::rollover) {
      // Reads; a batch counts in the phase it starts in.
      kind = Scenario::read;
      if (const std::size_t p = progress.phase.load(); p != lane.phase()) lane.enter_phase(p);
    }
    if (kind == Scenario::mixed) {
      // Mostly reads; a disconnect + connect, a forged and a replay check now and then.
      kind = round % 20 == 7    ? Scenario::disconnect
             : round % 50 == 13 ? Scenario::forged
             : round % 50 == 38 ? Scenario::replay
                                : Scenario::read;
    }
    std::size_t commands = 0;
    switch (kind) {
      case Scenario::read: {
        std::vector<Cmd> cmds;
        for (auto m : lane.next_meters(o.depth)) cmds.push_back(lane.make(m, Kind::read));
        commands = cmds.size();
        lane.run_batch(cmds, per_lane > 0 ? due : Clock::now());
        break;
      }
      case Scenario::disconnect: {
        const auto meters = lane.next_meters(o.depth);
        lane.next_seq();
        std::vector<Cmd> off, on;
        for (auto m : meters) off.push_back(lane.make(m, Kind::disconnect));
        lane.run_batch(off, per_lane > 0 ? due : Clock::now());
        for (auto m : meters) on.push_back(lane.make(m, Kind::connect));
        lane.run_batch(on);
        commands = 2 * meters.size();
        break;
      }
      case Scenario::forged:
        for (auto m : lane.next_meters(1)) lane.forged_round(m);
        commands = 1;
        break;
      case Scenario::replay:
        for (auto m : lane.next_meters(1)) lane.replay_round(m);
        commands = 1;
        break;
      default:
        return;
    }
    if (per_lane > 0) {
      due += std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(static_cast<double>(commands) / per_lane));
    }
  }
}

// ---- the command ------------------------------------------------------------------------------

int usage_error(const std::string& what) {
  std::fprintf(stderr, "gridseal-bench: %s\n", what.c_str());
  usage_chain();
  return 2;
}

Result<server::ClientConfig> endpoint(const std::string& option, const std::string& text) {
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 >= text.size()) {
    return Error(Errc::invalid_argument,
                 "--" + option + ": expected ADDR:PORT, got '" + text + "'");
  }
  server::ClientConfig cc;
  cc.host = text.substr(0, colon);
  try {
    const int p = std::stoi(text.substr(colon + 1));
    if (p < 1 || p > 65535) throw std::out_of_range("port");
    cc.port = static_cast<std::uint16_t>(p);
  } catch (...) {
    return Error(Errc::invalid_argument, "--" + option + ": bad port in '" + text + "'");
  }
  cc.timeout = std::chrono::milliseconds(10000);
  return cc;
}

void print_table(const ChainOptions& o, const Stats& s, double elapsed) {
  std::printf("gridseal-bench %s  SES %s:%u -> relay %s:%u -> DKUS %s:%u  (%s)\n",
              scenario_name(o.scenario), o.ses.host.c_str(), unsigned{o.ses.port},
              o.relay.host.c_str(), unsigned{o.relay.port}, o.dkus.host.c_str(),
              unsigned{o.dkus.port}, o.tls ? "TLS 1.3" : "plain TCP");
  std::printf("  %zu connection(s) x depth %zu, %s, meters %s.%llu..%llu, %.1f s\n", o.connections,
              o.depth,
              o.rate > 0 ? ("open loop " + std::to_string(static_cast<long>(o.rate)) + "/s").c_str()
                         : "closed loop",
              o.prefix.c_str(), static_cast<unsigned long long>(o.first),
              static_cast<unsigned long long>(o.first + o.meters - 1), elapsed);
  std::printf("  %-16s %10s %10s %10s %10s %10s\n", "stage", "count", "per s", "p50 ms", "p99 ms",
              "p999 ms");
  for (std::size_t i = 0; i < kStages; ++i) {
    const std::uint64_t n = i == kEndToEnd ? s.verified : s.ok[i];
    if (o.scenario == Scenario::dr && (i == kRelay || i == kDkus)) continue;
    std::printf("  %-16s %10llu %10.1f %10.3f %10.3f %10.3f\n", kStageLabels[i],
                static_cast<unsigned long long>(n),
                elapsed > 0 ? static_cast<double>(n) / elapsed : 0, percentile_ms(s.lat[i], 0.5),
                percentile_ms(s.lat[i], 0.99), percentile_ms(s.lat[i], 0.999));
  }
  std::printf("  %-28s %llu\n", "verified cleartexts", static_cast<unsigned long long>(s.verified));
  if (s.receipts_verified > 0 || o.scenario == Scenario::disconnect) {
    std::printf("  %-28s %llu (%s)\n", "MT-2042 receipts checked",
                static_cast<unsigned long long>(s.receipts_verified),
                o.store_path.empty() ? "store not checked: no --store"
                                     : (std::to_string(s.receipts_stored) +
                                        " found stored by the DKUS, signature verified")
                                           .c_str());
  }
  std::printf("  %-28s %llu\n", "errors", static_cast<unsigned long long>(s.error_total()));
  for (const auto& [k, v] : s.errors) {
    std::printf("    %-26s %llu\n", k.c_str(), static_cast<unsigned long long>(v));
  }
  if (!s.checks.empty()) {
    std::printf("  %-58s %6s %7s\n", "checks", "passed", "failed");
    for (const auto& [k, v] : s.checks) {
      std::printf("    %-56s %6llu %7llu\n", k.c_str(), static_cast<unsigned long long>(v[0]),
                  static_cast<unsigned long long>(v[1]));
    }
  }
  for (const auto& n : s.notes) std::printf("  note: %s\n", n.c_str());
}

void print_json(const ChainOptions& o, const Stats& s, double elapsed) {
  std::string out = "{\"scenario\":\"" + std::string(scenario_name(o.scenario)) + "\"";
  char buf[512];
  std::snprintf(buf, sizeof buf,
                ",\"tls\":%s,\"connections\":%zu,\"depth\":%zu,\"rate_offered\":%.1f,"
                "\"duration_s\":%.3f,\"meters\":%llu,\"count\":%llu,\"per_s\":%.1f,"
                "\"errors_total\":%llu,\"checks_failed\":%llu,\"receipts_verified\":%llu,"
                "\"receipts_stored\":%llu",
                o.tls ? "true" : "false", o.connections, o.depth, o.rate, elapsed,
                static_cast<unsigned long long>(o.meters),
                static_cast<unsigned long long>(s.verified),
                elapsed > 0 ? static_cast<double>(s.verified) / elapsed : 0,
                static_cast<unsigned long long>(s.error_total()),
                static_cast<unsigned long long>(s.checks_failed()),
                static_cast<unsigned long long>(s.receipts_verified),
                static_cast<unsigned long long>(s.receipts_stored));
  out += buf;
  out += ",\"stages\":{";
  for (std::size_t i = 0; i < kStages; ++i) {
    const std::uint64_t n = i == kEndToEnd ? s.verified : s.ok[i];
    std::snprintf(buf, sizeof buf,
                  "%s\"%s\":{\"count\":%llu,\"per_s\":%.1f,\"latency_ms\":{\"p50\":%.3f,"
                  "\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f}}",
                  i == 0 ? "" : ",", kStageKeys[i], static_cast<unsigned long long>(n),
                  elapsed > 0 ? static_cast<double>(n) / elapsed : 0, percentile_ms(s.lat[i], 0.5),
                  percentile_ms(s.lat[i], 0.99), percentile_ms(s.lat[i], 0.999),
                  percentile_ms(s.lat[i], 1.0));
    out += buf;
  }
  out += "},\"errors\":{";
  bool first = true;
  for (const auto& [k, v] : s.errors) {
    out += (first ? "\"" : ",\"") + json_escape(k) + "\":" + std::to_string(v);
    first = false;
  }
  out += "},\"checks\":{";
  first = true;
  for (const auto& [k, v] : s.checks) {
    out += (first ? "\"" : ",\"") + json_escape(k) + "\":{\"passed\":" + std::to_string(v[0]) +
           ",\"failed\":" + std::to_string(v[1]) + "}";
    first = false;
  }
  out += "},\"notes\":[";
  first = true;
  for (const auto& n : s.notes) {
    out += (first ? "\"" : ",\"") + json_escape(n) + "\"";
    first = false;
  }
  out += "]}";
  std::printf("%s\n", out.c_str());
}

Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// ---- rollover ---------------------------------------------------------------------------------

struct CampaignRun {
  bool started = false;
  bool finished = false;   // `gridseal rollover status` said so
  bool timed_out = false;  // not finished within --rekey-timeout
  std::string error;       // could not start it, or its status could not be read
  std::int64_t skipped = 0;
  CampaignStatus status;   // as last polled
  double wall_s = 0;       // from `rollover start` to the poll that saw it finished
  std::array<double, kPhases> phase_s{};
};

// The rollover scenario's conductor, on the main thread while the lanes read: the baseline
// phase, then the campaign started with the CLI and polled until finished, then --after.
CampaignRun conduct(const ChainOptions& o, const std::vector<std::string>& ids,
                    Clock::time_point start, Progress& progress) {
  CampaignRun c;
  std::this_thread::sleep_until(start + seconds(o.duration_s));
  const auto t0 = Clock::now();
  progress.phase = kRekeying;
  c.phase_s[kBaseline] = seconds_between(start, t0);
  progress.rekey_total = static_cast<std::int64_t>(ids.size());
  auto id = start_campaign(o.cli, ids, o.rekey_rate, &c.skipped);
  if (!id.ok()) {
    c.error = "gridseal rollover start: " + id.error().message();
  } else {
    c.started = true;
    c.status.id = *id;
    const auto limit = t0 + seconds(o.rekey_timeout_s);
    int failures = 0;
    for (;;) {
      std::this_thread::sleep_for(o.poll);
      auto st = campaign_status(o.cli, *id);
      if (st.ok()) {
        failures = 0;
        c.status = std::move(st).value();
        progress.rekey_total = c.status.total;
        progress.rekey_confirmed = c.status.confirmed;
        progress.rekey_failed = c.status.failed;
        if (c.status.finished) {
          c.finished = true;
          break;
        }
      } else if (++failures == 5) {  // one failed poll (a busy store) is not the end
        c.error = "gridseal rollover status: " + st.error().message();
        break;
      }
      if (Clock::now() >= limit) {
        c.timed_out = true;
        break;
      }
    }
  }
  const auto t1 = Clock::now();
  c.wall_s = seconds_between(t0, t1);
  c.phase_s[kRekeying] = c.wall_s;
  progress.phase = kAfter;
  if (c.finished && o.after_s > 0) std::this_thread::sleep_for(seconds(o.after_s));
  c.phase_s[kAfter] = seconds_between(t1, Clock::now());
  progress.stop = true;
  return c;
}

struct PhaseRow {
  std::uint64_t count = 0;
  double per_s = 0, p50 = 0, p99 = 0, p999 = 0, max = 0;
};

PhaseRow phase_row(const Stats& s, double secs) {
  const auto& lat = s.lat[kEndToEnd];
  return PhaseRow{s.verified,
                  secs > 0 ? static_cast<double>(s.verified) / secs : 0,
                  percentile_ms(lat, 0.5),
                  percentile_ms(lat, 0.99),
                  percentile_ms(lat, 0.999),
                  percentile_ms(lat, 1.0)};
}

double rekeyed_per_s(const CampaignRun& c) {
  return c.wall_s > 0 ? static_cast<double>(c.status.confirmed) / c.wall_s : 0;
}

void print_rollover_table(const ChainOptions& o, const std::array<Stats, kPhases>& ph,
                          const CampaignRun& c, double elapsed) {
  const auto u = [](auto v) { return static_cast<unsigned long long>(v); };
  std::printf("gridseal-bench rollover  SES %s:%u -> relay %s:%u -> DKUS %s:%u  (%s)\n",
              o.ses.host.c_str(), unsigned{o.ses.port}, o.relay.host.c_str(),
              unsigned{o.relay.port}, o.dkus.host.c_str(), unsigned{o.dkus.port},
              o.tls ? "TLS 1.3" : "plain TCP");
  std::printf("  reads: %zu connection(s) x depth %zu, %s, meters %s.%llu..%llu, %.1f s\n",
              o.connections, o.depth,
              o.rate > 0 ? ("open loop " + std::to_string(static_cast<long>(o.rate)) + "/s").c_str()
                         : "closed loop",
              o.prefix.c_str(), u(o.first), u(o.first + o.meters - 1), elapsed);
  char rate[48] = "unthrottled";
  if (o.rekey_rate > 0) std::snprintf(rate, sizeof rate, "--rate %g/s", o.rekey_rate);
  std::printf("  key rollover: campaign %lld over meters %s.%llu..%llu (%s), %s\n",
              static_cast<long long>(c.status.id), o.prefix.c_str(), u(o.first),
              u(o.first + o.rekey_meters - 1), o.cli.gridseal.c_str(), rate);
  std::printf("  %-28s %llu of %llu (failed %llu, aborted %llu, still queued %llu, in flight "
              "%llu, skipped %llu)\n",
              "meters confirmed", u(c.status.confirmed), u(c.status.total), u(c.status.failed),
              u(c.status.aborted), u(c.status.queued), u(c.status.prepared), u(c.skipped));
  std::printf("  %-28s %.2f s (rollover start -> status finished, polled every %lld ms)%s\n",
              "campaign wall time", c.wall_s, static_cast<long long>(o.poll.count()),
              c.timed_out ? "  NOT FINISHED: --rekey-timeout" : "");
  std::printf("  %-28s %.1f\n", "meters re-keyed per s", rekeyed_per_s(c));
  for (const auto& [id, why] : c.status.failed_meters) {
    std::printf("    failed %s: %s\n", id.c_str(), why.c_str());
  }
  if (!c.error.empty()) std::printf("  campaign error: %s\n", c.error.c_str());
  std::printf("  %-16s %8s %10s %10s %10s %10s %10s %8s\n", "reads", "s", "verified", "per s",
              "p50 ms", "p99 ms", "p999 ms", "errors");
  for (std::size_t p = 0; p < kPhases; ++p) {
    if (p == kAfter && c.phase_s[p] <= 0 && ph[p].verified == 0) continue;
    const PhaseRow r = phase_row(ph[p], c.phase_s[p]);
    std::printf("  %-16s %8.1f %10llu %10.1f %10.3f %10.3f %10.3f %8llu\n", kPhaseLabels[p],
                c.phase_s[p], u(r.count), r.per_s, r.p50, r.p99, r.p999,
                u(ph[p].error_total() + ph[p].checks_failed()));
  }
  for (std::size_t p = 0; p < kPhases; ++p) {
    for (const auto& [k, v] : ph[p].errors) {
      std::printf("    %-16s %-26s %llu\n", kPhaseLabels[p], k.c_str(), u(v));
    }
  }
}

void print_rollover_json(const ChainOptions& o, const std::array<Stats, kPhases>& ph,
                         const Stats& total, const CampaignRun& c, double elapsed) {
  char buf[1024];
  std::snprintf(buf, sizeof buf,
                "{\"scenario\":\"rollover\",\"tls\":%s,\"connections\":%zu,\"depth\":%zu,"
                "\"rate_offered\":%.1f,\"duration_s\":%.3f,\"meters\":%llu,\"count\":%llu,"
                "\"per_s\":%.1f,\"errors_total\":%llu,\"checks_failed\":%llu",
                o.tls ? "true" : "false", o.connections, o.depth, o.rate, elapsed,
                static_cast<unsigned long long>(o.meters),
                static_cast<unsigned long long>(total.verified),
                elapsed > 0 ? static_cast<double>(total.verified) / elapsed : 0,
                static_cast<unsigned long long>(total.error_total()),
                static_cast<unsigned long long>(total.checks_failed()));
  std::string out = buf;
  std::snprintf(buf, sizeof buf,
                ",\"campaign\":{\"id\":%lld,\"meters\":%llu,\"total\":%lld,\"confirmed\":%lld,"
                "\"failed\":%lld,\"aborted\":%lld,\"queued\":%lld,\"in_flight\":%lld,"
                "\"skipped\":%lld,\"finished\":%s,\"timed_out\":%s,\"wall_s\":%.3f,"
                "\"rekeyed_per_s\":%.2f,\"confirm_rate_per_hour\":%lld,\"poll_ms\":%lld,"
                "\"rate_asked\":%.3f",
                static_cast<long long>(c.status.id),
                static_cast<unsigned long long>(o.rekey_meters),
                static_cast<long long>(c.status.total), static_cast<long long>(c.status.confirmed),
                static_cast<long long>(c.status.failed), static_cast<long long>(c.status.aborted),
                static_cast<long long>(c.status.queued), static_cast<long long>(c.status.prepared),
                static_cast<long long>(c.skipped), c.finished ? "true" : "false",
                c.timed_out ? "true" : "false", c.wall_s, rekeyed_per_s(c),
                static_cast<long long>(c.status.confirm_rate_per_hour),
                static_cast<long long>(o.poll.count()), o.rekey_rate);
  out += buf;
  out += ",\"error\":\"" + json_escape(c.error) + "\",\"failed_meters\":[";
  for (std::size_t i = 0; i < c.status.failed_meters.size(); ++i) {
    out += (i == 0 ? "{\"meter_id\":\"" : ",{\"meter_id\":\"") +
           json_escape(c.status.failed_meters[i].first) + "\",\"error\":\"" +
           json_escape(c.status.failed_meters[i].second) + "\"}";
  }
  out += "]},\"phases\":{";
  for (std::size_t p = 0; p < kPhases; ++p) {
    const PhaseRow r = phase_row(ph[p], c.phase_s[p]);
    std::snprintf(buf, sizeof buf,
                  "%s\"%s\":{\"seconds\":%.3f,\"count\":%llu,\"per_s\":%.1f,\"latency_ms\":"
                  "{\"p50\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f},\"errors_total\":%llu,"
                  "\"checks_failed\":%llu,\"errors\":{",
                  p == 0 ? "" : ",", kPhaseKeys[p], c.phase_s[p],
                  static_cast<unsigned long long>(r.count), r.per_s, r.p50, r.p99, r.p999, r.max,
                  static_cast<unsigned long long>(ph[p].error_total()),
                  static_cast<unsigned long long>(ph[p].checks_failed()));
    out += buf;
    bool first = true;
    for (const auto& [k, v] : ph[p].errors) {
      out += (first ? "\"" : ",\"") + json_escape(k) + "\":" + std::to_string(v);
      first = false;
    }
    out += "}}";
  }
  out += "},\"errors\":{";
  bool first = true;
  for (const auto& [k, v] : total.errors) {
    out += (first ? "\"" : ",\"") + json_escape(k) + "\":" + std::to_string(v);
    first = false;
  }
  out += "},\"notes\":[";
  first = true;
  for (const auto& n : total.notes) {
    out += (first ? "\"" : ",\"") + json_escape(n) + "\"";
    first = false;
  }
  out += "]}";
  std::printf("%s\n", out.c_str());
}

// Tables or JSON for the rollover scenario, and its exit code: 0 when the campaign finished
// with every meter confirmed and every read in every phase verified (with --tolerate-errors,
// read errors and failed meters are reported only).
int finish_rollover(const ChainOptions& o, std::vector<std::unique_ptr<Lane>>& lanes,
                    const CampaignRun& c, double elapsed) {
  std::array<Stats, kPhases> ph;
  Stats total;
  for (auto& l : lanes) {
    l->enter_phase(l->phase());  // the counts of the last phase into its slot
    for (std::size_t p = 0; p < kPhases; ++p) ph[p].merge(l->phase_stats(p));
  }
  for (std::size_t p = 0; p < kPhases; ++p) {
    for (auto& v : ph[p].lat) std::sort(v.begin(), v.end());
    total.merge(ph[p]);
  }
  if (total.errors.count("meter:bsy") != 0) {
    total.notes.push_back(
        "meter:bsy: a simulated meter remembers its last 16 accepted command ids while their "
        "windows are open; spread the reads over more --meters or pace them with --rate");
  }
  if (c.timed_out) {
    total.notes.push_back("the campaign had not finished after --rekey-timeout; it goes on in "
                          "gridseal-dkusd (gridseal rollover status/abort " +
                          std::to_string(c.status.id) + ")");
  }
  if (o.json) {
    print_rollover_json(o, ph, total, c, elapsed);
  } else {
    print_rollover_table(o, ph, c, elapsed);
    for (const auto& n : total.notes) std::printf("  note: %s\n", n.c_str());
  }
  std::fflush(stdout);
  if (!c.error.empty()) std::fprintf(stderr, "gridseal-bench: rollover: %s\n", c.error.c_str());
  const bool ran = c.started && c.finished && ph[kBaseline].verified > 0 &&
                   ph[kRekeying].verified > 0;
  const bool clean = total.error_total() == 0 && total.checks_failed() == 0 &&
                     c.status.confirmed == c.status.total && c.status.failed == 0 &&
                     c.status.aborted == 0 && c.skipped == 0;
  return ran && (clean || o.tolerate) ? 0 : 1;
}

// The rollover scenario's own options into `o` (after --meters and --first); "" or the error.
std::string rollover_options(const Args& a, ChainOptions& o) {
  if (a.has("rounds")) return "rollover reads until the campaign finished: no --rounds";
  if (!a.has("config")) {
    return "--config DKUS.toml is required (the configuration `gridseal rollover` reads)";
  }
  o.cli.config = a.str("config");
  o.cli.gridseal = a.has("gridseal") ? a.str("gridseal") : gridseal_next_to_self();
  if (o.cli.gridseal.empty()) return "no gridseal CLI next to gridseal-bench: give --gridseal PATH";
  if (access(o.cli.gridseal.c_str(), X_OK) != 0) {
    return "--gridseal: " + o.cli.gridseal + " is not an executable";
  }
  auto rekey = a.u64("rekey-meters", o.meters, 1, o.meters);
  auto rate = a.num("rekey-rate", 0, 0, 1e6);
  auto timeout = a.num("rekey-timeout", 1800, 1, 86400);
  auto after = a.num("after", 0, 0, 86400);
  auto poll = a.u64("poll-ms", 250, 50, 60000);
  std::string bad;
  auto take = [&bad](const auto& r) {
    if (!r.ok() && bad.empty()) bad = r.error().message();
  };
  take(rekey), take(rate), take(timeout), take(after), take(poll);
  if (!bad.empty()) return bad;
  if (*rate > 0 && *rate < 0.001) return "--rekey-rate: 0 (unthrottled) or at least 0.001";
  o.rekey_meters = *rekey;
  o.rekey_rate = *rate;
  o.rekey_timeout_s = *timeout;
  o.after_s = *after;
  o.poll = std::chrono::milliseconds(*poll);
  o.tolerate = a.has("tolerate-errors");
  return "";
}

int run_chain(Scenario scenario, int argc, char** argv) {
  // The usage that fits the scenario (rollover has its own).
  const auto usage_error = [scenario](const std::string& what) {
    if (scenario != Scenario::rollover) return gs::bench::usage_error(what);
    std::fprintf(stderr, "gridseal-bench: %s\n", what.c_str());
    usage_rollover();
    return 2;
  };
  Args a;
  for (const char* v :
       {"ses",     "relay",    "dkus",  "ca",     "cert",    "key",       "connections",
        "depth",   "duration", "rate",  "rounds", "meters",  "first",     "title-prefix",
        "calling", "store",    "group", "events", "cmd-pub", "timeout-ms"}) {
    a.value(v);
  }
  a.flag("plain").flag("json").flag("quiet");
  if (scenario == Scenario::rollover) {
    for (const char* v : {"gridseal", "config", "rekey-meters", "rekey-rate", "rekey-timeout",
                          "after", "poll-ms"}) {
      a.value(v);
    }
    a.flag("tolerate-errors");
  }
  if (auto st = a.parse(argc, argv); !st.ok()) return usage_error(st.error().message());
  if (!a.positional().empty()) return usage_error("unexpected " + a.positional()[0]);

  ChainOptions o;
  o.scenario = scenario;
  const bool checks_only =
      scenario == Scenario::forged || scenario == Scenario::replay || scenario == Scenario::dr;
  auto conns = a.u64("connections", checks_only ? 1 : 4, 1, 4096);
  auto depth = a.u64("depth", 8, 1, 32);
  // rollover: --duration is the baseline phase, the reads before the campaign starts.
  auto duration = a.num("duration", scenario == Scenario::rollover ? 5 : 10, 0.1, 86400);
  auto rate = a.num("rate", 0, 0, 1e7);
  auto rounds = a.u64("rounds", checks_only ? 3 : 0, 0, 1'000'000'000);
  auto meters = a.u64("meters", 0, 1, 100'000'000);
  auto first = a.u64("first", 1, 0, 1'000'000'000);
  auto events = a.u64("events", 1, 1, 1000);
  auto timeout = a.u64("timeout-ms", 10000, 100, 600000);
  std::string bad;
  auto take = [&bad](const auto& r) {
    if (!r.ok() && bad.empty()) bad = r.error().message();
  };
  take(conns), take(depth), take(duration), take(rate), take(rounds), take(meters), take(first);
  take(events), take(timeout);
  if (!bad.empty()) return usage_error(bad);
  if (!a.has("ses")) return usage_error("--ses ADDR:PORT is required");
  if (scenario != Scenario::dr && (!a.has("relay") || !a.has("dkus"))) {
    return usage_error("--relay ADDR:PORT and --dkus ADDR:PORT are required");
  }
  if (scenario != Scenario::dr && !a.has("meters")) return usage_error("--meters N is required");
  o.connections = *conns;
  o.depth = *depth;
  o.duration_s = *duration;
  o.rate = *rate;
  o.rounds = scenario == Scenario::dr ? *events : *rounds;
  o.meters = a.has("meters") ? *meters : 1;
  o.first = *first;
  o.prefix = a.str("title-prefix", ".7");
  if (!c1222::OwnedApTitle::parse(o.prefix + ".1").ok()) return usage_error("bad --title-prefix");
  auto calling = c1222::OwnedApTitle::parse(a.str("calling", ".1.9"));
  if (!calling.ok()) return usage_error("--calling: " + calling.error().message());
  o.calling = std::move(calling).value();
  o.store_path = a.str("store");
  o.group = a.str("group", ".3.1");
  auto group = c1222::OwnedApTitle::parse(o.group);
  if (!group.ok()) return usage_error("--group: " + group.error().message());
  if (a.has("cmd-pub")) {
    auto pub = from_hex(a.str("cmd-pub"));
    if (!pub || pub->size() != 65)
      return usage_error("--cmd-pub: 65-byte uncompressed point in hex");
    o.cmd_pub = *pub;
  }
  if (scenario == Scenario::dr) o.connections = 1;
  if (o.meters < o.connections) {
    return usage_error("--meters must be at least --connections (each lane owns its meters)");
  }
  if (scenario == Scenario::rollover) {
    if (const std::string why = rollover_options(a, o); !why.empty()) return usage_error(why);
  }
  o.progress = !a.has("quiet");
  o.json = a.has("json");

  auto ses = endpoint("ses", a.str("ses"));
  if (!ses.ok()) return usage_error(ses.error().message());
  o.ses = *ses;
  if (scenario != Scenario::dr) {
    auto relay = endpoint("relay", a.str("relay"));
    if (!relay.ok()) return usage_error(relay.error().message());
    auto dkus = endpoint("dkus", a.str("dkus"));
    if (!dkus.ok()) return usage_error(dkus.error().message());
    o.relay = *relay;
    o.dkus = *dkus;
  }
  o.tls = !a.has("plain");
  for (server::ClientConfig* cc : {&o.ses, &o.relay, &o.dkus}) {
    cc->timeout = std::chrono::milliseconds(*timeout);
    cc->plain_tcp = !o.tls;
    if (o.tls) {
      cc->tls.ca_file = a.str("ca");
      cc->tls.cert_file = a.str("cert");
      cc->tls.key_file = a.str("key");
    }
  }
  if (o.tls && (a.str("ca").empty() || a.str("cert").empty() || a.str("key").empty())) {
    return usage_error("TLS needs --ca, --cert and --key (or --plain)");
  }

  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 3 * o.connections + 64) {
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, 3 * o.connections + 64);
    setrlimit(RLIMIT_NOFILE, &rl);
  }

  // rollover: the meters' ids from the store (read-only) before any load, so that a wrong
  // --config or an unregistered meter fails at once.
  std::vector<std::string> rekey_ids;
  if (scenario == Scenario::rollover) {
    auto ids = meter_ids_for_titles(o.cli.config, o.prefix, o.first, o.rekey_meters);
    if (!ids.ok()) {
      std::fprintf(stderr, "gridseal-bench: rollover: %s\n", ids.error().message().c_str());
      return 1;
    }
    rekey_ids = std::move(ids).value();
  }

  Progress progress;
  std::vector<std::unique_ptr<Lane>> lanes;
  for (std::size_t i = 0; i < o.connections; ++i) {
    lanes.push_back(std::make_unique<Lane>(o, i, progress));
    if (auto st = lanes.back()->connect(); !st.ok()) {
      std::fprintf(stderr, "gridseal-bench: connecting lane %zu: %s\n", i,
                   st.error().message().c_str());
      return 1;
    }
  }

  const auto start = Clock::now();
  // rollover: the lanes read until the conductor stops them; the deadline is only a backstop.
  const double run_s = scenario == Scenario::rollover
                           ? o.duration_s + o.rekey_timeout_s + o.after_s + 60
                           : o.duration_s;
  const auto deadline = start + seconds(run_s);
  std::vector<std::thread> threads;
  const c1222::OwnedApTitle group_title = *group;
  for (auto& l : lanes) {
    Lane* lane = l.get();
    threads.emplace_back([&, lane] {
      if (o.scenario == Scenario::dr) {
        for (std::uint64_t e = 0; e < o.rounds; ++e)
          lane->dr_round(group_title, static_cast<std::uint32_t>(e + 1));
        return;
      }
      run_lane(o, *lane, start, deadline, progress);
    });
  }
  std::atomic<bool> done{false};
  std::thread ticker([&] {
    const bool tty = isatty(2) != 0;
    std::uint64_t last = 0;
    auto next = start + std::chrono::seconds(1);
    bool printed = false;
    while (!done.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (Clock::now() < next) continue;
      next += std::chrono::seconds(1);
      if (!o.progress) continue;
      const std::uint64_t v = progress.verified.load();
      const double t = std::chrono::duration<double>(Clock::now() - start).count();
      std::string campaign;
      if (o.scenario == Scenario::rollover) {
        const std::size_t p = progress.phase.load();
        campaign = std::string("  [") + kPhaseLabels[p] + "]";
        if (p != kBaseline) {
          campaign += "  rekeyed " + std::to_string(progress.rekey_confirmed.load()) + "/" +
                      std::to_string(progress.rekey_total.load()) + " failed " +
                      std::to_string(progress.rekey_failed.load());
        }
      }
      std::fprintf(stderr, "%s[%5.1f s] %s: %8llu verified/s  total %llu  errors %llu%s%s",
                   tty ? "\r" : "", t, scenario_name(o.scenario),
                   static_cast<unsigned long long>(v - last), static_cast<unsigned long long>(v),
                   static_cast<unsigned long long>(progress.errors.load()), campaign.c_str(),
                   tty ? "   " : "\n");
      printed = true;
      last = v;
    }
    if (printed && tty) std::fprintf(stderr, "\n");
  });
  CampaignRun campaign;
  if (scenario == Scenario::rollover) campaign = conduct(o, rekey_ids, start, progress);
  for (auto& t : threads) t.join();
  done = true;
  ticker.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  if (scenario == Scenario::rollover) return finish_rollover(o, lanes, campaign, elapsed);

  Stats total;
  for (auto& l : lanes) total.merge(l->stats());
  for (auto& v : total.lat) std::sort(v.begin(), v.end());
  if (scenario == Scenario::dr) {
    total.notes.push_back(
        "group delivery: gridseal-metersim routes by meter AP title only and its meters accept "
        "only mode-2 commands, so the broadcast is not delivered to meters; its signature is "
        "checked here against the exported gs-cmd key instead" +
        std::string(o.cmd_pub.empty() ? " (not checked: no --cmd-pub given)" : ""));
  }
  if (total.errors.count("meter:bsy") != 0) {
    total.notes.push_back(
        "meter:bsy: a simulated meter remembers its last 16 accepted command ids while their "
        "windows are open, so more than 16 commands to one meter within one second are answered "
        "bsy; spread the load over more --meters or pace it with --rate");
  }
  if (o.json) {
    print_json(o, total, elapsed);
  } else {
    print_table(o, total, elapsed);
  }
  std::fflush(stdout);
  std::uint64_t checks_passed = 0;
  for (const auto& [k, v] : total.checks) checks_passed += v[0];
  const bool ok = (total.verified > 0 || checks_passed > 0) && total.error_total() == 0 &&
                  total.checks_failed() == 0;
  return ok ? 0 : 1;
}

}  // namespace

void usage_chain() {
  std::fprintf(
      stderr,
      "usage: gridseal-bench read|disconnect|mixed --ses ADDR:PORT --relay ADDR:PORT --dkus "
      "ADDR:PORT\n"
      "         (--plain | --ca F --cert F --key F) --meters N [--first 1] [--title-prefix .7]\n"
      "         [--connections C] [--depth D] [--duration S] [--rate R/s] [--rounds N]\n"
      "         [--calling .1.9] [--store gridseal.db] [--timeout-ms 10000] [--json] [--quiet]\n"
      "       gridseal-bench forged|replay  (same options; default 1 connection, 3 rounds)\n"
      "       gridseal-bench dr --ses ADDR:PORT (--plain | --ca F --cert F --key F)\n"
      "         [--group .3.1] [--events 1] [--cmd-pub HEX]\n"
      "  The bench plays the collection engine: each command goes to gridseal-sesd (secured),\n"
      "  then to the relay (gridseal-metersim serve: the meter verifies and executes it and\n"
      "  answers under its key), then to gridseal-dkusd (opened), and the cleartext is checked.\n"
      "  read:        ST-23 registers + ST-64 load profile of meters PREFIX.FIRST.. (N of them)\n"
      "  disconnect:  SP-26 disconnect then connect, each with its MT-2042 receipt checked (and,\n"
      "               with --store, found stored by the DKUS and verified with the meter's key)\n"
      "  dr:          one broadcast per event to the DR group, signed once by the SES; the\n"
      "               simulator has no group delivery, so the signature is verified against\n"
      "               --cmd-pub (`gridseal hsm export-pubkey gs-cmd-1 --hex`)\n"
      "  forged:      a tampered secured command is refused by its meter (sme); a tampered meter\n"
      "               response is refused by the DKUS (sme); the genuine ones still pass\n"
      "  replay:      a replayed command is refused by its meter, a replayed response by the DKUS\n"
      "  mixed:       reads with disconnect/connect pairs, forged and replay checks mixed in\n"
      "  rollover:    reads while gridseal-dkusd rekeys meters (gridseal-bench rollover --help)\n"
      "  C lanes, each one connection to every daemon, owning meters FIRST+lane, FIRST+lane+C, "
      "..;\n"
      "  each stage is pipelined D deep. --rate paces commands/s over all lanes (open loop).\n"
      "  Runs --duration seconds or --rounds batches per lane. A progress line each second on\n"
      "  stderr (not with --quiet); a table per stage (count, per s, p50/p99/p999 ms), errors by\n"
      "  stage:code (ses:, relay:, meter:, dkus:, check:, connection:), or one JSON object.\n"
      "  Exit 0 when something was verified (or checked) with no error and no failed check, else "
      "1.\n");
}

void usage_rollover() {
  std::fprintf(
      stderr,
      "usage: gridseal-bench rollover --ses ADDR:PORT --relay ADDR:PORT --dkus ADDR:PORT\n"
      "         (--plain | --ca F --cert F --key F) --meters N --config DKUS.toml\n"
      "         [--rekey-meters N] [--rekey-rate R/s] [--rekey-timeout 1800] [--after S]\n"
      "         [--gridseal PATH] [--poll-ms 250] [--tolerate-errors]\n"
      "         [--first 1] [--title-prefix .7] [--connections C] [--depth D] [--duration S]\n"
      "         [--rate R/s] [--calling .1.9] [--timeout-ms 10000] [--json] [--quiet]\n"
      "  Key rollover under read load: the bench plays the collection engine and runs the `read`\n"
      "  chain (ST-23 + ST-64, SES -> relay/meter -> DKUS, every cleartext checked) over meters\n"
      "  PREFIX.FIRST.. (N of them) for --duration seconds (default 5: the baseline), then starts\n"
      "  a campaign over the first --rekey-meters of them (default all N) with\n"
      "  `gridseal rollover start --file F --config DKUS.toml --json` and polls\n"
      "  `gridseal rollover status ID --json` every --poll-ms until it is finished, reading all\n"
      "  the while; then reads --after seconds more (default 0). gridseal-dkusd must run with\n"
      "  [rollover] enabled towards the same relay; --config is its configuration (the store the\n"
      "  CLI writes the campaign to; the bench only reads meter ids from it). --gridseal defaults\n"
      "  to the gridseal next to gridseal-bench.\n"
      "  Reports meters confirmed/failed, the campaign's wall time (start to the poll that saw it\n"
      "  finished) and meters re-keyed per s; reads/s and p50/p99/p999 ms per phase (baseline,\n"
      "  during rollover, after) and read errors by stage:code per phase. A progress line each\n"
      "  second on stderr (not with --quiet); a table, or one JSON object with --json.\n"
      "  Exit 0 when the campaign finished with every meter confirmed and no read failed in any\n"
      "  phase; --tolerate-errors reports read errors and failed meters without failing the run\n"
      "  (a campaign that cannot start or does not finish within --rekey-timeout still does).\n");
}

int run_chain_read(int argc, char** argv) { return run_chain(Scenario::read, argc, argv); }
int run_chain_disconnect(int argc, char** argv) {
  return run_chain(Scenario::disconnect, argc, argv);
}
int run_chain_dr(int argc, char** argv) { return run_chain(Scenario::dr, argc, argv); }
int run_chain_forged(int argc, char** argv) { return run_chain(Scenario::forged, argc, argv); }
int run_chain_replay(int argc, char** argv) { return run_chain(Scenario::replay, argc, argv); }
int run_chain_mixed(int argc, char** argv) { return run_chain(Scenario::mixed, argc, argv); }

int run_chain_rollover(int argc, char** argv) {
  return run_chain(Scenario::rollover, argc, argv);
}

}  // namespace gs::bench
