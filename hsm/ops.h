// Key generation, lookup, ECDSA, AES, wrap/unwrap, ECDH derivation and random on a Session,
// every object created with the attribute policy of DESIGN §4.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "hsm/session.h"
#include "hsm/types.h"

namespace gs::hsm {

inline constexpr std::size_t kEcPointSize = 65;  // uncompressed P-256: 04 | x | y
inline constexpr std::size_t kSignatureSize = 64;
inline constexpr std::size_t kMaxWrappedKey = 64;
using EcPoint = std::array<std::uint8_t, kEcPointSize>;
using Signature = std::array<std::uint8_t, kSignatureSize>;  // r || s

enum class ObjectClass { public_key, private_key, secret_key };

struct KeyPair {
  ObjectHandle public_key = kNoObject;
  ObjectHandle private_key = kNoObject;
};

// What an EC private key may do: command/audit/revocation keys sign, gs-provision derives.
enum class EcKeyUse { sign, derive };

// Security-relevant attributes of an object, for `hsm status` and tests. Attributes a class does
// not have read as false.
struct ObjectAttributes {
  ObjectClass object_class = ObjectClass::secret_key;
  std::string label;
  bool token = false, private_object = false, modifiable = false;
  bool sensitive = false, extractable = false, always_sensitive = false, never_extractable = false;
  bool trusted = false, wrap_with_trusted = false;
  bool encrypt = false, decrypt = false, sign = false, verify = false;
  bool wrap = false, unwrap = false, derive = false;
  unsigned long value_len = 0;  // secret keys
};

// ---- objects ----------------------------------------------------------------------------------

// The single token object of this class and label (Errc::not_found; Errc::bad_value if several).
Result<ObjectHandle> find_object(Session& s, ObjectClass cls, std::string_view label);
// All objects of this class and label; token objects only unless include_session_objects.
Result<std::vector<ObjectHandle>> find_objects(Session& s, ObjectClass cls, std::string_view label,
                                               bool include_session_objects = false);
Result<ObjectAttributes> object_attributes(Session& s, ObjectHandle h);
// CKA_VALUE; the HSM refuses it (CKR_ATTRIBUTE_SENSITIVE) for every key gridseal creates.
Result<Bytes> read_value(Session& s, ObjectHandle h);
Status destroy_object(Session& s, ObjectHandle h);

// ---- EC P-256 ---------------------------------------------------------------------------------

// Token key pair labelled `label`. Private: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE,
// CKA_EXTRACTABLE=false, CKA_SIGN only (or CKA_DERIVE only), CKA_MODIFIABLE=false last.
// session_copyable leaves the private key CKA_MODIFIABLE=true, because SoftHSM2 2.6.1 refuses
// every C_CopyObject template on a non-modifiable object (CKR_ATTRIBUTE_READ_ONLY), so only such
// a key can get the faster session copy below. Sensitive and extractable still only move the
// safe way; what a user-PIN holder could then change is the label and the usage flags.
Result<KeyPair> generate_ec_p256(Session& s, std::string_view label, EcKeyUse use,
                                 bool session_copyable = false);
// A session-object copy of a token private key (CKA_TOKEN=false, CKA_MODIFIABLE=false; stays
// sensitive and non-extractable); signs faster on SoftHSM2. Lives until the session closes or
// destroy_object. Errc::unsupported for a CKA_MODIFIABLE=false key (see above).
Result<ObjectHandle> copy_to_session(Session& s, ObjectHandle token_key);
// The handle to sign with for the token private key `token_key`: with `want_copy`, a session copy
// when the token makes one (copy_to_session), else the token key itself, with `note` saying why
// no copy was made. On SoftHSM2 a C_SignInit on a token key re-reads and locks the key's file
// and the token's generation file; on a session copy it does not (gs_bench BM_Sign_*).
struct SigningHandle {
  ObjectHandle handle = 0;
  bool session_copy = false;
  std::string note;  // empty, or why the token key itself is used
};
SigningHandle signing_handle(Session& s, ObjectHandle token_key, bool want_copy);
// ECDSA (CKM_ECDSA) of a 32-byte SHA-256 digest; one C_SignInit + one C_Sign.
Result<Signature> sign_digest(Session& s, ObjectHandle private_key, ByteView digest);
// Errc::bad_signature when the signature does not verify.
Status verify_digest(Session& s, ObjectHandle public_key, ByteView digest, ByteView signature);
// The 65-byte uncompressed point of a public key (CKA_EC_POINT, DER OCTET STRING or raw).
Result<EcPoint> export_ec_point(Session& s, ObjectHandle public_key);
// A session public-key object for a 65-byte uncompressed point (checked by the HSM).
Result<ObjectHandle> import_ec_public(Session& s, ByteView point);
// A session private-key object from a 32-byte scalar (tests and simulations only).
Result<ObjectHandle> import_ec_private(Session& s, ByteView scalar, EcKeyUse use);
// An ephemeral P-256 key pair for one key update (DESIGN §3.2), both halves SESSION objects
// (CKA_TOKEN=false, no label): the private key CKA_PRIVATE, CKA_SENSITIVE,
// CKA_EXTRACTABLE=false, CKA_DERIVE only; the public key only carries its point (read it with
// export_ec_point). The caller destroys both once the new key is derived; they also vanish
// with the session.
Result<KeyPair> generate_ephemeral_ec_p256(Session& s);

// ---- AES --------------------------------------------------------------------------------------

struct AesKeySpec {
  std::string label;
  std::size_t bytes = 16;  // 16 or 32
  bool token = true;
  bool encrypt = false, decrypt = false, wrap = false, unwrap = false, derive = false;
};
// Sensitive, non-extractable, CKA_PRIVATE AES key with exactly the uses in spec.
Result<ObjectHandle> generate_aes_key(Session& s, const AesKeySpec& spec);

enum class AesMode { ecb, cbc, ctr };
// One C_EncryptInit + one C_Encrypt. ecb/cbc: in.size() a multiple of 16; ctr: any size, iv is
// the initial 128-bit counter (128 counter bits); cbc: iv is the IV. out.size() == in.size(); may
// alias in. At most kMaxAesChunk bytes per call.
inline constexpr std::size_t kMaxAesChunk = 1 << 20;
Status aes_encrypt(Session& s, ObjectHandle key, AesMode mode, const Block* iv, ByteView in,
                   MutableByteView out);
// Two CBC-MACs in one CBC operation (C_EncryptInit, C_EncryptUpdate(d1), C_EncryptUpdate(d2'),
// C_EncryptFinal): out1 = the last block of CBC(iv1, d1); d2' is d2 with iv2 XOR out1 folded into
// its first block, so that the chain restarts from iv2 and out2 = the last block of CBC(iv2, d2).
// d1 and d2: whole blocks, non-empty, at most kMaxAesChunk each. One C_EncryptInit instead of
// two; the operation is always ended, also on errors.
Status aes_cbc_mac_pair(Session& s, ObjectHandle key, const Block& iv1, ByteView d1,
                        const Block& iv2, ByteView d2, Block& out1, Block& out2);
// The inverse direction (C_DecryptInit + C_Decrypt). Nothing in gridseal needs it; meter keys and
// the KEK refuse it (CKR_KEY_FUNCTION_NOT_PERMITTED), which the tests check.
Status aes_decrypt(Session& s, ObjectHandle key, AesMode mode, const Block* iv, ByteView in,
                   MutableByteView out);

// ---- the trusted KEK and meter keys -------------------------------------------------------------

// DESIGN §4 route on SoftHSM2: the SO generates a session AES-256 KEK (CKA_TRUSTED, wrap/unwrap
// only, CKA_UNWRAP_TEMPLATE = the meter-key policy), logs out; the user logs in and copies it to
// a private token object labelled `label`; the session original is destroyed. Must run while no
// other session of this process is logged in (at `hsm init`). Returns the token object's handle,
// valid while the process stays logged in: SoftHSM2 releases private-object handles on logout
// and every token-object handle when the process's last session on the token closes.
Result<ObjectHandle> create_trusted_kek(Module& m, SlotId slot, std::string_view label,
                                        const Secret& so_pin, const Secret& user_pin);

// Meter keys are AES-128 session objects: CKA_PRIVATE, CKA_SENSITIVE, CKA_EXTRACTABLE,
// CKA_WRAP_WITH_TRUSTED, CKA_ENCRYPT only (CKA_DECRYPT, CKA_SIGN, CKA_WRAP, CKA_UNWRAP,
// CKA_DERIVE false), CKA_MODIFIABLE=false last.
// CKM_AES_KEY_WRAP_PAD of `key` under `kek` (24 bytes for a meter key).
Result<Bytes> wrap_key(Session& s, ObjectHandle kek, ObjectHandle key);
// Unwraps a meter key (CKM_AES_KEY_WRAP_PAD) as a session object with the meter-key policy.
Result<ObjectHandle> unwrap_meter_key(Session& s, ObjectHandle kek, ByteView wrapped);
// A test-fleet meter key given in clear, created directly as a meter-key session object.
Result<ObjectHandle> import_meter_key(Session& s, ByteView key16);
// import_meter_key + wrap_key + destroy: the stored form of a test-fleet key.
Result<Bytes> import_and_wrap_meter_key(Session& s, ObjectHandle kek, ByteView key16);

// DESIGN §3.2: Z = ECDH(ec_private, peer point) (CKM_ECDH1_DERIVE, CKD_NULL) into a session
// AES-256 key, then the meter key = AES-256_Z(context) (CKM_AES_ECB_ENCRYPT_DATA) as a meter-key
// session object. The Z key is destroyed. peer: 65-byte uncompressed point; context: 16 bytes.
Result<ObjectHandle> derive_meter_key(Session& s, ObjectHandle ec_private, ByteView peer_point,
                                      ByteView context);
// context = first 16 bytes of SHA-256("GSK1" | L | AP title OID content | slot | version), the
// digest computed by the HSM (CKM_SHA256).
Result<Block> key_update_context(Session& s, ByteView ap_title_content, std::uint8_t slot,
                                 std::uint32_t key_version);

// ---- manufacturer transport keys ---------------------------------------------------------------
//
// A manufacturer sends meter keys wrapped (CKM_AES_KEY_WRAP_PAD, RFC 5649) under its own AES-128
// or AES-256 transport key T; T reaches the HSM wrapped to gs-provision, never in clear:
//   manufacturer: ephemeral P-256 pair (e, E); Z = x(e * P) with P = gs-provision's public point
//                 (`gridseal hsm export-pubkey gs-provision`); C = SHA-256("GST1" | len | label);
//                 U = AES-256-ECB_Z(C) (two blocks, 32 bytes); sends E and KWP_U(T).
//   gridseal:     the same Z, C and U inside the HSM (CKM_ECDH1_DERIVE with CKD_NULL into a
//                 session AES-256 key, CKM_SHA256, CKM_AES_ECB_ENCRYPT_DATA), then C_UnwrapKey of
//                 T under U as a token object. Z and U are session objects destroyed at once.
// `len` is one byte (the label's length, 1..128); the label binds U to the name T is stored under.
// T: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, CKA_EXTRACTABLE=false, CKA_UNWRAP only, with a
// CKA_UNWRAP_TEMPLATE forcing the meter-key policy (session objects, no CKA_DECRYPT...) on what it
// unwraps, CKA_MODIFIABLE=false last.
inline constexpr std::size_t kTransportContextSize = 32;
using TransportContext = std::array<std::uint8_t, kTransportContextSize>;
// C = SHA-256("GST1" | len(label) | label), computed by the HSM.
Result<TransportContext> transport_context(Session& s, std::string_view label);
// Imports T (24 bytes wrapped: AES-128; 40 bytes: AES-256) labelled `label` and returns its token
// handle. Errc::conflict when a secret key with this label exists; the HSM's error when the
// ephemeral point is not on the curve or the wrapped key does not authenticate.
Result<ObjectHandle> import_transport_key(Session& s, ObjectHandle provision_private,
                                          ByteView ephemeral_point, ByteView wrapped,
                                          std::string_view label);

// ---- random -----------------------------------------------------------------------------------

// C_GenerateRandom; at most 1 MiB per call.
Status generate_random(Session& s, MutableByteView out);

}  // namespace gs::hsm
