// Signature profile (DESIGN §3): tests/vectors/profile.txt reproduced, codecs, host ECDSA/ECDH.
#include "c1222/profile.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "c1222/ber.h"
#include "c1222/eax_prime.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"
#include "tests/unit/vector_file.h"

namespace gs::c1222 {
namespace {

#define GS_ASSERT_OK(r) ASSERT_TRUE((r).ok()) << (r).error().message()
#define GS_EXPECT_ERR(r, want)                                                              \
  do {                                                                                      \
    const auto& gs_r_ = (r);                                                                \
    EXPECT_FALSE(gs_r_.ok());                                                               \
    if (!gs_r_.ok()) {                                                                      \
      EXPECT_EQ(errc_name(gs_r_.error().code), errc_name(want)) << gs_r_.error().message(); \
    }                                                                                       \
  } while (0)

const std::string kProfileFile = std::string(GS_VECTORS_DIR) + "/profile.txt";

const char* const kExamples[] = {"keys",
                                 "class2_command",
                                 "receipt_response",
                                 "key_update",
                                 "demand_response_broadcast",
                                 "meter_challenge"};

Bytes hex(std::string_view s) {
  auto b = from_hex(s);
  if (!b) {
    ADD_FAILURE() << "bad hex in test: " << s;
    return {};
  }
  return *b;
}

template <typename C>
std::string hx(const C& c) {
  return to_hex(ByteView(c.data(), c.size()));
}

const test::VectorSection* example(const test::VectorFile& f, std::string_view name) {
  for (const auto& s : f) {
    if (s.has("Example") && s.get_text("Example") == name) {
      return &s;
    }
  }
  ADD_FAILURE() << "no example " << name << " in " << kProfileFile;
  return nullptr;
}

// An AES key and the EAX' object over it (EaxPrime keeps a pointer to the cipher).
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

KeyLookup lookup(std::uint8_t id, TestKey& k) {
  return [id, &k](std::uint8_t want) -> EaxPrime* {
    return (want == id && k.eax) ? &*k.eax : nullptr;
  };
}

HostEcKey public_key(const Bytes& point) {
  auto k = HostEcKey::from_public(point);
  if (!k.ok()) {
    ADD_FAILURE() << "from_public: " << k.error().message();
    return std::move(HostEcKey::generate()).value();
  }
  return std::move(k).value();
}

// ECDSA over SHA-256(message) with `key`, plus single-bit flips of the signature and the message
// that must fail.
void expect_signature(const HostEcKey& key, ByteView message, ByteView signature) {
  auto d = sha256(message);
  ASSERT_TRUE(d.ok());
  Status st = key.verify(*d, signature);
  EXPECT_TRUE(st.ok()) << st.error().message();
  for (std::size_t bit : {0u, 7u, 255u, 256u, 300u, 511u}) {
    Bytes sig(signature.begin(), signature.end());
    sig[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
    GS_EXPECT_ERR(key.verify(*d, sig), Errc::bad_signature);
  }
  for (std::size_t pos : {std::size_t{0}, message.size() / 2, message.size() - 1}) {
    Bytes m(message.begin(), message.end());
    m[pos] ^= 0x01;
    auto d2 = sha256(m);
    ASSERT_TRUE(d2.ok());
    GS_EXPECT_ERR(key.verify(*d2, signature), Errc::bad_signature);
  }
}

// The services (code + data) of a cleartext wire message, copied.
struct Services {
  std::optional<EdClass> ed_class;
  std::uint8_t control = 0;
  std::vector<Bytes> list;
};
Services services_of(ByteView wire0) {
  Services out;
  auto m = decode(wire0);
  if (!m.ok()) {
    ADD_FAILURE() << "decode: " << m.error().message();
    return out;
  }
  auto e = split_epsem(m->epsem, m->epsem_offset);
  if (!e.ok()) {
    ADD_FAILURE() << "split_epsem: " << e.error().message();
    return out;
  }
  out.ed_class = e->ed_class;
  out.control = e->control;
  auto s = split_services(e->body);
  if (!s.ok()) {
    ADD_FAILURE() << "split_services: " << s.error().message();
    return out;
  }
  for (const auto& span : *s) {
    out.list.emplace_back(span.bytes.begin(), span.bytes.end());
  }
  return out;
}

Bytes absolute_title(const ApTitle& t) { return t.absolute(default_base_oid()); }

// --- per-example checks (each reads every field of its example) --------------------------------

void check_keys(const test::VectorFile& f) {
  const auto* s = example(f, "keys");
  ASSERT_NE(s, nullptr);
  auto cmd = HostEcKey::from_private(s->get("command_key_1_private_scalar"));
  GS_ASSERT_OK(cmd);
  EXPECT_EQ(hx(cmd->public_point()), to_hex(s->get("command_key_1_public_point")));
  auto meter = HostEcKey::from_private(s->get("meter_private_scalar"));
  GS_ASSERT_OK(meter);
  EXPECT_EQ(hx(meter->public_point()), to_hex(s->get("meter_public_point")));
  EXPECT_TRUE(HostEcKey::from_public(s->get("command_key_1_public_point")).ok());
  EXPECT_TRUE(HostEcKey::from_public(s->get("meter_public_point")).ok());
  TestKey k = make_key(s->get("meter_active_key_slot0"));
  EXPECT_TRUE(k.eax.has_value());
}

void check_class2(const test::VectorFile& f) {
  const auto* keys = example(f, "keys");
  const auto* s = example(f, "class2_command");
  ASSERT_NE(keys, nullptr);
  ASSERT_NE(s, nullptr);
  const HostEcKey cmd_key = public_key(keys->get("command_key_1_public_point"));
  TestKey slot0 = make_key(keys->get("meter_active_key_slot0"));
  ASSERT_TRUE(slot0.eax.has_value());

  const Bytes request = s->get("request_from_collection_engine_mode0_without_signature");
  const Bytes signing_input = s->get("signing_input");
  const Bytes digest = s->get("sha256_of_signing_input");
  const Bytes service_wire = s->get("mt2040_service");
  const Bytes secured = s->get("secured_command_mode2");
  const Bytes opened0 = s->get("same_command_opened_mode0");

  // The MT-2040 service itself.
  ASSERT_EQ(service_wire.size(), kAuthorizationWireSize);
  EXPECT_EQ(service_wire[0], kAuthorizationServiceSize);
  auto auth = decode_authorization_service(ByteView(service_wire).subspan(1));
  GS_ASSERT_OK(auth);
  EXPECT_EQ(auth->signer_key_id, 1);
  EXPECT_EQ(auth->command_class, CommandClass::connect_disconnect);
  EXPECT_LT(auth->not_before, auth->not_after);
  EXPECT_EQ(to_hex(encode_authorization_service_wire(*auth)), to_hex(service_wire));

  // The signature over the signing input.
  auto d = sha256(signing_input);
  GS_ASSERT_OK(d);
  EXPECT_EQ(hx(*d), to_hex(digest));
  expect_signature(cmd_key, signing_input, auth->signature);

  // Opening the secured command gives exactly the mode-0 message ...
  auto opened = open(secured, lookup(0, slot0));
  GS_ASSERT_OK(opened);
  EXPECT_EQ(to_hex(opened->wire), to_hex(opened0));
  EXPECT_EQ(opened->mode, SecurityMode::encrypted);
  EXPECT_EQ(opened->key_id, 0);
  // ... and sealing that again reproduces the secured bytes.
  auto sealed = seal(ByteView(opened0), SecurityMode::encrypted, *slot0.eax);
  GS_ASSERT_OK(sealed);
  EXPECT_EQ(to_hex(*sealed), to_hex(secured));

  // The receiving side: find MT-2040 first and rebuild the signing input.
  auto m0 = decode(opened0);
  GS_ASSERT_OK(m0);
  auto found = extract_authorization(*m0);
  GS_ASSERT_OK(found);
  EXPECT_EQ(to_hex(found->signing_input), to_hex(signing_input));
  EXPECT_EQ(found->authorization, *auth);
  EXPECT_EQ(found->invocation_id, 0x0F4241u);
  EXPECT_FALSE(found->ed_class.has_value());
  EXPECT_EQ(opened0[found->service_offset], kServicePartialWriteOffset);
  EXPECT_EQ(opened0[found->service_offset - 1], kAuthorizationServiceSize);

  // The sending side: from the collection engine's request, with the id the SES assigns.
  auto req = decode(request);
  GS_ASSERT_OK(req);
  auto req_epsem = split_epsem(req->epsem, req->epsem_offset);
  GS_ASSERT_OK(req_epsem);
  EXPECT_EQ(to_hex(found->following), to_hex(req_epsem->body));
  auto built = authorization_signing_input(*req->called_ap_title, *req->calling_ap_title, 0x0F4241,
                                           std::nullopt, *auth, req_epsem->body);
  GS_ASSERT_OK(built);
  EXPECT_EQ(to_hex(*built), to_hex(signing_input));

  // The whole mode-0 command built from the request equals the opened vector.
  Message m = *req;
  const Bytes a8 = hex("0f4241");
  m.calling_ap_invocation_id = ByteView(a8);
  AuthValue av;
  av.key_id = 0;
  av.iv = std::array<std::uint8_t, kIvSize>{0x6b, 0x2b, 0x4d, 0x81};
  m.auth = av;
  const Bytes epsem =
      build_authorized_epsem(req_epsem->control, std::nullopt, *auth, req_epsem->body);
  m.epsem = epsem;
  auto wire = encode(m);
  GS_ASSERT_OK(wire);
  EXPECT_EQ(to_hex(*wire), to_hex(opened0));
}

void check_receipt(const test::VectorFile& f) {
  const auto* keys = example(f, "keys");
  const auto* c2 = example(f, "class2_command");
  const auto* s = example(f, "receipt_response");
  ASSERT_NE(keys, nullptr);
  ASSERT_NE(c2, nullptr);
  ASSERT_NE(s, nullptr);
  const HostEcKey meter_key = public_key(keys->get("meter_public_point"));
  TestKey slot0 = make_key(keys->get("meter_active_key_slot0"));
  ASSERT_TRUE(slot0.eax.has_value());

  const Bytes data = s->get("receipt_data");
  const Bytes signed_bytes = s->get("receipt_signed_bytes");
  const Bytes response = s->get("response_mode2");

  auto r = decode_receipt_data(data);
  GS_ASSERT_OK(r);
  EXPECT_EQ(r->invocation_id, 0x0F4241u);
  EXPECT_EQ(r->result, 0);
  EXPECT_EQ(hx(r->command_digest), to_hex(c2->get("sha256_of_signing_input")));
  EXPECT_EQ(hx(encode_receipt_data(*r)), to_hex(data));

  auto opened = open(response, lookup(0, slot0));
  GS_ASSERT_OK(opened);
  auto m = decode(opened->wire);
  GS_ASSERT_OK(m);
  ASSERT_TRUE(m->calling_ap_title.has_value());
  const Bytes meter_title = absolute_title(*m->calling_ap_title);
  ASSERT_TRUE(m->called_ap_invocation_id.has_value());
  EXPECT_EQ(hx(*m->called_ap_invocation_id), "0f4241");

  Services sv = services_of(opened->wire);
  ASSERT_TRUE(sv.ed_class.has_value());
  EXPECT_EQ(hx(*sv.ed_class), to_hex(as_bytes("GSIM")));
  int receipts = 0;
  for (const auto& svc : sv.list) {
    auto got = decode_receipt_response(svc);
    if (got.ok()) {
      ++receipts;
      EXPECT_EQ(*got, *r);
      EXPECT_EQ(to_hex(encode_receipt_response(*got)), to_hex(svc));
    }
  }
  EXPECT_EQ(receipts, 1);

  auto sb = receipt_signed_bytes(meter_title, *r);
  GS_ASSERT_OK(sb);
  EXPECT_EQ(to_hex(*sb), to_hex(signed_bytes));
  expect_signature(meter_key, *sb, r->signature);
}

void check_key_update(const test::VectorFile& f) {
  const auto* keys = example(f, "keys");
  const auto* s = example(f, "key_update");
  ASSERT_NE(keys, nullptr);
  ASSERT_NE(s, nullptr);
  const HostEcKey cmd_key = public_key(keys->get("command_key_1_public_point"));
  auto meter = HostEcKey::from_private(keys->get("meter_private_scalar"));
  GS_ASSERT_OK(meter);
  const HostEcKey meter_pub = public_key(keys->get("meter_public_point"));
  TestKey slot0 = make_key(keys->get("meter_active_key_slot0"));
  ASSERT_TRUE(slot0.eax.has_value());

  auto eph = HostEcKey::from_private(s->get("ephemeral_private_scalar"));
  GS_ASSERT_OK(eph);
  const Bytes z_expected = s->get("ecdh_z_x_coordinate");
  const Bytes context_expected = s->get("context");
  const Bytes new_key = s->get("derived_new_key_slot1");
  const Bytes update_data = s->get("mt2041_data");
  const Bytes signing_input = s->get("signing_input");
  const Bytes secured = s->get("secured_command_mode2");
  EXPECT_FALSE(s->get_text("note").empty());
  const Bytes response_new = s->get("response_mode2_under_new_key");

  // Both ends get the same Z.
  std::array<std::uint8_t, kEcScalarSize> z1{};
  std::array<std::uint8_t, kEcScalarSize> z2{};
  GS_ASSERT_OK(eph->ecdh_x(meter_pub, z1));
  auto eph_pub = HostEcKey::from_public(eph->public_point());
  GS_ASSERT_OK(eph_pub);
  GS_ASSERT_OK(meter->ecdh_x(*eph_pub, z2));
  EXPECT_EQ(hx(z1), to_hex(z_expected));
  EXPECT_EQ(hx(z2), to_hex(z_expected));

  // MT-2041 data.
  auto ku = decode_key_update_data(update_data);
  GS_ASSERT_OK(ku);
  EXPECT_EQ(ku->target_slot, 1);
  EXPECT_EQ(ku->key_type, kKeyTypeAes128EaxPrime);
  EXPECT_EQ(ku->ephemeral_public, eph->public_point());
  EXPECT_EQ(hx(encode_key_update_data(*ku)), to_hex(update_data));

  // Open the command (under slot 0), check its signature, then the key it carries.
  auto opened = open(secured, lookup(0, slot0));
  GS_ASSERT_OK(opened);
  auto m = decode(opened->wire);
  GS_ASSERT_OK(m);
  auto cmd = extract_authorization(*m);
  GS_ASSERT_OK(cmd);
  EXPECT_EQ(to_hex(cmd->signing_input), to_hex(signing_input));
  EXPECT_EQ(cmd->authorization.command_class, CommandClass::key_management);
  expect_signature(cmd_key, signing_input, cmd->authorization.signature);
  auto resealed = seal(ByteView(opened->wire), SecurityMode::encrypted, *slot0.eax);
  GS_ASSERT_OK(resealed);
  EXPECT_EQ(to_hex(*resealed), to_hex(secured));

  Services sv = services_of(opened->wire);
  ASSERT_EQ(sv.list.size(), 3u);
  auto ku2 = decode_key_update_service(sv.list[1]);
  GS_ASSERT_OK(ku2);
  EXPECT_EQ(*ku2, *ku);
  EXPECT_EQ(to_hex(encode_key_update_service(*ku)), to_hex(sv.list[1]));
  EXPECT_EQ(to_hex(sv.list[2]), to_hex(encode_full_read(kTableSignedReceipt)));

  // Context and key, on the meter's side (its own title is the command's called title).
  const Bytes meter_title = absolute_title(*m->called_ap_title);
  auto ctx_in = key_context_input(meter_title, ku->target_slot, ku->key_version);
  GS_ASSERT_OK(ctx_in);
  auto ctx = profile_key_context(*ctx_in);
  GS_ASSERT_OK(ctx);
  EXPECT_EQ(hx(*ctx), to_hex(context_expected));
  Block k_meter{};
  auto eph_from_wire = HostEcKey::from_public(ku->ephemeral_public);
  GS_ASSERT_OK(eph_from_wire);
  GS_ASSERT_OK(meter->derive_profile_key(*eph_from_wire, *ctx, k_meter));
  EXPECT_EQ(hx(k_meter), to_hex(new_key));
  Block k_host{};
  GS_ASSERT_OK(eph->derive_profile_key(meter_pub, *ctx, k_host));
  EXPECT_EQ(hx(k_host), to_hex(new_key));
  Block k_direct{};
  GS_ASSERT_OK(aes256_encrypt_block(z_expected, *ctx, k_direct));
  EXPECT_EQ(hx(k_direct), to_hex(new_key));

  // The meter's answer under the new key (key id 1) opens with the derived key only.
  TestKey slot1 = make_key(new_key);
  ASSERT_TRUE(slot1.eax.has_value());
  auto resp = open(response_new, lookup(1, slot1));
  GS_ASSERT_OK(resp);
  EXPECT_EQ(resp->key_id, 1);
  GS_EXPECT_ERR(open(response_new, lookup(1, slot0)), Errc::bad_mac);
}

void check_broadcast(const test::VectorFile& f) {
  const auto* keys = example(f, "keys");
  const auto* s = example(f, "demand_response_broadcast");
  ASSERT_NE(keys, nullptr);
  ASSERT_NE(s, nullptr);
  const HostEcKey cmd_key = public_key(keys->get("command_key_1_public_point"));
  const Bytes signing_input = s->get("signing_input");
  const Bytes wire = s->get("broadcast_mode0");

  auto m = decode(wire);
  GS_ASSERT_OK(m);
  auto cmd = extract_authorization(*m);
  GS_ASSERT_OK(cmd);
  EXPECT_EQ(to_hex(cmd->signing_input), to_hex(signing_input));
  EXPECT_EQ(cmd->authorization.command_class, CommandClass::demand_response);
  EXPECT_EQ(cmd->invocation_id, 0x0F4243u);
  expect_signature(cmd_key, signing_input, cmd->authorization.signature);

  // Rebuilt from its parts, the EPSEM is the same bytes.
  auto e = split_epsem(m->epsem, m->epsem_offset);
  GS_ASSERT_OK(e);
  EXPECT_EQ(e->control & kEpsemResponseMask, 2);  // never respond
  EXPECT_EQ(
      to_hex(build_authorized_epsem(e->control, std::nullopt, cmd->authorization, cmd->following)),
      to_hex(m->epsem));
}

void check_challenge(const test::VectorFile& f) {
  const auto* keys = example(f, "keys");
  const auto* s = example(f, "meter_challenge");
  ASSERT_NE(keys, nullptr);
  ASSERT_NE(s, nullptr);
  const HostEcKey cmd_key = public_key(keys->get("command_key_1_public_point"));
  const HostEcKey meter_key = public_key(keys->get("meter_public_point"));
  TestKey slot0 = make_key(keys->get("meter_active_key_slot0"));
  ASSERT_TRUE(slot0.eax.has_value());
  const Bytes challenge = s->get("challenge");
  const Bytes secured = s->get("secured_command_mode2");
  const Bytes answer_data = s->get("challenge_answer_data");
  const Bytes signed_bytes = s->get("challenge_signed_bytes");
  const Bytes response = s->get("response_mode2");

  auto opened = open(secured, lookup(0, slot0));
  GS_ASSERT_OK(opened);
  auto m = decode(opened->wire);
  GS_ASSERT_OK(m);
  auto cmd = extract_authorization(*m);
  GS_ASSERT_OK(cmd);
  EXPECT_EQ(cmd->authorization.command_class, CommandClass::key_management);
  expect_signature(cmd_key, cmd->signing_input, cmd->authorization.signature);
  auto resealed = seal(ByteView(opened->wire), SecurityMode::encrypted, *slot0.eax);
  GS_ASSERT_OK(resealed);
  EXPECT_EQ(to_hex(*resealed), to_hex(secured));

  Services sv = services_of(opened->wire);
  ASSERT_EQ(sv.list.size(), 3u);
  auto c = decode_challenge_write(sv.list[1]);
  GS_ASSERT_OK(c);
  EXPECT_EQ(hx(*c), to_hex(challenge));
  EXPECT_EQ(to_hex(encode_challenge_write(*c)), to_hex(sv.list[1]));
  EXPECT_EQ(to_hex(sv.list[2]), to_hex(encode_full_read(kTableChallenge)));

  auto a = decode_challenge_answer_data(answer_data);
  GS_ASSERT_OK(a);
  EXPECT_EQ(hx(a->challenge), to_hex(challenge));
  EXPECT_EQ(hx(encode_challenge_answer_data(*a)), to_hex(answer_data));

  auto resp = open(response, lookup(0, slot0));
  GS_ASSERT_OK(resp);
  auto rm = decode(resp->wire);
  GS_ASSERT_OK(rm);
  const Bytes meter_title = absolute_title(*rm->calling_ap_title);
  Services rs = services_of(resp->wire);
  int answers = 0;
  for (const auto& svc : rs.list) {
    auto got = decode_challenge_answer_response(svc);
    if (got.ok()) {
      ++answers;
      EXPECT_EQ(*got, *a);
      EXPECT_EQ(to_hex(encode_challenge_answer_response(*got)), to_hex(svc));
    }
  }
  EXPECT_EQ(answers, 1);
  auto sb = challenge_signed_bytes(meter_title, *a);
  GS_ASSERT_OK(sb);
  EXPECT_EQ(to_hex(*sb), to_hex(signed_bytes));
  expect_signature(meter_key, *sb, a->signature);
}

test::VectorFile load() {
  test::VectorFile f(kProfileFile);
  EXPECT_TRUE(f.ok()) << f.error();
  return f;
}

TEST(ProfileVectors, Keys) { check_keys(load()); }
TEST(ProfileVectors, Class2CommandSigningInputSignatureAndSealing) { check_class2(load()); }
TEST(ProfileVectors, SignedReceipt) { check_receipt(load()); }
TEST(ProfileVectors, KeyUpdateEcdhContextAndNewKey) { check_key_update(load()); }
TEST(ProfileVectors, DemandResponseBroadcast) { check_broadcast(load()); }
TEST(ProfileVectors, MeterChallenge) { check_challenge(load()); }

TEST(ProfileVectors, EveryFieldIsChecked) {
  test::VectorFile f = load();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f.size(), std::size(kExamples));
  for (const auto& s : f) {
    ASSERT_TRUE(s.has("Example")) << "block at line " << s.line() << " has no Example";
    const std::string name = s.get_text("Example");
    EXPECT_TRUE(std::find(std::begin(kExamples), std::end(kExamples), name) != std::end(kExamples))
        << "unknown example " << name;
  }
  check_keys(f);
  check_class2(f);
  check_receipt(f);
  check_key_update(f);
  check_broadcast(f);
  check_challenge(f);
  for (const auto& u : f.unused()) {
    ADD_FAILURE() << "profile.txt field never checked: " << u;
  }
}

// --- sample values for codec tests -----------------------------------------------------------

SignedAuthorization sample_authorization() {
  SignedAuthorization a;
  a.signer_key_id = 7;
  a.not_before = 0x6b2b4d80;
  a.not_after = 0x6b2b4eac;
  a.command_class = CommandClass::firmware;
  for (std::size_t i = 0; i < a.signature.size(); ++i) {
    a.signature[i] = static_cast<std::uint8_t>(i * 3 + 1);
  }
  return a;
}

Bytes sample_service() { return encode_authorization_service(sample_authorization()); }

// Re-computes the checksum of a partial-write / read-response after a test edit.
void fix_checksum(Bytes& service, std::size_t data_at) {
  service.back() = c1219_checksum(ByteView(service).subspan(data_at, service.size() - data_at - 1));
}

TEST(ProfileCodec, AuthorizationRoundTripAndLayout) {
  const SignedAuthorization a = sample_authorization();
  const auto data = encode_authorization_data(a);
  EXPECT_EQ(data[0], 1);
  EXPECT_EQ(data[1], 7);
  EXPECT_EQ(hx(ByteView(data).subspan(2, 8)), "6b2b4d806b2b4eac");
  EXPECT_EQ(data[10], 5);
  EXPECT_EQ(data[11], 0);
  EXPECT_EQ(hx(authorization_signed_prefix(a)), hx(ByteView(data).first(12)));
  auto back = decode_authorization_data(data);
  GS_ASSERT_OK(back);
  EXPECT_EQ(*back, a);

  const Bytes svc = encode_authorization_service(a);
  ASSERT_EQ(svc.size(), kAuthorizationServiceSize);
  EXPECT_EQ(hx(ByteView(svc).first(8)), "4f0ff8000000004c");
  EXPECT_EQ(svc.back(), c1219_checksum(data));
  auto back2 = decode_authorization_service(svc);
  GS_ASSERT_OK(back2);
  EXPECT_EQ(*back2, a);
  const Bytes wire = encode_authorization_service_wire(a);
  ASSERT_EQ(wire.size(), kAuthorizationWireSize);
  EXPECT_EQ(wire[0], 0x55);
  EXPECT_EQ(hx(ByteView(wire).subspan(1)), hx(svc));

  for (std::uint8_t c = 0; c <= kMaxCommandClass; ++c) {
    SignedAuthorization x = a;
    x.command_class = static_cast<CommandClass>(c);
    auto r = decode_authorization_service(encode_authorization_service(x));
    GS_ASSERT_OK(r);
    EXPECT_EQ(r->command_class, x.command_class);
    auto p = parse_command_class(command_class_name(x.command_class));
    GS_ASSERT_OK(p);
    EXPECT_EQ(*p, x.command_class);
  }
  GS_EXPECT_ERR(parse_command_class("reboot"), Errc::bad_value);
  GS_EXPECT_ERR(parse_command_class(""), Errc::bad_value);
}

TEST(ProfileCodec, AuthorizationServiceRejectsEveryTruncation) {
  const Bytes svc = sample_service();
  for (std::size_t n = 0; n < svc.size(); ++n) {
    auto r = decode_authorization_service(ByteView(svc).first(n));
    EXPECT_FALSE(r.ok()) << n;
  }
  Bytes longer = svc;
  longer.push_back(0);
  GS_EXPECT_ERR(decode_authorization_service(longer), Errc::bad_length);
}

TEST(ProfileCodec, AuthorizationServiceRejectsBadHeader) {
  {
    Bytes s = sample_service();
    s[0] = 0x40;  // full write
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_value);
  }
  {
    Bytes s = sample_service();
    s[2] = 0xF9;  // MT-2041
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_value);
  }
  {
    Bytes s = sample_service();
    s[1] = 0x00;  // ST-248 (not manufacturer)
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_value);
  }
  for (std::size_t pos : {3u, 4u, 5u}) {
    Bytes s = sample_service();
    s[pos] = 0x01;  // offset not 0
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_value);
  }
  {
    Bytes s = sample_service();
    s[7] = 0x4B;  // count 75
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_length);
  }
  {
    Bytes s = sample_service();
    s[6] = 0x01;  // count 0x014C
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_length);
  }
  {
    Bytes s = sample_service();
    s.back() ^= 0x01;
    auto r = decode_authorization_service(s);
    GS_EXPECT_ERR(r, Errc::bad_checksum);
    if (!r.ok()) {
      EXPECT_EQ(r.error().offset, s.size() - 1);
    }
  }
  {
    Bytes s = sample_service();
    s[20] ^= 0x01;  // data changed, checksum not
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_checksum);
  }
}

TEST(ProfileCodec, AuthorizationServiceRejectsBadFields) {
  for (std::uint8_t v : std::initializer_list<std::uint8_t>{0, 2, 0xFF}) {
    Bytes s = sample_service();
    s[8] = v;  // version
    fix_checksum(s, 8);
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::unsupported);
  }
  for (std::uint8_t c : std::initializer_list<std::uint8_t>{7, 8, 0x80, 0xFF}) {
    Bytes s = sample_service();
    s[8 + 10] = c;
    fix_checksum(s, 8);
    auto r = decode_authorization_service(s);
    GS_EXPECT_ERR(r, Errc::bad_value);
    if (!r.ok()) {
      EXPECT_EQ(r.error().offset, 18u);
    }
  }
  for (std::uint8_t v : std::initializer_list<std::uint8_t>{1, 0x80}) {
    Bytes s = sample_service();
    s[8 + 11] = v;  // reserved
    fix_checksum(s, 8);
    GS_EXPECT_ERR(decode_authorization_service(s), Errc::bad_value);
  }
  // The checksum fix itself is sound: an unmodified re-check still decodes.
  Bytes ok = sample_service();
  fix_checksum(ok, 8);
  EXPECT_TRUE(decode_authorization_service(ok).ok());
}

TEST(ProfileCodec, AuthorizationDataRejectsWrongSizes) {
  const auto data = encode_authorization_data(sample_authorization());
  for (std::size_t n : {0u, 1u, 12u, 75u}) {
    GS_EXPECT_ERR(decode_authorization_data(ByteView(data).first(n)), Errc::bad_length);
  }
  Bytes more(data.begin(), data.end());
  more.push_back(0);
  GS_EXPECT_ERR(decode_authorization_data(more), Errc::bad_length);
}

TEST(ProfileCodec, GenericTableServices) {
  const Bytes data = hex("0102030405");
  auto pw = encode_partial_write(0x0123, data);
  GS_ASSERT_OK(pw);
  EXPECT_EQ(to_hex(*pw), "4f012300000000050102030405f1");
  auto back = decode_partial_write(*pw, 0x0123, 5);
  GS_ASSERT_OK(back);
  EXPECT_EQ(to_hex(*back), to_hex(data));
  GS_EXPECT_ERR(decode_partial_write(*pw, 0x0124, 5), Errc::bad_value);
  GS_EXPECT_ERR(decode_partial_write(*pw, 0x0123, 4), Errc::bad_length);
  Bytes trailing = *pw;
  trailing.push_back(0);
  GS_EXPECT_ERR(decode_partial_write(trailing, 0x0123, 5), Errc::trailing_data);
  for (std::size_t n = 0; n < pw->size(); ++n) {
    EXPECT_FALSE(decode_partial_write(ByteView(*pw).first(n), 0x0123, 5).ok()) << n;
  }
  Bytes too_big(0x10000);
  GS_EXPECT_ERR(encode_partial_write(0x0123, too_big), Errc::too_large);
  GS_EXPECT_ERR(encode_read_response(too_big), Errc::too_large);
  auto empty = encode_partial_write(0x0FFB, {});
  GS_ASSERT_OK(empty);
  EXPECT_EQ(to_hex(*empty), "4f0ffb000000000000");

  EXPECT_EQ(to_hex(encode_full_read(0x0FFA)), "300ffa");

  auto rr = encode_read_response(data);
  GS_ASSERT_OK(rr);
  EXPECT_EQ(to_hex(*rr), "0000050102030405f1");
  auto rb = decode_read_response(*rr, 5);
  GS_ASSERT_OK(rb);
  EXPECT_EQ(to_hex(*rb), to_hex(data));
  for (std::size_t n = 0; n < rr->size(); ++n) {
    EXPECT_FALSE(decode_read_response(ByteView(*rr).first(n), 5).ok()) << n;
  }
  Bytes bad = *rr;
  bad[0] = 0x03;  // isc
  GS_EXPECT_ERR(decode_read_response(bad, 5), Errc::bad_value);
  GS_EXPECT_ERR(decode_read_response(hex("03"), 5), Errc::bad_value);
  bad = *rr;
  bad.back() ^= 0xFF;
  GS_EXPECT_ERR(decode_read_response(bad, 5), Errc::bad_checksum);
  bad = *rr;
  bad.push_back(0);
  GS_EXPECT_ERR(decode_read_response(bad, 5), Errc::trailing_data);
  GS_EXPECT_ERR(decode_read_response(*rr, 6), Errc::bad_length);
}

TEST(ProfileCodec, InvocationIdValue) {
  auto v = invocation_id_value(hex("0f4241"));
  GS_ASSERT_OK(v);
  EXPECT_EQ(*v, 0x0F4241u);
  v = invocation_id_value(hex("00"));
  GS_ASSERT_OK(v);
  EXPECT_EQ(*v, 0u);
  v = invocation_id_value(hex("0080"));
  GS_ASSERT_OK(v);
  EXPECT_EQ(*v, 0x80u);
  v = invocation_id_value(hex("000000000f4241"));  // non-minimal, still the same id
  GS_ASSERT_OK(v);
  EXPECT_EQ(*v, 0x0F4241u);
  v = invocation_id_value(hex("00ffffffffffffffff"));
  GS_ASSERT_OK(v);
  EXPECT_EQ(*v, 0xFFFFFFFFFFFFFFFFu);
  GS_EXPECT_ERR(invocation_id_value({}), Errc::bad_length);
  GS_EXPECT_ERR(invocation_id_value(hex("80")), Errc::bad_value);
  GS_EXPECT_ERR(invocation_id_value(hex("ff")), Errc::bad_value);
  GS_EXPECT_ERR(invocation_id_value(hex("010000000000000000")), Errc::too_large);
  GS_EXPECT_ERR(invocation_id_value(hex("7fffffffffffffffffff")), Errc::too_large);
}

TEST(ProfileCodec, SigningInputLayout) {
  const SignedAuthorization a = sample_authorization();
  const Bytes called = hex("607c86f75401160007a112");
  const Bytes calling = hex("607c86f754011600010a");
  const Bytes following = hex("03300ffa");
  SigningHeader h{called, calling, 0x0102030405060708, std::nullopt};
  auto si = authorization_signing_input(h, a, following);
  GS_ASSERT_OK(si);
  EXPECT_EQ(to_hex(*si),
            "47534131"
            "0b" +
                to_hex(called) + "0a" + to_hex(calling) + "0102030405060708" +
                hx(authorization_signed_prefix(a)) + "03300ffa");
  h.ed_class = EdClass{'G', 'S', 'I', 'M'};
  si = authorization_signing_input(h, a, following);
  GS_ASSERT_OK(si);
  EXPECT_EQ(to_hex(*si),
            "47534131"
            "0b" +
                to_hex(called) + "0a" + to_hex(calling) +
                "0102030405060708"
                "4753494d" +
                hx(authorization_signed_prefix(a)) + "03300ffa");
  // The signature is not part of its own input.
  SignedAuthorization b = a;
  b.signature.fill(0);
  auto si2 = authorization_signing_input(h, b, following);
  GS_ASSERT_OK(si2);
  EXPECT_EQ(*si, *si2);

  // Relative and absolute forms of the same title give the same input.
  const Bytes rel = hex("07a112");
  const Bytes rel2 = hex("010a");
  auto r1 = authorization_signing_input(ApTitle{TitleForm::relative, rel},
                                        ApTitle{TitleForm::relative, rel2}, 0x0102030405060708,
                                        h.ed_class, a, following);
  auto r2 = authorization_signing_input(ApTitle{TitleForm::absolute, called},
                                        ApTitle{TitleForm::absolute, calling}, 0x0102030405060708,
                                        h.ed_class, a, following);
  GS_ASSERT_OK(r1);
  GS_ASSERT_OK(r2);
  EXPECT_EQ(to_hex(*r1), to_hex(*si));
  EXPECT_EQ(to_hex(*r2), to_hex(*si));

  // Title lengths must fit one byte and not be empty.
  const Bytes long_title(256, 0x01);
  GS_EXPECT_ERR(authorization_signing_input(SigningHeader{{}, calling, 1, std::nullopt}, a, {}),
                Errc::bad_length);
  GS_EXPECT_ERR(authorization_signing_input(SigningHeader{called, {}, 1, std::nullopt}, a, {}),
                Errc::bad_length);
  GS_EXPECT_ERR(
      authorization_signing_input(SigningHeader{long_title, calling, 1, std::nullopt}, a, {}),
      Errc::bad_length);
  GS_EXPECT_ERR(key_context_input({}, 1, 1), Errc::bad_length);
  GS_EXPECT_ERR(key_context_input(long_title, 1, 1), Errc::bad_length);
  GS_EXPECT_ERR(receipt_signed_bytes({}, SignedReceipt{}), Errc::bad_length);
  GS_EXPECT_ERR(challenge_signed_bytes(long_title, ChallengeAnswer{}), Errc::bad_length);
}

TEST(ProfileCodec, BuildAuthorizedEpsem) {
  const SignedAuthorization a = sample_authorization();
  const Bytes following = hex("03300ffa");
  Bytes e = build_authorized_epsem(0x8A, std::nullopt, a, following);  // mode bits cleared
  ASSERT_EQ(e.size(), 1 + kAuthorizationWireSize + following.size());
  EXPECT_EQ(e[0], 0x82);
  EXPECT_EQ(e[1], 0x55);
  e = build_authorized_epsem(0x80, EdClass{'G', 'S', 'I', 'M'}, a, following);
  EXPECT_EQ(e[0], 0x90);
  EXPECT_EQ(hx(ByteView(e).subspan(1, 4)), "4753494d");
  e = build_authorized_epsem(0x90, std::nullopt, a, following);
  EXPECT_EQ(e[0], 0x80);  // ED bit follows ed_class
}

// A mode-0 message around an EPSEM, for the extract tests.
Bytes message_with_epsem(ByteView epsem) {
  static const Bytes called = hex("07a112");
  static const Bytes calling = hex("0109");
  static const Bytes a8 = hex("0f4241");
  Message m;
  m.called_ap_title = ApTitle{TitleForm::relative, called};
  m.calling_ap_title = ApTitle{TitleForm::relative, calling};
  m.calling_ap_invocation_id = ByteView(a8);
  m.epsem = epsem;
  auto w = encode(m);
  if (!w.ok()) {
    ADD_FAILURE() << "encode: " << w.error().message();
    return {};
  }
  return *w;
}

TEST(ProfileExtract, FindsAndRebuilds) {
  const SignedAuthorization a = sample_authorization();
  const Bytes following = hex("0b40000700051a00000200e403300ffa");
  const EdClass ed{'G', 'S', 'I', 'M'};
  const Bytes wire = message_with_epsem(build_authorized_epsem(0x80, ed, a, following));
  auto m = decode(wire);
  GS_ASSERT_OK(m);
  auto cmd = extract_authorization(*m);
  GS_ASSERT_OK(cmd);
  EXPECT_EQ(cmd->authorization, a);
  EXPECT_EQ(to_hex(cmd->following), to_hex(following));
  ASSERT_TRUE(cmd->ed_class.has_value());
  EXPECT_EQ(*cmd->ed_class, ed);
  auto expect = authorization_signing_input(*m->called_ap_title, *m->calling_ap_title, 0x0F4241, ed,
                                            a, following);
  GS_ASSERT_OK(expect);
  EXPECT_EQ(to_hex(cmd->signing_input), to_hex(*expect));
  EXPECT_EQ(wire[cmd->service_offset], 0x4F);

  // Only the MT-2040 service, nothing after it.
  const Bytes alone = message_with_epsem(build_authorized_epsem(0x80, std::nullopt, a, {}));
  auto m2 = decode(alone);
  GS_ASSERT_OK(m2);
  auto cmd2 = extract_authorization(*m2);
  GS_ASSERT_OK(cmd2);
  EXPECT_TRUE(cmd2->following.empty());
}

TEST(ProfileExtract, RejectsMisplacedOrDuplicatedAuthorization) {
  const SignedAuthorization a = sample_authorization();
  {  // not first
    Bytes epsem = {0x80, 0x03, 0x30, 0x0F, 0xFA};
    const Bytes svc = encode_authorization_service_wire(a);
    epsem.insert(epsem.end(), svc.begin(), svc.end());
    const Bytes wire = message_with_epsem(epsem);
    auto m = decode(wire);
    GS_ASSERT_OK(m);
    GS_EXPECT_ERR(extract_authorization(*m), Errc::missing_element);
  }
  {  // absent
    const Bytes wire = message_with_epsem(hex("8003300ffa"));
    auto m = decode(wire);
    GS_ASSERT_OK(m);
    GS_EXPECT_ERR(extract_authorization(*m), Errc::missing_element);
  }
  {  // twice
    const Bytes svc = encode_authorization_service_wire(a);
    const Bytes wire = message_with_epsem(build_authorized_epsem(0x80, std::nullopt, a, svc));
    auto m = decode(wire);
    GS_ASSERT_OK(m);
    GS_EXPECT_ERR(extract_authorization(*m), Errc::bad_value);
  }
  {  // a later full write of MT-2040
    const Bytes wire = message_with_epsem(
        build_authorized_epsem(0x80, std::nullopt, a, hex("0740 0ff8 0001 01 ff")));
    auto m = decode(wire);
    GS_ASSERT_OK(m);
    GS_EXPECT_ERR(extract_authorization(*m), Errc::bad_value);
  }
  {  // first service writes MT-2040 with a bad checksum: named at its offset
    Bytes epsem = build_authorized_epsem(0x80, std::nullopt, a, {});
    epsem.back() ^= 0x01;
    const Bytes wire = message_with_epsem(epsem);
    auto m = decode(wire);
    GS_ASSERT_OK(m);
    auto r = extract_authorization(*m);
    GS_EXPECT_ERR(r, Errc::bad_checksum);
    if (!r.ok()) {
      EXPECT_EQ(r.error().offset, wire.size() - 1);
    }
  }
  {  // first service is a full write of MT-2040 (wrong form)
    Bytes epsem = build_authorized_epsem(0x80, std::nullopt, a, {});
    epsem[2] = 0x40;
    const Bytes wire = message_with_epsem(epsem);
    auto m = decode(wire);
    GS_ASSERT_OK(m);
    GS_EXPECT_ERR(extract_authorization(*m), Errc::bad_value);
  }
}

TEST(ProfileExtract, RejectsMissingHeaderFieldsAndSecuredMessages) {
  const SignedAuthorization a = sample_authorization();
  const Bytes epsem = build_authorized_epsem(0x80, std::nullopt, a, hex("03300ffa"));
  const Bytes wire = message_with_epsem(epsem);
  auto good = decode(wire);
  GS_ASSERT_OK(good);
  ASSERT_TRUE(extract_authorization(*good).ok());
  {
    Message m = *good;
    m.called_ap_title.reset();
    GS_EXPECT_ERR(extract_authorization(m), Errc::missing_element);
  }
  {
    Message m = *good;
    m.calling_ap_title.reset();
    GS_EXPECT_ERR(extract_authorization(m), Errc::missing_element);
  }
  {
    Message m = *good;
    m.calling_ap_invocation_id.reset();
    GS_EXPECT_ERR(extract_authorization(m), Errc::missing_element);
  }
  {
    Message m = *good;
    const Bytes neg = hex("ff");
    m.calling_ap_invocation_id = ByteView(neg);
    GS_EXPECT_ERR(extract_authorization(m), Errc::bad_value);
  }
  // Modes 1 and 2 must be opened first.
  for (std::uint8_t control : std::initializer_list<std::uint8_t>{0x84, 0x88}) {
    Bytes e = epsem;
    e[0] = control;
    e.insert(e.end(), {1, 2, 3, 4});  // a MAC
    Message m = *good;
    m.epsem = e;
    m.epsem_offset = 0;
    GS_EXPECT_ERR(extract_authorization(m), Errc::unsupported);
  }
}

// Every single-byte change and every truncation of a signed command: no crash, and whenever the
// command still parses, its signing input no longer verifies unless only unsigned bytes changed.
TEST(ProfileExtract, SurvivesMutationsOfSignedCommands) {
  test::VectorFile f = load();
  const auto* keys = example(f, "keys");
  const auto* c2 = example(f, "class2_command");
  const auto* bc = example(f, "demand_response_broadcast");
  ASSERT_NE(keys, nullptr);
  ASSERT_NE(c2, nullptr);
  ASSERT_NE(bc, nullptr);
  const HostEcKey cmd_key = public_key(keys->get("command_key_1_public_point"));
  for (const Bytes& wire : {c2->get("same_command_opened_mode0"), bc->get("broadcast_mode0")}) {
    auto m0 = decode(wire);
    GS_ASSERT_OK(m0);
    auto ref = extract_authorization(*m0);
    GS_ASSERT_OK(ref);
    int parsed = 0;
    for (std::size_t i = 0; i < wire.size(); ++i) {
      for (std::uint8_t x : std::initializer_list<std::uint8_t>{0x01, 0x80, 0xFF}) {
        Bytes w = wire;
        w[i] ^= x;
        auto m = decode(w);
        if (!m.ok()) {
          continue;
        }
        auto cmd = extract_authorization(*m);
        if (!cmd.ok()) {
          continue;
        }
        ++parsed;
        auto d = sha256(cmd->signing_input);
        ASSERT_TRUE(d.ok());
        const bool same_input = cmd->signing_input == ref->signing_input;
        const bool same_sig = cmd->authorization.signature == ref->authorization.signature;
        EXPECT_EQ(cmd_key.verify(*d, cmd->authorization.signature).ok(), same_input && same_sig)
            << "byte " << i << " ^ " << int{x};
      }
    }
    EXPECT_GT(parsed, 0);
    for (std::size_t n = 0; n < wire.size(); ++n) {
      auto m = decode(ByteView(wire).first(n));
      if (m.ok()) {
        (void)extract_authorization(*m);
      }
    }
  }
}

TEST(ProfileCodec, KeyUpdateRoundTripAndRejects) {
  auto eph = HostEcKey::generate();
  GS_ASSERT_OK(eph);
  KeyUpdate k;
  k.target_slot = 3;
  k.key_version = 0x01020304;
  k.ephemeral_public = eph->public_point();
  const auto data = encode_key_update_data(k);
  EXPECT_EQ(hx(ByteView(data).first(7)), "01030001020304");
  auto back = decode_key_update_data(data);
  GS_ASSERT_OK(back);
  EXPECT_EQ(*back, k);
  const Bytes svc = encode_key_update_service(k);
  ASSERT_EQ(svc.size(), 81u);
  EXPECT_EQ(hx(ByteView(svc).first(8)), "4f0ff90000000048");
  auto back2 = decode_key_update_service(svc);
  GS_ASSERT_OK(back2);
  EXPECT_EQ(*back2, k);

  for (std::size_t n = 0; n < svc.size(); ++n) {
    EXPECT_FALSE(decode_key_update_service(ByteView(svc).first(n)).ok()) << n;
  }
  GS_EXPECT_ERR(decode_key_update_service(sample_service()), Errc::bad_value);  // MT-2040
  Bytes d(data.begin(), data.end());
  d[0] = 2;
  GS_EXPECT_ERR(decode_key_update_data(d), Errc::unsupported);
  d = Bytes(data.begin(), data.end());
  d[2] = 1;  // key type
  GS_EXPECT_ERR(decode_key_update_data(d), Errc::unsupported);
  for (std::uint8_t prefix : std::initializer_list<std::uint8_t>{0x00, 0x02, 0x03, 0x06}) {
    d = Bytes(data.begin(), data.end());
    d[7] = prefix;
    GS_EXPECT_ERR(decode_key_update_data(d), Errc::bad_value);
  }
  GS_EXPECT_ERR(decode_key_update_data(ByteView(data).first(71)), Errc::bad_length);
  Bytes s2 = svc;
  s2[8] = 2;  // version inside the service: offset points into the service
  fix_checksum(s2, 8);
  auto r = decode_key_update_service(s2);
  GS_EXPECT_ERR(r, Errc::unsupported);
  if (!r.ok()) {
    EXPECT_EQ(r.error().offset, 8u);
  }

  auto ctx = key_context_input(hex("607c86f75401160007a112"), 1, 2);
  GS_ASSERT_OK(ctx);
  EXPECT_EQ(to_hex(*ctx), "47534b310b607c86f75401160007a1120100000002");
}

TEST(ProfileCodec, ReceiptRoundTripAndRejects) {
  SignedReceipt r;
  r.invocation_id = 0x1122334455667788;
  r.result = 4;
  r.executed_at = 0x6b2b4d82;
  r.command_digest.fill(0xAB);
  r.signature.fill(0xCD);
  const auto data = encode_receipt_data(r);
  EXPECT_EQ(hx(ByteView(data).first(14)),
            "01"
            "1122334455667788"
            "04"
            "6b2b4d82");
  auto back = decode_receipt_data(data);
  GS_ASSERT_OK(back);
  EXPECT_EQ(*back, r);
  const Bytes svc = encode_receipt_response(r);
  ASSERT_EQ(svc.size(), 114u);
  EXPECT_EQ(hx(ByteView(svc).first(3)), "00006e");
  auto back2 = decode_receipt_response(svc);
  GS_ASSERT_OK(back2);
  EXPECT_EQ(*back2, r);
  auto sb = receipt_signed_bytes(hex("0102"), r);
  GS_ASSERT_OK(sb);
  EXPECT_EQ(to_hex(*sb),
            "4753523102"
            "0102" +
                hx(ByteView(data).first(46)));

  for (std::size_t n = 0; n < svc.size(); ++n) {
    EXPECT_FALSE(decode_receipt_response(ByteView(svc).first(n)).ok()) << n;
  }
  Bytes d(data.begin(), data.end());
  d[0] = 0;
  GS_EXPECT_ERR(decode_receipt_data(d), Errc::unsupported);
  GS_EXPECT_ERR(decode_receipt_data(ByteView(data).first(109)), Errc::bad_length);
  Bytes s2 = svc;
  s2[50] ^= 1;
  GS_EXPECT_ERR(decode_receipt_response(s2), Errc::bad_checksum);
  s2 = svc;
  s2[0] = 0x0B;  // sme
  GS_EXPECT_ERR(decode_receipt_response(s2), Errc::bad_value);
  s2 = svc;
  s2[3] = 2;
  fix_checksum(s2, 3);
  auto e = decode_receipt_response(s2);
  GS_EXPECT_ERR(e, Errc::unsupported);
  if (!e.ok()) {
    EXPECT_EQ(e.error().offset, 3u);
  }
}

TEST(ProfileCodec, ChallengeRoundTripAndRejects) {
  ChallengeAnswer a;
  for (std::size_t i = 0; i < a.challenge.size(); ++i) {
    a.challenge[i] = static_cast<std::uint8_t>(i);
  }
  a.meter_time = 0x6b2b4d83;
  a.signature.fill(0x5A);
  const auto data = encode_challenge_answer_data(a);
  auto back = decode_challenge_answer_data(data);
  GS_ASSERT_OK(back);
  EXPECT_EQ(*back, a);
  const Bytes svc = encode_challenge_answer_response(a);
  ASSERT_EQ(svc.size(), 89u);
  EXPECT_EQ(hx(ByteView(svc).first(3)), "000055");
  auto back2 = decode_challenge_answer_response(svc);
  GS_ASSERT_OK(back2);
  EXPECT_EQ(*back2, a);
  auto sb = challenge_signed_bytes(hex("0a0b0c"), a);
  GS_ASSERT_OK(sb);
  EXPECT_EQ(to_hex(*sb), "47534331030a0b0c" + hx(a.challenge) + "6b2b4d83");

  const Bytes w = encode_challenge_write(a.challenge);
  EXPECT_EQ(hx(ByteView(w).first(8)), "4f0ffb0000000010");
  auto c = decode_challenge_write(w);
  GS_ASSERT_OK(c);
  EXPECT_EQ(*c, a.challenge);
  for (std::size_t n = 0; n < w.size(); ++n) {
    EXPECT_FALSE(decode_challenge_write(ByteView(w).first(n)).ok()) << n;
  }
  for (std::size_t n = 0; n < svc.size(); ++n) {
    EXPECT_FALSE(decode_challenge_answer_response(ByteView(svc).first(n)).ok()) << n;
  }
  Bytes d(data.begin(), data.end());
  d[0] = 3;
  GS_EXPECT_ERR(decode_challenge_answer_data(d), Errc::unsupported);
  GS_EXPECT_ERR(decode_challenge_answer_data(ByteView(data).first(84)), Errc::bad_length);
  // A receipt is not a challenge answer and vice versa.
  GS_EXPECT_ERR(decode_challenge_answer_response(encode_receipt_response(SignedReceipt{})),
                Errc::bad_length);
  GS_EXPECT_ERR(decode_receipt_response(svc), Errc::bad_length);
  GS_EXPECT_ERR(decode_challenge_write(encode_key_update_service(KeyUpdate{})), Errc::bad_value);
}

TEST(ProfileCodec, CommandKeyReplacementRoundTripAndRejects) {
  CommandKeyReplacement r;
  r.trust_slot = 1;
  r.key_id = 3;
  r.sequence = 0x01020304;
  r.issued_at = 0x6a000000;
  r.public_key[0] = 0x04;
  for (std::size_t i = 1; i < r.public_key.size(); ++i) {
    r.public_key[i] = static_cast<std::uint8_t>(i);
  }
  for (std::size_t i = 0; i < r.signature.size(); ++i) {
    r.signature[i] = static_cast<std::uint8_t>(0xA0 + i);
  }
  const auto data = encode_replacement_data(r);
  EXPECT_EQ(to_hex(ByteView(data).first(12)), "0101030001020304" "6a000000");
  auto back = decode_replacement_data(data);
  GS_ASSERT_OK(back);
  EXPECT_EQ(*back, r);

  const Bytes w = encode_replacement_write(r);
  ASSERT_EQ(w.size(), 150U);
  EXPECT_EQ(to_hex(ByteView(w).first(9)), "4f0ffc000000008d01");
  auto back2 = decode_replacement_write(w);
  GS_ASSERT_OK(back2);
  EXPECT_EQ(*back2, r);
  for (std::size_t n = 0; n < w.size(); ++n) {
    EXPECT_FALSE(decode_replacement_write(ByteView(w).first(n)).ok()) << n;
  }
  Bytes bad_sum = w;
  bad_sum.back() ^= 1;
  EXPECT_FALSE(decode_replacement_write(bad_sum).ok());

  // What gs-revocation signs: the tag and the 77 bytes before the signature, nothing after.
  const Bytes sb = replacement_signed_bytes(r);
  ASSERT_EQ(sb.size(), 4U + kReplacementSignedDataSize);
  EXPECT_EQ(to_hex(ByteView(sb).first(16)), "47535631" "0101030001020304" "6a000000");
  CommandKeyReplacement other_sig = r;
  other_sig.signature[0] ^= 1;
  EXPECT_EQ(replacement_signed_bytes(other_sig), sb);
  CommandKeyReplacement other_slot = r;
  other_slot.trust_slot = 0;
  EXPECT_NE(replacement_signed_bytes(other_slot), sb);

  auto with = [&](std::size_t at, std::uint8_t v) {
    Bytes d(data.begin(), data.end());
    d[at] = v;
    return d;
  };
  GS_EXPECT_ERR(decode_replacement_data(with(0, 2)), Errc::unsupported);
  GS_EXPECT_ERR(decode_replacement_data(with(1, 2)), Errc::bad_value);
  GS_EXPECT_ERR(decode_replacement_data(with(2, 0)), Errc::bad_value);
  GS_EXPECT_ERR(decode_replacement_data(with(3, 1)), Errc::bad_value);
  Bytes zero_seq(data.begin(), data.end());
  std::fill_n(zero_seq.begin() + 4, 4, 0);
  GS_EXPECT_ERR(decode_replacement_data(zero_seq), Errc::bad_value);
  GS_EXPECT_ERR(decode_replacement_data(with(12, 0x02)), Errc::bad_value);
  GS_EXPECT_ERR(decode_replacement_data(ByteView(data).first(140)), Errc::bad_length);
  // Other profile writes are not replacements.
  GS_EXPECT_ERR(decode_replacement_write(encode_key_update_service(KeyUpdate{})), Errc::bad_value);
}

// --- host ECDSA / ECDH / hashes ---------------------------------------------------------------

// P-256 group order n.
const char kOrderHex[] = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";

// n - x for a 32-byte big-endian x < n.
Bytes order_minus(ByteView x) {
  Bytes n = hex(kOrderHex);
  Bytes out(32);
  int borrow = 0;
  for (int i = 31; i >= 0; --i) {
    int v = n[i] - x[i] - borrow;
    borrow = v < 0 ? 1 : 0;
    out[i] = static_cast<std::uint8_t>(v + (borrow ? 256 : 0));
  }
  return out;
}

TEST(HostEcdsa, Sha256AndAes256KnownAnswers) {
  auto d = sha256(as_bytes("abc"));
  GS_ASSERT_OK(d);
  EXPECT_EQ(hx(*d), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  auto e = sha256({});
  GS_ASSERT_OK(e);
  EXPECT_EQ(hx(*e), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  // FIPS-197 C.3.
  const Bytes key = hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
  Block in{};
  const Bytes pt = hex("00112233445566778899aabbccddeeff");
  std::copy(pt.begin(), pt.end(), in.begin());
  Block out{};
  GS_ASSERT_OK(aes256_encrypt_block(key, in, out));
  EXPECT_EQ(hx(out), "8ea2b7ca516745bfeafc49904b496089");
  GS_EXPECT_ERR(aes256_encrypt_block(ByteView(key).first(16), in, out), Errc::invalid_argument);
  GS_EXPECT_ERR(aes256_encrypt_block(Bytes(33), in, out), Errc::invalid_argument);
}

TEST(HostEcdsa, SignVerifyGenerateExport) {
  auto k = HostEcKey::generate();
  GS_ASSERT_OK(k);
  EXPECT_TRUE(k->has_private());
  EXPECT_EQ(k->public_point()[0], 0x04);
  auto d = sha256(as_bytes("gridseal"));
  GS_ASSERT_OK(d);
  auto sig = k->sign(*d);
  GS_ASSERT_OK(sig);
  expect_signature(*k, as_bytes("gridseal"), *sig);
  auto sig2 = k->sign(*d);
  GS_ASSERT_OK(sig2);
  EXPECT_NE(*sig, *sig2);  // randomized
  EXPECT_TRUE(k->verify(*d, *sig2).ok());

  std::array<std::uint8_t, kEcScalarSize> scalar{};
  GS_ASSERT_OK(k->export_private(scalar));
  auto again = HostEcKey::from_private(scalar);
  secure_zero(scalar.data(), scalar.size());
  GS_ASSERT_OK(again);
  EXPECT_EQ(again->public_point(), k->public_point());
  auto pub = HostEcKey::from_public(k->public_point());
  GS_ASSERT_OK(pub);
  EXPECT_FALSE(pub->has_private());
  EXPECT_TRUE(pub->verify(*d, *sig).ok());
  GS_EXPECT_ERR(pub->sign(*d), Errc::invalid_argument);
  GS_EXPECT_ERR(pub->export_private(scalar), Errc::invalid_argument);
  std::array<std::uint8_t, kEcScalarSize> z{};
  GS_EXPECT_ERR(pub->ecdh_x(*k, z), Errc::invalid_argument);

  // Another key does not verify it.
  auto other = HostEcKey::generate();
  GS_ASSERT_OK(other);
  GS_EXPECT_ERR(other->verify(*d, *sig), Errc::bad_signature);

  // Moved-from keys fail cleanly.
  HostEcKey moved = std::move(*pub);
  EXPECT_TRUE(moved.verify(*d, *sig).ok());
  GS_EXPECT_ERR(pub->verify(*d, *sig), Errc::invalid_argument);  // NOLINT(bugprone-use-after-move)
}

TEST(HostEcdsa, VerifyEdgeCases) {
  auto k = HostEcKey::generate();
  GS_ASSERT_OK(k);
  auto d = sha256(as_bytes("edge"));
  GS_ASSERT_OK(d);
  auto sig = k->sign(*d);
  GS_ASSERT_OK(sig);
  // High-S: (r, n - s) is an equally valid ECDSA signature.
  Bytes high(sig->begin(), sig->end());
  const Bytes s_neg = order_minus(ByteView(*sig).subspan(32));
  std::copy(s_neg.begin(), s_neg.end(), high.begin() + 32);
  EXPECT_TRUE(k->verify(*d, high).ok());
  // r or s zero, or equal to n.
  Bytes bad(sig->begin(), sig->end());
  std::fill(bad.begin(), bad.begin() + 32, 0);
  GS_EXPECT_ERR(k->verify(*d, bad), Errc::bad_signature);
  bad = Bytes(sig->begin(), sig->end());
  std::fill(bad.begin() + 32, bad.end(), 0);
  GS_EXPECT_ERR(k->verify(*d, bad), Errc::bad_signature);
  const Bytes n = hex(kOrderHex);
  bad = Bytes(sig->begin(), sig->end());
  std::copy(n.begin(), n.end(), bad.begin() + 32);
  GS_EXPECT_ERR(k->verify(*d, bad), Errc::bad_signature);
  bad = Bytes(64, 0xFF);
  GS_EXPECT_ERR(k->verify(*d, bad), Errc::bad_signature);
  // Wrong sizes.
  GS_EXPECT_ERR(k->verify(ByteView(*d).first(31), *sig), Errc::invalid_argument);
  GS_EXPECT_ERR(k->verify(*d, ByteView(*sig).first(63)), Errc::invalid_argument);
  Bytes longer(sig->begin(), sig->end());
  longer.push_back(0);
  GS_EXPECT_ERR(k->verify(*d, longer), Errc::invalid_argument);
  GS_EXPECT_ERR(k->sign(Bytes(20)), Errc::invalid_argument);
  GS_EXPECT_ERR(k->sign(Bytes(33)), Errc::invalid_argument);
}

TEST(HostEcdsa, RejectsBadKeys) {
  GS_EXPECT_ERR(HostEcKey::from_private(Bytes(32, 0)), Errc::bad_value);
  GS_EXPECT_ERR(HostEcKey::from_private(hex(kOrderHex)), Errc::bad_value);
  GS_EXPECT_ERR(HostEcKey::from_private(Bytes(32, 0xFF)), Errc::bad_value);
  GS_EXPECT_ERR(HostEcKey::from_private(Bytes(31, 1)), Errc::invalid_argument);
  GS_EXPECT_ERR(HostEcKey::from_private(Bytes(33, 1)), Errc::invalid_argument);
  Bytes n_minus_1 = hex(kOrderHex);
  n_minus_1.back() -= 1;
  EXPECT_TRUE(HostEcKey::from_private(n_minus_1).ok());
  Bytes one(32, 0);
  one.back() = 1;
  auto g = HostEcKey::from_private(one);  // the generator
  GS_ASSERT_OK(g);
  EXPECT_EQ(hx(ByteView(g->public_point()).subspan(1, 32)),
            "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296");

  auto k = HostEcKey::generate();
  GS_ASSERT_OK(k);
  const EcPoint p = k->public_point();
  GS_EXPECT_ERR(HostEcKey::from_public(ByteView(p).first(64)), Errc::invalid_argument);
  GS_EXPECT_ERR(HostEcKey::from_public(ByteView(p).first(33)), Errc::invalid_argument);
  GS_EXPECT_ERR(HostEcKey::from_public({}), Errc::invalid_argument);
  for (std::uint8_t prefix : std::initializer_list<std::uint8_t>{0x00, 0x02, 0x03, 0x06, 0x07}) {
    EcPoint q = p;
    q[0] = prefix;
    GS_EXPECT_ERR(HostEcKey::from_public(q), Errc::bad_value);
  }
  EcPoint off = p;
  off[64] ^= 0x01;  // y changed: not on the curve
  GS_EXPECT_ERR(HostEcKey::from_public(off), Errc::bad_value);
  EcPoint zero{};
  zero[0] = 0x04;
  GS_EXPECT_ERR(HostEcKey::from_public(zero), Errc::bad_value);
  EcPoint big{};
  big.fill(0xFF);
  big[0] = 0x04;  // coordinates above p
  GS_EXPECT_ERR(HostEcKey::from_public(big), Errc::bad_value);
}

TEST(HostEcdsa, EcdhBothSidesAgree) {
  auto a = HostEcKey::generate();
  auto b = HostEcKey::generate();
  GS_ASSERT_OK(a);
  GS_ASSERT_OK(b);
  auto b_pub = HostEcKey::from_public(b->public_point());
  auto a_pub = HostEcKey::from_public(a->public_point());
  GS_ASSERT_OK(a_pub);
  GS_ASSERT_OK(b_pub);
  std::array<std::uint8_t, kEcScalarSize> z1{};
  std::array<std::uint8_t, kEcScalarSize> z2{};
  GS_ASSERT_OK(a->ecdh_x(*b_pub, z1));
  GS_ASSERT_OK(b->ecdh_x(*a_pub, z2));
  EXPECT_EQ(z1, z2);
  auto ctx = profile_key_context(as_bytes("context"));
  GS_ASSERT_OK(ctx);
  Block k1{};
  Block k2{};
  GS_ASSERT_OK(a->derive_profile_key(*b_pub, *ctx, k1));
  GS_ASSERT_OK(b->derive_profile_key(*a_pub, *ctx, k2));
  EXPECT_EQ(k1, k2);
  Block ctx2 = *ctx;
  ctx2[0] ^= 1;
  Block k3{};
  GS_ASSERT_OK(a->derive_profile_key(*b_pub, ctx2, k3));
  EXPECT_NE(k1, k3);
}

}  // namespace
}  // namespace gs::c1222
