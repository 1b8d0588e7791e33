#include "tests/material/sasl_users.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <vector>

namespace ferry::testing {

std::string saslpasswd2_path() {
  namespace fs = std::filesystem;
  if (const char* path = std::getenv("PATH")) {
    std::string p = path;
    std::size_t pos = 0;
    while (pos <= p.size()) {
      std::size_t colon = p.find(':', pos);
      if (colon == std::string::npos) colon = p.size();
      fs::path candidate = fs::path(p.substr(pos, colon - pos)) / "saslpasswd2";
      if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
      pos = colon + 1;
    }
  }
  for (const char* c : {"/usr/sbin/saslpasswd2", "/usr/bin/saslpasswd2"})
    if (::access(c, X_OK) == 0) return c;
  throw std::runtime_error("saslpasswd2 not found: install sasl2-bin");
}

void add_sasl_user(const std::string& db_path, const std::string& app, const std::string& realm,
                   const std::string& user, const std::string& password) {
  const std::string tool = saslpasswd2_path();
  int in[2], out[2];
  if (::pipe(in) != 0 || ::pipe(out) != 0) throw std::runtime_error("pipe failed");
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    ::close(in[1]);
    ::close(out[0]);
    std::vector<const char*> argv = {tool.c_str(), "-p", "-c", "-f", db_path.c_str(), "-a",
                                     app.c_str(),  "-u", realm.c_str(), user.c_str(), nullptr};
    ::execv(tool.c_str(), const_cast<char* const*>(argv.data()));
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  const std::string line = password + "\n";
  if (::write(in[1], line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
    // saslpasswd2 may have exited already; its status says why.
  }
  ::close(in[1]);
  std::string output;
  char buf[512];
  ssize_t n;
  while ((n = ::read(out[0], buf, sizeof buf)) > 0) output.append(buf, static_cast<std::size_t>(n));
  ::close(out[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw std::runtime_error("saslpasswd2 failed for " + user + "@" + realm + " in " + db_path + ": " + output);
}

}  // namespace ferry::testing
