// ferry_bench: one measurement per process, driven by bench/run.
//
//   ferry_bench measure ROW --side ferry|baseline|baseline2 [--quick] [--ferryd PATH]
//               [--relay PATH] [--addr ADDR] [--server-netns NS] [--client-netns NS]
//               [--serve-only]
//   ferry_bench serve-raw-echo --listen unix:PATH|tcp:HOST:PORT
//   ferry_bench serve-raw-sink --listen unix:PATH|tcp:HOST:PORT
//   ferry_bench serve-file     --listen unix:PATH|tcp:HOST:PORT --dir DIR
//   ferry_bench serve-grpc     --listen unix:PATH|HOST:PORT [--cert PEM --key PEM]
//                              [--raise-malloc-thresholds]
//   ferry_bench rows
//
// `measure` prints exactly one JSON line on stdout,
// {"value": N, "unit": "...", "note": "..."}, plus "threads_before" and
// "threads" (the server's thread count before the run and its peak during it)
// for cases that sample them; on failure it prints the reason
// on stderr and exits 1, or 77 when a baseline's peer tool is unavailable.
// Servers are child processes (this same binary re-executed), started with
// `ip netns exec NS` when --server-netns is given; --client-netns moves the
// measuring process itself into NS before anything else happens.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "bench/baselines.h"
#include "bench/copy_cases.h"
#include "bench/ferry_cases.h"
#include "bench/harness.h"
#include "bench/nbd_cases.h"
#include "bench/nbd_writer.h"

namespace ferry::bench {
namespace {

constexpr int exit_failure = 1;
constexpr int exit_usage = 2;
constexpr int exit_unavailable = 77;

struct Row {
  std::string_view name;
  std::function<Measurement(const CaseOptions&)> ferry;
  std::function<Measurement(const CaseOptions&)> baseline;
  // A second peer some rows also measure (`--side baseline2`); bench/run
  // reports it beside the first.
  std::function<Measurement(const CaseOptions&)> baseline2 = {};
};

VolumeCopy vol_dense(const CaseOptions& o, bool upload, bool tcp) {
  VolumeCopy c;
  c.upload = upload;
  c.tcp = tcp;
  c.size = volume_total_bytes(o.quick);
  return c;
}
VolumeCopy vol_sparse(bool upload) {
  VolumeCopy c;
  c.upload = upload;
  c.sparse = true;
  c.size = sparse_volume_bytes;
  c.seconds = true;
  return c;
}
// Eight at once, 512 MiB each (128 MiB with --quick).
VolumeCopy vol_eight(const CaseOptions& o) {
  VolumeCopy c;
  c.size = volume_total_bytes(o.quick) / 8;
  c.width = 8;
  return c;
}

// Row names are stable: issues and stored results refer to them.
const std::vector<Row>& rows() {
  static const std::vector<Row> table = {
      {"rpc.echo.seq", ferry_echo_seq, raw_echo_seq},
      {"rpc.echo.inflight128", [](const CaseOptions& o) { return ferry_echo_inflight(o, 128); },
       [](const CaseOptions& o) { return grpc_echo_inflight(o, 128); }},
      // ferry native against a plain gRPC service written by hand.
      {"grpc.native.upload", [](const CaseOptions& o) { return ferry_stream_upload(o, true, 1); },
       [](const CaseOptions& o) { return grpc_upload(o, false, stream_total_bytes(o.quick)); }},
      {"grpc.native.download", [](const CaseOptions& o) { return ferry_stream_download(o, true); },
       [](const CaseOptions& o) { return grpc_download(o, false, stream_total_bytes(o.quick)); }},
      {"grpc.native.upload.tls",
       [](const CaseOptions& o) { return ferry_stream_upload(o, Wire::tls, 1, stream_total_bytes(o.quick)); },
       [](const CaseOptions& o) { return grpc_upload(o, true, stream_total_bytes(o.quick)); }},
      {"grpc.native.echo128", [](const CaseOptions& o) { return ferry_echo_inflight(o, 128, Wire::tcp); },
       [](const CaseOptions& o) { return grpc_echo_inflight(o, 128, true); }},
      {"grpc.native.call_p99_under_load", [](const CaseOptions& o) { return ferry_call_p99(o, true); },
       grpc_call_p99},
      {"grpc.tunnel.upload",
       [](const CaseOptions& o) { return ferry_stream_upload(o, Wire::grpc, 1, stream_total_bytes(o.quick)); },
       [](const CaseOptions& o) { return grpc_upload(o, false, stream_total_bytes(o.quick)); },
       [](const CaseOptions& o) { return grpc_upload(o, false, stream_total_bytes(o.quick), true); }},
      {"grpc.tunnel.download", [](const CaseOptions& o) { return ferry_stream_download(o, Wire::grpc); },
       [](const CaseOptions& o) { return grpc_download(o, false, stream_total_bytes(o.quick)); },
       [](const CaseOptions& o) { return grpc_download(o, false, stream_total_bytes(o.quick), true); }},
      {"grpc.tunnel.echo128", [](const CaseOptions& o) { return ferry_echo_inflight(o, 128, Wire::grpc); },
       [](const CaseOptions& o) { return grpc_echo_inflight(o, 128, true); }},
      {"rpc.body.unix", [](const CaseOptions& o) { return ferry_body(o, false); },
       [](const CaseOptions& o) { return raw_body(o, false); }},
      {"rpc.body.tcp", [](const CaseOptions& o) { return ferry_body(o, true); },
       [](const CaseOptions& o) { return raw_body(o, true); }},
      {"rpc.duplex", [](const CaseOptions& o) { return ferry_duplex(o, false); },
       [](const CaseOptions& o) { return ferry_duplex(o, true); }},
      {"stream.upload.unix", [](const CaseOptions& o) { return ferry_stream_upload(o, false, 1); },
       [](const CaseOptions& o) { return raw_send(o, false, stream_total_bytes(o.quick)); }},
      {"stream.download.unix", [](const CaseOptions& o) { return ferry_stream_download(o, false); },
       [](const CaseOptions& o) { return raw_download(o, false, stream_total_bytes(o.quick)); }},
      {"stream.upload.tcp", [](const CaseOptions& o) { return ferry_stream_upload(o, true, 1); },
       [](const CaseOptions& o) { return raw_send(o, true, stream_total_bytes(o.quick)); }},
      {"stream.download.tcp", [](const CaseOptions& o) { return ferry_stream_download(o, true); },
       [](const CaseOptions& o) { return raw_download(o, true, stream_total_bytes(o.quick)); }},
      {"stream.upload4.unix", [](const CaseOptions& o) { return ferry_stream_upload(o, false, 4); },
       [](const CaseOptions& o) { return raw_send(o, false, stream_total_bytes(o.quick)); }},
      {"stream.call_p99_under_load", [](const CaseOptions& o) { return ferry_call_p99(o, true); },
       [](const CaseOptions& o) { return ferry_call_p99(o, false); }},
      {"stream.sparse10g", [](const CaseOptions& o) { return ferry_sparse_upload(o); },
       [](const CaseOptions& o) { return raw_send_file_seconds(o, 10u << 20); }},
      {"tls.stream.upload",
       [](const CaseOptions& o) { return ferry_stream_upload(o, Wire::tls, 1, stream_total_bytes(o.quick)); },
       [](const CaseOptions& o) { return raw_tls_send(o, stream_total_bytes(o.quick)); }},
      {"tls.stream.download", [](const CaseOptions& o) { return ferry_stream_download(o, Wire::tls); },
       [](const CaseOptions& o) { return raw_tls_download(o, stream_total_bytes(o.quick)); }},
      {"tls.echo.inflight128", [](const CaseOptions& o) { return ferry_echo_inflight(o, 128, Wire::tls); },
       [](const CaseOptions& o) { return ferry_echo_inflight(o, 128, Wire::tcp); }},
      {"sasl.stream.upload",
       [](const CaseOptions& o) { return ferry_stream_upload(o, Wire::sasl_layer, 1, sasl_total_bytes(o.quick)); },
       [](const CaseOptions& o) { return ferry_stream_upload(o, Wire::tls, 1, sasl_total_bytes(o.quick)); }},
      {"tls.handshake", ferry_tls_handshake, raw_tls_handshake},
      {"vol.upload.unix", [](const CaseOptions& o) { return ferry_volume_copy(o, vol_dense(o, true, false)); },
       [](const CaseOptions& o) { return raw_file_copy(o, vol_dense(o, true, false)); }},
      {"vol.download.unix", [](const CaseOptions& o) { return ferry_volume_copy(o, vol_dense(o, false, false)); },
       [](const CaseOptions& o) { return raw_file_copy(o, vol_dense(o, false, false)); }},
      {"vol.upload.tcp", [](const CaseOptions& o) { return ferry_volume_copy(o, vol_dense(o, true, true)); },
       [](const CaseOptions& o) { return raw_file_copy(o, vol_dense(o, true, true)); }},
      {"vol.download.tcp", [](const CaseOptions& o) { return ferry_volume_copy(o, vol_dense(o, false, true)); },
       [](const CaseOptions& o) { return raw_file_copy(o, vol_dense(o, false, true)); }},
      {"vol.upload.sparse10g", [](const CaseOptions& o) { return ferry_volume_copy(o, vol_sparse(true)); },
       [](const CaseOptions& o) { return raw_file_copy(o, vol_sparse(true)); }},
      {"vol.download.sparse10g", [](const CaseOptions& o) { return ferry_volume_copy(o, vol_sparse(false)); },
       [](const CaseOptions& o) { return raw_file_copy(o, vol_sparse(false)); }},
      {"vol.upload8", [](const CaseOptions& o) { return ferry_volume_copy(o, vol_eight(o)); },
       [](const CaseOptions& o) { return raw_file_copy(o, vol_eight(o)); }},
      // The Python binding's upload against the CLI's, same file and daemon.
      {"py.stream.upload",
       [](const CaseOptions& o) {
         auto c = vol_dense(o, true, false);
         c.python = true;
         return ferry_volume_copy(o, c);
       },
       [](const CaseOptions& o) { return ferry_volume_copy(o, vol_dense(o, true, false)); }},
      {"nbd.read.plain", [](const CaseOptions& o) { return ferry_nbd_plain(o, false); },
       [](const CaseOptions& o) { return nbdkit_file_plain(o, false); }},
      {"nbd.write.plain", [](const CaseOptions& o) { return ferry_nbd_plain(o, true); },
       [](const CaseOptions& o) { return nbdkit_file_plain(o, true); }},
      {"nbd.read.bridge.unix", [](const CaseOptions& o) { return ferry_nbd_bridge(o, false, false, true); },
       [](const CaseOptions& o) { return ferry_nbd_bridge(o, false, false, false); }},
      {"nbd.write.bridge.unix", [](const CaseOptions& o) { return ferry_nbd_bridge(o, true, false, true); },
       [](const CaseOptions& o) { return ferry_nbd_bridge(o, true, false, false); }},
      {"nbd.read.bridge.tls", [](const CaseOptions& o) { return ferry_nbd_bridge(o, false, true, true); },
       [](const CaseOptions& o) { return ferry_nbd_bridge(o, false, true, false); }},
      {"nbd.write.bridge.tls", [](const CaseOptions& o) { return ferry_nbd_bridge(o, true, true, true); },
       [](const CaseOptions& o) { return ferry_nbd_bridge(o, true, true, false); }},
      {"nbd.delay64.qd1", [](const CaseOptions& o) { return ferry_nbd_delay(o, 1); },
       [](const CaseOptions& o) { return nbdkit_nbd_delay(o, 1); }},
      {"nbd.delay64.qd64", [](const CaseOptions& o) { return ferry_nbd_delay(o, 64); },
       [](const CaseOptions& o) { return nbdkit_nbd_delay(o, 64); }},
      {"nbd.delay64.qd1024", [](const CaseOptions& o) { return ferry_nbd_delay(o, 1024); },
       [](const CaseOptions& o) { return nbdkit_nbd_delay(o, 1024); }},
      {"nbd.mixed", [](const CaseOptions& o) { return ferry_nbd_mixed(o, false); },
       [](const CaseOptions& o) { return ferry_nbd_mixed(o, true); }},
      {"copy.rtt0", [](const CaseOptions& o) { return ferry_vol_copy(o, 0); },
       [](const CaseOptions& o) { return nbdcopy_volume_copy(o, 0); },
       [](const CaseOptions& o) { return qemu_img_volume_copy(o, 0); }},
      {"copy.rtt10", [](const CaseOptions& o) { return ferry_vol_copy(o, 10); },
       [](const CaseOptions& o) { return nbdcopy_volume_copy(o, 10); },
       [](const CaseOptions& o) { return qemu_img_volume_copy(o, 10); }},
      {"copy.rtt50", [](const CaseOptions& o) { return ferry_vol_copy(o, 50); },
       [](const CaseOptions& o) { return nbdcopy_volume_copy(o, 50); },
       [](const CaseOptions& o) { return qemu_img_volume_copy(o, 50); }},
  };
  return table;
}

std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

int usage(const char* why) {
  if (why) std::fprintf(stderr, "ferry_bench: %s\n", why);
  std::fputs(
      "usage: ferry_bench measure ROW --side ferry|baseline|baseline2 [--quick] [--ferryd PATH]\n"
      "                   [--relay PATH] [--addr ADDR] [--server-netns NS] [--client-netns NS]\n"
      "                   [--serve-only]\n"
      "       ferry_bench serve-raw-echo|serve-raw-sink|serve-grpc --listen ADDR\n"
      "       ferry_bench nbd-write --socket PATH [--export NAME] --depth QD --mib N\n"
      "       ferry_bench rows\n",
      stderr);
  return exit_usage;
}

// Parses "--flag value" and "--switch" arguments after the subcommand.
bool parse_flags(int argc, char** argv, int first, std::vector<std::string>& positional,
                 std::map<std::string, std::string>& values, const std::vector<std::string>& switches,
                 const std::vector<std::string>& valued) {
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (!arg.starts_with("--")) {
      positional.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
      inline_value = true;
    }
    if (std::find(switches.begin(), switches.end(), name) != switches.end() && !inline_value) {
      values.insert_or_assign(name, std::string(1, '1'));
    } else if (std::find(valued.begin(), valued.end(), name) != valued.end()) {
      if (!inline_value) {
        if (i + 1 >= argc) return false;
        value = argv[++i];
      }
      values[name] = value;
    } else {
      return false;
    }
  }
  return true;
}

int measure(int argc, char** argv) {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;
  if (!parse_flags(argc, argv, 2, positional, flags, {"quick", "serve-only"},
                   {"side", "ferryd", "relay", "addr", "server-netns", "client-netns"})) {
    return usage("bad arguments to measure");
  }
  if (positional.size() != 1) return usage("measure takes exactly one ROW");
  const Row* row = nullptr;
  for (const Row& r : rows()) {
    if (r.name == positional[0]) row = &r;
  }
  if (!row) return usage(("unknown row " + positional[0]).c_str());
  std::string side = flags["side"];
  if (side != "ferry" && side != "baseline" && side != "baseline2")
    return usage("--side must be ferry, baseline or baseline2");
  if (side == "baseline2" && !row->baseline2) return usage("this row has no second baseline");

  CaseOptions options;
  options.quick = flags.contains("quick");
  options.serve_only = flags.contains("serve-only");
  options.ferryd = flags["ferryd"];
  options.relay = flags["relay"];
  options.addr = flags["addr"];
  options.server_netns = flags["server-netns"];
  if (!flags["client-netns"].empty()) enter_netns(flags["client-netns"]);
  if (!options.addr.empty()) Address::parse(options.addr);  // reject typos before starting

  const auto& run_side = side == "ferry" ? row->ferry : side == "baseline" ? row->baseline : row->baseline2;
  Measurement m = run_side(options);
  if (options.serve_only) return 0;
  std::string threads;
  if (m.threads >= 0)
    threads = ", \"threads_before\": " + std::to_string(m.threads_before) + ", \"threads\": " + std::to_string(m.threads);
  std::printf("{\"value\": %.10g, \"unit\": %s, \"note\": %s%s}\n", m.value, json_string(m.unit).c_str(),
              json_string(m.note).c_str(), threads.c_str());
  std::fflush(stdout);
  return 0;
}

int serve(int argc, char** argv, int (*server)(const std::string&)) {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;
  if (!parse_flags(argc, argv, 2, positional, flags, {}, {"listen"}) || !positional.empty() ||
      flags["listen"].empty()) {
    return usage("serve modes take --listen ADDR");
  }
  return server(flags["listen"]);
}

int run(int argc, char** argv) {
  if (argc < 2) return usage(nullptr);
  std::string_view command = argv[1];
  if (command == "measure") return measure(argc, argv);
  if (command == "serve-raw-echo") return serve(argc, argv, serve_raw_echo);
  if (command == "serve-raw-sink") return serve(argc, argv, serve_raw_sink);
  if (command == "serve-raw-source") return serve(argc, argv, serve_raw_source);
  if (command == "serve-file") {
    std::vector<std::string> positional;
    std::map<std::string, std::string> flags;
    if (!parse_flags(argc, argv, 2, positional, flags, {}, {"listen", "dir"}) || flags["listen"].empty() ||
        flags["dir"].empty())
      return usage("serve-file takes --listen ADDR --dir DIR");
    return serve_file(flags["listen"], flags["dir"]);
  }
  if (command == "serve-grpc") {
    std::vector<std::string> positional;
    std::map<std::string, std::string> flags;
    if (!parse_flags(argc, argv, 2, positional, flags, {"raise-malloc-thresholds"}, {"listen", "cert", "key"}) ||
        !flags.contains("listen") || flags.contains("cert") != flags.contains("key"))
      return usage("serve-grpc takes --listen ADDR [--cert PEM --key PEM] [--raise-malloc-thresholds]");
    if (flags.contains("raise-malloc-thresholds")) raise_malloc_thresholds();
    return serve_grpc(flags["listen"], flags["cert"], flags["key"]);
  }
  if (command == "serve-tls-sink" || command == "serve-tls-source") {
    std::vector<std::string> positional;
    std::map<std::string, std::string> flags;
    if (!parse_flags(argc, argv, 2, positional, flags, {}, {"listen", "cert", "key"}) || !flags.contains("listen") ||
        !flags.contains("cert") || !flags.contains("key"))
      return usage("serve-tls-sink|serve-tls-source take --listen ADDR --cert PEM --key PEM");
    return serve_tls(flags["listen"], flags["cert"], flags["key"], command == "serve-tls-source");
  }
  if (command == "nbd-write") {
    // The nbd.delay64.* rows' client on its own, against any NBD server on
    // a unix socket: 128 KiB writes, QD in flight.
    std::vector<std::string> positional;
    std::map<std::string, std::string> flags;
    if (!parse_flags(argc, argv, 2, positional, flags, {}, {"socket", "export", "depth", "mib"}) ||
        !positional.empty() || flags["socket"].empty() || flags["depth"].empty() || flags["mib"].empty())
      return usage("nbd-write takes --socket PATH [--export NAME] --depth QD --mib N");
    const NbdWriteResult r = nbd_deep_write(flags["socket"], flags["export"], std::stoi(flags["depth"]), 128 * 1024,
                                            std::stoull(flags["mib"]) << 20);
    std::printf("%llu bytes in %.3f s: %.1f MB/s; latency min/p50/mean/max %.1f/%.1f/%.1f/%.1f ms\n",
                static_cast<unsigned long long>(r.bytes), r.seconds, static_cast<double>(r.bytes) / 1e6 / r.seconds,
                r.latency_min_ms, r.latency_p50_ms, r.latency_mean_ms, r.latency_max_ms);
    return 0;
  }
  if (command == "rows") {
    for (const Row& r : rows()) std::printf("%.*s\n", static_cast<int>(r.name.size()), r.name.data());
    return 0;
  }
  if (command == "-h" || command == "--help") return usage(nullptr), 0;
  return usage(("unknown command " + std::string(command)).c_str());
}

}  // namespace
}  // namespace ferry::bench

int main(int argc, char** argv) {
  try {
    return ferry::bench::run(argc, argv);
  } catch (const ferry::bench::Unavailable& e) {
    std::fprintf(stderr, "ferry_bench: unavailable: %s\n", e.what());
    return ferry::bench::exit_unavailable;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry_bench: error: %s\n", e.what());
    return ferry::bench::exit_failure;
  }
}
