/*
 * libFuzzer target: reading a raw response header line (any bytes, as
 * libcurl hands them over) for Retry-After.  The value copied out is
 * NUL-terminated and fits its buffer.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "billing/response.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char out[64];
	char *line;

	/* Not NUL-terminated, like libcurl's buffer: a copy lets ASan see overreads. */
	if ((line = malloc(size ? size : 1)) == NULL)
		return 0;
	memcpy(line, data, size);
	memset(out, 'x', sizeof(out));
	if (api_header_value(line, size, "Retry-After", out, sizeof(out)) == 1) {
		if (memchr(out, '\0', sizeof(out)) == NULL)
			abort();
		(void)api_parse_retry_after(out, 0);
	}
	free(line);
	return 0;
}
