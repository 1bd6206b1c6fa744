#include "billing/outcome.h"

#include <stdio.h>
#include <string.h>

#include "billing/backoff.h"

static void
outcome_init(const struct item *it, struct completion *out)
{
	memset(out, 0, sizeof(*out));
	out->kind = it->kind;
	out->id = it->id;
	out->fence = it->fence;
	out->ambiguous = it->ambiguous;
}

static void
set_error(struct completion *out, const char *text)
{
	snprintf(out->error, sizeof(out->error), "%s", text);
}

void
outcome_after_call(const struct item *it, const struct api_verdict *v,
    const struct retry_policy *p, uint64_t rnd, struct completion *out)
{
	int calls_so_far = it->attempts + 1;
	int64_t delay;

	outcome_init(it, out);
	out->calls = 1;

	switch (v->cls) {
	case API_SUCCESS:
		out->state = COMPLETION_DONE;
		snprintf(out->result_id, sizeof(out->result_id), "%s", v->id);
		return;
	case API_REFUSED:
	case API_KEY_REUSED:
		/*
		 * A definitive refusal is stored under the key, so it also
		 * answers for any earlier ambiguous attempt: had one charged,
		 * this call would have been its replay.
		 */
		out->state = COMPLETION_FAILED;
		set_error(out, v->error);
		return;
	case API_IN_PROGRESS:
	case API_AMBIGUOUS:
		out->ambiguous = true;
		break;
	case API_TRANSIENT:
		break;
	}

	set_error(out, v->error);
	if (!out->ambiguous && calls_so_far >= p->max_attempts) {
		out->state = COMPLETION_FAILED;
		snprintf(out->error, sizeof(out->error), "gave up after %d attempts: %s",
		    calls_so_far, v->error);
		return;
	}
	out->state = COMPLETION_RETRY;
	if (calls_so_far >= p->max_attempts)
		delay = p->backoff_max_ms;      /* ambiguous and overdue */
	else
		delay = backoff_delay_ms(calls_so_far, p->backoff_initial_ms,
		    p->backoff_max_ms, rnd);
	if (v->retry_after_s >= 0 && (int64_t)v->retry_after_s * 1000 > delay)
		delay = (int64_t)v->retry_after_s * 1000;
	out->delay_ms = delay;
}

void
outcome_refused(const struct item *it, const char *reason, struct completion *out)
{
	outcome_init(it, out);
	out->state = COMPLETION_FAILED;
	set_error(out, reason);
}

void
outcome_abandoned(const struct item *it, const char *reason, struct completion *out)
{
	outcome_init(it, out);
	out->state = COMPLETION_RETRY;
	out->calls = 1;
	out->ambiguous = true;
	set_error(out, reason);
}
