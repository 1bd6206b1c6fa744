#include "common/redis.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <hiredis/hiredis.h>

#include "common/log.h"

/* Scripts of every user together: the lock manager's three, the fleet's two. */
#define SCRIPT_MAX 8
/* As many as the configuration may list. */
#define SENTINEL_MAX 16
#define HOST_MAX 256

struct script {
	const char *name;
	const char *source;
	char sha[48];
};

struct sentinel {
	char host[HOST_MAX];
	int port;
};

struct redis_conn {
	char *host, *socket, *password, *username, *prefix;
	int port, db, connect_timeout_ms, command_timeout_ms;
	redisContext *ctx;
	/*
	 * With sentinels: the master's name, the sentinels in the order they
	 * are asked (from FIRST_SENTINEL on, the one that answered last), and
	 * where the connected master came from, for the log and the probe.
	 */
	char *master_name;
	struct sentinel sentinels[SENTINEL_MAX];
	int nsentinels, first_sentinel;
	char master_host[HOST_MAX];
	int master_port;
	char master_from[HOST_MAX + 16];
	struct script scripts[SCRIPT_MAX];
	int nscripts;
	char errmsg[1024];
	/* argv buffers reused across calls */
	const char **argv;
	size_t *argvlen;
	size_t argcap;
};

static void
set_err(redis_conn *rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
set_err(redis_conn *rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(rc->errmsg, sizeof(rc->errmsg), fmt, ap);
	va_end(ap);
}

/*
 * Splits "HOST:PORT,HOST:PORT" (the configuration's form, already checked
 * there) into RC's table; an IPv6 host comes in brackets, kept without.
 */
static int
parse_sentinels(redis_conn *rc, const char *list)
{
	const char *p = list;

	while (*p != '\0') {
		size_t len = strcspn(p, ",");
		const char *colon = NULL;
		struct sentinel *s;
		size_t hlen;

		for (size_t i = 0; i < len; i++)
			if (p[i] == ':')
				colon = p + i;
		if (rc->nsentinels == SENTINEL_MAX || colon == NULL)
			return -1;
		s = &rc->sentinels[rc->nsentinels++];
		hlen = (size_t)(colon - p);
		if (hlen >= 2 && p[0] == '[' && colon[-1] == ']') {
			p++;
			hlen -= 2;
		}
		if (hlen == 0 || hlen >= sizeof(s->host))
			return -1;
		memcpy(s->host, p, hlen);
		s->host[hlen] = '\0';
		s->port = atoi(colon + 1);
		if (s->port < 1 || s->port > 65535)
			return -1;
		p = colon + strcspn(colon, ",");
		if (*p == ',')
			p++;
	}
	return 0;
}

int
redis_conn_new(const struct redis_options *o, redis_conn **ret)
{
	redis_conn *rc;

	if ((rc = calloc(1, sizeof(*rc))) == NULL)
		return -1;
	if (o->sentinels != NULL && o->sentinels[0] != '\0' &&
	    (parse_sentinels(rc, o->sentinels) == -1 || o->master_name == NULL ||
	    o->master_name[0] == '\0' || (rc->master_name = strdup(o->master_name)) == NULL)) {
		redis_conn_free(rc);
		return -1;
	}
	rc->host = strdup(o->host ? o->host : "127.0.0.1");
	rc->socket = strdup(o->socket ? o->socket : "");
	rc->password = o->password && o->password[0] ? strdup(o->password) : NULL;
	rc->username = strdup(o->username ? o->username : "");
	rc->prefix = strdup(o->key_prefix ? o->key_prefix : "billing-worker:");
	rc->port = o->port;
	rc->db = o->db;
	rc->connect_timeout_ms = o->connect_timeout_ms;
	rc->command_timeout_ms = o->command_timeout_ms;
	if (rc->host == NULL || rc->socket == NULL || rc->username == NULL ||
	    rc->prefix == NULL ||
	    (o->password && o->password[0] && rc->password == NULL)) {
		redis_conn_free(rc);
		return -1;
	}
	*ret = rc;
	return 0;
}

void
redis_conn_free(redis_conn *rc)
{
	if (rc == NULL)
		return;
	if (rc->ctx != NULL)
		redisFree(rc->ctx);
	if (rc->password != NULL) {
		explicit_bzero(rc->password, strlen(rc->password));
		free(rc->password);
	}
	free(rc->host);
	free(rc->socket);
	free(rc->username);
	free(rc->prefix);
	free(rc->master_name);
	free(rc->argv);
	free(rc->argvlen);
	free(rc);
}

bool
redis_conn_connected(const redis_conn *rc)
{
	return rc->ctx != NULL && rc->ctx->err == 0;
}

const char *
redis_conn_errmsg(const redis_conn *rc)
{
	return rc->errmsg;
}

const char *
redis_conn_prefix(const redis_conn *rc)
{
	return rc->prefix;
}

static struct timeval
tv_of(int ms)
{
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };

	return tv;
}

/* Drops a broken connection so the next call reconnects. */
static void
drop(redis_conn *rc)
{
	if (rc->ctx != NULL) {
		set_err(rc, "%s", rc->ctx->errstr[0] ? rc->ctx->errstr : "connection lost");
		redisFree(rc->ctx);
		rc->ctx = NULL;
	}
}

/* Closes a connection that works but cannot be used (AUTH, SELECT, a script refused). */
static void
close_unusable(redis_conn *rc)
{
	redisFree(rc->ctx);
	rc->ctx = NULL;
}

/* SCRIPT LOAD of script I on a connected handle. */
static int
load_script(redis_conn *rc, int i)
{
	redisReply *r = redisCommand(rc->ctx, "SCRIPT LOAD %s", rc->scripts[i].source);

	if (r == NULL || r->type != REDIS_REPLY_STRING) {
		if (r == NULL)
			drop(rc);
		else {
			set_err(rc, "could not load %s scripts: %s", rc->scripts[i].name,
			    r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
			close_unusable(rc);
		}
		freeReplyObject(r);
		return -1;
	}
	snprintf(rc->scripts[i].sha, sizeof(rc->scripts[i].sha), "%s", r->str);
	freeReplyObject(r);
	return 0;
}

int
redis_conn_script(redis_conn *rc, const char *name, const char *source, int *ret_id)
{
	int id = rc->nscripts;

	if (id == SCRIPT_MAX)
		return -1;
	rc->scripts[id].name = name;
	rc->scripts[id].source = source;
	rc->scripts[id].sha[0] = '\0';
	rc->nscripts++;
	/* Loaded now when connected; a failure here shows at the first call. */
	if (redis_conn_connected(rc))
		(void)load_script(rc, id);
	*ret_id = id;
	return 0;
}

/*
 * Opens a connection to one server, HOST:PORT or, with HOST NULL, the
 * configured socket or host and port; AUTH and SELECT on it.  Scripts are
 * loaded by the caller once it knows this is the server to keep.
 */
static int
open_node(redis_conn *rc, const char *host, int port)
{
	redisReply *r;
	bool unix_socket = host == NULL && rc->socket[0] != '\0';

	if (rc->ctx != NULL) {
		redisFree(rc->ctx);
		rc->ctx = NULL;
	}
	if (unix_socket)
		rc->ctx = redisConnectUnixWithTimeout(rc->socket, tv_of(rc->connect_timeout_ms));
	else
		rc->ctx = redisConnectWithTimeout(host != NULL ? host : rc->host,
		    host != NULL ? port : rc->port, tv_of(rc->connect_timeout_ms));
	if (rc->ctx == NULL) {
		set_err(rc, "out of memory");
		return -1;
	}
	if (rc->ctx->err) {
		drop(rc);
		return -1;
	}
	/* A dead server must not block the loop: bound every command. */
	redisSetTimeout(rc->ctx, tv_of(rc->command_timeout_ms));
	if (!unix_socket)
		redisEnableKeepAlive(rc->ctx);
	if (rc->password != NULL) {
		/* ACL (Redis 6): AUTH user password; otherwise the default user's. */
		if (rc->username[0] != '\0')
			r = redisCommand(rc->ctx, "AUTH %s %s", rc->username, rc->password);
		else
			r = redisCommand(rc->ctx, "AUTH %s", rc->password);
		if (r == NULL || r->type == REDIS_REPLY_ERROR) {
			/* The server's answer (WRONGPASS ...) never repeats the password. */
			if (rc->username[0] != '\0')
				set_err(rc, "authentication as user \"%s\" failed%s%s",
				    rc->username, r ? ": " : "", r ? r->str : "");
			else
				set_err(rc, "authentication failed%s%s", r ? ": " : "",
				    r ? r->str : "");
			freeReplyObject(r);
			close_unusable(rc);
			return -1;
		}
		freeReplyObject(r);
	}
	/*
	 * A new connection starts in database 0, so every connect, the first
	 * and each reconnect after an outage, selects ours again.
	 */
	if (rc->db != 0) {
		r = redisCommand(rc->ctx, "SELECT %d", rc->db);
		if (r == NULL || r->type == REDIS_REPLY_ERROR) {
			set_err(rc, "could not select database %d%s%s", rc->db,
			    r ? ": " : "", r ? r->str : "");
			freeReplyObject(r);
			close_unusable(rc);
			return -1;
		}
		freeReplyObject(r);
	}
	return 0;
}

/*
 * Asks sentinel S where the master is.  Returns 1 with its address, 0 when
 * the sentinel answered but does not know the name, -1 when it did not
 * answer; the reason is in rc->errmsg.  Sentinels are asked without AUTH.
 */
static int
ask_sentinel(redis_conn *rc, const struct sentinel *s, char *host, size_t hlen, int *port)
{
	redisContext *c = redisConnectWithTimeout(s->host, s->port, tv_of(rc->connect_timeout_ms));
	redisReply *r = NULL;
	int ret = -1;

	if (c == NULL || c->err) {
		set_err(rc, "%s", c != NULL ? c->errstr : "out of memory");
		goto out;
	}
	redisSetTimeout(c, tv_of(rc->command_timeout_ms));
	r = redisCommand(c, "SENTINEL get-master-addr-by-name %s", rc->master_name);
	if (r == NULL) {
		set_err(rc, "%s", c->errstr[0] ? c->errstr : "connection lost");
	} else if (r->type == REDIS_REPLY_NIL ||
	    (r->type == REDIS_REPLY_ARRAY && r->elements == 0)) {
		set_err(rc, "does not know master \"%s\"", rc->master_name);
		ret = 0;
	} else if (r->type == REDIS_REPLY_ERROR) {
		set_err(rc, "%s", r->str);
	} else if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
	    r->element[0]->type != REDIS_REPLY_STRING ||
	    r->element[1]->type != REDIS_REPLY_STRING ||
	    r->element[0]->len >= hlen || atoi(r->element[1]->str) < 1 ||
	    atoi(r->element[1]->str) > 65535) {
		set_err(rc, "unexpected reply to SENTINEL get-master-addr-by-name");
	} else {
		snprintf(host, hlen, "%s", r->element[0]->str);
		*port = atoi(r->element[1]->str);
		ret = 1;
	}
out:
	freeReplyObject(r);
	redisFree(c);
	return ret;
}

/*
 * Whether the connected server says it is a master (ROLE).  A replica is
 * what a sentinel names for a moment during a failover, or a master
 * already demoted: it would refuse every lock with READONLY.  A user the
 * ACL forbids ROLE is trusted as it is: a write it refuses still drops
 * the connection (redis_conn_eval).
 */
static int
check_master(redis_conn *rc)
{
	redisReply *r = redisCommand(rc->ctx, "ROLE");
	int ret = -1;

	if (r == NULL) {
		drop(rc);
		return -1;
	}
	if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOPERM", 6) == 0) {
		ret = 0;
	} else if (r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
	    r->element[0]->type == REDIS_REPLY_STRING) {
		if (strcmp(r->element[0]->str, "master") == 0)
			ret = 0;
		else
			set_err(rc, "it says it is a %s, not the master", r->element[0]->str);
	} else {
		set_err(rc, "ROLE: %s", r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
	}
	freeReplyObject(r);
	if (ret == -1)
		close_unusable(rc);
	return ret;
}

/* Appends "; WHAT: rc->errmsg" to WHY, which holds LEN bytes. */
static void
note(char *why, size_t len, const char *what, const redis_conn *rc)
{
	size_t used = strlen(why);

	if (used + 1 < len)
		snprintf(why + used, len - used, "%s%s: %s", used > 0 ? "; " : "", what,
		    rc->errmsg);
}

/*
 * Finds the master through the sentinels and connects to it: each
 * sentinel in turn, from the one that answered last, names an address; the
 * first address that accepts us and says it is the master is kept.  An
 * address already tried in this round is not tried again, so a dead master
 * that every sentinel still names costs one connect, not one per sentinel.
 */
static int
connect_via_sentinels(redis_conn *rc)
{
	char why[sizeof(rc->errmsg)] = "";
	char tried[SENTINEL_MAX][HOST_MAX + 8];
	char what[2 * HOST_MAX + 64];
	int ntried = 0, nunknown = 0, nnamed = 0;

	for (int k = 0; k < rc->nsentinels; k++) {
		int i = (rc->first_sentinel + k) % rc->nsentinels;
		const struct sentinel *s = &rc->sentinels[i];
		char host[HOST_MAX], addr[HOST_MAX + 8];
		int port = 0, got;
		bool seen = false;

		snprintf(what, sizeof(what), "sentinel %s:%d", s->host, s->port);
		if ((got = ask_sentinel(rc, s, host, sizeof(host), &port)) != 1) {
			nunknown += got == 0;
			note(why, sizeof(why), what, rc);
			continue;
		}
		nnamed++;
		snprintf(addr, sizeof(addr), "%s:%d", host, port);
		for (int t = 0; t < ntried && !seen; t++)
			seen = strcmp(tried[t], addr) == 0;
		if (seen)
			continue;
		snprintf(tried[ntried++], sizeof(tried[0]), "%s", addr);
		snprintf(what, sizeof(what), "master at %s (from sentinel %s:%d)", addr,
		    s->host, s->port);
		if (open_node(rc, host, port) == -1 || check_master(rc) == -1) {
			note(why, sizeof(why), what, rc);
			continue;
		}
		rc->first_sentinel = i;
		snprintf(rc->master_host, sizeof(rc->master_host), "%s", host);
		rc->master_port = port;
		snprintf(rc->master_from, sizeof(rc->master_from), "%s:%d", s->host, s->port);
		log_info("redis master \"%s\" is %s (from sentinel %s)", rc->master_name, addr,
		    rc->master_from);
		return 0;
	}
	if (nnamed > 0)
		set_err(rc, "no master found for \"%s\": %s", rc->master_name, why);
	else if (nunknown > 0)
		set_err(rc, "no sentinel knows master \"%s\": %s", rc->master_name, why);
	else
		set_err(rc, "no sentinel answered for master \"%s\": %s", rc->master_name, why);
	return -1;
}

int
redis_conn_connect(redis_conn *rc)
{
	if (rc->nsentinels > 0) {
		if (connect_via_sentinels(rc) == -1)
			return -1;
	} else if (open_node(rc, NULL, 0) == -1) {
		return -1;
	}
	for (int i = 0; i < rc->nscripts; i++)
		if (load_script(rc, i) == -1)
			return -1;
	if (rc->nsentinels > 0)
		log_info("connected to redis at \"%s:%d\" (master \"%s\", database %d, keys \"%s*\")",
		    rc->master_host, rc->master_port, rc->master_name, rc->db, rc->prefix);
	else if (rc->socket[0] != '\0')
		log_info("connected to redis at \"%s\" (database %d, keys \"%s*\")",
		    rc->socket, rc->db, rc->prefix);
	else
		log_info("connected to redis at \"%s:%d\" (database %d, keys \"%s*\")",
		    rc->host, rc->port, rc->db, rc->prefix);
	return 0;
}

void
redis_conn_describe(const redis_conn *rc, char *buf, size_t len)
{
	if (rc->nsentinels > 0 && redis_conn_connected(rc))
		snprintf(buf, len, "master \"%s\" at \"%s:%d\" (from sentinel %s)",
		    rc->master_name, rc->master_host, rc->master_port, rc->master_from);
	else if (rc->nsentinels > 0)
		snprintf(buf, len, "master \"%s\" (from %d sentinel%s)", rc->master_name,
		    rc->nsentinels, rc->nsentinels == 1 ? "" : "s");
	else if (rc->socket[0] != '\0')
		snprintf(buf, len, "\"%s\"", rc->socket);
	else
		snprintf(buf, len, "\"%s:%d\"", rc->host, rc->port);
}

/*
 * True for the answers of a server that is not, or no longer, the master:
 * a demoted master refuses writes with READONLY, a replica that lost its
 * master may refuse everything with MASTERDOWN.
 */
static bool
not_master_error(const redisReply *r)
{
	return r != NULL && r->type == REDIS_REPLY_ERROR &&
	    (strncmp(r->str, "READONLY", 8) == 0 || strncmp(r->str, "MASTERDOWN", 10) == 0);
}

/* Room for ARGC arguments in the argument buffers. */
static int
argv_reserve(redis_conn *rc, size_t argc)
{
	const char **a;
	size_t *l;

	if (argc <= rc->argcap)
		return 0;
	if ((a = realloc(rc->argv, argc * sizeof(*a))) == NULL)
		return -1;
	rc->argv = a;
	if ((l = realloc(rc->argvlen, argc * sizeof(*l))) == NULL)
		return -1;
	rc->argvlen = l;
	rc->argcap = argc;
	return 0;
}

/* EV's EVSHA command, written at ARGV (room for 3 + nkeys + nargs); NKEYBUF holds its key count. */
static size_t
build_argv(redis_conn *rc, const struct redis_eval *ev, const char **argv, size_t *argvlen,
    char nkeybuf[24])
{
	size_t argc = 3 + ev->nkeys + ev->nargs;

	snprintf(nkeybuf, 24, "%zu", ev->nkeys);
	argv[0] = "EVALSHA";
	argv[1] = rc->scripts[ev->id].sha;
	argv[2] = nkeybuf;
	for (size_t i = 0; i < ev->nkeys; i++)
		argv[3 + i] = ev->keys[i];
	for (size_t i = 0; i < ev->nargs; i++)
		argv[3 + ev->nkeys + i] = ev->args[i];
	for (size_t i = 0; i < argc; i++)
		argvlen[i] = strlen(argv[i]);
	return argc;
}

/*
 * EV's reply R into EV's out; -1 with the error set when it is not the
 * array of NOUT results the script gives.  Consumes nothing.
 */
static int
take_reply(redis_conn *rc, const struct redis_eval *ev, const redisReply *r)
{
	if (not_master_error(r)) {
		/*
		 * Locks written here would be lost or refused: drop the
		 * connection, so the next connect asks the sentinels again.
		 */
		set_err(rc, "%s script: %s", rc->scripts[ev->id].name, r->str);
		close_unusable(rc);
		return -1;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements != ev->nout) {
		set_err(rc, "unexpected reply to %s script: %s", rc->scripts[ev->id].name,
		    r->type == REDIS_REPLY_ERROR ? r->str : "not an array of results");
		return -1;
	}
	for (size_t i = 0; i < ev->nout; i++)
		ev->out[i] = r->element[i]->type == REDIS_REPLY_INTEGER ? r->element[i]->integer : 0;
	return 0;
}

static bool
is_noscript(const redisReply *r)
{
	return r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0;
}

int
redis_conn_eval_many(redis_conn *rc, const struct redis_eval *ev, size_t n)
{
	char nkeybufs[REDIS_EVAL_MAX][24];
	size_t argc[REDIS_EVAL_MAX], total = 0, at = 0;
	redisReply *replies[REDIS_EVAL_MAX] = { NULL };
	int ret = 0;

	if (!redis_conn_connected(rc)) {
		set_err(rc, "not connected to redis");
		return -1;
	}
	if (n == 0 || n > REDIS_EVAL_MAX) {
		set_err(rc, "%zu script calls in one round trip", n);
		return -1;
	}
	for (size_t k = 0; k < n; k++) {
		if (ev[k].id < 0 || ev[k].id >= rc->nscripts) {
			set_err(rc, "no such script");
			return -1;
		}
		total += 3 + ev[k].nkeys + ev[k].nargs;
	}
	if (argv_reserve(rc, total) == -1) {
		set_err(rc, "out of memory");
		return -1;
	}
	/* Every command first, then every reply: one round trip for all of them. */
	for (size_t k = 0; k < n; k++) {
		argc[k] = build_argv(rc, &ev[k], rc->argv + at, rc->argvlen + at, nkeybufs[k]);
		if (redisAppendCommandArgv(rc->ctx, (int)argc[k], rc->argv + at,
		    rc->argvlen + at) != REDIS_OK) {
			drop(rc);
			return -1;
		}
		at += argc[k];
	}
	for (size_t k = 0; k < n; k++) {
		void *r = NULL;

		if (redisGetReply(rc->ctx, &r) != REDIS_OK || r == NULL) {
			for (size_t j = 0; j < k; j++)
				freeReplyObject(replies[j]);
			drop(rc);
			return -1;
		}
		replies[k] = r;
	}
	at = 0;
	for (size_t k = 0; k < n && rc->ctx != NULL; k++) {
		redisReply *r = replies[k];

		if (is_noscript(r)) {
			/* A restarted or flushed server: load the script and run the call again. */
			redisReply *l = redisCommand(rc->ctx, "SCRIPT LOAD %s",
			    rc->scripts[ev[k].id].source);

			freeReplyObject(r);
			replies[k] = NULL;
			if (l == NULL) {
				drop(rc);
				ret = -1;
				break;
			}
			freeReplyObject(l);
			r = redisCommandArgv(rc->ctx, (int)argc[k], rc->argv + at, rc->argvlen + at);
			if (r == NULL) {
				drop(rc);
				ret = -1;
				break;
			}
			replies[k] = r;
		}
		if (take_reply(rc, &ev[k], r) == -1)
			ret = -1;
		at += argc[k];
	}
	for (size_t k = 0; k < n; k++)
		freeReplyObject(replies[k]);
	return ret;
}

int
redis_conn_eval(redis_conn *rc, int id, const char *const *keys, size_t nkeys,
    const char *const *args, size_t nargs, long long *out, size_t nout)
{
	const struct redis_eval ev = {
		.id = id, .keys = keys, .nkeys = nkeys, .args = args, .nargs = nargs,
		.out = out, .nout = nout,
	};

	return redis_conn_eval_many(rc, &ev, 1);
}

int
redis_conn_ping(redis_conn *rc, char *buf, size_t len)
{
	redisReply *r;
	int ret = -1;

	if (!redis_conn_connected(rc)) {
		set_err(rc, "not connected");
		return -1;
	}
	r = redisCommand(rc->ctx, "PING");
	if (r == NULL)
		drop(rc);
	else if (r->type == REDIS_REPLY_STATUS || r->type == REDIS_REPLY_STRING) {
		snprintf(buf, len, "%s", r->str);
		ret = 0;
	} else
		set_err(rc, "PING: %s", r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
	freeReplyObject(r);
	return ret;
}
