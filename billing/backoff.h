#ifndef BW_BACKOFF_H
#define BW_BACKOFF_H

#include <stdint.h>

/*
 * Exponential backoff with full jitter: a delay drawn uniformly from
 * [0, min(max_ms, initial_ms * 2^(attempt-1))].  ATTEMPT counts from 1 (the
 * delay after the first failed call).  RND is a uniform 64-bit value from
 * the caller, so the function is pure and tests are deterministic.
 */
int64_t backoff_delay_ms(int attempt, int64_t initial_ms, int64_t max_ms, uint64_t rnd);

/* The upper bound the jitter is drawn below, for the same arguments. */
int64_t backoff_cap_ms(int attempt, int64_t initial_ms, int64_t max_ms);

#endif
