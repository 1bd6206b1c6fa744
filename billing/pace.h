#ifndef BW_PACE_H
#define BW_PACE_H

#include <stdint.h>

/*
 * A local token bucket: how many API calls this process may start now.
 * The fleet's shared budget lives in Redis (see billing/fleet.c); this
 * is what a process falls back to while Redis cannot be asked, with its
 * even share of the fleet's rate.  Pure: time comes from the caller.
 */
struct pace {
	double rate;            /* tokens per second; 0 = unlimited */
	double burst;           /* bucket capacity */
	double tokens;
	int64_t updated_ms;
	int64_t paused_until_ms;
};

/* RATE per second (0 = no limit); the bucket holds BURST_MS worth of tokens. */
void pace_init(struct pace *p, double rate, int burst_ms, int64_t now_ms);

/* Grants up to WANT calls now and spends them; 0 when paused or empty. */
int pace_take(struct pace *p, int want, int64_t now_ms);

/* Milliseconds until the next call may start (0 when one may start now). */
int64_t pace_wait_ms(const struct pace *p, int64_t now_ms);

/* No calls before UNTIL_MS (a 429's Retry-After). */
void pace_pause(struct pace *p, int64_t until_ms);

#endif
