// Backend: what an NBD export reads and writes. One asynchronous interface
// for every kind of storage behind the NBD server (nbd/server.h): ferry
// volumes (io_uring file I/O, daemon/nbd_volume.h), memory, a null sink, a
// delay filter that wraps another backend, and a remote NBD server reached
// through libnbd.
//
// Contract:
//  - Every operation is a coroutine the server awaits on its connection's
//    executor; it must not block that thread (no blocking syscalls beyond
//    the cheap, no sleeping). Many operations of one connection, and of
//    several connections (multi-conn), run at once: implementations are
//    thread-safe.
//  - Ranges given are already checked by the server: inside [0, size()),
//    non-empty, and no write on a read-only backend.
//  - Failures throw ferry::Error; its os_errno (EIO, ENOSPC, EPERM, EINVAL,
//    ENOTSUP, ENOMEM, EOVERFLOW, ESHUTDOWN) becomes the NBD error the client
//    sees, EIO when it is 0.
//  - Buffers passed in stay alive until the awaited operation returns.
#pragma once

#include <asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace ferry::nbd {

// base:allocation states (NBD_STATE_HOLE, NBD_STATE_ZERO).
inline constexpr std::uint32_t state_hole = 1u << 0;
inline constexpr std::uint32_t state_zero = 1u << 1;

struct Extent {
  std::uint64_t length = 0;
  std::uint32_t flags = 0;  // state_hole | state_zero; 0 = allocated data
  bool operator==(const Extent&) const = default;
};

struct Capabilities {
  bool read_only = false;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = true;
  bool can_zero = true;
  bool can_fast_zero = true;   // zero() with fast=true succeeds or throws ENOTSUP at once
  bool can_cache = true;
  bool can_extents = true;     // extents() and read() maps tell holes from data
  bool can_multi_conn = true;  // a flush on one connection covers writes of all
  bool rotational = false;
  std::uint32_t min_block = 1;
  std::uint32_t preferred_block = 4096;
  std::uint32_t max_block = 32u << 20;
};

struct ZeroFlags {
  bool may_trim = true;  // false with NBD_CMD_FLAG_NO_HOLE: the range must stay allocated
  bool fast = false;     // NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than write zeros slowly
  bool fua = false;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::uint64_t size() const = 0;
  virtual Capabilities capabilities() const = 0;
  // For people and logs: "volume default/disk.img", "memory 1 GiB".
  virtual std::string description() const = 0;

  // Fills `out` with the bytes at `offset`. When `map` is not null the
  // caller wants holes told apart: the backend may skip reading holes and
  // describe the range in *map (extents in order, summing to out.size();
  // bytes of `out` under a hole are then unspecified). Leaving *map empty
  // means "all data" and `out` is fully written.
  virtual asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) = 0;
  virtual asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool fua) = 0;
  // Everything written before (on any connection) is on stable storage.
  virtual asio::awaitable<void> flush() = 0;
  virtual asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool fua) = 0;
  virtual asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) = 0;
  // Allocation of [offset, offset + length): at least one extent, the first
  // starting at offset; may stop short of length (the client asks again) or,
  // for the last one, run past it (the server trims).
  virtual asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) = 0;
  // Advisory prefetch; the default does nothing.
  virtual asio::awaitable<void> cache(std::uint64_t offset, std::uint64_t length);
};

// What a server offers: looked up by the name the client asks for.
struct Export {
  std::string name;
  std::string description;
  std::shared_ptr<Backend> backend;
  bool read_only = false;  // forced read-only on top of the backend's own
};

class ExportSource {
 public:
  virtual ~ExportSource() = default;
  // The export for `name` ("" asks for the default), or null if none. May
  // open files: called during the handshake, off the hot path; a thrown
  // ferry::Error is reported to the client (NBD_REP_ERR_*) and logged.
  virtual std::shared_ptr<Export> find(const std::string& name) = 0;
  // Names for NBD_OPT_LIST (with descriptions).
  virtual std::vector<std::pair<std::string, std::string>> list() = 0;
};

// One fixed export, whatever name is asked for among "" and its own name
// (the daemon's NBD-over-ferry stream serves exactly the volume the stream
// names).
class SingleExport : public ExportSource {
 public:
  explicit SingleExport(std::shared_ptr<Export> e) : export_(std::move(e)) {}
  std::shared_ptr<Export> find(const std::string& name) override {
    return (name.empty() || name == export_->name) ? export_ : nullptr;
  }
  std::vector<std::pair<std::string, std::string>> list() override {
    return {{export_->name, export_->description}};
  }

 private:
  std::shared_ptr<Export> export_;
};

}  // namespace ferry::nbd
