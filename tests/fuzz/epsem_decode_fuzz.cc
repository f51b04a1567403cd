// libFuzzer target: EPSEM envelope and services (split_epsem, split_services and, when the
// services codec is built, decode_services).
#include <cstddef>
#include <cstdint>

#include "c1222/message.h"
#if GS_HAVE_SERVICES
#include "c1222/services.h"
#endif

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gs::c1222;
  gs::ByteView epsem(data, size);
  auto e = split_epsem(epsem, 10);
  if (!e.ok()) return 0;
  // Also treat the body as cleartext even in modes 1/2: the services decoder must cope.
  auto spans = split_services(e->body, 11);
  if (!spans.ok()) return 0;
  std::size_t total = 0;
  for (const auto& s : *spans) {
    if (s.bytes.empty()) __builtin_trap();
    total += s.bytes.size();
  }
  if (total > e->body.size()) __builtin_trap();
  // Rebuilding the body with minimal service lengths never makes it longer.
  gs::Bytes rebuilt;
  for (const auto& s : *spans) append_service(rebuilt, s.bytes);
  if (rebuilt.size() > e->body.size()) __builtin_trap();
#if GS_HAVE_SERVICES
  (void)decode_services(*spans);
  ServiceOptions strict;
  strict.strict = true;
  (void)decode_services(*spans, {}, strict);
  for (const auto& s : *spans) {
    (void)decode_request(s.bytes, s.offset);
    (void)decode_response(s.bytes, {}, s.offset);
    if (size > 0) (void)decode_response(s.bytes, data[0], s.offset);
  }
#endif
  return 0;
}
