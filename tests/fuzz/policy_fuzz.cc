// libFuzzer target: what the SES does with a collection engine's command before anything is
// signed (decode, then classify against the policy: src/policy.h), and the policy parser that a
// SIGHUP reload runs. The first input byte picks which; the rest is its input.
// Policy: conf/policy.toml, the documented example (GS_POLICY_FILE).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "c1222/message.h"
#include "src/policy.h"

namespace {

void must(bool ok) {
  if (!ok) __builtin_trap();
}

const gs::policy::Policy& policy() {
  static const gs::policy::Policy p = gs::policy::load_policy(GS_POLICY_FILE).value();
  return p;
}

bool same(const gs::Result<gs::policy::Classification>& a,
          const gs::Result<gs::policy::Classification>& b) {
  if (a.ok() != b.ok()) return false;
  if (!a.ok()) return a.error().code == b.error().code;
  return a->command_class == b->command_class &&
         a->ends_with_receipt_read == b->ends_with_receipt_read && a->services == b->services;
}

void command(gs::ByteView wire) {
  using namespace gs::c1222;
  auto m = decode(wire);
  if (!m.ok()) return;
  const auto& p = policy();
  auto c = gs::policy::classify_message(*m, p);
  must(same(c, gs::policy::classify_message(*m, p)));  // no hidden state
  gs::policy::ClassifyOptions dkus;
  dkus.allow_key_update = true;
  auto k = gs::policy::classify_message(*m, p, dkus);
  if (!c.ok()) return;
  // Allowing MT-2041 writes only widens: what was accepted keeps its class.
  must(same(c, k));
  must(c->services >= 1 && static_cast<std::uint8_t>(c->command_class) <= kMaxCommandClass);
  if (c->ends_with_receipt_read) {
    auto e = split_epsem(m->epsem);
    must(e.ok());
    auto spans = split_services(e->body);
    must(spans.ok() && !spans->empty());
    const gs::ByteView last = spans->back().bytes;
    must(last.size() == 3 && last[0] == 0x30 && last[1] == 0x0F && last[2] == 0xFA);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  const gs::ByteView in(data + 1, size - 1);
  if (data[0] % 2 == 0) {
    command(in);
  } else {
    const std::string_view text(reinterpret_cast<const char*>(in.data()), in.size());
    (void)gs::policy::parse_policy(text, "fuzz.toml");
  }
  return 0;
}
