// Test helper: runs a shell command line (the real gridseal binaries) and captures its output.
#pragma once

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

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

// Starts `gridseal ARGS` from the build's bin directory in a child process, its output to
// /dev/null, without waiting: for tests that kill it mid-way. The child's pid (-1 when fork
// failed).
inline pid_t spawn_gridseal(const std::vector<std::string>& args) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  const std::string bin = std::string(GS_BIN_DIR) + "/gridseal";
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(bin.c_str()));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const int devnull = ::open("/dev/null", O_WRONLY);
  dup2(devnull, 1);
  dup2(devnull, 2);
  execv(bin.c_str(), argv.data());
  _exit(127);
}

}  // namespace gs::test
