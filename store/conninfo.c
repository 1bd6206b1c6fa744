#include "store/conninfo.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <libpq-fe.h>

int
conninfo_password(const char *conninfo, char **ret)
{
	PQconninfoOption *opts, *o;
	char *err = NULL, *copy = NULL;
	int rc = -1;

	*ret = NULL;
	/* The parse error may quote the string: it is dropped, never shown. */
	if ((opts = PQconninfoParse(conninfo, &err)) == NULL) {
		PQfreemem(err);
		return -1;
	}
	rc = 0;
	for (o = opts; o->keyword != NULL; o++) {
		if (strcmp(o->keyword, "password") == 0 && o->val != NULL && o->val[0] != '\0') {
			if ((copy = strdup(o->val)) == NULL)
				rc = -1;
			explicit_bzero(o->val, strlen(o->val));
		}
	}
	PQconninfoFree(opts);
	if (rc == 0)
		*ret = copy;
	return rc;
}

int
conninfo_check(const char *key, const char *conninfo, char *err, size_t errlen)
{
	PQconninfoOption *opts;
	char *msg = NULL;
	size_t n;

	if ((opts = PQconninfoParse(conninfo, &msg)) != NULL) {
		PQconninfoFree(opts);
		return 0;
	}
	if (msg == NULL) {
		snprintf(err, errlen, "could not parse \"%s\": out of memory", key);
	} else if (conninfo_may_hold_secret(conninfo)) {
		snprintf(err, errlen, "\"%s\" is not a valid connection string "
		    "(libpq's message is not shown: it may quote the password)", key);
	} else {
		n = strlen(msg);
		while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
			msg[--n] = '\0';
		snprintf(err, errlen, "\"%s\" is not a valid connection string: %s", key,
		    msg);
	}
	PQfreemem(msg);
	return -1;
}

bool
conninfo_may_hold_secret(const char *conninfo)
{
	for (const char *p = conninfo; *p != '\0'; p++)
		if (*p == '@' || strncasecmp(p, "password", 8) == 0)
			return true;
	return false;
}

void
conninfo_redact(const char *msg, const char *secret, char *out, size_t outlen)
{
	size_t slen = secret != NULL ? strlen(secret) : 0;
	size_t rlen = strlen(CONNINFO_REDACTED), o = 0;
	const char *p = msg, *hit;

	if (outlen == 0)
		return;
	while (*p != '\0' && o + 1 < outlen) {
		hit = slen > 0 ? strstr(p, secret) : NULL;
		if (hit == p) {
			size_t n = rlen < outlen - 1 - o ? rlen : outlen - 1 - o;

			memcpy(out + o, CONNINFO_REDACTED, n);
			o += n;
			p += slen;
			continue;
		}
		/* Copy up to the next hit (or the end), as far as room allows. */
		{
			size_t n = hit != NULL ? (size_t)(hit - p) : strlen(p);

			if (n > outlen - 1 - o)
				n = outlen - 1 - o;
			memcpy(out + o, p, n);
			o += n;
			p += n;
		}
	}
	out[o] = '\0';
}
