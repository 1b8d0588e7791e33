// Shell completion for the ferry CLI (docs/cli.md, contrib/bash-completion/ferry):
//   ferry __complete CUR LINE
// prints the candidates for the word under the cursor at the end of LINE
// (the command line up to the cursor), one per line. Verbs and options come from the CLI's own command
// line definition; pool and volume names from the daemon (-c/--connect on
// the line, $FERRY_URI or the default socket), asked with a short timeout
// and silently skipped when it does not answer. CUR is the part of the last
// word the shell replaces (bash splits words at '=' and ':'); candidates are
// printed relative to it.
#pragma once

#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace ferry::cli {

inline constexpr const char* kCompleteVerb = "__complete";

// `line` is the command line up to the cursor (its first word is the
// program); `default_uri` is the daemon to ask when the line names none.
std::vector<std::string> complete(CLI::App& app, const std::string& shell_cur, const std::string& line,
                                  const std::string& default_uri);
// Shell words of `line` (quotes and backslashes as sh reads them); the last
// one is the word under the cursor, "" when the line ends in a space.
std::vector<std::string> split_words(const std::string& line);

}  // namespace ferry::cli
