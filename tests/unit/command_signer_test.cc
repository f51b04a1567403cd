// SES command construction against PROFILE-VECTORS examples 1 and 4: same signing input, a
// signature that verifies, the independent Python EAX' oracle accepts the MAC; error cases.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "c1222/security.h"
#include "src/command_signer.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"

namespace gs::ses {
namespace {

Bytes hex(std::string_view h) {
  auto b = from_hex(h);
  GS_CHECK(b.has_value());
  return *b;
}

constexpr const char* kCmdPriv =
    "01c0ffee1234567890abcdef1234567890abcdef1234567890abcdef12345678";
constexpr const char* kCmdPub =
    "04036b2eccc010cbac04bcf57ad5c85fe19daa912e165e006cbd71566939ca144e37208a68d05a78b21c0033cf651"
    "e94a9f9e4d0a1dbfe2de5be27bf3cc6c167f0";
constexpr const char* kMeterKey = "000102030405060708090a0b0c0d0e0f";
constexpr const char* kRequest1 =
    "6029a205800307a112a60480020109a80302014dbe1528138111800b40000700051a00000200e403300ffa";
constexpr const char* kSigningInput1 =
    "475341310b607c86f75401160007a1120a607c86f754011600010900000000000f424101016b2b4d806b2b4eac02"
    "000b40000700051a00000200e403300ffa";
constexpr const char* kOpened1 =
    "608192a205800307a112a60480020109a80502030f4241ac0fa20da00ba10980010081046b2b4d81be6b28698167"
    "80554f0ff8000000004c01016b2b4d806b2b4eac0200de3647bb110aad2d248af963a2bb0d4f8c909892d37f536b"
    "f6f7caa56145e465fb35784cf640bf71d85e85312315436a23279d0640d8ffc5ef027e04c0f726292d0b4000070005"
    "1a00000200e403300ffa";
constexpr const char* kSecured1 =
    "608196a205800307a112a60480020109a80502030f4241ac0fa20da00ba10980010081046b2b4d81be6f286d816b"
    "88b7823019c139a247529a3222926d4baa6eb25a3ecd4f7478ed77960a96b4cb1270d5fa3b61dcab522de8fe09d0"
    "4d5af782db14f8bbdd16062f57d655f5a3a9fd9526e818f454711b3c563368cd02f1cc1860f7e29a9ce4970995c3"
    "69419477ae86d2b0b810be3a3c90b2";
constexpr const char* kSigningInput4 =
    "475341310a607c86f75401160003010a607c86f754011600010900000000000f424301016b2b4d806b2b5b900300"
    "11400828000b00016b2a5f0000000e1003ea";
constexpr const char* kBroadcast4 =
    "608182a20480020301a60480020109a80502030f4243be6d286b816982554f0ff8000000004c01016b2b4d806b2b"
    "5b9003003b6123040abcbdf0e63754c37857d0916478ec803ab582b0455ff9fbfc07d73ae010bb31a34ae9092394"
    "74b3e1f2a3f271dcaccaa8fc6d989d86bf1edce46a9d3411400828000b00016b2a5f0000000e1003ea";

class CommandSignerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto k = HostEcKey::from_private(hex(kCmdPriv));
    ASSERT_TRUE(k.ok());
    cmd_key_ = std::make_unique<HostEcKey>(std::move(k).value());
    ASSERT_EQ(to_hex(cmd_key_->public_point()), kCmdPub);
    auto aes = HostAes::make(hex(kMeterKey));
    ASSERT_TRUE(aes.ok());
    aes_ = std::move(aes).value();
    auto eax = c1222::EaxPrime::make(*aes_);
    ASSERT_TRUE(eax.ok());
    eax_ = std::make_unique<c1222::EaxPrime>(std::move(eax).value());
    signer_ = std::make_unique<HostSigner>(*cmd_key_, 1);

    meter_.meter_id = "M1";
    meter_.ap_title = hex("607c86f75401160007a112");  // .7.4242 under the base OID
    store::KeySlot s;
    s.slot = 0;
    s.state = store::KeyState::active;
    meter_.slots.push_back(s);

    request_wire_ = hex(kRequest1);
    request_ = c1222::decode(request_wire_).value();
    params_.command_class = c1222::CommandClass::connect_disconnect;
    params_.not_before = 0x6b2b4d80;
    params_.not_after = 0x6b2b4eac;
    params_.now = 0x6b2b4d81;
    params_.invocation_id = 0x0f4241;
    params_.head_end_title = {c1222::TitleForm::relative, head_end_};
  }

  // Opens a sealed command with the meter key.
  Result<c1222::Opened> open(ByteView wire) {
    return c1222::open(wire, [this](std::uint8_t id) { return id == 0 ? eax_.get() : nullptr; });
  }

  // Signing input and signature check of a mode-0 message carrying MT-2040.
  void check_signed(ByteView mode0, std::string_view expected_input) {
    auto m = c1222::decode(mode0);
    ASSERT_TRUE(m.ok()) << m.error().message();
    auto ac = c1222::extract_authorization(*m);
    ASSERT_TRUE(ac.ok()) << ac.error().message();
    EXPECT_EQ(to_hex(ac->signing_input), expected_input);
    auto pub = HostEcKey::from_public(hex(kCmdPub));
    ASSERT_TRUE(pub.ok());
    auto d = sha256(ac->signing_input);
    ASSERT_TRUE(d.ok());
    EXPECT_TRUE(pub->verify(*d, ac->authorization.signature).ok());
    EXPECT_EQ(ac->authorization.signer_key_id, 1);
  }

  std::unique_ptr<HostEcKey> cmd_key_;
  std::unique_ptr<HostAes> aes_;
  std::unique_ptr<c1222::EaxPrime> eax_;
  std::unique_ptr<HostSigner> signer_;
  store::Meter meter_;
  Bytes request_wire_;
  c1222::Message request_;
  CommandParams params_;
  Bytes head_end_ = hex("0109");
};

// Offsets of r||s inside the opened example-1 message: after "55 4F 0FF8 000000 004C" + 12.
std::size_t signature_offset(ByteView wire) {
  const Bytes marker = hex("554f0ff8000000004c");
  auto it = std::search(wire.begin(), wire.end(), marker.begin(), marker.end());
  GS_CHECK(it != wire.end());
  return static_cast<std::size_t>(it - wire.begin()) + marker.size() + 12;
}

TEST_F(CommandSignerTest, ProfileVectorExample1) {
  auto out = secure_command(request_, meter_, params_, *signer_, *eax_, 0);
  ASSERT_TRUE(out.ok()) << out.error().message();
  const Bytes vec = hex(kSecured1);
  ASSERT_EQ(out->size(), vec.size());
  auto opened = open(*out);
  ASSERT_TRUE(opened.ok()) << opened.error().message();
  EXPECT_EQ(opened->mode, c1222::SecurityMode::encrypted);
  const Bytes want = hex(kOpened1);
  ASSERT_EQ(opened->wire.size(), want.size());
  const std::size_t sig = signature_offset(want);
  // Identical to the vector except r||s (ECDSA is randomized) and the MT-2040 checksum.
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (i >= sig && i < sig + 65) continue;  // r||s and the table checksum
    ASSERT_EQ(opened->wire[i], want[i]) << "byte " << i;
  }
  check_signed(opened->wire, kSigningInput1);
  // The sealed form matches the vector everywhere but the encrypted signature and the MAC
  // (EAX' is CTR mode under the same nonce).
  // Header lengths have the same size in both forms ("be 6f 28 6d 81 6b" / "be 6b 28 69 81 67").
  const std::size_t sig_sealed = sig;
  std::size_t differ = 0;
  for (std::size_t i = 0; i < vec.size(); ++i) {
    if ((*out)[i] != vec[i]) {
      ++differ;
      const bool in_sig = i >= sig_sealed && i < sig_sealed + 65;
      const bool in_mac = i >= vec.size() - 4;
      EXPECT_TRUE(in_sig || in_mac) << "byte " << i;
    }
  }
  EXPECT_GT(differ, 0u);
}

TEST_F(CommandSignerTest, PythonOracleAcceptsTheMac) {
  if (std::system("command -v python3 >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "python3 not installed";
  }
  auto out = secure_command(request_, meter_, params_, *signer_, *eax_, 0);
  ASSERT_TRUE(out.ok()) << out.error().message();
  auto run = [](const std::string& key, const Bytes& wire, int* rc) {
    const std::string cmd = "python3 " GS_SHARED_DIR "/tools/eaxprime.py verify --key " + key +
                            " " + to_hex(wire) + " 2>&1";
    std::string text;
    FILE* f = popen(cmd.c_str(), "r");
    GS_CHECK(f != nullptr);
    char buf[512];
    while (fgets(buf, sizeof buf, f) != nullptr) text += buf;
    *rc = pclose(f);
    return text;
  };
  int rc = -1;
  std::string text = run(std::string("0:") + kMeterKey, *out, &rc);
  EXPECT_EQ(rc, 0) << text;
  EXPECT_NE(text.find("MAC: OK"), std::string::npos) << text;
  EXPECT_NE(text.find("0ff8000000004c01016b2b4d806b2b4eac0200"), std::string::npos) << text;
  EXPECT_NE(text.find("0ffa"), std::string::npos) << text;
  // The oracle can fail: a wrong key is reported as a bad MAC.
  text = run("0:000102030405060708090a0b0c0d0e0e", *out, &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(text.find("MAC: BAD"), std::string::npos) << text;
}

TEST_F(CommandSignerTest, WiresharkDissectsAndVerifies) {
  if (std::system("command -v tshark >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1") !=
      0) {
    GTEST_SKIP() << "tshark or python3 not installed";
  }
  auto out = secure_command(request_, meter_, params_, *signer_, *eax_, 0);
  ASSERT_TRUE(out.ok());
  const std::string cmd = std::string(GS_SHARED_DIR "/tools/c1222-tshark-check --key 0:") +
                          kMeterKey + " " + to_hex(*out) + " >/dev/null 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  // A flipped MAC byte must be caught.
  Bytes bad = *out;
  bad.back() ^= 1;
  const std::string cmd_bad = std::string(GS_SHARED_DIR "/tools/c1222-tshark-check --key 0:") +
                              kMeterKey + " " + to_hex(bad) + " >/dev/null 2>&1";
  EXPECT_NE(std::system(cmd_bad.c_str()), 0);
}

TEST_F(CommandSignerTest, ReceiptReadAppendedOnceForClasses2And4) {
  // The vector request already ends with the receipt read: not doubled.
  auto opened = open(secure_command(request_, meter_, params_, *signer_, *eax_, 0).value());
  ASSERT_TRUE(opened.ok());
  const std::string h = to_hex(opened->wire);
  EXPECT_EQ(h.find("03300ffa"), h.size() - 8);
  EXPECT_EQ(h.find("03300ffa"), h.rfind("03300ffa"));

  // A request without it gets it for classes 2 and 4, not for class 0.
  c1222::Message m = request_;
  const Bytes epsem = hex("800b40000700051a00000200e4");
  m.epsem = epsem;
  const Bytes wire = c1222::encode(m).value();
  const c1222::Message req = c1222::decode(wire).value();
  for (auto cls : {c1222::CommandClass::connect_disconnect, c1222::CommandClass::key_management,
                   c1222::CommandClass::write}) {
    CommandParams p = params_;
    p.command_class = cls;
    auto o = open(secure_command(req, meter_, p, *signer_, *eax_, 0).value());
    ASSERT_TRUE(o.ok());
    const std::string oh = to_hex(o->wire);
    const bool has = oh.size() >= 8 && oh.substr(oh.size() - 8) == "03300ffa";
    EXPECT_EQ(has, cls != c1222::CommandClass::write) << static_cast<int>(cls);
    auto d = c1222::decode(o->wire).value();
    auto ac = c1222::extract_authorization(d);
    ASSERT_TRUE(ac.ok());
    EXPECT_EQ(ac->authorization.command_class, cls);
    auto pub = HostEcKey::from_public(hex(kCmdPub)).value();
    EXPECT_TRUE(pub.verify(sha256(ac->signing_input).value(), ac->authorization.signature).ok());
  }
}

TEST_F(CommandSignerTest, HeadEndTitleWhenRequestHasNone) {
  c1222::Message m = request_;
  m.calling_ap_title.reset();
  const Bytes wire = c1222::encode(m).value();
  const c1222::Message req = c1222::decode(wire).value();
  const Bytes other = hex("0207");
  params_.head_end_title = {c1222::TitleForm::relative, other};
  auto o = open(secure_command(req, meter_, params_, *signer_, *eax_, 0).value());
  ASSERT_TRUE(o.ok());
  auto d = c1222::decode(o->wire).value();
  ASSERT_TRUE(d.calling_ap_title.has_value());
  EXPECT_EQ(to_hex(d.calling_ap_title->oid), "0207");
  EXPECT_FALSE(d.aso_context.has_value());
  EXPECT_FALSE(d.mechanism_name.has_value());
  EXPECT_EQ(d.auth->key_id.value(), 0);
}

TEST_F(CommandSignerTest, KeyIdAndInvocationIdOnTheWire) {
  auto aes = HostAes::make(hex(kMeterKey)).value();
  auto eax = c1222::EaxPrime::make(*aes).value();
  params_.invocation_id = 0x100;
  auto out = secure_command(request_, meter_, params_, *signer_, eax, 2);
  ASSERT_TRUE(out.ok());
  auto d = c1222::decode(*out).value();
  EXPECT_EQ(to_hex(*d.calling_ap_invocation_id), "0100");
  EXPECT_EQ(d.auth->key_id.value(), 2);
  EXPECT_EQ(to_hex(*d.auth->iv), "6b2b4d81");
}

TEST_F(CommandSignerTest, Refusals) {
  auto code = [&](const c1222::Message& req, const CommandParams& p, std::uint8_t kid = 0) {
    auto r = secure_command(req, meter_, p, *signer_, *eax_, kid);
    return r.ok() ? Errc::ok : r.error().code;
  };
  CommandParams p = params_;
  p.invocation_id = 0x80;  // needs a leading 00
  EXPECT_EQ(code(request_, p), Errc::invalid_argument);
  p = params_;
  p.invocation_id = 0;
  EXPECT_EQ(code(request_, p), Errc::invalid_argument);
  p = params_;
  p.not_after = p.not_before - 1;
  EXPECT_EQ(code(request_, p), Errc::invalid_argument);
  EXPECT_EQ(code(request_, params_, 128), Errc::invalid_argument);
  // Addressed to another meter.
  store::Meter other = meter_;
  other.ap_title = hex("607c86f75401160007a113");
  auto r = secure_command(request_, other, params_, *signer_, *eax_, 0);
  ASSERT_FALSE(r.ok());
  // Already secured.
  const Bytes sealed = secure_command(request_, meter_, params_, *signer_, *eax_, 0).value();
  const c1222::Message sm = c1222::decode(sealed).value();
  EXPECT_EQ(code(sm, params_), Errc::unsupported);
  // Carrying MT-2040 already.
  auto opened = open(sealed).value();
  const c1222::Message om = c1222::decode(opened.wire).value();
  EXPECT_EQ(code(om, params_), Errc::bad_value);
  // A signer that fails.
  struct Failing final : Signer {
    std::uint8_t key_id() const noexcept override { return 1; }
    Result<c1222::Signature> sign(const c1222::Digest&) override { return Errc::hsm_failure; }
  } failing;
  auto f = secure_command(request_, meter_, params_, failing, *eax_, 0);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, Errc::hsm_failure);
}

TEST(MeterKeyChoice, DistinctRefusals) {
  EXPECT_EQ(choose_meter_key(nullptr).refusal, MeterRefusal::unknown_meter);
  EXPECT_EQ(response_code_for(MeterRefusal::unknown_meter), 0x0C);  // uat
  store::Meter m;
  m.state = store::MeterState::compromised;
  EXPECT_EQ(choose_meter_key(&m).refusal, MeterRefusal::meter_revoked);
  EXPECT_EQ(response_code_for(MeterRefusal::meter_revoked), 0x03);  // isc
  m.state = store::MeterState::quarantined;
  EXPECT_EQ(choose_meter_key(&m).refusal, MeterRefusal::meter_quarantined);
  m.state = store::MeterState::active;
  EXPECT_EQ(choose_meter_key(&m).refusal, MeterRefusal::no_active_key);
  EXPECT_EQ(response_code_for(MeterRefusal::no_active_key), 0x03);
  store::KeySlot s;
  s.slot = 1;
  s.state = store::KeyState::standby;
  m.slots.push_back(s);
  EXPECT_EQ(choose_meter_key(&m).refusal, MeterRefusal::no_active_key);
  s.slot = 2;
  s.state = store::KeyState::active;
  m.slots.push_back(s);
  auto c = choose_meter_key(&m);
  ASSERT_EQ(c.refusal, MeterRefusal::none);
  EXPECT_EQ(c.slot->slot, 2);
  EXPECT_STREQ(meter_refusal_name(MeterRefusal::meter_revoked), "meter_revoked");
}

TEST_F(CommandSignerTest, BroadcastProfileVectorExample4) {
  // The collection engine's DR request to group .3.1 (unsigned, response bits "always").
  c1222::Message req;
  const Bytes group = hex("0301");
  const Bytes calling = hex("0109");
  const Bytes a8 = {0x4d};
  const Bytes epsem = hex("8011400828000b00016b2a5f0000000e1003ea");
  req.called_ap_title = c1222::ApTitle{c1222::TitleForm::relative, group};
  req.calling_ap_title = c1222::ApTitle{c1222::TitleForm::relative, calling};
  req.calling_ap_invocation_id = ByteView(a8);
  req.epsem = epsem;
  const Bytes req_wire = c1222::encode(req).value();
  const c1222::Message decoded = c1222::decode(req_wire).value();
  CommandParams p = params_;
  p.command_class = c1222::CommandClass::demand_response;
  p.not_before = 0x6b2b4d80;
  p.not_after = 0x6b2b5b90;
  p.invocation_id = 0x0f4243;
  auto out = sign_broadcast(decoded, p, *signer_);
  ASSERT_TRUE(out.ok()) << out.error().message();
  const Bytes want = hex(kBroadcast4);
  ASSERT_EQ(out->size(), want.size());
  const std::size_t sig = signature_offset(want);
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (i >= sig && i < sig + 65) continue;  // r||s and the table checksum
    ASSERT_EQ((*out)[i], want[i]) << "byte " << i;
  }
  check_signed(*out, kSigningInput4);
  // Only class 3.
  p.command_class = c1222::CommandClass::connect_disconnect;
  EXPECT_FALSE(sign_broadcast(decoded, p, *signer_).ok());
}

}  // namespace
}  // namespace gs::ses
