#include "common/jitter.h"

#include <sys/random.h>

#include "common/clock.h"

void
jitter_seed(struct jitter *j)
{
	if (getrandom(&j->state, sizeof(j->state), 0) != (ssize_t)sizeof(j->state) ||
	    j->state == 0)
		j->state = (uint64_t)clock_ms() | 1;     /* xorshift must not start at 0 */
}

uint64_t
jitter_next(struct jitter *j)
{
	j->state ^= j->state >> 12;
	j->state ^= j->state << 25;
	j->state ^= j->state >> 27;
	return j->state * 2685821657736338717ULL;
}
