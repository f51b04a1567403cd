// libFuzzer target: the stream framer fed in chunks whose sizes come from the input itself.
#include <cstddef>
#include <cstdint>

#include "c1222/framer.h"
#include "c1222/message.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gs::c1222;
  if (size == 0) return 0;
  // First byte: chunk size (1..256) and cap selector; the rest is the TCP byte stream.
  const std::size_t chunk = static_cast<std::size_t>(data[0]) + 1;
  const std::size_t cap = (data[0] & 1) ? 300 : kDefaultMaxMessage;
  gs::ByteView stream(data + 1, size - 1);
  Framer f(cap);
  std::size_t out_bytes = 0;
  for (std::size_t i = 0; i < stream.size(); i += chunk) {
    std::size_t n = stream.size() - i < chunk ? stream.size() - i : chunk;
    f.feed(stream.subspan(i, n));
    for (;;) {
      auto r = f.next();
      if (!r.ok()) return 0;  // the stream is dead; a server closes the connection
      if (!r->has_value()) break;
      const gs::Bytes& pdu = **r;
      if (pdu.size() > cap || pdu.empty() || pdu[0] != kTagMessage) __builtin_trap();
      out_bytes += pdu.size();
      (void)decode(pdu);
    }
  }
  if (out_bytes + f.buffered() != stream.size()) __builtin_trap();
  return 0;
}
