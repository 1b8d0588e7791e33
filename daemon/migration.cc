#include "daemon/migration.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/this_coro.hpp>
#include <chrono>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <spdlog/spdlog.h>
#include <thread>
#include <vector>

#include "daemon/copy_state.h"
#include "daemon/volume_io.h"
#include "daemon/volumes.h"
#include "ferry/v1/migration.ferry.h"
#include "rpc/endpoint.h"
#include "rpc/server.h"
#include "rpc/waker.h"
#include "stream/service.h"
#include "stream/stream.h"

namespace ferry::daemon {

namespace v1 = ferry::v1;
using Clock = std::chrono::steady_clock;

namespace {

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string new_id(const char* prefix) {
  static std::mutex mutex;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard lock(mutex);
  char text[32];
  std::snprintf(text, sizeof text, "%s-%012llx", prefix,
                static_cast<unsigned long long>(rng() & 0xffffffffffffull));
  return text;
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "localhost";
  return name;
}

std::string ref_text(const v1::VolumeRef& ref) { return ref.pool() + "/" + ref.name(); }

Error migration_error(Code code, const std::string& message, bool retryable = false) {
  return Error(code, message, "migration", retryable);
}

using stream::from_digest;
using stream::to_digest;

bool is_cancel(const Error& e) { return e.code() == Code::cancelled; }

}  // namespace

// ---------------------------------------------------------------------------
// Jobs: what runs, for job-list/job-info/job-cancel/job-wait and events.

struct Job {
  std::mutex mutex;
  v1::JobStatus info;
  Clock::time_point started = Clock::now();
  Clock::time_point last_event{};
  std::uint64_t rate_base = 0;  // done bytes not moved by this run (skipped on resume)
  std::function<void(const Error&)> cancel;
  std::vector<rpc::ReplyToken<v1::JobStatus>> waiters;
};

class Jobs {
 public:
  explicit Jobs(unsigned keep) : keep_(std::max(1u, keep)) {}

  std::shared_ptr<Job> add(const std::string& id, const std::string& kind, const std::string& source,
                           const std::string& destination, std::uint64_t total, std::uint64_t extents) {
    auto job = std::make_shared<Job>();
    job->info.set_id(id);
    job->info.set_kind(kind);
    job->info.set_source(source);
    job->info.set_destination(destination);
    job->info.set_state(v1::JOB_RUNNING);
    job->info.set_total_bytes(total);
    job->info.set_extents_total(extents);
    job->info.set_started_ns(now_ns());
    job->info.set_eta_seconds(-1);
    {
      std::lock_guard lock(mutex_);
      jobs_[id] = job;
      order_.push_back(id);
      trim();
    }
    publish(snapshot(*job));
    return job;
  }

  // Applies `fn` to the job's info; sends an event if `force` or if the last
  // one is half a second old.
  template <class F>
  void update(const std::shared_ptr<Job>& job, F fn, bool force = false) {
    v1::JobStatus copy;
    {
      std::lock_guard lock(job->mutex);
      if (job->info.state() != v1::JOB_RUNNING) return;
      fn(job->info);
      refresh(*job);
      const auto now = Clock::now();
      if (!force && now - job->last_event < std::chrono::milliseconds(500)) return;
      job->last_event = now;
      copy = job->info;
    }
    publish(copy);
  }

  void set_cancel(const std::shared_ptr<Job>& job, std::function<void(const Error&)> fn) {
    std::lock_guard lock(job->mutex);
    job->cancel = std::move(fn);
  }

  // The job ends: completed (no error), cancelled or failed.
  void finish(const std::shared_ptr<Job>& job, const std::optional<Error>& error, const std::string& digest = {}) {
    v1::JobStatus copy;
    std::vector<rpc::ReplyToken<v1::JobStatus>> waiters;
    {
      std::lock_guard lock(job->mutex);
      if (job->info.state() != v1::JOB_RUNNING) return;
      refresh(*job);
      if (!error) {
        job->info.set_state(v1::JOB_COMPLETED);
        job->info.set_eta_seconds(0);
        job->info.set_digest(digest);
      } else {
        job->info.set_state(is_cancel(*error) ? v1::JOB_CANCELLED : v1::JOB_FAILED);
        job->info.set_error_code(static_cast<std::uint32_t>(error->code()));
        job->info.set_error(error->message());
        job->info.set_eta_seconds(-1);
      }
      job->info.set_finished_ns(now_ns());
      job->cancel = nullptr;
      waiters.swap(job->waiters);
      copy = job->info;
    }
    for (auto& w : waiters) w.reply(copy);
    publish(copy);
  }

  std::shared_ptr<Job> find(const std::string& id) {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) throw migration_error(Code::not_found, "no job '" + id + "' on this daemon");
    return it->second;
  }
  v1::JobStatus info(const std::string& id) { return snapshot(*find(id)); }
  std::vector<v1::JobStatus> list() {
    std::vector<std::shared_ptr<Job>> all;
    {
      std::lock_guard lock(mutex_);
      for (const auto& id : order_) all.push_back(jobs_.at(id));
    }
    std::vector<v1::JobStatus> out;
    for (auto& j : all) out.push_back(snapshot(*j));
    return out;
  }
  std::vector<std::shared_ptr<Job>> running() {
    std::vector<std::shared_ptr<Job>> out;
    std::lock_guard lock(mutex_);
    for (auto& [id, j] : jobs_) {
      std::lock_guard jl(j->mutex);
      if (j->info.state() == v1::JOB_RUNNING) out.push_back(j);
    }
    return out;
  }

  // Asks a running job to stop with `error`; a finished one is left as is.
  void cancel(const std::shared_ptr<Job>& job, const Error& error) {
    std::function<void(const Error&)> fn;
    {
      std::lock_guard lock(job->mutex);
      fn = job->cancel;
    }
    if (fn) fn(error);
  }

  void wait(const std::string& id, rpc::ReplyToken<v1::JobStatus> token) {
    auto job = find(id);
    v1::JobStatus copy;
    {
      std::lock_guard lock(job->mutex);
      if (job->info.state() == v1::JOB_RUNNING) {
        job->waiters.push_back(std::move(token));
        return;
      }
      copy = job->info;
    }
    token.reply(copy);
  }

  void subscribe(rpc::MessageChannel channel) {
    std::lock_guard lock(mutex_);
    for (auto& c : channels_)
      if (c.same_client(channel)) return;
    channels_.push_back(std::move(channel));
  }
  void unsubscribe(const rpc::MessageChannel& channel) {
    std::lock_guard lock(mutex_);
    std::erase_if(channels_, [&](const rpc::MessageChannel& c) { return c.same_client(channel); });
  }

 private:
  static v1::JobStatus snapshot(Job& job) {
    std::lock_guard lock(job.mutex);
    if (job.info.state() == v1::JOB_RUNNING) refresh(job);
    return job.info;
  }
  static void refresh(Job& job) {
    const double seconds = std::chrono::duration<double>(Clock::now() - job.started).count();
    const double moved = static_cast<double>(job.info.done_bytes() - std::min(job.info.done_bytes(), job.rate_base));
    const double rate = seconds > 0.05 ? moved / seconds : 0;
    job.info.set_rate(rate);
    const std::uint64_t left = job.info.total_bytes() - std::min(job.info.total_bytes(), job.info.done_bytes());
    job.info.set_eta_seconds(rate > 0 ? static_cast<double>(left) / rate : -1);
  }
  void publish(const v1::JobStatus& info) {
    v1::JobUpdate event;
    *event.mutable_job() = info;
    std::vector<rpc::MessageChannel> channels;
    {
      std::lock_guard lock(mutex_);
      std::erase_if(channels_, [](const rpc::MessageChannel& c) { return !c.open(); });
      channels = channels_;
    }
    for (auto& c : channels) c.send<v1::Migration::JobEvent>(event);
  }
  void trim() {
    // Forget the oldest finished jobs beyond `keep_`.
    std::size_t finished = 0;
    for (const auto& id : order_) {
      auto& j = jobs_.at(id);
      std::lock_guard lock(j->mutex);
      if (j->info.state() != v1::JOB_RUNNING) ++finished;
    }
    for (auto it = order_.begin(); finished > keep_ && it != order_.end();) {
      auto& j = jobs_.at(*it);
      bool done;
      {
        std::lock_guard lock(j->mutex);
        done = j->info.state() != v1::JOB_RUNNING;
      }
      if (done) {
        jobs_.erase(*it);
        it = order_.erase(it);
        --finished;
      } else {
        ++it;
      }
    }
  }

  unsigned keep_;
  std::mutex mutex_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;
  std::deque<std::string> order_;
  std::vector<rpc::MessageChannel> channels_;
};

// ---------------------------------------------------------------------------
// The destination side: a copy session per copy.

struct Session {
  std::string copy_id;
  std::string key;  // pool/name
  std::string name;
  const VolumeService::Pool* pool = nullptr;
  std::string source;
  std::uint64_t capacity = 0;
  std::uint64_t extent_size = 0;
  bool fresh = false;  // created or emptied by this session: holes need no punching
  bool no_sync = false;
  std::shared_ptr<Fd> file;
  std::shared_ptr<void> lock;
  std::shared_ptr<Job> job;
  rpc::MessageChannel opener;

  std::mutex mutex;  // guards what follows
  std::map<std::uint64_t, Digest> committed;
  std::optional<Error> ended;
  std::vector<std::weak_ptr<stream::Stream>> writers;
};

class Migration::Impl : public std::enable_shared_from_this<Migration::Impl> {
 public:
  Impl(VolumeService& volumes, rpc::Server& server, MigrationOptions options)
      : volumes_(volumes), server_(server), options_(std::move(options)), jobs_(options_.keep_jobs) {
    options_.extent_size = std::max<std::uint64_t>(1u << 20, options_.extent_size);
    options_.parallel = std::max(1u, options_.parallel);
  }

  VolumeService& volumes_;
  rpc::Server& server_;
  MigrationOptions options_;
  Jobs jobs_;

  std::mutex sessions_mutex_;
  std::map<std::string, std::shared_ptr<Session>> sessions_;
  std::map<std::string, Error> ended_;  // why recent sessions ended, for late calls
  std::deque<std::string> ended_order_;

  std::shared_ptr<Session> session(const std::string& copy_id) {
    std::lock_guard lock(sessions_mutex_);
    auto it = sessions_.find(copy_id);
    if (it != sessions_.end()) return it->second;
    if (auto e = ended_.find(copy_id); e != ended_.end()) throw e->second;
    throw migration_error(Code::not_found, "no copy session '" + copy_id + "' on this daemon");
  }

  std::shared_ptr<Session> find_session(const std::string& copy_id) {
    std::lock_guard lock(sessions_mutex_);
    auto it = sessions_.find(copy_id);
    return it == sessions_.end() ? nullptr : it->second;
  }

  // Ends a session: with an error (aborted, cancelled, source gone) its
  // streams are aborted and the volume stays incomplete; either way the
  // lock goes when the last write has landed.
  void end_session(const std::shared_ptr<Session>& s, const std::optional<Error>& error, const std::string& digest = {}) {
    std::vector<std::shared_ptr<stream::Stream>> writers;
    {
      std::lock_guard lock(s->mutex);
      if (s->ended) return;
      s->ended = error ? *error : Error(Code::failed_precondition, "the copy is finished", "migration");
      for (auto& w : s->writers)
        if (auto st = w.lock()) writers.push_back(std::move(st));
      s->writers.clear();
      s->lock.reset();
      s->file.reset();
    }
    {
      std::lock_guard lock(sessions_mutex_);
      sessions_.erase(s->copy_id);
      ended_.insert_or_assign(s->copy_id, *s->ended);
      ended_order_.push_back(s->copy_id);
      while (ended_order_.size() > 256) {
        ended_.erase(ended_order_.front());
        ended_order_.pop_front();
      }
    }
    if (error) {
      for (auto& w : writers) w->abort(*error);
      spdlog::info("copy into {} ({}) ended: {}; the volume stays incomplete and can be resumed", s->key, s->copy_id,
                   error->message());
    }
    jobs_.finish(s->job, error, digest);
  }

  // Ends the session once its source's connection is gone.
  void watch(std::shared_ptr<Session> s) {
    auto timer = std::make_shared<asio::steady_timer>(server_.next_io_context());
    auto self = shared_from_this();
    auto step = std::make_shared<std::function<void()>>();
    *step = [self, s, timer, step] {
      timer->expires_after(std::chrono::milliseconds(250));
      timer->async_wait([self, s, timer, step](std::error_code) {
        {
          std::lock_guard lock(s->mutex);
          if (s->ended) {
            *step = nullptr;  // breaks the cycle
            return;
          }
        }
        if (!s->opener.open()) {
          self->end_session(s, migration_error(Code::unavailable,
                                               "the source's connection closed before the copy finished; " + s->key +
                                                   " stays incomplete (vol-copy --resume continues it)",
                                               true));
          *step = nullptr;
          return;
        }
        (*step)();
      });
    };
    (*step)();
  }

  std::shared_ptr<rpc::Program> program();
  void shutdown(std::chrono::milliseconds grace);
};

// The digest of [offset, end) of a volume file, read the way a copy reads it.
asio::awaitable<Digest> hash_range(asio::any_io_executor ex, FileIo* io, std::shared_ptr<Fd> file, std::uint64_t offset,
                                   std::uint64_t end, unsigned depth, rpc::BufferPool* pool, std::string what) {
  RangeReader::Options o;
  o.chunk = 1u << 20;
  o.depth = depth;
  o.detect_zeros = true;
  RangeReader reader(ex, io, std::move(file), offset, end, o, pool, std::move(what));
  ExtentHasher h;
  for (;;) {
    RangeReader::Piece piece = co_await reader.next();
    if (piece.kind == RangeReader::Piece::Kind::end) break;
    if (piece.kind == RangeReader::Piece::Kind::hole)
      h.zeros(piece.length);
    else
      h.data(piece.data.span());
  }
  co_return h.digest();
}

// ---------------------------------------------------------------------------
// The source side: one copy job.

class CopyOut : public std::enable_shared_from_this<CopyOut> {
 public:
  CopyOut(std::shared_ptr<Migration::Impl> impl, std::shared_ptr<Job> job, v1::CopyStartCall call,
          asio::io_context& io)
      : impl_(std::move(impl)),
        job_(std::move(job)),
        call_(std::move(call)),
        io_(io),
        strand_(asio::make_strand(io)),
        waker_(strand_) {}

  void start(std::shared_ptr<Fd> file, std::uint64_t capacity) {
    file_ = std::move(file);
    capacity_ = capacity;
    extent_size_ = call_.extent_size() ? std::max<std::uint64_t>(1u << 20, call_.extent_size()) : impl_->options_.extent_size;
    parallel_ = call_.parallel() ? call_.parallel() : impl_->options_.parallel;
    auto self = shared_from_this();
    impl_->jobs_.set_cancel(job_, [self](const Error& e) { asio::post(self->strand_, [self, e] { self->halt(e); }); });
    asio::co_spawn(strand_, [self]() -> asio::awaitable<void> { co_await self->run(); }, asio::detached);
  }

 private:
  // Stops everything in flight with `error` (the first reason wins).
  void halt(const Error& error) {
    if (stop_) return;
    stop_ = error;
    for (auto& s : active_) s->abort(error);
    waker_.wake();
  }

  std::uint64_t extent_offset(std::uint64_t i) const { return i * extent_size_; }
  std::uint64_t extent_length(std::uint64_t i) const {
    return std::min(extent_size_, capacity_ - extent_offset(i));
  }

  asio::awaitable<void> run() {
    const std::string what = "copy " + job_->info.id() + " of " + ref_text(call_.source()) + " to " +
                             call_.destination_uri() + "/" + ref_text(call_.destination());
    std::optional<Error> failure;
    std::string digest;
    try {
      const std::uint64_t extents = (capacity_ + extent_size_ - 1) / extent_size_;
      rpc::ClientOptions options = impl_->options_.client;
      options.name = "ferryd migration";
      client_ = co_await rpc::Client::connect(io_.get_executor(), call_.destination_uri(), options);
      v1::CopyOpenCall open;
      *open.mutable_volume() = call_.destination();
      open.set_capacity(capacity_);
      open.set_extent_size(extent_size_);
      open.set_copy_id(job_->info.id());
      open.set_source(host_name() + ":" + ref_text(call_.source()));
      open.set_resume(call_.resume());
      open.set_overwrite(call_.overwrite());
      open.set_no_sync(call_.no_sync());
      const v1::CopyOpenReply opened = co_await client_.call<v1::Migration::CopyOpen>(open);
      spdlog::info("{}: destination session {} open, {} of {} extents committed there", what, opened.job(),
                   opened.committed_size(), extents);
      impl_->jobs_.update(job_, [&](v1::JobStatus& i) { i.set_resumed(opened.committed_size() > 0); }, true);

      // Extents the destination has: checked against the source before
      // they are skipped.
      std::map<std::uint64_t, Digest> theirs;
      for (const auto& c : opened.committed())
        if (c.index() < extents) theirs[c.index()] = to_digest(c.digest());
      for (std::uint64_t i = 0; i < extents; ++i) {
        auto it = theirs.find(i);
        if (it == theirs.end()) {
          todo_.push_back(i);
          continue;
        }
        if (stop_) throw *stop_;
        const Digest mine = co_await hash_extent(i);
        if (mine != it->second) {
          spdlog::warn("{}: extent {} committed on the destination differs from the source; copying it again", what, i);
          todo_.push_back(i);
          continue;
        }
        digests_[i] = mine;
        const std::uint64_t len = extent_length(i);
        impl_->jobs_.update(job_, [&](v1::JobStatus& info) {
          info.set_skipped_bytes(info.skipped_bytes() + len);
          info.set_done_bytes(info.done_bytes() + len);
          info.set_extents_done(info.extents_done() + 1);
        });
        std::lock_guard lock(job_->mutex);
        job_->rate_base += len;
      }

      // `parallel` workers take extents in order.
      auto self = shared_from_this();
      const unsigned workers = static_cast<unsigned>(std::min<std::uint64_t>(parallel_, std::max<std::size_t>(1, todo_.size())));
      for (unsigned w = 0; w < workers; ++w) {
        ++running_;
        asio::co_spawn(strand_, [self]() -> asio::awaitable<void> { co_await self->work(); },
                       asio::bind_executor(strand_, [self](std::exception_ptr e) {
                         --self->running_;
                         if (e) {
                           try {
                             std::rethrow_exception(e);
                           } catch (const Error& err) {
                             self->halt(err);
                           } catch (...) {
                             self->halt(Error::from_exception(std::current_exception()));
                           }
                         }
                         self->waker_.wake();
                       }));
      }
      while (running_ > 0) co_await waker_.wait();
      if (stop_) throw *stop_;

      v1::CopyFinishCall finish;
      finish.set_copy_id(job_->info.id());
      for (const auto& [i, d] : digests_) {
        auto* e = finish.add_digests();
        e->set_index(i);
        e->set_digest(from_digest(d));
      }
      const v1::CopyFinishReply done = co_await client_.call<v1::Migration::CopyFinish>(finish);
      digest = done.digest();
      if (digest != from_digest(combine_digests(digests_)))
        throw migration_error(Code::data_loss, "the destination's volume digest " + digest_hex(to_digest(digest)) +
                                                   " differs from the source's");
      spdlog::info("{}: done and verified, {} extents, digest {}", what, digests_.size(), digest_hex(to_digest(digest)));
    } catch (...) {
      failure = stop_ ? *stop_ : Error::from_exception(std::current_exception());
    }
    if (failure) {
      halt(*failure);
      while (running_ > 0) co_await waker_.wait();
      spdlog::info("{} failed: {}", what, failure->message());
      if (client_.is_open()) {
        v1::CopyAbortCall abort;
        abort.set_copy_id(job_->info.id());
        abort.set_code(static_cast<std::uint32_t>(failure->code()));
        abort.set_message(failure->message());
        try {
          co_await client_.call<v1::Migration::CopyAbort>(abort, rpc::with_timeout(std::chrono::seconds(2)));
        } catch (const std::exception&) {
          // The destination also ends the session when this connection closes.
        }
      }
    }
    if (client_.is_open()) client_.close();
    file_.reset();
    impl_->jobs_.finish(job_, failure, digest);
  }

  asio::awaitable<void> work() {
    while (!stop_ && !todo_.empty()) {
      const std::uint64_t i = todo_.front();
      todo_.pop_front();
      co_await send_extent(i);
    }
  }

  RangeReader::Options read_options(std::uint64_t chunk) const {
    RangeReader::Options o;
    o.chunk = chunk;
    o.depth = impl_->options_.depth;
    o.detect_zeros = true;
    return o;
  }

  asio::awaitable<Digest> hash_extent(std::uint64_t i) {
    co_return co_await hash_range(strand_, &impl_->volumes_.file_io(), file_, extent_offset(i),
                                  extent_offset(i) + extent_length(i), impl_->options_.depth,
                                  impl_->server_.buffer_pool().get(), "volume " + ref_text(call_.source()));
  }

  // Spends `bytes` of the bandwidth cap, waiting as long as it takes.
  asio::awaitable<void> throttle(std::uint64_t bytes) {
    if (!call_.bandwidth()) co_return;
    const auto now = Clock::now();
    if (next_send_ < now) next_send_ = now;
    const auto at = next_send_;
    next_send_ += std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(static_cast<double>(bytes) / static_cast<double>(call_.bandwidth())));
    // In short steps, so a cancel is not kept waiting behind the cap.
    asio::steady_timer timer(strand_);
    while (Clock::now() < at) {
      if (stop_) throw *stop_;
      timer.expires_at(std::min(at, Clock::now() + std::chrono::milliseconds(20)));
      co_await timer.async_wait(asio::use_awaitable);
    }
  }

  asio::awaitable<void> send_extent(std::uint64_t i) {
    const std::uint64_t offset = extent_offset(i);
    const std::uint64_t length = extent_length(i);
    v1::CopyWriteCall call;
    call.set_copy_id(job_->info.id());
    call.set_index(i);
    call.set_offset(offset);
    call.set_length(length);
    auto opened = stream::open<v1::Migration::CopyWrite>(client_, call);
    std::shared_ptr<stream::Stream> s = opened.stream;
    active_.insert(s);
    if (stop_) s->abort(*stop_);
    RangeReader reader(strand_, &impl_->volumes_.file_io(), file_, offset, offset + length,
                       read_options(s->limits().chunk_size), impl_->server_.buffer_pool().get(),
                       "volume " + ref_text(call_.source()));
    ExtentHasher h;
    v1::CopyWriteReply reply;
    try {
      for (;;) {
        if (stop_) throw *stop_;
        RangeReader::Piece piece = co_await reader.next();
        if (piece.kind == RangeReader::Piece::Kind::end) break;
        const std::uint64_t n = piece.length;
        if (piece.kind == RangeReader::Piece::Kind::hole) {
          h.zeros(n);
          co_await s->write_hole(n);
          impl_->jobs_.update(job_, [&](v1::JobStatus& info) { info.set_hole_bytes(info.hole_bytes() + n); });
        } else {
          h.data(piece.data.span());
          co_await throttle(n);
          co_await s->write(std::move(piece.data));
          impl_->jobs_.update(job_, [&](v1::JobStatus& info) { info.set_data_bytes(info.data_bytes() + n); });
        }
      }
      co_await s->finish();
      reply = co_await opened.reply();
    } catch (...) {
      active_.erase(s);
      // The destination's reason, if it gave one, says more than ours.
      if (s->failed_by_peer() && s->error() && !stop_) throw *s->error();
      throw;
    }
    active_.erase(s);
    const Digest mine = h.digest();
    if (to_digest(reply.digest()) != mine || reply.digest().size() != mine.size())
      throw migration_error(Code::data_loss, "extent " + std::to_string(i) + " (offset " + std::to_string(offset) +
                                                 "): the destination wrote digest " +
                                                 digest_hex(to_digest(reply.digest())) + ", the source sent " +
                                                 digest_hex(mine));
    digests_[i] = mine;
    impl_->jobs_.update(job_, [&](v1::JobStatus& info) {
      info.set_done_bytes(info.done_bytes() + length);
      info.set_extents_done(info.extents_done() + 1);
    });
  }

  std::shared_ptr<Migration::Impl> impl_;
  std::shared_ptr<Job> job_;
  v1::CopyStartCall call_;
  asio::io_context& io_;
  asio::strand<asio::io_context::executor_type> strand_;
  rpc::Waker waker_;
  std::shared_ptr<Fd> file_;
  std::uint64_t capacity_ = 0;
  std::uint64_t extent_size_ = 0;
  unsigned parallel_ = 1;
  rpc::Client client_;
  std::optional<Error> stop_;
  std::set<std::shared_ptr<stream::Stream>> active_;
  std::deque<std::uint64_t> todo_;
  std::map<std::uint64_t, Digest> digests_;
  unsigned running_ = 0;
  Clock::time_point next_send_{};
};

// ---------------------------------------------------------------------------

std::shared_ptr<rpc::Program> Migration::Impl::program() {
  auto program = rpc::Program::of<v1::Migration>();
  auto self = shared_from_this();
  FileIo* io = &volumes_.file_io();

  // ---- destination ----
  program->on<v1::Migration::CopyOpen>([self](const v1::CopyOpenCall& call,
                                              rpc::CallContext& ctx) -> asio::awaitable<v1::CopyOpenReply> {
    const auto& p = self->volumes_.writable_pool(call.volume().pool(), "copy a volume");
    const std::string name = call.volume().name();
    validate_volume_name(name);
    const std::string key = p.name + "/" + name;
    if (call.copy_id().empty()) throw migration_error(Code::invalid_argument, "a copy needs an id");
    if (call.capacity() == 0 || call.capacity() > (1ull << 62))
      throw migration_error(Code::invalid_argument, "capacity " + std::to_string(call.capacity()) + " is out of range");
    if (call.extent_size() < 4096 || call.extent_size() > (1ull << 34) || call.extent_size() % 4096)
      throw migration_error(Code::invalid_argument, "extent size " + std::to_string(call.extent_size()) +
                                                        " is not a multiple of 4096 between 4 KiB and 16 GiB");
    auto lock = self->volumes_.lock_writer(p.name, name, "a copy from " + call.source() + " (" + call.copy_id() + ")");
    auto s = std::make_shared<Session>();
    s->copy_id = call.copy_id();
    s->key = key;
    s->name = name;
    s->pool = &p;
    s->source = call.source();
    s->capacity = call.capacity();
    s->extent_size = call.extent_size();
    s->no_sync = call.no_sync();
    s->lock = lock;
    s->opener = ctx.channel();
    v1::CopyOpenReply reply;

    struct stat st {};
    const bool exists = ::fstatat(p.dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0;
    std::optional<CopyState> state = exists ? read_copy_state(p.dirfd, name) : std::nullopt;
    if (exists) {
      if (state && call.resume()) {
        if (state->capacity != call.capacity() || state->extent_size != call.extent_size())
          throw migration_error(Code::failed_precondition,
                                "volume " + key + " holds an incomplete copy of another shape (" +
                                    std::to_string(state->capacity) + " bytes in extents of " +
                                    std::to_string(state->extent_size) + "); vol-copy --overwrite starts over");
      } else if (state && !call.overwrite()) {
        throw migration_error(Code::failed_precondition, "volume " + key + " holds an incomplete " + state->summary() +
                                                             "; vol-copy --resume continues it, --overwrite starts over");
      } else if (!state && !call.overwrite()) {
        throw migration_error(Code::already_exists, "volume " + key + " already exists" +
                                                        (call.resume() ? " and is complete: there is nothing to resume"
                                                                       : "; vol-copy --overwrite replaces it"));
      }
      s->file = self->volumes_.open_file(p, name, O_RDWR, &st);
      if (!(state && call.resume())) {
        // Over: empty it, so every hole is already a hole.
        if (::ftruncate(s->file->fd, 0) != 0) throw Error::from_errno(errno, "empty volume " + key);
        state.reset();
        s->fresh = true;
      }
      if (::ftruncate(s->file->fd, static_cast<off_t>(call.capacity())) != 0)
        throw Error::from_errno(errno, "size volume " + key);
    } else {
      const int fd = ::openat(p.dirfd, name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
      if (fd < 0) throw Error::from_errno(errno, "create volume " + key);
      s->file = std::make_shared<Fd>(fd);
      if (::ftruncate(fd, static_cast<off_t>(call.capacity())) != 0) {
        const int err = errno;
        ::unlinkat(p.dirfd, name.c_str(), 0);
        throw Error::from_errno(err, "size volume " + key);
      }
      s->fresh = true;
      reply.set_created(true);
    }
    if (!state) {
      CopyState fresh;
      fresh.capacity = call.capacity();
      fresh.extent_size = call.extent_size();
      fresh.started_ns = now_ns();
      fresh.source = call.source();
      create_copy_state(p.dirfd, name, fresh);
      state = fresh;
    }
    s->committed = state->committed;
    for (const auto& [i, d] : s->committed) {
      auto* c = reply.add_committed();
      c->set_index(i);
      c->set_digest(from_digest(d));
    }
    const std::uint64_t extents = state->extents();
    s->job = self->jobs_.add(new_id("in"), "copy-in", call.source(), key, call.capacity(), extents);
    reply.set_job(s->job->info.id());
    std::uint64_t committed_bytes = 0;
    for (const auto& [i, d] : s->committed)
      committed_bytes += std::min(call.extent_size(), call.capacity() - i * call.extent_size());
    self->jobs_.update(s->job, [&](v1::JobStatus& info) {
      info.set_resumed(!s->committed.empty());
      info.set_skipped_bytes(committed_bytes);
      info.set_done_bytes(committed_bytes);
      info.set_extents_done(s->committed.size());
    }, true);
    {
      std::lock_guard l(s->job->mutex);
      s->job->rate_base = committed_bytes;
    }
    std::weak_ptr<Session> weak = s;
    std::weak_ptr<Impl> weak_self = self;
    self->jobs_.set_cancel(s->job, [weak, weak_self](const Error& e) {
      auto session = weak.lock();
      auto impl = weak_self.lock();
      if (session && impl) impl->end_session(session, e);
    });
    {
      std::lock_guard l(self->sessions_mutex_);
      if (self->sessions_.count(s->copy_id))
        throw migration_error(Code::already_exists, "copy session '" + s->copy_id + "' is open already");
      self->sessions_[s->copy_id] = s;
    }
    if (reply.created())
      self->volumes_.publish(v1::VOLUME_CREATED, p.name, name, call.capacity(), "created by a copy from " + call.source());
    spdlog::info("copy into {} from {} ({}): {}, {} of {} extents committed", key, call.source(), call.copy_id(),
                 reply.created() ? "new volume" : (s->committed.empty() ? "overwriting" : "resuming"),
                 s->committed.size(), extents);
    self->watch(s);
    co_return reply;
  });

  stream::on<v1::Migration::CopyWrite>(*program, [self, io](const v1::CopyWriteCall& call, stream::Stream& st,
                                                           rpc::CallContext& ctx) -> asio::awaitable<v1::CopyWriteReply> {
    auto s = self->session(call.copy_id());
    ctx.set_subject(s->key);
    const std::uint64_t extents = (s->capacity + s->extent_size - 1) / s->extent_size;
    if (call.index() >= extents || call.offset() != call.index() * s->extent_size ||
        call.length() != std::min(s->extent_size, s->capacity - call.offset()))
      throw migration_error(Code::invalid_argument, "extent " + std::to_string(call.index()) + " at " +
                                                        std::to_string(call.offset()) + "+" +
                                                        std::to_string(call.length()) + " is not an extent of " + s->key);
    std::shared_ptr<Fd> file;
    std::shared_ptr<void> lock;
    {
      std::lock_guard l(s->mutex);
      if (s->ended) throw *s->ended;
      s->writers.push_back(st.weak_from_this());
      file = s->file;
      lock = s->lock;
    }
    const auto ex = co_await asio::this_coro::executor;
    Pipeline pipeline(ex, self->volumes_.io_depth(), std::make_shared<std::pair<std::shared_ptr<void>, std::shared_ptr<Fd>>>(lock, file));
    ExtentHasher h;
    v1::CopyWriteReply reply;
    std::uint64_t pos = call.offset();
    const std::uint64_t end = call.offset() + call.length();
    try {
      for (;;) {
        stream::Item item = co_await st.read();
        if (item.kind == stream::Item::Kind::end) break;
        if (item.length > end - pos)
          throw migration_error(Code::out_of_range, "extent " + std::to_string(call.index()) + " of " + s->key +
                                                        " got more than its " + std::to_string(call.length()) + " bytes");
        const std::uint64_t at = pos;
        if (item.kind == stream::Item::Kind::data) {
          auto chunk = std::make_shared<stream::Chunk>(std::move(item.data));
          h.data(chunk->bytes());
          co_await pipeline.room();
          pipeline.start([io, file, chunk, at]() -> asio::awaitable<void> { co_await io->write(file->fd, chunk->bytes(), at); });
          reply.set_data_bytes(reply.data_bytes() + item.length);
        } else {
          h.zeros(item.length);
          reply.set_hole_bytes(reply.hole_bytes() + item.length);
          if (!s->fresh) {
            // Over bytes an earlier, broken copy may have written.
            const std::uint64_t len = item.length;
            co_await pipeline.room();
            pipeline.start(
                [io, file, at, len]() -> asio::awaitable<void> { co_await io->zero_range(file->fd, at, len); });
          }
        }
        pos += item.length;
      }
      if (pos != end)
        throw migration_error(Code::invalid_argument, "extent " + std::to_string(call.index()) + " of " + s->key +
                                                          " ended after " + std::to_string(pos - call.offset()) +
                                                          " of its " + std::to_string(call.length()) + " bytes");
      co_await pipeline.drain();
      if (!s->no_sync) co_await io->datasync(file->fd);
      const Digest d = h.digest();
      const std::uint64_t index = call.index();
      // A raw pointer: `s` outlives the call, and nothing owning may ride
      // in a temporary of a co_await expression (GCC 12).
      Session* session = s.get();
      co_await io->run([session, index, d] {
        std::lock_guard l(session->mutex);
        if (session->ended) throw *session->ended;
        append_committed(session->pool->dirfd, session->name, index, d, !session->no_sync);
        session->committed[index] = d;
      });
      reply.set_digest(from_digest(d));
    } catch (...) {
      std::lock_guard l(s->mutex);
      if (s->ended) throw *s->ended;  // cancelled here, or aborted by the source: say why
      throw;
    }
    const std::uint64_t len = call.length();
    self->jobs_.update(s->job, [&](v1::JobStatus& info) {
      info.set_done_bytes(info.done_bytes() + len);
      info.set_extents_done(info.extents_done() + 1);
      info.set_data_bytes(info.data_bytes() + reply.data_bytes());
      info.set_hole_bytes(info.hole_bytes() + reply.hole_bytes());
    });
    co_return reply;
  });

  program->on<v1::Migration::CopyFinish>([self, io](const v1::CopyFinishCall& call,
                                                    rpc::CallContext&) -> asio::awaitable<v1::CopyFinishReply> {
    auto s = self->session(call.copy_id());
    std::map<std::uint64_t, Digest> theirs;
    for (const auto& e : call.digests()) theirs[e.index()] = to_digest(e.digest());
    const std::uint64_t extents = (s->capacity + s->extent_size - 1) / s->extent_size;
    std::map<std::uint64_t, Digest> mine;
    std::shared_ptr<Fd> file;
    {
      std::lock_guard l(s->mutex);
      if (s->ended) throw *s->ended;
      mine = s->committed;
      file = s->file;
    }
    std::optional<Error> wrong;
    for (std::uint64_t i = 0; i < extents && !wrong; ++i) {
      auto m = mine.find(i);
      auto t = theirs.find(i);
      if (m == mine.end())
        wrong = migration_error(Code::failed_precondition, "extent " + std::to_string(i) + " of " + s->key +
                                                               " was never committed; the copy is not complete");
      else if (t == theirs.end() || t->second != m->second)
        wrong = migration_error(Code::data_loss, "extent " + std::to_string(i) + " of " + s->key + ": the source has " +
                                                     (t == theirs.end() ? std::string("no digest") : digest_hex(t->second)) +
                                                     ", the destination wrote " + digest_hex(m->second));
    }
    if (wrong) {
      self->end_session(s, *wrong);
      throw *wrong;
    }
    if (!s->no_sync) co_await io->datasync(file->fd);
    remove_copy_state(s->pool->dirfd, s->name);
    const Digest whole = combine_digests(mine);
    v1::CopyFinishReply reply;
    *reply.mutable_volume() = self->volumes_.info(*s->pool, s->name);
    reply.set_digest(from_digest(whole));
    self->volumes_.publish(v1::VOLUME_WRITTEN, s->pool->name, s->name, s->capacity,
                           "copied from " + s->source + ", " + std::to_string(extents) + " extents verified");
    spdlog::info("copy into {} from {} ({}) complete: {} extents verified, digest {}", s->key, s->source, s->copy_id,
                 extents, digest_hex(whole));
    self->end_session(s, std::nullopt, from_digest(whole));
    // The lock goes with the session; the reply's info says "not writing".
    reply.mutable_volume()->set_writing(false);
    co_return reply;
  });

  program->on<v1::Migration::CopyAbort>([self](const v1::CopyAbortCall& call,
                                               rpc::CallContext&) -> asio::awaitable<v1::Empty> {
    std::shared_ptr<Session> s = self->find_session(call.copy_id());
    if (!s) co_return v1::Empty{};  // ended already
    const auto code = call.code() ? static_cast<Code>(call.code()) : Code::aborted;
    self->end_session(s, Error(code, call.message().empty() ? "the source aborted the copy" : call.message(), "migration"));
    co_return v1::Empty{};
  });

  // ---- source ----
  program->on<v1::Migration::CopyStart>([self](const v1::CopyStartCall& call,
                                               rpc::CallContext& ctx) -> asio::awaitable<v1::JobStatus> {
    const auto& p = self->volumes_.find_pool(call.source().pool());
    validate_volume_name(call.source().name());
    validate_volume_name(call.destination().name());
    if (call.destination().pool().empty())
      throw migration_error(Code::invalid_argument, "the destination needs a pool and a volume name");
    rpc::Endpoint::parse(call.destination_uri());  // INVALID_ARGUMENT now, not in the job
    struct stat st {};
    auto file = self->volumes_.open_file(p, call.source().name(), O_RDONLY, &st);
    const auto capacity = static_cast<std::uint64_t>(st.st_size);
    if (capacity == 0)
      throw migration_error(Code::failed_precondition, "volume " + ref_text(call.source()) + " is empty: nothing to copy");
    const std::uint64_t extent = call.extent_size() ? std::max<std::uint64_t>(1u << 20, call.extent_size())
                                                    : self->options_.extent_size;
    if (extent % 4096) throw migration_error(Code::invalid_argument, "the extent size must be a multiple of 4096");
    auto job = self->jobs_.add(new_id("copy"), "copy-out", p.name + "/" + call.source().name(),
                               call.destination_uri() + "/" + ref_text(call.destination()), capacity,
                               (capacity + extent - 1) / extent);
    spdlog::info("job {}: copy {} ({} bytes) to {}/{} for {}", job->info.id(), ref_text(call.source()), capacity,
                 call.destination_uri(), ref_text(call.destination()), ctx.peer().address);
    auto out = std::make_shared<CopyOut>(self, job, call, self->server_.next_io_context());
    out->start(std::move(file), capacity);
    co_return self->jobs_.info(job->info.id());
  });

  program->on<v1::Migration::ExtentDigests>([self, io](const v1::ExtentDigestsCall& call,
                                                       rpc::CallContext& ctx) -> asio::awaitable<v1::ExtentDigestsReply> {
    const auto& p = self->volumes_.find_pool(call.volume().pool());
    validate_volume_name(call.volume().name());
    const std::uint64_t extent = call.extent_size();
    if (extent < 4096 || extent > (1ull << 34) || extent % 4096)
      throw migration_error(Code::invalid_argument, "extent size " + std::to_string(extent) +
                                                        " is not a multiple of 4096 between 4 KiB and 16 GiB");
    struct stat st {};
    auto file = self->volumes_.open_file(p, call.volume().name(), O_RDONLY, &st);
    const auto capacity = static_cast<std::uint64_t>(st.st_size);
    const std::uint64_t extents = (capacity + extent - 1) / extent;
    if (call.first() > extents)
      throw migration_error(Code::out_of_range, "extent " + std::to_string(call.first()) + " is past the end of " +
                                                    ref_text(call.volume()) + " (" + std::to_string(extents) + " extents)");
    const std::uint64_t last = call.count() ? std::min(extents, call.first() + call.count()) : extents;
    v1::ExtentDigestsReply reply;
    reply.set_capacity(capacity);
    const std::string what = "volume " + ref_text(call.volume());
    for (std::uint64_t i = call.first(); i < last; ++i) {
      if (ctx.cancelled()) throw Error(Code::cancelled, "extent digests cancelled by the client", "migration");
      const Digest d = co_await hash_range(ctx.executor(), io, file, i * extent, std::min(capacity, (i + 1) * extent),
                                           self->options_.depth, self->server_.buffer_pool().get(), what);
      auto* e = reply.add_digests();
      e->set_index(i);
      e->set_digest(from_digest(d));
    }
    co_return reply;
  });

  // ---- jobs ----
  program->on<v1::Migration::JobList>([self](const v1::JobListCall&, rpc::CallContext&) -> asio::awaitable<v1::JobListReply> {
    v1::JobListReply reply;
    for (auto& j : self->jobs_.list()) *reply.add_jobs() = std::move(j);
    co_return reply;
  });
  program->on<v1::Migration::JobInfo>([self](const v1::JobRef& ref, rpc::CallContext&) -> asio::awaitable<v1::JobStatus> {
    co_return self->jobs_.info(ref.id());
  });
  program->on<v1::Migration::JobCancel>([self](const v1::JobRef& ref, rpc::CallContext& ctx) -> asio::awaitable<v1::JobStatus> {
    auto job = self->jobs_.find(ref.id());
    const std::string reason = ref.reason().empty() ? "cancelled by job-cancel on " + host_name() : ref.reason();
    spdlog::info("job {}: cancel asked by {}: {}", ref.id(), ctx.peer().address, reason);
    self->jobs_.cancel(job, Error(Code::cancelled, reason, "migration"));
    co_return self->jobs_.info(ref.id());
  });
  program->on<v1::Migration::JobWait>([self](const v1::JobRef& ref, rpc::ReplyToken<v1::JobStatus> token) {
    try {
      self->jobs_.wait(ref.id(), std::move(token));
    } catch (const Error& e) {
      token.fail(e);
    }
  });
  program->on<v1::Migration::JobSubscribe>([self](const v1::JobSubscribeCall&,
                                                  rpc::CallContext& ctx) -> asio::awaitable<v1::JobSubscribeReply> {
    self->jobs_.subscribe(ctx.channel());
    co_return v1::JobSubscribeReply{};
  });
  program->on<v1::Migration::JobUnsubscribe>([self](const v1::JobSubscribeCall&,
                                                    rpc::CallContext& ctx) -> asio::awaitable<v1::Empty> {
    self->jobs_.unsubscribe(ctx.channel());
    co_return v1::Empty{};
  });
  return program;
}

void Migration::Impl::shutdown(std::chrono::milliseconds grace) {
  const Error bye(Code::unavailable, "ferryd is shutting down", "migration", true);
  for (auto& job : jobs_.running()) jobs_.cancel(job, bye);
  const auto until = Clock::now() + grace;
  while (!jobs_.running().empty() && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(20));
}

Migration::Migration(VolumeService& volumes, rpc::Server& server, MigrationOptions options)
    : impl_(std::make_shared<Impl>(volumes, server, std::move(options))) {}
Migration::~Migration() = default;
std::shared_ptr<rpc::Program> Migration::program() { return impl_->program(); }
void Migration::shutdown(std::chrono::milliseconds grace) { impl_->shutdown(grace); }
std::vector<v1::JobStatus> Migration::jobs() const { return impl_->jobs_.list(); }
v1::JobStatus Migration::cancel_job(const std::string& id, const std::string& reason) {
  auto job = impl_->jobs_.find(id);
  spdlog::info("job {}: cancelled by the administrator: {}", id, reason);
  impl_->jobs_.cancel(job, Error(Code::cancelled, reason, "migration"));
  return impl_->jobs_.info(id);
}

}  // namespace ferry::daemon
