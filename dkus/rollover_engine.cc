// The key-rollover engine: see rollover_engine.h.
#include "dkus/rollover_engine.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "dkus/dkus_service.h"
#include "gridseal/clock.h"
#include "gridseal/thread_name.h"
#include "hsm/ops.h"
#include "src/client.h"
#include "src/audit_recorder.h"
#include "src/challenge_store.h"
#include "src/command_keys.h"
#include "src/command_signer.h"
#include "src/handler_state.h"
#include "src/host_ecdsa.h"
#include "src/invocation_ids.h"
#include "src/key_store.h"
#include "src/rollover_store.h"

namespace gs::dkus {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr const char* kProgram = "gridseal-dkusd";
// A relay connection with nothing in flight for this long is closed before it is used again
// (the relay may have closed it for idleness; a send into it would waste an attempt).
constexpr auto kIdleReconnect = std::chrono::seconds(20);
constexpr auto kReconnectMin = milliseconds(100);
constexpr auto kReconnectMax = milliseconds(5000);
constexpr auto kRetirePeriod = std::chrono::seconds(60);
constexpr auto kGaugePeriod = std::chrono::seconds(2);
constexpr auto kProgressLogPeriod = std::chrono::seconds(10);
constexpr auto kCampaignRefresh = std::chrono::seconds(5);
// A queued step that prepare() left queued (the meter changed under it) waits this long.
constexpr auto kHoldAfterRefusedPrepare = std::chrono::seconds(5);
// Derivation failures of one meter's key (not of the HSM session) before its step is dropped.
constexpr std::uint32_t kMaxDeriveFailures = 3;
// How long answers may wait to be committed together with later ones.
constexpr auto kAnswerBatchWait = milliseconds(20);
// Failure log lines per period; the rest are counted and summarised.
constexpr std::size_t kLogBurst = 20;
constexpr auto kLogPeriod = std::chrono::seconds(10);

std::int64_t wall_ms() {
  return std::chrono::duration_cast<milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---- relay connections ------------------------------------------------------------------------

struct Job {
  std::int64_t campaign = 0;
  std::int64_t meter_row = 0;
  std::uint32_t invocation_id = 0;
  Bytes wire;
};

struct Reply {
  std::int64_t campaign = 0;
  std::int64_t meter_row = 0;
  std::uint32_t invocation_id = 0;
  std::optional<Bytes> answer;  // what came back, or
  std::string error;            // why nothing did
  Clock::time_point received{};
};

// `connections` blocking clients (src/client.h), each on its own thread with up to `depth`
// requests in flight. Answers come back in request order; each is matched to its job by A4
// (the front of the pipeline when A4 is missing). A timeout or a broken connection fails every
// job in flight on it; an unreachable relay fails the jobs waiting, so that their steps back off.
class RelayPool {
 public:
  RelayPool(server::ClientConfig cc, std::size_t connections, std::size_t depth)
      : cc_(std::move(cc)), connections_(connections), depth_(depth) {}
  ~RelayPool() { stop(); }
  RelayPool(const RelayPool&) = delete;
  RelayPool& operator=(const RelayPool&) = delete;

  void start() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!threads_.empty()) return;
    stopping_ = false;
    for (std::size_t i = 0; i < connections_; ++i) threads_.emplace_back([this, i] {
      name_this_thread("gs-relay");
      run(i);
    });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    jobs_cv_.notify_all();
    replies_cv_.notify_all();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
    threads_.clear();
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.clear();
  }

  void submit(std::vector<Job> jobs) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& j : jobs) jobs_.push_back(std::move(j));
    }
    jobs_cv_.notify_all();
  }

  void take(std::vector<Reply>& out) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& r : replies_) out.push_back(std::move(r));
    replies_.clear();
  }

  // Until `min_replies` replies are there, the oldest has waited `max_age`, wake() or `until`.
  void wait(Clock::time_point until, std::size_t min_replies = 1,
            Clock::duration max_age = Clock::duration::zero()) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (stopping_ || woken_ || replies_.size() >= std::max<std::size_t>(1, min_replies)) break;
      const auto now = Clock::now();
      if (now >= until) break;
      auto t = until;
      if (!replies_.empty()) {
        const auto due = replies_.front().received + max_age;
        if (due <= now) break;
        t = std::min(t, due);
      }
      replies_cv_.wait_until(lock, t);
    }
    woken_ = false;
  }

  // Until wake() or `until`, whatever arrives meanwhile.
  void pause(Clock::time_point until) {
    std::unique_lock<std::mutex> lock(mu_);
    replies_cv_.wait_until(lock, until, [&] { return stopping_ || woken_; });
    woken_ = false;
  }

  void wake() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      woken_ = true;
    }
    replies_cv_.notify_all();
  }

  std::size_t connected() const noexcept { return connected_.load(); }

  // Replies not taken yet, and when the oldest of them arrived.
  std::pair<std::size_t, Clock::time_point> waiting() {
    std::lock_guard<std::mutex> lock(mu_);
    return {replies_.size(), replies_.empty() ? Clock::time_point{} : replies_.front().received};
  }

 private:
  bool stopping() {
    std::lock_guard<std::mutex> lock(mu_);
    return stopping_;
  }

  // The next job; blocks (bounded, to look at stopping_ again) only when `block`.
  bool pop(Job& j, bool block) {
    std::unique_lock<std::mutex> lock(mu_);
    if (block) {
      jobs_cv_.wait_for(lock, std::chrono::seconds(1), [&] { return stopping_ || !jobs_.empty(); });
    }
    if (stopping_ || jobs_.empty()) return false;
    j = std::move(jobs_.front());
    jobs_.pop_front();
    return true;
  }

  void deliver(std::vector<Reply> rs) {
    const auto now = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& r : rs) {
        r.received = now;
        replies_.push_back(std::move(r));
      }
    }
    replies_cv_.notify_all();
  }

  void fail_all(std::deque<Job>& jobs, const std::string& why) {
    std::vector<Reply> rs;
    rs.reserve(jobs.size());
    for (Job& j : jobs) rs.push_back(Reply{j.campaign, j.meter_row, j.invocation_id, {}, why});
    jobs.clear();
    deliver(std::move(rs));
  }

  void run(std::size_t index) {
    std::unique_ptr<server::Client> client;
    std::deque<Job> inflight;
    auto reconnect_wait = kReconnectMin;
    Clock::time_point last_activity = Clock::now();
    Clock::time_point last_log{};
    c1222::DecodeLimits limits;
    limits.max_message = cc_.max_frame;
    auto drop_client = [&] {
      if (client) connected_.fetch_sub(1);
      client.reset();
    };
    while (!stopping()) {
      if (client && inflight.empty() && Clock::now() - last_activity > kIdleReconnect) {
        drop_client();
      }
      if (!client) {
        {
          std::unique_lock<std::mutex> lock(mu_);
          jobs_cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
          if (stopping_) break;
        }
        auto c = server::Client::connect(cc_);
        if (!c.ok()) {
          // The jobs waiting fail now (their steps back off) instead of waiting for a relay
          // that may stay down.
          std::deque<Job> waiting;
          Job j;
          while (waiting.size() < depth_ && pop(j, false)) waiting.push_back(std::move(j));
          const std::string why = "relay unreachable: " + c.error().message();
          if (Clock::now() - last_log > kLogPeriod) {
            last_log = Clock::now();
            std::fprintf(stderr, "%s: rollover relay connection=%zu address=%s:%u: %s\n", kProgram,
                         index, cc_.host.c_str(), static_cast<unsigned>(cc_.port), why.c_str());
          }
          fail_all(waiting, why);
          std::unique_lock<std::mutex> lock(mu_);
          jobs_cv_.wait_for(lock, reconnect_wait, [&] { return stopping_; });
          reconnect_wait = std::min(reconnect_wait * 2, kReconnectMax);
          continue;
        }
        client = std::move(c).value();
        connected_.fetch_add(1);
        reconnect_wait = kReconnectMin;
        last_activity = Clock::now();
      }
      // Fill the pipeline; wait for work only while nothing is in flight.
      while (client && inflight.size() < depth_) {
        Job j;
        if (!pop(j, inflight.empty())) break;
        Status st = client->send(j.wire);
        Bytes().swap(j.wire);
        inflight.push_back(std::move(j));
        last_activity = Clock::now();
        if (!st.ok()) {
          fail_all(inflight, "relay send failed: " + st.error().message());
          drop_client();
        }
      }
      if (!client || inflight.empty()) continue;
      auto r = client->receive();
      if (!r.ok()) {
        fail_all(inflight, r.error().code == Errc::busy
                               ? std::string("no answer within rollover.answer_timeout_ms")
                               : "relay connection lost: " + r.error().message());
        drop_client();
        continue;
      }
      last_activity = Clock::now();
      std::size_t at = 0;  // answers come in request order
      auto m = c1222::decode(*r, limits);
      if (m.ok() && m->called_ap_invocation_id) {
        auto id = c1222::invocation_id_value(*m->called_ap_invocation_id);
        for (std::size_t i = 0; id.ok() && i < inflight.size(); ++i) {
          if (inflight[i].invocation_id == *id) {
            at = i;
            break;
          }
        }
      }
      Job j = std::move(inflight[at]);
      inflight.erase(inflight.begin() + static_cast<std::ptrdiff_t>(at));
      std::vector<Reply> one;
      one.push_back(Reply{j.campaign, j.meter_row, j.invocation_id, std::move(r).value(), {}});
      deliver(std::move(one));
    }
    drop_client();  // jobs in flight are abandoned: their leases bring them back
  }

  server::ClientConfig cc_;
  std::size_t connections_;
  std::size_t depth_;
  std::mutex mu_;
  std::condition_variable jobs_cv_;
  std::condition_variable replies_cv_;
  std::deque<Job> jobs_;
  std::vector<Reply> replies_;
  bool stopping_ = false;
  bool woken_ = false;
  std::vector<std::thread> threads_;
  std::atomic<std::size_t> connected_{0};
};

// Rate-limited failure logging: kLogBurst lines per kLogPeriod, then a count.
class LogLimiter {
 public:
  bool allow() {
    const auto now = Clock::now();
    if (now - start_ > kLogPeriod) {
      if (suppressed_ > 0) {
        std::fprintf(stderr, "%s: rollover: %zu more step failures not logged\n", kProgram,
                     suppressed_);
      }
      start_ = now;
      lines_ = 0;
      suppressed_ = 0;
    }
    if (lines_ < kLogBurst) {
      ++lines_;
      return true;
    }
    ++suppressed_;
    return false;
  }

 private:
  Clock::time_point start_{};
  std::size_t lines_ = 0;
  std::size_t suppressed_ = 0;
};

using StepKey = std::pair<std::int64_t, std::int64_t>;  // (campaign, meter row)

// A prepared step the engine is working on.
struct Tracked {
  store::StepWork step;
  // The meter as the update in flight was built for it: its pending (new) and seal keys, which
  // open the answer.
  std::shared_ptr<const store::Meter> meter;
  std::uint32_t attempts = 0;       // sends recorded in the store
  std::uint32_t invocation_id = 0;  // of the send in flight
  bool in_flight = false;
  Clock::time_point retry_at{};  // when not in flight: send again then
  std::string last_error;
};

// What an answer means for its step.
struct Verdict {
  enum class Kind : std::uint8_t {
    confirmed,     // a good MAC under the new key: the meter holds it
    refused,       // the meter answered under another key (refusal or MT-2041 error)
    relay_error,   // the relay answered (nett, netr, uat ...), or nothing came back
    bad_answer,    // undecodable, wrong MAC, not for this command
    engine_error,  // our HSM failed while checking it: not the meter's fault
  };
  Kind kind = Kind::bad_answer;
  std::string error;
  // A meter answer that verified under a key we hold: its id raises the replay mark, and its
  // verified receipts are stored.
  bool verified = false;
  std::uint64_t message_id = 0;
  std::int64_t iv_time = 0;
  std::vector<store::Receipt> receipts;
};

const char* kind_metric(Verdict::Kind k) {
  switch (k) {
    case Verdict::Kind::confirmed:
      return "confirmed";
    case Verdict::Kind::refused:
      return "meter_refused";
    case Verdict::Kind::relay_error:
      return "relay_error";
    case Verdict::Kind::bad_answer:
      return "bad_answer";
    case Verdict::Kind::engine_error:
      return "engine_error";
  }
  return "bad_answer";
}

// Values read by the gauges at exposition time (shared with the registry's callbacks, which may
// outlive the engine).
struct GaugeValues {
  std::atomic<std::int64_t> in_flight{0};
  std::atomic<std::int64_t> queued{0};
  std::atomic<std::int64_t> prepared{0};
  std::atomic<std::int64_t> connections{0};
  std::atomic<std::int64_t> challenges_pending{0};  // queued or sent
  std::atomic<std::int64_t> meters_flagged{0};      // current challenge failed
};

// A challenge (MT-2043) in flight: Job/Reply campaign 0 (campaign ids start at 1).
constexpr std::int64_t kChallengeJob = 0;
struct ChallengeTracked {
  std::shared_ptr<const store::Meter> meter;
  c1222::Challenge challenge{};
  std::int64_t expires_at_ms = 0;
  std::uint32_t invocation_id = 0;
  std::uint32_t attempts = 0;  // sends recorded, this one included
};

// The read response of MT-2043 (ok, count 85, data, checksum), as opposed to the receipt's.
bool challenge_answer_shaped(ByteView service) {
  return service.size() == 1 + 2 + c1222::kChallengeAnswerDataSize + 1 &&
         service[0] == c1222::kRespOk && service[1] == 0x00 &&
         service[2] == c1222::kChallengeAnswerDataSize;
}

}  // namespace

// Audit records the engine writes itself (issue 7), in the transaction that makes the change:
// the receipts a meter's answer carried and the outcomes of challenges. Identities, numbers and
// reasons only (the challenge value and signature are public, but add nothing to the record).
audit::Event receipt_event(const store::Meter& m, const store::Receipt& r) {
  audit::Detail d;
  d.add("invocation_id", r.invocation_id).add("result", std::uint64_t{r.result});
  d.add("executed_at", r.executed_at).add("command_digest", to_hex(r.command_digest));
  d.add("signature", to_hex(r.signature)).add("message_id", r.message_id);
  d.add("via", "rollover");
  return audit::Event{0, audit::kSystemActor, "receipt", audit::clip(m.meter_id, audit::kMaxSubject),
                      d.str()};
}

audit::Event challenge_event(const char* event, std::string_view meter_id, std::uint32_t attempts,
                             std::string_view why) {
  audit::Detail d;
  d.add("attempts", std::uint64_t{attempts});
  if (!why.empty()) d.add("reason", audit::clip(why, audit::kMaxDetailValue));
  return audit::Event{0, audit::kSystemActor, event, audit::clip(meter_id, audit::kMaxSubject),
                      d.str()};
}

struct RolloverEngine::Impl {
  Impl(const DkusConfig& c, HsmContext& h, metrics::Registry& reg)
      : cfg(c),
        rc(c.rollover),
        hsm(h),
        head_end_abs(c.head_end_title.view().absolute(c.base_oid)),
        pool(c.rollover.relay, c.rollover.connections, c.rollover.pipeline_depth),
        rng(std::random_device{}()),
        gauges(std::make_shared<GaugeValues>()),
        prepared_total(step_counter(reg, "prepared")),
        confirmed_total(step_counter(reg, "confirmed")),
        already_total(step_counter(reg, "already_confirmed")),
        failed_total(step_counter(reg, "failed")),
        dropped_total(step_counter(reg, "dropped")),
        attempts_total(reg.counter("gridseal_rollover_attempts_total",
                                   "Key updates (MT-2041) sent to the relay")),
        confirmations(reg.counter("gridseal_rollover_confirmations_total",
                                  kRolloverConfirmationsHelp, {{"via", "answer"}})),
        retired_total(reg.counter("gridseal_rollover_keys_retired_total",
                                  "Standby keys destroyed after rollover.standby_retention_s")),
        errors_total(reg.counter("gridseal_rollover_engine_errors_total",
                                 "HSM or database operations of the rollover engine that failed")),
        challenges_sent(reg.counter("gridseal_challenge_sent_total",
                                    "MT-2043 challenges sent to meters (each attempt a fresh one)")),
        challenge_proven(challenge_counter(reg, "proven")),
        challenge_flagged(challenge_counter(reg, "flagged")),
        challenge_unanswered(challenge_counter(reg, "unanswered")),
        challenge_retried(challenge_counter(reg, "retried")) {
    for (auto k : {Verdict::Kind::confirmed, Verdict::Kind::refused, Verdict::Kind::relay_error,
                   Verdict::Kind::bad_answer, Verdict::Kind::engine_error}) {
      answers[static_cast<std::size_t>(k)] =
          &reg.counter("gridseal_rollover_answers_total",
                       "Answers to key updates by what they meant", {{"result", kind_metric(k)}});
    }
    auto g = gauges;
    reg.gauge_fn("gridseal_rollover_in_flight", "Key updates sent and not yet answered", {},
                 [g] { return static_cast<double>(g->in_flight.load()); });
    reg.gauge_fn("gridseal_rollover_queued_steps",
                 "Steps of running campaigns not yet prepared (no key derived yet)", {},
                 [g] { return static_cast<double>(g->queued.load()); });
    reg.gauge_fn("gridseal_rollover_prepared_steps",
                 "Steps prepared (new key pending) and not yet confirmed", {},
                 [g] { return static_cast<double>(g->prepared.load()); });
    reg.gauge_fn("gridseal_rollover_relay_connections", "Relay connections open", {},
                 [g] { return static_cast<double>(g->connections.load()); });
    reg.gauge_fn("gridseal_challenge_pending", "MT-2043 challenges queued or sent, not settled",
                 {}, [g] { return static_cast<double>(g->challenges_pending.load()); });
    reg.gauge_fn("gridseal_challenge_flagged_meters",
                 "Meters whose current challenge failed (wrong signature or challenge): not "
                 "rekeyed until a new challenge passes",
                 {}, [g] { return static_cast<double>(g->meters_flagged.load()); });
  }

  static metrics::Counter& challenge_counter(metrics::Registry& reg, const char* outcome) {
    return reg.counter("gridseal_challenge_results_total",
                       "MT-2043 challenges settled or retried, by outcome", {{"outcome", outcome}});
  }

  static metrics::Counter& step_counter(metrics::Registry& reg, const char* outcome) {
    return reg.counter("gridseal_rollover_steps_total", "Rollover steps by outcome",
                       {{"outcome", outcome}});
  }

  // ---- set-up -----------------------------------------------------------------------------

  Status open_store() {
    db::OpenOptions opt;
    opt.create = false;
    if (!ks) {
      auto k = store::KeyStore::open(cfg.base.store.path, opt);
      if (!k.ok()) return Error(k.error().code, cfg.base.store.path + ": " + k.error().message());
      ks.emplace(std::move(k).value());
    }
    if (cfg.audit.enabled && !rec) {
      // On the driver's connection, with the driver's HSM session (taken before each
      // BEGIN IMMEDIATE, as audit::Writer orders them).
      auto r = audit::TxRecorder::over(
          ks->db(),
          [this]() -> Result<hsm::Session*> {
            // Not re-opened here (the signer holds the session): ready() does that.
            if (!hs.hsm_ready()) return Error(Errc::hsm_failure, "audit: HSM session lost");
            return &hs.lease->session();
          },
          std::chrono::milliseconds(cfg.audit.anchor_interval_ms));
      if (!r.ok()) return Error(r.error().code, "audit: " + r.error().message());
      rec.emplace(std::move(r).value());
    }
    if (!id_alloc) {
      auto k = store::KeyStore::open(cfg.base.store.path, opt);
      if (!k.ok()) return Error(k.error().code, cfg.base.store.path + ": " + k.error().message());
      id_ks = std::make_unique<store::KeyStore>(std::move(k).value());
      ids::AllocatorOptions aopt;
      aopt.block_size = rc.id_block_size;
      aopt.max_block_age_s = static_cast<std::int64_t>(kRolloverIdBlockAgeS);
      auto a = ids::InvocationIdAllocator::over(*id_ks, aopt);
      if (!a.ok()) return std::move(a).error();
      id_alloc.emplace(std::move(a).value());
    }
    return {};
  }

  Status open_hsm() {
    if (hs.hsm_ready() && signer) return {};
    signer.reset();
    GS_TRY(hs.ensure_hsm(hsm, rc.key_cache));
    const std::string label = "gs-cmd-" + std::to_string(rc.command_key_id);
    GS_ASSIGN(const hsm::SigningHandle key, hs.signing_key(label, rc.command_key_session_copy));
    signer = std::make_unique<ses::HsmSigner>(hs.lease->session(), key.handle, rc.command_key_id);
    return {};
  }

  void hsm_failed(const std::string& why) {
    errors_total.inc();
    hsm_ok = false;
    signer.reset();
    hs.drop_hsm();
    if (err_log.allow()) std::fprintf(stderr, "%s: rollover HSM: %s\n", kProgram, why.c_str());
  }

  void store_failed(const std::string& why) {
    errors_total.inc();
    store_ok = false;
    if (err_log.allow()) std::fprintf(stderr, "%s: rollover store: %s\n", kProgram, why.c_str());
  }

  bool ready() {
    if (auto st = open_store(); !st.ok()) {
      store_failed(st.error().message());
      return false;
    }
    if (auto st = open_hsm(); !st.ok()) {
      hsm_failed(st.error().message());
      return false;
    }
    return true;
  }

  // ---- the HSM side -------------------------------------------------------------------------

  // DESIGN §3.2: an ephemeral pair, Z = ECDH(ephemeral, meter key), the new key derived from Z
  // and the context, wrapped under the current KEK generation (read now: a rotation may have
  // switched it since the last key; a key wrapped under a generation that is draining meanwhile
  // is re-wrapped by the rotation); every session object destroyed again.
  Result<store::PreparedKey> derive(const store::Meter& m, const store::SlotChoice& c,
                                    std::int64_t campaign) {
    hsm::Session& s = hs.lease->session();
    GS_ASSIGN(hsm::KeyPair kp, hsm::generate_ephemeral_ec_p256(s));
    hsm::ObjectHandle key = hsm::kNoObject;
    struct Cleanup {
      hsm::Session& s;
      const hsm::KeyPair& kp;
      const hsm::ObjectHandle& key;
      ~Cleanup() {
        if (key != hsm::kNoObject) hsm::destroy_object(s, key).ok();
        hsm::destroy_object(s, kp.private_key).ok();
        hsm::destroy_object(s, kp.public_key).ok();
      }
    } cleanup{s, kp, key};
    GS_ASSIGN(hsm::EcPoint point, hsm::export_ec_point(s, kp.public_key));
    // The context is public (title, slot, version): hashed here, not with two token calls.
    GS_ASSIGN(Bytes context_input,
              c1222::key_context_input(m.ap_title, c.target_slot, c.key_version));
    GS_ASSIGN(Sha256Digest digest, sha256(context_input));
    const ByteView context(digest.data(), c1222::kKeyContextSize);
    GS_ASSIGN(key, hsm::derive_meter_key(s, kp.private_key, m.public_key, context));
    GS_ASSIGN(const std::uint32_t gen, kek::current_generation(ks->db()));
    GS_ASSIGN(const hsm::ObjectHandle kek_h, hs.kek_handle(gen));
    GS_ASSIGN(Bytes wrapped, hsm::wrap_key(s, kek_h, key));
    store::PreparedKey pk;
    pk.campaign = campaign;
    pk.meter_row = m.row;
    pk.target_slot = c.target_slot;
    pk.key_version = c.key_version;
    pk.wrapped = std::move(wrapped);
    pk.kek = gen;
    pk.ephemeral_point.assign(point.begin(), point.end());
    pk.seal_slot = c.seal_slot;
    return pk;
  }

  // The EAX' cipher of one of the meter's stored keys (unwrapped in the HSM, cached).
  Result<c1222::EaxPrime> key_of(const store::Meter& m, const store::KeySlot& slot) {
    const std::uint64_t ref = static_cast<std::uint64_t>(m.row) * store::kSlotsPerMeter +
                              static_cast<std::uint64_t>(slot.slot);
    hsm::KeyAux* aux = nullptr;
    GS_ASSIGN(hsm::ObjectHandle h, hs.meter_key(ref, slot, &aux));
    return eax_for_key(*hs.aes, h, aux);
  }

  static bool hsm_error(const Error& e) {
    return e.code == Errc::hsm_failure || e.code == Errc::crypto_failure || e.code == Errc::busy;
  }

  // The key update of DESIGN §3.2 for a prepared step: a mode-0 request from the head-end title
  // to the meter with the MT-2041 write, then secure_command: MT-2040 class 4 first, the
  // MT-2042 receipt read appended, sealed (mode 2) under the seal slot's key.
  Result<Bytes> build_update(const store::Meter& m, const store::StepWork& st, std::uint32_t id,
                             std::uint32_t now) {
    if (st.ephemeral_point.size() != c1222::kPublicPointSize) {
      return Error(Errc::bad_value, "stored ephemeral point is not 65 bytes");
    }
    c1222::KeyUpdate ku;
    ku.target_slot = st.target_slot;
    ku.key_type = c1222::kKeyTypeAes128EaxPrime;
    ku.key_version = st.key_version;
    std::copy(st.ephemeral_point.begin(), st.ephemeral_point.end(), ku.ephemeral_public.begin());
    Bytes epsem{c1222::kEpsemReserved};  // mode 0 (sealed below), a response is wanted
    c1222::append_service(epsem, c1222::encode_key_update_service(ku));
    return build_class4(m, st.seal_slot, epsem, id, now);
  }

  // The challenge of DESIGN §3.4: the MT-2043 write of `c` and a full read of MT-2043, in a
  // class-4 command sealed under `seal_slot` (the MT-2042 receipt read appended as for updates).
  Result<Bytes> build_challenge(const store::Meter& m, std::uint8_t seal_slot,
                                const c1222::Challenge& c, std::uint32_t id, std::uint32_t now) {
    Bytes epsem{c1222::kEpsemReserved};
    c1222::append_service(epsem, c1222::encode_challenge_write(c));
    c1222::append_service(epsem, c1222::encode_full_read(c1222::kTableChallenge));
    return build_class4(m, seal_slot, epsem, id, now);
  }

  // A mode-0 request from the head-end title to the meter with the services of `epsem`, then
  // secure_command: MT-2040 class 4 first, the MT-2042 receipt read appended, sealed (mode 2)
  // under the key of `seal_slot`.
  Result<Bytes> build_class4(const store::Meter& m, std::uint8_t seal_slot, const Bytes& epsem,
                             std::uint32_t id, std::uint32_t now) {
    const store::KeySlot* seal = m.slot_for_key_id(seal_slot);
    if (seal == nullptr || seal->wrapped.empty()) {
      return Error(Errc::not_found,
                   "no stored key in seal slot " + std::to_string(seal_slot) + " any more");
    }
    // The title as imported (relative or absolute) when it names this meter, else absolute.
    c1222::OwnedApTitle title{c1222::TitleForm::absolute, m.ap_title};
    if (auto t = c1222::OwnedApTitle::parse(m.ap_title_text);
        t.ok() && t->view().absolute(cfg.base_oid) == m.ap_title) {
      title = std::move(t).value();
    }
    c1222::Message req;
    req.called_ap_title = title.view();
    req.calling_ap_title = cfg.head_end_title.view();
    req.epsem = epsem;
    ses::CommandParams p;
    p.command_class = c1222::CommandClass::key_management;
    p.not_before = now > rc.clock_skew_s ? now - rc.clock_skew_s : 0;
    p.not_after = p.not_before + rc.validity_s;
    p.now = now;
    p.invocation_id = id;
    p.head_end_title = cfg.head_end_title.view();
    p.base_oid = cfg.base_oid;
    GS_ASSIGN(c1222::EaxPrime eax, key_of(m, *seal));
    return ses::secure_command(req, m, p, *signer, eax, seal_slot);
  }

  // An answer from the relay to the command `invocation_id` for meter `m`, opened as far as it
  // goes (HSM): a final verdict (bad_answer, relay_error, refused, engine_error), or `opened`
  // with the verdict verified (message id, IV time), the opened (mode 0) message in `wire` and
  // the key id it came under. Shared by key updates and challenges.
  struct OpenedAnswer {
    Verdict v;
    bool opened = false;
    Bytes wire;
    std::uint8_t key_id = 0;
    const store::KeySlot* slot = nullptr;  // into the meter passed in
  };

  OpenedAnswer open_answer(const Bytes& answer, std::uint32_t invocation_id,
                           const store::Meter& m) {
    OpenedAnswer out;
    Verdict& v = out.v;
    if (!hs.hsm_ready() || !hs.keys) {
      v.kind = Verdict::Kind::engine_error;
      v.error = "no HSM session";
      return out;
    }
    auto bad = [&](std::string why) {
      v.kind = Verdict::Kind::bad_answer;
      v.error = std::move(why);
      return std::move(out);
    };
    c1222::DecodeLimits limits;
    limits.max_message = rc.relay.max_frame;
    auto msg = c1222::decode(answer, limits);
    if (!msg.ok()) return bad("undecodable answer: " + msg.error().message());
    if (msg->called_ap_invocation_id) {
      auto a4 = c1222::invocation_id_value(*msg->called_ap_invocation_id);
      if (!a4.ok() || *a4 != invocation_id) return bad("answer to another command");
    }
    const bool from_meter =
        msg->calling_ap_title && msg->calling_ap_title->absolute(cfg.base_oid) == m.ap_title;
    auto e = c1222::split_epsem(msg->epsem, msg->epsem_offset);
    if (!e.ok()) return bad("answer EPSEM: " + e.error().message());
    if (c1222::security_mode(e->control) == c1222::SecurityMode::cleartext) {
      // An error from the relay (nett, netr, uat ...) or a meter that could not seal.
      auto services = c1222::split_services(e->body);
      if (!services.ok() || services->empty()) return bad("cleartext answer without a code");
      const std::uint8_t code = services->front().bytes[0];
      v.kind = from_meter ? Verdict::Kind::refused : Verdict::Kind::relay_error;
      v.error = std::string(from_meter ? "meter " : "relay ") + c1222::response_code_name(code);
      return out;
    }
    if (!from_meter) return bad("secured answer from another AP title");
    if (!msg->auth || !msg->auth->iv || !msg->calling_ap_invocation_id) {
      return bad("secured answer without key id, IV or invocation id");
    }
    const std::uint8_t key_id = msg->auth->key_id.value_or(0);
    const store::KeySlot* slot = m.slot_for_key_id(key_id);
    if (slot == nullptr || slot->wrapped.empty()) {
      return bad("answer under key id " + std::to_string(key_id) + ", of which no key is stored");
    }
    auto eax = key_of(m, *slot);
    if (!eax.ok()) {
      v.kind = Verdict::Kind::engine_error;
      v.error = eax.error().message();
      return out;
    }
    c1222::SealOptions sopt;
    sopt.base_oid = cfg.base_oid;
    auto opened = c1222::open(
        *msg, [&](std::uint8_t) { return &*eax; }, sopt);
    if (!opened.ok()) {
      if (opened.error().code == Errc::bad_mac) {
        return bad("answer MAC does not verify under key id " + std::to_string(key_id));
      }
      if (hsm_error(opened.error())) {
        v.kind = Verdict::Kind::engine_error;
        v.error = opened.error().message();
        return out;
      }
      return bad("answer: " + opened.error().message());
    }
    auto id = c1222::invocation_id_value(*msg->calling_ap_invocation_id);
    if (!id.ok() || *id > static_cast<std::uint64_t>(INT64_MAX)) {
      return bad("answer invocation id not usable");
    }
    const auto& iv = *msg->auth->iv;
    v.iv_time =
        static_cast<std::int64_t>((std::uint32_t{iv[0]} << 24) | (std::uint32_t{iv[1]} << 16) |
                                  (std::uint32_t{iv[2]} << 8) | std::uint32_t{iv[3]});
    v.verified = true;
    v.message_id = *id;
    out.opened = true;
    out.wire = std::move(opened->wire);
    out.key_id = key_id;
    out.slot = slot;
    return out;
  }

  // The receipts (verified, or logged as forged) and the first error code of an opened answer.
  std::uint8_t take_receipts(const store::Meter& m, const c1222::Message& om, Verdict& v) {
    std::uint8_t first_error = 0;
    ReceiptCheck rc_check = check_receipts(m, om, v.message_id, static_cast<std::int64_t>(utc_now()));
    if (rc_check.forged) {
      if (err_log.allow()) {
        std::fprintf(stderr,
                     "%s: rollover forged receipt meter_id=%s command_id=%llu: %s (not stored)\n",
                     kProgram, m.meter_id.c_str(),
                     static_cast<unsigned long long>(rc_check.command_id), rc_check.why.c_str());
      }
    } else {
      v.receipts = std::move(rc_check.receipts);
    }
    auto oe = c1222::split_epsem(om.epsem, om.epsem_offset);
    auto services = oe.ok() ? c1222::split_services(oe->body)
                            : Result<std::vector<c1222::ServiceSpan>>(oe.error());
    if (services.ok()) {
      for (const auto& s : *services) {
        if (s.bytes[0] != c1222::kRespOk && c1222::is_response_code(s.bytes[0])) {
          first_error = s.bytes[0];
          break;
        }
      }
    }
    return first_error;
  }

  // What an answer from the relay means for the step `t` of meter `m` (HSM: opening it).
  Verdict analyze(const Bytes& answer, const Tracked& t, const store::Meter& m) {
    OpenedAnswer oa = open_answer(answer, t.invocation_id, m);
    Verdict v = std::move(oa.v);
    if (!oa.opened) return v;
    const std::uint8_t key_id = oa.key_id;
    const store::KeySlot* slot = oa.slot;
    c1222::DecodeLimits limits;
    limits.max_message = rc.relay.max_frame;
    auto om = c1222::decode(oa.wire, limits);
    const std::uint8_t first_error = om.ok() ? take_receipts(m, *om, v) : 0;
    if (key_id == t.step.target_slot && slot->key_version == t.step.key_version) {
      // Whatever the service codes say: only the meter can have sealed this under the new key.
      v.kind = Verdict::Kind::confirmed;
      return v;
    }
    v.kind = Verdict::Kind::refused;
    v.error = first_error != 0 ? std::string("meter ") + c1222::response_code_name(first_error)
                               : "meter answered under key id " + std::to_string(key_id) +
                                     " without taking the new key";
    return v;
  }

  // ---- scheduling -------------------------------------------------------------------------

  milliseconds backoff(std::uint32_t attempts) const {
    auto b = rc.backoff_initial;
    for (std::uint32_t i = 1; i < attempts && b < rc.backoff_max; ++i) b *= 2;
    return std::min(b, rc.backoff_max);
  }

  milliseconds jittered(milliseconds b) {
    std::uniform_int_distribution<std::int64_t> d(b.count() / 2, b.count());
    return milliseconds(d(rng));
  }

  // The campaign's token bucket: true when one more meter may be prepared now.
  bool rate_allows(std::int64_t campaign, Clock::time_point now, Clock::time_point* wake) {
    Bucket& b = buckets[campaign];
    if (b.refreshed == Clock::time_point{} || now - b.refreshed > kCampaignRefresh) {
      auto c = rs().campaign(campaign);
      if (c.ok() && c->has_value()) b.rate = (*c)->rate;
      b.refreshed = now;
      if (b.last == Clock::time_point{}) {
        b.last = now;
        b.tokens = 1;
      }
    }
    if (b.rate <= 0) return true;
    const double burst = std::max(1.0, b.rate);
    b.tokens =
        std::min(burst, b.tokens + std::chrono::duration<double>(now - b.last).count() * b.rate);
    b.last = now;
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return true;
    }
    const auto next = now + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>((1 - b.tokens) / b.rate));
    *wake = std::min(*wake, next);
    return false;
  }

  // The audit recorder when [audit] is on (nullptr otherwise).
  audit::TxRecorder* recorder() { return rec ? &*rec : nullptr; }
  store::RolloverStore rs() {
    store::RolloverStore r(*ks);
    r.set_audit(recorder());
    return r;
  }
  store::ChallengeStore& cs() {
    if (!chs) chs.emplace(*ks);
    return *chs;
  }

  // ---- MT-2043 challenges (DESIGN §3.4) ---------------------------------------------------

  // The key a challenge to `m` is sealed under: its active key; for a quarantined meter the
  // compromised key its revocation rollover seals the update under (the only one it holds).
  static std::optional<std::uint8_t> challenge_seal_slot(const store::Meter& m) {
    if (m.state == store::MeterState::active) {
      if (const store::KeySlot* a = m.active_slot()) return static_cast<std::uint8_t>(a->slot);
      return std::nullopt;
    }
    if (m.state == store::MeterState::quarantined) {
      if (auto c = store::choose_rollover_slot(m, store::CampaignReason::revocation)) {
        return c->seal_slot;
      }
    }
    return std::nullopt;
  }

  struct GiveUp {
    std::int64_t meter_row = 0;
    std::string meter_id;
    std::string why;
  };

  // Challenges that can never be answered -> unanswered, in one transaction.
  std::size_t give_up_challenges(const std::vector<GiveUp>& gave_up) {
    if (gave_up.empty()) return 0;
    const std::int64_t now_ms = wall_ms();
    audit::TxRecorder* a = recorder();
    auto applied = [&]() -> Status {
      if (a != nullptr) GS_TRY(a->start());
      GS_ASSIGN(auto tx, db::Transaction::begin(ks->db()));
      for (const GiveUp& g : gave_up) {
        GS_ASSIGN(bool settled, cs().settle(g.meter_row, store::ChallengeState::unanswered,
                                            g.why, {}, now_ms));
        if (settled && a != nullptr) {
          GS_TRY(a->add(challenge_event("challenge_unanswered", g.meter_id, 0, g.why)));
        }
      }
      if (a != nullptr) GS_TRY(a->finish());
      GS_TRY(tx.commit());
      if (a != nullptr) a->committed();
      return {};
    }();
    if (!applied.ok()) {
      store_failed("challenges not settled: " + applied.error().message());
      return 0;
    }
    challenge_unanswered.inc(gave_up.size());
    queued_idle_until = {};
    for (const GiveUp& g : gave_up) {
      if (!fail_log.allow()) continue;
      std::fprintf(stderr, "%s: challenge unanswered meter_id=%s: %s\n", kProgram,
                   g.meter_id.c_str(), g.why.c_str());
    }
    return gave_up.size();
  }

  // Due challenges (queued, or sent with an expired lease): a fresh random challenge from the
  // HSM each, committed as sent (one transaction) before the class-4 commands leave through
  // the relay pool. Returns how many moved on (sent or given up).
  std::size_t send_challenges(std::size_t room) {
    if (room == 0) return 0;
    const std::int64_t now_ms = wall_ms();
    auto due = cs().due(now_ms, room + challenges.size());
    if (!due.ok()) {
      store_failed(due.error().message());
      return 0;
    }
    if (due->empty()) return 0;
    std::vector<GiveUp> gave_up;
    std::vector<store::IssuedChallenge> issued;
    std::vector<Job> jobs;
    std::vector<ChallengeTracked> tracks;
    const std::uint32_t now = utc_now();
    for (const store::ChallengeStatus& c : *due) {
      if (jobs.size() >= room) break;
      if (challenges.contains(c.meter_row)) continue;
      if (c.attempts >= rc.max_attempts) {
        gave_up.push_back({c.meter_row, c.meter_id,
                           "no usable answer after " + std::to_string(c.attempts) +
                               " attempts" + (c.last_error.empty() ? "" : ": " + c.last_error)});
        continue;
      }
      auto m = ks->meter_by_row(c.meter_row);
      if (!m.ok()) {
        store_failed(m.error().message());
        break;
      }
      if (!*m) {
        gave_up.push_back({c.meter_row, c.meter_id, "meter no longer registered"});
        continue;
      }
      if ((*m)->public_key.size() != c1222::kPublicPointSize) {
        gave_up.push_back({c.meter_row, c.meter_id, "no registered public key"});
        continue;
      }
      const auto seal = challenge_seal_slot(**m);
      if (!seal) {
        gave_up.push_back({c.meter_row, c.meter_id,
                           std::string("no key to seal the challenge with (meter ") +
                               store::to_string((*m)->state) + ")"});
        continue;
      }
      store::IssuedChallenge ic;
      ic.meter_row = c.meter_row;
      // The HSM's generator: the challenge must be unpredictable to whoever holds the meter.
      if (auto st = hsm::generate_random(hs.lease->session(), MutableByteView(ic.challenge));
          !st.ok()) {
        hsm_failed("challenge random: " + st.error().message());
        break;
      }
      auto id = id_alloc->next(head_end_abs, static_cast<std::int64_t>(now));
      if (!id.ok()) {
        store_failed(id.error().message());
        break;
      }
      auto meter = std::make_shared<const store::Meter>(std::move(**m));
      auto wire = build_challenge(*meter, *seal, ic.challenge, *id, now);
      if (!wire.ok()) {
        if (hsm_error(wire.error()) || !hs.hsm_ready()) {
          hsm_failed(wire.error().message());
          break;
        }
        gave_up.push_back({c.meter_row, c.meter_id, wire.error().message()});
        continue;
      }
      const std::uint32_t n = c.attempts + 1;
      ic.issued_at_ms = now_ms;
      ic.expires_at_ms = now_ms + std::int64_t{rc.challenge_ttl_s} * 1000;
      ic.invocation_id = *id;
      ic.next_attempt_at_ms = now_ms + rc.relay.timeout.count() + backoff(n).count();
      tracks.push_back(ChallengeTracked{meter, ic.challenge, ic.expires_at_ms, *id, n});
      issued.push_back(ic);
      jobs.push_back(Job{kChallengeJob, c.meter_row, *id, std::move(wire).value()});
    }
    std::size_t moved = give_up_challenges(gave_up);
    if (issued.empty()) return moved;
    auto committed = cs().issue(issued);
    if (!committed.ok()) {
      store_failed(committed.error().message());
      return moved;
    }
    store_ok = true;
    std::vector<Job> go;
    for (std::size_t i = 0; i < issued.size(); ++i) {
      if (!(*committed)[i]) continue;  // settled meanwhile (nothing else writes it, but)
      challenges[issued[i].meter_row] = std::move(tracks[i]);
      go.push_back(std::move(jobs[i]));
    }
    in_flight += go.size();
    gauges->in_flight = static_cast<std::int64_t>(in_flight);
    challenges_sent.inc(go.size());
    moved += go.size();
    pool.submit(std::move(go));
    return moved;
  }

  // Answers to challenges: opened (HSM), the MT-2043 answer checked against the challenge sent
  // (check_challenge_answer), then in one transaction the replay marks, receipts, and each
  // challenge proven (consumed, proof recorded), failed (the meter flagged), re-scheduled with
  // backoff (a fresh challenge), or unanswered after max_attempts.
  void handle_challenge_replies(std::vector<Reply> replies) {
    enum class What : std::uint8_t { proven, flagged, retry, engine };
    struct Done {
      std::int64_t row = 0;
      ChallengeTracked t;
      Verdict v;
      What what = What::retry;
      std::string why;
      store::ChallengeProof proof;
    };
    std::vector<Done> done;
    for (Reply& r : replies) {
      auto it = challenges.find(r.meter_row);
      if (it == challenges.end() || it->second.invocation_id != r.invocation_id) continue;
      Done d;
      d.row = r.meter_row;
      d.t = std::move(it->second);
      challenges.erase(it);
      --in_flight;
      if (!r.answer) {
        d.v.kind = Verdict::Kind::relay_error;
        d.why = r.error;
        done.push_back(std::move(d));
        continue;
      }
      const store::Meter& m = *d.t.meter;
      OpenedAnswer oa = open_answer(*r.answer, d.t.invocation_id, m);
      d.v = std::move(oa.v);
      if (!oa.opened) {
        if (d.v.kind == Verdict::Kind::engine_error) {
          hsm_failed(d.v.error);
          d.what = What::engine;
        }
        d.why = d.v.error;
        done.push_back(std::move(d));
        continue;
      }
      c1222::DecodeLimits limits;
      limits.max_message = rc.relay.max_frame;
      auto om = c1222::decode(oa.wire, limits);
      std::uint8_t first_error = 0;
      std::optional<c1222::ChallengeAnswer> answer;
      if (om.ok()) {
        first_error = take_receipts(m, *om, d.v);
        auto oe = c1222::split_epsem(om->epsem, om->epsem_offset);
        auto services = oe.ok() ? c1222::split_services(oe->body)
                                : Result<std::vector<c1222::ServiceSpan>>(oe.error());
        for (const auto& sv : services.ok() ? *services : std::vector<c1222::ServiceSpan>{}) {
          if (!challenge_answer_shaped(sv.bytes)) continue;
          auto a = c1222::decode_challenge_answer_response(sv.bytes);
          if (a.ok()) {
            answer = *a;
            break;
          }
        }
      }
      if (!answer) {
        d.why = first_error != 0
                    ? std::string("meter ") + c1222::response_code_name(first_error)
                    : std::string("no MT-2043 answer in the meter's response");
        done.push_back(std::move(d));
        continue;
      }
      const std::int64_t now_ms = wall_ms();
      const auto check = store::check_challenge_answer(m, d.t.challenge, d.t.expires_at_ms,
                                                       *answer, now_ms);
      switch (check) {
        case store::ChallengeCheck::ok:
          d.what = What::proven;
          d.proof.meter_row = d.row;
          d.proof.challenge.assign(answer->challenge.begin(), answer->challenge.end());
          d.proof.meter_time = answer->meter_time;
          d.proof.signature.assign(answer->signature.begin(), answer->signature.end());
          d.proof.message_id = d.v.message_id;
          d.proof.verified_at_ms = now_ms;
          break;
        case store::ChallengeCheck::expired:
          d.why = "challenge expired: answered " +
                  std::to_string(now_ms - d.t.expires_at_ms) + " ms after rollover.challenge_ttl_s";
          break;
        case store::ChallengeCheck::wrong_challenge:
          d.what = What::flagged;
          d.why = "wrong challenge (a replayed or stale answer)";
          break;
        case store::ChallengeCheck::bad_signature:
        case store::ChallengeCheck::no_public_key:
          d.what = What::flagged;
          d.why = store::to_string(check);
          break;
      }
      done.push_back(std::move(d));
    }
    gauges->in_flight = static_cast<std::int64_t>(in_flight);
    if (done.empty()) return;

    const std::int64_t now_ms = wall_ms();
    std::vector<bool> proven(done.size(), false);
    std::vector<bool> unanswered(done.size(), false);
    audit::TxRecorder* a = recorder();
    auto applied = [&]() -> Status {
      if (a != nullptr) GS_TRY(a->start());
      GS_ASSIGN(auto tx, db::Transaction::begin(ks->db()));
      for (std::size_t i = 0; i < done.size(); ++i) {
        Done& d = done[i];
        if (d.v.verified) {
          // Into the meter's replay window (not "strictly above"): the collection engine may
          // still hand the DKUS the meter's earlier message (a read answered just before).
          GS_TRY(ks->raise_replay_mark(d.row, d.v.message_id, d.v.iv_time, cfg.reorder_window));
          for (const store::Receipt& r : d.v.receipts) {
            GS_ASSIGN(bool inserted, ks->insert_receipt(r));
            if (inserted && a != nullptr) GS_TRY(a->add(receipt_event(*d.t.meter, r)));
          }
        }
        const ByteView sent(d.t.challenge);
        const std::string& meter_id = d.t.meter->meter_id;
        switch (d.what) {
          case What::proven: {
            GS_ASSIGN(bool ok, cs().prove(d.proof));
            proven[i] = ok;
            if (ok && a != nullptr) {
              GS_TRY(a->add(challenge_event("challenge_proven", meter_id, d.t.attempts, {})));
            }
            if (!ok) {
              // Nothing outstanding matched any more (re-issued meanwhile): not a proof.
              d.what = What::retry;
              d.why = "challenge no longer outstanding";
            }
            break;
          }
          case What::flagged: {
            GS_ASSIGN(bool settled,
                      cs().settle(d.row, store::ChallengeState::failed, d.why, sent, now_ms));
            if (settled && a != nullptr) {
              // The meter is flagged: not rekeyed until a new challenge passes.
              GS_TRY(a->add(challenge_event("challenge_failed", meter_id, d.t.attempts, d.why)));
            }
            break;
          }
          case What::retry:
          case What::engine:
            break;
        }
        if (d.what == What::retry && d.t.attempts >= rc.max_attempts) {
          unanswered[i] = true;
          const std::string why =
              "no usable answer after " + std::to_string(d.t.attempts) + " attempts: " + d.why;
          GS_ASSIGN(bool settled,
                    cs().settle(d.row, store::ChallengeState::unanswered, why, sent, now_ms));
          if (settled && a != nullptr) {
            GS_TRY(a->add(challenge_event("challenge_unanswered", meter_id, d.t.attempts, why)));
          }
        } else if (d.what == What::retry || d.what == What::engine) {
          const auto wait = d.what == What::engine ? rc.poll : jittered(backoff(d.t.attempts));
          GS_TRY(cs().retry_later(d.row, now_ms + wait.count(), d.why));
        }
      }
      if (a != nullptr) GS_TRY(a->finish());
      GS_TRY(tx.commit());
      if (a != nullptr) a->committed();
      return {};
    }();
    if (!applied.ok()) {
      // Nothing settled: the leases bring the challenges back (with fresh values).
      store_failed("challenge answers not committed: " + applied.error().message());
      return;
    }
    store_ok = true;
    for (std::size_t i = 0; i < done.size(); ++i) {
      const Done& d = done[i];
      if (proven[i]) {
        challenge_proven.inc();
        queued_idle_until = {};
      } else if (d.what == What::flagged) {
        challenge_flagged.inc();
        queued_idle_until = {};
        // Always worth a line: the meter does not hold the key registered for it.
        std::fprintf(stderr,
                     "%s: challenge FAILED meter_id=%s: %s (meter flagged; it is not rekeyed "
                     "until a new challenge passes)\n",
                     kProgram, d.t.meter->meter_id.c_str(), d.why.c_str());
      } else if (unanswered[i]) {
        challenge_unanswered.inc();
        queued_idle_until = {};
        if (fail_log.allow()) {
          std::fprintf(stderr, "%s: challenge unanswered meter_id=%s attempts=%u: %s\n",
                       kProgram, d.t.meter->meter_id.c_str(), d.t.attempts, d.why.c_str());
        }
      } else {
        challenge_retried.inc();
      }
    }
  }

  // Whether a queued step's meter may get its key update (DESIGN §3.4: not before it proved it
  // holds its registered private key), judged from its challenge row and last proof. Uses the
  // step's changed_at (queued or resumed) to tell a challenge asked for this step from an older
  // one: an older failure is challenged again, one of this step's fails the step.
  struct Gate {
    enum class Kind : std::uint8_t { proceed, challenge, wait, fail } kind = Kind::challenge;
    bool paid = false;  // the meter was challenged for this step: its rate token is spent
    std::string why;
  };
  Result<Gate> challenge_gate(const store::StepWork& w) {
    GS_ASSIGN(auto st, cs().status(w.meter_row));
    GS_ASSIGN(auto proof_at, cs().last_proof_at_ms(w.meter_row));
    Gate g;
    if (st && st->live()) {
      g.kind = Gate::Kind::wait;
      return g;
    }
    const bool flagged = st && st->state == store::ChallengeState::failed;
    const std::int64_t since_ms = w.changed_at * 1000;
    if (proof_at && !flagged) {
      g.kind = Gate::Kind::proceed;
      g.paid = *proof_at >= since_ms;
      return g;
    }
    if (st && st->requested_at_ms >= since_ms &&
        (flagged || st->state == store::ChallengeState::unanswered)) {
      g.kind = Gate::Kind::fail;
      g.why = std::string(flagged ? "challenge failed: " : "challenge unanswered: ") +
              st->last_error;
      return g;
    }
    return g;  // challenge it first
  }

  struct SendItem {
    store::StepWork step;
    std::uint32_t attempts = 0;  // recorded so far
    std::string last_error;
  };

  // Builds, records (one transaction, before anything leaves) and hands to the relay. Returns
  // how many steps moved on (sent, failed, or found confirmed).
  std::size_t send(std::vector<SendItem> items) {
    if (items.empty()) return 0;
    std::size_t moved = 0;
    std::vector<Job> jobs;
    std::vector<store::RolloverStore::Attempt> attempts;
    std::vector<store::RolloverStore::Attempt> fails;
    std::vector<std::string> fail_ids;
    const std::uint32_t now = utc_now();
    const std::int64_t now_ms = wall_ms();
    for (SendItem& it : items) {
      const StepKey key{it.step.campaign, it.step.meter_row};
      auto m = ks->meter_by_row(it.step.meter_row);
      if (!m.ok()) {
        store_failed(m.error().message());
        break;
      }
      const store::KeySlot* target = *m ? (*m)->slot_for_key_id(it.step.target_slot) : nullptr;
      const bool same_key = target != nullptr && target->key_version == it.step.key_version;
      if (!same_key || target->state != store::KeyState::pending) {
        tracked.erase(key);
        ++moved;
        // Active: confirmed meanwhile (a meter message under the new key reached a worker).
        if (same_key && target->state == store::KeyState::active) continue;
        // Otherwise the pending key was taken away under the step: it cannot finish.
        fails.push_back({it.step.campaign, it.step.meter_row, now_ms,
                         "the pending key of slot " + std::to_string(it.step.target_slot) +
                             " is no longer stored"});
        fail_ids.push_back(*m ? (*m)->meter_id : std::string("-"));
        continue;
      }
      auto id = id_alloc->next(head_end_abs, static_cast<std::int64_t>(now));
      if (!id.ok()) {
        store_failed(id.error().message());
        break;
      }
      auto meter = std::make_shared<const store::Meter>(std::move(**m));
      auto wire = build_update(*meter, it.step, *id, now);
      if (!wire.ok()) {
        if (hsm_error(wire.error()) || !hs.hsm_ready()) {
          hsm_failed(wire.error().message());
          break;
        }
        // Nothing to send it with (the seal key is gone): this step cannot go on.
        fails.push_back({it.step.campaign, it.step.meter_row, now_ms, wire.error().message()});
        fail_ids.push_back(meter->meter_id);
        tracked.erase(key);
        ++moved;
        continue;
      }
      const std::uint32_t n = it.attempts + 1;
      attempts.push_back({it.step.campaign, it.step.meter_row,
                          now_ms + rc.relay.timeout.count() + backoff(n).count(), it.last_error});
      jobs.push_back(Job{it.step.campaign, it.step.meter_row, *id, std::move(wire).value()});
      Tracked& t = tracked[key];
      t.step = std::move(it.step);
      t.meter = std::move(meter);
      t.attempts = n;
      t.invocation_id = *id;
      t.in_flight = false;
      t.last_error = std::move(it.last_error);
    }
    if (!fails.empty()) fail_steps(fails, fail_ids, nullptr);
    if (jobs.empty()) return moved;
    if (auto st = rs().record_attempts(attempts); !st.ok()) {
      store_failed(st.error().message());
      const auto later = Clock::now() + rc.poll;
      for (const Job& j : jobs) {
        auto it = tracked.find({j.campaign, j.meter_row});
        if (it == tracked.end()) continue;
        it->second.attempts -= 1;
        it->second.retry_at = later;
      }
      return moved;
    }
    store_ok = true;
    for (const Job& j : jobs) tracked[{j.campaign, j.meter_row}].in_flight = true;
    in_flight += jobs.size();
    gauges->in_flight = static_cast<std::int64_t>(in_flight);
    attempts_total.inc(jobs.size());
    moved += jobs.size();
    pool.submit(std::move(jobs));
    return moved;
  }

  void fail_steps(const std::vector<store::RolloverStore::Attempt>& fails,
                  const std::vector<std::string>& meter_ids, const std::uint32_t* attempts) {
    if (auto st = rs().fail(fails); !st.ok()) {
      store_failed(st.error().message());
      return;
    }
    failed_total.inc(fails.size());
    for (std::size_t i = 0; i < fails.size(); ++i) {
      if (!fail_log.allow()) continue;
      std::fprintf(stderr,
                   "%s: rollover step failed campaign=%lld meter_id=%s attempts=%u error=%s "
                   "(the meter keeps its current key; `gridseal rollover resume` retries)\n",
                   kProgram, static_cast<long long>(fails[i].campaign), meter_ids[i].c_str(),
                   attempts != nullptr ? attempts[i] : 0U, fails[i].last_error.c_str());
    }
  }

  // Queued steps -> keys derived in the HSM -> prepare() in one transaction -> sent.
  // Returns true when it asked for challenges or failed steps (work that sends nothing yet).
  bool prepare_queued(std::size_t want, Clock::time_point now, Clock::time_point* wake) {
    if (want == 0) return false;
    for (auto it = hold.begin(); it != hold.end();) {
      it = it->second <= now ? hold.erase(it) : std::next(it);
    }
    auto queued = rs().next_queued(want + hold.size());
    if (!queued.ok()) {
      store_failed(queued.error().message());
      return false;
    }
    if (queued->empty()) {
      // Nothing queued, or every queued step waits for its meter's challenge.
      queued_idle_until = now + rc.poll;
      return false;
    }
    std::vector<std::int64_t> to_challenge;
    std::vector<store::RolloverStore::Attempt> step_fails;
    std::vector<std::string> step_fail_ids;
    std::vector<store::PreparedKey> keys;
    std::vector<store::RolloverStore::Attempt> drops;
    std::vector<std::string> drop_ids;
    const std::int64_t now_ms = wall_ms();
    auto drop = [&](const store::StepWork& w, const std::string& meter_id, std::string why) {
      drops.push_back({w.campaign, w.meter_row, now_ms, std::move(why)});
      drop_ids.push_back(meter_id);
    };
    for (const store::StepWork& w : *queued) {
      if (keys.size() + to_challenge.size() >= want) break;
      const StepKey key{w.campaign, w.meter_row};
      if (hold.contains(key)) continue;
      auto m = ks->meter_by_row(w.meter_row);
      if (!m.ok()) {
        store_failed(m.error().message());
        return false;
      }
      if (!*m) {
        drop(w, "-", "meter no longer registered");
        continue;
      }
      const store::Meter& meter = **m;
      const store::MeterState needed = w.reason == store::CampaignReason::revocation
                                           ? store::MeterState::quarantined
                                           : store::MeterState::active;
      if (meter.state != needed) {
        drop(w, meter.meter_id, std::string("meter is ") + store::to_string(meter.state));
        continue;
      }
      if (meter.public_key.size() != c1222::kPublicPointSize) {
        drop(w, meter.meter_id, "no registered public key");
        continue;
      }
      auto gate = challenge_gate(w);
      if (!gate.ok()) {
        store_failed(gate.error().message());
        return false;
      }
      if (gate->kind == Gate::Kind::wait) continue;
      if (gate->kind == Gate::Kind::fail) {
        step_fails.push_back({w.campaign, w.meter_row, now_ms, gate->why});
        step_fail_ids.push_back(meter.meter_id);
        continue;
      }
      if (!gate->paid && !rate_allows(w.campaign, now, wake)) continue;
      if (gate->kind == Gate::Kind::challenge) {
        to_challenge.push_back(w.meter_row);
        continue;
      }
      const auto choice = store::choose_rollover_slot(meter, w.reason);
      if (!choice) {
        drop(w, meter.meter_id, "no key to seal the update with, or no slot for the new key");
        continue;
      }
      auto pk = derive(meter, *choice, w.campaign);
      if (!pk.ok()) {
        if (!hs.hsm_ready()) {
          hsm_failed(pk.error().message());
          return false;
        }
        // The meter's data (e.g. its public point) does not derive: a few tries, then dropped.
        if (++derive_failures[key] >= kMaxDeriveFailures) {
          derive_failures.erase(key);
          drop(w, meter.meter_id, "key derivation failed: " + pk.error().message());
        } else {
          hold[key] = now + kHoldAfterRefusedPrepare;
        }
        continue;
      }
      derive_failures.erase(key);
      keys.push_back(std::move(pk).value());
    }
    if (!drops.empty()) {
      if (auto st = rs().drop_queued(drops); !st.ok()) {
        store_failed(st.error().message());
      } else {
        dropped_total.inc(drops.size());
        for (std::size_t i = 0; i < drops.size(); ++i) {
          if (!fail_log.allow()) continue;
          std::fprintf(stderr, "%s: rollover step dropped campaign=%lld meter_id=%s: %s\n",
                       kProgram, static_cast<long long>(drops[i].campaign), drop_ids[i].c_str(),
                       drops[i].last_error.c_str());
        }
      }
    }
    bool asked = false;
    if (!to_challenge.empty()) {
      auto n = cs().request_rows(to_challenge, "rollover", wall_ms());
      if (!n.ok()) {
        store_failed(n.error().message());
      } else {
        asked = true;
      }
    }
    if (!step_fails.empty()) {
      if (auto st = rs().fail_queued(step_fails); !st.ok()) {
        store_failed(st.error().message());
      } else {
        asked = true;
        failed_total.inc(step_fails.size());
        for (std::size_t i = 0; i < step_fails.size(); ++i) {
          if (!fail_log.allow()) continue;
          std::fprintf(stderr,
                       "%s: rollover step failed campaign=%lld meter_id=%s error=%s (not rekeyed; "
                       "`gridseal rollover resume` challenges it again)\n",
                       kProgram, static_cast<long long>(step_fails[i].campaign),
                       step_fail_ids[i].c_str(), step_fails[i].last_error.c_str());
        }
      }
    }
    if (keys.empty()) return asked;
    auto committed = rs().prepare(keys);
    // The derived keys are no longer needed in memory, committed or not.
    for (auto& k : keys) secure_zero(k.wrapped.data(), k.wrapped.size());
    if (!committed.ok()) {
      store_failed(committed.error().message());
      return asked;
    }
    store_ok = true;
    std::vector<SendItem> items;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const store::PreparedKey& k = keys[i];
      if (!(*committed)[i]) {
        hold[{k.campaign, k.meter_row}] = now + kHoldAfterRefusedPrepare;
        continue;
      }
      prepared_total.inc();
      SendItem it;
      it.step.campaign = k.campaign;
      it.step.meter_row = k.meter_row;
      it.step.state = store::StepState::prepared;
      it.step.target_slot = k.target_slot;
      it.step.key_version = k.key_version;
      it.step.ephemeral_point = k.ephemeral_point;
      it.step.seal_slot = k.seal_slot;
      items.push_back(std::move(it));
    }
    send(std::move(items));
    return true;
  }

  // Retries due in memory, then prepared steps due in the store (after a restart, or resumed),
  // then new queued steps, as far as the window allows.
  bool send_work(Clock::time_point now, Clock::time_point* wake) {
    const std::size_t cap = 2 * static_cast<std::size_t>(rc.connections) * rc.pipeline_depth;
    if (in_flight >= cap) return false;
    const std::size_t room = cap - in_flight;
    // Refill in batches (fewer transactions per meter).
    if (room < std::max<std::size_t>(1, cap / 4)) return false;
    std::vector<SendItem> items;
    for (auto& [key, t] : tracked) {
      if (items.size() >= room) break;
      if (t.in_flight) continue;
      if (t.retry_at > now) {
        *wake = std::min(*wake, t.retry_at);
        continue;
      }
      items.push_back(SendItem{t.step, t.attempts, t.last_error});
    }
    // Steps waiting for a retry stay in memory; beyond a bound (a relay that is down fails
    // everything quickly), new work waits in the store until they are done.
    const bool take_new = tracked.size() < 4 * cap;
    if (take_new && items.size() < room) {
      const std::size_t limit = room - items.size() + std::min<std::size_t>(tracked.size(), cap);
      auto due = rs().due_prepared(wall_ms(), limit);
      if (!due.ok()) {
        store_failed(due.error().message());
      } else {
        for (store::StepWork& w : *due) {
          if (items.size() >= room) break;
          if (tracked.contains({w.campaign, w.meter_row})) continue;
          const std::uint32_t a = w.attempts;
          items.push_back(SendItem{std::move(w), a, {}});
        }
      }
    }
    std::size_t left = room - std::min(room, items.size());
    bool worked = send(std::move(items)) > 0;
    // Challenges (operators', and those the queued steps below asked for) go first among new
    // work: the steps of unproven meters wait for them.
    if (left > 0) {
      const std::size_t before = in_flight;
      worked = send_challenges(std::min<std::size_t>(left, rc.batch)) > 0 || worked;
      left -= std::min(left, in_flight - before);
    }
    if (take_new && left > 0 && now >= queued_idle_until) {
      const std::size_t before = in_flight;
      const bool asked = prepare_queued(std::min<std::size_t>(left, rc.batch), now, wake);
      return worked || asked || in_flight != before;
    }
    return worked;
  }

  // Answers: verified in the HSM, then every confirmation, replay mark and receipt in one
  // transaction; errors are retried with backoff or fail the step after max_attempts.
  bool handle_replies() {
    std::vector<Reply> all;
    pool.take(all);
    if (all.empty()) return false;
    std::vector<Reply> replies;
    std::vector<Reply> challenge_replies;
    for (Reply& r : all) {
      (r.campaign == kChallengeJob ? challenge_replies : replies).push_back(std::move(r));
    }
    if (!challenge_replies.empty()) handle_challenge_replies(std::move(challenge_replies));
    struct Done {
      StepKey key;
      Verdict v;
    };
    std::vector<Done> done;
    for (Reply& r : replies) {
      const StepKey key{r.campaign, r.meter_row};
      auto it = tracked.find(key);
      if (it == tracked.end() || !it->second.in_flight ||
          it->second.invocation_id != r.invocation_id) {
        continue;  // not (or no longer) waited for
      }
      it->second.in_flight = false;
      --in_flight;
      Verdict v;
      if (!r.answer) {
        v.kind = Verdict::Kind::relay_error;
        v.error = r.error;
      } else {
        v = analyze(*r.answer, it->second, *it->second.meter);
        if (v.kind == Verdict::Kind::engine_error) hsm_failed(v.error);
      }
      done.push_back(Done{key, std::move(v)});
    }
    gauges->in_flight = static_cast<std::int64_t>(in_flight);
    if (done.empty()) return true;

    // One transaction: confirmations, replay marks, receipts.
    std::vector<std::optional<bool>> confirmed(done.size());
    bool db_ok = true;
    if (std::any_of(done.begin(), done.end(), [](const Done& d) { return d.v.verified; })) {
      audit::TxRecorder* a = recorder();
      auto applied = [&]() -> Status {
        if (a != nullptr) GS_TRY(a->start());
        GS_ASSIGN(auto tx, db::Transaction::begin(ks->db()));
        store::RolloverStore rstore(*ks);
        rstore.set_audit(a);  // key_confirmed records, in this transaction
        for (std::size_t i = 0; i < done.size(); ++i) {
          const Done& d = done[i];
          if (!d.v.verified) continue;
          const Tracked& t = tracked.at(d.key);
          if (d.v.kind == Verdict::Kind::confirmed) {
            GS_ASSIGN(confirmed[i], rstore.confirm(t.step.meter_row, t.step.target_slot,
                                                   t.step.key_version, true));
          }
          // Into the meter's replay window, as above.
          GS_TRY(ks->raise_replay_mark(t.step.meter_row, d.v.message_id, d.v.iv_time,
                                       cfg.reorder_window));
          for (const store::Receipt& r : d.v.receipts) {
            GS_ASSIGN(bool inserted, ks->insert_receipt(r));
            if (inserted && a != nullptr) GS_TRY(a->add(receipt_event(*t.meter, r)));
          }
        }
        // One audit batch for the whole transaction (one head read, at most one anchor
        // update), not one per meter.
        if (a != nullptr) GS_TRY(a->finish());
        GS_TRY(tx.commit());
        if (a != nullptr) a->committed();
        return {};
      }();
      db_ok = applied.ok();
      if (db_ok) {
        store_ok = true;
      } else {
        store_failed("answers not committed: " + applied.error().message());
      }
    }

    const auto now = Clock::now();
    std::vector<store::RolloverStore::Attempt> fails;
    std::vector<std::string> fail_ids;
    std::vector<std::uint32_t> fail_attempts;
    for (std::size_t i = 0; i < done.size(); ++i) {
      Done& d = done[i];
      answers[static_cast<std::size_t>(d.v.kind)]->inc();
      auto it = tracked.find(d.key);
      if (it == tracked.end()) continue;
      Tracked& t = it->second;
      if (d.v.kind == Verdict::Kind::confirmed && db_ok) {
        if (confirmed[i].value_or(false)) {
          confirmed_total.inc();
          confirmations.inc();
          ++confirmed_since_log;
        } else {
          already_total.inc();
        }
        tracked.erase(it);
        continue;
      }
      if (d.v.kind == Verdict::Kind::confirmed || d.v.kind == Verdict::Kind::engine_error) {
        // Not the meter's doing: send again soon (idempotent), whatever the attempt count.
        t.retry_at = now + rc.poll;
        continue;
      }
      t.last_error = d.v.error;
      if (t.attempts >= rc.max_attempts) {
        fails.push_back({t.step.campaign, t.step.meter_row, wall_ms(), t.last_error});
        fail_ids.push_back(t.meter ? t.meter->meter_id : std::string("-"));
        fail_attempts.push_back(t.attempts);
        tracked.erase(it);
        continue;
      }
      t.retry_at = now + jittered(backoff(t.attempts));
    }
    if (!fails.empty()) fail_steps(fails, fail_ids, fail_attempts.data());
    return true;
  }

  void housekeeping(Clock::time_point now) {
    if (now >= next_retire) {
      next_retire = now + kRetirePeriod;
      const std::int64_t older_than =
          static_cast<std::int64_t>(utc_now()) - static_cast<std::int64_t>(rc.standby_retention_s);
      auto n = rs().retire_standby(older_than);
      if (!n.ok()) {
        store_failed(n.error().message());
      } else if (*n > 0) {
        retired_total.inc(static_cast<std::uint64_t>(*n));
        std::fprintf(stderr, "%s: rollover retired standby keys=%lld (older than %u s)\n", kProgram,
                     static_cast<long long>(*n), rc.standby_retention_s);
      }
    }
    if (now >= next_gauge) {
      next_gauge = now + kGaugePeriod;
      auto cs = rs().campaigns(256);
      if (cs.ok()) {
        std::int64_t queued = 0;
        std::int64_t prepared = 0;
        for (const store::Campaign& c : *cs) {
          if (c.state == store::CampaignState::done) continue;
          auto p = rs().progress(c.id);
          if (!p.ok()) continue;
          if (c.state == store::CampaignState::running) queued += p->queued;
          prepared += p->prepared;
        }
        gauges->queued = queued;
        gauges->prepared = prepared;
      }
      gauges->connections = static_cast<std::int64_t>(pool.connected());
      auto cq = this->cs().count_in_state(store::ChallengeState::queued);
      auto cs_sent = this->cs().count_in_state(store::ChallengeState::sent);
      auto cf = this->cs().count_in_state(store::ChallengeState::failed);
      if (cq.ok() && cs_sent.ok()) gauges->challenges_pending = *cq + *cs_sent;
      if (cf.ok()) gauges->meters_flagged = *cf;
      for (auto it = buckets.begin(); it != buckets.end();) {
        it = now - it->second.refreshed > 10 * kCampaignRefresh ? buckets.erase(it) : std::next(it);
      }
    }
    if (now >= next_progress_log) {
      next_progress_log = now + kProgressLogPeriod;
      if (confirmed_since_log > 0) {
        std::fprintf(stderr,
                     "%s: rollover progress confirmed=%llu in_flight=%zu queued=%lld "
                     "prepared=%lld\n",
                     kProgram, static_cast<unsigned long long>(confirmed_since_log), in_flight,
                     static_cast<long long>(gauges->queued.load()),
                     static_cast<long long>(gauges->prepared.load()));
        confirmed_since_log = 0;
      }
    }
  }

  void run() {
    while (!stopping.load()) {
      const auto now = Clock::now();
      auto wake = now + rc.poll;
      if (!ready()) {
        pool.pause(wake);  // answers keep until the HSM or the store is back
        continue;
      }
      // Group commit: while many updates are in flight, their answers are taken (and their
      // confirmations committed, one fsync) in batches of up to a quarter of them, none
      // waiting longer than kAnswerBatchWait.
      const std::size_t batch = std::max<std::size_t>(1, std::min<std::size_t>(in_flight / 4, 64));
      const auto [waiting, oldest] = pool.waiting();
      bool worked = false;
      if (waiting >= batch || (waiting > 0 && Clock::now() - oldest >= kAnswerBatchWait)) {
        worked = handle_replies();
      }
      if (hs.hsm_ready() && signer) {
        worked = send_work(Clock::now(), &wake) || worked;
        hsm_ok = hs.hsm_ready();
      }
      housekeeping(Clock::now());
      if (worked) continue;
      pool.wait(std::max(wake, Clock::now() + milliseconds(1)), batch, kAnswerBatchWait);
    }
  }

  struct Bucket {
    double rate = 0;
    double tokens = 0;
    Clock::time_point last{};
    Clock::time_point refreshed{};
  };

  const DkusConfig& cfg;
  const RolloverConfig& rc;
  HsmContext& hsm;
  const Bytes head_end_abs;

  // Used by the driver thread only (and by warm_up before it starts).
  std::optional<store::KeyStore> ks;
  std::optional<store::ChallengeStore> chs;  // over *ks (declared after it: destroyed first)
  std::optional<audit::TxRecorder> rec;      // over *ks, with [audit] on
  std::unique_ptr<store::KeyStore> id_ks;  // the invocation-id allocator's own connection
  std::optional<ids::InvocationIdAllocator> id_alloc;
  HsmThreadState hs;
  std::unique_ptr<ses::HsmSigner> signer;
  RelayPool pool;
  std::map<StepKey, Tracked> tracked;
  std::size_t in_flight = 0;
  std::map<std::int64_t, Bucket> buckets;
  std::map<StepKey, Clock::time_point> hold;
  std::map<StepKey, std::uint32_t> derive_failures;
  std::mt19937_64 rng;
  LogLimiter err_log;
  LogLimiter fail_log;
  Clock::time_point next_retire{};
  Clock::time_point next_gauge{};
  Clock::time_point next_progress_log{};
  std::uint64_t confirmed_since_log = 0;

  std::thread driver;
  std::atomic<bool> stopping{false};
  bool started = false;
  std::atomic<bool> hsm_ok{true};
  std::atomic<bool> store_ok{true};

  std::shared_ptr<GaugeValues> gauges;
  metrics::Counter& prepared_total;
  metrics::Counter& confirmed_total;
  metrics::Counter& already_total;
  metrics::Counter& failed_total;
  metrics::Counter& dropped_total;
  metrics::Counter& attempts_total;
  metrics::Counter& confirmations;
  metrics::Counter& retired_total;
  metrics::Counter& errors_total;
  metrics::Counter& challenges_sent;
  metrics::Counter& challenge_proven;
  metrics::Counter& challenge_flagged;
  metrics::Counter& challenge_unanswered;
  metrics::Counter& challenge_retried;
  std::array<metrics::Counter*, 5> answers{};
  // Challenges in flight, by meter row (their retries wait in the store, not here).
  std::map<std::int64_t, ChallengeTracked> challenges;
  // Queued steps are looked at again no sooner than this when the last look found nothing to
  // do (all of them waiting for their meters' challenges); a settled challenge resets it.
  Clock::time_point queued_idle_until{};
};

RolloverEngine::RolloverEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

RolloverEngine::~RolloverEngine() {
  stop();
  impl_->signer.reset();
  impl_->hs.drop_hsm();
}

Result<std::unique_ptr<RolloverEngine>> RolloverEngine::create(const DkusConfig& cfg,
                                                               HsmContext& hsm,
                                                               metrics::Registry& registry) {
  if (!cfg.rollover.enabled) return Error(Errc::invalid_argument, "rollover.enabled is false");
  return std::unique_ptr<RolloverEngine>(
      new RolloverEngine(std::make_unique<Impl>(cfg, hsm, registry)));
}

Status RolloverEngine::warm_up() {
  GS_TRY(impl_->open_store());
  // Never sign key updates with a key meters no longer trust (src/command_keys.h).
  GS_TRY(cmdkeys::check_signing_key(impl_->ks->db(), impl_->rc.command_key_id,
                                    "rollover.command_key"));
  return impl_->open_hsm();
}

void RolloverEngine::start() {
  Impl& s = *impl_;
  if (s.started) return;
  s.started = true;
  s.stopping = false;
  s.pool.start();
  s.driver = std::thread([&s] {
    name_this_thread("gs-rollover");
    s.run();
  });
  const server::ClientConfig& r = s.rc.relay;
  std::fprintf(stderr,
               "%s: rollover engine started relay=%s:%u (%s) connections=%u pipeline_depth=%u "
               "signer=gs-cmd-%u\n",
               kProgram, r.host.c_str(), static_cast<unsigned>(r.port),
               r.plain_tcp ? "plain TCP" : "TLS 1.3", s.rc.connections, s.rc.pipeline_depth,
               static_cast<unsigned>(s.rc.command_key_id));
}

void RolloverEngine::stop() {
  Impl& s = *impl_;
  if (!s.started) return;
  s.started = false;
  s.stopping = true;
  s.pool.wake();
  if (s.driver.joinable()) s.driver.join();
  s.pool.stop();
  s.gauges->in_flight = 0;
  s.gauges->connections = 0;
  s.tracked.clear();
  s.challenges.clear();
  s.in_flight = 0;
}

metrics::Health RolloverEngine::health() const {
  if (!impl_->hsm_ok.load()) return {false, "rollover engine: HSM operations failing"};
  if (!impl_->store_ok.load()) return {false, "rollover engine: database failing"};
  return {true, "ok"};
}

}  // namespace gs::dkus
