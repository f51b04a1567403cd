// Blocking C12.22 client: Asio operations driven by run_for() so that every step has a timeout.
#include <utility>  // before Asio

#include "src/client.h"

#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <optional>
#include <vector>

#include "c1222/framer.h"

namespace gs::server {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
using asio::ip::tcp;
using boost::system::error_code;

struct Client::Impl {
  ClientConfig cfg;
  asio::io_context io;
  std::optional<ssl::context> tls;
  std::optional<tcp::socket> plain;
  std::optional<ssl::stream<tcp::socket>> secure;
  c1222::Framer framer;
  std::vector<std::uint8_t> buf = std::vector<std::uint8_t>(16384);

  explicit Impl(const ClientConfig& c) : cfg(c), framer(c.max_frame) {}

  tcp::socket& lowest() { return secure ? secure->next_layer() : *plain; }

  // Runs the io_context until `done` or the timeout; on a timeout the socket is closed.
  bool run(const bool& done) {
    io.restart();
    auto deadline = std::chrono::steady_clock::now() + cfg.timeout;
    while (!done) {
      auto left = deadline - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) break;
      if (io.run_one_for(left) == 0 && io.stopped()) io.restart();
    }
    if (!done) {
      error_code ec;
      lowest().close(ec);
      io.restart();
      io.run_for(std::chrono::milliseconds(100));  // let the aborted operation complete
      return false;
    }
    return true;
  }
};

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

Result<std::unique_ptr<Client>> Client::connect(const ClientConfig& config) {
  auto impl = std::make_unique<Impl>(config);
  error_code ec;
  auto addr = asio::ip::make_address(config.host, ec);
  if (ec) return {Errc::invalid_argument, "client host is not an IP address: " + config.host};
  if (config.plain_tcp) {
    impl->plain.emplace(impl->io);
  } else {
    impl->tls.emplace(ssl::context::tls_client);
    SSL_CTX* c = impl->tls->native_handle();
    SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION);
    SSL_CTX_set_default_passwd_cb(c, [](char*, int, int, void*) { return 0; });
    impl->tls->set_verify_mode(ssl::verify_peer, ec);
    if (!ec) impl->tls->load_verify_file(config.tls.ca_file, ec);
    if (ec) return {Errc::invalid_argument, "cannot load CA file " + config.tls.ca_file};
    if (!config.tls.cert_file.empty()) {
      impl->tls->use_certificate_chain_file(config.tls.cert_file, ec);
      if (!ec) impl->tls->use_private_key_file(config.tls.key_file, ssl::context::pem, ec);
      if (ec) return {Errc::invalid_argument, "cannot load client certificate or key"};
    }
    impl->secure.emplace(impl->io, *impl->tls);
    if (!config.server_name.empty()) {
      X509_VERIFY_PARAM* param = SSL_get0_param(impl->secure->native_handle());
      error_code ip_ec;
      asio::ip::make_address(config.server_name, ip_ec);
      int ok = ip_ec ? X509_VERIFY_PARAM_set1_host(param, config.server_name.c_str(), 0)
                     : X509_VERIFY_PARAM_set1_ip_asc(param, config.server_name.c_str());
      if (ok != 1) return {Errc::invalid_argument, "bad server name " + config.server_name};
      if (ip_ec) SSL_set_tlsext_host_name(impl->secure->native_handle(), config.server_name.c_str());
    }
  }
  bool done = false;
  impl->lowest().async_connect(tcp::endpoint(addr, config.port), [&](error_code e) {
    ec = e;
    done = true;
  });
  if (!impl->run(done)) return {Errc::busy, "connect timed out"};
  if (ec) return {Errc::not_found, "cannot connect: " + ec.message()};
  impl->lowest().set_option(tcp::no_delay(true), ec);
  if (impl->secure) {
    done = false;
    impl->secure->async_handshake(ssl::stream_base::client, [&](error_code e) {
      ec = e;
      done = true;
    });
    if (!impl->run(done)) return {Errc::busy, "TLS handshake timed out"};
    if (ec) return {Errc::crypto_failure, "TLS handshake failed: " + ec.message()};
  }
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Status Client::send(ByteView data) {
  Impl& s = *impl_;
  bool done = false;
  error_code ec;
  auto cb = [&](error_code e, std::size_t) {
    ec = e;
    done = true;
  };
  if (s.secure) {
    asio::async_write(*s.secure, asio::buffer(data.data(), data.size()), cb);
  } else {
    asio::async_write(*s.plain, asio::buffer(data.data(), data.size()), cb);
  }
  if (!s.run(done)) return {Errc::busy, "send timed out"};
  if (ec) return {Errc::truncated, "send failed: " + ec.message()};
  return {};
}

Result<Bytes> Client::receive() {
  Impl& s = *impl_;
  for (;;) {
    GS_ASSIGN(auto frame, s.framer.next());
    if (frame) return std::move(*frame);
    bool done = false;
    error_code ec;
    std::size_t got = 0;
    auto cb = [&](error_code e, std::size_t n) {
      ec = e;
      got = n;
      done = true;
    };
    if (s.secure) {
      s.secure->async_read_some(asio::buffer(s.buf), cb);
    } else {
      s.plain->async_read_some(asio::buffer(s.buf), cb);
    }
    if (!s.run(done)) return {Errc::busy, "receive timed out"};
    if (got > 0) s.framer.feed(ByteView(s.buf.data(), got));
    if (ec && got == 0) return {Errc::truncated, "connection closed: " + ec.message()};
  }
}

Result<Bytes> Client::call(ByteView request) {
  GS_TRY(send(request));
  return receive();
}

void Client::shutdown_send() {
  error_code ec;
  impl_->lowest().shutdown(tcp::socket::shutdown_send, ec);
}

void Client::close() {
  error_code ec;
  impl_->lowest().close(ec);
}

}  // namespace gs::server
