// SES policy: the shipped conf/policy.toml, errors that name the key, classification of
// commands, and token-bucket rate limits (in one process and shared across fork()).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include "c1222/message.h"
#include "c1222/services.h"
#include "src/policy.h"

namespace gs::policy {
namespace {

#ifndef GS_SOURCE_DIR
#define GS_SOURCE_DIR GS_VECTORS_DIR "/../.."
#endif

Bytes hex(std::string_view h) {
  auto b = from_hex(h);
  GS_CHECK(b.has_value());
  return *b;
}

// A minimal valid policy plus `extra` (appended at top level or as further tables).
std::string text(const std::string& extra) {
  return "clock_skew = 1\n" + extra;
}

Result<Policy> parse(const std::string& extra) { return parse_policy(text(extra), "p.toml"); }

void expect_error(const std::string& toml, const std::string& key) {
  auto p = parse_policy(toml, "p.toml");
  ASSERT_FALSE(p.ok()) << toml;
  EXPECT_NE(p.error().detail.find(key), std::string::npos)
      << "error \"" << p.error().detail << "\" does not name " << key;
}

TEST(Policy, ShippedExampleLoads) {
  auto p = load_policy(GS_SOURCE_DIR "/conf/policy.toml");
  ASSERT_TRUE(p.ok()) << p.error().message();
  EXPECT_EQ(p->clock_skew_s, 60u);
  const auto& cd = p->classes[class_index(CommandClass::connect_disconnect)];
  EXPECT_EQ(cd.window_s, 300u);
  EXPECT_EQ(cd.fleet.count, 100u);
  EXPECT_EQ(cd.fleet.burst, 20u);
  EXPECT_EQ(cd.meter.per_s, 3600u);
  ASSERT_NE(p->client("CN=collection-engine-1,OU=AMI,O=Example Utility"), nullptr);
  EXPECT_TRUE(p->client("CN=billing,OU=AMI,O=Example Utility")->allowed[0]);
  EXPECT_FALSE(p->client("CN=billing,OU=AMI,O=Example Utility")->allowed[2]);
  EXPECT_EQ(p->client("CN=billing"), nullptr);
  EXPECT_EQ(p->procedures.at(26), CommandClass::connect_disconnect);
  EXPECT_EQ(p->table_writes.at(0x0828), CommandClass::demand_response);
  ASSERT_EQ(p->groups.size(), 1u);
  EXPECT_EQ(to_hex(p->groups[0].absolute_title), "607c86f75401160003" "01");
  EXPECT_NE(p->group(hex("607c86f754011600030" "1")), nullptr);
  EXPECT_EQ(p->group(hex("607c86f7540116000302")), nullptr);
}

TEST(Policy, ValidityWindows) {
  auto p = parse("[classes.connect_disconnect]\nwindow = 300\n"
                 "[[demand_response_group]]\ntitle = \".3.1\"\nmax_event_window = 3600\n"
                 "[classes.demand_response]\nwindow = 7200\n");
  ASSERT_TRUE(p.ok()) << p.error().message();
  // PROFILE-VECTORS example 1: IV 0x6b2b4d81, not_before 0x6b2b4d80, not_after 0x6b2b4eac.
  Validity v = p->validity(CommandClass::connect_disconnect, 0x6b2b4d81);
  EXPECT_EQ(v.not_before, 0x6b2b4d80u);
  EXPECT_EQ(v.not_after, 0x6b2b4eacu);
  // Example 4: the broadcast window is capped at the group's event window.
  Validity b = p->broadcast_validity(p->groups[0], 0x6b2b4d81);
  EXPECT_EQ(b.not_before, 0x6b2b4d80u);
  EXPECT_EQ(b.not_after, 0x6b2b5b90u);
  EXPECT_EQ(p->validity(CommandClass::read, 0).not_before, 0u);
}

TEST(Policy, QuorumRulesMatchCommandsAndArgumentsAndAreValidated) {
  auto p = load_policy(GS_SOURCE_DIR "/conf/policy.toml");
  ASSERT_TRUE(p.ok()) << p.error().message();
  using Args = std::vector<std::pair<std::string, std::string>>;
  const QuorumRule* fleet = p->quorum_for("rollover start", Args{{"--all", "true"}});
  ASSERT_NE(fleet, nullptr);
  EXPECT_EQ(fleet->name, "fleet-rollover");
  EXPECT_EQ(fleet->approvals, 2u);
  EXPECT_EQ(fleet->role, gs::operators::Role::operator_);
  EXPECT_EQ(p->quorum_for("rollover start", Args{{"--file", "x"}}), nullptr);
  EXPECT_NE(p->quorum_for("policy apply", Args{{"FILE", "p.toml"}}), nullptr);
  EXPECT_EQ(p->quorum_for("meters import", Args{}), nullptr);

  const std::string ok = "[[quorum]]\ncommand = \"meters import\"\nrole = \"operator\"\n";
  auto q = parse_policy(ok, "p.toml");
  ASSERT_TRUE(q.ok()) << q.error().message();
  ASSERT_EQ(q->quorum.size(), 1u);
  EXPECT_EQ(q->quorum[0].name, "meters import");
  EXPECT_EQ(q->quorum[0].expires_s, 86400u);
  auto bad = [](const std::string& t, const std::string& key) {
    auto r = parse_policy(t, "p.toml");
    ASSERT_FALSE(r.ok()) << t;
    EXPECT_NE(r.error().message().find(key), std::string::npos) << r.error().message();
  };
  bad("[[quorum]]\ncommand = \"meters list\"\nrole = \"operator\"\n", "quorum[0].command");
  bad("[[quorum]]\ncommand = \"approvals approve\"\nrole = \"operator\"\n",
      "quorum[0].command");
  bad("[[quorum]]\ncommand = \"meters import\"\nrole = \"key-custodian\"\n", "quorum[0].role");
  bad("[[quorum]]\ncommand = \"meters import\"\nrole = \"auditor\"\n", "quorum[0].role");
  bad("[[quorum]]\ncommand = \"meters import\"\n", "quorum[0].role");
  bad(ok + "approvals = 1\n", "quorum[0].approvals");
  bad(ok + "approvals = 17\n", "quorum[0].approvals");
  bad(ok + "expires = 10\n", "quorum[0].expires");
  bad(ok + "when = \"--all\"\n", "quorum[0].when");
  bad(ok + "colour = 1\n", "quorum[0].colour");
  bad(ok + ok, "quorum[1].name");
}

TEST(Policy, ErrorsNameTheKey) {
  expect_error("colck_skew = 1\n", "colck_skew");
  expect_error("clock_skew = 99999\n", "clock_skew");
  expect_error("clock_skew = \"60\"\n", "clock_skew");
  expect_error("[classes.reads]\nwindow = 1\n", "classes.reads");
  expect_error("[classes.read]\nwindw = 1\n", "classes.read.windw");
  expect_error("[classes.read]\nfleet = { count = 0 }\n", "classes.read.fleet.count");
  expect_error("[classes.read]\nfleet = { per = 10 }\n", "classes.read.fleet.count");
  expect_error("[classes.read]\nmeter = 5\n", "classes.read.meter");
  expect_error("[procedures]\nconnect_disconnect = [\"SP-26\", \"SP-26\"]\n",
               "procedures.connect_disconnect[1]");
  expect_error("[procedures]\nwrite = [\"XP-1\"]\n", "procedures.write[0]");
  expect_error("[procedures]\nwrite = [\"SP-4096\"]\n", "procedures.write[0]");
  expect_error("[procedures]\nbyte_order = \"middle\"\n", "procedures.byte_order");
  expect_error("[procedures]\nunlisted = \"sometimes\"\n", "procedures.unlisted");
  expect_error("[table_writes]\nwrite = [\"MT-2041\"]\n", "table_writes");
  expect_error("[table_writes]\ntime = [\"SP-1\"]\n", "table_writes.time[0]");
  expect_error("[[client]]\nsubject = \"CN=a\"\nclasses = [\"read\", \"dance\"]\n",
               "client[0].classes[1]");
  expect_error("[[client]]\nclasses = [\"read\"]\n", "client[0].subject");
  expect_error("[[client]]\nsubject = \"CN=a\"\nclasses = [\"read\"]\n"
               "[[client]]\nsubject = \"CN=a\"\nclasses = [\"read\"]\n",
               "client[1].subject");
  expect_error("[[demand_response_group]]\ntitle = \"x.y\"\nmax_event_window = 60\n",
               "demand_response_group[0].title");
  expect_error("[[demand_response_group]]\ntitle = \".3\"\n",
               "demand_response_group[0].max_event_window");
  // Windows longer than the invocation-id wrap horizon at the peak rate.
  expect_error("[invocation_ids]\npeak_rate = 100000\n[classes.firmware]\nwindow = 86400\n",
               "classes.firmware.window");
  expect_error("[invocation_ids]\npeak_rate = 1000000\n"
               "[[demand_response_group]]\ntitle = \".3\"\nmax_event_window = 7200\n",
               "demand_response_group[0].max_event_window");
  expect_error("clock_skew = [", "p.toml:1");
}

// ---- classification ---------------------------------------------------------------------------

const char* kPolicy =
    "[procedures]\nconnect_disconnect = [\"SP-26\"]\ntime = [\"MP-10\"]\n"
    "[table_writes]\ndemand_response = [\"MT-40\"]\n";

// A mode-0 message whose EPSEM is 80 + the given wire services.
struct Req {
  Bytes wire;
  c1222::Message m;
};
Req request(std::string_view services_hex, std::uint8_t control = 0x80) {
  Req r;
  const Bytes called = hex("07a112");
  const Bytes a8 = {0x4d};
  Bytes epsem = {control};
  const Bytes svc = hex(services_hex);
  epsem.insert(epsem.end(), svc.begin(), svc.end());
  c1222::Message m;
  m.called_ap_title = c1222::ApTitle{c1222::TitleForm::relative, called};
  m.calling_ap_invocation_id = ByteView(a8);
  m.epsem = epsem;
  r.wire = c1222::encode(m).value();
  r.m = c1222::decode(r.wire).value();
  return r;
}

Result<Classification> classify_hex(std::string_view services_hex, const ClassifyOptions& o = {}) {
  static const Policy p = parse_policy(kPolicy, "p.toml").value();
  Req r = request(services_hex);
  return classify_message(r.m, p, o);
}

TEST(Classify, ProfileVectorExample1IsConnectDisconnect) {
  static const Policy p = parse_policy(kPolicy, "p.toml").value();
  const Bytes wire = hex(
      "6029a205800307a112a60480020109a80302014dbe1528138111800b40000700051a00000200e403300ffa");
  auto m = c1222::decode(wire);
  ASSERT_TRUE(m.ok());
  auto c = classify_message(*m, p);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->command_class, CommandClass::connect_disconnect);
  EXPECT_TRUE(c->ends_with_receipt_read);
  EXPECT_EQ(c->services, 2u);
}

TEST(Classify, ReadsWritesTablesAndProcedures) {
  EXPECT_EQ(classify_hex("03300001").value().command_class, CommandClass::read);
  EXPECT_EQ(classify_hex("03300001" "083f0017000000000a").value().command_class,
            CommandClass::read);
  // Full write to ST-64: write. Partial write to MT-40 (0x0828): demand response.
  EXPECT_EQ(classify_hex("07400040000105fb").value().command_class, CommandClass::write);
  EXPECT_EQ(classify_hex("0a4f0828000000000102" "fe").value().command_class,
            CommandClass::demand_response);
  // MP-10 (little-endian 0a 08): time; a read alongside keeps the class.
  EXPECT_EQ(classify_hex("03300001" "0940000700030a0800ee").value().command_class,
            CommandClass::time);
  // MT-2043 challenge write: key management.
  EXPECT_EQ(classify_hex("194f0ffb0000000010" "c0ffee00112233445566778899aabbcc" "25")
                .value()
                .command_class,
            CommandClass::key_management);
}

Errc code_of(std::string_view services_hex, const ClassifyOptions& o = {}) {
  auto c = classify_hex(services_hex, o);
  return c.ok() ? Errc::ok : c.error().code;
}

TEST(Classify, Refusals) {
  // Unlisted procedure SP-27.
  EXPECT_EQ(code_of("0940000700031b0000e5"), Errc::bad_value);
  // Two different non-read classes in one command.
  EXPECT_EQ(code_of("0940000700031a0000e6" "07400040000105fb"), Errc::bad_value);
  // MT-2040 / MT-2041 / MT-2042 written by a client.
  EXPECT_EQ(code_of("0a4f0ff8000000000101ff"), Errc::bad_value);
  EXPECT_EQ(code_of("0a4f0ff9000000000101ff"), Errc::bad_value);
  EXPECT_EQ(code_of("074000fa000105fb"), Errc::ok);  // ST-250, not MT-2042
  EXPECT_EQ(code_of("0a4f0ffa000000000101ff"), Errc::bad_value);
  // MT-2041 is key management for the DKUS's own commands.
  auto k = classify_hex("0a4f0ff9000000000101ff", {.allow_key_update = true});
  ASSERT_TRUE(k.ok()) << k.error().message();
  EXPECT_EQ(k->command_class, CommandClass::key_management);
  // MT-2042 read anywhere but last, or partially.
  EXPECT_EQ(code_of("03300ffa" "03300001"), Errc::bad_value);
  EXPECT_EQ(code_of("083f0ffa0000000004"), Errc::bad_value);
  // Writes to ST-7 that are not procedures (partial write by offset).
  EXPECT_EQ(code_of("0a4f0007000000000101ff"), Errc::bad_value);
  // Relay services and unknown codes.
  {
    static const Policy p = parse_policy(kPolicy, "p.toml").value();
    std::vector<c1222::DecodedService> relay(1);
    relay[0].value = c1222::Request(c1222::ResolveRequest{});
    auto r = classify(relay, p);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, Errc::unsupported);
    EXPECT_FALSE(classify({}, p).ok());
  }
  EXPECT_EQ(code_of("03" "7f0102"), Errc::unsupported);
  // A response code inside a command.
  EXPECT_EQ(code_of("0100"), Errc::unsupported);
  // Bad checksum (strict decoding).
  EXPECT_EQ(code_of("0740004000010504"), Errc::bad_checksum);
  // Truncated service.
  EXPECT_NE(code_of("0540004000"), Errc::ok);
}

TEST(Classify, NoServicesAndSecuredRefused) {
  static const Policy p = parse_policy(kPolicy, "p.toml").value();
  Req r = request("", 0x80);
  EXPECT_EQ(classify_message(r.m, p).error().code, Errc::missing_element);
  Req s = request("03300001" "00000000", 0x88);
  EXPECT_EQ(classify_message(s.m, p).error().code, Errc::unsupported);
}

// ---- rate limits ------------------------------------------------------------------------------

TEST(RateLimit, FleetBucket) {
  auto p = parse("[classes.connect_disconnect]\nfleet = { count = 100, per = 60, burst = 20 }\n");
  ASSERT_TRUE(p.ok()) << p.error().message();
  auto rl = RateLimiter::create(1024, false);
  ASSERT_TRUE(rl.ok());
  const std::int64_t t0 = 1'000'000'000;
  int allowed = 0;
  for (int i = 0; i < 50; ++i) {
    const Bytes meter = {static_cast<std::uint8_t>(i)};
    if (rl->admit(*p, CommandClass::connect_disconnect, meter, t0) == Admission::allowed) {
      ++allowed;
    }
  }
  EXPECT_EQ(allowed, 20);
  EXPECT_EQ(rl->admit(*p, CommandClass::connect_disconnect, Bytes{1}, t0 + 599'000'000),
            Admission::fleet_limited);
  // One token every 0.6 s.
  EXPECT_EQ(rl->admit(*p, CommandClass::connect_disconnect, Bytes{1}, t0 + 600'000'000),
            Admission::allowed);
  EXPECT_EQ(rl->admit(*p, CommandClass::connect_disconnect, Bytes{1}, t0 + 600'000'000),
            Admission::fleet_limited);
  // Over a minute at most ~100 (+ the burst).
  allowed = 0;
  for (int ms = 0; ms < 60'000; ms += 10) {
    if (rl->admit(*p, CommandClass::connect_disconnect, Bytes{2},
                  t0 + 1'000'000'000LL + ms * 1'000'000LL) == Admission::allowed) {
      ++allowed;
    }
  }
  EXPECT_GE(allowed, 100);
  EXPECT_LE(allowed, 102);
  // Other classes have no limit here.
  for (int i = 0; i < 1000; ++i) {
    EXPECT_EQ(rl->admit(*p, CommandClass::read, Bytes{1}, t0), Admission::allowed);
  }
}

TEST(RateLimit, MeterBucketDoesNotSpendFleetTokens) {
  auto p = parse("[classes.time]\nfleet = { count = 3, per = 60 }\n"
                 "meter = { count = 2, per = 3600 }\n");
  ASSERT_TRUE(p.ok()) << p.error().message();
  auto rl = RateLimiter::create(1 << 16, false);
  ASSERT_TRUE(rl.ok());
  const Bytes a = hex("607c86f75401160007a112");
  const Bytes b = hex("607c86f75401160007a113");
  const Bytes c = hex("607c86f75401160007a114");
  EXPECT_EQ(rl->admit(*p, CommandClass::time, a, 0), Admission::allowed);
  EXPECT_EQ(rl->admit(*p, CommandClass::time, a, 0), Admission::allowed);
  EXPECT_EQ(rl->admit(*p, CommandClass::time, a, 0), Admission::meter_limited);
  EXPECT_EQ(rl->admit(*p, CommandClass::time, b, 0), Admission::allowed);
  // Fleet now empty (3 used): b's meter token is given back when the fleet refuses.
  EXPECT_EQ(rl->admit(*p, CommandClass::time, c, 0), Admission::fleet_limited);
  EXPECT_EQ(rl->admit(*p, CommandClass::time, b, 20'000'000'000LL), Admission::allowed);
  EXPECT_EQ(rl->admit(*p, CommandClass::time, b, 40'000'000'000LL), Admission::meter_limited);
}

TEST(RateLimit, SharedAcrossForkedWorkers) {
  auto p = parse("[classes.connect_disconnect]\nfleet = { count = 10, per = 3600 }\n");
  ASSERT_TRUE(p.ok());
  auto rl = RateLimiter::create(16, true);
  ASSERT_TRUE(rl.ok());
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int n = 0;
    for (int i = 0; i < 6; ++i) {
      n += rl->admit(*p, CommandClass::connect_disconnect, Bytes{1}, 5) == Admission::allowed;
    }
    _exit(n);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 6);
  int n = 0;
  for (int i = 0; i < 10; ++i) {
    n += rl->admit(*p, CommandClass::connect_disconnect, Bytes{1}, 5) == Admission::allowed;
  }
  EXPECT_EQ(n, 4);
  // Private memory would not be shared.
  auto priv = RateLimiter::create(16, false);
  ASSERT_TRUE(priv.ok());
  EXPECT_FALSE(RateLimiter::create(0, false).ok());
}

}  // namespace
}  // namespace gs::policy
