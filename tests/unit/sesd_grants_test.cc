// Rate-limit grants against the real gridseal-sesd and `gridseal grants`: the bound is exact
// across two worker processes, rows not signed by gs-audit (forged, or tampered after issue) are
// refused, expiry and revocation stop a grant, and kill -9 of the whole daemon mid-grant loses
// units but never spends more than the grant.
#include <gtest/gtest.h>

#include <atomic>
#include <ctime>
#include <fstream>
#include <mutex>
#include <thread>

#include "src/grants.h"
#include "src/sqlite.h"
#include "tests/unit/audit_rows.h"
#include "tests/unit/sesd_fixture.h"

namespace {

using namespace std::chrono_literals;
using gs::test::SesdDaemon;
using gs::test::SesdOptions;

// SP-26 remote connect/disconnect (PROFILE-VECTORS example 1): class connect_disconnect.
const gs::Bytes kDisconnect = gs::test::hex_bytes("40000700051a00000200e4");

std::string policy_text(const std::string& subject, int burst) {
  return "[procedures]\nconnect_disconnect = [\"SP-26\"]\n"
         "[classes.connect_disconnect]\n"
         "fleet = { count = 1, per = 3600, burst = " +
         std::to_string(burst) +
         " }\n"
         "[[client]]\nname = \"head-end\"\nsubject = \"" +
         subject +
         "\"\nclasses = [\"read\", \"connect_disconnect\"]\n"
         "[[client]]\nname = \"other\"\nsubject = \"CN=other\"\nclasses = [\"read\"]\n";
}

SesdOptions options(int processes, int burst, std::size_t meters = 40) {
  SesdOptions o;
  o.meters = meters;
  o.policy = policy_text("plain:127.0.0.1", burst);
  o.server_lines = {"processes = " + std::to_string(processes), "worker_threads = 2"};
  return o;
}

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

std::vector<pid_t> children(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  std::vector<pid_t> out;
  pid_t c = 0;
  while (f >> c) out.push_back(c);
  return out;
}

// The value of "key":"..." or "key":123 in one JSON object text.
std::string json_field(const std::string& json, const std::string& key) {
  const std::string k = "\"" + key + "\":";
  auto at = json.find(k);
  if (at == std::string::npos) return "";
  at += k.size();
  if (json[at] == '"') {
    const auto end = json.find('"', at + 1);
    return json.substr(at + 1, end - at - 1);
  }
  const auto end = json.find_first_of(",}", at);
  return json.substr(at, end - at);
}

std::string issue(const SesdDaemon& d, int units, int expires_in) {
  auto r = d.gridseal("grants issue --client head-end --class connect_disconnect --meters " +
                      std::to_string(units) + " --expires-in " + std::to_string(expires_in) +
                      " --reason \"storm restoration\" --json");
  EXPECT_EQ(r.code, 0) << r.out;
  return json_field(r.out, "id");
}

struct Tally {
  int secured = 0;
  int isc = 0;
  int other = 0;
};

// `n` disconnects to meters 1..meters in turn, `per_conn` per connection (so that connections,
// and the requests on them, spread over the worker processes), from `threads` threads.
Tally send_disconnects(const SesdDaemon& d, int n, std::uint32_t first_id, int threads = 4,
                       int per_conn = 4) {
  std::mutex mu;
  Tally t;
  std::atomic<int> next{0};
  std::vector<std::thread> ts;
  for (int k = 0; k < threads; ++k) {
    ts.emplace_back([&] {
      for (;;) {
        const int start = next.fetch_add(per_conn);
        if (start >= n) return;
        auto c = d.connect();
        for (int i = start; i < std::min(n, start + per_conn); ++i) {
          const std::size_t meter = 1 + static_cast<std::size_t>(i) % d.options().meters;
          Tally one;
          if (!c.ok()) {
            one.other = 1;
          } else {
            auto r = (*c)->call(gs::test::sesd_request(d.meter_title(meter),
                                                       first_id + static_cast<std::uint32_t>(i),
                                                       {kDisconnect}));
            if (!r.ok()) {
              one.other = 1;
            } else if (gs::test::check_secured(*r, d.meter_key(meter), d.pub_hex()).ok()) {
              one.secured = 1;
            } else if (gs::test::error_reply(*r).code == gs::c1222::kRespIsc) {
              one.isc = 1;
            } else {
              one.other = 1;
            }
          }
          std::lock_guard lock(mu);
          t.secured += one.secured;
          t.isc += one.isc;
          t.other += one.other;
        }
      }
    });
  }
  for (auto& th : ts) th.join();
  return t;
}

gs::db::Db open_db(const SesdDaemon& d) {
  return gs::db::Db::open(d.dir() + "/gridseal.db", {.create = false}).value();
}

// Secured-command audit records that name grant `id`.
std::size_t grant_records(const SesdDaemon& d, const std::string& id) {
  auto db = open_db(d);
  std::size_t n = 0;
  for (const auto& r : gs::test::audit_records(db, "command")) {
    n += r.detail.find("\"grant\":\"" + id + "\"") != std::string::npos ? 1 : 0;
  }
  return n;
}

std::int64_t reserved(const SesdDaemon& d, const std::string& id) {
  auto db = open_db(d);
  auto g = gs::grants::GrantStore(db).find(id);
  return g.ok() && g->has_value() ? (*g)->reserved : -1;
}

// SIGHUP to the supervisor and a bounded wait until every worker re-read (grants are re-read at
// their next use after it).
void reload(const SesdDaemon& d, std::size_t workers) {
  const std::size_t before = count_of(d.err_log(), "policy reloaded");
  ASSERT_EQ(kill(d.pid(), SIGHUP), 0);
  ASSERT_TRUE(wait_for(
      [&] { return count_of(d.err_log(), "policy reloaded") >= before + workers; }))
      << d.err_log();
}

TEST(SesdGrants, BoundIsExactAcrossTwoWorkers) {
  SesdDaemon d(options(2, 5));
  ASSERT_TRUE(d.setup().ok());
  const std::string id = issue(d, 30, 600);
  ASSERT_EQ(id.size(), 16U);
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  ASSERT_TRUE(wait_for([&] { return children(d.pid()).size() == 2; }));

  const Tally t = send_disconnects(d, 100, 1);
  EXPECT_EQ(t.secured, 5 + 30) << "fleet burst 5 plus the grant's 30";
  EXPECT_EQ(t.isc, 65);
  EXPECT_EQ(t.other, 0);
  EXPECT_EQ(reserved(d, id), 30);
  EXPECT_EQ(grant_records(d, id), 30U);
  const std::string m = d.http_get("/metrics");
  EXPECT_EQ(gs::test::metric_sum(m, "gridseal_ses_grant_units_used_total", {}), 30.0)
      << m.substr(0, 3000);
  EXPECT_EQ(gs::test::metric_sum(m, "gridseal_ses_grant_units_reserved", {}), 30.0);
  // Both workers spent some (the bound held across processes, not inside one).
  EXPECT_GE(count_of(m, "gridseal_ses_grant_blocks_reserved{"), 2U);

  auto list = d.gridseal("grants list --json --verify");
  EXPECT_EQ(list.code, 0) << list.out;
  EXPECT_EQ(json_field(list.out, "state"), "spent");
  EXPECT_EQ(json_field(list.out, "signature_valid"), "true");
  EXPECT_EQ(d.stop(), 0) << d.err_log();

  auto db = open_db(d);
  auto issued = gs::test::audit_records(db, "grant_issued");
  ASSERT_EQ(issued.size(), 1U);
  EXPECT_EQ(issued[0].subject, id);
  EXPECT_EQ(issued[0].actor.rfind("bootstrap:", 0), 0U) << issued[0].actor;
  EXPECT_NE(issued[0].detail.find("\"units\":30"), std::string::npos) << issued[0].detail;
}

TEST(SesdGrants, RowsNotSignedByGsAuditAreRefused) {
  SesdDaemon d(options(1, 5, 8));
  ASSERT_TRUE(d.setup().ok());
  // Someone with write access to the database only: a row with a made-up signature.
  {
    auto db = open_db(d);
    auto st = db.exec(
        "INSERT INTO rate_grants (id, client, class, units, not_before, not_after, signature, "
        "reason, issued_by, issued_at) VALUES ('00112233aabbccdd', 'head-end', 2, 50, 0, "
        "4000000000, randomblob(64), 'forged', 'operator:mallory', 0)");
    ASSERT_TRUE(st.ok()) << st.error().message();
  }
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  Tally t = send_disconnects(d, 20, 1, 1);
  EXPECT_EQ(t.secured, 5);
  EXPECT_EQ(t.isc, 15);
  EXPECT_NE(d.err_log().find("grant 00112233aabbccdd refused"), std::string::npos) << d.err_log();
  EXPECT_EQ(reserved(d, "00112233aabbccdd"), 0);

  // A genuine grant works...
  const std::string id = issue(d, 3, 600);
  reload(d, 1);
  t = send_disconnects(d, 10, 100, 1);
  EXPECT_EQ(t.secured, 3);
  EXPECT_EQ(grant_records(d, id), 3U);

  // ...until its terms are changed in the database: then it is refused as a whole.
  {
    auto db = open_db(d);
    ASSERT_TRUE(
        db.exec("UPDATE rate_grants SET units = 500, reserved = 0 WHERE id = '" + id + "'").ok());
  }
  reload(d, 1);
  t = send_disconnects(d, 10, 200, 1);
  EXPECT_EQ(t.secured, 0);
  EXPECT_EQ(t.isc, 10);
  EXPECT_EQ(grant_records(d, id), 3U);
  EXPECT_NE(d.err_log().find("grant " + id + " refused"), std::string::npos);
  EXPECT_EQ(gs::test::metric_sum(d.http_get("/metrics"), "gridseal_ses_grants_refused", {}), 2.0);

  // `grants list --verify` shows both as invalid and fails.
  auto list = d.gridseal("grants list --all --verify --json");
  EXPECT_EQ(list.code, 1) << list.out;
  EXPECT_EQ(count_of(list.out, "\"signature_valid\":false"), 2U) << list.out;
  EXPECT_EQ(d.stop(), 0) << d.err_log();
}

TEST(SesdGrants, ExpiryAndRevocationStopAGrant) {
  SesdDaemon d(options(1, 1, 8));
  ASSERT_TRUE(d.setup().ok());
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  EXPECT_EQ(send_disconnects(d, 2, 1, 1).secured, 1);  // the fleet burst

  // A grant that expires in 3 s.
  auto r = d.gridseal(
      "grants issue --client head-end --class connect_disconnect --meters 100 --expires-in 3 "
      "--reason short --json");
  ASSERT_EQ(r.code, 0) << r.out;
  const std::int64_t not_after = std::stoll(json_field(r.out, "not_after"));
  reload(d, 1);
  EXPECT_EQ(send_disconnects(d, 2, 10, 1).secured, 2);
  while (std::time(nullptr) <= not_after) std::this_thread::sleep_for(100ms);
  Tally t = send_disconnects(d, 3, 20, 1);
  EXPECT_EQ(t.secured, 0);
  EXPECT_EQ(t.isc, 3);

  // A grant revoked: refused as soon as the workers re-read the grants.
  const std::string id = issue(d, 100, 600);
  reload(d, 1);
  EXPECT_EQ(send_disconnects(d, 2, 30, 1).secured, 2);
  auto rv = d.gridseal("grants revoke " + id + " --json");
  ASSERT_EQ(rv.code, 0) << rv.out;
  EXPECT_EQ(json_field(rv.out, "state"), "revoked");
  auto again = d.gridseal("grants revoke " + id);
  EXPECT_EQ(again.code, 1);
  EXPECT_NE(again.out.find("revoked already"), std::string::npos) << again.out;
  reload(d, 1);
  t = send_disconnects(d, 5, 40, 1);
  EXPECT_EQ(t.secured, 0);
  EXPECT_EQ(t.isc, 5);
  EXPECT_EQ(grant_records(d, id), 2U);
  auto active = d.gridseal("grants list --json");
  EXPECT_EQ(active.code, 0);
  EXPECT_EQ(active.out.find("\"id\""), std::string::npos) << active.out;

  // Bounds and names the CLI refuses.
  EXPECT_NE(d.gridseal("grants issue --client head-end --class connect_disconnect --meters "
                       "100001 --expires-in 60 --reason x")
                .code,
            0);
  EXPECT_NE(d.gridseal("grants issue --client head-end --class connect_disconnect --meters 5 "
                       "--expires-in 604801 --reason x")
                .code,
            0);
  auto no_client = d.gridseal(
      "grants issue --client nobody --class connect_disconnect --meters 5 --expires-in 60 "
      "--reason x");
  EXPECT_EQ(no_client.code, 1);
  EXPECT_NE(no_client.out.find("no [[client]] named"), std::string::npos) << no_client.out;
  auto no_class = d.gridseal(
      "grants issue --client head-end --class disconnect --meters 5 --expires-in 60 --reason x");
  EXPECT_EQ(no_class.code, 1);
  auto not_allowed = d.gridseal(
      "grants issue --client other --class connect_disconnect --meters 5 --expires-in 60 "
      "--reason x");
  EXPECT_EQ(not_allowed.code, 1);
  EXPECT_NE(not_allowed.out.find("may not send"), std::string::npos) << not_allowed.out;
  EXPECT_EQ(d.stop(), 0) << d.err_log();

  auto db = open_db(d);
  EXPECT_EQ(gs::test::audit_records(db, "grant_issued").size(), 2U);
  auto revoked = gs::test::audit_records(db, "grant_revoked");
  ASSERT_EQ(revoked.size(), 1U);
  EXPECT_EQ(revoked[0].subject, id);
  EXPECT_EQ(gs::test::audit_records(db, "grant_revoke_refused").size(), 1U);
}

TEST(SesdGrants, KillMinusNineMidGrantNeverOverspends) {
  SesdDaemon d(options(2, 2));
  ASSERT_TRUE(d.setup().ok());
  const std::string id = issue(d, 30, 600);
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  ASSERT_TRUE(wait_for([&] { return children(d.pid()).size() == 2; }));

  // Load from 4 threads; once some of the grant is spent, kill -9 the whole daemon.
  std::atomic<int> secured{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> load;
  for (int k = 0; k < 4; ++k) {
    load.emplace_back([&, k] {
      std::uint32_t n = 0;
      while (!stop.load()) {
        auto c = d.connect();
        if (!c.ok()) return;
        for (int i = 0; i < 3 && !stop.load(); ++i) {
          const std::size_t meter = 1 + (n + static_cast<std::uint32_t>(k) * 7) % 40;
          auto r = (*c)->call(gs::test::sesd_request(
              d.meter_title(meter), 1 + static_cast<std::uint32_t>(k) * 100000 + ++n,
              {kDisconnect}));
          if (!r.ok()) return;
          if (gs::test::check_secured(*r, d.meter_key(meter), d.pub_hex()).ok()) ++secured;
        }
        std::this_thread::sleep_for(5ms);  // a steady stream, so that the kill lands mid-grant
      }
    });
  }
  const bool some = wait_for([&] { return secured.load() >= 12; });
  ASSERT_EQ(kill(-d.pid(), SIGKILL), 0);
  stop = true;
  for (auto& th : load) th.join();
  d.stop();
  ASSERT_TRUE(some);
  const int before = secured.load();
  const std::int64_t reserved_at_kill = reserved(d, id);
  const std::size_t recorded_at_kill = grant_records(d, id);

  // Restarted (the rate-limit buckets start full again: 2 more free), it spends the rest.
  ASSERT_TRUE(d.start().ok()) << d.err_log();
  const Tally after = send_disconnects(d, 80, 500000);
  const std::size_t recorded = grant_records(d, id);
  std::printf("kill -9 mid-grant: %d secured before the kill (%zu recorded under the grant, %lld "
              "units reserved), %d after the restart; %zu of 30 units used, %lld lost\n",
              before, recorded_at_kill, static_cast<long long>(reserved_at_kill), after.secured,
              recorded, static_cast<long long>(30 - static_cast<std::int64_t>(recorded)));
  // Units still unreserved at the kill are spent after the restart. (When the workers had
  // already reserved all 30 before the kill, what they held is lost: only the 2 free remain.)
  if (reserved_at_kill < 30) {
    EXPECT_GT(after.secured, 2);
  }
  EXPECT_GE(after.secured, 2);
  EXPECT_LE(before + after.secured, 2 + 2 + 30) << "the grant was overspent";
  EXPECT_LE(recorded, 30U);
  EXPECT_EQ(reserved(d, id), 30);  // every unit was handed out once: used or lost, never twice
  EXPECT_EQ(d.stop(), 0) << d.err_log();
}

}  // namespace
