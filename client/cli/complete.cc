#include "client/cli/complete.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <optional>
#include <set>

#include "client/cli/output.h"
#include "client/session.h"

namespace ferry::cli {

namespace {

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

std::vector<CLI::App*> subcommands_of(CLI::App* app) {
  return app->get_subcommands([](CLI::App* sub) { return !sub->get_name().empty() && !sub->get_group().empty(); });
}

CLI::App* subcommand_named(CLI::App* app, const std::string& name) {
  for (auto* sub : subcommands_of(app))
    if (sub->get_name() == name) return sub;
  return nullptr;
}

std::vector<CLI::Option*> named_options(CLI::App* app) {
  return app->get_options([](CLI::Option* o) { return !o->get_positional() && !o->get_group().empty(); });
}

std::vector<CLI::Option*> positionals(CLI::App* app) {
  return app->get_options([](CLI::Option* o) { return o->get_positional(); });
}

// The option `word` names ("--x", "-x", "--x=value") in `app` or, as the
// CLI lets global options follow the verb, in one of its parents.
CLI::Option* find_option(CLI::App* app, const std::string& word) {
  const std::string name = word.substr(0, word.find('='));
  for (CLI::App* a = app; a; a = a->get_parent())
    for (auto* o : named_options(a)) {
      for (const auto& l : o->get_lnames())
        if (name == "--" + l) return o;
      for (const auto& s : o->get_snames())
        if (name == "-" + s) return o;
    }
  return nullptr;
}

bool takes_value(const CLI::Option* o) { return o->get_type_size_max() > 0; }

// The values an option accepts when it lists them (CLI::IsMember: "{a,b,c}").
std::vector<std::string> choices_of(CLI::Option* o) {
  std::vector<std::string> out;
  try {
    const std::string d = o->get_validator()->get_description();
    if (d.size() < 2 || d.front() != '{' || d.back() != '}') return out;
    std::size_t at = 1;
    while (at < d.size() - 1) {
      const auto comma = std::min(d.find(',', at), d.size() - 1);
      out.push_back(d.substr(at, comma - at));
      at = comma + 1;
    }
  } catch (const CLI::Error&) {
  }
  return out;
}

struct Daemon {
  std::string uri;
  std::optional<Session> session;
  bool tried = false;

  Session* get() {
    if (!tried) {
      tried = true;
      try {
        rpc::ClientOptions options;
        options.name = "ferry-complete";
        options.connect_timeout = std::chrono::milliseconds(1000);
        options.connection.keepalive_interval = std::chrono::milliseconds(0);
        session.emplace(Session::connect(uri, options));
      } catch (...) {
        session.reset();
      }
    }
    return session ? &*session : nullptr;
  }
  std::vector<std::string> pools() {
    std::vector<std::string> out;
    try {
      if (auto* s = get())
        for (const auto& p : s->pool_list()) out.push_back(p.name());
    } catch (...) {
    }
    return out;
  }
  std::vector<std::string> volumes(const std::string& pool) {
    std::vector<std::string> out;
    try {
      if (auto* s = get())
        for (const auto& v : s->vol_list(pool)) out.push_back(v.pool() + "/" + v.name());
    } catch (...) {
    }
    return out;
  }
};

// What a positional argument names, from its name in the CLI definition.
enum class Kind { other, volume, pool };
Kind kind_of(const CLI::Option* positional) {
  const std::string& n = positional->get_name();
  if (n == "volume" || n == "export" || n == "source" || n == "destination") return Kind::volume;
  if (n == "pool") return Kind::pool;
  return Kind::other;
}

}  // namespace

std::vector<std::string> split_words(const std::string& line) {
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  char quote = 0;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quote) {
      if (c == quote) quote = 0;
      else if (c == '\\' && quote == '"' && i + 1 < line.size()) word += line[++i];
      else word += c;
    } else if (c == '\'' || c == '"') {
      quote = c;
      in_word = true;
    } else if (c == '\\' && i + 1 < line.size()) {
      word += line[++i];
      in_word = true;
    } else if (c == ' ' || c == '\t' || c == '\n') {
      if (in_word) words.push_back(word);
      word.clear();
      in_word = false;
    } else {
      word += c;
      in_word = true;
    }
  }
  words.push_back(word);  // the word under the cursor, "" after a space
  return words;
}

std::vector<std::string> complete(CLI::App& root, const std::string& shell_cur, const std::string& line,
                                  const std::string& default_uri) {
  const std::vector<std::string> words = split_words(line);
  if (words.size() < 2) return {};
  const std::string cur = words.back();
  Daemon daemon{default_uri, std::nullopt, false};
  CLI::App* app = &root;
  std::size_t positional_index = 0;
  CLI::Option* pending = nullptr;  // an option whose value is the next word
  bool options_done = false;       // after "--"
  for (std::size_t i = 1; i + 1 < words.size(); ++i) {
    const std::string& w = words[i];
    if (pending) {
      if (pending->check_lname("connect")) daemon.uri = w;
      pending = nullptr;
      continue;
    }
    if (!options_done && w == "--") {
      options_done = true;
      continue;
    }
    if (!options_done && w.size() > 1 && w[0] == '-') {
      CLI::Option* o = find_option(app, w);
      if (o && takes_value(o)) {
        if (const auto eq = w.find('='); eq != std::string::npos) {
          if (o->check_lname("connect")) daemon.uri = w.substr(eq + 1);
        } else if (w[1] == '-' || w.size() == 2) {
          pending = o;
        }
      }
      continue;
    }
    if (CLI::App* sub = positional_index == 0 ? subcommand_named(app, w) : nullptr) {
      app = sub;
      continue;
    }
    ++positional_index;
  }

  std::vector<std::string> out;
  auto add_matching = [&](const std::vector<std::string>& items, const std::string& prefix) {
    for (const auto& s : items)
      if (starts_with(s, prefix)) out.push_back(s);
  };
  auto values_for = [&](CLI::Option* o, const std::string& prefix) {
    if (o->check_lname("connect")) return;  // URIs and files: the shell's own completion
    add_matching(choices_of(o), prefix);
  };
  auto names_for = [&](Kind kind, const std::string& prefix) {
    if (kind == Kind::pool) {
      add_matching(daemon.pools(), prefix);
    } else if (kind == Kind::volume) {
      const auto slash = prefix.find('/');
      if (slash == std::string::npos) {
        std::vector<std::string> pools;
        for (auto& p : daemon.pools()) pools.push_back(p + "/");
        add_matching(pools, prefix);
      } else {
        add_matching(daemon.volumes(prefix.substr(0, slash)), prefix);
      }
    }
  };

  std::string word = cur;  // the whole word being completed
  if (pending) {
    values_for(pending, cur);
  } else if (!options_done && starts_with(cur, "-")) {
    if (const auto eq = cur.find('='); eq != std::string::npos) {
      if (CLI::Option* o = find_option(app, cur)) {
        values_for(o, cur.substr(eq + 1));
        for (auto& v : out) v = cur.substr(0, eq + 1) + v;
      }
    } else {
      // The verb's own options; the global ones when none of those match.
      for (CLI::App* a = app; a && out.empty(); a = a->get_parent()) {
        std::vector<std::string> names;
        for (auto* o : named_options(a)) {
          for (const auto& l : o->get_lnames()) names.push_back("--" + l);
          if (cur.size() < 2 || cur[1] != '-')
            for (const auto& s : o->get_snames()) names.push_back("-" + s);
        }
        add_matching(names, cur);
      }
    }
  } else if (positional_index == 0 && !subcommands_of(app).empty()) {
    std::vector<std::string> names;
    for (auto* sub : subcommands_of(app)) names.push_back(sub->get_name());
    add_matching(names, cur);
  } else {
    const auto pos = positionals(app);
    if (positional_index < pos.size()) names_for(kind_of(pos[positional_index]), cur);
  }

  // Relative to what the shell replaces: bash split "--progress=js" into
  // "--progress", "=", "js" and replaces only "js".
  if (shell_cur.size() < word.size() && word.compare(word.size() - shell_cur.size(), shell_cur.size(), shell_cur) == 0) {
    const std::size_t cut = word.size() - shell_cur.size();
    std::vector<std::string> trimmed;
    for (const auto& c : out)
      if (c.size() >= cut) trimmed.push_back(c.substr(cut));
    out = std::move(trimmed);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace ferry::cli
