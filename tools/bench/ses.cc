// gridseal-bench ses: many connections pipelining ~200-byte read commands (ST-23 full read and
// ST-64 partial reads) to meters PREFIX.1 .. PREFIX.N through gridseal-sesd; secured commands/s,
// latency percentiles, errors by C12.22 response code; optionally the raw HSM composite.
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/services.h"
#include "src/test_pki.h"
#include "tools/bench/args.h"
#include "tools/bench/load.h"
#include "tools/bench/raw_hsm.h"
#include "tools/bench/scenarios.h"
#include "tools/bench/util.h"

namespace gs::bench {

namespace {

std::uint64_t mix64(std::uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

void append_arc(Bytes& oid, std::uint64_t arc) {
  std::uint8_t tmp[10];
  std::size_t n = 0;
  do {
    tmp[n++] = static_cast<std::uint8_t>(arc & 0x7F);
    arc >>= 7;
  } while (arc != 0);
  while (n > 0) {
    --n;
    oid.push_back(static_cast<std::uint8_t>(tmp[n] | (n > 0 ? 0x80 : 0)));
  }
}

// The request EPSEM: control 0x80, a full read of ST-23, then partial reads (offset) of ST-64
// until it is about `target` bytes.
Bytes read_epsem(std::size_t target) {
  Bytes e{0x80};
  c1222::append_service(e, Bytes{0x30, 0x00, 0x17});
  for (std::uint32_t off = 0; e.size() + 9 <= target + 4 && off < 62 * 64; off += 64) {
    c1222::append_service(e, Bytes{0x3F, 0x00, 0x40, static_cast<std::uint8_t>(off >> 16),
                                   static_cast<std::uint8_t>(off >> 8),
                                   static_cast<std::uint8_t>(off), 0x00, 0x40});
  }
  return e;
}

// Builds read requests for random meters of the fleet; stateless, so any thread may call it.
// A sweep (copies > 0) instead sends every meter exactly `copies` times, each copy on another
// of `connections` connections (copies <= connections), then nothing more.
class ReadRequests {
 public:
  ReadRequests(c1222::OwnedApTitle prefix, std::uint64_t meters, std::size_t epsem_bytes,
               c1222::OwnedApTitle calling, std::uint64_t copies, std::uint64_t connections)
      : prefix_(std::move(prefix)), meters_(meters), epsem_(read_epsem(epsem_bytes)),
        calling_(std::move(calling)), copies_(copies), connections_(connections) {}

  Bytes make(std::size_t conn, std::uint64_t seq) const {
    std::uint64_t meter = 0;
    if (copies_ > 0) {
      // Slot j = seq * C + conn, round robin over the connections; slots m*K .. m*K+K-1 are meter
      // m's copies, on K consecutive (so distinct) connections.
      const std::uint64_t slot = seq * connections_ + conn;
      if (slot >= meters_ * copies_) return {};  // this connection's share is sent
      meter = 1 + slot / copies_;
    } else {
      meter = 1 + mix64((static_cast<std::uint64_t>(conn) << 40) ^ seq) % meters_;
    }
    Bytes title = prefix_.oid;
    append_arc(title, meter);
    c1222::Message m;
    m.called_ap_title = c1222::ApTitle{prefix_.form, title};
    m.calling_ap_title = calling_.view();
    // Request invocation id: 1..0x7FFFFF, minimal, positive.
    const auto id = static_cast<std::uint32_t>(1 + (seq % 0x7FFFFF));
    std::uint8_t a8[4];
    std::size_t n = 0;
    for (int shift = 16; shift >= 0; shift -= 8) {
      const auto b = static_cast<std::uint8_t>(id >> shift);
      if (n > 0 || b != 0 || shift == 0) a8[n++] = b;
    }
    Bytes a8v(a8, a8 + n);
    if ((a8v[0] & 0x80) != 0) a8v.insert(a8v.begin(), 0);
    m.calling_ap_invocation_id = ByteView(a8v);
    m.epsem = epsem_;
    auto wire = c1222::encode(m);
    GS_CHECK(wire.ok());
    return std::move(wire).value();
  }
  std::size_t epsem_size() const { return epsem_.size(); }

 private:
  c1222::OwnedApTitle prefix_;
  std::uint64_t meters_;
  Bytes epsem_;
  c1222::OwnedApTitle calling_;
  std::uint64_t copies_;
  std::uint64_t connections_;
};

// Secured (mode 1/2) = ok; a mode-0 single-byte service = that error code; else malformed.
Verdict judge_secured(ByteView wire) {
  auto m = c1222::decode(wire);
  if (!m.ok()) return kVerdictMalformed;
  auto e = c1222::split_epsem(m->epsem);
  if (!e.ok()) return kVerdictMalformed;
  if (c1222::security_mode(e->control) != c1222::SecurityMode::cleartext) return kVerdictOk;
  auto s = c1222::split_services(e->body);
  if (s.ok() && s->size() == 1 && s->front().bytes.size() == 1) return s->front().bytes[0];
  return kVerdictMalformed;
}

}  // namespace

void usage_ses() {
  std::fprintf(stderr,
      "usage: gridseal-bench ses --host ADDR --port P (--plain | --ca F --cert F --key F)\n"
      "         [--connections C] [--depth D] [--duration S] [--warmup S] [--rate R/s]\n"
      "         --meters N [--title-prefix .7] [--epsem-bytes 200] [--calling .1.9]\n"
      "         [--threads T] [--sweep K] [--json] [--quiet] [--latency-log FILE]\n"
      "         [--hsm-config ses.toml [--hsm-threads 2] [--hsm-processes 1] [--hsm-seconds 3]\n"
      "          [--hsm-resident-keys K] [--hsm-only]]\n"
      "  Each of C connections keeps D read commands in flight (closed loop), or the total offered\n"
      "  load is paced at R requests/s (open loop: the warm-up runs closed loop to fill the SES's\n"
      "  caches, its last second adding nothing so that its backlog is answered; latency counts\n"
      "  from each command's intended send time in the measured part). --pace-us: the open\n"
      "  loop's tick: each generator thread wakes that often and sends what fell due (0: a timer\n"
      "  per connection, a wake-up per command); the tick's delay is in the latency figures.\n"
      "  --sweep K: instead, every meter exactly K times (1..C), each copy on another connection,\n"
      "  and the run ends when all are answered (or at --duration): warms the SES's key and\n"
      "  meter caches for a measured run; connections land on workers by the kernel's hash, so\n"
      "  K of them reach every worker for nearly every meter.\n"
      "  Meters PREFIX.1..PREFIX.N must be imported in the daemon's store. Prints a progress line\n"
      "  each second on stderr (not with --quiet) and a table, or one JSON object with --json.\n"
      "  --threads: event-loop threads of the generator (default 1). --hsm-config also\n"
      "  measures the raw HSM composite (ECDSA sign + EAX' seal) on that token after the load and\n"
      "  prints secured/raw (--hsm-only: that measurement alone, no load; --hsm-resident-keys: K\n"
      "  more meter keys held in each session first, as a warm SES key cache holds them).\n"
      "  --latency-log FILE: one line per counted command, its intended send time (s from the\n"
      "  start of the measured part) and its latency (ms), in send order.\n"
      "  Exit 1 when no command was secured or any error was seen.\n");
}

int run_ses(int argc, char** argv) {
  Args a;
  for (const char* v : {"host", "port", "ca", "cert", "key", "connections", "depth", "duration",
                        "warmup", "rate", "meters", "title-prefix", "epsem-bytes", "threads",
                        "hsm-config", "hsm-threads", "hsm-processes", "hsm-seconds", "hsm-resident-keys",
                        "calling", "sweep", "latency-log", "pace-us"}) {
    a.value(v);
  }
  a.flag("plain").flag("json").flag("quiet").flag("hsm-only");
  if (auto st = a.parse(argc, argv); !st.ok()) return usage_error(st.error().message(), usage_ses);
  if (!a.positional().empty()) return usage_error("unexpected " + a.positional()[0], usage_ses);

  LoadOptions o;
  o.target.host = a.str("host", "127.0.0.1");
  auto port = a.u64("port", 1153, 1, 65535);
  auto conns = a.u64("connections", 16, 1, 100000);
  auto depth = a.u64("depth", 8, 1, 4096);
  auto duration = a.num("duration", 10, 0.1, 86400);
  auto rate = a.num("rate", 0, 0, 1e8);
  auto meters = a.u64("meters", 1, 1, 100'000'000);
  auto epsem = a.u64("epsem-bytes", 200, 16, 600);
  auto threads = a.u64("threads", 1, 1, 64);
  auto hsm_threads = a.u64("hsm-threads", 2, 1, 64);
  auto hsm_procs = a.u64("hsm-processes", 1, 1, 64);
  auto hsm_secs = a.num("hsm-seconds", 3, 0.1, 3600);
  auto hsm_resident = a.u64("hsm-resident-keys", 0, 0, 1'000'000);
  auto sweep = a.u64("sweep", 0, 1, 4096);
  auto pace = a.u64("pace-us", 1000, 0, 100'000);
  std::string bad;
  auto check = [&bad](const auto& r) {
    if (!r.ok() && bad.empty()) bad = r.error().message();
  };
  check(port), check(conns), check(depth), check(duration), check(rate), check(meters);
  check(epsem), check(threads), check(hsm_threads), check(hsm_procs), check(hsm_secs);
  check(hsm_resident), check(sweep), check(pace);
  if (!bad.empty()) return usage_error(bad, usage_ses);
  if (a.has("sweep") && (*sweep > *conns || a.has("rate"))) {
    return usage_error("--sweep K needs K <= --connections and no --rate", usage_ses);
  }
  if (!a.has("meters") && !a.has("hsm-only")) {
    return usage_error("--meters N is required", usage_ses);
  }
  auto warmup = a.num("warmup", std::min(1.0, *duration / 5), 0, 3600);
  if (!warmup.ok()) return usage_error(warmup.error().message(), usage_ses);
  o.target.port = static_cast<std::uint16_t>(*port);
  if (auto bad_tls = read_tls_target(a, !a.has("hsm-only"), o.target); !bad_tls.empty()) {
    return usage_error(bad_tls, usage_ses);
  }
  o.connections = *conns;
  o.depth = *depth;
  o.duration_s = *duration;
  o.warmup_s = *warmup;
  o.rate = *rate;
  o.pace_tick = std::chrono::microseconds(*pace);
  o.closed_warmup = true;  // open loop: fill the SES's caches first, as fast as it answers
  o.io_threads = std::min<std::size_t>(*threads, o.connections);
  o.progress = !a.has("quiet");
  o.latency_log = a.str("latency-log");

  auto prefix = c1222::OwnedApTitle::parse(a.str("title-prefix", ".7"));
  if (!prefix.ok()) return usage_error("--title-prefix: " + prefix.error().message(), usage_ses);
  auto calling = c1222::OwnedApTitle::parse(a.str("calling", ".1.9"));
  if (!calling.ok()) return usage_error("--calling: " + calling.error().message(), usage_ses);
  const ReadRequests requests(*prefix, *meters, *epsem, *calling, *sweep, o.connections);
  o.until_done = *sweep > 0;
  o.make_request = [&requests](std::size_t c, std::uint64_t s) { return requests.make(c, s); };
  o.judge = judge_secured;

  raise_fd_limit(o.connections);

  if (a.has("hsm-only")) {
    if (!a.has("hsm-config")) return usage_error("--hsm-only needs --hsm-config", usage_ses);
    RawHsmOptions ro;
    ro.config = a.str("hsm-config");
    ro.threads = *hsm_threads;
    ro.processes = *hsm_procs;
    ro.seconds = *hsm_secs;
    ro.epsem_bytes = *epsem;
    ro.resident_keys = *hsm_resident;
    auto rr = measure_raw_hsm(ro);
    if (!rr.ok()) {
      std::fprintf(stderr, "gridseal-bench: raw HSM composite: %s\n", rr.error().message().c_str());
      return 1;
    }
    if (a.has("json")) {
      std::printf("{\"scenario\":\"ses-hsm\",\"raw_hsm\":{\"per_s\":%.1f,\"composites\":%llu,"
                  "\"threads\":%zu,\"processes\":%zu,\"seconds\":%.1f}}\n",
                  rr->per_s, static_cast<unsigned long long>(rr->composites), ro.threads,
                  ro.processes, ro.seconds);
    } else {
      std::printf("raw HSM composite (ECDSA sign + EAX' seal of %zu bytes): %.1f /s  "
                  "(%zu process(es) x %zu thread(s), %.1f s)\n",
                  ro.epsem_bytes, rr->per_s, ro.processes, ro.threads, ro.seconds);
    }
    return 0;
  }

  const double cpu0 = cpu_seconds();
  auto res = run_load(o);
  const double gen_cpu = cpu_seconds() - cpu0;
  if (!res.ok()) {
    std::fprintf(stderr, "gridseal-bench: %s\n", res.error().message().c_str());
    return 1;
  }
  const LoadResult& r = *res;
  const double wall = r.measured_s + o.warmup_s;

  std::optional<RawHsmResult> raw;
  std::string raw_error;
  if (a.has("hsm-config")) {
    RawHsmOptions ro;
    ro.config = a.str("hsm-config");
    ro.threads = *hsm_threads;
    ro.processes = *hsm_procs;
    ro.seconds = *hsm_secs;
    ro.epsem_bytes = *epsem;
    ro.resident_keys = *hsm_resident;
    if (o.progress) {
      std::fprintf(stderr, "raw HSM composite: %zu process(es) x %zu thread(s), %.1f s ...\n",
                   ro.processes, ro.threads, ro.seconds);
    }
    auto rr = measure_raw_hsm(ro);
    if (rr.ok()) {
      raw = *rr;
    } else {
      raw_error = rr.error().message();
      std::fprintf(stderr, "gridseal-bench: raw HSM composite: %s\n", raw_error.c_str());
    }
  }
  const double ratio = raw && raw->per_s > 0 ? r.ok_per_s() / raw->per_s : 0;
  const std::string mode = o.rate > 0 ? "open loop" : *sweep > 0 ? "sweep" : "closed loop";

  if (a.has("json")) {
    std::string errs;
    for (const auto& [k, v] : r.errors) {
      errs += (errs.empty() ? "" : ",") + std::string("\"") + json_escape(k) + "\":" + std::to_string(v);
    }
    std::printf(
        "{\"scenario\":\"ses\",\"target\":\"%s:%u\",\"tls\":%s,\"connections\":%zu,\"depth\":%zu,"
        "\"mode\":\"%s\",\"sweep\":%llu,\"rate_offered\":%.1f,\"duration_s\":%.3f,\"warmup_s\":%.3f,"
        "\"meters\":%llu,\"epsem_bytes\":%zu,\"count\":%llu,\"secured_per_s\":%.1f,"
        "\"answered\":%llu,\"errors_total\":%llu,\"errors\":{%s},\"sent\":%llu,"
        "\"unanswered\":%llu,\"late\":%llu,\"connect_failures\":%llu,\"connection_errors\":%llu,"
        "\"connect_s\":%.3f,\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,"
        "\"p999\":%.3f,\"max\":%.3f},\"generator_cpu_s\":%.2f,\"generator_cpu_percent\":%.1f",
        json_escape(o.target.host).c_str(), static_cast<unsigned>(o.target.port),
        o.target.plain ? "false" : "true", o.connections, o.depth, mode.c_str(),
        static_cast<unsigned long long>(*sweep), o.rate,
        r.measured_s, o.warmup_s, static_cast<unsigned long long>(*meters),
        requests.epsem_size(), static_cast<unsigned long long>(r.ok), r.ok_per_s(),
        static_cast<unsigned long long>(r.answered),
        static_cast<unsigned long long>(r.error_count()), errs.c_str(),
        static_cast<unsigned long long>(r.sent), static_cast<unsigned long long>(r.unanswered),
        static_cast<unsigned long long>(r.late), static_cast<unsigned long long>(r.connect_failures),
        static_cast<unsigned long long>(r.connection_errors), r.connect_s, r.percentile_ms(0.5),
        r.percentile_ms(0.9), r.percentile_ms(0.99), r.percentile_ms(0.999),
        r.percentile_ms(1.0), gen_cpu, 100.0 * gen_cpu / wall);
    if (raw) {
      std::printf(",\"raw_hsm\":{\"per_s\":%.1f,\"composites\":%llu,\"threads\":%llu,"
                  "\"processes\":%llu,\"seconds\":%.1f},\"secured_over_raw\":%.3f",
                  raw->per_s, static_cast<unsigned long long>(raw->composites),
                  static_cast<unsigned long long>(*hsm_threads),
                  static_cast<unsigned long long>(*hsm_procs), *hsm_secs, ratio);
    } else if (!raw_error.empty()) {
      std::printf(",\"raw_hsm_error\":\"%s\"", json_escape(raw_error).c_str());
    }
    std::printf("}\n");
  } else {
    std::printf("gridseal-bench ses  %s:%u %s, %zu connections x depth %zu, %s%s\n",
                o.target.host.c_str(), static_cast<unsigned>(o.target.port),
                o.target.plain ? "plain TCP" : "TLS 1.3", o.connections, o.depth, mode.c_str(),
                o.rate > 0 ? (", offered " + std::to_string(static_cast<long>(o.rate)) + "/s").c_str() : "");
    std::printf("  meters %llu (%s.1..), EPSEM %zu bytes, %.1f s measured after %.1f s warm-up\n",
                static_cast<unsigned long long>(*meters), a.str("title-prefix", ".7").c_str(),
                requests.epsem_size(), r.measured_s, o.warmup_s);
    print_load_rows(r, "secured commands/s", "secured (counted)", o.rate > 0, false,
                    gen_cpu / wall);
    if (raw) {
      std::printf("  %-26s %12.1f /s  (%llu process(es) x %llu thread(s))\n", "raw HSM composite",
                  raw->per_s, static_cast<unsigned long long>(*hsm_procs),
                  static_cast<unsigned long long>(*hsm_threads));
      std::printf("  %-26s %12.2f\n", "secured / raw", ratio);
    }
  }
  std::fflush(stdout);
  return (r.ok > 0 && r.error_count() == 0 && r.unanswered == 0 && r.connection_errors == 0) ? 0
                                                                                              : 1;
}

// ---- set-up helpers ---------------------------------------------------------------------------

void usage_make_pki() {
  std::fprintf(stderr,
               "usage: gridseal-bench make-pki DIR [--client-cn NAME]\n"
               "  Writes ca.pem, server.pem/.key (SAN 127.0.0.1, ::1, localhost) and client.pem/.key\n"
               "  (subject CN=NAME,O=gridseal test; default head-end-test). Tests only.\n");
}

int run_make_pki(int argc, char** argv) {
  Args a;
  a.value("client-cn");
  if (auto st = a.parse(argc, argv); !st.ok()) return usage_error(st.error().message(), usage_make_pki);
  if (a.positional().size() != 1) return usage_error("DIR is required", usage_make_pki);
  pki::TestPkiOptions po;
  po.client_cn = a.str("client-cn", po.client_cn);
  auto p = pki::make_test_pki(a.positional()[0], po);
  if (!p.ok()) {
    std::fprintf(stderr, "gridseal-bench: %s\n", p.error().message().c_str());
    return 1;
  }
  std::printf("ca %s\nserver %s %s\nclient %s %s (subject CN=%s,O=%s)\n", p->ca_cert.c_str(),
              p->server_cert.c_str(), p->server_key.c_str(), p->client_cert.c_str(),
              p->client_key.c_str(), po.client_cn.c_str(), po.organization.c_str());
  return 0;
}

void usage_make_fleet() {
  std::fprintf(stderr,
               "usage: gridseal-bench make-fleet --meters N [--title-prefix .7] [--out FILE]\n"
               "  A fleet CSV (meter_id,ap_title,ecc_public_key,key_slot,key) of meters B1..BN at\n"
               "  PREFIX.1..PREFIX.N with generated plain keys, for `gridseal meters import`.\n");
}

int run_make_fleet(int argc, char** argv) {
  Args a;
  a.value("meters").value("title-prefix").value("out");
  if (auto st = a.parse(argc, argv); !st.ok()) return usage_error(st.error().message(), usage_make_fleet);
  auto n = a.u64("meters", 0, 1, 100'000'000);
  if (!n.ok() || !a.has("meters")) return usage_error("--meters N is required", usage_make_fleet);
  const std::string prefix = a.str("title-prefix", ".7");
  if (!c1222::OwnedApTitle::parse(prefix).ok()) return usage_error("bad --title-prefix", usage_make_fleet);
  std::ofstream file;
  if (a.has("out")) {
    file.open(a.str("out"));
    if (!file) return usage_error("cannot write " + a.str("out"), usage_make_fleet);
  }
  std::ostream& out = a.has("out") ? static_cast<std::ostream&>(file) : std::cout;
  out << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
  char key[33];
  for (std::uint64_t i = 1; i <= *n; ++i) {
    std::snprintf(key, sizeof key, "%016llx%016llx",
                  static_cast<unsigned long long>(mix64(i)),
                  static_cast<unsigned long long>(mix64(~i)));
    out << 'B' << i << ',' << prefix << '.' << i << ",,0,plain:" << key << '\n';
  }
  out.flush();
  return out ? 0 : 1;
}

}  // namespace gs::bench
