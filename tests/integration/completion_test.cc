// Bash completion (contrib/bash-completion/ferry over `ferry __complete`):
// the script sourced in a plain `bash --norc`, COMP_WORDS / COMP_CWORD /
// COMP_LINE / COMP_POINT set as bash sets them, _ferry called, COMPREPLY
// checked; pool and volume names come from a real ferryd.
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>

#include "client/session.h"
#include "tests/integration/ferryd_process.h"

namespace ferry::testing {
namespace {

std::string sh_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

class CompletionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    d_.emplace(std::vector<std::string>{"--pool", "default=" + dir_.path() + "/default", "--pool",
                                        "tank=" + dir_.path() + "/tank"});
    auto s = Session::connect(d_->unix_uri());
    s.vol_create("default", "disk1", 1 << 20);
    s.vol_create("default", "disk2", 1 << 20);
    s.vol_create("tank", "archive", 1 << 20);
    s.close();
  }

  // COMPREPLY for `words` (the last one under the cursor, at the end of the
  // line), with $FERRY_URI naming `uri`.
  std::vector<std::string> complete(const std::vector<std::string>& words, const std::string& uri = {},
                                    const std::string& line_text = {}) {
    std::string array, line = line_text;
    for (std::size_t i = 0; i < words.size(); ++i) {
      array += (i ? " " : "") + sh_quote(i == 0 ? ferry_cli_path() : words[i]);
      if (line_text.empty()) line += (i ? " " : "") + (i == 0 ? ferry_cli_path() : words[i]);
    }
    if (!line_text.empty()) line = ferry_cli_path() + line_text.substr(line_text.find(' '));
    const std::string script = "source " + sh_quote(FERRY_TEST_BASH_COMPLETION) + " || exit 90\n" +
                               "complete -p ferry >/dev/null || exit 91\n" + "COMP_WORDS=(" + array + ")\n" +
                               "COMP_CWORD=" + std::to_string(words.size() - 1) + "\n" + "COMP_LINE=" + sh_quote(line) +
                               "\n" + "COMP_POINT=${#COMP_LINE}\n" + "_ferry || exit 92\n" +
                               "printf '%s\\n' \"${COMPREPLY[@]}\"\n";
    std::string out;
    const int rc = run_command({"/usr/bin/env", "FERRY_URI=" + (uri.empty() ? d_->unix_uri() : uri), "bash", "--norc",
                                "--noprofile", "-c", script},
                               &out);
    EXPECT_EQ(rc, 0) << out;
    std::vector<std::string> reply;
    std::istringstream in(out);
    for (std::string l; std::getline(in, l);)
      if (!l.empty()) reply.push_back(l);
    return reply;
  }

  static bool has(const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  }
  static std::string joined(const std::vector<std::string>& v) {
    std::string out;
    for (const auto& s : v) out += s + " ";
    return out;
  }

  TempDir dir_;
  std::optional<FerrydProcess> d_;
};

TEST_F(CompletionTest, VerbsForAPrefix) {
  const auto r = complete({"ferry", "vol-"});
  for (const char* verb : {"vol-list", "vol-info", "vol-create", "vol-delete", "vol-resize", "vol-upload",
                           "vol-download", "vol-copy"})
    EXPECT_TRUE(has(r, verb)) << verb << " missing from: " << joined(r);
  for (const auto& c : r) EXPECT_EQ(c.rfind("vol-", 0), 0u) << c;
  const auto all = complete({"ferry", ""});
  EXPECT_TRUE(has(all, "ping") && has(all, "admin") && has(all, "job-list")) << joined(all);
  EXPECT_FALSE(has(all, "__complete")) << joined(all);
}

TEST_F(CompletionTest, OptionsAreTheVerbsOwn) {
  const auto r = complete({"ferry", "vol-upload", "--"});
  for (const char* opt : {"--offset", "--length", "--sparse", "--dense", "--atomic", "--create", "--no-sync"})
    EXPECT_TRUE(has(r, opt)) << opt << " missing from: " << joined(r);
  EXPECT_FALSE(has(r, "--shrink")) << "vol-resize's option offered for vol-upload: " << joined(r);
  EXPECT_FALSE(has(r, "--preallocate")) << joined(r);
  // A global option still completes after the verb when none of the verb's match.
  EXPECT_EQ(complete({"ferry", "vol-upload", "--conn"}), std::vector<std::string>{"--connect"});
}

TEST_F(CompletionTest, OptionValuesFromTheCliDefinition) {
  // bash splits "--progress=js" at '=': the reply replaces only "js".
  EXPECT_EQ(complete({"ferry", "--progress", "=", "js"}, {}, "ferry --progress=js"), std::vector<std::string>{"json"});
  const auto r = complete({"ferry", "vol-download", "--progress", ""});
  EXPECT_EQ(r, (std::vector<std::string>{"auto", "bar", "json", "none"}));
}

TEST_F(CompletionTest, PoolsFromTheDaemon) {
  EXPECT_EQ(complete({"ferry", "vol-list", ""}), (std::vector<std::string>{"default", "tank"}));
  // A volume position offers the pools first, as "POOL/".
  EXPECT_EQ(complete({"ferry", "vol-info", ""}), (std::vector<std::string>{"default/", "tank/"}));
  EXPECT_EQ(complete({"ferry", "vol-info", "t"}), std::vector<std::string>{"tank/"});
}

TEST_F(CompletionTest, VolumesFromTheDaemon) {
  EXPECT_EQ(complete({"ferry", "vol-info", "default/"}), (std::vector<std::string>{"default/disk1", "default/disk2"}));
  EXPECT_EQ(complete({"ferry", "vol-download", "tank/a"}), std::vector<std::string>{"tank/archive"});
  // Volumes made after the first question are there the next time.
  auto s = Session::connect(d_->unix_uri());
  s.vol_create("default", "disk3", 1 << 20);
  s.close();
  EXPECT_TRUE(has(complete({"ferry", "vol-delete", "default/d"}), "default/disk3"));
}

TEST_F(CompletionTest, TheDaemonNamedOnTheLineIsAsked) {
  const std::string nowhere = "ferry+unix://" + dir_.path() + "/nobody-here.sock";
  // $FERRY_URI names no daemon: nothing, no error, no noise.
  EXPECT_TRUE(complete({"ferry", "vol-info", "default/"}, nowhere).empty());
  // -c on the line wins over $FERRY_URI (bash splits the URI at ':').
  const std::string uri = d_->unix_uri();
  const std::string rest = uri.substr(uri.find(':') + 1);
  EXPECT_EQ(complete({"ferry", "-c", "ferry+unix", ":", rest, "vol-info", "default/disk1"}, nowhere,
                     "ferry -c " + uri + " vol-info default/disk1"),
            std::vector<std::string>{"default/disk1"});
}

TEST_F(CompletionTest, AdminSubVerbs) {
  const auto r = complete({"ferry", "admin", ""});
  for (const char* verb : {"info", "clients", "client", "disconnect", "limits", "log-level", "jobs", "cancel"})
    EXPECT_TRUE(has(r, verb)) << verb << " missing from: " << joined(r);
  EXPECT_TRUE(has(complete({"ferry", "admin", "--"}), "--admin-socket"));
  EXPECT_EQ(complete({"ferry", "admin", "disc"}), std::vector<std::string>{"disconnect"});
}

}  // namespace
}  // namespace ferry::testing
