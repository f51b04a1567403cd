// gridseal-bench: command-line reader (see args.h).
#include "tools/bench/args.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace gs::bench {

Status Args::parse(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) {
      positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2);
    std::optional<std::string> inline_value;
    if (auto eq = name.find('='); eq != std::string::npos) {
      inline_value = name.substr(eq + 1);
      name.resize(eq);
    }
    if (flags_.count(name) != 0) {
      if (inline_value) return Error(Errc::invalid_argument, "--" + name + " takes no value");
      got_[name] = "1";
    } else if (values_.count(name) != 0) {
      if (inline_value) {
        got_[name] = *inline_value;
      } else if (i + 1 < argc) {
        got_[name] = argv[++i];
      } else {
        return Error(Errc::invalid_argument, "--" + name + " needs a value");
      }
    } else {
      return Error(Errc::invalid_argument, "unknown option --" + name);
    }
  }
  return {};
}

std::string Args::str(const std::string& name, const std::string& def) const {
  auto it = got_.find(name);
  return it == got_.end() ? def : it->second;
}

Result<std::uint64_t> Args::u64(const std::string& name, std::uint64_t def, std::uint64_t lo,
                                std::uint64_t hi) const {
  auto it = got_.find(name);
  if (it == got_.end()) return def;
  const std::string& s = it->second;
  errno = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || s[0] == '-' || errno != 0 || end == nullptr || *end != '\0' || v < lo ||
      v > hi) {
    return Error(Errc::invalid_argument, "--" + name + ": expected an integer in " +
                                             std::to_string(lo) + ".." + std::to_string(hi));
  }
  return static_cast<std::uint64_t>(v);
}

Result<double> Args::num(const std::string& name, double def, double lo, double hi) const {
  auto it = got_.find(name);
  if (it == got_.end()) return def;
  std::string s = it->second;
  if (s.size() > 2 && s.compare(s.size() - 2, 2, "/s") == 0) s.resize(s.size() - 2);  // "500/s"
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || errno != 0 || end == nullptr || *end != '\0' || !std::isfinite(v) || v < lo ||
      v > hi) {
    return Error(Errc::invalid_argument, "--" + name + ": expected a number in " +
                                             std::to_string(lo) + ".." + std::to_string(hi));
  }
  return v;
}

}  // namespace gs::bench
