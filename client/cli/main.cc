// ferry: command-line client.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <deque>
#include <filesystem>
#include <cstdio>
#include <cstdlib>
#include <spdlog/spdlog.h>

#include "daemon/default_paths.h"
#include "ferry/v1/control.ferry.h"
#include "ferry/v1/test.ferry.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"

namespace {

using ferry::rpc::Client;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

int run_ping(Client& client, unsigned count) {
  ferry::v1::Ping ping;
  std::vector<double> rtts;
  for (unsigned i = 0; i < count; ++i) {
    ping.set_token(i);
    auto t = Clock::now();
    client.call_future<ferry::v1::Control::KeepalivePing>(ping, ferry::rpc::with_timeout(std::chrono::seconds(10))).get();
    rtts.push_back(ms_since(t));
  }
  std::sort(rtts.begin(), rtts.end());
  std::printf("%u pings to %s (%s): min %.3f ms, median %.3f ms, max %.3f ms\n", count,
              client.server().name.c_str(), client.peer().address.c_str(), rtts.front(), rtts[rtts.size() / 2],
              rtts.back());
  return 0;
}

int run_echo(Client& client, const std::string& text, unsigned count, unsigned inflight) {
  using ferry::test::v1::Test;
  Test::Stub<Client> stub(client);
  ferry::test::v1::EchoCall call;
  call.set_payload(text);
  // Round trip first, so a missing test program fails with its own message.
  auto reply = stub.echo_future(call).get();
  std::printf("echo: %s\n", reply.payload().c_str());
  if (count <= 1) return 0;
  auto t = Clock::now();
  std::deque<std::future<ferry::test::v1::EchoReply>> window;
  for (unsigned i = 0; i < count; ++i) {
    if (window.size() >= inflight) {
      window.front().get();
      window.pop_front();
    }
    window.push_back(stub.echo_future(call));
  }
  while (!window.empty()) {
    window.front().get();
    window.pop_front();
  }
  double secs = ms_since(t) / 1000.0;
  std::printf("%u echo calls, %u in flight: %.0f calls/s\n", count, inflight, count / secs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ferry: talk to a ferryd"};
  app.require_subcommand(1);
  std::string uri = "ferry+unix://" + std::filesystem::absolute(ferry::daemon::default_socket_path()).lexically_normal().string();
  app.add_option("-c,--connect", uri, "server URI: ferry+unix:///path, ferry+tcp://host:port or ferry+tls://host:port")
      ->capture_default_str();
  ferry::rpc::ClientOptions options;
  options.name = "ferry-cli";
  app.add_option("--tls-ca", options.tls.ca_file, "PEM CAs to check the server's certificate against (default: system)");
  app.add_option("--tls-cert", options.tls.cert_file, "PEM client certificate to show the server");
  app.add_option("--tls-key", options.tls.key_file, "PEM private key of --tls-cert");
  app.add_option("--tls-server-name", options.tls.server_name,
                 "name the server's certificate must carry (default: the URI's host)");
  std::string password_file;
  app.add_option("--sasl-user", options.sasl.username, "SASL user name, for servers that ask (password: "
                                                        "$FERRY_PASSWORD or --sasl-password-file)");
  app.add_option("--sasl-password-file", password_file, "file whose first line is the SASL password");
  app.add_option("--sasl-mech", options.sasl.mechanisms, "acceptable SASL mechanism(s) (default: the server's choice)");

  unsigned ping_count = 5;
  auto* ping = app.add_subcommand("ping", "measure round trips to the server");
  ping->add_option("-n,--count", ping_count, "pings to send")->capture_default_str();

  std::string text = "hello";
  unsigned echo_count = 1, echo_inflight = 128;
  auto* echo = app.add_subcommand("echo", "echo text through the test program (ferryd --test-service)");
  echo->add_option("text", text, "what to send")->capture_default_str();
  echo->add_option("-n,--count", echo_count, "calls to make (more than 1 prints calls/s)")->capture_default_str();
  echo->add_option("--inflight", echo_inflight, "calls in flight at once")->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::warn);

  if (!password_file.empty()) {
    std::FILE* f = std::fopen(password_file.c_str(), "r");
    if (!f) {
      std::fprintf(stderr, "ferry: cannot read %s\n", password_file.c_str());
      return 2;
    }
    char line[1024] = {};
    if (std::fgets(line, sizeof line, f)) options.sasl.password = line;
    std::fclose(f);
    while (!options.sasl.password.empty() &&
           (options.sasl.password.back() == '\n' || options.sasl.password.back() == '\r'))
      options.sasl.password.pop_back();
  } else if (const char* pw = std::getenv("FERRY_PASSWORD")) {
    options.sasl.password = pw;
  }

  try {
    ferry::rpc::IoThreads io(1);
    Client client = Client::connect_sync(io.executor(), uri, options);
    int rc = 0;
    if (*ping) rc = run_ping(client, std::max(1u, ping_count));
    if (*echo) rc = run_echo(client, text, echo_count, std::max(1u, echo_inflight));
    client.close();
    return rc;
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "ferry: %s\n", e.describe().c_str());
    return e.code() == ferry::Code::unavailable ? 3 : 1;
  }
}
