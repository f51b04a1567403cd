// gridseal-metersim: the simulated meter against commands built by the real SES code
// (secure_command), its refusals, the state file, the fleet file, MT-2041/2043, and the relay
// binary end to end on loopback plain TCP.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "run_command.h"
#include "src/client.h"
#include "src/command_signer.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"
#include "src/key_store.h"
#include "src/meter_import.h"
#include "src/test_pki.h"
#include "tools/metersim/fleet.h"
#include "tools/metersim/meter.h"
#include "tools/metersim/relay.h"

namespace gs::metersim {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using c1222::CommandClass;

Bytes hex(std::string_view h) {
  auto b = from_hex(h);
  GS_CHECK(b.has_value());
  return *b;
}

// Removes a temporary directory, whatever the test's outcome.
struct TempDir {
  std::string path;
  ~TempDir() { fs::remove_all(path); }
};

constexpr std::uint32_t kNow = 0x6b2b4d81;  // 2026-12-23, the PROFILE-VECTORS time
// SP-26 disconnect and connect (full write of ST-7, little-endian procedure number).
const Bytes kDisconnect = hex("40000700051a00000200e4");
const Bytes kConnect = hex("40000700051a00000100e5");
const Bytes kReadRegs = {0x30, 0x00, 0x17};  // full read ST-23
const Bytes kReadIdentity = {0x30, 0x00, 0x01};

// A mode-0 request from the head-end (.1.9) to `meter` carrying `services`.
Bytes request(const std::string& meter, const std::vector<Bytes>& services) {
  auto called = c1222::OwnedApTitle::parse(meter).value();
  auto calling = c1222::OwnedApTitle::parse(".1.9").value();
  c1222::Message m;
  m.called_ap_title = called.view();
  m.calling_ap_title = calling.view();
  const std::uint8_t a8[1] = {0x4d};
  m.calling_ap_invocation_id = ByteView(a8, 1);
  Bytes epsem{0x80};
  for (const Bytes& s : services) c1222::append_service(epsem, s);
  m.epsem = epsem;
  return c1222::encode(m).value();
}

// What one secured command is made of.
struct Cmd {
  std::string meter = ".7.1";
  std::vector<Bytes> services = {kReadRegs};
  CommandClass cls = CommandClass::read;
  std::uint32_t id = 0x0f4241;
  std::uint32_t not_before = kNow - 60;
  std::uint32_t not_after = kNow + 240;
  const HostEcKey* signer = nullptr;  // default: the trusted gs-cmd-1
  std::uint8_t signer_id = 1;
  std::optional<Bytes> key;  // default: the meter's slot-0 key
  std::uint8_t key_id = 0;
};

struct Opened {
  Bytes wire;
  c1222::Message m;
  std::vector<Bytes> services;
  std::uint8_t key_id = 0;
};

// Opens a message with `key` (key id `id`) and splits its services.
std::optional<Opened> open_message(ByteView wire, const Bytes& key, std::uint8_t id = 0) {
  auto aes = HostAes::make(key);
  if (!aes.ok()) return std::nullopt;
  auto eax = c1222::EaxPrime::make(**aes);
  if (!eax.ok()) return std::nullopt;
  auto o = c1222::open(wire, [&](std::uint8_t k) { return k == id ? &*eax : nullptr; });
  if (!o.ok()) return std::nullopt;
  Opened out;
  out.wire = std::move(o->wire);
  out.key_id = o->key_id;
  auto m = c1222::decode(out.wire);
  if (!m.ok()) return std::nullopt;
  out.m = *m;
  auto e = c1222::split_epsem(out.m.epsem);
  if (!e.ok()) return std::nullopt;
  auto s = c1222::split_services(e->body);
  if (!s.ok()) return std::nullopt;
  for (const auto& sp : *s) out.services.emplace_back(sp.bytes.begin(), sp.bytes.end());
  return out;
}

class MetersimTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cmd_key_.emplace(HostEcKey::generate().value());
    other_key_.emplace(HostEcKey::generate().value());
    ExportOptions o;
    o.meters = 3;
    o.seed = 42;
    o.trust_cmd1 = cmd_key_->public_point();
    o.now = kNow - 3600;
    std::ostringstream csv;
    auto f = Fleet::generate(o, &csv);
    ASSERT_TRUE(f.ok()) << f.error().message();
    fleet_ = std::move(f).value();
    csv_ = csv.str();
  }

  MeterRecord& rec(std::size_t i = 0) { return fleet_->record(i); }
  Bytes slot_key(std::size_t i = 0, std::size_t slot = 0) {
    return Bytes(rec(i).slots[slot].key.begin(), rec(i).slots[slot].key.end());
  }
  EcPoint meter_public(std::size_t i = 0) { return meter_key(rec(i)).value().public_point(); }

  // The SES's own construction (src/command_signer) of a secured command.
  Bytes secure(const Cmd& c) {
    const Bytes req_wire = request(c.meter, c.services);
    auto req = c1222::decode(req_wire);
    GS_CHECK(req.ok());
    store::Meter meter;
    meter.meter_id = "M";
    meter.ap_title =
        c1222::OwnedApTitle::parse(c.meter).value().view().absolute(c1222::default_base_oid());
    store::KeySlot s;
    s.slot = c.key_id;
    s.state = store::KeyState::active;
    meter.slots.push_back(s);
    ses::CommandParams p;
    p.command_class = c.cls;
    p.not_before = c.not_before;
    p.not_after = c.not_after;
    p.now = kNow;
    p.invocation_id = c.id;
    auto aes = HostAes::make(c.key ? *c.key : slot_key());
    GS_CHECK(aes.ok());
    auto eax = c1222::EaxPrime::make(**aes);
    GS_CHECK(eax.ok());
    ses::HostSigner signer(c.signer != nullptr ? *c.signer : *cmd_key_, c.signer_id);
    auto out = ses::secure_command(*req, meter, p, signer, *eax, c.key_id);
    GS_CHECK(out.ok());
    return std::move(out).value();
  }

  // Through the fleet, as the relay does.
  MeterReply send(ByteView wire, std::uint32_t now = kNow) {
    auto m = c1222::decode(wire);
    GS_CHECK(m.ok());
    auto idx = fleet_->find(m->called_ap_title->absolute(c1222::default_base_oid()));
    GS_CHECK(idx.has_value());
    return fleet_->handle(*idx, *m, now);
  }

  static std::optional<Opened> open(ByteView wire, const Bytes& key, std::uint8_t id = 0) {
    return open_message(wire, key, id);
  }

  // The single error code of a refusal sealed under the meter's slot-0 key (-1: not one).
  int refusal_code(const MeterReply& r, std::size_t meter = 0) {
    auto o = open(r.wire, slot_key(meter));
    if (!o || o->services.size() != 1 || o->services[0].size() != 1) return -1;
    return o->services[0][0];
  }

  std::optional<HostEcKey> cmd_key_;
  std::optional<HostEcKey> other_key_;
  std::unique_ptr<Fleet> fleet_;
  std::string csv_;
};

TEST_F(MetersimTest, ReadsRegistersUnderTheMeterKey) {
  Cmd c;
  c.services = {kReadIdentity, kReadRegs};
  const Bytes wire = secure(c);
  MeterReply r = send(wire);
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  auto o = open(r.wire, slot_key());
  ASSERT_TRUE(o.has_value());
  // Addressed back to the caller, echoing its invocation id, from the meter's title.
  EXPECT_EQ(o->m.called_ap_title->dotted(), ".1.9");
  EXPECT_EQ(o->m.calling_ap_title->dotted(), ".7.1");
  EXPECT_EQ(to_hex(*o->m.called_ap_invocation_id), "0f4241");
  EXPECT_EQ(o->key_id, 0);
  ASSERT_EQ(o->services.size(), 3u);
  EXPECT_EQ(o->services[0], Bytes{0x00});  // the MT-2040 write
  auto ident = c1222::decode_read_response(o->services[1], kIdentitySize);
  ASSERT_TRUE(ident.ok()) << ident.error().message();
  EXPECT_EQ(std::string(ident->begin(), ident->begin() + 12), "GSIMMETERSIM");
  EXPECT_EQ(std::string(ident->begin() + 16, ident->begin() + 27), "SIM00000001");
  auto regs = c1222::decode_read_response(o->services[2], kCurrentRegsSize);
  ASSERT_TRUE(regs.ok()) << regs.error().message();
  auto le32 = [](ByteView b, std::size_t at) {
    return std::uint32_t{b[at]} | std::uint32_t{b[at + 1]} << 8 | std::uint32_t{b[at + 2]} << 16 |
           std::uint32_t{b[at + 3]} << 24;
  };
  EXPECT_EQ(le32(*regs, 21), kNow);
  EXPECT_EQ((*regs)[25], 1);       // connected
  EXPECT_GT(le32(*regs, 17), 0u);  // present demand
  const std::uint32_t wh = le32(*regs, 1);

  // Ten minutes later the register has moved on (a new command: new id).
  c.id = 0x0f4242;
  c.services = {kReadRegs};
  c.not_before = kNow + 540;
  c.not_after = kNow + 900;
  r = send(secure(c), kNow + 600);
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  o = open(r.wire, slot_key());
  ASSERT_TRUE(o && o->services.size() == 2);
  regs = c1222::decode_read_response(o->services[1], kCurrentRegsSize);
  ASSERT_TRUE(regs.ok());
  EXPECT_GT(le32(*regs, 1), wh);
  // The meter's own invocation ids rise.
  EXPECT_EQ(rec().out_counter, 2u);
}

TEST_F(MetersimTest, LoadProfileAndPartialRead) {
  Cmd c;
  c.services = {{0x30, 0x00, 0x40},
                {0x3F, 0x00, 0x01, 0x00, 0x00, 0x10, 0x00, 0x10},
                {0x3F, 0x00, 0x01, 0x00, 0x00, 0x1F, 0x00, 0x02}};
  MeterReply r = send(secure(c));
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  auto o = open(r.wire, slot_key());
  ASSERT_TRUE(o && o->services.size() == 4);
  auto lp = c1222::decode_read_response(o->services[1], kLoadProfileSize);
  ASSERT_TRUE(lp.ok()) << lp.error().message();
  EXPECT_EQ((*lp)[0], 15);
  EXPECT_EQ((*lp)[1], 96);
  auto serial = c1222::decode_read_response(o->services[2], 16);
  ASSERT_TRUE(serial.ok());
  EXPECT_EQ(std::string(serial->begin(), serial->end()), "SIM00000001     ");
  EXPECT_EQ(o->services[3], Bytes{c1222::kRespIar});  // beyond the table
}

TEST_F(MetersimTest, DisconnectReturnsAVerifiableReceipt) {
  Cmd c;
  c.services = {kDisconnect};
  c.cls = CommandClass::connect_disconnect;
  const Bytes wire = secure(c);
  ASSERT_EQ(rec().connected, 1);
  MeterReply r = send(wire);
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  EXPECT_EQ(rec().connected, 0);
  auto o = open(r.wire, slot_key());
  ASSERT_TRUE(o.has_value());
  ASSERT_EQ(o->services.size(), 3u);  // MT-2040 ok, ST-7 ok, MT-2042 receipt
  EXPECT_EQ(o->services[0], Bytes{0x00});
  EXPECT_EQ(o->services[1], Bytes{0x00});
  auto receipt = c1222::decode_receipt_response(o->services[2]);
  ASSERT_TRUE(receipt.ok()) << receipt.error().message();
  EXPECT_EQ(receipt->invocation_id, 0x0f4241u);
  EXPECT_EQ(receipt->result, 0);
  EXPECT_EQ(receipt->executed_at, kNow);

  // The digest is that of the command's signing input, rebuilt here from the command.
  auto cmd_open = open(wire, slot_key());
  ASSERT_TRUE(cmd_open.has_value());
  auto auth = c1222::extract_authorization(cmd_open->m);
  ASSERT_TRUE(auth.ok());
  auto d = sha256(auth->signing_input);
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(std::equal(d->begin(), d->end(), receipt->command_digest.begin()));

  // Verified with the public key of the manufacturer file, as the DKUS will.
  const auto lines = csv_.substr(csv_.find('\n') + 1);
  auto row = parse_fleet_row(lines.substr(0, lines.find('\n')), 2, c1222::default_base_oid());
  ASSERT_TRUE(row.ok()) << row.error().message();
  auto pub = HostEcKey::from_public(row->public_key);
  ASSERT_TRUE(pub.ok());
  const Bytes title(rec().title_view().begin(), rec().title_view().end());
  auto signed_bytes = c1222::receipt_signed_bytes(title, *receipt);
  ASSERT_TRUE(signed_bytes.ok());
  auto sd = sha256(*signed_bytes);
  ASSERT_TRUE(sd.ok());
  EXPECT_TRUE(pub->verify(*sd, receipt->signature).ok());
  // A verifier can fail: another meter's key does not verify it.
  auto other = HostEcKey::from_public(meter_public(1));
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->verify(*sd, receipt->signature).ok());

  // Registers stop; ST-8 reports the procedure; connect brings the relay back.
  c.services = {kConnect};
  c.id = 0x0f4243;
  r = send(secure(c), kNow + 10);
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  EXPECT_EQ(rec().connected, 1);
}

TEST_F(MetersimTest, RefusesBadCommandsAndExecutesNothing) {
  auto disconnect = [] {
    Cmd c;
    c.services = {kDisconnect};
    c.cls = CommandClass::connect_disconnect;
    return c;
  };
  const Bytes other_aes = hex("00112233445566778899aabbccddeeff");
  struct Case {
    const char* name;
    Cmd cmd;
    std::uint32_t now;
    int code;
  };
  std::vector<Case> cases;
  {
    Case k{"expired", disconnect(), kNow + 241, c1222::kRespSme};
    cases.push_back(k);
  }
  {
    Case k{"not yet valid", disconnect(), kNow - 61, c1222::kRespSme};
    cases.push_back(k);
  }
  {
    Case k{"other signing key", disconnect(), kNow, c1222::kRespSme};
    k.cmd.signer = &*other_key_;
    cases.push_back(k);
  }
  {
    Case k{"untrusted signer key id", disconnect(), kNow, c1222::kRespSme};
    k.cmd.signer_id = 2;
    cases.push_back(k);
  }
  {
    Case k{"other AES key", disconnect(), kNow, c1222::kRespSme};
    k.cmd.key = other_aes;
    cases.push_back(k);
  }
  {
    Case k{"key id not installed", disconnect(), kNow, c1222::kRespSme};
    k.cmd.key_id = 1;
    cases.push_back(k);
  }
  {
    Case k{"class does not cover SP-26", disconnect(), kNow, c1222::kRespIsc};
    k.cmd.cls = CommandClass::read;
    cases.push_back(k);
  }
  {
    Case k{"window too long", disconnect(), kNow, c1222::kRespSme};
    k.cmd.not_after = k.cmd.not_before + kMaxWindow + 1;
    cases.push_back(k);
  }
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const Bytes wire = secure(k.cmd);
    const MeterRecord before = rec();
    MeterReply r = send(wire, k.now);
    EXPECT_EQ(r.outcome, Outcome::refused);
    EXPECT_EQ(r.code, k.code) << r.reason;
    EXPECT_EQ(refusal_code(r), k.code);
    EXPECT_EQ(rec().connected, 1);
    EXPECT_EQ(rec().slots, before.slots);
  }
}

TEST_F(MetersimTest, RefusesTamperedSignatureAndUnsignedCommands) {
  Cmd c;
  c.services = {kDisconnect};
  c.cls = CommandClass::connect_disconnect;
  const Bytes wire = secure(c);
  auto aes = HostAes::make(slot_key());
  ASSERT_TRUE(aes.ok());
  auto eax = c1222::EaxPrime::make(**aes);
  ASSERT_TRUE(eax.ok());
  auto clear = open(wire, slot_key());
  ASSERT_TRUE(clear.has_value());
  // Flip one byte of r||s and repair the MT-2040 checksum, then seal again with the right key:
  // only the signature check can catch it.
  const Bytes marker = hex("554f0ff8000000004c");
  auto it = std::search(clear->wire.begin(), clear->wire.end(), marker.begin(), marker.end());
  ASSERT_NE(it, clear->wire.end());
  const std::size_t data = static_cast<std::size_t>(it - clear->wire.begin()) + marker.size();
  for (std::size_t flip : {std::size_t{20}, std::size_t{75}, std::size_t{2}}) {
    SCOPED_TRACE(flip);
    Bytes t = clear->wire;
    t[data + flip] ^= 0x01;
    std::uint8_t sum = 0;
    for (std::size_t i = 0; i < c1222::kAuthorizationDataSize; ++i) sum += t[data + i];
    t[data + c1222::kAuthorizationDataSize] = static_cast<std::uint8_t>(-sum);
    auto sealed = c1222::seal(ByteView(t), c1222::SecurityMode::encrypted, *eax);
    ASSERT_TRUE(sealed.ok()) << sealed.error().message();
    MeterReply r = send(*sealed);
    EXPECT_EQ(r.code, c1222::kRespSme) << r.reason;
    EXPECT_EQ(rec().connected, 1);
  }
  // A flipped ciphertext byte: the MAC.
  Bytes t = wire;
  t[t.size() - 10] ^= 0x80;
  MeterReply r = send(t);
  EXPECT_EQ(r.code, c1222::kRespSme) << r.reason;
  // Mode 2 without MT-2040, and mode 0: refused as insufficient security.
  Bytes plain = request(".7.1", {kDisconnect});
  auto pm = c1222::decode(plain).value();
  const std::uint8_t iv[4] = {0x6b, 0x2b, 0x4d, 0x81};
  c1222::AuthValue av;
  av.key_id = 0;
  av.iv = std::array<std::uint8_t, 4>{iv[0], iv[1], iv[2], iv[3]};
  pm.auth = av;
  pm.raw_auth_value = {};
  auto unsigned_cmd = c1222::seal(pm, c1222::SecurityMode::encrypted, *eax);
  ASSERT_TRUE(unsigned_cmd.ok()) << unsigned_cmd.error().message();
  r = send(*unsigned_cmd);
  EXPECT_EQ(r.code, c1222::kRespIsc) << r.reason;
  r = send(plain);
  EXPECT_EQ(r.code, c1222::kRespIsc) << r.reason;
  EXPECT_EQ(rec().connected, 1);
}

TEST_F(MetersimTest, RefusesReplayInsideTheWindow) {
  Cmd c;
  c.services = {kDisconnect};
  c.cls = CommandClass::connect_disconnect;
  const Bytes wire = secure(c);
  MeterReply r = send(wire);
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  set_relay(rec(), true, kNow + 1);
  r = send(wire, kNow + 2);
  EXPECT_EQ(r.code, c1222::kRespSme) << r.reason;
  EXPECT_EQ(refusal_code(r), c1222::kRespSme);
  EXPECT_EQ(rec().connected, 1);
  // The same id in another command (same window) is a replay too; another id is not.
  c.services = {kReadRegs};
  c.cls = CommandClass::read;
  EXPECT_EQ(send(secure(c), kNow + 3).code, c1222::kRespSme);
  c.id = 0x0f4250;
  EXPECT_EQ(send(secure(c), kNow + 3).outcome, Outcome::executed);
  // More accepted commands than the meter remembers: evicted ids stay refused (floor).
  for (std::uint32_t i = 0; i < 2 * kReplayEntries; ++i) {
    c.id = 0x0f4300 + i;
    c.not_after = kNow + 240 + i;
    ASSERT_EQ(send(secure(c), kNow + 4).outcome, Outcome::executed) << i;
  }
  c.id = 0x0f4300;
  c.not_after = kNow + 240;
  EXPECT_EQ(send(secure(c), kNow + 5).code, c1222::kRespBsy);
  c.id = 0x0f4400;  // a new id in an equally old window: busy too, retried later it passes
  EXPECT_EQ(send(secure(c), kNow + 5).code, c1222::kRespBsy);
  c.not_after = kNow + 300;
  EXPECT_EQ(send(secure(c), kNow + 5).outcome, Outcome::executed);
  // Once windows close, ids may come again (the SES never reissues one inside a window).
  c.id = 0x0f4241;
  c.not_before = kNow + 1000;
  c.not_after = kNow + 1300;
  EXPECT_EQ(send(secure(c), kNow + 1100).outcome, Outcome::executed);
}

TEST_F(MetersimTest, StateFileRoundTrip) {
  Cmd c;
  c.services = {kDisconnect};
  c.cls = CommandClass::connect_disconnect;
  const Bytes wire = secure(c);
  ASSERT_EQ(send(wire).outcome, Outcome::executed);
  const Bytes file = fleet_->serialize();
  EXPECT_EQ(file.size(), kHeaderSize + 65 + 3 * kRecordSize + 32);
  auto back = Fleet::parse(file);
  ASSERT_TRUE(back.ok()) << back.error().message();
  ASSERT_EQ((*back)->size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ((*back)->record(i), rec(i)) << i;
  EXPECT_EQ((*back)->serialize(), file);

  // Through a real file: the replayed command is still refused after the "restart".
  char tmpl[] = "/tmp/gs-metersim-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const TempDir cleanup{tmpl};
  const std::string path = std::string(tmpl) + "/fleet.state";
  ASSERT_TRUE(fleet_->save(path).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_EQ(fs::status(path).permissions() & fs::perms::others_read, fs::perms::none);
  auto loaded = Fleet::load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  fleet_ = std::move(loaded).value();
  EXPECT_EQ(rec().connected, 0);
  set_relay(rec(), true, kNow + 1);
  EXPECT_EQ(send(wire, kNow + 2).code, c1222::kRespSme);
  EXPECT_EQ(rec().connected, 1);
}

TEST_F(MetersimTest, CorruptStateFilesAreRefused) {
  const Bytes good = fleet_->serialize();
  auto error_of = [](ByteView b) {
    auto f = Fleet::parse(b);
    return f.ok() ? std::string("accepted") : f.error().message();
  };
  EXPECT_NE(error_of(ByteView(good).first(good.size() - 1)).find("truncated"), std::string::npos);
  EXPECT_NE(error_of(ByteView(good).first(good.size() / 2)).find("truncated"), std::string::npos);
  EXPECT_NE(error_of(ByteView(good).first(10)).find("shorter than a header"), std::string::npos);
  EXPECT_NE(error_of({}).find("shorter than a header"), std::string::npos);
  Bytes longer = good;
  longer.push_back(0);
  EXPECT_NE(error_of(longer).find("expected"), std::string::npos);
  Bytes flipped = good;
  flipped[good.size() / 2] ^= 0x04;
  EXPECT_NE(error_of(flipped).find("SHA-256"), std::string::npos);
  Bytes magic = good;
  magic[0] = 'X';
  EXPECT_NE(error_of(magic).find("magic"), std::string::npos);
  Bytes version = good;
  version[9] = 3;
  EXPECT_NE(error_of(version).find("version"), std::string::npos);
  Bytes revocation_flag = good;
  revocation_flag[17] = 2;
  EXPECT_NE(error_of(revocation_flag).find("gs-revocation flag"), std::string::npos);
  Bytes count = good;
  count[12] = 0xFF;  // a huge count: refused before any allocation
  EXPECT_NE(error_of(count).find("meter count"), std::string::npos);

  // Well-digested but invalid contents: each named.
  auto rehash = [](Bytes b) {
    auto d = sha256(ByteView(b).first(b.size() - 32));
    std::copy(d->begin(), d->end(), b.end() - 32);
    return b;
  };
  const std::size_t rec0 = kHeaderSize;  // version 2: the keys follow the records
  Bytes title = good;
  title[rec0] = 0;  // title length 0
  EXPECT_NE(error_of(rehash(title)).find("meter 0: title length"), std::string::npos);
  Bytes active = good;
  active[rec0 + 1 + 64 + 16 + 32 + 4 * 21] = 3;  // active slot 3, not installed
  EXPECT_NE(error_of(rehash(active)).find("active key slot"), std::string::npos);
  Bytes dup = good;  // meter 1 gets meter 0's title
  std::copy(good.begin() + rec0, good.begin() + rec0 + 65, dup.begin() + rec0 + kRecordSize);
  EXPECT_NE(error_of(rehash(dup)).find("also used by meter 0"), std::string::npos);
  Bytes scalar = good;
  std::fill(scalar.begin() + rec0 + 81, scalar.begin() + rec0 + 113, 0xFF);
  EXPECT_NE(error_of(rehash(scalar)).find("private key"), std::string::npos);
  Bytes index = good;  // meter 0 trusts key 1 of a one-key table
  index[rec0 + 1 + 64 + 16 + 32 + 4 * 21 + 1 + 3] = 1;
  EXPECT_NE(error_of(rehash(index)).find("meter 0: trust key index"), std::string::npos);
  EXPECT_EQ(error_of(rehash(good)), "accepted");

  auto missing = Fleet::load("/nonexistent/fleet.state");
  EXPECT_FALSE(missing.ok());
}

TEST_F(MetersimTest, FleetFileMatchesTheImportFormat) {
  std::istringstream in(csv_);
  std::string line;
  ASSERT_TRUE(std::getline(in, line));
  EXPECT_TRUE(check_fleet_header(line).ok());
  std::size_t n = 0;
  while (std::getline(in, line)) {
    auto row = parse_fleet_row(line, n + 2, c1222::default_base_oid());
    ASSERT_TRUE(row.ok()) << row.error().message();
    EXPECT_EQ(row->meter_id, rec(n).serial_text());
    EXPECT_EQ(row->ap_title, Bytes(rec(n).title_view().begin(), rec(n).title_view().end()));
    EXPECT_EQ(row->source, KeySource::plain);
    EXPECT_EQ(row->key_material, slot_key(n));
    EXPECT_TRUE(
        std::equal(row->public_key.begin(), row->public_key.end(), meter_public(n).begin()));
    ++n;
  }
  EXPECT_EQ(n, 3u);

  // The same seed gives the same fleet; ecdh keys are what the HSM derives from gs-provision.
  auto provision = HostEcKey::generate();
  ASSERT_TRUE(provision.ok());
  ExportOptions o;
  o.meters = 3;
  o.seed = 42;
  o.trust_cmd1 = cmd_key_->public_point();
  o.keys = KeyMode::ecdh;
  o.provision_key = provision->public_point();
  std::ostringstream csv;
  auto f = Fleet::generate(o, &csv);
  ASSERT_TRUE(f.ok()) << f.error().message();
  EXPECT_EQ((*f)->record(1).private_scalar, rec(1).private_scalar);
  EXPECT_NE(csv.str().find(",0,ecdh\n"), std::string::npos);
  for (std::size_t i = 0; i < 3; ++i) {
    const MeterRecord& r = (*f)->record(i);
    auto pub = HostEcKey::from_public(meter_key(r).value().public_point());
    ASSERT_TRUE(pub.ok());
    auto ctx_in = c1222::key_context_input(r.title_view(), 0, 1);
    ASSERT_TRUE(ctx_in.ok());
    auto ctx = profile_key_context(*ctx_in);
    ASSERT_TRUE(ctx.ok());
    Block k{};
    ASSERT_TRUE(provision->derive_profile_key(*pub, *ctx, k).ok());
    EXPECT_TRUE(std::equal(k.begin(), k.end(), r.slots[0].key.begin())) << i;
  }
  o.keys = KeyMode::ecdh;
  o.provision_key.reset();
  EXPECT_FALSE(Fleet::generate(o, nullptr).ok());
}

// PROFILE-VECTORS example 3: the meter derives the vector's slot-1 key.
TEST_F(MetersimTest, KeyDerivationMatchesProfileVector) {
  MeterRecord r;
  const Bytes title =
      c1222::OwnedApTitle::parse(".7.4242").value().view().absolute(c1222::default_base_oid());
  r.title_len = static_cast<std::uint8_t>(title.size());
  std::copy(title.begin(), title.end(), r.title.begin());
  const Bytes scalar = hex("02badc0de1234567890abcdef1234567890abcdef1234567890abcdef1234567");
  std::copy(scalar.begin(), scalar.end(), r.private_scalar.begin());
  auto eph = HostEcKey::from_private(
      hex("03efe3e3e1234567890abcdef1234567890abcdef1234567890abcdef1234567"));
  ASSERT_TRUE(eph.ok());
  auto pub = HostEcKey::from_public(eph->public_point());
  ASSERT_TRUE(pub.ok());
  auto k = derive_slot_key(r, *pub, 1, 2);
  ASSERT_TRUE(k.ok()) << k.error().message();
  EXPECT_EQ(to_hex(*k), "b8d658d0bac502e3faa2a097fafdc523");
}

TEST_F(MetersimTest, KeyUpdateInstallsTheDerivedKeyAndAnswersUnderIt) {
  auto eph = HostEcKey::generate();
  ASSERT_TRUE(eph.ok());
  c1222::KeyUpdate ku;
  ku.target_slot = 1;
  ku.key_version = 2;
  std::copy(eph->public_point().begin(), eph->public_point().end(), ku.ephemeral_public.begin());
  Cmd c;
  c.services = {c1222::encode_key_update_service(ku)};
  c.cls = CommandClass::key_management;
  // The new key as the DKUS/HSM derives it: ECDH(ephemeral, meter public key).
  auto meter_pub = HostEcKey::from_public(meter_public());
  ASSERT_TRUE(meter_pub.ok());
  auto ctx = profile_key_context(c1222::key_context_input(rec().title_view(), 1, 2).value());
  ASSERT_TRUE(ctx.ok());
  Block nk{};
  ASSERT_TRUE(eph->derive_profile_key(*meter_pub, *ctx, nk).ok());
  const Bytes new_key(nk.begin(), nk.end());

  MeterReply r = send(secure(c));
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  EXPECT_FALSE(open(r.wire, slot_key(), 0).has_value());  // not under the old key
  auto o = open(r.wire, new_key, 1);
  ASSERT_TRUE(o.has_value());
  ASSERT_EQ(o->services.size(), 3u);
  EXPECT_EQ(o->services[1], Bytes{0x00});
  EXPECT_TRUE(c1222::decode_receipt_response(o->services[2]).ok());
  EXPECT_EQ(rec().active_slot, 1);
  EXPECT_EQ(slot_key(0, 1), new_key);

  // Commands under the new key work; a rollback to an older version is refused.
  Cmd read;
  read.key = new_key;
  read.key_id = 1;
  read.id = 0x0f4250;
  r = send(secure(read));
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  ASSERT_TRUE(open(r.wire, new_key, 1).has_value());
  ku.target_slot = 2;
  ku.key_version = 1;
  c.services = {c1222::encode_key_update_service(ku)};
  c.key = new_key;
  c.key_id = 1;
  c.id = 0x0f4251;
  r = send(secure(c));
  o = open(r.wire, new_key, 1);
  ASSERT_TRUE(o && o->services.size() == 3);
  EXPECT_EQ(o->services[1], Bytes{c1222::kRespOnp});
  EXPECT_EQ(rec().slots[2].installed, 0);
  // Key update in a class that does not cover it: refused whole.
  c.cls = CommandClass::write;
  c.id = 0x0f4252;
  ku.key_version = 3;
  c.services = {c1222::encode_key_update_service(ku)};
  r = send(secure(c));
  EXPECT_EQ(r.code, c1222::kRespIsc);
  EXPECT_EQ(rec().slots[2].installed, 0);
}

TEST_F(MetersimTest, ChallengeIsSignedWithTheMeterKey) {
  c1222::Challenge ch{};
  for (std::size_t i = 0; i < ch.size(); ++i) ch[i] = static_cast<std::uint8_t>(0xC0 + i);
  Cmd c;
  c.services = {c1222::encode_challenge_write(ch), c1222::encode_full_read(c1222::kTableChallenge)};
  c.cls = CommandClass::key_management;
  MeterReply r = send(secure(c));
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  auto o = open(r.wire, slot_key());
  ASSERT_TRUE(o && o->services.size() == 4);  // MT-2040, write, read, receipt (class 4)
  auto ans = c1222::decode_challenge_answer_response(o->services[2]);
  ASSERT_TRUE(ans.ok()) << ans.error().message();
  EXPECT_EQ(ans->challenge, ch);
  EXPECT_EQ(ans->meter_time, kNow);
  auto sb = c1222::challenge_signed_bytes(rec().title_view(), *ans);
  ASSERT_TRUE(sb.ok());
  auto d = sha256(*sb);
  auto pub = HostEcKey::from_public(meter_public());
  ASSERT_TRUE(pub.ok());
  EXPECT_TRUE(pub->verify(*d, ans->signature).ok());
  // A read of MT-2043 without a challenge written first.
  c.services = {c1222::encode_full_read(c1222::kTableChallenge)};
  c.id = 0x0f4260;
  r = send(secure(c));
  o = open(r.wire, slot_key());
  ASSERT_TRUE(o && o->services.size() == 3);
  EXPECT_EQ(o->services[1], Bytes{c1222::kRespIsss});
}

// --- MT-2044 command-key replacement ----------------------------------------------------------

// Offset of the MT-2044 sequence inside a version-2 record (fleet.h): title length, title,
// serial, scalar, 4 key slots, active slot, 2 trust entries.
constexpr std::size_t kSequenceAt = 1 + 64 + 16 + 32 + 4 * 21 + 1 + 2 * 4;

std::uint32_t be32_at(const Bytes& b, std::size_t at) {
  return (std::uint32_t{b[at]} << 24) | (std::uint32_t{b[at + 1]} << 16) |
         (std::uint32_t{b[at + 2]} << 8) | std::uint32_t{b[at + 3]};
}

// The same fleet as a format-version-1 state file (fleet.h), built byte by byte from a version-2
// one: keys before 427-byte records without the MT-2044 sequence, no gs-revocation key.
Bytes to_version1(const Bytes& v2) {
  const std::size_t count = be32_at(v2, 12);
  const std::size_t keys = v2[16];
  Bytes out(v2.begin(), v2.begin() + kHeaderSize);
  out[9] = 1;
  out[10] = static_cast<std::uint8_t>(kRecordSizeV1 >> 8);
  out[11] = static_cast<std::uint8_t>(kRecordSizeV1);
  out[17] = 0;
  const auto keys_at = v2.begin() + static_cast<std::ptrdiff_t>(kHeaderSize + count * kRecordSize);
  out.insert(out.end(), keys_at, keys_at + static_cast<std::ptrdiff_t>(keys * kEcPointSize));
  for (std::size_t i = 0; i < count; ++i) {
    const auto rec = v2.begin() + static_cast<std::ptrdiff_t>(kHeaderSize + i * kRecordSize);
    out.insert(out.end(), rec, rec + kSequenceAt);
    out.insert(out.end(), rec + kSequenceAt + 4, rec + kRecordSize);
  }
  auto d = sha256(out);
  GS_CHECK(d.ok());
  out.insert(out.end(), d->begin(), d->end());
  return out;
}

// A fleet trusting gs-cmd-1 (id 1, slot 0) and gs-cmd-2 (id 2, slot 1), with a gs-revocation key.
class MetersimReplacementTest : public MetersimTest {
 protected:
  void SetUp() override {
    MetersimTest::SetUp();
    cmd2_key_.emplace(HostEcKey::generate().value());
    revocation_key_.emplace(HostEcKey::generate().value());
    new_key_.emplace(HostEcKey::generate().value());
    ExportOptions o;
    o.meters = 3;
    o.seed = 42;
    o.trust_cmd1 = cmd_key_->public_point();
    o.trust_cmd2 = cmd2_key_->public_point();
    o.trust_revocation = revocation_key_->public_point();
    o.now = kNow - 3600;
    auto f = Fleet::generate(o, nullptr);
    ASSERT_TRUE(f.ok()) << f.error().message();
    fleet_ = std::move(f).value();
    ASSERT_NE(fleet_->revocation(), nullptr);
  }

  // A statement signed by `signer` (default gs-revocation).
  c1222::CommandKeyReplacement statement(std::uint8_t slot, std::uint8_t key_id,
                                         std::uint32_t sequence, const EcPoint& point,
                                         const HostEcKey* signer = nullptr) {
    c1222::CommandKeyReplacement st;
    st.trust_slot = slot;
    st.key_id = key_id;
    st.sequence = sequence;
    st.issued_at = kNow - 100;
    std::copy(point.begin(), point.end(), st.public_key.begin());
    auto d = sha256(c1222::replacement_signed_bytes(st));
    GS_CHECK(d.ok());
    auto sig = (signer != nullptr ? *signer : *revocation_key_).sign(*d);
    GS_CHECK(sig.ok());
    std::copy(sig->begin(), sig->end(), st.signature.begin());
    return st;
  }

  // Writes `write` (an MT-2044 service) to meter `meter` in a class-4 command signed by gs-cmd-1
  // with invocation id `id`; returns the write's answer, or -1 when the command was refused
  // whole (reason in *why).
  int replace(const Bytes& write, std::uint32_t id, std::size_t meter = 0,
              CommandClass cls = CommandClass::key_management, std::string* why = nullptr) {
    Cmd c;
    c.meter = ".7." + std::to_string(meter + 1);
    c.key = slot_key(meter);
    c.services = {write};
    c.cls = cls;
    c.id = id;
    c.not_after = kNow + 240 + (id & 0xFFFF);  // rising: no replay-table floor in the way
    c.signer = replace_signer_;
    c.signer_id = replace_signer_id_;
    MeterReply r = send(secure(c));
    if (why != nullptr) *why = r.reason;
    if (r.outcome != Outcome::executed) return -1;
    auto o = open(r.wire, slot_key(meter));
    // MT-2040, the write, the receipt (class 4).
    if (!o || o->services.size() != 3 || o->services[1].size() != 1) return -2;
    auto receipt = c1222::decode_receipt_response(o->services[2]);
    if (!receipt.ok() || receipt->result != o->services[1][0]) return -3;
    return o->services[1][0];
  }
  int replace(const c1222::CommandKeyReplacement& st, std::uint32_t id, std::size_t meter = 0) {
    return replace(c1222::encode_replacement_write(st), id, meter);
  }

  // A read of ST-23 on meter 0 signed by `signer` as key id `signer_id`.
  MeterReply read_signed_by(const HostEcKey& signer, std::uint8_t signer_id, std::uint32_t id,
                            std::size_t meter = 0) {
    Cmd c;
    c.meter = ".7." + std::to_string(meter + 1);
    c.key = slot_key(meter);
    c.signer = &signer;
    c.signer_id = signer_id;
    c.id = id;
    c.not_after = kNow + 240 + (id & 0xFFFF);
    return send(secure(c));
  }

  // What signs the commands replace() sends (default gs-cmd-1 as key id 1).
  void sign_replacements_with(const HostEcKey& key, std::uint8_t id) {
    replace_signer_ = &key;
    replace_signer_id_ = id;
  }
  const HostEcKey* replace_signer_ = nullptr;
  std::uint8_t replace_signer_id_ = 1;

  std::optional<HostEcKey> cmd2_key_;
  std::optional<HostEcKey> revocation_key_;
  std::optional<HostEcKey> new_key_;
};

TEST_F(MetersimReplacementTest, ValidStatementReplacesTheTrustSlot) {
  const std::size_t keys_before = fleet_->trust().size();
  ASSERT_EQ(keys_before, 2u);
  const auto st = statement(0, 3, 1, new_key_->public_point());
  ASSERT_EQ(replace(st, 0x0f5001), c1222::kRespOk);
  EXPECT_EQ(rec().trust[0].present, 1);
  EXPECT_EQ(rec().trust[0].key_id, 3);
  ASSERT_LT(rec().trust[0].key_index, fleet_->trust().size());
  EXPECT_EQ(fleet_->trust().key(rec().trust[0].key_index).public_point(),
            new_key_->public_point());
  EXPECT_EQ(rec().trust[1], (TrustEntry{1, 2, 1}));  // the other slot is untouched
  EXPECT_EQ(rec().replacement_seq, 1u);
  EXPECT_EQ(fleet_->trust().size(), keys_before + 1);

  // The new key id verifies; the displaced one is refused; gs-cmd-2 still works.
  MeterReply r = read_signed_by(*new_key_, 3, 0x0f5002);
  EXPECT_EQ(r.outcome, Outcome::executed) << r.reason;
  r = read_signed_by(*cmd_key_, 1, 0x0f5003);
  EXPECT_EQ(r.outcome, Outcome::refused);
  EXPECT_EQ(r.code, c1222::kRespSme);
  EXPECT_EQ(r.reason, "untrusted signer key id 1");
  EXPECT_EQ(read_signed_by(*cmd2_key_, 2, 0x0f5004).outcome, Outcome::executed);
  // The new key under the displaced id is refused too (the id names the slot's key).
  EXPECT_EQ(read_signed_by(*new_key_, 1, 0x0f5005).code, c1222::kRespSme);

  // Other meters keep trusting gs-cmd-1 until they get the statement; the same statement then
  // shares the table entry.
  EXPECT_EQ(read_signed_by(*cmd_key_, 1, 0x0f5006, 1).outcome, Outcome::executed);
  ASSERT_EQ(replace(st, 0x0f5007, 1), c1222::kRespOk);
  EXPECT_EQ(rec(1).trust[0], rec(0).trust[0]);
  EXPECT_EQ(fleet_->trust().size(), keys_before + 1);
  EXPECT_EQ(read_signed_by(*cmd_key_, 1, 0x0f5008, 1).code, c1222::kRespSme);

  // A later statement replaces slot 1, signed in a command by the new key itself.
  auto third = HostEcKey::generate();
  ASSERT_TRUE(third.ok());
  Cmd c;
  c.services = {c1222::encode_replacement_write(statement(1, 4, 2, third->public_point()))};
  c.cls = CommandClass::key_management;
  c.signer = &*new_key_;
  c.signer_id = 3;
  c.id = 0x0f5009;
  r = send(secure(c));
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  EXPECT_EQ(rec().trust[1].key_id, 4);
  EXPECT_EQ(rec().replacement_seq, 2u);
  EXPECT_EQ(read_signed_by(*cmd2_key_, 2, 0x0f500a).code, c1222::kRespSme);
  EXPECT_EQ(read_signed_by(*third, 4, 0x0f500b).outcome, Outcome::executed);
}

TEST_F(MetersimReplacementTest, RefusedStatementsChangeNothing) {
  // One accepted statement first, so that replayed and older sequences can be tried.
  const auto accepted = statement(1, 5, 10, new_key_->public_point());
  ASSERT_EQ(replace(accepted, 0x0f5100), c1222::kRespOk);
  auto fresh = HostEcKey::generate();
  ASSERT_TRUE(fresh.ok());
  const EcPoint& point = fresh->public_point();

  struct Case {
    const char* name;
    Bytes write;
    int code;
  };
  std::vector<Case> cases;
  {
    auto st = statement(0, 3, 11, point);
    st.signature[10] ^= 0x01;
    cases.push_back({"bad signature", c1222::encode_replacement_write(st), c1222::kRespIsc});
  }
  {
    auto st = statement(0, 3, 11, point);
    st.sequence = 12;  // signed for 11
    cases.push_back({"altered after signing", c1222::encode_replacement_write(st),
                     c1222::kRespIsc});
  }
  cases.push_back({"signed by another key",
                   c1222::encode_replacement_write(statement(0, 3, 11, point, &*other_key_)),
                   c1222::kRespIsc});
  cases.push_back({"signed by a command key",
                   c1222::encode_replacement_write(statement(0, 3, 11, point, &*cmd_key_)),
                   c1222::kRespIsc});
  cases.push_back({"replayed sequence", c1222::encode_replacement_write(accepted),
                   c1222::kRespOnp});
  cases.push_back({"same sequence, other key",
                   c1222::encode_replacement_write(statement(0, 3, 10, point)), c1222::kRespOnp});
  cases.push_back({"lower sequence", c1222::encode_replacement_write(statement(0, 3, 9, point)),
                   c1222::kRespOnp});
  cases.push_back({"key id held by the other slot",
                   c1222::encode_replacement_write(statement(0, 5, 11, point)), c1222::kRespIar});
  cases.push_back({"slot 1 taking slot 0's id",
                   c1222::encode_replacement_write(statement(1, 1, 11, point)), c1222::kRespIar});
  cases.push_back({"slot 2", c1222::encode_replacement_write(statement(2, 3, 11, point)),
                   c1222::kRespErr});
  {
    EcPoint off_curve = point;
    off_curve[64] ^= 0x01;
    cases.push_back({"point not on the curve",
                     c1222::encode_replacement_write(statement(0, 3, 11, off_curve)),
                     c1222::kRespIar});
  }
  cases.push_back({"gs-revocation as a command key",
                   c1222::encode_replacement_write(
                       statement(0, 3, 11, revocation_key_->public_point())),
                   c1222::kRespIar});
  {
    Bytes w = c1222::encode_replacement_write(statement(0, 3, 11, point));
    w[8] = 2;  // data version 2; checksum repaired
    w.back() = static_cast<std::uint8_t>(w.back() - 1);
    cases.push_back({"data version 2", w, c1222::kRespErr});
  }
  {
    Bytes w = c1222::encode_replacement_write(statement(0, 3, 11, point));
    w.back() ^= 0x01;
    cases.push_back({"bad checksum", w, c1222::kRespErr});
  }
  std::uint32_t id = 0x0f5110;
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const MeterRecord before = rec();
    const std::size_t keys = fleet_->trust().size();
    std::string why;
    EXPECT_EQ(replace(k.write, ++id, 0, CommandClass::key_management, &why), k.code) << why;
    EXPECT_EQ(rec().trust, before.trust);
    EXPECT_EQ(rec().replacement_seq, 10u);
    EXPECT_EQ(fleet_->trust().size(), keys);
  }
  // Not class 4: the whole command is refused.
  std::string why;
  EXPECT_EQ(replace(c1222::encode_replacement_write(statement(0, 3, 11, point)), ++id, 0,
                    CommandClass::write, &why),
            -1);
  EXPECT_EQ(why, "service needs class key_management");
  EXPECT_EQ(rec().trust[0], (TrustEntry{1, 1, 0}));
  // gs-cmd-1 is still trusted, and the good statement goes through after all that.
  EXPECT_EQ(read_signed_by(*cmd_key_, 1, ++id).outcome, Outcome::executed);
  EXPECT_EQ(replace(statement(0, 3, 11, point), ++id), c1222::kRespOk);
  EXPECT_EQ(rec().trust[0].key_id, 3);
}

TEST_F(MetersimTest, ReplacementWithoutRevocationKeyIsNotSupported) {
  ASSERT_EQ(fleet_->revocation(), nullptr);
  auto revocation = HostEcKey::generate();
  auto new_key = HostEcKey::generate();
  ASSERT_TRUE(revocation.ok() && new_key.ok());
  c1222::CommandKeyReplacement st;
  st.trust_slot = 1;
  st.key_id = 3;
  st.sequence = 1;
  st.public_key = new_key->public_point();
  auto d = sha256(c1222::replacement_signed_bytes(st));
  ASSERT_TRUE(d.ok());
  auto sig = revocation->sign(*d);
  ASSERT_TRUE(sig.ok());
  std::copy(sig->begin(), sig->end(), st.signature.begin());
  Cmd c;
  c.services = {c1222::encode_replacement_write(st)};
  c.cls = CommandClass::key_management;
  const MeterRecord before = rec();
  MeterReply r = send(secure(c));
  ASSERT_EQ(r.outcome, Outcome::executed) << r.reason;
  auto o = open(r.wire, slot_key());
  ASSERT_TRUE(o && o->services.size() == 3);
  EXPECT_EQ(o->services[1], Bytes{c1222::kRespSns});
  EXPECT_EQ(rec().trust, before.trust);
  EXPECT_EQ(rec().replacement_seq, 0u);
  EXPECT_EQ(fleet_->trust().size(), 1u);
}

TEST_F(MetersimReplacementTest, StateFileKeepsRevocationKeyTrustAndSequence) {
  ASSERT_EQ(replace(statement(0, 3, 7, new_key_->public_point()), 0x0f5200), c1222::kRespOk);
  sign_replacements_with(*cmd2_key_, 2);  // gs-cmd-1 is no longer trusted by meter 0
  const Bytes file = fleet_->serialize();
  EXPECT_EQ(file.size(), kHeaderSize + 3 * kRecordSize + 3 * 65 + 65 + 32);
  EXPECT_EQ(be32_at(file, kHeaderSize + kSequenceAt), 7u);
  auto back = Fleet::parse(file);
  ASSERT_TRUE(back.ok()) << back.error().message();
  ASSERT_NE((*back)->revocation(), nullptr);
  EXPECT_EQ((*back)->revocation()->public_point(), revocation_key_->public_point());
  ASSERT_EQ((*back)->trust().size(), fleet_->trust().size());
  for (std::size_t i = 0; i < fleet_->trust().size(); ++i) {
    EXPECT_EQ((*back)->trust().key(i).public_point(), fleet_->trust().key(i).public_point());
  }
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ((*back)->record(i), rec(i)) << i;
  EXPECT_EQ((*back)->serialize(), file);

  // Through a real file: the new key works, the old one and the replayed statement do not.
  char tmpl[] = "/tmp/gs-metersim-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const TempDir cleanup{tmpl};
  const std::string path = std::string(tmpl) + "/fleet.state";
  ASSERT_TRUE(fleet_->save(path).ok());
  auto loaded = Fleet::load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  fleet_ = std::move(loaded).value();
  EXPECT_EQ(rec().trust[0].key_id, 3);
  EXPECT_EQ(rec().replacement_seq, 7u);
  EXPECT_EQ(read_signed_by(*new_key_, 3, 0x0f5201).outcome, Outcome::executed);
  EXPECT_EQ(read_signed_by(*cmd_key_, 1, 0x0f5202).code, c1222::kRespSme);
  EXPECT_EQ(replace(statement(0, 3, 7, new_key_->public_point()), 0x0f5203), c1222::kRespOnp);
  EXPECT_EQ(replace(statement(1, 4, 8, cmd_key_->public_point()), 0x0f5204), c1222::kRespOk);
  EXPECT_EQ(fleet_->trust().size(), 3u);  // gs-cmd-1's point came back: its entry is shared
  EXPECT_EQ(rec().trust[1].key_index, rec(1).trust[0].key_index);
}

TEST_F(MetersimReplacementTest, VersionOneStateFileLoadsWithoutRevocationKey) {
  // Before any statement: a version-1 file of the same fleet loads into the same meters, with
  // no gs-revocation key; saved again it is version 2.
  const Bytes v2 = fleet_->serialize();
  const Bytes v1 = to_version1(v2);
  EXPECT_EQ(v1.size(), kHeaderSize + 2 * 65 + 3 * kRecordSizeV1 + 32);
  auto back = Fleet::parse(v1);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ((*back)->revocation(), nullptr);
  ASSERT_EQ((*back)->trust().size(), 2u);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ((*back)->record(i), rec(i)) << i;
  const Bytes resaved = (*back)->serialize();
  EXPECT_EQ(resaved[9], kStateVersion);
  EXPECT_EQ(resaved[17], 0);
  EXPECT_EQ(to_version1(resaved), v1);

  // After a statement: the sequence is not in version 1 (0 on load) and, without the
  // gs-revocation key, the meters answer MT-2044 `sns`.
  ASSERT_EQ(replace(statement(0, 3, 7, new_key_->public_point()), 0x0f5300), c1222::kRespOk);
  sign_replacements_with(*cmd2_key_, 2);
  char tmpl[] = "/tmp/gs-metersim-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const TempDir cleanup{tmpl};
  const std::string path = std::string(tmpl) + "/fleet-v1.state";
  {
    const Bytes old = to_version1(fleet_->serialize());
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(old.data()), static_cast<std::streamsize>(old.size()));
    ASSERT_TRUE(out.good());
  }
  auto loaded = Fleet::load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  fleet_ = std::move(loaded).value();
  EXPECT_EQ(fleet_->revocation(), nullptr);
  EXPECT_EQ(rec().trust[0].key_id, 3);
  EXPECT_EQ(rec().replacement_seq, 0u);
  EXPECT_EQ(replace(statement(0, 6, 8, other_key_->public_point()), 0x0f5301), c1222::kRespSns);
  EXPECT_EQ(rec().trust[0].key_id, 3);

  // A version-1 header with version-2 records (or the reverse) is refused by its record size.
  Bytes mixed = v2;
  mixed[9] = 1;
  auto bad = Fleet::parse(mixed);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("record size 431, expected 427"), std::string::npos);
  Bytes flagged = v1;  // version 1 has no gs-revocation flag: the byte is reserved
  flagged[17] = 1;
  EXPECT_FALSE(Fleet::parse(flagged).ok());
}

TEST_F(MetersimReplacementTest, TrustTableIsBoundedAndSharesPoints) {
  // 2 provisioned keys; statements on slot 1 add one new key each until the table is full.
  std::uint32_t seq = 0;
  std::uint32_t id = 0x0f5400;
  std::vector<HostEcKey> added;
  while (fleet_->trust().size() < kMaxTrustedKeys) {
    added.push_back(HostEcKey::generate().value());
    ++seq;  // before the call: its arguments are evaluated in no fixed order
    ASSERT_EQ(replace(statement(1, static_cast<std::uint8_t>(3 + seq % 2), seq,
                                added.back().public_point()),
                      ++id),
              c1222::kRespOk)
        << seq;
  }
  EXPECT_EQ(added.size(), kMaxTrustedKeys - 2);
  const MeterRecord before = rec();
  auto one_more = HostEcKey::generate();
  ASSERT_TRUE(one_more.ok());
  EXPECT_EQ(replace(statement(1, 9, ++seq, one_more->public_point()), ++id), c1222::kRespOnp);
  EXPECT_EQ(rec().trust, before.trust);
  EXPECT_EQ(rec().replacement_seq, before.replacement_seq);
  EXPECT_EQ(fleet_->trust().size(), kMaxTrustedKeys);
  // A point already in the table still fits (shared entry), and the full table round-trips.
  EXPECT_EQ(replace(statement(1, 9, ++seq, added[3].public_point()), ++id), c1222::kRespOk);
  EXPECT_EQ(rec().trust[1], (TrustEntry{1, 9, 5}));
  EXPECT_EQ(read_signed_by(added[3], 9, ++id).outcome, Outcome::executed);
  auto back = Fleet::parse(fleet_->serialize());
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ((*back)->trust().size(), kMaxTrustedKeys);
  EXPECT_EQ((*back)->record(0), rec());
}

// Relay threads replace keys on their meters while the fleet is saved: every snapshot loads
// (each record's key index is in the file) and, at the end, every meter trusts its new key.
TEST_F(MetersimReplacementTest, ConcurrentReplacementsAndSaves) {
  ExportOptions o;
  o.meters = 8;
  o.seed = 7;
  o.trust_cmd1 = cmd_key_->public_point();
  o.trust_cmd2 = cmd2_key_->public_point();
  o.trust_revocation = revocation_key_->public_point();
  o.now = kNow - 3600;
  fleet_ = Fleet::generate(o, nullptr).value();
  constexpr std::size_t kThreads = 4;
  std::vector<HostEcKey> keys;
  for (std::size_t i = 0; i < 6; ++i) keys.push_back(HostEcKey::generate().value());
  // Commands are built here (secure() is not thread-safe), sent by the threads.
  struct Job {
    std::size_t meter;
    std::vector<Bytes> wires;
  };
  std::vector<Job> jobs;
  for (std::size_t m = 0; m < o.meters; ++m) {
    Job j{m, {}};
    for (std::uint32_t k = 0; k < 3; ++k) {
      const HostEcKey& key = keys[(m + k) % keys.size()];
      Cmd c;
      c.meter = ".7." + std::to_string(m + 1);
      c.key = slot_key(m);
      c.cls = CommandClass::key_management;
      // Each command is signed by a key the previous one left trusted: gs-cmd-2 (slot 1)
      // before any replacement, then the key the first statement put in slot 0 (id 10), then
      // the one the second put in slot 1 (id 11).
      if (k == 0) {
        c.signer = &*cmd2_key_;
        c.signer_id = 2;
      } else {
        c.signer = &keys[(m + k - 1) % keys.size()];
        c.signer_id = static_cast<std::uint8_t>(10 + k - 1);
      }
      c.services = {c1222::encode_replacement_write(
          statement(static_cast<std::uint8_t>(k % 2), static_cast<std::uint8_t>(10 + k), k + 1,
                    key.public_point()))};
      c.id = 0x0f5500 + k;
      j.wires.push_back(secure(c));
    }
    jobs.push_back(std::move(j));
  }
  std::atomic<bool> failed{false};
  std::atomic<std::size_t> finished{0};
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (std::size_t j = t; j < jobs.size(); j += kThreads) {
        for (const Bytes& w : jobs[j].wires) {
          auto m = c1222::decode(w);
          if (!m.ok() || fleet_->handle(jobs[j].meter, *m, kNow).outcome != Outcome::executed) {
            failed = true;
          }
        }
      }
      ++finished;
    });
  }
  bool all_parsed = true;
  do {  // at least once, and as long as the threads run
    if (!Fleet::parse(fleet_->serialize()).ok()) all_parsed = false;
  } while (finished.load() < kThreads);
  for (auto& th : threads) th.join();
  EXPECT_FALSE(failed.load());
  EXPECT_TRUE(all_parsed);
  EXPECT_EQ(fleet_->trust().size(), 2 + keys.size());
  for (std::size_t m = 0; m < o.meters; ++m) {
    SCOPED_TRACE(m);
    EXPECT_EQ(rec(m).replacement_seq, 3u);
    EXPECT_EQ(rec(m).trust[0].key_id, 12);
    EXPECT_EQ(rec(m).trust[1].key_id, 11);
    EXPECT_EQ(fleet_->trust().key(rec(m).trust[0].key_index).public_point(),
              keys[(m + 2) % keys.size()].public_point());
  }
  auto back = Fleet::parse(fleet_->serialize());
  ASSERT_TRUE(back.ok());
  for (std::size_t m = 0; m < o.meters; ++m) EXPECT_EQ((*back)->record(m), rec(m));
}

TEST_F(MetersimTest, RelaySurvivesMalformedInput) {
  auto relay = Relay::create(*fleet_, RelayOptions{});
  ASSERT_TRUE(relay.ok());
  auto code_of = [](const Bytes& wire) {
    auto m = c1222::decode(wire);
    if (!m.ok()) return -1;
    auto e = c1222::split_epsem(m->epsem);
    if (!e.ok()) return -2;
    auto s = c1222::split_services(e->body);
    if (!s.ok() || s->size() != 1) return -3;
    return static_cast<int>(s->front().bytes[0]);
  };
  // Unknown title: uat from the relay, addressed back to the caller.
  Cmd c;
  c.meter = ".7.99";
  auto routed = (*relay)->route(secure(c), kNow);
  EXPECT_EQ(code_of(routed.response), c1222::kRespUat);
  auto m = c1222::decode(routed.response);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->calling_ap_title->dotted(), ".9.1");
  EXPECT_EQ(m->called_ap_title->dotted(), ".1.9");
  // Every truncation and many byte flips of a real command: an answer, never a crash.
  const Bytes wire = secure(Cmd{});
  for (std::size_t n = 0; n < wire.size(); ++n) {
    auto r = (*relay)->route(ByteView(wire).first(n), kNow);
    EXPECT_GE(code_of(r.response), 0) << n;
  }
  for (std::size_t i = 0; i < wire.size(); ++i) {
    Bytes t = wire;
    t[i] ^= static_cast<std::uint8_t>(1u << (i % 8));
    auto r = (*relay)->route(t, kNow);
    ASSERT_FALSE(r.response.empty()) << i;
  }
  EXPECT_EQ(rec().out_counter > 0, true);
  // Offline meters are answered netr by the relay; all of them with --offline 1.
  RelayOptions off;
  off.offline = 1.0;
  auto r2 = Relay::create(*fleet_, off);
  ASSERT_TRUE(r2.ok());
  Cmd again;
  again.id = 0x0f4299;
  EXPECT_EQ(code_of((*r2)->route(secure(again), kNow).response), c1222::kRespNetr);
  RelayOptions bad;
  bad.loss = 1.5;
  EXPECT_FALSE(Relay::create(*fleet_, bad).ok());
}

TEST_F(MetersimTest, RelaySimulatesLatencyAndLoss) {
  RelayOptions opt;
  opt.latency_ms = 150;
  opt.loss = 1.0;  // every message lost: half before the meter, half after it executed
  opt.loss_timeout_ms = 700;
  opt.seed = 5;
  auto relay = Relay::create(*fleet_, opt);
  ASSERT_TRUE(relay.ok());
  for (std::uint32_t i = 0; i < 20; ++i) {
    Cmd c;
    c.id = 0x0f4400 + i;
    auto r = (*relay)->route(secure(c), kNow);
    EXPECT_EQ(r.delay, 700ms);
    auto m = c1222::decode(r.response);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->calling_ap_title->dotted(), ".9.1");
    EXPECT_NE(to_hex(r.response).find("80010d"), std::string::npos);  // one service: nett
  }
  const RelayStats st = (*relay)->stats();
  EXPECT_EQ(st.lost, 20u);
  EXPECT_GT(st.executed, 0u);   // the meter executed those whose answer was lost...
  EXPECT_LT(st.executed, 20u);  // ...and never saw the others
  EXPECT_EQ(st.refused, 0u);
  EXPECT_EQ(rec().out_counter, st.executed);

  opt.loss = 0.0;
  relay = Relay::create(*fleet_, opt);
  ASSERT_TRUE(relay.ok());
  Cmd c;
  c.id = 0x0f4500;
  auto r = (*relay)->route(secure(c), kNow);
  EXPECT_EQ(r.delay, 150ms);
  EXPECT_TRUE(open(r.response, slot_key()).has_value());
}

// --- the real binary ---------------------------------------------------------------------------

std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A daemon started from the build's bin directory; killed when still running at the end.
struct Process {
  pid_t pid = -1;
  std::uint16_t port = 0;
  Process() = default;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;
  ~Process() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  // SIGTERM, then the exit code (-1 when it had to be killed or died of a signal).
  int stop() {
    if (pid <= 0) return -1;
    kill(pid, SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    int st = 0;
    while (std::chrono::steady_clock::now() < deadline) {
      if (waitpid(pid, &st, WNOHANG) == pid) {
        pid = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      }
      std::this_thread::sleep_for(20ms);
    }
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    pid = -1;
    return -1;
  }
};

// Starts `bin args`, stdout/stderr to `out_prefix`.out/.err, and waits (15 s at most) for a
// complete line containing `tag` followed by the port.
void start_process(const std::string& bin, const std::vector<std::string>& args,
                   const std::string& out_prefix, const std::string& tag, Process* p) {
  std::fflush(nullptr);  // the child must not flush our buffered output a second time
  p->pid = fork();
  ASSERT_GE(p->pid, 0);
  if (p->pid == 0) {
    std::freopen((out_prefix + ".out").c_str(), "w", stdout);
    std::freopen((out_prefix + ".err").c_str(), "w", stderr);
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(bin.c_str()));
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + 15s;
  while (std::chrono::steady_clock::now() < deadline) {
    const std::string out = slurp(out_prefix + ".out");
    auto at = out.find(tag);
    if (at != std::string::npos && out.find('\n', at) != std::string::npos) {
      p->port = static_cast<std::uint16_t>(std::stoi(out.substr(at + tag.size())));
      return;
    }
    if (waitpid(p->pid, nullptr, WNOHANG) == p->pid) {
      p->pid = -1;
      FAIL() << bin << " exited: " << slurp(out_prefix + ".err");
    }
    std::this_thread::sleep_for(50ms);
  }
  FAIL() << bin << " did not start: " << slurp(out_prefix + ".err");
}

TEST_F(MetersimTest, RelayBinaryEndToEnd) {
  char tmpl[] = "/tmp/gs-metersim-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const TempDir cleanup{dir};
  const std::string bin = std::string(GS_BIN_DIR) + "/gridseal-metersim";
  auto ex = test::run_command(bin + " export --meters 5 --out " + dir + "/fleet.csv --state " +
                              dir + "/fleet.state --seed 9 --title-prefix .7 --trust-cmd1 " +
                              to_hex(cmd_key_->public_point()));
  ASSERT_EQ(ex.code, 0) << ex.out;
  auto bad = test::run_command(bin + " export --meters 0 --out x --state y");
  EXPECT_EQ(bad.code, 2) << bad.out;
  auto loaded = Fleet::load(dir + "/fleet.state");
  ASSERT_TRUE(loaded.ok()) << loaded.error().message();
  fleet_ = std::move(loaded).value();  // secure() uses its keys
  const Bytes key = slot_key(2);
  const std::string csv = slurp(dir + "/fleet.csv");
  EXPECT_NE(csv.find("SIM00000003,.7.3,"), std::string::npos);
  EXPECT_NE(csv.find("plain:" + to_hex(key)), std::string::npos);

  const std::string state = dir + "/fleet.state";
  Process sim;
  ASSERT_NO_FATAL_FAILURE(
      start_process(bin, {"serve", "--state", state, "--listen", "127.0.0.1:0", "--plain"},
                    dir + "/sim", "gridseal-metersim: listening on 127.0.0.1:", &sim));
  const std::uint16_t port = sim.port;
  const pid_t pid = sim.pid;
  server::ClientConfig cc;
  cc.port = port;
  cc.plain_tcp = true;
  cc.timeout = 5000ms;
  auto client = server::Client::connect(cc);
  ASSERT_TRUE(client.ok()) << client.error().message();
  const auto now = static_cast<std::uint32_t>(std::time(nullptr));
  Cmd c;
  c.meter = ".7.3";
  c.key = key;
  c.not_before = now - 60;
  c.not_after = now + 240;
  c.services = {kDisconnect};
  c.cls = CommandClass::connect_disconnect;
  auto resp = (*client)->call(secure(c));
  ASSERT_TRUE(resp.ok()) << resp.error().message();
  auto o = open(*resp, key);
  ASSERT_TRUE(o.has_value()) << to_hex(*resp);
  ASSERT_EQ(o->services.size(), 3u);
  EXPECT_EQ(o->services[1], Bytes{0x00});
  EXPECT_TRUE(c1222::decode_receipt_response(o->services[2]).ok());
  // Pipelined: a replay (sme) and an unknown meter (uat), answered in order.
  c.meter = ".7.77";
  const Bytes unknown = secure(c);
  c.meter = ".7.3";
  Bytes both = secure(c);
  both.insert(both.end(), unknown.begin(), unknown.end());
  ASSERT_TRUE((*client)->send(both).ok());
  auto first = (*client)->receive();
  ASSERT_TRUE(first.ok());
  auto fo = open(*first, key);
  ASSERT_TRUE(fo && fo->services.size() == 1);
  EXPECT_EQ(fo->services[0], Bytes{c1222::kRespSme});
  auto second = (*client)->receive();
  ASSERT_TRUE(second.ok());
  EXPECT_NE(to_hex(*second).find("a60480020901"), std::string::npos);  // from the relay .9.1
  // Garbage on the wire: an error answer, then the connection closes; the relay lives on.
  ASSERT_TRUE((*client)->send(hex("61020000")).ok());
  auto garbage = (*client)->receive();
  ASSERT_TRUE(garbage.ok());
  (*client)->close();
  auto again = server::Client::connect(cc);
  ASSERT_TRUE(again.ok());

  // SIGTERM: exit 0 and the state file now has the meter disconnected and the id accepted.
  (void)pid;
  EXPECT_EQ(sim.stop(), 0) << slurp(dir + "/sim.err");
  auto after = Fleet::load(dir + "/fleet.state");
  ASSERT_TRUE(after.ok()) << after.error().message();
  EXPECT_EQ((*after)->record(2).connected, 0);
  EXPECT_EQ((*after)->record(2).replay[0].id, 0x0f4241u);
  EXPECT_EQ((*after)->record(1).connected, 1);
  EXPECT_NE(slurp(dir + "/sim.err").find("executed=1"), std::string::npos);
}

// TLS 1.3 with client certificates (the default), latency and an offline fraction.
TEST_F(MetersimTest, RelayBinaryOverTls) {
  char tmpl[] = "/tmp/gs-metersim-tls-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const TempDir cleanup{dir};
  auto pki = pki::make_test_pki(dir + "/pki");
  ASSERT_TRUE(pki.ok()) << pki.error().message();
  const std::string bin = std::string(GS_BIN_DIR) + "/gridseal-metersim";
  auto ex =
      test::run_command(bin + " export --meters 40 --out " + dir + "/fleet.csv --state " + dir +
                        "/fleet.state --seed 11 --trust-cmd1 " + to_hex(cmd_key_->public_point()));
  ASSERT_EQ(ex.code, 0) << ex.out;
  auto loaded = Fleet::load(dir + "/fleet.state");
  ASSERT_TRUE(loaded.ok());
  fleet_ = std::move(loaded).value();
  Process sim;
  ASSERT_NO_FATAL_FAILURE(
      start_process(bin,
                    {"serve", "--state", dir + "/fleet.state", "--listen", "127.0.0.1:0",
                     "--tls-ca", pki->ca_cert, "--tls-cert", pki->server_cert, "--tls-key",
                     pki->server_key, "--latency-ms", "100", "--offline", "0.5", "--seed", "3"},
                    dir + "/sim", "gridseal-metersim: listening on 127.0.0.1:", &sim));
  server::ClientConfig cc;
  cc.port = sim.port;
  cc.tls.ca_file = pki->ca_cert;
  cc.tls.cert_file = pki->client_cert;
  cc.tls.key_file = pki->client_key;
  cc.timeout = 5000ms;
  auto client = server::Client::connect(cc);
  ASSERT_TRUE(client.ok()) << client.error().message();
  const auto now = static_cast<std::uint32_t>(std::time(nullptr));
  std::size_t answered = 0, offline = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < 40; ++i) {
    Cmd c;
    c.meter = ".7." + std::to_string(i + 1);
    c.key = slot_key(i);
    c.not_before = now - 60;
    c.not_after = now + 240;
    auto resp = (*client)->call(secure(c));
    ASSERT_TRUE(resp.ok()) << resp.error().message();
    if (open(*resp, slot_key(i)).has_value()) {
      ++answered;
    } else if (to_hex(*resp).find("80010e") != std::string::npos) {  // netr from the relay
      ++offline;
    }
  }
  EXPECT_EQ(answered + offline, 40u);
  EXPECT_GT(answered, 5u);
  EXPECT_GT(offline, 5u);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 40 * 100ms);  // every answer was delayed
  // Without a client certificate: no connection.
  server::ClientConfig anon = cc;
  anon.tls.cert_file.clear();
  anon.tls.key_file.clear();
  auto refused = server::Client::connect(anon);
  if (refused.ok()) {
    EXPECT_FALSE((*refused)->call(secure(Cmd{})).ok());
  }
  EXPECT_EQ(sim.stop(), 0) << slurp(dir + "/sim.err");
}

// The real SES (gridseal-sesd, commands signed by gs-cmd-1 in a SoftHSM2 token and sealed under
// keys the HSM derived by ECDH from gs-provision) in front of the real simulator.
TEST(MetersimWithSesd, CommandsFromTheRealSesAreExecuted) {
  char tmpl[] = "/tmp/gs-metersim-ses-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const TempDir cleanup{dir};
  const std::string conf = dir + "/ses.toml";
  std::ofstream(conf) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-metersim\"\n"
                         "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                         "[store]\npath = \"gridseal.db\"\n"
                         "[server]\naddress = \"127.0.0.1\"\nport = 0\nplain_tcp = true\n"
                         "worker_threads = 2\ndrain_ms = 2000\n"
                         "[ses]\nhead_end_title = \".1.9\"\nses_title = \".1.10\"\n"
                         "policy = \"policy.toml\"\nmetrics_port = 0\nmeter_cache_ttl_ms = 0\n";
  std::ofstream(dir + "/policy.toml")
      << "[[client]]\nname = \"loopback\"\nsubject = \"plain:127.0.0.1\"\n"
         "classes = [\"read\", \"connect_disconnect\"]\n"
         "[procedures]\nconnect_disconnect = [\"SP-26\"]\n";
  auto trim = [](std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    return s;
  };
  auto r = test::run_gridseal("hsm init --config " + conf);
  ASSERT_EQ(r.code, 0) << r.out;
  auto cmd1 = test::run_gridseal("hsm export-pubkey gs-cmd-1 --hex --config " + conf);
  ASSERT_EQ(cmd1.code, 0) << cmd1.out;
  auto prov = test::run_gridseal("hsm export-pubkey gs-provision --hex --config " + conf);
  ASSERT_EQ(prov.code, 0) << prov.out;
  const std::string sim = std::string(GS_BIN_DIR) + "/gridseal-metersim";
  r = test::run_command(sim + " export --meters 3 --keys ecdh --provision-pub " + trim(prov.out) +
                        " --trust-cmd1 " + trim(cmd1.out) + " --seed 3 --out " + dir +
                        "/fleet.csv --state " + dir + "/fleet.state");
  ASSERT_EQ(r.code, 0) << r.out;
  r = test::run_gridseal("meters import " + dir + "/fleet.csv --config " + conf);
  ASSERT_EQ(r.code, 0) << r.out;
  auto fleet = Fleet::load(dir + "/fleet.state");
  ASSERT_TRUE(fleet.ok()) << fleet.error().message();
  const MeterRecord& meter = (*fleet)->record(1);
  const Bytes key(meter.slots[0].key.begin(), meter.slots[0].key.end());

  Process ses;
  ASSERT_NO_FATAL_FAILURE(start_process(std::string(GS_BIN_DIR) + "/gridseal-sesd",
                                        {"--config", conf}, dir + "/sesd",
                                        "listening on 127.0.0.1:", &ses));
  Process relay;
  ASSERT_NO_FATAL_FAILURE(start_process(sim,
                                        {"serve", "--state", dir + "/fleet.state", "--listen",
                                         "127.0.0.1:0", "--plain", "--latency-ms", "20"},
                                        dir + "/sim", "listening on 127.0.0.1:", &relay));
  auto connect = [](std::uint16_t port) {
    server::ClientConfig cc;
    cc.port = port;
    cc.plain_tcp = true;
    cc.timeout = 5000ms;
    auto c = server::Client::connect(cc);
    GS_CHECK(c.ok());
    return std::move(c).value();
  };
  auto to_ses = connect(ses.port);
  auto to_meters = connect(relay.port);

  // A read: secured by the SES, executed by the meter, answered under the meter's key.
  auto secured = to_ses->call(request(".7.2", {kReadRegs}));
  ASSERT_TRUE(secured.ok()) << secured.error().message();
  ASSERT_TRUE(open_message(*secured, key).has_value()) << to_hex(*secured);
  auto answer = to_meters->call(*secured);
  ASSERT_TRUE(answer.ok()) << answer.error().message();
  auto o = open_message(*answer, key);
  ASSERT_TRUE(o.has_value()) << to_hex(*answer);
  ASSERT_EQ(o->services.size(), 2u);
  EXPECT_TRUE(c1222::decode_read_response(o->services[1], kCurrentRegsSize).ok());

  // A disconnect: the SES appends the receipt read; the receipt verifies.
  secured = to_ses->call(request(".7.2", {kDisconnect}));
  ASSERT_TRUE(secured.ok());
  answer = to_meters->call(*secured);
  ASSERT_TRUE(answer.ok());
  o = open_message(*answer, key);
  ASSERT_TRUE(o && o->services.size() == 3) << to_hex(*answer);
  EXPECT_EQ(o->services[1], Bytes{0x00});
  auto receipt = c1222::decode_receipt_response(o->services[2]);
  ASSERT_TRUE(receipt.ok()) << receipt.error().message();
  auto pub = HostEcKey::from_public(meter_key(meter).value().public_point());
  auto sd = sha256(c1222::receipt_signed_bytes(meter.title_view(), *receipt).value());
  EXPECT_TRUE(pub->verify(*sd, receipt->signature).ok());
  // The same secured command again: a replay.
  answer = to_meters->call(*secured);
  ASSERT_TRUE(answer.ok());
  o = open_message(*answer, key);
  ASSERT_TRUE(o && o->services.size() == 1);
  EXPECT_EQ(o->services[0], Bytes{c1222::kRespSme});

  EXPECT_EQ(relay.stop(), 0) << slurp(dir + "/sim.err");
  EXPECT_EQ(ses.stop(), 0) << slurp(dir + "/sesd.err");
  auto after = Fleet::load(dir + "/fleet.state");
  ASSERT_TRUE(after.ok()) << after.error().message();
  EXPECT_EQ((*after)->record(1).connected, 0);
  EXPECT_EQ((*after)->record(0).connected, 1);
}

// Command-key replacement end to end: `gridseal cmdkeys generate` + `replace` (gs-revocation
// signs MT-2044 in the HSM), the real SES secures the statement as a key-management command
// under gs-cmd-1, the real simulator (provisioned with the gs-revocation public key) executes
// it; then the SES signs with the new key gs-cmd-3: the meter that took the statement executes
// its commands, a meter that did not take it refuses them.
TEST(MetersimWithSesd, CommandKeyReplacementThroughTheRealSes) {
  char tmpl[] = "/tmp/gs-metersim-cmdkey-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const TempDir cleanup{dir};
  const std::string conf = dir + "/ses.toml";
  auto write_conf = [&](int command_key) {
    std::ofstream(conf) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-cmdkey\"\n"
                           "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                           "[store]\npath = \"gridseal.db\"\n"
                           "[server]\naddress = \"127.0.0.1\"\nport = 0\nplain_tcp = true\n"
                           "worker_threads = 2\ndrain_ms = 2000\n"
                           "[ses]\nhead_end_title = \".1.9\"\nses_title = \".1.10\"\n"
                           "policy = \"policy.toml\"\nmetrics_port = 0\nmeter_cache_ttl_ms = 0\n"
                           "command_key = "
                        << command_key << "\n";
  };
  write_conf(1);
  std::ofstream(dir + "/policy.toml")
      << "[[client]]\nname = \"loopback\"\nsubject = \"plain:127.0.0.1\"\n"
         "classes = [\"read\", \"key_management\"]\n";
  auto trim = [](std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    const auto nl = s.rfind('\n');
    return nl == std::string::npos ? s : s.substr(nl + 1);
  };
  auto r = test::run_gridseal("hsm init --config " + conf);
  ASSERT_EQ(r.code, 0) << r.out;
  std::string pub[4];
  const char* labels[4] = {"gs-cmd-1", "gs-cmd-2", "gs-revocation", "gs-provision"};
  for (int i = 0; i < 4; ++i) {
    r = test::run_gridseal(std::string("hsm export-pubkey ") + labels[i] + " --hex --config " +
                           conf);
    ASSERT_EQ(r.code, 0) << r.out;
    pub[i] = trim(r.out);
  }
  r = test::run_gridseal("cmdkeys generate --config " + conf);
  ASSERT_EQ(r.code, 0) << r.out;
  r = test::run_gridseal("cmdkeys replace --slot 1 --key 3 --hex --config " + conf);
  ASSERT_EQ(r.code, 0) << r.out;
  const Bytes statement = from_hex(trim(r.out)).value();
  ASSERT_EQ(statement.size(), 150u);

  const std::string sim = std::string(GS_BIN_DIR) + "/gridseal-metersim";
  r = test::run_command(sim + " export --meters 2 --keys ecdh --provision-pub " + pub[3] +
                        " --trust-cmd1 " + pub[0] + " --trust-cmd2 " + pub[1] +
                        " --trust-revocation " + pub[2] + " --seed 5 --out " + dir +
                        "/fleet.csv --state " + dir + "/fleet.state");
  ASSERT_EQ(r.code, 0) << r.out;
  r = test::run_gridseal("meters import " + dir + "/fleet.csv --config " + conf);
  ASSERT_EQ(r.code, 0) << r.out;
  Bytes keys[2];
  {
    auto fleet = Fleet::load(dir + "/fleet.state");
    ASSERT_TRUE(fleet.ok()) << fleet.error().message();
    for (int i = 0; i < 2; ++i) {
      const auto& k = (*fleet)->record(static_cast<std::size_t>(i)).slots[0].key;
      keys[i] = Bytes(k.begin(), k.end());
    }
  }
  auto connect = [](std::uint16_t port) {
    server::ClientConfig cc;
    cc.port = port;
    cc.plain_tcp = true;
    cc.timeout = 5000ms;
    auto c = server::Client::connect(cc);
    GS_CHECK(c.ok());
    return std::move(c).value();
  };
  Process relay;
  ASSERT_NO_FATAL_FAILURE(start_process(sim,
                                        {"serve", "--state", dir + "/fleet.state", "--listen",
                                         "127.0.0.1:0", "--plain"},
                                        dir + "/sim", "listening on 127.0.0.1:", &relay));
  auto to_meters = connect(relay.port);
  {
    Process ses;
    ASSERT_NO_FATAL_FAILURE(start_process(std::string(GS_BIN_DIR) + "/gridseal-sesd",
                                          {"--config", conf}, dir + "/sesd1",
                                          "listening on 127.0.0.1:", &ses));
    auto to_ses = connect(ses.port);
    // Meter .7.1 takes the statement: MT-2040 (gs-cmd-1) OK, MT-2044 OK, receipt.
    auto secured = to_ses->call(request(".7.1", {statement}));
    ASSERT_TRUE(secured.ok()) << secured.error().message();
    auto answer = to_meters->call(*secured);
    ASSERT_TRUE(answer.ok()) << answer.error().message();
    auto o = open_message(*answer, keys[0]);
    ASSERT_TRUE(o && o->services.size() == 3) << to_hex(*answer);
    EXPECT_EQ(o->services[1], Bytes{0x00});
    // The same statement once more (a fresh command): the sequence is not above the last one.
    secured = to_ses->call(request(".7.1", {statement}));
    ASSERT_TRUE(secured.ok());
    answer = to_meters->call(*secured);
    ASSERT_TRUE(answer.ok());
    o = open_message(*answer, keys[0]);
    ASSERT_TRUE(o && o->services.size() >= 2) << to_hex(*answer);
    EXPECT_NE(o->services[1], Bytes{0x00});
    to_ses.reset();
    EXPECT_EQ(ses.stop(), 0) << slurp(dir + "/sesd1.err");
  }
  // The SES now signs with gs-cmd-3 (held by trust slot 1 since statement 1).
  write_conf(3);
  {
    Process ses;
    ASSERT_NO_FATAL_FAILURE(start_process(std::string(GS_BIN_DIR) + "/gridseal-sesd",
                                          {"--config", conf}, dir + "/sesd3",
                                          "listening on 127.0.0.1:", &ses));
    auto to_ses = connect(ses.port);
    for (int m = 0; m < 2; ++m) {
      auto secured = to_ses->call(request(".7." + std::to_string(m + 1), {kReadRegs}));
      ASSERT_TRUE(secured.ok()) << secured.error().message();
      auto answer = to_meters->call(*secured);
      ASSERT_TRUE(answer.ok()) << answer.error().message();
      auto o = open_message(*answer, keys[m]);
      ASSERT_TRUE(o.has_value()) << to_hex(*answer);
      if (m == 0) {  // took the statement: executes
        ASSERT_EQ(o->services.size(), 2u) << to_hex(*answer);
        EXPECT_TRUE(c1222::decode_read_response(o->services[1], kCurrentRegsSize).ok());
      } else {  // still trusts gs-cmd-1 and gs-cmd-2 only: refused before anything executes
        ASSERT_EQ(o->services.size(), 1u) << to_hex(*answer);
        EXPECT_EQ(o->services[0], Bytes{c1222::kRespSme});
      }
    }
    to_ses.reset();
    EXPECT_EQ(ses.stop(), 0) << slurp(dir + "/sesd3.err");
  }
  to_meters.reset();
  EXPECT_EQ(relay.stop(), 0) << slurp(dir + "/sim.err");
  auto after = Fleet::load(dir + "/fleet.state");
  ASSERT_TRUE(after.ok()) << after.error().message();
  EXPECT_EQ((*after)->record(0).replacement_seq, 1u);
  EXPECT_EQ((*after)->record(0).trust[1].key_id, 3);
  EXPECT_EQ((*after)->record(1).replacement_seq, 0u);
  EXPECT_EQ((*after)->record(1).trust[1].key_id, 2);
}

}  // namespace
}  // namespace gs::metersim
