// A throw-away TLS PKI for tests and demos: a P-256 CA with server and client certificates,
// written as PEM files into a directory. Never for production use.
#pragma once

#include <string>

#include "gridseal/result.h"

namespace gs::pki {

struct TestPkiOptions {
  std::string ca_cn = "gridseal test CA";
  std::string server_cn = "gridseal-test-server";  // SAN: IP 127.0.0.1, ::1, DNS localhost
  std::string client_cn = "head-end-test";
  std::string organization = "gridseal test";
  int days = 2;
};

// File paths of what make_test_pki wrote.
struct TestPki {
  std::string dir;
  std::string ca_cert, ca_key;
  std::string server_cert, server_key;
  std::string client_cert, client_key;
};

// Creates dir (if needed) and writes ca.pem, ca.key, server.pem, server.key, client.pem,
// client.key (keys unencrypted, mode 0600).
Result<TestPki> make_test_pki(const std::string& dir, const TestPkiOptions& options = {});

// Issues one more certificate from the CA of `pki`: a client certificate (clientAuth) or a
// server one (serverAuth, SAN 127.0.0.1/::1/localhost), written to cert_path and key_path.
Status issue_certificate(const TestPki& pki, const std::string& common_name, bool server,
                         const std::string& cert_path, const std::string& key_path,
                         int days = 2);

}  // namespace gs::pki
