// Fleet file import.
#include "src/meter_import.h"

#include "hsm/ops.h"
#include "src/hsm_context.h"
#include "src/kek_rotation.h"

namespace gs {

namespace {

struct HsmKeys {
  std::uint32_t kek_generation = 1;  // the current one when the import started
  hsm::ObjectHandle kek = hsm::kNoObject;
  hsm::ObjectHandle provision = hsm::kNoObject;
  hsm::ObjectHandle transport = hsm::kNoObject;
};

// The wrapped (under the current KEK generation) form of the row's key, made inside the HSM.
Result<Bytes> prepare_key(hsm::Session& s, const HsmKeys& k, FleetRow& r) {
  switch (r.source) {
    case KeySource::plain: {
      auto w = hsm::import_and_wrap_meter_key(s, k.kek, r.key_material);
      secure_zero(r.key_material.data(), r.key_material.size());
      return w;
    }
    case KeySource::wrapped: {
      if (k.transport == hsm::kNoObject) {
        return Error(Errc::not_found,
                     "line " + std::to_string(r.line) +
                         ": wrapped keys need the manufacturer transport key: --transport-key "
                         "LABEL (loaded with `gridseal hsm import-transport-key`)");
      }
      // Unwrapped as a meter-key session object (the transport key's unwrap template forces
      // that policy too), wrapped under the KEK, destroyed.
      auto h = hsm::unwrap_meter_key(s, k.transport, r.key_material);
      if (!h.ok()) {
        return Error(Errc::crypto_failure, "key does not unwrap under the transport key (" +
                                         h.error().detail + ")");
      }
      auto w = hsm::wrap_key(s, k.kek, *h);
      (void)hsm::destroy_object(s, *h);
      return w;
    }
    case KeySource::ecdh: {
      if (k.provision == hsm::kNoObject) {
        return Error(Errc::not_found, "gs-provision key missing: run `gridseal hsm init`");
      }
      GS_ASSIGN(Block ctx, hsm::key_update_context(s, r.ap_title, 0, 1));
      GS_ASSIGN(hsm::ObjectHandle h, hsm::derive_meter_key(s, k.provision, r.public_key, ctx));
      auto w = hsm::wrap_key(s, k.kek, h);
      (void)hsm::destroy_object(s, h);
      return w;
    }
  }
  return Error(Errc::invalid_argument, "unknown key source");
}

}  // namespace

Result<ImportProgress> import_fleet(std::istream& in, hsm::Session& session,
                                    store::KeyStore& store, const ImportOptions& opt) {
  HsmKeys keys;
  // A rotation switching generations during the import re-wraps what this run wrote under the
  // older one (src/kek_rotation.h).
  GS_ASSIGN(keys.kek_generation, kek::current_generation(store.db()));
  {
    kek::KekHandles handles;
    GS_ASSIGN(keys.kek, handles.get(session, keys.kek_generation));
  }
  auto prov = hsm::find_object(session, hsm::ObjectClass::private_key, kLabelProvision);
  if (prov.ok()) keys.provision = *prov;
  if (!opt.transport_key.empty()) {
    auto t = hsm::find_object(session, hsm::ObjectClass::secret_key, opt.transport_key);
    if (!t.ok()) return Error(t.error().code, "transport key: " + t.error().detail);
    keys.transport = *t;
  }
  // Session copies (still sensitive, non-extractable, trusted) spare SoftHSM2 a re-read of its
  // token files on every use; a token that refuses the copy is used as it is.
  std::vector<hsm::ObjectHandle> copies;
  for (hsm::ObjectHandle* h : {&keys.kek, &keys.provision}) {
    if (*h == hsm::kNoObject) continue;
    auto c = hsm::copy_to_session(session, *h);
    if (c.ok()) {
      *h = *c;
      copies.push_back(*c);
    }
  }
  struct Cleanup {
    hsm::Session& s;
    std::vector<hsm::ObjectHandle>& v;
    ~Cleanup() {
      for (auto h : v) (void)hsm::destroy_object(s, h);
    }
  } cleanup{session, copies};

  ImportProgress prog;
  std::string line;
  std::size_t line_no = 0;
  if (!std::getline(in, line)) return Error(Errc::invalid_argument, "empty fleet file");
  ++line_no;
  GS_TRY(check_fleet_header(line));
  const std::size_t batch_size = opt.batch == 0 ? 1000 : opt.batch;
  std::vector<store::NewMeter> batch;
  std::vector<std::size_t> batch_lines;
  bool batch_bad = false;
  auto report = [&](std::size_t l, const std::string& why) {
    if (opt.on_error) opt.on_error(l, why);
  };
  auto flush = [&]() -> Status {
    if (batch.empty() && !batch_bad) return {};
    if (batch_bad) {
      prog.failed += batch.size();
      if (!batch.empty()) {
        report(0, std::to_string(batch.size()) + " valid rows of lines " +
                      std::to_string(batch_lines.front()) + "-" +
                      std::to_string(batch_lines.back()) +
                      " not written because their batch has invalid rows");
      }
    } else {
      auto r = store.import_meters(batch);
      if (!r.ok()) {
        if (r.error().code != Errc::conflict && r.error().code != Errc::invalid_argument) {
          return std::move(r).error();
        }
        report(0, r.error().detail + " (lines " + std::to_string(batch_lines.front()) + "-" +
                      std::to_string(batch_lines.back()) + " not written)");
        prog.failed += batch.size();
      } else {
        prog.inserted += r->inserted;
        prog.unchanged += r->unchanged;
      }
    }
    batch.clear();
    batch_lines.clear();
    batch_bad = false;
    if (opt.on_progress) opt.on_progress(prog);
    return {};
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (skipped_fleet_line(line)) continue;
    ++prog.rows;
    auto row = parse_fleet_row(line, line_no, opt.base_oid);
    if (!row.ok()) {
      report(line_no, row.error().detail);
      ++prog.failed;
      batch_bad = true;
    } else {
      auto wrapped = prepare_key(session, keys, *row);
      if (!wrapped.ok()) {
        if (session.lost() || wrapped.error().code == Errc::not_found) {
          return std::move(wrapped).error();
        }
        report(line_no, wrapped.error().detail);
        ++prog.failed;
        batch_bad = true;
      } else {
        store::NewMeter m;
        m.meter_id = row->meter_id;
        m.ap_title = row->ap_title;
        m.ap_title_text = row->ap_title_text;
        m.public_key = row->public_key;
        m.slot = row->slot;
        m.wrapped_key = std::move(*wrapped);
        m.kek = keys.kek_generation;
        m.key_version = 1;
        m.origin = row->source == KeySource::plain ? "plain" : row->source == KeySource::ecdh ? "ecdh" : "wrapped";
        batch.push_back(std::move(m));
        batch_lines.push_back(line_no);
      }
    }
    if (batch.size() + (batch_bad ? 1 : 0) >= batch_size) GS_TRY(flush());
  }
  GS_TRY(flush());
  return prog;
}

}  // namespace gs
