// Session (RAII, login, loss tracking) and SessionPool (bounded, reopen after a lost session).
#include "hsm/session.h"

#include "hsm/p11.h"

namespace gs::hsm {

Result<Session> Session::open(Module& module, SlotId slot, bool read_write) {
  CK_FLAGS flags = CKF_SERIAL_SESSION | (read_write ? CKF_RW_SESSION : 0);
  CK_SESSION_HANDLE h = 0;
  CK_RV rv = detail::fl(module)->C_OpenSession(slot, flags, nullptr, nullptr, &h);
  if (rv != CKR_OK) {
    return ckr_error("C_OpenSession", rv);
  }
  return Session(module, slot, h);
}

Session::Session(Session&& o) noexcept
    : module_(o.module_), slot_(o.slot_), handle_(o.handle_), lost_(o.lost_) {
  o.module_ = nullptr;
  o.handle_ = 0;
}

Session& Session::operator=(Session&& o) noexcept {
  if (this != &o) {
    close();
    module_ = o.module_;
    slot_ = o.slot_;
    handle_ = o.handle_;
    lost_ = o.lost_;
    o.module_ = nullptr;
    o.handle_ = 0;
  }
  return *this;
}

Session::~Session() noexcept { close(); }

void Session::close() noexcept {
  if (module_ != nullptr) {
    detail::fl(*module_)->C_CloseSession(handle_);  // an already-invalid handle is fine
    module_ = nullptr;
    handle_ = 0;
  }
}

Status Session::check(const char* function, ReturnValue rv) noexcept {
  if (rv == CKR_OK) {
    return {};
  }
  if (ckr_session_lost(rv)) {
    lost_ = true;
  }
  return ckr_error(function, rv);
}

Status Session::login(UserType who, const Secret& pin) {
  if (!is_open()) {
    return Error(Errc::invalid_argument, "session is closed");
  }
  if (pin.empty()) {
    return Error(Errc::invalid_argument, "empty PIN");
  }
  CK_USER_TYPE t = who == UserType::security_officer ? CKU_SO : CKU_USER;
  CK_RV rv = detail::fl(*module_)->C_Login(handle_, t, const_cast<CK_UTF8CHAR*>(pin.view().data()),
                                           pin.size());
  if (rv == CKR_USER_ALREADY_LOGGED_IN) {
    return {};
  }
  return check(who == UserType::security_officer ? "C_Login(SO)" : "C_Login(user)", rv);
}

Status Session::logout() {
  if (!is_open()) {
    return Error(Errc::invalid_argument, "session is closed");
  }
  CK_RV rv = detail::fl(*module_)->C_Logout(handle_);
  if (rv == CKR_USER_NOT_LOGGED_IN) {
    return {};
  }
  return check("C_Logout", rv);
}

// ---- SessionPool ------------------------------------------------------------------------------

SessionPool::Lease::~Lease() {
  if (pool_ != nullptr && session_) {
    pool_->release(std::move(session_));
  }
}

Result<std::unique_ptr<SessionPool>> SessionPool::make(Module& module, SlotId slot, Secret user_pin,
                                                       std::size_t max_sessions) {
  if (max_sessions == 0 || max_sessions > 1024) {
    return Error(Errc::invalid_argument, "session pool size must be 1..1024");
  }
  if (user_pin.empty()) {
    return Error(Errc::invalid_argument, "empty user PIN");
  }
  std::unique_ptr<SessionPool> p(new SessionPool(module, slot, std::move(user_pin), max_sessions));
  GS_ASSIGN(auto first, p->open_logged_in());
  p->idle_.push_back(std::move(first));
  p->open_count_ = 1;
  return p;
}

SessionPool::~SessionPool() {
  std::lock_guard<std::mutex> lock(mu_);
  idle_.clear();  // leases must not outlive the pool
}

std::uint64_t SessionPool::generation() const noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  return generation_;
}

std::size_t SessionPool::reopened() const noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  return reopened_;
}

Result<std::unique_ptr<Session>> SessionPool::open_logged_in() {
  GS_ASSIGN(Session s, Session::open(module_, slot_, true));
  GS_TRY(s.login(UserType::user, pin_));
  return std::make_unique<Session>(std::move(s));
}

Result<SessionPool::Lease> SessionPool::acquire(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (!idle_.empty()) {
      auto s = std::move(idle_.back());
      idle_.pop_back();
      return Lease(this, std::move(s));
    }
    if (open_count_ < max_) {
      ++open_count_;
      lock.unlock();
      auto s = open_logged_in();
      if (!s.ok()) {
        lock.lock();
        --open_count_;
        cv_.notify_one();
        return std::move(s).error();
      }
      return Lease(this, std::move(s).value());
    }
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
        open_count_ >= max_) {
      return Error(Errc::too_large, "HSM session pool exhausted");
    }
  }
}

void SessionPool::release(std::unique_ptr<Session> s) noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  if (s->lost() || !s->is_open()) {
    // The token or the application's sessions are gone: the idle ones are stale too.
    s.reset();
    open_count_ -= 1 + idle_.size();
    reopened_ += 1 + idle_.size();
    ++generation_;
    idle_.clear();
  } else {
    idle_.push_back(std::move(s));
  }
  cv_.notify_one();
}

}  // namespace gs::hsm
