// KEK rotation (src/kek_rotation.h, `gridseal hsm rotate-kek|destroy-kek`): the generation
// states and their triggers on a bare store; then against a real SoftHSM2 token in a temp dir:
// every slot re-wrapped under gs-kek-<n> and still the same key, the new KEK locked down like
// gs-kek, kill -9 of the real CLI mid-rotation then resume, and a running gridseal-dkusd opening
// meter messages during and after a rotation (old KEK destroyed).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "hsm/ops.h"
#include "src/config.h"
#include "src/host_aes.h"
#include "src/hsm_context.h"
#include "src/kek_rotation.h"
#include "src/key_store.h"
#include "tests/unit/audit_rows.h"
#include "c1222/security.h"
#include "tests/unit/dkusd_fixture.h"
#include "tests/unit/run_command.h"

namespace {

namespace fs = std::filesystem;
using gs::Bytes;
using gs::Errc;
using gs::test::CmdResult;
namespace kek = gs::kek;

std::string tmp_dir(const char* name) {
  std::string t = std::string("/tmp/") + name + "-XXXXXX";
  GS_CHECK(mkdtemp(t.data()) != nullptr);
  return t;
}

std::int64_t scalar(gs::db::Db& db, const std::string& sql) {
  auto st = db.prepare(sql);
  GS_CHECK(st.ok());
  auto s = st->step();
  GS_CHECK(s.ok() && *s == gs::db::Step::row);
  return st->int64(0);
}

// ---- store only ---------------------------------------------------------------------------

class KekStore : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = tmp_dir("gs-kek-store");
    auto ks = gs::store::KeyStore::open(dir_ + "/g.db");
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    ks_.emplace(std::move(ks).value());
    gs::store::NewMeter m;
    m.meter_id = "M1";
    m.ap_title = Bytes{0x2a, 0x01};
    m.ap_title_text = "1.2.1";
    m.wrapped_key = Bytes(24, 0x11);
    m.origin = "plain";
    ASSERT_TRUE(ks_->import_meters({&m, 1}).ok());
  }
  void TearDown() override {
    ks_.reset();
    fs::remove_all(dir_);
  }
  gs::db::Db& db() { return ks_->db(); }
  gs::Status exec(const std::string& sql) { return db().exec(sql); }

  std::string dir_;
  std::optional<gs::store::KeyStore> ks_;
};

TEST_F(KekStore, GenerationOneIsGsKekAndSlotsRecordTheirGeneration) {
  EXPECT_EQ(kek::label_for(1), "gs-kek");
  EXPECT_EQ(kek::label_for(2), "gs-kek-2");
  EXPECT_EQ(kek::current_generation(db()).value(), 1u);
  auto m = ks_->meter_by_id("M1").value();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->slots.at(0).kek, 1u);
  auto gens = kek::generations(db()).value();
  ASSERT_EQ(gens.size(), 1u);
  EXPECT_EQ(gens[0].state, kek::GenState::current);
  EXPECT_EQ(gens[0].slots, 1);
}

TEST_F(KekStore, StatesMoveOnlyForwardAndTriggersGuardTheSlots) {
  // Nothing to destroy or activate yet.
  EXPECT_EQ(kek::mark_destroyed(db(), 1).error().code, Errc::conflict);
  EXPECT_EQ(kek::mark_destroyed(db(), 9).error().code, Errc::not_found);
  EXPECT_EQ(kek::activate(db(), 2).error().code, Errc::conflict);
  auto gen = kek::record_new_generation(db(), "test");
  ASSERT_TRUE(gen.ok()) << gen.error().message();
  EXPECT_EQ(*gen, 2u);
  EXPECT_EQ(kek::record_new_generation(db(), "test").error().code, Errc::conflict);
  EXPECT_EQ(kek::creating_generation(db()).value(), std::optional<std::uint32_t>(2));
  // No key may be stored under a KEK that is still being created.
  EXPECT_FALSE(exec("UPDATE key_slots SET kek = 2").ok());
  ASSERT_TRUE(kek::activate(db(), 2).ok());
  EXPECT_EQ(kek::current_generation(db()).value(), 2u);
  EXPECT_EQ(kek::slots_to_rewrap(db()).value(), 1);
  // Draining with a slot under it: neither retired nor destroyable.
  EXPECT_EQ(kek::retire_drained(db()).error().code, Errc::busy);
  EXPECT_EQ(kek::mark_destroyed(db(), 1).error().code, Errc::conflict);
  ASSERT_TRUE(exec("UPDATE key_slots SET kek = 2, wrapped = x'" + std::string(48, '2') + "'").ok());
  auto retired = kek::retire_drained(db());
  ASSERT_TRUE(retired.ok()) << retired.error().message();
  EXPECT_EQ(*retired, std::vector<std::uint32_t>{1});
  // A late writer that read generation 1 before the switch: the generation drains again.
  ASSERT_TRUE(exec("UPDATE key_slots SET kek = 1").ok());
  EXPECT_EQ(kek::generations(db()).value()[0].state, kek::GenState::draining);
  EXPECT_EQ(kek::mark_destroyed(db(), 1).error().code, Errc::conflict);
  ASSERT_TRUE(exec("UPDATE key_slots SET kek = 2").ok());
  ASSERT_TRUE(kek::retire_drained(db()).ok());
  EXPECT_EQ(kek::mark_destroyed(db(), 1).value(), false);
  EXPECT_EQ(kek::mark_destroyed(db(), 1).value(), true);  // again: already destroyed
  EXPECT_EQ(kek::mark_destroyed(db(), 2).error().code, Errc::conflict);  // current
  // Nothing can be written under a destroyed KEK any more; a slot without a key still can.
  EXPECT_FALSE(exec("UPDATE key_slots SET kek = 1").ok());
  EXPECT_TRUE(exec("UPDATE key_slots SET wrapped = NULL, kek = 1").ok());
  EXPECT_FALSE(exec("INSERT INTO key_slots (meter, slot, wrapped, key_version, state, origin, "
                    "created_at, changed_at, kek) VALUES (1, 2, x'00', 1, 'pending', 'rollover', "
                    "0, 0, 1)")
                   .ok());
  EXPECT_FALSE(exec("UPDATE kek_generations SET state = 'current' WHERE gen = 1").ok())
      << "two current generations";
}

// ---- against a real token -------------------------------------------------------------------

class KekRotation : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = tmp_dir("gs-kek-rot");
    conf_ = dir_ + "/gridseal.toml";
    std::ofstream(conf_) << "[hsm]\nsofthsm_dir = \"hsm\"\ntoken_label = \"gs-kek-test\"\n"
                            "pin_file = \"hsm/user.pin\"\nso_pin_file = \"hsm/so.pin\"\n"
                            "[store]\npath = \"gridseal.db\"\n";
    CmdResult r = run("hsm init");
    ASSERT_EQ(r.code, 0) << r.out;
  }
  void TearDown() override { fs::remove_all(dir_); }

  CmdResult run(const std::string& args) const {
    return gs::test::run_gridseal(args + " --config " + conf_);
  }

  // Imports meters M0..M(n-1) with plain keys; returns the keys.
  std::vector<Bytes> import(int n) {
    std::mt19937_64 rng(7);
    std::vector<Bytes> keys;
    std::ofstream f(dir_ + "/fleet.csv");
    f << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
    for (int i = 0; i < n; ++i) {
      Bytes k(16);
      for (auto& b : k) b = static_cast<std::uint8_t>(rng());
      keys.push_back(k);
      f << "M" << i << ",.7." << (i + 1) << ",,0,plain:" << gs::to_hex(k) << "\n";
    }
    f.close();
    CmdResult r = run("meters import " + dir_ + "/fleet.csv --batch 500");
    EXPECT_EQ(r.code, 0) << r.out;
    return keys;
  }

  gs::store::KeyStore store() const {
    gs::db::OpenOptions o;
    o.create = false;
    auto ks = gs::store::KeyStore::open(dir_ + "/gridseal.db", o);
    GS_CHECK(ks.ok());
    return std::move(ks).value();
  }

  // The configured HSM, opened in this process (one Module at a time).
  gs::HsmContext hsm() const {
    auto cfg = gs::config::load(conf_);
    GS_CHECK(cfg.ok());
    auto ctx = gs::open_hsm(cfg->hsm);
    GS_CHECK(ctx.ok());
    return std::move(ctx).value();
  }

  // Every stored slot unwraps with the KEK its row names into the key the fleet file gave it
  // (AES-ECB of one block in the HSM == the same on the host). Returns how many were checked.
  std::size_t check_every_slot(const std::vector<Bytes>& keys) {
    auto ks = store();
    auto ctx = hsm();
    auto lease = ctx.pool->acquire();
    GS_CHECK(lease.ok());
    gs::hsm::Session& s = lease->session();
    kek::KekHandles keks;
    std::size_t n = 0;
    std::string after;
    for (;;) {
      auto page = ks.list_meters(after, 500);
      GS_CHECK(page.ok());
      if (page->empty()) break;
      for (const auto& m : *page) {
        after = m.meter_id;
        const auto& slot = m.slots.at(0);
        auto k = keks.get(s, slot.kek);
        EXPECT_TRUE(k.ok()) << m.meter_id << ": " << k.error().message();
        if (!k.ok()) continue;
        auto h = gs::hsm::unwrap_meter_key(s, *k, slot.wrapped);
        EXPECT_TRUE(h.ok()) << m.meter_id << " (KEK " << slot.kek << ")";
        if (!h.ok()) continue;
        gs::Block in{}, out{}, want{};
        in[0] = 0x5a;
        EXPECT_TRUE(gs::hsm::aes_encrypt(s, *h, gs::hsm::AesMode::ecb, nullptr, in, out).ok());
        (void)gs::hsm::destroy_object(s, *h);
        const int i = std::stoi(m.meter_id.substr(1));
        auto host = gs::HostAes::make(keys.at(static_cast<std::size_t>(i))).value();
        GS_CHECK(host->encrypt_blocks(in, want).ok());
        EXPECT_EQ(gs::to_hex(out), gs::to_hex(want)) << m.meter_id << " is not its key any more";
        ++n;
      }
    }
    return n;
  }

  std::string dir_, conf_;
};

TEST_F(KekRotation, RewrapsEverySlotUnderANewGenerationAndDestroysTheOldOneOnlyWhenAsked) {
  auto keys = import(300);
  CmdResult r = run("hsm rotate-kek --json --batch 64");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"from\":\"gs-kek\",\"to\":\"gs-kek-2\",\"generation\":2,\"started\":true,"
                       "\"created\":true,\"rewrapped\":300,\"batches\":5,\"retired\":[\"gs-kek\"]"),
            std::string::npos)
      << r.out;
  {
    auto ks = store();
    EXPECT_EQ(scalar(ks.db(), "SELECT count(*) FROM key_slots WHERE kek = 2"), 300);
    EXPECT_EQ(gs::test::audit_records(ks.db(), "kek_rotation_started").size(), 1u);
    EXPECT_EQ(gs::test::audit_records(ks.db(), "kek_rotation_finished").size(), 1u);
  }
  EXPECT_EQ(check_every_slot(keys), 300u);
  // Re-importing the same fleet is a no-op: the same key under the current KEK is the same
  // stored form (AES-KWP is deterministic).
  CmdResult again = run("meters import " + dir_ + "/fleet.csv");
  EXPECT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("0 imported, 300 already present"), std::string::npos) << again.out;

  // The new KEK has exactly gs-kek's security attributes; both listed with their generation.
  CmdResult st = run("hsm status --json");
  ASSERT_EQ(st.code, 0) << st.out;
  const std::string attrs = "\"class\":\"secret\",\"token\":true,\"private\":true,"
                            "\"modifiable\":false,\"sensitive\":true,\"extractable\":false,"
                            "\"trusted\":true,\"encrypt\":false,\"decrypt\":false,\"sign\":false,"
                            "\"verify\":false,\"wrap\":true,\"unwrap\":true,\"derive\":false";
  EXPECT_NE(st.out.find("{\"label\":\"gs-kek\"," + attrs), std::string::npos) << st.out;
  EXPECT_NE(st.out.find("{\"label\":\"gs-kek-2\"," + attrs), std::string::npos) << st.out;
  EXPECT_NE(st.out.find("{\"generation\":1,\"label\":\"gs-kek\",\"state\":\"retired\",\"slots\":0,"
                        "\"in_token\":true"),
            std::string::npos)
      << st.out;
  EXPECT_NE(st.out.find("{\"generation\":2,\"label\":\"gs-kek-2\",\"state\":\"current\","
                        "\"slots\":300,\"in_token\":true"),
            std::string::npos)
      << st.out;

  // The current generation is never destroyed; the retired one only by the separate step.
  CmdResult cur = run("hsm destroy-kek 2");
  EXPECT_EQ(cur.code, 1);
  EXPECT_NE(cur.out.find("is current"), std::string::npos) << cur.out;
  CmdResult d = run("hsm destroy-kek 1");
  ASSERT_EQ(d.code, 0) << d.out;
  EXPECT_NE(d.out.find("destroyed gs-kek "), std::string::npos) << d.out;
  CmdResult d2 = run("hsm destroy-kek 1");
  EXPECT_EQ(d2.code, 0) << d2.out;
  EXPECT_NE(d2.out.find("nothing to do"), std::string::npos) << d2.out;
  EXPECT_EQ(check_every_slot(keys), 300u);
  // The raw HSM measurement of gridseal-bench wraps its meter key under the current generation:
  // it still runs once gs-kek is gone.
  CmdResult raw = gs::test::run_command(std::string(GS_BIN_DIR) +
                                        "/gridseal-bench ses --hsm-only --hsm-config " + conf_ +
                                        " --hsm-threads 1 --hsm-seconds 0.2 --json 2>&1");
  EXPECT_EQ(raw.code, 0) << raw.out;
  EXPECT_NE(raw.out.find("\"raw_hsm\":{\"per_s\":"), std::string::npos) << raw.out;
  // hsm init after the rotation keeps to the current generation: no new gs-kek.
  CmdResult init = run("hsm init");
  EXPECT_EQ(init.code, 0) << init.out;
  EXPECT_NE(init.out.find("exists  gs-kek-2"), std::string::npos) << init.out;
  EXPECT_EQ(init.out.find("created gs-kek"), std::string::npos) << init.out;

  // New keys are wrapped under the current generation; a second rotation moves them on.
  std::ofstream(dir_ + "/more.csv") << "meter_id,ap_title,ecc_public_key,key_slot,key\n"
                                       "M300,.7.301,,0,plain:00112233445566778899aabbccddeeff\n";
  ASSERT_EQ(run("meters import " + dir_ + "/more.csv").code, 0);
  {
    auto ks = store();
    EXPECT_EQ(ks.meter_by_id("M300").value()->slots.at(0).kek, 2u);
  }
  CmdResult r3 = run("hsm rotate-kek --json");
  ASSERT_EQ(r3.code, 0) << r3.out;
  EXPECT_NE(r3.out.find("\"to\":\"gs-kek-3\""), std::string::npos) << r3.out;
  EXPECT_NE(r3.out.find("\"rewrapped\":301"), std::string::npos) << r3.out;
  keys.push_back(gs::from_hex("00112233445566778899aabbccddeeff").value());
  EXPECT_EQ(check_every_slot(keys), 301u);
}

TEST_F(KekRotation, NewKekRefusesToWrapUnderAnyOtherKeyOrToDecrypt) {
  import(1);
  ASSERT_EQ(run("hsm rotate-kek").code, 0);
  auto ks = store();
  auto m = ks.meter_by_id("M0").value();
  ASSERT_TRUE(m);
  ASSERT_EQ(m->slots.at(0).kek, 2u);
  auto ctx = hsm();
  auto lease = ctx.pool->acquire();
  ASSERT_TRUE(lease.ok());
  gs::hsm::Session& s = lease->session();
  auto k2 = gs::hsm::find_object(s, gs::hsm::ObjectClass::secret_key, "gs-kek-2");
  ASSERT_TRUE(k2.ok()) << k2.error().message();
  auto a = gs::hsm::object_attributes(s, *k2);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(kek::check_kek_attributes(*a).ok());
  EXPECT_FALSE(gs::hsm::read_value(s, *k2).ok());
  auto h = gs::hsm::unwrap_meter_key(s, *k2, m->slots[0].wrapped);
  ASSERT_TRUE(h.ok()) << h.error().message();
  // The unwrap template holds for what gs-kek-2 unwraps: sensitive, encrypt only, wrap only
  // with trusted.
  auto ma = gs::hsm::object_attributes(s, *h);
  ASSERT_TRUE(ma.ok());
  EXPECT_TRUE(ma->sensitive);
  EXPECT_TRUE(ma->wrap_with_trusted);
  EXPECT_FALSE(ma->decrypt);
  EXPECT_FALSE(ma->modifiable);
  auto own = gs::hsm::generate_aes_key(s, {"own-wrap", 32, false, false, false, true, true, false});
  ASSERT_TRUE(own.ok());
  auto other = gs::hsm::wrap_key(s, *own, *h);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.error().detail.find("CKR_KEY_NOT_WRAPPABLE"), std::string::npos);
  EXPECT_TRUE(gs::hsm::wrap_key(s, *k2, *h).ok());
  gs::Block in{}, out{};
  EXPECT_FALSE(gs::hsm::aes_decrypt(s, *k2, gs::hsm::AesMode::ecb, nullptr, in, out).ok());
  EXPECT_FALSE(gs::hsm::aes_encrypt(s, *k2, gs::hsm::AesMode::ecb, nullptr, in, out).ok());
  EXPECT_FALSE(gs::hsm::wrap_key(s, *own, *k2).ok());
  (void)gs::hsm::destroy_object(s, *h);
}

TEST_F(KekRotation, KillNineMidRotationThenResumeLosesNoSlot) {
  constexpr int kMeters = 2000;
  auto keys = import(kMeters);
  // Paced (about 5 s) so that the kill lands mid-way.
  const pid_t pid = gs::test::spawn_gridseal(
      {"hsm", "rotate-kek", "--batch", "10", "--rate", "400", "--config", conf_});
  ASSERT_GE(pid, 0);
  std::int64_t moved = 0;
  for (int i = 0; i < 600; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    auto ks = store();
    if (scalar(ks.db(), "SELECT count(*) FROM sqlite_master WHERE name = 'kek_generations'") == 0) {
      continue;
    }
    moved = scalar(ks.db(), "SELECT count(*) FROM key_slots WHERE kek = 2");
    if (moved >= 200) break;
  }
  kill(pid, SIGKILL);
  int wst = 0;
  waitpid(pid, &wst, 0);
  ASSERT_TRUE(WIFSIGNALED(wst)) << "rotation finished before the kill; the test proves nothing";
  ASSERT_GE(moved, 200);
  {
    auto ks = store();
    const std::int64_t under2 = scalar(ks.db(), "SELECT count(*) FROM key_slots WHERE kek = 2");
    EXPECT_LT(under2, kMeters) << "rotation finished before the kill";
    EXPECT_EQ(scalar(ks.db(), "SELECT count(*) FROM key_slots WHERE kek = 1") + under2, kMeters);
    EXPECT_EQ(gs::test::audit_records(ks.db(), "kek_rotation_finished").size(), 0u);
  }
  // Mid-way, every slot still opens with the generation its row names.
  EXPECT_EQ(check_every_slot(keys), static_cast<std::size_t>(kMeters));

  CmdResult r = run("hsm rotate-kek --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"to\":\"gs-kek-2\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"started\":false,\"created\":false"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"retired\":[\"gs-kek\"]"), std::string::npos) << r.out;
  {
    auto ks = store();
    EXPECT_EQ(scalar(ks.db(), "SELECT count(*) FROM key_slots WHERE kek = 2"), kMeters);
    EXPECT_EQ(scalar(ks.db(), "SELECT count(*) FROM kek_generations"), 2);
    EXPECT_EQ(gs::test::audit_records(ks.db(), "kek_rotation_started").size(), 1u);
    EXPECT_EQ(gs::test::audit_records(ks.db(), "kek_rotation_finished").size(), 1u);
  }
  EXPECT_EQ(check_every_slot(keys), static_cast<std::size_t>(kMeters));
  // Nothing left to resume: a re-run is a new rotation (gs-kek-3), not a repeat of this one.
  CmdResult again = run("hsm rotate-kek --json");
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("\"from\":\"gs-kek-2\",\"to\":\"gs-kek-3\""), std::string::npos)
      << again.out;
}

TEST_F(KekRotation, ResumeAdoptsAKekACrashedRunCreatedButRefusesAForgedOne) {
  import(5);
  // A run that died after recording generation 2 and creating nothing: resumed, it creates it.
  {
    auto ks = store();
    ASSERT_TRUE(kek::record_new_generation(ks.db(), "test").ok());
  }
  CmdResult r = run("hsm rotate-kek --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"started\":false,\"created\":true,\"rewrapped\":5"), std::string::npos)
      << r.out;
  // A user-PIN holder's own key under the next label (not trusted): never adopted.
  {
    auto ctx = hsm();
    auto lease = ctx.pool->acquire();
    ASSERT_TRUE(lease.ok());
    gs::hsm::AesKeySpec spec{"gs-kek-3", 32, true, false, false, true, true, false};
    ASSERT_TRUE(gs::hsm::generate_aes_key(lease->session(), spec).ok());
  }
  {
    auto ks = store();
    ASSERT_TRUE(kek::record_new_generation(ks.db(), "test").ok());
  }
  CmdResult forged = run("hsm rotate-kek");
  EXPECT_EQ(forged.code, 1);
  EXPECT_NE(forged.out.find("CKA_TRUSTED is not set on 'gs-kek-3'"), std::string::npos)
      << forged.out;
  auto ks = store();
  EXPECT_EQ(kek::current_generation(ks.db()).value(), 2u);
  EXPECT_EQ(scalar(ks.db(), "SELECT count(*) FROM key_slots WHERE kek = 2"), 5);
}

// ---- a running DKUS ---------------------------------------------------------------------------

TEST(KekRotationDkusd, OpensMeterMessagesDuringAndAfterRotationAndAfterTheOldKekIsDestroyed) {
  gs::test::DkusdOptions o;
  o.meters = 40;
  gs::test::DkusdDaemon d(o);
  auto st = d.setup();
  ASSERT_TRUE(st.ok()) << st.error().message();
  st = d.start();
  ASSERT_TRUE(st.ok()) << st.error().message();
  auto c = d.connect();
  ASSERT_TRUE(c.ok()) << c.error().message();
  std::uint64_t next_id = 10;
  auto open_all = [&](const char* when) {
    for (std::size_t i = 1; i <= o.meters; ++i) {
      gs::test::MeterMessage mm;
      mm.meter = d.meter(i).title;
      mm.id = next_id;
      const Bytes sealed = d.seal(i, mm);
      auto r = (*c)->call(sealed);
      ASSERT_TRUE(r.ok()) << when << ": " << r.error().message() << d.err_log();
      auto m = gs::c1222::decode(*r);
      ASSERT_TRUE(m.ok()) << when;
      auto e = gs::c1222::split_epsem(m->epsem);
      ASSERT_TRUE(e.ok()) << when << ": meter " << i << " answered with an error"
                          << d.err_log();
      EXPECT_EQ(gs::c1222::security_mode(e->control), gs::c1222::SecurityMode::cleartext)
          << when << ": meter " << i;
    }
    ++next_id;
  };
  open_all("before");
  // A paced rotation (~2 s) while messages keep coming: some slots under each generation.
  const pid_t pid = gs::test::spawn_gridseal(
      {"hsm", "rotate-kek", "--batch", "1", "--rate", "20", "--config", d.conf()});
  ASSERT_GE(pid, 0);
  int rounds_during = 0;
  for (;;) {
    int wst = 0;
    const pid_t done = waitpid(pid, &wst, WNOHANG);
    if (done == pid) {
      ASSERT_TRUE(WIFEXITED(wst) && WEXITSTATUS(wst) == 0) << "rotate-kek failed";
      break;
    }
    open_all("during");
    ++rounds_during;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_GE(rounds_during, 3);
  open_all("after");
  CmdResult dk = d.gridseal("hsm destroy-kek 1");
  ASSERT_EQ(dk.code, 0) << dk.out;
  open_all("after destroy");
  EXPECT_EQ(d.stop(), 0) << d.err_log();
}

// The SES secures commands under a meter's key after its slot was re-wrapped and gs-kek
// destroyed, for a meter it had cached before the rotation and for ones it had not.
TEST(KekRotationSesd, SecuresCommandsUnderReWrappedKeys) {
  gs::test::SesdOptions o;
  o.meters = 3;
  o.keys = {"000102030405060708090a0b0c0d0e0f", "101112131415161718191a1b1c1d1e1f",
            "202122232425262728292a2b2c2d2e2f"};
  gs::test::SesdDaemon d(o);
  auto st = d.setup();
  ASSERT_TRUE(st.ok()) << st.error().message();
  st = d.start();
  ASSERT_TRUE(st.ok()) << st.error().message();
  auto c = d.connect();
  ASSERT_TRUE(c.ok()) << c.error().message();
  std::uint32_t id = 1;
  auto secure = [&](std::size_t i, const char* when) {
    const std::string title = ".7." + std::to_string(i);
    auto resp = (*c)->call(gs::test::sesd_request(title, id++, {Bytes{0x30, 0x00, 0x01}}));
    ASSERT_TRUE(resp.ok()) << when << ": " << resp.error().message();
    auto aes = gs::HostAes::make(gs::from_hex(o.keys.at(i - 1)).value()).value();
    auto eax = gs::c1222::EaxPrime::make(*aes).value();
    auto opened = gs::c1222::open(*resp, [&](std::uint8_t k) { return k == 0 ? &eax : nullptr; });
    ASSERT_TRUE(opened.ok()) << when << ", meter " << i << ": " << opened.error().message()
                             << " " << gs::to_hex(*resp);
    EXPECT_EQ(opened->mode, gs::c1222::SecurityMode::encrypted);
  };
  secure(1, "before");
  CmdResult rot = d.gridseal("hsm rotate-kek");
  ASSERT_EQ(rot.code, 0) << rot.out;
  CmdResult dk = d.gridseal("hsm destroy-kek 1");
  ASSERT_EQ(dk.code, 0) << dk.out;
  for (std::size_t i = 1; i <= 3; ++i) secure(i, "after");
  EXPECT_EQ(d.stop(), 0);
}

// The rollover engine seals the key update under the meter's key as re-wrapped by the rotation
// (its row names gs-kek-2; gs-kek is destroyed) and stores the new key under gs-kek-2.
TEST(KekRotationRollover, RekeysAMeterAfterTheRotationUnderTheNewGeneration) {
  gs::test::RolloverRigOptions o;
  o.meters = 2;
  gs::test::RolloverRig rig(o);
  ASSERT_TRUE(rig.setup().ok());
  ASSERT_TRUE(rig.start_dkusd().ok()) << rig.logs();
  CmdResult rot = rig.gridseal("hsm rotate-kek --json");
  ASSERT_EQ(rot.code, 0) << rot.out;
  EXPECT_NE(rot.out.find("\"rewrapped\":2,"), std::string::npos) << rot.out;
  CmdResult dk = rig.gridseal("hsm destroy-kek 1");
  ASSERT_EQ(dk.code, 0) << dk.out;
  CmdResult start = rig.gridseal("rollover start --meters SIM00000001 --json");
  ASSERT_EQ(start.code, 0) << start.out;
  const auto at = start.out.find("\"campaign\":");
  ASSERT_NE(at, std::string::npos) << start.out;
  const std::int64_t campaign = std::atoll(start.out.c_str() + at + 11);
  auto p = rig.wait_campaign(campaign, std::chrono::seconds(30));
  ASSERT_TRUE(p.ok()) << p.error().message() << rig.logs();
  EXPECT_EQ(p->confirmed, 1) << rig.logs();
  auto ks = rig.store();
  ASSERT_TRUE(ks.ok());
  auto m = ks->meter_by_id("SIM00000001");
  ASSERT_TRUE(m.ok() && m->has_value());
  const gs::store::KeySlot* fresh = (*m)->slot_for_key_id(1);
  ASSERT_NE(fresh, nullptr);
  EXPECT_EQ(fresh->state, gs::store::KeyState::active);
  EXPECT_EQ(fresh->kek, 2u);
  EXPECT_EQ((*m)->slot_for_key_id(0)->kek, 2u);
  EXPECT_EQ(rig.stop_dkusd(), 0) << rig.logs();
}

}  // namespace
