// TOML text checked before toml++ parses it (src/toml_text.h): non-ASCII text only inside
// strings and comments, UTF-8 only, errors with the position; what passes parses as before.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "src/config.h"
#include "src/policy.h"
#include "src/toml_text.h"

namespace gs::toml_text {
namespace {

std::string error_of(std::string_view text) {
  auto st = check(text, "f.toml");
  return st.ok() ? "" : st.error().message().substr(std::string_view("invalid argument: ").size());
}

// The text passes the check and parses; the table.
toml::table checked_and_parsed(std::string_view text) {
  EXPECT_EQ(error_of(text), "");
  auto t = parse(text, "f.toml");
  EXPECT_TRUE(t.ok()) << t.error().message();
  return t.ok() ? std::move(*t) : toml::table{};
}

TEST(TomlText, NonAsciiInsideStringsAndCommentsParses) {
  const std::string text =
      "# Compteurs du réseau § 3\n"
      "a = \"Zähler \\\"§\\\" é\"\n"
      "b = 'litéral'\n"
      "c = \"\"\"\n"
      "mehrzeilig ä \"\" ü \\\\ §\n"
      "\"\"\"\n"
      "d = '''\n"
      "§ ''' \n"
      "\"é\" = 1   # key in quotes, comment ü\n"
      "e = \"\"\"x\\\n"
      "    y\"\"\"\n";
  const toml::table t = checked_and_parsed(text);
  EXPECT_EQ(t["a"].value<std::string>(), "Zähler \"§\" é");
  EXPECT_EQ(t["c"].value<std::string>(), "mehrzeilig ä \"\" ü \\ §\n");
  EXPECT_EQ(t["d"].value<std::string>(), "§ ");
  EXPECT_EQ(t["é"].value<int>(), 1);
  EXPECT_EQ(t["e"].value<std::string>(), "xy");
}

TEST(TomlText, NonAsciiWhereToml33WouldMisbehaveIsRefusedWithItsPosition) {
  // Each of these reached __builtin_unreachable() inside toml++ 3.3.0 (UBSan).
  EXPECT_EQ(error_of("a = 1\n§\n"),
            "f.toml:2:1: a non-ASCII character outside a string or comment");
  EXPECT_EQ(error_of("clock_s\xef\xbb\xbekey = 1\n"),
            "f.toml:1:8: a non-ASCII character outside a string or comment");
  EXPECT_EQ(error_of("a = 1§\n"), "f.toml:1:6: a non-ASCII character outside a string or comment");
  EXPECT_EQ(error_of("s = \"\"\"\\\n§\"\"\"\n"),
            "f.toml:2:1: a non-ASCII character after a line-ending backslash");
  EXPECT_EQ(error_of("s = \"\"\"ab\\ \t\n  \n   é\"\"\"\n"),
            "f.toml:3:4: a non-ASCII character after a line-ending backslash");
  EXPECT_EQ(error_of("s = \"\"\"ab\\§\"\"\"\n"),
            "f.toml:1:11: a non-ASCII character after a backslash");
  // A string or comment that ended leaves the next line's text checked again.
  EXPECT_NE(error_of("a = \"x\" # é\nb = 'y'\n§ = 1\n"), "");
  EXPECT_NE(error_of("a = \"unterminated é\n§ = 1\n"), "");
  EXPECT_NE(error_of("s = \"\"\"x\"\"\"\"\"§ = 1\n"), "");
  // A quote inside a bare value does not open a string (toml++ reads on through the value).
  EXPECT_EQ(error_of(std::string_view("n = 5_5_85_8_'''\0KO\xef\xbf\xbb'''\n", 26)),
            "f.toml:1:20: a non-ASCII character outside a string or comment");
  EXPECT_EQ(error_of("n = 1\"é\"\n"), "f.toml:1:7: a non-ASCII character outside a string or comment");
  EXPECT_EQ(error_of("m =31[\"SP-\xef\xbb\xbe" "0\" =31\n"),
            "f.toml:1:11: a non-ASCII character outside a string or comment");
  EXPECT_EQ(error_of("a = [1, x[\"é\"]]\n"),
            "f.toml:1:12: a non-ASCII character outside a string or comment");
}

TEST(TomlText, StringsOpenWhereTomlLetsThem) {
  const std::string text =
      "a = [ \"é\", 'ü',\n  \"ö\" ]\n"
      "  \"k é\" . 'ä' = { \"x\" = \"§\", 'y' = '§' }\n"
      "[ \"tbl é\" ]\n"
      "[[\"arr\".'ß']]\n"
      "z = \"\"\"a\"\"\"\r\n"
      "arr = [\n  [1, \"é\"],\n  # c é\n  \"ü\",\n]\n"
      "t = { a = 1, \"b\" = [\"ß\"], c.\"d\" = 'ø' }\n"
      "[h.\"é\".b]\n"
      "dt = 1979-05-27 07:32:00Z\n";
  const toml::table t = checked_and_parsed(text);
  EXPECT_EQ(t["k é"]["ä"]["x"].value<std::string>(), "§");
  EXPECT_EQ(t["arr"]["ß"][0]["t"]["c"]["d"].value<std::string>(), "ø");  // under [[arr.ß]]
}

TEST(TomlText, TextThatIsNotUtf8IsRefused) {
  EXPECT_EQ(error_of("a = \"\xff\"\n"), "f.toml:1:6: not UTF-8");
  EXPECT_EQ(error_of("# \xc0\xaf overlong\n"), "f.toml:1:3: not UTF-8");
  EXPECT_EQ(error_of("a = 1\nb = \"\xed\xa0\x80\"\n"), "f.toml:2:6: not UTF-8");  // surrogate
  EXPECT_EQ(error_of("a = \"\xf4\x90\x80\x80\"\n"), "f.toml:1:6: not UTF-8");      // > U+10FFFF
  EXPECT_EQ(error_of("a = \"\xe2\x82\"\n"), "f.toml:1:6: not UTF-8");              // truncated
  EXPECT_EQ(error_of("a = \"\xf0\x9f\x94\x92\"\n"), "");                           // U+1F512
}

TEST(TomlText, SyntaxErrorsStillNameLineAndColumn) {
  auto t = parse("a = 1\nb = = 2\n", "f.toml");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.error().message().find(": f.toml:2:5: "), std::string::npos) << t.error().message();
}

TEST(TomlText, ConfigsAndPoliciesGoThroughTheCheck) {
  auto p = policy::parse_policy("clock_skew = 1\n§ = 2\n", "p.toml");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().message(), "invalid argument: p.toml:2:1: a non-ASCII character outside a string or comment");

  char path[] = "/tmp/gs-toml-text-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  const std::string bad = "base_oid = \"2.16.124.113620.1.22.0\"\n[hsm]\nmodule = \"x\" é\n";
  ASSERT_EQ(write(fd, bad.data(), bad.size()), static_cast<ssize_t>(bad.size()));
  close(fd);
  auto c = config::load(path);
  std::remove(path);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.error().message().find(":3:14: a non-ASCII character outside a string or comment"),
            std::string::npos)
      << c.error().message();
  EXPECT_EQ(parse_file("/nonexistent/gs.toml").error().code, Errc::not_found);
}

}  // namespace
}  // namespace gs::toml_text
