// Test helper: one gridseal daemon (or the meter simulator) run in its own process group with
// stdout/stderr in files; started until its "listening on ADDR:PORT" line appears (bounded),
// stopped by SIGTERM (bounded), the whole group killed when it does not stop or on kill_group().
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gridseal/result.h"

namespace gs::test {

inline std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The port in "<what>ADDR:PORT" (ADDR may be an IPv6 literal: the last ':' before the port).
inline std::optional<std::uint16_t> port_after(const std::string& out, const std::string& what) {
  const auto at = out.find(what);
  if (at == std::string::npos) return std::nullopt;
  const auto start = at + what.size();
  const auto end = out.find_first_of(" ,()\n", start);
  const std::string addr = out.substr(start, end == std::string::npos ? end : end - start);
  const auto colon = addr.rfind(':');
  if (colon == std::string::npos || colon + 1 >= addr.size()) return std::nullopt;
  try {
    const int p = std::stoi(addr.substr(colon + 1));
    if (p <= 0 || p > 65535) return std::nullopt;
    return static_cast<std::uint16_t>(p);
  } catch (...) {
    return std::nullopt;
  }
}

class DaemonProcess {
 public:
  DaemonProcess() = default;
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;
  ~DaemonProcess() { stop(); }

  // argv[0] is the binary. stdout goes to out_path (truncated), stderr to err_path (appended
  // when append_err, so the logs of restarts stay together).
  Status start(const std::vector<std::string>& argv, const std::string& out_path,
               const std::string& err_path, std::chrono::milliseconds timeout,
               bool append_err = false) {
    if (pid_ > 0) return Error(Errc::invalid_argument, "already running");
    out_ = out_path;
    err_ = err_path;
    port_ = 0;
    metrics_port_ = 0;
    std::filesystem::remove(out_);
    std::fflush(nullptr);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_ = fork();
    if (pid_ < 0) return Error(Errc::os_failure, "fork failed");
    if (pid_ == 0) {
      setpgid(0, 0);
      if (std::freopen(out_.c_str(), "w", stdout) == nullptr ||
          std::freopen(err_.c_str(), append_err ? "a" : "w", stderr) == nullptr) {
        _exit(126);
      }
      execv(args[0], args.data());
      _exit(127);
    }
    setpgid(pid_, pid_);  // either side may win the race; both set the same group
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const std::string out = read_text(out_);
      const auto at = out.find("listening on ");
      if (at != std::string::npos && out.find('\n', at) != std::string::npos) {
        if (auto p = port_after(out, "listening on ")) {
          port_ = *p;
          metrics_port_ = port_after(out, "metrics on ").value_or(0);
          return {};
        }
      }
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return Error(Errc::invalid_argument, "daemon exited: " + err_log());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill_group();
    return Error(Errc::busy, "daemon did not start: " + err_log());
  }

  // SIGTERM and a bounded wait for the exit; the exit code, or -1 when it had to be killed (the
  // whole process group then) or was not running. Anything of the group still alive after the
  // main process exited is killed (it would be a bug; it must not outlive the test).
  int stop(std::chrono::milliseconds timeout = std::chrono::milliseconds(15000)) {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int st = 0;
    while (std::chrono::steady_clock::now() < deadline) {
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        const pid_t group = pid_;
        pid_ = -1;
        if (kill(-group, 0) == 0) kill(-group, SIGKILL);
        return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill_group();
    return -1;
  }

  // kill -9 of the process and all of its group at once, reaped; waits (bounded) until no
  // member of the group is left.
  void kill_group() {
    if (pid_ <= 0) return;
    kill(-pid_, SIGKILL);
    kill(pid_, SIGKILL);
    int st = 0;
    waitpid(pid_, &st, 0);
    for (int i = 0; i < 500 && kill(-pid_, 0) == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
  }

  bool running() {
    if (pid_ <= 0) return false;
    int st = 0;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }

  pid_t pid() const { return pid_; }
  std::uint16_t port() const { return port_; }
  std::uint16_t metrics_port() const { return metrics_port_; }
  std::string err_log() const { return read_text(err_); }
  std::string out_log() const { return read_text(out_); }

 private:
  pid_t pid_ = -1;
  std::uint16_t port_ = 0;
  std::uint16_t metrics_port_ = 0;
  std::string out_, err_;
};

}  // namespace gs::test
