// AES operations kept open on a meter key, so that EAX' costs C_EncryptUpdate calls only.
//
// On SoftHSM2 a C_EncryptInit costs about 16 times a C_EncryptUpdate of one block (it decrypts
// the private key object, remasks the token key and builds a new OpenSSL context; measured by
// `gs_bench --benchmark_filter=Aes_`). BoundAes keeps one ECB and one CBC encryption operation
// open on a key, each in a session of its own, for as long as the key stays in the meter-key
// cache. Every EAX' step is then one C_EncryptUpdate:
//   - CBC-MAC from any chaining value: the token's CBC operation continues from its last output
//     block, which BoundAes knows, so the first input block is XORed with (last output ^ iv);
//   - CTR: the counter blocks through the ECB operation, XORed with the data here.
// No key byte leaves the token: the operations are ordinary PKCS#11 operations that stay open.
//
// Cost: two sessions per bound key, and the token keeps each operation's state (SoftHSM2: about
// 2.3 KB of its memory per key). Sessions come from a BoundAesPool of the process and are
// reused, never closed one by one: SoftHSM2's C_CloseSession walks every handle of the
// process (tens of milliseconds with 100,000 keys), so they end with the module's C_Finalize.
// A token that limits sessions refuses C_OpenSession at some point; the pool then stops
// asking, and the keys without bound operations use HsmAes as before.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "gridseal/block_cipher.h"
#include "hsm/module.h"
#include "hsm/types.h"

namespace gs::hsm {

class BoundAes;

// The sessions that bound operations run in, for one module and slot; shared by the threads of
// a process (the free list is locked). The sessions share the token login of the process.
class BoundAesPool {
 public:
  struct Stats {
    std::uint64_t sessions = 0;      // opened so far (never closed before C_Finalize)
    std::uint64_t in_use = 0;        // held by bound keys
    std::uint64_t open_failures = 0; // C_OpenSession refusals (the pool stops asking after one)
  };

  // At most `max_sessions` sessions (two per bound key).
  BoundAesPool(Module& module, SlotId slot, std::size_t max_sessions);
  BoundAesPool(const BoundAesPool&) = delete;
  BoundAesPool& operator=(const BoundAesPool&) = delete;
  ~BoundAesPool();

  // ECB and CBC operations on `key` in two pooled sessions; nullptr when the pool is exhausted
  // or the token refuses (the caller then works without). The BoundAes gives its sessions back
  // when destroyed, so it must not outlive the pool.
  std::unique_ptr<BoundAes> bind(ObjectHandle key);

  Stats stats() const;
  Module& module() const noexcept { return *module_; }

 private:
  friend class BoundAes;
  bool take(SessionHandle& out);
  // Ends any operation left in `s` and keeps it for the next key, or forgets it when the token
  // says it is gone.
  void give_back(SessionHandle s);
  // Forgets `n` sessions in use without a token call (BoundAes::abandon).
  void forget(std::size_t n);

  Module* module_;
  SlotId slot_;
  std::size_t max_sessions_;
  mutable std::mutex mu_;
  std::vector<SessionHandle> free_;
  std::uint64_t opened_ = 0;
  std::uint64_t in_use_ = 0;
  std::uint64_t open_failures_ = 0;
  bool exhausted_ = false;
};

// A BlockCipher on one key through its open ECB and CBC operations. When an update fails (the
// token ends the operation on any error) the BoundAes is marked broken and that call and every
// later one go to the fallback cipher (an HsmAes pointed at the same key), so a message is never
// refused for it. One thread at a time.
class BoundAes final : public BlockCipher {
 public:
  struct Counters {
    std::uint64_t updates = 0;    // C_EncryptUpdate calls
    std::uint64_t fallbacks = 0;  // calls served by the fallback cipher
  };

  ~BoundAes() override;

  Status encrypt_blocks(ByteView in, MutableByteView out) override;
  Status cbc_mac(const Block& iv, ByteView data, Block& out) override;
  Status cbc_mac_pair(const Block& iv1, ByteView d1, const Block& iv2, ByteView d2, Block& out1,
                      Block& out2) override;
  // ctr_xor: BlockCipher's, the counter blocks through encrypt_blocks (one update per 32 blocks).

  // After the token lost its sessions (a device reset): the destructor forgets the two session
  // handles instead of ending their operations, since the token may have handed the same
  // numbers to new sessions of other threads by then. Every later call goes to the fallback.
  void abandon() noexcept {
    abandoned_ = true;
    broken_ = true;
  }
  // The cipher that serves the calls once this one is broken (not owned; may be null: the calls
  // then fail).
  void set_fallback(BlockCipher* fallback) noexcept { fallback_ = fallback; }
  bool broken() const noexcept { return broken_; }
  ObjectHandle key() const noexcept { return key_; }
  const Counters& counters() const noexcept { return counters_; }
  // For tests: the session of the ECB (false) or CBC (true) operation.
  SessionHandle session_for_test(bool cbc) const noexcept { return cbc ? cbc_ : ecb_; }

 private:
  friend class BoundAesPool;
  static constexpr std::size_t kChunk = 4096;
  BoundAes(BoundAesPool& pool, ObjectHandle key, SessionHandle ecb, SessionHandle cbc)
      : pool_(&pool), key_(key), ecb_(ecb), cbc_(cbc) {}
  // One C_EncryptUpdate of whole blocks in session s; false (and broken) on any failure.
  bool update(SessionHandle s, const std::uint8_t* in, std::size_t n, std::uint8_t* out);
  bool cbc_mac_bound(const Block& iv, ByteView data, Block& out);

  BoundAesPool* pool_;
  ObjectHandle key_;
  SessionHandle ecb_;
  SessionHandle cbc_;
  Block chain_{};  // the CBC operation's last output block (its IV before the first update)
  bool broken_ = false;
  bool abandoned_ = false;
  BlockCipher* fallback_ = nullptr;
  Counters counters_;
};

}  // namespace gs::hsm
