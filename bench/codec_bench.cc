// Google Benchmark of the C12.22 codec: decode, seal, open (mode 2, 200-byte EPSEM, HostAes),
// raw EAX', and the stream framer.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>

#include "c1222/ber.h"
#include "c1222/eax_prime.h"
#include "c1222/framer.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "src/host_aes.h"

namespace {

using gs::Bytes;
using namespace gs::c1222;

constexpr std::size_t kEpsemSize = 200;  // control byte .. last service byte (MAC excluded)

struct Fixture {
  std::unique_ptr<gs::HostAes> aes;
  std::optional<EaxPrime> eax;
  Bytes called = *relative_oid_from_dotted(".123.8437");
  Bytes calling = *relative_oid_from_dotted(".123.4");
  Bytes inv = integer_content(0x13e81421);
  Bytes epsem;
  Message clear;
  Bytes clear_wire;
  Bytes sealed;

  Fixture() {
    aes = std::move(gs::HostAes::make(*gs::from_hex("01020304050607080102030405060708"))).value();
    eax.emplace(std::move(EaxPrime::make(*aes)).value());
    epsem.push_back(0x80);
    Bytes svc{0x40, 0x00, 0x14};
    const std::size_t data = kEpsemSize - 1 - 2 - 6;  // length prefix 2, code+table+count 5, cksum 1
    svc.push_back(static_cast<std::uint8_t>(data >> 8));
    svc.push_back(static_cast<std::uint8_t>(data));
    Bytes d(data, 0x41);
    svc.insert(svc.end(), d.begin(), d.end());
    svc.push_back(c1219_checksum(d));
    append_service(epsem, svc);
    if (epsem.size() != kEpsemSize) std::abort();
    clear.called_ap_title = ApTitle{TitleForm::relative, called};
    clear.calling_ap_title = ApTitle{TitleForm::relative, calling};
    clear.calling_ap_invocation_id = gs::ByteView(inv);
    clear.auth = AuthValue{2, std::array<std::uint8_t, 4>{0x65, 0x00, 0x00, 0x01}};
    clear.epsem = epsem;
    clear_wire = std::move(encode(clear)).value();
    sealed = std::move(seal(clear, SecurityMode::encrypted, *eax)).value();
  }
};

Fixture& fx() {
  static Fixture f;
  return f;
}

void BM_Decode(benchmark::State& state) {
  const Bytes& w = fx().sealed;
  for (auto _ : state) {
    auto m = decode(w);
    benchmark::DoNotOptimize(m);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * w.size()));
}
BENCHMARK(BM_Decode);

// A cleartext (mode 0) message decoded all the way: ACSE, EPSEM envelope, service list and the
// typed decode of each service (checksums checked).
void BM_DecodeFullMode0(benchmark::State& state) {
  const Bytes& w = fx().clear_wire;
  for (auto _ : state) {
    auto m = decode(w);
    if (!m.ok()) state.SkipWithError("decode");
    auto e = split_epsem(m->epsem, m->epsem_offset);
    auto sv = split_services(e->body);
    for (const auto& s : *sv) {
      auto r = decode_request(s.bytes, s.offset);
      if (!r.ok()) state.SkipWithError("service");
      benchmark::DoNotOptimize(r);
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_DecodeFullMode0);

void BM_SealMode2(benchmark::State& state) {
  Fixture& f = fx();
  for (auto _ : state) {
    auto s = seal(f.clear, SecurityMode::encrypted, *f.eax);
    benchmark::DoNotOptimize(s);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_SealMode2);

void BM_OpenMode2(benchmark::State& state) {
  Fixture& f = fx();
  KeyLookup keys = [&f](std::uint8_t id) -> EaxPrime* { return id == 2 ? &*f.eax : nullptr; };
  for (auto _ : state) {
    auto o = open(f.sealed, keys);
    if (!o.ok()) state.SkipWithError("open failed");
    benchmark::DoNotOptimize(o);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_OpenMode2);

void BM_SealMode1(benchmark::State& state) {
  Fixture& f = fx();
  for (auto _ : state) {
    auto s = seal(f.clear, SecurityMode::authenticated, *f.eax);
    benchmark::DoNotOptimize(s);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_SealMode1);

// Raw EAX' over a 64-byte cleartext (a typical canonified header) and Arg-byte plaintext.
void BM_EaxPrimeEncrypt(benchmark::State& state) {
  Fixture& f = fx();
  Bytes clear(64, 0xA2);
  Bytes data(static_cast<std::size_t>(state.range(0)), 0x55);
  for (auto _ : state) {
    auto mac = f.eax->encrypt(clear, data);
    benchmark::DoNotOptimize(mac);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * data.size()));
}
BENCHMARK(BM_EaxPrimeEncrypt)->Arg(0)->Arg(200)->Arg(1024);

void BM_EaxPrimeDecrypt(benchmark::State& state) {
  Fixture& f = fx();
  Bytes clear(64, 0xA2);
  Bytes plain(200, 0x55);
  Bytes ct = plain;
  Mac mac = std::move(f.eax->encrypt(clear, ct)).value();
  for (auto _ : state) {
    Bytes d = ct;
    auto st = f.eax->decrypt(clear, d, mac);
    if (!st.ok()) state.SkipWithError("decrypt failed");
    benchmark::DoNotOptimize(d);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_EaxPrimeDecrypt);

// Framer: a stream of 64 sealed messages fed in 1460-byte TCP segments; items = messages.
void BM_Framer(benchmark::State& state) {
  Bytes stream;
  constexpr int kMessages = 64;
  for (int i = 0; i < kMessages; ++i) {
    stream.insert(stream.end(), fx().sealed.begin(), fx().sealed.end());
  }
  for (auto _ : state) {
    Framer f(kDefaultMaxMessage);
    int got = 0;
    for (std::size_t i = 0; i < stream.size(); i += 1460) {
      f.feed(gs::ByteView(stream).subspan(i, std::min<std::size_t>(1460, stream.size() - i)));
      for (;;) {
        auto r = f.next();
        if (!r.ok() || !r->has_value()) break;
        benchmark::DoNotOptimize(**r);
        ++got;
      }
    }
    if (got != kMessages) state.SkipWithError("framer lost messages");
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * kMessages);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * stream.size()));
}
BENCHMARK(BM_Framer);

}  // namespace
