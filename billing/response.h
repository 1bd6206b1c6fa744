#ifndef BW_RESPONSE_H
#define BW_RESPONSE_H

#include <stddef.h>

/*
 * What an answer of the billing API means for the item, per CONTRACT
 * section 2.  Pure: it sees what the transport saw, not libcurl itself, so
 * every rule is unit tested without a network.
 */

/* The longest result id we accept; a longer one makes the answer unreadable. */
#define API_ID_MAX 255

enum api_transport {
	API_TRANSPORT_OK,           /* a complete HTTP response arrived */
	API_TRANSPORT_NOT_SENT,     /* refused, unresolvable, connect timeout: nothing sent */
	API_TRANSPORT_LOST,         /* timeout or connection lost once the request may have gone */
	API_TRANSPORT_TOO_LARGE,    /* the body passed the cap and was cut off */
};

enum api_class {
	API_SUCCESS,        /* 2xx with an id: record it */
	API_DECLINED,       /* 402: a business refusal, stored under the key: final */
	API_REFUSED,        /* another 4xx (400 ...), not stored under the key */
	API_KEY_REUSED,     /* 422: the key was used with another body; a bug */
	API_WORKER,         /* 401, 403, 404, 405: the worker's token or URL is wrong */
	API_IN_PROGRESS,    /* 409: another request with the key is running */
	API_TRANSIENT,      /* nothing was done: retry with backoff */
	API_AMBIGUOUS,      /* may have taken effect: retry the same key, never give up */
};

struct api_response {
	enum api_transport transport;
	long status;                /* HTTP status, 0 when none */
	const char *body;           /* not NUL-terminated; may be NULL */
	size_t body_len;
	const char *retry_after;    /* Retry-After header value, or NULL */
	const char *transport_error; /* the transport's message, or NULL */
};

struct api_verdict {
	enum api_class cls;
	char id[API_ID_MAX + 1];    /* API_SUCCESS: the result's id */
	char error[480];            /* why, for last_error and the log */
	int retry_after_s;          /* -1 when the answer did not say */
};

void api_classify(const struct api_response *resp, struct api_verdict *out);

/*
 * Parses a Retry-After value: delta-seconds or an HTTP-date relative to
 * NOW (unix seconds).  Returns seconds from now, capped at a day, or -1 when
 * the value is absent or unreadable.
 */
int api_parse_retry_after(const char *value, long long now);

/*
 * Reads one raw header line of an answer (as libcurl hands it over, with
 * its CRLF, not NUL-terminated, N bytes).  When it is the header NAME
 * (case-insensitive), copies its value, blanks and CRLF trimmed, cut to
 * OUTLEN - 1 bytes, into OUT and returns 1; otherwise returns 0 and leaves
 * OUT alone.  The line comes from the remote server: any bytes at all.
 */
int api_header_value(const char *line, size_t n, const char *name, char *out, size_t outlen);

const char *api_class_name(enum api_class cls);

/*
 * True when an answer of class CLS shows that the request got past the
 * API's authentication and routing (a 2xx, a refusal about the item, a
 * 409): what a worker stopped by a worker-level answer waits for before it
 * takes new items again.  Transport failures, 5xx and 429 prove nothing.
 */
int api_class_admitted(enum api_class cls);

#endif
