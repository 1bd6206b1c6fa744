#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/*
 * The batch statements take their rows as arrays (unnest($1::bigint[],
 * ...)): one round trip and one plan for any batch size.  These build the
 * array literals in buffers the handle keeps, so a warm worker allocates
 * nothing per batch, and index what comes back.
 */

static int
buf_reserve(struct buf *b, size_t more)
{
	size_t cap;
	char *p;

	if (b->len + more + 1 <= b->cap)
		return 0;
	cap = b->cap ? b->cap : 256;
	while (cap < b->len + more + 1)
		cap *= 2;
	if ((p = realloc(b->data, cap)) == NULL)
		return -1;
	b->data = p;
	b->cap = cap;
	return 0;
}

static int
buf_add(struct buf *b, const char *s, size_t n)
{
	if (buf_reserve(b, n) == -1)
		return -1;
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

static void
buf_reset(struct buf *b)
{
	b->len = 0;
	if (b->data != NULL)
		b->data[0] = '\0';
}

/* Appends an element of an array literal: a number, "NULL", or a quoted string. */
int
arr_add_raw(struct buf *b, const char *s)
{
	if (buf_add(b, b->len == 1 ? "" : ",", b->len == 1 ? 0 : 1) == -1)
		return -1;
	return buf_add(b, s, strlen(s));
}

int
arr_add_int(struct buf *b, int64_t v)
{
	char num[32];

	snprintf(num, sizeof(num), "%" PRId64, v);
	return arr_add_raw(b, num);
}

/*
 * Quotes S for an array literal.  Text from the API may hold anything:
 * bytes that are not UTF-8 are replaced so one odd error message cannot
 * make PostgreSQL reject a whole batch of completions.
 */
int
arr_add_text(struct buf *b, const char *s)
{
	const unsigned char *p;

	if (s == NULL || s[0] == '\0')
		return arr_add_raw(b, "NULL");
	if (buf_add(b, b->len == 1 ? "\"" : ",\"", b->len == 1 ? 1 : 2) == -1)
		return -1;
	for (p = (const unsigned char *)s; *p != '\0'; p++) {
		char c = (char)*p;

		if (*p == '"' || *p == '\\') {
			if (buf_add(b, "\\", 1) == -1)
				return -1;
		} else if (*p >= 0x80 || *p < 0x20) {
			c = '?';
		}
		if (buf_add(b, &c, 1) == -1)
			return -1;
	}
	return buf_add(b, "\"", 1);
}

int
arr_open(struct buf *b)
{
	buf_reset(b);
	return buf_add(b, "{", 1);
}

int
arr_close(struct buf *b)
{
	return buf_add(b, "}", 1);
}

int
id_pos_cmp(const void *a, const void *b)
{
	const struct id_pos *x = a, *y = b;

	return x->id < y->id ? -1 : x->id > y->id;
}

/* Position of ID in the sorted index IX of N entries, or -1. */
ssize_t
index_find(const struct id_pos *ix, size_t n, int64_t id)
{
	struct id_pos key = { id, 0 };
	const struct id_pos *hit = bsearch(&key, ix, n, sizeof(*ix), id_pos_cmp);

	return hit != NULL ? (ssize_t)hit->pos : -1;
}

/* Makes room for N entries in the index *IX of capacity *CAP; NULL when out of memory. */
struct id_pos *
index_grow(struct id_pos **ix, size_t *cap, size_t n)
{
	struct id_pos *p;
	size_t c = *cap ? *cap : 64;

	if (n <= *cap)
		return *ix;
	while (c < n)
		c *= 2;
	if ((p = realloc(*ix, c * sizeof(*p))) == NULL)
		return NULL;
	*ix = p;
	*cap = c;
	return p;
}
