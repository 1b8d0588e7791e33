#include "client/cli/jobs.h"

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <future>
#include <map>
#include <mutex>

#include "client/copy.h"
#include "ferry/v1/migration.ferry.h"
#include "rpc/endpoint.h"
#include "stream/digest.h"

namespace ferry::cli {

namespace {

using Clock = std::chrono::steady_clock;

Error bad_end(const std::string& text, const std::string& why) {
  return Error(Code::invalid_argument,
               "'" + text + "' is not a copy end (" + why +
                   "); write ferry+unix:///SOCKET/POOL/NAME, ferry+tcp://HOST:PORT/POOL/NAME, "
                   "ferry+tls://HOST:PORT/POOL/NAME, ferry+grpc(s)://HOST:PORT/POOL/NAME, POOL/NAME on the -c daemon, a local file (/PATH, ./PATH, "
                   "file:PATH) or an NBD URI (nbd://, nbd+unix://)",
               "client");
}

std::string end_text(const CopyEnd& e) {
  if (e.local()) return e.uri;
  return e.uri + "/" + e.volume.pool + "/" + e.volume.name;
}


}  // namespace

CopyEnd parse_copy_end(const std::string& text, const std::string& default_uri) {
  CopyEnd out;
  auto starts = [&](const char* prefix) { return text.rfind(prefix, 0) == 0; };
  if (starts("/") || starts("./") || starts("../") || starts("file:")) {
    out.kind = CopyEnd::Kind::file;
    out.uri = starts("file://") ? text.substr(7) : starts("file:") ? text.substr(5) : text;
    if (out.uri.empty()) throw bad_end(text, "no file path");
    return out;
  }
  if (starts("nbd://") || starts("nbds://") || starts("nbd+unix://") || starts("nbds+unix://") ||
      starts("nbd+vsock://") || starts("nbds+vsock://")) {
    out.kind = CopyEnd::Kind::nbd;
    out.uri = text;
    return out;
  }
  const auto scheme_end = text.find("://");
  if (scheme_end == std::string::npos) {
    out.uri = default_uri;
    out.volume = parse_volume(text);
    if (out.volume.name.empty()) throw bad_end(text, "no volume name");
    return out;
  }
  const std::string scheme = text.substr(0, scheme_end);
  const std::string rest = text.substr(scheme_end + 3);
  if (scheme == "ferry+unix") {
    // The socket's path, then POOL/NAME.
    const auto name_at = rest.rfind('/');
    if (name_at == std::string::npos || name_at + 1 == rest.size()) throw bad_end(text, "no volume name");
    const auto pool_at = rest.rfind('/', name_at - 1);
    if (pool_at == std::string::npos || pool_at == 0 || pool_at + 1 == name_at)
      throw bad_end(text, "a unix socket path followed by /POOL/NAME");
    out.uri = "ferry+unix://" + rest.substr(0, pool_at);
    out.volume.pool = rest.substr(pool_at + 1, name_at - pool_at - 1);
    out.volume.name = rest.substr(name_at + 1);
  } else if (scheme == "ferry+tcp" || scheme == "ferry+tls" || scheme == "ferry+grpc" || scheme == "ferry+grpcs") {
    const auto slash = rest.find('/');
    if (slash == std::string::npos || slash == 0) throw bad_end(text, "no /POOL/NAME after the address");
    out.uri = scheme + "://" + rest.substr(0, slash);
    out.volume = parse_volume(rest.substr(slash + 1));
    if (out.volume.name.empty()) throw bad_end(text, "no volume name");
  } else {
    throw bad_end(text, "unknown scheme '" + scheme + "'");
  }
  rpc::Endpoint::parse(out.uri);  // a clear error now, not from the daemon
  return out;
}

const char* job_state_name(v1::JobState state) {
  switch (state) {
    case v1::JOB_RUNNING: return "running";
    case v1::JOB_COMPLETED: return "completed";
    case v1::JOB_FAILED: return "failed";
    case v1::JOB_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

Json job_json(const v1::JobStatus& j) {
  Json out;
  out.field("id", j.id())
      .field("kind", j.kind())
      .field("state", job_state_name(j.state()))
      .field("source", j.source())
      .field("destination", j.destination())
      .field("total_bytes", j.total_bytes())
      .field("done_bytes", j.done_bytes())
      .field("data_bytes", j.data_bytes())
      .field("hole_bytes", j.hole_bytes())
      .field("skipped_bytes", j.skipped_bytes())
      .field("extents_total", j.extents_total())
      .field("extents_done", j.extents_done())
      .field("bytes_per_second", j.rate())
      .field("eta_seconds", j.eta_seconds())
      .field("resumed", j.resumed())
      .field("started_ns", j.started_ns())
      .field("finished_ns", j.finished_ns());
  if (!j.error().empty()) out.field("error", to_string(static_cast<Code>(j.error_code()))).field("message", j.error());
  if (!j.digest().empty()) out.field("digest", stream::digest_hex(j.digest()));
  return out;
}

std::string job_line(const v1::JobStatus& j) {
  char pct[16] = "   -";
  if (j.total_bytes())
    std::snprintf(pct, sizeof pct, "%3d%%",
                  static_cast<int>(100.0 * static_cast<double>(j.done_bytes()) / static_cast<double>(j.total_bytes())));
  std::string line = j.id() + "  " + j.kind() + "  " + job_state_name(j.state()) + "  " + pct + "  " +
                     human_size(j.done_bytes()) + " / " + human_size(j.total_bytes());
  if (j.state() == v1::JOB_RUNNING) {
    line += "  " + human_rate(j.rate());
    if (j.eta_seconds() >= 0) line += "  ETA " + human_duration(j.eta_seconds());
  }
  line += "  " + j.source() + " -> " + j.destination();
  if (!j.error().empty()) line += "  (" + j.error() + ")";
  return line;
}

namespace {

// The end of a finished copy, however it ran: one JSON object, or the
// "copied / resumed / verified" lines.
int print_copy_done(const CopyRequest& request, const v1::JobStatus& done, double secs, const JobOutput& out) {
  if (out.json) {
    Json j = job_json(done);
    j.field("seconds", secs).field("logical_bytes_per_second", secs > 0 ? static_cast<double>(done.total_bytes()) / secs : 0.0);
    std::printf("%s\n", j.str().c_str());
    return 0;
  }
  if (out.quiet) return 0;
  std::printf("copied %s to %s: %s (%s data, %s holes) in %s, %s\n", end_text(request.source).c_str(),
              end_text(request.destination).c_str(), human_size(done.total_bytes()).c_str(),
              human_size(done.data_bytes()).c_str(), human_size(done.hole_bytes()).c_str(), human_duration(secs).c_str(),
              human_rate(secs > 0 ? static_cast<double>(done.total_bytes()) / secs : 0).c_str());
  if (done.skipped_bytes())
    std::printf("resumed: %s was already at the destination, verified against the source and not sent again\n",
                human_size(done.skipped_bytes()).c_str());
  std::printf("verified: %llu extents, XXH3-128 per extent, volume digest %s\n",
              static_cast<unsigned long long>(done.extents_total()), stream::digest_hex(done.digest()).c_str());
  return 0;
}

// One end here: this process moves the data (client/copy.h).
int run_local_copy(Session& session, const CopyRequest& request, const JobOutput& out) {
  const bool to_volume = request.source.local();
  const CopyEnd& local = to_volume ? request.source : request.destination;
  const CopyEnd& remote = to_volume ? request.destination : request.source;
  LocalCopyOptions options;
  options.resume = request.resume;
  options.overwrite = request.overwrite;
  options.bandwidth = request.bandwidth;
  options.extent_size = request.extent_size;
  options.parallel = request.parallel;
  options.no_sync = request.no_sync;
  options.interrupted = out.interrupted;
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "localhost");
  options.source_text = to_volume ? std::string(host) + ":" + local.uri : end_text(remote);

  std::unique_ptr<LocalDisk> disk;
  if (to_volume) {
    disk = local.kind == CopyEnd::Kind::file ? open_file_source(local.uri) : open_nbd_disk(local.uri, false);
  } else {
    const auto info = session.vol_info(remote.volume.pool, remote.volume.name);
    if (!info.state().empty())
      throw Error(Code::failed_precondition,
                  "volume " + remote.volume.pool + "/" + remote.volume.name + " is " + info.state() + " (" +
                      info.state_detail() + "): finish that copy first",
                  "client");
    if (info.capacity() == 0)
      throw Error(Code::failed_precondition,
                  "volume " + remote.volume.pool + "/" + remote.volume.name + " is empty: nothing to copy", "client");
    disk = local.kind == CopyEnd::Kind::file
               ? open_file_destination(local.uri, info.capacity(), options.source_text, request.overwrite, request.resume)
               : open_nbd_disk(local.uri, true, info.capacity());
  }

  ProgressBar bar(out.progress, to_volume ? "copy-to-volume" : "copy-from-volume",
                  remote.volume.pool + "/" + remote.volume.name);
  LocalCopyResult done;
  try {
    auto progress = [&](const Progress& p) { bar.update(p); };
    done = to_volume ? copy_to_volume(session, *disk, remote.volume.pool, remote.volume.name, options, progress)
                     : copy_from_volume(session, remote.volume.pool, remote.volume.name, *disk, options, progress);
  } catch (...) {
    bar.fail();
    throw;
  }
  {
    Progress end;  // the final report, if the copy did not make it
    end.done = end.total = done.total_bytes;
    end.data_bytes = done.data_bytes;
    end.hole_bytes = done.hole_bytes;
    end.elapsed = done.elapsed;
    end.finished = true;
    bar.finish(end);
  }
  v1::JobStatus status;
  status.set_id(done.job);
  status.set_kind(to_volume ? "copy-to-volume" : "copy-from-volume");
  status.set_source(end_text(request.source));
  status.set_destination(end_text(request.destination));
  status.set_state(v1::JOB_COMPLETED);
  status.set_total_bytes(done.total_bytes);
  status.set_done_bytes(done.total_bytes);
  status.set_data_bytes(done.data_bytes);
  status.set_hole_bytes(done.hole_bytes);
  status.set_skipped_bytes(done.skipped_bytes);
  status.set_extents_total(done.extents);
  status.set_extents_done(done.extents);
  status.set_resumed(done.skipped_bytes > 0);
  status.set_digest(done.digest);
  return print_copy_done(request, status, std::chrono::duration<double>(done.elapsed).count(), out);
}

}  // namespace

int run_vol_copy(Session& session, const CopyRequest& request, const JobOutput& out) {
  if (request.source.local() && request.destination.local())
    throw Error(Code::invalid_argument,
                "both ends of this copy are local; one end of vol-copy must be a volume on a ferryd (nbdcopy or "
                "qemu-img convert copy between local disks)",
                "client");
  if (request.source.local() || request.destination.local()) {
    if (request.detach)
      throw Error(Code::invalid_argument, "--detach needs both ends on daemons: with a local end, ferry moves the data itself",
                  "client");
    return run_local_copy(session, request, out);
  }
  auto& client = session.rpc();
  std::mutex mutex;
  std::condition_variable cv;
  std::map<std::string, v1::JobStatus> latest;
  client.on_message<v1::Migration::JobEvent>([&](v1::JobUpdate u) {
    std::lock_guard lock(mutex);
    latest[u.job().id()] = u.job();
    cv.notify_all();
  });
  // Events may still come after this function: they must not reach its locals.
  struct Detach {
    rpc::Client& client;
    ~Detach() { client.on_message<v1::Migration::JobEvent>([](v1::JobUpdate) {}); }
  } detach{client};
  if (!request.detach) client.call_future<v1::Migration::JobSubscribe>(v1::JobSubscribeCall{}).get();

  v1::CopyStartCall call;
  call.mutable_source()->set_pool(request.source.volume.pool);
  call.mutable_source()->set_name(request.source.volume.name);
  call.set_destination_uri(request.destination.uri);
  call.mutable_destination()->set_pool(request.destination.volume.pool);
  call.mutable_destination()->set_name(request.destination.volume.name);
  call.set_resume(request.resume);
  call.set_overwrite(request.overwrite);
  call.set_bandwidth(request.bandwidth);
  call.set_extent_size(request.extent_size);
  call.set_parallel(request.parallel);
  call.set_no_sync(request.no_sync);
  const auto started_at = Clock::now();
  const v1::JobStatus started = client.call_future<v1::Migration::CopyStart>(call).get();
  if (request.detach) {
    if (out.json)
      std::printf("%s\n", job_json(started).str().c_str());
    else if (!out.quiet)
      std::printf("started job %s: %s -> %s (follow it with: ferry job-info %s, ferry events)\n", started.id().c_str(),
                  started.source().c_str(), started.destination().c_str(), started.id().c_str());
    return 0;
  }

  v1::JobRef ref;
  ref.set_id(started.id());
  auto wait = client.call_future<v1::Migration::JobWait>(ref);
  ProgressBar bar(out.progress, "copy", request.source.volume.pool + "/" + request.source.volume.name);
  bool cancel_sent = false;
  try {
    while (wait.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready) {
      if (!cancel_sent && out.interrupted && out.interrupted()) {
        v1::JobRef cancel = ref;
        cancel.set_reason("interrupted on the ferry client (Ctrl-C)");
        client.call_future<v1::Migration::JobCancel>(cancel).get();
        cancel_sent = true;
      }
      std::optional<v1::JobStatus> now;
      {
        std::lock_guard lock(mutex);
        if (auto it = latest.find(started.id()); it != latest.end()) now = it->second;
      }
      if (now) {
        Progress p;
        p.done = now->done_bytes();
        p.total = now->total_bytes();
        p.data_bytes = now->data_bytes();
        p.hole_bytes = now->hole_bytes();
        p.elapsed = Clock::now() - started_at;
        bar.update(p);
      }
      if (!client.is_open()) throw Error(Code::unavailable, "the connection to the source daemon closed", "client");
    }
  } catch (...) {
    bar.fail();
    throw;
  }
  const v1::JobStatus done = wait.get();
  {
    Progress p;
    p.done = done.done_bytes();
    p.total = done.total_bytes();
    p.data_bytes = done.data_bytes();
    p.hole_bytes = done.hole_bytes();
    p.elapsed = Clock::now() - started_at;
    p.finished = done.state() == v1::JOB_COMPLETED;
    if (p.finished) {
      bar.finish(p);
    } else {
      bar.update(p);
      bar.fail();
    }
  }
  if (done.state() != v1::JOB_COMPLETED) {
    if (out.json) std::printf("%s\n", job_json(done).str().c_str());
    throw Error(static_cast<Code>(done.error_code() ? done.error_code() : static_cast<std::uint32_t>(Code::unknown)),
                "copy " + done.id() + " " + job_state_name(done.state()) + ": " + done.error(), "migration");
  }
  return print_copy_done(request, done, std::chrono::duration<double>(Clock::now() - started_at).count(), out);
}

int run_job_list(Session& session, const JobOutput& out) {
  const auto reply = session.rpc().call_future<v1::Migration::JobList>(v1::JobListCall{}).get();
  for (const auto& j : reply.jobs()) {
    if (out.json)
      std::printf("%s\n", job_json(j).str().c_str());
    else
      std::printf("%s\n", job_line(j).c_str());
  }
  if (!out.json && !out.quiet && reply.jobs_size() == 0) std::printf("no jobs\n");
  return 0;
}

int run_job_info(Session& session, const std::string& id, const JobOutput& out) {
  v1::JobRef ref;
  ref.set_id(id);
  const auto j = session.rpc().call_future<v1::Migration::JobInfo>(ref).get();
  if (out.json) {
    std::printf("%s\n", job_json(j).str().c_str());
    return 0;
  }
  std::printf("id:          %s\nkind:        %s\nstate:       %s\nsource:      %s\ndestination: %s\n", j.id().c_str(),
              j.kind().c_str(), job_state_name(j.state()), j.source().c_str(), j.destination().c_str());
  std::printf("progress:    %s of %s (%llu of %llu extents)\n", human_size(j.done_bytes()).c_str(),
              human_size(j.total_bytes()).c_str(), static_cast<unsigned long long>(j.extents_done()),
              static_cast<unsigned long long>(j.extents_total()));
  std::printf("moved:       %s data, %s holes%s\n", human_size(j.data_bytes()).c_str(), human_size(j.hole_bytes()).c_str(),
              j.skipped_bytes() ? (", " + human_size(j.skipped_bytes()) + " verified and skipped (resumed)").c_str() : "");
  if (j.state() == v1::JOB_RUNNING)
    std::printf("rate:        %s%s\n", human_rate(j.rate()).c_str(),
                j.eta_seconds() >= 0 ? ("  ETA " + human_duration(j.eta_seconds())).c_str() : "");
  if (!j.error().empty())
    std::printf("error:       %s: %s\n", to_string(static_cast<Code>(j.error_code())), j.error().c_str());
  if (!j.digest().empty()) std::printf("digest:      %s (XXH3-128 of the extent digests)\n", stream::digest_hex(j.digest()).c_str());
  return 0;
}

int run_job_cancel(Session& session, const std::string& id, const JobOutput& out) {
  v1::JobRef ref;
  ref.set_id(id);
  auto j = session.rpc().call_future<v1::Migration::JobCancel>(ref).get();
  // Wait (briefly) for it to stop, so "cancelled" means stopped.
  j = session.rpc().call_future<v1::Migration::JobWait>(ref, rpc::with_timeout(std::chrono::seconds(10))).get();
  if (out.json)
    std::printf("%s\n", job_json(j).str().c_str());
  else if (!out.quiet)
    std::printf("%s\n", job_line(j).c_str());
  return 0;
}

}  // namespace ferry::cli
