#ifndef BW_CLOCK_H
#define BW_CLOCK_H

#include <stdint.h>

/* Milliseconds on the monotonic clock: for deadlines and intervals, never dates. */
int64_t clock_ms(void);

/* Milliseconds since the epoch: for records (the history's times), never intervals. */
int64_t clock_wall_ms(void);

#endif
