#ifndef BW_BACKOFF_H
#define BW_BACKOFF_H

#include <stdint.h>

/*
 * Every delay that doubles, in one place: an item's retry after a failed
 * call (with jitter, below) and the loop's reconnects, flush retries and
 * probes (struct backoff).
 */

/*
 * Exponential backoff with full jitter: a delay drawn uniformly from
 * [0, min(max_ms, initial_ms * 2^(attempt-1))].  ATTEMPT counts from 1 (the
 * delay after the first failed call).  RND is a uniform 64-bit value from
 * the caller, so the function is pure and tests are deterministic.
 */
int64_t backoff_delay_ms(int attempt, int64_t initial_ms, int64_t max_ms, uint64_t rnd);

/* The upper bound the jitter is drawn below, for the same arguments. */
int64_t backoff_cap_ms(int attempt, int64_t initial_ms, int64_t max_ms);

/*
 * A delay that starts at min_ms and doubles up to max_ms each time it is
 * taken, until reset: for retrying one thing (a connection, a flush, a
 * probe) that keeps failing.  A value type; zero it, then backoff_init.
 */
struct backoff {
	int64_t min_ms;
	int64_t max_ms;
	int64_t next_ms;        /* what backoff_take returns next */
};

void backoff_init(struct backoff *b, int64_t min_ms, int64_t max_ms);

/* The delay to wait now; the one after it is twice as long, up to max_ms. */
int64_t backoff_take(struct backoff *b);

/* The delay backoff_take would return, without taking it. */
int64_t backoff_peek(const struct backoff *b);

/* Success: the next failure waits min_ms again. */
void backoff_reset(struct backoff *b);

#endif
