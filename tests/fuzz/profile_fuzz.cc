// libFuzzer target: the command-signature profile's parsers (c1222/profile.h). Meters answer the
// DKUS with MT-2042 receipts and MT-2043 challenge answers, commands carry MT-2040/2041/2044 and
// C12.19 partial writes and read responses, and extract_authorization() takes any decoded
// message apart. The first input byte picks the parser; the rest is its input.
// Every profile codec is strict, so each accepted input is the only encoding of what it decoded
// to: re-encoding must give back exactly the input bytes.
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>

#include "c1222/message.h"
#include "c1222/profile.h"
#include "c1222/services.h"

namespace {

using gs::ByteView;

bool same(ByteView a, ByteView b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

template <typename Array>
bool same(const Array& a, ByteView b) {
  return same(ByteView(a.data(), a.size()), b);
}

void must(bool ok) {
  if (!ok) __builtin_trap();
}

// Every parser of a single service (code + data), as split_services() hands them out.
void one_service(ByteView s) {
  using namespace gs::c1222;
  if (auto a = decode_authorization_service(s); a.ok()) {
    must(same(encode_authorization_service(*a), s));
    const auto wire = encode_authorization_service_wire(*a);
    must(wire.size() == kAuthorizationWireSize && same(ByteView(wire).subspan(1), s));
  }
  if (auto k = decode_key_update_service(s); k.ok()) must(same(encode_key_update_service(*k), s));
  if (auto r = decode_receipt_response(s); r.ok()) must(same(encode_receipt_response(*r), s));
  if (auto c = decode_challenge_write(s); c.ok()) must(same(encode_challenge_write(*c), s));
  if (auto a = decode_challenge_answer_response(s); a.ok()) {
    must(same(encode_challenge_answer_response(*a), s));
  }
  if (auto r = decode_replacement_write(s); r.ok()) must(same(encode_replacement_write(*r), s));
}

// A whole message: the envelope, its services, and the MT-2040 command if it is one.
void message(ByteView wire) {
  using namespace gs::c1222;
  auto m = decode(wire);
  if (!m.ok()) return;
  if (auto cmd = extract_authorization(*m); cmd.ok()) {
    const gs::Bytes& in = cmd->signing_input;
    must(in.size() > 4 && std::memcmp(in.data(), "GSA1", 4) == 0);
    // The MT-2040 it found is the 85 bytes at service_offset of the wire, decoded on their own.
    must(cmd->service_offset + kAuthorizationServiceSize <= wire.size());
    auto own = decode_authorization_service(wire.subspan(cmd->service_offset,
                                                         kAuthorizationServiceSize));
    must(own.ok() && *own == cmd->authorization);
    must(cmd->following.size() <= m->epsem.size());
  }
  auto e = split_epsem(m->epsem, 0);
  if (!e.ok()) return;
  auto spans = split_services(e->body, 0);
  if (!spans.ok()) return;
  for (const auto& sp : *spans) one_service(sp.bytes);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gs::c1222;
  if (size < 1) return 0;
  const ByteView in(data + 1, size - 1);
  switch (data[0] % 10) {
    case 0:
      one_service(in);
      break;
    case 1:
      message(in);
      break;
    case 2:
      if (auto a = decode_authorization_data(in); a.ok()) {
        must(same(encode_authorization_data(*a), in));
        must(same(authorization_signed_prefix(*a), in.first(kAuthorizationSignedPrefixSize)));
      }
      if (auto k = decode_key_update_data(in); k.ok()) must(same(encode_key_update_data(*k), in));
      break;
    case 3:
      if (auto r = decode_receipt_data(in); r.ok()) must(same(encode_receipt_data(*r), in));
      if (auto a = decode_challenge_answer_data(in); a.ok()) {
        must(same(encode_challenge_answer_data(*a), in));
      }
      if (auto r = decode_replacement_data(in); r.ok()) {
        must(same(encode_replacement_data(*r), in));
        const auto signed_bytes = replacement_signed_bytes(*r);
        must(signed_bytes.size() == 4 + kReplacementSignedDataSize);
      }
      break;
    case 4:
    case 5: {
      // A partial write or a read response, with the table and count the caller expects taken
      // from the input's first bytes.
      if (in.size() < 3) return 0;
      const auto table = static_cast<std::uint16_t>(in[0] << 8 | in[1]);
      const std::size_t count = in[2];
      const ByteView s = in.subspan(3);
      if (data[0] % 10 == 4) {
        if (auto d = decode_partial_write(s, table, count); d.ok()) {
          must(d->size() == count);
          auto again = encode_partial_write(table, *d);
          must(again.ok() && same(*again, s));
        }
      } else if (auto d = decode_read_response(s, count); d.ok()) {
        must(d->size() == count);
        auto again = encode_read_response(*d);
        must(again.ok() && same(*again, s));
      }
      break;
    }
    case 6:
      // Any BER form is taken (leading zero octets too): the value is the content's digits.
      if (auto v = invocation_id_value(in); v.ok()) {
        must(!in.empty() && (in[0] & 0x80) == 0);
        std::size_t i = 0;
        while (i < in.size() && in[i] == 0) ++i;
        must(in.size() - i <= 8);
        std::uint64_t want = 0;
        for (; i < in.size(); ++i) want = want << 8 | in[i];
        must(*v == want);
      }
      break;
    default: {
      // The signed-bytes builders over whatever title bytes came in.
      if (in.size() < 1) return 0;
      const std::size_t n = std::min<std::size_t>(in[0], in.size() - 1);
      const ByteView title = in.subspan(1, n);
      SignedReceipt r;
      ChallengeAnswer a;
      if (auto b = receipt_signed_bytes(title, r); b.ok()) must(b->size() > title.size());
      if (auto b = challenge_signed_bytes(title, a); b.ok()) must(b->size() > title.size());
      if (auto b = key_context_input(title, 0, 1); b.ok()) must(b->size() > title.size());
      break;
    }
  }
  return 0;
}
