/* The C API's reconnect policy, driven by reconnect_test.cc (Reconnect.CApi):
 * connect with reconnecting on, read a volume's info, wait until the test
 * has killed the daemon (it creates GO_FILE), read it again (that call waits
 * for the restarted daemon), print the reconnect counters.
 *
 *   c_reconnect URI GO_FILE
 */
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>

#include "client/ferry.h"

static int fail(const char *what) {
  fprintf(stderr, "%s: %s (%s)\n", what, ferry_error_message(), ferry_code_name(ferry_error_code()));
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: c_reconnect URI GO_FILE\n");
    return 2;
  }
  ferry_reconnect_options reconnect;
  ferry_reconnect_options_init(&reconnect);
  reconnect.initial_backoff_ms = 50;
  reconnect.give_up_after_ms = 20000;
  ferry_session *s = ferry_connect_reconnecting(argv[1], NULL, &reconnect);
  if (!s) return fail("connect");
  ferry_volume_info info;
  if (ferry_vol_info(s, "default", "v", &info) != 0) return fail("first vol_info");
  printf("first call done\n");
  fflush(stdout);
  struct stat st;
  const struct timespec tick = {0, 10 * 1000 * 1000};
  for (int i = 0; stat(argv[2], &st) != 0; ++i) {
    if (i > 3000) {
      fprintf(stderr, "no %s after 30 s\n", argv[2]);
      return 1;
    }
    nanosleep(&tick, NULL);
  }
  if (ferry_vol_info(s, "default", "v", &info) != 0) return fail("second vol_info");
  ferry_reconnect_stats stats;
  if (ferry_get_reconnect_stats(s, &stats) != 0) return fail("stats");
  printf("capacity %llu\nreconnects %llu\nattempts %llu\n", (unsigned long long)info.capacity,
         (unsigned long long)stats.reconnects, (unsigned long long)stats.attempts);
  ferry_close(s);
  return stats.reconnects == 1 ? 0 : 1;
}
