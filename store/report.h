#ifndef BW_REPORT_H
#define BW_REPORT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common/item.h"
#include "store/store.h"

/*
 * Read-only reports on the whole fleet's work, from store/report.c (the
 * text report, store_status(), is declared in store.h).
 */

/*
 * Writes the status report as one JSON document to OUT: the same content
 * as store_status(), for scripts and monitoring.
 */
int store_status_json(store *st, FILE *out, int max_attempts)
	__attribute__((warn_unused_result));

/*
 * Writes the failed items to OUT, as text or (JSON true) one JSON
 * document: grouped by kind and reason (last_error), the group with the
 * newest failure first, each with its count, its newest and oldest failure
 * and the ids of its newest items, so an operator can see what failed and
 * requeue it.
 */
int store_status_failed(store *st, FILE *out, bool json)
	__attribute__((warn_unused_result));

/* Items due now are counted up to this many per kind, to bound the query. */
#define STORE_BACKLOG_CAP 100000

/*
 * The backlog, per kind (indexed by enum item_kind): items due now that no
 * lease holds, up to STORE_BACKLOG_CAP, and the age in seconds of the oldest
 * pending item (0 when none).  One short statement.
 */
int store_backlog(store *st, int64_t due[ITEM_KIND_COUNT],
    double oldest_pending_s[ITEM_KIND_COUNT]) __attribute__((warn_unused_result));

#endif
