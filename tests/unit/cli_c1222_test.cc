// Runs the built `gridseal c1222 decode|seal|open` on oracle messages and checks exit codes/output.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Outcome {
  int exit_code = -1;
  std::string out;  // stdout and stderr together
};

// Runs a shell command line; stdin_text (if any) is fed through a temporary file.
Outcome run(const std::string& args, const std::string& stdin_text = {}) {
  std::string cmd = std::string(GS_BIN_DIR) + "/gridseal " + args;
  std::string tmp;
  if (!stdin_text.empty()) {
    char name[] = "/tmp/gs_cli_test_XXXXXX";
    int fd = mkstemp(name);
    if (fd < 0) return {};
    FILE* f = fdopen(fd, "w");
    std::fputs(stdin_text.c_str(), f);
    std::fclose(f);
    tmp = name;
    cmd += " < " + tmp;
  } else {
    cmd += " < /dev/null";
  }
  cmd += " 2>&1";
  Outcome r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (!tmp.empty()) std::remove(tmp.c_str());
  return r;
}

// Lines "hex<TAB>..." printed by eaxprime.py: the first field of each.
std::vector<std::vector<std::string>> oracle(const std::string& what) {
  std::string cmd = "python3 " + std::string(GS_SHARED_DIR) + "/tools/eaxprime.py " + what;
  std::vector<std::vector<std::string>> rows;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return rows;
  std::string all;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) all.append(buf, n);
  pclose(p);
  std::istringstream in(all);
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> fields;
    std::istringstream ls(line);
    std::string f;
    while (std::getline(ls, f, '\t')) fields.push_back(f);
    if (!fields.empty()) rows.push_back(fields);
  }
  return rows;
}

int count(const std::string& hay, const std::string& needle) {
  int c = 0;
  for (auto pos = hay.find(needle); pos != std::string::npos; pos = hay.find(needle, pos + 1)) ++c;
  return c;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

const std::string kKey = "2:01020304050607080102030405060708";
const std::string kWrongKey = "2:01020304050607080102030405060709";

class CliC1222 : public ::testing::Test {
 protected:
  void SetUp() override {
    samples_ = oracle("samples");
    ASSERT_EQ(samples_.size(), 8u) << "eaxprime.py samples did not run";
    for (auto& row : samples_) all_ += row[0] + "\n";
  }
  const std::string& sample(std::size_t i) { return samples_.at(i).at(0); }
  std::vector<std::vector<std::string>> samples_;
  std::string all_;
};

TEST_F(CliC1222, DecodeAllSamplesWithKey) {
  Outcome r = run("c1222 decode --key " + kKey, all_);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(count(r.out, "mac_verdict: good"), 7) << r.out;
  EXPECT_EQ(count(r.out, "mac_verdict: none"), 1);
  EXPECT_EQ(count(r.out, "  ok: yes"), 8);
  EXPECT_NE(r.out.find("password: \"PASSWORD            \""), std::string::npos);
  EXPECT_NE(r.out.find("table: ST-46"), std::string::npos);
  EXPECT_NE(r.out.find("procedure: 26"), std::string::npos);
  EXPECT_NE(r.out.find("text: \"TEMP\""), std::string::npos);
  EXPECT_NE(r.out.find("iv_time: 2024-01-12T21:44:35Z"), std::string::npos);
  EXPECT_NE(r.out.find("notification: yes"), std::string::npos);
  EXPECT_NE(r.out.find("called_ap_invocation_id: 3"), std::string::npos);
  EXPECT_NE(r.out.find("absolute: 2.16.124.113620.1.22.0.123.8437"), std::string::npos);
  EXPECT_NE(r.out.find("aso_context: 2.16.124.113620.1.22"), std::string::npos);
  EXPECT_NE(r.out.find("data: 4d414e55464143545552455220534e20"), std::string::npos);
}

TEST_F(CliC1222, DecodeWithoutKeyCannotCheckButIsNotAFailure) {
  Outcome r = run("c1222 decode " + sample(2) + " " + sample(1));
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(count(r.out, "mac_verdict: no key"), 2);
  EXPECT_NE(r.out.find("services_hidden"), std::string::npos);      // mode 2: ciphertext
  EXPECT_NE(r.out.find("partial-read-offset"), std::string::npos);  // mode 1: readable
}

TEST_F(CliC1222, WrongKeyIsBadMac) {
  Outcome r = run("c1222 decode --key " + kWrongKey + " " + sample(2));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_EQ(first_line(r.out), "message 1: MAC BAD");
  EXPECT_NE(r.out.find("mac_verdict: bad"), std::string::npos);
}

TEST_F(CliC1222, TamperedMacAndBodyAreBad) {
  std::string m = sample(1);
  m.back() = m.back() == '0' ? '1' : '0';
  Outcome r = run("c1222 decode --key " + kKey + " " + m);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("mac_verdict: bad"), std::string::npos);
  std::string c = sample(2);
  c[c.size() - 12] = c[c.size() - 12] == 'a' ? 'b' : 'a';  // a ciphertext byte
  r = run("c1222 decode --key " + kKey + " " + c);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  // One bad among good ones still fails the run.
  r = run("c1222 decode --key " + kKey + " " + sample(1) + " " + m);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(count(r.out, "mac_verdict: good"), 1);
}

TEST_F(CliC1222, TruncatedMessageNamesTheOffset) {
  std::string m = sample(1);
  m.resize(m.size() - 4);
  Outcome r = run("c1222 decode --key " + kKey + " " + m);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_EQ(first_line(r.out), "message 1: MALFORMED");
  EXPECT_NE(r.out.find("error: truncated at byte "), std::string::npos) << r.out;
  r = run("c1222 open --key " + kKey + " " + m);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("at byte"), std::string::npos) << r.out;
}

TEST_F(CliC1222, MalformedInputs) {
  for (const char* bad : {"00", "60", "6000", "6103a20100", "ffffffff"}) {
    Outcome r = run(std::string("c1222 decode ") + bad);
    EXPECT_EQ(r.exit_code, 1) << bad << ": " << r.out;
    EXPECT_NE(r.out.find("error: "), std::string::npos) << bad;
    EXPECT_NE(r.out.find(" at byte "), std::string::npos) << bad << ": " << r.out;
  }
  // A bad service inside a well-formed message (security with 3-byte password).
  Outcome r = run("c1222 decode 6018a20580037bc175a60480027b04a803020103be07280581038051");
  EXPECT_EQ(r.exit_code, 1) << r.out;
}

TEST_F(CliC1222, BadHexIsAFailedInput) {
  Outcome r = run("c1222 decode 60zz");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("not hex"), std::string::npos) << r.out;
  r = run("c1222 decode 601");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("odd number"), std::string::npos) << r.out;
  r = run("c1222 open --key " + kKey + " xyz");
  EXPECT_EQ(r.exit_code, 1) << r.out;
}

TEST_F(CliC1222, UsageErrorsExit2) {
  EXPECT_EQ(run("c1222 decode --key 2 " + sample(0)).exit_code, 2);
  EXPECT_EQ(run("c1222 decode --key x:0102 " + sample(0)).exit_code, 2);
  EXPECT_EQ(run("c1222 decode --key 2:0102 " + sample(0)).exit_code, 2);
  EXPECT_EQ(run("c1222 decode --key 300:01020304050607080102030405060708 " + sample(0)).exit_code,
            2);
  EXPECT_EQ(run("c1222 decode --key 2:0102030405060708010203040506070g " + sample(0)).exit_code, 2);
  EXPECT_EQ(run("c1222 decode --base-oid 9.9 " + sample(0)).exit_code, 2);
  EXPECT_EQ(run("c1222 seal --mode 3 --key " + kKey + " " + sample(0)).exit_code, 2);
  EXPECT_EQ(run("c1222 seal " + sample(0)).exit_code, 2);  // --mode and --key required
  EXPECT_EQ(run("c1222 open " + sample(1)).exit_code, 2);  // --key required
  EXPECT_EQ(run("c1222 decode").exit_code, 2);             // nothing on stdin
  EXPECT_EQ(run("c1222 frobnicate").exit_code, 2);
  Outcome r = run("c1222 decode --key 2:0102 " + sample(0));
  EXPECT_NE(r.out.find("--key"), std::string::npos) << r.out;
}

TEST_F(CliC1222, OpenThenSealReproducesTheSamples) {
  for (std::size_t i : {1u, 2u, 3u, 4u, 5u, 6u, 7u}) {
    Outcome o = run("c1222 open --key " + kKey + " " + sample(i));
    ASSERT_EQ(o.exit_code, 0) << i << ": " << o.out;
    std::string clear = first_line(o.out);
    // The mode-0 form decodes cleanly on its own.
    Outcome d = run("c1222 decode " + clear);
    EXPECT_EQ(d.exit_code, 0) << d.out;
    EXPECT_NE(d.out.find("security_mode: 0"), std::string::npos);
    std::string mode = (i == 1 || i == 5) ? "1" : "2";
    Outcome s = run("c1222 seal --mode " + mode + " --key " + kKey + " " + clear);
    ASSERT_EQ(s.exit_code, 0) << s.out;
    EXPECT_EQ(first_line(s.out), sample(i)) << samples_[i][1];
  }
}

TEST_F(CliC1222, OpenBadMacFails) {
  std::string m = sample(2);
  m.back() = m.back() == '0' ? '1' : '0';
  Outcome r = run("c1222 open --key " + kKey + " " + m);
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("MAC"), std::string::npos) << r.out;
  r = run("c1222 open --key 3:01020304050607080102030405060708 " + sample(2));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("no --key for key id 2"), std::string::npos) << r.out;
}

TEST_F(CliC1222, SealNeedsAcAndAKnownKeyId) {
  Outcome r = run("c1222 seal --mode 2 --key " + kKey + " " + sample(0));  // no AC
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("key id"), std::string::npos) << r.out;
  Outcome o = run("c1222 open --key " + kKey + " " + sample(2));
  ASSERT_EQ(o.exit_code, 0);
  r = run("c1222 seal --mode 1 --key 7:01020304050607080102030405060708 " + first_line(o.out));
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("no --key for key id 2"), std::string::npos) << r.out;
}

TEST_F(CliC1222, PaperMessagesVerify) {
  auto rows = oracle("paper-messages");
  ASSERT_EQ(rows.size(), 5u);
  for (const auto& row : rows) {
    ASSERT_GE(row.size(), 2u);
    Outcome r = run("c1222 decode --key " + row[1] + " " + row[0]);
    EXPECT_EQ(r.exit_code, 0) << row.back() << ": " << r.out;
    EXPECT_NE(r.out.find("mac_verdict: good"), std::string::npos) << row.back();
  }
  // Paper #4 with several keys given: the right one is picked by key id 0.
  Outcome r = run("c1222 decode --key " + kKey + " --key " + rows[3][1] + " " + rows[3][0]);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(count(r.out, "full-read"), 6);
  EXPECT_NE(r.out.find("table: ST-125"), std::string::npos);
}

TEST_F(CliC1222, JsonOneObjectPerMessage) {
  Outcome r = run("c1222 decode --json --key " + kKey, all_ + "zz\n");
  EXPECT_EQ(r.exit_code, 1) << r.out;  // the last input is not hex
  std::istringstream in(r.out);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    EXPECT_EQ(line.rfind("{\"index\":" + std::to_string(n) + ",", 0), 0u) << line;
    EXPECT_EQ(line.back(), '}');
  }
  EXPECT_EQ(n, 9);
  EXPECT_EQ(count(r.out, "\"mac_verdict\":\"good\""), 7);
  EXPECT_NE(r.out.find("\"password\":\"PASSWORD            \""), std::string::npos);
  EXPECT_NE(r.out.find("\"name\":\"procedure\""), std::string::npos);
  EXPECT_NE(r.out.find("\"ok\":false"), std::string::npos);
}

TEST_F(CliC1222, StdinSkipsCommentsBlankLinesAndLabels) {
  std::string in = "# a comment\n\n   \n" + sample(0) + "\tlabel text\n" + sample(1) + "  # trailing\n";
  Outcome r = run("c1222 decode --key " + kKey, in);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(count(r.out, "message "), 2);
  EXPECT_NE(r.out.find("message 2: ok"), std::string::npos);
}

}  // namespace
