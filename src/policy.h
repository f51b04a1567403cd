// SES policy (conf/policy.toml): which client may send which command classes, rate limits per
// class (fleet-wide and per meter), validity windows, command classification and DR groups.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "c1222/services.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/operators.h"

namespace gs::policy {

using c1222::CommandClass;
inline constexpr std::size_t kClassCount = c1222::kMaxCommandClass + 1;
inline constexpr std::size_t class_index(CommandClass c) { return static_cast<std::size_t>(c); }

// At most `count` commands per `per_s` seconds, with bursts of up to `burst` (token bucket).
// count == 0: no limit.
struct RateLimit {
  std::uint32_t count = 0;
  std::uint32_t per_s = 60;
  std::uint32_t burst = 0;  // 0: same as count
  bool enabled() const noexcept { return count != 0; }
};

struct ClassRules {
  std::uint32_t window_s = 300;  // validity window of the signed authorization
  RateLimit fleet;               // across all meters, all clients, all workers
  RateLimit meter;               // per meter
};

struct ClientRules {
  std::string name;     // label for logs
  std::string subject;  // TLS certificate subject, compared exactly
  std::array<bool, kClassCount> allowed{};
};

struct GroupRules {
  std::string name;
  c1222::OwnedApTitle title;       // as configured
  Bytes absolute_title;            // with the base OID applied
  std::uint32_t max_event_window_s = 0;
};

// [not_before, not_after] in UTC seconds.
struct Validity {
  std::uint32_t not_before = 0;
  std::uint32_t not_after = 0;
};

// A procedure key: number (11 bits) | 0x0800 when it is a manufacturer procedure.
inline constexpr std::uint16_t kMfgProcedure = 0x0800;

// One [[quorum]] entry: a state-changing `gridseal` command that runs only once M distinct
// operators of `role` approved it (`gridseal approvals`, src/approvals.h).
struct QuorumRule {
  std::string name;               // label in messages and audit records
  std::string command;            // CLI path, e.g. "rollover start"
  std::vector<std::string> when;  // argument names that must all be given ("--all"); empty: always
  operators::Role role = operators::Role::operator_;  // whose signatures count
  std::uint32_t approvals = 2;    // M (the requester's own signature counts as the first)
  std::uint32_t expires_s = 86400;  // a request not complete by then can no longer run

  // Whether this rule covers `command` with these (canonical) argument names/values.
  bool applies(std::string_view path,
               const std::vector<std::pair<std::string, std::string>>& args) const;
};

struct Policy {
  std::string source;
  std::uint32_t clock_skew_s = 60;         // not_before = now - skew
  double peak_rate = 50000;                // invocation ids per second (wrap horizon check)
  std::uint32_t max_block_age_s = 60;      // invocation-id block lifetime
  std::uint32_t meter_rate_slots = 1U << 20;  // per-meter bucket table size (shared memory)
  std::array<ClassRules, kClassCount> classes{};
  std::vector<ClientRules> clients;
  std::vector<GroupRules> groups;
  c1222::ByteOrder procedure_order = c1222::ByteOrder::little;
  std::map<std::uint16_t, CommandClass> procedures;    // key: number | kMfgProcedure
  std::optional<CommandClass> unlisted_procedure;      // nullopt: refused
  std::map<std::uint16_t, CommandClass> table_writes;  // key: table number | 0x0800 (MT)
  std::vector<QuorumRule> quorum;  // read by the `gridseal` CLI; the daemons ignore it

  // The first [[quorum]] rule that covers the command, or nullptr.
  const QuorumRule* quorum_for(
      std::string_view path, const std::vector<std::pair<std::string, std::string>>& args) const;

  // nullptr when the subject is not configured (refuse: isc).
  const ClientRules* client(std::string_view subject) const noexcept;
  // nullptr when the absolute title is not a configured DR group.
  const GroupRules* group(ByteView absolute_title) const noexcept;
  // [now - skew, now - skew + window of the class].
  Validity validity(CommandClass c, std::uint32_t now) const noexcept;
  // For a broadcast to `g`: the class-3 window capped at the group's max event window.
  Validity broadcast_validity(const GroupRules& g, std::uint32_t now) const noexcept;
};

// Parses a policy file / text. Every key is checked (unknown keys refused) and every error names
// its key ("policy.toml: limits.connect_disconnect.fleet.count: must be ..."). `base_oid` converts
// relative group titles (empty: default). Each class window (and each group's max event
// window) must pass ids::check_window at peak_rate.
Result<Policy> load_policy(const std::string& path, ByteView base_oid = {});
Result<Policy> parse_policy(std::string_view toml_text, const std::string& source,
                            ByteView base_oid = {});

// ---- classification ---------------------------------------------------------------------------

struct ClassifyOptions {
  // The DKUS's own key updates: writes of MT-2041 are then class 4 instead of refused.
  bool allow_key_update = false;
};

struct Classification {
  CommandClass command_class = CommandClass::read;
  bool ends_with_receipt_read = false;  // last service is `30 0F FA`
  std::size_t services = 0;
};

// From the decoded request services of a mode-0 command: reads are class 0; writes class 1
// unless [tables] says otherwise; ST-7 procedures per [procedures]; MT-2043 and MT-2044
// writes class 4 (MT-2044 statements are verified by the SES, src/command_keys.h).
// Reads combine with any class; two different non-read classes in one command are refused.
// Refused (Errc::bad_value): writes of MT-2040/2041/2042 (only gridseal writes those), a read
// of MT-2042 anywhere but last, writes to ST-7 that are not procedures, unlisted procedures
// when so configured. Refused (Errc::unsupported): responses, relay services (register,
// resolve, trace, deregister), unknown codes. Refused (Errc::missing_element): no services.
Result<Classification> classify(const std::vector<c1222::DecodedService>& services,
                                const Policy& p, const ClassifyOptions& opt = {});
// The same from a decoded message: must be mode 0; the EPSEM services are decoded with the
// policy's procedure byte order. Parse errors keep their Errc (truncated, bad_length, ...).
Result<Classification> classify_message(const c1222::Message& m, const Policy& p,
                                        const ClassifyOptions& opt = {});

// ---- rate limits ------------------------------------------------------------------------------

enum class Admission : std::uint8_t { allowed, fleet_limited, meter_limited };
const char* admission_name(Admission a) noexcept;

// Token buckets (GCRA: one atomic "theoretical arrival time" per bucket), lock-free, so they can
// live in memory shared by forked worker processes and survive a kill -9 of any of them.
// Per-meter buckets are a fixed table indexed by a hash of the meter title: two meters that
// collide share a bucket, which can only make the limit stricter.
class RateLimiter {
 public:
  // shared: MAP_SHARED anonymous memory, created before fork() so every worker uses the same
  // buckets (the fleet limit then holds across workers). meter_slots: 1..1<<24.
  static Result<RateLimiter> create(std::uint32_t meter_slots, bool shared);
  // The same buckets in a memfd that worker processes started with exec() attach to. The fd
  // (close-on-exec set; the caller clears it for the children it starts) goes to *fd_out.
  static Result<RateLimiter> create_memfd(std::uint32_t meter_slots, int* fd_out);
  // Maps the buckets of a create_memfd() fd; its size must match meter_slots exactly.
  static Result<RateLimiter> attach(int fd, std::uint32_t meter_slots);
  RateLimiter(RateLimiter&& o) noexcept;
  RateLimiter& operator=(RateLimiter&&) = delete;
  RateLimiter(const RateLimiter&) = delete;
  RateLimiter& operator=(const RateLimiter&) = delete;
  ~RateLimiter();

  // Takes one token from the fleet and the meter bucket of `c` under the limits of `p`, or none
  // when either is empty. now_ns: a monotonic clock in nanoseconds (>= 0).
  Admission admit(const Policy& p, CommandClass c, ByteView meter_title, std::int64_t now_ns);

 private:
  RateLimiter(std::int64_t* cells, std::size_t count, std::uint32_t slots,
              bool shared)
      : cells_(cells), count_(count), slots_(slots), shared_(shared) {}
  // kClassCount fleet cells, then slots per class; used only through std::atomic_ref.
  std::int64_t* cells_ = nullptr;
  std::size_t count_ = 0;
  std::uint32_t slots_ = 0;
  bool shared_ = false;
};

}  // namespace gs::policy
