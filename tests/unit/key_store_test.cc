// Key store: schema migration, import idempotence and conflicts, lookups, revocation, counters.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "c1222/oid.h"
#include "src/key_store.h"

namespace gs::store {
namespace {

class KeyStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-keystore-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/gridseal.db";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static NewMeter meter(int n, std::uint8_t key_byte = 0x11) {
    NewMeter m;
    m.meter_id = "M" + std::to_string(n);
    m.ap_title_text = "2.16.124.113620.1.22.0.7." + std::to_string(n);
    m.ap_title = c1222::oid_from_dotted(m.ap_title_text).value();
    m.public_key = Bytes(65, 0x04);
    m.slot = 0;
    m.wrapped_key = Bytes(24, key_byte);
    m.origin = "plain";
    return m;
  }

  std::string dir_;
  std::string path_;
};

TEST_F(KeyStoreTest, ImportLookupAndIdempotence) {
  auto ks = KeyStore::open(path_);
  ASSERT_TRUE(ks.ok()) << ks.error().message();
  std::vector<NewMeter> batch;
  for (int i = 0; i < 100; ++i) batch.push_back(meter(i));
  auto r = ks->import_meters(batch);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->inserted, 100u);
  auto again = ks->import_meters(batch);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->inserted, 0u);
  EXPECT_EQ(again->unchanged, 100u);
  EXPECT_EQ(ks->count_meters().value(), 100);

  auto m = ks->meter_by_title(batch[42].ap_title);
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE(m->has_value());
  EXPECT_EQ((*m)->meter_id, "M42");
  ASSERT_NE((*m)->active_slot(), nullptr);
  EXPECT_EQ((*m)->active_slot()->slot, 0);
  EXPECT_EQ((*m)->active_slot()->wrapped, Bytes(24, 0x11));
  EXPECT_FALSE(ks->meter_by_id("nope").value().has_value());
}

TEST_F(KeyStoreTest, ConflictingRowIsRefusedAndNothingOfTheBatchIsWritten) {
  auto ks = KeyStore::open(path_);
  ASSERT_TRUE(ks.ok());
  std::vector<NewMeter> first = {meter(1)};
  ASSERT_TRUE(ks->import_meters(first).ok());
  std::vector<NewMeter> batch = {meter(2), meter(1, 0x22)};
  auto r = ks->import_meters(batch);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::conflict);
  EXPECT_NE(r.error().detail.find("M1"), std::string::npos);
  EXPECT_FALSE(ks->meter_by_id("M2").value().has_value());
  // Same AP title under another meter id.
  NewMeter dup = meter(1);
  dup.meter_id = "other";
  std::vector<NewMeter> b2 = {dup};
  auto r2 = ks->import_meters(b2);
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.error().code, Errc::conflict);
}

TEST_F(KeyStoreTest, RevokeMarksMeterAndKeysCompromised) {
  auto ks = KeyStore::open(path_);
  ASSERT_TRUE(ks.ok());
  std::vector<NewMeter> b = {meter(5)};
  ASSERT_TRUE(ks->import_meters(b).ok());
  ASSERT_TRUE(ks->revoke("M5", "stolen").ok());
  auto m = ks->meter_by_id("M5").value();
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->state, MeterState::compromised);
  EXPECT_EQ(m->state_reason, "stolen");
  EXPECT_EQ(m->active_slot(), nullptr);
  EXPECT_EQ(m->slots.at(0).state, KeyState::compromised);
  EXPECT_EQ(ks->revoke("M6", "x").error().code, Errc::not_found);
}

TEST_F(KeyStoreTest, CounterBlocksNeverOverlapAcrossConnections) {
  auto a = KeyStore::open(path_);
  auto b = KeyStore::open(path_);
  ASSERT_TRUE(a.ok() && b.ok());
  Bytes title = {0x7b, 0x04};
  std::uint64_t a1 = a->reserve_counter_block(title, 100).value();
  std::uint64_t b1 = b->reserve_counter_block(title, 100).value();
  std::uint64_t a2 = a->reserve_counter_block(title, 100).value();
  EXPECT_EQ(a1, 0u);
  EXPECT_EQ(b1, 100u);
  EXPECT_EQ(a2, 200u);
  EXPECT_FALSE(a->reserve_counter_block(title, 0).ok());
}

TEST_F(KeyStoreTest, ReopenKeepsDataAndSchemaVersion) {
  {
    auto ks = KeyStore::open(path_);
    ASSERT_TRUE(ks.ok());
    std::vector<NewMeter> b = {meter(9)};
    ASSERT_TRUE(ks->import_meters(b).ok());
  }
  auto ks = KeyStore::open(path_);
  ASSERT_TRUE(ks.ok());
  EXPECT_TRUE(ks->meter_by_id("M9").value().has_value());
  ASSERT_TRUE(ks->db().exec("UPDATE schema_version SET version = 99").ok());
  auto newer = KeyStore::open(path_);
  ASSERT_FALSE(newer.ok());
  EXPECT_NE(newer.error().detail.find("newer"), std::string::npos);
}

}  // namespace
}  // namespace gs::store

#include "src/meter_cache.h"

namespace gs::store {
namespace {

TEST_F(KeyStoreTest, MeterCacheServesHitsExpiresAndEvicts) {
  auto ks = KeyStore::open(path_);
  ASSERT_TRUE(ks.ok());
  std::vector<NewMeter> b = {meter(1), meter(2), meter(3)};
  ASSERT_TRUE(ks->import_meters(b).ok());
  // The change feed is read once an hour here: the TTL alone is under test (the feed in
  // meter_cache_feed_test.cc).
  MeterCache cache(2, std::chrono::milliseconds(1000), std::chrono::hours(1));
  auto t0 = MeterCache::Clock::now();
  auto a = cache.by_title(*ks, b[0].ap_title, t0);
  ASSERT_TRUE(a.ok() && *a != nullptr);
  EXPECT_EQ((*a)->meter_id, "M1");
  EXPECT_EQ(cache.misses(), 1u);
  // A change made by another connection is not seen until the entry expires.
  ASSERT_TRUE(ks->revoke("M1", "test").ok());
  auto hit = cache.by_title(*ks, b[0].ap_title, t0 + std::chrono::milliseconds(500));
  EXPECT_EQ(cache.hits(), 1u);
  EXPECT_EQ((*hit)->state, MeterState::active);
  auto fresh = cache.by_title(*ks, b[0].ap_title, t0 + std::chrono::milliseconds(1001));
  EXPECT_EQ((*fresh)->state, MeterState::compromised);
  // Unknown meters are cached as unknown too.
  Bytes unknown = c1222::oid_from_dotted("2.16.124.113620.1.22.0.99").value();
  auto u = cache.by_title(*ks, unknown, t0);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(*u, nullptr);
  EXPECT_LE(cache.size(), 2u);  // capacity bound: the least recently used entry left
  cache.invalidate(unknown);
  EXPECT_LE(cache.size(), 1u);
  cache.clear();
  EXPECT_EQ(cache.size(), 0u);
}

}  // namespace
}  // namespace gs::store
