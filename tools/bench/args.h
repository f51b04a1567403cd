// gridseal-bench: a small "--name value" / "--flag" command-line reader shared by the scenarios.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "gridseal/result.h"

namespace gs::bench {

// Options of one subcommand. Every option must be declared (value or flag) before parse(), so a
// typo is an error naming it.
class Args {
 public:
  Args& value(const std::string& name) {
    values_.insert(name);
    return *this;
  }
  Args& flag(const std::string& name) {
    flags_.insert(name);
    return *this;
  }
  // argv[0] is the first option (the subcommand name already consumed).
  Status parse(int argc, char** argv);

  bool has(const std::string& name) const { return got_.count(name) != 0; }
  std::string str(const std::string& name, const std::string& def = "") const;
  // Integers and decimals with bounds; errors name the option.
  Result<std::uint64_t> u64(const std::string& name, std::uint64_t def, std::uint64_t lo,
                            std::uint64_t hi) const;
  Result<double> num(const std::string& name, double def, double lo, double hi) const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::set<std::string> values_, flags_;
  std::map<std::string, std::string> got_;
  std::vector<std::string> positional_;
};

}  // namespace gs::bench
