// The process model of gridseal-sesd against the real binary: worker processes sharing the port,
// a worker killed with SIGKILL under load is replaced and no invocation id is issued twice,
// SIGHUP reloads the policy (and keeps it when the new file is bad), /metrics merges the
// workers, a worker that cannot start fails the start-up.
#include <gtest/gtest.h>

#include <sched.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "src/daemon_main.h"
#include "src/supervisor.h"
#include "tests/unit/sesd_fixture.h"

namespace {

using namespace std::chrono_literals;
using gs::test::SesdDaemon;
using gs::test::SesdOptions;

const gs::Bytes kReadSt1 = {0x30, 0x00, 0x01};

// Child pids of `pid` (Linux /proc children list).
std::vector<pid_t> children(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  std::vector<pid_t> out;
  pid_t c = 0;
  while (f >> c) out.push_back(c);
  return out;
}

// The environment a process started with ("NAME=value" each).
std::vector<std::string> environment_of(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/environ", std::ios::binary);
  std::vector<std::string> out;
  std::string e;
  while (std::getline(f, e, '\0')) out.push_back(e);
  return out;
}

// Anonymous memory of process `pid` backed by transparent huge pages, in kB (-1: unreadable).
long anon_huge_kb(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/smaps_rollup");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("AnonHugePages:", 0) == 0) return std::stol(line.substr(14));
  }
  return -1;
}

// The kernel's transparent-huge-page mode ("always", "madvise" or "never"; "" when unknown).
std::string thp_mode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string all;
  std::getline(f, all);
  const auto open = all.find('['), close = all.find(']');
  return open == std::string::npos || close == std::string::npos
             ? std::string()
             : all.substr(open + 1, close - open - 1);
}

// Each thread of process `pid` by name (/proc/PID/task/TID/comm), with its scheduling policy
// (sched_getscheduler).
std::multimap<std::string, int> thread_policies(pid_t pid) {
  std::multimap<std::string, int> out;
  std::error_code ec;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  for (const auto& t : std::filesystem::directory_iterator(dir, ec)) {
    std::ifstream f(t.path() / "comm");
    std::string name;
    if (!std::getline(f, name)) continue;
    out.emplace(name, sched_getscheduler(static_cast<pid_t>(std::stol(t.path().filename()))));
  }
  return out;
}

// The names of the threads of process `pid`.
std::multiset<std::string> thread_names(pid_t pid) {
  std::multiset<std::string> out;
  for (const auto& [name, policy] : thread_policies(pid)) out.insert(name);
  return out;
}

// Waits (bounded) until `pred` holds.
template <typename Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit = 15000ms) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return pred();
}

std::size_t count_of(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

SesdOptions two_workers(std::size_t meters = 8) {
  SesdOptions o;
  o.meters = meters;
  o.server_lines = {"processes = 2", "worker_threads = 2"};
  o.ses_lines = {"id_block_size = 16"};  // many block reservations, so a crash skips some
  return o;
}

TEST(SesdSupervisor, WorkersShareThePortAndMetricsAreMerged) {
  SesdDaemon d(two_workers());
  ASSERT_TRUE(d.setup().ok());
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  EXPECT_TRUE(wait_for([&] { return children(d.pid()).size() == 2; }));
  // Each worker got the allocator tunables (or the value this test process was given).
  const char* inherited = std::getenv("GLIBC_TUNABLES");
  const std::string want = std::string("GLIBC_TUNABLES=") +
                           (inherited != nullptr ? inherited : gs::daemon::kWorkerGlibcTunables);
  // ... and jemalloc's huge-page settings (or the value this test process was given).
  const char* inherited_conf = std::getenv("MALLOC_CONF");
  const std::string want_conf =
      std::string("MALLOC_CONF=") +
      (inherited_conf != nullptr ? inherited_conf : gs::daemon::kWorkerMallocConf);
  for (pid_t c : children(d.pid())) {
    const std::vector<std::string> env = environment_of(c);
    EXPECT_EQ(std::count(env.begin(), env.end(), want), 1) << "worker pid " << c;
    EXPECT_EQ(std::count(env.begin(), env.end(), want_conf), 1) << "worker pid " << c;
  }
#ifdef GS_DAEMONS_USE_JEMALLOC
  // With the default and a kernel that grants huge pages on madvise, jemalloc's heap is on them
  // from the start (the arenas it maps at start-up).
  const std::string mode = thp_mode();
  if (inherited_conf == nullptr && (mode == "always" || mode == "madvise")) {
    for (pid_t c : children(d.pid())) {
      EXPECT_GT(anon_huge_kb(c), 0) << "worker pid " << c << ", THP mode " << mode;
    }
  }
#endif
  // Enough connections that both workers get some (the kernel spreads them by hash).
  for (int i = 0; i < 16; ++i) {
    auto c = d.connect();
    ASSERT_TRUE(c.ok());
    auto r = (*c)->call(gs::test::sesd_request(d.meter_title(1), 1, {kReadSt1}));
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE(gs::test::check_secured(*r, d.meter_key(1), d.pub_hex()).ok());
  }
  // The start-up line names the allocator; the build links the daemons with jemalloc unless
  // GS_JEMALLOC is off or it is a sanitizer build.
#ifdef GS_DAEMONS_USE_JEMALLOC
  EXPECT_NE(d.out_log().find("handler threads, jemalloc "), std::string::npos) << d.out_log();
#else
  EXPECT_NE(d.out_log().find("handler threads, default malloc"), std::string::npos) << d.out_log();
#endif
  // Every long-lived thread of a worker is named (top -H, perf, gdb). The audit writer lost its
  // name once when a revert restored an older audit.cc.
  for (pid_t c : children(d.pid())) {
    const std::multiset<std::string> names = thread_names(c);
    std::string all;
    for (const auto& n : names) all += n + " ";
    for (const char* want_name :
         {"gs-io", "gs-handler", "gs-audit", "gs-checkpoint", "gs-ids", "gs-link"}) {
      EXPECT_GE(names.count(want_name), 1u) << "worker pid " << c << ": " << all;
    }
    EXPECT_EQ(names.count("exe"), 0u) << "worker pid " << c << ": " << all;
    // server.sched_batch (the SES default): the event loop and the audit writer under
    // SCHED_BATCH, the handler under the default policy.
    for (const auto& [name, policy] : thread_policies(c)) {
      if (name == "gs-io" || name == "gs-audit") {
        EXPECT_EQ(policy, SCHED_BATCH) << name << " of worker pid " << c;
      } else if (name == "gs-handler") {
        EXPECT_EQ(policy, SCHED_OTHER) << name << " of worker pid " << c;
      }
    }
  }
  const std::string m = d.http_get("/metrics");
  EXPECT_NE(m.find("gridseal_workers_ready 2"), std::string::npos) << m.substr(0, 2000);
  EXPECT_NE(m.find("worker=\"0\""), std::string::npos);
  EXPECT_NE(m.find("worker=\"1\""), std::string::npos);
  // One HELP/TYPE per family even with two workers.
  EXPECT_EQ(count_of(m, "# TYPE gridseal_ses_requests_total "), 1U);
  EXPECT_NE(d.http_get("/healthz").find("200 OK"), std::string::npos);
  EXPECT_EQ(d.stop(), 0);
  EXPECT_NE(d.err_log().find("worker 1 (pid"), std::string::npos);
}

// The pid of worker `index` among the children of `pid` (its --worker flag).
pid_t worker_pid(pid_t pid, int index) {
  for (pid_t c : children(pid)) {
    std::ifstream f("/proc/" + std::to_string(c) + "/cmdline");
    std::string cmd((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::replace(cmd.begin(), cmd.end(), '\0', ' ');
    if (cmd.find(" --worker " + std::to_string(index) + " ") != std::string::npos) return c;
  }
  return 0;
}

// gridseal_server_connections_active of each worker in a /metrics text.
std::map<std::string, int> active_connections(const std::string& metrics) {
  std::map<std::string, int> out;
  std::istringstream lines(metrics);
  const std::string family = "gridseal_server_connections_active{worker=\"";
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind(family, 0) != 0) continue;
    const auto q = line.find('"', family.size());
    out[line.substr(family.size(), q - family.size())] = std::stoi(line.substr(line.rfind(' ') + 1));
  }
  return out;
}

// Registrations in the epoll instances of process `pid` whose target is not the open file now
// at that fd number ("fd N: ..."): an fd closed (or reused) while still registered, because
// another process holds the same open file. Empty when every registration is live.
std::vector<std::string> stale_epoll_registrations(pid_t pid) {
  std::vector<std::string> out;
  const std::string base = "/proc/" + std::to_string(pid);
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(base + "/fd", ec)) {
    if (std::filesystem::read_symlink(e.path(), ec).string() != "anon_inode:[eventpoll]") continue;
    std::ifstream info(base + "/fdinfo/" + e.path().filename().string());
    for (std::string line; std::getline(info, line);) {
      if (line.rfind("tfd:", 0) != 0) continue;
      std::istringstream in(line);
      std::string word, tfd, ino;
      while (in >> word) {
        if (word == "tfd:") in >> tfd;
        if (word.rfind("ino:", 0) == 0) ino = word.substr(4);
      }
      struct stat st {};
      const std::string target = base + "/fd/" + tfd;
      if (::stat(target.c_str(), &st) != 0 || ino.empty() ||
          st.st_ino != std::stoull(ino, nullptr, 16)) {
        out.push_back("fd " + tfd + ": " + line);
      }
    }
  }
  return out;
}

// The detector above finds a registration left behind: a socket registered in an epoll and
// closed while a duplicate keeps its open file alive.
TEST(SesdSupervisor, StaleEpollRegistrationsAreFound) {
  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  ASSERT_GE(ep, 0);
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ASSERT_EQ(::epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &ev), 0);
  EXPECT_TRUE(stale_epoll_registrations(::getpid()).empty());
  const int dup = ::fcntl(sv[0], F_DUPFD_CLOEXEC, 0);
  ASSERT_GE(dup, 0);
  ::close(sv[0]);
  EXPECT_EQ(stale_epoll_registrations(::getpid()).size(), 1U);
  ::close(dup);
  EXPECT_TRUE(stale_epoll_registrations(::getpid()).empty());
  ::close(sv[1]);
  ::close(ep);
}

// server.balance_connections (the default): 40 connections over two workers end up 20 and 20,
// whatever the kernel's SO_REUSEPORT hash chose (an even split by chance: about one time in
// eight). When a worker is killed, its replacement starts from zero: the next 20 connections all
// end up on it.
TEST(SesdSupervisor, ConnectionsAreSpreadEvenlyOverTheWorkers) {
  SesdDaemon d(two_workers());
  ASSERT_TRUE(d.setup().ok());
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  ASSERT_TRUE(wait_for([&] { return children(d.pid()).size() == 2; }));
  std::vector<std::unique_ptr<gs::server::Client>> conns;
  auto open_and_call = [&](int n) {
    for (int i = 0; i < n; ++i) {
      auto c = d.connect();
      ASSERT_TRUE(c.ok()) << c.error().message();
      auto r = (*c)->call(gs::test::sesd_request(d.meter_title(1), 1, {kReadSt1}));
      ASSERT_TRUE(r.ok()) << r.error().message();
      EXPECT_TRUE(gs::test::check_secured(*r, d.meter_key(1), d.pub_hex()).ok());
      conns.push_back(std::move(*c));
    }
  };
  open_and_call(40);
  std::map<std::string, int> want{{"0", 20}, {"1", 20}};
  EXPECT_TRUE(wait_for([&] { return active_connections(d.http_get("/metrics")) == want; }))
      << d.http_get("/metrics");
  // A passed socket left the sender's event loop: each worker's epoll holds only sockets it
  // has open. A registration left behind would wake the sender for every byte the receiver gets.
  for (pid_t c : children(d.pid())) {
    const auto stale = stale_epoll_registrations(c);
    EXPECT_TRUE(stale.empty()) << "worker pid " << c << ": " << stale.size() << ", first "
                               << stale.front();
  }

  const pid_t victim = worker_pid(d.pid(), 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  ASSERT_TRUE(wait_for([&] {
    const pid_t now = worker_pid(d.pid(), 1);
    return now > 0 && now != victim &&
           d.err_log().find("worker 1 ready", d.err_log().find("killed by signal 9")) !=
               std::string::npos;
  })) << d.err_log();
  open_and_call(20);
  EXPECT_TRUE(wait_for([&] { return active_connections(d.http_get("/metrics")) == want; }))
      << d.http_get("/metrics");
  conns.clear();
  EXPECT_EQ(d.stop(), 0) << d.err_log();
}

TEST(SesdSupervisor, KilledWorkerIsReplacedUnderLoadAndNoInvocationIdRepeats) {
  SesdDaemon d(two_workers(64));
  ASSERT_TRUE(d.setup().ok());
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  ASSERT_TRUE(wait_for([&] { return children(d.pid()).size() == 2; }));
  const std::vector<pid_t> before = children(d.pid());

  std::mutex mu;
  std::vector<std::uint64_t> ids;
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> after_kill{0};
  std::atomic<bool> killed{false};
  std::vector<std::thread> load;
  for (int t = 0; t < 4; ++t) {
    load.emplace_back([&, t] {
      std::uint32_t n = 0;
      while (!stop.load()) {
        auto c = d.connect();
        if (!c.ok()) {
          ++failures;
          std::this_thread::sleep_for(20ms);
          continue;
        }
        // Pipelined bursts of 8 on one connection until it breaks.
        while (!stop.load()) {
          std::vector<std::size_t> meters;
          gs::Bytes burst;
          for (int k = 0; k < 8; ++k) {
            const std::size_t meter = 1 + (n * 7 + static_cast<std::uint32_t>(t)) % 64;
            const gs::Bytes req = gs::test::sesd_request(d.meter_title(meter), ++n, {kReadSt1});
            burst.insert(burst.end(), req.begin(), req.end());
            meters.push_back(meter);
          }
          if (!(*c)->send(burst).ok()) break;
          bool broken = false;
          for (std::size_t meter : meters) {
            auto r = (*c)->receive();
            if (!r.ok()) {
              broken = true;
              break;
            }
            auto chk = gs::test::check_secured(*r, d.meter_key(meter), d.pub_hex());
            if (!chk.ok()) {
              ++failures;
              continue;
            }
            std::lock_guard<std::mutex> lock(mu);
            ids.push_back(chk->invocation_id);
            if (killed.load()) ++after_kill;
          }
          if (broken) {
            ++failures;
            break;
          }
        }
      }
    });
  }

  std::this_thread::sleep_for(1500ms);
  ASSERT_EQ(before.size(), 2U);
  ASSERT_EQ(kill(before[0], SIGKILL), 0);
  killed = true;
  const bool replaced = wait_for([&] {
    auto now = children(d.pid());
    return now.size() == 2 && std::find(now.begin(), now.end(), before[0]) == now.end() &&
           d.err_log().find("ready", d.err_log().find("killed by signal 9")) != std::string::npos;
  });
  // Keep the load on the new worker for a while.
  std::this_thread::sleep_for(1500ms);
  stop = true;
  for (auto& th : load) th.join();

  EXPECT_TRUE(replaced) << d.err_log();
  EXPECT_TRUE(d.running());
  EXPECT_GT(after_kill.load(), 0);
  std::set<std::uint64_t> unique(ids.begin(), ids.end());
  EXPECT_GT(ids.size(), 100U);
  EXPECT_EQ(unique.size(), ids.size()) << "an invocation id was issued twice";
  EXPECT_NE(d.err_log().find("restarting"), std::string::npos);
  const std::string m = d.http_get("/metrics");
  EXPECT_NE(m.find("gridseal_worker_restarts_total 1"), std::string::npos);
  // The workers reserved most of their id blocks ahead, on their gs-ids threads.
  double ahead = 0;
  std::istringstream lines(m);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("gridseal_ses_invocation_id_blocks{", 0) == 0 &&
        line.find("reserved=\"ahead\"") != std::string::npos) {
      ahead += std::stod(line.substr(line.rfind(' ') + 1));
    }
  }
  EXPECT_GT(ahead, 0) << m;
  EXPECT_EQ(d.stop(), 0) << d.err_log();
}

TEST(SesdSupervisor, SighupReloadsThePolicyAndKeepsItWhenTheNewFileIsBad) {
  SesdDaemon d(two_workers());
  ASSERT_TRUE(d.setup().ok());
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  auto read_code = [&](std::uint32_t id) {
    auto c = d.connect();
    if (!c.ok()) return -100;
    auto r = (*c)->call(gs::test::sesd_request(d.meter_title(1), id, {kReadSt1}));
    if (!r.ok()) return -101;
    if (gs::test::check_secured(*r, d.meter_key(1), d.pub_hex()).ok()) return 0;
    return gs::test::error_reply(*r).code;
  };
  EXPECT_EQ(read_code(1), 0);

  // Reads no longer allowed for the client: every worker must refuse them after SIGHUP.
  d.write_policy("[[client]]\nname = \"head-end\"\nsubject = \"" + d.client_subject() +
                 "\"\nclasses = [\"demand_response\"]\n");
  ASSERT_EQ(kill(d.pid(), SIGHUP), 0);
  ASSERT_TRUE(wait_for([&] { return count_of(d.err_log(), "policy reloaded") == 2; }))
      << d.err_log();
  for (std::uint32_t i = 0; i < 12; ++i) EXPECT_EQ(read_code(10 + i), gs::c1222::kRespIsc) << i;

  // A broken file is refused by the supervisor; the workers keep the last good policy.
  d.write_policy("[[client]]\nname = 1\n");
  ASSERT_EQ(kill(d.pid(), SIGHUP), 0);
  ASSERT_TRUE(wait_for([&] { return d.err_log().find("reload refused") != std::string::npos; }));
  EXPECT_EQ(count_of(d.err_log(), "policy reloaded"), 2U);
  EXPECT_EQ(read_code(30), gs::c1222::kRespIsc);
  EXPECT_TRUE(d.running());
  EXPECT_EQ(d.stop(), 0);
}

TEST(SesdSupervisor, WorkerThatCannotStartFailsTheStartUp) {
  SesdDaemon d(two_workers());
  ASSERT_TRUE(d.setup().ok());
  // The supervisor checks config and policy; the HSM is opened by the workers only.
  std::filesystem::remove(d.dir() + "/hsm/user.pin");
  auto st = d.start();
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().message().find("start-up failed"), std::string::npos)
      << st.error().message();
  EXPECT_FALSE(d.running());
}

// The sd_notify protocol as systemd sees it (Type=notify, WatchdogSec): a datagram socket in
// NOTIFY_SOCKET gets READY=1 once the workers serve, WATCHDOG=1 repeatedly, STOPPING=1.
TEST(SesdSupervisor, TellsSystemdReadyWatchdogAndStopping) {
  SesdDaemon d(two_workers());
  ASSERT_TRUE(d.setup().ok());
  const std::string path = d.dir() + "/notify.sock";
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  ASSERT_LT(path.size(), sizeof sa.sun_path);
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  timeval tv{0, 200000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  ::setenv("WATCHDOG_USEC", "400000", 1);  // WATCHDOG=1 every 200 ms
  auto st = d.start();
  ::unsetenv("NOTIFY_SOCKET");
  ::unsetenv("WATCHDOG_USEC");
  ASSERT_TRUE(st.ok()) << d.err_log();
  std::string got;
  auto drain = [&] {
    char buf[256];
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) got += std::string(buf, n) + "\n";
  };
  wait_for([&] {
    drain();
    return count_of(got, "WATCHDOG=1") >= 2;
  }, 5000ms);
  EXPECT_EQ(count_of(got, "READY=1"), 1U) << got;
  EXPECT_GE(count_of(got, "WATCHDOG=1"), 2U) << got;
  EXPECT_EQ(d.stop(), 0);
  drain();
  EXPECT_NE(got.find("STOPPING=1"), std::string::npos) << got;
  ::close(fd);
}

// The shipped unit file parses (systemd-analyze verify, with ExecStart pointing at this build).
TEST(SystemdUnit, SesdUnitVerifies) {
  if (gs::test::run_command("command -v systemd-analyze").code != 0) {
    GTEST_SKIP() << "systemd-analyze is not installed";
  }
  std::string unit = gs::test::slurp(std::string(GS_SOURCE_DIR) + "/conf/systemd/gridseal-sesd.service");
  ASSERT_FALSE(unit.empty());
  for (auto at = unit.find("/usr/local/bin/gridseal-sesd"); at != std::string::npos;
       at = unit.find("/usr/local/bin/gridseal-sesd")) {
    unit.replace(at, 28, std::string(GS_BIN_DIR) + "/gridseal-sesd");
  }
  char tmpl[] = "/tmp/gs-unit-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string file = std::string(tmpl) + "/gridseal-sesd.service";
  std::ofstream(file) << unit;
  auto r = gs::test::run_command("systemd-analyze verify " + file);
  std::filesystem::remove_all(tmpl);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.find("gridseal-sesd.service:"), std::string::npos) << r.out;
}

TEST(WorkerEnvironment, AddsEachDefaultTheSupervisorDoesNotHave) {
  const char* base[] = {"PATH=/usr/bin", "GLIBC_TUNABLES_NOTE=x", "LANG=C", nullptr};
  const auto env = gs::supervisor::worker_environment(
      base, {{"GLIBC_TUNABLES", "glibc.malloc.tcache_count=1000"}, {"LANG", "de_DE.UTF-8"}});
  // LANG was set: kept as it was, not added twice; a longer name with the same prefix does not
  // count as GLIBC_TUNABLES.
  EXPECT_EQ(env, (std::vector<std::string>{"PATH=/usr/bin", "GLIBC_TUNABLES_NOTE=x", "LANG=C",
                                           "GLIBC_TUNABLES=glibc.malloc.tcache_count=1000"}));
  EXPECT_EQ(gs::supervisor::worker_environment(nullptr, {{"A", "1"}}),
            (std::vector<std::string>{"A=1"}));
}

TEST(MergeExpositions, AddsTheWorkerLabelAndKeepsOneHeaderPerFamily) {
  const std::string a =
      "# HELP x_total Things\n# TYPE x_total counter\nx_total{k=\"v\"} 1\n"
      "# HELP h Latency\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 0.5\nh_count 2\n";
  const std::string b = "# HELP x_total Things\n# TYPE x_total counter\nx_total{k=\"v\"} 3\n";
  const std::string own = "# HELP up Up\n# TYPE up gauge\nup 1\n";
  const std::string m =
      gs::supervisor::merge_expositions({{"", own}, {"0", a}, {"1", b}}, "worker");
  EXPECT_EQ(m,
            "# HELP h Latency\n# TYPE h histogram\n"
            "h_bucket{worker=\"0\",le=\"1\"} 2\nh_sum{worker=\"0\"} 0.5\nh_count{worker=\"0\"} 2\n"
            "# HELP up Up\n# TYPE up gauge\nup 1\n"
            "# HELP x_total Things\n# TYPE x_total counter\n"
            "x_total{worker=\"0\",k=\"v\"} 1\nx_total{worker=\"1\",k=\"v\"} 3\n");
}

}  // namespace
