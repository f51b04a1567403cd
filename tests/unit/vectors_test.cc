// Public EAX' and C12.22 vectors (tests/vectors/eaxprime.txt, captures.txt) against the codec.
#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <string>

#include "c1222/eax_prime.h"
#include "c1222/message.h"
#include "c1222/security.h"
#include "src/host_aes.h"
#include "tests/unit/vector_file.h"

namespace gs::c1222 {
namespace {

const std::string kVectors = GS_VECTORS_DIR;

// An AES key and the EAX' object that uses it (EaxPrime keeps a pointer to the cipher).
struct TestKey {
  std::unique_ptr<HostAes> aes;
  std::optional<EaxPrime> eax;
};

TestKey make_key(ByteView key) {
  TestKey k;
  auto aes = HostAes::make(key);
  if (!aes.ok()) {
    ADD_FAILURE() << "HostAes::make: " << aes.error().message();
    return k;
  }
  k.aes = std::move(aes).value();
  auto eax = EaxPrime::make(*k.aes);
  if (!eax.ok()) {
    ADD_FAILURE() << "EaxPrime::make: " << eax.error().message();
    return k;
  }
  k.eax.emplace(std::move(eax).value());
  return k;
}

Mac to_mac(const Bytes& b) {
  Mac m{};
  if (b.size() == m.size()) {
    std::copy(b.begin(), b.end(), m.begin());
  } else {
    ADD_FAILURE() << "MAC field is not 4 bytes";
  }
  return m;
}

Bytes block_bytes(const Block& b) { return Bytes(b.begin(), b.end()); }
Bytes mac_bytes(const Mac& m) { return Bytes(m.begin(), m.end()); }

TEST(Vectors, FilesParseAndAreNotEmpty) {
  gs::test::VectorFile e(kVectors + "/eaxprime.txt");
  gs::test::VectorFile c(kVectors + "/captures.txt");
  ASSERT_TRUE(e.ok()) << e.error();
  ASSERT_TRUE(c.ok()) << c.error();
  EXPECT_EQ(e.size(), 7u);  // 5 vectors, intermediates, draft negative
  EXPECT_EQ(c.size(), 9u);  // 4 captures, 5 paper messages
  for (const auto& file : {&e, &c}) {
    for (const auto& s : *file) {
      for (const auto& f : s.fields()) {
        EXPECT_TRUE(s.is_hex(f.name)) << "line " << f.line << ": " << f.name << " is not hex";
      }
    }
  }
}

TEST(Vectors, EaxPrime) {
  gs::test::VectorFile file(kVectors + "/eaxprime.txt");
  ASSERT_TRUE(file.ok()) << file.error();
  int plain_vectors = 0;
  int intermediates = 0;
  int negatives = 0;
  for (const auto& s : file) {
    SCOPED_TRACE("section at line " + std::to_string(s.line()));
    Bytes key = s.get("Key");
    Bytes clear = s.get("Cleartext");
    Bytes plain = s.get("Plaintext");
    TestKey k = make_key(key);
    ASSERT_TRUE(k.eax.has_value());
    EaxPrime& eax = *k.eax;

    if (s.has("DraftMac")) {
      // The 2008-draft variant must not be what we compute.
      ++negatives;
      Bytes data = plain;
      auto mac = eax.encrypt(clear, data);
      ASSERT_TRUE(mac.ok());
      EXPECT_NE(data, s.get("DraftCiphertext"));
      EXPECT_NE(mac_bytes(*mac), s.get("DraftMac"));
      // And decrypting the draft output under our MAC check fails.
      Bytes draft = s.get("DraftCiphertext");
      Status st = eax.decrypt(clear, draft, to_mac(s.get("DraftMac")));
      EXPECT_FALSE(st.ok());
      EXPECT_EQ(draft, s.get("DraftCiphertext")) << "bad MAC must leave data untouched";
      continue;
    }

    Bytes ct = s.get("Ciphertext");
    Bytes mac_expected = s.get("Mac");
    // encrypt
    Bytes data = plain;
    auto mac = eax.encrypt(clear, data);
    ASSERT_TRUE(mac.ok()) << mac.error().message();
    EXPECT_EQ(to_hex(data), to_hex(ct));
    EXPECT_EQ(to_hex(mac_bytes(*mac)), to_hex(mac_expected));
    // decrypt
    Bytes back = ct;
    Status st = eax.decrypt(clear, back, to_mac(mac_expected));
    ASSERT_TRUE(st.ok()) << st.error().message();
    EXPECT_EQ(to_hex(back), to_hex(plain));
    // tampering: every MAC bit, first/last cleartext byte, first ciphertext byte
    for (std::size_t bit = 0; bit < 32; ++bit) {
      Mac bad = to_mac(mac_expected);
      bad[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
      Bytes d = ct;
      Status r = eax.decrypt(clear, d, bad);
      ASSERT_FALSE(r.ok()) << "MAC bit " << bit;
      EXPECT_EQ(r.error().code, Errc::bad_mac);
      EXPECT_EQ(d, ct);
    }
    for (std::size_t pos : {std::size_t{0}, clear.size() / 2, clear.size() - 1}) {
      Bytes c2 = clear;
      c2[pos] ^= 0x01;
      Bytes d = ct;
      EXPECT_FALSE(eax.decrypt(c2, d, to_mac(mac_expected)).ok()) << "cleartext byte " << pos;
    }
    if (!ct.empty()) {
      Bytes d = ct;
      d.back() ^= 0x80;
      EXPECT_FALSE(eax.decrypt(clear, d, to_mac(mac_expected)).ok());
    }

    if (s.has("L")) {
      ++intermediates;
      Block zero{};
      Block l{};
      ASSERT_TRUE(k.aes->encrypt_blocks(zero, l).ok());
      EXPECT_EQ(to_hex(block_bytes(l)), to_hex(s.get("L")));
      EXPECT_EQ(to_hex(block_bytes(eax.d())), to_hex(s.get("D")));
      EXPECT_EQ(to_hex(block_bytes(eax.q())), to_hex(s.get("Q")));
      EXPECT_EQ(to_hex(block_bytes(eax_prime_double(l))), to_hex(s.get("D")));
      EXPECT_EQ(to_hex(block_bytes(eax_prime_double(eax.d()))), to_hex(s.get("Q")));
      auto n = eax.cmac_prime(eax.d(), clear);
      ASSERT_TRUE(n.ok());
      EXPECT_EQ(to_hex(block_bytes(*n)), to_hex(s.get("NPrime")));
      Block ctr = *n;
      ctr[12] &= 0x7F;
      ctr[14] &= 0x7F;
      EXPECT_EQ(to_hex(block_bytes(ctr)), to_hex(s.get("Ctr0")));
      auto cp = eax.cmac_prime(eax.q(), ct);
      ASSERT_TRUE(cp.ok());
      EXPECT_EQ(to_hex(block_bytes(*cp)), to_hex(s.get("CPrime")));
      Block t{};
      for (std::size_t i = 0; i < t.size(); ++i) {
        t[i] = static_cast<std::uint8_t>((*n)[i] ^ (*cp)[i]);
      }
      EXPECT_EQ(to_hex(block_bytes(t)), to_hex(s.get("T")));
      EXPECT_EQ(to_hex(Bytes(t.begin() + 12, t.end())), to_hex(mac_expected));
      // the counter really is CTR0: E_K(CTR0) xor P[0..16) == C[0..16)
      Bytes ks(16);
      ASSERT_TRUE(k.aes->encrypt_blocks(ctr, ks).ok());
      for (std::size_t i = 0; i < 16 && i < plain.size(); ++i) {
        EXPECT_EQ(static_cast<std::uint8_t>(plain[i] ^ ks[i]), ct[i]) << i;
      }
    } else {
      ++plain_vectors;
    }
  }
  EXPECT_EQ(plain_vectors, 5);
  EXPECT_EQ(intermediates, 1);
  EXPECT_EQ(negatives, 1);
  EXPECT_TRUE(file.unused().empty()) << "unused: " << ::testing::PrintToString(file.unused());
}

TEST(Vectors, EaxPrimeDoublingEdges) {
  Block hi{};
  hi[15] = 0x80;
  Block exp{};
  exp[0] = 0x87;
  EXPECT_EQ(eax_prime_double(hi), exp);
  Block lo{};
  lo[0] = 0x80;
  Block exp2{};
  exp2[1] = 0x01;
  EXPECT_EQ(eax_prime_double(lo), exp2);
}

TEST(Vectors, WireMessages) {
  gs::test::VectorFile file(kVectors + "/captures.txt");
  ASSERT_TRUE(file.ok()) << file.error();
  int n = 0;
  for (const auto& s : file) {
    SCOPED_TRACE("section at line " + std::to_string(s.line()));
    ++n;
    Bytes wire = s.get("Wire");
    Bytes kid = s.get("KeyId");
    ASSERT_EQ(kid.size(), 1u);
    TestKey k = make_key(s.get("Key"));
    ASSERT_TRUE(k.eax.has_value());
    Bytes clear = s.get("Cleartext");
    Bytes plain = s.get("Plaintext");

    auto m = decode(wire);
    ASSERT_TRUE(m.ok()) << m.error().message();
    auto canon = canonify(*m, default_base_oid());
    ASSERT_TRUE(canon.ok()) << canon.error().message();
    EXPECT_EQ(to_hex(*canon), to_hex(clear));
    ASSERT_FALSE(m->epsem.empty());
    const SecurityMode mode = security_mode(m->epsem[0]);
    ASSERT_TRUE(mode == SecurityMode::authenticated || mode == SecurityMode::encrypted);

    auto ep = split_epsem(m->epsem, m->epsem_offset);
    ASSERT_TRUE(ep.ok()) << ep.error().message();
    ASSERT_TRUE(ep->mac.has_value());
    if (mode == SecurityMode::authenticated) {
      // The EAX' cleartext of mode 1 is the canonified header followed by the EPSEM.
      Bytes full = *canon;
      full.insert(full.end(), m->epsem.begin() + 1, m->epsem.end() - kMacSize);
      EXPECT_EQ(to_hex(Bytes(m->epsem.begin() + 1, m->epsem.end() - kMacSize)), to_hex(plain));
      Bytes empty;
      EXPECT_TRUE(k.eax->decrypt(full, empty, *ep->mac).ok());
    }

    const std::uint8_t want_kid = kid[0];
    KeyLookup keys = [&](std::uint8_t id) -> EaxPrime* {
      return id == want_kid ? &*k.eax : nullptr;
    };
    auto opened = open(wire, keys);
    ASSERT_TRUE(opened.ok()) << opened.error().message();
    EXPECT_EQ(opened->mode, mode);
    EXPECT_EQ(opened->key_id, want_kid);
    auto om = decode(opened->wire);
    ASSERT_TRUE(om.ok()) << om.error().message();
    ASSERT_FALSE(om->epsem.empty());
    EXPECT_EQ(security_mode(om->epsem[0]), SecurityMode::cleartext);
    EXPECT_EQ(om->epsem[0] & ~kEpsemSecurityMask, m->epsem[0] & ~kEpsemSecurityMask);
    EXPECT_EQ(to_hex(Bytes(om->epsem.begin() + 1, om->epsem.end())), to_hex(plain));

    // Re-sealing the opened message gives back the original bytes exactly.
    auto sealed = seal(ByteView(opened->wire), mode, *k.eax);
    ASSERT_TRUE(sealed.ok()) << sealed.error().message();
    EXPECT_EQ(to_hex(*sealed), to_hex(wire));

    // No key for that id, or the wrong key: refused.
    KeyLookup none = [](std::uint8_t) -> EaxPrime* { return nullptr; };
    EXPECT_FALSE(open(wire, none).ok());
    TestKey other = make_key(Bytes(16, 0x5a));
    KeyLookup wrong = [&](std::uint8_t) -> EaxPrime* { return &*other.eax; };
    auto w = open(wire, wrong);
    ASSERT_FALSE(w.ok());
    EXPECT_EQ(w.error().code, Errc::bad_mac);
    // Any single flipped bit of the MAC: refused.
    for (std::size_t bit = 0; bit < 32; ++bit) {
      Bytes bad = wire;
      bad[bad.size() - 4 + bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
      auto r = open(bad, keys);
      ASSERT_FALSE(r.ok()) << "bit " << bit;
      EXPECT_EQ(r.error().code, Errc::bad_mac);
    }
    // A relative AP title needs the right base: the C12.22 context without ".0" fails.
    if (m->called_ap_title && m->called_ap_title->form == TitleForm::relative) {
      SealOptions o;
      o.base_oid = c1222_context_oid();
      EXPECT_FALSE(open(wire, keys, o).ok());
    }
  }
  EXPECT_EQ(n, 9);
  EXPECT_TRUE(file.unused().empty()) << "unused: " << ::testing::PrintToString(file.unused());
}

}  // namespace
}  // namespace gs::c1222
