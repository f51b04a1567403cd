// src/operators.h without the CLI: the canonical request bytes, what the signature binds, the
// request file's negative cases, the registry's rules (first officer, names never reused, last
// officer), nonces (single use, expiry, bound) and authorize()'s order of refusals.
#include "src/operators.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "src/key_store.h"

namespace {

namespace fs = std::filesystem;
namespace op = gs::operators;
using gs::Errc;

op::Request sample() {
  op::Request r{"bob", "meters revoke", {{"ID", "M1"}, {"--reason", "lost"}}, gs::Bytes(16, 7),
                1700000000};
  EXPECT_TRUE(op::canonicalize(r).ok());
  return r;
}

TEST(OperatorRequest, EncodingIsCanonicalAndBindsEveryField) {
  op::Request r = sample();
  EXPECT_EQ(r.args.front().first, "--reason");  // sorted by name
  gs::Bytes enc = op::request_encoding(r);
  EXPECT_EQ(std::string(enc.begin(), enc.begin() + 4), "GSO1");
  // lp("bob") right after the tag.
  EXPECT_EQ(enc[4], 0);
  EXPECT_EQ(enc[7], 3);
  EXPECT_EQ(std::string(enc.begin() + 8, enc.begin() + 11), "bob");
  auto key = gs::HostEcKey::generate();
  ASSERT_TRUE(key.ok());
  auto sig = op::sign_request(r, *key);
  ASSERT_TRUE(sig.ok());
  auto verify = [&](const op::Request& x) {
    auto d = op::request_digest(x);
    return d.ok() && key->verify(*d, *sig).ok();
  };
  EXPECT_TRUE(verify(r));
  auto changed = [&](auto mutate) {
    op::Request x = r;
    mutate(x);
    return !verify(x);
  };
  EXPECT_TRUE(changed([](op::Request& x) { x.operator_name = "bobb"; }));
  EXPECT_TRUE(changed([](op::Request& x) { x.command = "meters import"; }));
  EXPECT_TRUE(changed([](op::Request& x) { x.args[1].second = "M2"; }));
  EXPECT_TRUE(changed([](op::Request& x) { x.args.pop_back(); }));
  EXPECT_TRUE(changed([](op::Request& x) { x.nonce[15] ^= 1; }));
  EXPECT_TRUE(changed([](op::Request& x) { x.time += 1; }));
  // Moving a byte between a name and its value changes the encoding (length prefixes).
  EXPECT_TRUE(changed([](op::Request& x) { x.args[1] = {"I", "DM1"}; }));
}

TEST(OperatorRequest, FileRoundTripsAndRefusesMalformedInput) {
  op::Request r = sample();
  r.args.emplace_back("--reason#x", "line\nbreak \xff");
  ASSERT_TRUE(op::canonicalize(r).ok());
  gs::EcSignature sig{};
  sig[0] = 1;
  auto back = op::parse_request_file(op::request_file_text(r, sig));
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->first.args, r.args);
  EXPECT_EQ(back->first.nonce, r.nonce);
  EXPECT_EQ(back->second, sig);
  const std::string good = op::request_file_text(r, sig);
  auto bad = [](const std::string& text) { return !op::parse_request_file(text).ok(); };
  EXPECT_TRUE(bad(""));
  EXPECT_TRUE(bad("hello\n"));
  EXPECT_TRUE(bad(good.substr(0, good.find("signature"))));
  EXPECT_TRUE(bad(good + "extra 1\n"));
  std::string short_nonce = good;
  short_nonce.replace(short_nonce.find("nonce ") + 6, 2, "");
  EXPECT_TRUE(bad(short_nonce));
  std::string bad_time = good;
  bad_time.replace(bad_time.find("time ") + 5, 1, "-");
  EXPECT_TRUE(bad(bad_time));
  std::string bad_name = good;
  bad_name.replace(bad_name.find("operator bob"), 12, "operator b b");
  EXPECT_TRUE(bad(bad_name));
  std::string many = "gridseal-operator-request 1\n";
  for (std::size_t i = 0; i <= op::kMaxArgs; ++i) many += "arg 41 42\n";
  EXPECT_TRUE(bad(many));
  EXPECT_TRUE(bad(std::string(op::kMaxRequestFile + 1, 'a')));
}

TEST(OperatorRoles, TableSeparatesDuties) {
  const auto* imp = op::rule_for("meters import");
  ASSERT_NE(imp, nullptr);
  EXPECT_TRUE(op::allows(*imp, op::Role::operator_));
  EXPECT_FALSE(op::allows(*imp, op::Role::security_officer));
  EXPECT_FALSE(op::allows(*imp, op::Role::auditor));
  const auto* enroll = op::rule_for("operators enroll");
  ASSERT_NE(enroll, nullptr);
  EXPECT_EQ(op::roles_text(enroll->roles), "security-officer");
  EXPECT_EQ(op::rule_for("meters list"), nullptr);
  for (const auto& r : op::command_rules()) {
    EXPECT_FALSE(op::allows(r, op::Role::auditor)) << r.command;
  }
  EXPECT_TRUE(op::valid_name("alice.b-1_x"));
  EXPECT_FALSE(op::valid_name(""));
  EXPECT_FALSE(op::valid_name("a b"));
  EXPECT_FALSE(op::valid_name(std::string(65, 'a')));
  EXPECT_EQ(op::role_from("key-custodian"), op::Role::key_custodian);
  EXPECT_FALSE(op::role_from("root").has_value());
}

class OperatorRegistry : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-ops-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto ks = gs::store::KeyStore::open(dir_ + "/gs.db");
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    ks_.emplace(std::move(ks).value());
    reg_.emplace(ks_->db());
  }
  void TearDown() override {
    reg_.reset();
    ks_.reset();
    fs::remove_all(dir_);
  }
  gs::Status enroll(const std::string& name, op::Role role, const gs::HostEcKey& k) {
    op::Operator o{name, role, gs::Bytes(k.public_point().begin(), k.public_point().end()), 1,
                   "test", std::nullopt, ""};
    return reg_->enroll(o);
  }
  std::string dir_;
  std::optional<gs::store::KeyStore> ks_;
  std::optional<op::Registry> reg_;
};

TEST_F(OperatorRegistry, EnrolRemoveAndTheLastOfficer) {
  auto a = gs::HostEcKey::generate();
  auto b = gs::HostEcKey::generate();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(enroll("bob", op::Role::operator_, *b).error().code, Errc::conflict);
  ASSERT_TRUE(enroll("alice", op::Role::security_officer, *a).ok());
  ASSERT_TRUE(enroll("bob", op::Role::operator_, *b).ok());
  EXPECT_EQ(enroll("bob", op::Role::auditor, *b).error().code, Errc::conflict);
  EXPECT_EQ(*reg_->active_count(), 2);
  EXPECT_EQ(*reg_->active_count(op::Role::security_officer), 1);
  EXPECT_EQ(reg_->remove("alice", "x", 5).error().code, Errc::conflict);
  ASSERT_TRUE(reg_->remove("bob", "operator:alice", 5).ok());
  EXPECT_EQ(reg_->remove("bob", "operator:alice", 6).error().code, Errc::not_found);
  auto again = enroll("bob", op::Role::operator_, *b);
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.error().detail.find("never reused"), std::string::npos);
  auto all = reg_->list(true);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ(all->at(1).removed_by, "operator:alice");
  EXPECT_EQ(reg_->list(false)->size(), 1u);
  // The table refuses deletion: removal is a state, not a disappearance.
  EXPECT_FALSE(ks_->db().exec("DELETE FROM operators WHERE name = 'bob'").ok());
}

TEST_F(OperatorRegistry, NoncesAreSingleUseAndExpire) {
  EXPECT_EQ(reg_->issue_nonce(0, 100).error().code, Errc::invalid_argument);
  EXPECT_EQ(reg_->issue_nonce(op::kMaxNonceTtl + 1, 100).error().code, Errc::invalid_argument);
  auto n = reg_->issue_nonce(10, 100);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->value.size(), op::kNonceSize);
  EXPECT_EQ(n->expires_at, 110);
  auto m = reg_->issue_nonce(10, 100);
  ASSERT_TRUE(m.ok());
  EXPECT_NE(n->value, m->value);
  EXPECT_TRUE(reg_->consume_nonce(n->value, 105).ok());
  EXPECT_EQ(reg_->consume_nonce(n->value, 105).error().code, Errc::not_found);
  EXPECT_EQ(reg_->consume_nonce(m->value, 110).error().code, Errc::conflict);  // expired
  EXPECT_EQ(reg_->consume_nonce(m->value, 105).error().code, Errc::not_found);  // and gone
}

TEST_F(OperatorRegistry, AuthorizeRefusesInOrderAndConsumesTheNonce) {
  auto a = gs::HostEcKey::generate();
  auto b = gs::HostEcKey::generate();
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(enroll("alice", op::Role::security_officer, *a).ok());
  ASSERT_TRUE(enroll("bob", op::Role::operator_, *b).ok());
  const auto& rule = *op::rule_for("meters revoke");
  auto request = [&](const std::string& who) {
    op::Request r{who, "meters revoke", {{"ID", "M1"}}, reg_->issue_nonce(60, 1000)->value, 1000};
    EXPECT_TRUE(op::canonicalize(r).ok());
    return r;
  };
  op::Request r = request("bob");
  auto sig = *op::sign_request(r, *b);
  auto ok = op::authorize(*reg_, r, sig, rule, 1001);
  ASSERT_TRUE(ok.ok()) << ok.error().message();
  EXPECT_EQ(ok->role, op::Role::operator_);
  auto replay = op::authorize(*reg_, r, sig, rule, 1002);
  ASSERT_FALSE(replay.ok());
  EXPECT_NE(replay.error().detail.find("already used"), std::string::npos);

  op::Request wrong = request("bob");
  auto bad = op::authorize(*reg_, wrong, *op::sign_request(wrong, *a), rule, 1001);
  EXPECT_EQ(bad.error().code, Errc::bad_signature);
  // The refused request's nonce is spent too: one nonce, one decision.
  EXPECT_FALSE(op::authorize(*reg_, wrong, *op::sign_request(wrong, *b), rule, 1001).ok());

  op::Request role = request("alice");
  auto refused = op::authorize(*reg_, role, *op::sign_request(role, *a), rule, 1001);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().detail.find("needs operator"), std::string::npos);

  op::Request skew = request("bob");
  skew.time = 1001 + op::kMaxClockSkew + 10;
  EXPECT_FALSE(op::authorize(*reg_, skew, *op::sign_request(skew, *b), rule, 1001).ok());
}

}  // namespace
