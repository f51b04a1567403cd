// The connection balancer's table and inboxes (src/conn_balance.h), in one process: the
// supervisor's instance and two workers' attached to the same memfd.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "src/conn_balance.h"

namespace {

using gs::server::Balancer;

// A connected loopback TCP pair: [0] the client end, [1] the accepted end.
struct TcpPair {
  int fd[2] = {-1, -1};
  TcpPair() {
    const int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(l, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::listen(l, 4) == 0 &&
        ::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      fd[0] = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (::connect(fd[0], reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
        fd[1] = ::accept4(l, nullptr, nullptr, SOCK_CLOEXEC);
      }
    }
    ::close(l);
  }
  ~TcpPair() {
    for (int f : fd) {
      if (f >= 0) ::close(f);
    }
  }
};

struct Fleet {
  std::shared_ptr<Balancer> sup, w0, w1;
  explicit Fleet(std::size_t workers = 2) {
    auto s = Balancer::create(workers);
    if (!s.ok()) return;
    sup = *s;
    auto a = Balancer::attach(sup->fd(), 0);
    auto b = Balancer::attach(sup->fd(), 1);
    if (a.ok()) w0 = *a;
    if (b.ok()) w1 = *b;
  }
  // Both workers attached and serving.
  bool serving() const {
    if (!w0 || !w1) return false;
    w0->set_serving(true);
    w1->set_serving(true);
    return true;
  }
};

TEST(ConnBalance, KeepsWhileEvenAndPassesToTheWorkerWithFewer) {
  Fleet f;
  ASSERT_TRUE(f.w0 && f.w1);
  // Not serving: nothing is passed, and nothing is passed to a worker that is not serving.
  f.w0->opened();
  EXPECT_EQ(f.w0->choose(), -1);
  f.w0->set_serving(true);
  EXPECT_EQ(f.w0->choose(), -1) << "worker 1 is not serving";
  f.w1->set_serving(true);
  EXPECT_TRUE(f.sup->serving(0) && f.sup->serving(1));
  // 1 against 0: pass to worker 1, counted there at once as pending.
  EXPECT_EQ(f.w0->choose(), 1);
  EXPECT_EQ(f.sup->pending(1), 1);
  // 1 against 0 + 1 pending: keep.
  EXPECT_EQ(f.w0->choose(), -1);
  EXPECT_EQ(f.w1->choose(), -1);
  f.w0->opened();  // kept: 2 against 1
  EXPECT_EQ(f.w0->choose(), 1);
  EXPECT_EQ(f.sup->pending(1), 2);
  // 2 against 0 + 2 pending: even, so worker 1 keeps its own; with one more it passes the
  // other way.
  EXPECT_EQ(f.w1->choose(), -1);
  f.w1->opened();
  EXPECT_EQ(f.w1->choose(), 0);
  EXPECT_EQ(f.sup->pending(0), 1);
  f.w0->closed();
  f.w0->closed();
  f.w0->closed();  // never below zero
  EXPECT_EQ(f.sup->connections(0), 0);
}

TEST(ConnBalance, APassedSocketIsTheSameConnection) {
  Fleet f;
  ASSERT_TRUE(f.serving());
  TcpPair tcp;
  ASSERT_GE(tcp.fd[1], 0);
  f.w0->opened();
  EXPECT_EQ(f.w1->take(), -1) << "empty inbox";
  const int to = f.w0->choose();
  ASSERT_EQ(to, 1);
  ASSERT_TRUE(f.w0->pass(to, tcp.fd[1]));
  ::close(tcp.fd[1]);  // the sender's copy
  tcp.fd[1] = -1;
  const int got = f.w1->take();
  ASSERT_GE(got, 0);
  EXPECT_EQ(f.sup->pending(1), 0);
  EXPECT_EQ(f.w1->take(), -1);
  // Close-on-exec, and the client's bytes arrive on it.
  EXPECT_NE(::fcntl(got, F_GETFD) & FD_CLOEXEC, 0);
  ASSERT_EQ(::write(tcp.fd[0], "ping", 4), 4);
  char buf[8] = {};
  ASSERT_EQ(::read(got, buf, sizeof buf), 4);
  EXPECT_EQ(std::memcmp(buf, "ping", 4), 0);
  ::close(got);
}

TEST(ConnBalance, AFullInboxKeepsTheConnectionAndAGoneWorkerIsCleared) {
  Fleet f;
  ASSERT_TRUE(f.serving());
  f.w1->opened();
  TcpPair tcp;
  ASSERT_GE(tcp.fd[1], 0);
  // Worker 1 does not read its inbox: passes stop at the inbox's limit, and a refused pass
  // takes back the pending count choose() gave.
  int sent = 0;
  for (; sent < 100000; ++sent) {
    if (!f.w0->pass(1, tcp.fd[1])) break;
  }
  // It holds a burst of connections: a socket pair's datagrams are bounded by its buffer, not
  // by net.unix.max_dgram_qlen (10), which applies to datagrams from unconnected senders.
  EXPECT_GE(sent, 100);
  EXPECT_LT(sent, 100000) << "the inbox never filled";
  f.w0->opened();
  f.w0->opened();
  ASSERT_EQ(f.w0->choose(), 1);
  EXPECT_EQ(f.sup->pending(1), 1);
  EXPECT_FALSE(f.w0->pass(1, tcp.fd[1]));
  EXPECT_EQ(f.sup->pending(1), 0);
  // The supervisor reaps worker 1: not serving, counts cleared, every waiting socket closed.
  f.sup->worker_gone(1);
  EXPECT_FALSE(f.sup->serving(1));
  EXPECT_EQ(f.sup->connections(1), 0);
  EXPECT_EQ(f.sup->pending(1), 0);
  EXPECT_EQ(f.w1->take(), -1);
  EXPECT_EQ(f.w0->choose(), -1) << "nothing goes to a worker that is not serving";
  // Only the test's own copy of the accepted end is left: closing it ends the connection.
  ::close(tcp.fd[1]);
  tcp.fd[1] = -1;
  char c = 0;
  EXPECT_EQ(::read(tcp.fd[0], &c, 1), 0) << "a passed copy outlived worker_gone";
}

TEST(ConnBalance, AttachRefusesWhatIsNotTheSupervisorsTable) {
  Fleet f;
  ASSERT_TRUE(f.sup);
  EXPECT_FALSE(Balancer::attach(f.sup->fd(), 2).ok()) << "slot beyond the workers";
  const int other = ::memfd_create("other", MFD_CLOEXEC);
  ASSERT_GE(other, 0);
  EXPECT_FALSE(Balancer::attach(other, 0).ok());
  ASSERT_EQ(::ftruncate(other, 1 << 20), 0);
  EXPECT_FALSE(Balancer::attach(other, 0).ok());
  ::close(other);
  EXPECT_FALSE(Balancer::create(0).ok());
  EXPECT_FALSE(Balancer::create(Balancer::kMaxWorkers + 1).ok());
  // Every fd a worker needs is in inherit_fds: the table and both ends of each inbox.
  EXPECT_EQ(f.sup->inherit_fds().size(), 1U + 2 * 2);
}

}  // namespace
