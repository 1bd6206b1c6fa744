/*
 * libFuzzer target: what we say about a libpq connection string.  Any
 * password found in the input is replaced in a message quoting it, cut at
 * any length, exactly as a plain reference replacement would: every
 * occurrence, leftmost first, before the cut.
 *
 * (A first version asserted that the password never appears in the output
 * at all.  The fuzzer showed why no redaction can promise that: with the
 * password "word=[", the text "password=" followed by "[redacted]" spells
 * it again from parts that were never secret.)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/conninfo.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The obvious implementation, unbounded, then cut to OUTLEN - 1 bytes. */
static char *
reference(const char *msg, const char *secret, size_t outlen)
{
	size_t slen = strlen(secret), rlen = strlen(CONNINFO_REDACTED), o = 0;
	char *out = malloc(strlen(msg) * (rlen + 1) + 1);

	if (out == NULL)
		return NULL;
	while (*msg != '\0') {
		if (strncmp(msg, secret, slen) == 0) {
			memcpy(out + o, CONNINFO_REDACTED, rlen);
			o += rlen;
			msg += slen;
		} else {
			out[o++] = *msg++;
		}
	}
	out[o < outlen - 1 ? o : outlen - 1] = '\0';
	return out;
}

static void
check(const char *msg, const char *secret, size_t outlen)
{
	char out[128];
	char *want = reference(msg, secret, outlen);

	if (want == NULL)
		return;
	memset(out, 'z', sizeof(out));
	conninfo_redact(msg, secret, out, outlen);
	if (strcmp(out, want) != 0)
		abort();
	free(want);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *conninfo, *password = NULL, *msg;
	size_t cut;

	if (size < 1 || size > 4096)
		return 0;
	cut = data[0] % 128 + 1;
	if ((conninfo = strndup((const char *)data + 1, size - 1)) == NULL)
		return 0;
	(void)conninfo_may_hold_secret(conninfo);
	if (conninfo_password(conninfo, &password) == 0 && password != NULL) {
		size_t n = 2 * strlen(password) + 64;

		if ((msg = malloc(n)) != NULL) {
			snprintf(msg, n, "FATAL: \"%s\" x%s", password, password);
			check(msg, password, cut);
			check(conninfo, password, cut);
			free(msg);
		}
	}
	free(password);
	free(conninfo);
	return 0;
}
