#include "worker/metrics_http.h"

#include <netdb.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "common/log.h"
#include "common/metrics.h"

/* A scrape is small and quick; a few at once is plenty, and bounds the cost. */
#define MAX_CONNECTIONS 8
#define CONNECTION_TIMEOUT_S 10

struct metrics_http {
	struct MHD_Daemon *daemon;
	int fd;
	metrics_refresh_fn *refresh;
	void *arg;
};

static const char content_type[] = "text/plain; version=0.0.4; charset=utf-8";
static const char not_found[] = "not found: metrics are at /metrics\n";

static void
mhd_log(void *cls, const char *fmt, va_list ap)
{
	char msg[512];
	size_t n;

	(void)cls;
	vsnprintf(msg, sizeof(msg), fmt, ap);
	n = strlen(msg);
	while (n > 0 && msg[n - 1] == '\n')
		msg[--n] = '\0';
	log_warnx("metrics endpoint: %s", msg);
}

static enum MHD_Result
answer(struct MHD_Connection *conn, unsigned status, struct MHD_Response *resp)
{
	enum MHD_Result r;

	if (resp == NULL)
		return MHD_NO;          /* out of memory: MHD closes the connection */
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
	r = MHD_queue_response(conn, status, resp);
	MHD_destroy_response(resp);
	return r;
}

static enum MHD_Result
on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
    const char *version, const char *upload_data, size_t *upload_data_size, void **req_cls)
{
	metrics_http *mh = cls;
	char *text = NULL;
	size_t len = 0;

	(void)version;
	(void)upload_data;
	(void)req_cls;
	if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
		return answer(conn, MHD_HTTP_METHOD_NOT_ALLOWED, MHD_create_response_from_buffer(
		    0, NULL, MHD_RESPMEM_PERSISTENT));
	if (*upload_data_size != 0)
		return MHD_NO;
	if (strcmp(url, "/metrics") != 0)
		return answer(conn, MHD_HTTP_NOT_FOUND, MHD_create_response_from_buffer(
		    sizeof(not_found) - 1, (void *)(uintptr_t)not_found, MHD_RESPMEM_PERSISTENT));
	if (mh->refresh != NULL)
		mh->refresh(mh->arg);
	if (metrics_render(&text, &len) == -1)
		return MHD_NO;
	return answer(conn, MHD_HTTP_OK,
	    MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE));
}

/* Splits "host:port" / "[v6]:port" and resolves it to the first address. */
static int
resolve(const char *listen, struct addrinfo **ret, char *err, size_t errlen)
{
	struct addrinfo hints;
	char host[256];
	const char *colon = strrchr(listen, ':');
	const char *h = listen;
	size_t hlen;
	int rc;

	if (colon == NULL || colon == listen || colon[1] == '\0') {
		snprintf(err, errlen, "\"%s\" is not HOST:PORT", listen);
		return -1;
	}
	hlen = (size_t)(colon - listen);
	if (h[0] == '[' && hlen >= 2 && h[hlen - 1] == ']') {
		h++;
		hlen -= 2;
	}
	if (hlen == 0 || hlen >= sizeof(host)) {
		snprintf(err, errlen, "\"%s\" is not HOST:PORT", listen);
		return -1;
	}
	memcpy(host, h, hlen);
	host[hlen] = '\0';
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
	if ((rc = getaddrinfo(host, colon + 1, &hints, ret)) != 0) {
		snprintf(err, errlen, "could not resolve \"%s\": %s", listen, gai_strerror(rc));
		return -1;
	}
	return 0;
}

int
metrics_http_start(const char *listen, metrics_refresh_fn *refresh, void *arg,
    metrics_http **ret, char *err, size_t errlen)
{
	metrics_http *mh = NULL;
	struct addrinfo *ai = NULL;
	const union MHD_DaemonInfo *info;
	unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
	int status = -1;

	if (resolve(listen, &ai, err, errlen) == -1)
		goto out;
	if ((mh = calloc(1, sizeof(*mh))) == NULL) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	mh->refresh = refresh;
	mh->arg = arg;
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	/*
	 * Port 0 here: the address below carries the port.  The logger goes
	 * first: libmicrohttpd applies options in order and warns, on its
	 * default logger, about a logger set after any other option.
	 */
	mh->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, mh,
	    MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
	    MHD_OPTION_SOCK_ADDR, ai->ai_addr,
	    MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNECTIONS,
	    MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CONNECTION_TIMEOUT_S,
	    MHD_OPTION_END);
	if (mh->daemon == NULL) {
		snprintf(err, errlen, "could not listen on \"%s\" (address in use or not "
		    "available; see the message above)", listen);
		goto out;
	}
	info = MHD_get_daemon_info(mh->daemon, MHD_DAEMON_INFO_EPOLL_FD);
	if (info == NULL || info->epoll_fd < 0) {
		snprintf(err, errlen, "libmicrohttpd gave no epoll descriptor");
		goto out;
	}
	mh->fd = info->epoll_fd;
	*ret = mh;
	mh = NULL;
	status = 0;
out:
	metrics_http_stop(mh);
	if (ai != NULL)
		freeaddrinfo(ai);
	return status;
}

void
metrics_http_stop(metrics_http *mh)
{
	if (mh == NULL)
		return;
	if (mh->daemon != NULL)
		MHD_stop_daemon(mh->daemon);
	free(mh);
}

int
metrics_http_fd(const metrics_http *mh)
{
	return mh->fd;
}

int
metrics_http_wait_ms(metrics_http *mh)
{
	MHD_UNSIGNED_LONG_LONG t;

	if (MHD_get_timeout(mh->daemon, &t) != MHD_YES)
		return -1;
	return t > 60000 ? 60000 : (int)t;
}

void
metrics_http_run(metrics_http *mh)
{
	(void)MHD_run(mh->daemon);
}
