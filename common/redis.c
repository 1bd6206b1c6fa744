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

struct script {
	const char *name;
	const char *source;
	char sha[48];
};

struct redis_conn {
	char *host, *socket, *password, *username, *prefix;
	int port, db, connect_timeout_ms, command_timeout_ms;
	redisContext *ctx;
	struct script scripts[SCRIPT_MAX];
	int nscripts;
	char errmsg[256];
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

int
redis_conn_new(const struct redis_options *o, redis_conn **ret)
{
	redis_conn *rc;

	if ((rc = calloc(1, sizeof(*rc))) == NULL)
		return -1;
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

int
redis_conn_connect(redis_conn *rc)
{
	redisReply *r;

	if (rc->ctx != NULL) {
		redisFree(rc->ctx);
		rc->ctx = NULL;
	}
	if (rc->socket[0] != '\0')
		rc->ctx = redisConnectUnixWithTimeout(rc->socket, tv_of(rc->connect_timeout_ms));
	else
		rc->ctx = redisConnectWithTimeout(rc->host, rc->port, tv_of(rc->connect_timeout_ms));
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
	if (rc->socket[0] == '\0')
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
	for (int i = 0; i < rc->nscripts; i++)
		if (load_script(rc, i) == -1)
			return -1;
	if (rc->socket[0] != '\0')
		log_info("connected to redis at \"%s\" (database %d, keys \"%s*\")",
		    rc->socket, rc->db, rc->prefix);
	else
		log_info("connected to redis at \"%s:%d\" (database %d, keys \"%s*\")",
		    rc->host, rc->port, rc->db, rc->prefix);
	return 0;
}

int
redis_conn_eval(redis_conn *rc, int id, const char *const *keys, size_t nkeys,
    const char *const *args, size_t nargs, long long *out, size_t nout)
{
	char nkeybuf[24];
	size_t argc = 3 + nkeys + nargs;
	redisReply *r = NULL;
	int ret = -1;

	if (!redis_conn_connected(rc)) {
		set_err(rc, "not connected to redis");
		return -1;
	}
	if (id < 0 || id >= rc->nscripts) {
		set_err(rc, "no such script");
		return -1;
	}
	if (argc > rc->argcap) {
		const char **a = realloc(rc->argv, argc * sizeof(*a));
		size_t *l;

		if (a == NULL)
			goto oom;
		rc->argv = a;
		if ((l = realloc(rc->argvlen, argc * sizeof(*l))) == NULL)
			goto oom;
		rc->argvlen = l;
		rc->argcap = argc;
	}
	snprintf(nkeybuf, sizeof(nkeybuf), "%zu", nkeys);
	rc->argv[0] = "EVALSHA";
	rc->argv[1] = rc->scripts[id].sha;
	rc->argv[2] = nkeybuf;
	for (size_t i = 0; i < nkeys; i++)
		rc->argv[3 + i] = keys[i];
	for (size_t i = 0; i < nargs; i++)
		rc->argv[3 + nkeys + i] = args[i];
	for (size_t i = 0; i < argc; i++)
		rc->argvlen[i] = strlen(rc->argv[i]);

	for (int tries = 0; tries < 2; tries++) {
		r = redisCommandArgv(rc->ctx, (int)argc, rc->argv, rc->argvlen);
		if (r == NULL) {
			drop(rc);
			return -1;
		}
		if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
			redisReply *l = redisCommand(rc->ctx, "SCRIPT LOAD %s", rc->scripts[id].source);

			if (l == NULL) {
				freeReplyObject(r);
				drop(rc);
				return -1;
			}
			freeReplyObject(l);
			freeReplyObject(r);
			r = NULL;
			continue;
		}
		break;
	}
	if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != nout) {
		set_err(rc, "unexpected reply to %s script: %s", rc->scripts[id].name,
		    r != NULL && r->type == REDIS_REPLY_ERROR ? r->str : "not an array of results");
		goto out;
	}
	for (size_t i = 0; i < nout; i++)
		out[i] = r->element[i]->type == REDIS_REPLY_INTEGER ? r->element[i]->integer : 0;
	ret = 0;
	goto out;
oom:
	set_err(rc, "out of memory");
out:
	freeReplyObject(r);
	return ret;
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
