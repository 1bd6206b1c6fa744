/*
 * libFuzzer target: the validation of a row written by producers, and the
 * idempotency key built from it.  Input: kind, amount and id bytes, then
 * customer_id up to a NUL, then the currency.  A valid item has a
 * non-empty, clean customer id of at most 255 bytes and a positive amount.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/item.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct item it;
	const char *reason = NULL;
	char key[ITEM_KEY_MAX], want[64];
	const uint8_t *nul;
	size_t clen;

	if (size < 17)
		return 0;
	memset(&it, 0, sizeof(it));
	it.kind = (enum item_kind)(data[0] & 1);
	memcpy(&it.amount_cents, data + 1, 8);
	memcpy(&it.id, data + 9, 8);
	data += 17;
	size -= 17;
	nul = memchr(data, '\0', size);
	clen = nul != NULL ? (size_t)(nul - data) : size;
	it.customer_id = strndup((const char *)data, clen);
	if (nul != NULL && it.kind == ITEM_INVOICE)
		it.currency = strndup((const char *)nul + 1, size - clen - 1);
	if (it.customer_id == NULL) {
		item_clear(&it);
		return 0;
	}
	if (item_validate(&it, &reason) == 0) {
		size_t n = strlen(it.customer_id);

		if (n == 0 || n > 255 || it.amount_cents <= 0)
			abort();
		for (size_t i = 0; i < n; i++)
			if ((unsigned char)it.customer_id[i] < 0x20 || it.customer_id[i] == 0x7f)
				abort();
	} else if (reason == NULL || reason[0] == '\0') {
		abort();
	}
	item_key(&it, key, sizeof(key));
	snprintf(want, sizeof(want), "%s-%lld", item_kind_name(it.kind), (long long)it.id);
	if (strcmp(key, want) != 0)
		abort();
	item_clear(&it);
	return 0;
}
