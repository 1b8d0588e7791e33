// The ferry CLI's output: sizes people read and scripts parse, a small JSON
// writer, the progress bar, and exit codes (docs/cli.md).
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "client/session.h"
#include "rpc/error.h"

#include "rpc/units.h"

namespace ferry::cli {

// Exit codes, one per kind of failure a script may want to tell apart.
enum Exit : int {
  ok = 0,
  failed = 1,           // anything not below
  usage = 2,            // bad command line
  unreachable = 3,      // cannot reach the daemon, or lost it
  not_found = 4,        // pool, volume or local file
  exists = 5,           // volume already exists
  busy = 6,             // in use, read-only pool, not allowed in this state
  no_space = 7,         // disk full, limits
  denied = 8,           // authentication or permission
  invalid = 9,          // the daemon refused the request's values (range, size, name)
  interrupted = 130,    // Ctrl-C / SIGTERM
};
int exit_code_for(Code code);

using ferry::parse_size;  // rpc/units.h
// 1610612736 -> "1.5 GiB".
std::string human_size(std::uint64_t bytes);
std::string human_rate(double bytes_per_second);
std::string human_duration(double seconds);

// "pool/volume" or "volume" (pool "default").
struct VolumeName {
  std::string pool;
  std::string name;
};
VolumeName parse_volume(const std::string& text);

// Minimal JSON writer: objects of strings, numbers, booleans and nested
// values, enough for the CLI's output.
class Json {
 public:
  Json& field(const std::string& key, const std::string& value);
  Json& field(const std::string& key, const char* value) { return field(key, std::string(value)); }
  Json& field(const std::string& key, std::uint64_t value);
  Json& field(const std::string& key, std::int64_t value);
  Json& field(const std::string& key, std::uint32_t value) { return field(key, static_cast<std::uint64_t>(value)); }
  Json& field(const std::string& key, double value);
  Json& field(const std::string& key, bool value);
  Json& raw(const std::string& key, const std::string& json);
  Json& null(const std::string& key) { return raw(key, "null"); }
  std::string str() const { return "{" + body_ + "}"; }
  static std::string quote(const std::string& s);
  static std::string array(const std::vector<std::string>& items);

 private:
  void key(const std::string& k);
  std::string body_;
};

Json volume_json(const v1::VolumeInfo& v);
Json pool_json(const v1::PoolInfo& p);
Json event_json(const v1::VolumeEvent& e);
const char* event_kind_name(v1::VolumeEventKind kind);

// How transfers report progress (--progress, --progress-fd; docs/cli.md).
struct ProgressOutput {
  enum class Mode { none, bar, json };
  Mode mode = Mode::none;
  int fd = 2;  // where JSON lines go (the bar always draws on stderr)
};

// Reports a transfer's progress: a bar on stderr redrawn in place
//   "upload default/v  42% [=====>      ] 1.2 GiB / 2.0 GiB  812 MiB/s  ETA 0:01"
// or one JSON object per line (operation, volume, bytes, total, data_bytes,
// hole_bytes, percent, rate, eta_seconds, elapsed_seconds, finished), or
// nothing. update() is called about ten times a second; finish() with the
// final state, or fail() when the transfer stopped short.
class ProgressBar {
 public:
  ProgressBar(ProgressOutput out, std::string operation, std::string volume)
      : out_(out), operation_(std::move(operation)), volume_(std::move(volume)) {}
  void update(const Progress& p);
  // The last report: a JSON line with "finished": true; the bar is cleared.
  void finish(const Progress& p);
  // The transfer failed or was interrupted: a last JSON line with
  // "finished": false and "failed": true repeating the last state; the bar
  // is cleared.
  void fail();
  void clear();

  // The JSON line for `p` (without the newline).
  std::string json_line(const Progress& p, bool failed) const;

 private:
  void draw(const Progress& p);
  void emit(const std::string& line);
  ProgressOutput out_;
  std::string operation_;
  std::string volume_;
  std::size_t last_width_ = 0;
  Progress last_{};
  bool ended_ = false;
};

}  // namespace ferry::cli
