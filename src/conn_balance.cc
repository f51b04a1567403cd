// Connection balancing between worker processes: see conn_balance.h.
#include "src/conn_balance.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>

namespace gs::server {

namespace {
constexpr std::uint32_t kMagic = 0x47534231;  // "GSB1"
}

struct Balancer::Table {
  std::uint32_t magic;
  std::uint32_t workers;
  std::int32_t inbox_rx[kMaxWorkers];  // receiving end of slot i's inbox
  std::int32_t inbox_tx[kMaxWorkers];  // sending end
  struct alignas(64) Slot {
    std::atomic<std::int32_t> serving;
    std::atomic<std::int32_t> connections;
    std::atomic<std::int32_t> pending;  // passed to the slot, not yet taken
  };
  Slot slot[kMaxWorkers];
};
static_assert(std::atomic<std::int32_t>::is_always_lock_free,
              "the table is shared between processes");

namespace {

int load_of(const std::atomic<std::int32_t>& a) { return std::max(0, a.load()); }

// Decrements without going below zero (a reset by worker_gone may come in between).
void decrement(std::atomic<std::int32_t>& a) {
  std::int32_t v = a.load();
  while (v > 0 && !a.compare_exchange_weak(v, v - 1)) {
  }
}

// One datagram of one byte carrying `fd`, or, on receive, the fd it carried (-1: none).
struct FdMessage {
  char byte = 'C';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  FdMessage() {
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
  }
  void set_fd(int fd) {
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
  }
  int fd() const {
    for (const cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr;
         c = CMSG_NXTHDR(const_cast<msghdr*>(&msg), const_cast<cmsghdr*>(c))) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
          c->cmsg_len == CMSG_LEN(sizeof(int))) {
        int fd = -1;
        std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
        return fd;
      }
    }
    return -1;
  }
};

// One message from inbox `rx`: >= 0 the socket it carried, -1 none waiting, -2 a message
// without a socket.
int receive_one(int rx) {
  FdMessage m;
  ssize_t n = -1;
  do {
    n = ::recvmsg(rx, &m.msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  const int fd = m.fd();
  // A control part cut short closed the sockets that did not fit (the kernel does that).
  return fd >= 0 ? fd : -2;
}

bool is_socket(int fd) {
  struct stat st {};
  return fd >= 0 && ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

}  // namespace

Balancer::Balancer(int fd, Table* table, std::size_t self, bool owner)
    : fd_(fd), table_(table), self_(self), owner_(owner) {}

Balancer::~Balancer() {
  if (owner_) {
    for (std::size_t i = 0; i < table_->workers; ++i) {
      ::close(table_->inbox_rx[i]);
      ::close(table_->inbox_tx[i]);
    }
    ::close(fd_);
  }
  ::munmap(table_, sizeof(Table));
}

Result<std::shared_ptr<Balancer>> Balancer::create(std::size_t workers) {
  if (workers == 0 || workers > kMaxWorkers) {
    return {Errc::invalid_argument, "connection balancing: 1.." + std::to_string(kMaxWorkers) +
                                         " workers"};
  }
  const int fd = ::memfd_create("gridseal-connections", MFD_CLOEXEC);
  if (fd < 0) return {Errc::os_failure, std::string("memfd_create: ") + std::strerror(errno)};
  void* mem = MAP_FAILED;
  if (::ftruncate(fd, sizeof(Table)) == 0) {
    mem = ::mmap(nullptr, sizeof(Table), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  }
  if (mem == MAP_FAILED) {
    const int e = errno;
    ::close(fd);
    return {Errc::os_failure, std::string("connection table: ") + std::strerror(e)};
  }
  auto* t = new (mem) Table{};
  t->magic = kMagic;
  t->workers = static_cast<std::uint32_t>(workers);
  for (std::size_t i = 0; i < workers; ++i) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) {
      const int e = errno;
      for (std::size_t k = 0; k < i; ++k) {
        ::close(t->inbox_rx[k]);
        ::close(t->inbox_tx[k]);
      }
      ::munmap(mem, sizeof(Table));
      ::close(fd);
      return {Errc::os_failure, std::string("connection inbox: socketpair: ") + std::strerror(e)};
    }
    t->inbox_rx[i] = sv[0];
    t->inbox_tx[i] = sv[1];
  }
  return std::shared_ptr<Balancer>(new Balancer(fd, t, kMaxWorkers, true));
}

Result<std::shared_ptr<Balancer>> Balancer::attach(int fd, std::size_t self) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) != sizeof(Table)) {
    return {Errc::invalid_argument, "connection table: not the supervisor's (size)"};
  }
  void* mem = ::mmap(nullptr, sizeof(Table), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mem == MAP_FAILED) {
    return {Errc::os_failure, std::string("connection table: mmap: ") + std::strerror(errno)};
  }
  auto* t = static_cast<Table*>(mem);
  Status bad;
  if (t->magic != kMagic || t->workers == 0 || t->workers > kMaxWorkers) {
    bad = {Errc::invalid_argument, "connection table: not the supervisor's (header)"};
  } else if (self >= t->workers) {
    bad = {Errc::invalid_argument, "connection table: worker " + std::to_string(self) +
                                       " of " + std::to_string(t->workers)};
  } else {
    for (std::size_t i = 0; i < t->workers && bad.ok(); ++i) {
      if (!is_socket(t->inbox_rx[i]) || !is_socket(t->inbox_tx[i])) {
        bad = {Errc::invalid_argument,
               "connection table: inbox " + std::to_string(i) + " was not inherited"};
      }
    }
  }
  if (!bad.ok()) {
    ::munmap(mem, sizeof(Table));
    return std::move(bad).error();
  }
  return std::shared_ptr<Balancer>(new Balancer(fd, t, self, false));
}

std::vector<int> Balancer::inherit_fds() const {
  std::vector<int> fds{fd_};
  for (std::size_t i = 0; i < table_->workers; ++i) {
    fds.push_back(table_->inbox_rx[i]);
    fds.push_back(table_->inbox_tx[i]);
  }
  return fds;
}

std::size_t Balancer::workers() const noexcept { return table_->workers; }

void Balancer::worker_gone(std::size_t slot) {
  if (slot >= table_->workers) return;
  Table::Slot& s = table_->slot[slot];
  s.serving.store(0);
  for (int n = 0; n < 100000; ++n) {
    const int fd = receive_one(table_->inbox_rx[slot]);
    if (fd == -1) break;
    if (fd >= 0) ::close(fd);
  }
  s.connections.store(0);
  s.pending.store(0);
}

void Balancer::set_serving(bool serving) {
  if (self_ < table_->workers) table_->slot[self_].serving.store(serving ? 1 : 0);
}

void Balancer::opened() {
  if (self_ < table_->workers) table_->slot[self_].connections.fetch_add(1);
}

void Balancer::closed() {
  if (self_ < table_->workers) decrement(table_->slot[self_].connections);
}

int Balancer::choose() {
  Table& t = *table_;
  if (self_ >= t.workers || t.slot[self_].serving.load() == 0) return -1;
  auto load = [&t](std::size_t i) {
    return load_of(t.slot[i].connections) + load_of(t.slot[i].pending);
  };
  int best = -1;
  int best_load = load(self_);
  for (std::size_t i = 0; i < t.workers; ++i) {
    if (i == self_ || t.slot[i].serving.load() == 0) continue;
    if (const int l = load(i); l < best_load) {
      best = static_cast<int>(i);
      best_load = l;
    }
  }
  if (best >= 0) t.slot[best].pending.fetch_add(1);
  return best;
}

void Balancer::withdraw(int slot) {
  if (slot >= 0 && static_cast<std::size_t>(slot) < table_->workers) {
    decrement(table_->slot[slot].pending);
  }
}

bool Balancer::pass(int slot, int fd) {
  if (slot < 0 || static_cast<std::size_t>(slot) >= table_->workers) return false;
  FdMessage m;
  m.set_fd(fd);
  const ssize_t n = ::sendmsg(table_->inbox_tx[slot], &m.msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n == 1) return true;
  withdraw(slot);
  return false;
}

int Balancer::inbox_fd() const noexcept {
  return self_ < table_->workers ? table_->inbox_rx[self_] : -1;
}

int Balancer::take() {
  if (self_ >= table_->workers) return -1;
  for (;;) {
    const int fd = receive_one(table_->inbox_rx[self_]);
    if (fd == -1) return -1;
    decrement(table_->slot[self_].pending);  // every message was a pass
    if (fd >= 0) return fd;
  }
}

int Balancer::connections(std::size_t slot) const {
  return slot < table_->workers ? table_->slot[slot].connections.load() : 0;
}

int Balancer::pending(std::size_t slot) const {
  return slot < table_->workers ? table_->slot[slot].pending.load() : 0;
}

bool Balancer::serving(std::size_t slot) const {
  return slot < table_->workers && table_->slot[slot].serving.load() != 0;
}

}  // namespace gs::server
