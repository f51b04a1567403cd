// gridseal-bench dkus: secured meter readings (mode 2 under each meter's key, as the meters seal
// them) from the meters of a fleet file through gridseal-dkusd; opened messages/s, latency
// percentiles, errors by C12.22 response code, and the raw HSM EAX' open rate of the same token
// measured in the same run. The messages are sealed before the timed phase (the generator's own
// sealing must not compete with the DKUS for the CPU).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "c1222/eax_prime.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "gridseal/clock.h"
#include "src/daemon_config.h"
#include "src/toml_text.h"
#include "src/host_aes.h"
#include "src/invocation_ids.h"
#include "src/sqlite.h"
#include "tools/bench/args.h"
#include "tools/bench/fleet_file.h"
#include "tools/bench/load.h"
#include "tools/bench/raw_hsm.h"
#include "tools/bench/scenarios.h"
#include "tools/bench/util.h"

namespace gs::bench {

namespace {

using Clock = std::chrono::steady_clock;

// Closed loop: messages are sealed for this many per second over the whole run unless
// --per-meter says otherwise; a connection that runs out stops and the run is reported failed.
// (The DKUS did 123,940 /s at 16 x 64 in session 16's second full run; an open loop's closed
// warm-up at depth 32 ran out with 100,000.)
constexpr double kClosedLoopCeiling = 200'000;
// Pre-sealed bytes this tool agrees to hold.
constexpr std::uint64_t kMaxPresealedBytes = 8ULL << 30;
// 2025-01-01T00:00:00Z in Unix milliseconds: the clock-derived first invocation counter counts
// 100 ms ticks from it, so that ids keep rising from one run to the next.
constexpr std::int64_t kCounterEpochMs = 1'735'689'600'000;

std::uint64_t mix64(std::uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

std::uint64_t fnv1a(ByteView b) {
  std::uint64_t h = 0xCBF29CE484222325ULL;
  for (std::uint8_t c : b) {
    h ^= c;
    h *= 0x100000001B3ULL;
  }
  return h;
}

// Data bytes of the one read-response service that makes the EPSEM `epsem_bytes` long:
// control (1) + service length (1..3) + 00 count(2) data checksum(1).
Result<std::size_t> reading_data_size(std::size_t epsem_bytes) {
  for (std::size_t len_octets = 1; len_octets <= 3; ++len_octets) {
    if (epsem_bytes < 1 + len_octets + 4 + 1) break;
    const std::size_t n = epsem_bytes - 1 - len_octets - 4;
    const std::size_t service = 4 + n;
    const std::size_t need = service < 0x80 ? 1 : service < 0x100 ? 2 : 3;
    if (need == len_octets) return n;
  }
  return Error(Errc::invalid_argument, "--epsem-bytes: no read response is exactly " +
                                           std::to_string(epsem_bytes) + " bytes");
}

// The meter's reading in clear: control 0x80 and one read response (`00 count data checksum`)
// whose data depend on the meter and the message (so every message's cleartext differs).
Bytes reading_epsem(std::size_t data_size, std::uint64_t meter, std::uint64_t counter) {
  Bytes data(data_size);
  std::uint64_t x = mix64((meter << 32) ^ counter);
  for (std::size_t i = 0; i < data.size(); ++i) {
    if (i % 8 == 0) x = mix64(x);
    data[i] = static_cast<std::uint8_t>(x >> (8 * (i % 8)));
  }
  Bytes service;
  const c1222::ReadResponse rr{ByteView(data), 0, true};
  GS_CHECK(c1222::encode_response(c1222::Response(rr), service).ok());
  Bytes epsem{0x80};
  c1222::append_service(epsem, service);
  return epsem;
}

// The smallest counter whose id is above `mark` (ids rise with the counter inside a cycle).
Result<std::uint64_t> counter_above(std::uint64_t mark) {
  if (mark >= ids::kMaxInvocationId) {
    return Error(Errc::invalid_argument, "replay mark " + std::to_string(mark) +
                                             " leaves no 32-bit id above it");
  }
  std::uint64_t lo = 0, hi = ids::kIdCycle - 1;  // id_for_counter(hi) = 0x7FFFFFFF > mark
  while (lo < hi) {
    const std::uint64_t mid = lo + (hi - lo) / 2;
    if (ids::id_for_counter(mid) > mark) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The DKUS's durable replay marks (dkus/replay.h) by absolute meter title, read from its store
// (read-only): every meter's first id must lie above its mark.
Result<std::unordered_map<std::string, std::uint64_t>> read_replay_marks(const std::string& path) {
  db::OpenOptions opt;
  opt.create = false;
  opt.read_only = true;
  GS_ASSIGN(db::Db db, db::Db::open(path, opt));
  GS_ASSIGN(db::Stmt st, db.prepare("SELECT m.ap_title, r.last_invocation_id FROM replay_state r "
                                    "JOIN meters m ON m.row = r.meter"));
  std::unordered_map<std::string, std::uint64_t> marks;
  for (;;) {
    GS_ASSIGN(db::Step step, st.step());
    if (step == db::Step::done) break;
    const ByteView title = st.blob_view(0);
    marks[std::string(title.begin(), title.end())] = static_cast<std::uint64_t>(st.int64(1));
  }
  return marks;
}

struct DkusPlan {
  std::size_t connections = 0;
  std::uint64_t per_meter = 0;     // messages sealed per meter
  std::size_t data_size = 0;       // read-response data bytes
  c1222::OwnedApTitle called;      // the collection engine's title (called title of readings)
  std::optional<std::uint64_t> first_counter;  // --first-id, as a counter
  std::uint64_t clock_counter = 0;  // the clock-derived first counter
  // --store: the first counter of each meter above its replay mark, by fleet index.
  std::vector<std::uint64_t> above_mark;
};

// The pre-sealed messages of one connection, in the order it sends them: round r of its
// meters, each meter's messages in rising id order, r = 0 .. per_meter - 1.
struct ConnMessages {
  std::vector<std::uint32_t> meters;  // fleet indices of the meters this connection owns
  Bytes arena;                        // every sealed message, back to back
  std::vector<std::uint64_t> offset;  // message i is arena[offset[i], offset[i + 1])
  std::vector<std::uint64_t> expect;  // FNV-1a of message i's EPSEM in clear
};

// Seals the messages of one connection: each meter's key in a host AES context (the simulated
// meter's side), ids from the meter's first counter up, IV = now.
Status seal_connection(const FleetKeys& fleet, const DkusPlan& p, ConnMessages& cm) {
  const std::size_t n = cm.meters.size();
  std::vector<std::unique_ptr<HostAes>> aes(n);
  std::vector<std::optional<c1222::EaxPrime>> eax(n);
  std::vector<std::uint64_t> first(n);
  for (std::size_t j = 0; j < n; ++j) {
    const FleetMeter& m = fleet.meters[cm.meters[j]];
    GS_ASSIGN(aes[j], HostAes::make(ByteView(m.key.data(), m.key.size())));
    GS_ASSIGN(auto e, c1222::EaxPrime::make(*aes[j]));
    eax[j].emplace(std::move(e));
    first[j] = p.first_counter ? *p.first_counter : std::max(p.clock_counter, m.counter);
    if (!p.above_mark.empty()) first[j] = std::max(first[j], p.above_mark[cm.meters[j]]);
    if (first[j] + p.per_meter >= ids::kIdCycle) {
      return Error(Errc::invalid_argument,
                   "invocation ids of meter " + m.title.dotted() +
                       " would wrap past 0x7FFFFFFF; pass a lower --first-id");
    }
  }
  const std::size_t total = n * p.per_meter;
  cm.offset.reserve(total + 1);
  cm.expect.reserve(total);
  cm.offset.push_back(0);
  for (std::uint64_t r = 0; r < p.per_meter; ++r) {
    const std::uint32_t now = utc_now();
    for (std::size_t j = 0; j < n; ++j) {
      const FleetMeter& m = fleet.meters[cm.meters[j]];
      const std::uint64_t counter = first[j] + r;
      const Bytes a8 = ids::encode_id(ids::id_for_counter(counter));
      const Bytes epsem = reading_epsem(p.data_size, cm.meters[j], counter);
      c1222::Message msg;
      msg.called_ap_title = p.called.view();
      msg.calling_ap_title = m.title.view();
      msg.calling_ap_invocation_id = ByteView(a8);
      c1222::AuthValue av;
      av.key_id = m.key_id;
      av.iv = std::array<std::uint8_t, 4>{
          static_cast<std::uint8_t>(now >> 24), static_cast<std::uint8_t>(now >> 16),
          static_cast<std::uint8_t>(now >> 8), static_cast<std::uint8_t>(now)};
      msg.auth = av;
      msg.epsem = epsem;
      GS_ASSIGN(const Bytes wire, c1222::seal(msg, c1222::SecurityMode::encrypted, *eax[j]));
      cm.arena.insert(cm.arena.end(), wire.begin(), wire.end());
      cm.offset.push_back(cm.arena.size());
      cm.expect.push_back(fnv1a(epsem));
    }
  }
  return {};
}

// Reads the DKUS's process model from its configuration: worker processes (0 = cores) and
// handler threads per process, the defaults of the raw measurement.
Result<std::pair<std::size_t, std::size_t>> dkus_process_model(const std::string& path) {
  GS_ASSIGN(toml::table root, toml_text::parse_file(path));
  daemon::ProcessModel pm;
  pm.server.io_threads = 2;  // the DKUS's defaults (dkus/dkus_config.h)
  pm.server.worker_threads = 0;
  GS_TRY(daemon::parse_server_table(root, path, std::filesystem::absolute(path).parent_path(), 0,
                                    pm));
  std::size_t procs = pm.processes;
  if (procs == 0) procs = std::max(1U, std::thread::hardware_concurrency());
  const std::size_t threads =
      pm.server.worker_threads > 0 ? pm.server.worker_threads : pm.server.io_threads;
  return std::make_pair(procs, threads);
}

}  // namespace

void usage_dkus() {
  std::fprintf(stderr,
      "usage: gridseal-bench dkus --host ADDR --port P (--plain | --ca F --cert F --key F)\n"
      "         --fleet FLEET.csv|FLEET.state [--meters N] [--connections C] [--depth D]\n"
      "         [--duration S] [--warmup S] [--rate R/s] [--pace-us 1000] [--epsem-bytes 200]\n"
      "         [--called .1.9] [--per-meter K] [--first-id ID] [--store gridseal.db]\n"
      "         [--threads T] [--json] [--until-done] [--quiet] [--latency-log FILE] [--echo]\n"
      "         [--hsm-config dkus.toml [--hsm-processes N] [--hsm-threads T] [--hsm-seconds 3]\n"
      "          [--hsm-resident-keys K] [--hsm-only]]\n"
      "  Sends secured readings (mode 2 under each meter's key, EPSEM --epsem-bytes long, IV =\n"
      "  sealing time, the meter's invocation ids rising) of the first N meters of the fleet to\n"
      "  gridseal-dkusd and checks every answer is that reading opened. FLEET: the CSV of\n"
      "  `gridseal-bench make-fleet` or `gridseal-metersim export --keys plain` (plain keys), or a\n"
      "  gridseal-metersim state file. Meter i is sent on connection i mod C only (the DKUS needs\n"
      "  a meter's messages in order on one connection); each connection sends its meters in\n"
      "  turn, keeping D in flight (closed loop), or the total is paced at R/s (open loop; the\n"
      "  warm-up then runs closed loop, filling the DKUS's key and meter caches, its last second\n"
      "  adding nothing so that its backlog is answered, and latency counts from each message's\n"
      "  intended send time in the measured part; --pace-us: the open loop's tick, each generator\n"
      "  thread waking that often to send what fell due, 0 a timer per connection).\n"
      "  All messages are sealed before the clock starts: K per meter (default: enough for R/s\n"
      "  over the duration and 100,000/s over the warm-up, or 100,000/s over both closed loop);\n"
      "  a connection that runs out stops.\n"
      "  --until-done: the run ends when every pre-sealed message is answered (running out is\n"
      "  the plan then); with --per-meter 1, one reading of every meter (e.g. to fill the\n"
      "  DKUS's key and meter caches before a measurement).\n"
      "  Ids: the meters' counters continue from 100 ms ticks since 2025-01-01 (or the state\n"
      "  file's counter when higher), so they rise from one run to the next unless a run sent\n"
      "  more than 10 messages per meter per second; --store (the DKUS's database, read only)\n"
      "  starts each meter above the replay mark stored for it; --first-id sets the first id\n"
      "  of every meter.\n"
      "  Run it after the DKUS started (it refuses messages sealed before) and keep warm-up +\n"
      "  duration + sealing inside its dkus.iv_window_s.\n"
      "  --hsm-config: the DKUS's own config; after the load, the raw EAX' open of the same\n"
      "  EPSEM through PKCS#11 (key handle and subkeys cached) is measured with the DKUS's\n"
      "  server.processes x handler threads (or --hsm-processes/--hsm-threads) and opened/raw is\n"
      "  printed; --hsm-only: that measurement alone. --latency-log FILE: one line per counted\n"
      "  message, its intended send time (s from the start of the measured part) and its\n"
      "  latency (ms), in send order. --echo: the target is `gridseal-bench echo`, and an\n"
      "  answer counts (as \"echoed\", \"opened\" in --json) when it is the message itself\n"
      "  byte for byte: the same load's ceiling on this machine, before any server work.\n"
      "  Exit 1 when nothing was opened or any\n"
      "  error, unanswered message, lost connection or exhausted connection was seen.\n");
}

int run_dkus(int argc, char** argv) {
  Args a;
  for (const char* v : {"host", "port", "ca", "cert", "key", "connections", "depth", "duration",
                        "warmup", "rate", "fleet", "meters", "epsem-bytes", "called", "per-meter",
                        "first-id", "store", "threads", "latency-log", "hsm-config", "hsm-threads", "hsm-processes",
                        "hsm-seconds", "hsm-resident-keys", "pace-us"}) {
    a.value(v);
  }
  a.flag("plain").flag("json").flag("quiet").flag("hsm-only").flag("until-done").flag("echo");
  if (auto st = a.parse(argc, argv); !st.ok()) return usage_error(st.error().message(), usage_dkus);
  if (!a.positional().empty()) return usage_error("unexpected " + a.positional()[0], usage_dkus);

  LoadOptions o;
  o.target.host = a.str("host", "127.0.0.1");
  auto port = a.u64("port", 1154, 1, 65535);
  auto conns = a.u64("connections", 16, 1, 100000);
  auto depth = a.u64("depth", 8, 1, 4096);
  auto duration = a.num("duration", 10, 0.1, 86400);
  auto rate = a.num("rate", 0, 0, 1e8);
  auto meters = a.u64("meters", 0, 1, 100'000'000);
  auto epsem = a.u64("epsem-bytes", 200, 24, 4000);
  auto per_meter = a.u64("per-meter", 0, 1, 1'000'000);
  auto first_id = a.u64("first-id", 1, 1, ids::kMaxInvocationId);
  auto threads = a.u64("threads", 1, 1, 64);
  auto hsm_threads = a.u64("hsm-threads", 1, 1, 64);
  auto hsm_procs = a.u64("hsm-processes", 1, 1, 64);
  auto hsm_secs = a.num("hsm-seconds", 3, 0.1, 3600);
  auto hsm_resident = a.u64("hsm-resident-keys", 0, 0, 1'000'000);
  auto pace = a.u64("pace-us", 1000, 0, 100'000);
  std::string bad;
  auto check = [&bad](const auto& r) {
    if (!r.ok() && bad.empty()) bad = r.error().message();
  };
  check(port), check(conns), check(depth), check(duration), check(rate), check(meters);
  check(epsem), check(per_meter), check(first_id), check(threads), check(hsm_threads);
  check(hsm_procs), check(hsm_secs), check(hsm_resident), check(pace);
  if (!bad.empty()) return usage_error(bad, usage_dkus);
  auto warmup = a.num("warmup", std::min(1.0, *duration / 5), 0, 3600);
  if (!warmup.ok()) return usage_error(warmup.error().message(), usage_dkus);
  auto data_size = reading_data_size(*epsem);
  if (!data_size.ok()) return usage_error(data_size.error().message(), usage_dkus);
  if (a.has("first-id") && !ids::is_interoperable(*first_id)) {
    return usage_error("--first-id: not an id meters issue (its minimal encoding would start "
                       "with 00)", usage_dkus);
  }

  // The raw measurement: the DKUS's process model unless given.
  std::optional<RawHsmOptions> ro;
  if (a.has("hsm-config")) {
    ro.emplace();
    ro->op = RawOp::eax_open;
    ro->config = a.str("hsm-config");
    auto model = dkus_process_model(ro->config);
    if (!model.ok()) return usage_error("--hsm-config: " + model.error().message(), usage_dkus);
    ro->processes = a.has("hsm-processes") ? *hsm_procs : model->first;
    ro->threads = a.has("hsm-threads") ? *hsm_threads : model->second;
    ro->seconds = *hsm_secs;
    ro->epsem_bytes = *epsem;
    ro->resident_keys = *hsm_resident;
  }
  auto print_raw_only = [&](const RawHsmResult& rr) {
    if (a.has("json")) {
      std::printf("{\"scenario\":\"dkus-hsm\",\"raw_hsm\":{\"op\":\"eax_open\",\"per_s\":%.1f,"
                  "\"opens\":%llu,\"threads\":%zu,\"processes\":%zu,\"seconds\":%.1f,"
                  "\"epsem_bytes\":%zu}}\n",
                  rr.per_s, static_cast<unsigned long long>(rr.composites), ro->threads,
                  ro->processes, ro->seconds, ro->epsem_bytes);
    } else {
      std::printf("raw HSM EAX' open (%zu-byte EPSEM, key handle and subkeys cached): %.1f /s  "
                  "(%zu process(es) x %zu thread(s), %.1f s)\n",
                  ro->epsem_bytes, rr.per_s, ro->processes, ro->threads, ro->seconds);
    }
  };
  if (a.has("hsm-only")) {
    if (!ro) return usage_error("--hsm-only needs --hsm-config", usage_dkus);
    auto rr = measure_raw_hsm(*ro);
    if (!rr.ok()) {
      std::fprintf(stderr, "gridseal-bench: raw HSM EAX' open: %s\n", rr.error().message().c_str());
      return 1;
    }
    print_raw_only(*rr);
    return 0;
  }

  if (!a.has("fleet")) return usage_error("--fleet FLEET is required", usage_dkus);
  o.target.port = static_cast<std::uint16_t>(*port);
  if (auto bad_tls = read_tls_target(a, true, o.target); !bad_tls.empty()) {
    return usage_error(bad_tls, usage_dkus);
  }
  o.connections = *conns;
  o.depth = *depth;
  o.duration_s = *duration;
  o.warmup_s = *warmup;
  o.rate = *rate;
  o.pace_tick = std::chrono::microseconds(*pace);
  o.io_threads = std::min<std::size_t>(*threads, o.connections);
  o.progress = !a.has("quiet");
  o.latency_log = a.str("latency-log");
  o.until_done = a.has("until-done");
  o.closed_warmup = true;  // open loop: fill the DKUS's caches first, as fast as it answers

  DkusPlan plan;
  auto called = c1222::OwnedApTitle::parse(a.str("called", ".1.9"));
  if (!called.ok()) return usage_error("--called: " + called.error().message(), usage_dkus);
  plan.called = std::move(called).value();
  plan.data_size = *data_size;
  if (a.has("first-id")) plan.first_counter = ids::counter_for_id(*first_id);
  plan.clock_counter = static_cast<std::uint64_t>(
      std::max<std::int64_t>(0, (std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count() -
                                 kCounterEpochMs) /
                                    100));

  auto fleet = load_fleet(a.str("fleet"), a.has("meters") ? *meters : 0);
  if (!fleet.ok()) {
    std::fprintf(stderr, "gridseal-bench: --fleet: %s\n", fleet.error().message().c_str());
    return 1;
  }
  const std::size_t n_meters = fleet->meters.size();
  if (a.has("meters") && n_meters < *meters) {
    std::fprintf(stderr, "gridseal-bench: --meters %llu: the fleet has only %zu meters\n",
                 static_cast<unsigned long long>(*meters), n_meters);
    return 1;
  }
  if (a.has("store")) {
    auto marks = read_replay_marks(a.str("store"));
    if (!marks.ok()) {
      std::fprintf(stderr, "gridseal-bench: --store %s: %s\n", a.str("store").c_str(),
                   marks.error().message().c_str());
      return 1;
    }
    plan.above_mark.assign(n_meters, 0);
    for (std::size_t i = 0; i < n_meters; ++i) {
      const Bytes abs = fleet->meters[i].title.view().absolute(c1222::default_base_oid());
      auto it = marks->find(std::string(abs.begin(), abs.end()));
      if (it == marks->end()) continue;
      auto c = counter_above(it->second);
      if (!c.ok()) {
        std::fprintf(stderr, "gridseal-bench: meter %s: %s\n",
                     fleet->meters[i].title.dotted().c_str(), c.error().message().c_str());
        return 1;
      }
      plan.above_mark[i] = *c;
    }
  }
  if (n_meters < o.connections) {
    return usage_error("--connections " + std::to_string(o.connections) + " exceeds the " +
                           std::to_string(n_meters) + " meters (each connection owns meters)",
                       usage_dkus);
  }
  plan.connections = o.connections;
  // Enough messages for the whole run at the offered rate (or the closed-loop ceiling; an open
  // loop's warm-up runs closed loop, so at the ceiling too), plus what may be in flight at the end.
  if (a.has("per-meter")) {
    plan.per_meter = *per_meter;
  } else {
    const double planned =
        (o.rate > 0 ? o.rate * 1.05 * (o.duration_s + 0.5) + kClosedLoopCeiling * o.warmup_s
                    : kClosedLoopCeiling * (o.warmup_s + o.duration_s + 0.5)) +
        static_cast<double>(o.connections * o.depth);
    plan.per_meter =
        std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::ceil(
                                       planned / static_cast<double>(n_meters))));
  }

  std::vector<ConnMessages> cms(o.connections);
  for (std::size_t i = 0; i < n_meters; ++i) {
    cms[i % o.connections].meters.push_back(static_cast<std::uint32_t>(i));
  }
  // Size of one sealed message (they differ by a few bytes: title and id lengths).
  {
    ConnMessages probe;
    probe.meters = {0};
    DkusPlan one = plan;
    one.per_meter = 1;
    if (auto st = seal_connection(*fleet, one, probe); !st.ok()) {
      std::fprintf(stderr, "gridseal-bench: sealing: %s\n", st.error().message().c_str());
      return 1;
    }
    const std::uint64_t total = plan.per_meter * n_meters;
    const std::uint64_t bytes = total * (probe.arena.size() + 20);
    if (bytes > kMaxPresealedBytes) {
      std::fprintf(stderr,
                   "gridseal-bench: %llu messages of ~%zu bytes would take %.1f GiB to "
                   "pre-seal; lower --per-meter, --rate or --duration\n",
                   static_cast<unsigned long long>(total), probe.arena.size(),
                   static_cast<double>(bytes) / (1ULL << 30));
      return 1;
    }
    for (ConnMessages& cm : cms) {
      cm.arena.reserve(cm.meters.size() * plan.per_meter * (probe.arena.size() + 2));
    }
  }

  // Seal everything, spread over the cores (the clock has not started).
  const auto seal_t0 = Clock::now();
  const std::uint64_t total_msgs = plan.per_meter * n_meters;
  if (o.progress) {
    std::fprintf(stderr, "pre-sealing %llu messages (%llu per meter, %zu meters) ...\n",
                 static_cast<unsigned long long>(total_msgs),
                 static_cast<unsigned long long>(plan.per_meter), n_meters);
  }
  {
    const std::size_t workers = std::max<std::size_t>(
        1, std::min<std::size_t>(std::thread::hardware_concurrency(), cms.size()));
    std::vector<std::thread> ts;
    std::vector<Status> results(workers);
    std::atomic<std::size_t> next{0};
    for (std::size_t t = 0; t < workers; ++t) {
      ts.emplace_back([&, t] {
        for (std::size_t c = next++; c < cms.size(); c = next++) {
          auto st = seal_connection(*fleet, plan, cms[c]);
          if (!st.ok()) {
            results[t] = st;
            return;
          }
        }
      });
    }
    for (auto& t : ts) t.join();
    for (const Status& st : results) {
      if (!st.ok()) {
        std::fprintf(stderr, "gridseal-bench: sealing: %s\n", st.error().message().c_str());
        return 1;
      }
    }
  }
  const double seal_s = std::chrono::duration<double>(Clock::now() - seal_t0).count();
  std::uint64_t arena_bytes = 0;
  for (const ConnMessages& cm : cms) arena_bytes += cm.arena.size();
  if (o.progress) {
    std::fprintf(stderr, "pre-sealed %llu messages (%.1f MiB) in %.1f s\n",
                 static_cast<unsigned long long>(total_msgs),
                 static_cast<double>(arena_bytes) / (1 << 20), seal_s);
  }

  // Message seq of connection c as sealed (empty past the last one).
  auto message = [&cms](std::size_t c, std::uint64_t seq) -> ByteView {
    const ConnMessages& cm = cms[c];
    if (seq + 1 >= cm.offset.size()) return {};
    return ByteView(cm.arena.data() + cm.offset[seq],
                    static_cast<std::size_t>(cm.offset[seq + 1] - cm.offset[seq]));
  };
  o.request_view = message;
  // Opened = the meter's message in mode 0 from the meter's title with exactly the EPSEM it
  // sealed; a mode-0 single-byte service from another title = that error; else unexpected.
  const bool echo = a.has("echo");
  o.judge_request = [&cms, &fleet, echo, message](std::size_t c, std::uint64_t seq,
                                                  ByteView wire) -> Verdict {
    if (echo) {  // `gridseal-bench echo`: the message itself, byte for byte
      const ByteView sent = message(c, seq);
      return !sent.empty() && std::equal(wire.begin(), wire.end(), sent.begin(), sent.end())
                 ? kVerdictOk
                 : kVerdictUnexpected;
    }
    auto m = c1222::decode(wire);
    if (!m.ok()) return kVerdictMalformed;
    auto e = c1222::split_epsem(m->epsem);
    if (!e.ok()) return kVerdictMalformed;
    const ConnMessages& cm = cms[c];
    const FleetMeter& meter = fleet->meters[cm.meters[seq % cm.meters.size()]];
    const bool from_meter = m->calling_ap_title && m->calling_ap_title->form == meter.title.form &&
                            std::equal(m->calling_ap_title->oid.begin(),
                                       m->calling_ap_title->oid.end(), meter.title.oid.begin(),
                                       meter.title.oid.end());
    if (c1222::security_mode(e->control) != c1222::SecurityMode::cleartext) {
      return kVerdictUnexpected;
    }
    if (from_meter) {
      return fnv1a(m->epsem) == cm.expect[seq] ? kVerdictOk : kVerdictUnexpected;
    }
    auto s = c1222::split_services(e->body);
    if (s.ok() && s->size() == 1 && s->front().bytes.size() == 1) return s->front().bytes[0];
    return kVerdictUnexpected;
  };
  raise_fd_limit(o.connections);

  const double cpu0 = cpu_seconds();
  auto res = run_load(o);
  const double gen_cpu = cpu_seconds() - cpu0;
  if (!res.ok()) {
    std::fprintf(stderr, "gridseal-bench: %s\n", res.error().message().c_str());
    return 1;
  }
  const LoadResult& r = *res;
  const double wall = r.measured_s + o.warmup_s;
  cms.clear();
  cms.shrink_to_fit();

  std::optional<RawHsmResult> raw;
  std::string raw_error;
  if (ro) {
    if (o.progress) {
      std::fprintf(stderr, "raw HSM EAX' open: %zu process(es) x %zu thread(s), %.1f s ...\n",
                   ro->processes, ro->threads, ro->seconds);
    }
    auto rr = measure_raw_hsm(*ro);
    if (rr.ok()) {
      raw = *rr;
    } else {
      raw_error = rr.error().message();
      std::fprintf(stderr, "gridseal-bench: raw HSM EAX' open: %s\n", raw_error.c_str());
    }
  }
  const double ratio = raw && raw->per_s > 0 ? r.ok_per_s() / raw->per_s : 0;
  const std::string mode = o.rate > 0 ? "open loop" : "closed loop";
  const auto sme = r.errors.find("sme");
  const bool replay_hint = sme != r.errors.end() && sme->second > 0;

  if (a.has("json")) {
    std::string errs;
    for (const auto& [k, v] : r.errors) {
      errs += (errs.empty() ? "" : ",") + std::string("\"") + json_escape(k) + "\":" + std::to_string(v);
    }
    std::printf(
        "{\"scenario\":\"dkus\",\"target\":\"%s:%u\",\"tls\":%s,\"connections\":%zu,\"depth\":%zu,"
        "\"mode\":\"%s\",\"until_done\":%s,\"rate_offered\":%.1f,\"duration_s\":%.3f,\"warmup_s\":%.3f,"
        "\"meters\":%zu,\"epsem_bytes\":%llu,\"presealed\":%llu,\"per_meter\":%llu,"
        "\"preseal_s\":%.2f,\"echo\":%s,\"count\":%llu,\"opened_per_s\":%.1f,"
        "\"answered\":%llu,\"errors_total\":%llu,\"errors\":{%s},\"sent\":%llu,"
        "\"unanswered\":%llu,\"late\":%llu,\"exhausted\":%llu,\"connect_failures\":%llu,"
        "\"connection_errors\":%llu,\"connect_s\":%.3f,\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,"
        "\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f},\"generator_cpu_s\":%.2f,"
        "\"generator_cpu_percent\":%.1f",
        json_escape(o.target.host).c_str(), static_cast<unsigned>(o.target.port),
        o.target.plain ? "false" : "true", o.connections, o.depth, mode.c_str(),
        o.until_done ? "true" : "false", o.rate, r.measured_s, o.warmup_s, n_meters, static_cast<unsigned long long>(*epsem),
        static_cast<unsigned long long>(total_msgs),
        static_cast<unsigned long long>(plan.per_meter), seal_s, echo ? "true" : "false",
        static_cast<unsigned long long>(r.ok), r.ok_per_s(),
        static_cast<unsigned long long>(r.answered),
        static_cast<unsigned long long>(r.error_count()), errs.c_str(),
        static_cast<unsigned long long>(r.sent), static_cast<unsigned long long>(r.unanswered),
        static_cast<unsigned long long>(r.late), static_cast<unsigned long long>(r.exhausted),
        static_cast<unsigned long long>(r.connect_failures),
        static_cast<unsigned long long>(r.connection_errors), r.connect_s, r.percentile_ms(0.5),
        r.percentile_ms(0.9), r.percentile_ms(0.99), r.percentile_ms(0.999),
        r.percentile_ms(1.0), gen_cpu, 100.0 * gen_cpu / wall);
    if (raw) {
      std::printf(",\"raw_hsm\":{\"op\":\"eax_open\",\"per_s\":%.1f,\"opens\":%llu,"
                  "\"threads\":%zu,\"processes\":%zu,\"seconds\":%.1f},\"opened_over_raw\":%.3f",
                  raw->per_s, static_cast<unsigned long long>(raw->composites), ro->threads,
                  ro->processes, ro->seconds, ratio);
    } else if (!raw_error.empty()) {
      std::printf(",\"raw_hsm_error\":\"%s\"", json_escape(raw_error).c_str());
    }
    std::printf("}\n");
  } else {
    std::printf("gridseal-bench dkus  %s:%u %s, %zu connections x depth %zu, %s%s\n",
                o.target.host.c_str(), static_cast<unsigned>(o.target.port),
                o.target.plain ? "plain TCP" : "TLS 1.3", o.connections, o.depth, mode.c_str(),
                o.rate > 0 ? (", offered " + std::to_string(static_cast<long>(o.rate)) + "/s").c_str() : "");
    std::printf("  meters %zu (%s), EPSEM %llu bytes, %llu messages pre-sealed in %.1f s\n",
                n_meters, a.str("fleet").c_str(), static_cast<unsigned long long>(*epsem),
                static_cast<unsigned long long>(total_msgs), seal_s);
    std::printf("  %.1f s measured after %.1f s warm-up\n", r.measured_s, o.warmup_s);
    print_load_rows(r, echo ? "echoed messages/s" : "opened messages/s",
                    echo ? "echoed (counted)" : "opened (counted)", o.rate > 0, true, gen_cpu / wall);
    if (raw) {
      std::printf("  %-26s %12.1f /s  (%zu process(es) x %zu thread(s))\n", "raw HSM EAX' open",
                  raw->per_s, ro->processes, ro->threads);
      std::printf("  %-26s %12.2f\n", echo ? "echoed / raw" : "opened / raw", ratio);
    }
  }
  std::fflush(stdout);
  if (r.exhausted > 0) {
    std::fprintf(stderr,
                 "gridseal-bench: %llu connection(s) sent every pre-sealed message before the "
                 "end; raise --per-meter\n",
                 static_cast<unsigned long long>(r.exhausted));
  }
  if (replay_hint) {
    std::fprintf(stderr,
                 "gridseal-bench: sme refusals: see the DKUS log (replay: an earlier run against "
                 "this store used higher ids, pass a higher --first-id; stale: sealed before the "
                 "DKUS started or outside dkus.iv_window_s)\n");
  }
  return (r.ok > 0 && r.error_count() == 0 && r.unanswered == 0 && r.connection_errors == 0 &&
          r.exhausted == 0)
             ? 0
             : 1;
}

}  // namespace gs::bench
