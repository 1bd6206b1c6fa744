#ifndef BW_COMPLETION_H
#define BW_COMPLETION_H

#include <stdbool.h>
#include <stdint.h>

#include "common/item.h"

/*
 * What one attempt at an item ended with: the outcome module decides it
 * (billing/outcome.c), the loop hands it to the store, which records it.
 * A value type shared by both, so neither includes the other: billing
 * knows nothing of the store, and the store records outcomes without
 * knowing how answers are classified.
 */

enum completion_state {
	COMPLETION_DONE,        /* paid / redeemed with result_id */
	COMPLETION_FAILED,      /* failed for good, with error */
	COMPLETION_RETRY,       /* pending again after delay_ms */
};

/* RETRY with this delay: not before an operator looks (next_attempt_at infinity). */
#define COMPLETION_DELAY_NEVER (-1)

/* The outcome itself.  Fixed buffers: a completion costs no allocation. */
struct completion {
	enum item_kind kind;
	int64_t id;
	int64_t fence;
	enum completion_state state;
	int calls;              /* API calls this attempt made: 0 or 1 */
	bool blocked;           /* the call was answered 401/403/404/405 */
	bool ambiguous;         /* some attempt so far may have taken effect */
	int64_t delay_ms;       /* RETRY: when to try again, or COMPLETION_DELAY_NEVER */
	char result_id[256];    /* DONE: the API's id */
	char error[512];        /* FAILED, RETRY: last_error ("" for none) */
	/*
	 * RETRY: why the item waits for an operator ("" when it does not);
	 * status lists it, with error as the answer that stopped it.  With
	 * error "" the item's last_error is kept.
	 */
	char operator_note[256];
	/* For the history (attempts): when the call started, what answered. */
	int64_t started_unix_ms;
	long http_status;               /* 0: no HTTP answer */
	const char *history_class;      /* static; NULL: "not called" */
};

#endif
