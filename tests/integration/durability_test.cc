// Durability across SIGKILL: ferryd is killed in a loop while uploads (in
// place and atomic) and NBD writes (FUA, and plain writes followed by
// FLUSH) run against it, then restarted on the same pool. After every
// restart each 4 KiB page of both volumes must hold a whole page some
// writer wrote (never garbage), at least as new as the last write the
// daemon acknowledged as durable, and an atomic upload must show either
// all of its pages or none. Left-over upload temporaries must be gone and
// the volumes writable again (no stale lock).
//
// What a SIGKILL can and cannot show: the page cache survives the process,
// so this checks that no acknowledgement goes out before the daemon has
// handed the bytes to the kernel and synced them, and that a torn upload or
// NBD write never leaves anything but old or new pages. Losing the page
// cache itself (power loss) is beyond what a test process can cause.
#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <libnbd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "client/session.h"
#include "tests/integration/ferryd_process.h"

namespace ferry::testing {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

constexpr std::size_t kPage = 4096;
constexpr std::size_t kPages = 2048;  // 8 MiB volumes
constexpr std::uint64_t kMagic = 0x46455252595047ull;  // "FERRYPG"

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// One page as written by generation `gen` of volume `tag`: a header that
// names it, then words derived from the header, so any torn or foreign
// content fails to decode.
void fill_page(std::uint8_t* out, std::uint64_t tag, std::uint64_t page, std::uint64_t gen) {
  std::uint64_t words[kPage / 8];
  words[0] = kMagic;
  words[1] = tag;
  words[2] = page;
  words[3] = gen;
  for (std::size_t i = 4; i < kPage / 8; ++i) words[i] = mix((tag << 56) ^ (page << 32) ^ (gen << 8) ^ i);
  std::memcpy(out, words, kPage);
}

// The generation a page holds, or nothing if it is not a whole page of
// `tag` at `page`.
std::optional<std::uint64_t> decode_page(const std::uint8_t* in, std::uint64_t tag, std::uint64_t page) {
  std::uint64_t words[4];
  std::memcpy(words, in, sizeof words);
  if (words[0] != kMagic || words[1] != tag || words[2] != page) return std::nullopt;
  std::uint8_t expected[kPage];
  fill_page(expected, tag, page, words[3]);
  if (std::memcmp(expected, in, kPage) != 0) return std::nullopt;
  return words[3];
}

// What each page of one volume may hold: a generation in [acked, issued].
// Generations only grow, across rounds too.
struct Model {
  std::uint64_t tag;
  std::vector<std::uint64_t> acked = std::vector<std::uint64_t>(kPages, 1);
  std::vector<std::uint64_t> issued = std::vector<std::uint64_t>(kPages, 1);
  std::uint64_t next_gen = 2;
  std::uint64_t atomic_in_flight = 0;  // generation of an unanswered atomic upload

  void issue(std::size_t first, std::size_t count, std::uint64_t gen) {
    for (std::size_t p = first; p < first + count; ++p) issued[p] = gen;
  }
  void ack(std::size_t first, std::size_t count, std::uint64_t gen) {
    for (std::size_t p = first; p < first + count; ++p) acked[p] = std::max(acked[p], gen);
  }
};

struct Verified {
  std::uint64_t pages = 0;
  std::uint64_t newer_than_acked = 0;  // pages holding an unacknowledged write
  int atomic_interrupted = 0;          // an atomic upload was cut off: 1
  int atomic_landed = 0;               // ... and its rename had happened: 1
};

// Checks the volume file against the model; after it, the model's floor is
// what the file holds (a write that did land counts from now on).
Verified verify(const std::string& path, Model& m) {
  Verified v;
  std::ifstream in(path, std::ios::binary);
  std::vector<std::uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(data.size(), kPages * kPage) << path;
  if (data.size() != kPages * kPage) return v;
  std::vector<std::uint64_t> held(kPages);
  for (std::size_t p = 0; p < kPages; ++p) {
    auto gen = decode_page(data.data() + p * kPage, m.tag, p);
    EXPECT_TRUE(gen.has_value()) << path << ": page " << p << " is garbage";
    if (!gen) return v;
    EXPECT_GE(*gen, m.acked[p]) << path << ": page " << p << " lost an acknowledged write";
    EXPECT_LE(*gen, m.issued[p]) << path << ": page " << p << " holds a generation never written there";
    held[p] = *gen;
    ++v.pages;
    if (*gen > m.acked[p]) ++v.newer_than_acked;
  }
  if (m.atomic_in_flight) {
    const auto whole = std::count(held.begin(), held.end(), m.atomic_in_flight);
    EXPECT_TRUE(whole == 0 || whole == static_cast<long>(kPages))
        << path << ": an interrupted atomic upload shows in " << whole << " of " << kPages << " pages";
    v.atomic_interrupted = 1;
    v.atomic_landed = whole != 0;
    m.atomic_in_flight = 0;
  }
  for (std::size_t p = 0; p < kPages; ++p) m.acked[p] = m.issued[p] = held[p];
  return v;
}

std::vector<std::uint8_t> pages_of(const Model& m, std::size_t first, std::size_t count, std::uint64_t gen) {
  std::vector<std::uint8_t> buf(count * kPage);
  for (std::size_t i = 0; i < count; ++i) fill_page(buf.data() + i * kPage, m.tag, first + i, gen);
  return buf;
}

// Uploads until the daemon dies: ranges in place, and every third one the
// whole volume atomically. Returns the uploads the daemon answered.
std::uint64_t upload_until_dead(const std::string& uri, Model& m, std::mt19937_64& rng) {
  std::uint64_t answered = 0;
  try {
    auto session = Session::connect(uri);
    for (std::uint64_t n = 0;; ++n) {
      const bool atomic = n % 3 == 2;
      const std::size_t first = atomic ? 0 : rng() % kPages;
      const std::size_t count = atomic ? kPages : 1 + rng() % (kPages - first);
      const std::uint64_t gen = m.next_gen++;
      v1::VolUploadCall call;
      call.mutable_volume()->set_pool("default");
      call.mutable_volume()->set_name("up.img");
      call.set_offset(first * kPage);
      call.set_length(count * kPage);
      call.set_atomic(atomic);
      call.set_keep_capacity(atomic);
      m.issue(first, count, gen);
      if (atomic) m.atomic_in_flight = gen;
      auto up = session.open_upload(call);
      for (std::size_t done = 0; done < count;) {
        const std::size_t batch = std::min<std::size_t>(64, count - done);
        up.write(pages_of(m, first + done, batch, gen));
        done += batch;
      }
      up.finish();
      m.ack(first, count, gen);
      m.atomic_in_flight = 0;
      ++answered;
    }
  } catch (const std::exception&) {
    // The daemon was killed; whatever was unanswered stays "issued".
  }
  return answered;
}

// NBD writes until the daemon dies: FUA writes, and plain writes made
// durable by a FLUSH every fourth request. Returns the requests answered.
std::uint64_t nbd_until_dead(const std::string& socket, Model& m, std::mt19937_64& rng) {
  std::unique_ptr<nbd_handle, decltype(&nbd_close)> h(nbd_create(), &nbd_close);
  if (!h || nbd_set_export_name(h.get(), "default/nbd.img") == -1 ||
      nbd_connect_unix(h.get(), socket.c_str()) == -1) {
    ADD_FAILURE() << "NBD connect to " << socket << ": " << nbd_get_error();
    return 0;
  }
  EXPECT_EQ(nbd_can_fua(h.get()), 1);
  EXPECT_EQ(nbd_can_flush(h.get()), 1);
  struct Written {
    std::size_t first, count;
    std::uint64_t gen;
  };
  std::vector<Written> unflushed;
  std::uint64_t answered = 0;
  for (std::uint64_t n = 0;; ++n) {
    if (n % 4 == 3) {
      if (nbd_flush(h.get(), 0) == -1) break;
      for (const auto& w : unflushed) m.ack(w.first, w.count, w.gen);
      unflushed.clear();
    } else {
      const bool fua = n % 2 == 0;
      const std::size_t first = rng() % kPages;
      const std::size_t count = 1 + rng() % std::min<std::size_t>(64, kPages - first);
      const std::uint64_t gen = m.next_gen++;
      m.issue(first, count, gen);
      const auto buf = pages_of(m, first, count, gen);
      if (nbd_pwrite(h.get(), buf.data(), buf.size(), first * kPage, fua ? LIBNBD_CMD_FLAG_FUA : 0) == -1) break;
      if (fua)
        m.ack(first, count, gen);
      else
        unflushed.push_back({first, count, gen});
    }
    ++answered;
  }
  return answered;
}

TEST(Durability, KillLoopDuringUploadsAndNbdWritesLosesNothingAcknowledged) {
  const char* env = std::getenv("FERRY_KILL_ROUNDS");
  const int rounds = env ? std::atoi(env) : 12;
  TempDir dir;
  const std::string pool = dir.path() + "/pool";
  const std::string nbd_socket = dir.path() + "/nbd.sock";
  fs::create_directories(pool);
  Model up{0x75}, nbd{0x6e};
  for (auto* m : {&up, &nbd}) {
    std::ofstream out(pool + (m == &up ? "/up.img" : "/nbd.img"), std::ios::binary);
    const auto all = pages_of(*m, 0, kPages, 1);
    out.write(reinterpret_cast<const char*>(all.data()), static_cast<std::streamsize>(all.size()));
  }
  std::mt19937_64 rng(20261203);
  std::uint64_t uploads = 0, nbd_requests = 0, pages_verified = 0, pages_unacked = 0;
  int atomic_interrupted = 0, atomic_landed = 0;
  for (int round = 0; round < rounds; ++round) {
    auto daemon = std::make_unique<FerrydProcess>(
        std::vector<std::string>{"--pool", "default=" + pool, "--nbd-listen", "unix:" + nbd_socket});
    for (const auto& entry : fs::directory_iterator(pool))
      EXPECT_EQ(entry.path().filename().string().rfind(".ferry-upload.", 0), std::string::npos)
          << "round " << round << ": " << entry.path() << " survived the restart";
    std::mt19937_64 up_rng(rng()), nbd_rng(rng());
    std::uint64_t round_uploads = 0, round_nbd = 0;
    std::thread uploader([&] { round_uploads = upload_until_dead(daemon->unix_uri(), up, up_rng); });
    std::thread nbd_writer([&] { round_nbd = nbd_until_dead(nbd_socket, nbd, nbd_rng); });
    std::this_thread::sleep_for(std::chrono::milliseconds(150 + rng() % 600));
    daemon.reset();  // SIGKILL, then reaped
    uploader.join();
    nbd_writer.join();
    uploads += round_uploads;
    nbd_requests += round_nbd;
    for (auto* m : {&up, &nbd}) {
      const Verified v = verify(pool + (m == &up ? "/up.img" : "/nbd.img"), *m);
      pages_verified += v.pages;
      pages_unacked += v.newer_than_acked;
      atomic_interrupted += v.atomic_interrupted;
      atomic_landed += v.atomic_landed;
    }
    if (HasFailure()) {
      ADD_FAILURE() << "stopped at round " << round;
      return;
    }
  }
  // The last restart: the volumes take a new upload and NBD write at once.
  FerrydProcess daemon({"--pool", "default=" + pool, "--nbd-listen", "unix:" + nbd_socket});
  auto session = Session::connect(daemon.unix_uri());
  v1::VolUploadCall call;
  call.mutable_volume()->set_pool("default");
  call.mutable_volume()->set_name("up.img");
  call.set_length(kPage);
  const std::uint64_t gen = up.next_gen++;
  auto upload = session.open_upload(call);
  upload.write(pages_of(up, 0, 1, gen));
  EXPECT_NO_THROW(upload.finish());
  std::unique_ptr<nbd_handle, decltype(&nbd_close)> h(nbd_create(), &nbd_close);
  ASSERT_NE(nbd_set_export_name(h.get(), "default/nbd.img"), -1);
  ASSERT_NE(nbd_connect_unix(h.get(), nbd_socket.c_str()), -1) << nbd_get_error();
  const auto page = pages_of(nbd, 0, 1, nbd.next_gen++);
  EXPECT_NE(nbd_pwrite(h.get(), page.data(), page.size(), 0, LIBNBD_CMD_FLAG_FUA), -1) << nbd_get_error();
  EXPECT_GT(uploads, 0u);
  EXPECT_GT(nbd_requests, 0u);
  std::printf("kill loop: %d rounds, %llu uploads and %llu NBD requests answered, %llu pages (%.1f MiB) verified, "
              "%llu of them holding unacknowledged writes; %d atomic uploads cut off (%d had renamed, %d left the old "
              "volume)\n",
              rounds, static_cast<unsigned long long>(uploads), static_cast<unsigned long long>(nbd_requests),
              static_cast<unsigned long long>(pages_verified), static_cast<double>(pages_verified * kPage) / (1 << 20),
              static_cast<unsigned long long>(pages_unacked), atomic_interrupted, atomic_landed,
              atomic_interrupted - atomic_landed);
}

}  // namespace
}  // namespace ferry::testing
