#include "client/cli/admin.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

#include <chrono>
#include <cstdio>
#include <ctime>

#include "client/session.h"
#include "ferry/v1/admin.ferry.h"
#include "rpc/units.h"

namespace ferry::cli {

namespace {

using v1::Admin;
namespace pb = google::protobuf;

std::string scalar_json(const pb::Message& m, const pb::Reflection& r, const pb::FieldDescriptor& f, int index) {
  const bool rep = f.is_repeated();
  switch (f.cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32:
      return std::to_string(rep ? r.GetRepeatedInt32(m, &f, index) : r.GetInt32(m, &f));
    case pb::FieldDescriptor::CPPTYPE_INT64:
      return std::to_string(rep ? r.GetRepeatedInt64(m, &f, index) : r.GetInt64(m, &f));
    case pb::FieldDescriptor::CPPTYPE_UINT32:
      return std::to_string(rep ? r.GetRepeatedUInt32(m, &f, index) : r.GetUInt32(m, &f));
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      return std::to_string(rep ? r.GetRepeatedUInt64(m, &f, index) : r.GetUInt64(m, &f));
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
    case pb::FieldDescriptor::CPPTYPE_FLOAT: {
      const double v = f.cpp_type() == pb::FieldDescriptor::CPPTYPE_DOUBLE
                           ? (rep ? r.GetRepeatedDouble(m, &f, index) : r.GetDouble(m, &f))
                           : (rep ? r.GetRepeatedFloat(m, &f, index) : r.GetFloat(m, &f));
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.3f", v);
      return buf;
    }
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      return (rep ? r.GetRepeatedBool(m, &f, index) : r.GetBool(m, &f)) ? "true" : "false";
    case pb::FieldDescriptor::CPPTYPE_ENUM: {
      const auto* e = rep ? r.GetRepeatedEnum(m, &f, index) : r.GetEnum(m, &f);
      return Json::quote(e->name());
    }
    case pb::FieldDescriptor::CPPTYPE_STRING:
      return Json::quote(rep ? r.GetRepeatedString(m, &f, index) : r.GetString(m, &f));
    case pb::FieldDescriptor::CPPTYPE_MESSAGE:
      return message_json(rep ? r.GetRepeatedMessage(m, &f, index) : r.GetMessage(m, &f));
  }
  return "null";
}

std::string ago(std::int64_t ns) {
  if (ns <= 0) return "-";
  const std::time_t t = static_cast<std::time_t>(ns / 1000000000);
  std::tm tm{};
  ::localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string uptime_text(double seconds) {
  auto s = static_cast<unsigned long long>(seconds);
  char buf[64];
  if (s >= 86400)
    std::snprintf(buf, sizeof buf, "%llud %lluh %llum", s / 86400, s / 3600 % 24, s / 60 % 60);
  else if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lluh %llum %llus", s / 3600, s / 60 % 60, s % 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%llum %llus", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  return buf;
}

std::string identity(const v1::AdminClient& c) {
  std::string out;
  auto add = [&out](const std::string& s) { out += (out.empty() ? "" : ", ") + s; };
  if (c.has_uid()) add("uid " + std::to_string(c.uid()) + (c.has_pid() ? " pid " + std::to_string(c.pid()) : ""));
  if (!c.tls_subject().empty()) add(c.tls_subject());
  if (!c.sasl_user().empty()) add("sasl " + c.sasl_user() + " (" + c.sasl_mechanism() + ")");
  if (!c.authenticated()) add("authenticating");
  return out.empty() ? "-" : out;
}

// Columns padded to their widest cell.
void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width;
  for (const auto& r : rows)
    for (std::size_t i = 0; i < r.size(); ++i) {
      if (width.size() <= i) width.push_back(0);
      width[i] = std::max(width[i], r[i].size());
    }
  for (const auto& r : rows) {
    std::string line;
    for (std::size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

std::string bytes_limit(std::uint64_t v) {
  return v == 0 ? std::string("0 (no bound)") : std::to_string(v) + " (" + human_size(v) + ")";
}

void print_limits(const v1::AdminLimits& l) {
  print_table({{"max_clients", std::to_string(l.max_clients())},
               {"max_unauthenticated_clients", std::to_string(l.max_unauthenticated_clients())},
               {"max_calls", std::to_string(l.max_calls())},
               {"max_streams", std::to_string(l.max_streams())},
               {"max_calls_per_client", std::to_string(l.max_calls_per_client())},
               {"max_streams_per_client", std::to_string(l.max_streams_per_client())},
               {"max_buffered_bytes_per_client", bytes_limit(l.max_buffered_bytes_per_client())},
               {"max_buffered_bytes", bytes_limit(l.max_buffered_bytes())},
               {"auth_timeout_ms", std::to_string(l.auth_timeout_ms())},
               {"idle_timeout_ms", std::to_string(l.idle_timeout_ms())}});
}

void print_client(const v1::AdminClient& c) {
  print_table({{"id", std::to_string(c.id())},
               {"transport", c.transport() + (c.admin() ? " (admin socket)" : "")},
               {"address", c.address()},
               {"uid", c.has_uid() ? std::to_string(c.uid()) : "-"},
               {"pid", c.has_pid() ? std::to_string(c.pid()) : "-"},
               {"tls subject", c.tls_subject().empty() ? "-" : c.tls_subject()},
               {"tls version", c.tls_version().empty() ? "-" : c.tls_version()},
               {"sasl user", c.sasl_user().empty() ? "-" : c.sasl_user()},
               {"sasl mechanism", c.sasl_mechanism().empty() ? "-" : c.sasl_mechanism()},
               {"client name", c.client_name().empty() ? "-" : c.client_name()},
               {"authenticated", c.authenticated() ? "yes" : "no"},
               {"connected since", ago(c.connected_ns())},
               {"bytes received", human_size(c.bytes_received())},
               {"bytes sent", human_size(c.bytes_sent())},
               {"calls in flight", std::to_string(c.calls_in_flight())},
               {"streams in flight", std::to_string(c.streams_in_flight())}});
}

void print_jobs(const v1::AdminJobList& jobs) {
  std::vector<std::vector<std::string>> rows{{"ID", "KIND", "CLIENT", "POOL/VOLUME", "DONE", "STARTED", "PROCEDURE"}};
  for (const auto& j : jobs.jobs()) {
    std::string what = j.pool().empty() ? j.subject() : j.pool() + "/" + j.volume();
    std::string done = human_size(j.bytes_done());
    if (j.bytes_total()) done += " / " + human_size(j.bytes_total());
    rows.push_back({j.id(), j.kind(), j.client_id() ? std::to_string(j.client_id()) : "-", what.empty() ? "-" : what,
                    done, ago(j.started_ns()), j.procedure()});
  }
  print_table(rows);
}

void print_info(const v1::AdminServerInfo& i) {
  std::printf("ferryd %s, pid %u, up %s (since %s)\n", i.version().c_str(), i.pid(), uptime_text(i.uptime_seconds()).c_str(),
              ago(i.started_ns()).c_str());
  std::string by;
  for (const auto& c : i.connections_by_transport())
    by += (by.empty() ? "" : ", ") + c.transport() + " " + std::to_string(c.connections());
  print_table({
      {"threads", std::to_string(i.io_threads()) + " io, " + std::to_string(i.worker_threads()) + " workers, " +
                      std::to_string(i.process_threads()) + " in the process"},
      {"connections", std::to_string(i.connections()) + " (" + by + "), " + std::to_string(i.admin_connections()) +
                          " admin"},
      {"authenticating", std::to_string(i.unauthenticated_connections())},
      {"accepted", std::to_string(i.connections_accepted()) + " since start, " +
                       std::to_string(i.connections_refused()) + " refused"},
      {"calls in flight", std::to_string(i.calls_in_flight())},
      {"streams in flight", std::to_string(i.streams_in_flight())},
      {"calls", std::to_string(i.calls_total()) + " total, " + std::to_string(i.calls_cancelled()) + " cancelled, " +
                    std::to_string(i.calls_overloaded()) + " overloaded"},
      {"errors", std::to_string(i.protocol_errors()) + " protocol, " + std::to_string(i.auth_failures()) +
                     " authentication"},
      {"bytes", human_size(i.bytes_received()) + " received, " + human_size(i.bytes_sent()) + " sent"},
      {"buffers in use", human_size(i.buffer_bytes_in_use())},
      {"jobs", std::to_string(i.jobs()) + " running"},
      {"log level", i.log_level()},
      {"limits", "max_clients " + std::to_string(i.limits().max_clients()) + ", max_unauthenticated_clients " +
                     std::to_string(i.limits().max_unauthenticated_clients()) + ", max_calls " +
                     std::to_string(i.limits().max_calls()) + ", max_streams " +
                     std::to_string(i.limits().max_streams()) + ", max_calls_per_client " +
                     std::to_string(i.limits().max_calls_per_client()) + ", max_streams_per_client " +
                     std::to_string(i.limits().max_streams_per_client()) + ", max_buffered_bytes_per_client " +
                     std::to_string(i.limits().max_buffered_bytes_per_client()) + ", max_buffered_bytes " +
                     std::to_string(i.limits().max_buffered_bytes()) + ", auth_timeout_ms " +
                     std::to_string(i.limits().auth_timeout_ms()) + ", idle_timeout_ms " +
                     std::to_string(i.limits().idle_timeout_ms())},
  });
}

std::uint64_t number(const std::string& text, const std::string& what) {
  if (text.empty() || text.size() > 19 || text.find_first_not_of("0123456789") != std::string::npos)
    throw Error(Code::invalid_argument, what + ": '" + text + "' is not a number");
  return std::stoull(text);
}

v1::AdminLimits parse_set(const std::vector<std::string>& items) {
  v1::AdminLimits l;
  for (const auto& item : items) {
    const auto eq = item.find('=');
    if (eq == std::string::npos) throw Error(Code::invalid_argument, "--set '" + item + "': expected NAME=VALUE");
    const std::string name = item.substr(0, eq);
    const std::string text = item.substr(eq + 1);
    if (name == "max_buffered_bytes_per_client" || name == "max_buffered_bytes") {
      // Bytes, with the usual suffixes (64M, 1G); 0 takes the bound away.
      const auto bytes = ::ferry::parse_size(text);
      if (!bytes) throw Error(Code::invalid_argument, name + ": '" + text + "' is not a size (e.g. 65536, 64M, 1G)");
      if (name == "max_buffered_bytes") l.set_max_buffered_bytes(*bytes);
      else l.set_max_buffered_bytes_per_client(*bytes);
      continue;
    }
    const std::uint64_t v = number(text, name);
    if (name == "max_clients") l.set_max_clients(v);
    else if (name == "max_unauthenticated_clients") l.set_max_unauthenticated_clients(v);
    else if (name == "max_calls") l.set_max_calls(v);
    else if (name == "max_streams") l.set_max_streams(v);
    else if (name == "max_calls_per_client") l.set_max_calls_per_client(v);
    else if (name == "max_streams_per_client") l.set_max_streams_per_client(v);
    else if (name == "auth_timeout_ms") l.set_auth_timeout_ms(v);
    else if (name == "idle_timeout_ms") l.set_idle_timeout_ms(v);
    else
      throw Error(Code::invalid_argument,
                  "unknown limit '" + name +
                      "' (max_clients, max_unauthenticated_clients, max_calls, max_streams, max_calls_per_client, "
                      "max_streams_per_client, max_buffered_bytes_per_client, max_buffered_bytes, auth_timeout_ms, "
                      "idle_timeout_ms)");
  }
  return l;
}

}  // namespace

std::string message_json(const pb::Message& m) {
  const auto* d = m.GetDescriptor();
  const auto* r = m.GetReflection();
  std::string out = "{";
  bool first = true;
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* f = d->field(i);
    if (!f->is_repeated() && f->has_presence() && !r->HasField(m, f)) continue;
    out += (first ? "" : ",") + Json::quote(f->name()) + ":";
    first = false;
    if (f->is_repeated()) {
      out += "[";
      for (int k = 0; k < r->FieldSize(m, f); ++k) out += (k ? "," : "") + scalar_json(m, *r, *f, k);
      out += "]";
    } else {
      out += scalar_json(m, *r, *f, -1);
    }
  }
  return out + "}";
}

int run_admin(const AdminRequest& q, rpc::ClientOptions options) {
  options.name = "ferry-admin";
  Session session = Session::connect("ferry+unix://" + q.socket, options);
  auto& client = session.rpc();
  auto out = [&q](const pb::Message& m) {
    if (q.json) std::printf("%s\n", message_json(m).c_str());
  };
  using V = AdminRequest::Verb;
  switch (q.verb) {
    case V::info: {
      auto info = client.call_future<Admin::ServerInfo>(v1::AdminServerInfoCall{}).get();
      if (q.json) out(info);
      else print_info(info);
      break;
    }
    case V::clients: {
      v1::AdminClientListCall call;
      call.set_include_admin(q.include_admin);
      auto list = client.call_future<Admin::ClientList>(call).get();
      if (q.json) {
        out(list);
        break;
      }
      std::vector<std::vector<std::string>> rows{
          {"ID", "TRANSPORT", "ADDRESS", "IDENTITY", "CONNECTED", "IN", "OUT", "CALLS", "STREAMS"}};
      for (const auto& c : list.clients())
        rows.push_back({std::to_string(c.id()), c.transport() + (c.admin() ? " (admin)" : ""), c.address(), identity(c),
                        ago(c.connected_ns()), human_size(c.bytes_received()), human_size(c.bytes_sent()),
                        std::to_string(c.calls_in_flight()), std::to_string(c.streams_in_flight())});
      print_table(rows);
      break;
    }
    case V::client: {
      v1::AdminClientRef ref;
      ref.set_id(number(q.id, "client id"));
      auto c = client.call_future<Admin::ClientInfo>(ref).get();
      if (q.json) out(c);
      else print_client(c);
      break;
    }
    case V::disconnect: {
      v1::AdminClientRef ref;
      ref.set_id(number(q.id, "client id"));
      ref.set_reason(q.reason);
      client.call_future<Admin::ClientDisconnect>(ref).get();
      if (q.json) std::printf("%s\n", Json().field("disconnected", ref.id()).str().c_str());
      else if (!q.quiet) std::printf("disconnected client %llu\n", static_cast<unsigned long long>(ref.id()));
      break;
    }
    case V::limits: {
      v1::AdminLimits l = q.set.empty() ? client.call_future<Admin::LimitsGet>(v1::AdminLimitsGetCall{}).get()
                                        : client.call_future<Admin::LimitsSet>(parse_set(q.set)).get();
      if (q.json) out(l);
      else if (!q.quiet || q.set.empty()) print_limits(l);
      break;
    }
    case V::log_level: {
      v1::AdminLogLevel l;
      if (q.level.empty()) {
        l = client.call_future<Admin::LogLevelGet>(v1::AdminLogLevelGetCall{}).get();
      } else {
        v1::AdminLogLevel set;
        set.set_level(q.level);
        l = client.call_future<Admin::LogLevelSet>(set).get();
      }
      if (q.json) out(l);
      else if (!q.quiet || q.level.empty()) std::printf("%s\n", l.level().c_str());
      break;
    }
    case V::jobs: {
      auto jobs = client.call_future<Admin::JobList>(v1::AdminJobListCall{}).get();
      if (q.json) out(jobs);
      else print_jobs(jobs);
      break;
    }
    case V::cancel: {
      v1::AdminJobRef ref;
      ref.set_id(q.id);
      ref.set_reason(q.reason);
      auto job = client.call_future<Admin::JobCancel>(ref).get();
      if (q.json) out(job);
      else if (!q.quiet) std::printf("cancelled job %s (%s)\n", job.id().c_str(), job.kind().c_str());
      break;
    }
  }
  session.close();
  return Exit::ok;
}

}  // namespace ferry::cli
