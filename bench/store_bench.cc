// Key-store lookups per second with a registry of one million meters (DESIGN §5 figures).
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "c1222/oid.h"
#include "src/key_store.h"
#include "src/meter_cache.h"

namespace {

constexpr int kMeters = 1'000'000;

gs::Bytes title_of(int i) {
  return gs::c1222::oid_from_dotted("2.16.124.113620.1.22.0.7." + std::to_string(i + 1)).value();
}

// Builds the store once per process (about 20 s), in a temp dir removed at exit.
gs::store::KeyStore& store() {
  static std::string dir = [] {
    char tmpl[] = "/tmp/gs-bench-store-XXXXXX";
    return std::string(mkdtemp(tmpl));
  }();
  static auto ks = [] {
    auto k = gs::store::KeyStore::open(dir + "/bench.db");
    if (!k.ok()) std::abort();
    std::vector<gs::store::NewMeter> batch;
    for (int i = 0; i < kMeters; ++i) {
      gs::store::NewMeter m;
      m.meter_id = "M" + std::to_string(i);
      m.ap_title = title_of(i);
      m.ap_title_text = ".7." + std::to_string(i + 1);
      m.public_key = gs::Bytes(65, 4);
      m.wrapped_key = gs::Bytes(24, static_cast<std::uint8_t>(i));
      m.origin = "plain";
      batch.push_back(std::move(m));
      if (batch.size() == 10000) {
        if (!k->import_meters(batch).ok()) std::abort();
        batch.clear();
      }
    }
    return std::move(k).value();
  }();
  static struct Cleanup {
    ~Cleanup() { std::filesystem::remove_all(dir); }
  } cleanup;
  return ks;
}

void BM_LookupByTitle_1M(benchmark::State& state) {
  auto& ks = store();
  std::vector<gs::Bytes> titles;
  std::mt19937 rng(1);
  for (int i = 0; i < 4096; ++i) titles.push_back(title_of(static_cast<int>(rng() % kMeters)));
  std::size_t i = 0;
  for (auto _ : state) {
    auto m = ks.meter_by_title(titles[i++ & 4095]);
    if (!m.ok() || !m->has_value()) state.SkipWithError("lookup failed");
    benchmark::DoNotOptimize(m);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LookupByTitle_1M);

void BM_LookupById_1M(benchmark::State& state) {
  auto& ks = store();
  std::mt19937 rng(2);
  std::vector<std::string> ids;
  for (int i = 0; i < 4096; ++i) ids.push_back("M" + std::to_string(rng() % kMeters));
  std::size_t i = 0;
  for (auto _ : state) {
    auto m = ks.meter_by_id(ids[i++ & 4095]);
    if (!m.ok() || !m->has_value()) state.SkipWithError("lookup failed");
    benchmark::DoNotOptimize(m);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LookupById_1M);

}  // namespace

namespace {

// The daemons' per-message path: the same uniform random lookups over all 1M meters through the
// MeterCache (capacity 1M), after one warm-up pass over the whole fleet (the TTL is longer than
// the warm-up, which takes ~20 s at the uncached rate).
void BM_LookupByTitleCached_1M(benchmark::State& state) {
  auto& ks = store();
  static gs::store::MeterCache cache(kMeters, std::chrono::minutes(10));
  static std::vector<gs::Bytes> titles = [] {
    std::vector<gs::Bytes> t;
    t.reserve(kMeters);
    for (int i = 0; i < kMeters; ++i) t.push_back(title_of(i));
    return t;
  }();
  static bool warm = [&] {
    for (const auto& t : titles) (void)cache.by_title(ks, t);
    return true;
  }();
  (void)warm;
  std::mt19937 rng(3);
  const auto hits0 = cache.hits();
  const auto misses0 = cache.misses();
  for (auto _ : state) {
    auto m = cache.by_title(ks, titles[rng() % kMeters]);
    if (!m.ok() || *m == nullptr) state.SkipWithError("lookup failed");
    benchmark::DoNotOptimize(m);
  }
  state.SetItemsProcessed(state.iterations());
  const auto hits = static_cast<double>(cache.hits() - hits0);
  const auto misses = static_cast<double>(cache.misses() - misses0);
  state.counters["hit_rate"] = hits + misses > 0 ? hits / (hits + misses) : 0;
}
BENCHMARK(BM_LookupByTitleCached_1M);

// The raw limit in the same run: one SQLite primary-key point lookup.
void BM_SqlitePointLookup_1M(benchmark::State& state) {
  auto& ks = store();
  auto st = ks.db().prepare("SELECT row FROM meters WHERE row = ?1");
  if (!st.ok()) {
    state.SkipWithError("prepare");
    return;
  }
  std::mt19937 rng(4);
  for (auto _ : state) {
    st->bind(1, static_cast<std::int64_t>(rng() % kMeters + 1));
    auto s = st->step();
    benchmark::DoNotOptimize(s);
    st->reset();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SqlitePointLookup_1M);

}  // namespace
