// Lead's smoke tests of BER, OIDs, the ACSE codec, EAX' and seal/open against public vectors.
#include <gtest/gtest.h>

#include "c1222/ber.h"
#include "c1222/framer.h"
#include "c1222/message.h"
#include "c1222/security.h"
#include "src/host_aes.h"

namespace gs::c1222 {
namespace {

Bytes hex(std::string_view s) {
  auto b = from_hex(s);
  EXPECT_TRUE(b.has_value()) << s;
  return b.value_or(Bytes{});
}

TEST(Ber, IntegerContentIsMinimal) {
  EXPECT_EQ(to_hex(integer_content(3)), "03");
  EXPECT_EQ(to_hex(integer_content(0x80)), "0080");
  EXPECT_EQ(to_hex(integer_content(0x13e81421)), "13e81421");
  EXPECT_EQ(to_hex(integer_content(-1)), "ff");
  EXPECT_EQ(to_hex(integer_content(0)), "00");
  EXPECT_EQ(integer_value(hex("0080")).value(), 0x80);
  EXPECT_EQ(integer_value(hex("ff")).value(), -1);
}

TEST(Ber, LongLengthsRoundTrip) {
  for (std::size_t n : {0u, 1u, 127u, 128u, 255u, 256u, 65535u, 65536u}) {
    Bytes out;
    Writer w(out);
    w.length(n);
    EXPECT_EQ(out.size(), length_size(n));
    Reader r(out);
    EXPECT_EQ(r.length().value(), n);
  }
  Bytes indefinite = {0x80};
  EXPECT_EQ(Reader(indefinite).length().error().code, Errc::bad_length);
  Bytes five = {0x85, 0, 0, 0, 0, 1};
  EXPECT_EQ(Reader(five).length().error().code, Errc::bad_length);
}

TEST(Ber, OpenCloseWidensLength) {
  Bytes out;
  Writer w(out);
  std::size_t m = w.open(0x81);
  for (int i = 0; i < 200; ++i) w.u8(0xAA);
  w.close(m);
  EXPECT_EQ(out[0], 0x81);
  EXPECT_EQ(out[1], 0x81);
  EXPECT_EQ(out[2], 200);
  EXPECT_EQ(out.size(), 203u);
}

TEST(Oid, DottedRoundTrip) {
  auto b = oid_from_dotted("2.16.124.113620.1.22.0");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(to_hex(*b), "607c86f7540116" "00");
  EXPECT_EQ(oid_to_dotted(*b, false), "2.16.124.113620.1.22.0");
  auto r = relative_oid_from_dotted(".123.8437");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(to_hex(*r), "7bc175");
  EXPECT_EQ(oid_to_dotted(*r, true), ".123.8437");
  EXPECT_FALSE(oid_from_dotted("3.1").ok());
  EXPECT_FALSE(oid_from_dotted("1.40").ok());
  EXPECT_FALSE(oid_from_dotted("1..2").ok());
  EXPECT_FALSE(validate_oid(hex("8001"), false).ok());
  EXPECT_FALSE(validate_oid(hex("7b81"), true).ok());
}

// Wireshark test capture c1222_std_example8.pcap, frame 1 (PROTOCOL §2.7).
constexpr const char* kFrame1 =
    "604fa20580037bc175a60480027b04a803020103ac0fa20da00ba109800102810448f3d061be2a28288126"
    "8841d10cda76206811b36f781489a11997773e117cb07aa3aa40374a7107c50da7f799c5d4e8";
constexpr const char* kFrame1Opened =
    "604ba20580037bc175a60480027b04a803020103ac0fa20da00ba109800102810448f3d061be2628248122"
    "80175150415353574f52442020202020202020202020200002083f00010000100010";
constexpr const char* kKey2 = "01020304050607080102030405060708";

TEST(Eax, PaperVector1Intermediates) {
  auto aes = HostAes::make(hex(kKey2));
  ASSERT_TRUE(aes.ok());
  auto e = EaxPrime::make(**aes);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(to_hex(e->d()), "013d27b19d897ced55bf53b2fa0dda70");
  EXPECT_EQ(to_hex(e->q()), "027a4e623b13f9daab7ea764f51bb4e1");
}

TEST(Security, CaptureFrameOpensAndReseals) {
  auto aes = HostAes::make(hex(kKey2));
  ASSERT_TRUE(aes.ok());
  auto key = EaxPrime::make(**aes);
  ASSERT_TRUE(key.ok());
  Bytes wire = hex(kFrame1);
  auto opened = open(wire, [&](std::uint8_t kid) { return kid == 2 ? &*key : nullptr; });
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  EXPECT_EQ(to_hex(opened->wire), kFrame1Opened);
  EXPECT_EQ(opened->mode, SecurityMode::encrypted);
  auto resealed = seal(opened->wire, SecurityMode::encrypted, *key);
  ASSERT_TRUE(resealed.ok());
  EXPECT_EQ(*resealed, wire);
  auto no_key = open(wire, [&](std::uint8_t) -> EaxPrime* { return nullptr; });
  ASSERT_FALSE(no_key.ok());
  EXPECT_EQ(no_key.error().code, Errc::not_found);
}

TEST(Security, SealOpenRoundTripAllSizes) {
  auto aes = HostAes::make(hex(kKey2));
  ASSERT_TRUE(aes.ok());
  auto key = EaxPrime::make(**aes);
  ASSERT_TRUE(key.ok());
  Bytes called = hex("7bc175");
  Bytes calling = hex("7b04");
  Bytes id = hex("03");
  for (std::size_t n = 0; n < 600; n += 7) {
    Bytes epsem = {0x80};
    Bytes svc(n + 1, static_cast<std::uint8_t>(n));
    svc[0] = 0x30;
    append_service(epsem, svc);
    Message m;
    m.called_ap_title = ApTitle{TitleForm::relative, called};
    m.calling_ap_title = ApTitle{TitleForm::relative, calling};
    m.calling_ap_invocation_id = ByteView(id);
    m.auth = AuthValue{2, std::array<std::uint8_t, 4>{0x48, 0xf3, 0xd0, 0x61}};
    m.epsem = epsem;
    auto clear = encode(m);
    ASSERT_TRUE(clear.ok());
    for (auto mode : {SecurityMode::authenticated, SecurityMode::encrypted}) {
      auto sealed = seal(*clear, mode, *key);
      ASSERT_TRUE(sealed.ok()) << sealed.error().message();
      auto opened = open(*sealed, [&](std::uint8_t kid) { return kid == 2 ? &*key : nullptr; });
      ASSERT_TRUE(opened.ok()) << opened.error().message();
      EXPECT_EQ(opened->wire, *clear);
      Bytes bad = *sealed;
      bad[bad.size() - 1] ^= 1;
      auto refused = open(bad, [&](std::uint8_t) { return &*key; });
      ASSERT_FALSE(refused.ok());
      EXPECT_EQ(refused.error().code, Errc::bad_mac);
    }
  }
}

TEST(Framer, SplitsAndCaps) {
  Framer f(64);
  Bytes two = hex("6003a80102" "6003a80103");
  f.feed(ByteView(two).subspan(0, 3));
  auto r = f.next();
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  f.feed(ByteView(two).subspan(3));
  auto a = f.next();
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ(to_hex(**a), "6003a80102");
  auto b = f.next();
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ(to_hex(**b), "6003a80103");
  Framer g(64);
  Bytes big = hex("608200ff");
  g.feed(big);
  auto c = g.next();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code, Errc::too_large);
}

}  // namespace
}  // namespace gs::c1222
