#ifndef BW_ITEM_H
#define BW_ITEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * An item a worker has claimed: an invoice or a redemption, as read by the
 * claim, plus what this process knows of its claim.  A value type shared by
 * the store (which fills it), the locks and the billing client.  Strings are
 * owned by the item and released by item_clear().
 */

enum item_kind {
	ITEM_INVOICE = 0,
	ITEM_REDEMPTION = 1,
};
#define ITEM_KIND_COUNT 2

/*
 * Longest idempotency key or lock key we build: "redemption-" + int64, and
 * "-" + int for a generation after the first.
 */
#define ITEM_KEY_MAX 48
/* A lock token: worker id (bounded) + ':' + 32 hex digits. */
#define ITEM_TOKEN_MAX 192

struct item {
	enum item_kind kind;
	int64_t id;
	int64_t fence;          /* this claim's fencing token, from the database */
	int generation;         /* charge attempt: 1, then one more per requeue */
	int attempts;           /* API calls recorded before this claim */
	int blocked_calls;      /* of those, answered 401/403/404/405: never counted to give up */
	int64_t key_age_ms;     /* since the first claim: the idempotency key is no older */
	bool ambiguous;         /* an earlier attempt may have taken effect */
	int64_t amount_cents;
	int64_t subsidy_id;     /* redemptions only */
	bool held;              /* redemptions: a hold is in the ledger */
	char *customer_id;
	char *currency;         /* invoices only; NULL for redemptions */
	char token[ITEM_TOKEN_MAX]; /* our Redis lock value; "" when not locked there */
	bool lock_lost;         /* a renewal found the lock or lease gone */
};

const char *item_kind_name(enum item_kind kind);

/*
 * The idempotency key: "invoice-17" in the first generation, the same on
 * every attempt, forever, and "invoice-17-2", "invoice-17-3" ... once an
 * operator requeued the failed item (billing-worker requeue): a new charge
 * attempt needs a key the API has no stored refusal for.  A generation of
 * 1 or less is the first one, so a zeroed item keys as it always did.
 */
void item_key(const struct item *it, char *buf, size_t len);

/*
 * Checks the fields producers wrote before any API call is made.  Returns 0
 * when the item may be sent, else -1 with *reason set to a static string
 * suitable for last_error ("customer_id is empty").
 */
int item_validate(const struct item *it, const char **reason);

/*
 * Gives IT its own copies of CUSTOMER_ID and CURRENCY (either may be NULL:
 * absent).  Returns 0, or -1 when a copy could not be allocated: the item
 * then holds neither string, so an out-of-memory can never pass for a row
 * with a missing or bad field.  IT's strings must be unset (a zeroed item);
 * item_clear() frees the copies.
 */
int item_set_strings(struct item *it, const char *customer_id, const char *currency)
    __attribute__((warn_unused_result));

/* Frees the strings and zeroes the item; accepts a zeroed item. */
void item_clear(struct item *it);

#endif
