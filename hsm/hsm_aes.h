// gs::BlockCipher on a PKCS#11 AES key handle, so EAX' runs without the key in process memory.
#pragma once

#include <array>
#include <cstdint>
#include <memory>

#include "gridseal/block_cipher.h"
#include "hsm/session.h"
#include "hsm/types.h"

namespace gs::hsm {

// Each operation is one C_EncryptInit + one C_Encrypt (inputs above 4 KiB are chunked):
// encrypt_blocks -> CKM_AES_ECB, cbc_mac -> CKM_AES_CBC with the IV (last block kept),
// ctr_xor -> CKM_AES_CTR (128 counter bits). A module without CBC or CTR gets the same
// results from CKM_AES_ECB (CTR: the counter blocks encrypted in one call). Does not own the
// session or the key; one thread at a time.
class HsmAes final : public BlockCipher {
 public:
  struct Counters {
    std::uint64_t init_calls = 0;  // C_EncryptInit
    std::uint64_t op_calls = 0;    // C_Encrypt, C_EncryptUpdate and C_EncryptFinal
  };

  // Checks (C_GetMechanismInfo) which of ECB/CBC/CTR the token supports; ECB is required.
  static Result<std::unique_ptr<HsmAes>> make(Session& session, ObjectHandle key);

  Status encrypt_blocks(ByteView in, MutableByteView out) override;
  Status cbc_mac(const Block& iv, ByteView data, Block& out) override;
  // One CBC operation for both (hsm::aes_cbc_mac_pair) when the token has CBC and each input
  // fits one chunk; otherwise two cbc_mac calls.
  Status cbc_mac_pair(const Block& iv1, ByteView d1, const Block& iv2, ByteView d2, Block& out1,
                      Block& out2) override;
  Status ctr_xor(const Block& ctr, ByteView in, MutableByteView out) override;

  // Points this cipher at another key on the same session (no token call): one HsmAes per
  // session serves every cached meter key.
  void set_key(ObjectHandle key) noexcept { key_ = key; }
  ObjectHandle key() const noexcept { return key_; }
  bool uses_cbc() const noexcept { return has_cbc_; }
  bool uses_ctr() const noexcept { return has_ctr_; }
  const Counters& counters() const noexcept { return counters_; }
  void reset_counters() noexcept { counters_ = {}; }

 private:
  static constexpr std::size_t kChunk = 4096;
  HsmAes(Session& s, ObjectHandle k, bool cbc, bool ctr)
      : session_(&s), key_(k), has_cbc_(cbc), has_ctr_(ctr) {}
  Status call(int mode, const Block* iv, ByteView in, MutableByteView out);

  Session* session_;
  ObjectHandle key_;
  bool has_cbc_;
  bool has_ctr_;
  Counters counters_;
  std::array<std::uint8_t, kChunk> scratch_{};
};

}  // namespace gs::hsm
