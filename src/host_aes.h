// AES-128 BlockCipher in process memory via OpenSSL: for tests, tools and the meter simulator,
// never for the appliance's own meter keys (those stay in the HSM).
#pragma once

#include <memory>

#include "gridseal/block_cipher.h"

namespace gs {

class HostAes final : public BlockCipher {
 public:
  // key must be 16 bytes. The key schedule lives in an OpenSSL context freed (and wiped by
  // OpenSSL) with this object.
  static Result<std::unique_ptr<HostAes>> make(ByteView key);
  ~HostAes() override;

  Status encrypt_blocks(ByteView in, MutableByteView out) override;
  Status cbc_mac(const Block& iv, ByteView data, Block& out) override;
  Status ctr_xor(const Block& ctr, ByteView in, MutableByteView out) override;

 private:
  HostAes() = default;
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
};

}  // namespace gs
