// Spreads client connections evenly over a daemon's worker processes.
//
// The workers share the port with SO_REUSEPORT, and the kernel picks a worker for each new
// connection by a hash of its addresses and ports. A collection engine keeps a few long-lived
// connections, so the split is often uneven (32 connections over 2 workers: 16/16 only one time
// in seven; 22/10 and 19/13 seen), and each connection brings its share of the load: the worker
// with more connections saturates while the other idles. Measured on the SES at 22,000 /s open
// loop, 3,000 meters, 32 x 16 (README "Performance", session 20): p99 97 ms at 16/16, 307-662 ms
// at 20/12 and 19/13.
//
// The balancer: every worker keeps its number of open connections in a table that all workers
// map (a memfd the supervisor creates and every worker inherits). A worker that accepts a
// connection while it has more than another serving worker passes the socket, before the TLS
// handshake, to the worker with the fewest, as SCM_RIGHTS over that worker's inbox (a Unix
// datagram socket pair the supervisor creates, one per worker slot, inherited by all). The
// receiver serves it as if it had accepted it. A connection in transit counts for its receiver
// at once (`pending`), so a burst of connections does not all go to the same worker.
//
// Failure modes: a worker that is not serving (starting, draining, dead) gets nothing; when the
// supervisor reaps a worker it clears the worker's counts and closes the sockets still waiting in
// its inbox (as the kernel resets connections waiting in a dead listener's accept queue). An
// inbox that is full, or any send error, leaves the connection with the worker that accepted it.
// The counts are a hint: a race can leave a split one connection further from even, never a
// connection without a worker.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "gridseal/result.h"

namespace gs::server {

class Balancer {
 public:
  static constexpr std::size_t kMaxWorkers = 64;  // as [server] processes

  // Supervisor: the shared table and one inbox per worker slot. Every fd of inherit_fds() must
  // stay open, at the same number, in every worker; fd() is what a worker attaches to.
  static Result<std::shared_ptr<Balancer>> create(std::size_t workers);
  // Worker: attaches to the supervisor's table (inherited fd) as slot `self`. The fd stays open.
  static Result<std::shared_ptr<Balancer>> attach(int fd, std::size_t self);
  ~Balancer();
  Balancer(const Balancer&) = delete;
  Balancer& operator=(const Balancer&) = delete;

  int fd() const noexcept { return fd_; }
  std::vector<int> inherit_fds() const;
  std::size_t workers() const noexcept;

  // Supervisor: the worker in `slot` is gone. Clears its counts and closes every socket waiting
  // in its inbox. Call before the slot's next worker starts.
  void worker_gone(std::size_t slot);

  // Worker: this slot takes connections from the others (after listen) or no longer (drain).
  void set_serving(bool serving);
  // Worker: one connection more (accepted and kept, or taken from the inbox) or less.
  void opened();
  void closed();
  // Worker, for a connection just accepted: the slot to pass it to (the serving slot with the
  // fewest connections, when this one has more), counted there as pending; -1: keep it.
  int choose();
  // Takes back a choose() whose connection is not passed after all.
  void withdraw(int slot);
  // Passes socket `fd` to `slot`'s inbox (a duplicate travels; the caller closes its own on
  // true). false: not sent (inbox full, slot gone); the pending count is taken back.
  bool pass(int slot, int fd);
  // Worker: the receiving end of this slot's inbox (non-blocking), to wait on for readability.
  int inbox_fd() const noexcept;
  // Worker: one socket passed to this slot (close-on-exec, owned by the caller), or -1 when the
  // inbox is empty.
  int take();

  // Counts of `slot` (tests, metrics): open connections and connections in transit to it.
  int connections(std::size_t slot) const;
  int pending(std::size_t slot) const;
  bool serving(std::size_t slot) const;

 private:
  struct Table;
  Balancer(int fd, Table* table, std::size_t self, bool owner);
  int fd_;
  Table* table_;
  std::size_t self_;  // worker slot; kMaxWorkers in the supervisor
  bool owner_;        // the supervisor's instance closes the fds
};

}  // namespace gs::server
