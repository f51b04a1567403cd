// Tests for the EPSEM service codec (c1222/services.h): round trips and many malformed inputs.
#include "c1222/services.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "c1222/ber.h"

namespace gs::c1222 {
namespace {

Bytes hex(std::string_view s) {
  auto b = from_hex(s);
  EXPECT_TRUE(b.has_value()) << s;
  return b.value_or(Bytes{});
}

Bytes enc(const Request& r, const ServiceOptions& opt = {}) {
  Bytes out;
  Status st = encode_request(r, out, opt);
  EXPECT_TRUE(st.ok()) << st.error().message();
  return out;
}

Bytes enc(const Response& r) {
  Bytes out;
  Status st = encode_response(r, out);
  EXPECT_TRUE(st.ok()) << st.error().message();
  return out;
}

const Bytes kRel = hex("7b04");        // .123.4
const Bytes kAbs = hex("607c86f7540116001702");  // 2.16.124.113620.1.22.0.23.2
const Bytes kUser = hex("48454144454e44202020");  // "HEADEND   "

// Every kind of request, each encodable.
std::vector<Request> all_requests(const Bytes& data) {
  RegisterRequest reg;
  reg.node_type = 0x80 | 0x20;
  reg.connection_type = 0x41;
  static const Bytes dc2 = hex("8102030405060708");
  reg.device_class = dc2;
  reg.ap_title = {TitleForm::relative, kRel};
  reg.esn = {TitleForm::absolute, kAbs};
  static const Bytes addr = hex("c0a80001");
  reg.native_address = addr;
  reg.registration_period = 0x015180;
  static const Bytes pat = hex("2a");
  reg.domain_pattern = pat;
  ProcedureRequest proc;
  proc.proc = ProcedureRequest::make(26, true, 3);
  proc.sequence = 9;
  proc.params = data;
  return {
      IdentifyRequest{},
      TerminateRequest{},
      DisconnectRequest{},
      DeregisterRequest{{TitleForm::relative, kRel}},
      ResolveRequest{{TitleForm::absolute, kAbs}},
      TraceRequest{{TitleForm::relative, kRel}},
      reg,
      FullReadRequest{TableId::standard(1)},
      PartialReadIndexRequest{TableId::mfg(12), IndexList::of({1, 2, 3}), 7},
      DefaultReadRequest{},
      PartialReadOffsetRequest{TableId{0x1000 | 23}, 0x123456, 0x40},
      FullWriteRequest{TableId::standard(46), data, 0, true},
      PartialWriteIndexRequest{TableId::standard(64), IndexList::of({5, 6, 7, 8, 9, 10, 11, 12, 13}),
                               data, 0, true},
      PartialWriteOffsetRequest{TableId::mfg(2040), 0xABCDEF, data, 0, true},
      proc,
      LogonRequest{2, kUser, 60},
      SecurityRequest{as_bytes("PASSWORD"), std::nullopt},
      SecurityRequest{as_bytes("PASSWORD"), std::uint16_t{2}},
      LogoffRequest{},
      AuthenticateRequest{data},
      WaitRequest{30},
      RawService{0x60, data},
  };
}

// --- names and helpers ------------------------------------------------------------------------

TEST(ServiceNames, ResponseCodes) {
  EXPECT_STREQ(response_code_name(0x00), "ok");
  EXPECT_STREQ(response_code_name(0x01), "err");
  EXPECT_STREQ(response_code_name(0x02), "sns");
  EXPECT_STREQ(response_code_name(0x03), "isc");
  EXPECT_STREQ(response_code_name(0x0A), "isss");
  EXPECT_STREQ(response_code_name(0x0B), "sme");
  EXPECT_STREQ(response_code_name(0x0C), "uat");
  EXPECT_STREQ(response_code_name(0x0F), "rqtl");
  EXPECT_STREQ(response_code_name(0x10), "rstl");
  EXPECT_STREQ(response_code_name(0x12), "sgerr");
  EXPECT_STREQ(response_code_name(0x13), "unknown");
  EXPECT_STREQ(response_code_name(0xFF), "unknown");
}

TEST(ServiceNames, RequestCodes) {
  EXPECT_STREQ(request_code_name(0x20), "identify");
  EXPECT_STREQ(request_code_name(0x27), "register");
  EXPECT_STREQ(request_code_name(0x30), "full-read");
  EXPECT_STREQ(request_code_name(0x31), "partial-read-index");
  EXPECT_STREQ(request_code_name(0x39), "partial-read-index");
  EXPECT_STREQ(request_code_name(0x3A), "unknown");
  EXPECT_STREQ(request_code_name(0x3F), "partial-read-offset");
  EXPECT_STREQ(request_code_name(0x49), "partial-write-index");
  EXPECT_STREQ(request_code_name(0x4A), "unknown");
  EXPECT_STREQ(request_code_name(0x4F), "partial-write-offset");
  EXPECT_STREQ(request_code_name(0x53), "authenticate");
  EXPECT_STREQ(request_code_name(0x70), "wait");
  EXPECT_STREQ(request_code_name(0x23), "unknown");
}

TEST(TableIdTest, Flags) {
  TableId t{0x0FF8};
  EXPECT_EQ(t.number(), 2040);
  EXPECT_TRUE(t.manufacturer());
  EXPECT_FALSE(t.pending());
  EXPECT_EQ(t.name(), "MT-2040");
  TableId p{0x1000 | 0x2000 | 7};
  EXPECT_EQ(p.number(), 7);
  EXPECT_TRUE(p.pending());
  EXPECT_TRUE(p.user_defined());
  EXPECT_FALSE(p.manufacturer());
  EXPECT_EQ(p.name(), "ST-7 pending user");
  EXPECT_EQ(TableId::mfg(2040).raw, 0x0FF8);
  EXPECT_EQ(TableId::standard(45).raw, 0x002D);
}

// --- positive decoding -----------------------------------------------------------------------

TEST(ServicesDecode, SecurityAndPartialReadFromCapture) {
  // Decrypted EPSEM of c1222_std_example8 frame 1 (PROTOCOL.md §2.7).
  Bytes sec = hex("5150415353574f52442020202020202020202020200002");  // user id 2
  auto r = decode_request(sec, 100);
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto& s = std::get<SecurityRequest>(*r);
  EXPECT_EQ(std::string(s.password.begin(), s.password.end()), "PASSWORD            ");
  ASSERT_TRUE(s.user_id.has_value());
  EXPECT_EQ(*s.user_id, 2);

  Bytes pr = hex("3f00010000100010");
  auto p = decode_request(pr);
  ASSERT_TRUE(p.ok());
  auto& q = std::get<PartialReadOffsetRequest>(*p);
  EXPECT_EQ(q.table.raw, 1);
  EXPECT_EQ(q.offset, 0x10u);
  EXPECT_EQ(q.count, 16);
  EXPECT_EQ(request_code(*p), 0x3F);
}

TEST(ServicesDecode, ReadResponseFromCapture) {
  // Frame 2: 00 0010 "MANUFACTURER SN " 92
  Bytes b = hex("0000104d414e55464143545552455220534e2092");
  for (std::optional<std::uint8_t> ctx : {std::optional<std::uint8_t>{0x3F},
                                          std::optional<std::uint8_t>{}}) {
    auto r = decode_response(b, ctx);
    ASSERT_TRUE(r.ok()) << r.error().message();
    auto& rd = std::get<ReadResponse>(*r);
    EXPECT_EQ(rd.data.size(), 16u);
    EXPECT_EQ(rd.checksum, 0x92);
    EXPECT_TRUE(rd.checksum_ok);
  }
}

TEST(ServicesDecode, ProcedureBothByteOrders) {
  // Full write to ST-7 from EAX' paper vector 1: proc 26 LE, seq 0, params 0200.
  Bytes b = hex("4000070005" "1a00000200" "e4");
  auto le = decode_request(b);
  ASSERT_TRUE(le.ok()) << le.error().message();
  auto& p = std::get<ProcedureRequest>(*le);
  EXPECT_EQ(p.number(), 26);
  EXPECT_FALSE(p.manufacturer());
  EXPECT_EQ(p.response_selector(), 0);
  EXPECT_EQ(p.sequence, 0);
  EXPECT_EQ(to_hex(p.params), "0200");
  EXPECT_TRUE(p.checksum_ok);
  EXPECT_EQ(request_code(*le), 0x40);

  ServiceOptions big;
  big.procedure_order = ByteOrder::big;
  auto be = decode_request(b, 0, big);
  ASSERT_TRUE(be.ok());
  EXPECT_EQ(std::get<ProcedureRequest>(*be).proc, 0x1a00);
  EXPECT_EQ(std::get<ProcedureRequest>(*be).number(), 0x200);
  EXPECT_TRUE(std::get<ProcedureRequest>(*be).manufacturer());
  EXPECT_EQ(std::get<ProcedureRequest>(*be).response_selector(), 1);

  ServiceOptions plain;
  plain.decode_procedures = false;
  auto fw = decode_request(b, 0, plain);
  ASSERT_TRUE(fw.ok());
  EXPECT_EQ(std::get<FullWriteRequest>(*fw).table.raw, 7);

  // Encode in both orders.
  ProcedureRequest q;
  q.proc = ProcedureRequest::make(26, false, 0);
  q.params = p.params;
  EXPECT_EQ(to_hex(enc(Request{q})), "40000700051a00000200e4");
  EXPECT_EQ(to_hex(enc(Request{q}, big)), "4000070005001a000200e4");
}

TEST(ServicesDecode, ShortFullWriteToSt7StaysAWrite) {
  auto r = decode_request(hex("40000700020102fd"));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE(std::holds_alternative<FullWriteRequest>(*r));
}

TEST(ServicesDecode, BadChecksumIsVisibleAndStrictRejects) {
  Bytes b = hex("4f002e000000000305000100");  // checksum should be fa
  auto lax = decode_request(b, 40);
  ASSERT_TRUE(lax.ok());
  auto& w = std::get<PartialWriteOffsetRequest>(*lax);
  EXPECT_FALSE(w.checksum_ok);
  EXPECT_EQ(w.checksum, 0x00);
  ServiceOptions strict;
  strict.strict = true;
  auto st = decode_request(b, 40, strict);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, Errc::bad_checksum);
  EXPECT_EQ(st.error().offset, 40u + b.size() - 1);
  b.back() = c1219_checksum(ByteView(b).subspan(8, 3));
  EXPECT_TRUE(decode_request(b, 40, strict).ok());
  // Read responses too.
  Bytes rd = hex("000002414200");
  auto rr = decode_response(rd, 0x30);
  ASSERT_TRUE(rr.ok());
  EXPECT_FALSE(std::get<ReadResponse>(*rr).checksum_ok);
  EXPECT_EQ(decode_response(rd, 0x30, 0, strict).error().code, Errc::bad_checksum);
}

TEST(ServicesDecode, UnknownCodesAreKeptRaw) {
  Bytes raw_req = hex("60aabbcc");
  auto r = decode_request(raw_req, 5);
  ASSERT_TRUE(r.ok());
  auto& raw = std::get<RawService>(*r);
  EXPECT_EQ(raw.code, 0x60);
  EXPECT_EQ(to_hex(raw.data), "aabbcc");
  Bytes raw_resp = hex("1fdead");
  auto e = decode_response(raw_resp);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(std::get<RawService>(*e).code, 0x1F);
  EXPECT_EQ(response_code(*e), 0x1F);
  // Re-encoded byte for byte.
  EXPECT_EQ(to_hex(enc(*r)), "60aabbcc");
  EXPECT_EQ(to_hex(enc(*e)), "1fdead");
}

TEST(ServicesDecode, ResponsesInContext) {
  Bytes b1 = hex("00003c"), b2 = hex("00"), b3 = hex("0f00007fff"), b4 = hex("03"),
        b5 = hex("0004c0a80001"), b6 = hex("0080027b04" "0602" "2a03"),
        b7 = hex("0080027b04" "001e" "015180" "41");
  auto logon = decode_response(b1, kSvcLogon);
  ASSERT_TRUE(logon.ok());
  EXPECT_EQ(std::get<LogonResponse>(*logon).idle_timeout, 60);

  auto ok = decode_response(b2, kSvcFullWrite);
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(std::get<OkResponse>(*ok).data.empty());

  auto rq = decode_response(b3);
  ASSERT_TRUE(rq.ok());
  EXPECT_EQ(std::get<ErrorResponse>(*rq).max_size, 0x7FFFu);
  EXPECT_EQ(response_code(*rq), kRespRqtl);

  auto isc = decode_response(b4, kSvcSecurity);
  ASSERT_TRUE(isc.ok());
  EXPECT_EQ(std::get<ErrorResponse>(*isc).code, kRespIsc);
  EXPECT_FALSE(std::get<ErrorResponse>(*isc).max_size.has_value());

  auto res = decode_response(b5, kSvcResolve);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(to_hex(std::get<ResolveResponse>(*res).native_address), "c0a80001");

  auto tr = decode_response(b6, kSvcTrace);
  ASSERT_TRUE(tr.ok()) << tr.error().message();
  ASSERT_EQ(std::get<TraceResponse>(*tr).titles.size(), 2u);
  EXPECT_EQ(std::get<TraceResponse>(*tr).titles[0].dotted(), ".123.4");
  EXPECT_EQ(std::get<TraceResponse>(*tr).titles[1].dotted(), "1.2.3");

  auto reg = decode_response(b7, kSvcRegister);
  ASSERT_TRUE(reg.ok()) << reg.error().message();
  EXPECT_EQ(std::get<RegisterResponse>(*reg).reg_delay, 30);
  EXPECT_EQ(std::get<RegisterResponse>(*reg).reg_period, 0x015180u);
  EXPECT_EQ(std::get<RegisterResponse>(*reg).reg_info, 0x41);
}

TEST(ServicesDecode, IdentifyResponseFeatures) {
  Bytes b = hex("00" "030100" "04" "0607607c86f7540116" "05" "82" "06" "80027b04" "07" "0401414243"
                "00");
  auto r = decode_response(b, kSvcIdentify);
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto& id = std::get<IdentifyResponse>(*r);
  EXPECT_EQ(id.standard, 3);
  EXPECT_EQ(id.version, 1);
  EXPECT_EQ(id.revision, 0);
  ASSERT_EQ(id.security_mechanisms.size(), 1u);
  EXPECT_EQ(id.security_mechanisms[0].dotted(), "2.16.124.113620.1.22");
  EXPECT_EQ(id.session_ctrl, 0x82);
  ASSERT_TRUE(id.device_class.has_value());
  EXPECT_EQ(id.device_class->dotted(), ".123.4");
  EXPECT_EQ(id.identity_format, 1);
  EXPECT_EQ(to_hex(*id.identity), "414243");
  EXPECT_EQ(to_hex(enc(*r)), to_hex(b));
  // Minimal: no features.
  EXPECT_TRUE(decode_response(hex("0003010000"), kSvcIdentify).ok());
}

TEST(ServicesDecode, DirectionOfEachService) {
  Bytes b1 = hex("00"), b2 = hex("52"), b3 = hex("00003c");
  std::vector<ServiceSpan> spans = {{b1, 10}, {b2, 12}, {b3, 14}};
  const std::uint8_t reqs[] = {kSvcSecurity, kSvcLogoff, kSvcLogon};
  auto d = decode_services(spans, reqs);
  ASSERT_TRUE(d.ok()) << d.error().message();
  ASSERT_EQ(d->size(), 3u);
  EXPECT_TRUE((*d)[0].is_response());
  EXPECT_FALSE((*d)[1].is_response());
  EXPECT_TRUE((*d)[2].is_response());
  EXPECT_EQ((*d)[2].offset, 14u);
  EXPECT_TRUE(std::holds_alternative<LogonResponse>(std::get<Response>((*d)[2].value)));
  EXPECT_TRUE(std::holds_alternative<LogoffRequest>(std::get<Request>((*d)[1].value)));
}

// --- round trips -----------------------------------------------------------------------------

TEST(ServicesRoundTrip, EveryRequestKind) {
  Bytes data = hex("0102030405");
  for (const Request& q : all_requests(data)) {
    Bytes b = enc(q);
    ASSERT_FALSE(b.empty());
    EXPECT_EQ(b[0], request_code(q));
    auto d = decode_request(b, 0);
    ASSERT_TRUE(d.ok()) << to_hex(b) << ": " << d.error().message();
    EXPECT_EQ(d->index(), q.index()) << to_hex(b);
    EXPECT_EQ(to_hex(enc(*d)), to_hex(b));
  }
}

TEST(ServicesRoundTrip, WritesCarryCountAndChecksum) {
  Bytes data = hex("05000102030405060708090a0b0c0d0e0f");
  Bytes b = enc(Request{PartialWriteOffsetRequest{TableId::standard(46), 0, data, 0, true}});
  // Same bytes as eaxprime.py's svc_pwrite_offset(46, 0, ...).
  EXPECT_EQ(to_hex(b), "4f002e0000000011" + to_hex(data) + "83");
  Bytes logon = enc(Request{LogonRequest{2, as_bytes("HEADEND"), 60}});
  EXPECT_EQ(to_hex(logon), "50000248454144454e44202020003c");
  Bytes sec = enc(Request{SecurityRequest{as_bytes("PASSWORD"), std::uint16_t{2}}});
  EXPECT_EQ(to_hex(sec), "5150415353574f52442020202020202020202020200002");
}

TEST(ServicesRoundTrip, Responses) {
  Bytes data = hex("4142");
  static const Bytes rel = kRel;
  std::vector<Response> all = {
      OkResponse{},
      ReadResponse{data, 0, true},
      ErrorResponse{kRespRstl, 1024u, {}},
      ErrorResponse{kRespSme, std::nullopt, {}},
      RawService{0x15, data},
  };
  for (const Response& p : all) {
    Bytes b = enc(p);
    auto d = decode_response(b);
    ASSERT_TRUE(d.ok()) << to_hex(b) << ": " << d.error().message();
    EXPECT_EQ(d->index(), p.index()) << to_hex(b);
    EXPECT_EQ(to_hex(enc(*d)), to_hex(b));
  }
  EXPECT_EQ(to_hex(enc(Response{ReadResponse{data, 0, true}})), "00000241427d");
  EXPECT_EQ(to_hex(enc(Response{LogonResponse{60}})), "00003c");
  EXPECT_EQ(to_hex(enc(Response{ResolveResponse{data}})), "00024142");
  EXPECT_EQ(to_hex(enc(Response{TraceResponse{{{TitleForm::relative, rel}}}})), "0080027b04");
  EXPECT_EQ(to_hex(enc(Response{RegisterResponse{{TitleForm::relative, rel}, 30, 60, 1}})),
            "0080027b04001e00003c01");
}

// --- negative: truncation and overlong ---------------------------------------------------------

// Services whose every proper prefix is malformed.
const char* const kFixed[] = {
    "300001", "3f00010000100010", "31000100020003", "3900010001000200030004000500060007000800090001",
    "40002e000141bf", "41002e00010001410f", "4f002e00000000014100" /* bad cksum, fine */,
    "500002" "48454144454e44202020" "003c", "5150415353574f5244202020202020202020202020",
    "5303414243", "7005", "2580027b04", "2406022a03", "26800100",
    "27a0410102030480027b04800101" "04c0a80001" "015180" "012a",
};

TEST(ServicesNegative, EveryTruncationIsAnErrorWithOffset) {
  for (const char* h : kFixed) {
    std::string s = h;
    Bytes b = hex(s);
    ASSERT_TRUE(decode_request(b, 1000).ok()) << s << ": " << decode_request(b, 1000).error().message();
    for (std::size_t n = 1; n < b.size(); ++n) {
      ByteView prefix(b.data(), n);
      auto r = decode_request(prefix, 1000);
      ASSERT_FALSE(r.ok()) << s << " cut to " << n;
      EXPECT_TRUE(r.error().code == Errc::truncated || r.error().code == Errc::bad_length)
          << s << " cut to " << n << ": " << r.error().message();
      EXPECT_GE(r.error().offset, 1000u);
      EXPECT_LE(r.error().offset, 1000u + n) << r.error().message();
      EXPECT_NE(r.error().message().find("byte"), std::string::npos);
    }
  }
}

TEST(ServicesNegative, EveryOverlongServiceIsTrailingData) {
  for (const char* h : kFixed) {
    std::string s = h;
    Bytes b = hex(s);
    if (b[0] == 0x51) continue;  // security: 2 more bytes would be a user id
    b.push_back(0xEE);
    auto r = decode_request(b, 7);
    ASSERT_FALSE(r.ok()) << s;
    EXPECT_EQ(r.error().code, Errc::trailing_data) << s << ": " << r.error().message();
    EXPECT_EQ(r.error().offset, 7u + b.size() - 1) << s;
  }
}

TEST(ServicesNegative, NoDataServicesWithExtraBytes) {
  for (const char* h : {"2000", "2100", "2200", "3e00", "5200"}) {
    auto r = decode_request(hex(h), 3);
    ASSERT_FALSE(r.ok()) << h;
    EXPECT_EQ(r.error().code, Errc::trailing_data);
    EXPECT_EQ(r.error().offset, 4u);
  }
}

TEST(ServicesNegative, EmptyService) {
  EXPECT_EQ(decode_request({}, 9).error().code, Errc::truncated);
  EXPECT_EQ(decode_request({}, 9).error().offset, 9u);
  EXPECT_EQ(decode_response({}, {}, 9).error().code, Errc::truncated);
}

TEST(ServicesNegative, WrongDirection) {
  EXPECT_EQ(decode_request(hex("00")).error().code, Errc::bad_value);
  EXPECT_EQ(decode_request(hex("0f00000100")).error().code, Errc::bad_value);
  EXPECT_EQ(decode_response(hex("20")).error().code, Errc::bad_value);
  EXPECT_EQ(decode_response(hex("300001")).error().code, Errc::bad_value);
}

TEST(ServicesNegative, SecurityOddLengths) {
  Bytes b = hex("5150415353574f52442020202020202020202020");  // 19-byte password
  EXPECT_EQ(decode_request(b).error().code, Errc::truncated);
  b = hex("5150415353574f5244202020202020202020202020" "00");  // half a user id
  auto r = decode_request(b, 10);
  EXPECT_EQ(r.error().code, Errc::truncated);
  EXPECT_EQ(r.error().offset, 31u);
  b = hex("5150415353574f5244202020202020202020202020" "000200");  // one too many
  EXPECT_EQ(decode_request(b).error().code, Errc::trailing_data);
}

TEST(ServicesNegative, WriteCountBeyondData) {
  auto r = decode_request(hex("40002e00054142c3"), 50);  // count 5, 2 bytes + cksum
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::truncated);
  EXPECT_EQ(r.error().offset, 55u);
  // Count says less than there is: trailing data after the checksum.
  EXPECT_EQ(decode_request(hex("40002e0001414242")).error().code, Errc::trailing_data);
  // Count 0xFFFF with nothing behind it.
  EXPECT_EQ(decode_request(hex("40002effff")).error().code, Errc::truncated);
}

TEST(ServicesNegative, AuthenticateLengthMismatch) {
  EXPECT_EQ(decode_request(hex("530541")).error().code, Errc::truncated);
  EXPECT_EQ(decode_request(hex("53014142")).error().code, Errc::trailing_data);
  EXPECT_TRUE(decode_request(hex("5300")).ok());
}

TEST(ServicesNegative, BadIdElements) {
  auto tag = decode_request(hex("25a1027b04"), 20);
  EXPECT_EQ(tag.error().code, Errc::bad_tag);
  EXPECT_EQ(tag.error().offset, 21u);
  EXPECT_EQ(decode_request(hex("2580028004")).error().code, Errc::bad_value);  // 0x80 arc start
  EXPECT_EQ(decode_request(hex("2580027b84")).error().code, Errc::bad_value);  // ends mid-arc
  EXPECT_EQ(decode_request(hex("258000")).error().code, Errc::bad_value);      // empty OID
  EXPECT_EQ(decode_request(hex("2580057b04")).error().code, Errc::truncated);  // length > data
  EXPECT_EQ(decode_request(hex("258080")).error().code, Errc::bad_length);     // indefinite
  Bytes huge = hex("25068141");
  huge.resize(4 + 0x41, 0x01);
  EXPECT_EQ(decode_request(huge).error().code, Errc::too_large);  // > 64-byte OID
}

TEST(ServicesNegative, RegisterDeviceClassTooLong) {
  Bytes b = hex("2700008080808080808080808080808080808080");
  auto r = decode_request(b, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::too_large);
  // Domain-pattern flag set but no pattern.
  EXPECT_EQ(decode_request(hex("278000" "01020304" "80027b04" "800101" "00" "000001")).error().code,
            Errc::truncated);
}

TEST(ServicesNegative, ResponseShapes) {
  EXPECT_EQ(decode_response(hex("0f0000"), {}).error().code, Errc::truncated);  // rqtl: 4 bytes
  EXPECT_EQ(decode_response(hex("10"), {}).error().code, Errc::truncated);      // rstl
  EXPECT_EQ(decode_response(hex("0000"), kSvcLogon).error().code, Errc::truncated);
  EXPECT_EQ(decode_response(hex("00003c00"), kSvcLogon).error().code, Errc::trailing_data);
  EXPECT_EQ(decode_response(hex("0001"), kSvcFullWrite).error().code, Errc::trailing_data);
  EXPECT_EQ(decode_response(hex("00000541"), kSvcFullRead).error().code, Errc::truncated);
  EXPECT_EQ(decode_response(hex("00000141bf00"), kSvcFullRead).error().code,
            Errc::trailing_data);
  EXPECT_EQ(decode_response(hex("0005c0a8"), kSvcResolve).error().code, Errc::truncated);
  EXPECT_EQ(decode_response(hex("0080027b04001e"), kSvcRegister).error().code, Errc::truncated);
  EXPECT_EQ(decode_response(hex("0080027b"), kSvcTrace).error().code, Errc::truncated);
  // Without context, data that is not a read response stays an opaque ok.
  auto ok = decode_response(hex("000005"), {});
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(std::holds_alternative<OkResponse>(*ok));
}

TEST(ServicesNegative, IdentifyResponseMalformed) {
  EXPECT_EQ(decode_response(hex("000301"), kSvcIdentify).error().code, Errc::truncated);
  EXPECT_EQ(decode_response(hex("00030100"), kSvcIdentify).error().code, Errc::truncated);  // no 00
  auto unk = decode_response(hex("0003010009aa00"), kSvcIdentify, 30);
  EXPECT_EQ(unk.error().code, Errc::bad_value);
  EXPECT_EQ(unk.error().offset, 34u);
  EXPECT_EQ(decode_response(hex("00030100070000"), kSvcIdentify).error().code, Errc::bad_length);
  EXPECT_EQ(decode_response(hex("000301000705014100"), kSvcIdentify).error().code,
            Errc::truncated);
  EXPECT_EQ(decode_response(hex("00030100050000ff"), kSvcIdentify).error().code,
            Errc::trailing_data);
  Bytes many = hex("00030100");
  for (int i = 0; i < 17; ++i) {
    many.push_back(0x05);
    many.push_back(0x01);
  }
  many.push_back(0x00);
  EXPECT_EQ(decode_response(many, kSvcIdentify).error().code, Errc::too_large);
}

TEST(ServicesNegative, TraceResponseTooManyTitles) {
  Bytes b = hex("00");
  for (int i = 0; i < 33; ++i) {
    b.push_back(0x80);
    b.push_back(0x01);
    b.push_back(0x05);
  }
  EXPECT_EQ(decode_response(b, kSvcTrace).error().code, Errc::too_large);
  b.resize(1 + 32 * 3);
  EXPECT_TRUE(decode_response(b, kSvcTrace).ok());
}

TEST(ServicesNegative, DecodeServicesReportsTheFailingOffset) {
  Bytes good = hex("20");
  Bytes bad = hex("3000");
  std::vector<ServiceSpan> spans = {{good, 40}, {bad, 42}};
  auto d = decode_services(spans);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code, Errc::truncated);
  EXPECT_EQ(d.error().offset, 43u);
}

TEST(ServicesNegative, EncodersRefuseWhatDoesNotFit) {
  Bytes out;
  Bytes big(0x10000, 0x41);
  Bytes data = hex("41");
  EXPECT_EQ(encode_request(PartialReadOffsetRequest{TableId{1}, 0x1000000, 1}, out).error().code,
            Errc::too_large);
  EXPECT_EQ(encode_request(PartialWriteOffsetRequest{TableId{1}, 0x1000000, data, 0, true}, out)
                .error()
                .code,
            Errc::too_large);
  EXPECT_EQ(encode_request(FullWriteRequest{TableId{1}, big, 0, true}, out).error().code,
            Errc::too_large);
  EXPECT_EQ(encode_request(PartialReadIndexRequest{TableId{1}, IndexList{}, 1}, out).error().code,
            Errc::invalid_argument);
  IndexList ten;
  ten.count = 10;
  EXPECT_EQ(encode_request(PartialWriteIndexRequest{TableId{1}, ten, data, 0, true}, out)
                .error()
                .code,
            Errc::invalid_argument);
  EXPECT_EQ(encode_request(LogonRequest{1, as_bytes("ELEVENCHARS"), 0}, out).error().code,
            Errc::too_large);
  EXPECT_EQ(encode_request(SecurityRequest{as_bytes("123456789012345678901"), {}}, out)
                .error()
                .code,
            Errc::too_large);
  EXPECT_EQ(encode_request(AuthenticateRequest{ByteView(big).first(256)}, out).error().code,
            Errc::too_large);
  EXPECT_EQ(encode_request(RawService{0x05, {}}, out).error().code, Errc::invalid_argument);
  EXPECT_EQ(encode_request(ResolveRequest{{TitleForm::relative, {}}}, out).error().code,
            Errc::bad_value);
  EXPECT_EQ(encode_response(ErrorResponse{kRespRqtl, std::nullopt, {}}, out).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(encode_response(ErrorResponse{kRespErr, 5u, {}}, out).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(encode_response(ErrorResponse{kRespOk, std::nullopt, {}}, out).error().code,
            Errc::invalid_argument);
  EXPECT_EQ(encode_response(RawService{0x30, {}}, out).error().code, Errc::invalid_argument);
  EXPECT_EQ(encode_response(ReadResponse{big, 0, true}, out).error().code, Errc::too_large);
  EXPECT_TRUE(out.empty());  // nothing appended on failure
}

}  // namespace
}  // namespace gs::c1222
