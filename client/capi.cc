// The C API (client/ferry.h) over Session.
#include "client/ferry.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <string>

#include "client/session.h"

struct ferry_session {
  ferry::Session session;
};
struct ferry_upload {
  std::optional<ferry::UploadStream> stream;
  std::chrono::steady_clock::time_point start;
};
struct ferry_download {
  std::optional<ferry::DownloadStream> stream;
  ferry::DownloadStream::Piece pending;  // data not yet handed out
  std::size_t pending_offset = 0;
  std::chrono::steady_clock::time_point start;
  std::uint64_t data_bytes = 0, hole_bytes = 0;
};

namespace {

struct LastError {
  int code = 0;
  std::string message;
  bool retryable = false;
};
thread_local LastError t_error;

void set_error(const ferry::Error& e) {
  t_error.code = static_cast<int>(e.code());
  t_error.message = e.describe();
  t_error.retryable = e.retryable();
}

// Runs fn; maps what it throws to the last error.
template <class F>
int guarded(F&& fn) {
  try {
    fn();
    t_error = {};
    return 0;
  } catch (const ferry::Error& e) {
    set_error(e);
  } catch (const std::bad_alloc&) {
    set_error(ferry::Error(ferry::Code::resource_exhausted, "out of memory", "client"));
  } catch (const std::exception& e) {
    set_error(ferry::Error(ferry::Code::internal, e.what(), "client"));
  }
  return -1;
}

int invalid(const char* what) {
  set_error(ferry::Error(ferry::Code::invalid_argument, what, "client"));
  return -1;
}

std::string str(const char* s) { return s ? s : ""; }

void copy(char* out, std::size_t size, const std::string& s) {
  const std::size_t n = std::min(size - 1, s.size());
  std::memcpy(out, s.data(), n);
  out[n] = '\0';
}

void to_c(const ferry::v1::VolumeInfo& v, ferry_volume_info* out) {
  std::memset(out, 0, sizeof *out);
  copy(out->pool, sizeof out->pool, v.pool());
  copy(out->name, sizeof out->name, v.name());
  out->capacity = v.capacity();
  out->allocation = v.allocation();
  out->writing = v.writing();
  out->readers = v.readers();
  out->modified_ns = v.modified_ns();
}

void to_c(const ferry::TransferResult& r, ferry_transfer_result* out) {
  if (!out) return;
  out->data_bytes = r.data_bytes;
  out->hole_bytes = r.hole_bytes;
  out->seconds = std::chrono::duration<double>(r.elapsed).count();
}

ferry::ProgressFn progress_fn(ferry_progress_cb cb, void* user) {
  if (!cb) return {};
  return [cb, user](const ferry::Progress& p) {
    ferry_progress c{p.done, p.total, p.data_bytes, p.hole_bytes, std::chrono::duration<double>(p.elapsed).count(),
                     p.finished ? 1 : 0};
    cb(&c, user);
  };
}

template <class T>
T* array_copy(const std::vector<T>& v) {
  T* out = static_cast<T*>(std::calloc(v.empty() ? 1 : v.size(), sizeof(T)));
  if (!out) throw std::bad_alloc();
  if (!v.empty()) std::memcpy(out, v.data(), v.size() * sizeof(T));
  return out;
}

}  // namespace

extern "C" {

int ferry_error_code(void) { return t_error.code; }
const char* ferry_error_message(void) { return t_error.message.c_str(); }
int ferry_error_retryable(void) { return t_error.retryable ? 1 : 0; }
const char* ferry_code_name(int code) { return ferry::to_string(static_cast<ferry::Code>(code)); }
void ferry_free(void* p) { std::free(p); }

ferry_session* ferry_connect(const char* uri, const ferry_connect_options* o) {
  return ferry_connect_reconnecting(uri, o, nullptr);
}

void ferry_reconnect_options_init(ferry_reconnect_options* r) {
  if (!r) return;
  const ferry::rpc::ReconnectOptions d;
  r->enabled = 1;
  r->initial_backoff_ms = static_cast<uint32_t>(d.initial_backoff.count());
  r->max_backoff_ms = static_cast<uint32_t>(d.max_backoff.count());
  r->multiplier = d.multiplier;
  r->jitter = d.jitter;
  r->max_attempts = d.max_attempts;
  r->give_up_after_ms = static_cast<uint32_t>(d.give_up_after.count());
}

int ferry_get_reconnect_stats(ferry_session* s, ferry_reconnect_stats* out) {
  if (!s || !out) return invalid("ferry_get_reconnect_stats: NULL argument");
  return guarded([&] {
    const auto st = s->session.rpc().reconnect_stats();
    out->connections_lost = st.connections_lost;
    out->attempts = st.attempts;
    out->reconnects = st.reconnects;
    out->calls_replayed = st.calls_replayed;
    out->calls_failed_not_idempotent = st.calls_failed_not_idempotent;
    out->streams_failed = st.streams_failed;
    out->gave_up = st.gave_up;
  });
}

ferry_session* ferry_connect_reconnecting(const char* uri, const ferry_connect_options* o,
                                          const ferry_reconnect_options* r) {
  if (!uri) {
    invalid("ferry_connect: uri is NULL");
    return nullptr;
  }
  ferry_session* out = nullptr;
  guarded([&] {
    ferry::rpc::ClientOptions options;
    options.name = "libferry-c";
    if (o) {
      options.tls.ca_file = str(o->tls_ca);
      options.tls.cert_file = str(o->tls_cert);
      options.tls.key_file = str(o->tls_key);
      options.tls.server_name = str(o->tls_server_name);
      options.sasl.username = str(o->sasl_user);
      options.sasl.password = str(o->sasl_password);
      if (o->client_name) options.name = o->client_name;
    }
    if (r && r->enabled) {
      auto& p = options.reconnect;
      p.enabled = true;
      p.initial_backoff = std::chrono::milliseconds(r->initial_backoff_ms);
      p.max_backoff = std::chrono::milliseconds(r->max_backoff_ms);
      p.multiplier = r->multiplier;
      p.jitter = r->jitter;
      p.max_attempts = r->max_attempts;
      p.give_up_after = std::chrono::milliseconds(r->give_up_after_ms);
    }
    out = new ferry_session{ferry::Session::connect(uri, options)};
  });
  return out;
}

void ferry_close(ferry_session* s) { delete s; }

int ferry_pool_list(ferry_session* s, ferry_pool_info** pools, size_t* count) {
  if (!s || !pools || !count) return invalid("ferry_pool_list: NULL argument");
  return guarded([&] {
    std::vector<ferry_pool_info> v;
    for (const auto& p : s->session.pool_list()) {
      ferry_pool_info c{};
      copy(c.name, sizeof c.name, p.name());
      copy(c.path, sizeof c.path, p.path());
      c.read_only = p.read_only();
      c.volumes = p.volumes();
      c.allocation = p.allocation();
      c.capacity = p.capacity();
      c.available = p.available();
      v.push_back(c);
    }
    *pools = array_copy(v);
    *count = v.size();
  });
}

int ferry_vol_list(ferry_session* s, const char* pool, ferry_volume_info** volumes, size_t* count) {
  if (!s || !pool || !volumes || !count) return invalid("ferry_vol_list: NULL argument");
  return guarded([&] {
    std::vector<ferry_volume_info> v;
    for (const auto& info : s->session.vol_list(pool)) {
      ferry_volume_info c;
      to_c(info, &c);
      v.push_back(c);
    }
    *volumes = array_copy(v);
    *count = v.size();
  });
}

int ferry_vol_info(ferry_session* s, const char* pool, const char* name, ferry_volume_info* out) {
  if (!s || !pool || !name || !out) return invalid("ferry_vol_info: NULL argument");
  return guarded([&] { to_c(s->session.vol_info(pool, name), out); });
}

int ferry_vol_create(ferry_session* s, const char* pool, const char* name, uint64_t capacity, ferry_volume_info* out) {
  if (!s || !pool || !name) return invalid("ferry_vol_create: NULL argument");
  return guarded([&] {
    auto info = s->session.vol_create(pool, name, capacity);
    if (out) to_c(info, out);
  });
}

int ferry_vol_delete(ferry_session* s, const char* pool, const char* name) {
  if (!s || !pool || !name) return invalid("ferry_vol_delete: NULL argument");
  return guarded([&] { s->session.vol_delete(pool, name); });
}

int ferry_vol_resize(ferry_session* s, const char* pool, const char* name, uint64_t capacity, int allow_shrink,
                     ferry_volume_info* out) {
  if (!s || !pool || !name) return invalid("ferry_vol_resize: NULL argument");
  return guarded([&] {
    auto info = s->session.vol_resize(pool, name, capacity, allow_shrink != 0);
    if (out) to_c(info, out);
  });
}

int ferry_upload_file(ferry_session* s, const char* pool, const char* name, const char* path, uint64_t offset,
                      int64_t length, unsigned flags, ferry_progress_cb progress, void* user,
                      ferry_transfer_result* result) {
  if (!s || !pool || !name || !path) return invalid("ferry_upload_file: NULL argument");
  return guarded([&] {
    ferry::UploadOptions o;
    o.offset = offset;
    if (length >= 0) o.length = static_cast<std::uint64_t>(length);
    o.detect_zeros = flags & FERRY_DETECT_ZEROS;
    o.dense = flags & FERRY_DENSE;
    o.atomic = flags & FERRY_ATOMIC;
    o.create = flags & FERRY_CREATE;
    o.no_sync = flags & FERRY_NO_SYNC;
    to_c(s->session.upload_file(pool, name, path, o, progress_fn(progress, user)), result);
  });
}

int ferry_download_file(ferry_session* s, const char* pool, const char* name, const char* path, uint64_t offset,
                        int64_t length, unsigned flags, ferry_progress_cb progress, void* user,
                        ferry_transfer_result* result) {
  if (!s || !pool || !name || !path) return invalid("ferry_download_file: NULL argument");
  return guarded([&] {
    ferry::DownloadOptions o;
    o.offset = offset;
    if (length >= 0) o.length = static_cast<std::uint64_t>(length);
    o.detect_zeros = flags & FERRY_DETECT_ZEROS;
    o.dense = flags & FERRY_DENSE;
    to_c(s->session.download_file(pool, name, path, o, progress_fn(progress, user)), result);
  });
}

ferry_upload* ferry_upload_open(ferry_session* s, const char* pool, const char* name, uint64_t offset, int64_t length,
                                unsigned flags) {
  if (!s || !pool || !name) {
    invalid("ferry_upload_open: NULL argument");
    return nullptr;
  }
  ferry_upload* out = nullptr;
  guarded([&] {
    ferry::v1::VolUploadCall call;
    call.mutable_volume()->set_pool(pool);
    call.mutable_volume()->set_name(name);
    call.set_offset(offset);
    if (length >= 0) call.set_length(static_cast<std::uint64_t>(length));
    call.set_atomic(flags & FERRY_ATOMIC);
    call.set_no_sync(flags & FERRY_NO_SYNC);
    auto u = std::make_unique<ferry_upload>();
    u->start = std::chrono::steady_clock::now();
    u->stream.emplace(s->session.open_upload(call));
    out = u.release();
  });
  return out;
}

int ferry_upload_write(ferry_upload* u, const void* data, size_t size) {
  if (!u || (!data && size)) return invalid("ferry_upload_write: NULL argument");
  return guarded([&] { u->stream->write({static_cast<const std::uint8_t*>(data), size}); });
}

int ferry_upload_write_hole(ferry_upload* u, uint64_t length) {
  if (!u) return invalid("ferry_upload_write_hole: NULL argument");
  return guarded([&] { u->stream->write_hole(length); });
}

int ferry_upload_finish(ferry_upload* u, ferry_transfer_result* result) {
  if (!u) return invalid("ferry_upload_finish: NULL argument");
  const int rc = guarded([&] {
    auto reply = u->stream->finish();
    if (result) {
      result->data_bytes = reply.data_bytes();
      result->hole_bytes = reply.hole_bytes();
      result->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - u->start).count();
    }
  });
  delete u;
  return rc;
}

void ferry_upload_abort(ferry_upload* u, const char* reason) {
  if (!u) return;
  u->stream->abort(reason ? reason : "aborted by the client");
  delete u;
}

ferry_download* ferry_download_open(ferry_session* s, const char* pool, const char* name, uint64_t offset,
                                    int64_t length, unsigned flags) {
  if (!s || !pool || !name) {
    invalid("ferry_download_open: NULL argument");
    return nullptr;
  }
  ferry_download* out = nullptr;
  guarded([&] {
    ferry::v1::VolDownloadCall call;
    call.mutable_volume()->set_pool(pool);
    call.mutable_volume()->set_name(name);
    call.set_offset(offset);
    if (length >= 0) call.set_length(static_cast<std::uint64_t>(length));
    call.set_detect_zeros(flags & FERRY_DETECT_ZEROS);
    call.set_dense(flags & FERRY_DENSE);
    auto d = std::make_unique<ferry_download>();
    d->start = std::chrono::steady_clock::now();
    d->stream.emplace(s->session.open_download(call));
    out = d.release();
  });
  return out;
}

int ferry_download_read(ferry_download* d, void* buf, size_t capacity, uint64_t* length) {
  if (!d || !length || (!buf && capacity)) return invalid("ferry_download_read: NULL argument");
  int kind = -1;
  const int rc = guarded([&] {
    if (d->pending.kind != ferry::DownloadStream::Piece::Kind::data) d->pending = d->stream->read();
    switch (d->pending.kind) {
      case ferry::DownloadStream::Piece::Kind::end:
        *length = 0;
        kind = FERRY_ITEM_END;
        return;
      case ferry::DownloadStream::Piece::Kind::hole:
        *length = d->pending.length;
        d->hole_bytes += d->pending.length;
        d->pending = {};
        kind = FERRY_ITEM_HOLE;
        return;
      case ferry::DownloadStream::Piece::Kind::data: {
        auto bytes = d->pending.data.bytes().subspan(d->pending_offset);
        const std::size_t n = std::min(capacity, bytes.size());
        if (n) std::memcpy(buf, bytes.data(), n);
        *length = n;
        d->data_bytes += n;
        d->pending_offset += n;
        if (d->pending_offset == d->pending.data.size()) {
          d->pending = {};  // releases the chunk (and its credit)
          d->pending_offset = 0;
        }
        kind = FERRY_ITEM_DATA;
        return;
      }
    }
  });
  return rc == 0 ? kind : -1;
}

int ferry_download_finish(ferry_download* d, ferry_transfer_result* result) {
  if (!d) return invalid("ferry_download_finish: NULL argument");
  const int rc = guarded([&] {
    auto reply = d->stream->finish();
    if (result) {
      result->data_bytes = reply.data_bytes();
      result->hole_bytes = reply.hole_bytes();
      result->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - d->start).count();
    }
  });
  delete d;
  return rc;
}

void ferry_download_abort(ferry_download* d, const char* reason) {
  if (!d) return;
  d->stream->abort(reason ? reason : "aborted by the client");
  delete d;
}

int ferry_subscribe(ferry_session* s, const char* pool, ferry_event_cb callback, void* user) {
  if (!s || !callback) return invalid("ferry_subscribe: NULL argument");
  return guarded([&] {
    s->session.subscribe(
        [callback, user](const ferry::v1::VolumeEvent& e) {
          ferry_event c{static_cast<int>(e.kind()), e.volume().pool().c_str(), e.volume().name().c_str(),
                        e.capacity(), e.detail().c_str(), e.time_ns()};
          callback(&c, user);
        },
        str(pool));
  });
}

}  // extern "C"
