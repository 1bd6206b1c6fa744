#ifndef BW_OUTCOME_H
#define BW_OUTCOME_H

#include <stdint.h>

#include "billing/response.h"
#include "common/item.h"
#include "common/completion.h"

/*
 * Turns the verdict on one API call into what the store records: done,
 * failed, or retry later.  Pure; the one place the give-up rule lives.
 */

struct retry_policy {
	int max_attempts;
	int64_t backoff_initial_ms;
	int64_t backoff_max_ms;
	int64_t key_ttl_ms;     /* how long the API keeps a key; 0: forever */
};

/*
 * Before calling the API for IT: returns 1 and fills OUT when the call must
 * not be made, because IT may already have taken effect under a key the API
 * may have forgotten (older than key_ttl_ms): a replay would be a second
 * charge.  OUT then leaves it pending, not retried, for an operator.
 * Returns 0 when the call may go ahead.
 */
int outcome_before_call(const struct item *it, const struct retry_policy *p,
    struct completion *out);

/*
 * Decides the completion of IT after one API call answered V.  RND is a
 * uniform random value for the backoff jitter.  An item some attempt of
 * which may have taken effect (ambiguous, now or before) is never failed
 * for running out of attempts: it is retried every backoff_max_ms until the
 * API answers definitively, and after such an attempt only a 2xx or a
 * stored refusal (402) is definitive: any other refusal leaves it pending
 * for an operator.  A worker-level answer (401, 403, 404, 405) never fails
 * an item and never counts toward max_attempts.
 */
void outcome_after_call(const struct item *it, const struct api_verdict *v,
    const struct retry_policy *p, uint64_t rnd, struct completion *out);

/* The completion of an item refused before any call (bad data, no funds). */
void outcome_refused(const struct item *it, const char *reason, struct completion *out);

/*
 * The completion of a call abandoned mid-flight (shutdown deadline): it may
 * have reached the API, so it is ambiguous and due again at once.
 */
void outcome_abandoned(const struct item *it, const char *reason, struct completion *out);

#endif
