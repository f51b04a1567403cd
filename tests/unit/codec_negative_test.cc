// Negative corpus for the C12.22 codec (decode, split_epsem, split_services, open, Framer) and
// seal/open round trips of modes 0/1/2 with a check that every encoding produced is minimal.
#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "c1222/ber.h"
#include "c1222/eax_prime.h"
#include "c1222/framer.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"
#include "src/host_aes.h"

namespace gs::c1222 {
namespace {

// ---- raw wire construction (deliberately independent of c1222::Writer) --------------------

Bytes len_bytes(std::size_t n) {
  if (n < 0x80) {
    return {static_cast<std::uint8_t>(n)};
  }
  Bytes digits;
  while (n > 0) {
    digits.insert(digits.begin(), static_cast<std::uint8_t>(n & 0xFF));
    n >>= 8;
  }
  Bytes out{static_cast<std::uint8_t>(0x80 | digits.size())};
  out.insert(out.end(), digits.begin(), digits.end());
  return out;
}

Bytes tlv(std::uint8_t tag, const Bytes& content) {
  Bytes out{tag};
  Bytes l = len_bytes(content.size());
  out.insert(out.end(), l.begin(), l.end());
  out.insert(out.end(), content.begin(), content.end());
  return out;
}

Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const auto& p : parts) {
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

Bytes hex(const char* s) {
  auto b = from_hex(s);
  GS_CHECK(b.has_value());
  return *b;
}

// Standard elements of the sample request (c1222_std_example8 frame 1 shape).
Bytes e_a2() { return tlv(0xA2, tlv(0x80, hex("7bc175"))); }
Bytes e_a6() { return tlv(0xA6, tlv(0x80, hex("7b04"))); }
Bytes e_a8() { return tlv(0xA8, tlv(0x02, hex("03"))); }
Bytes e_ac(std::uint8_t kid = 2) {
  return tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, cat({tlv(0x80, {kid}), tlv(0x81, hex("48f3d061"))})))));
}
Bytes e_be(const Bytes& epsem) { return tlv(0xBE, tlv(0x28, tlv(0x81, epsem))); }
Bytes pdu(std::initializer_list<Bytes> elements) { return tlv(0x60, cat(elements)); }

// A mode-0 EPSEM: control 0x80 + full read ST-1.
Bytes clear_epsem() { return hex("8003300001"); }
Bytes good_wire() { return pdu({e_a2(), e_a6(), e_a8(), e_ac(), e_be(clear_epsem())}); }

// ---- keys ---------------------------------------------------------------------------------

struct TestKey {
  std::unique_ptr<HostAes> aes;
  std::optional<EaxPrime> eax;
};

std::unique_ptr<TestKey> make_key(const Bytes& key) {
  auto k = std::make_unique<TestKey>();
  auto aes = HostAes::make(key);
  GS_CHECK(aes.ok());
  k->aes = std::move(aes).value();
  auto eax = EaxPrime::make(*k->aes);
  GS_CHECK(eax.ok());
  k->eax.emplace(std::move(eax).value());
  return k;
}

TestKey& key2() {
  static std::unique_ptr<TestKey> k = make_key(hex("01020304050607080102030405060708"));
  return *k;
}

KeyLookup lookup2() {
  return [](std::uint8_t id) -> EaxPrime* { return id == 2 ? &*key2().eax : nullptr; };
}

// ---- minimal-encoding checker ---------------------------------------------------------------

// Walks a BER structure; every length must be minimal, every INTEGER minimal. Constructed
// tags (bit 0x20) are descended into. Returns a description of the first problem, or "".
std::string minimal_problem(ByteView data, std::size_t origin = 0) {
  std::size_t pos = 0;
  while (pos < data.size()) {
    const std::size_t at = origin + pos;
    const std::uint8_t tag = data[pos++];
    if (pos >= data.size()) {
      return "no length at " + std::to_string(at);
    }
    std::size_t len = 0;
    const std::uint8_t first = data[pos++];
    if (first < 0x80) {
      len = first;
    } else {
      const std::size_t n = first & 0x7F;
      if (n == 0 || n > 4 || pos + n > data.size()) {
        return "bad length form at " + std::to_string(at);
      }
      if (data[pos] == 0) {
        return "leading zero length octet at " + std::to_string(at);
      }
      for (std::size_t i = 0; i < n; ++i) {
        len = (len << 8) | data[pos++];
      }
      if (len < 0x80) {
        return "long form for a short length at " + std::to_string(at);
      }
    }
    if (pos + len > data.size()) {
      return "overrun at " + std::to_string(at);
    }
    ByteView content = data.subspan(pos, len);
    if (tag == 0x02) {
      if (content.empty()) {
        return "empty INTEGER at " + std::to_string(at);
      }
      if (content.size() > 1 && ((content[0] == 0x00 && content[1] < 0x80) ||
                                 (content[0] == 0xFF && content[1] >= 0x80))) {
        return "non-minimal INTEGER at " + std::to_string(at);
      }
    }
    if ((tag & 0x20) != 0) {
      std::string inner = minimal_problem(content, origin + pos);
      if (!inner.empty()) {
        return inner;
      }
    }
    pos += len;
  }
  return "";
}

// ---- decode: structure errors --------------------------------------------------------------

struct Case {
  const char* name;
  Bytes wire;
  Errc code;
  std::size_t offset;  // Error::kNoOffset: do not check
};

void expect_decode_error(const Case& c) {
  SCOPED_TRACE(c.name);
  auto r = decode(c.wire);
  ASSERT_FALSE(r.ok()) << "accepted: " << to_hex(c.wire);
  EXPECT_EQ(r.error().code, c.code) << r.error().message();
  if (c.offset != Error::kNoOffset) {
    EXPECT_EQ(r.error().offset, c.offset) << r.error().message();
  }
  EXPECT_FALSE(r.error().message().empty());
  // open() sees the same input and must refuse it too.
  EXPECT_FALSE(open(c.wire, lookup2()).ok());
}

TEST(CodecNegative, GoodSampleDecodes) {
  const Bytes w = good_wire();  // decode() returns views into its input: keep it alive
  auto m = decode(w);
  ASSERT_TRUE(m.ok()) << m.error().message();
  EXPECT_EQ(to_hex(m->epsem), to_hex(clear_epsem()));
  ASSERT_TRUE(m->auth && m->auth->key_id);
  EXPECT_EQ(*m->auth->key_id, 2);
  auto re = encode(*m);
  ASSERT_TRUE(re.ok());
  EXPECT_EQ(to_hex(*re), to_hex(good_wire()));
}

TEST(CodecNegative, ElementOrderDuplicatesAndUnknownTags) {
  const Bytes a2 = e_a2(), a6 = e_a6(), a8 = e_a8(), ac = e_ac(), be = e_be(clear_epsem());
  const Bytes a1 = tlv(0xA1, tlv(0x06, hex("607c86f754011600")));
  const Bytes a4 = tlv(0xA4, tlv(0x02, hex("03")));
  const Bytes a7 = tlv(0xA7, tlv(0x02, hex("04")));
  const Bytes b8 = tlv(0x8B, hex("607c86f7540116"));
  const std::size_t h = 2;  // 60 + 1 length byte
  std::vector<Case> cases = {
      {"A6 before A2", pdu({a6, a2, a8, ac, be}), Errc::wrong_order, h + a6.size()},
      {"A8 before A6", pdu({a2, a8, a6, ac, be}), Errc::wrong_order, h + a2.size() + a8.size()},
      {"BE before A8", pdu({a2, a6, be, a8}), Errc::wrong_order, h + a2.size() + a6.size() + be.size()},
      {"AC after BE", pdu({a2, a6, a8, be, ac}), Errc::wrong_order,
       h + a2.size() + a6.size() + a8.size() + be.size()},
      {"A4 before A2", pdu({a4, a2, a8, be}), Errc::wrong_order, h + a4.size()},
      {"A1 after A2", pdu({a2, a1, a8, be}), Errc::wrong_order, h + a2.size()},
      {"A7 after A8", pdu({a2, a8, a7, be}), Errc::wrong_order, h + a2.size() + a8.size()},
      {"8B after AC", pdu({a2, a8, ac, b8, be}), Errc::wrong_order,
       h + a2.size() + a8.size() + ac.size()},
      {"A2 twice", pdu({a2, a2, a8, be}), Errc::wrong_order, h + a2.size()},
      {"A8 twice", pdu({a2, a8, a8, be}), Errc::wrong_order, h + a2.size() + a8.size()},
      {"AC twice", pdu({a2, a8, ac, ac, be}), Errc::wrong_order,
       h + a2.size() + a8.size() + ac.size()},
      {"BE twice", pdu({a2, a8, be, be}), Errc::wrong_order, h + a2.size() + a8.size() + be.size()},
      {"A1 twice", pdu({a1, a1, a2, a8, be}), Errc::wrong_order, h + a1.size()},
      {"A3 called-AE-qualifier", pdu({a2, tlv(0xA3, tlv(0x02, hex("01"))), a8, be}), Errc::bad_tag,
       h + a2.size()},
      {"A5 called-AE-invocation-id", pdu({a2, tlv(0xA5, tlv(0x02, hex("01"))), a8, be}),
       Errc::bad_tag, h + a2.size()},
      {"A9 calling-AE-invocation-id", pdu({a2, a8, tlv(0xA9, tlv(0x02, hex("01"))), be}),
       Errc::bad_tag, h + a2.size() + a8.size()},
      {"A0 protocol-version", pdu({tlv(0xA0, hex("0780")), a2, a8, be}), Errc::bad_tag, h},
      {"8A", pdu({a2, a8, tlv(0x8A, hex("00")), be}), Errc::bad_tag, h + a2.size() + a8.size()},
      {"BD", pdu({a2, a8, tlv(0xBD, hex("00")), be}), Errc::bad_tag, h + a2.size() + a8.size()},
      {"00 padding element", pdu({a2, a8, be, hex("0000")}), Errc::bad_tag,
       h + a2.size() + a8.size() + be.size()},
      {"multi-byte tag", pdu({a2, a8, hex("bf1f0100"), be}), Errc::bad_tag,
       h + a2.size() + a8.size()},
  };
  for (const auto& c : cases) {
    expect_decode_error(c);
  }
}

TEST(CodecNegative, MissingElementsAndBadContents) {
  const Bytes a2 = e_a2(), a6 = e_a6(), a8 = e_a8(), ac = e_ac(), be = e_be(clear_epsem());
  std::vector<Case> cases = {
      {"missing A8", pdu({a2, a6, ac, be}), Errc::missing_element, Error::kNoOffset},
      {"missing BE", pdu({a2, a6, a8, ac}), Errc::missing_element, Error::kNoOffset},
      {"empty PDU", hex("6000"), Errc::missing_element, Error::kNoOffset},
      {"only BE", pdu({be}), Errc::missing_element, Error::kNoOffset},
      {"empty EPSEM", pdu({a2, a8, tlv(0xBE, tlv(0x28, tlv(0x81, {})))}), Errc::missing_element,
       Error::kNoOffset},
      {"empty A2", pdu({tlv(0xA2, {}), a8, be}), Errc::missing_element, Error::kNoOffset},
      {"A2 holds 04", pdu({tlv(0xA2, tlv(0x04, hex("7b"))), a8, be}), Errc::bad_tag, 4},
      {"A2 holds two titles", pdu({tlv(0xA2, cat({tlv(0x80, hex("7b")), tlv(0x80, hex("7b"))})), a8, be}),
       Errc::trailing_data, Error::kNoOffset},
      {"A2 empty OID", pdu({tlv(0xA2, tlv(0x06, {})), a8, be}), Errc::bad_value, Error::kNoOffset},
      {"A2 OID unterminated arc", pdu({tlv(0xA2, tlv(0x06, hex("6086"))), a8, be}), Errc::bad_value,
       Error::kNoOffset},
      {"A8 empty INTEGER", pdu({a2, tlv(0xA8, tlv(0x02, {})), be}), Errc::bad_value, Error::kNoOffset},
      {"A8 10-byte INTEGER", pdu({a2, tlv(0xA8, tlv(0x02, Bytes(10, 1))), be}), Errc::too_large,
       Error::kNoOffset},
      {"A8 holds OCTET STRING", pdu({a2, tlv(0xA8, tlv(0x04, hex("03"))), be}), Errc::bad_tag,
       Error::kNoOffset},
      {"A8 trailing", pdu({a2, tlv(0xA8, cat({tlv(0x02, hex("03")), hex("00")})), be}),
       Errc::trailing_data, Error::kNoOffset},
      {"BE holds 30", pdu({a2, a8, tlv(0xBE, tlv(0x30, tlv(0x81, clear_epsem())))}), Errc::bad_tag,
       Error::kNoOffset},
      {"EXTERNAL holds 80", pdu({a2, a8, tlv(0xBE, tlv(0x28, tlv(0x80, clear_epsem())))}),
       Errc::bad_tag, Error::kNoOffset},
      {"indirect-reference in user-information",
       pdu({a2, a8, tlv(0xBE, tlv(0x28, cat({tlv(0x02, hex("00")), tlv(0x81, clear_epsem())})))}),
       Errc::unsupported, Error::kNoOffset},
      {"indirect-reference 2 bytes",
       pdu({a2, a8, tlv(0xBE, tlv(0x28, cat({tlv(0x02, hex("0101")), tlv(0x81, clear_epsem())})))}),
       Errc::unsupported, Error::kNoOffset},
      {"trailing inside EXTERNAL",
       pdu({a2, a8, tlv(0xBE, tlv(0x28, cat({tlv(0x81, clear_epsem()), hex("00")})))}),
       Errc::trailing_data, Error::kNoOffset},
      {"trailing inside BE", pdu({a2, a8, tlv(0xBE, cat({tlv(0x28, tlv(0x81, clear_epsem())), hex("00")}))}),
       Errc::trailing_data, Error::kNoOffset},
      {"AC key id 2 bytes",
       pdu({a2, a8, tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, tlv(0x80, hex("0202")))))), be}),
       Errc::bad_value, Error::kNoOffset},
      {"AC IV 3 bytes",
       pdu({a2, a8, tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, tlv(0x81, hex("010203")))))), be}),
       Errc::bad_value, Error::kNoOffset},
      {"AC unknown field",
       pdu({a2, a8, tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, tlv(0x82, hex("01")))))), be}),
       Errc::bad_tag, Error::kNoOffset},
      {"AC IV before key id",
       pdu({a2, a8,
            tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, cat({tlv(0x81, hex("48f3d061")), tlv(0x80, hex("02"))}))))),
            be}),
       Errc::bad_tag, Error::kNoOffset},
      {"AC without EXTERNAL", pdu({a2, a8, tlv(0xAC, tlv(0xA0, hex("00"))), be}), Errc::bad_tag,
       Error::kNoOffset},
      {"AC trailing", pdu({a2, a8, tlv(0xAC, cat({tlv(0xA2, tlv(0xA0, tlv(0xA1, {}))), hex("00")})), be}),
       Errc::trailing_data, Error::kNoOffset},
  };
  for (const auto& c : cases) {
    expect_decode_error(c);
  }
}

TEST(CodecNegative, LengthForms) {
  const Bytes body = cat({e_a2(), e_a8(), e_be(clear_epsem())});
  auto with_len = [&](const Bytes& len) {
    Bytes w{0x60};
    w.insert(w.end(), len.begin(), len.end());
    w.insert(w.end(), body.begin(), body.end());
    return w;
  };
  const auto n = static_cast<std::uint8_t>(body.size());
  std::vector<Case> cases = {
      {"indefinite outer length", with_len({0x80}), Errc::bad_length, 1},
      {"length-of-length 5", with_len({0x85, 0, 0, 0, 0, n}), Errc::bad_length, 1},
      {"length-of-length 8", with_len({0x88, 0, 0, 0, 0, 0, 0, 0, n}), Errc::bad_length, 1},
      {"length-of-length 127", with_len({0xFF}), Errc::bad_length, 1},
      {"outer length one too long", with_len({static_cast<std::uint8_t>(n + 1)}), Errc::truncated,
       0},
      {"outer length one too short", with_len({static_cast<std::uint8_t>(n - 1)}),
       Errc::trailing_data, n + 1u},
      {"outer length 16 MiB + 1", with_len({0x84, 0x01, 0x00, 0x00, 0x01}), Errc::too_large, 1},
      {"outer length 4 GiB - 1", with_len({0x84, 0xFF, 0xFF, 0xFF, 0xFF}), Errc::too_large, 1},
      {"length octets cut short", hex("6082"), Errc::truncated, 1},
      {"no length", hex("60"), Errc::truncated, 1},
      {"empty input", {}, Errc::truncated, 0},
      {"wrong first tag 30", tlv(0x30, body), Errc::bad_tag, 0},
      {"wrong first tag 61", tlv(0x61, body), Errc::bad_tag, 0},
      {"trailing byte after PDU", cat({with_len({n}), hex("00")}), Errc::trailing_data, n + 2u},
      {"second PDU after PDU", cat({with_len({n}), with_len({n})}), Errc::trailing_data, n + 2u},
      {"indefinite A2", pdu({hex("a280"), e_a8(), e_be(clear_epsem())}), Errc::bad_length, 3},
      {"indefinite BE", pdu({e_a2(), e_a8(), hex("be8000")}), Errc::bad_length, Error::kNoOffset},
      {"indefinite 81", pdu({e_a2(), e_a8(), hex("be042802818000")}), Errc::bad_length,
       Error::kNoOffset},
      {"A8 length past the PDU", pdu({e_a2(), hex("a80a020103")}), Errc::truncated,
       Error::kNoOffset},
      {"81 length past EXTERNAL", pdu({e_a2(), e_a8(), hex("be0528038105800330")}), Errc::truncated,
       Error::kNoOffset},
  };
  for (const auto& c : cases) {
    expect_decode_error(c);
  }
  // A message above the configured cap is refused before parsing.
  Bytes big = pdu({e_a2(), e_a8(), e_be(cat({clear_epsem(), Bytes(9000, 0x11)}))});
  auto r = decode(big);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::too_large);
  EXPECT_TRUE(decode(big, {.max_message = 20000}).ok());
  EXPECT_FALSE(decode(good_wire(), {.max_message = good_wire().size() - 1}).ok());
}

TEST(CodecNegative, NonMinimalLengthsAreReadButNeverWritten) {
  // BER allows them (Reader::length accepts); encode() re-emits minimal forms.
  Bytes w = good_wire();
  Bytes nm{0x60, 0x81, w[1]};
  nm.insert(nm.end(), w.begin() + 2, w.end());
  auto m = decode(nm);
  ASSERT_TRUE(m.ok()) << m.error().message();
  auto re = encode(*m);
  ASSERT_TRUE(re.ok());
  EXPECT_EQ(to_hex(*re), to_hex(w));
  EXPECT_EQ(minimal_problem(*re), "");
  EXPECT_NE(minimal_problem(nm), "");  // the checker itself can fail
  EXPECT_NE(minimal_problem(hex("02020001")), "");
  EXPECT_NE(minimal_problem(hex("0202ff80")), "");
  EXPECT_NE(minimal_problem(hex("3082000100")), "");
  for (const Bytes& raw : {hex("8100"), hex("820000"), hex("8180"), hex("83000080")}) {
    Reader r(raw);
    EXPECT_TRUE(r.length().ok()) << to_hex(raw);
  }
}

TEST(CodecNegative, TruncatedAtEveryByte) {
  std::vector<Bytes> samples = {good_wire()};
  // Secured samples of both modes and a long one (2-byte lengths).
  for (auto mode : {SecurityMode::authenticated, SecurityMode::encrypted}) {
    for (std::size_t n : {4u, 300u}) {
      Bytes epsem{0x80};
      epsem.push_back(n < 128 ? static_cast<std::uint8_t>(n - 1) : 0x82);
      if (n >= 128) {
        epsem.push_back(static_cast<std::uint8_t>((n - 3) >> 8));
        epsem.push_back(static_cast<std::uint8_t>((n - 3) & 0xFF));
      }
      while (epsem.size() < n + 1) {
        epsem.push_back(0x40);
      }
      Bytes clear = pdu({e_a2(), e_a6(), e_a8(), e_ac(), e_be(epsem)});
      auto s = seal(ByteView(clear), mode, *key2().eax);
      ASSERT_TRUE(s.ok()) << s.error().message();
      samples.push_back(*s);
    }
  }
  for (const auto& w : samples) {
    ASSERT_TRUE(decode(w).ok());
    for (std::size_t cut = 0; cut < w.size(); ++cut) {
      ByteView prefix(w.data(), cut);
      auto r = decode(prefix);
      ASSERT_FALSE(r.ok()) << "prefix " << cut << " of " << to_hex(w);
      EXPECT_EQ(r.error().code, Errc::truncated) << cut << ": " << r.error().message();
      EXPECT_FALSE(open(prefix, lookup2()).ok());
      // Framer: a prefix never yields a PDU.
      Framer f(kDefaultMaxMessage);
      f.feed(prefix);
      auto n = f.next();
      ASSERT_TRUE(n.ok()) << cut;
      EXPECT_FALSE(n->has_value()) << cut;
      EXPECT_EQ(f.buffered(), cut);
    }
  }
}

// Every single-bit change anywhere in a sealed message is refused by open(): header bytes
// (all covered by the canonified cleartext), EPSEM, and each of the 32 MAC bits.
TEST(CodecNegative, EveryBitFlipIsRefused) {
  for (auto mode : {SecurityMode::authenticated, SecurityMode::encrypted}) {
    for (bool ed_class : {false, true}) {
      Bytes epsem = ed_class ? hex("9054454d5004300001") : clear_epsem();
      Bytes clear = pdu({tlv(0xA1, tlv(0x06, hex("607c86f7540116"))), e_a2(),
                         tlv(0xA4, tlv(0x02, hex("0080"))), e_a6(), tlv(0xA7, tlv(0x02, hex("04"))),
                         e_a8(), e_ac(), e_be(epsem)});
      auto s = seal(ByteView(clear), mode, *key2().eax);
      ASSERT_TRUE(s.ok()) << s.error().message();
      const Bytes& w = *s;
      ASSERT_TRUE(open(w, lookup2()).ok());
      int refused = 0;
      for (std::size_t i = 0; i < w.size(); ++i) {
        for (int bit = 0; bit < 8; ++bit) {
          Bytes bad = w;
          bad[i] ^= static_cast<std::uint8_t>(1u << bit);
          auto r = open(bad, lookup2());
          EXPECT_FALSE(r.ok()) << "byte " << i << " bit " << bit << " mode "
                               << static_cast<int>(mode);
          refused += r.ok() ? 0 : 1;
          if (i >= w.size() - kMacSize && !r.ok()) {
            EXPECT_EQ(r.error().code, Errc::bad_mac) << "MAC byte " << i;
          }
        }
      }
      EXPECT_EQ(refused, static_cast<int>(w.size() * 8));
    }
  }
}

TEST(CodecNegative, OpenRefusals) {
  auto sealed_of = [](const Bytes& clear, SecurityMode mode) {
    auto s = seal(ByteView(clear), mode, *key2().eax);
    GS_CHECK(s.ok());
    return *s;
  };
  const Bytes w2 = sealed_of(good_wire(), SecurityMode::encrypted);
  // mode 0 is not "opened"
  {
    auto r = open(good_wire(), lookup2());
    ASSERT_FALSE(r.ok());
  }
  // mode 3 (reserved)
  {
    Bytes w = pdu({e_a2(), e_a8(), e_ac(), e_be(hex("8c03300001aabbccdd"))});
    EXPECT_FALSE(open(w, lookup2()).ok());
  }
  // secured EPSEM shorter than its MAC
  for (const char* ep : {"88", "88aa", "88aabbcc", "84aabbcc"}) {
    Bytes w = pdu({e_a2(), e_a8(), e_ac(), e_be(hex(ep))});
    EXPECT_FALSE(open(w, lookup2()).ok()) << ep;
  }
  // no key for the key id; null lookup
  EXPECT_FALSE(open(w2, [](std::uint8_t) -> EaxPrime* { return nullptr; }).ok());
  EXPECT_FALSE(open(w2, KeyLookup{}).ok());
  // wrong key id in AC (MAC would fail anyway; lookup refuses first)
  {
    Bytes w = w2;
    auto m = decode(w);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(*m->auth->key_id, 2);
  }
  // Missing A2: canonify has no called title.
  {
    Bytes clear = pdu({e_a6(), e_a8(), e_ac(), e_be(hex("8803300001aabbccdd"))});
    auto r = open(clear, lookup2());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, Errc::missing_element);
  }
  // Without AC the key id is 0: our lookup has no key 0.
  {
    Bytes clear = pdu({e_a2(), e_a8(), e_be(hex("8803300001aabbccdd"))});
    EXPECT_FALSE(open(clear, lookup2()).ok());
  }
  // A MAC computed over the wrong base OID is refused.
  {
    SealOptions o;
    o.base_oid = c1222_context_oid();
    auto s = seal(ByteView(good_wire()), SecurityMode::authenticated, *key2().eax, o);
    ASSERT_TRUE(s.ok());
    EXPECT_TRUE(open(*s, lookup2(), o).ok());
    auto r = open(*s, lookup2());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, Errc::bad_mac);
  }
  // Swapping the ciphertexts of two messages under the same key: refused.
  {
    Bytes other = pdu({e_a2(), e_a6(), tlv(0xA8, tlv(0x02, hex("04"))), e_ac(), e_be(clear_epsem())});
    Bytes w3 = sealed_of(other, SecurityMode::encrypted);
    ASSERT_EQ(w3.size(), w2.size());
    Bytes mix = w2;
    std::copy(w3.end() - 8, w3.end(), mix.end() - 8);
    EXPECT_FALSE(open(mix, lookup2()).ok());
  }
}

TEST(CodecNegative, SealRefusals) {
  EaxPrime& k = *key2().eax;
  // no AC, AC without IV, AC without key id
  EXPECT_FALSE(seal(ByteView(pdu({e_a2(), e_a8(), e_be(clear_epsem())})), SecurityMode::encrypted, k).ok());
  EXPECT_FALSE(seal(ByteView(pdu({e_a2(), e_a8(),
                                  tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, tlv(0x80, hex("02")))))),
                                  e_be(clear_epsem())})),
                    SecurityMode::encrypted, k)
                   .ok());
  EXPECT_FALSE(seal(ByteView(pdu({e_a2(), e_a8(),
                                  tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, tlv(0x81, hex("01020304")))))),
                                  e_be(clear_epsem())})),
                    SecurityMode::encrypted, k)
                   .ok());
  // no A2
  EXPECT_FALSE(seal(ByteView(pdu({e_a8(), e_ac(), e_be(clear_epsem())})), SecurityMode::encrypted, k).ok());
  // mode 0 / mode 3 requested
  EXPECT_FALSE(seal(ByteView(good_wire()), SecurityMode::cleartext, k).ok());
  EXPECT_FALSE(seal(ByteView(good_wire()), static_cast<SecurityMode>(3), k).ok());
  // already secured
  auto s = seal(ByteView(good_wire()), SecurityMode::authenticated, k);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(seal(ByteView(*s), SecurityMode::encrypted, k).ok());
  // malformed input
  EXPECT_FALSE(seal(ByteView(hex("6003a80100")), SecurityMode::encrypted, k).ok());
}

// The shortest canonified cleartext a decodable message can give is 17 bytes
// (A2 03 06 01 00 | A8 03 02 01 00 | BE 05 28 03 81 01 ctl): the <= 16-byte refusal of seal/open
// is a defence in depth that no well-formed message reaches. Check the boundary is accepted and
// that the EAX' layer distinguishes such short cleartexts correctly.
TEST(CodecNegative, ShortestCleartextBoundary) {
  EaxPrime& k = *key2().eax;
  Bytes tiny = pdu({tlv(0xA2, tlv(0x06, hex("00"))), tlv(0xA8, tlv(0x02, hex("00"))),
                    tlv(0xAC, tlv(0xA2, tlv(0xA0, tlv(0xA1, cat({tlv(0x80, hex("02")), tlv(0x81, hex("00000000"))}))))),
                    e_be(hex("80"))});
  auto m = decode(tiny);
  ASSERT_TRUE(m.ok()) << m.error().message();
  auto c = canonify(*m, default_base_oid());
  ASSERT_TRUE(c.ok());
  EXPECT_GT(c->size(), 16u);
  for (auto mode : {SecurityMode::authenticated, SecurityMode::encrypted}) {
    auto s = seal(ByteView(tiny), mode, k);
    ASSERT_TRUE(s.ok()) << s.error().message();
    auto o = open(*s, lookup2());
    ASSERT_TRUE(o.ok()) << o.error().message();
    EXPECT_EQ(to_hex(o->wire), to_hex(tiny));
  }
  // Without AC the header is 17 bytes: A2(5) + A8(5) + BE header(7).
  Bytes bare = pdu({tlv(0xA2, tlv(0x06, hex("00"))), tlv(0xA8, tlv(0x02, hex("00"))), e_be(hex("84aabbccdd"))});
  auto mb = decode(bare);
  ASSERT_TRUE(mb.ok());
  auto cb = canonify(*mb, default_base_oid());
  ASSERT_TRUE(cb.ok());
  EXPECT_EQ(cb->size(), 17u);
}

// ---- split_epsem / split_services ------------------------------------------------------------

TEST(CodecNegative, SplitEpsem) {
  struct E {
    const char* hex;
    bool ok;
  };
  const std::vector<E> cases = {
      {"", false},           {"8c", false},          {"8caabbccdd", false},
      {"84", false},         {"84aabbcc", false},    {"88aabbcc", false},
      {"90", false},         {"90aabbcc", false},    {"94aabbccdd11223344", true},
      {"0c00000000", false}, {"80", true},           {"84aabbccdd", true},
      {"88aabbccdd", true},  {"90aabbccdd", true},   {"9801aabbccdd", true},
      {"94aabbcc11223344", false},
  };
  for (const auto& c : cases) {
    Bytes b = hex(c.hex);
    auto r = split_epsem(b, 10);
    EXPECT_EQ(r.ok(), c.ok) << c.hex;
    if (!r.ok()) {
      EXPECT_GE(r.error().offset, 10u) << c.hex;
    }
  }
  // 0x94 = ED class + mode 1: ED class 4 bytes then MAC 4 bytes, empty body.
  const Bytes e1 = hex("94aabbccdd11223344");
  auto r = split_epsem(e1);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->body.empty());
  const Bytes e2 = hex("94aabbccdd0330000111223344");
  auto g = split_epsem(e2);
  ASSERT_TRUE(g.ok());
  ASSERT_TRUE(g->ed_class.has_value());
  ASSERT_TRUE(g->mac.has_value());
  EXPECT_EQ(to_hex(g->body), "03300001");
  // mode 2: ED class is encrypted, stays in body
  const Bytes e3 = hex("98aabbccdd0330000111223344");
  auto e = split_epsem(e3);
  ASSERT_TRUE(e.ok());
  EXPECT_FALSE(e->ed_class.has_value());
  EXPECT_EQ(e->body.size(), 8u);
}

TEST(CodecNegative, SplitServices) {
  const std::vector<const char*> bad = {
      "00",                // zero service length
      "0330000100",        // trailing zero padding
      "03300001000000",    // more padding
      "04300001",          // length past the end
      "033000",            // cut short
      "80",                // indefinite
      "8530",              // length-of-length 5
      "81",                // length octets missing
      "8200",              // length octets cut short
      "820010",            // 16 bytes promised, none there
      "84ffffffff",        // huge
      "0330000103",        // second service cut short
      "ff",                // length-of-length 127
      "8100",              // zero service length in long form (fuzz finding)
      "820000",            // the same with two octets
      "0330000181005201",  // an empty service between two good ones
  };
  for (const char* h : bad) {
    auto r = split_services(hex(h), 100);
    ASSERT_FALSE(r.ok()) << h;
    EXPECT_GE(r.error().offset, 100u) << h;
  }
  // exactly kMaxServices is fine, one more is too many
  Bytes many;
  for (std::size_t i = 0; i < kMaxServices; ++i) {
    append_service(many, hex("52"));
  }
  auto ok = split_services(many);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->size(), kMaxServices);
  append_service(many, hex("52"));
  auto over = split_services(many);
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.error().code, Errc::too_large);
  // offsets of the code bytes
  auto two = split_services(hex("0330000101528130"), 7);
  EXPECT_FALSE(two.ok());  // "81 30" promises 0x30 bytes
  // a non-minimal service length (81 01) is valid BER and accepted
  const Bytes s3 = hex("0330000101528101" "30");
  auto t3 = split_services(s3, 7);
  ASSERT_TRUE(t3.ok()) << t3.error().message();
  ASSERT_EQ(t3->size(), 3u);
  EXPECT_EQ((*t3)[0].offset, 8u);
  EXPECT_EQ((*t3)[1].offset, 12u);
  EXPECT_EQ((*t3)[2].offset, 15u);
  EXPECT_EQ(to_hex((*t3)[2].bytes), "30");
  EXPECT_TRUE(split_services({}).ok());
}

// ---- Framer -----------------------------------------------------------------------------------

TEST(CodecNegative, FramerErrors) {
  struct F {
    const char* name;
    Bytes in;
    std::size_t cap;
  };
  const std::vector<F> cases = {
      {"first byte 00", hex("00"), 1024},
      {"first byte 61", hex("6103000000"), 1024},
      {"first byte a2", hex("a2058003"), 1024},
      {"indefinite", hex("6080"), 1024},
      {"length-of-length 5", hex("60850000000001"), 1024},
      {"length-of-length 127", hex("60ff"), 1024},
      {"above cap (short form)", hex("607f"), 100},
      {"above cap (long form)", hex("60820400"), 1024},
      {"4 GiB at an 8 KiB cap", hex("6084ffffffff"), kDefaultMaxMessage},
      {"garbage after a PDU", cat({good_wire(), hex("ff")}), 1024},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Framer f(c.cap);
    f.feed(c.in);
    Result<std::optional<Bytes>> r = f.next();
    if (c.in.size() > 0 && c.in[0] == 0x60 && r.ok() && r->has_value()) {
      r = f.next();  // the good PDU came first
    }
    ASSERT_FALSE(r.ok());
    // the stream stays failed even when good bytes follow
    f.feed(good_wire());
    EXPECT_FALSE(f.next().ok());
  }
}

TEST(CodecNegative, FramerSplitsAndJoins) {
  std::vector<Bytes> pdus = {good_wire(), hex("6000"),
                             pdu({e_a2(), e_a8(), e_be(cat({clear_epsem(), Bytes(300, 0x22)}))})};
  Bytes stream;
  for (const auto& p : pdus) {
    stream.insert(stream.end(), p.begin(), p.end());
  }
  for (std::size_t chunk : {1u, 2u, 3u, 7u, 64u, 10000u}) {
    Framer f(kDefaultMaxMessage);
    std::vector<Bytes> got;
    for (std::size_t i = 0; i < stream.size(); i += chunk) {
      f.feed(ByteView(stream).subspan(i, std::min(chunk, stream.size() - i)));
      while (true) {
        auto r = f.next();
        ASSERT_TRUE(r.ok()) << r.error().message();
        if (!r->has_value()) {
          break;
        }
        got.push_back(std::move(**r));
      }
    }
    ASSERT_EQ(got.size(), pdus.size()) << "chunk " << chunk;
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i], pdus[i]);
    }
    EXPECT_EQ(f.buffered(), 0u);
  }
  // a PDU exactly at the cap passes, one byte more fails
  Bytes p = pdus[2];
  Framer at(p.size());
  at.feed(p);
  auto r = at.next();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->has_value());
  Framer below(p.size() - 1);
  below.feed(p);
  EXPECT_FALSE(below.next().ok());
}

// ---- round trips and minimal encodings ---------------------------------------------------------

Bytes body_of_size(std::size_t n) {
  Bytes b(n);
  for (std::size_t i = 0; i < n; ++i) {
    b[i] = static_cast<std::uint8_t>(i * 7 + 3);
  }
  return b;
}

TEST(CodecNegative, RoundTripsAllModesSizes0To1100) {
  EaxPrime& k = *key2().eax;
  Bytes called = *relative_oid_from_dotted(".123.8437");
  Bytes calling = *oid_from_dotted("2.16.124.113620.1.22.0.4");
  Bytes inv = integer_content(0x13e81421);
  Bytes qual = integer_content(4);
  for (std::size_t n = 0; n <= 1100; ++n) {
    Bytes epsem{static_cast<std::uint8_t>(0x80 | (n % 3))};
    Bytes body = body_of_size(n);
    epsem.insert(epsem.end(), body.begin(), body.end());
    Message m;
    m.called_ap_title = ApTitle{TitleForm::relative, called};
    m.calling_ap_title = ApTitle{TitleForm::absolute, calling};
    m.calling_ap_invocation_id = ByteView(inv);
    if (n % 2 == 0) {
      m.calling_ae_qualifier = ByteView(qual);
    }
    m.auth = AuthValue{2, std::array<std::uint8_t, 4>{0x5f, 0x00, 0x00, static_cast<std::uint8_t>(n)}};
    m.epsem = epsem;
    auto w0 = encode(m);
    ASSERT_TRUE(w0.ok()) << n;
    ASSERT_EQ(minimal_problem(*w0), "") << n;
    auto d0 = decode(*w0, {.max_message = 4096});
    ASSERT_TRUE(d0.ok()) << n << ": " << d0.error().message();
    ASSERT_EQ(to_hex(d0->epsem), to_hex(epsem)) << n;
    auto again = encode(*d0);
    ASSERT_TRUE(again.ok());
    ASSERT_EQ(*again, *w0) << n;
    for (auto mode : {SecurityMode::authenticated, SecurityMode::encrypted}) {
      auto s = seal(m, mode, k);
      ASSERT_TRUE(s.ok()) << n << ": " << s.error().message();
      ASSERT_EQ(minimal_problem(*s), "") << n;
      auto ds = decode(*s, {.max_message = 4096});
      ASSERT_TRUE(ds.ok());
      ASSERT_EQ(security_mode(ds->epsem[0]), mode);
      ASSERT_EQ(ds->epsem.size(), epsem.size() + kMacSize);
      if (mode == SecurityMode::authenticated) {
        ASSERT_TRUE(std::equal(body.begin(), body.end(), ds->epsem.begin() + 1)) << n;
      } else if (n >= 8) {
        ASSERT_FALSE(std::equal(body.begin(), body.end(), ds->epsem.begin() + 1)) << n;
      }
      auto o = open(*s, lookup2());
      ASSERT_TRUE(o.ok()) << n << ": " << o.error().message();
      ASSERT_EQ(o->mode, mode);
      ASSERT_EQ(o->key_id, 2);
      ASSERT_EQ(to_hex(o->wire), to_hex(*w0)) << n;
      // sealing is deterministic for the same header (same nonce): same bytes again
      auto s2 = seal(ByteView(o->wire), mode, k);
      ASSERT_TRUE(s2.ok());
      ASSERT_EQ(*s2, *s) << n;
    }
  }
}

TEST(CodecNegative, WriterAndIntegersAreMinimal) {
  for (std::size_t n : {0u, 1u, 127u, 128u, 255u, 256u, 65535u, 65536u, 16777215u, 16777216u}) {
    Bytes out;
    Writer w(out);
    w.length(n);
    EXPECT_EQ(out, len_bytes(n)) << n;
    EXPECT_EQ(length_size(n), out.size()) << n;
    Reader r(out);
    auto back = r.length();
    if (n <= kMaxBerLength) {
      ASSERT_TRUE(back.ok()) << n;
      EXPECT_EQ(*back, n);
    }
  }
  for (std::int64_t v : {0LL, 1LL, 127LL, 128LL, 255LL, 256LL, 32767LL, 32768LL, -1LL, -128LL,
                         -129LL, 0x13e81421LL, 0x7fffffffffffffffLL, -0x7fffffffffffffffLL - 1}) {
    Bytes c = integer_content(v);
    EXPECT_EQ(minimal_problem(tlv(0x02, c)), "") << v;
    auto back = integer_value(c);
    ASSERT_TRUE(back.ok()) << v;
    EXPECT_EQ(*back, v);
  }
  EXPECT_EQ(to_hex(integer_content(3)), "03");
  EXPECT_EQ(to_hex(integer_content(0x80)), "0080");
  EXPECT_EQ(to_hex(integer_content(0x13e81421)), "13e81421");
  EXPECT_FALSE(integer_value({}).ok());
  EXPECT_FALSE(integer_value(Bytes(9, 1)).ok());
}

TEST(CodecNegative, Checksums) {
  // PROTOCOL.md §2.7 / §8: "MANUFACTURER SN " -> 0x92; capture 4 table data -> 0x21.
  EXPECT_EQ(c1219_checksum(as_bytes("MANUFACTURER SN ")), 0x92);
  EXPECT_EQ(c1219_checksum(hex("45452020413352202020202002000306202020202020202031323334353637"
                               "38")),
            0x21);
  EXPECT_EQ(c1219_checksum({}), 0x00);
  // every single-bit error in the data changes the checksum
  Bytes d = hex("45452020413352202020202002000306");
  const std::uint8_t good = c1219_checksum(d);
  for (std::size_t i = 0; i < d.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      Bytes e = d;
      e[i] ^= static_cast<std::uint8_t>(1u << bit);
      EXPECT_NE(c1219_checksum(e), good);
    }
  }
  // sum(data) + checksum == 0 mod 256
  unsigned sum = good;
  for (auto b : d) {
    sum += b;
  }
  EXPECT_EQ(sum & 0xFFu, 0u);
}

}  // namespace
}  // namespace gs::c1222
