// gridseal-bench echo: the ceiling of a measurement. A loopback TCP server that writes back
// every byte it reads, with no framing, parsing, crypto or state, on T threads (one epoll loop
// and one SO_REUSEPORT listener each, as the daemons' workers share their port). Run
// `gridseal-bench dkus --echo` against it: the rate it reports is what the load generator and
// the kernel's loopback TCP allow on this machine before any server does any work, and the CPU
// this process used (printed at SIGTERM/SIGINT) is the server side of that cost.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "tools/bench/args.h"
#include "tools/bench/scenarios.h"
#include "tools/bench/util.h"

namespace gs::bench {

namespace {

// One read. A connection whose answers the client does not take is not read again until it
// has taken them, so it holds at most one read's bytes unsent.
constexpr std::size_t kReadChunk = 64 * 1024;

std::atomic<std::uint64_t> g_bytes{0}, g_connections{0};

struct Conn {
  int fd = -1;
  std::vector<std::uint8_t> pending;  // read, not yet written back
  std::size_t sent = 0;               // of pending
  bool want_out = false;
};

class Loop {
 public:
  Loop(int listener, std::size_t max_connections)
      : listener_(listener), max_connections_(max_connections) {}

  // The epoll set with the listener in it; false and `err` on failure.
  bool open(std::string& err) {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = listener_;
    if (ep_ < 0 || epoll_ctl(ep_, EPOLL_CTL_ADD, listener_, &ev) != 0) {
      err = std::string("epoll: ") + std::strerror(errno);
      return false;
    }
    return true;
  }

  void run() {
    std::vector<std::uint8_t> buf(kReadChunk);
    epoll_event evs[64];
    for (;;) {
      const int n = epoll_wait(ep_, evs, 64, -1);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return;
      for (int i = 0; i < n; ++i) {
        const int fd = evs[i].data.fd;
        if (fd == listener_) {
          accept_all();
          continue;
        }
        auto it = conns_.find(fd);
        if (it == conns_.end()) continue;
        if (!serve(it->second, buf)) close_conn(fd);
      }
    }
  }

 private:
  void accept_all() {
    for (;;) {
      const int c = accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0) return;
      if (conns_.size() >= max_connections_) {
        ::close(c);
        continue;
      }
      const int one = 1;
      setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.fd = c;
      if (epoll_ctl(ep_, EPOLL_CTL_ADD, c, &ev) != 0) {
        ::close(c);
        continue;
      }
      conns_[c].fd = c;
      g_connections.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // Writes back what is pending, then reads while nothing is; false: close the connection.
  bool serve(Conn& c, std::vector<std::uint8_t>& buf) {
    for (;;) {
      while (c.sent < c.pending.size()) {
        const ssize_t w = ::write(c.fd, c.pending.data() + c.sent, c.pending.size() - c.sent);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) return watch_out(c, true);
        if (w <= 0) return false;
        c.sent += static_cast<std::size_t>(w);
        g_bytes.fetch_add(static_cast<std::uint64_t>(w), std::memory_order_relaxed);
      }
      c.pending.clear();
      c.sent = 0;
      if (!watch_out(c, false)) return false;
      const ssize_t r = ::read(c.fd, buf.data(), buf.size());
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && errno == EAGAIN) return true;
      if (r <= 0) return false;
      // Written straight back from buf when the socket takes it all (the common case).
      std::size_t off = 0;
      while (off < static_cast<std::size_t>(r)) {
        const ssize_t w = ::write(c.fd, buf.data() + off, static_cast<std::size_t>(r) - off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        if (w <= 0) return false;
        off += static_cast<std::size_t>(w);
        g_bytes.fetch_add(static_cast<std::uint64_t>(w), std::memory_order_relaxed);
      }
      if (off < static_cast<std::size_t>(r)) {
        c.pending.assign(buf.begin() + static_cast<std::ptrdiff_t>(off), buf.begin() + r);
        return watch_out(c, true);
      }
    }
  }

  // Waits for writability (and stops reading) while answers are pending.
  bool watch_out(Conn& c, bool out) {
    if (c.want_out == out) return true;
    epoll_event ev{};
    ev.events = out ? EPOLLOUT : EPOLLIN;
    ev.data.fd = c.fd;
    if (epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev) != 0) return false;
    c.want_out = out;
    return true;
  }

  void close_conn(int fd) {
    epoll_ctl(ep_, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    conns_.erase(fd);
  }

  int listener_;
  std::size_t max_connections_;
  int ep_ = -1;
  std::unordered_map<int, Conn> conns_;
};

// A listening socket on addr:port with SO_REUSEPORT; -1 and `err` on failure.
int listen_on(const in_addr& addr, std::uint16_t port, std::string& err) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    err = std::string("socket: ") + std::strerror(errno);
    return -1;
  }
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr = addr;
  if (bind(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof sa) != 0 || listen(fd, 1024) != 0) {
    err = "bind/listen " + std::to_string(port) + ": " + std::strerror(errno);
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

void usage_echo() {
  std::fprintf(stderr,
      "usage: gridseal-bench echo [--address 127.0.0.1] [--port 0] [--threads 2]\n"
      "         [--connections 4096]\n"
      "  A loopback TCP server that writes back every byte it reads, nothing else: the ceiling\n"
      "  of a measurement on this machine. `gridseal-bench dkus --echo` against it (the same\n"
      "  load as against gridseal-dkusd) reports what the load generator and the kernel's\n"
      "  loopback TCP allow before a server does any work. Prints \"listening on ADDR:PORT\";\n"
      "  serves until SIGTERM or SIGINT, then prints the bytes it echoed, the connections it\n"
      "  took and the CPU seconds it used. One SO_REUSEPORT listener and epoll loop per\n"
      "  thread; at most --connections at once (more are closed at accept); a connection whose\n"
      "  answers are not taken is not read (at most 64 KiB unsent each). Loopback only.\n");
}

int run_echo(int argc, char** argv) {
  Args a;
  a.value("address").value("port").value("threads").value("connections");
  if (auto st = a.parse(argc, argv); !st.ok()) return usage_error(st.error().message(), usage_echo);
  const std::string address = a.str("address", "127.0.0.1");
  in_addr addr{};
  if (inet_pton(AF_INET, address.c_str(), &addr) != 1 || (ntohl(addr.s_addr) >> 24) != 127) {
    return usage_error("--address must be an IPv4 loopback address (127.0.0.0/8)", usage_echo);
  }
  auto port = a.u64("port", 0, 0, 65535);
  auto threads = a.u64("threads", 2, 1, 64);
  auto max_conns = a.u64("connections", 4096, 1, 1'000'000);
  if (!port.ok()) return usage_error(port.error().message(), usage_echo);
  if (!threads.ok()) return usage_error(threads.error().message(), usage_echo);
  if (!max_conns.ok()) return usage_error(max_conns.error().message(), usage_echo);
  raise_fd_limit(*max_conns);

  // SIGTERM/SIGINT are taken by sigwait below, never by the loops.
  sigset_t stop_set;
  sigemptyset(&stop_set);
  sigaddset(&stop_set, SIGTERM);
  sigaddset(&stop_set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_set, nullptr);

  std::string err;
  std::vector<int> listeners;
  std::uint16_t bound = static_cast<std::uint16_t>(*port);
  for (std::uint64_t i = 0; i < *threads; ++i) {
    const int fd = listen_on(addr, bound, err);
    if (fd < 0) {
      std::fprintf(stderr, "gridseal-bench echo: %s\n", err.c_str());
      return 1;
    }
    if (bound == 0) {
      sockaddr_in sa{};
      socklen_t len = sizeof sa;
      getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
      bound = ntohs(sa.sin_port);
    }
    listeners.push_back(fd);
  }
  const double cpu0 = cpu_seconds();
  std::vector<std::unique_ptr<Loop>> loops;
  for (int fd : listeners) {
    loops.push_back(std::make_unique<Loop>(fd, static_cast<std::size_t>(*max_conns)));
    if (!loops.back()->open(err)) {
      std::fprintf(stderr, "gridseal-bench echo: %s\n", err.c_str());
      return 1;
    }
  }
  for (auto& l : loops) {
    Loop* loop = l.get();
    std::thread([loop] { loop->run(); }).detach();
  }
  std::printf("listening on %s:%u (echo, %llu threads)\n", address.c_str(),
              static_cast<unsigned>(bound), static_cast<unsigned long long>(*threads));
  std::fflush(stdout);

  int sig = 0;
  sigwait(&stop_set, &sig);
  const double cpu = cpu_seconds() - cpu0;
  std::printf("echoed %llu bytes on %llu connections; CPU %.2f s (user + system)\n",
              static_cast<unsigned long long>(g_bytes.load()),
              static_cast<unsigned long long>(g_connections.load()), cpu);
  std::fflush(stdout);
  // The loop threads are detached and blocked in epoll_wait: leave without unwinding them.
  _exit(0);
}

}  // namespace gs::bench
