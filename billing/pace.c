#include "billing/pace.h"

#include <math.h>

static void
refill(struct pace *p, int64_t now_ms)
{
	if (now_ms > p->updated_ms) {
		p->tokens += (double)(now_ms - p->updated_ms) * p->rate / 1000.0;
		if (p->tokens > p->burst)
			p->tokens = p->burst;
		p->updated_ms = now_ms;
	}
}

void
pace_init(struct pace *p, double rate, int burst_ms, int64_t now_ms)
{
	p->rate = rate > 0 ? rate : 0;
	/* At least one call must fit, or a low rate could never start any. */
	p->burst = p->rate * burst_ms / 1000.0;
	if (p->burst < 1)
		p->burst = 1;
	p->tokens = p->burst;
	p->updated_ms = now_ms;
	p->paused_until_ms = 0;
}

int
pace_take(struct pace *p, int want, int64_t now_ms)
{
	int granted;

	if (want <= 0 || now_ms < p->paused_until_ms)
		return 0;
	if (p->rate == 0)
		return want;
	refill(p, now_ms);
	granted = (int)floor(p->tokens);
	if (granted > want)
		granted = want;
	p->tokens -= granted;
	return granted;
}

int64_t
pace_wait_ms(const struct pace *p, int64_t now_ms)
{
	double missing, tokens;

	if (now_ms < p->paused_until_ms)
		return p->paused_until_ms - now_ms;
	if (p->rate == 0)
		return 0;
	tokens = p->tokens + (double)(now_ms - p->updated_ms) * p->rate / 1000.0;
	if (tokens >= 1)
		return 0;
	missing = 1 - tokens;
	return (int64_t)ceil(missing * 1000.0 / p->rate);
}

void
pace_pause(struct pace *p, int64_t until_ms)
{
	if (until_ms > p->paused_until_ms)
		p->paused_until_ms = until_ms;
}
