// Test helper: runs a shell command line (the real gridseal binaries) and captures its output.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace gs::test {

struct CmdResult {
  int code = -1;    // exit status, -1 when killed by a signal or not started
  std::string out;  // stdout and stderr
};

inline CmdResult run_command(const std::string& command_line) {
  CmdResult r;
  FILE* p = popen((command_line + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// `gridseal ARGS` from the build's bin directory.
inline CmdResult run_gridseal(const std::string& args) {
  return run_command(std::string(GS_BIN_DIR) + "/gridseal " + args);
}

}  // namespace gs::test
