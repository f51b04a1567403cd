// The meter change feed (schema v13) and the MeterCache that follows it: changes made through a
// second connection (another process) reach a cache whose TTL is an hour within its poll
// interval; per-message writes add no feed rows; a cache that fell behind starts over; a feed
// that cannot be read leaves lookups working; a v12 database gains the feed; the real
// gridseal-sesd and gridseal-dkusd refuse a meter `gridseal meters revoke` revoked although
// their TTL is an hour.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "c1222/oid.h"
#include "c1222/services.h"
#include "src/client.h"
#include "src/key_store.h"
#include "src/meter_cache.h"
#include "src/rollover_store.h"
#include "tests/unit/dkusd_fixture.h"
#include "tests/unit/sesd_fixture.h"

namespace gs::store {
namespace {

using std::chrono::hours;
using std::chrono::milliseconds;
constexpr milliseconds kPoll{100};

class MeterCacheFeedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-meterfeed-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/gridseal.db";
    open_both();
  }
  void TearDown() override {
    cache_.reset();
    daemon_.reset();
    other_.reset();
    std::filesystem::remove_all(dir_);
  }

  // The daemon's connection (the cache reads the feed on it) and another process's.
  void open_both() {
    auto a = KeyStore::open(path_);
    ASSERT_TRUE(a.ok()) << a.error().message();
    daemon_.emplace(std::move(*a));
    auto b = KeyStore::open(path_);
    ASSERT_TRUE(b.ok()) << b.error().message();
    other_.emplace(std::move(*b));
  }

  static std::string text_of(int n) { return "2.16.124.113620.1.22.0.7." + std::to_string(n); }
  static Bytes title(int n) { return c1222::oid_from_dotted(text_of(n)).value(); }

  static NewMeter meter(int n) {
    NewMeter m;
    m.meter_id = "M" + std::to_string(n);
    m.ap_title_text = text_of(n);
    m.ap_title = title(n);
    m.public_key = Bytes(65, 0x04);
    m.slot = 0;
    m.wrapped_key = Bytes(24, static_cast<std::uint8_t>(n));
    m.origin = "plain";
    return m;
  }

  // Meters first..first+n-1, imported through the other connection.
  void import(int first, int n) {
    std::vector<NewMeter> batch;
    for (int i = first; i < first + n; ++i) batch.push_back(meter(i));
    auto r = other_->import_meters(batch);
    ASSERT_TRUE(r.ok()) << r.error().message();
  }

  // A lookup through the daemon's cache at t0 + ms.
  std::shared_ptr<const Meter> lookup(int n, int ms) {
    auto r = cache_->by_title(*daemon_, title(n), t0_ + milliseconds(ms));
    EXPECT_TRUE(r.ok()) << r.error().message();
    return r.ok() ? *r : nullptr;
  }

  // The state of the meter a lookup returns, "none" for no meter.
  std::string state_of(int n, int ms) {
    auto m = lookup(n, ms);
    return m != nullptr ? to_string(m->state) : "none";
  }

  std::int64_t feed_max() {
    auto st = other_->db().prepare("SELECT coalesce(max(seq), 0) FROM meter_changes");
    EXPECT_TRUE(st.ok());
    EXPECT_EQ(st->step().value(), db::Step::row);
    return st->int64(0);
  }
  std::int64_t feed_rows() {
    auto st = other_->db().prepare("SELECT count(*) FROM meter_changes");
    EXPECT_TRUE(st.ok());
    EXPECT_EQ(st->step().value(), db::Step::row);
    return st->int64(0);
  }

  std::string dir_;
  std::string path_;
  std::optional<KeyStore> daemon_;
  std::optional<KeyStore> other_;
  std::optional<MeterCache> cache_;
  const MeterCache::Clock::time_point t0_ = MeterCache::Clock::now();
};

TEST_F(MeterCacheFeedTest, RevocationByAnotherConnectionIsSeenAfterThePollInterval) {
  import(1, 3);
  cache_.emplace(16, hours(1), kPoll);
  ASSERT_NE(lookup(1, 0), nullptr);
  ASSERT_NE(lookup(2, 0), nullptr);
  EXPECT_EQ(cache_->misses(), 2u);

  ASSERT_TRUE(other_->revoke("M1", "stolen").ok());
  // Within the poll interval the cached record is served as it was.
  auto stale = lookup(1, 50);
  ASSERT_NE(stale, nullptr);
  EXPECT_EQ(stale->state, MeterState::active);
  EXPECT_EQ(cache_->hits(), 1u);
  // After it, the feed names M1: it is read again, revoked; M2 is still served from the cache.
  auto revoked = lookup(1, 150);
  ASSERT_NE(revoked, nullptr);
  EXPECT_EQ(revoked->state, MeterState::compromised);
  EXPECT_EQ(revoked->active_slot(), nullptr);
  EXPECT_EQ(cache_->misses(), 3u);
  ASSERT_NE(lookup(2, 160), nullptr);
  EXPECT_EQ(cache_->hits(), 2u);
  EXPECT_EQ(cache_->feed_invalidations(), 1u);
  EXPECT_EQ(cache_->feed_resets(), 0u);
}

TEST_F(MeterCacheFeedTest, PollZeroReadsTheFeedBeforeEveryLookup) {
  import(1, 1);
  cache_.emplace(16, hours(1), milliseconds(0));
  ASSERT_EQ(state_of(1, 0), "active");
  ASSERT_TRUE(other_->revoke("M1", "stolen").ok());
  EXPECT_EQ(state_of(1, 0), "compromised");
}

TEST_F(MeterCacheFeedTest, KeySlotChangesOfARolloverAreSeen) {
  import(1, 2);
  // What a rollover does, through the other connection: a proof, a campaign, the new key
  // written pending (prepare), then activated when the meter answers under it (confirm).
  const Meter m1 = *other_->meter_by_id("M1").value();
  {
    auto st = other_->db().prepare("INSERT INTO challenge_proofs VALUES (?1, zeroblob(16), 0, "
                                   "zeroblob(64), 0, 0)");
    ASSERT_TRUE(st.ok());
    st->bind(1, m1.row);
    ASSERT_TRUE(st->run().ok());
  }
  cache_.emplace(16, hours(1), kPoll);
  auto before = lookup(1, 0);
  ASSERT_NE(before, nullptr);
  EXPECT_EQ(before->slots.size(), 1u);
  ASSERT_NE(lookup(2, 0), nullptr);

  RolloverStore rs(*other_);
  CampaignSpec spec;
  spec.created_by = "tester";
  const std::vector<std::string> ids = {"M1"};
  ASSERT_TRUE(rs.start(spec, ids, false).ok());
  const std::int64_t after_start = feed_max();
  auto q = rs.next_queued(10);
  ASSERT_TRUE(q.ok() && q->size() == 1u);
  auto choice = choose_rollover_slot(m1, (*q)[0].reason);
  ASSERT_TRUE(choice.has_value());
  PreparedKey k;
  k.campaign = (*q)[0].campaign;
  k.meter_row = m1.row;
  k.target_slot = choice->target_slot;
  k.key_version = choice->key_version;
  k.seal_slot = choice->seal_slot;
  k.wrapped = Bytes(24, 0x77);
  k.ephemeral_point = Bytes(65, 0x04);
  auto prepared = rs.prepare(std::vector<PreparedKey>{k});
  ASSERT_TRUE(prepared.ok()) << prepared.error().message();
  ASSERT_TRUE((*prepared)[0]);
  EXPECT_GT(feed_max(), after_start);

  auto pending = lookup(1, 150);
  ASSERT_NE(pending, nullptr);
  const KeySlot* p = pending->slot_for_key_id(choice->target_slot);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->state, KeyState::pending);
  EXPECT_EQ(p->wrapped, Bytes(24, 0x77));

  auto confirmed = rs.confirm(m1.row, choice->target_slot, choice->key_version);
  ASSERT_TRUE(confirmed.ok() && *confirmed);
  auto active = lookup(1, 300);
  ASSERT_NE(active, nullptr);
  ASSERT_NE(active->active_slot(), nullptr);
  EXPECT_EQ(active->active_slot()->slot, choice->target_slot);
  const KeySlot* old = active->slot_for_key_id(0);
  ASSERT_NE(old, nullptr);
  EXPECT_EQ(old->state, KeyState::standby);
  // M2 was never named by the feed: still cached.
  const std::uint64_t hits = cache_->hits();
  ASSERT_NE(lookup(2, 310), nullptr);
  EXPECT_EQ(cache_->hits(), hits + 1);
  EXPECT_EQ(cache_->feed_resets(), 0u);
}

TEST_F(MeterCacheFeedTest, UnknownTitleCachedAsUnknownIsFoundOnceImported) {
  import(1, 1);
  cache_.emplace(16, hours(1), kPoll);
  EXPECT_EQ(lookup(7, 0), nullptr);
  EXPECT_EQ(lookup(7, 10), nullptr);
  EXPECT_EQ(cache_->hits(), 1u);  // the "unknown" answer is cached
  import(7, 1);
  auto found = lookup(7, 150);
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(found->meter_id, "M7");
}

TEST_F(MeterCacheFeedTest, PerMessageWritesAddNoFeedRows) {
  import(1, 2);
  const Meter m1 = *other_->meter_by_id("M1").value();
  const std::int64_t before = feed_max();
  ASSERT_GT(before, 0);
  // DKUS per message: the replay mark (group commit), a receipt; SES: an invocation-id block;
  // DKUS / rollover engine: a challenge and its proof, a step's attempt.
  {
    auto tx = db::Transaction::begin(other_->db());
    ASSERT_TRUE(tx.ok());
    for (std::uint64_t id = 10; id < 20; ++id) {
      ASSERT_EQ(other_->raise_replay_mark(m1.row, id, 1700000000, 64).value(),
                ReplayVerdict::accepted);
    }
    Receipt r;
    r.meter_row = m1.row;
    r.invocation_id = 5;
    r.command_digest = Bytes(32, 1);
    r.signature = Bytes(64, 2);
    ASSERT_TRUE(other_->insert_receipt(r).value());
    ASSERT_TRUE(tx->commit().ok());
  }
  ASSERT_TRUE(other_->reserve_counter_block(title(1), 1024).ok());
  ASSERT_TRUE(other_->db()
                  .exec("INSERT INTO meter_challenges (meter, state, origin, requested_by, "
                        "requested_at_ms, changed_at_ms) VALUES (" +
                        std::to_string(m1.row) + ", 'queued', 'operator', 't', 0, 0)")
                  .ok());
  ASSERT_TRUE(other_->db()
                  .exec("UPDATE meter_challenges SET state = 'proven', attempts = 1 WHERE "
                        "meter = " + std::to_string(m1.row))
                  .ok());
  RolloverStore rs(*other_);
  CampaignSpec spec;
  spec.created_by = "tester";
  const std::vector<std::string> ids = {"M2"};
  ASSERT_TRUE(rs.start(spec, ids, false).ok());
  EXPECT_EQ(feed_max(), before);

  // A record change does add one: the feed itself is live.
  ASSERT_TRUE(other_->revoke("M2", "test").ok());
  EXPECT_GT(feed_max(), before);
}

TEST_F(MeterCacheFeedTest, MoreChangesThanOnePollReadsClearTheCache) {
  import(1, 2);
  cache_.emplace(16, hours(1), kPoll);
  ASSERT_NE(lookup(1, 0), nullptr);
  ASSERT_NE(lookup(2, 0), nullptr);
  // An import of many meters: two feed rows each (meter, key slot), more than a poll reads.
  import(100, static_cast<int>(MeterCache::kFeedBatch));
  ASSERT_NE(lookup(1, 150), nullptr);
  EXPECT_EQ(cache_->feed_resets(), 1u);
  EXPECT_EQ(cache_->misses(), 3u);  // M1 read again: everything was dropped
  EXPECT_EQ(cache_->size(), 1u);
  // From the feed's new end on, it is followed again.
  ASSERT_NE(lookup(2, 160), nullptr);  // read again (dropped with the rest)
  ASSERT_NE(lookup(2, 170), nullptr);
  EXPECT_EQ(cache_->hits(), 1u);
  ASSERT_TRUE(other_->revoke("M2", "test").ok());
  EXPECT_EQ(state_of(2, 300), "compromised");
  EXPECT_EQ(cache_->feed_resets(), 1u);
}

TEST_F(MeterCacheFeedTest, PrunedOrResetFeedClearsTheCache) {
  import(1, 3);
  cache_.emplace(16, hours(1), kPoll);
  ASSERT_NE(lookup(1, 0), nullptr);
  ASSERT_NE(lookup(2, 0), nullptr);
  // Rows this cache never read are gone (as the bound prunes them when it is far behind), and
  // a change it would need is among them.
  ASSERT_TRUE(other_->revoke("M1", "test").ok());
  ASSERT_TRUE(other_->db().exec("DELETE FROM meter_changes").ok());
  ASSERT_TRUE(other_->revoke("M3", "test").ok());
  EXPECT_EQ(state_of(1, 150), "compromised");
  EXPECT_EQ(cache_->feed_resets(), 1u);
  ASSERT_NE(lookup(2, 160), nullptr);
  EXPECT_EQ(cache_->hits(), 0u);

  // The feed started again from 1 (a database restored from an older copy, say).
  ASSERT_TRUE(other_->db().exec("DELETE FROM meter_changes").ok());
  ASSERT_TRUE(other_->db().exec("DELETE FROM sqlite_sequence WHERE name = 'meter_changes'").ok());
  ASSERT_TRUE(other_->db().exec("UPDATE meters SET state_reason = 'x' WHERE meter_id = 'M3'").ok());
  ASSERT_EQ(feed_max(), 1);
  ASSERT_NE(lookup(2, 300), nullptr);
  EXPECT_EQ(cache_->feed_resets(), 2u);
  EXPECT_EQ(cache_->hits(), 0u);
}

TEST_F(MeterCacheFeedTest, TheFeedKeepsItsLast65536Rows) {
  import(1, 1);
  ASSERT_TRUE(other_->db().exec("PRAGMA synchronous=OFF").ok());
  ASSERT_TRUE(other_->db()
                  .exec("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE "
                        "i < 70000) INSERT INTO meter_changes (title) SELECT x'00' FROM n")
                  .ok());
  // Pruned once per 1024 inserts (at each seq multiple of 1024): the newest 65536 rows as of the
  // last prune, plus those inserted since.
  const std::int64_t last = feed_max();
  const std::int64_t pruned_at = last - last % 1024;
  EXPECT_EQ(feed_rows(), 65536 + (last - pruned_at));
  auto st = other_->db().prepare("SELECT min(seq) FROM meter_changes");
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(st->step().value(), db::Step::row);
  EXPECT_EQ(st->int64(0), pruned_at - 65535);
}

TEST_F(MeterCacheFeedTest, UnreadableFeedFallsBackToTheStore) {
  import(1, 2);
  cache_.emplace(16, hours(1), kPoll);
  ASSERT_NE(lookup(1, 0), nullptr);
  ASSERT_NE(lookup(2, 0), nullptr);
  // The feed goes away under the daemon (its prepared statement fails on the next step).
  ASSERT_TRUE(other_->db().exec("ALTER TABLE meter_changes RENAME TO meter_changes_gone").ok());
  ASSERT_TRUE(other_->db().exec("UPDATE meters SET state = 'quarantined' WHERE meter_id = 'M1'")
                  .ok());
  for (int ms : {150, 160, 170}) {
    auto m = lookup(1, ms);
    ASSERT_NE(m, nullptr);
    EXPECT_EQ(m->state, MeterState::quarantined);  // read from the store, not a stale entry
  }
  EXPECT_EQ(cache_->size(), 0u);  // nothing cached while the feed cannot be read
  EXPECT_EQ(cache_->feed_errors(), 1u);  // retried at the poll interval, not per lookup
  EXPECT_EQ(lookup(9, 200), nullptr);
  EXPECT_EQ(cache_->feed_errors(), 1u);
  lookup(9, 260);
  EXPECT_EQ(cache_->feed_errors(), 2u);
  // Back: the cache resyncs and caches again.
  ASSERT_TRUE(other_->db().exec("ALTER TABLE meter_changes_gone RENAME TO meter_changes").ok());
  ASSERT_NE(lookup(1, 400), nullptr);
  ASSERT_NE(lookup(1, 410), nullptr);
  EXPECT_EQ(cache_->hits(), 1u);
  EXPECT_EQ(cache_->feed_errors(), 2u);
}

TEST_F(MeterCacheFeedTest, SchemaV12DatabaseGainsTheFeed) {
  cache_.reset();
  daemon_.reset();
  other_.reset();
  for (const char* ext : {"", "-wal", "-shm"}) std::filesystem::remove(path_ + ext);
  {
    auto db = db::Db::open(path_).value();
    ASSERT_TRUE(create_schema_version(db, 12).ok());
    auto ins = db.prepare("INSERT INTO meters (row, meter_id, ap_title, ap_title_text, "
                          "created_at) VALUES (5, 'M1', ?1, ?2, 0)")
                   .value();
    ins.bind(1, ByteView(title(1))).bind(2, text_of(1));
    ASSERT_TRUE(ins.run().ok());
    ASSERT_TRUE(db.exec("INSERT INTO key_slots (meter, slot, wrapped, key_version, state, origin, "
                        "created_at, changed_at) VALUES (5, 0, x'0102', 1, 'active', 'plain', 0, "
                        "0)")
                    .ok());
  }
  open_both();
  auto v = daemon_->db().prepare("SELECT version FROM schema_version");
  ASSERT_TRUE(v.ok());
  ASSERT_EQ(v->step().value(), db::Step::row);
  EXPECT_EQ(v->int64(0), kSchemaVersion);
  v->reset();
  EXPECT_EQ(feed_rows(), 0);  // rows from before the feed are not changes

  cache_.emplace(16, hours(1), kPoll);
  ASSERT_EQ(state_of(1, 0), "active");
  ASSERT_TRUE(other_->revoke("M1", "test").ok());
  EXPECT_EQ(state_of(1, 150), "compromised");
  EXPECT_EQ(cache_->feed_resets(), 0u);  // the first feed row is 1: nothing was missed
}

// End to end: one handler thread (one cache) serves a connection; the meter it cached is revoked
// by the CLI (another process); once the poll interval has passed the next request is refused,
// where the TTL alone would have served it for an hour.
TEST(MeterCacheFeedSesd, MeterRevokedByTheCliIsRefusedAfterThePollInterval) {
  test::SesdOptions o;
  o.meters = 2;
  o.server_lines = {"worker_threads = 1", "processes = 1"};
  o.ses_lines = {"meter_cache_ttl_ms = 3600000", "meter_cache_poll_ms = 100"};
  test::SesdDaemon d(o);
  auto st = d.setup();
  ASSERT_TRUE(st.ok()) << st.error().message();
  st = d.start();
  ASSERT_TRUE(st.ok()) << st.error().message() << d.err_log();
  auto c = d.connect();
  ASSERT_TRUE(c.ok()) << c.error().message();
  const Bytes read = {0x30, 0x00, 0x01};
  auto ok = (*c)->call(test::sesd_request(".7.2", 1, {read}));
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_LT(test::error_reply(*ok).code, 0) << "not secured: " << d.err_log();  // cached now

  const test::CmdResult r = d.gridseal("meters revoke M2 --reason test --permanent");
  ASSERT_EQ(r.code, 0) << r.out;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // > meter_cache_poll_ms
  auto refused = (*c)->call(test::sesd_request(".7.2", 2, {read}));
  ASSERT_TRUE(refused.ok()) << refused.error().message();
  EXPECT_EQ(test::error_reply(*refused).code, c1222::kRespIsc) << d.err_log();
  // The other meter is still served.
  auto other = (*c)->call(test::sesd_request(".7.1", 3, {read}));
  ASSERT_TRUE(other.ok());
  EXPECT_LT(test::error_reply(*other).code, 0);
  EXPECT_EQ(d.stop(), 0);
}

// The same for the DKUS: one handler state; a meter message after the revocation is refused.
TEST(MeterCacheFeedDkusd, MeterRevokedByTheCliIsRefusedAfterThePollInterval) {
  test::DkusdOptions o;
  o.meters = 2;
  o.server_lines = {"processes = 1", "io_threads = 1", "worker_threads = 0"};
  o.dkus_lines = {"meter_cache_ttl_ms = 3600000", "meter_cache_poll_ms = 100"};
  test::DkusdDaemon d(std::move(o));
  auto st = d.setup();
  ASSERT_TRUE(st.ok()) << st.error().message();
  st = d.start();
  ASSERT_TRUE(st.ok()) << st.error().message() << d.err_log();
  auto c = d.connect();
  ASSERT_TRUE(c.ok()) << c.error().message();
  test::MeterMessage mm;
  mm.id = 10;
  auto ok = (*c)->call(d.seal(2, mm));
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_LT(test::error_reply(*ok).code, 0) << d.err_log();  // opened: the record is cached

  const test::CmdResult r = d.gridseal("meters revoke M2 --reason test");
  ASSERT_EQ(r.code, 0) << r.out;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // > meter_cache_poll_ms
  mm.id = 11;
  auto refused = (*c)->call(d.seal(2, mm));
  ASSERT_TRUE(refused.ok()) << refused.error().message();
  EXPECT_EQ(test::error_reply(*refused).code, c1222::kRespIsc) << d.err_log();
  mm.id = 12;
  auto other = (*c)->call(d.seal(1, mm));
  ASSERT_TRUE(other.ok());
  EXPECT_LT(test::error_reply(*other).code, 0) << d.err_log();
}

}  // namespace
}  // namespace gs::store
