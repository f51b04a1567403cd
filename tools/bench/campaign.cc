// gridseal-bench rollover: the `gridseal rollover` CLI driven as a child process (see campaign.h).
#include "tools/bench/campaign.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "c1222/oid.h"
#include "src/config.h"
#include "src/key_store.h"

extern char** environ;

namespace gs::bench {

namespace {

constexpr std::size_t kMaxOutput = 1 << 20;  // what a CLI call may print

struct Run {
  int code = -1;    // exit status; -1 killed or not started
  std::string out;  // stdout then nothing else: stderr is kept apart
  std::string err;
};

// Runs argv (no shell: paths may hold anything), stdout and stderr captured up to kMaxOutput
// each, killed after `timeout`.
Result<Run> run_program(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) return Error(Errc::os_failure, "pipe failed");
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    close(out_pipe[0]), close(out_pipe[1]);
    return Error(Errc::os_failure, "pipe failed");
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out_pipe[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&fa, err_pipe[1], STDERR_FILENO);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (rc != 0) {
    close(out_pipe[0]), close(err_pipe[0]);
    return Error(Errc::os_failure, "cannot run " + argv[0] + ": " + std::strerror(rc));
  }
  Run r;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&r.out, &r.err};
  int open_fds = 2;
  bool timed_out = false;
  while (open_fds > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    const int n = ::poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[8192];
      const ssize_t got = ::read(fds[i].fd, buf, sizeof buf);
      if (got > 0) {
        if (sinks[i]->size() < kMaxOutput) {
          sinks[i]->append(buf,
                           std::min(static_cast<std::size_t>(got), kMaxOutput - sinks[i]->size()));
        }
        continue;
      }
      if (got < 0 && errno == EINTR) continue;
      close(fds[i].fd);
      fds[i].fd = -1;
      --open_fds;
    }
  }
  for (pollfd& p : fds) {
    if (p.fd >= 0) close(p.fd);
  }
  if (timed_out) kill(pid, SIGKILL);  // our own child, by its pid
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    return Error(Errc::busy,
                 argv[0] + " did not finish within " + std::to_string(timeout.count()) + " ms");
  }
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string first_line(const std::string& s) {
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// The failure of a CLI call, with what it printed on stderr.
Error cli_error(const std::vector<std::string>& argv, const Run& r) {
  std::string what = "`gridseal";
  for (std::size_t i = 1; i < argv.size() && i < 4; ++i) what += " " + argv[i];
  what += " ...` exited " + std::to_string(r.code);
  const std::string msg = first_line(r.err.empty() ? r.out : r.err);
  if (!msg.empty()) what += ": " + msg;
  return Error(Errc::storage_failure, what);
}

// The text after "\"key\":" (the first occurrence), or npos.
std::size_t value_at(const std::string& json, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  const auto at = json.find(k);
  return at == std::string::npos ? at : at + k.size();
}

Result<std::int64_t> number(const std::string& json, const std::string& key) {
  const auto at = value_at(json, key);
  if (at == std::string::npos || at >= json.size()) {
    return Error(Errc::missing_element, "no \"" + key + "\" in the CLI's JSON");
  }
  char* end = nullptr;
  const long long v = std::strtoll(json.c_str() + at, &end, 10);
  if (end == json.c_str() + at) {
    return Error(Errc::bad_value, "\"" + key + "\" is not a number in the CLI's JSON");
  }
  return static_cast<std::int64_t>(v);
}

// A JSON string starting at `at` (its opening quote); `*next` gets the position after it.
std::string string_at(const std::string& json, std::size_t at, std::size_t* next) {
  std::string s;
  if (at >= json.size() || json[at] != '"') {
    *next = at;
    return s;
  }
  std::size_t i = at + 1;
  for (; i < json.size() && json[i] != '"'; ++i) {
    if (json[i] == '\\' && i + 1 < json.size()) ++i;  // \" \\ \uXXXX kept as their last char
    s += json[i];
  }
  *next = i + 1;
  return s;
}

}  // namespace

std::string gridseal_next_to_self() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "";
  std::string self(buf, static_cast<std::size_t>(n));
  const auto slash = self.rfind('/');
  if (slash == std::string::npos) return "";
  std::string path = self.substr(0, slash + 1) + "gridseal";
  return access(path.c_str(), X_OK) == 0 ? path : "";
}

Result<std::vector<std::string>> meter_ids_for_titles(const std::string& config_path,
                                                      const std::string& prefix,
                                                      std::uint64_t first, std::uint64_t count) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return cfg.error();  // it names the file
  GS_ASSIGN(auto ks, store::KeyStore::open(cfg->store.path, {.create = false, .read_only = true}));
  std::vector<std::string> ids;
  ids.reserve(static_cast<std::size_t>(count));
  for (std::uint64_t n = first; n < first + count; ++n) {
    const std::string text = prefix + "." + std::to_string(n);
    GS_ASSIGN(auto title, c1222::OwnedApTitle::parse(text));
    GS_ASSIGN(auto m, ks.meter_by_title(title.view().absolute(c1222::default_base_oid())));
    if (!m) return Error(Errc::not_found, "meter " + text + " is not registered in the store");
    ids.push_back(m->meter_id);
  }
  return ids;
}

Result<std::int64_t> start_campaign(const CampaignCli& cli, const std::vector<std::string>& ids,
                                    double rate, std::int64_t* skipped) {
  char tmpl[] = "/tmp/gridseal-bench-rekey-XXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd < 0) return Error(Errc::os_failure, "mkstemp failed");
  close(fd);
  const std::string file = tmpl;
  {
    std::ofstream f(file, std::ios::trunc);
    f << "# meters rekeyed by gridseal-bench rollover\n";
    for (const std::string& id : ids) f << id << '\n';
    if (!f.flush()) {
      unlink(file.c_str());
      return Error(Errc::storage_failure, "cannot write " + file);
    }
  }
  std::vector<std::string> argv = {cli.gridseal, "rollover", "start",    "--file",
                                   file,         "--config", cli.config, "--json"};
  if (rate > 0) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", rate);
    argv.insert(argv.end(), {"--rate", buf});
  }
  auto r = run_program(argv, cli.timeout);
  unlink(file.c_str());
  if (!r.ok()) return r.error();
  if (r->code != 0) return cli_error(argv, *r);
  GS_ASSIGN(const std::int64_t id, number(r->out, "campaign"));
  if (skipped != nullptr) {
    auto s = number(r->out, "skipped_total");
    *skipped = s.ok() ? *s : 0;
  }
  return id;
}

Result<CampaignStatus> campaign_status(const CampaignCli& cli, std::int64_t id) {
  const std::vector<std::string> argv = {cli.gridseal, "rollover", "status", std::to_string(id),
                                         "--config",   cli.config, "--json"};
  GS_ASSIGN(const Run r, run_program(argv, cli.timeout));
  if (r.code != 0) return cli_error(argv, r);
  return parse_campaign_status(r.out);
}

Result<CampaignStatus> parse_campaign_status(const std::string& json) {
  CampaignStatus s;
  GS_ASSIGN(s.id, number(json, "id"));
  GS_ASSIGN(s.total, number(json, "total"));
  GS_ASSIGN(s.created_at, number(json, "created_at"));
  GS_ASSIGN(s.queued, number(json, "queued"));
  GS_ASSIGN(s.prepared, number(json, "prepared"));
  GS_ASSIGN(s.sent, number(json, "sent"));
  GS_ASSIGN(s.confirmed, number(json, "confirmed"));
  GS_ASSIGN(s.failed, number(json, "failed"));
  GS_ASSIGN(s.aborted, number(json, "aborted"));
  GS_ASSIGN(s.first_confirm_at, number(json, "first_confirm_at"));
  GS_ASSIGN(s.last_confirm_at, number(json, "last_confirm_at"));
  GS_ASSIGN(s.confirm_rate_per_hour, number(json, "confirm_rate_per_hour"));
  std::size_t next = 0;
  const auto st = value_at(json, "state");
  if (st == std::string::npos)
    return Error(Errc::missing_element, "no \"state\" in the CLI's JSON");
  s.state = string_at(json, st, &next);
  const auto fin = value_at(json, "finished");
  if (fin == std::string::npos) {
    return Error(Errc::missing_element, "no \"finished\" in the CLI's JSON");
  }
  s.finished = json.compare(fin, 4, "true") == 0;
  for (auto at = json.find("\"meter_id\":"); at != std::string::npos;
       at = json.find("\"meter_id\":", next)) {
    std::string id = string_at(json, at + 11, &next);
    std::string error;
    const auto e = json.find("\"error\":", next);
    if (e != std::string::npos && e < json.find('}', next)) error = string_at(json, e + 8, &next);
    s.failed_meters.emplace_back(std::move(id), std::move(error));
  }
  return s;
}

}  // namespace gs::bench
