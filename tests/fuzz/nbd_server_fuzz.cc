// Fuzz target for the NBD server (nbd/server.cc, nbd/protocol.cc,
// nbd/budget.cc): whatever bytes a client sends, serve() ends (the
// io_context runs dry: no request or writer is left waiting), never
// throws, never crashes, and gives back every byte of its budget.
//
// Input: the whole client byte stream, handshake included. It is fed
// through an in-memory Pipe in pieces of varying size (so that headers and
// payloads split anywhere) into serve() over a small in-memory export.
// Exports: "" and "fuzz" (256 KiB, read-write), "ro" (read-only), "boom"
// (its lookup throws); the backend fails some ranges with chosen errnos.
//
//   build-fuzz/tests/fuzz/nbd_server_fuzz -max_total_time=60 /tmp/nbd-corpus tests/fuzz/corpus/nbd_server
//   NBD_FUZZ_LOG=1 build/tests/fuzz/nbd_server_replay crash-...   (with the server's log)
#include <spdlog/spdlog.h>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "nbd/server.h"
#include "rpc/error.h"

namespace {

using namespace ferry::nbd;

void require(bool ok, const char* what) {
  if (ok) return;
  std::fprintf(stderr, "nbd_server_fuzz: invariant broken: %s\n", what);
  std::abort();
}

// The client's bytes, handed out in pieces of 1 to 4096 bytes chosen by
// the position; replies are counted and dropped.
class MemoryPipe : public Pipe {
 public:
  MemoryPipe(asio::any_io_executor ex, const std::uint8_t* data, std::size_t size)
      : ex_(std::move(ex)), data_(data), size_(size) {}
  asio::any_io_executor get_executor() override { return ex_; }
  asio::awaitable<std::size_t> read_some(std::span<std::uint8_t> out) override {
    if (closed_ || pos_ == size_) co_return 0;
    const std::size_t piece = 1 + (pos_ * 2654435761u >> 7) % 4096;
    const std::size_t n = std::min({out.size(), size_ - pos_, piece});
    std::memcpy(out.data(), data_ + pos_, n);
    pos_ += n;
    co_return n;
  }
  asio::awaitable<void> write(std::vector<ferry::rpc::Buffer>& buffers) override {
    if (closed_) throw ferry::Error(ferry::Code::unavailable, "pipe closed", "nbd");
    for (const auto& b : buffers) written += b.size();
    buffers.clear();
    co_return;
  }
  void close() override { closed_ = true; }
  std::string peer() const override { return "fuzz"; }

  std::uint64_t written = 0;

 private:
  asio::any_io_executor ex_;
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  bool closed_ = false;
};

// 256 KiB of memory in 4 KiB blocks, allocated when first written (so a
// run costs what it touches); never-written blocks read as zeros and are
// reported as holes. Operations starting in [192 KiB, 224 KiB) fail: EIO,
// ENOSPC, no errno, EACCES by 8 KiB slice. A fast zero is never possible.
class FuzzBackend : public Backend {
 public:
  static constexpr std::uint64_t block = 4096;
  static constexpr std::uint64_t total = 256u << 10;
  explicit FuzzBackend(bool read_only) : blocks_(total / block) { caps_.read_only = read_only; }
  std::uint64_t size() const override { return total; }
  Capabilities capabilities() const override { return caps_; }
  std::string description() const override { return "fuzz memory"; }

  asio::awaitable<void> read(std::span<std::uint8_t> out, std::uint64_t offset, std::vector<Extent>* map) override {
    check(offset, out.size());
    if (map) map->clear();
    for_blocks(offset, out.size(), [&](std::uint64_t b, std::uint64_t at, std::uint64_t n, std::uint64_t done) {
      const bool hole = !blocks_[b];
      if (!hole)
        std::memcpy(out.data() + done, blocks_[b].get() + at, n);
      else if (!map)
        std::memset(out.data() + done, 0, n);
      if (map) {
        const std::uint32_t flags = hole ? state_hole | state_zero : 0;
        if (!map->empty() && map->back().flags == flags)
          map->back().length += n;
        else
          map->push_back({n, flags});
      }
    });
    co_return;
  }
  asio::awaitable<void> write(std::span<const std::uint8_t> data, std::uint64_t offset, bool) override {
    check(offset, data.size());
    require(!caps_.read_only, "no write reaches a read-only backend");
    for_blocks(offset, data.size(), [&](std::uint64_t b, std::uint64_t at, std::uint64_t n, std::uint64_t done) {
      std::memcpy(allocate(b) + at, data.data() + done, n);
    });
    co_return;
  }
  asio::awaitable<void> flush() override { co_return; }
  asio::awaitable<void> trim(std::uint64_t offset, std::uint64_t length, bool) override {
    check(offset, length);
    require(!caps_.read_only, "no trim reaches a read-only backend");
    co_return;
  }
  asio::awaitable<void> zero(std::uint64_t offset, std::uint64_t length, ZeroFlags flags) override {
    check(offset, length);
    require(!caps_.read_only, "no zero reaches a read-only backend");
    if (flags.fast) throw ferry::Error(ferry::Code::unimplemented, "no fast zero", "fuzz", false, ENOTSUP);
    for_blocks(offset, length, [&](std::uint64_t b, std::uint64_t at, std::uint64_t n, std::uint64_t) {
      if (flags.may_trim && n == block)
        blocks_[b].reset();
      else if (blocks_[b])
        std::memset(blocks_[b].get() + at, 0, n);
    });
    co_return;
  }
  asio::awaitable<std::vector<Extent>> extents(std::uint64_t offset, std::uint64_t length) override {
    check(offset, length);
    std::vector<Extent> out;
    // Block by block, at most 64 extents: may stop short or run past.
    for (std::uint64_t b = offset / block; b < total / block && out.size() < 64; ++b) {
      if (b * block >= offset + length) break;
      const std::uint64_t start = std::max(offset, b * block);
      out.push_back({(b + 1) * block - start, blocks_[b] ? 0u : state_hole});
    }
    co_return out;
  }

 private:
  // The server promised in-range, non-empty requests.
  static void check(std::uint64_t offset, std::uint64_t length) {
    require(length > 0 && offset < total && length <= total - offset, "backend gets in-range, non-empty requests");
    if (offset >= (192u << 10) && offset < (224u << 10)) {
      static const int errs[] = {EIO, ENOSPC, 0, EACCES};
      throw ferry::Error(ferry::Code::internal, "injected failure", "fuzz", false, errs[(offset >> 13) & 3]);
    }
  }
  template <class F>
  static void for_blocks(std::uint64_t offset, std::uint64_t length, F&& f) {
    for (std::uint64_t done = 0; done < length;) {
      const std::uint64_t pos = offset + done;
      const std::uint64_t n = std::min(block - pos % block, length - done);
      f(pos / block, pos % block, n, done);
      done += n;
    }
  }
  std::uint8_t* allocate(std::uint64_t b) {
    if (!blocks_[b]) blocks_[b] = std::make_unique<std::uint8_t[]>(block);
    return blocks_[b].get();
  }
  Capabilities caps_;
  std::vector<std::unique_ptr<std::uint8_t[]>> blocks_;
};

class FuzzExports : public ExportSource {
 public:
  FuzzExports() {
    rw_ = std::make_shared<Export>();
    rw_->name = "fuzz";
    rw_->description = "fuzz export";
    rw_->backend = std::make_shared<FuzzBackend>(false);
    ro_ = std::make_shared<Export>();
    ro_->name = "ro";
    ro_->backend = std::make_shared<FuzzBackend>(true);
    ro_->read_only = true;
  }
  std::shared_ptr<Export> find(const std::string& name) override {
    if (name.empty() || name == "fuzz") return rw_;
    if (name == "ro") return ro_;
    if (name == "boom") throw ferry::Error(ferry::Code::permission_denied, "not for you", "fuzz");
    return nullptr;
  }
  std::vector<std::pair<std::string, std::string>> list() override {
    return {{"fuzz", "fuzz export"}, {"ro", ""}};
  }

 private:
  std::shared_ptr<Export> rw_, ro_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // NBD_FUZZ_LOG=1 keeps the server's log (why each session ended), for
  // looking at a reproducer.
  static const bool quiet = [] {
    if (!std::getenv("NBD_FUZZ_LOG")) spdlog::set_level(spdlog::level::off);
    return true;
  }();
  (void)quiet;

  FuzzExports exports;
  asio::io_context io;
  MemoryPipe pipe(io.get_executor(), data, size);
  ServerOptions options;
  options.max_in_flight = 8;
  options.max_request = 64u << 10;
  options.max_option = 4096;
  options.budget = ByteBudget::create(128u << 10);
  // Odd input lengths use a pool, even ones plain buffers.
  if (size & 1) options.buffers = ferry::rpc::BufferPool::create(1u << 20);
  auto budget = options.budget;

  bool done = false;
  asio::co_spawn(io, serve(pipe, exports, options), [&](std::exception_ptr e, SessionStats stats) {
    require(!e, "serve() does not throw");
    require(stats.peak_in_flight <= 8, "at most max_in_flight requests at once");
    done = true;
  });
  io.run();
  require(done, "serve() returns once the input is over (nothing left waiting)");
  require(budget->in_use() == 0, "every byte taken from the budget is given back");
  require(budget->peak() <= budget->limit(), "the budget is never overdrawn");
  return 0;
}
