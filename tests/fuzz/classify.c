/*
 * libFuzzer target: the classification of an API answer (CONTRACT section
 * 2).  The first bytes choose the transport and the HTTP status, then a
 * Retry-After value up to a NUL, then the body.  Invariants: a success
 * carries a sane id; every verdict's error is one printable line.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "billing/response.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct api_response r;
	struct api_verdict v;
	char retry_after[128];
	const uint8_t *nul;
	size_t n;

	if (size < 3)
		return 0;
	memset(&r, 0, sizeof(r));
	r.transport = (enum api_transport)(data[0] % 4);
	r.status = (long)((data[1] << 8 | data[2]) % 1000);
	data += 3;
	size -= 3;
	nul = memchr(data, '\0', size);
	n = nul != NULL ? (size_t)(nul - data) : 0;
	if (nul != NULL && n < sizeof(retry_after)) {
		memcpy(retry_after, data, n);
		retry_after[n] = '\0';
		r.retry_after = retry_after;
		data += n + 1;
		size -= n + 1;
	}
	r.body = size > 0 ? (const char *)data : NULL;
	r.body_len = size;
	r.transport_error = "fuzzed transport error";
	api_classify(&r, &v);

	if (v.cls == API_SUCCESS) {
		size_t idlen = strlen(v.id);

		if (idlen == 0 || idlen > API_ID_MAX)
			abort();
		for (size_t i = 0; i < idlen; i++)
			if (v.id[i] <= ' ' || v.id[i] > '~')
				abort();
	}
	for (const char *p = v.error; *p != '\0'; p++)
		if (*p == '\n' || *p == '\r')
			abort();
	if (v.retry_after_s < -1 || v.retry_after_s > 86400)
		abort();
	return 0;
}
