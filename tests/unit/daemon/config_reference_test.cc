// The configuration reference (ferryd --help-config, ferryd.conf(5)) and the
// parser are one list: every key the reference names is accepted, every key
// --print-config prints is in the reference, and the defaults it states are
// the ones the daemon has.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <sstream>

#include "daemon/config.h"
#include "rpc/error.h"

namespace ferry::daemon {
namespace {

// "section.key" -> the value text, read from TOML as to_toml() writes it
// ([section], [[section]], key = value on one line).
std::map<std::string, std::string> keys_of(const std::string& toml) {
  std::map<std::string, std::string> out;
  std::istringstream in(toml);
  std::string line, section;
  while (std::getline(in, line)) {
    const auto first = line.find_first_not_of(' ');
    if (first == std::string::npos || line[first] == '#') continue;
    line = line.substr(first);
    if (line.rfind("[[", 0) == 0) {
      section = line.substr(2, line.find("]]") - 2);
    } else if (line[0] == '[') {
      section = line.substr(1, line.find(']') - 1);
    } else if (const auto eq = line.find(" = "); eq != std::string::npos && !section.empty()) {
      out[section + "." + line.substr(0, eq)] = line.substr(eq + 3);
    }
  }
  return out;
}

std::set<std::string> reference_keys() {
  std::set<std::string> out;
  for (const auto& k : config_reference()) out.insert(std::string(k.section) + "." + k.key);
  return out;
}

TEST(ConfigReference, NamesEveryKeyOnce) {
  EXPECT_EQ(reference_keys().size(), config_reference().size()) << "a key is listed twice";
  for (const auto& k : config_reference()) {
    EXPECT_NE(std::string(k.meaning), "") << k.section << "." << k.key;
    EXPECT_NE(std::string(k.type), "") << k.section << "." << k.key;
    EXPECT_TRUE(*k.default_toml || *k.example) << k.section << "." << k.key << " has neither a default nor an example";
  }
}

TEST(ConfigReference, EveryKeyItNamesIsAcceptedByTheParser) {
  const std::string toml = config_reference_text("toml");
  DaemonConfig c;
  try {
    c = parse_config(toml, "reference.toml");
  } catch (const Error& e) {
    FAIL() << e.message() << "\n" << toml;
  }
  // Each value arrived (not only "no error"): it prints back under its key.
  const auto printed = keys_of(to_toml(c));
  for (const auto& key : reference_keys()) EXPECT_TRUE(printed.count(key)) << key << " was accepted but not kept";
}

TEST(ConfigReference, EveryKeyPrintConfigPrintsIsInTheReference) {
  // A configuration that sets everything, so that the optional sections
  // ([fault], [[nbd.export]]) are printed too.
  const auto printed = keys_of(to_toml(parse_config(config_reference_text("toml"), "reference.toml")));
  ASSERT_FALSE(printed.empty());
  const auto reference = reference_keys();
  for (const auto& [key, value] : printed) EXPECT_TRUE(reference.count(key)) << key << " is missing from the reference";
  // And the embedded default's keys.
  for (const auto& [key, value] : keys_of(to_toml(default_config())))
    EXPECT_TRUE(reference.count(key)) << key << " is missing from the reference";
}

TEST(ConfigReference, StatedDefaultsAreTheDaemonsDefaults) {
  const auto defaults = keys_of(to_toml(default_config()));
  unsigned checked = 0;
  for (const auto& k : config_reference()) {
    if (!*k.default_toml || is_table_array(k.section)) continue;
    const std::string key = std::string(k.section) + "." + k.key;
    // The stated default, read by the parser and printed the same way.
    const auto stated = keys_of(to_toml(
        parse_config("[" + std::string(k.section) + "]\n" + k.key + " = " + k.default_toml + "\n", "default.toml")));
    if (!stated.count(key)) {
      // Printed only when set ([fault]): its default is the empty value.
      EXPECT_EQ(std::string(k.default_toml), "\"\"") << key;
      EXPECT_FALSE(defaults.count(key)) << key;
      continue;
    }
    EXPECT_EQ(stated.at(key), defaults.at(key)) << key << ": the reference says " << k.default_toml;
    ++checked;
  }
  EXPECT_GT(checked, 40u);
}

TEST(ConfigReference, FormatsAreTextTsvAndToml) {
  const std::string text = config_reference_text("text");
  const std::string tsv = config_reference_text("tsv");
  for (const auto& k : config_reference()) {
    EXPECT_NE(text.find(std::string("  ") + k.key + " ("), std::string::npos) << k.key;
    EXPECT_NE(tsv.find(std::string("\t") + k.key + "\t"), std::string::npos) << k.key;
  }
  std::istringstream lines(tsv);
  std::string line;
  std::size_t rows = 0;
  while (std::getline(lines, line)) {
    EXPECT_EQ(std::count(line.begin(), line.end(), '\t'), 5) << line;
    ++rows;
  }
  EXPECT_EQ(rows, config_reference().size() + 1);
  try {
    config_reference_text("yaml");
    FAIL() << "an unknown format was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Code::invalid_argument);
    EXPECT_NE(e.message().find("text, tsv or toml"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace ferry::daemon
