// libferry's blocking C++ API: one connection to a ferryd and the volume
// procedures, file transfers with progress, raw upload and download streams,
// and volume events. docs/libferry.md shows it next to the coroutine API
// (rpc::Client, Volume::Stub and stream::open), which this is built on.
//
//   auto session = ferry::Session::connect("ferry+unix:///run/ferry/ferryd.sock");
//   session.vol_create("default", "disk.img", 10ull << 30);
//   auto result = session.upload_file("default", "disk.img", "disk.raw");
//
// Threading: a Session owns one io thread that runs its connection; its
// methods block the calling thread (never an io thread) and may be called
// from several threads at once. Errors are thrown as ferry::Error.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ferry/v1/volume.pb.h"
#include "rpc/client.h"
#include "rpc/io_threads.h"
#include "stream/stream.h"

namespace ferry {

// How far a transfer has come; handed to a progress callback about ten
// times a second and once at the end.
struct Progress {
  std::uint64_t done = 0;         // bytes of the range covered (data + holes)
  std::uint64_t total = 0;        // bytes of the range, 0 when unknown (stdin)
  std::uint64_t data_bytes = 0;   // of `done`, bytes sent as data
  std::uint64_t hole_bytes = 0;   // of `done`, bytes sent as holes
  std::chrono::steady_clock::duration elapsed{};
  bool finished = false;
};
using ProgressFn = std::function<void(const Progress&)>;

struct UploadOptions {
  std::uint64_t offset = 0;              // where in the volume the file's bytes go
  std::optional<std::uint64_t> length;   // bytes of the file to send (default: all of it)
  bool detect_zeros = false;             // also send all-zero chunks as holes
  bool dense = false;                    // send every byte, holes as zeros
  bool atomic = false;                   // replace the volume only when all is there
  bool keep_capacity = false;            // atomic: keep the volume's size if the file is shorter
  bool no_sync = false;                  // skip the daemon's fdatasync before it answers
  bool create = false;                   // create the volume, sized to the data, if it is missing
  // Cancelling it aborts this transfer alone (the daemon sees CANCELLED at
  // once; upload_file throws it), from any thread.
  std::shared_ptr<rpc::CancelSource> cancel;
};

struct DownloadOptions {
  std::uint64_t offset = 0;
  std::optional<std::uint64_t> length;
  bool detect_zeros = false;  // the daemon also sends all-zero chunks as holes
  bool dense = false;         // write every byte to the file, holes as zeros
  std::shared_ptr<rpc::CancelSource> cancel;  // as UploadOptions::cancel
};

struct TransferResult {
  std::uint64_t data_bytes = 0;
  std::uint64_t hole_bytes = 0;
  std::chrono::steady_clock::duration elapsed{};
  v1::VolumeInfo volume;  // upload: the volume afterwards
};

// An upload the caller feeds itself (bytes from memory, a pipe, a decoder).
class UploadStream {
 public:
  void write(std::span<const std::uint8_t> data);
  void write_hole(std::uint64_t length);
  // Ends the stream and waits for the daemon's answer (the data is on disk
  // unless no_sync was asked for).
  v1::VolUploadReply finish();
  // Stops the upload: the daemon sees `reason` at once and keeps what it
  // wrote (or, atomic, the old contents).
  void abort(const std::string& reason = "aborted by the client");
  std::uint64_t bytes_sent() const;

  UploadStream(UploadStream&&) noexcept;
  ~UploadStream();

 private:
  friend class Session;
  struct Impl;
  explicit UploadStream(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class DownloadStream {
 public:
  struct Piece {
    enum class Kind { data, hole, end } kind = Kind::end;
    stream::Chunk data;        // Kind::data
    std::uint64_t length = 0;  // data or hole bytes
  };
  Piece read();
  // After read() returned end: the daemon's answer.
  v1::VolDownloadReply finish();
  void abort(const std::string& reason = "aborted by the client");

  DownloadStream(DownloadStream&&) noexcept;
  ~DownloadStream();

 private:
  friend class Session;
  struct Impl;
  explicit DownloadStream(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class Session {
 public:
  // Connects (ferry+unix:///path, ferry+tcp://host:port, ferry+tls://host:port).
  // With options.reconnect.enabled the session survives a lost connection
  // (docs/libferry.md, "Reconnecting"): idempotent calls are sent again,
  // download_file resumes where it was, and an event subscription is made
  // again on the new connection.
  static Session connect(const std::string& uri, rpc::ClientOptions options = {});
  Session(Session&&) noexcept;
  Session& operator=(Session&&) noexcept;
  ~Session();

  rpc::Client& rpc();
  // The io thread's executor (where the connection runs).
  asio::any_io_executor executor();
  void close();

  std::vector<v1::PoolInfo> pool_list();
  std::vector<v1::VolumeInfo> vol_list(const std::string& pool);
  v1::VolumeInfo vol_info(const std::string& pool, const std::string& name);
  v1::VolumeInfo vol_create(const std::string& pool, const std::string& name, std::uint64_t capacity,
                            bool preallocate = false);
  void vol_delete(const std::string& pool, const std::string& name);
  v1::VolumeInfo vol_resize(const std::string& pool, const std::string& name, std::uint64_t capacity,
                            bool allow_shrink = false);

  // Sends a local file ("-": standard input) into a volume. Holes in the
  // file go as holes.
  TransferResult upload_file(const std::string& pool, const std::string& name, const std::string& path,
                             const UploadOptions& options = {}, ProgressFn progress = {});
  // Writes a volume into a local file ("-": standard output), created or
  // truncated, holes left unallocated. The volume is looked up first, so a
  // missing volume never clobbers the file.
  TransferResult download_file(const std::string& pool, const std::string& name, const std::string& path,
                               const DownloadOptions& options = {}, ProgressFn progress = {});

  // Aborts every transfer and raw stream of this session that is running
  // now, from any thread (a signal handler's thread, a UI): the daemon sees
  // `reason` as CANCELLED at once, the blocked calls throw it.
  void abort_transfers(const std::string& reason);

  UploadStream open_upload(const v1::VolUploadCall& call);
  DownloadStream open_download(const v1::VolDownloadCall& call);

  // Volume events from the daemon (all pools, or one), on the connection's
  // io thread: keep the callback short. Replaces an earlier subscription.
  // With reconnecting, the subscription is made again after a reconnect;
  // events of the time without a connection are lost.
  void subscribe(std::function<void(const v1::VolumeEvent&)> on_event, const std::string& pool = "");
  void unsubscribe();

 private:
  Session() = default;
  struct Active;
  struct Subscription;
  std::unique_ptr<rpc::IoThreads> io_;
  // On the heap so the reconnect hook can reach it however the Session moves.
  std::unique_ptr<rpc::Client> client_;
  std::shared_ptr<Active> active_;
  std::shared_ptr<Subscription> subscription_;
  bool reconnect_ = false;
};

}  // namespace ferry
