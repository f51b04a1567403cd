// Test PKI generator: P-256 keys and X.509 v3 certificates made with the OpenSSL 3 APIs.
#include "src/test_pki.h"

#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <memory>

namespace gs::pki {

namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct X509Free {
  void operator()(X509* p) const { X509_free(p); }
};
struct FileClose {
  void operator()(FILE* f) const { std::fclose(f); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;
using FilePtr = std::unique_ptr<FILE, FileClose>;

Result<PkeyPtr> new_key() {
  PkeyPtr k(EVP_EC_gen("P-256"));
  if (!k) return {Errc::crypto_failure, "EC key generation failed"};
  return k;
}

bool add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (ext == nullptr) return false;
  bool ok = X509_add_ext(cert, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  return ok;
}

// A certificate for `key` named `cn`, signed by issuer_key (self-signed when issuer is null).
Result<X509Ptr> make_cert(EVP_PKEY* key, const std::string& cn, const std::string& org,
                          X509* issuer, EVP_PKEY* issuer_key, int kind /*0 CA, 1 server, 2 client*/,
                          int days) {
  X509Ptr cert(X509_new());
  if (!cert) return {Errc::crypto_failure, "X509_new failed"};
  X509* c = cert.get();
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) return {Errc::crypto_failure, "RAND_bytes failed"};
  serial[0] &= 0x7F;
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  bool ok = bn != nullptr && X509_set_version(c, 2) == 1 &&
            BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(c)) != nullptr;
  BN_free(bn);
  ok = ok && X509_gmtime_adj(X509_getm_notBefore(c), -3600) != nullptr &&
       X509_gmtime_adj(X509_getm_notAfter(c), static_cast<long>(days) * 86400) != nullptr &&
       X509_set_pubkey(c, key) == 1;
  X509_NAME* name = X509_get_subject_name(c);
  ok = ok &&
       X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8,
                                  reinterpret_cast<const unsigned char*>(org.c_str()), -1, -1,
                                  0) == 1 &&
       X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                  reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1,
                                  0) == 1;
  X509* iss = issuer != nullptr ? issuer : c;
  ok = ok && X509_set_issuer_name(c, X509_get_subject_name(iss)) == 1;
  if (!ok) return {Errc::crypto_failure, "cannot fill the certificate"};
  if (kind == 0) {
    ok = add_ext(c, iss, NID_basic_constraints, "critical,CA:TRUE") &&
         add_ext(c, iss, NID_key_usage, "critical,keyCertSign,cRLSign") &&
         add_ext(c, iss, NID_subject_key_identifier, "hash");
  } else {
    ok = add_ext(c, iss, NID_basic_constraints, "critical,CA:FALSE") &&
         add_ext(c, iss, NID_key_usage, "critical,digitalSignature") &&
         add_ext(c, iss, NID_ext_key_usage, kind == 1 ? "serverAuth" : "clientAuth") &&
         add_ext(c, iss, NID_subject_key_identifier, "hash") &&
         add_ext(c, iss, NID_authority_key_identifier, "keyid:always");
    if (ok && kind == 1) {
      ok = add_ext(c, iss, NID_subject_alt_name, "IP:127.0.0.1,IP:::1,DNS:localhost");
    }
  }
  if (!ok) return {Errc::crypto_failure, "cannot add certificate extensions"};
  if (X509_sign(c, issuer_key, EVP_sha256()) <= 0) {
    return {Errc::crypto_failure, "certificate signing failed"};
  }
  return cert;
}

Status write_cert(const std::string& path, X509* cert) {
  FilePtr f(std::fopen(path.c_str(), "wb"));
  if (!f) return {Errc::storage_failure, "cannot write " + path};
  if (PEM_write_X509(f.get(), cert) != 1) return {Errc::storage_failure, "cannot write " + path};
  return {};
}

Status write_key(const std::string& path, EVP_PKEY* key) {
  std::remove(path.c_str());
  mode_t old = umask(077);
  FilePtr f(std::fopen(path.c_str(), "wb"));
  umask(old);
  if (!f) return {Errc::storage_failure, "cannot write " + path};
  if (PEM_write_PrivateKey(f.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return {Errc::storage_failure, "cannot write " + path};
  }
  return {};
}

Result<X509Ptr> read_cert(const std::string& path) {
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) return {Errc::not_found, "cannot read " + path};
  X509Ptr c(PEM_read_X509(f.get(), nullptr, nullptr, nullptr));
  if (!c) return {Errc::bad_value, "not a PEM certificate: " + path};
  return c;
}

Result<PkeyPtr> read_key(const std::string& path) {
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) return {Errc::not_found, "cannot read " + path};
  PkeyPtr k(PEM_read_PrivateKey(f.get(), nullptr, nullptr, nullptr));
  if (!k) return {Errc::bad_value, "not a PEM private key: " + path};
  return k;
}

Status issue(X509* ca, EVP_PKEY* ca_key, const std::string& cn, const std::string& org,
             bool server, const std::string& cert_path, const std::string& key_path, int days) {
  GS_ASSIGN(auto key, new_key());
  GS_ASSIGN(auto cert, make_cert(key.get(), cn, org, ca, ca_key, server ? 1 : 2, days));
  GS_TRY(write_key(key_path, key.get()));
  return write_cert(cert_path, cert.get());
}

}  // namespace

Result<TestPki> make_test_pki(const std::string& dir, const TestPkiOptions& o) {
  std::error_code fec;
  std::filesystem::create_directories(dir, fec);
  if (fec) return {Errc::storage_failure, "cannot create " + dir};
  TestPki p;
  p.dir = dir;
  p.ca_cert = dir + "/ca.pem";
  p.ca_key = dir + "/ca.key";
  p.server_cert = dir + "/server.pem";
  p.server_key = dir + "/server.key";
  p.client_cert = dir + "/client.pem";
  p.client_key = dir + "/client.key";
  GS_ASSIGN(auto ca_key, new_key());
  GS_ASSIGN(auto ca, make_cert(ca_key.get(), o.ca_cn, o.organization, nullptr, ca_key.get(), 0,
                               o.days));
  GS_TRY(write_key(p.ca_key, ca_key.get()));
  GS_TRY(write_cert(p.ca_cert, ca.get()));
  GS_TRY(issue(ca.get(), ca_key.get(), o.server_cn, o.organization, true, p.server_cert,
               p.server_key, o.days));
  GS_TRY(issue(ca.get(), ca_key.get(), o.client_cn, o.organization, false, p.client_cert,
               p.client_key, o.days));
  return p;
}

Status issue_certificate(const TestPki& pki, const std::string& common_name, bool server,
                         const std::string& cert_path, const std::string& key_path, int days) {
  GS_ASSIGN(auto ca, read_cert(pki.ca_cert));
  GS_ASSIGN(auto ca_key, read_key(pki.ca_key));
  return issue(ca.get(), ca_key.get(), common_name, "gridseal test", server, cert_path, key_path,
               days);
}

}  // namespace gs::pki
