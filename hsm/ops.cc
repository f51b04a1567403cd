// PKCS#11 object and mechanism calls with gridseal's attribute policy (DESIGN §3.2, §4).
#include "hsm/ops.h"

#include <algorithm>
#include <cstring>

#include "hsm/p11.h"

namespace gs::hsm {
namespace {

using detail::attr_bool;
using detail::attr_bytes;
using detail::attr_of;

constexpr std::uint8_t kP256Params[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr std::size_t kMaxLabel = 128;
constexpr std::size_t kMaxFound = 4096;
constexpr std::size_t kMaxRandom = 1 << 20;

CK_FUNCTION_LIST* F(Session& s) { return detail::fl(s.module()); }

CK_OBJECT_CLASS ck_class(ObjectClass c) {
  switch (c) {
    case ObjectClass::public_key:
      return CKO_PUBLIC_KEY;
    case ObjectClass::private_key:
      return CKO_PRIVATE_KEY;
    case ObjectClass::secret_key:
      break;
  }
  return CKO_SECRET_KEY;
}

Status need_open(Session& s) {
  if (!s.is_open()) {
    return Error(Errc::invalid_argument, "HSM session is closed");
  }
  return {};
}

Status check_label(std::string_view label) {
  if (label.empty() || label.size() > kMaxLabel) {
    return Error(Errc::invalid_argument, "object label must be 1..128 characters");
  }
  return {};
}

// The meter-key policy of DESIGN §4; CKA_MODIFIABLE=false is appended by the caller last.
// `extra` holds the attributes that differ per creation route (value, value length).
struct MeterTemplate {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_ULONG len = 16;
  std::vector<CK_ATTRIBUTE> attrs;

  MeterTemplate(ByteView value, bool with_len) {
    attrs = {attr_of(CKA_CLASS, &cls),
             attr_of(CKA_KEY_TYPE, &type),
             attr_bool(CKA_TOKEN, false),
             attr_bool(CKA_PRIVATE, true),
             attr_bool(CKA_SENSITIVE, true),
             attr_bool(CKA_EXTRACTABLE, true),
             attr_bool(CKA_WRAP_WITH_TRUSTED, true),
             attr_bool(CKA_ENCRYPT, true),
             attr_bool(CKA_DECRYPT, false),
             attr_bool(CKA_SIGN, false),
             attr_bool(CKA_VERIFY, false),
             attr_bool(CKA_WRAP, false),
             attr_bool(CKA_UNWRAP, false),
             attr_bool(CKA_DERIVE, false)};
    if (!value.empty()) {
      attrs.push_back(attr_bytes(CKA_VALUE, value.data(), value.size()));
    }
    if (with_len) {
      attrs.push_back(attr_of(CKA_VALUE_LEN, &len));
    }
    attrs.push_back(attr_bool(CKA_MODIFIABLE, false));  // last: everything above is now fixed
  }
};

// The entries the KEK's CKA_UNWRAP_TEMPLATE forces (a subset of MeterTemplate, same values).
std::vector<CK_ATTRIBUTE> kek_unwrap_template() {
  return {attr_bool(CKA_PRIVATE, true),  attr_bool(CKA_SENSITIVE, true),
          attr_bool(CKA_WRAP_WITH_TRUSTED, true), attr_bool(CKA_DECRYPT, false),
          attr_bool(CKA_SIGN, false),    attr_bool(CKA_WRAP, false),
          attr_bool(CKA_UNWRAP, false),  attr_bool(CKA_DERIVE, false),
          attr_bool(CKA_MODIFIABLE, false)};
}

Result<Bytes> get_bytes_attr(Session& s, ObjectHandle h, CK_ATTRIBUTE_TYPE t, std::size_t max,
                             const char* what) {
  CK_ATTRIBUTE a{t, nullptr, 0};
  GS_TRY(s.check(what, F(s)->C_GetAttributeValue(s.handle(), h, &a, 1)));
  if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > max) {
    return Error(Errc::too_large, std::string(what) + ": attribute too large");
  }
  Bytes out(a.ulValueLen);
  a.pValue = out.data();
  GS_TRY(s.check(what, F(s)->C_GetAttributeValue(s.handle(), h, &a, 1)));
  out.resize(std::min<std::size_t>(out.size(), a.ulValueLen));
  return out;
}

}  // namespace

// ---- objects ----------------------------------------------------------------------------------

Result<std::vector<ObjectHandle>> find_objects(Session& s, ObjectClass cls, std::string_view label,
                                               bool include_session_objects) {
  GS_TRY(need_open(s));
  GS_TRY(check_label(label));
  CK_OBJECT_CLASS c = ck_class(cls);
  std::vector<CK_ATTRIBUTE> t = {attr_of(CKA_CLASS, &c),
                                 attr_bytes(CKA_LABEL, label.data(), label.size())};
  if (!include_session_objects) {
    t.push_back(attr_bool(CKA_TOKEN, true));
  }
  GS_TRY(s.check("C_FindObjectsInit",
                 F(s)->C_FindObjectsInit(s.handle(), t.data(), static_cast<CK_ULONG>(t.size()))));
  std::vector<ObjectHandle> found;
  CK_OBJECT_HANDLE batch[64];
  Status st;
  for (;;) {
    CK_ULONG n = 0;
    st = s.check("C_FindObjects", F(s)->C_FindObjects(s.handle(), batch, 64, &n));
    if (!st.ok() || n == 0) {
      break;
    }
    n = std::min<CK_ULONG>(n, 64);
    found.insert(found.end(), batch, batch + n);
    if (found.size() > kMaxFound) {
      st = Error(Errc::too_large, "too many objects labelled '" + std::string(label) + "'");
      break;
    }
  }
  Status fin = s.check("C_FindObjectsFinal", F(s)->C_FindObjectsFinal(s.handle()));
  GS_TRY(st);
  GS_TRY(fin);
  return found;
}

Result<ObjectHandle> find_object(Session& s, ObjectClass cls, std::string_view label) {
  GS_ASSIGN(auto v, find_objects(s, cls, label, false));
  if (v.empty()) {
    return Error(Errc::not_found, "no HSM object labelled '" + std::string(label) + "'");
  }
  if (v.size() > 1) {
    return Error(Errc::bad_value, "several HSM objects labelled '" + std::string(label) + "'");
  }
  return v.front();
}

Result<ObjectAttributes> object_attributes(Session& s, ObjectHandle h) {
  GS_TRY(need_open(s));
  struct B {
    CK_ATTRIBUTE_TYPE t;
    bool ObjectAttributes::*m;
  };
  static constexpr B kBools[] = {
      {CKA_TOKEN, &ObjectAttributes::token},
      {CKA_PRIVATE, &ObjectAttributes::private_object},
      {CKA_MODIFIABLE, &ObjectAttributes::modifiable},
      {CKA_SENSITIVE, &ObjectAttributes::sensitive},
      {CKA_EXTRACTABLE, &ObjectAttributes::extractable},
      {CKA_ALWAYS_SENSITIVE, &ObjectAttributes::always_sensitive},
      {CKA_NEVER_EXTRACTABLE, &ObjectAttributes::never_extractable},
      {CKA_TRUSTED, &ObjectAttributes::trusted},
      {CKA_WRAP_WITH_TRUSTED, &ObjectAttributes::wrap_with_trusted},
      {CKA_ENCRYPT, &ObjectAttributes::encrypt},
      {CKA_DECRYPT, &ObjectAttributes::decrypt},
      {CKA_SIGN, &ObjectAttributes::sign},
      {CKA_VERIFY, &ObjectAttributes::verify},
      {CKA_WRAP, &ObjectAttributes::wrap},
      {CKA_UNWRAP, &ObjectAttributes::unwrap},
      {CKA_DERIVE, &ObjectAttributes::derive},
  };
  ObjectAttributes out;
  CK_OBJECT_CLASS cls = 0;
  CK_ATTRIBUTE a = attr_of(CKA_CLASS, &cls);
  GS_TRY(s.check("C_GetAttributeValue", F(s)->C_GetAttributeValue(s.handle(), h, &a, 1)));
  out.object_class = cls == CKO_PUBLIC_KEY    ? ObjectClass::public_key
                     : cls == CKO_PRIVATE_KEY ? ObjectClass::private_key
                                              : ObjectClass::secret_key;
  // One attribute per call so that one the class lacks does not hide the others.
  for (const auto& b : kBools) {
    CK_BBOOL v = CK_FALSE;
    CK_ATTRIBUTE q{b.t, &v, sizeof v};
    CK_RV rv = F(s)->C_GetAttributeValue(s.handle(), h, &q, 1);
    if (rv == CKR_OK && q.ulValueLen == sizeof v) {
      out.*(b.m) = v == CK_TRUE;
    } else if (rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_ATTRIBUTE_SENSITIVE) {
      GS_TRY(s.check("C_GetAttributeValue", rv));
    }
  }
  if (out.object_class == ObjectClass::secret_key) {
    CK_ULONG len = 0;
    CK_ATTRIBUTE q = attr_of(CKA_VALUE_LEN, &len);
    if (F(s)->C_GetAttributeValue(s.handle(), h, &q, 1) == CKR_OK) {
      out.value_len = len;
    }
  }
  auto label = get_bytes_attr(s, h, CKA_LABEL, kMaxLabel * 2, "C_GetAttributeValue(CKA_LABEL)");
  if (label.ok()) {
    out.label.assign(label->begin(), label->end());
  }
  return out;
}

Result<Bytes> read_value(Session& s, ObjectHandle h) {
  GS_TRY(need_open(s));
  return get_bytes_attr(s, h, CKA_VALUE, 4096, "C_GetAttributeValue(CKA_VALUE)");
}

Status destroy_object(Session& s, ObjectHandle h) {
  GS_TRY(need_open(s));
  return s.check("C_DestroyObject", F(s)->C_DestroyObject(s.handle(), h));
}

// ---- EC P-256 ---------------------------------------------------------------------------------

Result<KeyPair> generate_ec_p256(Session& s, std::string_view label, EcKeyUse use,
                                 bool session_copyable) {
  GS_TRY(need_open(s));
  GS_TRY(check_label(label));
  const bool sign = use == EcKeyUse::sign;
  CK_ATTRIBUTE pub[] = {
      attr_bool(CKA_TOKEN, true),
      attr_bool(CKA_PRIVATE, false),
      attr_bytes(CKA_LABEL, label.data(), label.size()),
      attr_bytes(CKA_EC_PARAMS, kP256Params, sizeof kP256Params),
      attr_bool(CKA_VERIFY, sign),
      attr_bool(CKA_DERIVE, false),
      attr_bool(CKA_ENCRYPT, false),
      attr_bool(CKA_WRAP, false),
      attr_bool(CKA_MODIFIABLE, false),
  };
  CK_ATTRIBUTE priv[] = {
      attr_bool(CKA_TOKEN, true),
      attr_bool(CKA_PRIVATE, true),
      attr_bytes(CKA_LABEL, label.data(), label.size()),
      attr_bool(CKA_SENSITIVE, true),
      attr_bool(CKA_EXTRACTABLE, false),
      attr_bool(CKA_SIGN, sign),
      attr_bool(CKA_SIGN_RECOVER, false),
      attr_bool(CKA_DERIVE, !sign),
      attr_bool(CKA_DECRYPT, false),
      attr_bool(CKA_UNWRAP, false),
      attr_bool(CKA_MODIFIABLE, session_copyable),  // last
  };
  CK_MECHANISM mech{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  KeyPair kp;
  GS_TRY(s.check("C_GenerateKeyPair",
                 F(s)->C_GenerateKeyPair(s.handle(), &mech, pub, std::size(pub), priv,
                                         std::size(priv), &kp.public_key, &kp.private_key)));
  return kp;
}

Result<KeyPair> generate_ephemeral_ec_p256(Session& s) {
  GS_TRY(need_open(s));
  CK_ATTRIBUTE pub[] = {
      attr_bool(CKA_TOKEN, false),
      attr_bool(CKA_PRIVATE, false),
      attr_bytes(CKA_EC_PARAMS, kP256Params, sizeof kP256Params),
      attr_bool(CKA_VERIFY, false),
      attr_bool(CKA_DERIVE, false),
      attr_bool(CKA_ENCRYPT, false),
      attr_bool(CKA_WRAP, false),
      attr_bool(CKA_MODIFIABLE, false),
  };
  CK_ATTRIBUTE priv[] = {
      attr_bool(CKA_TOKEN, false),
      attr_bool(CKA_PRIVATE, true),
      attr_bool(CKA_SENSITIVE, true),
      attr_bool(CKA_EXTRACTABLE, false),
      attr_bool(CKA_SIGN, false),
      attr_bool(CKA_SIGN_RECOVER, false),
      attr_bool(CKA_DERIVE, true),
      attr_bool(CKA_DECRYPT, false),
      attr_bool(CKA_UNWRAP, false),
      attr_bool(CKA_MODIFIABLE, false),  // last
  };
  CK_MECHANISM mech{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  KeyPair kp;
  GS_TRY(s.check("C_GenerateKeyPair(ephemeral)",
                 F(s)->C_GenerateKeyPair(s.handle(), &mech, pub, std::size(pub), priv,
                                         std::size(priv), &kp.public_key, &kp.private_key)));
  return kp;
}

Result<ObjectHandle> copy_to_session(Session& s, ObjectHandle token_key) {
  GS_TRY(need_open(s));
  CK_ATTRIBUTE t[] = {attr_bool(CKA_TOKEN, false), attr_bool(CKA_MODIFIABLE, false)};
  CK_OBJECT_HANDLE h = 0;
  CK_RV rv = F(s)->C_CopyObject(s.handle(), token_key, t, std::size(t), &h);
  if (rv == CKR_ATTRIBUTE_READ_ONLY) {
    return Error(Errc::unsupported,
                 "C_CopyObject: CKR_ATTRIBUTE_READ_ONLY (key is CKA_MODIFIABLE=false; the token "
                 "cannot make a session copy of it)");
  }
  GS_TRY(s.check("C_CopyObject", rv));
  return h;
}

SigningHandle signing_handle(Session& s, ObjectHandle token_key, bool want_copy) {
  SigningHandle out;
  out.handle = token_key;
  if (!want_copy) {
    out.note = "session copies off (hsm.command_key_session_copy = false)";
    return out;
  }
  // Any refusal (a key made CKA_MODIFIABLE=false, an HSM whose policy forbids copying private
  // keys) leaves the token key, which signs the same, only slower.
  auto copy = copy_to_session(s, token_key);
  if (!copy.ok()) {
    out.note = copy.error().message();
    return out;
  }
  out.handle = *copy;
  out.session_copy = true;
  return out;
}

Result<Signature> sign_digest(Session& s, ObjectHandle private_key, ByteView digest) {
  GS_TRY(need_open(s));
  if (digest.size() != 32) {
    return Error(Errc::invalid_argument, "ECDSA P-256 signs a 32-byte SHA-256 digest");
  }
  CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
  GS_TRY(s.check("C_SignInit", F(s)->C_SignInit(s.handle(), &mech, private_key)));
  Signature sig{};
  CK_ULONG len = sig.size();
  GS_TRY(s.check("C_Sign", F(s)->C_Sign(s.handle(), const_cast<CK_BYTE*>(digest.data()),
                                        digest.size(), sig.data(), &len)));
  if (len != sig.size()) {
    return Error(Errc::crypto_failure, "C_Sign: unexpected ECDSA signature length");
  }
  return sig;
}

Status verify_digest(Session& s, ObjectHandle public_key, ByteView digest, ByteView signature) {
  GS_TRY(need_open(s));
  if (digest.size() != 32) {
    return Error(Errc::invalid_argument, "ECDSA P-256 verifies a 32-byte SHA-256 digest");
  }
  if (signature.size() != kSignatureSize) {
    return Error(Errc::bad_signature, "ECDSA P-256 signature must be 64 bytes (r||s)");
  }
  CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
  GS_TRY(s.check("C_VerifyInit", F(s)->C_VerifyInit(s.handle(), &mech, public_key)));
  return s.check("C_Verify",
                 F(s)->C_Verify(s.handle(), const_cast<CK_BYTE*>(digest.data()), digest.size(),
                                const_cast<CK_BYTE*>(signature.data()), signature.size()));
}

Result<EcPoint> export_ec_point(Session& s, ObjectHandle public_key) {
  GS_TRY(need_open(s));
  GS_ASSIGN(Bytes v, get_bytes_attr(s, public_key, CKA_EC_POINT, 256,
                                    "C_GetAttributeValue(CKA_EC_POINT)"));
  ByteView p(v);
  // DER OCTET STRING (04 41 <point>) as PKCS#11 specifies, or the raw point some modules give.
  if (p.size() == kEcPointSize + 2 && p[0] == 0x04 && p[1] == kEcPointSize) {
    p = p.subspan(2);
  }
  if (p.size() != kEcPointSize || p[0] != 0x04) {
    return Error(Errc::bad_value, "CKA_EC_POINT is not an uncompressed P-256 point");
  }
  EcPoint out{};
  std::copy(p.begin(), p.end(), out.begin());
  return out;
}

Result<ObjectHandle> import_ec_public(Session& s, ByteView point) {
  GS_TRY(need_open(s));
  if (point.size() != kEcPointSize || point[0] != 0x04) {
    return Error(Errc::invalid_argument, "EC point must be 65 bytes, uncompressed (04|x|y)");
  }
  std::uint8_t der[kEcPointSize + 2] = {0x04, static_cast<std::uint8_t>(kEcPointSize)};
  std::memcpy(der + 2, point.data(), point.size());
  CK_OBJECT_CLASS cls = CKO_PUBLIC_KEY;
  CK_KEY_TYPE type = CKK_EC;
  CK_ATTRIBUTE t[] = {
      attr_of(CKA_CLASS, &cls),
      attr_of(CKA_KEY_TYPE, &type),
      attr_bool(CKA_TOKEN, false),
      attr_bytes(CKA_EC_PARAMS, kP256Params, sizeof kP256Params),
      attr_bytes(CKA_EC_POINT, der, sizeof der),
      attr_bool(CKA_VERIFY, true),
      attr_bool(CKA_MODIFIABLE, false),
  };
  CK_OBJECT_HANDLE h = 0;
  GS_TRY(s.check("C_CreateObject", F(s)->C_CreateObject(s.handle(), t, std::size(t), &h)));
  return h;
}

Result<ObjectHandle> import_ec_private(Session& s, ByteView scalar, EcKeyUse use) {
  GS_TRY(need_open(s));
  if (scalar.size() != 32) {
    return Error(Errc::invalid_argument, "P-256 private scalar must be 32 bytes");
  }
  CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
  CK_KEY_TYPE type = CKK_EC;
  const bool sign = use == EcKeyUse::sign;
  CK_ATTRIBUTE t[] = {
      attr_of(CKA_CLASS, &cls),
      attr_of(CKA_KEY_TYPE, &type),
      attr_bool(CKA_TOKEN, false),
      attr_bool(CKA_PRIVATE, true),
      attr_bool(CKA_SENSITIVE, true),
      attr_bool(CKA_EXTRACTABLE, false),
      attr_bytes(CKA_EC_PARAMS, kP256Params, sizeof kP256Params),
      attr_bytes(CKA_VALUE, scalar.data(), scalar.size()),
      attr_bool(CKA_SIGN, sign),
      attr_bool(CKA_DERIVE, !sign),
      attr_bool(CKA_DECRYPT, false),
      attr_bool(CKA_UNWRAP, false),
      attr_bool(CKA_MODIFIABLE, false),
  };
  CK_OBJECT_HANDLE h = 0;
  GS_TRY(s.check("C_CreateObject", F(s)->C_CreateObject(s.handle(), t, std::size(t), &h)));
  return h;
}

// ---- AES --------------------------------------------------------------------------------------

Result<ObjectHandle> generate_aes_key(Session& s, const AesKeySpec& spec) {
  GS_TRY(need_open(s));
  GS_TRY(check_label(spec.label));
  if (spec.bytes != 16 && spec.bytes != 32) {
    return Error(Errc::invalid_argument, "AES key size must be 16 or 32 bytes");
  }
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_ULONG len = spec.bytes;
  CK_ATTRIBUTE t[] = {
      attr_of(CKA_CLASS, &cls),
      attr_of(CKA_KEY_TYPE, &type),
      attr_of(CKA_VALUE_LEN, &len),
      attr_bool(CKA_TOKEN, spec.token),
      attr_bool(CKA_PRIVATE, true),
      attr_bytes(CKA_LABEL, spec.label.data(), spec.label.size()),
      attr_bool(CKA_SENSITIVE, true),
      attr_bool(CKA_EXTRACTABLE, false),
      attr_bool(CKA_ENCRYPT, spec.encrypt),
      attr_bool(CKA_DECRYPT, spec.decrypt),
      attr_bool(CKA_WRAP, spec.wrap),
      attr_bool(CKA_UNWRAP, spec.unwrap),
      attr_bool(CKA_DERIVE, spec.derive),
      attr_bool(CKA_SIGN, false),
      attr_bool(CKA_VERIFY, false),
      attr_bool(CKA_MODIFIABLE, false),
  };
  CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE h = 0;
  GS_TRY(s.check("C_GenerateKey", F(s)->C_GenerateKey(s.handle(), &mech, t, std::size(t), &h)));
  return h;
}

namespace {
Status aes_crypt(Session& s, bool encrypt, ObjectHandle key, AesMode mode, const Block* iv,
                 ByteView in, MutableByteView out) {
  if (in.size() != out.size()) {
    return Error(Errc::invalid_argument, "AES: output size differs from input size");
  }
  if (in.size() > kMaxAesChunk) {
    return Error(Errc::too_large, "AES: input above 1 MiB per call");
  }
  if (mode != AesMode::ctr && in.size() % 16 != 0) {
    return Error(Errc::invalid_argument, "AES ECB/CBC: input is not whole blocks");
  }
  if (mode != AesMode::ecb && iv == nullptr) {
    return Error(Errc::invalid_argument, "AES CBC/CTR: no IV/counter");
  }
  if (in.empty()) {
    return {};
  }
  CK_MECHANISM mech{CKM_AES_ECB, nullptr, 0};
  CK_BYTE cbc_iv[16];
  CK_AES_CTR_PARAMS ctr{};
  if (mode == AesMode::cbc) {
    std::memcpy(cbc_iv, iv->data(), 16);
    mech = CK_MECHANISM{CKM_AES_CBC, cbc_iv, sizeof cbc_iv};
  } else if (mode == AesMode::ctr) {
    ctr.ulCounterBits = 128;
    std::memcpy(ctr.cb, iv->data(), 16);
    mech = CK_MECHANISM{CKM_AES_CTR, &ctr, sizeof ctr};
  }
  GS_TRY(need_open(s));
  CK_ULONG len = out.size();
  if (encrypt) {
    GS_TRY(s.check("C_EncryptInit", F(s)->C_EncryptInit(s.handle(), &mech, key)));
    GS_TRY(s.check("C_Encrypt", F(s)->C_Encrypt(s.handle(), const_cast<CK_BYTE*>(in.data()),
                                                in.size(), out.data(), &len)));
  } else {
    GS_TRY(s.check("C_DecryptInit", F(s)->C_DecryptInit(s.handle(), &mech, key)));
    GS_TRY(s.check("C_Decrypt", F(s)->C_Decrypt(s.handle(), const_cast<CK_BYTE*>(in.data()),
                                                in.size(), out.data(), &len)));
  }
  if (len != out.size()) {
    return Error(Errc::crypto_failure, "AES: unexpected output length");
  }
  return {};
}
}  // namespace

Status aes_encrypt(Session& s, ObjectHandle key, AesMode mode, const Block* iv, ByteView in,
                   MutableByteView out) {
  return aes_crypt(s, true, key, mode, iv, in, out);
}

Status aes_decrypt(Session& s, ObjectHandle key, AesMode mode, const Block* iv, ByteView in,
                   MutableByteView out) {
  return aes_crypt(s, false, key, mode, iv, in, out);
}

Status aes_cbc_mac_pair(Session& s, ObjectHandle key, const Block& iv1, ByteView d1,
                        const Block& iv2, ByteView d2, Block& out1, Block& out2) {
  if (d1.empty() || d2.empty() || d1.size() % 16 != 0 || d2.size() % 16 != 0) {
    return Error(Errc::invalid_argument, "CBC-MAC pair: inputs must be non-empty whole blocks");
  }
  if (d1.size() > kMaxAesChunk || d2.size() > kMaxAesChunk) {
    return Error(Errc::too_large, "CBC-MAC pair: input above 1 MiB");
  }
  GS_TRY(need_open(s));
  CK_BYTE cbc_iv[16];
  std::memcpy(cbc_iv, iv1.data(), 16);
  CK_MECHANISM mech{CKM_AES_CBC, cbc_iv, sizeof cbc_iv};
  Bytes out(std::max(d1.size(), d2.size()));
  Bytes second(d2.begin(), d2.end());
  GS_TRY(s.check("C_EncryptInit", F(s)->C_EncryptInit(s.handle(), &mech, key)));
  // From here the operation is active: every way out ends it. A failed C_EncryptUpdate has
  // already ended it (PKCS#11: any error but CKR_BUFFER_TOO_SMALL terminates the operation).
  CK_ULONG final_len = 0;
  auto end_operation = [&] {
    CK_BYTE tail[16];
    final_len = sizeof tail;
    return F(s)->C_EncryptFinal(s.handle(), tail, &final_len);
  };
  auto update = [&](ByteView in, Block& last) -> Status {
    CK_ULONG len = out.size();
    const CK_RV rv = F(s)->C_EncryptUpdate(s.handle(), const_cast<CK_BYTE*>(in.data()), in.size(),
                                           out.data(), &len);
    if (rv == CKR_BUFFER_TOO_SMALL) (void)end_operation();  // the one error that keeps it active
    if (rv != CKR_OK) return s.check("C_EncryptUpdate", rv);
    if (len != in.size()) {
      (void)end_operation();
      return Error(Errc::crypto_failure, "CBC-MAC pair: the token held back CBC output");
    }
    std::memcpy(last.data(), out.data() + in.size() - 16, 16);
    return {};
  };
  GS_TRY(update(d1, out1));
  for (std::size_t i = 0; i < 16; ++i) {
    second[i] = static_cast<std::uint8_t>(second[i] ^ iv2[i] ^ out1[i]);
  }
  Status st = update(second, out2);
  secure_zero(second.data(), second.size());
  secure_zero(out.data(), out.size());
  GS_TRY(st);
  GS_TRY(s.check("C_EncryptFinal", end_operation()));
  if (final_len != 0) return Error(Errc::crypto_failure, "CBC-MAC pair: unexpected final output");
  return {};
}

// ---- the trusted KEK and meter keys -------------------------------------------------------------

Result<ObjectHandle> create_trusted_kek(Module& m, SlotId slot, std::string_view label,
                                        const Secret& so_pin, const Secret& user_pin) {
  GS_TRY(check_label(label));
  GS_ASSIGN(Session s, Session::open(m, slot, true));
  GS_TRY(s.login(UserType::security_officer, so_pin));
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_ULONG len = 32;
  std::vector<CK_ATTRIBUTE> unwrap_t = kek_unwrap_template();
  CK_ATTRIBUTE t[] = {
      attr_of(CKA_CLASS, &cls),
      attr_of(CKA_KEY_TYPE, &type),
      attr_of(CKA_VALUE_LEN, &len),
      attr_bool(CKA_TOKEN, false),  // the SO cannot create private objects: copied below
      attr_bool(CKA_PRIVATE, false),
      attr_bytes(CKA_LABEL, label.data(), label.size()),
      attr_bool(CKA_SENSITIVE, true),
      attr_bool(CKA_EXTRACTABLE, false),
      attr_bool(CKA_TRUSTED, true),
      attr_bool(CKA_WRAP, true),
      attr_bool(CKA_UNWRAP, true),
      attr_bool(CKA_ENCRYPT, false),
      attr_bool(CKA_DECRYPT, false),
      attr_bool(CKA_SIGN, false),
      attr_bool(CKA_VERIFY, false),
      attr_bool(CKA_DERIVE, false),
      attr_bytes(CKA_UNWRAP_TEMPLATE, unwrap_t.data(), unwrap_t.size() * sizeof(CK_ATTRIBUTE)),
      // Left modifiable: SoftHSM2 refuses any C_CopyObject template on a non-modifiable object.
      // The original lives only in this session and is destroyed after the copy, which is
      // created with CKA_MODIFIABLE=false.
  };
  CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE session_kek = 0;
  GS_TRY(s.check("C_GenerateKey(KEK)",
                 F(s)->C_GenerateKey(s.handle(), &mech, t, std::size(t), &session_kek)));
  Status st = s.logout();
  if (st.ok()) {
    st = s.login(UserType::user, user_pin);
  }
  CK_OBJECT_HANDLE token_kek = 0;
  if (st.ok()) {
    CK_ATTRIBUTE copy_t[] = {attr_bool(CKA_TOKEN, true), attr_bool(CKA_PRIVATE, true),
                             attr_bool(CKA_MODIFIABLE, false)};
    st = s.check("C_CopyObject(KEK)", F(s)->C_CopyObject(s.handle(), session_kek, copy_t,
                                                         std::size(copy_t), &token_kek));
  }
  Status destroyed = destroy_object(s, session_kek);
  // No C_Logout: on SoftHSM2 it would release the handle returned below. Closing this session
  // logs the process out unless other sessions are open.
  GS_TRY(st);
  if (!destroyed.ok()) {
    // The session original would vanish with the session; still report that it lingered.
    return Error(destroyed.error().code, "KEK created but " + destroyed.error().detail);
  }
  return token_kek;
}

Result<Bytes> wrap_key(Session& s, ObjectHandle kek, ObjectHandle key) {
  GS_TRY(need_open(s));
  CK_MECHANISM mech{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  Bytes out(kMaxWrappedKey);
  CK_ULONG len = out.size();
  GS_TRY(s.check("C_WrapKey", F(s)->C_WrapKey(s.handle(), &mech, kek, key, out.data(), &len)));
  if (len > out.size()) {
    return Error(Errc::crypto_failure, "C_WrapKey: bad output length");
  }
  out.resize(len);
  return out;
}

Result<ObjectHandle> unwrap_meter_key(Session& s, ObjectHandle kek, ByteView wrapped) {
  GS_TRY(need_open(s));
  if (wrapped.size() != 24) {
    return Error(Errc::bad_length, "a wrapped AES-128 meter key is 24 bytes (AES-KWP)");
  }
  MeterTemplate mt({}, false);
  CK_MECHANISM mech{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_OBJECT_HANDLE h = 0;
  GS_TRY(s.check("C_UnwrapKey",
                 F(s)->C_UnwrapKey(s.handle(), &mech, kek, const_cast<CK_BYTE*>(wrapped.data()),
                                   wrapped.size(), mt.attrs.data(),
                                   static_cast<CK_ULONG>(mt.attrs.size()), &h)));
  return h;
}

Result<ObjectHandle> import_meter_key(Session& s, ByteView key16) {
  GS_TRY(need_open(s));
  if (key16.size() != 16) {
    return Error(Errc::invalid_argument, "a meter key is 16 bytes (AES-128)");
  }
  MeterTemplate mt(key16, false);
  CK_OBJECT_HANDLE h = 0;
  GS_TRY(s.check("C_CreateObject(meter key)",
                 F(s)->C_CreateObject(s.handle(), mt.attrs.data(),
                                      static_cast<CK_ULONG>(mt.attrs.size()), &h)));
  return h;
}

Result<Bytes> import_and_wrap_meter_key(Session& s, ObjectHandle kek, ByteView key16) {
  GS_ASSIGN(ObjectHandle h, import_meter_key(s, key16));
  auto wrapped = wrap_key(s, kek, h);
  Status d = destroy_object(s, h);
  if (!wrapped.ok()) {
    return wrapped;
  }
  GS_TRY(d);
  return wrapped;
}

Result<ObjectHandle> derive_meter_key(Session& s, ObjectHandle ec_private, ByteView peer_point,
                                      ByteView context) {
  GS_TRY(need_open(s));
  if (peer_point.size() != kEcPointSize || peer_point[0] != 0x04) {
    return Error(Errc::invalid_argument, "peer EC point must be 65 bytes, uncompressed");
  }
  if (context.size() != 16) {
    return Error(Errc::invalid_argument, "key derivation context must be 16 bytes");
  }
  CK_ECDH1_DERIVE_PARAMS ecdh{};
  ecdh.kdf = CKD_NULL;
  ecdh.ulPublicDataLen = peer_point.size();
  ecdh.pPublicData = const_cast<CK_BYTE*>(peer_point.data());
  CK_MECHANISM mech{CKM_ECDH1_DERIVE, &ecdh, sizeof ecdh};
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_ULONG zlen = 32;
  CK_ATTRIBUTE zt[] = {
      attr_of(CKA_CLASS, &cls),
      attr_of(CKA_KEY_TYPE, &type),
      attr_of(CKA_VALUE_LEN, &zlen),
      attr_bool(CKA_TOKEN, false),
      attr_bool(CKA_PRIVATE, true),
      attr_bool(CKA_SENSITIVE, true),
      attr_bool(CKA_EXTRACTABLE, false),
      attr_bool(CKA_DERIVE, true),
      attr_bool(CKA_ENCRYPT, false),
      attr_bool(CKA_DECRYPT, false),
      attr_bool(CKA_SIGN, false),
      attr_bool(CKA_WRAP, false),
      attr_bool(CKA_UNWRAP, false),
      attr_bool(CKA_MODIFIABLE, false),
  };
  CK_OBJECT_HANDLE zkey = 0;
  GS_TRY(s.check("C_DeriveKey(ECDH1)",
                 F(s)->C_DeriveKey(s.handle(), &mech, ec_private, zt, std::size(zt), &zkey)));
  CK_KEY_DERIVATION_STRING_DATA data{const_cast<CK_BYTE*>(context.data()),
                                     static_cast<CK_ULONG>(context.size())};
  CK_MECHANISM mech2{CKM_AES_ECB_ENCRYPT_DATA, &data, sizeof data};
  MeterTemplate mt({}, true);
  CK_OBJECT_HANDLE key = 0;
  Status st = s.check("C_DeriveKey(AES_ECB_ENCRYPT_DATA)",
                      F(s)->C_DeriveKey(s.handle(), &mech2, zkey, mt.attrs.data(),
                                        static_cast<CK_ULONG>(mt.attrs.size()), &key));
  Status d = destroy_object(s, zkey);
  GS_TRY(st);
  if (!d.ok()) {
    destroy_object(s, key).ok();
    return std::move(d).error();
  }
  return key;
}

Result<Block> key_update_context(Session& s, ByteView ap_title_content, std::uint8_t slot,
                                 std::uint32_t key_version) {
  GS_TRY(need_open(s));
  if (ap_title_content.empty() || ap_title_content.size() > 255) {
    return Error(Errc::invalid_argument, "AP title content must be 1..255 bytes");
  }
  Bytes in = {'G', 'S', 'K', '1', static_cast<std::uint8_t>(ap_title_content.size())};
  in.insert(in.end(), ap_title_content.begin(), ap_title_content.end());
  in.push_back(slot);
  for (int shift = 24; shift >= 0; shift -= 8) {
    in.push_back(static_cast<std::uint8_t>(key_version >> shift));
  }
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  GS_TRY(s.check("C_DigestInit", F(s)->C_DigestInit(s.handle(), &mech)));
  std::uint8_t digest[32];
  CK_ULONG len = sizeof digest;
  GS_TRY(s.check("C_Digest", F(s)->C_Digest(s.handle(), in.data(), in.size(), digest, &len)));
  if (len != sizeof digest) {
    return Error(Errc::crypto_failure, "C_Digest: unexpected SHA-256 length");
  }
  Block out{};
  std::memcpy(out.data(), digest, out.size());
  return out;
}

// ---- manufacturer transport keys ---------------------------------------------------------------

Result<TransportContext> transport_context(Session& s, std::string_view label) {
  GS_TRY(need_open(s));
  GS_TRY(check_label(label));
  Bytes in = {'G', 'S', 'T', '1', static_cast<std::uint8_t>(label.size())};
  in.insert(in.end(), label.begin(), label.end());
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  GS_TRY(s.check("C_DigestInit", F(s)->C_DigestInit(s.handle(), &mech)));
  TransportContext out{};
  CK_ULONG len = out.size();
  GS_TRY(s.check("C_Digest", F(s)->C_Digest(s.handle(), in.data(), in.size(), out.data(), &len)));
  if (len != out.size()) {
    return Error(Errc::crypto_failure, "C_Digest: unexpected SHA-256 length");
  }
  return out;
}

Result<ObjectHandle> import_transport_key(Session& s, ObjectHandle provision_private,
                                          ByteView ephemeral_point, ByteView wrapped,
                                          std::string_view label) {
  GS_TRY(need_open(s));
  GS_TRY(check_label(label));
  if (ephemeral_point.size() != kEcPointSize || ephemeral_point[0] != 0x04) {
    return Error(Errc::invalid_argument, "ephemeral public key must be 65 bytes, uncompressed");
  }
  if (wrapped.size() != 24 && wrapped.size() != 40) {
    return Error(Errc::bad_length,
                 "a wrapped transport key is 24 (AES-128) or 40 (AES-256) bytes (AES-KWP)");
  }
  GS_ASSIGN(auto existing, find_objects(s, ObjectClass::secret_key, label));
  if (!existing.empty()) {
    return Error(Errc::conflict, "a key labelled '" + std::string(label) + "' already exists");
  }
  GS_ASSIGN(TransportContext ctx, transport_context(s, label));

  // Z: ECDH(gs-provision, E) as a session AES-256 key that can only derive.
  CK_ECDH1_DERIVE_PARAMS ecdh{};
  ecdh.kdf = CKD_NULL;
  ecdh.ulPublicDataLen = ephemeral_point.size();
  ecdh.pPublicData = const_cast<CK_BYTE*>(ephemeral_point.data());
  CK_MECHANISM mech_z{CKM_ECDH1_DERIVE, &ecdh, sizeof ecdh};
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_ULONG len32 = 32;
  auto session_key = [&](bool derive, bool unwrap) {
    return std::vector<CK_ATTRIBUTE>{
        attr_of(CKA_CLASS, &cls),          attr_of(CKA_KEY_TYPE, &type),
        attr_of(CKA_VALUE_LEN, &len32),    attr_bool(CKA_TOKEN, false),
        attr_bool(CKA_PRIVATE, true),      attr_bool(CKA_SENSITIVE, true),
        attr_bool(CKA_EXTRACTABLE, false), attr_bool(CKA_DERIVE, derive),
        attr_bool(CKA_UNWRAP, unwrap),     attr_bool(CKA_ENCRYPT, false),
        attr_bool(CKA_DECRYPT, false),     attr_bool(CKA_SIGN, false),
        attr_bool(CKA_VERIFY, false),      attr_bool(CKA_WRAP, false),
        attr_bool(CKA_MODIFIABLE, false)};
  };
  auto zt = session_key(true, false);
  CK_OBJECT_HANDLE zkey = 0;
  GS_TRY(s.check("C_DeriveKey(ECDH1)",
                 F(s)->C_DeriveKey(s.handle(), &mech_z, provision_private, zt.data(),
                                   static_cast<CK_ULONG>(zt.size()), &zkey)));
  // U = AES-256-ECB_Z(C): a session key that can only unwrap.
  CK_KEY_DERIVATION_STRING_DATA data{ctx.data(), static_cast<CK_ULONG>(ctx.size())};
  CK_MECHANISM mech_u{CKM_AES_ECB_ENCRYPT_DATA, &data, sizeof data};
  auto ut = session_key(false, true);
  CK_OBJECT_HANDLE ukey = 0;
  Status st = s.check("C_DeriveKey(AES_ECB_ENCRYPT_DATA)",
                      F(s)->C_DeriveKey(s.handle(), &mech_u, zkey, ut.data(),
                                        static_cast<CK_ULONG>(ut.size()), &ukey));
  destroy_object(s, zkey).ok();
  GS_TRY(st);

  // T under U, as a token object: unwrap only, and what it unwraps gets the meter-key policy.
  std::vector<CK_ATTRIBUTE> forced = kek_unwrap_template();
  forced.insert(forced.begin(), {attr_of(CKA_CLASS, &cls), attr_of(CKA_KEY_TYPE, &type),
                                 attr_bool(CKA_TOKEN, false)});
  CK_ATTRIBUTE tt[] = {
      attr_of(CKA_CLASS, &cls),
      attr_of(CKA_KEY_TYPE, &type),
      attr_bool(CKA_TOKEN, true),
      attr_bool(CKA_PRIVATE, true),
      attr_bytes(CKA_LABEL, label.data(), label.size()),
      attr_bool(CKA_SENSITIVE, true),
      attr_bool(CKA_EXTRACTABLE, false),
      attr_bool(CKA_UNWRAP, true),
      attr_bool(CKA_WRAP, false),
      attr_bool(CKA_ENCRYPT, false),
      attr_bool(CKA_DECRYPT, false),
      attr_bool(CKA_SIGN, false),
      attr_bool(CKA_VERIFY, false),
      attr_bool(CKA_DERIVE, false),
      attr_bytes(CKA_UNWRAP_TEMPLATE, forced.data(), forced.size() * sizeof(CK_ATTRIBUTE)),
      attr_bool(CKA_MODIFIABLE, false),  // last
  };
  CK_MECHANISM mech_w{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_OBJECT_HANDLE tkey = 0;
  st = s.check("C_UnwrapKey(transport key)",
               F(s)->C_UnwrapKey(s.handle(), &mech_w, ukey, const_cast<CK_BYTE*>(wrapped.data()),
                                 static_cast<CK_ULONG>(wrapped.size()), tt, std::size(tt), &tkey));
  destroy_object(s, ukey).ok();
  GS_TRY(st);
  CK_ULONG got = 0;
  CK_ATTRIBUTE q = attr_of(CKA_VALUE_LEN, &got);
  CK_RV rv = F(s)->C_GetAttributeValue(s.handle(), tkey, &q, 1);
  // SoftHSM2 2.6.1 reports CKA_VALUE_LEN 0 for unwrapped keys and refuses it in an unwrap
  // template (CKR_ATTRIBUTE_READ_ONLY), so the length is checked where the token reports it; on
  // SoftHSM2 a T of 9..15 or 25..31 bytes is only refused at its first use.
  const CK_ULONG want = wrapped.size() == 24 ? 16 : 32;
  if (rv != CKR_OK || (got != 0 && got != want)) {
    destroy_object(s, tkey).ok();
    return Error(Errc::bad_length, "the unwrapped transport key is not an AES-128 or AES-256 key");
  }
  return tkey;
}

Status generate_random(Session& s, MutableByteView out) {
  GS_TRY(need_open(s));
  if (out.size() > kMaxRandom) {
    return Error(Errc::too_large, "random request above 1 MiB");
  }
  if (out.empty()) {
    return {};
  }
  return s.check("C_GenerateRandom",
                 F(s)->C_GenerateRandom(s.handle(), out.data(), out.size()));
}

}  // namespace gs::hsm
