#include "client/nbd_bridge.h"

#include <sys/stat.h>
#include <unistd.h>

#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/post.hpp>
#include <asio/redirect_error.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <condition_variable>
#include <filesystem>
#include <future>
#include <mutex>
#include <set>
#include <spdlog/spdlog.h>

#include "ferry/v1/nbd.ferry.h"
#include "rpc/waker.h"
#include "stream/service.h"

namespace ferry {

namespace {

// Bytes read from an NBD client in one go: a 256 KiB request with its
// header fits, and stream chunks stay full.
constexpr std::size_t read_size = 256u << 10;

// Set once, awaited once, on one single-threaded executor.
class Done {
 public:
  explicit Done(const asio::any_io_executor& ex) : waker_(ex) {}
  void set() {
    done_ = true;
    waker_.wake();
  }
  asio::awaitable<void> wait() {
    while (!done_) co_await waker_.wait();
  }

 private:
  rpc::Waker waker_;
  bool done_ = false;
};

std::pair<std::string, std::string> split_host_port(const std::string& text) {
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon + 1 == text.size())
    throw Error(Code::invalid_argument, "--tcp '" + text + "': expected HOST:PORT", "client");
  std::string host = text.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return {host, text.substr(colon + 1)};
}

}  // namespace

struct NbdBridge::Impl : std::enable_shared_from_this<NbdBridge::Impl> {
  Session& session;
  NbdBridgeOptions options;
  asio::any_io_executor ex;
  std::shared_ptr<rpc::BufferPool> buffers = rpc::BufferPool::create(16u << 20);
  std::unique_ptr<asio::local::stream_protocol::acceptor> unix_acceptor;
  std::unique_ptr<asio::ip::tcp::acceptor> tcp_acceptor;
  std::vector<std::string> uris;
  std::uint64_t size = 0;

  // Touched on the io thread only.
  struct Link {
    std::shared_ptr<stream::Stream> stream;
    std::function<void()> close_socket;
  };
  std::set<std::shared_ptr<Link>> links;
  bool stopping = false;
  std::size_t live = 0;
  NbdBridgeStats stats;

  std::mutex mutex;
  std::condition_variable cv;
  bool finished = false;  // guarded by mutex

  Impl(Session& s, NbdBridgeOptions o) : session(s), options(std::move(o)), ex(s.executor()) {}

  void finish() {
    std::lock_guard lock(mutex);
    finished = true;
    cv.notify_all();
  }

  // On the io thread.
  void stop_here(const std::string& reason) {
    if (stopping) return;
    stopping = true;
    std::error_code ignored;
    if (unix_acceptor) unix_acceptor->close(ignored);
    if (tcp_acceptor) tcp_acceptor->close(ignored);
    if (!options.socket_path.empty()) ::unlink(options.socket_path.c_str());
    for (auto& l : links) {
      if (l->stream) l->stream->abort(Error(Code::cancelled, reason, "client"));
      if (l->close_socket) l->close_socket();
    }
    if (live == 0) finish();
  }

  template <class Acceptor>
  asio::awaitable<void> accept_loop(Acceptor* acceptor) {
    using Socket = typename Acceptor::protocol_type::socket;
    for (;;) {
      std::error_code ec;
      Socket socket = co_await acceptor->async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        if (stopping) co_return;
        spdlog::warn("nbd-serve: accept: {}", ec.message());
        continue;
      }
      if (live >= options.max_connections) {
        spdlog::warn("nbd-serve: refusing an NBD client: {} connections already", live);
        continue;  // the socket closes here
      }
      if constexpr (std::is_same_v<typename Acceptor::protocol_type, asio::ip::tcp>)
        socket.set_option(asio::ip::tcp::no_delay(true), ec);
      auto sock = std::make_shared<Socket>(std::move(socket));
      ++live;
      ++stats.connections;
      auto self = shared_from_this();
      asio::co_spawn(ex, relay(sock.get(), sock), [self](std::exception_ptr) {
        --self->live;
        if (self->options.once) self->stop_here("the NBD client disconnected");
        if (self->stopping && self->live == 0) self->finish();
      });
    }
  }

  // One NBD client <-> one stream. `keep` holds the socket.
  template <class Socket>
  asio::awaitable<void> relay(Socket* socket, std::shared_ptr<Socket> keep) {
    v1::NbdConnectCall call;
    call.set_export_name(options.export_name);
    call.set_read_only(options.read_only);
    auto opened = stream::open<v1::Nbd::Connect>(session.rpc(), call);
    auto link = std::make_shared<Link>();
    link->stream = opened.stream;
    link->close_socket = [keep] {
      std::error_code ignored;
      keep->close(ignored);
    };
    links.insert(link);
    stream::Stream& st = *opened.stream;
    std::uint64_t up_bytes = 0, down_bytes = 0;

    // Daemon -> client, beside the loop below.
    Done down_done(ex);
    std::exception_ptr down_error;
    asio::co_spawn(ex, down(socket, &st, &down_bytes), [&down_done, &down_error, &st, socket](std::exception_ptr e) {
      down_error = e;
      // The daemon ended the NBD session (or failed): the client's socket
      // closes, which also ends the loop below, and a write still waiting
      // for credit the daemon will never grant gives up.
      if (!e && !st.finished_sending()) st.fail(Error(Code::cancelled, "the daemon ended the NBD session", "client"));
      std::error_code ignored;
      socket->shutdown(Socket::shutdown_both, ignored);
      down_done.set();
    });

    // Client -> daemon.
    bool failed = false;
    try {
      for (;;) {
        rpc::Buffer b = buffers->get(read_size);
        std::error_code ec;
        const std::size_t n =
            co_await socket->async_read_some(asio::buffer(b.data(), b.size()), asio::redirect_error(asio::use_awaitable, ec));
        if (ec == asio::error::eof || (ec && st.error())) {
          if (!st.error()) co_await st.finish();
          break;
        }
        if (ec) throw Error(Code::unavailable, "reading from the NBD client: " + ec.message(), "client");
        b.shrink(n);
        up_bytes += n;
        co_await st.write(std::move(b));
      }
    } catch (const Error& e) {
      if (!st.error()) {
        failed = true;
        spdlog::warn("nbd-serve: {}", e.message());
        st.abort(Error(Code::aborted, "the NBD client's connection failed: " + e.message(), "client"));
      }
    }
    co_await down_done.wait();
    links.erase(link);
    std::error_code ignored;
    socket->close(ignored);
    stats.bytes_to_daemon += up_bytes;
    stats.bytes_from_daemon += down_bytes;
    try {
      if (down_error) std::rethrow_exception(down_error);
      auto reply = co_await opened.reply();
      spdlog::info("nbd-serve: NBD client done: {} requests, {} bytes read, {} bytes written", reply.requests(),
                   reply.bytes_read(), reply.bytes_written());
    } catch (const Error& e) {
      if (!failed && !stopping) {
        ++stats.failed;
        spdlog::warn("nbd-serve: NBD session on {} ended: {}", options.export_name, e.describe());
      }
    }
  }

  template <class Socket>
  asio::awaitable<void> down(Socket* socket, stream::Stream* st, std::uint64_t* bytes) {
    for (;;) {
      stream::Item item = co_await st->read();
      if (item.kind == stream::Item::Kind::end) co_return;
      if (item.kind == stream::Item::Kind::hole)
        throw Error(Code::internal, "the daemon sent a hole on an NBD stream", "client");
      std::error_code ec;
      co_await asio::async_write(*socket, asio::buffer(item.data.bytes().data(), item.data.size()),
                                 asio::redirect_error(asio::use_awaitable, ec));
      if (ec) throw Error(Code::unavailable, "writing to the NBD client: " + ec.message(), "client");
      *bytes += item.data.size();
    }
  }
};

NbdBridge::NbdBridge(Session& session, NbdBridgeOptions options)
    : impl_(std::make_shared<Impl>(session, std::move(options))) {
  auto& o = impl_->options;
  if (o.socket_path.empty() && o.tcp.empty())
    throw Error(Code::invalid_argument, "nbd-serve needs --socket PATH or --tcp HOST:PORT", "client");
  // The export must exist: ask the daemon now rather than fail each NBD
  // client's handshake later.
  v1::NbdExportListCall probe;
  probe.set_name(o.export_name);
  auto listed = v1::Nbd::Stub(session.rpc()).export_list_future(probe).get();
  if (listed.exports_size() > 0) impl_->size = listed.exports(0).size();

  if (!o.socket_path.empty()) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_socket(o.socket_path, ec)) fs::remove(o.socket_path, ec);
    auto a = std::make_unique<asio::local::stream_protocol::acceptor>(impl_->ex);
    a->open(asio::local::stream_protocol(), ec);
    if (!ec) a->bind(asio::local::stream_protocol::endpoint(o.socket_path), ec);
    if (!ec && ::chmod(o.socket_path.c_str(), 0600) != 0) ec = std::error_code(errno, std::generic_category());
    if (!ec) a->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) throw Error(Code::unavailable, "cannot listen on " + o.socket_path + ": " + ec.message(), "client");
    impl_->unix_acceptor = std::move(a);
    impl_->uris.push_back("nbd+unix:///?socket=" + o.socket_path);
  }
  if (!o.tcp.empty()) {
    auto [host, port] = split_host_port(o.tcp);
    asio::ip::tcp::resolver resolver(impl_->ex);
    std::error_code ec;
    auto results = resolver.resolve(host, port, asio::ip::tcp::resolver::passive, ec);
    if (ec || results.empty())
      throw Error(Code::invalid_argument, "cannot resolve " + o.tcp + ": " + ec.message(), "client");
    auto ep = results.begin()->endpoint();
    auto a = std::make_unique<asio::ip::tcp::acceptor>(impl_->ex);
    a->open(ep.protocol(), ec);
    if (!ec) a->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) a->bind(ep, ec);
    if (!ec) a->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) throw Error(Code::unavailable, "cannot listen on " + o.tcp + ": " + ec.message(), "client");
    const auto bound = a->local_endpoint();
    const std::string h = bound.address().is_v6() ? "[" + bound.address().to_string() + "]" : bound.address().to_string();
    impl_->uris.push_back("nbd://" + h + ":" + std::to_string(bound.port()));
    impl_->tcp_acceptor = std::move(a);
  }
}

NbdBridge::~NbdBridge() {
  stop("the bridge is closing");
  // Wait for the relays: they use the session, which the caller closes next.
  std::unique_lock lock(impl_->mutex);
  impl_->cv.wait_for(lock, std::chrono::seconds(5), [this] { return impl_->finished; });
}

std::vector<std::string> NbdBridge::uris() const { return impl_->uris; }
std::uint64_t NbdBridge::export_size() const { return impl_->size; }

NbdBridgeStats NbdBridge::run() {
  auto impl = impl_;
  asio::post(impl->ex, [impl] {
    if (impl->stopping) return;
    if (impl->unix_acceptor)
      asio::co_spawn(impl->ex, impl->accept_loop(impl->unix_acceptor.get()), [impl](std::exception_ptr) {});
    if (impl->tcp_acceptor)
      asio::co_spawn(impl->ex, impl->accept_loop(impl->tcp_acceptor.get()), [impl](std::exception_ptr) {});
  });
  std::unique_lock lock(impl->mutex);
  impl->cv.wait(lock, [&] { return impl->finished; });
  lock.unlock();
  std::promise<NbdBridgeStats> stats;
  asio::post(impl->ex, [impl, &stats] { stats.set_value(impl->stats); });
  return stats.get_future().get();
}

void NbdBridge::stop(const std::string& reason) {
  auto impl = impl_;
  asio::post(impl->ex, [impl, reason] { impl->stop_here(reason); });
}

}  // namespace ferry
