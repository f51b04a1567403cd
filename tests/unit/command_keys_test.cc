// Command keys and MT-2044 replacement statements (src/command_keys.h, `gridseal cmdkeys`)
// against a real SoftHSM2 token, store and gridseal-sesd: generated keys carry the HSM attributes
// of `hsm init`'s command keys; statements verify with gs-revocation's exported public key on the
// host, their sequence rises and cannot be rewritten; the refusals of replace and retire; the SES
// refuses to start with a displaced key, relays a valid statement and refuses a forged one; the
// quorum holds `cmdkeys generate`.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "c1222/profile.h"
#include "hsm/ops.h"
#include "src/command_keys.h"
#include "src/config.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "src/policy.h"
#include "tests/unit/sesd_fixture.h"

namespace {

namespace fs = std::filesystem;
using gs::Bytes;
using gs::test::CmdResult;
using gs::test::SesdDaemon;
using gs::test::SesdOptions;

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

// The last line of a command's output (stdout and stderr are merged: the bootstrap-mode warning
// comes first).
std::string last_line(const std::string& out) {
  const std::string t = trim(out);
  const auto nl = t.rfind('\n');
  return nl == std::string::npos ? t : t.substr(nl + 1);
}

// A policy whose client may send key management (and reads).
std::string key_management_policy(const std::string& subject) {
  return "[[client]]\nname = \"head-end\"\nsubject = \"" + subject +
         "\"\nclasses = [\"read\", \"key_management\"]\n";
}

class CommandKeys : public ::testing::Test {
 protected:
  void SetUp() override {
    SesdOptions o;
    o.meters = 1;
    o.start_timeout = std::chrono::seconds(15);
    d_ = std::make_unique<SesdDaemon>(o);
    ASSERT_TRUE(d_->setup().ok());
    d_->write_policy(key_management_policy(d_->client_subject()));
  }

  CmdResult run(const std::string& args) const { return d_->gridseal(args); }

  // The statement a `cmdkeys replace|statement ... --hex` printed.
  static gs::Result<gs::c1222::CommandKeyReplacement> parse_hex(const std::string& out) {
    auto b = gs::from_hex(last_line(out));
    if (!b) return gs::Error(gs::Errc::bad_value, "not hex: " + out);
    return gs::c1222::decode_replacement_write(*b);
  }

  gs::HostEcKey exported(const std::string& label) const {
    CmdResult r = run("hsm export-pubkey " + label + " --hex");
    EXPECT_EQ(r.code, 0) << r.out;
    auto k = gs::HostEcKey::from_public(gs::test::hex_bytes(last_line(r.out)));
    EXPECT_TRUE(k.ok());
    return std::move(k).value();
  }

  gs::store::KeyStore store() const {
    auto cfg = gs::config::load(d_->conf());
    EXPECT_TRUE(cfg.ok());
    auto ks = gs::store::KeyStore::open(cfg->store.path, {.create = false});
    EXPECT_TRUE(ks.ok()) << ks.error().message();
    return std::move(ks).value();
  }

  std::unique_ptr<SesdDaemon> d_;
};

TEST_F(CommandKeys, GenerateMakesASignOnlyNonExtractableKeyAndRegistersIt) {
  CmdResult list = run("cmdkeys list");
  ASSERT_EQ(list.code, 0) << list.out;
  EXPECT_TRUE(has(list.out, "gs-cmd-1") && has(list.out, "0 (initial)")) << list.out;
  EXPECT_TRUE(has(list.out, "gs-cmd-2") && has(list.out, "1 (initial)")) << list.out;

  CmdResult g = run("cmdkeys generate --json");
  ASSERT_EQ(g.code, 0) << g.out;
  EXPECT_TRUE(has(g.out, "\"id\":3")) << g.out;
  CmdResult g2 = run("cmdkeys generate");
  ASSERT_EQ(g2.code, 0) << g2.out;
  EXPECT_TRUE(has(g2.out, "generated command key 4 (gs-cmd-4")) << g2.out;

  // The registry row, with the token's public point.
  auto ks = store();
  gs::cmdkeys::CommandKeyStore reg(ks.db());
  auto k3 = reg.find(3);
  ASSERT_TRUE(k3.ok() && k3->has_value());
  EXPECT_EQ((*k3)->label, "gs-cmd-3");
  EXPECT_EQ((*k3)->state, gs::cmdkeys::KeyState::generated);
  EXPECT_TRUE((*k3)->created_by.starts_with("bootstrap:")) << (*k3)->created_by;
  EXPECT_TRUE(has(g.out, gs::cmdkeys::fingerprint((*k3)->public_key))) << g.out;
  auto k1 = reg.find(1);
  ASSERT_TRUE(k1.ok() && k1->has_value());
  EXPECT_EQ((*k1)->created_by, "hsm init");
  const gs::HostEcKey pub3 = exported("gs-cmd-3");
  EXPECT_TRUE(std::ranges::equal(pub3.public_point(), (*k3)->public_key));

  // The HSM object: what `hsm init` gives gs-cmd-1, and a signature that verifies on the host.
  auto cfg = gs::config::load(d_->conf());
  ASSERT_TRUE(cfg.ok());
  auto hsm = gs::open_hsm(cfg->hsm);
  ASSERT_TRUE(hsm.ok()) << hsm.error().message();
  auto lease = hsm->pool->acquire();
  ASSERT_TRUE(lease.ok());
  auto priv = gs::hsm::find_object(lease->session(), gs::hsm::ObjectClass::private_key, "gs-cmd-3");
  ASSERT_TRUE(priv.ok()) << priv.error().message();
  auto a = gs::hsm::object_attributes(lease->session(), *priv);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->token && a->private_object && a->sensitive && a->sign);
  EXPECT_FALSE(a->extractable || a->derive || a->decrypt || a->unwrap);
  EXPECT_TRUE(a->modifiable);  // session-copyable (hsm.command_key_session_copy, the default)
  auto ref = gs::hsm::find_object(lease->session(), gs::hsm::ObjectClass::private_key, "gs-cmd-1");
  ASSERT_TRUE(ref.ok());
  auto ra = gs::hsm::object_attributes(lease->session(), *ref);
  ASSERT_TRUE(ra.ok());
  EXPECT_EQ(a->sensitive, ra->sensitive);
  EXPECT_EQ(a->extractable, ra->extractable);
  EXPECT_EQ(a->modifiable, ra->modifiable);
  EXPECT_FALSE(gs::hsm::read_value(lease->session(), *priv).ok());
  gs::Sha256Digest digest{};
  digest[0] = 7;
  auto sig = gs::hsm::sign_digest(lease->session(), *priv, digest);
  ASSERT_TRUE(sig.ok());
  EXPECT_TRUE(pub3.verify(digest, *sig).ok());
}

TEST_F(CommandKeys, ReplaceSignsRisingStatementsAndRefusesWhatMetersWouldReject) {
  ASSERT_EQ(run("cmdkeys generate").code, 0);
  const gs::HostEcKey revocation = exported("gs-revocation");
  const gs::HostEcKey cmd3 = exported("gs-cmd-3");

  CmdResult r1 = run("cmdkeys replace --slot 1 --key 3 --hex");
  ASSERT_EQ(r1.code, 0) << r1.out;
  auto s1 = parse_hex(r1.out);
  ASSERT_TRUE(s1.ok()) << s1.error().message();
  EXPECT_EQ(s1->sequence, 1u);
  EXPECT_EQ(s1->trust_slot, 1);
  EXPECT_EQ(s1->key_id, 3);
  EXPECT_TRUE(std::ranges::equal(s1->public_key, cmd3.public_point()));
  // Verified on the host with the exported gs-revocation key: SHA-256("GSV1" | 77 bytes).
  auto d1 = gs::sha256(gs::c1222::replacement_signed_bytes(*s1));
  ASSERT_TRUE(d1.ok());
  EXPECT_TRUE(revocation.verify(*d1, s1->signature).ok());
  // Not by another key.
  EXPECT_FALSE(cmd3.verify(*d1, s1->signature).ok());

  // Refusals: the key the other slot holds, the key already in the slot, unknown keys.
  for (const auto& [args, why] :
       {std::pair{"--slot 0 --key 3", "is in trust slot 1 (statement 1)"},
        std::pair{"--slot 1 --key 3", "already in trust slot 1"},
        std::pair{"--slot 0 --key 1", "already in trust slot 0"},
        std::pair{"--slot 0 --key 9", "command key 9 is not registered"}}) {
    CmdResult r = run(std::string("cmdkeys replace ") + args);
    EXPECT_EQ(r.code, 1) << args << ": " << r.out;
    EXPECT_TRUE(has(r.out, why)) << args << ": " << r.out;
  }
  EXPECT_NE(run("cmdkeys replace --slot 2 --key 3").code, 0);

  // Key 2, displaced from slot 1, may go to slot 0: sequence 2.
  const std::string out = d_->dir() + "/stmt2.bin";
  CmdResult r2 = run("cmdkeys replace --slot 0 --key 2 --out " + out);
  ASSERT_EQ(r2.code, 0) << r2.out;
  Bytes file;
  {
    std::ifstream f(out, std::ios::binary);
    file.assign(std::istreambuf_iterator<char>(f), {});
  }
  ASSERT_EQ(file.size(), 150u);
  auto s2 = gs::c1222::decode_replacement_write(file);
  ASSERT_TRUE(s2.ok()) << s2.error().message();
  EXPECT_EQ(s2->sequence, 2u);
  auto d2 = gs::sha256(gs::c1222::replacement_signed_bytes(*s2));
  EXPECT_TRUE(revocation.verify(*d2, s2->signature).ok());
  // --out never overwrites.
  EXPECT_EQ(run("cmdkeys statement 2 --out " + out).code, 1);
  // Re-printed from the store: the same bytes.
  CmdResult again = run("cmdkeys statement 2 --hex");
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_EQ(last_line(again.out), gs::to_hex(file));
  EXPECT_EQ(run("cmdkeys statement 3").code, 1);

  CmdResult list = run("cmdkeys list --json");
  ASSERT_EQ(list.code, 0) << list.out;
  EXPECT_TRUE(has(list.out, "{\"slot\":0,\"key_id\":2,\"statement\":2}")) << list.out;
  EXPECT_TRUE(has(list.out, "{\"slot\":1,\"key_id\":3,\"statement\":1}")) << list.out;

  // Statements are append-only, whoever holds the database.
  auto ks = store();
  EXPECT_FALSE(ks.db().exec("UPDATE command_key_statements SET key_id = 1 WHERE seq = 1").ok());
  EXPECT_FALSE(ks.db().exec("UPDATE command_key_statements SET signature = signature").ok());
  EXPECT_FALSE(ks.db().exec("DELETE FROM command_key_statements WHERE seq = 2").ok());
  EXPECT_FALSE(ks.db().exec("DELETE FROM command_keys WHERE key_id = 1").ok());
  gs::cmdkeys::CommandKeyStore reg(ks.db());
  auto last = reg.last_sequence();
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, 2u);

  // Retire: only a key no slot holds; then it cannot come back.
  CmdResult busy = run("cmdkeys retire 3");
  EXPECT_EQ(busy.code, 1) << busy.out;
  EXPECT_TRUE(has(busy.out, "gs-cmd-3 is in trust slot 1")) << busy.out;
  CmdResult ret = run("cmdkeys retire 1");
  ASSERT_EQ(ret.code, 0) << ret.out;
  EXPECT_EQ(run("cmdkeys retire 1").code, 1);
  CmdResult back = run("cmdkeys replace --slot 1 --key 1");
  EXPECT_EQ(back.code, 1) << back.out;
  EXPECT_TRUE(has(back.out, "gs-cmd-1 is retired")) << back.out;
  EXPECT_FALSE(ks.db().exec("UPDATE command_keys SET state = 'generated' WHERE key_id = 1").ok());

  CmdResult exp = run("audit export --since 0");
  ASSERT_EQ(exp.code, 0) << exp.out;
  for (const char* e : {"\"command_key_generated\"", "\"command_key_replacement_signed\"",
                        "\"command_key_replacement_refused\"", "\"command_key_retired\"",
                        "\"command_key_retire_refused\""}) {
    EXPECT_TRUE(has(exp.out, e)) << e;
  }
  EXPECT_EQ(run("audit verify").code, 0);
}

TEST_F(CommandKeys, StoreChecksTheSigningKeyOfTheDaemons) {
  auto ks = store();
  EXPECT_TRUE(gs::cmdkeys::check_signing_key(ks.db(), 1, "ses.command_key").ok());
  EXPECT_TRUE(gs::cmdkeys::check_signing_key(ks.db(), 2, "ses.command_key").ok());
  auto never = gs::cmdkeys::check_signing_key(ks.db(), 7, "ses.command_key");
  ASSERT_FALSE(never.ok());
  EXPECT_TRUE(has(never.error().message(), "gs-cmd-7 is in no trust slot")) << never.error().message();
  // A database without the tables (a broken store) fails closed.
  auto raw = gs::db::Db::open(d_->dir() + "/empty.db");
  ASSERT_TRUE(raw.ok());
  EXPECT_FALSE(gs::cmdkeys::check_signing_key(*raw, 1, "ses.command_key").ok());
}

TEST_F(CommandKeys, SesRelaysAValidStatementRefusesAForgedOneAndRefusesToStartWithADisplacedKey) {
  ASSERT_EQ(run("cmdkeys generate").code, 0);
  CmdResult r1 = run("cmdkeys replace --slot 1 --key 3 --hex");
  ASSERT_EQ(r1.code, 0) << r1.out;
  const Bytes service = gs::test::hex_bytes(last_line(r1.out));
  ASSERT_EQ(service.size(), 150u);

  ASSERT_TRUE(d_->start().ok()) << d_->err_log();
  auto connected = d_->connect();
  ASSERT_TRUE(connected.ok()) << connected.error().message();
  std::unique_ptr<gs::server::Client> c = std::move(connected).value();
  const std::string meter = d_->meter_title(1);

  // Valid: signed class key_management (MT-2040 by gs-cmd-1), the statement relayed unchanged.
  auto resp = c->call(gs::test::sesd_request(meter, 101, {service}));
  ASSERT_TRUE(resp.ok()) << resp.error().message();
  auto chk = gs::test::check_secured(*resp, d_->meter_key(1), d_->pub_hex());
  ASSERT_TRUE(chk.ok()) << chk.error().message() << " reply code " << gs::test::error_reply(*resp).code;
  EXPECT_EQ(chk->command_class, gs::c1222::CommandClass::key_management);
  EXPECT_EQ(chk->signer_key_id, 1);
  EXPECT_TRUE(has(chk->following_hex, gs::to_hex(service))) << chk->following_hex;

  // One flipped signature byte (checksum fixed, so only the signature is wrong): refused.
  auto forged_r = gs::c1222::decode_replacement_write(service);
  ASSERT_TRUE(forged_r.ok());
  forged_r->signature[10] ^= 0x01;
  const Bytes forged = gs::c1222::encode_replacement_write(*forged_r);
  auto bad = c->call(gs::test::sesd_request(meter, 102, {forged}));
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(gs::test::error_reply(*bad).code, gs::c1222::kRespIsc);
  // A statement that does not decode strictly (reserved byte set) is refused too.
  Bytes odd = service;
  odd[9 + 3] = 1;  // data byte 3 (reserved), after 4F 0FFC 000000 008D
  odd.back() = static_cast<std::uint8_t>(odd.back() - 1);
  auto odd_r = c->call(gs::test::sesd_request(meter, 103, {odd}));
  ASSERT_TRUE(odd_r.ok());
  EXPECT_EQ(gs::test::error_reply(*odd_r).code, gs::c1222::kRespIsc);
  c.reset();
  EXPECT_EQ(d_->stop(), 0);
  EXPECT_TRUE(has(d_->err_log(), "statement_refused") || has(d_->err_log(), "gs-revocation"))
      << d_->err_log();
  CmdResult exp = run("audit export --since 0");
  EXPECT_TRUE(has(exp.out, "not signed by gs-revocation")) << exp.out;

  // Statement 2 takes key 1 out of slot 0: gridseal-sesd with ses.command_key = 1 does not start.
  ASSERT_EQ(run("cmdkeys replace --slot 0 --key 2").code, 0);
  EXPECT_FALSE(d_->start().ok());
  const std::string err = d_->err_log();
  EXPECT_TRUE(has(err, "ses.command_key = 1: gs-cmd-1 is in no trust slot")) << err;
  EXPECT_TRUE(has(err, "statement 2")) << err;
  d_->stop();
}

TEST(CommandKeysPolicy, Mt2044WritesAreKeyManagementAndNotReclassifiable) {
  auto p = gs::policy::parse_policy("", "p.toml");
  ASSERT_TRUE(p.ok()) << p.error().message();
  gs::c1222::CommandKeyReplacement r;
  r.trust_slot = 1;
  r.key_id = 3;
  r.sequence = 1;
  r.public_key[0] = 0x04;
  // decode() returns views into the wire bytes: keep them alive.
  const Bytes wire = gs::test::sesd_request(".7.1", 5, {gs::c1222::encode_replacement_write(r)});
  auto m = gs::c1222::decode(wire);
  ASSERT_TRUE(m.ok());
  auto c = gs::policy::classify_message(*m, *p);
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->command_class, gs::c1222::CommandClass::key_management);
  // Not a point on the curve, and no key to check it with: refused either way.
  EXPECT_FALSE(gs::cmdkeys::check_replacement_writes(*m, nullptr).ok());
  auto bad = gs::policy::parse_policy("[table_writes]\nwrite = [\"MT-2044\"]\n", "p.toml");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(has(bad.error().message(), "MT-2040..2044")) << bad.error().message();
}

// `cmdkeys generate` under a [[quorum]] rule: refused when run directly, run once by the quorum.
TEST(CommandKeysQuorum, GenerateNeedsTwoKeyCustodians) {
  char tmpl[] = "/tmp/gs-cmdkeys-q-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const std::string conf = dir + "/gridseal.toml";
  std::ofstream(conf) << "policy = \"policy.toml\"\n"
                         "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-cmdkeys-q\"\n"
                         "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                         "[store]\npath = \"gridseal.db\"\n";
  std::ofstream(dir + "/policy.toml")
      << "[[quorum]]\nname = \"command-key-generation\"\ncommand = \"cmdkeys generate\"\n"
         "role = \"key-custodian\"\napprovals = 2\n";
  auto key = [&](const std::string& n) { return dir + "/" + n + ".pem"; };
  auto pub = [&](const std::string& n) { return dir + "/" + n + ".pub"; };
  for (const char* n : {"alice", "kate", "ken"}) {
    ASSERT_EQ(gs::test::run_command("openssl genpkey -algorithm EC -pkeyopt "
                                    "ec_paramgen_curve:P-256 -out " + key(n) +
                                    " && openssl pkey -in " + key(n) + " -pubout -out " + pub(n))
                  .code,
              0);
  }
  auto run = [&](const std::string& args) { return gs::test::run_gridseal(args + " --config " + conf); };
  auto as = [&](const std::string& who, const std::string& args) {
    return run(args + " --operator " + who + " --operator-key " + key(who));
  };
  CmdResult init = run("hsm init --officer alice --officer-pubkey " + pub("alice"));
  ASSERT_EQ(init.code, 0) << init.out;
  for (const char* n : {"kate", "ken"}) {
    CmdResult e = as("alice", std::string("operators enroll ") + n +
                                  " --role key-custodian --pubkey " + pub(n));
    ASSERT_EQ(e.code, 0) << e.out;
  }
  // Run directly by a key custodian: refused, nothing generated.
  CmdResult direct = as("kate", "cmdkeys generate");
  EXPECT_EQ(direct.code, 3) << direct.out;
  EXPECT_TRUE(has(direct.out, "needs 2 approvals from key-custodians")) << direct.out;
  // An operator of another role may not run it at all.
  EXPECT_EQ(as("alice", "cmdkeys generate").code, 3);
  EXPECT_FALSE(has(run("cmdkeys list").out, "gs-cmd-3"));

  CmdResult req = gs::test::run_gridseal("approvals request --config " + conf +
                                         " --operator kate --operator-key " + key("kate") +
                                         " -- cmdkeys generate");
  ASSERT_EQ(req.code, 0) << req.out;
  CmdResult ok = as("ken", "approvals approve 1");
  ASSERT_EQ(ok.code, 0) << ok.out;
  EXPECT_TRUE(has(ok.out, "generated command key 3")) << ok.out;
  CmdResult list = run("cmdkeys list");
  EXPECT_TRUE(has(list.out, "gs-cmd-3") && has(list.out, "approval:1")) << list.out;
  fs::remove_all(dir);
}

}  // namespace
