#include "billing/api.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "common/clock.h"
#include "common/log.h"

/* An answer larger than this is cut off and treated as ambiguous. */
#define BODY_CAP (64 * 1024)
#define REQUEST_MAX 4096

struct call {
	CURL *easy;
	int tag;
	int active;
	struct curl_slist *headers;  /* built once per token, see call_headers() */
	struct curl_slist *key_header;  /* its last entry, rewritten for each call */
	unsigned headers_token;     /* the token generation they were built with */
	char key[ITEM_KEY_MAX];
	char request[REQUEST_MAX];
	char *body;                 /* reused across calls, grows up to BODY_CAP */
	size_t body_len, body_cap;
	int too_large;
	char retry_after[64];
	char errbuf[CURL_ERROR_SIZE];
};

struct api_client {
	CURLM *multi;
	char *url_charges;
	char *url_redemptions;
	char *auth_header;          /* "Authorization: Bearer ..." */
	unsigned token_generation;  /* bumped by each new token */
	char *ca_file;              /* NULL: the system CA store */
	int https;
	long timeout_ms, connect_timeout_ms;
	struct call **calls;        /* every call ever allocated */
	struct call **idle;         /* those not in flight */
	int ncalls, nidle, cap, in_flight;
	/*
	 * The sockets libcurl asks to be watched (its socket callback), in an
	 * epoll set: a turn costs the kernel and libcurl only the sockets
	 * that are ready, not a scan of every connection.  The caller's few
	 * descriptors are polled beside the epoll descriptor.
	 */
	int epfd;
	struct pollfd *pollset;     /* scratch: the caller's descriptors, then epfd */
	int pollset_cap;
	int64_t timer_at_ms;        /* libcurl's next timeout on clock_ms(); -1: none */
};

static int curl_ready;

static size_t
on_body(char *data, size_t size, size_t nmemb, void *userp)
{
	struct call *c = userp;
	size_t n = size * nmemb, cap;
	char *p;

	if (c->body_len + n > BODY_CAP) {
		c->too_large = 1;
		return 0;           /* aborts the transfer with CURLE_WRITE_ERROR */
	}
	if (c->body_len + n > c->body_cap) {
		cap = c->body_cap ? c->body_cap : 1024;
		while (cap < c->body_len + n)
			cap *= 2;
		if ((p = realloc(c->body, cap)) == NULL)
			return 0;
		c->body = p;
		c->body_cap = cap;
	}
	memcpy(c->body + c->body_len, data, n);
	c->body_len += n;
	return n;
}

static size_t
on_header(char *data, size_t size, size_t nmemb, void *userp)
{
	struct call *c = userp;
	size_t n = size * nmemb;

	api_header_value(data, n, "Retry-After", c->retry_after, sizeof(c->retry_after));
	return n;
}

/*
 * libcurl's socket callback: which of its sockets to watch, for what.  The
 * events a socket is registered with ride in libcurl's per-socket pointer
 * (SOCK_WATCHED set once it is in the set), so an unchanged request costs
 * no system call.
 */
#define SOCK_WATCHED 0x10000

static int
on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	api_client *api = userp;
	intptr_t had = (intptr_t)socketp;
	struct epoll_event ev;

	(void)easy;
	if (what == CURL_POLL_REMOVE) {
		/* Already closed, it left the set by itself: ENOENT/EBADF are fine. */
		if (had != 0)
			epoll_ctl(api->epfd, EPOLL_CTL_DEL, s, NULL);
		return 0;
	}
	memset(&ev, 0, sizeof(ev));
	ev.events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) | ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
	ev.data.fd = s;
	if (had == (intptr_t)(ev.events | SOCK_WATCHED))
		return 0;
	if (epoll_ctl(api->epfd, had != 0 ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s, &ev) == -1 &&
	    (had == 0 || errno != ENOENT || epoll_ctl(api->epfd, EPOLL_CTL_ADD, s, &ev) == -1))
		return -1;          /* libcurl fails the transfer */
	curl_multi_assign(api->multi, s, (void *)(intptr_t)(ev.events | SOCK_WATCHED));
	return 0;
}

/* libcurl's timer callback: when it next wants to be called without I/O. */
static int
on_timer(CURLM *multi, long timeout_ms, void *userp)
{
	api_client *api = userp;

	(void)multi;
	api->timer_at_ms = timeout_ms < 0 ? -1 : clock_ms() + timeout_ms;
	return 0;
}

static char *
join(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	char *p = malloc(la + lb + 1);

	if (p != NULL) {
		memcpy(p, a, la);
		memcpy(p + la, b, lb + 1);
	}
	return p;
}

int
api_client_new(const struct api_options *o, api_client **ret, char *err, size_t errlen)
{
	api_client *api = NULL;
	char base[2048];
	size_t n;

	if (!curl_ready) {
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
			snprintf(err, errlen, "could not initialize libcurl");
			return -1;
		}
		curl_ready = 1;
	}
	snprintf(base, sizeof(base), "%s", o->base_url);
	n = strlen(base);
	while (n > 0 && base[n - 1] == '/')
		base[--n] = '\0';
	if ((api = calloc(1, sizeof(*api))) == NULL)
		goto oom;
	api->epfd = -1;
	api->https = strncmp(base, "https://", 8) == 0;
	if (o->ca_file != NULL && o->ca_file[0] != '\0') {
		FILE *f = fopen(o->ca_file, "re");

		if (f == NULL) {
			snprintf(err, errlen, "could not open billing_api.ca_file \"%s\": %s",
			    o->ca_file, strerror(errno));
			api_client_free(api);
			return -1;
		}
		fclose(f);
		if ((api->ca_file = strdup(o->ca_file)) == NULL)
			goto oom;
	}
	api->url_charges = join(base, "/v1/charges");
	api->url_redemptions = join(base, "/v1/redemptions");
	api->auth_header = join("Authorization: Bearer ", o->token);
	api->multi = curl_multi_init();
	api->timer_at_ms = -1;
	if (api->url_charges == NULL || api->url_redemptions == NULL ||
	    api->auth_header == NULL || api->multi == NULL)
		goto oom;
	if ((api->epfd = epoll_create1(EPOLL_CLOEXEC)) == -1) {
		snprintf(err, errlen, "could not create an epoll descriptor: %s", strerror(errno));
		api_client_free(api);
		return -1;
	}
	curl_multi_setopt(api->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
	curl_multi_setopt(api->multi, CURLMOPT_SOCKETDATA, api);
	curl_multi_setopt(api->multi, CURLMOPT_TIMERFUNCTION, on_timer);
	curl_multi_setopt(api->multi, CURLMOPT_TIMERDATA, api);
	api_client_set_limits(api, o->timeout_ms, o->connect_timeout_ms, o->max_connections);
	*ret = api;
	return 0;
oom:
	snprintf(err, errlen, "out of memory");
	api_client_free(api);
	return -1;
}

int
api_client_set_token(api_client *api, const char *token)
{
	char *header = join("Authorization: Bearer ", token);

	if (header == NULL)
		return -1;
	if (api->auth_header != NULL) {
		explicit_bzero(api->auth_header, strlen(api->auth_header));
		free(api->auth_header);
	}
	api->auth_header = header;
	api->token_generation++;
	return 0;
}

void
api_client_set_limits(api_client *api, long timeout_ms, long connect_timeout_ms,
    int max_connections)
{
	api->timeout_ms = timeout_ms;
	api->connect_timeout_ms = connect_timeout_ms;
	/* One connection per call in flight, all kept alive for the next ones. */
	curl_multi_setopt(api->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)max_connections);
	curl_multi_setopt(api->multi, CURLMOPT_MAXCONNECTS, (long)max_connections);
}

void
api_client_free(api_client *api)
{
	if (api == NULL)
		return;
	for (int i = 0; i < api->ncalls; i++) {
		struct call *c = api->calls[i];

		if (c->easy != NULL) {
			if (c->active)
				curl_multi_remove_handle(api->multi, c->easy);
			curl_easy_cleanup(c->easy);
		}
		curl_slist_free_all(c->headers);
		free(c->body);
		free(c);
	}
	free(api->calls);
	free(api->idle);
	if (api->multi != NULL)
		curl_multi_cleanup(api->multi);
	if (api->epfd != -1)
		close(api->epfd);
	free(api->pollset);
	free(api->url_charges);
	free(api->url_redemptions);
	free(api->ca_file);
	if (api->auth_header != NULL) {
		explicit_bzero(api->auth_header, strlen(api->auth_header));
		free(api->auth_header);
	}
	free(api);
}

/*
 * A free call slot.  Calls are allocated one by one and never move: libcurl
 * keeps pointers into them (request body, error buffer) while in flight.
 * Slots are reused, so steady state allocates nothing per call.
 */
static struct call *
call_slot(api_client *api)
{
	struct call **p, *c;
	int n;

	/* Idle calls are kept on a stack, so starting a call is O(1). */
	if (api->nidle > 0)
		return api->idle[--api->nidle];
	if (api->ncalls == api->cap) {
		n = api->cap ? api->cap * 2 : 16;
		if ((p = realloc(api->calls, (size_t)n * sizeof(*p))) == NULL)
			return NULL;
		api->calls = p;
		if ((p = realloc(api->idle, (size_t)n * sizeof(*p))) == NULL)
			return NULL;
		api->idle = p;
		api->cap = n;
	}
	if ((c = calloc(1, sizeof(*c))) == NULL)
		return NULL;
	api->calls[api->ncalls++] = c;
	return c;
}

/* The request body per CONTRACT section 2, into C->request. */
static int
build_request(struct call *c, const struct item *it)
{
	json_t *o;
	size_t n;

	if (it->kind == ITEM_INVOICE)
		o = json_pack("{sI ss sI ss}", "invoice_id", (json_int_t)it->id,
		    "customer", it->customer_id, "amount", (json_int_t)it->amount_cents,
		    "currency", it->currency);
	else
		o = json_pack("{sI sI ss sI}", "redemption_id", (json_int_t)it->id,
		    "subsidy_id", (json_int_t)it->subsidy_id, "customer", it->customer_id,
		    "amount", (json_int_t)it->amount_cents);
	if (o == NULL)
		return -1;
	n = json_dumpb(o, c->request, sizeof(c->request) - 1, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(o);
	if (n == 0 || n >= sizeof(c->request))
		return -1;
	c->request[n] = '\0';
	return 0;
}

#define KEY_HEADER "Idempotency-Key: "

/*
 * The call's request headers, built once per call slot and token: the key
 * header is made as long as the longest key, and each call writes its key
 * into it, so a call allocates no header.
 */
static int
call_headers(api_client *api, struct call *c)
{
	static const char *const fixed[] = {
		"Content-Type: application/json", "Accept: application/json", "Expect:",
	};
	char blank[sizeof(KEY_HEADER) + ITEM_KEY_MAX];
	struct curl_slist *h = NULL, *t;

	if (c->headers != NULL && c->headers_token == api->token_generation)
		return 0;
	memset(blank, 'x', sizeof(blank) - 1);
	blank[sizeof(blank) - 1] = '\0';
	if ((h = curl_slist_append(NULL, api->auth_header)) == NULL)
		return -1;
	for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
		if ((t = curl_slist_append(h, fixed[i])) == NULL)
			goto fail;
		h = t;
	}
	if ((t = curl_slist_append(h, blank)) == NULL)
		goto fail;
	h = t;
	curl_slist_free_all(c->headers);
	c->headers = h;
	for (c->key_header = h; c->key_header->next != NULL; c->key_header = c->key_header->next)
		;
	c->headers_token = api->token_generation;
	curl_easy_setopt(c->easy, CURLOPT_HTTPHEADER, c->headers);
	return 0;
fail:
	curl_slist_free_all(h);
	return -1;
}

/* What every call of a handle shares, set once when the handle is made. */
static void
easy_setup(api_client *api, struct call *c)
{
	curl_easy_setopt(c->easy, CURLOPT_POST, 1L);
	curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, c->request);
	curl_easy_setopt(c->easy, CURLOPT_USERAGENT, "billing-worker/1");
	curl_easy_setopt(c->easy, CURLOPT_NOSIGNAL, 1L);
	/*
	 * Never follow a redirect (an answer we cannot trust to mean anything;
	 * response.c treats it as ambiguous), and only ever speak the base
	 * URL's own scheme, so an https client can never fall back to http.
	 */
	curl_easy_setopt(c->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(c->easy, CURLOPT_PROTOCOLS_STR, api->https ? "https" : "http");
	/*
	 * The contract's protocol, whatever the server offers: libcurl would
	 * take h2 by ALPN and multiplex every call onto one connection, where
	 * one stream reset or GOAWAY makes all the calls in flight ambiguous.
	 * HTTP/1.1 keeps one call per connection, so a broken one costs one.
	 */
	curl_easy_setopt(c->easy, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
	/* libcurl's defaults, spelled out: the token must only go to the real API. */
	curl_easy_setopt(c->easy, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(c->easy, CURLOPT_SSL_VERIFYHOST, 2L);
	curl_easy_setopt(c->easy, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
	if (api->ca_file != NULL)
		curl_easy_setopt(c->easy, CURLOPT_CAINFO, api->ca_file);
	curl_easy_setopt(c->easy, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(c->easy, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(c->easy, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(c->easy, CURLOPT_WRITEDATA, c);
	curl_easy_setopt(c->easy, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(c->easy, CURLOPT_HEADERDATA, c);
	curl_easy_setopt(c->easy, CURLOPT_ERRORBUFFER, c->errbuf);
	curl_easy_setopt(c->easy, CURLOPT_PRIVATE, c);
}

int
api_start(api_client *api, const struct item *it, int tag)
{
	struct call *c;

	if ((c = call_slot(api)) == NULL)
		return -1;
	if (c->easy == NULL) {
		if ((c->easy = curl_easy_init()) == NULL)
			goto fail;
		easy_setup(api, c);
	}
	if (build_request(c, it) == -1 || call_headers(api, c) == -1)
		goto fail;
	item_key(it, c->key, sizeof(c->key));
	/* Fits: the entry was made for the longest key (call_headers). */
	snprintf(c->key_header->data, sizeof(KEY_HEADER) + ITEM_KEY_MAX, KEY_HEADER "%s", c->key);
	c->tag = tag;
	c->body_len = 0;
	c->too_large = 0;
	c->retry_after[0] = '\0';
	c->errbuf[0] = '\0';

	curl_easy_setopt(c->easy, CURLOPT_URL,
	    it->kind == ITEM_INVOICE ? api->url_charges : api->url_redemptions);
	curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(c->request));
	curl_easy_setopt(c->easy, CURLOPT_TIMEOUT_MS, api->timeout_ms);
	curl_easy_setopt(c->easy, CURLOPT_CONNECTTIMEOUT_MS, api->connect_timeout_ms);
	if (curl_multi_add_handle(api->multi, c->easy) != CURLM_OK) {
		api->idle[api->nidle++] = c;    /* headers stay with the call, freed later */
		return -1;
	}
	c->active = 1;
	api->in_flight++;
	return 0;
fail:
	api->idle[api->nidle++] = c;        /* back on the stack, still inactive */
	return -1;
}

/* epoll's answer for one of libcurl's sockets, in libcurl's terms. */
static int
select_mask(uint32_t events)
{
	return ((events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP)) ? CURL_CSELECT_IN : 0) |
	    ((events & EPOLLOUT) ? CURL_CSELECT_OUT : 0) |
	    ((events & EPOLLERR) ? CURL_CSELECT_ERR : 0);
}

/* Room in the scratch poll set for N descriptors. */
static int
pollset_fit(api_client *api, int n)
{
	struct pollfd *p;
	int cap;

	if (n <= api->pollset_cap)
		return 0;
	cap = n < 32 ? 64 : n * 2;
	if ((p = realloc(api->pollset, (size_t)cap * sizeof(*p))) == NULL)
		return -1;
	api->pollset = p;
	api->pollset_cap = cap;
	return 0;
}

#define EVENTS_PER_WAIT 64

/* libcurl's timer, if due: served, and true.  A timer it sets meanwhile stays. */
static bool
serve_timer(api_client *api, int *running)
{
	if (api->timer_at_ms < 0 || clock_ms() < api->timer_at_ms)
		return false;
	api->timer_at_ms = -1;
	curl_multi_socket_action(api->multi, CURL_SOCKET_TIMEOUT, 0, running);
	return true;
}

bool
api_send_started(api_client *api)
{
	int running = api->in_flight;

	return serve_timer(api, &running) && running < api->in_flight;
}

int
api_wait(api_client *api, struct api_waitfd *extra, unsigned nextra, int timeout_ms)
{
	struct epoll_event ev[EVENTS_PER_WAIT];
	int n = (int)nextra + 1, running = api->in_flight, ready;

	/*
	 * A timer already due (calls started this turn set one of 0 ms) is
	 * served before the poll, so their requests go out now and the poll
	 * waits for their answers instead of returning at once for them.  A
	 * call that ended in it (a refused connect) is collected at once.
	 */
	if (serve_timer(api, &running) && running < api->in_flight)
		timeout_ms = 0;
	if (pollset_fit(api, n) == -1)
		return -1;
	for (unsigned i = 0; i < nextra; i++) {
		api->pollset[i].fd = extra[i].fd;       /* -1: ignored by poll */
		api->pollset[i].events = extra[i].events;
		api->pollset[i].revents = 0;
	}
	api->pollset[nextra].fd = api->epfd;
	api->pollset[nextra].events = POLLIN;
	api->pollset[nextra].revents = 0;
	if (api->timer_at_ms >= 0) {
		int64_t due = api->timer_at_ms - clock_ms();

		if (due < 0)
			due = 0;
		if (timeout_ms < 0 || due < timeout_ms)
			timeout_ms = (int)due;
	}
	if (poll(api->pollset, (nfds_t)n, timeout_ms) < 0)
		return errno == EINTR ? 0 : -1;
	for (unsigned i = 0; i < nextra; i++)
		extra[i].revents = api->pollset[i].revents;
	/* Only the transfers on a ready socket move; more than 64 wait a turn. */
	if (api->pollset[nextra].revents != 0) {
		ready = epoll_wait(api->epfd, ev, EVENTS_PER_WAIT, 0);
		for (int i = 0; i < ready; i++)
			curl_multi_socket_action(api->multi, ev[i].data.fd,
			    select_mask(ev[i].events), &running);
	}
	serve_timer(api, &running);
	return 0;
}

/* What the transport saw, from libcurl's result code. */
static enum api_transport
transport_of(api_client *api, struct call *c, CURLcode rc)
{
	curl_off_t connected = 0, handshaken = 0, pretransfer = 0;
	long request_bytes = 0;

	/*
	 * Bytes of the request written, on any connection of this transfer:
	 * libcurl silently retries a request on a fresh connection when a
	 * reused keep-alive one dies unanswered, so a final "could not
	 * connect" may follow a request the API read, and applied.  Once any
	 * of it went out, nothing is "not sent" (found by the chaos suite).
	 */
	curl_easy_getinfo(c->easy, CURLINFO_REQUEST_SIZE, &request_bytes);
	switch (rc) {
	case CURLE_OK:
		return API_TRANSPORT_OK;
	case CURLE_WRITE_ERROR:
		return c->too_large ? API_TRANSPORT_TOO_LARGE : API_TRANSPORT_LOST;
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_COULDNT_CONNECT:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_CIPHER:
	case CURLE_UNSUPPORTED_PROTOCOL:
	case CURLE_URL_MALFORMAT:
		return request_bytes > 0 ? API_TRANSPORT_LOST : API_TRANSPORT_NOT_SENT;
	case CURLE_OPERATION_TIMEDOUT:
		/*
		 * A timeout before the connection (or TLS) was up sent nothing.
		 * But on a reused connection libcurl reports connect and
		 * handshake times of 0, so those alone would call a request that
		 * went out "never sent": past the connect phase, it is ambiguous.
		 */
		curl_easy_getinfo(c->easy, CURLINFO_PRETRANSFER_TIME_T, &pretransfer);
		if (request_bytes > 0 || pretransfer > 0)
			return API_TRANSPORT_LOST;
		curl_easy_getinfo(c->easy, CURLINFO_CONNECT_TIME_T, &connected);
		curl_easy_getinfo(c->easy, CURLINFO_APPCONNECT_TIME_T, &handshaken);
		if (connected == 0 || (api->https && handshaken == 0))
			return API_TRANSPORT_NOT_SENT;
		return API_TRANSPORT_LOST;
	default:
		return API_TRANSPORT_LOST;
	}
}

int
api_next_result(api_client *api, int *tag, struct api_verdict *v,
    double *latency_ms, long *http_status)
{
	struct api_response r;
	struct call *c = NULL;
	curl_off_t total = 0;
	CURLMsg *msg;
	int left;
	long status = 0;

	while ((msg = curl_multi_info_read(api->multi, &left)) != NULL) {
		if (msg->msg == CURLMSG_DONE)
			break;
	}
	if (msg == NULL)
		return 0;
	curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&c);
	curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_getinfo(c->easy, CURLINFO_TOTAL_TIME_T, &total);
	memset(&r, 0, sizeof(r));
	r.transport = transport_of(api, c, msg->data.result);
	r.status = status;
	r.body = c->body;
	r.body_len = c->body_len;
	r.retry_after = c->retry_after[0] ? c->retry_after : NULL;
	r.transport_error = c->errbuf[0] ? c->errbuf : curl_easy_strerror(msg->data.result);
	api_classify(&r, v);

	curl_multi_remove_handle(api->multi, c->easy);
	c->active = 0;
	api->in_flight--;
	api->idle[api->nidle++] = c;
	*tag = c->tag;
	*latency_ms = (double)total / 1000.0;
	*http_status = status;
	return 1;
}

void
api_abort(api_client *api, int tag)
{
	for (int i = 0; i < api->ncalls; i++) {
		struct call *c = api->calls[i];

		if (c->active && c->tag == tag) {
			curl_multi_remove_handle(api->multi, c->easy);
			c->active = 0;
			api->in_flight--;
			api->idle[api->nidle++] = c;
			return;
		}
	}
}

int
api_in_flight(const api_client *api)
{
	return api->in_flight;
}

int
api_probe(const char *base_url, const char *ca_file, long connect_timeout_ms,
    char *what, size_t whatlen, char *err, size_t errlen)
{
	char errbuf[CURL_ERROR_SIZE] = "";
	const char *ip = NULL;
	long port = 0;
	bool https = strncmp(base_url, "https://", 8) == 0;
	CURL *c;
	CURLcode rc;
	int ret = -1;

	if (!curl_ready) {
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
			snprintf(err, errlen, "could not initialize libcurl");
			return -1;
		}
		curl_ready = 1;
	}
	if ((c = curl_easy_init()) == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	/*
	 * CONNECT_ONLY stops after the TCP connect and, for https, the TLS
	 * handshake with the same verification as every call: no request,
	 * so no token, goes out.
	 */
	curl_easy_setopt(c, CURLOPT_URL, base_url);
	curl_easy_setopt(c, CURLOPT_CONNECT_ONLY, 1L);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, connect_timeout_ms);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, connect_timeout_ms);
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
	if (ca_file != NULL && ca_file[0] != '\0')
		curl_easy_setopt(c, CURLOPT_CAINFO, ca_file);
	rc = curl_easy_perform(c);
	if (rc != CURLE_OK) {
		snprintf(err, errlen, "%s", errbuf[0] != '\0' ? errbuf : curl_easy_strerror(rc));
	} else {
		curl_easy_getinfo(c, CURLINFO_PRIMARY_IP, &ip);
		curl_easy_getinfo(c, CURLINFO_PRIMARY_PORT, &port);
		snprintf(what, whatlen, "%s %s port %ld%s", https ? "TLS handshake with" :
		    "TCP connect to", ip != NULL ? ip : "?", port,
		    https ? ", certificate and host name verified" : "");
		ret = 0;
	}
	curl_easy_cleanup(c);
	return ret;
}
