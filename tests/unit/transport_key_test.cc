// Manufacturer transport keys against a real SoftHSM2 token in a temp dir: an OpenSSL reference of
// the manufacturer side, `gridseal hsm import-transport-key`, and `wrapped:<hex>` fleet rows.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "c1222/eax_prime.h"
#include "hsm/hsm_aes.h"
#include "hsm/ops.h"
#include "hsm/p11.h"  // one raw C_UnwrapKey: the HSM, not gridseal, must refuse extra rights
#include "src/config.h"
#include "src/host_aes.h"
#include "src/host_ecdsa.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;

using gs::test::CmdResult;

CmdResult run(const std::string& args) { return gs::test::run_gridseal(args); }

// ---- the manufacturer's side, with OpenSSL only (the reference of the README's formula) --------

// RFC 5649 AES key wrap with padding under a 16- or 32-byte key.
gs::Bytes kwp(gs::ByteView kek, gs::ByteView key) {
  const EVP_CIPHER* c = kek.size() == 16 ? EVP_aes_128_wrap_pad() : EVP_aes_256_wrap_pad();
  std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> ctx(EVP_CIPHER_CTX_new(),
                                                                      EVP_CIPHER_CTX_free);
  EVP_CIPHER_CTX_set_flags(ctx.get(), EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
  gs::Bytes out(key.size() + 16);
  int n = 0;
  if (EVP_EncryptInit_ex(ctx.get(), c, nullptr, kek.data(), nullptr) != 1 ||
      EVP_EncryptUpdate(ctx.get(), out.data(), &n, key.data(), static_cast<int>(key.size())) !=
          1) {
    ADD_FAILURE() << "OpenSSL AES-KWP failed";
    return {};
  }
  out.resize(static_cast<std::size_t>(n));
  return out;
}

struct TransportPackage {
  std::string ephemeral_hex;  // E
  std::string wrapped_hex;    // KWP_U(T)
};

// E, and T wrapped under U = AES-256-ECB_Z(SHA-256("GST1" | len | label)), Z = x(e * P).
TransportPackage manufacturer_wrap_transport(const std::string& provision_hex,
                                             const std::string& label, gs::ByteView transport) {
  auto p = gs::from_hex(provision_hex);
  EXPECT_TRUE(p.has_value());
  auto provision = gs::HostEcKey::from_public(*p);
  auto eph = gs::HostEcKey::generate();
  EXPECT_TRUE(provision.ok() && eph.ok());
  std::array<std::uint8_t, 32> z{};
  EXPECT_TRUE(eph->ecdh_x(*provision, z).ok());
  gs::Bytes c_in = {'G', 'S', 'T', '1', static_cast<std::uint8_t>(label.size())};
  c_in.insert(c_in.end(), label.begin(), label.end());
  std::uint8_t c[32];
  SHA256(c_in.data(), c_in.size(), c);
  gs::Bytes u(32);
  std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> ctx(EVP_CIPHER_CTX_new(),
                                                                      EVP_CIPHER_CTX_free);
  int n = 0;
  EXPECT_EQ(EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_ecb(), nullptr, z.data(), nullptr), 1);
  EVP_CIPHER_CTX_set_padding(ctx.get(), 0);
  EXPECT_EQ(EVP_EncryptUpdate(ctx.get(), u.data(), &n, c, sizeof c), 1);
  EXPECT_EQ(n, 32);
  TransportPackage out{gs::to_hex(eph->public_point()), gs::to_hex(kwp(u, transport))};
  gs::secure_zero(z.data(), z.size());
  gs::secure_zero(u.data(), u.size());
  return out;
}

gs::Bytes random_bytes(std::mt19937_64& rng, std::size_t n) {
  gs::Bytes b(n);
  for (auto& x : b) x = static_cast<std::uint8_t>(rng());
  return b;
}

class TransportKey : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-transport-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-transport\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
    CmdResult init = run("hsm init" + cfg());
    ASSERT_EQ(init.code, 0) << init.out;
    CmdResult pub = run("hsm export-pubkey gs-provision --hex" + cfg());
    ASSERT_EQ(pub.code, 0) << pub.out;
    provision_hex_ = pub.out.substr(0, 130);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string cfg() const { return " --config " + conf_; }

  CmdResult import_transport(const std::string& label, const TransportPackage& p) {
    return run("hsm import-transport-key --label " + label + " --ephemeral-pubkey " +
               p.ephemeral_hex + " --wrapped " + p.wrapped_hex + cfg());
  }

  // A fleet file whose keys are wrapped under `transport`; returns the plain meter keys.
  std::vector<gs::Bytes> write_wrapped_fleet(const std::string& path, int n, gs::ByteView transport,
                                             int first = 0) {
    std::mt19937_64 rng(7 + static_cast<unsigned>(first));
    std::vector<gs::Bytes> keys;
    std::ofstream f(path);
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (int i = first; i < first + n; ++i) {
      keys.push_back(random_bytes(rng, 16));
      f << "W" << i << ",.9." << (i + 1) << ",,0,wrapped:" << gs::to_hex(kwp(transport, keys.back()))
        << "\n";
    }
    return keys;
  }

  std::string dir_;
  std::string conf_;
  std::string provision_hex_;
};

TEST_F(TransportKey, ImportedKeyIsLockedDownAndWrappedFleetWorks) {
  std::mt19937_64 rng(1);
  for (std::size_t tlen : {16u, 32u}) {
    const std::string label = tlen == 16 ? "acme-2025" : "acme-256";
    gs::Bytes transport = random_bytes(rng, tlen);
    auto pkg = manufacturer_wrap_transport(provision_hex_, label, transport);
    CmdResult imp = import_transport(label, pkg);
    ASSERT_EQ(imp.code, 0) << imp.out;
    EXPECT_NE(imp.out.find(tlen == 16 ? "AES-128" : "AES-256"), std::string::npos) << imp.out;
    CmdResult again = import_transport(label, pkg);
    EXPECT_EQ(again.code, 1);
    EXPECT_NE(again.out.find("already exists"), std::string::npos) << again.out;

    const std::string fleet = dir_ + "/fleet-" + label + ".csv";
    auto keys = write_wrapped_fleet(fleet, 40, transport, tlen == 16 ? 0 : 1000);
    CmdResult none = run("meters import " + fleet + cfg());
    EXPECT_EQ(none.code, 1);
    EXPECT_NE(none.out.find("--transport-key"), std::string::npos) << none.out;
    CmdResult ok = run("meters import " + fleet + " --batch 16 --transport-key " + label + cfg());
    ASSERT_EQ(ok.code, 0) << ok.out;
    EXPECT_NE(ok.out.find("40 imported"), std::string::npos) << ok.out;
    CmdResult twice = run("meters import " + fleet + " --transport-key " + label + cfg());
    EXPECT_EQ(twice.code, 0) << twice.out;
    EXPECT_NE(twice.out.find("40 already present"), std::string::npos) << twice.out;
    for (const CmdResult* r : {&imp, &again, &none, &ok, &twice}) {
      EXPECT_EQ(r->out.find(gs::to_hex(transport)), std::string::npos) << "transport key printed";
      for (const auto& k : keys) ASSERT_EQ(r->out.find(gs::to_hex(k)), std::string::npos);
    }

    // The stored keys work: unwrap under gs-kek, EAX' through the HSM == EAX' with the plain key.
    auto c = gs::config::load(conf_);
    ASSERT_TRUE(c.ok()) << c.error().message();
    auto ctx = gs::open_hsm(c->hsm);
    ASSERT_TRUE(ctx.ok()) << ctx.error().message();
    auto store = gs::store::KeyStore::open(c->store.path, {.create = false});
    ASSERT_TRUE(store.ok()) << store.error().message();
    auto lease = ctx->pool->acquire();
    ASSERT_TRUE(lease.ok());
    auto& s = lease->session();
    auto kek = gs::hsm::find_object(s, gs::hsm::ObjectClass::secret_key, gs::kLabelKek);
    ASSERT_TRUE(kek.ok());
    const int first = tlen == 16 ? 0 : 1000;
    for (int i : {0, 17, 39}) {
      auto m = store->meter_by_id("W" + std::to_string(first + i));
      ASSERT_TRUE(m.ok() && m->has_value());
      ASSERT_FALSE((*m)->slots.empty());
      EXPECT_EQ((*m)->slots[0].origin, "wrapped");
      auto h = gs::hsm::unwrap_meter_key(s, *kek, (*m)->slots[0].wrapped);
      ASSERT_TRUE(h.ok()) << h.error().message();
      auto hsm_aes = gs::hsm::HsmAes::make(s, *h);
      auto host_aes = gs::HostAes::make(keys[static_cast<std::size_t>(i)]);
      ASSERT_TRUE(hsm_aes.ok() && host_aes.ok());
      auto e1 = gs::c1222::EaxPrime::make(**hsm_aes);
      auto e2 = gs::c1222::EaxPrime::make(**host_aes);
      gs::Bytes clear(60, 0x60), d1(200, 0x33), d2(200, 0x33);
      auto mac1 = e1->encrypt(clear, d1);
      auto mac2 = e2->encrypt(clear, d2);
      ASSERT_TRUE(mac1.ok() && mac2.ok());
      EXPECT_EQ(*mac1, *mac2);
      EXPECT_EQ(d1, d2);
      EXPECT_TRUE(gs::hsm::destroy_object(s, *h).ok());
    }

    // The transport key: token, private, sensitive, non-extractable, unwrap only, read-only.
    auto t = gs::hsm::find_object(s, gs::hsm::ObjectClass::secret_key, label);
    ASSERT_TRUE(t.ok()) << t.error().message();
    auto a = gs::hsm::object_attributes(s, *t);
    ASSERT_TRUE(a.ok());
    EXPECT_TRUE(a->token && a->private_object && a->sensitive && a->unwrap);
    EXPECT_FALSE(a->extractable || a->modifiable || a->encrypt || a->decrypt || a->wrap ||
                 a->derive || a->sign || a->trusted);
    EXPECT_TRUE(a->value_len == tlen || a->value_len == 0);  // SoftHSM2 2.6.1 reports 0
    EXPECT_FALSE(gs::hsm::read_value(s, *t).ok());
    EXPECT_FALSE(gs::hsm::wrap_key(s, *kek, *t).ok()) << "transport key left the HSM";
    gs::Block iv{};
    gs::Bytes blk(16), out(16);
    EXPECT_FALSE(gs::hsm::aes_encrypt(s, *t, gs::hsm::AesMode::ecb, &iv, blk, out).ok());
    EXPECT_FALSE(gs::hsm::aes_decrypt(s, *t, gs::hsm::AesMode::ecb, &iv, blk, out).ok());

    // Its unwrap template binds what it unwraps: a meter key with CKA_DECRYPT is refused.
    gs::Bytes w = kwp(transport, keys[0]);
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ATTRIBUTE tmpl[] = {
        gs::hsm::detail::attr_of(CKA_CLASS, &cls),
        gs::hsm::detail::attr_of(CKA_KEY_TYPE, &type),
        gs::hsm::detail::attr_bool(CKA_TOKEN, false),
        gs::hsm::detail::attr_bool(CKA_PRIVATE, true),
        gs::hsm::detail::attr_bool(CKA_SENSITIVE, true),
        gs::hsm::detail::attr_bool(CKA_WRAP_WITH_TRUSTED, true),
        gs::hsm::detail::attr_bool(CKA_ENCRYPT, true),
        gs::hsm::detail::attr_bool(CKA_DECRYPT, true),
    };
    CK_MECHANISM mech{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
    CK_OBJECT_HANDLE got = 0;
    CK_RV rv = gs::hsm::detail::fl(*ctx->module)
                   ->C_UnwrapKey(s.handle(), &mech, *t, w.data(), w.size(), tmpl, std::size(tmpl),
                                 &got);
    EXPECT_NE(rv, static_cast<CK_RV>(CKR_OK)) << "unwrap template not enforced";
    if (rv == CKR_OK) (void)gs::hsm::destroy_object(s, got);
    // Nor can it unwrap the meter key as a token object.
    tmpl[2] = gs::hsm::detail::attr_bool(CKA_TOKEN, true);
    tmpl[7] = gs::hsm::detail::attr_bool(CKA_DECRYPT, false);
    rv = gs::hsm::detail::fl(*ctx->module)
             ->C_UnwrapKey(s.handle(), &mech, *t, w.data(), w.size(), tmpl, std::size(tmpl), &got);
    EXPECT_NE(rv, static_cast<CK_RV>(CKR_OK)) << "meter key unwrapped as a token object";
    if (rv == CKR_OK) (void)gs::hsm::destroy_object(s, got);
    // The plain meter-key route works with the same blob (control for the two refusals).
    auto mk = gs::hsm::unwrap_meter_key(s, *t, w);
    ASSERT_TRUE(mk.ok()) << mk.error().message();
    EXPECT_TRUE(gs::hsm::destroy_object(s, *mk).ok());
  }
}

TEST_F(TransportKey, RefusesBadPackagesAndLeavesNothingBehind) {
  std::mt19937_64 rng(2);
  gs::Bytes transport = random_bytes(rng, 16);
  // Made for another label: U differs, the unwrap fails its integrity check.
  auto other = manufacturer_wrap_transport(provision_hex_, "acme-x", transport);
  CmdResult r1 = import_transport("acme-y", other);
  EXPECT_EQ(r1.code, 1);
  EXPECT_NE(r1.out.find("acme-y"), std::string::npos) << r1.out;
  // Tampered wrapped key.
  auto pkg = manufacturer_wrap_transport(provision_hex_, "acme-z", transport);
  TransportPackage bad = pkg;
  bad.wrapped_hex[5] = bad.wrapped_hex[5] == '0' ? '1' : '0';
  EXPECT_EQ(import_transport("acme-z", bad).code, 1);
  // Point not on the curve.
  TransportPackage off = pkg;
  off.ephemeral_hex[100] = off.ephemeral_hex[100] == '0' ? '1' : '0';
  EXPECT_EQ(import_transport("acme-z", off).code, 1);
  // Malformed inputs and gridseal's own labels.
  EXPECT_EQ(import_transport("acme-z", {pkg.ephemeral_hex.substr(2), pkg.wrapped_hex}).code, 1);
  EXPECT_EQ(import_transport("acme-z", {pkg.ephemeral_hex, pkg.wrapped_hex + "00"}).code, 1);
  EXPECT_EQ(import_transport("gs-kek", pkg).code, 1);
  // Nothing was created by any of those; the good package still imports.
  CmdResult ok = import_transport("acme-z", pkg);
  ASSERT_EQ(ok.code, 0) << ok.out;
  auto c = gs::config::load(conf_);
  ASSERT_TRUE(c.ok());
  auto ctx = gs::open_hsm(c->hsm);
  ASSERT_TRUE(ctx.ok()) << ctx.error().message();
  auto lease = ctx->pool->acquire();
  ASSERT_TRUE(lease.ok());
  for (const char* l : {"acme-x", "acme-y"}) {
    auto v = gs::hsm::find_objects(lease->session(), gs::hsm::ObjectClass::secret_key, l, true);
    ASSERT_TRUE(v.ok());
    EXPECT_TRUE(v->empty()) << l;
  }
  auto v = gs::hsm::find_objects(lease->session(), gs::hsm::ObjectClass::secret_key, "acme-z");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->size(), 1u);
}

TEST_F(TransportKey, WrongTransportKeyFailsEveryRowWithItsLine) {
  std::mt19937_64 rng(3);
  gs::Bytes t1 = random_bytes(rng, 16), t2 = random_bytes(rng, 16);
  ASSERT_EQ(import_transport("mfr-a", manufacturer_wrap_transport(provision_hex_, "mfr-a", t1)).code,
            0);
  ASSERT_EQ(import_transport("mfr-b", manufacturer_wrap_transport(provision_hex_, "mfr-b", t2)).code,
            0);
  const std::string fleet = dir_ + "/fleet.csv";
  write_wrapped_fleet(fleet, 3, t1);
  CmdResult wrong = run("meters import " + fleet + " --transport-key mfr-b" + cfg());
  EXPECT_EQ(wrong.code, 1);
  for (const char* l : {"fleet.csv:2:", "fleet.csv:3:", "fleet.csv:4:"}) {
    EXPECT_NE(wrong.out.find(l), std::string::npos) << l << "\n" << wrong.out;
  }
  EXPECT_NE(wrong.out.find("does not unwrap"), std::string::npos) << wrong.out;
  EXPECT_NE(wrong.out.find("3 refused"), std::string::npos) << wrong.out;
  CmdResult missing = run("meters import " + fleet + " --transport-key mfr-none" + cfg());
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.out.find("mfr-none"), std::string::npos) << missing.out;
  EXPECT_EQ(run("meters show W0" + cfg()).code, 1) << "a refused row was stored";

  // One corrupted row spoils only its batch, named by line.
  std::ifstream in(fleet);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::size_t pos = all.find("W1,");
  pos = all.find("wrapped:", pos) + 10;
  all[pos] = all[pos] == 'a' ? 'b' : 'a';
  std::ofstream(fleet) << all;
  CmdResult one = run("meters import " + fleet + " --batch 1 --transport-key mfr-a" + cfg());
  EXPECT_EQ(one.code, 1);
  EXPECT_NE(one.out.find("fleet.csv:3:"), std::string::npos) << one.out;
  EXPECT_NE(one.out.find("2 imported"), std::string::npos) << one.out;
}

}  // namespace
