// Helpers every `gridseal` command shares (commands.h).
#include <cstdio>
#include <ctime>

#include "tools/gridseal/commands.h"

namespace gs::cli {

int fail(const std::string& what) {
  std::fprintf(stderr, "gridseal: %s\n", what.c_str());
  return kExitFailed;
}

std::int64_t now_s() { return static_cast<std::int64_t>(std::time(nullptr)); }

std::string utc(std::int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  if (gmtime_r(&tt, &tm) == nullptr) return std::to_string(t);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string error_text(const Error& e) { return e.detail.empty() ? e.message() : e.detail; }

}  // namespace gs::cli
