// Operator keys on a smart card or token reached by PKCS#11 (issue 7, README "Operators and
// roles"): the operator's signed request is signed by C_Sign on their own token, so the private
// key never exists in a file. Named by a PKCS#11 URI (RFC 7512 subset):
//
//   pkcs11:token=<token label>;object=<key label>?module-path=<library>&pin-source=file:<path>
//
// `pin-source` is `file:<path>` (first line; the file must not be readable by group or others)
// or `env:<VARIABLE>`; values may be percent-encoded. The key must be an EC P-256 private key
// with CKA_SIGN; the signature is CKM_ECDSA over the SHA-256 of the canonical request, the same
// r || s a PEM key gives, so the registered public key verifies both.
#pragma once

#include <string>
#include <string_view>

#include "gridseal/result.h"
#include "src/host_ecdsa.h"
#include "src/operators.h"

namespace gs::operators {

inline constexpr std::string_view kPkcs11Scheme = "pkcs11:";
inline constexpr std::size_t kMaxTokenUri = 4096;

struct TokenKeyUri {
  std::string token;        // CKA_LABEL of the token
  std::string object;       // CKA_LABEL of the private key
  std::string module_path;  // the PKCS#11 library
  std::string pin_file;     // one of these two
  std::string pin_env;
};

bool is_token_uri(std::string_view key_spec) noexcept;
// Errors name the attribute, never a PIN.
Result<TokenKeyUri> parse_token_uri(std::string_view uri);

// Opens the module, logs in to the token with the PIN, signs the request's digest with the key,
// logs out and closes the module again (one PKCS#11 module per process at a time).
Result<EcSignature> sign_request_on_token(const Request& r, const TokenKeyUri& key);

}  // namespace gs::operators
