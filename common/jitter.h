#ifndef BW_JITTER_H
#define BW_JITTER_H

#include <stdint.h>

/*
 * A small fast generator (xorshift64*) for backoff jitter and shuffling
 * candidates: seeded from the kernel, never used for anything secret (lock
 * tokens come from getrandom directly).
 */
struct jitter {
	uint64_t state;
};

void jitter_seed(struct jitter *j);
uint64_t jitter_next(struct jitter *j);

#endif
