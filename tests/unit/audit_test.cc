// The audit trail library (src/audit.h) against a real SoftHSM2 token and SQLite file: canonical
// encodings (known answers computed with Python hashlib), the chain re-checked by an independent
// path (raw SQLite reads, OpenSSL EVP hashing and ECDSA verification with the exported gs-audit
// key), every kind of tampering named by verify, truncation caught by the HSM anchor at the next
// start, a transaction that never commits, and the batching writer (concurrency, actions in the
// same transaction, two writers on one file).
#include "src/audit.h"

#include <gtest/gtest.h>
#include <openssl/core_names.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <thread>

#include "gridseal/clock.h"
#include "hsm/data_object.h"
#include "hsm/ops.h"
#include "src/config.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "src/metrics.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;
using namespace gs;
using audit::Event;

// ---- an independent implementation of the README's encoding and checks ------------------------

Bytes be64(std::uint64_t v) {
  Bytes b;
  for (int s = 56; s >= 0; s -= 8) b.push_back(static_cast<std::uint8_t>(v >> s));
  return b;
}
void append(Bytes& out, const Bytes& b) { out.insert(out.end(), b.begin(), b.end()); }
void append_lp(Bytes& out, const std::string& s) {
  const auto n = static_cast<std::uint32_t>(s.size());
  for (int sh = 24; sh >= 0; sh -= 8) out.push_back(static_cast<std::uint8_t>(n >> sh));
  for (char c : s) out.push_back(static_cast<std::uint8_t>(c));
}
Bytes evp_sha256(const Bytes& in) {
  Bytes d(32);
  unsigned int n = 0;
  EXPECT_EQ(EVP_Digest(in.data(), in.size(), d.data(), &n, EVP_sha256(), nullptr), 1);
  return d;
}
Bytes independent_record_hash(std::int64_t seq, std::int64_t time, const std::string& actor,
                              const std::string& event, const std::string& subject,
                              const std::string& detail, const Bytes& prev) {
  Bytes enc = {'G', 'S', 'A', 'R', '1'};
  append(enc, be64(static_cast<std::uint64_t>(seq)));
  append(enc, be64(static_cast<std::uint64_t>(time)));
  append_lp(enc, actor);
  append_lp(enc, event);
  append_lp(enc, subject);
  append_lp(enc, detail);
  append(enc, prev);
  return evp_sha256(enc);
}

// ECDSA P-256 verification of `sig` (r||s) over SHA-256(msg) with OpenSSL alone.
bool openssl_verify(const Bytes& point, const Bytes& msg, const Bytes& sig) {
  OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
  OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0);
  OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
  OSSL_PARAM* params = OSSL_PARAM_BLD_to_param(bld);
  EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr);
  EVP_PKEY* pkey = nullptr;
  bool ok = EVP_PKEY_fromdata_init(pctx) == 1 &&
            EVP_PKEY_fromdata(pctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1;
  ECDSA_SIG* es = ECDSA_SIG_new();
  ECDSA_SIG_set0(es, BN_bin2bn(sig.data(), 32, nullptr), BN_bin2bn(sig.data() + 32, 32, nullptr));
  unsigned char* der = nullptr;
  const int der_len = i2d_ECDSA_SIG(es, &der);
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  ok = ok && der_len > 0 && EVP_DigestVerifyInit(md, nullptr, EVP_sha256(), nullptr, pkey) == 1 &&
       EVP_DigestVerify(md, der, static_cast<std::size_t>(der_len), msg.data(), msg.size()) == 1;
  EVP_MD_CTX_free(md);
  OPENSSL_free(der);
  ECDSA_SIG_free(es);
  EVP_PKEY_free(pkey);
  EVP_PKEY_CTX_free(pctx);
  OSSL_PARAM_free(params);
  OSSL_PARAM_BLD_free(bld);
  return ok;
}

TEST(AuditEncoding, KnownAnswers) {
  audit::Record r;
  r.seq = 1;
  r.e = {1735689600, "CN=head-end,O=Utility", "command", "M1",
         R"({"class":"read","invocation_id":5})"};
  EXPECT_EQ(to_hex(audit::record_hash(r)),
            "bdf02fe3c7b51a6bae704c2086a4d9df0ffb70b74c7db19eca65bd4ab83f4b54");
  audit::Record r2;
  r2.seq = 2;
  r2.e = {-1, "syst\xc3\xa8me", "stop", "", ""};
  r2.prev_hash = audit::record_hash(r);
  EXPECT_EQ(to_hex(audit::record_hash(r2)),
            "fee6628b63a56277362a3df87f27b179a02446c06756f5544ecfc2d20bc728ab");
  EXPECT_EQ(to_hex(audit::checkpoint_encoding(2, audit::record_hash(r), 1735689601)),
            "47534143310000000000000002bdf02fe3c7b51a6bae704c2086a4d9df0ffb70b74c7db19eca65bd4a"
            "b83f4b540000000067748581");
  EXPECT_EQ(to_hex(audit::checkpoint_digest(2, audit::record_hash(r), 1735689601)),
            "d14cb34e808456a9ea0516e5aa79e706975823b4f8eda86d668a19b38bf9cfc4");
  // Length prefixes make the field boundaries unambiguous.
  audit::Record a = r, b = r;
  a.e.actor = "ab";
  a.e.event = "c";
  b.e.actor = "a";
  b.e.event = "bc";
  EXPECT_NE(audit::record_hash(a), audit::record_hash(b));
  // Anchor values round-trip; anything else is not one.
  audit::Head h{42, audit::record_hash(r)};
  const std::string hx = to_hex(audit::record_hash(r));
  using audit::AnchorMark;
  for (AnchorMark m : {AnchorMark::sealed, AnchorMark::committed, AnchorMark::pending}) {
    auto v = audit::anchor_decode(audit::anchor_encoding(h, m));
    ASSERT_TRUE(v.has_value());
    EXPECT_EQ(v->head, h);
    EXPECT_EQ(v->mark, m);
  }
  EXPECT_EQ(audit::anchor_encoding(h, AnchorMark::sealed), "GSAA1 42 " + hx + " S");
  EXPECT_EQ(audit::anchor_encoding(h, AnchorMark::pending), "GSAA1 42 " + hx + " P");
  std::string bad = audit::anchor_encoding(h, AnchorMark::committed);
  bad[0] = 'X';
  EXPECT_FALSE(audit::anchor_decode(bad).has_value());
  bad = audit::anchor_encoding(h, AnchorMark::committed);
  bad.pop_back();
  EXPECT_FALSE(audit::anchor_decode(bad).has_value());
  for (const std::string& text :
       std::vector<std::string>{"GSAA1 042 " + hx + " R", "GSAA1 -1 " + hx + " R",
                                "GSAA1 99999999999999999999 " + hx + " R", "GSAA1 42 " + hx + " R",
                                "GSAA1 42 " + hx, "garbage"}) {
    EXPECT_FALSE(audit::anchor_decode(text).has_value()) << text;
  }
}

TEST(AuditEncoding, EventsAreValidatedAndClipped) {
  Event ok{0, "system", "start", "gridseal-sesd", "{}"};
  EXPECT_TRUE(audit::validate(ok).ok());
  Event e = ok;
  e.actor = "";
  EXPECT_EQ(audit::validate(e).error().code, Errc::invalid_argument);
  for (const char* name : {"", "Start", "start now", "x\n", "a/b"}) {
    e = ok;
    e.event = name;
    EXPECT_FALSE(audit::validate(e).ok()) << name;
  }
  e = ok;
  e.event = std::string(audit::kMaxEvent + 1, 'a');
  EXPECT_FALSE(audit::validate(e).ok());
  e = ok;
  e.detail = std::string(audit::kMaxDetail + 1, 'x');
  EXPECT_NE(audit::validate(e).error().message().find("detail"), std::string::npos);
  e = ok;
  e.subject = std::string(audit::kMaxSubject + 1, 'x');
  EXPECT_FALSE(audit::validate(e).ok());
  for (const char* bad : {"\xff", "\xc3", "\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80"}) {
    e = ok;
    e.subject = bad;
    EXPECT_NE(audit::validate(e).error().message().find("UTF-8"), std::string::npos);
  }
  // clip: valid UTF-8, bounded, whole characters, controls blanked, cut marked.
  EXPECT_EQ(audit::clip("abc", 10), "abc");
  EXPECT_EQ(audit::clip("a\xff"
                        "b\n",
                        10),
            "a?b ");
  EXPECT_EQ(audit::clip("abcdefghij", 6), "abc...");
  EXPECT_EQ(audit::clip("\xc3\xa8\xc3\xa8\xc3\xa8\xc3\xa8", 7), "\xc3\xa8\xc3\xa8...");
  const std::string long_utf8 = std::string(300, 'x') + "\xe2\x82\xac" + std::string(300, 'y');
  for (std::size_t max : {0u, 1u, 3u, 4u, 301u, 302u, 303u, 304u, 305u, 700u}) {
    const std::string c = audit::clip(long_utf8, max);
    EXPECT_LE(c.size(), max);
    Event t = ok;
    t.subject = c.substr(0, audit::kMaxSubject);
    EXPECT_TRUE(audit::validate(t).ok()) << max;
  }
  // Detail: compact JSON, escaped, bounded.
  audit::Detail d;
  d.add("class", "read").add("id", std::uint64_t{7}).add("why", "a \"b\"\n");
  EXPECT_EQ(d.str(), R"({"class":"read","id":7,"why":"a \"b\" "})");  // controls blanked
  audit::Detail big;
  for (int i = 0; i < 10; ++i) big.add("k" + std::to_string(i), std::string(600, 'z'));
  EXPECT_LE(big.str().size(), audit::kMaxDetail);
  EXPECT_EQ(audit::json_string("\xc3\xa8\x01"), "\"\xc3\xa8\\u0001\"");
  // Printable ASCII (the fast path) at and just over the bound; DEL is blanked like controls.
  EXPECT_EQ(audit::clip("abcdef", 6), "abcdef");
  EXPECT_EQ(audit::clip("abcdefg", 6), "abc...");
  EXPECT_EQ(audit::clip("a\x7f" "b", 6), "a b");
  EXPECT_EQ(audit::json_string("a\\b\"c"), R"("a\\b\"c")");
  EXPECT_EQ(audit::json_string("\x7f"), "\"\\u007f\"");
  audit::Detail keys;
  keys.add("k\"1", std::int64_t{-5}).add(std::string(70, 'k'), std::uint64_t{18446744073709551615u});
  EXPECT_EQ(keys.str(), "{\"k\\\"1\":-5,\"" + std::string(61, 'k') +
                            "...\":18446744073709551615}");
}

// ---- against a real token
// ------------------------------------------------------------------------

class Audit : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-audit-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-audit-test\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "sessions = 6\n[store]\npath = \"gridseal.db\"\n";
    auto init = test::run_gridseal("hsm init --config " + conf_);
    ASSERT_EQ(init.code, 0) << init.out;
    auto cfg = config::load(conf_);
    ASSERT_TRUE(cfg.ok());
    db_path_ = cfg->store.path;
    auto hsm = open_hsm(cfg->hsm);
    ASSERT_TRUE(hsm.ok()) << hsm.error().message();
    hsm_ = std::make_unique<HsmContext>(std::move(hsm).value());
    auto ks = store::KeyStore::open(db_path_);
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    store_.emplace(std::move(ks).value());
    auto trail = audit::Trail::over(db());
    ASSERT_TRUE(trail.ok()) << trail.error().message();
    trail_.emplace(std::move(trail).value());
    auto lease = hsm_->pool->acquire();
    ASSERT_TRUE(lease.ok());
    auto pub = hsm::find_object(lease->session(), hsm::ObjectClass::public_key, kLabelAudit);
    ASSERT_TRUE(pub.ok());
    auto point = hsm::export_ec_point(lease->session(), *pub);
    ASSERT_TRUE(point.ok());
    pub_.assign(point->begin(), point->end());
  }
  void TearDown() override {
    trail_.reset();
    store_.reset();
    hsm_.reset();
    fs::remove_all(dir_);
  }

  db::Db& db() { return store_->db(); }

  static Event event(int i) {
    audit::Detail d;
    d.add("class", "read").add("invocation_id", i);
    return Event{1700000000 + i, "CN=head-end,O=Utility", "command", "M" + std::to_string(i),
                 d.str()};
  }

  // Appends n records in transactions of `per_tx`, a checkpoint every `cp_every` transactions.
  void append_records(int n, int per_tx = 5, int cp_every = 2) {
    auto lease = hsm_->pool->acquire();
    ASSERT_TRUE(lease.ok());
    int tx_count = 0;
    for (int i = 0; i < n; i += per_tx) {
      std::vector<Event> evs;
      for (int k = i; k < std::min(n, i + per_tx); ++k) evs.push_back(event(next_++));
      auto tx = db::Transaction::begin(db());
      ASSERT_TRUE(tx.ok());
      auto h = trail_->append(lease->session(), evs, ++tx_count % cp_every == 0);
      ASSERT_TRUE(h.ok()) << h.error().message();
      ASSERT_TRUE(tx->commit().ok());
      ASSERT_TRUE(trail_->confirm(lease->session()).ok());
    }
  }

  // Both anchors at the head, with a final checkpoint (what a clean stop does).
  void seal() {
    auto lease = hsm_->pool->acquire();
    ASSERT_TRUE(lease.ok());
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    auto st = trail_->seal(lease->session(), true);
    ASSERT_TRUE(st.ok()) << st.error().message();
    ASSERT_TRUE(tx->commit().ok());
  }

  audit::Anchors anchors() {
    auto lease = hsm_->pool->acquire();
    EXPECT_TRUE(lease.ok());
    auto a = audit::read_anchors(lease->session());
    EXPECT_TRUE(a.ok());
    return *a;
  }

  audit::VerifyReport verify(std::int64_t from = 1) {
    audit::VerifyOptions o;
    o.from = from;
    o.public_key = pub_;
    o.anchors = anchors();
    auto r = audit::verify(db(), o);
    EXPECT_TRUE(r.ok()) << r.error().message();
    return r.ok() ? *r : audit::VerifyReport{};
  }

  // After a clean stop: the chain verifies, holds `records` records and the anchor is sealed.
  void expect_sealed(std::int64_t records) {
    auto rep = verify();
    ASSERT_TRUE(rep.ok) << rep.failure->message;
    EXPECT_EQ(rep.records, records);
    ASSERT_TRUE(rep.anchor.has_value());
    EXPECT_EQ(rep.anchor->state, audit::AnchorState::sealed);
  }

  // What an attacker with write access to the file does: drop the triggers, run SQL.
  void tamper(const std::string& sql) {
    auto raw = db::Db::open(db_path_);
    ASSERT_TRUE(raw.ok());
    auto st = raw->exec(
        "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete;"
        "DROP TRIGGER IF EXISTS audit_checkpoints_no_update;"
        "DROP TRIGGER IF EXISTS audit_checkpoints_no_delete;" +
        sql);
    ASSERT_TRUE(st.ok()) << st.error().message();
  }

  audit::Record stored(std::int64_t seq) {
    auto r = trail_->chain().record(seq);
    EXPECT_TRUE(r.ok() && r->has_value()) << seq;
    return r.ok() && r->has_value() ? **r : audit::Record{};
  }

  // Writes `r` (its hash recomputed) as row r.seq, replacing what is there.
  void put(audit::Record r, bool rehash = true) {
    if (rehash) r.hash = audit::record_hash(r);
    tamper("DELETE FROM audit WHERE seq = " + std::to_string(r.seq) + ";");
    auto raw = db::Db::open(db_path_);
    ASSERT_TRUE(raw.ok());
    auto st = raw->prepare("INSERT INTO audit VALUES (?1,?2,?3,?4,?5,?6,?7,?8)");
    ASSERT_TRUE(st.ok());
    st->bind(1, r.seq).bind(2, r.e.time).bind(3, r.e.actor).bind(4, r.e.event);
    st->bind(5, r.e.subject).bind(6, r.e.detail).bind(7, ByteView(r.prev_hash));
    st->bind(8, ByteView(r.hash));
    ASSERT_TRUE(st->run().ok());
  }

  void expect_failure(const audit::VerifyReport& rep, const std::string& kind, std::int64_t seq) {
    ASSERT_FALSE(rep.ok);
    ASSERT_TRUE(rep.failure.has_value());
    EXPECT_EQ(rep.failure->kind, kind) << rep.failure->message;
    EXPECT_EQ(rep.failure->seq, seq) << rep.failure->message;
  }

  std::string dir_, conf_, db_path_;
  std::unique_ptr<HsmContext> hsm_;
  std::optional<store::KeyStore> store_;
  std::optional<audit::Trail> trail_;
  Bytes pub_;
  int next_ = 1;
};

TEST_F(Audit, ChainCheckpointsAndAnchorVerifyIndependently) {
  append_records(40);
  seal();
  auto rep = verify();
  ASSERT_TRUE(rep.ok) << rep.failure->message;
  EXPECT_EQ(rep.records, 40);
  EXPECT_EQ(rep.last_checkpoint_seq, 40);
  EXPECT_EQ(rep.checkpoints, 4);  // at 10, 20, 30, 40
  ASSERT_TRUE(rep.anchor.has_value());
  EXPECT_EQ(rep.anchor->state, audit::AnchorState::sealed);

  // Every row re-checked with raw SQL, EVP SHA-256 and OpenSSL ECDSA: nothing of gs::audit.
  auto rows = db().prepare(
      "SELECT seq, time, actor, event, subject, detail, prev_hash, hash "
      "FROM audit ORDER BY seq");
  ASSERT_TRUE(rows.ok());
  Bytes prev(32, 0);
  std::map<std::int64_t, Bytes> hashes;
  std::int64_t n = 0;
  while (*rows->step() == db::Step::row) {
    const std::int64_t seq = rows->int64(0);
    EXPECT_EQ(seq, ++n);
    EXPECT_EQ(rows->blob(6), prev);
    const Bytes h = independent_record_hash(seq, rows->int64(1), rows->text(2), rows->text(3),
                                            rows->text(4), rows->text(5), prev);
    EXPECT_EQ(rows->blob(7), h) << seq;
    hashes[seq] = h;
    prev = h;
  }
  rows->reset();
  EXPECT_EQ(n, 40);
  auto cps = db().prepare("SELECT seq, head, time, signature FROM audit_checkpoints");
  ASSERT_TRUE(cps.ok());
  int checked = 0;
  while (*cps->step() == db::Step::row) {
    const std::int64_t seq = cps->int64(0);
    EXPECT_EQ(cps->blob(1), hashes[seq]);
    Bytes msg = {'G', 'S', 'A', 'C', '1'};
    append(msg, be64(static_cast<std::uint64_t>(seq)));
    append(msg, cps->blob(1));
    append(msg, be64(static_cast<std::uint64_t>(cps->int64(2))));
    EXPECT_TRUE(openssl_verify(pub_, msg, cps->blob(3))) << seq;
    Bytes forged = msg;
    forged[10] ^= 1;
    EXPECT_FALSE(openssl_verify(pub_, forged, cps->blob(3)));
    ++checked;
  }
  cps->reset();
  EXPECT_EQ(checked, rep.checkpoints);

  // The anchor objects are private token data objects holding the head.
  auto a = anchors();
  ASSERT_EQ(a.values.size(), 2U);
  for (const auto& v : a.values) EXPECT_EQ(v.head.seq, 40);

  // --from checks the rest, linked to the record before it.
  auto part = verify(25);
  EXPECT_TRUE(part.ok);
  EXPECT_EQ(part.records, 16);
}

TEST_F(Audit, TheAppOnlyAppends) {
  append_records(3);
  seal();  // a checkpoint at 3
  EXPECT_FALSE(db().exec("UPDATE audit SET detail = '{}' WHERE seq = 2").ok());
  EXPECT_FALSE(db().exec("DELETE FROM audit WHERE seq = 3").ok());
  EXPECT_FALSE(db().exec("DELETE FROM audit_checkpoints").ok());
  EXPECT_TRUE(verify().ok);
}

TEST_F(Audit, ChangedRecordIsNamed) {
  append_records(20);
  seal();
  tamper("UPDATE audit SET detail = '{\"class\":\"disconnect\"}' WHERE seq = 7;");
  expect_failure(verify(), "changed", 7);
}

TEST_F(Audit, ChangedAndRehashedRecordIsNamed) {
  append_records(20);
  seal();
  audit::Record r = stored(7);
  r.e.actor = "CN=someone-else";
  put(r);  // self-consistent, but record 8 still links to the original
  expect_failure(verify(), "changed", 7);
}

TEST_F(Audit, DeletedRecordIsNamed) {
  append_records(20);
  seal();
  tamper("DELETE FROM audit WHERE seq = 7;");
  auto rep = verify();
  expect_failure(rep, "deleted", 7);
  EXPECT_NE(rep.failure->message.find("from record 6 to 8"), std::string::npos);
}

TEST_F(Audit, DeletedAndRenumberedRecordIsNamed) {
  append_records(20);
  seal();
  tamper("DELETE FROM audit WHERE seq = 7; UPDATE audit SET seq = seq - 1 WHERE seq > 7;");
  auto rep = verify();
  expect_failure(rep, "deleted", 7);
  EXPECT_NE(rep.failure->message.find("written as record 8"), std::string::npos);
}

TEST_F(Audit, ReorderedRecordsAreNamed) {
  append_records(20);
  seal();
  tamper(
      "UPDATE audit SET seq = 99999 WHERE seq = 9; UPDATE audit SET seq = 9 WHERE seq = 12;"
      "UPDATE audit SET seq = 12 WHERE seq = 99999;");
  auto rep = verify();
  expect_failure(rep, "reordered", 9);
  EXPECT_NE(rep.failure->message.find("9 and 12"), std::string::npos);
}

TEST_F(Audit, InsertedRecordIsNamed) {
  append_records(20);
  seal();
  // Make room at 7 and put a well-formed record there that links to record 6.
  tamper(
      "UPDATE audit SET seq = seq + 1000 WHERE seq >= 7; "
      "UPDATE audit SET seq = seq - 999 WHERE seq >= 1007;");
  audit::Record forged;
  forged.seq = 7;
  forged.e = {1700000006, "CN=head-end,O=Utility", "command", "M99", "{}"};
  forged.prev_hash = stored(6).hash;
  put(forged);
  expect_failure(verify(), "inserted", 7);
}

TEST_F(Audit, RecordAppendedBySomeoneElseIsNamed) {
  append_records(20);
  seal();
  audit::Record forged;
  forged.seq = 21;
  forged.e = {1700000100, "system", "stop", "gridseal-sesd", "{}"};
  forged.prev_hash = stored(20).hash;
  put(forged);
  expect_failure(verify(), "beyond_anchor", 21);
  // A writer refuses to chain onto it.
  audit::WriterOptions o;
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.error().message().find("records 21..21"), std::string::npos) << w.error().message();
}

TEST_F(Audit, RewrittenChainIsCaughtByTheCheckpoint) {
  append_records(30, 5, 1);  // a checkpoint every 5 records
  seal();
  // Change record 12 and recompute every hash after it: links and hashes are consistent again.
  audit::Record r = stored(12);
  r.e.detail = "{}";
  audit::Digest prev = stored(11).hash;
  for (std::int64_t s = 12; s <= 30; ++s) {
    audit::Record x = s == 12 ? r : stored(s);
    x.prev_hash = prev;
    x.hash = audit::record_hash(x);
    put(x, false);
    prev = x.hash;
  }
  auto rep = verify();
  expect_failure(rep, "rewritten", 11);  // the checkpoint at 10 still matches
  EXPECT_NE(rep.failure->message.find("records 11..15"), std::string::npos);
}

TEST_F(Audit, ForgedCheckpointIsNamed) {
  append_records(20, 5, 1);
  seal();
  tamper("UPDATE audit_checkpoints SET time = time + 1 WHERE seq = 10;");
  expect_failure(verify(), "bad_checkpoint", 10);
  // Without the public key the signatures are not checked, and the report says so.
  audit::VerifyOptions o;
  o.anchors = anchors();
  auto rep = audit::verify(db(), o);
  ASSERT_TRUE(rep.ok());
  EXPECT_TRUE(rep->ok);
  bool noted = false;
  for (const auto& n : rep->notes) noted = noted || n.kind == "signatures_unchecked";
  EXPECT_TRUE(noted);
}

TEST_F(Audit, TruncatedTailIsCaughtAtTheNextStart) {
  append_records(20, 5, 2);
  seal();
  // The last records after the last checkpoint, then also the checkpoints: both are caught.
  tamper("DELETE FROM audit WHERE seq > 17;");
  auto rep = verify();
  expect_failure(rep, "truncated", 18);
  audit::WriterOptions o;
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code, Errc::conflict);
  EXPECT_NE(w.error().message().find("truncated"), std::string::npos) << w.error().message();
  tamper("DELETE FROM audit_checkpoints WHERE seq > 10; DELETE FROM audit WHERE seq > 10;");
  expect_failure(verify(), "truncated", 11);
  EXPECT_FALSE(audit::Writer::open(db_path_, *hsm_, o, nullptr).ok());
  // An operator who accepts the table as it is re-anchors it, which is itself recorded.
  {
    auto lease = hsm_->pool->acquire();
    ASSERT_TRUE(lease.ok());
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    auto h = trail_->reset_anchor(lease->session(),
                                  {0, "operator:test", "audit_anchor_reset", "", "restored"});
    ASSERT_TRUE(h.ok()) << h.error().message();
    ASSERT_TRUE(tx->commit().ok());
    EXPECT_EQ(h->seq, 11);
  }
  auto after = verify();
  EXPECT_TRUE(after.ok);
  EXPECT_NE(stored(11).e.detail.find("\"previous_state\":\"truncated\""), std::string::npos);
  EXPECT_TRUE(audit::Writer::open(db_path_, *hsm_, o, nullptr).ok());
}

TEST_F(Audit, FileRolledBackToAnOlderCopyIsCaught) {
  append_records(10);
  seal();
  {
    auto copy = db().exec("VACUUM INTO '" + dir_ + "/old.db'");
    ASSERT_TRUE(copy.ok()) << copy.error().message();
  }
  append_records(10);
  seal();
  trail_.reset();
  store_.reset();
  fs::remove(db_path_ + "-wal");
  fs::remove(db_path_ + "-shm");
  fs::copy_file(dir_ + "/old.db", db_path_, fs::copy_options::overwrite_existing);
  auto ks = store::KeyStore::open(db_path_);
  ASSERT_TRUE(ks.ok());
  store_.emplace(std::move(ks).value());
  trail_.emplace(std::move(audit::Trail::over(db())).value());
  expect_failure(verify(), "truncated", 11);
}

TEST_F(Audit, TransactionThatNeverCommitsLeavesAConsistentAnchor) {
  append_records(10);
  {
    auto lease = hsm_->pool->acquire();
    ASSERT_TRUE(lease.ok());
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    std::vector<Event> evs = {event(100), event(101)};
    ASSERT_TRUE(trail_->append(lease->session(), evs, true).ok());
    // No commit: the anchor already holds record 12 (as after a kill -9 before COMMIT).
  }
  auto a = anchors();
  ASSERT_EQ(a.values.size(), 2U);
  EXPECT_EQ(a.values[0].head.seq, 12);
  auto rep = verify();
  ASSERT_TRUE(rep.ok) << rep.failure->message;
  ASSERT_TRUE(rep.anchor.has_value());
  EXPECT_EQ(rep.anchor->state, audit::AnchorState::lost_batch);
  // A writer starts (and says so), appends, and the anchor moves on.
  audit::WriterOptions o;
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w.ok()) << w.error().message();
  EXPECT_EQ((*w)->start_check().state, audit::AnchorState::lost_batch);
  ASSERT_TRUE((*w)->append(event(200)).ok());
  (*w)->stop();
  auto after = verify();
  EXPECT_TRUE(after.ok);
  EXPECT_EQ(after.anchor->state, audit::AnchorState::sealed);
  EXPECT_EQ(after.last_seq, 11);
}

// Between anchor updates (a running daemon, or one that crashed) records after the newest anchor
// are reported; everything anchored is still protected.
TEST_F(Audit, RunningPairProtectsEverythingAnchored) {
  append_records(10);  // anchored at 10 (running values: no clean stop)
  auto append_unanchored = [&](int n) {
    auto lease = hsm_->pool->acquire();
    ASSERT_TRUE(lease.ok());
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    auto b = trail_->begin(lease->session());
    ASSERT_TRUE(b.ok()) << b.error().message();
    for (int i = 0; i < n; ++i) ASSERT_TRUE(trail_->add(*b, event(next_++)).ok());
    ASSERT_TRUE(trail_->finish(lease->session(), *b, false, false).ok());
    EXPECT_FALSE(b->anchored);
    ASSERT_TRUE(tx->commit().ok());
  };
  append_unanchored(5);
  auto rep = verify();
  ASSERT_TRUE(rep.ok) << rep.failure->message;
  EXPECT_EQ(rep.anchor->state, audit::AnchorState::consistent);
  EXPECT_EQ(rep.anchor->unanchored, 5);
  bool noted = false;
  for (const auto& n : rep.notes) noted = noted || (n.kind == "unanchored" && n.seq == 11);
  EXPECT_TRUE(noted);
  // Removing anchored records is caught even without a clean stop.
  tamper("DELETE FROM audit WHERE seq > 8;");
  expect_failure(verify(), "truncated", 9);
  audit::WriterOptions o;
  EXPECT_FALSE(audit::Writer::open(db_path_, *hsm_, o, nullptr).ok());
}

// A transaction that wrote the anchor and died, then other writers that went past it without
// touching the HSM: reported, not a failure, and the next anchor update replaces the value.
TEST_F(Audit, StalePendingAnchorIsTolerated) {
  append_records(10);
  auto lease = hsm_->pool->acquire();
  ASSERT_TRUE(lease.ok());
  {
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    std::vector<Event> evs = {event(100), event(101)};
    ASSERT_TRUE(trail_->append(lease->session(), evs, false).ok());  // P12, never committed
  }
  {
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    auto b = trail_->begin(lease->session(), false);
    ASSERT_TRUE(b.ok());
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(trail_->add(*b, event(next_++)).ok());
    ASSERT_TRUE(trail_->finish(lease->session(), *b, false, false).ok());
    EXPECT_FALSE(b->anchored);
    ASSERT_TRUE(tx->commit().ok());
  }
  auto rep = verify();
  ASSERT_TRUE(rep.ok) << rep.failure->kind << ": " << rep.failure->message;
  EXPECT_TRUE(rep.anchor->stale_pending);
  EXPECT_EQ(rep.anchor->unanchored, 5);
  {
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    auto b = trail_->begin(lease->session(), true);
    ASSERT_TRUE(b.ok()) << b.error().message();
    EXPECT_TRUE(b->check.must_write);
    ASSERT_TRUE(trail_->add(*b, event(next_++)).ok());
    ASSERT_TRUE(trail_->finish(lease->session(), *b, false, false).ok());
    EXPECT_TRUE(b->anchored);  // forced: the stale value is overwritten
    ASSERT_TRUE(tx->commit().ok());
    ASSERT_TRUE(trail_->confirm(lease->session(), *b).ok());
  }
  auto after = verify();
  ASSERT_TRUE(after.ok);
  EXPECT_FALSE(after.anchor->stale_pending);
  EXPECT_EQ(after.anchor->unanchored, 0);
  EXPECT_EQ(after.anchor->state, audit::AnchorState::consistent);
}

TEST_F(Audit, TornAnchorObjectIsReplaced) {
  append_records(5);
  seal();
  auto a = anchors();
  ASSERT_EQ(a.values.size(), 2U);
  {
    auto lease = hsm_->pool->acquire();
    ASSERT_TRUE(lease.ok());
    ASSERT_TRUE(hsm::write_data_text(lease->session(), a.values[1].object, "garbage").ok());
  }
  EXPECT_TRUE(verify().ok);
  append_records(5);
  auto b = anchors();
  EXPECT_EQ(b.values.size(), 2U);
  EXPECT_TRUE(b.unreadable.empty());
  EXPECT_TRUE(verify().ok);
}

TEST_F(Audit, WriterBatchesConcurrentRecordsAndSealsAtStop) {
  audit::WriterOptions o;
  o.checkpoint_interval = std::chrono::seconds(3600);
  o.max_delay = std::chrono::microseconds(2000);
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w.ok()) << w.error().message();
  EXPECT_EQ((*w)->start_check().state, audit::AnchorState::fresh);
  constexpr int kThreads = 8, kPer = 300;
  std::atomic<int> ok{0}, bad{0};
  std::array<std::atomic<int>, kThreads> completed{};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < kPer; ++i) {
        audit::Item it;
        it.event = event(t * 10000 + i);
        it.done = [&, t](const Status& st) {
          (st.ok() ? ok : bad)++;
          ++completed[t];
        };
        ASSERT_TRUE((*w)->submit(std::move(it)).ok());
        if (i % 50 == 49) {  // bursts of 50 in flight per thread
          while (completed[t].load() < i + 1) {
            std::this_thread::sleep_for(std::chrono::microseconds(100));
          }
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  (*w)->stop();
  EXPECT_EQ(ok.load(), kThreads * kPer);
  EXPECT_EQ(bad.load(), 0);
  const auto stats = (*w)->stats();
  EXPECT_EQ(stats.records, static_cast<std::uint64_t>(kThreads * kPer));
  EXPECT_LT(stats.commits, stats.records / 4) << "records were not batched";
  // Stopped: a final checkpoint covers everything and both anchors hold the head.
  auto rep = verify();
  ASSERT_TRUE(rep.ok) << rep.failure->message;
  EXPECT_EQ(rep.records, kThreads * kPer);
  EXPECT_EQ(rep.last_checkpoint_seq, kThreads * kPer);
  EXPECT_EQ(rep.anchor->state, audit::AnchorState::sealed);
  // After stop nothing more is taken.
  audit::Item late;
  late.event = event(1);
  EXPECT_EQ((*w)->submit(std::move(late)).error().code, Errc::busy);
  audit::Item invalid;
  invalid.event = event(1);
  invalid.event.event = "Bad Name";
  EXPECT_EQ((*w)->submit(std::move(invalid)).error().code, Errc::invalid_argument);
}

TEST_F(Audit, CallerCommitsOnItsOwnThreadInOrder) {
  audit::WriterOptions o;
  o.caller_commits = true;
  o.checkpoint_interval = std::chrono::seconds(3600);
  // The writer thread looks every max_delay and takes what waited that long: 2 s keeps it out
  // of the first part however slowly this test runs.
  o.max_delay = std::chrono::seconds(2);
  o.max_batch = 7;  // 20 queued records: three transactions
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w.ok()) << w.error().message();
  const auto me = std::this_thread::get_id();
  std::vector<int> order;
  std::vector<std::thread::id> threads;
  std::mutex mu;
  auto submit = [&](int n) {
    audit::Item it;
    it.event = event(n);
    it.done = [&, n](const Status& st) {
      EXPECT_TRUE(st.ok()) << st.error().message();
      std::lock_guard lock(mu);
      order.push_back(n);
      threads.push_back(std::this_thread::get_id());
    };
    ASSERT_TRUE((*w)->submit(std::move(it)).ok());
  };
  for (int i = 1; i <= 20; ++i) submit(i);
  (*w)->commit_queued();
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(order.size(), 20U) << "commit_queued() returned before every record was durable";
    for (int i = 0; i < 20; ++i) EXPECT_EQ(order[i], i + 1);
    for (auto id : threads) EXPECT_EQ(id, me) << "a record was committed by the writer thread";
  }
  EXPECT_EQ((*w)->stats().records, 20U);
  EXPECT_EQ((*w)->stats().commits, 3U);
  // A record nobody commits is committed by the writer thread once it waited a poll period.
  submit(21);
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (;;) {
    {
      std::lock_guard lock(mu);
      if (order.size() == 21U) break;
    }
    ASSERT_LT(std::chrono::steady_clock::now(), until) << "an uncommitted record was never taken";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_NE(threads.back(), me);
  // append() commits on its caller's thread too; stop() commits what is left and seals.
  ASSERT_TRUE((*w)->append(event(22)).ok());
  submit(23);
  (*w)->stop();
  ASSERT_EQ(order.size(), 22U);
  EXPECT_EQ(order.back(), 23);
  expect_sealed(23);
}

TEST_F(Audit, CallerCommitsFromManyThreadsKeepOneChain) {
  audit::WriterOptions o;
  o.caller_commits = true;
  o.checkpoint_interval = std::chrono::seconds(3600);
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w.ok()) << w.error().message();
  constexpr int kThreads = 4, kPer = 200;
  std::atomic<int> ok{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < kPer; ++i) {
        audit::Item it;
        it.event = event(t * 10000 + i);
        it.done = [&](const Status& st) {
          if (st.ok()) ++ok;
        };
        ASSERT_TRUE((*w)->submit(std::move(it)).ok());
        if (i % 10 == 9) (*w)->commit_queued();
      }
      (*w)->commit_queued();
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(ok.load(), kThreads * kPer) << "commit_queued() left a record of its thread behind";
  (*w)->stop();
  expect_sealed(kThreads * kPer);
}

TEST_F(Audit, ActionAndRecordCommitTogether) {
  ASSERT_TRUE(db().exec("CREATE TABLE actions (n INTEGER PRIMARY KEY)").ok());
  audit::WriterOptions o;
  o.checkpoint_interval = std::chrono::seconds(0);  // a checkpoint in every transaction
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w.ok());
  std::mutex mu;
  std::map<int, bool> outcome;
  for (int i = 1; i <= 20; ++i) {
    audit::Item it;
    it.event = event(i);
    it.action = [i](db::Db& d) -> Status {
      if (i % 5 == 0) return Error(Errc::conflict, "refused by the action");
      return d.exec("INSERT INTO actions VALUES (" + std::to_string(i) + ")");
    };
    it.done = [&, i](const Status& st) {
      std::lock_guard<std::mutex> lock(mu);
      outcome[i] = st.ok();
    };
    ASSERT_TRUE((*w)->submit(std::move(it)).ok());
  }
  (*w)->stop();
  ASSERT_EQ(outcome.size(), 20U);
  for (int i = 1; i <= 20; ++i) EXPECT_EQ(outcome[i], i % 5 != 0) << i;
  auto count = db().prepare("SELECT count(*) FROM actions");
  ASSERT_TRUE(count.ok());
  ASSERT_EQ(*count->step(), db::Step::row);
  EXPECT_EQ(count->int64(0), 16);
  count->reset();
  auto rep = verify();
  ASSERT_TRUE(rep.ok);
  EXPECT_EQ(rep.records, 16);  // no record for a refused action
  for (std::int64_t s = 1; s <= 16; ++s) {
    EXPECT_EQ(stored(s).e.subject.find("M5"), std::string::npos);
  }
}

// WriterOptions::sched_batch: the writer thread (where `done` runs) is under SCHED_BATCH, and
// under the default policy without it.
TEST_F(Audit, WriterThreadFollowsSchedBatch) {
  for (const bool batch : {true, false}) {
    audit::WriterOptions o;
    o.sched_batch = batch;
    auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
    ASSERT_TRUE(w.ok()) << w.error().message();
    std::atomic<int> policy{-1};
    audit::Item it;
    it.event = event(batch ? 1 : 2);
    it.done = [&policy](const Status&) { policy = sched_getscheduler(0); };
    ASSERT_TRUE((*w)->submit(std::move(it)).ok());
    (*w)->stop();
    EXPECT_EQ(policy.load(), batch ? SCHED_BATCH : SCHED_OTHER) << "sched_batch " << batch;
  }
}

// An idle writer seals the anchor pair; the next batch must read the pair through the handles
// it holds. A search (C_FindObjects) walks every object in SoftHSM2: with 100,000 meter keys in
// the sessions it took 160-240 ms, under the write lock, after every idle moment.
TEST_F(Audit, WriterSearchesTheTokenAtOpenNotAfterIdleSeals) {
  audit::WriterOptions o;
  o.seal_after_idle = std::chrono::milliseconds(20);
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w.ok()) << w.error().message();
  auto sealed = [&](std::uint64_t n) {
    for (int i = 0; i < 1000 && (*w)->stats().seals < n; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return (*w)->stats().seals >= n;
  };
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*w)->append(event(i)).ok());
  ASSERT_TRUE(sealed(1));
  ASSERT_TRUE((*w)->append(event(10)).ok());
  ASSERT_TRUE(sealed(2));
  const std::uint64_t settled = (*w)->stats().token_searches;
  EXPECT_GE(settled, 1U);  // the first batch found the objects (or that there were none)
  for (std::uint64_t round = 0; round < 3; ++round) {
    ASSERT_TRUE((*w)->append(event(20 + static_cast<int>(round))).ok());
    ASSERT_TRUE(sealed(3 + round));
  }
  EXPECT_EQ((*w)->stats().token_searches, settled)
      << "a batch after an idle seal searched the token for the anchor objects";
  (*w)->stop();

  // A writer opened later (as after a restart) finds gs-audit and the anchor pair at open,
  // before any meter key fills the sessions; its batches, each signing a checkpoint here,
  // search no more.
  o.checkpoint_interval = std::chrono::seconds(0);
  auto w2 = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w2.ok()) << w2.error().message();
  const std::uint64_t at_open = (*w2)->stats().token_searches;
  EXPECT_GE(at_open, 1U);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*w2)->append(event(30 + i)).ok());
  (*w2)->stop();
  EXPECT_GE((*w2)->stats().checkpoints, 1U);
  EXPECT_EQ((*w2)->stats().token_searches, at_open)
      << "a batch searched the token for gs-audit or the anchor objects";
  expect_sealed(10);
}

TEST_F(Audit, TwoWritersOnOneFileKeepOneChain) {
  audit::WriterOptions o;
  o.checkpoint_interval = std::chrono::seconds(1);
  o.seal_after_idle = std::chrono::milliseconds(20);
  auto a = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(a.ok());
  auto b = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(b.ok());
  std::vector<std::thread> ts;
  std::atomic<int> failed{0};
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      audit::Writer& w = t % 2 == 0 ? **a : **b;
      for (int i = 0; i < 150; ++i) {
        if (!w.append(event(t * 1000 + i)).ok()) ++failed;
      }
    });
  }
  for (auto& t : ts) t.join();
  (*a)->stop();
  (*b)->stop();
  EXPECT_EQ(failed.load(), 0);
  expect_sealed(600);
}

// audit.fsync_outside_lock: each batch commits without fsync (releasing the write lock at once)
// and fsyncs the WAL before it reports its records durable. Writers of both kinds on one file
// keep one chain; what append() reported durable is in the table for any other connection.
TEST_F(Audit, WritersThatFsyncOutsideTheLockKeepOneChain) {
  audit::WriterOptions o;
  o.checkpoint_interval = std::chrono::seconds(1);
  o.seal_after_idle = std::chrono::milliseconds(20);
  o.fsync_outside_lock = true;
  audit::WriterOptions inside = o;
  inside.fsync_outside_lock = false;
  audit::WriterOptions threaded = o;  // the fsync and the callbacks on the sync thread
  threaded.fsync_thread = true;
  std::vector<std::unique_ptr<audit::Writer>> ws;
  for (const auto* opt : {&o, &threaded, &inside}) {
    auto w = audit::Writer::open(db_path_, *hsm_, *opt, nullptr);
    ASSERT_TRUE(w.ok()) << w.error().message();
    ws.push_back(std::move(w).value());
  }
  std::vector<std::thread> ts;
  std::atomic<int> failed{0};
  for (int t = 0; t < 6; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) {
        if (!ws[static_cast<std::size_t>(t % 3)]->append(event(t * 1000 + i)).ok()) ++failed;
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(failed.load(), 0);
  // Reported durable, so visible: the last record of one thread, through the fixture's own
  // connection, while the writers still run.
  auto seen = db().prepare("SELECT count(*) FROM audit WHERE subject = 'M5099'");
  ASSERT_TRUE(seen.ok());
  ASSERT_EQ(seen->step().value(), db::Step::row);
  EXPECT_EQ(seen->int64(0), 1);
  seen->reset();
  for (auto& w : ws) {
    EXPECT_EQ(w->stats().failures, 0U);
    w->stop();
  }
  expect_sealed(600);
}

// audit.fsync_thread: a batch committed by its submitter (the SES's handler) is made durable
// and released by the sync thread, and the submitter is back before that; a batch that advanced
// the HSM anchor (the first one here) still fsyncs and completes where it committed.
TEST_F(Audit, TheSyncThreadReleasesCommittedBatchesOnceDurable) {
  metrics::Registry reg;
  audit::WriterOptions o;
  o.caller_commits = true;
  o.fsync_outside_lock = true;
  o.fsync_thread = true;
  o.anchor_interval = std::chrono::hours(1);
  auto w = audit::Writer::open(db_path_, *hsm_, o, &reg);
  ASSERT_TRUE(w.ok()) << w.error().message();
  std::mutex mu;
  std::condition_variable cv;
  struct Done {
    bool ok = false;
    std::thread::id thread;
    std::string name;
  };
  std::vector<Done> done;
  auto item = [&](int i) {
    audit::Item it;
    it.event = event(i);
    it.done = [&](const Status& st) {
      char name[16] = {};
      pthread_getname_np(pthread_self(), name, sizeof name);
      std::lock_guard<std::mutex> lock(mu);
      done.push_back({st.ok(), std::this_thread::get_id(), name});
      cv.notify_all();
    };
    return it;
  };
  auto wait_for = [&](std::size_t n) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(20), [&] { return done.size() >= n; });
  };
  auto synced = [&] {
    return reg.counter("gridseal_audit_synced_batches_total", "").value();
  };
  auto fsyncs = [&] {
    return reg.histogram("gridseal_audit_fsync_seconds", "", metrics::latency_buckets()).count();
  };

  // The first batch reads and advances the anchor: done on this thread, before commit_queued
  // returns, and not through the sync thread.
  ASSERT_TRUE((*w)->submit(item(1)).ok());
  (*w)->commit_queued();
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(done.size(), 1U);
    EXPECT_TRUE(done[0].ok);
    EXPECT_EQ(done[0].thread, std::this_thread::get_id());
  }
  EXPECT_EQ(synced(), 0U);
  EXPECT_EQ(fsyncs(), 0U);

  // The next batches: committed here, released by gs-audit-sync after its fsync.
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < 3; ++i) ASSERT_TRUE((*w)->submit(item(10 * round + 2 + i)).ok());
    (*w)->commit_queued();
    ASSERT_TRUE(wait_for(4 + 3 * static_cast<std::size_t>(round)));
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    for (std::size_t i = 1; i < done.size(); ++i) {
      EXPECT_TRUE(done[i].ok);
      EXPECT_NE(done[i].thread, std::this_thread::get_id());
      EXPECT_EQ(done[i].name, "gs-audit-sync");
    }
  }
  EXPECT_EQ(synced(), 2U);
  EXPECT_GE(fsyncs(), 1U);
  EXPECT_LE(fsyncs(), 2U);
  // Reported durable, so in the table, through another connection.
  auto seen = db().prepare("SELECT count(*) FROM audit WHERE subject LIKE 'M%'");
  ASSERT_TRUE(seen.ok());
  ASSERT_EQ(seen->step().value(), db::Step::row);
  EXPECT_EQ(seen->int64(0), 7);
  seen->reset();
  // append() waits for the sync thread too.
  ASSERT_TRUE((*w)->append(event(99)).ok());
  EXPECT_EQ(synced(), 3U);
  EXPECT_EQ((*w)->stats().failures, 0U);
  (*w)->stop();
  expect_sealed(8);
}

// With the sync thread, a committed batch is visible at once but its callbacks (the SES's
// responses) wait for the fsync: held before it, nothing is released.
TEST_F(Audit, NothingIsReleasedBeforeTheSyncThreadsFsync) {
  audit::WriterOptions o;
  o.caller_commits = true;
  o.fsync_outside_lock = true;
  o.fsync_thread = true;
  o.anchor_interval = std::chrono::hours(1);
  std::promise<void> gate;
  std::shared_future<void> open = gate.get_future().share();
  std::atomic<int> fsyncs{0};
  o.before_fsync = [&, open] {
    ++fsyncs;
    open.wait();
  };
  auto w = audit::Writer::open(db_path_, *hsm_, o, nullptr);
  ASSERT_TRUE(w.ok()) << w.error().message();
  ASSERT_TRUE((*w)->append(event(1)).ok());  // anchors: fsync'd where it committed
  EXPECT_EQ(fsyncs.load(), 0);

  std::promise<Status> done;
  auto released = done.get_future();
  audit::Item it;
  it.event = event(2);
  it.done = [&](const Status& st) { done.set_value(st); };
  ASSERT_TRUE((*w)->submit(std::move(it)).ok());
  (*w)->commit_queued();
  auto seen = db().prepare("SELECT count(*) FROM audit WHERE subject = 'M2'");
  ASSERT_TRUE(seen.ok());
  ASSERT_EQ(seen->step().value(), db::Step::row);
  EXPECT_EQ(seen->int64(0), 1);  // committed
  seen->reset();
  EXPECT_EQ(released.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout);
  gate.set_value();
  ASSERT_EQ(released.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  EXPECT_TRUE(released.get().ok());
  EXPECT_GE(fsyncs.load(), 1);
  (*w)->stop();
  expect_sealed(2);
}

// The two parts of a batch's time that make the SES's tail: the wait for another connection's
// write lock and the COMMIT. Another connection holds the lock for 300 ms while a record waits.
TEST_F(Audit, WriterReportsItsWriteLockWaitAndCommitTimes) {
  metrics::Registry reg;
  auto w = audit::Writer::open(db_path_, *hsm_, audit::WriterOptions{}, &reg);
  ASSERT_TRUE(w.ok()) << w.error().message();
  auto lock_wait = [&]() -> metrics::Histogram& {
    return reg.histogram("gridseal_audit_write_lock_wait_seconds", "", metrics::latency_buckets());
  };
  auto commit = [&]() -> metrics::Histogram& {
    return reg.histogram("gridseal_audit_sql_commit_seconds", "", metrics::latency_buckets());
  };
  ASSERT_TRUE((*w)->append(event(1)).ok());
  EXPECT_EQ(lock_wait().count(), 1U);
  EXPECT_EQ(commit().count(), 1U);

  auto other = db::Db::open(db_path_);
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE(other->exec("BEGIN IMMEDIATE").ok());
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    EXPECT_TRUE(other->exec("COMMIT").ok());
  });
  Status st = (*w)->append(event(2));
  release.join();
  ASSERT_TRUE(st.ok()) << st.error().message();
  EXPECT_EQ(lock_wait().count(), 2U);
  EXPECT_EQ(commit().count(), 2U);
  EXPECT_GE(lock_wait().sum(), 0.1);
  EXPECT_GT(commit().sum(), 0.0);
  const std::string text = reg.expose();
  EXPECT_NE(text.find("gridseal_audit_write_lock_wait_seconds_count 2"), std::string::npos);
  EXPECT_NE(text.find("gridseal_audit_sql_commit_seconds_count 2"), std::string::npos);
}

TEST_F(Audit, ExportIsJsonLinesWithCheckpointsAfterTheirRecords) {
  append_records(12, 4, 1);
  seal();
  const std::string path = dir_ + "/export.jsonl";
  std::FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  audit::ExportOptions eo;
  eo.since = 1700000005;  // record 5 onwards
  eo.public_key = pub_;
  auto sum = audit::export_jsonl(db(), eo, f);
  std::fclose(f);
  ASSERT_TRUE(sum.ok()) << sum.error().message();
  EXPECT_EQ(sum->first_seq, 5);
  EXPECT_EQ(sum->records, 8);
  EXPECT_EQ(sum->checkpoints, 2);  // at 8 and 12
  std::ifstream in(path);
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(in, line)) lines.push_back(line);
  ASSERT_EQ(lines.size(), 1U + 8U + 2U);
  EXPECT_EQ(lines[0].rfind("{\"type\":\"header\",\"format\":\"gridseal-audit-1\"", 0), 0U);
  EXPECT_NE(lines[1].find("\"seq\":5,"), std::string::npos);
  EXPECT_NE(lines[4].find("\"seq\":8,"), std::string::npos);
  EXPECT_EQ(lines[5].rfind("{\"type\":\"checkpoint\",\"seq\":8,", 0), 0U);
  EXPECT_NE(lines[5].find("\"signature_der\":\"30"), std::string::npos);
  EXPECT_EQ(lines.back().rfind("{\"type\":\"checkpoint\",\"seq\":12,", 0), 0U);
}

// ---- archives ----------------------------------------------------------------------------------

// Waits (at most 2 s) until the UTC second has moved past every checkpoint signed so far, and
// returns the new second: a cut between what was signed before and what comes after.
std::int64_t next_second() {
  const std::int64_t t = static_cast<std::int64_t>(utc_now());
  for (int i = 0; i < 100 && static_cast<std::int64_t>(utc_now()) <= t; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return static_cast<std::int64_t>(utc_now());
}

std::int64_t scalar(db::Db& db, const std::string& sql) {
  auto st = db.prepare(sql);
  EXPECT_TRUE(st.ok()) << sql;
  if (!st.ok()) return -1;
  auto step = st->step();
  const std::int64_t v = step.ok() && *step == db::Step::row ? st->int64(0) : -1;
  st->reset();
  return v;
}

TEST_F(Audit, ArchiveMovesSignedRecordsToAFileAndTheRestStillVerifies) {
  append_records(20);  // checkpoints at 10 and 20
  const std::int64_t cut = next_second();
  std::vector<std::string> hashes;
  for (int seq = 1; seq <= 20; ++seq) hashes.push_back(to_hex(stored(seq).hash));
  append_records(20);  // checkpoints at 30 and 40, signed at or after the cut

  const std::string adir = dir_ + "/archive";
  fs::create_directory(adir);
  audit::ArchiveOptions o;
  o.before = cut;
  o.dir = adir;
  o.actor = "operator:test";
  o.public_key = pub_;
  o.delete_chunk = 7;
  o.read_chunk = 6;
  o.pause = std::chrono::milliseconds(0);
  auto lease = hsm_->pool->acquire();
  ASSERT_TRUE(lease.ok());
  auto res = audit::archive(db(), lease->session(), o);
  ASSERT_TRUE(res.ok()) << res.error().message();
  ASSERT_TRUE(res->archive.has_value());
  const audit::Archive a = *res->archive;
  EXPECT_EQ(a.first_seq, 1);
  EXPECT_EQ(a.through, 20);
  EXPECT_EQ(a.records, 20);
  EXPECT_EQ(a.checkpoints, 2);
  EXPECT_EQ(a.file.rfind("audit-1-20-", 0), 0U) << a.file;  // then the run's UTC time
  EXPECT_EQ(a.file.size(), std::string("audit-1-20-20261128T120000Z.jsonl").size()) << a.file;
  EXPECT_EQ(a.record_seq, 41);
  EXPECT_EQ(res->path, adir + "/" + a.file);
  EXPECT_EQ(res->deleted, 20);
  EXPECT_EQ(res->deleted_checkpoints, 1);  // at 10; the one at 20 is the base

  // The file: complete, hashed as registered, every record with the hash it had in the table.
  std::ifstream in(res->path, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(to_hex(evp_sha256(Bytes(text.begin(), text.end()))), to_hex(a.sha256));
  std::vector<std::string> lines;
  for (std::size_t at = 0; at < text.size();) {
    const auto nl = text.find('\n', at);
    ASSERT_NE(nl, std::string::npos);
    lines.push_back(text.substr(at, nl - at));
    at = nl + 1;
  }
  ASSERT_EQ(lines.size(), 1U + 20U + 2U);
  const std::string head = R"({"type":"header","format":"gridseal-audit-1","archive":true)";
  EXPECT_EQ(lines[0].rfind(head, 0), 0U);
  EXPECT_NE(lines[0].find("\"first_seq\":1,\"last_seq\":20"), std::string::npos);
  EXPECT_NE(lines[0].find("\"public_key_sha256\":\"" + to_hex(evp_sha256(pub_)) + "\""),
            std::string::npos);
  for (const auto& h : hashes) EXPECT_NE(text.find("\"hash\":\"" + h + "\"}"), std::string::npos);
  EXPECT_EQ(lines.back().rfind("{\"type\":\"checkpoint\",\"seq\":20,", 0), 0U);
  EXPECT_EQ(std::distance(fs::directory_iterator(adir), fs::directory_iterator{}), 1);  // no .tmp

  // The table: the records from 21 on, the checkpoint at 20 as the base; the registration.
  EXPECT_EQ(scalar(db(), "SELECT min(seq) FROM audit"), 21);
  EXPECT_EQ(scalar(db(), "SELECT min(seq) FROM audit_checkpoints"), 20);
  const audit::Record reg = stored(41);
  EXPECT_EQ(reg.e.event, "audit_archive");
  EXPECT_EQ(reg.e.actor, "operator:test");
  EXPECT_EQ(reg.e.subject, a.file);
  EXPECT_EQ(reg.e.detail, audit::archive_detail(a));
  EXPECT_NE(reg.e.detail.find("\"sha256\":\"" + to_hex(a.sha256) + "\""), std::string::npos);
  auto rep = verify();
  ASSERT_TRUE(rep.ok) << rep.failure->message;
  EXPECT_EQ(rep.archived_through, 20);
  EXPECT_EQ(rep.first_seq, 21);
  EXPECT_EQ(rep.records, 21);  // 21..41
  EXPECT_EQ(rep.last_checkpoint_seq, 41);  // the registration's own checkpoint
  ASSERT_FALSE(rep.notes.empty());
  EXPECT_EQ(rep.notes.front().kind, "archived");

  // Still append-only above the archive; the archive rows too.
  EXPECT_FALSE(db().exec("DELETE FROM audit WHERE seq = 21").ok());
  EXPECT_FALSE(db().exec("DELETE FROM audit_checkpoints WHERE seq = 20").ok());
  EXPECT_FALSE(db().exec("DELETE FROM audit_archives").ok());
  EXPECT_FALSE(db().exec("UPDATE audit_archives SET file = 'x'").ok());

  // Nothing more was signed before the cut.
  auto again = audit::archive(db(), lease->session(), o);
  ASSERT_TRUE(again.ok()) << again.error().message();
  EXPECT_FALSE(again->archive.has_value());
  EXPECT_EQ(again->deleted, 0);

  // A clean stop seals at the head; the next archive takes everything signed and links to the
  // first one's end (the file writer checks record 21 against the checkpoint at 20).
  seal();
  expect_sealed(21);
  o.before = next_second() + 1;
  auto second = audit::archive(db(), lease->session(), o);
  ASSERT_TRUE(second.ok()) << second.error().message();
  ASSERT_TRUE(second->archive.has_value());
  EXPECT_EQ(second->archive->first_seq, 21);
  EXPECT_EQ(second->archive->through, 41);
  EXPECT_EQ(second->archive->record_seq, 42);
  EXPECT_EQ(second->deleted, 21);
  // One anchor object still holds record 41, now archived: the checkpoint at 41 vouches for it.
  auto after = verify();
  ASSERT_TRUE(after.ok) << after.failure->message;
  EXPECT_EQ(after.archived_through, 41);
  EXPECT_EQ(after.records, 1);
  seal();
  expect_sealed(1);
}

TEST_F(Audit, RecordsDeletedWithoutTheirArchiveAreNamed) {
  append_records(20);
  seal();
  tamper("DELETE FROM audit WHERE seq <= 10; DELETE FROM audit_checkpoints WHERE seq < 10;");
  expect_failure(verify(), "deleted", 1);
  // A forged archive row that names an ordinary record as its registration.
  tamper("INSERT INTO audit_archives VALUES (10, 1, 10, 1, 'audit-1-10.jsonl', zeroblob(32), 0, "
         "15);");
  expect_failure(verify(), "unregistered_archive", 15);
  // Its base checkpoint gone as well.
  tamper("DELETE FROM audit_checkpoints WHERE seq = 10;");
  expect_failure(verify(), "archive_base", 11);
}

// Measurement, not a limit: the HSM operations an append transaction adds (printed for the
// README's figure; SoftHSM2 rewrites the object file on each C_SetAttributeValue).
TEST_F(Audit, CostOfTheAnchorPerTransaction) {
  append_records(1);
  auto lease = hsm_->pool->acquire();
  ASSERT_TRUE(lease.ok());
  hsm::Session& s = lease->session();
  constexpr int kN = 100;
  using Clock = std::chrono::steady_clock;
  auto per = [](Clock::duration d) {
    return static_cast<long long>(std::chrono::duration_cast<std::chrono::microseconds>(d).count() /
                                  kN);
  };
  auto t0 = Clock::now();
  for (int i = 0; i < kN; ++i)
    ASSERT_TRUE(hsm::find_data_objects(s, audit::kAnchorApplication).ok());
  auto t1 = Clock::now();
  auto objs = hsm::find_data_objects(s, audit::kAnchorApplication);
  ASSERT_TRUE(objs.ok() && !objs->empty());
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(hsm::read_data_text(s, objs->front()).ok());
  auto t2 = Clock::now();
  const std::string v = audit::anchor_encoding(audit::Head{1, {}}, audit::AnchorMark::committed);
  for (int i = 0; i < kN; ++i) {
    auto w = hsm::write_data_text(s, objs->back(), v);
    ASSERT_TRUE(w.ok()) << w.error().message();
  }
  auto t3 = Clock::now();
  for (int i = 0; i < kN; ++i) {
    auto tx = db::Transaction::begin(db());
    ASSERT_TRUE(tx.ok());
    auto h = trail_->chain().head();
    ASSERT_TRUE(h.ok());
    ASSERT_TRUE(trail_->chain().append_after(*h, event(i)).ok());
    ASSERT_TRUE(tx->commit().ok());
  }
  auto t4 = Clock::now();
  audit::Notary n;
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(n.sign(s, {1, {}}, 1).ok());
  auto t5 = Clock::now();
  std::printf(
      "audit cost (us): find anchors %lld, read one %lld, write one %lld, "
      "commit of one record without HSM %lld, checkpoint signature %lld\n",
      per(t1 - t0), per(t2 - t1), per(t3 - t2), per(t4 - t3), per(t5 - t4));
}

}  // namespace
