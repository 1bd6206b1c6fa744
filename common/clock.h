#ifndef BW_CLOCK_H
#define BW_CLOCK_H

#include <stdint.h>

/* Milliseconds on the monotonic clock: for deadlines and intervals, never dates. */
int64_t clock_ms(void);

#endif
