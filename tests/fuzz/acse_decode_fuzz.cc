// libFuzzer target: ACSE decode, then encode/canonify of whatever decodes (must round trip).
#include <cstddef>
#include <cstdint>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/security.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gs::c1222;
  gs::ByteView wire(data, size);
  auto m = decode(wire);
  if (!m.ok()) return 0;
  // Everything decode() accepts re-encodes, and the re-encoding decodes to the same encoding.
  auto e = encode(*m);
  if (!e.ok()) __builtin_trap();
  auto m2 = decode(*e, {.max_message = size + 64});
  if (!m2.ok()) __builtin_trap();
  auto e2 = encode(*m2);
  if (!e2.ok() || *e2 != *e) __builtin_trap();
  (void)canonify(*m, default_base_oid());
  if (m->called_ap_title) (void)m->called_ap_title->dotted();
  if (m->calling_ap_title) (void)m->calling_ap_title->dotted();
  return 0;
}
