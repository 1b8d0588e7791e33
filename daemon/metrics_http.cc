#include "daemon/metrics_http.h"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/post.hpp>
#include <asio/read_until.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <spdlog/spdlog.h>

#include "rpc/error.h"

namespace ferry::daemon {

namespace {
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);
constexpr std::size_t max_request = 8 << 10;
constexpr std::size_t max_scrapers = 64;
constexpr auto read_timeout = std::chrono::seconds(5);
constexpr auto write_timeout = std::chrono::seconds(10);

std::string response(int status, const char* reason, const std::string& content_type, const std::string& body) {
  std::string out = "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\n";
  out += "Content-Type: " + content_type + "\r\n";
  out += "Content-Length: " + std::to_string(body.size()) + "\r\n";
  out += "Connection: close\r\n\r\n";
  out += body;
  return out;
}

std::string plain(int status, const char* reason, const std::string& text) {
  return response(status, reason, "text/plain; charset=utf-8", text + "\n");
}
}  // namespace

class MetricsServer::Impl : public std::enable_shared_from_this<MetricsServer::Impl> {
 public:
  Impl(asio::io_context& io, std::function<std::string()> render) : io_(io), acceptor_(io), render_(std::move(render)) {}

  asio::io_context& io_;
  asio::ip::tcp::acceptor acceptor_;
  std::function<std::string()> render_;
  std::string address_;
  std::atomic<bool> stopped_{false};
  std::mutex mutex_;
  std::set<std::shared_ptr<asio::ip::tcp::socket>> open_;  // guarded by mutex_

  asio::awaitable<void> accept_loop() {
    auto self = shared_from_this();
    while (!stopped_.load()) {
      auto [ec, socket] = co_await acceptor_.async_accept(use_tuple);
      if (ec == asio::error::operation_aborted || stopped_.load()) break;
      if (ec) {
        spdlog::warn("metrics: accept failed: {}", ec.message());
        asio::steady_timer t(io_, std::chrono::milliseconds(100));
        co_await t.async_wait(use_tuple);
        continue;
      }
      auto s = std::make_shared<asio::ip::tcp::socket>(std::move(socket));
      {
        std::lock_guard lock(mutex_);
        if (open_.size() >= max_scrapers) {
          std::error_code ignore;
          s->close(ignore);
          spdlog::warn("metrics: {} scrapes open already; closing a new connection", max_scrapers);
          continue;
        }
        open_.insert(s);
      }
      asio::co_spawn(io_, serve(s), asio::detached);
    }
  }

  asio::awaitable<void> serve(std::shared_ptr<asio::ip::tcp::socket> socket) {
    auto self = shared_from_this();
    // One timer bounds the whole exchange: reading the request, then writing.
    asio::steady_timer deadline(io_);
    deadline.expires_after(read_timeout);
    deadline.async_wait([socket](std::error_code ec) {
      if (ec) return;
      std::error_code ignore;
      socket->close(ignore);
    });
    std::string request;
    auto buffer = asio::dynamic_buffer(request, max_request);
    auto [ec, n] = co_await asio::async_read_until(*socket, buffer, "\r\n\r\n", use_tuple);
    std::string answer;
    if (ec == asio::error::not_found) {
      answer = plain(431, "Request Header Fields Too Large", "request larger than 8 KiB");
    } else if (ec) {
      finish(socket);  // closed, timed out, reset: nothing to answer
      co_return;
    } else {
      answer = handle(request.substr(0, n));
    }
    deadline.expires_after(write_timeout);
    deadline.async_wait([socket](std::error_code e) {
      if (e) return;
      std::error_code ignore;
      socket->close(ignore);
    });
    const std::string& out = answer;
    co_await asio::async_write(*socket, asio::buffer(out), use_tuple);
    std::error_code ignore;
    socket->shutdown(asio::ip::tcp::socket::shutdown_send, ignore);
    deadline.cancel();
    finish(socket);
  }

  std::string handle(const std::string& head) {
    const auto line_end = head.find("\r\n");
    const std::string line = head.substr(0, line_end);
    const auto sp1 = line.find(' ');
    const auto sp2 = sp1 == std::string::npos ? std::string::npos : line.find(' ', sp1 + 1);
    if (sp1 == std::string::npos || sp2 == std::string::npos || line.compare(sp2 + 1, 5, "HTTP/") != 0)
      return plain(400, "Bad Request", "not an HTTP request");
    const std::string method = line.substr(0, sp1);
    std::string target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    if (auto q = target.find('?'); q != std::string::npos) target.resize(q);
    if (target != "/metrics") return plain(404, "Not Found", "not found; metrics are at /metrics");
    if (method != "GET" && method != "HEAD") return plain(405, "Method Not Allowed", "only GET /metrics");
    std::string body;
    try {
      body = render_();
    } catch (const std::exception& e) {
      spdlog::error("metrics: {}", e.what());
      return plain(500, "Internal Server Error", "metrics unavailable");
    }
    std::string out = response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", body);
    if (method == "HEAD") out.resize(out.size() - body.size());
    return out;
  }

  void finish(const std::shared_ptr<asio::ip::tcp::socket>& socket) {
    std::error_code ignore;
    socket->close(ignore);
    std::lock_guard lock(mutex_);
    open_.erase(socket);
  }
};

MetricsServer::MetricsServer(asio::io_context& io, const std::string& listen, std::function<std::string()> render)
    : impl_(std::make_shared<Impl>(io, std::move(render))) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == listen.size())
    throw Error(Code::invalid_argument, "metrics listen address '" + listen + "' is not HOST:PORT");
  std::string host = listen.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  const std::string port = listen.substr(colon + 1);
  std::error_code ec;
  asio::ip::tcp::resolver resolver(io);
  auto results = resolver.resolve(host, port, asio::ip::tcp::resolver::passive | asio::ip::tcp::resolver::numeric_service, ec);
  if (ec || results.empty())
    throw Error(Code::invalid_argument, "cannot resolve metrics listen address " + listen + ": " + ec.message());
  const auto ep = results.begin()->endpoint();
  auto& a = impl_->acceptor_;
  a.open(ep.protocol(), ec);
  if (!ec) a.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) a.bind(ep, ec);
  if (!ec) a.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) throw Error(Code::unavailable, "cannot listen for metrics on " + listen + ": " + ec.message());
  const auto bound = a.local_endpoint();
  impl_->address_ = (bound.address().is_v6() ? "[" + bound.address().to_string() + "]" : bound.address().to_string()) +
                    ":" + std::to_string(bound.port());
  spdlog::info("metrics on http://{}/metrics", impl_->address_);
}

MetricsServer::~MetricsServer() { stop(); }

void MetricsServer::start() { asio::co_spawn(impl_->io_, impl_->accept_loop(), asio::detached); }

void MetricsServer::stop() {
  if (impl_->stopped_.exchange(true)) return;
  auto impl = impl_;
  asio::post(impl->io_, [impl] {
    std::error_code ignore;
    impl->acceptor_.close(ignore);
    std::lock_guard lock(impl->mutex_);
    for (auto& s : impl->open_) s->close(ignore);
  });
}

std::string MetricsServer::address() const { return impl_->address_; }

}  // namespace ferry::daemon
