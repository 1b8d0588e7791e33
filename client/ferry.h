/* libferry's C API: connect to a ferryd, call the volume procedures, move
 * files, run upload and download streams, follow volume events. For tools
 * written in C or in languages that bind C (docs/libferry.md).
 *
 * Conventions
 *  - Functions returning int give 0 on success and -1 on failure; those
 *    returning a pointer give NULL on failure. The failure's details are
 *    then in this thread's last error: ferry_error_code() (a FERRY_* code,
 *    the same numbers as gRPC's), ferry_error_message(),
 *    ferry_error_retryable().
 *  - A session may be used from several threads; a stream by one thread
 *    at a time. Calls block the calling thread.
 *  - Arrays handed out (pool and volume lists) are freed with ferry_free().
 *  - Callbacks (progress, events) run on a libferry thread: keep them short
 *    and do not call back into the same session from an event callback.
 */
#ifndef FERRY_H
#define FERRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes (ferry.v1.Code). */
enum {
  FERRY_OK = 0,
  FERRY_CANCELLED = 1,
  FERRY_UNKNOWN = 2,
  FERRY_INVALID_ARGUMENT = 3,
  FERRY_DEADLINE_EXCEEDED = 4,
  FERRY_NOT_FOUND = 5,
  FERRY_ALREADY_EXISTS = 6,
  FERRY_PERMISSION_DENIED = 7,
  FERRY_RESOURCE_EXHAUSTED = 8,
  FERRY_FAILED_PRECONDITION = 9,
  FERRY_ABORTED = 10,
  FERRY_OUT_OF_RANGE = 11,
  FERRY_UNIMPLEMENTED = 12,
  FERRY_INTERNAL = 13,
  FERRY_UNAVAILABLE = 14,
  FERRY_DATA_LOSS = 15,
  FERRY_UNAUTHENTICATED = 16
};

int ferry_error_code(void);
const char *ferry_error_message(void);
int ferry_error_retryable(void);
const char *ferry_code_name(int code);

typedef struct ferry_session ferry_session;
typedef struct ferry_upload ferry_upload;
typedef struct ferry_download ferry_download;

/* Credentials; any field may be NULL. */
typedef struct ferry_connect_options {
  const char *tls_ca;          /* PEM CAs for the server's certificate (default: system) */
  const char *tls_cert;        /* client certificate */
  const char *tls_key;         /* its key */
  const char *tls_server_name; /* name the server certificate must carry */
  const char *sasl_user;
  const char *sasl_password;
  const char *client_name;     /* shown in the daemon's logs */
} ferry_connect_options;

/* uri: ferry+unix:///path, ferry+tcp://host:port, ferry+tls://host:port. */
ferry_session *ferry_connect(const char *uri, const ferry_connect_options *options);
void ferry_close(ferry_session *session);

/* Reconnecting after a lost connection (docs/libferry.md, "Reconnecting"):
 * the session connects again to the same address with the same
 * credentials, with exponential backoff and jitter. Calls in flight are
 * sent again only if they are safe to repeat (pool_list, vol_list,
 * vol_info); others fail with FERRY_UNAVAILABLE. Calls made meanwhile wait.
 * A download_file cut by the loss resumes where it was; an event
 * subscription is made again. */
typedef struct ferry_reconnect_options {
  int enabled;                 /* 0: off (as with ferry_connect) */
  uint32_t initial_backoff_ms; /* delay after the first failed attempt */
  uint32_t max_backoff_ms;
  double multiplier;           /* backoff growth per attempt */
  double jitter;               /* each delay is backoff * (1 +- jitter) */
  uint32_t max_attempts;       /* 0: until give_up_after_ms */
  uint32_t give_up_after_ms;   /* since the loss; then everything waiting fails */
} ferry_reconnect_options;
/* Fills in the defaults, enabled: 100 ms doubling up to 10 s, 20% jitter,
 * giving up after 60 s. */
void ferry_reconnect_options_init(ferry_reconnect_options *reconnect);
/* ferry_connect with a reconnect policy; reconnect may be NULL (off). */
ferry_session *ferry_connect_reconnecting(const char *uri, const ferry_connect_options *options,
                                          const ferry_reconnect_options *reconnect);

/* What reconnecting has done so far on a session. */
typedef struct ferry_reconnect_stats {
  uint64_t connections_lost;
  uint64_t attempts;        /* connect attempts, failed and successful */
  uint64_t reconnects;
  uint64_t calls_replayed;  /* calls sent again on a new connection */
  uint64_t calls_failed_not_idempotent;
  uint64_t streams_failed;
  uint64_t gave_up;
} ferry_reconnect_stats;
int ferry_get_reconnect_stats(ferry_session *s, ferry_reconnect_stats *out);

typedef struct ferry_pool_info {
  char name[256];
  char path[4096];
  int read_only;
  uint32_t volumes;
  uint64_t allocation, capacity, available;
} ferry_pool_info;

typedef struct ferry_volume_info {
  char pool[256];
  char name[256];
  uint64_t capacity;   /* bytes */
  uint64_t allocation; /* bytes on disk */
  int writing;         /* an upload holds the writer lock */
  uint32_t readers;    /* downloads running */
  int64_t modified_ns;
} ferry_volume_info;

void ferry_free(void *p);

int ferry_pool_list(ferry_session *s, ferry_pool_info **pools, size_t *count);
int ferry_vol_list(ferry_session *s, const char *pool, ferry_volume_info **volumes, size_t *count);
int ferry_vol_info(ferry_session *s, const char *pool, const char *name, ferry_volume_info *out);
/* out may be NULL. */
int ferry_vol_create(ferry_session *s, const char *pool, const char *name, uint64_t capacity, ferry_volume_info *out);
int ferry_vol_delete(ferry_session *s, const char *pool, const char *name);
int ferry_vol_resize(ferry_session *s, const char *pool, const char *name, uint64_t capacity, int allow_shrink,
                     ferry_volume_info *out);

/* Transfer flags. */
enum {
  FERRY_DETECT_ZEROS = 1,  /* send all-zero chunks as holes */
  FERRY_DENSE = 2,         /* every byte as data; holes written out as zeros */
  FERRY_ATOMIC = 4,        /* upload: replace the volume only when complete */
  FERRY_CREATE = 8,        /* upload_file: create the volume if missing */
  FERRY_NO_SYNC = 16       /* upload: do not wait for fdatasync */
};

typedef struct ferry_progress {
  uint64_t done, total, data_bytes, hole_bytes;
  double seconds;
  int finished;
} ferry_progress;
typedef void (*ferry_progress_cb)(const ferry_progress *progress, void *user);

typedef struct ferry_transfer_result {
  uint64_t data_bytes, hole_bytes;
  double seconds;
} ferry_transfer_result;

/* length < 0: all of it. path "-": stdin / stdout. result and progress may be NULL. */
int ferry_upload_file(ferry_session *s, const char *pool, const char *name, const char *path, uint64_t offset,
                      int64_t length, unsigned flags, ferry_progress_cb progress, void *user,
                      ferry_transfer_result *result);
int ferry_download_file(ferry_session *s, const char *pool, const char *name, const char *path, uint64_t offset,
                        int64_t length, unsigned flags, ferry_progress_cb progress, void *user,
                        ferry_transfer_result *result);

/* Streams the caller feeds or drains. length < 0: unknown (upload: up to the
 * capacity; download: to the end). */
ferry_upload *ferry_upload_open(ferry_session *s, const char *pool, const char *name, uint64_t offset, int64_t length,
                                unsigned flags);
int ferry_upload_write(ferry_upload *u, const void *data, size_t size);
int ferry_upload_write_hole(ferry_upload *u, uint64_t length);
/* Ends the stream, waits for the daemon's answer and frees u (even on failure). */
int ferry_upload_finish(ferry_upload *u, ferry_transfer_result *result);
/* Stops the upload (the daemon sees CANCELLED with reason) and frees u. */
void ferry_upload_abort(ferry_upload *u, const char *reason);

enum { FERRY_ITEM_END = 0, FERRY_ITEM_DATA = 1, FERRY_ITEM_HOLE = 2 };
ferry_download *ferry_download_open(ferry_session *s, const char *pool, const char *name, uint64_t offset,
                                    int64_t length, unsigned flags);
/* The next piece: FERRY_ITEM_DATA with *length bytes copied into buf (at most
 * capacity; the rest of a larger chunk comes with the next call),
 * FERRY_ITEM_HOLE with *length bytes of zeros not sent, FERRY_ITEM_END, or -1. */
int ferry_download_read(ferry_download *d, void *buf, size_t capacity, uint64_t *length);
/* After FERRY_ITEM_END: the daemon's answer; frees d (even on failure). */
int ferry_download_finish(ferry_download *d, ferry_transfer_result *result);
void ferry_download_abort(ferry_download *d, const char *reason);

/* Volume events. */
enum { FERRY_EVENT_CREATED = 1, FERRY_EVENT_DELETED = 2, FERRY_EVENT_RESIZED = 3, FERRY_EVENT_WRITTEN = 4 };
typedef struct ferry_event {
  int kind;
  const char *pool;
  const char *name;
  uint64_t capacity;
  const char *detail;
  int64_t time_ns;
} ferry_event;
typedef void (*ferry_event_cb)(const ferry_event *event, void *user);
/* pool NULL or "": every pool. Replaces an earlier subscription. */
int ferry_subscribe(ferry_session *s, const char *pool, ferry_event_cb callback, void *user);

#ifdef __cplusplus
}
#endif

#endif /* FERRY_H */
