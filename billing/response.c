#include "billing/response.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>

#define RETRY_AFTER_MAX_S 86400

const char *
api_class_name(enum api_class cls)
{
	switch (cls) {
	case API_SUCCESS: return "success";
	case API_DECLINED: return "declined";
	case API_REFUSED: return "refused";
	case API_KEY_REUSED: return "key reused";
	case API_WORKER: return "worker refused";
	case API_IN_PROGRESS: return "in progress";
	case API_TRANSIENT: return "transient";
	case API_AMBIGUOUS: return "ambiguous";
	}
	return "unknown";
}

int
api_class_admitted(enum api_class cls)
{
	switch (cls) {
	case API_SUCCESS:
	case API_DECLINED:
	case API_REFUSED:
	case API_KEY_REUSED:
	case API_IN_PROGRESS:
		return 1;
	case API_WORKER:
	case API_TRANSIENT:
	case API_AMBIGUOUS:
		break;
	}
	return 0;
}

int
api_parse_retry_after(const char *value, long long now)
{
	struct tm tm;
	const char *end;
	long long when;
	char *e;
	long v;

	if (value == NULL)
		return -1;
	while (*value == ' ' || *value == '\t')
		value++;
	if (isdigit((unsigned char)*value)) {
		v = strtol(value, &e, 10);
		while (*e == ' ' || *e == '\t' || *e == '\r' || *e == '\n')
			e++;
		if (*e != '\0' || v < 0)
			return -1;
		return v > RETRY_AFTER_MAX_S ? RETRY_AFTER_MAX_S : (int)v;
	}
	/* IMF-fixdate, the only HTTP-date form senders may generate. */
	memset(&tm, 0, sizeof(tm));
	end = strptime(value, "%a, %d %b %Y %H:%M:%S GMT", &tm);
	if (end == NULL)
		return -1;
	when = (long long)timegm(&tm);
	if (when <= now)
		return 0;
	return when - now > RETRY_AFTER_MAX_S ? RETRY_AFTER_MAX_S : (int)(when - now);
}

int
api_header_value(const char *line, size_t n, const char *name, char *out, size_t outlen)
{
	size_t k = strlen(name), v, len;

	if (outlen == 0 || n <= k || strncasecmp(line, name, k) != 0 || line[k] != ':')
		return 0;
	v = k + 1;
	while (v < n && (line[v] == ' ' || line[v] == '\t'))
		v++;
	len = n - v;
	while (len > 0 && (line[v + len - 1] == '\r' || line[v + len - 1] == '\n' ||
	    line[v + len - 1] == ' ' || line[v + len - 1] == '\t'))
		len--;
	if (len >= outlen)
		len = outlen - 1;
	memcpy(out, line + v, len);
	out[len] = '\0';
	return 1;
}

/* Copies S into DST, replacing control characters so a log line stays one line. */
static void
copy_clean(char *dst, size_t len, const char *s)
{
	size_t i;

	for (i = 0; i + 1 < len && s[i] != '\0'; i++)
		dst[i] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? ' ' : s[i];
	dst[i] = '\0';
}

static json_t *
parse_body(const struct api_response *r)
{
	json_error_t jerr;

	if (r->body == NULL || r->body_len == 0)
		return NULL;
	return json_loadb(r->body, r->body_len, JSON_REJECT_DUPLICATES, &jerr);
}

/* An id we can store and show: 1..API_ID_MAX printable ASCII characters. */
static int
id_is_sane(const char *id)
{
	size_t n = strlen(id);

	if (n == 0 || n > API_ID_MAX)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (id[i] < 0x21 || id[i] > 0x7e)
			return 0;
	return 1;
}

static void
classify_success(const struct api_response *r, struct api_verdict *v)
{
	json_t *root = parse_body(r), *id;

	id = json_is_object(root) ? json_object_get(root, "id") : NULL;
	if (json_is_string(id) && id_is_sane(json_string_value(id))) {
		v->cls = API_SUCCESS;
		snprintf(v->id, sizeof(v->id), "%s", json_string_value(id));
	} else {
		/* It may have charged; only a replay can tell us the id. */
		v->cls = API_AMBIGUOUS;
		snprintf(v->error, sizeof(v->error), "http %ld answer without a readable \"id\"",
		    r->status);
	}
	json_decref(root);
}

/* "card_declined: Your card was declined." from an error body, else "http 402". */
static void
describe_error(const struct api_response *r, struct api_verdict *v, const char *prefix)
{
	json_t *root = parse_body(r), *err, *code, *msg;
	char text[sizeof(v->error)];

	err = json_is_object(root) ? json_object_get(root, "error") : NULL;
	code = json_is_object(err) ? json_object_get(err, "code") : NULL;
	msg = json_is_object(err) ? json_object_get(err, "message") : NULL;
	if (json_is_string(code) && json_is_string(msg))
		snprintf(text, sizeof(text), "%s%s: %s", prefix, json_string_value(code),
		    json_string_value(msg));
	else if (json_is_string(code))
		snprintf(text, sizeof(text), "%s%s (http %ld)", prefix,
		    json_string_value(code), r->status);
	else if (json_is_string(msg))
		snprintf(text, sizeof(text), "%s%s (http %ld)", prefix,
		    json_string_value(msg), r->status);
	else
		snprintf(text, sizeof(text), "%shttp %ld", prefix, r->status);
	copy_clean(v->error, sizeof(v->error), text);
	json_decref(root);
}

void
api_classify(const struct api_response *r, struct api_verdict *v)
{
	memset(v, 0, sizeof(*v));
	v->retry_after_s = -1;

	switch (r->transport) {
	case API_TRANSPORT_NOT_SENT:
		v->cls = API_TRANSIENT;
		snprintf(v->error, sizeof(v->error), "could not reach the billing API: %s",
		    r->transport_error ? r->transport_error : "connection failed");
		return;
	case API_TRANSPORT_LOST:
		v->cls = API_AMBIGUOUS;
		snprintf(v->error, sizeof(v->error), "no answer from the billing API: %s",
		    r->transport_error ? r->transport_error : "connection lost");
		return;
	case API_TRANSPORT_TOO_LARGE:
		v->cls = API_AMBIGUOUS;
		snprintf(v->error, sizeof(v->error), "http %ld answer too large, cut off",
		    r->status);
		return;
	case API_TRANSPORT_OK:
		break;
	}

	v->retry_after_s = api_parse_retry_after(r->retry_after, (long long)time(NULL));
	if (r->status >= 200 && r->status <= 299) {
		classify_success(r, v);
	} else if (r->status == 409) {
		v->cls = API_IN_PROGRESS;
		snprintf(v->error, sizeof(v->error), "http 409: a request with this key is "
		    "still being processed");
	} else if (r->status == 408 || r->status == 429 || (r->status >= 500 && r->status <= 599)) {
		v->cls = API_TRANSIENT;
		describe_error(r, v, "");
	} else if (r->status == 422) {
		v->cls = API_KEY_REUSED;
		describe_error(r, v, "idempotency key reused with a different body: ");
	} else if (r->status == 401 || r->status == 403 || r->status == 404 ||
	    r->status == 405) {
		/*
		 * Authentication and routing answer before the idempotency
		 * layer: they say the token or the base URL is wrong (or a
		 * proxy is in the way), nothing about the item (CONTRACT 2).
		 */
		v->cls = API_WORKER;
		describe_error(r, v, "");
	} else if (r->status == 402) {
		v->cls = API_DECLINED;
		describe_error(r, v, "");
	} else if (r->status >= 400 && r->status <= 499) {
		v->cls = API_REFUSED;
		describe_error(r, v, "");
	} else {
		/*
		 * A redirect (never followed) or a status the contract does not
		 * name: we cannot know it did nothing, so never give up on it.
		 */
		v->cls = API_AMBIGUOUS;
		snprintf(v->error, sizeof(v->error), "unexpected http %ld from the billing API%s",
		    r->status, r->status >= 300 && r->status <= 399 ? " (redirect not followed)" : "");
	}
}
