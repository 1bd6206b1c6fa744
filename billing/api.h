#ifndef BW_API_H
#define BW_API_H

#include <stddef.h>

#include "billing/response.h"
#include "common/item.h"

/*
 * The billing API client: many calls in flight on one thread, driven by
 * libcurl's multi interface, connections kept alive and reused.  The caller
 * starts calls with a tag of its own, waits with api_wait() (which also
 * watches the caller's descriptors, so this is the process's one poll), and
 * collects finished calls with api_next_result().
 */
typedef struct api_client api_client;

struct api_options {
	const char *base_url;       /* copied */
	const char *token;          /* copied into the Authorization header; never logged */
	long timeout_ms;
	long connect_timeout_ms;
	int max_connections;        /* to the API host; calls beyond wait for one */
	const char *ca_file;        /* copied; NULL or "" = the system CA store */
};

/*
 * Creates the client.  https:// peers are always verified, certificate and
 * host name, against O->ca_file or the system store; a ca_file that cannot
 * be read fails here, at start, rather than on every call.
 */
int api_client_new(const struct api_options *o, api_client **ret, char *err, size_t errlen)
	__attribute__((warn_unused_result));
void api_client_free(api_client *api);

/*
 * Connects to BASE_URL's host as a call would (TCP, then for https the TLS
 * handshake, verified against CA_FILE or the system store) and hangs up
 * without sending a request: no token is needed or sent.  Returns 0 with
 * what answered in WHAT, or -1 with libcurl's reason in ERR.  Blocks for up
 * to CONNECT_TIMEOUT_MS: for "check-config --connect", never the loop.
 */
int api_probe(const char *base_url, const char *ca_file, long connect_timeout_ms,
    char *what, size_t whatlen, char *err, size_t errlen)
	__attribute__((warn_unused_result));

/*
 * Replaces the bearer token for calls started from now on (SIGHUP, after a
 * rotation).  TOKEN is copied.  Returns -1 without memory; the old token
 * stays.
 */
int api_client_set_token(api_client *api, const char *token)
	__attribute__((warn_unused_result));

/* Applies to calls started from now on (SIGHUP). */
void api_client_set_limits(api_client *api, long timeout_ms, long connect_timeout_ms,
    int max_connections);

/*
 * Starts the call for IT (POST /v1/charges or /v1/redemptions with its
 * idempotency key).  IT is only read during this call.  Returns -1 when the
 * call could not be started (out of memory); the item was not sent.
 */
int api_start(api_client *api, const struct item *it, int tag)
	__attribute__((warn_unused_result));

struct api_waitfd {
	int fd;
	short events;               /* POLLIN ... */
	short revents;
};

/*
 * Sends the requests of the calls started since the last wait (libcurl's
 * timer of 0 ms), so nothing the caller does before its wait holds them
 * back.  Returns true when one of them has ended already (a refused
 * connect, an answer read at once): the wait should not sleep.
 */
bool api_send_started(api_client *api);

/*
 * Waits up to TIMEOUT_MS for progress on the calls or readiness of one of
 * the EXTRA descriptors, then advances the transfers.
 */
int api_wait(api_client *api, struct api_waitfd *extra, unsigned nextra, int timeout_ms);

/*
 * Takes one finished call: returns 1 and fills *TAG, *V, *LATENCY_MS and
 * *HTTP_STATUS (0 if none); returns 0 when no call has finished.
 */
int api_next_result(api_client *api, int *tag, struct api_verdict *v,
    double *latency_ms, long *http_status);

/* Stops the call started with TAG, if still running; its result never comes. */
void api_abort(api_client *api, int tag);

int api_in_flight(const api_client *api);

#endif
