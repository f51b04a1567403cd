// Host-side P-256 ECDSA/ECDH, SHA-256 and AES-256 block over OpenSSL 3 EVP.
#include "src/host_ecdsa.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/param_build.h>
#include <openssl/params.h>

#include <algorithm>
#include <utility>

namespace gs {
namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* p) const noexcept { EVP_PKEY_free(p); }
};
struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* p) const noexcept { EVP_PKEY_CTX_free(p); }
};
struct BnClearFree {
  void operator()(BIGNUM* p) const noexcept { BN_clear_free(p); }
};
struct BnCtxFree {
  void operator()(BN_CTX* p) const noexcept { BN_CTX_free(p); }
};
struct GroupFree {
  void operator()(EC_GROUP* p) const noexcept { EC_GROUP_free(p); }
};
struct PointFree {
  void operator()(EC_POINT* p) const noexcept { EC_POINT_free(p); }
};
struct SigFree {
  void operator()(ECDSA_SIG* p) const noexcept { ECDSA_SIG_free(p); }
};
struct ParamBldFree {
  void operator()(OSSL_PARAM_BLD* p) const noexcept { OSSL_PARAM_BLD_free(p); }
};
struct ParamClearFree {
  // OSSL_PARAM_clear_free() is newer than OpenSSL 3.0: wipe each value, then free.
  void operator()(OSSL_PARAM* p) const noexcept {
    for (OSSL_PARAM* it = p; it != nullptr && it->key != nullptr; ++it) {
      if (it->data != nullptr && it->data_size > 0) {
        OPENSSL_cleanse(it->data, it->data_size);
      }
    }
    OSSL_PARAM_free(p);
  }
};
struct CipherCtxFree {
  void operator()(EVP_CIPHER_CTX* p) const noexcept { EVP_CIPHER_CTX_free(p); }
};
struct OpensslFree {
  void operator()(unsigned char* p) const noexcept { OPENSSL_free(p); }
};

using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree>;
using BnPtr = std::unique_ptr<BIGNUM, BnClearFree>;
using BnCtxPtr = std::unique_ptr<BN_CTX, BnCtxFree>;
using GroupPtr = std::unique_ptr<EC_GROUP, GroupFree>;
using PointPtr = std::unique_ptr<EC_POINT, PointFree>;
using SigPtr = std::unique_ptr<ECDSA_SIG, SigFree>;
using ParamBldPtr = std::unique_ptr<OSSL_PARAM_BLD, ParamBldFree>;
using ParamPtr = std::unique_ptr<OSSL_PARAM, ParamClearFree>;
using CipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree>;
using OsslBytesPtr = std::unique_ptr<unsigned char, OpensslFree>;

constexpr const char* kCurveName = SN_X9_62_prime256v1;  // "prime256v1"

// An OpenSSL failure: drop its queued errors (they are not ours to report) and say what failed.
Error crypto_error(const char* what) {
  ERR_clear_error();
  return Error(Errc::crypto_failure, what);
}

GroupPtr p256_group() { return GroupPtr(EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1)); }

// An EVP_PKEY from an encoded public point and, optionally, the private scalar.
Result<PkeyPtr> build_pkey(const EcPoint& pub, const BIGNUM* priv) {
  ParamBldPtr bld(OSSL_PARAM_BLD_new());
  if (!bld ||
      OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, kCurveName, 0) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, pub.data(),
                                       pub.size()) != 1 ||
      (priv != nullptr && OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, priv) != 1)) {
    return crypto_error("building EC key parameters");
  }
  ParamPtr params(OSSL_PARAM_BLD_to_param(bld.get()));
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1) {
    return crypto_error("EC key import");
  }
  EVP_PKEY* raw = nullptr;
  const int selection = priv != nullptr ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY;
  if (EVP_PKEY_fromdata(ctx.get(), &raw, selection, params.get()) != 1 || raw == nullptr) {
    return crypto_error("EC key import");
  }
  return PkeyPtr(raw);
}

// Checks that an encoded point is an uncompressed point on P-256.
Status check_point(ByteView point) {
  if (point.size() != kEcPointSize) {
    return Status(Errc::invalid_argument, "EC public point is not 65 bytes");
  }
  if (point[0] != 0x04) {
    return Status(Errc::bad_value, "EC public point is not uncompressed");
  }
  GroupPtr group = p256_group();
  BnCtxPtr bn_ctx(BN_CTX_new());
  if (!group || !bn_ctx) {
    return crypto_error("EC group");
  }
  PointPtr p(EC_POINT_new(group.get()));
  if (!p) {
    return crypto_error("EC point");
  }
  if (EC_POINT_oct2point(group.get(), p.get(), point.data(), point.size(), bn_ctx.get()) != 1 ||
      EC_POINT_is_at_infinity(group.get(), p.get()) == 1 ||
      EC_POINT_is_on_curve(group.get(), p.get(), bn_ctx.get()) != 1) {
    ERR_clear_error();
    return Status(Errc::bad_value, "EC public point is not on P-256");
  }
  return {};
}

Status make_digest_ctx(EVP_PKEY_CTX* ctx) {
  if (EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) != 1) {
    return crypto_error("ECDSA digest setup");
  }
  return {};
}

}  // namespace

struct HostEcKey::Impl {
  PkeyPtr pkey;
};

HostEcKey::HostEcKey(std::unique_ptr<Impl> impl, const EcPoint& pub, bool has_private)
    : impl_(std::move(impl)), public_(pub), has_private_(has_private) {}
HostEcKey::HostEcKey(HostEcKey&&) noexcept = default;
HostEcKey& HostEcKey::operator=(HostEcKey&&) noexcept = default;
HostEcKey::~HostEcKey() = default;

namespace {
// Fetched once. With EVP_sha256() every EVP_Digest looks the algorithm up in the default library
// context's method store (a lock and a property query): 1-1.5 % of the SES handler's CPU.
const EVP_MD* sha256_md() {
  static EVP_MD* const md = EVP_MD_fetch(nullptr, "SHA2-256", nullptr);
  return md != nullptr ? md : EVP_sha256();
}
}  // namespace

Result<Sha256Digest> sha256(ByteView data) {
  Sha256Digest out{};
  unsigned int len = 0;
  static const std::uint8_t kEmpty = 0;
  const void* p = data.empty() ? &kEmpty : data.data();
  if (EVP_Digest(p, data.size(), out.data(), &len, sha256_md(), nullptr) != 1 ||
      len != out.size()) {
    return crypto_error("SHA-256");
  }
  return out;
}

Status aes256_encrypt_block(ByteView key32, const Block& in, Block& out) {
  if (key32.size() != 32) {
    return Status(Errc::invalid_argument, "AES-256 key is not 32 bytes");
  }
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx ||
      EVP_EncryptInit_ex2(ctx.get(), EVP_aes_256_ecb(), key32.data(), nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_set_padding(ctx.get(), 0) != 1) {
    return crypto_error("AES-256 setup");
  }
  Block tmp{};
  int len = 0;
  int fin = 0;
  if (EVP_EncryptUpdate(ctx.get(), tmp.data(), &len, in.data(), static_cast<int>(in.size())) != 1 ||
      len != static_cast<int>(tmp.size()) ||
      EVP_EncryptFinal_ex(ctx.get(), tmp.data() + len, &fin) != 1 || fin != 0) {
    secure_zero(tmp.data(), tmp.size());
    return crypto_error("AES-256 encrypt");
  }
  out = tmp;
  secure_zero(tmp.data(), tmp.size());
  return {};
}

Result<Block> profile_key_context(ByteView context_input) {
  GS_ASSIGN(Sha256Digest d, sha256(context_input));
  Block out{};
  std::copy_n(d.begin(), out.size(), out.begin());
  return out;
}

Result<HostEcKey> HostEcKey::generate() {
  PkeyPtr pkey(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (!pkey) {
    return crypto_error("EC key generation");
  }
  EcPoint pub{};
  std::size_t len = 0;
  if (EVP_PKEY_get_octet_string_param(pkey.get(), OSSL_PKEY_PARAM_PUB_KEY, pub.data(), pub.size(),
                                      &len) != 1 ||
      len != pub.size() || pub[0] != 0x04) {
    return crypto_error("EC public key export");
  }
  auto impl = std::make_unique<Impl>();
  impl->pkey = std::move(pkey);
  return HostEcKey(std::move(impl), pub, true);
}

Result<HostEcKey> HostEcKey::from_private(ByteView scalar32) {
  if (scalar32.size() != kEcScalarSize) {
    return Result<HostEcKey>(Errc::invalid_argument, "EC private scalar is not 32 bytes");
  }
  GroupPtr group = p256_group();
  BnCtxPtr bn_ctx(BN_CTX_new());
  BnPtr d(BN_secure_new());
  if (!group || !bn_ctx || !d ||
      BN_bin2bn(scalar32.data(), static_cast<int>(scalar32.size()), d.get()) == nullptr) {
    return crypto_error("EC private scalar");
  }
  const BIGNUM* order = EC_GROUP_get0_order(group.get());
  if (BN_is_zero(d.get()) == 1 || BN_cmp(d.get(), order) >= 0) {
    return Result<HostEcKey>(Errc::bad_value, "EC private scalar not in [1, n-1]");
  }
  PointPtr q(EC_POINT_new(group.get()));
  EcPoint pub{};
  if (!q || EC_POINT_mul(group.get(), q.get(), d.get(), nullptr, nullptr, bn_ctx.get()) != 1 ||
      EC_POINT_point2oct(group.get(), q.get(), POINT_CONVERSION_UNCOMPRESSED, pub.data(),
                         pub.size(), bn_ctx.get()) != pub.size()) {
    return crypto_error("EC public point computation");
  }
  GS_ASSIGN(PkeyPtr pkey, build_pkey(pub, d.get()));
  auto impl = std::make_unique<Impl>();
  impl->pkey = std::move(pkey);
  return HostEcKey(std::move(impl), pub, true);
}

Result<HostEcKey> HostEcKey::from_public(ByteView point65) {
  GS_TRY(check_point(point65));
  EcPoint pub{};
  std::copy(point65.begin(), point65.end(), pub.begin());
  GS_ASSIGN(PkeyPtr pkey, build_pkey(pub, nullptr));
  auto impl = std::make_unique<Impl>();
  impl->pkey = std::move(pkey);
  return HostEcKey(std::move(impl), pub, false);
}

Status HostEcKey::export_private(std::span<std::uint8_t, kEcScalarSize> out) const {
  if (!impl_ || !has_private_) {
    return Status(Errc::invalid_argument, "no private key");
  }
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(impl_->pkey.get(), OSSL_PKEY_PARAM_PRIV_KEY, &raw) != 1) {
    return crypto_error("EC private key export");
  }
  BnPtr d(raw);
  if (BN_bn2binpad(d.get(), out.data(), static_cast<int>(out.size())) !=
      static_cast<int>(out.size())) {
    secure_zero(out.data(), out.size());
    return crypto_error("EC private key export");
  }
  return {};
}

Result<EcSignature> HostEcKey::sign(ByteView digest32) const {
  if (digest32.size() != kSha256Size) {
    return Result<EcSignature>(Errc::invalid_argument, "digest is not 32 bytes");
  }
  if (!impl_ || !has_private_) {
    return Result<EcSignature>(Errc::invalid_argument, "no private key");
  }
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, impl_->pkey.get(), nullptr));
  if (!ctx || EVP_PKEY_sign_init(ctx.get()) != 1) {
    return crypto_error("ECDSA sign setup");
  }
  GS_TRY(make_digest_ctx(ctx.get()));
  std::array<unsigned char, 80> der{};  // P-256 DER signatures are at most 72 bytes
  std::size_t der_len = der.size();
  if (EVP_PKEY_sign(ctx.get(), der.data(), &der_len, digest32.data(), digest32.size()) != 1) {
    return crypto_error("ECDSA sign");
  }
  const unsigned char* p = der.data();
  SigPtr sig(d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der_len)));
  if (!sig) {
    return crypto_error("ECDSA signature decode");
  }
  const BIGNUM* r = nullptr;
  const BIGNUM* s = nullptr;
  ECDSA_SIG_get0(sig.get(), &r, &s);
  EcSignature out{};
  if (BN_bn2binpad(r, out.data(), 32) != 32 || BN_bn2binpad(s, out.data() + 32, 32) != 32) {
    return crypto_error("ECDSA signature encode");
  }
  return out;
}

Status HostEcKey::verify(ByteView digest32, ByteView signature64) const {
  if (digest32.size() != kSha256Size) {
    return Status(Errc::invalid_argument, "digest is not 32 bytes");
  }
  if (signature64.size() != kEcSignatureSize) {
    return Status(Errc::invalid_argument, "signature is not 64 bytes");
  }
  if (!impl_) {
    return Status(Errc::invalid_argument, "empty key");
  }
  BnPtr r(BN_bin2bn(signature64.data(), 32, nullptr));
  BnPtr s(BN_bin2bn(signature64.data() + 32, 32, nullptr));
  SigPtr sig(ECDSA_SIG_new());
  if (!r || !s || !sig || ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) {
    return crypto_error("ECDSA signature import");
  }
  (void)r.release();  // owned by sig now
  (void)s.release();
  unsigned char* der_raw = nullptr;
  const int der_len = i2d_ECDSA_SIG(sig.get(), &der_raw);
  OsslBytesPtr der(der_raw);
  if (der_len <= 0 || !der) {
    return crypto_error("ECDSA signature encode");
  }
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, impl_->pkey.get(), nullptr));
  if (!ctx || EVP_PKEY_verify_init(ctx.get()) != 1) {
    return crypto_error("ECDSA verify setup");
  }
  GS_TRY(make_digest_ctx(ctx.get()));
  const int rc = EVP_PKEY_verify(ctx.get(), der.get(), static_cast<std::size_t>(der_len),
                                 digest32.data(), digest32.size());
  if (rc != 1) {
    ERR_clear_error();
    return Status(Errc::bad_signature, "ECDSA signature does not verify");
  }
  return {};
}

Status HostEcKey::ecdh_x(const HostEcKey& peer, std::span<std::uint8_t, kEcScalarSize> out) const {
  if (!impl_ || !has_private_ || !peer.impl_) {
    return Status(Errc::invalid_argument, "ECDH needs a private key and a peer key");
  }
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, impl_->pkey.get(), nullptr));
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_derive_set_peer_ex(ctx.get(), peer.impl_->pkey.get(), 1) != 1) {
    return crypto_error("ECDH setup");
  }
  std::size_t len = out.size();
  if (EVP_PKEY_derive(ctx.get(), out.data(), &len) != 1 || len != out.size()) {
    secure_zero(out.data(), out.size());
    return crypto_error("ECDH derive");
  }
  return {};
}

Status HostEcKey::derive_profile_key(const HostEcKey& peer, const Block& context,
                                     Block& key_out) const {
  std::array<std::uint8_t, kEcScalarSize> z{};
  Status st = ecdh_x(peer, z);
  if (st.ok()) {
    st = aes256_encrypt_block(z, context, key_out);
  }
  secure_zero(z.data(), z.size());
  return st;
}

}  // namespace gs
