// Operator keys on a PKCS#11 token (src/operator_token.h): a security officer whose private key
// lives on their own SoftHSM2 token (not the appliance's) signs `operators enroll` with C_Sign
// through a pkcs11: URI, on the appliance and offline (`sign-request`); a wrong PIN, an unknown
// key label or a token key that is not the registered one is refused; URIs are validated.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "src/operator_token.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;
using gs::test::CmdResult;

constexpr char kModule[] = "/usr/lib/softhsm/libsofthsm2.so";

bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

class CliOperatorToken : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kModule)) GTEST_SKIP() << "SoftHSM2 not installed";
    char tmpl[] = "/tmp/gs-cli-optok-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-cli-optok\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
    // The officer's own token, in its own SoftHSM2 directory (their smart card).
    fs::create_directories(dir_ + "/card/tokens");
    card_conf_ = dir_ + "/card/softhsm2.conf";
    std::ofstream(card_conf_) << "directories.tokendir = " << dir_
                              << "/card/tokens\nobjectstore.backend = file\nlog.level = ERROR\n";
    ASSERT_EQ(card("softhsm2-util --init-token --free --label alice-card --so-pin 87654321 "
                   "--pin 1234")
                  .code,
              0);
    for (const char* n : {"alice", "mallory", "bob"}) {
      ASSERT_EQ(sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + key(n) +
                   " && openssl pkey -in " + key(n) + " -pubout -out " + pub(n))
                    .code,
                0);
    }
    ASSERT_EQ(card("softhsm2-util --import " + key("alice") +
                   " --token alice-card --label alice-key --id 01 --pin 1234")
                  .code,
              0);
    ASSERT_EQ(card("softhsm2-util --import " + key("mallory") +
                   " --token alice-card --label other-key --id 02 --pin 1234")
                  .code,
              0);
    // The key file is not needed any more: the token holds the key.
    fs::remove(key("alice"));
    pin_ = dir_ + "/alice.pin";
    std::ofstream(pin_) << "1234\n";
    ::chmod(pin_.c_str(), 0600);
    bad_pin_ = dir_ + "/bad.pin";
    std::ofstream(bad_pin_) << "9999\n";
    ::chmod(bad_pin_.c_str(), 0600);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  static CmdResult sh(const std::string& line) { return gs::test::run_command(line); }
  CmdResult card(const std::string& line) const {
    return sh("SOFTHSM2_CONF=" + card_conf_ + " " + line);
  }
  std::string key(const std::string& n) const { return dir_ + "/" + n + ".pem"; }
  std::string pub(const std::string& n) const { return dir_ + "/" + n + ".pub"; }
  std::string uri(const std::string& object, const std::string& pin) const {
    return "'pkcs11:token=alice-card;object=" + object + "?module-path=" + kModule +
           "&pin-source=file:" + pin + "'";
  }
  // The CLI with the officer's card reachable (SOFTHSM2_CONF names it; the appliance's own
  // token is found through hsm.softhsm_dir, which gridseal sets itself).
  CmdResult cli(const std::string& args) const {
    return card(std::string(GS_BIN_DIR) + "/gridseal " + args + " --config " + conf_);
  }

  std::string dir_, conf_, card_conf_, pin_, bad_pin_;
};

TEST_F(CliOperatorToken, AnOfficerSignsWithTheKeyOnTheirToken) {
  CmdResult init = cli("hsm init --officer alice --officer-pubkey " + pub("alice"));
  ASSERT_EQ(init.code, 0) << init.out;

  CmdResult ok = cli("operators enroll bob --role operator --pubkey " + pub("bob") +
                     " --operator alice --operator-key " + uri("alice-key", pin_));
  ASSERT_EQ(ok.code, 0) << ok.out;
  EXPECT_TRUE(has(ok.out, "operator alice (security-officer) authorized `operators enroll`"))
      << ok.out;

  // Offline: a nonce from the appliance, signed on the card elsewhere, presented with --request.
  CmdResult ch = cli("operators challenge");
  ASSERT_EQ(ch.code, 0) << ch.out;
  const auto p = ch.out.find("nonce ");
  ASSERT_NE(p, std::string::npos) << ch.out;
  const std::string nonce = ch.out.substr(p + 6, 32);
  const std::string req = dir_ + "/remove.req";
  CmdResult sign = card(std::string(GS_BIN_DIR) + "/gridseal operators sign-request --operator "
                        "alice --operator-key " + uri("alice-key", pin_) + " --nonce " + nonce +
                        " --out " + req + " -- operators remove bob");
  ASSERT_EQ(sign.code, 0) << sign.out;
  CmdResult rm = cli("operators remove bob --request " + req);
  EXPECT_EQ(rm.code, 0) << rm.out;

  // A wrong PIN signs nothing; another key on the same card is not alice's registered key.
  CmdResult pin = cli("operators enroll carol --role operator --pubkey " + pub("bob") +
                      " --operator alice --operator-key " + uri("alice-key", bad_pin_));
  EXPECT_EQ(pin.code, 1) << pin.out;
  EXPECT_TRUE(has(pin.out, "login")) << pin.out;
  EXPECT_FALSE(has(pin.out, "9999")) << pin.out;
  CmdResult other = cli("operators enroll carol --role operator --pubkey " + pub("bob") +
                        " --operator alice --operator-key " + uri("other-key", pin_));
  EXPECT_EQ(other.code, 3) << other.out;
  EXPECT_TRUE(has(other.out, "signature")) << other.out;
  CmdResult missing = cli("operators enroll carol --role operator --pubkey " + pub("bob") +
                          " --operator alice --operator-key " + uri("no-such-key", pin_));
  EXPECT_EQ(missing.code, 1) << missing.out;
  EXPECT_TRUE(has(missing.out, "private key 'no-such-key'")) << missing.out;

  CmdResult v = cli("audit verify");
  EXPECT_EQ(v.code, 0) << v.out;
}

TEST(OperatorTokenUri, ParsesRfc7512SubsetAndNamesWhatIsWrong) {
  using gs::operators::parse_token_uri;
  auto u = parse_token_uri(
      "pkcs11:token=alice%20card;object=k1;id=%01?module-path=/lib/p11.so&pin-source=file:/p");
  ASSERT_TRUE(u.ok()) << u.error().message();
  EXPECT_EQ(u->token, "alice card");
  EXPECT_EQ(u->object, "k1");
  EXPECT_EQ(u->module_path, "/lib/p11.so");
  EXPECT_EQ(u->pin_file, "/p");
  auto e = parse_token_uri("pkcs11:token=t;object=o?module-path=/m&pin-source=env:PIN");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->pin_env, "PIN");
  auto bad = [](const std::string& text, const std::string& what) {
    auto r = parse_token_uri(text);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_TRUE(has(r.error().message(), what)) << r.error().message();
  };
  bad("pkcs11:object=o?module-path=/m&pin-source=file:/p", "token=");
  bad("pkcs11:token=t?module-path=/m&pin-source=file:/p", "object=");
  bad("pkcs11:token=t;object=o?pin-source=file:/p", "module-path=");
  bad("pkcs11:token=t;object=o?module-path=/m", "pin-source");
  bad("pkcs11:token=t;object=o?module-path=/m&pin-value=1234", "unsupported attribute");
  bad("pkcs11:token=t%2;object=o?module-path=/m&pin-source=file:/p", "%-escape");
  bad("pkcs11:token=t;object=o?module-path=/m&pin-source=http://x", "pin-source");
  bad("pkcs11:" + std::string(5000, 'a'), "too long");
}

}  // namespace
