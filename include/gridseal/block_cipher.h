// The AES-128 forward-cipher operations EAX' is built from, so that a key can live in OpenSSL
// (tests, the meter simulator) or behind a PKCS#11 handle (the daemons) with the same codec.
#pragma once

#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs {

// AES-128 encryption direction only: EAX' never needs the inverse cipher, and meter keys in the
// HSM carry CKA_ENCRYPT only. Implementations must be usable from one thread at a time.
class BlockCipher {
 public:
  BlockCipher() = default;
  BlockCipher(const BlockCipher&) = delete;
  BlockCipher& operator=(const BlockCipher&) = delete;
  virtual ~BlockCipher() = default;

  // out = E_K(in) block by block (ECB). in.size() == out.size(), a multiple of 16; may alias.
  virtual Status encrypt_blocks(ByteView in, MutableByteView out) = 0;

  // The last block of the CBC encryption of data with chaining value iv (a CBC-MAC that starts
  // from iv). data.size() is a non-zero multiple of 16. The default chains encrypt_blocks.
  virtual Status cbc_mac(const Block& iv, ByteView data, Block& out);

  // Two independent CBC-MACs: out1 = cbc_mac(iv1, d1), out2 = cbc_mac(iv2, d2). The default is
  // two cbc_mac calls; a PKCS#11 cipher computes both in one CBC operation (one C_EncryptInit
  // fewer, the costly call on SoftHSM2), restarting the chain for d2 by folding the chaining
  // value into its first block. out1 and out2 must be distinct objects.
  virtual Status cbc_mac_pair(const Block& iv1, ByteView d1, const Block& iv2, ByteView d2,
                              Block& out1, Block& out2);

  // out = in XOR E_K(ctr), E_K(ctr+1), ... with ctr a 128-bit big-endian counter; the last
  // block may be partial. in.size() == out.size(); may alias. The default uses encrypt_blocks.
  virtual Status ctr_xor(const Block& ctr, ByteView in, MutableByteView out);
};

}  // namespace gs
