/*
 * One blocking question to each server, for a person at a terminal:
 * unlike the loop, nothing here has to share a poll with anything.
 */

#include "worker/probe.h"

#include <stdio.h>
#include <string.h>

#include "billing/api.h"
#include "common/redis.h"
#include "store/store.h"
#include "worker/claim.h"

/*
 * libpq's messages run over several lines ("...failed: Connection
 * refused\n\tIs the server running..."): one line per server is the
 * promise, so each line break and the indent after it become a space.
 */
static void
one_line(const char *msg, char *buf, size_t len)
{
	size_t o = 0;

	for (const char *p = msg; *p != '\0' && o + 1 < len; p++) {
		if (*p == '\n') {
			p += strspn(p + 1, " \t");
			if (p[1] != '\0' && o > 0)
				buf[o++] = ' ';
		} else {
			buf[o++] = *p;
		}
	}
	buf[o] = '\0';
}

static int
probe_database(const struct bw_config *cfg)
{
	store *st = NULL;
	char target[768], msg[1024];
	int ret = -1;

	if (store_new(cfg->database.conninfo, cfg->worker.id, &st) == -1) {
		printf("database: out of memory\n");
		return -1;
	}
	store_set_query_timeout(st, cfg->database.query_timeout_ms);
	store_set_pooling(st, cfg->database.pooling == DB_POOLING_TRANSACTION);
	if (store_connect(st) == -1) {
		one_line(store_errmsg(st), msg, sizeof(msg));
		printf("database: no answer: %s\n", msg);
	} else {
		store_target(st, target, sizeof(target));
		if (store_check_schema(st) == -1) {
			one_line(store_errmsg(st), msg, sizeof(msg));
			printf("database: answered (%s), but %s\n", target, msg);
		} else {
			printf("database: answered (%s), schema up to date\n", target);
			ret = 0;
		}
	}
	store_free(st);
	return ret;
}

static int
probe_redis(const struct bw_config *cfg, const char *password)
{
	struct redis_options o;
	redis_conn *rc = NULL;
	char where[600], answer[64];
	int ret = -1;

	if (cfg->locks.mode == LOCK_MODE_SKIP_LOCKED) {
		printf("redis: not used (locks.mode \"skip-locked\")\n");
		return 0;
	}
	claim_redis_options(cfg, password, &o);
	if (redis_conn_new(&o, &rc) == -1) {
		printf("redis: out of memory\n");
		return -1;
	}
	redis_conn_describe(rc, where, sizeof(where));
	if (redis_conn_connect(rc) == -1 || redis_conn_ping(rc, answer, sizeof(answer)) == -1)
		printf("redis: no answer at %s: %s\n", where, redis_conn_errmsg(rc));
	else {
		/* With sentinels, which master they named and which one did. */
		redis_conn_describe(rc, where, sizeof(where));
		printf("redis: %s answered %s%s\n", where, answer,
		    password != NULL ? " (after AUTH)" : "");
		ret = 0;
	}
	redis_conn_free(rc);
	return ret;
}

static int
probe_api(const struct bw_config *cfg)
{
	char url[2048], what[512], err[512];

	config_url_for_log(cfg->billing_api.base_url, url, sizeof(url));
	if (api_probe(cfg->billing_api.base_url, cfg->billing_api.ca_file,
	    cfg->billing_api.connect_timeout_ms, what, sizeof(what), err, sizeof(err)) == -1) {
		printf("billing api: no answer from \"%s\": %s\n", url, err);
		return -1;
	}
	printf("billing api: \"%s\": %s (no request sent)\n", url, what);
	return 0;
}

int
probe_all(const struct bw_config *cfg, const char *redis_password)
{
	int failed = 0;

	/* Each is asked even when one before failed: the operator sees all three. */
	failed += probe_database(cfg) == -1;
	failed += probe_redis(cfg, redis_password) == -1;
	failed += probe_api(cfg) == -1;
	fflush(stdout);
	return failed == 0 ? 0 : -1;
}
