// SoftHSM2 rates: ECDSA sign (token key, session copy, pool), EAX' over HsmAes and over bound
// operations vs the raw call composite, one PKCS#11 AES init against one update, wrap/unwrap,
// ECDH key derivation; OpenSSL rates alongside for reference.
#include <benchmark/benchmark.h>
#include <stdlib.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "c1222/eax_prime.h"
#include "hsm/bound_aes.h"
#include "hsm/hsm_aes.h"
#include "hsm/key_cache.h"
#include "hsm/module.h"
#include "hsm/ops.h"
#include "hsm/p11.h"
#include "hsm/session.h"
#include "hsm/softhsm.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"
#include "src/key_store.h"
#include "src/meter_import.h"

namespace gs::hsm {
namespace {

constexpr const char* kUserPin = "bench-user-pin";
constexpr const char* kSoPin = "bench-so-pin";

// One token in a temp dir for the whole run, removed at exit.
struct Env {
  std::string dir;
  std::unique_ptr<Module> module;
  std::unique_ptr<Session> session;
  std::unique_ptr<SessionPool> pool;
  ObjectHandle kek = 0;
  ObjectHandle token_key = 0;     // gs-cmd-1, CKA_MODIFIABLE=false
  ObjectHandle copyable_key = 0;  // gs-cmd-2 (session-copyable)
  ObjectHandle session_key = 0;   // session copy of gs-cmd-2
  ObjectHandle provision = 0;
  ObjectHandle meter_key = 0;
  Bytes wrapped;
  bool ok = false;

  Env() {
    char tmpl[] = "/tmp/gs-hsm-bench-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) {
      return;
    }
    dir = tmpl;
    auto conf = softhsm::write_config(dir);
    if (!conf.ok() || !softhsm::use_config(*conf).ok()) {
      return;
    }
    auto m = Module::open(softhsm::kDefaultModule);
    if (!m.ok()) {
      std::fprintf(stderr, "hsm_bench: %s\n", m.error().message().c_str());
      return;
    }
    module = std::move(m).value();
    auto slot = module->init_token("gs-bench", Secret(std::string_view(kSoPin)),
                                   Secret(std::string_view(kUserPin)));
    if (!slot.ok()) {
      return;
    }
    auto s = Session::open(*module, *slot);
    if (!s.ok()) {
      return;
    }
    session = std::make_unique<Session>(std::move(s).value());
    auto k = create_trusted_kek(*module, *slot, "gs-kek", Secret(std::string_view(kSoPin)),
                                Secret(std::string_view(kUserPin)));
    if (!k.ok() || !session->login(UserType::user, Secret(std::string_view(kUserPin))).ok()) {
      return;
    }
    kek = *k;
    auto c1 = generate_ec_p256(*session, "gs-cmd-1", EcKeyUse::sign);
    auto c2 = generate_ec_p256(*session, "gs-cmd-2", EcKeyUse::sign, true);
    auto pr = generate_ec_p256(*session, "gs-provision", EcKeyUse::derive);
    if (!c1.ok() || !c2.ok() || !pr.ok()) {
      return;
    }
    token_key = c1->private_key;
    copyable_key = c2->private_key;
    provision = pr->private_key;
    auto sk = copy_to_session(*session, copyable_key);
    auto w = import_and_wrap_meter_key(*session, kek, Bytes(16, 0x42));
    if (!sk.ok() || !w.ok()) {
      return;
    }
    session_key = *sk;
    wrapped = *w;
    auto mk = unwrap_meter_key(*session, kek, wrapped);
    auto p = SessionPool::make(*module, *slot, Secret(std::string_view(kUserPin)), 2);
    if (!mk.ok() || !p.ok()) {
      return;
    }
    meter_key = *mk;
    pool = std::move(p).value();
    ok = true;
  }
  ~Env() {
    pool.reset();
    session.reset();
    module.reset();
    if (!dir.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  }
};

Env& env() {
  static Env e;
  return e;
}

const Bytes& digest() {
  static const Bytes d(32, 0x5a);
  return d;
}

// A 200-byte EPSEM and a typical 60-byte canonified cleartext header.
const Bytes& epsem() {
  static const Bytes e(200, 0x33);
  return e;
}
const Bytes& cleartext() {
  static const Bytes c(60, 0x60);
  return c;
}

#define NEED_ENV()                      \
  Env& E = env();                       \
  if (!E.ok) {                          \
    state.SkipWithError("no SoftHSM2"); \
    return;                             \
  }

void BM_Sign_TokenKey(benchmark::State& state) {
  NEED_ENV();
  for (auto _ : state) {
    auto sig = sign_digest(*E.session, E.token_key, digest());
    benchmark::DoNotOptimize(sig);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Sign_TokenKey);

void BM_Sign_SessionCopy(benchmark::State& state) {
  NEED_ENV();
  for (auto _ : state) {
    auto sig = sign_digest(*E.session, E.session_key, digest());
    benchmark::DoNotOptimize(sig);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Sign_SessionCopy);

// Our full path: lease from the pool, session-copy key, sign.
void BM_Sign_Pool(benchmark::State& state) {
  NEED_ENV();
  ObjectHandle key = 0;
  {
    auto lease = E.pool->acquire();
    if (!lease.ok()) {
      state.SkipWithError("pool");
      return;
    }
    // The session copy lives in the pool's session; handles are valid for every session.
    key = *copy_to_session(lease->session(), E.copyable_key);
  }
  for (auto _ : state) {
    auto sig = E.pool->run([&](Session& s) { return sign_digest(s, key, digest()); });
    benchmark::DoNotOptimize(sig);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Sign_Pool);

void BM_Sign_OpenSsl(benchmark::State& state) {
  auto k = HostEcKey::generate();
  for (auto _ : state) {
    auto sig = k->sign(digest());
    benchmark::DoNotOptimize(sig);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Sign_OpenSsl);

// One sign after the thread slept `gap` µs (only the sign is timed): what a command costs when
// it arrives alone rather than in a busy stream. On the 2-core VM of the README's runs (session
// 15) a SoftHSM2 sign took 40 µs back to back, 74 µs after 1 ms asleep and 288 µs after 5 ms;
// OpenSSL's own 32, 85 and 220 µs: the curve's tables and the code leave the caches while the
// vCPU is halted. Part of why the SES needs more CPU per command open loop at moderate rates
// than closed loop at full load.
template <typename SignOnce>
void sign_after_idle(benchmark::State& state, SignOnce sign_once) {
  const auto gap = std::chrono::microseconds(state.range(0));
  for (auto _ : state) {
    if (gap.count() > 0) std::this_thread::sleep_for(gap);
    const auto t0 = std::chrono::steady_clock::now();
    sign_once();
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Sign_SessionCopy_AfterIdle(benchmark::State& state) {
  NEED_ENV();
  sign_after_idle(state, [&E] {
    auto sig = sign_digest(*E.session, E.session_key, digest());
    benchmark::DoNotOptimize(sig);
  });
}
BENCHMARK(BM_Sign_SessionCopy_AfterIdle)->Arg(0)->Arg(1000)->Arg(5000)->Iterations(300)->UseManualTime();

void BM_Sign_OpenSsl_AfterIdle(benchmark::State& state) {
  auto k = HostEcKey::generate();
  sign_after_idle(state, [&k] {
    auto sig = k->sign(digest());
    benchmark::DoNotOptimize(sig);
  });
}
BENCHMARK(BM_Sign_OpenSsl_AfterIdle)->Arg(0)->Arg(1000)->Arg(5000)->Iterations(300)->UseManualTime();

// EAX' of a 200-byte EPSEM through HsmAes on a cached meter-key handle.
void BM_EaxPrime_Hsm_Cached(benchmark::State& state) {
  NEED_ENV();
  auto aes = HsmAes::make(*E.session, E.meter_key);
  auto eax = c1222::EaxPrime::make(**aes);
  Bytes data = epsem();
  for (auto _ : state) {
    auto mac = eax->encrypt(cleartext(), data);
    benchmark::DoNotOptimize(mac);
  }
  state.counters["pkcs11_calls_per_msg"] =
      static_cast<double>((*aes)->counters().init_calls + (*aes)->counters().op_calls) /
      static_cast<double>(state.iterations());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EaxPrime_Hsm_Cached);

// The same PKCS#11 calls issued directly (CBC 64 B, CTR 200 B, CBC 208 B): the ceiling.
void BM_RawComposite(benchmark::State& state) {
  NEED_ENV();
  Bytes c1(64), c2(200), c3(208);
  Block iv{};
  for (auto _ : state) {
    Status a = aes_encrypt(*E.session, E.meter_key, AesMode::cbc, &iv, ByteView(c1), c1);
    Status b = aes_encrypt(*E.session, E.meter_key, AesMode::ctr, &iv, ByteView(c2), c2);
    Status c = aes_encrypt(*E.session, E.meter_key, AesMode::cbc, &iv, ByteView(c3), c3);
    benchmark::DoNotOptimize(a.ok() && b.ok() && c.ok());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_RawComposite);

// Unwrap the meter key from its stored form for each message, then destroy it.
void BM_EaxPrime_Hsm_WithUnwrap(benchmark::State& state) {
  NEED_ENV();
  Bytes data = epsem();
  for (auto _ : state) {
    auto k = unwrap_meter_key(*E.session, E.kek, E.wrapped);
    auto aes = HsmAes::make(*E.session, *k);
    auto eax = c1222::EaxPrime::make(**aes);
    auto mac = eax->encrypt(cleartext(), data);
    benchmark::DoNotOptimize(mac);
    destroy_object(*E.session, *k).ok();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EaxPrime_Hsm_WithUnwrap);

// Through the LRU: 1000 meters, cache of 256 (mostly misses) or 2048 (all hits after warm-up).
void BM_EaxPrime_Hsm_Lru(benchmark::State& state) {
  NEED_ENV();
  const std::size_t meters = 1000;
  std::vector<Bytes> stored;
  for (std::size_t i = 0; i < meters; ++i) {
    Bytes key(16, static_cast<std::uint8_t>(i));
    key[0] = static_cast<std::uint8_t>(i >> 8);
    stored.push_back(*import_and_wrap_meter_key(*E.session, E.kek, key));
  }
  MeterKeyCache cache(*E.session, E.kek, static_cast<std::size_t>(state.range(0)));
  Bytes data = epsem();
  std::uint64_t i = 0;
  auto aes = HsmAes::make(*E.session, E.meter_key);
  for (auto _ : state) {
    std::uint64_t id = (i++ * 7919) % meters;
    auto k = cache.get(id, stored[id]);
    (*aes)->set_key(*k);
    auto eax = c1222::EaxPrime::make(**aes);  // L = E_K(0): one more ECB call per message
    auto mac = eax->encrypt(cleartext(), data);
    benchmark::DoNotOptimize(mac);
  }
  state.counters["hit_rate"] = static_cast<double>(cache.hits()) /
                               static_cast<double>(cache.hits() + cache.misses());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EaxPrime_Hsm_Lru)->Arg(256)->Arg(2048);

void BM_EaxPrime_OpenSsl(benchmark::State& state) {
  auto aes = HostAes::make(Bytes(16, 0x42));
  auto eax = c1222::EaxPrime::make(**aes);
  Bytes data = epsem();
  for (auto _ : state) {
    auto mac = eax->encrypt(cleartext(), data);
    benchmark::DoNotOptimize(mac);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EaxPrime_OpenSsl);

// What one PKCS#11 AES call costs on this token: a whole single-block operation
// (C_EncryptInit + C_Encrypt) against one more block of an operation already open
// (C_EncryptUpdate). EAX' through the token is a choice between the two.
void BM_Aes_InitAndOneBlock(benchmark::State& state) {
  NEED_ENV();
  CK_FUNCTION_LIST* f = detail::fl(*E.module);
  CK_MECHANISM mech{CKM_AES_ECB, nullptr, 0};
  CK_BYTE in[16] = {}, out[16];
  for (auto _ : state) {
    CK_ULONG len = sizeof out;
    f->C_EncryptInit(E.session->handle(), &mech, E.meter_key);
    f->C_Encrypt(E.session->handle(), in, sizeof in, out, &len);
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Aes_InitAndOneBlock);

void BM_Aes_UpdateOneBlock(benchmark::State& state) {
  NEED_ENV();
  CK_FUNCTION_LIST* f = detail::fl(*E.module);
  CK_MECHANISM mech{CKM_AES_ECB, nullptr, 0};
  CK_BYTE in[16] = {}, out[16];
  f->C_EncryptInit(E.session->handle(), &mech, E.meter_key);
  for (auto _ : state) {
    CK_ULONG len = sizeof out;
    f->C_EncryptUpdate(E.session->handle(), in, sizeof in, out, &len);
    benchmark::DoNotOptimize(out);
  }
  CK_BYTE tail[16];
  CK_ULONG tl = sizeof tail;
  f->C_EncryptFinal(E.session->handle(), tail, &tl);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Aes_UpdateOneBlock);

// EAX' of a 200-byte EPSEM on the meter key's bound operations (hsm/bound_aes.h): three
// C_EncryptUpdate calls, no C_EncryptInit.
void BM_EaxPrime_Hsm_Bound(benchmark::State& state) {
  NEED_ENV();
  BoundAesPool pool(*E.module, E.session->slot(), 2);
  auto bound = pool.bind(E.meter_key);
  if (!bound) {
    state.SkipWithError("the token refused the bound operations");
    return;
  }
  auto eax = c1222::EaxPrime::make(*bound);
  Bytes data = epsem();
  for (auto _ : state) {
    auto mac = eax->encrypt(cleartext(), data);
    benchmark::DoNotOptimize(mac);
  }
  state.counters["pkcs11_calls_per_msg"] =
      static_cast<double>(bound->counters().updates) / static_cast<double>(state.iterations());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EaxPrime_Hsm_Bound);

void BM_Wrap(benchmark::State& state) {
  NEED_ENV();
  for (auto _ : state) {
    auto w = wrap_key(*E.session, E.kek, E.meter_key);
    benchmark::DoNotOptimize(w);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Wrap);

void BM_UnwrapDestroy(benchmark::State& state) {
  NEED_ENV();
  for (auto _ : state) {
    auto k = unwrap_meter_key(*E.session, E.kek, E.wrapped);
    destroy_object(*E.session, *k).ok();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_UnwrapDestroy);

// ECDH (gs-provision x meter point) + AES_ECB_ENCRYPT_DATA + wrap + destroy: one `ecdh` row.
void BM_EcdhDeriveWrap(benchmark::State& state) {
  NEED_ENV();
  auto meter = HostEcKey::generate();
  Block ctx{};
  for (auto _ : state) {
    auto k = derive_meter_key(*E.session, E.provision, meter->public_point(), ctx);
    auto w = wrap_key(*E.session, E.kek, *k);
    benchmark::DoNotOptimize(w);
    destroy_object(*E.session, *k).ok();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_EcdhDeriveWrap);

// ---- meter import (issue 3): rows/s next to the per-row HSM calls alone -------------------------

// The HSM part of a plain row: C_CreateObject (meter key) + C_WrapKey (gs-kek) + C_DestroyObject.
void BM_ImportRow_HsmOnly(benchmark::State& state) {
  NEED_ENV();
  Bytes key(16, 0x17);
  for (auto _ : state) {
    auto w = import_and_wrap_meter_key(*E.session, E.kek, key);
    benchmark::DoNotOptimize(w);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ImportRow_HsmOnly);

// The same without the wrap under the token KEK: the cost of the session object alone.
void BM_ImportRow_CreateDestroy(benchmark::State& state) {
  NEED_ENV();
  Bytes key(16, 0x17);
  for (auto _ : state) {
    auto h = import_meter_key(*E.session, key);
    destroy_object(*E.session, *h).ok();
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ImportRow_CreateDestroy);

// In-process `meters import`: parse + HSM + SQLite (batches of 1000, synchronous=FULL) of
// state.range(0) new plain rows per iteration into a store in the bench's temp dir.
void BM_ImportPlainRows(benchmark::State& state) {
  NEED_ENV();
  auto ks = store::KeyStore::open(E.dir + "/import-bench.db");
  if (!ks.ok()) {
    state.SkipWithError("store");
    return;
  }
  const auto rows = static_cast<std::size_t>(state.range(0));
  static std::size_t next = 0;
  ImportOptions opt;
  opt.base_oid = *c1222::oid_from_dotted("2.16.124.113620.1.22.0");
  std::size_t imported = 0;
  for (auto _ : state) {
    state.PauseTiming();
    std::string csv = "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (std::size_t i = 0; i < rows; ++i, ++next) {
      char key[33];
      std::snprintf(key, sizeof key, "%032zx", next * 2654435761u);
      csv += "B" + std::to_string(next) + ",.7." + std::to_string(next + 1) + ",,0,plain:" + key +
             "\n";
    }
    std::istringstream in(csv);
    state.ResumeTiming();
    auto r = import_fleet(in, *E.session, *ks, opt);
    if (!r.ok() || r->inserted != rows) {
      state.SkipWithError("import failed");
      return;
    }
    imported += r->inserted;
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(imported));
}
BENCHMARK(BM_ImportPlainRows)->Arg(10000)->Iterations(3)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace gs::hsm
