// `gridseal policy apply|show` and gridseal-sesd's [policy] require_approved
// (issue 7): the record of applied policies, the CLI against a real SoftHSM2
// token (audit), and the real daemon refusing an unapproved policy at start and
// on SIGHUP, serving it once applied.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "src/key_store.h"
#include "src/policy_record.h"
#include "tests/unit/run_command.h"
#include "tests/unit/sesd_fixture.h"

namespace {

using namespace std::chrono_literals;
using gs::test::CmdResult;
using gs::test::SesdDaemon;

const gs::Bytes kReadSt1 = {0x30, 0x00, 0x01};

template <typename Pred>
bool wait_for(Pred pred, std::chrono::milliseconds limit = 15000ms) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred())
      return true;
    std::this_thread::sleep_for(50ms);
  }
  return pred();
}

std::size_t count_of(const std::string &text, const std::string &what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos;
       at = text.find(what, at + 1))
    ++n;
  return n;
}

std::string read_only_policy(const std::string &subject) {
  return "[[client]]\nname = \"head-end\"\nsubject = \"" + subject +
         "\"\nclasses = [\"demand_response\"]\n";
}

TEST(PolicyRecord, BootstrapThenOnlyTheNewestAppliedIsApproved) {
  char tmpl[] = "/tmp/gs-polrec-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  {
    auto ks = gs::store::KeyStore::open(dir + "/s.db");
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    std::ofstream(dir + "/a.toml") << read_only_policy("x");
    std::ofstream(dir + "/b.toml") << read_only_policy("y");
    auto a = gs::policy::read_policy_file(dir + "/a.toml");
    auto b = gs::policy::read_policy_file(dir + "/b.toml");
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_NE(a->sha256, b->sha256);
    auto none = gs::policy::check_approved(ks->db(), "a.toml", a->sha256);
    ASSERT_TRUE(none.ok());
    EXPECT_EQ(*none, gs::policy::Approval::bootstrap);
    auto rec = gs::policy::record_applied(ks->db(), a->text, a->sha256,
                                          "operator:alice", 100);
    ASSERT_TRUE(rec.ok());
    EXPECT_EQ(*gs::policy::check_approved(ks->db(), "a.toml", a->sha256),
              gs::policy::Approval::approved);
    auto refused = gs::policy::check_approved(ks->db(), "b.toml", b->sha256);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.error().code, gs::Errc::conflict);
    EXPECT_NE(refused.error().detail.find(gs::to_hex(b->sha256)),
              std::string::npos);
    EXPECT_NE(refused.error().detail.find("operator:alice"), std::string::npos);
    ASSERT_TRUE(gs::policy::record_applied(ks->db(), b->text, b->sha256,
                                           "operator:bob", 200)
                    .ok());
    // Only the newest counts: a, applied before, is no longer served.
    EXPECT_FALSE(
        gs::policy::check_approved(ks->db(), "a.toml", a->sha256).ok());
    auto newest = gs::policy::newest_applied(ks->db(), true);
    ASSERT_TRUE(newest.ok() && newest->has_value());
    EXPECT_EQ((*newest)->content, b->text);
    EXPECT_EQ((*newest)->applied_by, "operator:bob");
    EXPECT_EQ((*newest)->size, static_cast<std::int64_t>(b->text.size()));
    // History is append-only.
    EXPECT_FALSE(
        ks->db().exec("UPDATE policy_applied SET applied_by = 'x'").ok());
    EXPECT_FALSE(ks->db().exec("DELETE FROM policy_applied").ok());
    // A bad file names its key; a missing one is an error, not a crash.
    std::ofstream(dir + "/bad.toml")
        << "[[client]]\nname = \"h\"\nsubject = \"s\"\n"
           "classes = [\"no_such_class\"]\n";
    auto bad = gs::policy::read_policy_file(dir + "/bad.toml");
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.error().message().find("classes"), std::string::npos)
        << bad.error().message();
    EXPECT_FALSE(gs::policy::read_policy_file(dir + "/missing.toml").ok());
  }
  std::filesystem::remove_all(dir);
}

// The CLI (real token, audit trail) and the real daemon.
TEST(PolicyApply, CliValidatesRecordsAuditsAndSesdEnforces) {
  gs::test::SesdOptions o;
  o.server_lines = {"processes = 1"};
  SesdDaemon d(o);
  ASSERT_TRUE(d.setup().ok());
  const std::string pol = d.dir() + "/policy.toml";

  // Nothing applied yet: the daemon starts with a warning (bootstrap) and
  // serves.
  CmdResult show0 = d.gridseal("policy show --json");
  ASSERT_EQ(show0.code, 0) << show0.out;
  EXPECT_EQ(show0.out, "null\n");

  // A bad file is refused with its key named and nothing recorded.
  std::ofstream(d.dir() + "/bad.toml") << "[classes.read]\nwindow = \"long\"\n";
  CmdResult bad = d.gridseal("policy apply " + d.dir() + "/bad.toml");
  EXPECT_EQ(bad.code, 1) << bad.out;
  EXPECT_NE(bad.out.find("classes.read.window"), std::string::npos) << bad.out;
  EXPECT_EQ(d.gridseal("policy show --json").out, "null\n");

  // Apply the fixture's policy: recorded, audited with its hash; again: nothing
  // changes.
  auto pf = gs::policy::read_policy_file(pol);
  ASSERT_TRUE(pf.ok());
  const std::string sha = gs::to_hex(pf->sha256);
  CmdResult ap = d.gridseal("policy apply " + pol + " --json");
  ASSERT_EQ(ap.code, 0) << ap.out;
  EXPECT_NE(ap.out.find("\"changed\":true"), std::string::npos) << ap.out;
  EXPECT_NE(ap.out.find("\"sha256\":\"" + sha + "\""), std::string::npos)
      << ap.out;
  CmdResult again = d.gridseal("policy apply " + pol);
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("already the applied policy"), std::string::npos)
      << again.out;
  CmdResult show = d.gridseal("policy show");
  EXPECT_NE(show.out.find("applied policy #1"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("applied by  bootstrap:"), std::string::npos)
      << show.out;
  CmdResult trail = d.gridseal("audit export --since 0");
  ASSERT_EQ(trail.code, 0) << trail.out;
  EXPECT_EQ(count_of(trail.out, "policy_applied"), 1U) << trail.out;
  EXPECT_NE(trail.out.find(sha), std::string::npos) << trail.out;

  // An unapproved file: the daemon refuses to start, naming the command that
  // approves it.
  d.write_policy(read_only_policy(d.client_subject()));
  EXPECT_FALSE(d.start().ok());
  EXPECT_FALSE(d.running());
  EXPECT_NE(d.err_log().find("policy refused (ses.require_approved_policy)"),
            std::string::npos)
      << d.err_log();
  EXPECT_NE(d.err_log().find("gridseal policy apply"), std::string::npos)
      << d.err_log();

  // Back to the applied file: it starts and serves reads.
  d.write_policy(pf->text);
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  auto read_code = [&](std::uint32_t id) {
    auto c = d.connect();
    if (!c.ok())
      return -100;
    auto r =
        (*c)->call(gs::test::sesd_request(d.meter_title(1), id, {kReadSt1}));
    if (!r.ok())
      return -101;
    if (gs::test::check_secured(*r, d.meter_key(1), d.pub_hex()).ok())
      return 0;
    return gs::test::error_reply(*r).code;
  };
  EXPECT_EQ(read_code(1), 0);

  // SIGHUP with an unapproved (valid) file: refused, old policy stays, audited
  // and counted.
  const std::string no_reads = read_only_policy(d.client_subject());
  d.write_policy(no_reads);
  ASSERT_EQ(kill(d.pid(), SIGHUP), 0);
  ASSERT_TRUE(wait_for([&] {
    return d.err_log().find("policy not reloaded") != std::string::npos;
  })) << d.err_log();
  EXPECT_EQ(read_code(2), 0);
  EXPECT_TRUE(wait_for([&] {
    return d.http_get("/metrics")
               .find("gridseal_ses_policy_reload_refused_total{worker=\"0\"} "
                     "1") != std::string::npos;
  })) << d.http_get("/metrics");

  // Applied: SIGHUP now switches to it (reads refused).
  CmdResult ap2 = d.gridseal("policy apply " + pol);
  ASSERT_EQ(ap2.code, 0) << ap2.out;
  ASSERT_EQ(kill(d.pid(), SIGHUP), 0);
  ASSERT_TRUE(wait_for([&] {
    return d.err_log().find("policy reloaded") != std::string::npos;
  })) << d.err_log();
  EXPECT_EQ(read_code(3), gs::c1222::kRespIsc);
  EXPECT_EQ(d.stop(), 0) << d.err_log();
  CmdResult trail2 = d.gridseal("audit export --since 0");
  EXPECT_EQ(count_of(trail2.out, "policy_reload_refused"), 1U) << trail2.out;
  EXPECT_EQ(count_of(trail2.out, "\"policy_reloaded\""), 1U) << trail2.out;
}

// With require_approved = false the file is served as read.
TEST(PolicyApply, RequireApprovedFalseServesAnyValidFile) {
  gs::test::SesdOptions o;
  o.server_lines = {"processes = 1"};
  SesdDaemon d(o);
  ASSERT_TRUE(d.setup().ok());
  ASSERT_EQ(d.gridseal("policy apply " + d.dir() + "/policy.toml").code, 0);
  d.write_policy(read_only_policy(d.client_subject()));
  {
    std::ofstream f(d.conf(), std::ios::app);
    f << "require_approved_policy = false\n";
  }
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  EXPECT_EQ(d.stop(), 0);
  std::string conf;
  {
    std::ifstream in(d.conf());
    conf.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto at = conf.find("require_approved_policy = false");
  ASSERT_NE(at, std::string::npos);
  conf.replace(at, 31, "require_approved_policy = 1");
  std::ofstream(d.conf()) << conf;
  EXPECT_FALSE(d.start().ok());
  EXPECT_NE(d.err_log().find("ses.require_approved_policy"), std::string::npos)
      << d.err_log();
}

} // namespace
