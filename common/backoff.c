#include "common/backoff.h"

int64_t
backoff_cap_ms(int attempt, int64_t initial_ms, int64_t max_ms)
{
	int64_t cap = initial_ms;

	if (attempt < 1)
		attempt = 1;
	/*
	 * Doubling stops at max_ms, and never doubles past it, so no overflow
	 * for any attempt count or max_ms.
	 */
	for (int i = 1; i < attempt && cap > 0 && cap < max_ms; i++)
		cap = cap > max_ms / 2 ? max_ms : cap * 2;
	return cap < max_ms ? cap : max_ms;
}

int64_t
backoff_delay_ms(int attempt, int64_t initial_ms, int64_t max_ms, uint64_t rnd)
{
	int64_t cap = backoff_cap_ms(attempt, initial_ms, max_ms);

	if (cap <= 0)
		return 0;
	return (int64_t)(rnd % ((uint64_t)cap + 1));
}

void
backoff_init(struct backoff *b, int64_t min_ms, int64_t max_ms)
{
	b->min_ms = min_ms > 0 ? min_ms : 1;
	b->max_ms = max_ms > b->min_ms ? max_ms : b->min_ms;
	b->next_ms = b->min_ms;
}

int64_t
backoff_take(struct backoff *b)
{
	int64_t now = b->next_ms;

	/* Never doubles past max_ms, so no overflow however often it is taken. */
	b->next_ms = now > b->max_ms / 2 ? b->max_ms : now * 2;
	return now;
}

int64_t
backoff_peek(const struct backoff *b)
{
	return b->next_ms;
}

void
backoff_reset(struct backoff *b)
{
	b->next_ms = b->min_ms;
}
