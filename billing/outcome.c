#include "billing/outcome.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "common/backoff.h"

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

int
outcome_before_call(const struct item *it, const struct retry_policy *p,
    struct completion *out)
{
	if (!it->ambiguous || p->key_ttl_ms <= 0 || it->key_age_ms < p->key_ttl_ms)
		return 0;
	outcome_init(it, out);
	out->state = COMPLETION_RETRY;
	out->delay_ms = COMPLETION_DELAY_NEVER;
	/* error "": last_error keeps the answer of the attempt that was ambiguous. */
	snprintf(out->operator_note, sizeof(out->operator_note), "idempotency key may have "
	    "expired: first claimed %" PRId64 " s ago, billing_api.idempotency_key_ttl_s is %"
	    PRId64 "; a retry under it could charge twice, so it is not retried",
	    it->key_age_ms / 1000, p->key_ttl_ms / 1000);
	return 1;
}

/*
 * A refusal that the API does not store under the key, for an item an
 * earlier attempt of which may have taken effect: it says nothing about
 * that attempt, so the item is neither failed nor given up.  It is retried
 * every backoff_max_ms (a producer may put the row back) and listed for an
 * operator.
 */
static void
wait_for_operator(const struct api_verdict *v, const struct retry_policy *p,
    struct completion *out)
{
	out->state = COMPLETION_RETRY;
	out->delay_ms = p->backoff_max_ms;
	set_error(out, v->error);
	snprintf(out->operator_note, sizeof(out->operator_note), "an earlier attempt may have "
	    "taken effect and the API's %s answer does not say whether; only a 2xx or a "
	    "stored refusal (402) is final", api_class_name(v->cls));
}

void
outcome_after_call(const struct item *it, const struct api_verdict *v,
    const struct retry_policy *p, uint64_t rnd, struct completion *out)
{
	/* Worker-level answers never count toward giving up. */
	int counted = it->attempts - it->blocked_calls, calls_so_far;
	int64_t delay;

	if (counted < 0)
		counted = 0;
	calls_so_far = counted + 1;
	outcome_init(it, out);
	out->calls = 1;

	switch (v->cls) {
	case API_SUCCESS:
		out->state = COMPLETION_DONE;
		snprintf(out->result_id, sizeof(out->result_id), "%s", v->id);
		return;
	case API_DECLINED:
		/*
		 * A business refusal is stored under the key, so it also
		 * answers for any earlier ambiguous attempt: had one charged,
		 * this call would have been its replay.
		 */
		out->state = COMPLETION_FAILED;
		set_error(out, v->error);
		return;
	case API_REFUSED:
	case API_KEY_REUSED:
		if (it->ambiguous) {
			wait_for_operator(v, p, out);
			return;
		}
		out->state = COMPLETION_FAILED;
		set_error(out, v->error);
		return;
	case API_WORKER:
		/* About the token or URL: pending as it was, soon, for any worker. */
		out->blocked = true;
		out->state = COMPLETION_RETRY;
		out->delay_ms = backoff_delay_ms(1, p->backoff_initial_ms, p->backoff_max_ms, rnd);
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
