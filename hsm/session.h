// Move-only PKCS#11 Session (closed by its destructor), user/SO login, and a bounded SessionPool.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "gridseal/result.h"
#include "hsm/module.h"
#include "hsm/types.h"

namespace gs::hsm {

enum class UserType { user, security_officer };

// One PKCS#11 session. One thread at a time. Object handles it creates as session objects live
// until it closes. Every call through it records whether the session was lost (handle invalid,
// device error) so that a pool can reopen it.
class Session {
 public:
  static Result<Session> open(Module& module, SlotId slot, bool read_write = true);

  Session(Session&& o) noexcept;
  Session& operator=(Session&& o) noexcept;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() noexcept;

  // C_Login; CKR_USER_ALREADY_LOGGED_IN counts as success. The PIN is never part of an error.
  Status login(UserType who, const Secret& pin);
  Status logout();
  void close() noexcept;

  bool is_open() const noexcept { return module_ != nullptr; }
  bool lost() const noexcept { return lost_; }
  Module& module() const noexcept { return *module_; }
  SlotId slot() const noexcept { return slot_; }
  SessionHandle handle() const noexcept { return handle_; }

  // For hsm/*.cc: converts a CK_RV into a Status for `function`, noting a lost session.
  Status check(const char* function, ReturnValue rv) noexcept;

 private:
  Session(Module& m, SlotId slot, SessionHandle h) : module_(&m), slot_(slot), handle_(h) {}

  Module* module_ = nullptr;
  SlotId slot_ = 0;
  SessionHandle handle_ = 0;
  bool lost_ = false;
};

// A bounded set of logged-in user sessions on one token. acquire() hands a session to one
// thread at a time; a session that was lost is closed and reopened (and logged in again) before
// it is handed out. The pool keeps the user PIN in a zeroizing buffer for that.
class SessionPool {
 public:
  class Lease {
   public:
    Lease(Lease&& o) noexcept : pool_(o.pool_), session_(std::move(o.session_)) {
      o.pool_ = nullptr;
    }
    Lease& operator=(Lease&&) = delete;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();

    Session& operator*() noexcept { return *session_; }
    Session* operator->() noexcept { return session_.get(); }
    Session& session() noexcept { return *session_; }

   private:
    friend class SessionPool;
    Lease(SessionPool* p, std::unique_ptr<Session> s) : pool_(p), session_(std::move(s)) {}
    SessionPool* pool_;
    std::unique_ptr<Session> session_;
  };

  // Opens one session and logs in (so a wrong PIN fails here); more are opened on demand up to
  // max_sessions (1..1024).
  static Result<std::unique_ptr<SessionPool>> make(Module& module, SlotId slot, Secret user_pin,
                                                   std::size_t max_sessions);
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;
  ~SessionPool();

  // Waits up to `timeout` for a free session (Errc::too_large "pool exhausted" after it).
  Result<Lease> acquire(std::chrono::milliseconds timeout = std::chrono::milliseconds(5000));

  // Runs f(Session&) -> Result<T>/Status on a leased session; if the session was lost during f,
  // reopens it and runs f once more. f must be safe to repeat: session objects it used are gone,
  // and on SoftHSM2 token-object handles are released once the last session of the process
  // closes, so handles must be looked up again (by label) when generation() has changed.
  template <typename F>
  auto run(F&& f) -> decltype(f(std::declval<Session&>())) {
    for (int attempt = 0;; ++attempt) {
      auto lease = acquire();
      if (!lease.ok()) {
        return std::move(lease).error();
      }
      auto r = f(lease->session());
      if (r.ok() || !lease->session().lost() || attempt > 0) {
        return r;
      }
    }
  }

  Module& module() const noexcept { return module_; }
  SlotId slot() const noexcept { return slot_; }
  std::size_t max_sessions() const noexcept { return max_; }
  std::size_t reopened() const noexcept;  // sessions replaced after a loss (for tests, metrics)
  // Increments each time lost sessions are flushed: object handles cached under an older
  // generation may be invalid (see run()).
  std::uint64_t generation() const noexcept;

 private:
  SessionPool(Module& m, SlotId s, Secret pin, std::size_t max)
      : module_(m), slot_(s), pin_(std::move(pin)), max_(max) {}
  Result<std::unique_ptr<Session>> open_logged_in();
  void release(std::unique_ptr<Session> s) noexcept;

  Module& module_;
  SlotId slot_;
  Secret pin_;
  std::size_t max_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Session>> idle_;
  std::size_t open_count_ = 0;
  std::size_t reopened_ = 0;
  std::uint64_t generation_ = 0;
};

}  // namespace gs::hsm
