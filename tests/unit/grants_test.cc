// src/grants.h without the daemon: the signed encoding and what it binds, the bounds, the
// rate_grants table (revoke once, never deleted), block reservations that never hand out more
// than the signed count (two connections racing, a row whose count was raised), and the SES
// ledger: exact bound across two ledgers, forged and tampered rows ignored, expiry, revocation.
#include "src/grants.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "src/key_store.h"

namespace {

namespace fs = std::filesystem;
namespace gr = gs::grants;
using gs::Errc;
using gs::c1222::CommandClass;

constexpr std::int64_t kT0 = 1'700'000'000;

class GrantsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-grants-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/gridseal.db";
    auto ks = gs::store::KeyStore::open(path_);  // creates and migrates (rate_grants)
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    ks_.emplace(std::move(ks).value());
    auto k = gs::HostEcKey::generate();
    ASSERT_TRUE(k.ok());
    key_.emplace(std::move(k).value());
  }
  void TearDown() override {
    ks_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  gr::Grant make(std::uint32_t units, std::int64_t lifetime = 3600,
                 const std::string& client = "head-end",
                 CommandClass c = CommandClass::connect_disconnect) {
    gr::Grant g;
    g.id = gr::new_id().value();
    g.client = client;
    g.command_class = c;
    g.units = units;
    g.not_before = kT0;
    g.not_after = kT0 + lifetime;
    g.reason = "storm restoration";
    g.issued_by = "operator:alice";
    g.issued_at = kT0;
    sign(g);
    return g;
  }
  void sign(gr::Grant& g) {
    auto d = gr::digest(g);
    ASSERT_TRUE(d.ok()) << d.error().message();
    auto s = key_->sign(*d);
    ASSERT_TRUE(s.ok());
    g.signature.assign(s->begin(), s->end());
  }
  gs::ByteView point() const { return gs::ByteView(key_->public_point()); }
  gs::db::Db& db() { return ks_->db(); }
  std::unique_ptr<gr::GrantLedger> ledger(gr::LedgerOptions o = {}) {
    auto l = gr::GrantLedger::open(path_, point(), o);
    EXPECT_TRUE(l.ok()) << l.error().message();
    return l.ok() ? std::move(l).value() : nullptr;
  }
  std::int64_t reserved(const std::string& id) {
    auto g = gr::GrantStore(db()).find(id);
    EXPECT_TRUE(g.ok() && g->has_value());
    return g.ok() && g->has_value() ? (*g)->reserved : -1;
  }

  std::string dir_, path_;
  std::optional<gs::store::KeyStore> ks_;
  std::optional<gs::HostEcKey> key_;
};

TEST_F(GrantsTest, EncodingBindsEveryTermAndNothingElse) {
  gr::Grant g = make(30);
  auto in = gr::signing_input(g);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(std::string(in->begin(), in->begin() + 4), "GSG1");
  // tag 4 + id 8 + len 1 + "head-end" 8 + class 1 + units 4 + two times 16.
  EXPECT_EQ(in->size(), 4U + 8 + 1 + 8 + 1 + 4 + 16);
  EXPECT_EQ((*in)[12], 8);
  EXPECT_EQ((*in)[21], 2);  // connect_disconnect (DESIGN §3.1)
  EXPECT_TRUE(gr::verify(g, *key_).ok());

  auto refused = [&](auto change) {
    gr::Grant t = g;
    change(t);
    return gr::verify(t, *key_).error().code == Errc::bad_signature ||
           gr::verify(t, *key_).error().code == Errc::invalid_argument;
  };
  EXPECT_TRUE(refused([](gr::Grant& t) { t.units = 31; }));
  EXPECT_TRUE(refused([](gr::Grant& t) { t.client = "head-enD"; }));
  EXPECT_TRUE(refused([](gr::Grant& t) { t.command_class = CommandClass::firmware; }));
  EXPECT_TRUE(refused([](gr::Grant& t) { t.not_after += 1; }));
  EXPECT_TRUE(refused([](gr::Grant& t) { t.not_before -= 1; }));
  EXPECT_TRUE(refused([](gr::Grant& t) { t.id[0] = t.id[0] == 'a' ? 'b' : 'a'; }));
  EXPECT_TRUE(refused([](gr::Grant& t) { t.signature[5] ^= 1; }));
  EXPECT_TRUE(refused([](gr::Grant& t) { t.signature.pop_back(); }));
  // Another key's signature of the same terms.
  auto other = gs::HostEcKey::generate().value();
  EXPECT_EQ(gr::verify(g, other).error().code, Errc::bad_signature);
  // The bookkeeping is not signed.
  gr::Grant t = g;
  t.reserved = 7;
  t.reason = "other";
  t.issued_by = "x";
  EXPECT_TRUE(gr::verify(t, *key_).ok());
}

TEST_F(GrantsTest, TermsOutsideTheBoundsAreRefused) {
  gr::Grant g = make(1);
  auto bad = [&](auto change) {
    gr::Grant t = g;
    change(t);
    return gr::check_terms(t).error().code == Errc::invalid_argument;
  };
  EXPECT_TRUE(gr::check_terms(g).ok());
  EXPECT_TRUE(bad([](gr::Grant& t) { t.units = 0; }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.units = gr::kMaxUnits + 1; }));
  EXPECT_FALSE(bad([](gr::Grant& t) { t.units = gr::kMaxUnits; }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.not_after = t.not_before; }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.not_after = t.not_before + gr::kMaxLifetime + 1; }));
  EXPECT_FALSE(bad([](gr::Grant& t) { t.not_after = t.not_before + gr::kMaxLifetime; }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.command_class = static_cast<CommandClass>(7); }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.client.clear(); }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.client = std::string(gr::kMaxClient + 1, 'c'); }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.client = "a\nb"; }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.id = "0123456789ABCDEF"; }));
  EXPECT_TRUE(bad([](gr::Grant& t) { t.id = "0123"; }));
  gr::Grant r = g;
  r.reason = std::string(gr::kMaxReason + 1, 'r');
  EXPECT_EQ(gr::GrantStore(db()).insert(r).error().code, Errc::invalid_argument);
}

TEST_F(GrantsTest, StoreRevokesOnceAndNeverDeletes) {
  gr::GrantStore s(db());
  gr::Grant g = make(5);
  ASSERT_TRUE(s.insert(g).ok());
  EXPECT_EQ(s.insert(g).error().code, Errc::conflict);
  auto f = s.find(g.id);
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->client, "head-end");
  EXPECT_EQ((*f)->units, 5U);
  EXPECT_EQ((*f)->signature, g.signature);
  EXPECT_TRUE(gr::verify(**f, *key_).ok());
  EXPECT_EQ(s.list(false, kT0, 10)->size(), 1U);
  EXPECT_EQ(s.list(false, kT0 + 3601, 10)->size(), 0U);  // expired
  EXPECT_EQ(s.revoke("0000000000000000", "operator:bob", kT0).error().code, Errc::not_found);
  ASSERT_TRUE(s.revoke(g.id, "operator:bob", kT0 + 1).ok());
  EXPECT_EQ(s.revoke(g.id, "operator:bob", kT0 + 2).error().code, Errc::conflict);
  EXPECT_EQ(s.list(false, kT0, 10)->size(), 0U);
  auto all = s.list(true, kT0, 10);
  ASSERT_EQ(all->size(), 1U);
  EXPECT_EQ(all->front().revoked_by, "operator:bob");
  EXPECT_EQ(*all->front().revoked_at, kT0 + 1);
  EXPECT_FALSE(db().exec("DELETE FROM rate_grants").ok());
  auto r = s.reserve(g, 4, 1, kT0 + 2);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, 0U);  // revoked: nothing handed out
}

TEST_F(GrantsTest, ReservationsNeverExceedTheSignedCount) {
  gr::GrantStore s(db());
  gr::Grant g = make(100);
  ASSERT_TRUE(s.insert(g).ok());
  // Blocks shrink as the grant runs out: min(want, max(1, left / spread), left).
  EXPECT_EQ(*s.reserve(g, 16, 4, kT0), 16U);   // left 100
  EXPECT_EQ(*s.reserve(g, 64, 4, kT0), 21U);   // left 84
  EXPECT_EQ(reserved(g.id), 37);
  // Someone with database access raises the row's count: the signed count still bounds it.
  ASSERT_TRUE(db().exec("UPDATE rate_grants SET units = 100000 WHERE id = '" + g.id + "'").ok());
  // Two connections (two SES workers) racing for the rest.
  std::atomic<std::uint64_t> total{0};
  auto worker = [&] {
    auto c = gs::db::Db::open(path_, {.create = false});
    ASSERT_TRUE(c.ok());
    gr::GrantStore mine(*c);
    for (;;) {
      auto n = mine.reserve(g, 3, 4, kT0);
      ASSERT_TRUE(n.ok()) << n.error().message();
      if (*n == 0) break;
      total += *n;
    }
  };
  std::thread a(worker), b(worker);
  a.join();
  b.join();
  EXPECT_EQ(total.load() + 37, 100U);
  EXPECT_EQ(reserved(g.id), 100);
  // Expired, or a row whose signature was swapped: nothing.
  gr::Grant h = make(10, 60);
  ASSERT_TRUE(s.insert(h).ok());
  EXPECT_EQ(*s.reserve(h, 4, 1, kT0 + 61), 0U);
  gr::Grant other = make(10, 60);
  other.id = h.id;
  sign(other);
  EXPECT_EQ(*s.reserve(other, 4, 1, kT0), 0U);
  EXPECT_EQ(*s.reserve(h, 4, 1, kT0), 4U);
}

TEST_F(GrantsTest, TwoLedgersSpendExactlyTheGrant) {
  gr::GrantStore s(db());
  gr::Grant g = make(30);
  ASSERT_TRUE(s.insert(g).ok());
  auto l1 = ledger({.block = 4});
  auto l2 = ledger({.block = 4});
  ASSERT_TRUE(l1 && l2);
  std::atomic<int> used{0};
  auto spend = [&](gr::GrantLedger& l) {
    for (int i = 0; i < 100; ++i) {
      auto id = l.take("head-end", CommandClass::connect_disconnect, kT0 + 5);
      if (id) {
        EXPECT_EQ(*id, g.id);
        ++used;
      }
    }
  };
  std::thread a([&] { spend(*l1); }), b([&] { spend(*l2); });
  a.join();
  b.join();
  EXPECT_EQ(used.load(), 30);
  EXPECT_EQ(l1->stats().units_used + l2->stats().units_used, 30U);
  EXPECT_EQ(reserved(g.id), 30);
  // Other clients, other classes, before and after the window: nothing.
  gr::Grant h = make(10);
  ASSERT_TRUE(s.insert(h).ok());
  l1->invalidate();
  EXPECT_FALSE(l1->take("billing-reads", CommandClass::connect_disconnect, kT0 + 5));
  EXPECT_FALSE(l1->take("head-end", CommandClass::firmware, kT0 + 5));
  EXPECT_FALSE(l1->take("head-end", CommandClass::connect_disconnect, kT0 - 1));
  EXPECT_FALSE(l1->take("head-end", CommandClass::connect_disconnect, kT0 + 3601));
  EXPECT_EQ(l1->take("head-end", CommandClass::connect_disconnect, kT0 + 3600), h.id);
}

TEST_F(GrantsTest, LedgerIgnoresForgedAndTamperedRows) {
  gr::GrantStore s(db());
  // A row written with database access only: signed by some other key.
  gr::Grant forged = make(50);
  {
    auto other = gs::HostEcKey::generate().value();
    auto d = gr::digest(forged).value();
    auto sig = other.sign(d).value();
    forged.signature.assign(sig.begin(), sig.end());
  }
  ASSERT_TRUE(s.insert(forged).ok());
  auto l = ledger();
  ASSERT_TRUE(l);
  EXPECT_FALSE(l->take("head-end", CommandClass::connect_disconnect, kT0 + 1));
  EXPECT_EQ(l->stats().refused, 1U);
  EXPECT_EQ(reserved(forged.id), 0);
  ASSERT_TRUE(db().exec("UPDATE rate_grants SET revoked_at = 1, revoked_by = 'x' WHERE id = '" +
                        forged.id + "'")
                  .ok());

  // A genuine grant whose count is raised after the ledger verified it: refused from the next
  // refresh on, and the units this ledger held are dropped with it.
  gr::Grant g = make(3);
  ASSERT_TRUE(s.insert(g).ok());
  l->invalidate();
  EXPECT_EQ(l->take("head-end", CommandClass::connect_disconnect, kT0 + 1), g.id);
  ASSERT_TRUE(
      db().exec("UPDATE rate_grants SET units = 500, reserved = 0 WHERE id = '" + g.id + "'").ok());
  l->invalidate();
  EXPECT_FALSE(l->take("head-end", CommandClass::connect_disconnect, kT0 + 1));
  EXPECT_EQ(l->stats().refused, 2U);
  EXPECT_EQ(l->stats().units_used, 1U);
}

TEST_F(GrantsTest, LedgerStopsAtRevocationAndExpiry) {
  gr::GrantStore s(db());
  gr::Grant g = make(1000, 100);
  ASSERT_TRUE(s.insert(g).ok());
  auto l = ledger({.block = 16, .spread = 4, .refresh_s = 2});
  ASSERT_TRUE(l);
  for (int i = 0; i < 5; ++i) {
    EXPECT_TRUE(l->take("head-end", CommandClass::connect_disconnect, kT0 + 10));
  }
  EXPECT_EQ(reserved(g.id), 16);  // one block
  ASSERT_TRUE(s.revoke(g.id, "operator:bob", kT0 + 10).ok());
  // Until the next refresh the block in hand is still spent (a bounded delay, refresh_s)...
  EXPECT_TRUE(l->take("head-end", CommandClass::connect_disconnect, kT0 + 11));
  // ...after it, nothing, and no further block is reserved.
  EXPECT_FALSE(l->take("head-end", CommandClass::connect_disconnect, kT0 + 12));
  EXPECT_EQ(reserved(g.id), 16);

  gr::Grant e = make(1000, 100);
  ASSERT_TRUE(s.insert(e).ok());
  l->invalidate();
  EXPECT_TRUE(l->take("head-end", CommandClass::connect_disconnect, kT0 + 100));
  // Past not_after the units in hand are not used either.
  EXPECT_FALSE(l->take("head-end", CommandClass::connect_disconnect, kT0 + 101));
}

TEST_F(GrantsTest, ForkedWorkerKilledMidGrantOnlyLosesUnits) {
  gr::GrantStore s(db());
  gr::Grant g = make(40);
  ASSERT_TRUE(s.insert(g).ok());
  // A child process (a worker) reserves a block, spends part of it and dies by SIGKILL.
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto l = gr::GrantLedger::open(path_, point(), {.block = 8});
    if (!l.ok()) _exit(2);
    for (int i = 0; i < 3; ++i) {
      if (!(*l)->take("head-end", CommandClass::connect_disconnect, kT0 + 1)) _exit(3);
    }
    raise(SIGKILL);
    _exit(4);
  }
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) << st;
  const std::int64_t lost = reserved(g.id) - 3;
  EXPECT_GT(lost, 0);  // the rest of its block
  auto l = ledger();
  ASSERT_TRUE(l);
  int used = 0;
  while (l->take("head-end", CommandClass::connect_disconnect, kT0 + 2)) ++used;
  EXPECT_EQ(used + 3 + lost, 40);
  EXPECT_EQ(reserved(g.id), 40);
}

}  // namespace
