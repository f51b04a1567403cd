// gridseal-bench: small helpers the scenarios share (usage errors, JSON strings, CPU time).
#pragma once

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "tools/bench/load.h"

namespace gs::bench {

// Prints "gridseal-bench: <what>" and the usage; the exit code of a usage error.
inline int usage_error(const std::string& what, void (*usage)()) {
  std::fprintf(stderr, "gridseal-bench: %s\n", what.c_str());
  usage();
  return 2;
}

// The content of a JSON string (quotes and backslashes escaped, control characters dropped).
inline std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    o += c;
  }
  return o;
}

// CPU seconds (user + system) this process has used.
inline double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// Raises the soft limit on open files to hold `connections` sockets and some more.
inline void raise_fd_limit(std::size_t connections) {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < connections + 64) {
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, connections + 64);
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// The rows of a load run's human table that every scenario prints: rate, count, latency
// percentiles, errors by code, unanswered, connection trouble, lateness (open loop), generator CPU.
inline void print_load_rows(const LoadResult& r, const char* rate_label, const char* count_label,
                            bool open_loop, bool show_exhausted, double cpu_share) {
  const auto u = [](std::uint64_t v) { return static_cast<unsigned long long>(v); };
  std::printf("  %-26s %12.1f\n", rate_label, r.ok_per_s());
  std::printf("  %-26s %12llu\n", count_label, u(r.ok));
  std::printf("  %-26s %12.3f ms\n", "latency p50", r.percentile_ms(0.5));
  std::printf("  %-26s %12.3f ms\n", "latency p99", r.percentile_ms(0.99));
  std::printf("  %-26s %12.3f ms\n", "latency p999", r.percentile_ms(0.999));
  std::printf("  %-26s %12.3f ms\n", "latency max", r.percentile_ms(1.0));
  std::printf("  %-26s %12llu\n", "errors", u(r.error_count()));
  for (const auto& [k, v] : r.errors) std::printf("    %-24s %12llu\n", k.c_str(), u(v));
  std::printf("  %-26s %12llu\n", "unanswered", u(r.unanswered));
  std::printf("  %-26s %12llu\n", "connect failures", u(r.connect_failures));
  std::printf("  %-26s %12llu\n", "connections lost", u(r.connection_errors));
  if (show_exhausted) std::printf("  %-26s %12llu\n", "connections ran out", u(r.exhausted));
  if (open_loop) std::printf("  %-26s %12llu\n", "sent > 1 ms late", u(r.late));
  std::printf("  %-26s %12.1f %%  (of one core; shares the machine with the daemon)\n",
              "generator CPU", 100.0 * cpu_share);
}

}  // namespace gs::bench
