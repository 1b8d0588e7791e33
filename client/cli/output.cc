#include "client/cli/output.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>

namespace ferry::cli {

int exit_code_for(Code code) {
  switch (code) {
    case Code::ok:
      return Exit::ok;
    case Code::unavailable:
    case Code::deadline_exceeded:
      return Exit::unreachable;
    case Code::not_found:
      return Exit::not_found;
    case Code::already_exists:
      return Exit::exists;
    case Code::failed_precondition:
    case Code::aborted:
      return Exit::busy;
    case Code::resource_exhausted:
      return Exit::no_space;
    case Code::unauthenticated:
    case Code::permission_denied:
      return Exit::denied;
    case Code::invalid_argument:
    case Code::out_of_range:
      return Exit::invalid;
    case Code::cancelled:
      return Exit::interrupted;
    default:
      return Exit::failed;
  }
}


std::string human_size(std::uint64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char out[32];
  if (u == 0)
    std::snprintf(out, sizeof out, "%llu B", static_cast<unsigned long long>(bytes));
  else
    std::snprintf(out, sizeof out, "%.1f %s", v, units[u]);
  return out;
}

std::string human_rate(double bps) {
  if (!(bps > 0)) return "-";
  return human_size(static_cast<std::uint64_t>(bps)) + "/s";
}

std::string human_duration(double seconds) {
  char out[32];
  if (seconds < 60) {
    std::snprintf(out, sizeof out, "%.1f s", seconds);
  } else {
    const auto s = static_cast<unsigned long long>(seconds);
    if (s >= 3600)
      std::snprintf(out, sizeof out, "%llu:%02llu:%02llu", s / 3600, s / 60 % 60, s % 60);
    else
      std::snprintf(out, sizeof out, "%llu:%02llu", s / 60, s % 60);
  }
  return out;
}

VolumeName parse_volume(const std::string& text) {
  const auto slash = text.find('/');
  if (slash == std::string::npos) return {"default", text};
  return {text.substr(0, slash), text.substr(slash + 1)};
}

void Json::key(const std::string& k) {
  if (!body_.empty()) body_ += ",";
  body_ += quote(k) + ":";
}
Json& Json::field(const std::string& k, const std::string& v) {
  key(k);
  body_ += quote(v);
  return *this;
}
Json& Json::field(const std::string& k, std::uint64_t v) {
  key(k);
  body_ += std::to_string(v);
  return *this;
}
Json& Json::field(const std::string& k, std::int64_t v) {
  key(k);
  body_ += std::to_string(v);
  return *this;
}
Json& Json::field(const std::string& k, double v) {
  key(k);
  char out[40];
  std::snprintf(out, sizeof out, "%.6g", std::isfinite(v) ? v : 0.0);
  body_ += out;
  return *this;
}
Json& Json::field(const std::string& k, bool v) {
  key(k);
  body_ += v ? "true" : "false";
  return *this;
}
Json& Json::raw(const std::string& k, const std::string& json) {
  key(k);
  body_ += json;
  return *this;
}
std::string Json::quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char esc[8];
          std::snprintf(esc, sizeof esc, "\\u%04x", c);
          out += esc;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}
std::string Json::array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? "," : "") + items[i];
  return out + "]";
}

Json volume_json(const v1::VolumeInfo& v) {
  Json j;
  j.field("pool", v.pool())
      .field("name", v.name())
      .field("capacity", v.capacity())
      .field("allocation", v.allocation())
      .field("writing", v.writing())
      .field("readers", v.readers())
      .field("modified_ns", v.modified_ns());
  // "incomplete" while a copy into it is unfinished (docs/migration.md).
  j.field("state", v.state().empty() ? std::string("ready") : v.state());
  if (!v.state_detail().empty()) j.field("state_detail", v.state_detail());
  return j;
}

Json pool_json(const v1::PoolInfo& p) {
  Json j;
  j.field("name", p.name())
      .field("path", p.path())
      .field("read_only", p.read_only())
      .field("volumes", p.volumes())
      .field("allocation", p.allocation())
      .field("capacity", p.capacity())
      .field("available", p.available());
  return j;
}

const char* event_kind_name(v1::VolumeEventKind kind) {
  switch (kind) {
    case v1::VOLUME_CREATED: return "created";
    case v1::VOLUME_DELETED: return "deleted";
    case v1::VOLUME_RESIZED: return "resized";
    case v1::VOLUME_WRITTEN: return "written";
    default: return "unknown";
  }
}

Json event_json(const v1::VolumeEvent& e) {
  Json j;
  j.field("event", event_kind_name(e.kind()))
      .field("pool", e.volume().pool())
      .field("name", e.volume().name())
      .field("capacity", e.capacity())
      .field("detail", e.detail())
      .field("time_ns", e.time_ns());
  return j;
}

std::string ProgressBar::json_line(const Progress& p, bool failed) const {
  const double secs = std::chrono::duration<double>(p.elapsed).count();
  const double rate = secs > 0 ? static_cast<double>(p.done) / secs : 0;
  // A transfer of unknown length (stdin) knows its total once it ends.
  const bool known = p.total > 0 || (p.finished && !failed);
  const std::uint64_t total = p.total > 0 ? p.total : p.done;
  Json j;
  j.field("operation", operation_).field("volume", volume_).field("bytes", p.done);
  if (known) j.field("total", total);
  else j.null("total");
  j.field("data_bytes", p.data_bytes).field("hole_bytes", p.hole_bytes);
  // A resumed copy counts the extents it verified and did not send again.
  if (p.done > p.data_bytes + p.hole_bytes) j.field("skipped_bytes", p.done - p.data_bytes - p.hole_bytes);
  if (known)
    j.field("percent", total > 0 ? std::min(100.0, 100.0 * static_cast<double>(p.done) / static_cast<double>(total))
                                 : 100.0);
  else
    j.null("percent");
  j.field("rate", rate);
  if (known && (p.done >= total || p.finished))
    j.field("eta_seconds", 0.0);
  else if (known && rate > 0)
    j.field("eta_seconds", static_cast<double>(total - p.done) / rate);
  else
    j.null("eta_seconds");
  j.field("elapsed_seconds", secs).field("finished", p.finished && !failed);
  if (failed) j.field("failed", true);
  return j.str();
}

void ProgressBar::emit(const std::string& text) {
  const std::string line = text + "\n";
  std::size_t off = 0;
  while (off < line.size()) {
    const ssize_t n = ::write(out_.fd, line.data() + off, line.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // a closed progress pipe does not stop the transfer
    off += static_cast<std::size_t>(n);
  }
}

void ProgressBar::update(const Progress& p) {
  if (ended_) return;
  last_ = p;
  if (out_.mode == ProgressOutput::Mode::json) {
    if (p.finished) return finish(p);
    emit(json_line(p, false));
  } else if (out_.mode == ProgressOutput::Mode::bar) {
    draw(p);
  }
}

void ProgressBar::finish(const Progress& p) {
  if (ended_) return;
  ended_ = true;
  last_ = p;
  last_.finished = true;
  if (out_.mode == ProgressOutput::Mode::json) emit(json_line(last_, false));
  clear();
}

void ProgressBar::fail() {
  if (ended_) return;
  ended_ = true;
  if (out_.mode == ProgressOutput::Mode::json) {
    last_.finished = false;
    emit(json_line(last_, true));
  }
  clear();
}

void ProgressBar::draw(const Progress& p) {
  const double secs = std::chrono::duration<double>(p.elapsed).count();
  const double rate = secs > 0 ? static_cast<double>(p.done) / secs : 0;
  std::string line = operation_ + " " + volume_ + " ";
  if (p.total > 0) {
    const double frac = std::min(1.0, static_cast<double>(p.done) / static_cast<double>(p.total));
    char pct[8];
    std::snprintf(pct, sizeof pct, "%3d%%", static_cast<int>(frac * 100));
    constexpr int width = 24;
    const int filled = static_cast<int>(frac * width);
    std::string bar(width, ' ');
    for (int i = 0; i < filled; ++i) bar[i] = '=';
    if (filled < width) bar[filled] = '>';
    line += std::string(pct) + " [" + bar + "] " + human_size(p.done) + " / " + human_size(p.total);
    line += "  " + human_rate(rate);
    if (rate > 0 && p.done < p.total)
      line += "  ETA " + human_duration(static_cast<double>(p.total - p.done) / rate);
  } else {
    line += human_size(p.done) + "  " + human_rate(rate);
  }
  struct winsize ws {};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 10 && line.size() >= ws.ws_col)
    line.resize(ws.ws_col - 1);
  const std::size_t pad = last_width_ > line.size() ? last_width_ - line.size() : 0;
  std::fprintf(stderr, "\r%s%s", line.c_str(), std::string(pad, ' ').c_str());
  std::fflush(stderr);
  last_width_ = line.size();
}

void ProgressBar::clear() {
  if (out_.mode != ProgressOutput::Mode::bar || last_width_ == 0) return;
  std::fprintf(stderr, "\r%s\r", std::string(last_width_, ' ').c_str());
  std::fflush(stderr);
  last_width_ = 0;
}

}  // namespace ferry::cli
