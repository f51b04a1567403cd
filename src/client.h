// A blocking C12.22 client with timeouts (TLS 1.3 with a client certificate, or plain TCP) for
// tests, tools and benchmarks: send a framed PDU, receive the next framed PDU.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/server.h"

namespace gs::server {

struct ClientConfig {
  std::string host = "127.0.0.1";  // an IP address
  std::uint16_t port = 1153;
  bool plain_tcp = false;
  // ca_file verifies the server; cert_file/key_file are the client certificate (both empty:
  // connect without one, which a gridseal server refuses).
  TlsFiles tls;
  // When set, the server certificate must match it (an IP address or a DNS name).
  std::string server_name;
  std::chrono::milliseconds timeout{5000};  // per connect, send or receive
  std::size_t max_frame = 65536;
};

class Client {
 public:
  static Result<std::unique_ptr<Client>> connect(const ClientConfig& config);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Writes all of data (one or several PDUs, or any bytes at all for negative tests).
  Status send(ByteView data);
  // The next whole PDU. Errc::truncated when the server closed the connection, Errc::busy on
  // a timeout, Errc::bad_tag/bad_length/too_large when the stream does not frame.
  Result<Bytes> receive();
  // send then receive.
  Result<Bytes> call(ByteView request);
  // Closes our sending side (the server still answers what it received).
  void shutdown_send();
  void close();

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace gs::server
