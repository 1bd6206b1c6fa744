#ifndef BW_METRICS_HTTP_H
#define BW_METRICS_HTTP_H

#include <stddef.h>

/*
 * The metrics endpoint: GET /metrics answers common/metrics' text, served
 * by libmicrohttpd driven from the worker's own loop (no thread of its
 * own).  The loop polls metrics_http_fd() with its other descriptors, never
 * sleeps longer than metrics_http_wait_ms(), and calls metrics_http_run()
 * after every wait.  Only this module includes <microhttpd.h>.
 */
typedef struct metrics_http metrics_http;

/*
 * Called before each scrape is rendered, so the caller can refresh the
 * gauges that cost a query (it decides how often that really happens).
 */
typedef void metrics_refresh_fn(void *arg);

/*
 * Listens on LISTEN ("127.0.0.1:9187", "[::1]:9187", "localhost:9187").
 * REFRESH may be NULL; ARG is passed to it and must outlive the server.
 * Returns -1 with a message in ERR when the address is bad or taken.
 */
int metrics_http_start(const char *listen, metrics_refresh_fn *refresh, void *arg,
    metrics_http **ret, char *err, size_t errlen) __attribute__((warn_unused_result));
/* Closes the socket and every connection; accepts NULL. */
void metrics_http_stop(metrics_http *mh);

/* The descriptor to poll for input (an epoll set of the server's sockets). */
int metrics_http_fd(const metrics_http *mh);
/* The longest the caller may wait before metrics_http_run(); -1: no limit. */
int metrics_http_wait_ms(metrics_http *mh);
/* Accepts, reads and answers whatever is ready; never blocks. */
void metrics_http_run(metrics_http *mh);

#endif
