#include "billing/fleet.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "billing/pace.h"
#include "common/clock.h"
#include "common/log.h"

/* The budget may bank this much time's worth of calls. */
#define RATE_BURST_MS 50

/*
 * ARGV: the rate (calls per second, 0 = no limit), the bucket size, the
 * calls wanted, the due items offered, this worker's id, the fleet's key
 * prefix.  Grants at most as many calls as the bucket holds, and none
 * while a 429 pause is in force.  Returns the calls granted, how long to
 * wait before more may start, and how many workers asked within the last
 * 10 s.  The bucket is the one earlier releases spent in their lock
 * script, with the same fields and arithmetic.  Keys outside KEYS make
 * this single-instance only.
 */
static const char script_grant[] =
    "local rate = tonumber(ARGV[1]) local burst = tonumber(ARGV[2]) "
    "local want = tonumber(ARGV[3]) local offered = tonumber(ARGV[4]) "
    "local pre = ARGV[6] "
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
    "local allow, wait, tokens = want, 0, 0 "
    "local pause = tonumber(redis.call('GET', pre .. 'rate:pause') or '0') "
    "if pause > now then allow = 0 wait = pause - now "
    "elseif rate > 0 then "
    "  local b = redis.call('HMGET', pre .. 'rate:bucket', 'tokens', 'ts') "
    "  tokens = tonumber(b[1]) or burst "
    "  local ts = tonumber(b[2]) or now "
    "  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end "
    "  allow = math.max(0, math.min(allow, math.floor(tokens))) "
    "  tokens = tokens - allow "
    "  redis.call('HSET', pre .. 'rate:bucket', 'tokens', tostring(tokens), 'ts', now) "
    "  redis.call('PEXPIRE', pre .. 'rate:bucket', 60000) "
    "  if allow < offered and tokens < 1 then wait = math.ceil((1 - tokens) * 1000 / rate) end "
    "end "
    "redis.call('ZADD', pre .. 'workers', now, ARGV[5]) "
    "redis.call('ZREMRANGEBYSCORE', pre .. 'workers', 0, now - 10000) "
    "return {allow, wait, redis.call('ZCARD', pre .. 'workers')}";

/*
 * Puts ARGV[3] unused calls back (never above the bucket size); ARGV[1]
 * and [2] are the rate and bucket size, ARGV[4] "1" when the grant was
 * short of the due items (the wait then counts), ARGV[5] the prefix.
 * Returns the wait, computed as the grant does.
 */
static const char script_give_back[] =
    "local rate = tonumber(ARGV[1]) local burst = tonumber(ARGV[2]) "
    "local back = tonumber(ARGV[3]) local short = ARGV[4] == '1' local pre = ARGV[5] "
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
    "local pause = tonumber(redis.call('GET', pre .. 'rate:pause') or '0') "
    "local b = redis.call('HMGET', pre .. 'rate:bucket', 'tokens', 'ts') "
    "local tokens = tonumber(b[1]) or burst "
    "local ts = tonumber(b[2]) or now "
    "if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end "
    "tokens = math.min(burst, tokens + back) "
    "redis.call('HSET', pre .. 'rate:bucket', 'tokens', tostring(tokens), 'ts', now) "
    "redis.call('PEXPIRE', pre .. 'rate:bucket', 60000) "
    "local wait = 0 "
    "if pause > now then wait = pause - now "
    "elseif short and tokens < 1 then wait = math.ceil((1 - tokens) * 1000 / rate) end "
    "return {wait}";

/*
 * Pauses every worker of the fleet for ARGV[1] ms (never shortens a
 * pause); ARGV[2] is the fleet's key prefix.
 */
static const char script_pause[] =
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
    "local untl = now + tonumber(ARGV[1]) local pre = ARGV[2] "
    "local cur = tonumber(redis.call('GET', pre .. 'rate:pause') or '0') "
    "if untl > cur then redis.call('SET', pre .. 'rate:pause', untl, 'PX', ARGV[1]) end "
    "return {0}";

/* Takes ARGV[1] out of the registry; ARGV[2] is the fleet's key prefix. */
static const char script_leave[] =
    "redis.call('ZREM', ARGV[2] .. 'workers', ARGV[1]) return {0}";

struct fleet {
	redis_conn *conn;               /* borrowed; NULL: never shared */
	/* the shared grant's call, between fleet_grant_call() and fleet_grant_done() */
	char args_buf[4][24];
	const char *args[6];
	long long out[3];
	size_t want, offered;
	int grant, give_back, pause, leave;     /* script ids on conn */
	char *member;
	int rate;
	int workers_seen;               /* in the registry, at the last shared grant */
	bool registry_read;             /* a shared grant has counted them */
	bool short_grant;               /* the last grant was below the due items */
	struct pace pace;               /* the local share, while Redis cannot be asked */
	int64_t wait_ms;
};

static int
burst_of(int rate)
{
	return rate * RATE_BURST_MS / 1000 > 1 ? rate * RATE_BURST_MS / 1000 : 1;
}

int
fleet_new(redis_conn *conn, const char *member, fleet **ret)
{
	fleet *f;

	if ((f = calloc(1, sizeof(*f))) == NULL)
		return -1;
	f->conn = conn;
	f->workers_seen = 1;
	pace_init(&f->pace, 0, RATE_BURST_MS, clock_ms());
	if ((f->member = strdup(member)) == NULL ||
	    (conn != NULL &&
	    (redis_conn_script(conn, "rate", script_grant, &f->grant) == -1 ||
	    redis_conn_script(conn, "rate", script_give_back, &f->give_back) == -1 ||
	    redis_conn_script(conn, "rate", script_pause, &f->pause) == -1 ||
	    redis_conn_script(conn, "rate", script_leave, &f->leave) == -1))) {
		fleet_free(f);
		return -1;
	}
	*ret = f;
	return 0;
}

void
fleet_free(fleet *f)
{
	if (f == NULL)
		return;
	free(f->member);
	free(f);
}

/* The local fallback bucket, at this process's share of the fleet's rate. */
static void
pace_reset(fleet *f)
{
	int64_t paused = f->pace.paused_until_ms;
	double share = f->rate > 0 ? (double)f->rate / f->workers_seen : 0;

	pace_init(&f->pace, share, RATE_BURST_MS, clock_ms());
	pace_pause(&f->pace, paused);
}

void
fleet_set_rate(fleet *f, int calls_per_second)
{
	f->rate = calls_per_second;
	pace_reset(f);
}

int64_t
fleet_wait_ms(const fleet *f)
{
	return f->wait_ms;
}

static int
grant_local(fleet *f, size_t want, size_t *ret_granted)
{
	int64_t now = clock_ms();
	int granted = pace_take(&f->pace, want > INT32_MAX ? INT32_MAX : (int)want, now);

	f->wait_ms = granted == 0 ? pace_wait_ms(&f->pace, now) : 0;
	*ret_granted = (size_t)granted;
	return 0;
}

void
fleet_grant_call(fleet *f, size_t want, size_t offered, struct redis_eval *ev)
{
	f->wait_ms = 0;
	f->short_grant = false;
	for (int i = 0; i < 4; i++)
		f->args[i] = f->args_buf[i];
	f->args[4] = f->member;
	f->args[5] = redis_conn_prefix(f->conn);
	snprintf(f->args_buf[0], sizeof(f->args_buf[0]), "%d", f->rate);
	snprintf(f->args_buf[1], sizeof(f->args_buf[1]), "%d", burst_of(f->rate));
	snprintf(f->args_buf[2], sizeof(f->args_buf[2]), "%zu", want);
	snprintf(f->args_buf[3], sizeof(f->args_buf[3]), "%zu", offered);
	f->want = want;
	f->offered = offered;
	*ev = (struct redis_eval){ .id = f->grant, .args = f->args, .nargs = 6, .out = f->out,
	    .nout = 3 };
}

void
fleet_grant_done(fleet *f, size_t *ret_granted)
{
	*ret_granted = f->out[0] > 0 ? (size_t)f->out[0] : 0;
	if (*ret_granted > f->want)
		*ret_granted = f->want;
	f->wait_ms = f->out[1];
	f->short_grant = *ret_granted < f->offered;
	if (f->out[2] > 0) {
		f->registry_read = true;
		if (f->out[2] != f->workers_seen) {
			f->workers_seen = (int)f->out[2];
			pace_reset(f);
		}
	}
}

bool
fleet_limited(const fleet *f)
{
	return f->rate > 0;
}

int
fleet_workers(const fleet *f)
{
	return f->registry_read ? f->workers_seen : 0;
}

int
fleet_grant(fleet *f, bool shared, size_t want, size_t offered, size_t *ret_granted)
{
	struct redis_eval ev;

	f->wait_ms = 0;
	f->short_grant = false;
	*ret_granted = 0;
	if (!shared || f->conn == NULL)
		return grant_local(f, want, ret_granted);
	fleet_grant_call(f, want, offered, &ev);
	if (redis_conn_eval_many(f->conn, &ev, 1) == -1)
		return -1;
	fleet_grant_done(f, ret_granted);
	return 0;
}

void
fleet_give_back(fleet *f, size_t unused)
{
	char rate[24], burst[24], back[24];
	const char *args[5] = { rate, burst, back, f->short_grant ? "1" : "0", NULL };
	long long wait;

	/* Without a limit the grant spent nothing. */
	if (unused == 0 || f->rate == 0 || f->conn == NULL || !redis_conn_connected(f->conn))
		return;
	args[4] = redis_conn_prefix(f->conn);
	snprintf(rate, sizeof(rate), "%d", f->rate);
	snprintf(burst, sizeof(burst), "%d", burst_of(f->rate));
	snprintf(back, sizeof(back), "%zu", unused);
	if (redis_conn_eval(f->conn, f->give_back, NULL, 0, args, 5, &wait, 1) == -1) {
		/* A lost connection is the lock manager's to report, at the next claim. */
		if (redis_conn_connected(f->conn))
			log_warnx("could not give unused calls back to the fleet's rate budget: %s",
			    redis_conn_errmsg(f->conn));
		return;
	}
	f->wait_ms = wait;
}

void
fleet_pause(fleet *f, int pause_ms)
{
	char ms[24];
	const char *args[2] = { ms, NULL };
	long long ignored;

	pace_pause(&f->pace, clock_ms() + pause_ms);
	if (f->conn == NULL || !redis_conn_connected(f->conn))
		return;
	args[1] = redis_conn_prefix(f->conn);
	snprintf(ms, sizeof(ms), "%d", pause_ms > 0 ? pause_ms : 1);
	if (redis_conn_eval(f->conn, f->pause, NULL, 0, args, 2, &ignored, 1) == -1 &&
	    redis_conn_connected(f->conn))
		log_warnx("could not set the fleet's 429 pause in redis: %s",
		    redis_conn_errmsg(f->conn));
}

void
fleet_leave(fleet *f)
{
	const char *args[2] = { f->member, NULL };
	long long ignored;

	if (f->conn == NULL || !redis_conn_connected(f->conn))
		return;
	args[1] = redis_conn_prefix(f->conn);
	if (redis_conn_eval(f->conn, f->leave, NULL, 0, args, 2, &ignored, 1) == -1 &&
	    redis_conn_connected(f->conn))
		log_warnx("could not take this worker out of the fleet's registry in redis: %s",
		    redis_conn_errmsg(f->conn));
}
