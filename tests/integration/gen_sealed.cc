// Prints C12.22 messages of every security mode and many sizes, built by gridseal's own codec,
// one "hex label" line each, for tshark_check.sh to hand to Wireshark.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "c1222/ber.h"
#include "c1222/eax_prime.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"
#include "src/host_aes.h"

namespace {

using gs::Bytes;
using namespace gs::c1222;

// Octet-string lengths whose MAC Wireshark 4.0 cannot verify (PROTOCOL.md §4.2).
bool wireshark_bad_length(std::size_t l3) {
  return (l3 >= 124 && l3 <= 127) || (l3 >= 250 && l3 <= 255);
}

// Full write of `n` data bytes to ST-20 (0x0014) with its C12.19 checksum.
Bytes full_write(std::size_t n) {
  Bytes svc{0x40, 0x00, 0x14, static_cast<std::uint8_t>(n >> 8), static_cast<std::uint8_t>(n)};
  Bytes data(n);
  for (std::size_t i = 0; i < n; ++i) {
    data[i] = static_cast<std::uint8_t>('A' + i % 26);
  }
  svc.insert(svc.end(), data.begin(), data.end());
  svc.push_back(c1219_checksum(data));
  return svc;
}

int fail(const char* what, const gs::Error& e) {
  std::fprintf(stderr, "gen_sealed: %s: %s\n", what, e.message().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // argv[1]: optional "tampered" to print messages with a flipped bit (the oracle must refuse).
  const bool tampered = argc > 1 && std::string(argv[1]) == "tampered";
  auto key = gs::from_hex("01020304050607080102030405060708");
  auto aes = gs::HostAes::make(*key);
  if (!aes.ok()) return fail("HostAes", aes.error());
  auto eax = EaxPrime::make(**aes);
  if (!eax.ok()) return fail("EaxPrime", eax.error());

  const Bytes rel_called = *relative_oid_from_dotted(".123.8437");
  const Bytes rel_calling = *relative_oid_from_dotted(".123.4");
  const Bytes abs_called = *oid_from_dotted("2.16.124.113620.1.22.0.23.2");
  const Bytes abs_calling = *oid_from_dotted("2.16.124.113620.1.22.0.23.273");
  const Bytes context = *oid_from_dotted("2.16.124.113620.1.22");

  std::vector<std::size_t> sizes;
  for (std::size_t d = 0; d < 300; ++d) sizes.push_back(d);
  for (std::size_t d = 300; d <= 1100; d += 7) sizes.push_back(d);
  if (tampered) sizes = {3, 40, 200};

  std::size_t index = 0;
  std::size_t skipped = 0;
  for (int mode = 0; mode <= 2; ++mode) {
    for (std::size_t d : sizes) {
      ++index;
      const int shape = static_cast<int>(index % 3);
      Bytes epsem{static_cast<std::uint8_t>(0x80 | (index % 2 ? 0x00 : 0x01))};
      if (index % 5 == 0) {  // ED class
        epsem[0] |= kEpsemEdClassIncluded;
        for (char c : std::string("TEST")) epsem.push_back(static_cast<std::uint8_t>(c));
      }
      append_service(epsem, Bytes{0x30, 0x00, 0x01});  // full read ST-1
      append_service(epsem, full_write(d));
      const std::size_t l3 = epsem.size() + (mode ? kMacSize : 0);
      if (wireshark_bad_length(l3)) {
        ++skipped;
        continue;
      }
      const Bytes inv = integer_content(static_cast<std::int64_t>(index * 977));
      const Bytes called_inv = integer_content(0x80);
      const Bytes qual = integer_content(4);
      Message m;
      if (shape == 0) {
        m.called_ap_title = ApTitle{TitleForm::relative, rel_called};
        m.calling_ap_title = ApTitle{TitleForm::relative, rel_calling};
      } else {
        m.called_ap_title = ApTitle{TitleForm::absolute, abs_called};
        m.calling_ap_title = ApTitle{TitleForm::absolute, abs_calling};
        m.calling_ae_qualifier = qual;
        if (shape == 2) {
          m.aso_context = context;
          m.called_ap_invocation_id = called_inv;
        }
      }
      m.calling_ap_invocation_id = inv;
      m.auth = AuthValue{2, std::array<std::uint8_t, 4>{0x65, 0x00, static_cast<std::uint8_t>(index >> 8),
                                                        static_cast<std::uint8_t>(index)}};
      m.epsem = epsem;
      gs::Result<Bytes> wire = mode == 0 ? encode(m) : seal(m, static_cast<SecurityMode>(mode), *eax);
      if (!wire.ok()) return fail("build", wire.error());
      Bytes w = std::move(wire).value();
      if (tampered) {
        if (mode == 0) continue;  // nothing to tamper with
        w[w.size() - 1 - index % 6] ^= 0x01;  // MAC or last ciphertext byte
      }
      std::printf("%s mode%d-shape%d-d%zu-L3=%zu\n", gs::to_hex(w).c_str(), mode, shape, d, l3);
    }
  }
  std::fprintf(stderr, "gen_sealed: %zu sizes skipped (Wireshark octet-string length bug)\n",
               skipped);
  return 0;
}
