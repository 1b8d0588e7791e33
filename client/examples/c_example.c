/* libferry from C: create a volume, upload a file into it with progress,
 * read it back through a download stream, follow the events, clean up.
 *
 *   c_example URI FILE      e.g. c_example ferry+unix:///run/ferry/ferryd.sock disk.raw
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "client/ferry.h"

static int fail(const char *what) {
  fprintf(stderr, "%s: %s (%s)\n", what, ferry_error_message(), ferry_code_name(ferry_error_code()));
  return 1;
}

static void on_progress(const ferry_progress *p, void *user) {
  (void)user;
  if (p->finished) fprintf(stderr, "uploaded %llu bytes in %.2f s\n", (unsigned long long)p->done, p->seconds);
}

static int events_seen;
static void on_event(const ferry_event *e, void *user) {
  (void)user;
  printf("event %d on %s/%s: %s\n", e->kind, e->pool, e->name, e->detail);
  __atomic_add_fetch(&events_seen, 1, __ATOMIC_SEQ_CST);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s URI FILE\n", argv[0]);
    return 2;
  }
  struct stat st;
  if (stat(argv[2], &st) != 0 || st.st_size == 0) {
    fprintf(stderr, "%s: not a non-empty file\n", argv[2]);
    return 2;
  }
  ferry_session *s = ferry_connect(argv[1], NULL);
  if (!s) return fail("connect");
  if (ferry_subscribe(s, "default", on_event, NULL) != 0) return fail("subscribe");

  const char *vol = "c-example";
  if (ferry_vol_create(s, "default", vol, (uint64_t)st.st_size, NULL) != 0) return fail("vol-create");
  ferry_transfer_result r;
  if (ferry_upload_file(s, "default", vol, argv[2], 0, -1, 0, on_progress, NULL, &r) != 0) return fail("upload");

  ferry_volume_info info;
  if (ferry_vol_info(s, "default", vol, &info) != 0) return fail("vol-info");
  printf("%s/%s: capacity %llu, allocation %llu\n", info.pool, info.name, (unsigned long long)info.capacity,
         (unsigned long long)info.allocation);

  /* Read it back piece by piece and compare with the file. */
  FILE *f = fopen(argv[2], "rb");
  ferry_download *d = ferry_download_open(s, "default", vol, 0, -1, 0);
  if (!f || !d) return fail("download");
  static unsigned char got[65536], want[65536];
  uint64_t total = 0, len = 0;
  int kind, same = 1;
  while ((kind = ferry_download_read(d, got, sizeof got, &len)) > 0) {
    if (kind == FERRY_ITEM_HOLE) memset(got, 0, sizeof got);
    for (uint64_t done = 0; done < len;) {
      size_t n = len - done < sizeof want ? (size_t)(len - done) : sizeof want;
      if (fread(want, 1, n, f) != n || memcmp(want, kind == FERRY_ITEM_HOLE ? got : got + done, n) != 0) same = 0;
      done += n;
    }
    total += len;
  }
  if (kind < 0) return fail("download read");
  if (ferry_download_finish(d, &r) != 0) return fail("download finish");
  fclose(f);
  printf("downloaded %llu bytes (%llu data, %llu holes): %s\n", (unsigned long long)total,
         (unsigned long long)r.data_bytes, (unsigned long long)r.hole_bytes, same ? "identical" : "DIFFERENT");

  /* Errors carry a code and a message. */
  if (ferry_vol_info(s, "default", "no-such-volume", &info) == 0 || ferry_error_code() != FERRY_NOT_FOUND) {
    fprintf(stderr, "expected NOT_FOUND\n");
    return 1;
  }
  printf("missing volume: %s: %s\n", ferry_code_name(ferry_error_code()), ferry_error_message());

  if (ferry_vol_delete(s, "default", vol) != 0) return fail("vol-delete");
  for (int i = 0; i < 200 && __atomic_load_n(&events_seen, __ATOMIC_SEQ_CST) < 3; ++i) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  ferry_close(s);
  printf("events: %d\n", events_seen);
  return same && total == (uint64_t)st.st_size && events_seen >= 3 ? 0 : 1;
}
