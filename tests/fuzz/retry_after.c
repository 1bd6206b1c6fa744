/*
 * libFuzzer target: Retry-After parsing (delta-seconds or an HTTP-date).
 * The first 8 bytes are "now"; the result is -1 or 0..86400.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "billing/response.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char value[256];
	long long now = 0;
	int s;

	if (size < sizeof(now) || size - sizeof(now) >= sizeof(value))
		return 0;
	memcpy(&now, data, sizeof(now));
	/* Clocks between 1970 and 9999: the range a real time() returns. */
	now = (long long)((unsigned long long)now % 253402300800ULL);
	memcpy(value, data + sizeof(now), size - sizeof(now));
	value[size - sizeof(now)] = '\0';
	s = api_parse_retry_after(value, now);
	if (s < -1 || s > 86400)
		abort();
	return 0;
}
