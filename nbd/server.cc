#include "nbd/server.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <cstring>
#include <exception>
#include <utility>

#include "nbd/protocol.h"
#include "rpc/waker.h"

namespace ferry::nbd {

namespace {

// The reader's buffer: headers are parsed out of it, and small payloads
// arrive through it; a payload bigger than `direct_read` goes straight
// into its own buffer.
constexpr std::size_t read_buffer_size = 64u << 10;
constexpr std::size_t direct_read = 32u << 10;
// After a large WRITE the next header is read with this much at most: the
// next payload then mostly goes straight into place instead of through the
// buffer (a copy of up to 64 KiB per request saved, at no extra read).
constexpr std::size_t short_read_ahead = 4u << 10;
constexpr std::uint64_t default_budget = 256u << 20;
// The context id SET_META_CONTEXT hands out for base:allocation.
constexpr std::uint32_t base_allocation_id = 1;

using rpc::Waker;

bool power_of_two(std::uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

std::uint32_t rep_error_for(const Error& e) {
  switch (e.code()) {
    case Code::permission_denied:
    case Code::unauthenticated:
      return rep_err_policy;
    case Code::invalid_argument:
      return rep_err_invalid;
    default:
      return rep_err_unknown;
  }
}

// One request, from its header to its reply. Kept and reused by the
// session: at most max_in_flight exist.
struct Op {
  Request req;
  rpc::Buffer payload;       // WRITE data received, READ data to send
  std::uint64_t budget = 0;  // bytes taken from the ByteBudget
  std::uint32_t error = 0;   // NBD error; 0 = success
  std::string message;       // why, for a structured error reply
  std::vector<Extent> map;   // READ: holes; BLOCK_STATUS: the extents
  std::vector<rpc::Buffer> reply;
};

// One connection. The handshake runs first, alone. In transmission the
// caller's coroutine becomes the reader (read_requests): it parses each
// header out of its buffer, takes the payload's bytes from the budget,
// reads a WRITE's payload (large ones straight into place) and starts the
// request as a coroutine of its own (run_op). Each request awaits the
// backend, builds its reply and queues it for the writer (write_replies),
// which sends everything queued in one gathered write and then gives the
// bytes back. All of it runs on the pipe's executor: nothing is locked.
class Session {
 public:
  Session(Pipe& pipe, ExportSource& exports, const ServerOptions& options)
      : pipe_(pipe),
        exports_(exports),
        options_(options),
        ex_(pipe.get_executor()),
        budget_(options_.budget ? options_.budget : ByteBudget::create(default_budget)),
        rbuf_(new std::uint8_t[read_buffer_size]),
        reader_wake_(ex_),
        writer_wake_(ex_) {
    options_.max_in_flight = std::max(1u, options_.max_in_flight);
    // A data chunk's length field (8 + data) must stay within 32 bits.
    options_.max_request = std::min(options_.max_request, 1u << 31);
  }

  asio::awaitable<void> run();
  const asio::any_io_executor& executor() const { return ex_; }
  SessionStats stats;

 private:
  enum class Ending { none, clean, eof, violation, failure };

  // Records why the session ends; the first reason stands.
  void end(Ending kind, std::string reason) {
    if (ending_ != Ending::none) return;
    ending_ = kind;
    reason_ = std::move(reason);
  }
  void log_end();
  void close_pipe() {
    if (closed_) return;
    closed_ = true;
    pipe_.close();
  }

  // Reading. None of these throw: a failed read counts as the end of the
  // input, with the failure kept in read_error_.
  asio::awaitable<std::size_t> read_some(std::uint8_t* out, std::size_t n);
  asio::awaitable<bool> fill(std::size_t n);
  asio::awaitable<bool> read_exact(std::uint8_t* out, std::size_t n);
  asio::awaitable<bool> skip(std::size_t n);
  std::size_t buffered() const { return rend_ - rbeg_; }
  // The input ended (or failed) while waiting for `what`; `inside` when
  // part of it had already come.
  void input_ended(const char* what, bool inside);

  // Handshake.
  asio::awaitable<bool> handshake();
  asio::awaitable<void> send(std::span<const std::uint8_t> bytes);
  asio::awaitable<void> send_reply(std::uint32_t option, std::uint32_t type, std::span<const std::uint8_t> payload);
  asio::awaitable<void> send_error(std::uint32_t option, std::uint32_t type, std::string_view message);
  asio::awaitable<bool> option_info(std::uint32_t option, std::span<const std::uint8_t> data);
  asio::awaitable<void> option_list(std::span<const std::uint8_t> data);
  asio::awaitable<void> option_meta_context(std::uint32_t option, std::span<const std::uint8_t> data);
  std::shared_ptr<Export> find_export(const std::string& name, std::uint32_t& rep_error, std::string& message);
  void use_export(std::shared_ptr<Export> e);
  std::uint16_t transmission_flags(const Export& e) const;
  void block_sizes(const Capabilities& caps, std::uint32_t& minimum, std::uint32_t& preferred,
                   std::uint32_t& maximum) const;

  // Transmission.
  asio::awaitable<void> read_requests();
  asio::awaitable<void> take_budget(std::uint64_t bytes);
  std::uint32_t check(const Request& r, std::string& message) const;
  Op* take_op();
  void start(Op* op);
  asio::awaitable<void> run_op(Op* op);
  asio::awaitable<void> execute(Op* op);
  void build_reply(Op* op);
  void build_read_reply(Op* op);
  void queue_reply(Op* op);
  void op_finished(Op* op);
  asio::awaitable<void> write_replies();
  void drop_queue();
  rpc::Buffer allocate(std::size_t n) { return options_.buffers ? options_.buffers->get(n) : rpc::Buffer(n); }

  Pipe& pipe_;
  ExportSource& exports_;
  ServerOptions options_;
  asio::any_io_executor ex_;
  std::shared_ptr<ByteBudget> budget_;

  Ending ending_ = Ending::none;
  std::string reason_;
  std::string read_error_;
  bool closed_ = false;

  std::unique_ptr<std::uint8_t[]> rbuf_;
  std::size_t rbeg_ = 0;
  std::size_t rend_ = 0;
  std::size_t read_ahead_ = read_buffer_size;  // most a refill asks for

  // Negotiated.
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool base_allocation_ = false;    // SET_META_CONTEXT selected it
  // ... for the export of this name (an ExportSource may open a new Export
  // object per lookup, e.g. a volume per connection: compare names).
  std::optional<std::string> meta_export_;
  std::shared_ptr<Export> export_;
  Backend* backend_ = nullptr;
  std::uint64_t size_ = 0;
  Capabilities caps_;
  bool read_only_ = false;

  // Requests: in_flight_ counts from header to reply written (or dropped),
  // running_ counts request coroutines not finished.
  unsigned in_flight_ = 0;
  unsigned running_ = 0;
  std::vector<std::unique_ptr<Op>> ops_;
  std::vector<Op*> free_ops_;
  Waker reader_wake_;

  // Replies waiting for the writer, and what to give back once written.
  std::vector<rpc::Buffer> queue_;
  std::uint64_t queued_budget_ = 0;
  unsigned queued_replies_ = 0;
  bool writer_stop_ = false;
  bool writer_failed_ = false;
  bool writer_done_ = false;
  Waker writer_wake_;
};

// ------------------------------------------------------------- reading

asio::awaitable<std::size_t> Session::read_some(std::uint8_t* out, std::size_t n) {
  if (closed_) co_return 0;
  std::size_t got = 0;
  try {
    got = co_await pipe_.read_some(std::span<std::uint8_t>(out, n));
  } catch (const std::exception& e) {
    if (read_error_.empty()) read_error_ = e.what();
    got = 0;
  }
  co_return got;
}

asio::awaitable<bool> Session::fill(std::size_t n) {
  if (buffered() >= n) co_return true;
  // Only a little is left when more is needed: move it to the front so
  // the read gets the whole buffer.
  if (rbeg_ > 0) {
    std::memmove(rbuf_.get(), rbuf_.get() + rbeg_, buffered());
    rend_ -= rbeg_;
    rbeg_ = 0;
  }
  while (buffered() < n) {
    const std::size_t want = std::min(read_buffer_size - rend_, std::max(read_ahead_, n - buffered()));
    const std::size_t got = co_await read_some(rbuf_.get() + rend_, want);
    if (got == 0) co_return false;
    rend_ += got;
  }
  co_return true;
}

asio::awaitable<bool> Session::read_exact(std::uint8_t* out, std::size_t n) {
  const std::size_t have = std::min(n, buffered());
  if (have) std::memcpy(out, rbuf_.get() + rbeg_, have);
  rbeg_ += have;
  out += have;
  n -= have;
  while (n > 0) {
    if (n >= direct_read) {
      // Large: straight into place.
      const std::size_t got = co_await read_some(out, n);
      if (got == 0) co_return false;
      out += got;
      n -= got;
    } else {
      // Small: through the buffer, which also picks up what follows.
      if (!co_await fill(n)) co_return false;
      std::memcpy(out, rbuf_.get() + rbeg_, n);
      rbeg_ += n;
      n = 0;
    }
  }
  co_return true;
}

asio::awaitable<bool> Session::skip(std::size_t n) {
  while (n > 0) {
    if (buffered() == 0 && !co_await fill(1)) co_return false;
    const std::size_t take = std::min(n, buffered());
    rbeg_ += take;
    n -= take;
  }
  co_return true;
}

void Session::input_ended(const char* what, bool inside) {
  if (!read_error_.empty())
    end(Ending::failure, read_error_);
  else if (inside || buffered() > 0)
    end(Ending::violation, std::string("input ended inside ") + what);
  else
    end(Ending::eof, std::string("client closed the connection before ") + what);
}

// ----------------------------------------------------------- handshake

asio::awaitable<void> Session::send(std::span<const std::uint8_t> bytes) {
  std::vector<rpc::Buffer> out;
  out.push_back(rpc::Buffer::copy_of(bytes));
  co_await pipe_.write(out);
}

asio::awaitable<void> Session::send_reply(std::uint32_t option, std::uint32_t type,
                                          std::span<const std::uint8_t> payload) {
  const std::vector<std::uint8_t> bytes = encode_option_reply(option, type, payload);
  co_await send(bytes);
}

asio::awaitable<void> Session::send_error(std::uint32_t option, std::uint32_t type, std::string_view message) {
  const std::vector<std::uint8_t> bytes = encode_option_reply(option, type, message.substr(0, max_string));
  co_await send(bytes);
}

std::shared_ptr<Export> Session::find_export(const std::string& name, std::uint32_t& rep_error,
                                             std::string& message) {
  try {
    auto e = exports_.find(name);
    if (e && e->backend) return e;
    rep_error = rep_err_unknown;
    message = "no export named '" + name + "'";
  } catch (const Error& err) {
    rep_error = rep_error_for(err);
    message = err.message();
    spdlog::warn("nbd: {}: opening export '{}': {}", pipe_.peer(), name, err.describe());
  } catch (const std::exception& err) {
    rep_error = rep_err_unknown;
    message = err.what();
    spdlog::warn("nbd: {}: opening export '{}': {}", pipe_.peer(), name, err.what());
  }
  return nullptr;
}

std::uint16_t Session::transmission_flags(const Export& e) const {
  const Capabilities caps = e.backend->capabilities();
  std::uint16_t f = flag_has_flags;
  if (e.read_only || caps.read_only) f |= flag_read_only;
  if (caps.can_flush) f |= flag_send_flush;
  if (caps.can_fua) f |= flag_send_fua;
  if (caps.rotational) f |= flag_rotational;
  if (caps.can_trim) f |= flag_send_trim;
  if (caps.can_zero) f |= flag_send_write_zeroes;
  if (structured_) f |= flag_send_df;
  if (caps.can_multi_conn) f |= flag_can_multi_conn;
  if (caps.can_cache) f |= flag_send_cache;
  if (caps.can_zero && caps.can_fast_zero) f |= flag_send_fast_zero;
  return f;
}

// Block sizes as the protocol wants them: minimum a power of two up to
// 64 KiB, preferred a power of two from max(512, minimum) to 32 MiB,
// maximum a multiple of the minimum, at least the preferred, at most the
// largest request this server takes.
void Session::block_sizes(const Capabilities& caps, std::uint32_t& minimum, std::uint32_t& preferred,
                          std::uint32_t& maximum) const {
  minimum = caps.min_block;
  if (!power_of_two(minimum) || minimum > (64u << 10)) minimum = 1;
  maximum = std::min(caps.max_block, options_.max_request);
  maximum -= maximum % minimum;
  if (maximum < minimum) maximum = minimum;
  preferred = caps.preferred_block;
  if (!power_of_two(preferred)) preferred = 4096;
  preferred = std::clamp<std::uint32_t>(preferred, std::max(512u, minimum), 32u << 20);
  while (preferred > std::max(512u, minimum) && preferred > maximum) preferred >>= 1;
  if (maximum < preferred) maximum = preferred;
}

void Session::use_export(std::shared_ptr<Export> e) {
  export_ = std::move(e);
  backend_ = export_->backend.get();
  size_ = backend_->size();
  caps_ = backend_->capabilities();
  read_only_ = export_->read_only || caps_.read_only;
  stats.export_name = export_->name;
}

asio::awaitable<bool> Session::handshake() {
  const auto greeting = encode_greeting(flag_fixed_newstyle | flag_no_zeroes);
  co_await send(greeting);

  std::uint8_t client_flags[4];
  if (!co_await read_exact(client_flags, 4)) {
    input_ended("its handshake flags", false);
    co_return false;
  }
  const std::uint32_t cflags = load_be32(client_flags);
  if (cflags & ~(flag_c_fixed_newstyle | flag_c_no_zeroes)) {
    end(Ending::violation, "client sent unknown handshake flags " + std::to_string(cflags));
    co_return false;
  }
  if (!(cflags & flag_c_fixed_newstyle)) {
    end(Ending::violation, "client does not speak fixed newstyle negotiation");
    co_return false;
  }
  no_zeroes_ = (cflags & flag_c_no_zeroes) != 0;

  std::vector<std::uint8_t> data;
  for (;;) {
    std::uint8_t header[option_header_size];
    if (!co_await read_exact(header, sizeof header)) {
      input_ended("an option", false);
      co_return false;
    }
    const auto opt = parse_option_header(header);
    if (!opt) {
      end(Ending::violation, "option without the IHAVEOPT magic");
      co_return false;
    }
    if (opt->length > options_.max_option) {
      end(Ending::violation, option_name(opt->option) + " of " + std::to_string(opt->length) +
                                 " bytes is longer than the " + std::to_string(options_.max_option) +
                                 " bytes allowed");
      co_return false;
    }
    data.resize(opt->length);
    if (!co_await read_exact(data.data(), data.size())) {
      input_ended("an option", true);
      co_return false;
    }
    const std::uint32_t option = opt->option;
    switch (option) {
      case opt_export_name: {
        const std::string name(data.begin(), data.end());
        std::uint32_t rep_error = 0;
        std::string message;
        auto e = find_export(name, rep_error, message);
        if (!e) {
          // NBD_OPT_EXPORT_NAME has no error reply: the session ends.
          end(Ending::violation, "NBD_OPT_EXPORT_NAME: " + message);
          co_return false;
        }
        const auto flags = transmission_flags(*e);
        if (meta_export_ != e->name) base_allocation_ = false;
        use_export(std::move(e));
        const auto reply = encode_export_name_reply(size_, flags, no_zeroes_);
        co_await send(reply);
        co_return true;
      }
      case opt_abort: {
        end(Ending::clean, "client sent NBD_OPT_ABORT");
        stats.clean_disconnect = true;
        // The client may already be gone: the ACK is a courtesy.
        try {
          co_await send_reply(option, rep_ack, {});
        } catch (const std::exception&) {
        }
        co_return false;
      }
      case opt_list:
        co_await option_list(data);
        break;
      case opt_info:
      case opt_go:
        if (co_await option_info(option, data)) co_return true;
        break;
      case opt_structured_reply:
        if (!data.empty()) {
          co_await send_error(option, rep_err_invalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
        } else if (structured_) {
          co_await send_error(option, rep_err_invalid, "structured replies are already negotiated");
        } else {
          structured_ = true;
          co_await send_reply(option, rep_ack, {});
        }
        break;
      case opt_list_meta_context:
      case opt_set_meta_context:
        co_await option_meta_context(option, data);
        break;
      default: {
        const std::string message = option_name(option) + " is not supported by this server";
        co_await send_error(option, rep_err_unsup, message);
        break;
      }
    }
  }
}

asio::awaitable<void> Session::option_list(std::span<const std::uint8_t> data) {
  if (!data.empty()) {
    co_await send_error(opt_list, rep_err_invalid, "NBD_OPT_LIST takes no data");
    co_return;
  }
  if (!options_.allow_list) {
    co_await send_error(opt_list, rep_err_policy, "this server does not list its exports");
    co_return;
  }
  std::vector<std::pair<std::string, std::string>> names;
  std::string failure;
  std::uint32_t rep_error = rep_err_unknown;
  try {
    names = exports_.list();
  } catch (const Error& e) {
    failure = e.message();
    rep_error = rep_error_for(e);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (!failure.empty()) {
    spdlog::warn("nbd: {}: listing exports: {}", pipe_.peer(), failure);
    co_await send_error(opt_list, rep_error, failure);
    co_return;
  }
  std::vector<rpc::Buffer> out;
  for (const auto& [name, description] : names) {
    const auto payload = encode_rep_server(name, description);
    out.push_back(rpc::Buffer::copy_of(encode_option_reply(opt_list, rep_server, payload)));
  }
  out.push_back(rpc::Buffer::copy_of(encode_option_reply(opt_list, rep_ack)));
  co_await pipe_.write(out);
}

asio::awaitable<bool> Session::option_info(std::uint32_t option, std::span<const std::uint8_t> data) {
  const auto request = parse_info_request(data);
  if (!request) {
    co_await send_error(option, rep_err_invalid, "malformed export name and information requests");
    co_return false;
  }
  std::uint32_t rep_error = 0;
  std::string message;
  auto e = find_export(request->name, rep_error, message);
  if (!e) {
    co_await send_error(option, rep_error, message);
    co_return false;
  }
  const Capabilities caps = e->backend->capabilities();
  std::vector<rpc::Buffer> out;
  auto info = [&](const std::vector<std::uint8_t>& payload) {
    out.push_back(rpc::Buffer::copy_of(encode_option_reply(option, rep_info, payload)));
  };
  info(encode_info_export(e->backend->size(), transmission_flags(*e)));
  bool name = false;
  bool description = false;
  for (const auto type : request->requests) {
    if (type == info_name) name = true;
    if (type == info_description) description = true;
  }
  if (name) info(encode_info_string(info_name, e->name));
  if (description && !e->description.empty()) info(encode_info_string(info_description, e->description));
  std::uint32_t minimum = 1, preferred = 4096, maximum = 0;
  block_sizes(caps, minimum, preferred, maximum);
  info(encode_info_block_size(minimum, preferred, maximum));
  out.push_back(rpc::Buffer::copy_of(encode_option_reply(option, rep_ack)));
  co_await pipe_.write(out);
  if (option != opt_go) co_return false;
  // Contexts chosen for another export do not carry over.
  if (meta_export_ != e->name) base_allocation_ = false;
  use_export(std::move(e));
  co_return true;
}

asio::awaitable<void> Session::option_meta_context(std::uint32_t option, std::span<const std::uint8_t> data) {
  const bool set = option == opt_set_meta_context;
  if (set && !structured_) {
    co_await send_error(option, rep_err_invalid, "NBD_OPT_SET_META_CONTEXT needs structured replies first");
    co_return;
  }
  const auto request = parse_meta_context_request(data);
  if (!request) {
    co_await send_error(option, rep_err_invalid, "malformed metadata context request");
    co_return;
  }
  std::uint32_t rep_error = 0;
  std::string message;
  auto e = find_export(request->export_name, rep_error, message);
  if (!e) {
    co_await send_error(option, rep_error, message);
    co_return;
  }
  bool allocation = false;
  if (request->queries.empty()) {
    // Listing everything names base:allocation; setting nothing selects nothing.
    allocation = !set;
  } else {
    for (const auto& q : request->queries)
      if (q == meta_base_allocation || q == "base:") allocation = true;
  }
  if (set) {
    base_allocation_ = allocation;
    meta_export_ = e->name;
  }
  std::vector<rpc::Buffer> out;
  if (allocation) {
    const auto payload = encode_rep_meta_context(set ? base_allocation_id : 0, meta_base_allocation);
    out.push_back(rpc::Buffer::copy_of(encode_option_reply(option, rep_meta_context, payload)));
  }
  out.push_back(rpc::Buffer::copy_of(encode_option_reply(option, rep_ack)));
  co_await pipe_.write(out);
}

// --------------------------------------------------------- transmission

std::uint32_t Session::check(const Request& r, std::string& message) const {
  constexpr std::uint16_t known_flags =
      cmd_flag_fua | cmd_flag_no_hole | cmd_flag_df | cmd_flag_req_one | cmd_flag_fast_zero;
  const bool in_range = r.offset <= size_ && r.length <= size_ - r.offset;
  auto fail = [&](std::uint32_t error, std::string why) {
    message = command_name(r.type) + ": " + std::move(why);
    return error;
  };
  auto range = [&](std::uint32_t error) {
    return fail(error, "offset " + std::to_string(r.offset) + " length " + std::to_string(r.length) +
                           " is beyond the end of the export (" + std::to_string(size_) + " bytes)");
  };
  const bool writes = r.type == cmd_write || r.type == cmd_trim || r.type == cmd_write_zeroes;
  switch (r.type) {
    case cmd_read:
    case cmd_write:
    case cmd_flush:
    case cmd_trim:
    case cmd_cache:
    case cmd_write_zeroes:
    case cmd_block_status:
      break;
    default:
      return fail(nbd_einval, "unknown command");
  }
  if (r.flags & ~known_flags) return fail(nbd_einval, "unknown flags " + std::to_string(r.flags));
  if ((r.flags & cmd_flag_fua) && !caps_.can_fua) return fail(nbd_einval, "FUA is not supported");
  if (writes && read_only_) return fail(nbd_eperm, "the export is read-only");
  switch (r.type) {
    case cmd_read:
      if ((r.flags & cmd_flag_df) && !structured_) return fail(nbd_einval, "DF needs structured replies");
      if (r.length > options_.max_request)
        return fail(nbd_einval, std::to_string(r.length) + " bytes is more than the " +
                                    std::to_string(options_.max_request) + " bytes one request may read");
      if (!in_range) return range(nbd_einval);
      break;
    case cmd_write:
      if (!in_range) return range(nbd_enospc);
      break;
    case cmd_flush:
      if (!caps_.can_flush) return fail(nbd_einval, "not supported by this export");
      break;
    case cmd_trim:
      if (!caps_.can_trim) return fail(nbd_einval, "not supported by this export");
      if (!in_range) return range(nbd_einval);
      break;
    case cmd_write_zeroes:
      if (!caps_.can_zero) return fail(nbd_einval, "not supported by this export");
      if ((r.flags & cmd_flag_fast_zero) && !caps_.can_fast_zero)
        return fail(nbd_einval, "fast zero is not supported by this export");
      if (!in_range) return range(nbd_enospc);
      break;
    case cmd_block_status:
      if (!base_allocation_) return fail(nbd_einval, "no metadata context was negotiated");
      if (r.length == 0) return fail(nbd_einval, "length 0");
      if (!in_range) return range(nbd_einval);
      break;
    case cmd_cache:
      if (!caps_.can_cache) return fail(nbd_einval, "not supported by this export");
      if (!in_range) return range(nbd_einval);
      break;
  }
  return 0;
}

Op* Session::take_op() {
  if (free_ops_.empty()) {
    ops_.push_back(std::make_unique<Op>());
    return ops_.back().get();
  }
  Op* op = free_ops_.back();
  free_ops_.pop_back();
  return op;
}

asio::awaitable<void> Session::take_budget(std::uint64_t bytes) {
  if (budget_->try_acquire(bytes)) co_return;
  co_await budget_->acquire(bytes);
}

asio::awaitable<void> Session::read_requests() {
  for (;;) {
    while (in_flight_ >= options_.max_in_flight && !writer_failed_) co_await reader_wake_.wait();
    if (writer_failed_) co_return;
    if (!co_await fill(request_size)) {
      input_ended("a request", false);
      co_return;
    }
    const auto req = parse_request(std::span<const std::uint8_t>(rbuf_.get() + rbeg_, request_size));
    if (!req) {
      end(Ending::violation, "request without NBD_REQUEST_MAGIC");
      co_return;
    }
    rbeg_ += request_size;
    ++stats.requests;
    if (req->type == cmd_disc) {
      end(Ending::clean, "client sent NBD_CMD_DISC");
      stats.clean_disconnect = true;
      co_return;
    }
    if (req->type == cmd_write && req->length > options_.max_request) {
      // Its payload cannot be skipped without reading it all: the client
      // broke the advertised maximum, so the session ends.
      end(Ending::violation, "NBD_CMD_WRITE of " + std::to_string(req->length) + " bytes is more than the " +
                                 std::to_string(options_.max_request) + " bytes allowed");
      co_return;
    }
    Op* op = take_op();
    op->req = *req;
    op->budget = 0;
    op->message.clear();
    op->error = check(op->req, op->message);
    const std::uint32_t length = op->req.length;
    read_ahead_ = op->req.type == cmd_write && length >= direct_read ? short_read_ahead : read_buffer_size;
    if (op->req.type == cmd_write && length > 0) {
      bool ok = true;
      if (op->error) {
        ok = co_await skip(length);
      } else {
        co_await take_budget(length);
        op->budget = length;
        op->payload = allocate(length);
        ok = co_await read_exact(op->payload.data(), length);
        if (ok) stats.bytes_written += length;
      }
      if (!ok) {
        budget_->release(op->budget);
        op->budget = 0;
        op->payload = rpc::Buffer();
        free_ops_.push_back(op);
        input_ended("a write's payload", true);
        co_return;
      }
    } else if (op->req.type == cmd_read && length > 0 && !op->error) {
      co_await take_budget(length);
      op->budget = length;
    }
    start(op);
  }
}

void Session::start(Op* op) {
  ++in_flight_;
  ++running_;
  stats.peak_in_flight = std::max(stats.peak_in_flight, in_flight_);
  asio::co_spawn(ex_, run_op(op), [this, op](std::exception_ptr) { op_finished(op); });
}

asio::awaitable<void> Session::run_op(Op* op) {
  if (op->error == 0) {
    try {
      co_await execute(op);
    } catch (const Error& e) {
      op->error = nbd_error_from_errno(e.os_errno());
      op->message = e.message();
    } catch (const std::exception& e) {
      op->error = nbd_eio;
      op->message = e.what();
    }
  }
  try {
    build_reply(op);
  } catch (const std::exception&) {
    // Out of memory for the reply: the client never hears of this request,
    // and the connection is no longer usable.
    op->reply.clear();
    if (!writer_failed_) {
      end(Ending::failure, "could not build a reply");
      close_pipe();
    }
  }
  queue_reply(op);
}

asio::awaitable<void> Session::execute(Op* op) {
  const Request& r = op->req;
  switch (r.type) {
    case cmd_read: {
      if (r.length == 0) co_return;
      op->payload = allocate(r.length);
      op->map.clear();
      std::vector<Extent>* map = (structured_ && caps_.can_extents) ? &op->map : nullptr;
      co_await backend_->read(std::span<std::uint8_t>(op->payload.data(), r.length), r.offset, map);
      stats.bytes_read += r.length;
      co_return;
    }
    case cmd_write:
      if (r.length == 0) co_return;
      co_await backend_->write(std::span<const std::uint8_t>(op->payload.data(), r.length), r.offset,
                               (r.flags & cmd_flag_fua) != 0);
      op->payload = rpc::Buffer();
      co_return;
    case cmd_flush:
      co_await backend_->flush();
      co_return;
    case cmd_trim:
      if (r.length == 0) co_return;
      co_await backend_->trim(r.offset, r.length, (r.flags & cmd_flag_fua) != 0);
      co_return;
    case cmd_write_zeroes: {
      if (r.length == 0) co_return;
      ZeroFlags flags;
      flags.may_trim = (r.flags & cmd_flag_no_hole) == 0;
      flags.fast = (r.flags & cmd_flag_fast_zero) != 0;
      flags.fua = (r.flags & cmd_flag_fua) != 0;
      co_await backend_->zero(r.offset, r.length, flags);
      co_return;
    }
    case cmd_block_status: {
      const std::vector<Extent> extents = co_await backend_->extents(r.offset, r.length);
      op->map = trim_extents(extents, r.length, (r.flags & cmd_flag_req_one) != 0);
      if (op->map.empty()) throw Error(Code::internal, "the export described no extents", "nbd", false, EIO);
      co_return;
    }
    case cmd_cache:
      if (r.length == 0) co_return;
      co_await backend_->cache(r.offset, r.length);
      co_return;
    default:
      co_return;
  }
}

void Session::build_reply(Op* op) {
  const Request& r = op->req;
  op->reply.clear();
  if (op->error) {
    op->payload = rpc::Buffer();
    if (structured_) {
      const std::string& message = op->message.empty() ? error_name(op->error) : op->message;
      op->reply.push_back(rpc::Buffer::copy_of(encode_error_chunk(reply_flag_done, r.cookie, op->error, message)));
    } else {
      op->reply.push_back(rpc::Buffer::copy_of(encode_simple_reply(op->error, r.cookie)));
    }
    return;
  }
  if (r.type == cmd_read) {
    build_read_reply(op);
    return;
  }
  if (r.type == cmd_block_status) {
    op->reply.push_back(
        rpc::Buffer::copy_of(encode_block_status_chunk(reply_flag_done, r.cookie, base_allocation_id, op->map)));
    return;
  }
  // Success without data: a simple reply, structured replies or not.
  op->reply.push_back(rpc::Buffer::copy_of(encode_simple_reply(0, r.cookie)));
}

void Session::build_read_reply(Op* op) {
  const Request& r = op->req;
  const std::uint32_t length = r.length;
  if (!structured_) {
    op->reply.push_back(rpc::Buffer::copy_of(encode_simple_reply(0, r.cookie)));
    if (length) op->reply.push_back(std::move(op->payload));
    return;
  }
  if (length == 0) {
    op->reply.push_back(rpc::Buffer::copy_of(encode_chunk_header(reply_flag_done, reply_type_none, r.cookie, 0)));
    return;
  }
  // Runs of data and of holes, in order, covering the request.
  struct Run {
    std::uint64_t at;
    std::uint64_t length;
    bool hole;
  };
  std::vector<Run> runs;
  std::uint64_t pos = 0;
  for (const auto& e : op->map) {
    if (pos >= length) break;
    const std::uint64_t n = std::min<std::uint64_t>(e.length, length - pos);
    if (n == 0) continue;
    const bool hole = e.flags != 0;
    if (!runs.empty() && runs.back().hole == hole)
      runs.back().length += n;
    else
      runs.push_back({pos, n, hole});
    pos += n;
  }
  if (pos < length) {
    if (!runs.empty() && !runs.back().hole)
      runs.back().length += length - pos;
    else
      runs.push_back({pos, length - pos, false});
  }
  const bool df = (r.flags & cmd_flag_df) != 0;
  if (df || (runs.size() == 1 && !runs[0].hole)) {
    // One OFFSET_DATA chunk: holes read as zeros.
    for (const auto& run : runs)
      if (run.hole) std::memset(op->payload.data() + run.at, 0, run.length);
    rpc::Buffer header(chunk_header_size + 8);
    encode_chunk_header(header.data(), reply_flag_done, reply_type_offset_data, r.cookie, 8 + length);
    store_be64(header.data() + chunk_header_size, r.offset);
    op->reply.push_back(std::move(header));
    op->reply.push_back(std::move(op->payload));
    return;
  }
  // Data runs are copied out of the payload, except a first one, which is
  // the payload itself cut short (filled in last, once the others are
  // copied).
  std::size_t in_place = 0;
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Run& run = runs[i];
    const std::uint16_t flags = i + 1 == runs.size() ? reply_flag_done : 0;
    if (run.hole) {
      rpc::Buffer chunk(chunk_header_size + 12);
      encode_chunk_header(chunk.data(), flags, reply_type_offset_hole, r.cookie, 12);
      store_be64(chunk.data() + chunk_header_size, r.offset + run.at);
      store_be32(chunk.data() + chunk_header_size + 8, static_cast<std::uint32_t>(run.length));
      op->reply.push_back(std::move(chunk));
    } else {
      rpc::Buffer header(chunk_header_size + 8);
      encode_chunk_header(header.data(), flags, reply_type_offset_data, r.cookie,
                          static_cast<std::uint32_t>(8 + run.length));
      store_be64(header.data() + chunk_header_size, r.offset + run.at);
      op->reply.push_back(std::move(header));
      if (i == 0) {
        in_place = op->reply.size();
        op->reply.emplace_back();
        continue;
      }
      rpc::Buffer data = allocate(run.length);
      std::memcpy(data.data(), op->payload.data() + run.at, run.length);
      op->reply.push_back(std::move(data));
    }
  }
  if (in_place) {
    op->payload.shrink(runs[0].length);
    op->reply[in_place] = std::move(op->payload);
  }
  op->payload = rpc::Buffer();
}

void Session::queue_reply(Op* op) {
  if (writer_failed_ || writer_done_) {
    // Nobody will hear it: drop it, and give back what it held.
    op->reply.clear();
    budget_->release(op->budget);
    op->budget = 0;
    --in_flight_;
    reader_wake_.wake();
    return;
  }
  for (auto& b : op->reply) queue_.push_back(std::move(b));
  op->reply.clear();
  queued_budget_ += op->budget;
  op->budget = 0;
  ++queued_replies_;
  writer_wake_.wake();
}

void Session::op_finished(Op* op) {
  op->payload = rpc::Buffer();
  op->map.clear();
  free_ops_.push_back(op);
  --running_;
  reader_wake_.wake();
}

void Session::drop_queue() {
  queue_.clear();
  budget_->release(std::exchange(queued_budget_, 0));
  in_flight_ -= std::exchange(queued_replies_, 0);
}

asio::awaitable<void> Session::write_replies() {
  std::vector<rpc::Buffer> batch;
  for (;;) {
    while (queue_.empty() && !writer_stop_) co_await writer_wake_.wait();
    if (queue_.empty()) break;
    batch.swap(queue_);
    const std::uint64_t bytes = std::exchange(queued_budget_, 0);
    const unsigned replies = std::exchange(queued_replies_, 0);
    std::string failure;
    try {
      co_await pipe_.write(batch);
    } catch (const std::exception& e) {
      failure = e.what();
      if (failure.empty()) failure = "write failed";
    }
    batch.clear();
    budget_->release(bytes);
    in_flight_ -= replies;
    reader_wake_.wake();
    if (!failure.empty()) {
      writer_failed_ = true;
      end(Ending::failure, failure);
      drop_queue();
      // Unblocks the reader; requests still running finish and their
      // replies are dropped.
      close_pipe();
      break;
    }
  }
}

// ----------------------------------------------------------------- run

asio::awaitable<void> Session::run() {
  bool transmission = false;
  try {
    transmission = co_await handshake();
  } catch (const std::exception& e) {
    end(Ending::failure, std::string("during the handshake: ") + e.what());
  }
  if (transmission) {
    asio::co_spawn(ex_, write_replies(), [this](std::exception_ptr) {
      writer_done_ = true;
      // Replies queued after a failure that ended the writer abnormally.
      drop_queue();
      reader_wake_.wake();
    });
    try {
      co_await read_requests();
    } catch (const std::exception& e) {
      end(Ending::failure, e.what());
    }
    // Every request finishes (the backend may still use its buffers), its
    // reply is written if the pipe still works, then the writer stops.
    while (running_ > 0) co_await reader_wake_.wait();
    writer_stop_ = true;
    writer_wake_.wake();
    while (!writer_done_) co_await reader_wake_.wait();
  }
  stats.structured_replies = structured_;
  close_pipe();
  log_end();
}

void Session::log_end() {
  const std::string peer = pipe_.peer();
  const std::string what = export_ ? "export '" + stats.export_name + "'" : std::string("handshake");
  switch (ending_) {
    case Ending::violation:
      spdlog::warn("nbd: {} ({}): session ended: protocol violation: {} ({} requests, {} bytes read, {} bytes written)",
                   peer, what, reason_, stats.requests, stats.bytes_read, stats.bytes_written);
      break;
    case Ending::failure:
      spdlog::warn("nbd: {} ({}): session ended: {} ({} requests, {} bytes read, {} bytes written)", peer, what,
                   reason_, stats.requests, stats.bytes_read, stats.bytes_written);
      break;
    default:
      spdlog::info("nbd: {} ({}): session ended: {} ({} requests, {} bytes read, {} bytes written, {} at once at most)",
                   peer, what, reason_.empty() ? std::string("done") : reason_, stats.requests, stats.bytes_read,
                   stats.bytes_written, stats.peak_in_flight);
      break;
  }
}

}  // namespace

// `options` is taken by value as the API has it; the coroutine moves it into
// its frame, so the argument left behind owns nothing.
asio::awaitable<SessionStats> serve(Pipe& pipe, ExportSource& exports, const ServerOptions& options) {
  Session session(pipe, exports, options);
  if ((co_await asio::this_coro::executor) == session.executor()) {
    co_await session.run();
  } else {
    // Awaited from another executor: the session still runs on the pipe's.
    auto on_pipe = asio::co_spawn(session.executor(), session.run(), asio::use_awaitable);
    co_await std::move(on_pipe);
  }
  co_return session.stats;
}

}  // namespace ferry::nbd
