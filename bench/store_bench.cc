// Key-store lookups per second with a registry of one million meters (DESIGN §5 figures).
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "c1222/oid.h"
#include "src/key_store.h"

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
