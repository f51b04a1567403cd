// gridseal-bench: raw HSM rates (see raw_hsm.h).
#include "tools/bench/raw_hsm.h"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "c1222/eax_prime.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"
#include "c1222/services.h"
#include "hsm/hsm_aes.h"
#include "hsm/ops.h"
#include "hsm/session.h"
#include "src/config.h"
#include "src/host_ecdsa.h"
#include "src/hsm_context.h"
#include "src/kek_rotation.h"
#include "src/sqlite.h"

namespace gs::bench {

namespace {

using Clock = std::chrono::steady_clock;

struct Count {
  std::uint64_t n = 0;
  double per_s = 0;
};

// The canonified cleartext and the EPSEM (control byte first) of a typical meter message: from
// meter .7.123456 to the head-end .1.9, a 4-byte invocation id, key id 0, one read response
// service, `epsem_bytes` long in all.
Result<std::pair<Bytes, Bytes>> sample_meter_message(std::size_t epsem_bytes) {
  if (epsem_bytes < 16) return Error(Errc::invalid_argument, "EPSEM of at least 16 bytes");
  GS_ASSIGN(auto called, c1222::OwnedApTitle::parse(".1.9"));
  GS_ASSIGN(auto calling, c1222::OwnedApTitle::parse(".7.123456"));
  c1222::Message m;
  m.called_ap_title = called.view();
  m.calling_ap_title = calling.view();
  const Bytes a8{0x12, 0x34, 0x56, 0x78};
  m.calling_ap_invocation_id = ByteView(a8);
  c1222::AuthValue av;
  av.key_id = 0;
  av.iv = std::array<std::uint8_t, 4>{0x68, 0x00, 0x00, 0x00};
  m.auth = av;
  Bytes epsem(epsem_bytes, 0x5A);
  epsem[0] = 0x80;
  m.epsem = epsem;
  GS_ASSIGN(const Bytes wire, c1222::encode(m));
  GS_ASSIGN(const c1222::Message decoded, c1222::decode(wire));  // canonify needs the wire form
  GS_ASSIGN(Bytes cleartext, c1222::canonify(decoded, c1222::default_base_oid()));
  return std::make_pair(std::move(cleartext), std::move(epsem));
}

// One thread: its own session, the command key, one unwrapped meter key; composites (or opens)
// from `start` (or when its set-up is done, if later) until the deadline.
Result<Count> composite_loop(HsmContext& hsm, const RawHsmOptions& o, const std::string& kek_label,
                             bool session_copy, Clock::time_point start,
                             Clock::time_point deadline) {
  GS_ASSIGN(auto lease, hsm.pool->acquire());
  hsm::Session& s = lease.session();
  // The command key as the SES signs with it: a session copy when the config asks for one and
  // the token makes it (hsm::signing_handle), else the token key. The ceiling is the fastest
  // path the daemons take, never a slower one.
  hsm::SigningHandle cmd;
  if (o.op == RawOp::ses_composite) {
    const std::string label = "gs-cmd-" + std::to_string(o.command_key);
    GS_ASSIGN(const hsm::ObjectHandle token_key,
              hsm::find_object(s, hsm::ObjectClass::private_key, label));
    cmd = hsm::signing_handle(s, token_key, session_copy);
  }
  GS_ASSIGN(const hsm::ObjectHandle kek, hsm::find_object(s, hsm::ObjectClass::secret_key, kek_label));
  // A meter key as the SES holds it: stored wrapped under the current KEK, unwrapped as a
  // session object.
  Bytes plain(16);
  GS_TRY(hsm::generate_random(s, plain));
  GS_ASSIGN(const Bytes wrapped, hsm::import_and_wrap_meter_key(s, kek, plain));
  GS_ASSIGN(const hsm::ObjectHandle meter_key, hsm::unwrap_meter_key(s, kek, wrapped));
  GS_ASSIGN(auto aes, hsm::HsmAes::make(s, meter_key));
  std::vector<hsm::ObjectHandle> resident;
  for (std::size_t i = 0; i < o.resident_keys; ++i) {
    GS_ASSIGN(const hsm::ObjectHandle h, hsm::unwrap_meter_key(s, kek, wrapped));
    resident.push_back(h);
  }

  // The meter key's AES operations kept open when the config binds them (hsm.bound_aes), as
  // the daemons' key caches do: then EAX' is C_EncryptUpdate calls only (a token that
  // refuses them gets the path the daemons fall back to).
  hsm::KeyAux aux;
  std::unique_ptr<hsm::BoundAes> bound;
  if (hsm.bound_aes) {
    bound = hsm.bound_aes->bind(meter_key);
    aux.bound = bound.get();
  }

  std::uint64_t n = 0;
  auto cleanup = [&] {
    bound.reset();
    (void)hsm::destroy_object(s, meter_key);
    for (const hsm::ObjectHandle h : resident) (void)hsm::destroy_object(s, h);
    if (cmd.session_copy) (void)hsm::destroy_object(s, cmd.handle);
  };

  if (o.op == RawOp::eax_open) {
    // The message sealed once under the meter key; then opened over and over, each time on a
    // fresh copy of the ciphertext, with the EAX' subkeys kept with the key as the DKUS keeps
    // them (hsm::KeyAux): no token call but the three CBC-MAC/CTR operations.
    GS_ASSIGN(auto sample, sample_meter_message(o.epsem_bytes));
    const Bytes& cleartext = sample.first;
    Bytes ciphertext(sample.second.begin() + 1, sample.second.end());
    c1222::Mac mac{};
    {
      GS_ASSIGN(auto eax, eax_for_key(*aes, meter_key, &aux));
      GS_ASSIGN(mac, eax.encrypt(cleartext, ciphertext));
    }
    Bytes data(ciphertext.size());
    std::this_thread::sleep_until(start);
    const auto begun = Clock::now();
    while (Clock::now() < deadline) {
      std::copy(ciphertext.begin(), ciphertext.end(), data.begin());
      auto eax = eax_for_key(*aes, meter_key, &aux);
      if (!eax.ok()) {
        cleanup();
        return eax.error();
      }
      if (auto st = eax->decrypt(cleartext, data, mac); !st.ok()) {
        cleanup();
        return Error(st.error().code, "EAX' open: " + st.error().message());
      }
      ++n;
    }
    const double secs = std::chrono::duration<double>(Clock::now() - begun).count();
    cleanup();
    if (n > 0 && data != Bytes(sample.second.begin() + 1, sample.second.end())) {
      return Error(Errc::crypto_failure, "EAX' open: decrypted bytes differ from the sealed ones");
    }
    return Count{n, secs > 0 ? static_cast<double>(n) / secs : 0};
  }

  const Bytes epsem(o.epsem_bytes, 0x33);
  const Bytes cleartext(60, 0x60);  // a typical canonified cleartext header
  Bytes signing_input(o.epsem_bytes + 100, 0x5A);
  Bytes data;
  // The EAX' subkeys kept with the key, as the SES keeps them with each cached meter key
  // (hsm::KeyAux): derived on the first seal, then each seal is the CBC-MAC/CTR operations only.
  // (Deriving them per seal, as this loop did before, is one more C_EncryptInit + C_Encrypt per
  // composite than the SES does: a ceiling that low flattered the SES's ratio.)
  std::this_thread::sleep_until(start);
  const auto begun = Clock::now();
  while (Clock::now() < deadline) {
    signing_input[0] = static_cast<std::uint8_t>(n);
    auto digest = sha256(signing_input);
    if (!digest.ok()) return digest.error();
    auto sig = hsm::sign_digest(s, cmd.handle, *digest);
    if (!sig.ok()) return Error(sig.error().code, "C_Sign: " + sig.error().message());
    auto eax = eax_for_key(*aes, meter_key, &aux);
    if (!eax.ok()) return eax.error();
    data = epsem;
    auto mac = eax->encrypt(cleartext, data);
    if (!mac.ok()) return Error(mac.error().code, "EAX': " + mac.error().message());
    ++n;
  }
  cleanup();
  const double secs = std::chrono::duration<double>(Clock::now() - begun).count();
  return Count{n, secs > 0 ? static_cast<double>(n) / secs : 0};
}

// The KEK new meter keys are wrapped under: the store's current generation (gs-kek until the
// first `gridseal hsm rotate-kek`, which may be followed by `hsm destroy-kek 1`). A config
// without a store database (a bare token) falls back to gs-kek.
Result<std::string> current_kek_label(const config::Config& cfg) {
  if (!std::filesystem::exists(cfg.store.path)) return std::string(kLabelKek);
  db::OpenOptions opt;
  opt.read_only = true;
  GS_ASSIGN(db::Db db, db::Db::open(cfg.store.path, opt));
  GS_ASSIGN(const std::uint32_t gen, kek::current_generation(db));
  return kek::label_for(gen);
}

// Every thread of one process; the total.
Result<Count> one_process(const RawHsmOptions& o, Clock::time_point start,
                          Clock::time_point deadline) {
  GS_ASSIGN(auto cfg, config::load(o.config));
  if (cfg.hsm.sessions < o.threads) cfg.hsm.sessions = static_cast<std::uint32_t>(o.threads);
  // SoftHSM2 can fail a token scan (C_GetTokenInfo: CKR_GENERAL_ERROR) while another process
  // writes the token directory, e.g. a sibling starting at the same instant: retry a few times.
  auto opened = open_hsm(cfg.hsm);
  for (int attempt = 1; !opened.ok() && attempt < 5; ++attempt) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100 * attempt));
    opened = open_hsm(cfg.hsm);
  }
  if (!opened.ok()) return opened.error();
  HsmContext hsm = std::move(opened).value();
  GS_ASSIGN(const std::string kek_label, current_kek_label(cfg));
  const bool copy = cfg.hsm.command_key_session_copy;
  std::vector<std::thread> ts;
  std::vector<Result<Count>> results(o.threads, Count{});
  for (std::size_t t = 0; t < o.threads; ++t) {
    ts.emplace_back(
        [&, t] { results[t] = composite_loop(hsm, o, kek_label, copy, start, deadline); });
  }
  for (auto& t : ts) t.join();
  Count total;
  for (auto& r : results) {
    if (!r.ok()) return r.error();
    total.n += r->n;
    total.per_s += r->per_s;
  }
  return total;
}

}  // namespace

Result<RawHsmResult> measure_raw_hsm(const RawHsmOptions& o) {
  if (o.threads == 0 || o.processes == 0 || o.seconds <= 0) {
    return Error(Errc::invalid_argument, "raw HSM: threads, processes and seconds must be > 0");
  }
  RawHsmResult r;
  // Every thread opens its module, session and keys first; all count from `start` together.
  const auto start =
      Clock::now() + std::chrono::milliseconds(1000 + static_cast<long>(o.resident_keys / 4));
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(o.seconds));
  if (o.processes == 1) {
    GS_ASSIGN(const Count c, one_process(o, start, deadline));
    r.composites = c.n;
    r.per_s = c.per_s;
    return r;
  }
  std::vector<std::pair<pid_t, int>> kids;
  for (std::size_t p = 0; p < o.processes; ++p) {
    int fds[2];
    if (pipe(fds) != 0) return Error(Errc::invalid_argument, "pipe failed");
    const pid_t pid = fork();
    if (pid < 0) return Error(Errc::invalid_argument, "fork failed");
    if (pid == 0) {
      close(fds[0]);
      auto n = one_process(o, start, deadline);
      char line[256];
      const int len = n.ok() ? std::snprintf(line, sizeof line, "ok %llu %.3f\n",
                                             static_cast<unsigned long long>(n->n), n->per_s)
                             : std::snprintf(line, sizeof line, "error %s\n",
                                             n.error().message().c_str());
      if (write(fds[1], line, static_cast<std::size_t>(len)) < 0) _exit(2);
      _exit(n.ok() ? 0 : 1);
    }
    close(fds[1]);
    kids.emplace_back(pid, fds[0]);
  }
  Status failed;
  for (auto& [pid, fd] : kids) {
    std::string out;
    char buf[256];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(n));
    close(fd);
    int st = 0;
    waitpid(pid, &st, 0);
    unsigned long long count = 0;
    double rate = 0;
    if (std::sscanf(out.c_str(), "ok %llu %lf", &count, &rate) == 2) {
      r.composites += count;
      r.per_s += rate;
    } else if (failed.ok()) {
      failed = Error(Errc::hsm_failure, "raw HSM worker: " + (out.empty() ? "no result" : out));
    }
  }
  if (!failed.ok()) return failed.error();
  return r;
}

}  // namespace gs::bench
