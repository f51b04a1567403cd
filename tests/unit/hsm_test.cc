// hsm/ against a real SoftHSM2 token created in a temp dir: errors, key policy, ECDSA, EAX', ECDH.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
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
#include "src/hsm_context.h"

namespace gs::hsm {
namespace {

constexpr const char* kLabel = "gs-test";
constexpr const char* kSoPin = "so-secret-8642";
constexpr const char* kUserPin = "user-secret-9753";

Bytes hex(std::string_view h) {
  auto b = from_hex(h);
  GS_CHECK(b.has_value());
  return *b;
}

class HsmTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/gs-hsm-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = new std::string(tmpl);
    auto conf = softhsm::write_config(*dir_);
    ASSERT_TRUE(conf.ok()) << conf.error().message();
    ASSERT_TRUE(softhsm::use_config(*conf).ok());
    auto m = Module::open(softhsm::kDefaultModule);
    ASSERT_TRUE(m.ok()) << m.error().message();
    module_ = m->release();
    auto slot = module_->init_token(kLabel, Secret(std::string_view(kSoPin)),
                                    Secret(std::string_view(kUserPin)));
    ASSERT_TRUE(slot.ok()) << slot.error().message();
    slot_ = *slot;
    // SoftHSM2 releases token-object handles when the process's last session on the token
    // closes: one session stays open for the whole suite so that the handles below stay valid.
    auto keeper = Session::open(*module_, slot_);
    ASSERT_TRUE(keeper.ok());
    keeper_ = new Session(std::move(keeper).value());
    // The KEK first: the SO cannot log in while a user session is logged in.
    auto kek = create_trusted_kek(*module_, slot_, "gs-kek", Secret(std::string_view(kSoPin)),
                                  Secret(std::string_view(kUserPin)));
    ASSERT_TRUE(kek.ok()) << kek.error().message();
    kek_ = *kek;
    auto s = user_session();
    auto cmd = generate_ec_p256(s, "gs-cmd-1", EcKeyUse::sign);
    ASSERT_TRUE(cmd.ok()) << cmd.error().message();
    cmd_ = *cmd;
    auto prov = generate_ec_p256(s, "gs-provision", EcKeyUse::derive);
    ASSERT_TRUE(prov.ok()) << prov.error().message();
    provision_ = *prov;
    auto cmd2 = generate_ec_p256(s, "gs-cmd-2", EcKeyUse::sign, /*session_copyable=*/true);
    ASSERT_TRUE(cmd2.ok()) << cmd2.error().message();
    cmd2_ = *cmd2;
  }

  // Every test starts logged out (login state is per process, not per session).
  void SetUp() override {
    if (keeper_ == nullptr || !keeper_->is_open()) {
      delete keeper_;
      auto keeper = Session::open(*module_, slot_);
      GS_CHECK(keeper.ok());
      keeper_ = new Session(std::move(keeper).value());
    }
    GS_CHECK(keeper_->logout().ok());
  }

  // SoftHSM2 hands out new handles for private objects after each login: look them up again.
  static void refresh_handles(Session& s) {
    auto get = [&](ObjectClass c, const char* label, ObjectHandle& out) {
      auto h = find_object(s, c, label);
      if (h.ok()) {
        out = *h;
      }
    };
    get(ObjectClass::secret_key, "gs-kek", kek_);
    get(ObjectClass::private_key, "gs-cmd-1", cmd_.private_key);
    get(ObjectClass::public_key, "gs-cmd-1", cmd_.public_key);
    get(ObjectClass::private_key, "gs-cmd-2", cmd2_.private_key);
    get(ObjectClass::public_key, "gs-cmd-2", cmd2_.public_key);
    get(ObjectClass::private_key, "gs-provision", provision_.private_key);
    get(ObjectClass::public_key, "gs-provision", provision_.public_key);
  }

  static void TearDownTestSuite() {
    delete keeper_;
    keeper_ = nullptr;
    delete module_;
    module_ = nullptr;
    if (dir_ != nullptr) {
      std::error_code ec;
      std::filesystem::remove_all(*dir_, ec);
      delete dir_;
      dir_ = nullptr;
    }
  }

  static Session user_session() {
    auto s = Session::open(*module_, slot_);
    GS_CHECK(s.ok());
    GS_CHECK(s->login(UserType::user, Secret(std::string_view(kUserPin))).ok());
    refresh_handles(*s);
    return std::move(s).value();
  }

  static inline std::string* dir_ = nullptr;
  static inline Module* module_ = nullptr;
  static inline Session* keeper_ = nullptr;
  static inline SlotId slot_ = 0;
  static inline ObjectHandle kek_ = 0;
  static inline KeyPair cmd_;
  static inline KeyPair provision_;
  static inline KeyPair cmd2_;
};

// ---- module, token, PIN errors --------------------------------------------------------------

TEST_F(HsmTest, TokenIsFoundByLabel) {
  auto slot = module_->find_slot(kLabel);
  ASSERT_TRUE(slot.ok()) << slot.error().message();
  EXPECT_EQ(*slot, slot_);
  auto toks = module_->tokens();
  ASSERT_TRUE(toks.ok());
  bool seen = false;
  for (const auto& t : *toks) {
    if (t.label == kLabel) {
      seen = true;
      EXPECT_TRUE(t.initialized);
      EXPECT_TRUE(t.user_pin_initialized);
      EXPECT_EQ(t.manufacturer, "SoftHSM project");
    }
  }
  EXPECT_TRUE(seen);
  EXPECT_NE(module_->library_description().find("SoftHSM"), std::string::npos);
}

TEST_F(HsmTest, MissingTokenIsAClearError) {
  auto slot = module_->find_slot("no-such-token");
  ASSERT_FALSE(slot.ok());
  EXPECT_EQ(slot.error().code, Errc::not_found);
  EXPECT_NE(slot.error().detail.find("no-such-token"), std::string::npos);
}

TEST_F(HsmTest, SecondTokenWithSameLabelRefused) {
  auto again = module_->init_token(kLabel, Secret(std::string_view(kSoPin)),
                                   Secret(std::string_view(kUserPin)));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, Errc::bad_value);
  auto bad = module_->init_token("this label is far too long for a token", Secret(std::string_view(kSoPin)),
                                 Secret(std::string_view(kUserPin)));
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
}

TEST_F(HsmTest, MissingModuleIsAClearError) {
  auto m = Module::open("/nonexistent/libpkcs11-missing.so");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code, Errc::not_found);
  EXPECT_NE(m.error().detail.find("/nonexistent/libpkcs11-missing.so"), std::string::npos);
  EXPECT_EQ(Module::open("").error().code, Errc::invalid_argument);
}

TEST_F(HsmTest, NonPkcs11LibraryRefused) {
  const char* candidates[] = {"/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1",
                              "/lib/x86_64-linux-gnu/libm.so.6"};
  for (const char* c : candidates) {
    if (::access(c, R_OK) == 0) {
      auto m = Module::open(c);
      ASSERT_FALSE(m.ok());
      EXPECT_EQ(m.error().code, Errc::unsupported);
      EXPECT_NE(m.error().detail.find("C_GetFunctionList"), std::string::npos);
      return;
    }
  }
  GTEST_SKIP() << "no plain shared library found";
}

TEST_F(HsmTest, SecondOpenOfSameModuleRefused) {
  auto m = Module::open(softhsm::kDefaultModule);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code, Errc::bad_value);
  // ... and the live module still works.
  EXPECT_TRUE(module_->find_slot(kLabel).ok());
}

TEST_F(HsmTest, WrongPinIsAClearErrorWithoutThePin) {
  const std::string wrong = "not-the-pin-31337";
  auto s = Session::open(*module_, slot_);
  ASSERT_TRUE(s.ok());
  Status st = s->login(UserType::user, Secret(std::string_view(wrong)));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, Errc::invalid_argument);
  EXPECT_NE(st.error().detail.find("CKR_PIN_INCORRECT"), std::string::npos);
  EXPECT_EQ(st.error().message().find(wrong), std::string::npos);
  EXPECT_EQ(st.error().message().find(kUserPin), std::string::npos);
  // A wrong SO PIN too.
  st = s->login(UserType::security_officer, Secret(std::string_view(wrong)));
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.error().detail.find("CKR_PIN_INCORRECT"), std::string::npos);
  // The pool refuses at construction.
  auto pool = SessionPool::make(*module_, slot_, Secret(std::string_view(wrong)), 2);
  ASSERT_FALSE(pool.ok());
  EXPECT_NE(pool.error().detail.find("CKR_PIN_INCORRECT"), std::string::npos);
  // An empty PIN never reaches the token.
  EXPECT_EQ(s->login(UserType::user, Secret()).error().code, Errc::invalid_argument);
}

TEST_F(HsmTest, OperationsNeedLogin) {
  auto s = Session::open(*module_, slot_);
  ASSERT_TRUE(s.ok());
  auto found = find_object(*s, ObjectClass::private_key, "gs-cmd-1");
  EXPECT_EQ(found.error().code, Errc::not_found);  // private objects invisible before login
  Bytes digest(32, 0x11);
  auto sig = sign_digest(*s, cmd_.private_key, digest);
  ASSERT_FALSE(sig.ok());
}

TEST_F(HsmTest, PinFromFileAndEnvironment) {
  const std::string path = *dir_ + "/user.pin";
  {
    std::ofstream f(path);
    f << kUserPin << "\n";
  }
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  auto loose = read_pin_file(path);
  ASSERT_FALSE(loose.ok());
  EXPECT_NE(loose.error().detail.find("chmod 600"), std::string::npos);
  ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
  auto pin = read_pin_file(path);
  ASSERT_TRUE(pin.ok()) << pin.error().message();
  EXPECT_EQ(std::string(pin->view().begin(), pin->view().end()), kUserPin);

  EXPECT_EQ(read_pin_file(*dir_ + "/absent.pin").error().code, Errc::not_found);
  const std::string empty = *dir_ + "/empty.pin";
  { std::ofstream f(empty); f << "\n"; }
  ::chmod(empty.c_str(), 0600);
  EXPECT_EQ(read_pin_file(empty).error().code, Errc::bad_value);
  const std::string big = *dir_ + "/big.pin";
  { std::ofstream f(big); f << std::string(1000, 'x'); }
  ::chmod(big.c_str(), 0600);
  EXPECT_EQ(read_pin_file(big).error().code, Errc::too_large);
  EXPECT_EQ(read_pin_file(*dir_).error().code, Errc::bad_value);  // a directory

  ::setenv("GS_TEST_HSM_PIN", kUserPin, 1);
  auto env = read_pin_env("GS_TEST_HSM_PIN");
  ASSERT_TRUE(env.ok());
  EXPECT_EQ(std::string(env->view().begin(), env->view().end()), kUserPin);
  ::unsetenv("GS_TEST_HSM_PIN");
  auto missing = read_pin_env("GS_TEST_HSM_PIN");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().detail.find("GS_TEST_HSM_PIN"), std::string::npos);
}

TEST(HsmErrors, CkrNamesAndMapping) {
  EXPECT_EQ(ckr_name(0xA0), "CKR_PIN_INCORRECT");
  EXPECT_EQ(ckr_name(0xB3), "CKR_SESSION_HANDLE_INVALID");
  EXPECT_EQ(ckr_name(0x12345678), "CKR_0x12345678");
  EXPECT_EQ(ckr_errc(0), Errc::ok);
  EXPECT_EQ(ckr_errc(0xC0), Errc::bad_signature);
  EXPECT_EQ(ckr_errc(0x60), Errc::not_found);  // CKR_KEY_HANDLE_INVALID
  EXPECT_EQ(ckr_errc(0x30), Errc::crypto_failure);  // CKR_DEVICE_ERROR
  EXPECT_TRUE(ckr_session_lost(0xB3));
  EXPECT_TRUE(ckr_session_lost(0x30));
  EXPECT_FALSE(ckr_session_lost(0xA0));
  Error e = ckr_error("C_Sign", 0xC0);
  EXPECT_EQ(e.detail, "C_Sign: CKR_SIGNATURE_INVALID");
}

// ---- key policy ------------------------------------------------------------------------------

TEST_F(HsmTest, CommandKeyAttributesAndNonExtractable) {
  auto s = user_session();
  auto priv = find_object(s, ObjectClass::private_key, "gs-cmd-1");
  ASSERT_TRUE(priv.ok()) << priv.error().message();
  EXPECT_EQ(*priv, cmd_.private_key);
  auto a = object_attributes(s, *priv);
  ASSERT_TRUE(a.ok()) << a.error().message();
  EXPECT_EQ(a->object_class, ObjectClass::private_key);
  EXPECT_EQ(a->label, "gs-cmd-1");
  EXPECT_TRUE(a->token);
  EXPECT_TRUE(a->private_object);
  EXPECT_TRUE(a->sensitive);
  EXPECT_FALSE(a->extractable);
  EXPECT_TRUE(a->never_extractable);
  EXPECT_TRUE(a->sign);
  EXPECT_FALSE(a->decrypt);
  EXPECT_FALSE(a->derive);
  EXPECT_FALSE(a->unwrap);
  EXPECT_FALSE(a->modifiable);

  auto value = read_value(s, *priv);
  ASSERT_FALSE(value.ok());
  EXPECT_NE(value.error().detail.find("CKR_ATTRIBUTE_SENSITIVE"), std::string::npos);
  // Not under the trusted KEK, not under a wrapping key of the user's own.
  EXPECT_FALSE(wrap_key(s, kek_, *priv).ok());
  auto own = generate_aes_key(s, {"own-wrap", 32, false, false, false, true, true, false});
  ASSERT_TRUE(own.ok()) << own.error().message();
  auto w = wrap_key(s, *own, *priv);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.error().detail.find("CKR_KEY_UNEXTRACTABLE"), std::string::npos);

  // SoftHSM2 cannot copy a non-modifiable key; the copyable variant gives a locked copy.
  auto refused = copy_to_session(s, *priv);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, Errc::unsupported);
  auto a2 = object_attributes(s, cmd2_.private_key);
  ASSERT_TRUE(a2.ok());
  EXPECT_TRUE(a2->modifiable);
  EXPECT_TRUE(a2->sensitive);
  EXPECT_FALSE(a2->extractable);
  EXPECT_FALSE(read_value(s, cmd2_.private_key).ok());
  EXPECT_FALSE(wrap_key(s, *own, cmd2_.private_key).ok());
  auto copy = copy_to_session(s, cmd2_.private_key);
  ASSERT_TRUE(copy.ok()) << copy.error().message();
  auto ca = object_attributes(s, *copy);
  ASSERT_TRUE(ca.ok());
  EXPECT_FALSE(ca->token);
  EXPECT_FALSE(ca->modifiable);
  EXPECT_TRUE(ca->sign);
  EXPECT_TRUE(ca->sensitive);
  EXPECT_FALSE(ca->extractable);
  EXPECT_FALSE(read_value(s, *copy).ok());
  EXPECT_FALSE(wrap_key(s, *own, *copy).ok());
  // A provisioning key derives but does not sign.
  auto pa = object_attributes(s, provision_.private_key);
  ASSERT_TRUE(pa.ok());
  EXPECT_TRUE(pa->derive);
  EXPECT_FALSE(pa->sign);
  EXPECT_FALSE(sign_digest(s, provision_.private_key, Bytes(32, 1)).ok());
}

// What the daemons sign with (hsm.command_key_session_copy): the session copy when asked for
// and the token makes one, else the token key with the reason; each signs for the same key.
TEST_F(HsmTest, SigningHandleIsASessionCopyWhenTheTokenMakesOne) {
  auto s = user_session();
  const Bytes digest(32, 0x42);
  auto fast = signing_handle(s, cmd2_.private_key, true);
  EXPECT_TRUE(fast.session_copy);
  EXPECT_NE(fast.handle, cmd2_.private_key);
  EXPECT_TRUE(fast.note.empty()) << fast.note;
  auto a = object_attributes(s, fast.handle);
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(a->token);
  EXPECT_TRUE(a->sensitive);
  EXPECT_FALSE(a->extractable);
  auto sig = sign_digest(s, fast.handle, digest);
  ASSERT_TRUE(sig.ok()) << sig.error().message();
  EXPECT_TRUE(verify_digest(s, cmd2_.public_key, digest, *sig).ok());
  EXPECT_TRUE(destroy_object(s, fast.handle).ok());

  auto fixed = signing_handle(s, cmd_.private_key, true);  // CKA_MODIFIABLE=false
  EXPECT_FALSE(fixed.session_copy);
  EXPECT_EQ(fixed.handle, cmd_.private_key);
  EXPECT_NE(fixed.note.find("CKR_ATTRIBUTE_READ_ONLY"), std::string::npos) << fixed.note;
  auto sig1 = sign_digest(s, fixed.handle, digest);
  ASSERT_TRUE(sig1.ok());
  EXPECT_TRUE(verify_digest(s, cmd_.public_key, digest, *sig1).ok());

  auto off = signing_handle(s, cmd2_.private_key, false);
  EXPECT_FALSE(off.session_copy);
  EXPECT_EQ(off.handle, cmd2_.private_key);
  EXPECT_NE(off.note.find("command_key_session_copy"), std::string::npos) << off.note;
}

TEST_F(HsmTest, KekIsTrustedPrivateAndNonExtractable) {
  auto s = user_session();
  auto found = find_objects(s, ObjectClass::secret_key, "gs-kek", true);
  ASSERT_TRUE(found.ok());
  ASSERT_EQ(found->size(), 1u) << "the SO's session original must be gone";
  EXPECT_EQ(found->front(), kek_);
  auto a = object_attributes(s, kek_);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->token);
  EXPECT_TRUE(a->private_object);
  EXPECT_TRUE(a->trusted);
  EXPECT_TRUE(a->sensitive);
  EXPECT_FALSE(a->extractable);
  EXPECT_TRUE(a->wrap);
  EXPECT_TRUE(a->unwrap);
  EXPECT_FALSE(a->encrypt);
  EXPECT_FALSE(a->decrypt);
  EXPECT_FALSE(a->modifiable);
  EXPECT_EQ(a->value_len, 32u);
  EXPECT_FALSE(read_value(s, kek_).ok());
  auto own = generate_aes_key(s, {"own-wrap", 32, false, false, false, true, true, false});
  ASSERT_TRUE(own.ok());
  EXPECT_FALSE(wrap_key(s, *own, kek_).ok());
  Block out{};
  Block zero{};
  EXPECT_FALSE(aes_encrypt(s, kek_, AesMode::ecb, nullptr, zero, out).ok());
  EXPECT_FALSE(aes_decrypt(s, kek_, AesMode::ecb, nullptr, zero, out).ok());
}

TEST_F(HsmTest, KekNotVisibleWithoutLogin) {
  auto s = Session::open(*module_, slot_);
  ASSERT_TRUE(s.ok());
  auto found = find_objects(*s, ObjectClass::secret_key, "gs-kek", true);
  ASSERT_TRUE(found.ok());
  EXPECT_TRUE(found->empty());
}

TEST_F(HsmTest, MeterKeyPolicy) {
  auto s = user_session();
  const Bytes key = hex("000102030405060708090a0b0c0d0e0f");
  auto h = import_meter_key(s, key);
  ASSERT_TRUE(h.ok()) << h.error().message();
  auto a = object_attributes(s, *h);
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(a->token);
  EXPECT_TRUE(a->private_object);
  EXPECT_TRUE(a->sensitive);
  EXPECT_TRUE(a->extractable);
  EXPECT_TRUE(a->wrap_with_trusted);
  EXPECT_TRUE(a->encrypt);
  EXPECT_FALSE(a->decrypt);
  EXPECT_FALSE(a->sign);
  EXPECT_FALSE(a->wrap);
  EXPECT_FALSE(a->unwrap);
  EXPECT_FALSE(a->derive);
  EXPECT_FALSE(a->modifiable);
  EXPECT_EQ(a->value_len, 16u);
  EXPECT_FALSE(read_value(s, *h).ok());

  // Wraps under the trusted KEK only.
  auto wrapped = wrap_key(s, kek_, *h);
  ASSERT_TRUE(wrapped.ok()) << wrapped.error().message();
  EXPECT_EQ(wrapped->size(), 24u);
  auto own = generate_aes_key(s, {"own-wrap", 32, false, false, false, true, true, false});
  ASSERT_TRUE(own.ok());
  auto other = wrap_key(s, *own, *h);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.error().detail.find("CKR_KEY_NOT_WRAPPABLE"), std::string::npos);
  auto own16 = generate_aes_key(s, {"own-wrap16", 16, false, false, false, true, true, false});
  ASSERT_TRUE(own16.ok());
  EXPECT_FALSE(wrap_key(s, *own16, *h).ok());
  // A meter key cannot wrap anything either (not even another meter key).
  auto h2 = import_meter_key(s, hex("ffeeddccbbaa99887766554433221100"));
  ASSERT_TRUE(h2.ok());
  EXPECT_FALSE(wrap_key(s, *h, *h2).ok());

  // Encrypt only.
  Block in{};
  Block out{};
  EXPECT_TRUE(aes_encrypt(s, *h, AesMode::ecb, nullptr, in, out).ok());
  Status dec = aes_decrypt(s, *h, AesMode::ecb, nullptr, in, out);
  ASSERT_FALSE(dec.ok());
  EXPECT_NE(dec.error().detail.find("CKR_KEY_FUNCTION_NOT_PERMITTED"), std::string::npos);
  EXPECT_FALSE(aes_decrypt(s, *h, AesMode::cbc, &in, in, out).ok());
  EXPECT_FALSE(aes_decrypt(s, *h, AesMode::ctr, &in, in, out).ok());
  EXPECT_FALSE(sign_digest(s, *h, Bytes(32, 0)).ok());

  // Unwrap gives the same key back (same ciphertext as OpenSSL with the clear key).
  auto u = unwrap_meter_key(s, kek_, *wrapped);
  ASSERT_TRUE(u.ok()) << u.error().message();
  auto ua = object_attributes(s, *u);
  ASSERT_TRUE(ua.ok());
  EXPECT_FALSE(ua->decrypt);
  EXPECT_TRUE(ua->wrap_with_trusted);
  EXPECT_FALSE(ua->modifiable);
  EXPECT_FALSE(ua->token);
  Block hsm_ct{};
  ASSERT_TRUE(aes_encrypt(s, *u, AesMode::ecb, nullptr, in, hsm_ct).ok());
  auto host = HostAes::make(key);
  ASSERT_TRUE(host.ok());
  Block host_ct{};
  ASSERT_TRUE((*host)->encrypt_blocks(in, host_ct).ok());
  EXPECT_EQ(hsm_ct, host_ct);
  EXPECT_FALSE(aes_decrypt(s, *u, AesMode::ecb, nullptr, in, out).ok());
  EXPECT_FALSE(wrap_key(s, *own, *u).ok());
}

TEST_F(HsmTest, WrapUnwrapRejectsBadInput) {
  auto s = user_session();
  auto w = import_and_wrap_meter_key(s, kek_, hex("00112233445566778899aabbccddeeff"));
  ASSERT_TRUE(w.ok()) << w.error().message();
  ASSERT_EQ(w->size(), 24u);
  // The session object used for wrapping is gone again.
  Bytes tampered = *w;
  tampered[5] ^= 0x01;
  EXPECT_FALSE(unwrap_meter_key(s, kek_, tampered).ok());
  EXPECT_EQ(unwrap_meter_key(s, kek_, ByteView(*w).first(16)).error().code, Errc::bad_length);
  EXPECT_EQ(unwrap_meter_key(s, kek_, Bytes(200, 0)).error().code, Errc::bad_length);
  EXPECT_EQ(unwrap_meter_key(s, kek_, Bytes{}).error().code, Errc::bad_length);
  EXPECT_EQ(import_meter_key(s, Bytes(15, 0)).error().code, Errc::invalid_argument);
  EXPECT_EQ(import_meter_key(s, Bytes(32, 0)).error().code, Errc::invalid_argument);
  // Unwrapping under a key that is not the KEK fails.
  auto own = generate_aes_key(s, {"own-wrap", 32, false, false, false, true, true, false});
  ASSERT_TRUE(own.ok());
  EXPECT_FALSE(unwrap_meter_key(s, *own, *w).ok());
  EXPECT_FALSE(unwrap_meter_key(s, cmd_.private_key, *w).ok());
  // Two wraps of the same key are identical (AES-KWP is deterministic), two keys differ.
  auto w2 = import_and_wrap_meter_key(s, kek_, hex("00112233445566778899aabbccddeeff"));
  auto w3 = import_and_wrap_meter_key(s, kek_, hex("00112233445566778899aabbccddeefe"));
  ASSERT_TRUE(w2.ok() && w3.ok());
  EXPECT_EQ(*w, *w2);
  EXPECT_NE(*w, *w3);
}

// ---- ECDSA ----------------------------------------------------------------------------------

TEST_F(HsmTest, SignVerifyRoundTripCheckedByOpenSsl) {
  auto s = user_session();
  auto digest = sha256(as_bytes("gridseal command signing input"));
  ASSERT_TRUE(digest.ok());
  auto sig = sign_digest(s, cmd_.private_key, *digest);
  ASSERT_TRUE(sig.ok()) << sig.error().message();
  EXPECT_TRUE(verify_digest(s, cmd_.public_key, *digest, *sig).ok());

  auto point = export_ec_point(s, cmd_.public_key);
  ASSERT_TRUE(point.ok()) << point.error().message();
  EXPECT_EQ((*point)[0], 0x04);
  auto host = HostEcKey::from_public(*point);
  ASSERT_TRUE(host.ok()) << host.error().message();
  EXPECT_TRUE(host->verify(*digest, *sig).ok());

  Signature bad = *sig;
  bad[10] ^= 0x40;
  EXPECT_EQ(verify_digest(s, cmd_.public_key, *digest, bad).error().code, Errc::bad_signature);
  EXPECT_EQ(host->verify(*digest, bad).error().code, Errc::bad_signature);
  Sha256Digest other = *digest;
  other[0] ^= 1;
  EXPECT_EQ(verify_digest(s, cmd_.public_key, other, *sig).error().code, Errc::bad_signature);
  EXPECT_EQ(verify_digest(s, cmd_.public_key, *digest, ByteView(*sig).first(63)).error().code,
            Errc::bad_signature);
  EXPECT_EQ(sign_digest(s, cmd_.private_key, Bytes(31, 0)).error().code, Errc::invalid_argument);
  EXPECT_EQ(sign_digest(s, cmd_.private_key, Bytes(33, 0)).error().code, Errc::invalid_argument);

  // The session copy of a copyable key signs with the same key.
  auto copy = copy_to_session(s, cmd2_.private_key);
  ASSERT_TRUE(copy.ok());
  auto sig2 = sign_digest(s, *copy, *digest);
  ASSERT_TRUE(sig2.ok());
  auto point2 = export_ec_point(s, cmd2_.public_key);
  ASSERT_TRUE(point2.ok());
  auto host2 = HostEcKey::from_public(*point2);
  ASSERT_TRUE(host2.ok());
  EXPECT_TRUE(host2->verify(*digest, *sig2).ok());
  EXPECT_FALSE(host->verify(*digest, *sig2).ok());

  // An OpenSSL signature verifies in the HSM through an imported public key.
  auto hk = HostEcKey::generate();
  ASSERT_TRUE(hk.ok());
  auto hsig = hk->sign(*digest);
  ASSERT_TRUE(hsig.ok());
  auto pub = import_ec_public(s, hk->public_point());
  ASSERT_TRUE(pub.ok()) << pub.error().message();
  EXPECT_TRUE(verify_digest(s, *pub, *digest, *hsig).ok());
  EXPECT_FALSE(verify_digest(s, cmd_.public_key, *digest, *hsig).ok());
  Bytes not_on_curve(65, 0x01);
  not_on_curve[0] = 0x04;
  EXPECT_FALSE(import_ec_public(s, Bytes(64, 0x04)).ok());
}

// ---- EAX' over HsmAes -------------------------------------------------------------------------

TEST_F(HsmTest, EaxPrimeOverHsmMatchesHostAndPaperVector1) {
  auto s = user_session();
  const Bytes key = hex("01020304050607080102030405060708");
  const Bytes cleartext = hex(
      "a20c060a607c86f7540116001702a703020104a803020102ac0fa20da00ba109"
      "800102810448e99388be19281781159aa60d060b607c86f754011600178211"
      "0248e99388");
  const Bytes plaintext = hex("54454d500b40000700051a00000200e4");
  const Bytes ciphertext = hex("4031cc957d4edf9a357f3db0fa9fe838");
  const Bytes mac = hex("6555c029");

  auto h = import_meter_key(s, key);
  ASSERT_TRUE(h.ok());
  auto hsm_aes = HsmAes::make(s, *h);
  ASSERT_TRUE(hsm_aes.ok()) << hsm_aes.error().message();
  EXPECT_TRUE((*hsm_aes)->uses_cbc());
  EXPECT_TRUE((*hsm_aes)->uses_ctr());
  auto host_aes = HostAes::make(key);
  ASSERT_TRUE(host_aes.ok());

  auto eh = c1222::EaxPrime::make(**hsm_aes);
  ASSERT_TRUE(eh.ok()) << eh.error().message();
  auto eo = c1222::EaxPrime::make(**host_aes);
  ASSERT_TRUE(eo.ok());
  EXPECT_EQ(eh->d(), eo->d());
  EXPECT_EQ(eh->q(), eo->q());

  (*hsm_aes)->reset_counters();
  Bytes data_h = plaintext;
  auto mac_h = eh->encrypt(cleartext, data_h);
  ASSERT_TRUE(mac_h.ok()) << mac_h.error().message();
  const auto calls = (*hsm_aes)->counters();
  Bytes data_o = plaintext;
  auto mac_o = eo->encrypt(cleartext, data_o);
  ASSERT_TRUE(mac_o.ok());
  EXPECT_EQ(data_h, ciphertext);
  EXPECT_EQ(data_h, data_o);
  EXPECT_EQ(Bytes(mac_h->begin(), mac_h->end()), mac);
  EXPECT_EQ(*mac_h, *mac_o);
  // One Init + one Encrypt per operation, at most three operations per message.
  EXPECT_EQ(calls.init_calls, calls.op_calls);
  EXPECT_LE(calls.init_calls, 3u);
  EXPECT_GE(calls.init_calls, 2u);

  ASSERT_TRUE(eh->decrypt(cleartext, data_h, *mac_h).ok());
  EXPECT_EQ(data_h, plaintext);
  c1222::Mac wrong = *mac_h;
  wrong[0] ^= 1;
  Bytes tampered = ciphertext;
  EXPECT_EQ(eh->decrypt(cleartext, tampered, wrong).error().code, Errc::bad_mac);
  EXPECT_EQ(tampered, ciphertext);
}

TEST_F(HsmTest, HsmAesPrimitivesMatchHostOnOddSizes) {
  auto s = user_session();
  const Bytes key = hex("6624c7e23034e4036fe5cb3a8b5dab44");
  auto h = import_meter_key(s, key);
  ASSERT_TRUE(h.ok());
  auto ha = HsmAes::make(s, *h);
  auto oa = HostAes::make(key);
  ASSERT_TRUE(ha.ok() && oa.ok());
  Bytes data(10007);
  ASSERT_TRUE(generate_random(s, data).ok());
  Block ctr{};
  std::fill(ctr.begin(), ctr.end(), 0xff);  // wraps around 2^128
  ctr[0] = 0x7f;
  for (std::size_t n : {0u, 1u, 15u, 16u, 17u, 200u, 4096u, 4097u, 10007u}) {
    Bytes a(n), b(n);
    ASSERT_TRUE((*ha)->ctr_xor(ctr, ByteView(data).first(n), a).ok()) << n;
    ASSERT_TRUE((*oa)->ctr_xor(ctr, ByteView(data).first(n), b).ok()) << n;
    EXPECT_EQ(a, b) << "ctr n=" << n;
    if (n % 16 == 0 && n > 0) {
      Block ma{}, mb{};
      ASSERT_TRUE((*ha)->cbc_mac(ctr, ByteView(data).first(n), ma).ok());
      ASSERT_TRUE((*oa)->cbc_mac(ctr, ByteView(data).first(n), mb).ok());
      EXPECT_EQ(ma, mb) << "cbc n=" << n;
      ASSERT_TRUE((*ha)->encrypt_blocks(ByteView(data).first(n), a).ok());
      ASSERT_TRUE((*oa)->encrypt_blocks(ByteView(data).first(n), b).ok());
      EXPECT_EQ(a, b) << "ecb n=" << n;
    }
  }
  // In place.
  Bytes x(ByteView(data).first(200).begin(), ByteView(data).first(200).end());
  Bytes y = x;
  ASSERT_TRUE((*ha)->ctr_xor(ctr, x, x).ok());
  ASSERT_TRUE((*oa)->ctr_xor(ctr, y, y).ok());
  EXPECT_EQ(x, y);
  Block m{};
  EXPECT_FALSE((*ha)->cbc_mac(ctr, ByteView(data).first(15), m).ok());
  EXPECT_FALSE((*ha)->cbc_mac(ctr, ByteView(data).first(0), m).ok());
  Bytes out(17);
  EXPECT_FALSE((*ha)->encrypt_blocks(ByteView(data).first(17), out).ok());
  Bytes out2(16);
  EXPECT_FALSE((*ha)->ctr_xor(ctr, ByteView(data).first(17), out2).ok());
}

// Two CBC-MACs in one CBC operation (the DKUS's EAX' open) give exactly the two separate
// CBC-MACs, with one C_EncryptInit; the session is usable afterwards (the operation ended), also
// after a refused input; above one chunk it falls back to two operations.
TEST_F(HsmTest, HsmAesCbcMacPairMatchesTwoCbcMacs) {
  auto s = user_session();
  const Bytes key = hex("6624c7e23034e4036fe5cb3a8b5dab44");
  auto h = import_meter_key(s, key);
  ASSERT_TRUE(h.ok());
  auto ha = HsmAes::make(s, *h);
  auto oa = HostAes::make(key);
  ASSERT_TRUE(ha.ok() && oa.ok());
  ASSERT_TRUE((*ha)->uses_cbc());
  Bytes data(2 * 8192);
  ASSERT_TRUE(generate_random(s, data).ok());
  Block iv1{}, iv2{};
  ASSERT_TRUE(generate_random(s, MutableByteView(iv1.data(), 16)).ok());
  ASSERT_TRUE(generate_random(s, MutableByteView(iv2.data(), 16)).ok());
  for (auto [n1, n2] : {std::pair<std::size_t, std::size_t>{16, 16}, {64, 208}, {208, 16},
                        {4096, 4096}, {4112, 32}, {16, 8192}}) {
    const ByteView d1 = ByteView(data).first(n1);
    const ByteView d2 = ByteView(data).subspan(8192, n2);
    Block a1{}, a2{}, b1{}, b2{};
    (*ha)->reset_counters();
    ASSERT_TRUE((*ha)->cbc_mac_pair(iv1, d1, iv2, d2, a1, a2).ok()) << n1 << "/" << n2;
    ASSERT_TRUE((*oa)->cbc_mac(iv1, d1, b1).ok());
    ASSERT_TRUE((*oa)->cbc_mac(iv2, d2, b2).ok());
    EXPECT_EQ(a1, b1) << n1 << "/" << n2;
    EXPECT_EQ(a2, b2) << n1 << "/" << n2;
    if (n1 <= 4096 && n2 <= 4096) {
      EXPECT_EQ((*ha)->counters().init_calls, 1u) << n1 << "/" << n2;
    } else {
      EXPECT_GE((*ha)->counters().init_calls, 2u) << n1 << "/" << n2;
    }
  }
  Block o1{}, o2{};
  EXPECT_EQ(aes_cbc_mac_pair(s, *h, iv1, ByteView(data).first(15), iv2, ByteView(data).first(16),
                             o1, o2).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(aes_cbc_mac_pair(s, *h, iv1, ByteView(data).first(16), iv2, ByteView(), o1, o2)
                .error().code,
            Errc::invalid_argument);
  // No operation was left active: the next single operation works.
  Block m1{}, m2{};
  ASSERT_TRUE((*ha)->cbc_mac(iv1, ByteView(data).first(32), m1).ok());
  ASSERT_TRUE((*oa)->cbc_mac(iv1, ByteView(data).first(32), m2).ok());
  EXPECT_EQ(m1, m2);
  // A key that may not encrypt: the init is refused, nothing is left active.
  EXPECT_FALSE(aes_cbc_mac_pair(s, kek_, iv1, ByteView(data).first(16), iv2,
                                ByteView(data).first(16), o1, o2).ok());
  ASSERT_TRUE((*ha)->cbc_mac(iv1, ByteView(data).first(32), m1).ok());
  EXPECT_EQ(m1, m2);
}

// ---- ECDH key update --------------------------------------------------------------------------

TEST_F(HsmTest, EcdhDeriveMatchesProfileVector) {
  auto s = user_session();
  // PROFILE-VECTORS.md §3: ephemeral x meter key, slot 1, key version 2, meter AP title
  // 2.16.124.113620.1.22.0.7.1.18 (content 607c86f754011600 07a112).
  const Bytes eph = hex("03efe3e3e1234567890abcdef1234567890abcdef1234567890abcdef1234567");
  const Bytes meter_pub = hex(
      "04c681346a0e0d0b19cbb1f242739f220800a14160e3a5d19dfca229487acf52a8cde1a3ed27338392c733d0"
      "4fa368241cbd9cd141e5dfbe3fe0b7aaacb5e5a23e");
  const Bytes title = hex("607c86f75401160007a112");
  const Bytes expected_context = hex("22dab77e65c57aba3e052fa6baed3fe6");
  const Bytes expected_key = hex("b8d658d0bac502e3faa2a097fafdc523");

  auto ctx = key_update_context(s, title, 1, 2);
  ASSERT_TRUE(ctx.ok()) << ctx.error().message();
  EXPECT_EQ(Bytes(ctx->begin(), ctx->end()), expected_context);

  auto e = import_ec_private(s, eph, EcKeyUse::derive);
  ASSERT_TRUE(e.ok()) << e.error().message();
  auto k = derive_meter_key(s, *e, meter_pub, *ctx);
  ASSERT_TRUE(k.ok()) << k.error().message();
  auto a = object_attributes(s, *k);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->encrypt);
  EXPECT_FALSE(a->decrypt);
  EXPECT_FALSE(a->derive);
  EXPECT_TRUE(a->wrap_with_trusted);
  EXPECT_EQ(a->value_len, 16u);
  EXPECT_FALSE(read_value(s, *k).ok());

  Block zero{}, got{}, want{};
  ASSERT_TRUE(aes_encrypt(s, *k, AesMode::ecb, nullptr, zero, got).ok());
  auto host = HostAes::make(expected_key);
  ASSERT_TRUE(host.ok());
  ASSERT_TRUE((*host)->encrypt_blocks(zero, want).ok());
  EXPECT_EQ(got, want);
  // Stored wrapped under the KEK like any meter key.
  auto w = wrap_key(s, kek_, *k);
  ASSERT_TRUE(w.ok()) << w.error().message();

  // A different context gives a different key.
  Block ctx2 = *ctx;
  ctx2[15] ^= 1;
  auto k2 = derive_meter_key(s, *e, meter_pub, ctx2);
  ASSERT_TRUE(k2.ok());
  Block got2{};
  ASSERT_TRUE(aes_encrypt(s, *k2, AesMode::ecb, nullptr, zero, got2).ok());
  EXPECT_NE(got2, want);

  // Bad inputs.
  EXPECT_EQ(derive_meter_key(s, *e, ByteView(meter_pub).first(64), *ctx).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(derive_meter_key(s, *e, meter_pub, ByteView(*ctx).first(15)).error().code,
            Errc::invalid_argument);
  Bytes off_curve = meter_pub;
  off_curve[40] ^= 1;
  EXPECT_FALSE(derive_meter_key(s, *e, off_curve, *ctx).ok());
  EXPECT_FALSE(derive_meter_key(s, cmd_.private_key, meter_pub, *ctx).ok());  // sign-only key
  EXPECT_EQ(key_update_context(s, Bytes{}, 1, 2).error().code, Errc::invalid_argument);
}

TEST_F(HsmTest, ProvisioningDeriveAgreesWithMeterSide) {
  auto s = user_session();
  auto meter = HostEcKey::from_private(
      hex("02badc0de1234567890abcdef1234567890abcdef1234567890abcdef1234567"));
  ASSERT_TRUE(meter.ok());
  auto prov_point = export_ec_point(s, provision_.public_key);
  ASSERT_TRUE(prov_point.ok());
  auto prov_host = HostEcKey::from_public(*prov_point);
  ASSERT_TRUE(prov_host.ok());
  auto ctx = key_update_context(s, hex("607c86f75401160007a112"), 0, 1);
  ASSERT_TRUE(ctx.ok());
  auto k = derive_meter_key(s, provision_.private_key, meter->public_point(), *ctx);
  ASSERT_TRUE(k.ok()) << k.error().message();
  Block meter_key{};
  ASSERT_TRUE(meter->derive_profile_key(*prov_host, *ctx, meter_key).ok());
  Block zero{}, got{}, want{};
  ASSERT_TRUE(aes_encrypt(s, *k, AesMode::ecb, nullptr, zero, got).ok());
  auto host = HostAes::make(meter_key);
  ASSERT_TRUE(host.ok());
  ASSERT_TRUE((*host)->encrypt_blocks(zero, want).ok());
  EXPECT_EQ(got, want);
}

TEST_F(HsmTest, MeterKeyCacheIsBoundedAndFollowsKeyChanges) {
  auto s = user_session();
  auto w1 = import_and_wrap_meter_key(s, kek_, hex("11111111111111111111111111111111"));
  auto w2 = import_and_wrap_meter_key(s, kek_, hex("22222222222222222222222222222222"));
  auto w3 = import_and_wrap_meter_key(s, kek_, hex("33333333333333333333333333333333"));
  auto w3b = import_and_wrap_meter_key(s, kek_, hex("33333333333333333333333333333334"));
  ASSERT_TRUE(w1.ok() && w2.ok() && w3.ok() && w3b.ok());
  MeterKeyCache cache(s, kek_, 2);
  auto h1 = cache.get(1, *w1);
  ASSERT_TRUE(h1.ok()) << h1.error().message();
  auto h1again = cache.get(1, *w1);
  ASSERT_TRUE(h1again.ok());
  EXPECT_EQ(*h1, *h1again);
  EXPECT_EQ(cache.hits(), 1u);
  EXPECT_EQ(cache.misses(), 1u);
  auto h2 = cache.get(2, *w2);
  auto h3 = cache.get(3, *w3);
  ASSERT_TRUE(h2.ok() && h3.ok());
  EXPECT_EQ(cache.size(), 2u);
  // 1 was least recently used: evicted and destroyed.
  EXPECT_FALSE(object_attributes(s, *h1).ok());
  EXPECT_TRUE(object_attributes(s, *h2).ok());
  // A new wrapped form for id 3 replaces the old object.
  auto h3b = cache.get(3, *w3b);
  ASSERT_TRUE(h3b.ok());
  EXPECT_NE(*h3b, *h3);
  EXPECT_FALSE(object_attributes(s, *h3).ok());
  Block zero{}, got{}, want{};
  ASSERT_TRUE(aes_encrypt(s, *h3b, AesMode::ecb, nullptr, zero, got).ok());
  auto host = HostAes::make(hex("33333333333333333333333333333334"));
  ASSERT_TRUE((*host)->encrypt_blocks(zero, want).ok());
  EXPECT_EQ(got, want);
  cache.erase(3);
  EXPECT_FALSE(object_attributes(s, *h3b).ok());
  EXPECT_EQ(cache.size(), 1u);
  // Bad input leaves the cache usable.
  EXPECT_EQ(cache.get(4, Bytes{}).error().code, Errc::bad_length);
  EXPECT_EQ(cache.get(4, Bytes(65, 0)).error().code, Errc::bad_length);
  Bytes bad = *w1;
  bad[0] ^= 1;
  EXPECT_FALSE(cache.get(4, bad).ok());
  EXPECT_EQ(cache.size(), 1u);
  cache.clear();
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_FALSE(object_attributes(s, *h2).ok());
}

// An EAX' message with its MAC (key, canonified cleartext, plaintext EPSEM, MAC), for the
// cache tests.
struct EaxSample {
  Bytes key = hex("01020304050607080102030405060708");
  Bytes cleartext = hex(
      "a20c060a607c86f7540116001702a703020104a803020102ac0fa20da00ba109"
      "800102810448e99388be19281781159aa60d060b607c86f754011600178211"
      "0248e99388");
  Bytes plaintext = hex("54454d500b40000700051a00000200e4");
  Bytes mac = hex("6555c029");
};

// EAX' subkeys are derived once per cached key (one HSM call) and kept with it; a new key for
// the same id starts over.
TEST_F(HsmTest, EaxSubkeysAreKeptWithTheCachedKey) {
  auto s = user_session();
  const EaxSample v;
  auto w = import_and_wrap_meter_key(s, kek_, v.key);
  auto w2 = import_and_wrap_meter_key(s, kek_, hex("22222222222222222222222222222222"));
  ASSERT_TRUE(w.ok() && w2.ok());
  MeterKeyCache cache(s, kek_, 4);
  KeyAux* aux = nullptr;
  auto h = cache.get(7, *w, &aux);
  ASSERT_TRUE(h.ok());
  ASSERT_NE(aux, nullptr);
  EXPECT_FALSE(aux->valid);
  auto aes = HsmAes::make(s, *h);
  ASSERT_TRUE(aes.ok());
  for (int round = 0; round < 2; ++round) {
    (*aes)->reset_counters();
    auto e = gs::eax_for_key(**aes, *h, aux);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ((*aes)->counters().init_calls, round == 0 ? 1u : 0u) << round;
    EXPECT_TRUE(aux->valid);
    Bytes data = v.plaintext;
    auto m = e->encrypt(v.cleartext, data);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(Bytes(m->begin(), m->end()), v.mac) << round;
    KeyAux* again = nullptr;
    ASSERT_TRUE(cache.get(7, *w, &again).ok());
    EXPECT_EQ(again, aux);
  }
  KeyAux* fresh = nullptr;
  ASSERT_TRUE(cache.get(7, *w2, &fresh).ok());
  EXPECT_FALSE(fresh->valid);
}

// ---- bound AES operations -------------------------------------------------------------------

// ECB, CBC-MAC (from any chaining value), CBC-MAC pairs and CTR through operations kept open on
// three keys, interleaved, match OpenSSL, above one chunk and in place too; no C_EncryptInit
// after binding and no fallback.
TEST_F(HsmTest, BoundAesMatchesHostAcrossInterleavedKeys) {
  auto s = user_session();
  BoundAesPool pool(*module_, slot_, 16);
  const Bytes keys[3] = {hex("6624c7e23034e4036fe5cb3a8b5dab44"),
                         hex("01020304050607080102030405060708"),
                         hex("ffeeddccbbaa99887766554433221100")};
  std::unique_ptr<BoundAes> bound[3];
  std::unique_ptr<HsmAes> fallback[3];
  std::unique_ptr<HostAes> host[3];
  for (int k = 0; k < 3; ++k) {
    auto h = import_meter_key(s, keys[k]);
    ASSERT_TRUE(h.ok());
    bound[k] = pool.bind(*h);
    ASSERT_NE(bound[k], nullptr);
    auto f = HsmAes::make(s, *h);
    auto o = HostAes::make(keys[k]);
    ASSERT_TRUE(f.ok() && o.ok());
    fallback[k] = std::move(f).value();
    host[k] = std::move(o).value();
    bound[k]->set_fallback(fallback[k].get());
  }
  EXPECT_EQ(pool.stats().sessions, 6u);
  EXPECT_EQ(pool.stats().in_use, 6u);
  Bytes data(10007);
  ASSERT_TRUE(generate_random(s, data).ok());
  Block iv{};
  int round = 0;
  for (std::size_t n : {1u, 15u, 16u, 17u, 64u, 200u, 4096u, 4097u, 8192u, 10007u}) {
    for (int k = 0; k < 3; ++k, ++round) {
      iv[round % 16] ^= static_cast<std::uint8_t>(0x5a + round);
      const ByteView in = ByteView(data).first(n);
      Bytes a(n), b(n);
      ASSERT_TRUE(bound[k]->ctr_xor(iv, in, a).ok()) << n;
      ASSERT_TRUE(host[k]->ctr_xor(iv, in, b).ok());
      EXPECT_EQ(a, b) << "ctr n=" << n << " key " << k;
      Bytes inplace(in.begin(), in.end());
      ASSERT_TRUE(bound[k]->ctr_xor(iv, inplace, inplace).ok());
      EXPECT_EQ(inplace, b) << "ctr in place n=" << n;
      const std::size_t whole = n / 16 * 16;
      if (whole == 0) continue;
      const ByteView w = ByteView(data).first(whole);
      Block ma{}, mb{};
      ASSERT_TRUE(bound[k]->cbc_mac(iv, w, ma).ok());
      ASSERT_TRUE(host[k]->cbc_mac(iv, w, mb).ok());
      EXPECT_EQ(ma, mb) << "cbc n=" << whole << " key " << k;
      Bytes ea(whole), eb(whole);
      ASSERT_TRUE(bound[k]->encrypt_blocks(w, ea).ok());
      ASSERT_TRUE(host[k]->encrypt_blocks(w, eb).ok());
      EXPECT_EQ(ea, eb) << "ecb n=" << whole;
      Block p1{}, p2{}, q1{}, q2{};
      const ByteView d2 = ByteView(data).subspan(16, std::min<std::size_t>(whole, 4096));
      ASSERT_TRUE(bound[k]->cbc_mac_pair(mb, w, iv, d2, p1, p2).ok());
      ASSERT_TRUE(host[k]->cbc_mac(mb, w, q1).ok());
      ASSERT_TRUE(host[k]->cbc_mac(iv, d2, q2).ok());
      EXPECT_EQ(p1, q1) << "pair 1 n=" << whole;
      EXPECT_EQ(p2, q2) << "pair 2 n=" << whole;
    }
  }
  for (int k = 0; k < 3; ++k) {
    EXPECT_EQ(bound[k]->counters().fallbacks, 0u);
    EXPECT_GT(bound[k]->counters().updates, 0u);
    EXPECT_EQ(fallback[k]->counters().init_calls, 0u);
    EXPECT_FALSE(bound[k]->broken());
  }
  // Bad sizes are refused without touching the operations.
  Block m{};
  Bytes out(17);
  EXPECT_EQ(bound[0]->cbc_mac(iv, ByteView(data).first(15), m).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(bound[0]->encrypt_blocks(ByteView(data).first(17), out).error().code,
            Errc::invalid_argument);
  EXPECT_FALSE(bound[0]->broken());
  // Sessions go back to the pool and serve the next key.
  bound[0].reset();
  EXPECT_EQ(pool.stats().in_use, 4u);
  auto h = import_meter_key(s, keys[0]);
  ASSERT_TRUE(h.ok());
  auto again = pool.bind(*h);
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(pool.stats().sessions, 6u);
  Bytes a(200), b(200);
  ASSERT_TRUE(again->ctr_xor(iv, ByteView(data).first(200), a).ok());
  ASSERT_TRUE(host[0]->ctr_xor(iv, ByteView(data).first(200), b).ok());
  EXPECT_EQ(a, b);
  // The pool's bound: 16 sessions, 8 keys; the ninth gets none.
  std::vector<std::unique_ptr<BoundAes>> more;
  for (int i = 0; i < 5; ++i) {
    more.push_back(pool.bind(*h));
    EXPECT_NE(more.back(), nullptr) << i;
  }
  EXPECT_EQ(pool.bind(*h), nullptr);
  EXPECT_EQ(pool.stats().sessions, 16u);
}

// When the token ends a bound operation (here: its session is closed behind its back), the
// call that meets the failure and every later one are served by the fallback with the same
// results, and the session is not given back to the pool.
TEST_F(HsmTest, BoundAesFallsBackWhenItsOperationEnds) {
  auto s = user_session();
  const Bytes key = hex("6624c7e23034e4036fe5cb3a8b5dab44");
  auto h = import_meter_key(s, key);
  ASSERT_TRUE(h.ok());
  BoundAesPool pool(*module_, slot_, 8);
  auto f = HsmAes::make(s, *h);
  auto o = HostAes::make(key);
  ASSERT_TRUE(f.ok() && o.ok());
  Bytes data(256, 0x42);
  Block iv{};
  iv[3] = 9;
  for (bool cbc : {false, true}) {
    auto b = pool.bind(*h);
    ASSERT_NE(b, nullptr);
    b->set_fallback(f->get());
    ASSERT_EQ(detail::fl(*module_)->C_CloseSession(b->session_for_test(cbc)), CKR_OK);
    Bytes x(200), y(200);
    Block m1{}, m2{};
    ASSERT_TRUE(b->ctr_xor(iv, ByteView(data).first(200), x).ok());
    ASSERT_TRUE((*o)->ctr_xor(iv, ByteView(data).first(200), y).ok());
    EXPECT_EQ(x, y);
    ASSERT_TRUE(b->cbc_mac(iv, data, m1).ok());
    ASSERT_TRUE((*o)->cbc_mac(iv, data, m2).ok());
    EXPECT_EQ(m1, m2);
    EXPECT_TRUE(b->broken()) << cbc;
    EXPECT_GE(b->counters().fallbacks, 1u);
    // Without a fallback a broken cipher is an error, never a wrong answer.
    b->set_fallback(nullptr);
    EXPECT_EQ(b->cbc_mac(iv, data, m1).error().code, Errc::hsm_failure);
    const auto before = pool.stats().sessions;
    b.reset();
    EXPECT_EQ(pool.stats().sessions, before - 1) << "the closed session is forgotten";
    EXPECT_EQ(pool.stats().in_use, 0u);
  }
}

// A cache with a pool binds a key on its first hit, not on the miss (KeyAux::bound); EAX' runs
// on the bound operations with the paper vector's MAC; eviction and erase give the sessions back
// before the key object goes.
TEST_F(HsmTest, MeterKeyCacheBindsOperationsToItsKeys) {
  auto s = user_session();
  const EaxSample v;
  auto w = import_and_wrap_meter_key(s, kek_, v.key);
  auto w2 = import_and_wrap_meter_key(s, kek_, hex("22222222222222222222222222222222"));
  auto w3 = import_and_wrap_meter_key(s, kek_, hex("33333333333333333333333333333333"));
  ASSERT_TRUE(w.ok() && w2.ok() && w3.ok());
  BoundAesPool pool(*module_, slot_, 64);
  MeterKeyCache cache(s, kek_, 2);
  cache.bind_operations(&pool);
  KeyAux* aux = nullptr;
  auto h = cache.get(7, *w, &aux);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(aux->bound, nullptr) << "a key looked up once is not bound";
  EXPECT_EQ(pool.stats().sessions, 0u);
  ASSERT_TRUE(cache.get(7, *w, &aux).ok());
  ASSERT_NE(aux->bound, nullptr);
  EXPECT_EQ(aux->bound->key(), *h);
  auto aes = HsmAes::make(s, kNoObject);
  ASSERT_TRUE(aes.ok());
  for (int round = 0; round < 2; ++round) {
    auto e = gs::eax_for_key(**aes, *h, aux);
    ASSERT_TRUE(e.ok());
    Bytes data = v.plaintext;
    auto m = e->encrypt(v.cleartext, data);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(Bytes(m->begin(), m->end()), v.mac) << round;
    ASSERT_TRUE(e->decrypt(v.cleartext, data, *m).ok());
    EXPECT_EQ(data, v.plaintext);
  }
  EXPECT_EQ((*aes)->counters().init_calls, 0u) << "EAX' ran on the bound operations only";
  EXPECT_GT(aux->bound->counters().updates, 0u);
  EXPECT_EQ(pool.stats().in_use, 2u);
  // The token ends one of them: that message falls back, the next hit binds afresh.
  ASSERT_EQ(detail::fl(*module_)->C_CloseSession(aux->bound->session_for_test(false)), CKR_OK);
  {
    auto e = gs::eax_for_key(**aes, *h, aux);
    ASSERT_TRUE(e.ok());
    Bytes data = v.plaintext;
    auto m = e->encrypt(v.cleartext, data);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(Bytes(m->begin(), m->end()), v.mac);
    EXPECT_TRUE(aux->bound->broken());
  }
  KeyAux* rebound = nullptr;
  ASSERT_TRUE(cache.get(7, *w, &rebound).ok());
  ASSERT_NE(rebound->bound, nullptr);
  EXPECT_FALSE(rebound->bound->broken());
  EXPECT_EQ(pool.stats().in_use, 2u);
  EXPECT_EQ(pool.stats().sessions, 2u) << "the closed session was forgotten, one new opened";
  ASSERT_TRUE(cache.get(8, *w2).ok());
  EXPECT_EQ(pool.stats().in_use, 2u);
  ASSERT_TRUE(cache.get(8, *w2).ok());
  EXPECT_EQ(pool.stats().in_use, 4u);
  ASSERT_TRUE(cache.get(9, *w3).ok());  // evicts 7
  EXPECT_EQ(pool.stats().in_use, 2u);
  ASSERT_TRUE(cache.get(9, *w3).ok());
  EXPECT_EQ(pool.stats().in_use, 4u);
  EXPECT_EQ(pool.stats().sessions, 4u) << "the evicted key's sessions serve the new one";
  EXPECT_FALSE(object_attributes(s, *h).ok());
  cache.erase(8);
  EXPECT_EQ(pool.stats().in_use, 2u);
  cache.erase(9);
  EXPECT_EQ(pool.stats().in_use, 0u);
  EXPECT_EQ(pool.stats().sessions, 4u);
  // After a lost session, reset() forgets the bound sessions without touching them.
  ASSERT_TRUE(cache.get(8, *w2).ok());
  ASSERT_TRUE(cache.get(8, *w2).ok());
  EXPECT_EQ(pool.stats().in_use, 2u);
  cache.reset(kek_);
  EXPECT_EQ(pool.stats().in_use, 0u);
  EXPECT_EQ(pool.stats().sessions, 2u);
}

// ---- pool, random -------------------------------------------------------------------------------

TEST_F(HsmTest, PoolIsBoundedAndReopensLostSessions) {
  auto pool = SessionPool::make(*module_, slot_, Secret(std::string_view(kUserPin)), 2);
  ASSERT_TRUE(pool.ok()) << pool.error().message();
  {
    auto a = (*pool)->acquire();
    auto b = (*pool)->acquire();
    ASSERT_TRUE(a.ok() && b.ok());
    auto c = (*pool)->acquire(std::chrono::milliseconds(50));
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.error().code, Errc::too_large);
  }
  Bytes digest(32, 0x5a);
  // Handles are looked up per call: they do not survive the loss of every session.
  auto sign = [&](Session& s) -> Result<Signature> {
    GS_ASSIGN(ObjectHandle key, find_object(s, ObjectClass::private_key, "gs-cmd-1"));
    return sign_digest(s, key, digest);
  };
  ASSERT_TRUE((*pool)->run(sign).ok());
  // Pull the sessions out from under the pool (as a token reset would).
  ASSERT_TRUE(module_->close_all_sessions(slot_).ok());
  EXPECT_EQ((*pool)->reopened(), 0u);
  EXPECT_EQ((*pool)->generation(), 0u);
  auto sig = (*pool)->run(sign);
  keeper_->close();  // closed under it too: SetUp of the next test reopens it
  ASSERT_TRUE(sig.ok()) << sig.error().message();
  EXPECT_GE((*pool)->reopened(), 1u);
  EXPECT_EQ((*pool)->generation(), 1u);

  // Several threads share two sessions.
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        if ((*pool)->run(sign).ok()) {
          ++ok;
        }
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(ok.load(), 100);
  EXPECT_EQ(SessionPool::make(*module_, slot_, Secret(std::string_view(kUserPin)), 0).error().code,
            Errc::invalid_argument);
}

TEST_F(HsmTest, SessionIsMoveOnlyAndClosesOnce) {
  auto s = Session::open(*module_, slot_);
  ASSERT_TRUE(s.ok());
  Session a = std::move(*s);
  EXPECT_TRUE(a.is_open());
  Session b = std::move(a);
  EXPECT_FALSE(a.is_open());  // NOLINT(bugprone-use-after-move)
  EXPECT_TRUE(b.is_open());
  b.close();
  EXPECT_FALSE(b.is_open());
  Bytes r(16);
  EXPECT_EQ(generate_random(b, r).error().code, Errc::invalid_argument);
}

TEST_F(HsmTest, RandomAndObjectLookup) {
  auto s = user_session();
  Bytes a(32), b(32);
  ASSERT_TRUE(generate_random(s, a).ok());
  ASSERT_TRUE(generate_random(s, b).ok());
  EXPECT_NE(a, b);
  EXPECT_NE(a, Bytes(32, 0));
  Bytes huge((1 << 20) + 1);
  EXPECT_EQ(generate_random(s, huge).error().code, Errc::too_large);
  EXPECT_EQ(find_object(s, ObjectClass::private_key, "gs-nothing").error().code, Errc::not_found);
  EXPECT_EQ(find_object(s, ObjectClass::private_key, "").error().code, Errc::invalid_argument);
  EXPECT_EQ(find_object(s, ObjectClass::private_key, std::string(200, 'x')).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(generate_ec_p256(s, "", EcKeyUse::sign).error().code, Errc::invalid_argument);
  EXPECT_EQ(generate_aes_key(s, {"x", 24, false, true}).error().code, Errc::invalid_argument);
  // Two pairs with one label make lookups ambiguous rather than picking one.
  ASSERT_TRUE(generate_ec_p256(s, "gs-dup", EcKeyUse::sign).ok());
  ASSERT_TRUE(generate_ec_p256(s, "gs-dup", EcKeyUse::sign).ok());
  EXPECT_EQ(find_object(s, ObjectClass::private_key, "gs-dup").error().code, Errc::bad_value);
}

}  // namespace
}  // namespace gs::hsm
