// Decodes, verifies and renders one C12.22 message as indented text or JSON.
#include "tools/gridseal/describe.h"

#include <ctime>
#include <string_view>
#include <utility>

#include "c1222/ber.h"
#include "c1222/oid.h"
#include "gridseal/overloaded.h"

namespace gs::cli {

namespace {

using gs::Overloaded;

std::string hex_byte(std::uint8_t b) {
  static const char* digits = "0123456789abcdef";
  std::string s = "0x";
  s += digits[b >> 4];
  s += digits[b & 0x0F];
  return s;
}

std::size_t offset_in(ByteView whole, ByteView part) {
  if (part.empty() || whole.empty()) return 0;
  return static_cast<std::size_t>(part.data() - whole.data());
}

// One walk over an Analysis feeds either the text or the JSON renderer.
class Emitter {
 public:
  virtual ~Emitter() = default;
  virtual void open(std::string_view key) = 0;  // an object-valued field
  virtual void close() = 0;
  virtual void open_list(std::string_view key) = 0;
  virtual void close_list() = 0;
  virtual void item(std::string_view label) = 0;  // an object inside a list; ended by close()
  virtual void str(std::string_view key, std::string_view v) = 0;  // key "" inside a list
  virtual void num(std::string_view key, std::int64_t v) = 0;
  virtual void flag(std::string_view key, bool v) = 0;
  // Text that may have leading/trailing spaces: quoted in the human form.
  virtual void quoted(std::string_view key, std::string_view v) { str(key, v); }
  // False for the human form, which already shows offset/code/kind/name in an item's label.
  virtual bool machine() const { return true; }
};

class TextEmitter final : public Emitter {
 public:
  explicit TextEmitter(std::string& out) : out_(out) {}
  void open(std::string_view key) override {
    line(std::string(key) + ":");
    ++depth_;
  }
  void close() override { --depth_; }
  void open_list(std::string_view key) override { open(key); }
  void close_list() override { close(); }
  void item(std::string_view label) override {
    line(std::string(label));
    ++depth_;
  }
  void str(std::string_view key, std::string_view v) override {
    line(key.empty() ? "- " + std::string(v) : std::string(key) + ": " + std::string(v));
  }
  void num(std::string_view key, std::int64_t v) override { str(key, std::to_string(v)); }
  void flag(std::string_view key, bool v) override { str(key, v ? "yes" : "no"); }
  void quoted(std::string_view key, std::string_view v) override {
    str(key, "\"" + std::string(v) + "\"");
  }
  bool machine() const override { return false; }

 private:
  void line(const std::string& s) {
    out_.append(static_cast<std::size_t>(2 * depth_), ' ');
    out_ += s;
    out_ += '\n';
  }
  std::string& out_;
  int depth_ = 0;
};

class JsonEmitter final : public Emitter {
 public:
  explicit JsonEmitter(JsonWriter& w) : w_(w) {}
  void open(std::string_view key) override { w_.key(key).begin_object(); }
  void close() override { w_.end_object(); }
  void open_list(std::string_view key) override { w_.key(key).begin_array(); }
  void close_list() override { w_.end_array(); }
  void item(std::string_view) override { w_.begin_object(); }
  void str(std::string_view key, std::string_view v) override {
    if (!key.empty()) w_.key(key);
    w_.value(v);
  }
  void num(std::string_view key, std::int64_t v) override {
    if (!key.empty()) w_.key(key);
    w_.value(v);
  }
  void flag(std::string_view key, bool v) override {
    if (!key.empty()) w_.key(key);
    w_.value(v);
  }

 private:
  JsonWriter& w_;
};

void emit_title(Emitter& e, std::string_view key, const c1222::ApTitle& t, ByteView base) {
  e.open(key);
  e.str("form", t.form == c1222::TitleForm::relative ? "relative" : "absolute");
  e.str("oid", t.dotted());
  if (t.form == c1222::TitleForm::relative) {
    e.str("absolute", c1222::oid_to_dotted(t.absolute(base), false));
  }
  e.close();
}

void emit_integer(Emitter& e, std::string_view key, ByteView content) {
  auto v = c1222::integer_value(content);
  if (v.ok()) {
    e.num(key, *v);
  } else {
    e.str(key, "0x" + to_hex(content) + " (not a 64-bit integer)");
  }
}

void emit_data(Emitter& e, ByteView data, std::uint8_t checksum, bool checksum_ok) {
  e.num("count", static_cast<std::int64_t>(data.size()));
  e.str("data", to_hex(data));
  e.str("checksum", hex_byte(checksum));
  e.flag("checksum_ok", checksum_ok);
}

void emit_table(Emitter& e, c1222::TableId t) {
  e.str("table", t.name());
  e.num("table_id", t.raw);
}

void emit_indices(Emitter& e, const c1222::IndexList& l) {
  e.open_list("indices");
  for (std::uint16_t i : l.view()) e.num("", i);
  e.close_list();
}

const char* selector_name(std::uint8_t s) {
  switch (s) {
    case 0: return "post result on completion";
    case 1: return "post result on exception";
    case 2: return "never post result";
    case 3: return "post result now and on completion";
    default: return "reserved";
  }
}

void emit_request(Emitter& e, const c1222::Request& q, ByteView base) {
  using namespace c1222;
  std::visit(
      Overloaded{
          [](const IdentifyRequest&) {}, [](const TerminateRequest&) {},
          [](const DisconnectRequest&) {}, [](const DefaultReadRequest&) {},
          [](const LogoffRequest&) {},
          [&](const DeregisterRequest& r) { emit_title(e, "ap_title", r.title, base); },
          [&](const ResolveRequest& r) { emit_title(e, "ap_title", r.title, base); },
          [&](const TraceRequest& r) { emit_title(e, "ap_title", r.title, base); },
          [&](const RegisterRequest& r) {
            e.str("node_type", hex_byte(r.node_type));
            e.str("connection_type", hex_byte(r.connection_type));
            e.str("device_class", to_hex(r.device_class));
            emit_title(e, "ap_title", r.ap_title, base);
            emit_title(e, "esn", r.esn, base);
            e.str("native_address", to_hex(r.native_address));
            e.num("registration_period", r.registration_period);
            if (r.domain_pattern) e.str("domain_pattern", to_hex(*r.domain_pattern));
          },
          [&](const FullReadRequest& r) { emit_table(e, r.table); },
          [&](const PartialReadIndexRequest& r) {
            emit_table(e, r.table);
            emit_indices(e, r.index);
            e.num("element_count", r.element_count);
          },
          [&](const PartialReadOffsetRequest& r) {
            emit_table(e, r.table);
            e.num("offset", r.offset);
            e.num("octet_count", r.count);
          },
          [&](const FullWriteRequest& r) {
            emit_table(e, r.table);
            emit_data(e, r.data, r.checksum, r.checksum_ok);
          },
          [&](const PartialWriteIndexRequest& r) {
            emit_table(e, r.table);
            emit_indices(e, r.index);
            emit_data(e, r.data, r.checksum, r.checksum_ok);
          },
          [&](const PartialWriteOffsetRequest& r) {
            emit_table(e, r.table);
            e.num("offset", r.offset);
            emit_data(e, r.data, r.checksum, r.checksum_ok);
          },
          [&](const ProcedureRequest& r) {
            e.str("table", "ST-7");
            e.num("procedure", r.number());
            e.flag("manufacturer", r.manufacturer());
            e.num("response_selector", r.response_selector());
            e.str("selector", selector_name(r.response_selector()));
            e.num("sequence", r.sequence);
            e.str("params", to_hex(r.params));
            e.str("checksum", hex_byte(r.checksum));
            e.flag("checksum_ok", r.checksum_ok);
          },
          [&](const LogonRequest& r) {
            e.num("user_id", r.user_id);
            e.quoted("user", printable(r.user));
            e.num("idle_timeout", r.idle_timeout);
          },
          [&](const SecurityRequest& r) {
            e.quoted("password", printable(r.password));
            if (r.user_id) e.num("user_id", *r.user_id);
          },
          [&](const AuthenticateRequest& r) { e.str("data", to_hex(r.data)); },
          [&](const WaitRequest& r) { e.num("seconds", r.seconds); },
          [&](const RawService& r) { e.str("data", to_hex(r.data)); },
      },
      q);
}

void emit_response(Emitter& e, const c1222::Response& p, ByteView base) {
  using namespace c1222;
  std::visit(
      Overloaded{
          [&](const OkResponse& r) {
            if (!r.data.empty()) e.str("data", to_hex(r.data));
          },
          [&](const ReadResponse& r) { emit_data(e, r.data, r.checksum, r.checksum_ok); },
          [&](const LogonResponse& r) { e.num("idle_timeout", r.idle_timeout); },
          [&](const IdentifyResponse& r) {
            e.num("standard", r.standard);
            e.num("version", r.version);
            e.num("revision", r.revision);
            if (!r.security_mechanisms.empty()) {
              e.open_list("security_mechanisms");
              for (const ApTitle& t : r.security_mechanisms) e.str("", t.dotted());
              e.close_list();
            }
            if (r.session_ctrl) {
              e.open("session_ctrl");
              e.flag("sessionless", (*r.session_ctrl & 0x80) != 0);
              e.num("sessions", *r.session_ctrl & 0x7F);
              e.close();
            }
            if (r.device_class) e.str("device_class", r.device_class->dotted());
            if (r.identity) {
              e.num("identity_format", r.identity_format.value_or(0));
              e.str("identity", to_hex(*r.identity));
            }
          },
          [&](const ResolveResponse& r) { e.str("native_address", to_hex(r.native_address)); },
          [&](const TraceResponse& r) {
            e.open_list("ap_titles");
            for (const ApTitle& t : r.titles) e.str("", t.dotted());
            e.close_list();
          },
          [&](const RegisterResponse& r) {
            emit_title(e, "ap_title", r.ap_title, base);
            e.num("reg_delay", r.reg_delay);
            e.num("reg_period", r.reg_period);
            e.str("reg_info", hex_byte(r.reg_info));
          },
          [&](const ErrorResponse& r) {
            if (r.max_size) e.num("max_size", *r.max_size);
            if (!r.data.empty()) e.str("data", to_hex(r.data));
          },
          [&](const RawService& r) { e.str("data", to_hex(r.data)); },
      },
      p);
}

const char* response_control_name(std::uint8_t control) {
  switch (control & c1222::kEpsemResponseMask) {
    case 0: return "always";
    case 1: return "on exception";
    case 2: return "never";
    default: return "reserved";
  }
}

const char* security_name(std::uint8_t mode) {
  switch (mode) {
    case 0: return "cleartext";
    case 1: return "cleartext with authentication";
    case 2: return "ciphertext with authentication";
    default: return "reserved";
  }
}

void emit_all(Emitter& e, const Analysis& a, ByteView base) {
  e.num("length", static_cast<std::int64_t>(a.wire.size()));
  if (a.message) {
    const c1222::Message& m = *a.message;
    e.open("elements");
    if (m.aso_context) e.str("aso_context", c1222::oid_to_dotted(*m.aso_context, false));
    if (m.called_ap_title) emit_title(e, "called_ap_title", *m.called_ap_title, base);
    if (m.called_ap_invocation_id) {
      emit_integer(e, "called_ap_invocation_id", *m.called_ap_invocation_id);
    }
    if (m.calling_ap_title) emit_title(e, "calling_ap_title", *m.calling_ap_title, base);
    if (m.calling_ae_qualifier) {
      e.open("calling_ae_qualifier");
      emit_integer(e, "value", *m.calling_ae_qualifier);
      auto v = c1222::integer_value(*m.calling_ae_qualifier);
      std::int64_t bits = v.ok() ? *v : 0;
      e.flag("test", (bits & 1) != 0);
      e.flag("urgent", (bits & 2) != 0);
      e.flag("notification", (bits & 4) != 0);
      e.close();
    }
    if (m.calling_ap_invocation_id) {
      emit_integer(e, "calling_ap_invocation_id", *m.calling_ap_invocation_id);
    }
    if (m.mechanism_name) e.str("mechanism_name", c1222::oid_to_dotted(*m.mechanism_name, false));
    if (m.auth) {
      e.open("auth");
      if (m.auth->key_id) e.num("key_id", *m.auth->key_id);
      if (m.auth->iv) {
        const auto& iv = *m.auth->iv;
        e.str("iv", to_hex(iv));
        std::uint32_t t = (std::uint32_t{iv[0]} << 24) | (std::uint32_t{iv[1]} << 16) |
                          (std::uint32_t{iv[2]} << 8) | iv[3];
        e.str("iv_time", utc_time(t));
      }
      e.close();
    }
    e.close();
  }
  if (a.epsem) {
    const c1222::Epsem& ep = *a.epsem;
    std::uint8_t c = ep.control;
    auto mode = static_cast<std::uint8_t>((c & c1222::kEpsemSecurityMask) >> 2);
    e.open("epsem");
    e.str("control", hex_byte(c));
    e.flag("reserved_bit", (c & c1222::kEpsemReserved) != 0);
    e.flag("recovery_session", (c & c1222::kEpsemRecoverySession) != 0);
    e.flag("proxy_service_used", (c & c1222::kEpsemProxyServiceUsed) != 0);
    e.flag("ed_class_included", (c & c1222::kEpsemEdClassIncluded) != 0);
    e.num("security_mode", mode);
    e.str("security", security_name(mode));
    e.str("response_control", response_control_name(c));
    const c1222::Epsem* readable = a.clear_epsem ? &*a.clear_epsem : nullptr;
    if (readable && readable->ed_class) {
      e.open("ed_class");
      e.str("hex", to_hex(*readable->ed_class));
      e.quoted("text", printable(*readable->ed_class));
      e.close();
    }
    if (ep.mac) e.str("mac", to_hex(*ep.mac));
    e.close();
    e.str("mac_verdict", mac_verdict_name(a.mac));
  }
  if (a.services_hidden) {
    e.str("services_hidden", "ciphertext not decrypted");
  } else if (a.epsem) {
    e.open_list("services");
    std::size_t i = 0;
    for (const c1222::DecodedService& s : a.services) {
      std::uint8_t code = s.bytes.empty() ? 0 : s.bytes[0];
      const char* name = s.is_response() ? c1222::response_code_name(code)
                                         : c1222::request_code_name(code);
      std::string label = "[" + std::to_string(i++) + "] " + name + " (" + hex_byte(code) +
                          (s.is_response() ? ", response" : ", request") + ") at byte " +
                          std::to_string(s.offset) +
                          (a.services_from_opened ? " of the opened message" : "");
      if (const auto* q = std::get_if<c1222::Request>(&s.value)) {
        if (std::holds_alternative<c1222::ProcedureRequest>(*q)) label += " = procedure";
      }
      e.item(label);
      const auto* q = std::get_if<c1222::Request>(&s.value);
      if (e.machine()) {
        e.num("offset", static_cast<std::int64_t>(s.offset));
        e.str("code", hex_byte(code));
        e.str("kind", s.is_response() ? "response" : "request");
        bool proc = q != nullptr && std::holds_alternative<c1222::ProcedureRequest>(*q);
        e.str("name", proc ? "procedure" : name);
      }
      if (q != nullptr) {
        emit_request(e, *q, base);
      } else {
        emit_response(e, std::get<c1222::Response>(s.value), base);
      }
      e.close();
    }
    e.close_list();
  }
  if (a.error) e.str("error", a.error->message());
  e.flag("ok", a.ok());
}

}  // namespace

const char* mac_verdict_name(MacVerdict v) noexcept {
  switch (v) {
    case MacVerdict::none: return "none";
    case MacVerdict::good: return "good";
    case MacVerdict::bad: return "bad";
    case MacVerdict::no_key: return "no key";
  }
  return "none";
}

std::string utc_time(std::uint32_t seconds) {
  std::time_t t = static_cast<std::time_t>(seconds);
  std::tm tm{};
  if (gmtime_r(&t, &tm) == nullptr) return "?";
  char buf[32];
  std::size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return std::string(buf, n);
}

std::string printable(ByteView b) {
  std::string s;
  for (std::uint8_t c : b) {
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      s += static_cast<char>(c);
    } else if (c == '\\') {
      s += "\\\\";
    } else {
      s += "\\x";
      s += hex_byte(c).substr(2);
    }
  }
  return s;
}

Analysis analyze(Bytes wire, const AnalyzeOptions& opt) {
  Analysis a;
  a.wire = std::move(wire);
  ByteView w = a.wire;
  auto decoded = c1222::decode(w);
  if (!decoded.ok()) {
    a.error = decoded.error();
    return a;
  }
  a.message = std::move(decoded).value();
  const c1222::Message& m = *a.message;
  auto ep = c1222::split_epsem(m.epsem, m.epsem_offset);
  if (!ep.ok()) {
    a.error = ep.error();
    return a;
  }
  a.epsem = *ep;
  auto mode = c1222::security_mode(a.epsem->control);
  ByteView body_whole = w;  // the buffer the readable EPSEM lives in
  if (mode == c1222::SecurityMode::cleartext) {
    a.clear_epsem = a.epsem;
  } else if (mode == c1222::SecurityMode::authenticated ||
             mode == c1222::SecurityMode::encrypted) {
    std::uint8_t key_id = (m.auth && m.auth->key_id) ? *m.auth->key_id : 0;
    if (!opt.keys || opt.keys(key_id) == nullptr) {
      a.mac = MacVerdict::no_key;
    } else {
      c1222::SealOptions so;
      so.base_oid = opt.base_oid;
      auto opened = c1222::open(m, opt.keys, so);
      if (opened.ok() && mode == c1222::SecurityMode::authenticated) {
        a.mac = MacVerdict::good;  // services stay where they are in the received message
      } else if (opened.ok()) {
        a.mac = MacVerdict::good;
        a.opened = std::move(opened->wire);
        auto om = c1222::decode(a.opened);
        if (!om.ok()) {
          a.error = om.error();
          return a;
        }
        auto oep = c1222::split_epsem(om->epsem, om->epsem_offset);
        if (!oep.ok()) {
          a.error = oep.error();
          return a;
        }
        a.clear_epsem = *oep;
        a.services_from_opened = true;
        body_whole = a.opened;
      } else if (opened.error().code == Errc::bad_mac) {
        a.mac = MacVerdict::bad;
      } else {
        a.error = opened.error();
        return a;
      }
    }
    if (!a.clear_epsem && mode == c1222::SecurityMode::authenticated) {
      a.clear_epsem = a.epsem;  // services readable, but not verified
    }
  } else {
    a.error = Error(Errc::unsupported, "reserved security mode 3", m.epsem_offset);
    return a;
  }
  if (!a.clear_epsem) {
    a.services_hidden = true;
    return a;
  }
  ByteView body = a.clear_epsem->body;
  auto spans = c1222::split_services(body, offset_in(body_whole, body));
  if (!spans.ok()) {
    a.error = spans.error();
    return a;
  }
  auto services = c1222::decode_services(*spans, {}, opt.services);
  if (!services.ok()) {
    a.error = services.error();
    return a;
  }
  a.services = std::move(services).value();
  return a;
}

std::string describe_text(const Analysis& a, ByteView base_oid) {
  std::string out;
  TextEmitter e(out);
  emit_all(e, a, base_oid.empty() ? c1222::default_base_oid() : base_oid);
  return out;
}

void describe_json(const Analysis& a, ByteView base_oid, JsonWriter& out) {
  JsonEmitter e(out);
  out.begin_object();
  emit_all(e, a, base_oid.empty() ? c1222::default_base_oid() : base_oid);
  out.end_object();
}

void describe_json_fields(const Analysis& a, ByteView base_oid, JsonWriter& out) {
  JsonEmitter e(out);
  emit_all(e, a, base_oid.empty() ? c1222::default_base_oid() : base_oid);
}

}  // namespace gs::cli
