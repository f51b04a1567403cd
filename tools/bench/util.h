// gridseal-bench: small helpers the scenarios share (usage errors, JSON strings, CPU time).
#pragma once

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <string>

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

}  // namespace gs::bench
