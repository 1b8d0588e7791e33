/* Built against an unpacked libferry-dev with find_package(ferry) and run
 * against libferry.so.0 from the unpacked libferry0 package: connects
 * through the C API and lists the pools.
 *   consumer_c URI */
#include <stdio.h>

#include "client/ferry.h"

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s URI\n", argv[0]);
    return 2;
  }
  ferry_session *s = ferry_connect(argv[1], NULL);
  if (!s) {
    fprintf(stderr, "consumer_c: %s\n", ferry_error_message());
    return 1;
  }
  ferry_pool_info *pools = NULL;
  size_t count = 0;
  if (ferry_pool_list(s, &pools, &count) != 0) {
    fprintf(stderr, "consumer_c: %s\n", ferry_error_message());
    ferry_close(s);
    return 1;
  }
  for (size_t i = 0; i < count; ++i) printf("pool %s (C API)\n", pools[i].name);
  ferry_free(pools);
  ferry_close(s);
  return count > 0 ? 0 : 1;
}
