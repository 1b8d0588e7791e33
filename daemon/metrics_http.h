// A small HTTP/1.1 endpoint for Prometheus: GET /metrics answers the text
// exposition format 0.0.4; any other path is 404, any other method 405, a
// request that is not HTTP 400. One request per connection (the answer says
// Connection: close); a request may be at most 8 KiB and must arrive within
// 5 s, the answer must leave within 10 s; at most 64 scrapers at once (more
// are closed at accept). Runs on the server's first io thread; building the
// text takes no lock a call needs.
//
// Debian packages prometheus-cpp (1.0), but its exposer brings its own web
// server and threads (civetweb) beside the daemon's fixed set, for what is
// here a page of code on the io threads the daemon already runs.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "rpc/endpoint.h"

namespace asio {
class io_context;
}

namespace ferry::daemon {

class MetricsServer {
 public:
  // Binds host:port (a port of 0 picks one). Throws ferry::Error.
  MetricsServer(asio::io_context& io, const std::string& listen, std::function<std::string()> render);
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // Starts accepting (on `io`).
  void start();
  // Stops accepting and closes open scrapes. Safe to repeat.
  void stop();
  // "127.0.0.1:9470": the bound address.
  std::string address() const;

  class Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace ferry::daemon
