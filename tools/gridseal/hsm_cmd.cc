// `gridseal hsm init|status|export-pubkey|import-transport-key`: create and inspect gridseal's HSM
// objects.
#include <fcntl.h>
#include <openssl/rand.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "hsm/ops.h"
#include "src/command_keys.h"
#include "src/hsm_context.h"
#include "src/kek_rotation.h"
#include "src/key_store.h"
#include "src/operators.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

struct EcObject {
  const char* label;
  hsm::EcKeyUse use;
  // A command key: made session-copyable under hsm.command_key_session_copy (the SES and the
  // rollover engine sign every command with it; the other keys sign rarely).
  bool command_key = false;
};
constexpr EcObject kEcObjects[] = {
    {kLabelCommandKey1, hsm::EcKeyUse::sign, true}, {kLabelCommandKey2, hsm::EcKeyUse::sign, true},
    {kLabelRevocation, hsm::EcKeyUse::sign},        {kLabelProvision, hsm::EcKeyUse::derive},
    {kLabelAudit, hsm::EcKeyUse::sign},
};

// A random PIN (32 hex digits) written to a new 0600 file; the PIN is never printed.
Status create_pin_file(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  std::uint8_t raw[16];
  if (RAND_bytes(raw, sizeof raw) != 1) return {Errc::crypto_failure, "no randomness for a PIN"};
  std::string pin = to_hex(raw) + "\n";
  secure_zero(raw, sizeof raw);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return {Errc::storage_failure, "cannot create PIN file " + path};
  bool ok = ::write(fd, pin.data(), pin.size()) == static_cast<ssize_t>(pin.size()) &&
            ::fsync(fd) == 0;
  ::close(fd);
  secure_zero(pin.data(), pin.size());
  if (!ok) return {Errc::storage_failure, "cannot write PIN file " + path};
  return {};
}

bool exists(const std::string& p) { return !p.empty() && std::filesystem::exists(p); }

// The first security officer, enrolled by `hsm init --officer` (which closes bootstrap mode).
// Only while no operator is enrolled: later ones are enrolled by a security officer's signed
// `operators enroll`. Re-running with the same officer and key is a no-op.
int enroll_first_officer(const config::Config& cfg, const std::string& name, const Bytes& key) {
  auto store = store::KeyStore::open(cfg.store.path);
  if (!store.ok()) return fail(cfg.store.path + ": " + store.error().message());
  operators::Registry reg(store->db());
  auto existing = reg.find(name);
  if (!existing.ok()) return fail(existing.error().message());
  if (*existing && (*existing)->active() &&
      (*existing)->role == operators::Role::security_officer && (*existing)->public_key == key) {
    std::printf("exists  operator %s (security-officer)\n", name.c_str());
    return kExitOk;
  }
  auto n = reg.active_count();
  if (!n.ok()) return fail(n.error().message());
  if (*n > 0) {
    return fail("--officer: operators are enrolled already; a security officer enrols more "
                "with a signed `gridseal operators enroll`");
  }
  const std::string actor = "bootstrap:" + unix_user();
  Status st = audited(cfg, store->db(), [&](db::Db&, std::vector<audit::Event>& events) -> Status {
    operators::Operator o{name, operators::Role::security_officer, key,
                          static_cast<std::int64_t>(std::time(nullptr)), actor, std::nullopt, ""};
    GS_TRY(reg.enroll(o));
    audit::Detail d;
    d.add("role", "security-officer").add("by", "hsm init");
    events.push_back({0, actor, "operator_enrolled", name, d.str()});
    return Status{};
  });
  if (!st.ok()) return fail("--officer: " + st.error().detail);
  std::printf("enrolled %s as the first security-officer: state-changing commands now need "
              "signed operator requests\n",
              name.c_str());
  return kExitOk;
}

int run_init_objects(const std::string& config_path) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  const auto& h = cfg->hsm;
  auto prep = prepare_embedded_softhsm(h);
  if (!prep.ok()) return fail(prep.error().message());
  auto module = hsm::Module::open(h.module);
  if (!module.ok()) return fail(module.error().message());
  int changes = 0;

  auto slot = (*module)->find_slot(h.token_label);
  if (!slot.ok()) {
    if (slot.error().code != Errc::not_found || h.softhsm_dir.empty()) {
      return fail(slot.error().message() +
                  (h.softhsm_dir.empty() ? " (create the token with the HSM's own tools, or set "
                                           "hsm.softhsm_dir for an embedded SoftHSM2 token)"
                                         : ""));
    }
    if (h.so_pin_file.empty() || h.pin_file.empty()) {
      return fail(config_path + ": hsm.so_pin_file and hsm.pin_file are required to create "
                                "the embedded token");
    }
    for (const auto& f : {h.so_pin_file, h.pin_file}) {
      if (!exists(f)) {
        auto st = create_pin_file(f);
        if (!st.ok()) return fail(st.error().message());
        std::printf("created PIN file %s (mode 0600)\n", f.c_str());
      }
    }
    auto so = hsm::read_pin_file(h.so_pin_file);
    if (!so.ok()) return fail(so.error().message());
    auto user = hsm::read_pin_file(h.pin_file);
    if (!user.ok()) return fail(user.error().message());
    slot = (*module)->init_token(h.token_label, *so, *user);
    if (!slot.ok()) return fail(slot.error().message());
    std::printf("created token '%s' in %s\n", h.token_label.c_str(), h.softhsm_dir.c_str());
    ++changes;
  }
  auto user_pin = read_user_pin(h);
  if (!user_pin.ok()) return fail(user_pin.error().message());

  // The KEK first: its creation needs the SO and must run with no other session logged in. After
  // a KEK rotation the store names a later generation (gs-kek-<n>) and gs-kek may be gone: the
  // current one is what must exist.
  std::uint32_t kek_gen = 1;
  if (std::filesystem::exists(cfg->store.path)) {
    db::OpenOptions opt;
    opt.create = false;
    auto store = store::KeyStore::open(cfg->store.path, opt);
    if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
    auto g = kek::current_generation(store->db());
    if (!g.ok()) return fail(g.error().message());
    kek_gen = *g;
  }
  const std::string kek_label = kek::label_for(kek_gen);
  bool kek_exists = false;
  {
    auto s = hsm::Session::open(**module, *slot, true);
    if (!s.ok()) return fail(s.error().message());
    auto login = s->login(hsm::UserType::user, *user_pin);
    if (!login.ok()) return fail(login.error().message());
    auto found = hsm::find_object(*s, hsm::ObjectClass::secret_key, kek_label);
    kek_exists = found.ok();
    if (!found.ok() && found.error().code != Errc::not_found) {
      return fail(found.error().message());
    }
    (void)s->logout();
  }
  if (kek_exists) {
    std::printf("exists  %s\n", kek_label.c_str());
  } else if (kek_gen > 1) {
    return fail(kek_label + " (the current KEK generation in " + cfg->store.path +
                ") is missing from the token: restore the token, it cannot be recreated");
  } else {
    if (h.so_pin_file.empty()) {
      return fail(config_path + ": hsm.so_pin_file is required to create " + kLabelKek +
                  " (only the security officer may mark a key trusted)");
    }
    auto so = hsm::read_pin_file(h.so_pin_file);
    if (!so.ok()) return fail(so.error().message());
    auto kek = hsm::create_trusted_kek(**module, *slot, kLabelKek, *so, *user_pin);
    if (!kek.ok()) return fail(std::string("creating ") + kLabelKek + ": " + kek.error().message());
    std::printf("created %s (AES-256, trusted, wrap/unwrap only, non-extractable)\n", kLabelKek);
    ++changes;
  }

  auto s = hsm::Session::open(**module, *slot, true);
  if (!s.ok()) return fail(s.error().message());
  auto login = s->login(hsm::UserType::user, *user_pin);
  if (!login.ok()) return fail(login.error().message());
  for (const auto& obj : kEcObjects) {
    auto found = hsm::find_object(*s, hsm::ObjectClass::private_key, obj.label);
    if (found.ok()) {
      std::printf("exists  %s\n", obj.label);
      continue;
    }
    if (found.error().code != Errc::not_found) return fail(found.error().message());
    const bool copyable = obj.command_key && h.command_key_session_copy;
    auto kp = hsm::generate_ec_p256(*s, obj.label, obj.use, copyable);
    if (!kp.ok()) return fail(std::string("creating ") + obj.label + ": " + kp.error().message());
    std::printf("created %s (EC P-256, %s only, non-extractable%s)\n", obj.label,
                obj.use == hsm::EcKeyUse::sign ? "sign" : "derive",
                copyable ? ", session-copyable" : "");
    ++changes;
  }
  if (changes == 0) {
    std::printf("nothing to do: token '%s' already holds every gridseal object\n",
                h.token_label.c_str());
  }
  return kExitOk;
}

// gs-cmd-1 and gs-cmd-2 into the command-key registry (src/command_keys.h), created_by
// "hsm init", when they are not there yet (the store is created when missing). A fact of the
// token, like KEK generation 1: no audit record of its own. A store that cannot be created yet
// (its directory missing) only defers it: every `gridseal cmdkeys` command registers them too.
int register_command_keys(const config::Config& cfg) {
  auto store = store::KeyStore::open(cfg.store.path);
  if (!store.ok()) {
    std::fprintf(stderr, "gridseal: note: %s: %s; gs-cmd-1/2 are registered as command keys by "
                 "the first `gridseal cmdkeys` command\n", cfg.store.path.c_str(),
                 store.error().message().c_str());
    return kExitOk;
  }
  auto ctx = open_hsm(cfg.hsm);
  if (!ctx.ok()) return fail(ctx.error().message());
  auto lease = ctx->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());
  auto tx = db::Transaction::begin(store->db());
  if (!tx.ok()) return fail(tx.error().message());
  auto added = cmdkeys::register_initial_keys(store->db(), lease->session(), now_s());
  if (!added.ok()) return fail("registering the command keys: " + added.error().message());
  if (auto st = tx->commit(); !st.ok()) return fail(st.error().message());
  for (auto id : *added) {
    std::printf("registered %s (command key %u, trust slot %u)\n", cmdkeys::label_for(id).c_str(),
                unsigned{id}, id == 1 ? 0U : 1U);
  }
  return kExitOk;
}

// The objects, then (with every HSM handle of the first part closed) the command-key registry
// and the first officer.
int run_init(const std::string& config_path, const std::string& officer,
             const std::string& officer_pubkey) {
  if (officer.empty() != officer_pubkey.empty()) {
    return fail("--officer and --officer-pubkey go together");
  }
  Bytes officer_key;
  if (!officer.empty()) {
    if (!operators::valid_name(officer)) {
      return fail("--officer: name must be 1..64 of A-Z a-z 0-9 . _ -");
    }
    auto k = operators::load_public_key(officer_pubkey);
    if (!k.ok()) return fail("--officer-pubkey: " + k.error().detail);
    officer_key = std::move(k).value();
  }
  int rc = run_init_objects(config_path);
  if (rc != kExitOk) return rc;
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  rc = register_command_keys(*cfg);
  if (rc != kExitOk || officer.empty()) return rc;
  return enroll_first_officer(*cfg, officer, officer_key);
}

const char* class_name(hsm::ObjectClass c) {
  switch (c) {
    case hsm::ObjectClass::public_key: return "public";
    case hsm::ObjectClass::private_key: return "private";
    case hsm::ObjectClass::secret_key: return "secret";
  }
  return "?";
}

struct Listed {
  std::string label;
  hsm::ObjectClass cls;
  hsm::ObjectAttributes attrs;
};

Result<std::vector<Listed>> list_objects(hsm::Session& s,
                                         const std::vector<std::string>& kek_labels) {
  std::vector<Listed> out;
  std::vector<std::string> labels{kLabelKek};
  labels.insert(labels.end(), kek_labels.begin(), kek_labels.end());
  for (const char* label : {kLabelCommandKey1, kLabelCommandKey2, kLabelRevocation,
                            kLabelProvision, kLabelAudit}) {
    labels.emplace_back(label);
  }
  for (const std::string& label : labels) {
    for (auto cls : {hsm::ObjectClass::secret_key, hsm::ObjectClass::private_key,
                     hsm::ObjectClass::public_key}) {
      GS_ASSIGN(auto handles, hsm::find_objects(s, cls, label));
      for (auto hnd : handles) {
        GS_ASSIGN(auto a, hsm::object_attributes(s, hnd));
        out.push_back({label, cls, a});
      }
    }
  }
  return out;
}

int run_status(const std::string& config_path, bool json) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto ctx = open_hsm(cfg->hsm);
  if (!ctx.ok()) return fail(ctx.error().message());
  auto tokens = ctx->module->tokens();
  if (!tokens.ok()) return fail(tokens.error().message());
  hsm::TokenInfo info;
  for (const auto& t : *tokens) {
    if (t.slot == ctx->slot) info = t;
  }
  // The KEK generations, when the store exists (an `hsm init` before the first import has none).
  std::vector<kek::Generation> gens;
  std::vector<std::string> kek_labels;
  if (std::filesystem::exists(cfg->store.path)) {
    db::OpenOptions opt;
    opt.create = false;
    auto store = store::KeyStore::open(cfg->store.path, opt);
    if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
    auto g = kek::generations(store->db());
    if (!g.ok()) return fail(g.error().message());
    gens = std::move(g).value();
    for (const auto& k : gens) {
      if (k.gen > 1 && k.state != kek::GenState::destroyed) kek_labels.push_back(k.label);
    }
  }
  auto lease = ctx->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());
  auto objs = list_objects(lease->session(), kek_labels);
  if (!objs.ok()) return fail(objs.error().message());
  auto in_token = [&](const std::string& label) {
    for (const auto& o : *objs) {
      if (o.label == label && o.cls == hsm::ObjectClass::secret_key) return true;
    }
    return false;
  };
  if (json) {
    JsonWriter w;
    w.begin_object().key("module").value(cfg->hsm.module).key("token").begin_object();
    w.key("label").value(info.label).key("manufacturer").value(info.manufacturer);
    w.key("model").value(info.model).key("serial").value(info.serial).end_object();
    w.key("objects").begin_array();
    for (const auto& o : *objs) {
      const auto& a = o.attrs;
      w.begin_object().key("label").value(o.label).key("class").value(class_name(o.cls));
      w.key("token").value(a.token).key("private").value(a.private_object);
      w.key("modifiable").value(a.modifiable).key("sensitive").value(a.sensitive);
      w.key("extractable").value(a.extractable).key("trusted").value(a.trusted);
      w.key("encrypt").value(a.encrypt).key("decrypt").value(a.decrypt);
      w.key("sign").value(a.sign).key("verify").value(a.verify).key("wrap").value(a.wrap);
      w.key("unwrap").value(a.unwrap).key("derive").value(a.derive).end_object();
    }
    w.end_array().key("kek_generations").begin_array();
    for (const auto& k : gens) {
      w.begin_object().key("generation").value(std::int64_t{k.gen}).key("label").value(k.label);
      w.key("state").value(kek::to_string(k.state)).key("slots").value(k.slots);
      w.key("in_token").value(in_token(k.label)).key("created_by").value(k.created_by);
      w.key("created_at").value(k.created_at).key("changed_at").value(k.changed_at);
      w.end_object();
    }
    w.end_array().end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("module   %s\ntoken    %s (%s %s, serial %s)\n", cfg->hsm.module.c_str(),
              info.label.c_str(), info.manufacturer.c_str(), info.model.c_str(),
              info.serial.c_str());
  std::printf("%-14s %-8s %s\n", "label", "class", "attributes");
  for (const auto& o : *objs) {
    const auto& a = o.attrs;
    std::string f;
    auto add = [&](bool on, const char* n) {
      if (on) f += std::string(f.empty() ? "" : ",") + n;
    };
    add(a.token, "token");
    add(a.private_object, "private");
    add(a.sensitive, "sensitive");
    add(!a.extractable && o.cls != hsm::ObjectClass::public_key, "non-extractable");
    add(a.extractable, "EXTRACTABLE");
    add(a.trusted, "trusted");
    add(!a.modifiable, "read-only");
    add(a.encrypt, "encrypt");
    add(a.decrypt, "decrypt");
    add(a.sign, "sign");
    add(a.verify, "verify");
    add(a.wrap, "wrap");
    add(a.unwrap, "unwrap");
    add(a.derive, "derive");
    std::printf("%-14s %-8s %s\n", o.label.c_str(), class_name(o.cls), f.c_str());
  }
  if (!gens.empty()) {
    std::printf("\n%-4s %-14s %-10s %10s  %s\n", "gen", "KEK", "state", "key slots", "in token");
    for (const auto& k : gens) {
      std::printf("%-4u %-14s %-10s %10lld  %s\n", k.gen, k.label.c_str(), kek::to_string(k.state),
                  static_cast<long long>(k.slots), in_token(k.label) ? "yes" : "no");
    }
  }
  return kExitOk;
}

int run_export(const std::string& config_path, const std::string& label, bool pem) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto ctx = open_hsm(cfg->hsm);
  if (!ctx.ok()) return fail(ctx.error().message());
  auto lease = ctx->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());
  auto h = hsm::find_object(lease->session(), hsm::ObjectClass::public_key, label);
  if (!h.ok()) return fail("public key '" + label + "': " + h.error().message());
  auto point = hsm::export_ec_point(lease->session(), *h);
  if (!point.ok()) return fail(point.error().message());
  if (!pem) {
    std::printf("%s\n", to_hex(*point).c_str());
    return kExitOk;
  }
  // SubjectPublicKeyInfo for a P-256 point: fixed 26-byte prefix + the 65-byte point.
  static constexpr std::uint8_t kSpkiPrefix[] = {
      0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
      0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00};
  Bytes der(std::begin(kSpkiPrefix), std::end(kSpkiPrefix));
  der.insert(der.end(), point->begin(), point->end());
  std::string b64(4 * ((der.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(b64.data()), der.data(),
                          static_cast<int>(der.size()));
  b64.resize(static_cast<std::size_t>(n));
  std::printf("-----BEGIN PUBLIC KEY-----\n");
  for (std::size_t i = 0; i < b64.size(); i += 64) std::printf("%s\n", b64.substr(i, 64).c_str());
  std::printf("-----END PUBLIC KEY-----\n");
  return kExitOk;
}

// A manufacturer transport key wrapped to gs-provision (design in hsm/ops.h and the README).
int run_import_transport(const std::string& config_path, const std::string& label,
                         const std::string& ephemeral_hex, const std::string& wrapped_hex) {
  auto point = from_hex(ephemeral_hex);
  if (!point || point->size() != hsm::kEcPointSize || (*point)[0] != 0x04) {
    return fail("--ephemeral-pubkey must be a 65-byte uncompressed P-256 point (04...) in hex");
  }
  auto wrapped = from_hex(wrapped_hex);
  if (!wrapped || (wrapped->size() != 24 && wrapped->size() != 40)) {
    return fail("--wrapped must be 24 (AES-128) or 40 (AES-256) bytes of AES-KWP in hex");
  }
  if (label.empty() || label.size() > 128 || label.starts_with("gs-")) {
    return fail("--label must be 1..128 characters and not start with gs- (gridseal's own)");
  }
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto ctx = open_hsm(cfg->hsm);
  if (!ctx.ok()) return fail(ctx.error().message());
  auto lease = ctx->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());
  auto& s = lease->session();
  for (auto cls : {hsm::ObjectClass::secret_key, hsm::ObjectClass::private_key,
                   hsm::ObjectClass::public_key}) {
    auto found = hsm::find_objects(s, cls, label);
    if (!found.ok()) return fail(found.error().message());
    if (!found->empty()) return fail("an HSM object labelled '" + label + "' already exists");
  }
  auto prov = hsm::find_object(s, hsm::ObjectClass::private_key, kLabelProvision);
  if (!prov.ok()) {
    return fail(std::string(kLabelProvision) + ": " + prov.error().message() +
                " (run `gridseal hsm init`)");
  }
  auto t = hsm::import_transport_key(s, *prov, *point, *wrapped, label);
  if (!t.ok()) return fail("importing transport key '" + label + "': " + t.error().message());
  std::printf("imported %s (AES-%d transport key, unwrap only, non-extractable)\n",
              label.c_str(), wrapped->size() == 24 ? 128 : 256);
  return kExitOk;
}

// ---- KEK rotation (src/kek_rotation.h) ------------------------------------------------------

// Held for the whole of rotate-kek / destroy-kek: one rotation at a time per store. flock is
// released by the kernel when the process dies, kill -9 included.
struct RotationLock {
  int fd = -1;
  RotationLock() = default;
  RotationLock(const RotationLock&) = delete;
  RotationLock& operator=(const RotationLock&) = delete;
  ~RotationLock() {
    if (fd >= 0) ::close(fd);
  }
};

Status take_rotation_lock(const std::string& store_path, RotationLock& lock) {
  const std::string path = store_path + ".kek-rotation.lock";
  lock.fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lock.fd < 0) return {Errc::storage_failure, "cannot open " + path};
  if (::flock(lock.fd, LOCK_EX | LOCK_NB) != 0) {
    return {Errc::busy, "another `gridseal hsm rotate-kek` or `destroy-kek` is running on " +
                            store_path};
  }
  return {};
}

// The token object of KEK generation `gen`, made the way `hsm init` makes gs-kek (the SO's
// session KEK copied to a private token object, hsm::create_trusted_kek), or adopted when a
// crashed run made it already and it has exactly the KEK's attributes. Uses its own module, so
// that the SO can log in (no other session of this process may be logged in then).
Status ensure_kek_object(const config::Config& cfg, std::uint32_t gen, bool& created) {
  const auto& h = cfg.hsm;
  const std::string label = kek::label_for(gen);
  GS_TRY(prepare_embedded_softhsm(h));
  GS_ASSIGN(auto module, hsm::Module::open(h.module));
  GS_ASSIGN(const hsm::SlotId slot, module->find_slot(h.token_label));
  GS_ASSIGN(hsm::Secret user_pin, read_user_pin(h));
  auto check_existing = [&]() -> Result<bool> {
    GS_ASSIGN(auto s, hsm::Session::open(*module, slot, true));
    GS_TRY(s.login(hsm::UserType::user, user_pin));
    auto found = hsm::find_object(s, hsm::ObjectClass::secret_key, label);
    if (!found.ok()) {
      (void)s.logout();
      if (found.error().code == Errc::not_found) return false;
      return std::move(found).error();
    }
    auto attrs = hsm::object_attributes(s, *found);
    (void)s.logout();
    if (!attrs.ok()) return std::move(attrs).error();
    GS_TRY(kek::check_kek_attributes(*attrs));
    return true;
  };
  GS_ASSIGN(const bool exists, check_existing());
  created = false;
  if (exists) return {};
  if (h.so_pin_file.empty()) {
    return {Errc::invalid_argument, "hsm.so_pin_file is required to create " + label +
                                        " (only the security officer may mark a key trusted)"};
  }
  GS_ASSIGN(hsm::Secret so, hsm::read_pin_file(h.so_pin_file));
  auto k = hsm::create_trusted_kek(*module, slot, label, so, user_pin);
  if (!k.ok()) return Error(k.error().code, "creating " + label + ": " + k.error().message());
  created = true;
  GS_ASSIGN(const bool now_there, check_existing());
  if (!now_there) return {Errc::hsm_failure, label + " vanished after its creation"};
  return {};
}

struct RotateOutcome {
  std::uint32_t from = 0, to = 0;
  bool started = false, created = false;
  std::size_t rewrapped = 0, batches = 0;
  std::vector<std::uint32_t> retired;
};

int run_rotate(const std::string& config_path, bool json, std::size_t batch, double rate) {
  if (batch == 0 || batch > kek::kMaxBatch) {
    return fail("--batch must be 1.." + std::to_string(kek::kMaxBatch));
  }
  if (rate < 0) return fail("--rate must not be negative");
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  RotationLock lock;
  if (auto st = take_rotation_lock(cfg->store.path, lock); !st.ok()) return fail(st.error().message());
  db::OpenOptions opt;
  opt.create = false;
  auto store = store::KeyStore::open(cfg->store.path, opt);
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  db::Db& db = store->db();
  const std::string actor = current_actor();
  RotateOutcome out;

  // 1. A rotation to resume (a generation being created, or older ones still draining), else a
  // new one: its generation recorded as `creating` together with the start record.
  auto gens = kek::generations(db);
  if (!gens.ok()) return fail(gens.error().message());
  std::optional<std::uint32_t> creating;
  bool draining = false;
  for (const auto& g : *gens) {
    if (g.state == kek::GenState::creating) creating = g.gen;
    if (g.state == kek::GenState::draining) draining = true;
    if (g.state == kek::GenState::current) out.from = g.gen;
  }
  if (!creating && !draining) {
    std::uint32_t gen = 0;
    Status st = audited(*cfg, db, [&](db::Db& d, std::vector<audit::Event>& events) -> Status {
      GS_ASSIGN(const std::uint32_t cur, kek::current_generation(d));
      GS_ASSIGN(gen, kek::record_new_generation(d, actor));
      GS_ASSIGN(const std::int64_t slots, kek::slots_to_rewrap(d));
      audit::Detail det;
      det.add("from", kek::label_for(cur)).add("generation", unsigned{gen}).add("slots", slots);
      events.push_back({0, actor, "kek_rotation_started", kek::label_for(gen), det.str()});
      return Status{};
    });
    if (!st.ok()) return fail("starting the KEK rotation: " + st.error().message());
    creating = gen;
    out.started = true;
  }

  // 2. The new KEK in the HSM, then (one transaction) it becomes current: from here on every new
  // key is wrapped under it and the older generation drains.
  if (creating) {
    Status st = ensure_kek_object(*cfg, *creating, out.created);
    if (!st.ok()) return fail(st.error().message());
    auto tx = db::Transaction::begin(db);
    if (!tx.ok()) return fail(tx.error().message());
    st = kek::activate(db, *creating);
    if (st.ok()) st = tx->commit();
    if (!st.ok()) return fail("switching to " + kek::label_for(*creating) + ": " +
                              st.error().message());
  }
  auto cur = kek::current_generation(db);
  if (!cur.ok()) return fail(cur.error().message());
  out.to = *cur;
  if (out.from == out.to) out.from = 0;  // resumed after the switch: older ones are draining

  // 3. Re-wrap, then retire the drained generations with the end record. A writer that read the
  // old generation just before the switch can add a slot under it after the last batch: the
  // retirement then finds it and the re-wrap runs again.
  for (int round = 0;; ++round) {
    {
      auto ctx = open_hsm(cfg->hsm);
      if (!ctx.ok()) return fail(ctx.error().message());
      auto lease = ctx->pool->acquire();
      if (!lease.ok()) return fail(lease.error().message());
      kek::KekHandles keks;
      kek::RewrapOptions ro;
      ro.batch = batch;
      ro.rate = rate;
      if (!json) {
        ro.on_batch = [&](const kek::RewrapProgress& p) {
          std::fprintf(stderr, "\rre-wrapped %zu slots under %s, %lld to go   ", out.rewrapped + p.rewrapped,
                       kek::label_for(p.to).c_str(), static_cast<long long>(p.remaining));
        };
      }
      auto r = kek::rewrap_all(lease->session(), db, keks, ro);
      if (!json && r.ok() && r->batches > 0) std::fprintf(stderr, "\n");
      if (!r.ok()) {
        return fail("re-wrapping under " + kek::label_for(out.to) + " (" +
                    std::to_string(out.rewrapped) + " slots done; re-run to resume): " +
                    r.error().message());
      }
      out.rewrapped += r->rewrapped;
      out.batches += r->batches;
    }
    Status st = audited(*cfg, db, [&](db::Db& d, std::vector<audit::Event>& events) -> Status {
      GS_ASSIGN(out.retired, kek::retire_drained(d));
      if (out.retired.empty()) return Status{};  // nothing was draining: no rotation to end
      audit::Detail det;
      std::string labels;
      for (auto g : out.retired) labels += (labels.empty() ? "" : ",") + kek::label_for(g);
      det.add("retired", labels).add("rewrapped", std::uint64_t{out.rewrapped});
      events.push_back({0, actor, "kek_rotation_finished", kek::label_for(out.to), det.str()});
      return Status{};
    });
    if (st.ok()) break;
    if (st.error().code != Errc::busy || round >= 3) {
      return fail("finishing the KEK rotation: " + st.error().message());
    }
  }

  if (json) {
    JsonWriter w;
    w.begin_object().key("from").value(out.from == 0 ? "" : kek::label_for(out.from));
    w.key("to").value(kek::label_for(out.to)).key("generation").value(std::int64_t{out.to});
    w.key("started").value(out.started).key("created").value(out.created);
    w.key("rewrapped").value(static_cast<std::int64_t>(out.rewrapped));
    w.key("batches").value(static_cast<std::int64_t>(out.batches));
    w.key("retired").begin_array();
    for (auto g : out.retired) w.value(kek::label_for(g));
    w.end_array().end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("%s %s (KEK generation %u)\n", out.created ? "created" : "using  ",
              kek::label_for(out.to).c_str(), out.to);
  std::printf("re-wrapped %zu key slots in %zu batches\n", out.rewrapped, out.batches);
  for (auto g : out.retired) {
    std::printf("retired %s: no key slot is wrapped under it; it stays in the HSM until "
                "`gridseal hsm destroy-kek %u`\n",
                kek::label_for(g).c_str(), g);
  }
  return kExitOk;
}

// Removes a retired generation: recorded `destroyed` first (after which no slot can be written
// under it), then the token object is destroyed. A re-run after a crash in between finishes it.
int run_destroy_kek(const std::string& config_path, std::uint32_t gen) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  RotationLock lock;
  if (auto st = take_rotation_lock(cfg->store.path, lock); !st.ok()) return fail(st.error().message());
  db::OpenOptions opt;
  opt.create = false;
  auto store = store::KeyStore::open(cfg->store.path, opt);
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  const std::string actor = current_actor();
  const std::string label = kek::label_for(gen);
  bool already = false;
  Status st = audited(*cfg, store->db(), [&](db::Db& d, std::vector<audit::Event>& events) -> Status {
    GS_ASSIGN(already, kek::mark_destroyed(d, gen));
    if (already) return Status{};
    audit::Detail det;
    det.add("generation", unsigned{gen});
    events.push_back({0, actor, "kek_destroyed", label, det.str()});
    return Status{};
  });
  if (!st.ok()) return fail(label + ": " + st.error().message());
  auto ctx = open_hsm(cfg->hsm);
  if (!ctx.ok()) return fail(ctx.error().message());
  auto lease = ctx->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());
  auto found = hsm::find_objects(lease->session(), hsm::ObjectClass::secret_key, label);
  if (!found.ok()) return fail(found.error().message());
  for (auto h : *found) {
    auto d = hsm::destroy_object(lease->session(), h);
    if (!d.ok()) return fail("destroying " + label + ": " + d.error().message());
  }
  if (found->empty() && already) {
    std::printf("nothing to do: %s was destroyed already\n", label.c_str());
  } else {
    std::printf("destroyed %s (KEK generation %u)\n", label.c_str(), gen);
  }
  return kExitOk;
}

}  // namespace

void register_hsm(CLI::App& app, int& exit_code) {
  auto* hsm_cmd = app.add_subcommand("hsm", "create and inspect gridseal's HSM objects");
  hsm_cmd->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");

  auto* init = hsm_cmd->add_subcommand(
      "init", "create the token (embedded SoftHSM2) and the objects of DESIGN §4; idempotent");
  init->add_option("--config", *config, "configuration file")->capture_default_str();
  auto officer = std::make_shared<std::string>();
  auto officer_pub = std::make_shared<std::string>();
  init->add_option("--officer", *officer,
                   "enrol the first security officer (closes bootstrap mode; see README)");
  init->add_option("--officer-pubkey", *officer_pub,
                   "the officer's P-256 public key (PEM or hex point); the private key stays "
                   "with the officer");
  init->callback([config, officer, officer_pub, &exit_code] {
    exit_code = run_init(*config, *officer, *officer_pub);
  });

  auto* status = hsm_cmd->add_subcommand("status", "token and objects with security attributes");
  auto json = std::make_shared<bool>(false);
  status->add_option("--config", *config, "configuration file")->capture_default_str();
  status->add_flag("--json", *json, "machine-readable output");
  status->callback([config, json, &exit_code] { exit_code = run_status(*config, *json); });

  auto* rot = hsm_cmd->add_subcommand(
      "rotate-kek",
      "new KEK generation (gs-kek-<n>) and every key slot re-wrapped under it in the HSM; "
      "resumes an interrupted rotation");
  auto rot_batch = std::make_shared<std::size_t>(256);
  auto rot_rate = std::make_shared<double>(0);
  rot->add_option("--config", *config, "configuration file")->capture_default_str();
  rot->add_option("--batch", *rot_batch, "key slots per transaction (1..10000)")
      ->capture_default_str();
  rot->add_option("--rate", *rot_rate, "key slots per second at most (0: unpaced)")
      ->capture_default_str();
  rot->add_flag("--json", *json, "machine-readable output");
  rot->callback([config, json, rot_batch, rot_rate, &exit_code] {
    exit_code = run_rotate(*config, *json, *rot_batch, *rot_rate);
  });

  auto* dk = hsm_cmd->add_subcommand(
      "destroy-kek", "destroy a retired KEK generation (no key slot wrapped under it)");
  auto dk_gen = std::make_shared<std::uint32_t>(0);
  dk->add_option("GENERATION", *dk_gen, "the generation, as `hsm status` lists it")
      ->required()
      ->check(CLI::Range(1u, kek::kMaxGeneration));
  dk->add_option("--config", *config, "configuration file")->capture_default_str();
  dk->callback([config, dk_gen, &exit_code] { exit_code = run_destroy_kek(*config, *dk_gen); });

  auto* exp = hsm_cmd->add_subcommand("export-pubkey", "print a public key (hex point or PEM)");
  auto label = std::make_shared<std::string>();
  auto pem = std::make_shared<bool>(false);
  exp->add_option("LABEL", *label, "object label, e.g. gs-cmd-1")->required();
  exp->add_option("--config", *config, "configuration file")->capture_default_str();
  auto* pem_flag = exp->add_flag("--pem", *pem, "SubjectPublicKeyInfo PEM");
  auto hex = std::make_shared<bool>(false);
  exp->add_flag("--hex", *hex, "65-byte uncompressed point in hex (default)")->excludes(pem_flag);
  exp->callback([config, label, pem, hex, &exit_code] {
    exit_code = run_export(*config, *label, *pem);
  });

  auto* imp = hsm_cmd->add_subcommand(
      "import-transport-key",
      "load a manufacturer's AES transport key, wrapped to gs-provision, for wrapped fleet files");
  auto tlabel = std::make_shared<std::string>();
  auto eph = std::make_shared<std::string>();
  auto wrapped = std::make_shared<std::string>();
  imp->add_option("--label", *tlabel, "label to store the key under")->required();
  imp->add_option("--ephemeral-pubkey", *eph, "manufacturer's ephemeral P-256 point (hex)")
      ->required();
  imp->add_option("--wrapped", *wrapped, "AES-KWP of the transport key (hex)")->required();
  imp->add_option("--config", *config, "configuration file")->capture_default_str();
  imp->callback([config, tlabel, eph, wrapped, &exit_code] {
    exit_code = run_import_transport(*config, *tlabel, *eph, *wrapped);
  });
}

}  // namespace gs::cli
