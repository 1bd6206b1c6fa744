#include "common/item.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * Customer ids beyond this are refused rather than sent: no billing API
 * takes megabytes of id, and a refusal with a reason beats an opaque 400.
 */
#define CUSTOMER_ID_MAX 255

const char *
item_kind_name(enum item_kind kind)
{
	return kind == ITEM_REDEMPTION ? "redemption" : "invoice";
}

void
item_key(const struct item *it, char *buf, size_t len)
{
	if (it->generation <= 1)
		snprintf(buf, len, "%s-%" PRId64, item_kind_name(it->kind), it->id);
	else
		snprintf(buf, len, "%s-%" PRId64 "-%d", item_kind_name(it->kind), it->id,
		    it->generation);
}

/*
 * Returns 1 when S is well-formed UTF-8 without control characters: C0,
 * DEL, and C1 (U+0080..U+009F, which terminals read as escape sequences).
 */
static int
text_is_clean(const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	while (*p != '\0') {
		unsigned char c = *p;
		int n;

		if (c < 0x20 || c == 0x7f)
			return 0;
		if (c < 0x80) {
			p++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf)
			n = 1;
		else if (c >= 0xe0 && c <= 0xef)
			n = 2;
		else if (c >= 0xf0 && c <= 0xf4)
			n = 3;
		else
			return 0;
		/* C1 controls, overlongs, surrogates and > U+10FFFF. */
		if ((c == 0xc2 && p[1] < 0xa0) || (c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] > 0x9f) ||
		    (c == 0xf0 && p[1] < 0x90) || (c == 0xf4 && p[1] > 0x8f))
			return 0;
		for (int i = 1; i <= n; i++)
			if ((p[i] & 0xc0) != 0x80)
				return 0;
		p += n + 1;
	}
	return 1;
}

int
item_validate(const struct item *it, const char **reason)
{
	const char *c;

	if (it->customer_id == NULL || it->customer_id[0] == '\0') {
		*reason = "customer_id is empty";
		return -1;
	}
	if (strlen(it->customer_id) > CUSTOMER_ID_MAX) {
		*reason = "customer_id is longer than 255 bytes";
		return -1;
	}
	if (!text_is_clean(it->customer_id)) {
		*reason = "customer_id is not valid UTF-8 or holds control characters";
		return -1;
	}
	if (it->amount_cents <= 0) {
		*reason = "amount_cents is not positive";
		return -1;
	}
	if (it->kind == ITEM_INVOICE) {
		c = it->currency;
		if (c == NULL || strlen(c) != 3 ||
		    !((c[0] >= 'a' && c[0] <= 'z') || (c[0] >= 'A' && c[0] <= 'Z')) ||
		    !((c[1] >= 'a' && c[1] <= 'z') || (c[1] >= 'A' && c[1] <= 'Z')) ||
		    !((c[2] >= 'a' && c[2] <= 'z') || (c[2] >= 'A' && c[2] <= 'Z'))) {
			*reason = "currency is not a three-letter ISO 4217 code";
			return -1;
		}
	}
	return 0;
}

/*
 * All or nothing: a string missing because its copy failed would read as a
 * row with the field absent, and item_validate would fail the item for good
 * ("currency is not a three-letter ISO 4217 code") over a passing shortage
 * of memory.
 */
int
item_set_strings(struct item *it, const char *customer_id, const char *currency)
{
	char *cus = NULL, *cur = NULL;

	if ((customer_id != NULL && (cus = strdup(customer_id)) == NULL) ||
	    (currency != NULL && (cur = strdup(currency)) == NULL)) {
		free(cus);
		it->customer_id = it->currency = NULL;
		return -1;
	}
	it->customer_id = cus;
	it->currency = cur;
	return 0;
}

void
item_clear(struct item *it)
{
	free(it->customer_id);
	free(it->currency);
	memset(it, 0, sizeof(*it));
}
