// ferry._ferry: the Python binding of libferry (docs/python.md).
//
// Built on ferry::Session (the connection, its io thread, file transfers)
// and, for everything that waits, on the asynchronous forms underneath it:
// rpc::Client::async_call and the coroutine methods of stream::Stream, whose
// completions either wake a blocked Python thread (Waiter) or resolve an
// asyncio future through loop.call_soon_threadsafe (deliver()).
//
// GIL rules:
//  - A Python thread never waits with the GIL held. It waits in slices of
//    kSlice; between slices it takes the GIL back and runs the signal
//    handlers (PyErr_CheckSignals), so Ctrl-C works. When a handler raises,
//    the operation is cancelled (the daemon sees it at once) and the
//    exception propagates.
//  - Completions run on the session's io thread; they take the GIL only to
//    hand a result to Python, never while holding a lock of ours.
//  - Python objects kept by C++ callbacks are held through PyRef, which
//    takes the GIL to drop them, whatever thread that happens on.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <asio/co_spawn.hpp>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <sstream>
#include <string>
#include <thread>

#include "client/session.h"
#include "ferry/v1/volume.ferry.h"
#include "stream/service.h"

namespace py = pybind11;
using namespace std::chrono_literals;

namespace ferry::python {
namespace {

using v1::Volume;
constexpr auto kSlice = 100ms;

// --------------------------------------------------------------------------
// Errors

py::object error_type() {
  return py::module_::import("ferry._error").attr("Error");
}

py::object make_py_error(const Error& e) {
  return error_type()(static_cast<int>(e.code()), e.message(), e.domain(), e.retryable());
}

py::object make_py_error(std::exception_ptr p) {
  try {
    std::rethrow_exception(p);
  } catch (const Error& e) {
    return make_py_error(e);
  } catch (...) {
    return make_py_error(Error::from_exception(std::current_exception()));
  }
}

// --------------------------------------------------------------------------
// Python objects owned by C++ callbacks running on other threads.

struct PyRef {
  py::object obj;
  explicit PyRef(py::object o) : obj(std::move(o)) {}
  PyRef(const PyRef&) = delete;
  PyRef& operator=(const PyRef&) = delete;
  ~PyRef() {
    if (!Py_IsInitialized() || _Py_IsFinalizing()) {
      obj.release();  // the interpreter is gone or going: leak rather than crash
      return;
    }
    py::gil_scoped_acquire gil;
    obj = py::object();
  }
};
using PyRefPtr = std::shared_ptr<PyRef>;
PyRefPtr keep(py::object o) { return std::make_shared<PyRef>(std::move(o)); }

// Hands a result (or an error) to an asyncio future from any thread.
// `make` builds the Python value with the GIL held.
template <class Make>
void deliver(const PyRefPtr& future, std::exception_ptr error, Make&& make) {
  if (!Py_IsInitialized() || _Py_IsFinalizing()) return;
  py::gil_scoped_acquire gil;
  try {
    py::object value = py::none();
    py::object exc = py::none();
    if (error) {
      exc = make_py_error(error);
    } else {
      try {
        value = make();
      } catch (py::error_already_set& e) {
        exc = e.value();
      } catch (...) {
        exc = make_py_error(std::current_exception());
      }
    }
    auto resolve = py::module_::import("ferry.aio").attr("_resolve");
    future->obj.attr("get_loop")().attr("call_soon_threadsafe")(resolve, future->obj, value, exc);
  } catch (py::error_already_set& e) {
    // The loop is closed: nobody is waiting any more.
    e.discard_as_unraisable("ferry: delivering a result to a closed event loop");
  }
}

// --------------------------------------------------------------------------
// Blocking waits that stay interruptible.

struct Waiter {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  void signal() {
    {
      std::lock_guard lock(mutex);
      done = true;
    }
    cv.notify_all();
  }
};

// Called with the GIL held; returns with it held. Waits until `w` is
// signalled. If a signal handler raises meanwhile, runs `on_interrupt`
// (without the GIL) and rethrows the handler's exception.
template <class OnInterrupt>
void wait_interruptible(Waiter& w, OnInterrupt&& on_interrupt) {
  for (;;) {
    {
      py::gil_scoped_release nogil;
      std::unique_lock lock(w.mutex);
      if (w.cv.wait_for(lock, kSlice, [&] { return w.done; })) return;
    }
    if (PyErr_CheckSignals() != 0) {
      py::error_already_set raised;
      {
        py::gil_scoped_release nogil;
        on_interrupt();
      }
      throw raised;
    }
  }
}

// Runs a coroutine on `ex` and waits for it from Python, interruptibly.
template <class T>
struct Outcome {
  Waiter waiter;
  std::exception_ptr error;
  std::optional<T> value;
};
template <>
struct Outcome<void> {
  Waiter waiter;
  std::exception_ptr error;
};

template <class T, class OnInterrupt>
T run_blocking(asio::any_io_executor ex, asio::awaitable<T> op, OnInterrupt&& on_interrupt) {
  auto out = std::make_shared<Outcome<T>>();
  if constexpr (std::is_void_v<T>) {
    asio::co_spawn(ex, std::move(op), [out](std::exception_ptr e) {
      out->error = e;
      out->waiter.signal();
    });
  } else {
    asio::co_spawn(ex, std::move(op), [out](std::exception_ptr e, T v) {
      out->error = e;
      if (!e) out->value.emplace(std::move(v));
      out->waiter.signal();
    });
  }
  wait_interruptible(out->waiter, on_interrupt);
  if (out->error) std::rethrow_exception(out->error);
  if constexpr (!std::is_void_v<T>) return std::move(*out->value);
}

// Runs a coroutine on `ex` and resolves an asyncio future with make(result).
template <class T, class Make>
void run_async(asio::any_io_executor ex, asio::awaitable<T> op, py::object future, Make make) {
  auto target = keep(std::move(future));
  if constexpr (std::is_void_v<T>) {
    asio::co_spawn(ex, std::move(op), [target, make](std::exception_ptr e) { deliver(target, e, make); });
  } else {
    asio::co_spawn(ex, std::move(op), [target, make](std::exception_ptr e, T v) {
      deliver(target, e, [&] { return make(std::move(v)); });
    });
  }
}

// --------------------------------------------------------------------------
// Argument checks (the Python exceptions Python users expect).

std::uint64_t to_u64(const py::handle& value, const char* what) {
  if (!PyLong_Check(value.ptr()) || PyBool_Check(value.ptr()))
    throw py::type_error(std::string(what) + " must be an int, not " + std::string(py::str(value.get_type().attr("__name__"))));
  if (value.cast<py::int_>() < py::int_(0)) throw py::value_error(std::string(what) + " must not be negative");
  const unsigned long long v = PyLong_AsUnsignedLongLong(value.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(what) + " does not fit in 64 bits");
  }
  return v;
}

std::optional<std::uint64_t> to_opt_u64(const py::object& value, const char* what) {
  if (value.is_none()) return std::nullopt;
  return to_u64(value, what);
}

void require_name(const std::string& value, const char* what) {
  if (value.empty()) throw py::value_error(std::string(what) + " must not be empty");
}

v1::VolumeRef ref(const std::string& pool, const std::string& name) {
  require_name(pool, "pool");
  require_name(name, "name");
  v1::VolumeRef r;
  r.set_pool(pool);
  r.set_name(name);
  return r;
}

// --------------------------------------------------------------------------
// Results as Python objects

std::string quote(const std::string& s) { return py::repr(py::str(s)); }

std::string repr(const v1::VolumeInfo& v) {
  std::ostringstream o;
  o << "VolumeInfo(pool=" << quote(v.pool()) << ", name=" << quote(v.name()) << ", capacity=" << v.capacity()
    << ", allocation=" << v.allocation() << ", writing=" << (v.writing() ? "True" : "False")
    << ", readers=" << v.readers() << ", modified_ns=" << v.modified_ns();
  if (!v.state().empty()) o << ", state=" << quote(v.state()) << ", state_detail=" << quote(v.state_detail());
  o << ")";
  return o.str();
}

std::string repr(const v1::PoolInfo& p) {
  std::ostringstream o;
  o << "PoolInfo(name=" << quote(p.name()) << ", path=" << quote(p.path())
    << ", read_only=" << (p.read_only() ? "True" : "False") << ", capacity=" << p.capacity()
    << ", available=" << p.available() << ", volumes=" << p.volumes() << ", allocation=" << p.allocation() << ")";
  return o.str();
}

const char* event_kind_name(v1::VolumeEventKind k) {
  switch (k) {
    case v1::VOLUME_CREATED: return "CREATED";
    case v1::VOLUME_DELETED: return "DELETED";
    case v1::VOLUME_RESIZED: return "RESIZED";
    case v1::VOLUME_WRITTEN: return "WRITTEN";
    default: return "UNSPECIFIED";
  }
}

double seconds(std::chrono::steady_clock::duration d) { return std::chrono::duration<double>(d).count(); }

// --------------------------------------------------------------------------
// Session

struct SessionState {
  std::unique_ptr<Session> session;
  std::optional<std::chrono::milliseconds> timeout;  // per call
  // Held shared by every operation using `session`; close() takes it
  // exclusively, so the session never goes away under a caller.
  std::shared_mutex lifetime;
  bool closed = false;
  // Raw streams open now, so close() can abort them.
  std::mutex streams_mutex;
  std::set<std::shared_ptr<stream::Stream>> streams;

  rpc::CallOptions call_options(std::shared_ptr<rpc::CancelSource> cancel = nullptr) const {
    rpc::CallOptions o;
    if (timeout) o.timeout = *timeout;
    o.cancel = std::move(cancel);
    return o;
  }

  void add_stream(const std::shared_ptr<stream::Stream>& s) {
    std::lock_guard lock(streams_mutex);
    streams.insert(s);
  }
  void remove_stream(const std::shared_ptr<stream::Stream>& s) {
    std::lock_guard lock(streams_mutex);
    streams.erase(s);
  }

  void close() {
    {
      std::lock_guard lock(streams_mutex);
      for (auto& s : streams) s->abort(Error(Code::cancelled, "the session was closed", "client"));
      streams.clear();
    }
    {
      std::shared_lock lock(lifetime, std::try_to_lock);
      if (lock && session) session->abort_transfers("the session was closed");
    }
    std::unique_lock lock(lifetime);
    if (closed) return;
    closed = true;
    if (session) session->close();
  }
};
using StatePtr = std::shared_ptr<SessionState>;

// Proof that the session stays open while it lives.
class Use {
 public:
  explicit Use(const StatePtr& state) : state_(state), lock_(state->lifetime, std::try_to_lock) {
    if (!lock_ || state_->closed) throw py::value_error("operation on a closed ferry session");
  }
  Session& session() { return *state_->session; }
  rpc::Client& client() { return state_->session->rpc(); }

 private:
  StatePtr state_;
  std::shared_lock<std::shared_mutex> lock_;
};

template <class P>
typename P::Reply call_blocking(const StatePtr& state, const typename P::Call& call) {
  using Reply = typename P::Reply;
  struct Result {
    Waiter waiter;
    std::exception_ptr error;
    Reply reply;
  };
  auto result = std::make_shared<Result>();
  auto cancel = std::make_shared<rpc::CancelSource>();
  {
    Use use(state);
    use.client().async_call<P>(call, state->call_options(cancel), [result](std::exception_ptr e, Reply r) {
      result->error = e;
      result->reply = std::move(r);
      result->waiter.signal();
    });
  }
  wait_interruptible(result->waiter, [&] { cancel->cancel(); });
  if (result->error) std::rethrow_exception(result->error);
  return std::move(result->reply);
}

template <class P, class Make>
std::shared_ptr<rpc::CancelSource> call_async(const StatePtr& state, const typename P::Call& call,
                                              py::object future, Make make) {
  using Reply = typename P::Reply;
  auto cancel = std::make_shared<rpc::CancelSource>();
  auto target = keep(std::move(future));
  Use use(state);
  use.client().async_call<P>(call, state->call_options(cancel), [target, make](std::exception_ptr e, Reply r) {
    deliver(target, e, [&] { return make(std::move(r)); });
  });
  return cancel;
}

// Options passed from Python keyword arguments.
rpc::ClientOptions client_options(const py::object& tls_ca, const py::object& tls_cert, const py::object& tls_key,
                                  const py::object& tls_server_name, const py::object& sasl_user,
                                  const py::object& sasl_password, const py::object& sasl_realm,
                                  const py::object& sasl_mechanisms, const py::object& client_name, bool reconnect,
                                  const py::object& timeout, std::optional<std::chrono::milliseconds>& call_timeout) {
  auto str_or_empty = [](const py::object& o, const char* what) -> std::string {
    if (o.is_none()) return {};
    if (py::isinstance<py::str>(o)) return o.cast<std::string>();
    auto os = py::module_::import("os");
    if (py::isinstance(o, os.attr("PathLike"))) return py::str(os.attr("fspath")(o)).cast<std::string>();
    throw py::type_error(std::string(what) + " must be a str or None");
  };
  rpc::ClientOptions o;
  o.tls.ca_file = str_or_empty(tls_ca, "tls_ca");
  o.tls.cert_file = str_or_empty(tls_cert, "tls_cert");
  o.tls.key_file = str_or_empty(tls_key, "tls_key");
  o.tls.server_name = str_or_empty(tls_server_name, "tls_server_name");
  if (o.tls.cert_file.empty() != o.tls.key_file.empty())
    throw py::value_error("tls_cert and tls_key go together: give both or neither");
  o.sasl.username = str_or_empty(sasl_user, "sasl_user");
  o.sasl.password = str_or_empty(sasl_password, "sasl_password");
  o.sasl.realm = str_or_empty(sasl_realm, "sasl_realm");
  if (!sasl_mechanisms.is_none()) {
    if (py::isinstance<py::str>(sasl_mechanisms)) throw py::type_error("sasl_mechanisms must be a list of str");
    for (auto m : sasl_mechanisms) o.sasl.mechanisms.push_back(m.cast<std::string>());
  }
  if (!o.sasl.password.empty() && o.sasl.username.empty()) throw py::value_error("sasl_password needs sasl_user");
  if (!client_name.is_none()) o.name = str_or_empty(client_name, "client_name");
  o.reconnect.enabled = reconnect;
  if (!timeout.is_none()) {
    if (!PyFloat_Check(timeout.ptr()) && !PyLong_Check(timeout.ptr()))
      throw py::type_error("timeout must be a number of seconds or None");
    const double t = timeout.cast<double>();
    if (!(t > 0)) throw py::value_error("timeout must be positive");
    call_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(t * 1000));
    o.connect_timeout = *call_timeout;
  }
  return o;
}

StatePtr connect_state(const std::string& uri, rpc::ClientOptions options,
                       std::optional<std::chrono::milliseconds> timeout) {
  auto state = std::make_shared<SessionState>();
  state->timeout = timeout;
  py::gil_scoped_release nogil;
  state->session = std::make_unique<Session>(Session::connect(uri, std::move(options)));
  return state;
}

// The Python Session object.
class PySession {
 public:
  explicit PySession(StatePtr state) : state_(std::move(state)) {}
  ~PySession() {
    // Closing waits for the io thread, which may want the GIL for an event.
    py::gil_scoped_release nogil;
    state_->close();
  }
  const StatePtr& state() const { return state_; }

  void close() {
    py::gil_scoped_release nogil;
    state_->close();
  }
  bool closed() const { return state_->closed; }

 private:
  StatePtr state_;
};

// --------------------------------------------------------------------------
// File transfers: the work runs on a thread of its own (the file I/O and the
// stream), the calling thread waits interruptibly; a KeyboardInterrupt
// cancels just this transfer.

struct Transfer {
  Waiter waiter;
  std::exception_ptr error;
  TransferResult result;
  std::shared_ptr<rpc::CancelSource> cancel = std::make_shared<rpc::CancelSource>();
  // An exception the progress callback raised (kept to re-raise it).
  std::mutex progress_mutex;
  std::optional<py::error_already_set> progress_error;
};

ProgressFn progress_fn(const py::object& callback, const std::shared_ptr<Transfer>& t) {
  if (callback.is_none()) return {};
  if (!PyCallable_Check(callback.ptr())) throw py::type_error("progress must be callable");
  auto fn = keep(callback);
  std::weak_ptr<Transfer> weak = t;
  return [fn, weak](const Progress& p) {
    auto transfer = weak.lock();
    if (!transfer) return;
    py::gil_scoped_acquire gil;
    {
      std::lock_guard lock(transfer->progress_mutex);
      if (transfer->progress_error) return;
    }
    try {
      fn->obj(p);
    } catch (py::error_already_set& e) {
      std::lock_guard lock(transfer->progress_mutex);
      transfer->progress_error.emplace(std::move(e));
      transfer->cancel->cancel();
    }
  };
}

template <class Work>
TransferResult run_transfer(const StatePtr& state, const std::shared_ptr<Transfer>& t, Work work) {
  { Use check(state); }  // fails at once (ValueError) on a closed session
  std::thread worker([t, state, work = std::move(work)]() mutable {
    try {
      Use use(state);
      t->result = work(use.session(), t->cancel);
    } catch (...) {
      t->error = std::current_exception();
    }
    t->waiter.signal();
  });
  try {
    wait_interruptible(t->waiter, [&] {
      t->cancel->cancel();
      worker.join();
    });
  } catch (...) {
    if (worker.joinable()) {
      py::gil_scoped_release nogil;
      worker.join();
    }
    throw;
  }
  {
    py::gil_scoped_release nogil;
    worker.join();
  }
  {
    std::lock_guard lock(t->progress_mutex);
    if (t->progress_error) {
      py::error_already_set e = std::move(*t->progress_error);
      t->progress_error.reset();
      throw e;
    }
  }
  if (t->error) std::rethrow_exception(t->error);
  return std::move(t->result);
}

std::string path_arg(const py::object& path) {
  auto os = py::module_::import("os");
  py::object p = os.attr("fspath")(path);
  if (!py::isinstance<py::str>(p)) throw py::type_error("path must be a str or os.PathLike of str");
  return p.cast<std::string>();
}

// --------------------------------------------------------------------------
// Raw streams

// Received data handed to Python: exposes the chunk's bytes through the
// buffer protocol, read-only, without copying; dropping the last view gives
// the buffer back and the credit to the daemon.
struct PyChunk {
  stream::Chunk chunk;
};

class UploadBase {
 public:
  UploadBase(StatePtr state, stream::ClientStream<v1::VolUploadReply> open)
      : state_(std::move(state)), open_(std::move(open)), connection_(state_->session->rpc().connection()),
        executor_(connection_ ? connection_->get_executor() : state_->session->executor()),
        chunk_(state_->session->rpc().stream_limits().chunk_size) {
    state_->add_stream(open_.stream);
  }
  ~UploadBase() {
    if (open_.stream && !finished_) open_.stream->abort(Error(Code::cancelled, "upload abandoned by the client", "client"));
    state_->remove_stream(open_.stream);
  }

 protected:
  // Copies the caller's bytes once, into pooled buffers of the chunk size.
  std::vector<rpc::Buffer> copy_in(const py::object& data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      throw py::type_error("write() takes a bytes-like object (C-contiguous buffer), not " +
                           std::string(py::str(data.get_type().attr("__name__"))));
    }
    std::vector<rpc::Buffer> pieces;
    try {
      py::gil_scoped_release nogil;
      const auto* p = static_cast<const std::uint8_t*>(view.buf);
      std::size_t left = static_cast<std::size_t>(view.len);
      while (left > 0) {
        const std::size_t n = std::min(left, chunk_);
        rpc::Buffer b = connection_ ? connection_->pool().get(n) : rpc::Buffer(n);
        std::memcpy(b.data(), p, n);
        pieces.push_back(std::move(b));
        p += n;
        left -= n;
      }
    } catch (...) {
      PyBuffer_Release(&view);
      throw;
    }
    PyBuffer_Release(&view);
    return pieces;
  }
  void check_open() const {
    if (finished_) throw py::value_error("the upload stream has finished");
  }
  void abort_now(const std::string& reason) {
    if (open_.stream) open_.stream->abort(Error(Code::cancelled, reason, "client"));
  }

  StatePtr state_;
  stream::ClientStream<v1::VolUploadReply> open_;
  std::shared_ptr<rpc::Connection> connection_;
  asio::any_io_executor executor_;
  std::size_t chunk_;
  bool finished_ = false;
};

asio::awaitable<void> write_all(std::shared_ptr<stream::Stream> s, std::vector<rpc::Buffer> pieces) {
  for (auto& b : pieces) co_await s->write(std::move(b));
}
asio::awaitable<void> write_hole(std::shared_ptr<stream::Stream> s, std::uint64_t n) { co_await s->write_hole(n); }
asio::awaitable<v1::VolUploadReply> finish_upload(std::shared_ptr<stream::Stream> s,
                                                   stream::ClientStream<v1::VolUploadReply> open) {
  co_await s->finish();
  co_return co_await open.reply();
}
asio::awaitable<v1::VolDownloadReply> download_reply(stream::ClientStream<v1::VolDownloadReply> open) {
  co_return co_await open.reply();
}
asio::awaitable<stream::Item> read_item(std::shared_ptr<stream::Stream> s) { co_return co_await s->read(); }

class PyUploadStream : public UploadBase {
 public:
  using UploadBase::UploadBase;

  void write(const py::object& data) {
    check_open();
    Use use(state_);
    auto pieces = copy_in(data);
    if (pieces.empty()) return;
    run_blocking(executor_, write_all(open_.stream, std::move(pieces)),
                 [this] { abort_now("upload interrupted"); });
  }
  void write_hole(const py::object& length) {
    check_open();
    const std::uint64_t n = to_u64(length, "length");
    if (n == 0) return;
    Use use(state_);
    run_blocking(executor_, python::write_hole(open_.stream, n), [this] { abort_now("upload interrupted"); });
  }
  v1::VolUploadReply finish() {
    check_open();
    Use use(state_);
    auto reply = run_blocking(executor_, finish_upload(open_.stream, open_), [this] { abort_now("upload interrupted"); });
    finished_ = true;
    return reply;
  }
  void abort(const std::string& reason) {
    if (finished_) return;
    finished_ = true;
    abort_now(reason);
  }
  std::uint64_t bytes_sent() const { return open_.stream->bytes_sent(); }
  bool finished() const { return finished_; }
};

class PyAsyncUploadStream : public UploadBase {
 public:
  using UploadBase::UploadBase;

  void write(py::object future, const py::object& data) {
    check_open();
    Use use(state_);
    auto pieces = copy_in(data);
    run_async(executor_, write_all(open_.stream, std::move(pieces)), std::move(future), [] { return py::none(); });
  }
  void write_hole(py::object future, const py::object& length) {
    check_open();
    Use use(state_);
    run_async(executor_, python::write_hole(open_.stream, to_u64(length, "length")), std::move(future),
              [] { return py::none(); });
  }
  void finish(py::object future) {
    check_open();
    Use use(state_);
    finished_ = true;
    run_async(executor_, finish_upload(open_.stream, open_), std::move(future),
              [](v1::VolUploadReply r) { return py::cast(std::move(r)); });
  }
  void abort(const std::string& reason) {
    if (finished_) return;
    finished_ = true;
    abort_now(reason);
  }
  std::uint64_t bytes_sent() const { return open_.stream->bytes_sent(); }
  bool finished() const { return finished_; }
};

class DownloadBase {
 public:
  DownloadBase(StatePtr state, stream::ClientStream<v1::VolDownloadReply> open)
      : state_(std::move(state)), open_(std::move(open)), connection_(state_->session->rpc().connection()),
        executor_(connection_ ? connection_->get_executor() : state_->session->executor()) {
    state_->add_stream(open_.stream);
  }
  ~DownloadBase() {
    if (open_.stream && !finished_ && !ended_)
      open_.stream->abort(Error(Code::cancelled, "download abandoned by the client", "client"));
    state_->remove_stream(open_.stream);
  }

 protected:
  // An Item as (kind, payload): ("data", memoryview), ("hole", length), ("end", None).
  py::object convert(stream::Item item) {
    switch (item.kind) {
      case stream::Item::Kind::data: {
        py::object chunk = py::cast(PyChunk{std::move(item.data)});
        return py::make_tuple("data", py::memoryview(chunk));
      }
      case stream::Item::Kind::hole:
        return py::make_tuple("hole", item.length);
      case stream::Item::Kind::end:
        break;
    }
    ended_ = true;
    return py::make_tuple("end", py::none());
  }
  void abort_now(const std::string& reason) {
    if (open_.stream) open_.stream->abort(Error(Code::cancelled, reason, "client"));
  }

  StatePtr state_;
  stream::ClientStream<v1::VolDownloadReply> open_;
  std::shared_ptr<rpc::Connection> connection_;
  asio::any_io_executor executor_;
  bool finished_ = false;
  bool ended_ = false;
};

class PyDownloadStream : public DownloadBase {
 public:
  using DownloadBase::DownloadBase;

  py::object read() {
    if (ended_ || finished_) return py::make_tuple("end", py::none());
    pending_.reset();
    pending_hole_ = 0;
    return convert(next());
  }

  // Fills `buffer` with the next bytes of the range (holes as zeros);
  // returns how many, 0 at the end.
  std::size_t readinto(const py::object& buffer) {
    Py_buffer view;
    if (PyObject_GetBuffer(buffer.ptr(), &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      throw py::type_error("readinto() takes a writable bytes-like object");
    }
    std::size_t filled = 0;
    try {
      auto* out = static_cast<std::uint8_t*>(view.buf);
      const auto size = static_cast<std::size_t>(view.len);
      while (filled < size) {
        if (pending_ && pending_offset_ < pending_->size()) {
          const std::size_t n = std::min(size - filled, pending_->size() - pending_offset_);
          std::memcpy(out + filled, pending_->bytes().data() + pending_offset_, n);
          pending_offset_ += n;
          filled += n;
          continue;
        }
        if (pending_hole_ > 0) {
          const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(size - filled, pending_hole_));
          std::memset(out + filled, 0, n);
          pending_hole_ -= n;
          filled += n;
          continue;
        }
        pending_.reset();
        if (ended_ || finished_) break;
        // Like RawIOBase.readinto: what one piece gave, without waiting for more.
        if (filled > 0) break;
        stream::Item item = next();
        if (item.kind == stream::Item::Kind::end) {
          ended_ = true;
          break;
        }
        if (item.kind == stream::Item::Kind::hole) {
          pending_hole_ = item.length;
        } else {
          pending_ = std::move(item.data);
          pending_offset_ = 0;
        }
      }
    } catch (...) {
      PyBuffer_Release(&view);
      throw;
    }
    PyBuffer_Release(&view);
    return filled;
  }

  v1::VolDownloadReply finish() {
    if (finished_) throw py::value_error("the download stream has finished");
    if (!ended_) throw py::value_error("finish() before the end of the download: read to the end, or abort()");
    Use use(state_);
    auto reply = run_blocking(executor_, download_reply(open_), [this] { abort_now("download interrupted"); });
    finished_ = true;
    return reply;
  }
  void abort(const std::string& reason) {
    if (finished_) return;
    finished_ = true;
    pending_.reset();
    abort_now(reason);
  }
  bool ended() const { return ended_; }
  bool finished() const { return finished_; }

 private:
  stream::Item next() {
    Use use(state_);
    return run_blocking(executor_, read_item(open_.stream), [this] { abort_now("download interrupted"); });
  }
  std::optional<stream::Chunk> pending_;
  std::size_t pending_offset_ = 0;
  std::uint64_t pending_hole_ = 0;
};

class PyAsyncDownloadStream : public DownloadBase {
 public:
  using DownloadBase::DownloadBase;

  void read(py::object future) {
    if (ended_ || finished_) {
      deliver(keep(std::move(future)), nullptr, [] { return py::make_tuple("end", py::none()); });
      return;
    }
    // `this` outlives the read: the Python wrapper keeps a reference to the
    // stream object until the future is resolved.
    Use use(state_);
    run_async(executor_, read_item(open_.stream), std::move(future),
              [this](stream::Item item) { return convert(std::move(item)); });
  }
  void finish(py::object future) {
    if (finished_) throw py::value_error("the download stream has finished");
    if (!ended_) throw py::value_error("finish() before the end of the download: read to the end, or abort()");
    Use use(state_);
    finished_ = true;
    run_async(executor_, download_reply(open_), std::move(future),
              [](v1::VolDownloadReply r) { return py::cast(std::move(r)); });
  }
  void abort(const std::string& reason) {
    if (finished_) return;
    finished_ = true;
    abort_now(reason);
  }
  bool ended() const { return ended_; }
  bool finished() const { return finished_; }
};

v1::VolUploadCall upload_call(const std::string& pool, const std::string& name, const py::object& offset,
                              const py::object& length, bool atomic, bool keep_capacity, bool no_sync) {
  v1::VolUploadCall call;
  *call.mutable_volume() = ref(pool, name);
  call.set_offset(to_u64(offset, "offset"));
  if (auto l = to_opt_u64(length, "length")) call.set_length(*l);
  call.set_atomic(atomic);
  call.set_keep_capacity(keep_capacity);
  call.set_no_sync(no_sync);
  return call;
}

v1::VolDownloadCall download_call(const std::string& pool, const std::string& name, const py::object& offset,
                                  const py::object& length, bool dense, bool detect_zeros, bool digest) {
  v1::VolDownloadCall call;
  *call.mutable_volume() = ref(pool, name);
  call.set_offset(to_u64(offset, "offset"));
  if (auto l = to_opt_u64(length, "length")) call.set_length(*l);
  call.set_dense(dense);
  call.set_detect_zeros(detect_zeros);
  call.set_digest(digest);
  return call;
}

template <class Reply, class F>
py::object list_of(const Reply& r, F field) {
  py::list out;
  for (const auto& x : field(r)) out.append(py::cast(x));
  return out;
}

// Event subscription: `callback(event)` on the io thread, with the GIL.
std::function<void(const v1::VolumeEvent&)> event_fn(py::object callback) {
  auto fn = keep(std::move(callback));
  return [fn](const v1::VolumeEvent& e) {
    if (!Py_IsInitialized() || _Py_IsFinalizing()) return;
    py::gil_scoped_acquire gil;
    try {
      fn->obj(e);
    } catch (py::error_already_set& err) {
      err.discard_as_unraisable("ferry event callback");
    }
  };
}

}  // namespace
}  // namespace ferry::python

using namespace ferry;
using namespace ferry::python;

PYBIND11_MODULE(_ferry, m) {
  m.doc() = "libferry binding (use the `ferry` package, not this module)";

  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    try {
      std::rethrow_exception(p);
    } catch (const ferry::Error& e) {
      py::object err = make_py_error(e);
      PyErr_SetObject(error_type().ptr(), err.ptr());
    }
  });

  m.def("code_name", [](int code) { return std::string(to_string(static_cast<Code>(code))); });

  // ---- results
  py::class_<v1::PoolInfo>(m, "PoolInfo", "A storage pool (ferry.v1.PoolInfo).")
      .def_property_readonly("name", &v1::PoolInfo::name)
      .def_property_readonly("path", &v1::PoolInfo::path)
      .def_property_readonly("read_only", &v1::PoolInfo::read_only)
      .def_property_readonly("capacity", &v1::PoolInfo::capacity)
      .def_property_readonly("available", &v1::PoolInfo::available)
      .def_property_readonly("volumes", &v1::PoolInfo::volumes)
      .def_property_readonly("allocation", &v1::PoolInfo::allocation)
      .def("__repr__", [](const v1::PoolInfo& p) { return repr(p); });

  py::class_<v1::VolumeInfo>(m, "VolumeInfo", "A volume (ferry.v1.VolumeInfo).")
      .def_property_readonly("pool", &v1::VolumeInfo::pool)
      .def_property_readonly("name", &v1::VolumeInfo::name)
      .def_property_readonly("capacity", &v1::VolumeInfo::capacity)
      .def_property_readonly("allocation", &v1::VolumeInfo::allocation)
      .def_property_readonly("writing", &v1::VolumeInfo::writing)
      .def_property_readonly("readers", &v1::VolumeInfo::readers)
      .def_property_readonly("modified_ns", &v1::VolumeInfo::modified_ns)
      .def_property_readonly("state", &v1::VolumeInfo::state)
      .def_property_readonly("state_detail", &v1::VolumeInfo::state_detail)
      .def("__repr__", [](const v1::VolumeInfo& v) { return repr(v); });

  py::enum_<v1::VolumeEventKind>(m, "VolumeEventKind", "What happened to a volume.")
      .value("UNSPECIFIED", v1::VOLUME_EVENT_UNSPECIFIED)
      .value("CREATED", v1::VOLUME_CREATED)
      .value("DELETED", v1::VOLUME_DELETED)
      .value("RESIZED", v1::VOLUME_RESIZED)
      .value("WRITTEN", v1::VOLUME_WRITTEN);

  py::class_<v1::VolumeEvent>(m, "VolumeEvent", "A volume event pushed by the daemon (ferry.v1.VolumeEvent).")
      .def_property_readonly("kind", &v1::VolumeEvent::kind)
      .def_property_readonly("pool", [](const v1::VolumeEvent& e) { return e.volume().pool(); })
      .def_property_readonly("name", [](const v1::VolumeEvent& e) { return e.volume().name(); })
      .def_property_readonly("capacity", &v1::VolumeEvent::capacity)
      .def_property_readonly("detail", &v1::VolumeEvent::detail)
      .def_property_readonly("time_ns", &v1::VolumeEvent::time_ns)
      .def("__repr__", [](const v1::VolumeEvent& e) {
        return "VolumeEvent(kind=" + std::string(event_kind_name(e.kind())) + ", pool=" + quote(e.volume().pool()) +
               ", name=" + quote(e.volume().name()) + ", capacity=" + std::to_string(e.capacity()) +
               ", detail=" + quote(e.detail()) + ", time_ns=" + std::to_string(e.time_ns()) + ")";
      });

  py::class_<v1::VolUploadReply>(m, "UploadReply", "The daemon's answer to an upload (ferry.v1.VolUploadReply).")
      .def_property_readonly("data_bytes", &v1::VolUploadReply::data_bytes)
      .def_property_readonly("hole_bytes", &v1::VolUploadReply::hole_bytes)
      .def_property_readonly("volume", [](const v1::VolUploadReply& r) { return r.volume(); })
      .def("__repr__", [](const v1::VolUploadReply& r) {
        return "UploadReply(data_bytes=" + std::to_string(r.data_bytes()) +
               ", hole_bytes=" + std::to_string(r.hole_bytes()) + ", volume=" + repr(r.volume()) + ")";
      });

  py::class_<v1::VolDownloadReply>(m, "DownloadReply",
                                   "The daemon's answer to a download (ferry.v1.VolDownloadReply).")
      .def_property_readonly("data_bytes", &v1::VolDownloadReply::data_bytes)
      .def_property_readonly("hole_bytes", &v1::VolDownloadReply::hole_bytes)
      .def_property_readonly("capacity", &v1::VolDownloadReply::capacity)
      .def_property_readonly("digest", [](const v1::VolDownloadReply& r) { return py::bytes(r.digest()); })
      .def("__repr__", [](const v1::VolDownloadReply& r) {
        std::string s = "DownloadReply(data_bytes=" + std::to_string(r.data_bytes()) +
                        ", hole_bytes=" + std::to_string(r.hole_bytes()) + ", capacity=" + std::to_string(r.capacity());
        if (!r.digest().empty()) s += ", digest=" + std::string(py::repr(py::bytes(r.digest())));
        return s + ")";
      });

  py::class_<TransferResult>(m, "TransferResult", "What upload_file/download_file moved.")
      .def_readonly("data_bytes", &TransferResult::data_bytes)
      .def_readonly("hole_bytes", &TransferResult::hole_bytes)
      .def_property_readonly("elapsed", [](const TransferResult& r) { return seconds(r.elapsed); })
      .def_readonly("volume", &TransferResult::volume)
      .def("__repr__", [](const TransferResult& r) {
        std::ostringstream o;
        o << "TransferResult(data_bytes=" << r.data_bytes << ", hole_bytes=" << r.hole_bytes
          << ", elapsed=" << seconds(r.elapsed) << ", volume=" << repr(r.volume) << ")";
        return o.str();
      });

  py::class_<Progress>(m, "Progress", "How far a transfer has come (handed to a progress callback).")
      .def_readonly("done", &Progress::done)
      .def_readonly("total", &Progress::total)
      .def_readonly("data_bytes", &Progress::data_bytes)
      .def_readonly("hole_bytes", &Progress::hole_bytes)
      .def_property_readonly("elapsed", [](const Progress& p) { return seconds(p.elapsed); })
      .def_readonly("finished", &Progress::finished)
      .def("__repr__", [](const Progress& p) {
        std::ostringstream o;
        o << "Progress(done=" << p.done << ", total=" << p.total << ", data_bytes=" << p.data_bytes
          << ", hole_bytes=" << p.hole_bytes << ", elapsed=" << seconds(p.elapsed)
          << ", finished=" << (p.finished ? "True" : "False") << ")";
        return o.str();
      });

  py::class_<PyChunk>(m, "Chunk", py::buffer_protocol(), "Received bytes (read-only buffer).")
      .def_buffer([](PyChunk& c) {
        auto bytes = c.chunk.bytes();
        return py::buffer_info(const_cast<std::uint8_t*>(bytes.data()), 1, py::format_descriptor<std::uint8_t>::format(),
                               1, {static_cast<py::ssize_t>(bytes.size())}, {1}, true);
      })
      .def("__len__", [](const PyChunk& c) { return c.chunk.size(); });

  py::class_<rpc::CancelSource, std::shared_ptr<rpc::CancelSource>>(m, "_Cancel")
      .def("cancel", [](rpc::CancelSource& c) {
        py::gil_scoped_release nogil;
        c.cancel();
      });

  // ---- streams
  py::class_<PyUploadStream>(m, "UploadStream", "A raw upload (Session.open_upload).")
      .def("write", &PyUploadStream::write, py::arg("data"),
           "Sends the bytes of any buffer (bytes, bytearray, memoryview, mmap, numpy array).")
      .def("write_hole", &PyUploadStream::write_hole, py::arg("length"), "Sends `length` bytes of zeros as a hole.")
      .def("finish", &PyUploadStream::finish, "Ends the upload and returns the daemon's UploadReply.")
      .def("abort", &PyUploadStream::abort, py::arg("reason") = "aborted by the client",
           "Stops the upload; the daemon sees CANCELLED with `reason` at once.")
      .def_property_readonly("bytes_sent", &PyUploadStream::bytes_sent)
      .def_property_readonly("finished", &PyUploadStream::finished);

  py::class_<PyAsyncUploadStream>(m, "_AsyncUploadStream")
      .def("write", &PyAsyncUploadStream::write)
      .def("write_hole", &PyAsyncUploadStream::write_hole)
      .def("finish", &PyAsyncUploadStream::finish)
      .def("abort", &PyAsyncUploadStream::abort, py::arg("reason") = "aborted by the client")
      .def_property_readonly("bytes_sent", &PyAsyncUploadStream::bytes_sent)
      .def_property_readonly("finished", &PyAsyncUploadStream::finished);

  py::class_<PyDownloadStream>(m, "DownloadStream", "A raw download (Session.open_download).")
      .def("read", &PyDownloadStream::read,
           "Next piece: ('data', memoryview), ('hole', length) or ('end', None).")
      .def("readinto", &PyDownloadStream::readinto, py::arg("buffer"),
           "Fills a writable buffer with the next bytes (holes as zeros); returns the count, 0 at the end.")
      .def("finish", &PyDownloadStream::finish, "After the end: the daemon's DownloadReply.")
      .def("abort", &PyDownloadStream::abort, py::arg("reason") = "aborted by the client")
      .def_property_readonly("ended", &PyDownloadStream::ended)
      .def_property_readonly("finished", &PyDownloadStream::finished);

  py::class_<PyAsyncDownloadStream>(m, "_AsyncDownloadStream")
      .def("read", &PyAsyncDownloadStream::read)
      .def("finish", &PyAsyncDownloadStream::finish)
      .def("abort", &PyAsyncDownloadStream::abort, py::arg("reason") = "aborted by the client")
      .def_property_readonly("ended", &PyAsyncDownloadStream::ended)
      .def_property_readonly("finished", &PyAsyncDownloadStream::finished);

  // ---- session
  py::class_<PySession>(m, "Session", "A connection to a ferryd (ferry.connect).")
      .def("close", &PySession::close, "Closes the connection; running transfers and streams are aborted.")
      .def_property_readonly("closed", &PySession::closed)
      .def("pool_list",
           [](PySession& s) {
             auto r = call_blocking<Volume::PoolList>(s.state(), v1::PoolListCall{});
             return list_of(r, [](const auto& x) -> const auto& { return x.pools(); });
           })
      .def(
          "vol_list",
          [](PySession& s, const std::string& pool) {
            require_name(pool, "pool");
            v1::VolListCall call;
            call.set_pool(pool);
            auto r = call_blocking<Volume::VolList>(s.state(), call);
            return list_of(r, [](const auto& x) -> const auto& { return x.volumes(); });
          },
          py::arg("pool"))
      .def(
          "vol_info",
          [](PySession& s, const std::string& pool, const std::string& name) {
            return call_blocking<Volume::VolInfo>(s.state(), ref(pool, name));
          },
          py::arg("pool"), py::arg("name"))
      .def(
          "vol_create",
          [](PySession& s, const std::string& pool, const std::string& name, const py::object& capacity,
             bool preallocate) {
            v1::VolCreateCall call;
            *call.mutable_volume() = ref(pool, name);
            call.set_capacity(to_u64(capacity, "capacity"));
            call.set_preallocate(preallocate);
            return call_blocking<Volume::VolCreate>(s.state(), call);
          },
          py::arg("pool"), py::arg("name"), py::arg("capacity"), py::arg("preallocate") = false)
      .def(
          "vol_delete",
          [](PySession& s, const std::string& pool, const std::string& name) {
            call_blocking<Volume::VolDelete>(s.state(), ref(pool, name));
          },
          py::arg("pool"), py::arg("name"))
      .def(
          "vol_resize",
          [](PySession& s, const std::string& pool, const std::string& name, const py::object& capacity,
             bool allow_shrink) {
            v1::VolResizeCall call;
            *call.mutable_volume() = ref(pool, name);
            call.set_capacity(to_u64(capacity, "capacity"));
            call.set_allow_shrink(allow_shrink);
            return call_blocking<Volume::VolResize>(s.state(), call);
          },
          py::arg("pool"), py::arg("name"), py::arg("capacity"), py::arg("allow_shrink") = false)
      .def(
          "upload_file",
          [](PySession& s, const std::string& pool, const std::string& name, const py::object& path,
             const py::object& offset, const py::object& length, bool detect_zeros, bool dense, bool atomic,
             bool keep_capacity, bool no_sync, bool create, const py::object& progress) {
            ref(pool, name);
            UploadOptions o;
            o.offset = to_u64(offset, "offset");
            o.length = to_opt_u64(length, "length");
            o.detect_zeros = detect_zeros;
            o.dense = dense;
            o.atomic = atomic;
            o.keep_capacity = keep_capacity;
            o.no_sync = no_sync;
            o.create = create;
            auto t = std::make_shared<Transfer>();
            ProgressFn fn = progress_fn(progress, t);
            return run_transfer(s.state(), t,
                                [pool, name, file = path_arg(path), o, fn](Session& session,
                                                                           std::shared_ptr<rpc::CancelSource> cancel) {
                                  UploadOptions options = o;
                                  options.cancel = std::move(cancel);
                                  return session.upload_file(pool, name, file, options, fn);
                                });
          },
          py::arg("pool"), py::arg("name"), py::arg("path"), py::kw_only(), py::arg("offset") = 0,
          py::arg("length") = py::none(), py::arg("detect_zeros") = false, py::arg("dense") = false,
          py::arg("atomic") = false, py::arg("keep_capacity") = false, py::arg("no_sync") = false,
          py::arg("create") = false, py::arg("progress") = py::none())
      .def(
          "download_file",
          [](PySession& s, const std::string& pool, const std::string& name, const py::object& path,
             const py::object& offset, const py::object& length, bool detect_zeros, bool dense,
             const py::object& progress) {
            ref(pool, name);
            DownloadOptions o;
            o.offset = to_u64(offset, "offset");
            o.length = to_opt_u64(length, "length");
            o.detect_zeros = detect_zeros;
            o.dense = dense;
            auto t = std::make_shared<Transfer>();
            ProgressFn fn = progress_fn(progress, t);
            return run_transfer(s.state(), t,
                                [pool, name, file = path_arg(path), o, fn](Session& session,
                                                                           std::shared_ptr<rpc::CancelSource> cancel) {
                                  DownloadOptions options = o;
                                  options.cancel = std::move(cancel);
                                  return session.download_file(pool, name, file, options, fn);
                                });
          },
          py::arg("pool"), py::arg("name"), py::arg("path"), py::kw_only(), py::arg("offset") = 0,
          py::arg("length") = py::none(), py::arg("detect_zeros") = false, py::arg("dense") = false,
          py::arg("progress") = py::none())
      .def(
          "open_upload",
          [](PySession& s, const std::string& pool, const std::string& name, const py::object& offset,
             const py::object& length, bool atomic, bool keep_capacity, bool no_sync) {
            auto call = upload_call(pool, name, offset, length, atomic, keep_capacity, no_sync);
            Use use(s.state());
            return std::make_unique<PyUploadStream>(s.state(),
                                                    stream::open<Volume::VolUpload>(use.client(), call));
          },
          py::arg("pool"), py::arg("name"), py::kw_only(), py::arg("offset") = 0, py::arg("length") = py::none(),
          py::arg("atomic") = false, py::arg("keep_capacity") = false, py::arg("no_sync") = false)
      .def(
          "open_download",
          [](PySession& s, const std::string& pool, const std::string& name, const py::object& offset,
             const py::object& length, bool dense, bool detect_zeros, bool digest) {
            auto call = download_call(pool, name, offset, length, dense, detect_zeros, digest);
            Use use(s.state());
            return std::make_unique<PyDownloadStream>(s.state(),
                                                      stream::open<Volume::VolDownload>(use.client(), call));
          },
          py::arg("pool"), py::arg("name"), py::kw_only(), py::arg("offset") = 0, py::arg("length") = py::none(),
          py::arg("dense") = false, py::arg("detect_zeros") = false, py::arg("digest") = false)
      .def(
          "subscribe",
          [](PySession& s, const py::object& callback, const std::string& pool) {
            if (!PyCallable_Check(callback.ptr())) throw py::type_error("callback must be callable");
            auto fn = event_fn(callback);
            Use use(s.state());
            py::gil_scoped_release nogil;
            use.session().subscribe(std::move(fn), pool);
          },
          py::arg("callback"), py::arg("pool") = "")
      .def("unsubscribe",
           [](PySession& s) {
             Use use(s.state());
             py::gil_scoped_release nogil;
             use.session().unsubscribe();
           })
      // asyncio forms (ferry.aio): each resolves `future` from the io thread.
      .def("_pool_list_async",
           [](PySession& s, py::object f) {
             return call_async<Volume::PoolList>(s.state(), v1::PoolListCall{}, std::move(f), [](v1::PoolListReply r) {
               return list_of(r, [](const auto& x) -> const auto& { return x.pools(); });
             });
           })
      .def("_vol_list_async",
           [](PySession& s, py::object f, const std::string& pool) {
             require_name(pool, "pool");
             v1::VolListCall call;
             call.set_pool(pool);
             return call_async<Volume::VolList>(s.state(), call, std::move(f), [](v1::VolListReply r) {
               return list_of(r, [](const auto& x) -> const auto& { return x.volumes(); });
             });
           })
      .def("_vol_info_async",
           [](PySession& s, py::object f, const std::string& pool, const std::string& name) {
             return call_async<Volume::VolInfo>(s.state(), ref(pool, name), std::move(f),
                                                [](v1::VolumeInfo r) { return py::cast(std::move(r)); });
           })
      .def("_vol_create_async",
           [](PySession& s, py::object f, const std::string& pool, const std::string& name,
              const py::object& capacity, bool preallocate) {
             v1::VolCreateCall call;
             *call.mutable_volume() = ref(pool, name);
             call.set_capacity(to_u64(capacity, "capacity"));
             call.set_preallocate(preallocate);
             return call_async<Volume::VolCreate>(s.state(), call, std::move(f),
                                                  [](v1::VolumeInfo r) { return py::cast(std::move(r)); });
           })
      .def("_vol_delete_async",
           [](PySession& s, py::object f, const std::string& pool, const std::string& name) {
             return call_async<Volume::VolDelete>(s.state(), ref(pool, name), std::move(f),
                                                  [](v1::Empty) { return py::none(); });
           })
      .def("_vol_resize_async",
           [](PySession& s, py::object f, const std::string& pool, const std::string& name,
              const py::object& capacity, bool allow_shrink) {
             v1::VolResizeCall call;
             *call.mutable_volume() = ref(pool, name);
             call.set_capacity(to_u64(capacity, "capacity"));
             call.set_allow_shrink(allow_shrink);
             return call_async<Volume::VolResize>(s.state(), call, std::move(f),
                                                  [](v1::VolumeInfo r) { return py::cast(std::move(r)); });
           })
      .def("_event_subscribe_async",
           [](PySession& s, py::object f, const py::object& callback, const std::string& pool) {
             // The handler first, then the call, as Session::subscribe does.
             Use use(s.state());
             auto fn = event_fn(callback);
             {
               py::gil_scoped_release nogil;
               use.client().on_message<Volume::Event>([fn](v1::VolumeEvent e) { fn(e); });
             }
             v1::EventSubscribeCall call;
             call.set_pool(pool);
             return call_async<Volume::EventSubscribe>(s.state(), call, std::move(f),
                                                       [](v1::EventSubscribeReply) { return py::none(); });
           })
      .def("_event_unsubscribe_async",
           [](PySession& s, py::object f) {
             return call_async<Volume::EventUnsubscribe>(s.state(), v1::EventUnsubscribeCall{}, std::move(f),
                                                         [](v1::Empty) { return py::none(); });
           })
      .def("_open_upload_async",
           [](PySession& s, const std::string& pool, const std::string& name, const py::object& offset,
              const py::object& length, bool atomic, bool keep_capacity, bool no_sync) {
             auto call = upload_call(pool, name, offset, length, atomic, keep_capacity, no_sync);
             Use use(s.state());
             return std::make_unique<PyAsyncUploadStream>(s.state(),
                                                          stream::open<Volume::VolUpload>(use.client(), call));
           })
      .def("_open_download_async",
           [](PySession& s, const std::string& pool, const std::string& name, const py::object& offset,
              const py::object& length, bool dense, bool detect_zeros, bool digest) {
             auto call = download_call(pool, name, offset, length, dense, detect_zeros, digest);
             Use use(s.state());
             return std::make_unique<PyAsyncDownloadStream>(s.state(),
                                                            stream::open<Volume::VolDownload>(use.client(), call));
           });

  m.def(
      "connect",
      [](const std::string& uri, const py::object& tls_ca, const py::object& tls_cert, const py::object& tls_key,
         const py::object& tls_server_name, const py::object& sasl_user, const py::object& sasl_password,
         const py::object& sasl_realm, const py::object& sasl_mechanisms, const py::object& client_name,
         bool reconnect, const py::object& timeout) {
        if (uri.empty()) throw py::value_error("uri must not be empty");
        std::optional<std::chrono::milliseconds> call_timeout;
        auto options = client_options(tls_ca, tls_cert, tls_key, tls_server_name, sasl_user, sasl_password,
                                      sasl_realm, sasl_mechanisms, client_name, reconnect, timeout, call_timeout);
        return std::make_unique<PySession>(connect_state(uri, std::move(options), call_timeout));
      },
      py::arg("uri"), py::kw_only(), py::arg("tls_ca") = py::none(), py::arg("tls_cert") = py::none(),
      py::arg("tls_key") = py::none(), py::arg("tls_server_name") = py::none(), py::arg("sasl_user") = py::none(),
      py::arg("sasl_password") = py::none(), py::arg("sasl_realm") = py::none(),
      py::arg("sasl_mechanisms") = py::none(), py::arg("client_name") = py::none(), py::arg("reconnect") = false,
      py::arg("timeout") = py::none());
}
