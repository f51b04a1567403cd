// Supervisor and worker control channel: see supervisor.h.
#include "src/supervisor.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#ifdef GS_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>

#include "gridseal/thread_name.h"
#endif

namespace gs::supervisor {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// ---- control channel framing: type (1) | sequence (4, LE) | length (4, LE) | payload --------

constexpr std::size_t kHeader = 9;
constexpr std::uint32_t kMaxPayload = 16U << 20;  // metrics text of one worker

constexpr char kReady = 'R';
constexpr char kMetricsQuery = 'm';
constexpr char kMetricsReply = 'M';
constexpr char kHealthQuery = 'h';
constexpr char kHealthReply = 'H';

struct Frame {
  char type = 0;
  std::uint32_t seq = 0;
  std::string payload;
};

void put32(std::uint8_t* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

std::uint32_t get32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

bool write_all(int fd, const void* data, std::size_t n) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

bool send_frame(int fd, char type, std::uint32_t seq, const std::string& payload) {
  std::uint8_t h[kHeader];
  h[0] = static_cast<std::uint8_t>(type);
  put32(h + 1, seq);
  put32(h + 5, static_cast<std::uint32_t>(payload.size()));
  return write_all(fd, h, kHeader) && write_all(fd, payload.data(), payload.size());
}

// Reads exactly n bytes, waiting at most until `deadline` (no deadline: block).
bool read_exact(int fd, void* out, std::size_t n, const Clock::time_point* deadline) {
  auto* p = static_cast<std::uint8_t*>(out);
  while (n > 0) {
    if (deadline != nullptr) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*deadline -
                                                                              Clock::now());
      if (left.count() <= 0) return false;
      pollfd pfd{fd, POLLIN, 0};
      int r = ::poll(&pfd, 1, static_cast<int>(left.count()));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
    }
    ssize_t got = ::read(fd, p, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<std::size_t>(got);
  }
  return true;
}

bool read_frame(int fd, Frame& f, const Clock::time_point* deadline) {
  std::uint8_t h[kHeader];
  if (!read_exact(fd, h, kHeader, deadline)) return false;
  f.type = static_cast<char>(h[0]);
  f.seq = get32(h + 1);
  const std::uint32_t len = get32(h + 5);
  if (len > kMaxPayload) return false;
  f.payload.resize(len);
  return len == 0 || read_exact(fd, f.payload.data(), len, deadline);
}

void notify(const char* state) {
#ifdef GS_HAVE_SYSTEMD
  sd_notify(0, state);
#else
  (void)state;
#endif
}

// ---- supervisor --------------------------------------------------------------------------------

enum class State { stopped, starting, ready };

struct Worker {
  std::size_t index = 0;
  std::mutex mu;  // fd and seq, for whoever queries the worker
  pid_t pid = 0;
  int fd = -1;
  State state = State::stopped;
  std::uint32_t seq = 0;
  Clock::time_point started{};
  Clock::time_point restart_at{};
  Clock::time_point last_answer{};
  unsigned quick_failures = 0;
  std::string health_detail;  // "" when the last health answer was ok
  bool health_ok = false;
};

// Asks a ready worker one question; the answer payload, or an error. Stale answers (sequence of
// an earlier query that timed out) are skipped.
Result<std::string> query(Worker& w, char type, char reply, std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(w.mu);
  if (w.state != State::ready || w.fd < 0) return Error(Errc::not_found, "not running");
  const std::uint32_t seq = ++w.seq;
  if (!send_frame(w.fd, type, seq, {})) return Error(Errc::os_failure, "control channel closed");
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    Frame f;
    if (!read_frame(w.fd, f, &deadline)) return Error(Errc::busy, "no answer");
    if (f.seq == seq && f.type == reply) return std::move(f.payload);
  }
}

class Supervisor {
 public:
  explicit Supervisor(const Options& o) : opt_(o), registry_() {
    for (std::size_t i = 0; i < o.processes; ++i) {
      auto w = std::make_unique<Worker>();
      w->index = i;
      workers_.push_back(std::move(w));
    }
    argv0_ = o.argv0;
    if (argv0_.empty()) {
      char buf[4096];
      const ssize_t n = ::readlink(o.exe.c_str(), buf, sizeof buf - 1);
      argv0_ = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : o.exe;
    }
    restarts_ = &registry_.counter("gridseal_worker_restarts_total",
                                   "Worker processes restarted after they died");
    registry_.gauge_fn("gridseal_workers_ready", "Worker processes serving requests", {}, [this] {
      double n = 0;
      for (auto& w : workers_) {
        std::lock_guard<std::mutex> lock(w->mu);
        if (w->state == State::ready) n += 1;
      }
      return n;
    });
  }

  int run();

 private:
  void log(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
  bool spawn(Worker& w);
  void reap();
  void on_ready_message(Worker& w);
  void begin_shutdown();
  void reload();
  void health_loop();
  std::string expose();
  metrics::Health health();

  const Options& opt_;
  metrics::Registry registry_;
  metrics::Counter* restarts_ = nullptr;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::string argv0_;
  bool all_ready_once_ = false;
  bool stopping_ = false;
  bool failed_ = false;
  Clock::time_point stop_deadline_{};
  std::atomic<bool> monitor_stop_{false};
  std::mutex monitor_mu_;
  std::condition_variable monitor_cv_;
};

void Supervisor::log(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "%s: %s\n", opt_.name.c_str(), buf);
}

bool Supervisor::spawn(Worker& w) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    log("worker %zu: socketpair: %s", w.index, std::strerror(errno));
    return false;
  }
  // Everything the child needs is built before fork: after it only async-signal-safe calls.
  std::vector<std::string> args;
  args.push_back(argv0_);
  for (const auto& a : opt_.worker_args) args.push_back(a);
  args.push_back("--worker");
  args.push_back(std::to_string(w.index));
  args.push_back("--control-fd");
  args.push_back(std::to_string(sv[1]));
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env = worker_environment(::environ, opt_.worker_env_defaults);
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<int> keep = opt_.inherit_fds;
  keep.push_back(sv[1]);
  const pid_t parent = ::getpid();
  sigset_t none;
  sigemptyset(&none);

  const pid_t pid = ::fork();
  if (pid < 0) {
    log("worker %zu: fork: %s", w.index, std::strerror(errno));
    ::close(sv[0]);
    ::close(sv[1]);
    return false;
  }
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);
    // Nothing of the supervisor's (metrics socket, other workers' channels) leaks into the
    // worker except what it is given.
    if (::close_range(3, UINT_MAX, CLOSE_RANGE_CLOEXEC) != 0) {
      for (int fd = 3; fd < 65536; ++fd) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    for (int fd : keep) ::fcntl(fd, F_SETFD, 0);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    ::execve(opt_.exe.c_str(), argv.data(), envp.data());
    ::_exit(127);
  }
  ::close(sv[1]);
  {
    std::lock_guard<std::mutex> lock(w.mu);
    w.pid = pid;
    w.fd = sv[0];
    w.state = State::starting;
    w.started = Clock::now();
    w.last_answer = w.started;
    w.health_ok = false;
    w.health_detail = "starting";
  }
  log("worker %zu started (pid %d)", w.index, static_cast<int>(pid));
  return true;
}

void Supervisor::on_ready_message(Worker& w) {
  Frame f;
  const auto deadline = Clock::now() + 1s;
  std::lock_guard<std::mutex> lock(w.mu);
  if (!read_frame(w.fd, f, &deadline) || f.type != kReady) {
    // A worker that closes its channel before ready dies; SIGCHLD follows.
    ::close(w.fd);
    w.fd = -1;
    return;
  }
  w.state = State::ready;
  w.last_answer = Clock::now();
  w.health_ok = true;
  w.health_detail.clear();
  w.quick_failures = 0;
  log("worker %zu ready (pid %d)", w.index, static_cast<int>(w.pid));
}

void Supervisor::reap() {
  for (;;) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (auto& wp : workers_) {
      Worker& w = *wp;
      std::unique_lock<std::mutex> lock(w.mu);
      if (w.pid != pid) continue;
      const bool was_ready = w.state == State::ready;
      const auto ran = Clock::now() - w.started;
      w.pid = 0;
      if (w.fd >= 0) ::close(w.fd);
      w.fd = -1;
      w.state = State::stopped;
      w.health_ok = false;
      w.health_detail = "not running";
      lock.unlock();
      if (opt_.on_worker_exit) opt_.on_worker_exit(w.index);
      char how[64];
      if (WIFSIGNALED(status)) {
        std::snprintf(how, sizeof how, "killed by signal %d", WTERMSIG(status));
      } else {
        std::snprintf(how, sizeof how, "exited with status %d", WEXITSTATUS(status));
      }
      if (stopping_) {
        log("worker %zu (pid %d) %s", w.index, static_cast<int>(pid), how);
        break;
      }
      if (!all_ready_once_) {
        log("worker %zu (pid %d) %s before it was ready: start-up failed", w.index,
            static_cast<int>(pid), how);
        failed_ = true;
        begin_shutdown();
        break;
      }
      std::chrono::milliseconds delay{0};
      if (ran < 10s || !was_ready) {
        w.quick_failures = std::min(w.quick_failures + 1, 8U);
        delay = std::min<std::chrono::milliseconds>(250ms * (1U << (w.quick_failures - 1)), 30s);
      } else {
        w.quick_failures = 0;
      }
      w.restart_at = Clock::now() + delay;
      restarts_->inc();
      log("worker %zu (pid %d) %s; restarting in %lld ms", w.index, static_cast<int>(pid), how,
          static_cast<long long>(delay.count()));
      break;
    }
  }
}

void Supervisor::begin_shutdown() {
  if (stopping_) return;
  stopping_ = true;
  stop_deadline_ = Clock::now() + opt_.drain + 5s;
  notify("STOPPING=1");
  for (auto& w : workers_) {
    std::lock_guard<std::mutex> lock(w->mu);
    if (w->pid > 0) ::kill(w->pid, SIGTERM);
  }
}

void Supervisor::reload() {
  if (opt_.check_reload) {
    if (Status st = opt_.check_reload(); !st.ok()) {
      log("SIGHUP: reload refused, workers keep the current policy: %s",
          st.error().message().c_str());
      return;
    }
  }
  log("SIGHUP: reloading the workers");
  for (auto& w : workers_) {
    std::lock_guard<std::mutex> lock(w->mu);
    if (w->pid > 0) ::kill(w->pid, SIGHUP);
  }
}

void Supervisor::health_loop() {
  while (!monitor_stop_.load()) {
    {
      std::unique_lock<std::mutex> lock(monitor_mu_);
      monitor_cv_.wait_for(lock, opt_.health_interval, [this] { return monitor_stop_.load(); });
    }
    if (monitor_stop_.load()) return;
    for (auto& wp : workers_) {
      Worker& w = *wp;
      auto r = query(w, kHealthQuery, kHealthReply, std::chrono::milliseconds(2000));
      std::lock_guard<std::mutex> lock(w.mu);
      if (w.state != State::ready) continue;
      const auto now = Clock::now();
      if (r.ok()) {
        w.last_answer = now;
        w.health_ok = !r->empty() && (*r)[0] == '1';
        w.health_detail = w.health_ok ? "" : r->substr(r->empty() ? 0 : 1);
      } else if (now - w.last_answer > opt_.hang_timeout && w.pid > 0) {
        log("worker %zu (pid %d) has not answered for %lld s; killing it", w.index,
            static_cast<int>(w.pid),
            static_cast<long long>(
                std::chrono::duration_cast<std::chrono::seconds>(now - w.last_answer).count()));
        ::kill(w.pid, SIGKILL);
        w.last_answer = now;  // one kill per hang; the reaper restarts it
      }
    }
  }
}

std::string Supervisor::expose() {
  std::vector<std::pair<std::string, std::string>> parts;
  parts.emplace_back("", registry_.expose());
  for (auto& w : workers_) {
    auto r = query(*w, kMetricsQuery, kMetricsReply, std::chrono::milliseconds(1000));
    if (r.ok()) parts.emplace_back(std::to_string(w->index), std::move(r).value());
  }
  return merge_expositions(parts, "worker");
}

metrics::Health Supervisor::health() {
  for (auto& w : workers_) {
    std::lock_guard<std::mutex> lock(w->mu);
    if (w->state != State::ready) {
      return {false, "worker " + std::to_string(w->index) + " not running"};
    }
    if (!w->health_ok) return {false, "worker " + std::to_string(w->index) + ": " + w->health_detail};
  }
  return {true, "ok"};
}

int Supervisor::run() {
  sigset_t sigs;
  sigemptyset(&sigs);
  for (int s : {SIGCHLD, SIGTERM, SIGINT, SIGHUP}) sigaddset(&sigs, s);
  ::pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  const int sfd = ::signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) {
    log("signalfd: %s", std::strerror(errno));
    return 1;
  }

  metrics::HttpEndpoint http([this] { return expose(); }, [this] { return health(); });
  if (opt_.metrics_enabled) {
    if (auto st = http.start(opt_.metrics); !st.ok()) {
      log("metrics: %s", st.error().message().c_str());
      ::close(sfd);
      return 1;
    }
  }
  std::thread monitor([this] {
    name_this_thread("gs-health");
    health_loop();
  });


  // Watchdog: systemd gets WATCHDOG=1 while this loop runs; hung workers are this loop's job.
  std::uint64_t wd_usec = 0;
#ifdef GS_HAVE_SYSTEMD
  if (sd_watchdog_enabled(0, &wd_usec) <= 0) wd_usec = 0;
#endif
  Clock::time_point next_watchdog = Clock::now();

  for (;;) {
    const auto now = Clock::now();
    if (stopping_) {
      bool any = false;
      for (auto& w : workers_) {
        std::lock_guard<std::mutex> lock(w->mu);
        if (w->pid > 0) {
          any = true;
          if (now > stop_deadline_) ::kill(w->pid, SIGKILL);
        }
      }
      if (!any) break;
    } else {
      // One worker starts at a time: PKCS#11 modules (SoftHSM2's file store among them) may
      // fail when several processes initialise and log in at the same instant.
      bool one_starting = false;
      for (auto& w : workers_) {
        std::lock_guard<std::mutex> lock(w->mu);
        one_starting = one_starting || w->state == State::starting;
      }
      for (auto& w : workers_) {
        bool start = false;
        bool overdue = false;
        {
          std::lock_guard<std::mutex> lock(w->mu);
          start = !one_starting && w->state == State::stopped && w->pid == 0 &&
                  now >= w->restart_at;
          overdue = w->state == State::starting && now - w->started > opt_.ready_timeout;
          if (overdue && w->pid > 0) {
            log("worker %zu (pid %d) not ready after %lld s; killing it", w->index,
                static_cast<int>(w->pid),
                static_cast<long long>(
                    std::chrono::duration_cast<std::chrono::seconds>(opt_.ready_timeout)
                        .count()));
            ::kill(w->pid, SIGKILL);
            w->started = now;  // one kill; the reaper takes it from here
          }
        }
        if (start) {
          if (spawn(*w)) {
            one_starting = true;
          } else if (!all_ready_once_) {
            failed_ = true;
            begin_shutdown();
            break;
          } else {
            std::lock_guard<std::mutex> lock(w->mu);
            w->restart_at = now + 1s;
          }
        }
      }
      if (!all_ready_once_) {
        bool all = true;
        for (auto& w : workers_) {
          std::lock_guard<std::mutex> lock(w->mu);
          all = all && w->state == State::ready;
        }
        if (all) {
          all_ready_once_ = true;
          if (opt_.on_ready) opt_.on_ready(opt_.metrics_enabled ? http.port() : 0);
          notify("READY=1");
        }
      }
    }
    if (wd_usec != 0 && now >= next_watchdog) {
      notify("WATCHDOG=1");
      next_watchdog = now + std::chrono::microseconds(wd_usec / 2);
    }

    std::vector<pollfd> pfds;
    std::vector<Worker*> owners;
    pfds.push_back({sfd, POLLIN, 0});
    owners.push_back(nullptr);
    for (auto& w : workers_) {
      std::lock_guard<std::mutex> lock(w->mu);
      if (w->state == State::starting && w->fd >= 0) {
        pfds.push_back({w->fd, POLLIN, 0});
        owners.push_back(w.get());
      }
    }
    int r = ::poll(pfds.data(), pfds.size(), 200);
    if (r < 0 && errno != EINTR) {
      log("poll: %s", std::strerror(errno));
      break;
    }
    for (std::size_t i = 1; r > 0 && i < pfds.size(); ++i) {
      if (pfds[i].revents != 0) on_ready_message(*owners[i]);
    }
    if (r > 0 && (pfds[0].revents & POLLIN) != 0) {
      signalfd_siginfo si;
      while (::read(sfd, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
        switch (si.ssi_signo) {
          case SIGCHLD: reap(); break;
          case SIGHUP:
            if (!stopping_) reload();
            break;
          default:
            if (!stopping_) log("signal %u: stopping the workers", si.ssi_signo);
            begin_shutdown();
            break;
        }
      }
    }
  }

  monitor_stop_ = true;
  monitor_cv_.notify_all();
  monitor.join();
  http.stop();
  ::close(sfd);
  log("stopped");
  return failed_ ? 1 : 0;
}

}  // namespace

int run(const Options& options) {
  if (options.processes == 0) {
    std::fprintf(stderr, "%s: processes must be at least 1\n", options.name.c_str());
    return 1;
  }
  Supervisor s(options);
  return s.run();
}

// ---- worker side -------------------------------------------------------------------------------

struct WorkerLink::Impl {
  int fd = -1;
  std::mutex write_mu;
  std::thread thread;
};

WorkerLink::WorkerLink(int fd) : impl_(std::make_unique<Impl>()) {
  impl_->fd = fd;
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
}

WorkerLink::~WorkerLink() { stop(); }

void WorkerLink::serve(std::function<std::string()> metrics_fn,
                       std::function<metrics::Health()> health_fn,
                       std::function<void()> on_lost) {
  Impl* impl = impl_.get();
  impl->thread = std::thread([impl, metrics_fn = std::move(metrics_fn),
                              health_fn = std::move(health_fn), on_lost = std::move(on_lost)] {
    name_this_thread("gs-link");
    for (;;) {
      Frame f;
      if (!read_frame(impl->fd, f, nullptr)) break;
      std::string answer;
      char type = 0;
      if (f.type == kMetricsQuery) {
        type = kMetricsReply;
        answer = metrics_fn ? metrics_fn() : std::string();
      } else if (f.type == kHealthQuery) {
        type = kHealthReply;
        const metrics::Health h = health_fn ? health_fn() : metrics::Health{};
        answer = (h.ok ? "1" : "0") + h.detail;
      } else {
        continue;
      }
      std::lock_guard<std::mutex> lock(impl->write_mu);
      if (!send_frame(impl->fd, type, f.seq, answer)) break;
    }
    if (on_lost) on_lost();
  });
}

Status WorkerLink::ready() {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  if (!send_frame(impl_->fd, kReady, 0, {})) {
    return Error(Errc::os_failure, "control channel to the supervisor is closed");
  }
  return {};
}

void WorkerLink::stop() {
  if (!impl_) return;
  if (impl_->fd >= 0) ::shutdown(impl_->fd, SHUT_RDWR);
  if (impl_->thread.joinable()) {
    if (impl_->thread.get_id() == std::this_thread::get_id()) {
      impl_->thread.detach();
    } else {
      impl_->thread.join();
    }
  }
  if (impl_->fd >= 0) ::close(impl_->fd);
  impl_->fd = -1;
}

// ---- port reservation --------------------------------------------------------------------------

std::uint16_t reserve_port(const std::string& address, int& fd_out) {
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family = AF_INET;
  if (address.find(':') != std::string::npos) {
    auto* a6 = reinterpret_cast<sockaddr_in6*>(&ss);
    a6->sin6_family = AF_INET6;
    if (inet_pton(AF_INET6, address.c_str(), &a6->sin6_addr) != 1) return 0;
    family = AF_INET6;
    len = sizeof(sockaddr_in6);
  } else {
    auto* a4 = reinterpret_cast<sockaddr_in*>(&ss);
    a4->sin_family = AF_INET;
    if (inet_pton(AF_INET, address.c_str(), &a4->sin_addr) != 1) return 0;
    len = sizeof(sockaddr_in);
  }
  const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
    ::close(fd);
    return 0;
  }
  fd_out = fd;
  return ntohs(family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                  : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

std::vector<std::string> worker_environment(
    const char* const* base,
    const std::vector<std::pair<std::string, std::string>>& defaults) {
  std::vector<std::string> env;
  for (const char* const* e = base; e != nullptr && *e != nullptr; ++e) env.emplace_back(*e);
  for (const auto& [name, value] : defaults) {
    const std::string prefix = name + "=";
    const bool present = std::any_of(env.begin(), env.end(), [&](const std::string& e) {
      return e.compare(0, prefix.size(), prefix) == 0;
    });
    if (!present) env.push_back(prefix + value);
  }
  return env;
}

// ---- exposition merging ------------------------------------------------------------------------

std::string merge_expositions(const std::vector<std::pair<std::string, std::string>>& parts,
                              const std::string& label) {
  struct Family {
    std::string help, type;
    std::vector<std::string> samples;
  };
  std::map<std::string, Family> families;
  for (const auto& [value, text] : parts) {
    std::string current;
    std::size_t pos = 0;
    while (pos < text.size()) {
      std::size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string line = text.substr(pos, end - pos);
      pos = end + 1;
      if (line.empty()) continue;
      if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
        const std::size_t name_end = line.find(' ', 7);
        const std::string name = line.substr(7, name_end == std::string::npos
                                                     ? std::string::npos
                                                     : name_end - 7);
        Family& f = families[name];
        std::string& slot = line[2] == 'H' ? f.help : f.type;
        if (slot.empty()) slot = line;
        current = name;
        continue;
      }
      if (line[0] == '#') continue;
      const std::size_t name_end = line.find_first_of("{ ");
      if (name_end == std::string::npos) continue;
      const std::string name = line.substr(0, name_end);
      // Samples belong to the family of the TYPE line above them (histogram _bucket/_sum/...).
      Family& f = families[!current.empty() && name.rfind(current, 0) == 0 ? current : name];
      if (value.empty()) {
        f.samples.push_back(line);
      } else if (line[name_end] == '{') {
        const bool empty_set = name_end + 1 < line.size() && line[name_end + 1] == '}';
        f.samples.push_back(name + "{" + label + "=\"" + value + "\"" + (empty_set ? "" : ",") +
                            line.substr(name_end + 1));
      } else {
        f.samples.push_back(name + "{" + label + "=\"" + value + "\"}" + line.substr(name_end));
      }
    }
  }
  std::string out;
  for (const auto& [name, f] : families) {
    if (!f.help.empty()) out += f.help + "\n";
    if (!f.type.empty()) out += f.type + "\n";
    for (const auto& s : f.samples) out += s + "\n";
  }
  return out;
}

}  // namespace gs::supervisor
