#include "common/redis.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>

#include "common/clock.h"
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

/* Where a connect is: each step waits for one thing, with a deadline. */
enum phase {
	PH_DOWN,
	PH_SENTINEL_CONNECT,    /* TCP connect to sentinel number k of this round */
	PH_SENTINEL_ASK,        /* SENTINEL get-master-addr-by-name */
	PH_NODE_CONNECT,        /* TCP or unix connect to the server */
	PH_AUTH,
	PH_SELECT,
	PH_ROLE,                /* with sentinels: is it the master? */
	PH_SCRIPT,              /* SCRIPT LOAD of script number script_at */
	PH_READY,
};

/*
 * What a connect step's command answered, copied out of hiredis' reply
 * (which hiredis frees when the callback returns), for the step machine
 * to look at outside the callback.
 */
struct step_reply {
	bool done;
	bool lost;                      /* no reply: the connection went */
	int type;
	char str[512];
	size_t elements;
	int etype[2];
	size_t elen[2];
	char e[2][HOST_MAX];
};

struct redis_conn {
	char *host, *socket, *password, *username, *prefix;
	int port, db, connect_timeout_ms, command_timeout_ms;
	/*
	 * The one asynchronous context: a sentinel's while one is asked, the
	 * server's after.  NULL when none; hiredis frees it itself when the
	 * connection fails under a read or write, which the cleanup hook
	 * tells.
	 */
	redisAsyncContext *ac;
	bool want_read, want_write;     /* what hiredis asked the adapter for */
	bool doomed;                    /* to be dropped once out of hiredis' callbacks */
	bool dropping;                  /* our own drop: keep the reason already set */
	bool pinging;                   /* a PING is the step in flight (redis_conn_ping) */
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

	/* the connect in progress */
	enum phase phase;
	int64_t step_deadline_ms;
	int step_timeout_ms;
	const char *step_cmd;           /* for the timeout's message */
	unsigned step_gen;              /* a reply of an abandoned step is ignored */
	struct step_reply sr;
	char node_host[HOST_MAX];       /* the server of this attempt ("" : configured) */
	int node_port;
	char where[HOST_MAX + 16];      /* "HOST:PORT" or the socket, for messages */
	int sentinel_k, script_at;
	char why[1024];
	char tried[SENTINEL_MAX][HOST_MAX + 8];
	char what[2 * HOST_MAX + 64];
	int ntried, nunknown, nnamed;

	/* jobs in flight, in the order submitted */
	struct redis_job *jobs;

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
		rc->doomed = true;
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
	rc->phase = PH_DOWN;
	if (rc->host == NULL || rc->socket == NULL || rc->username == NULL ||
	    rc->prefix == NULL ||
	    (o->password && o->password[0] && rc->password == NULL)) {
		redis_conn_free(rc);
		return -1;
	}
	*ret = rc;
	return 0;
}

/*
 * The adapter between hiredis and the loop's poll: hiredis says which
 * events it wants, and the owner polls for them (redis_conn_events) and
 * hands back what came (redis_conn_drive).  No event library of its own.
 */
static void
ev_add_read(void *p)
{
	((redis_conn *)p)->want_read = true;
}

static void
ev_del_read(void *p)
{
	((redis_conn *)p)->want_read = false;
}

static void
ev_add_write(void *p)
{
	((redis_conn *)p)->want_write = true;
}

static void
ev_del_write(void *p)
{
	((redis_conn *)p)->want_write = false;
}

/* hiredis frees the context: after our drop, or on its own when the connection failed. */
static void
ev_cleanup(void *p)
{
	redis_conn *rc = p;

	rc->ac = NULL;
	rc->want_read = rc->want_write = false;
	if (rc->phase == PH_READY)
		rc->phase = PH_DOWN;
}

/* A command's reply is missing: the connection went (unless we dropped it, with our reason). */
static void
lost_reason(redis_conn *rc, const redisAsyncContext *ac)
{
	if (!rc->dropping)
		set_err(rc, "%s", ac->c.errstr[0] ? ac->c.errstr : "connection lost");
}

static void
on_connect(const redisAsyncContext *ac, int status)
{
	redis_conn *rc = ac->data;

	if (status != REDIS_OK) {
		rc->sr.lost = true;
		set_err(rc, "%s", ac->c.errstr[0] ? ac->c.errstr : "connection failed");
	}
	rc->sr.done = true;
}

static void
on_disconnect(const redisAsyncContext *ac, int status)
{
	redis_conn *rc = ac->data;

	if (status != REDIS_OK)
		lost_reason(rc, ac);
}

/*
 * Closes the context now; its pending callbacks run with no reply, so the
 * jobs in flight fail as lost.  Never called from inside hiredis'
 * callbacks (they set doomed instead), where hiredis would defer the free.
 */
static void
free_ctx(redis_conn *rc)
{
	redisAsyncContext *ac = rc->ac;

	rc->doomed = false;
	if (ac == NULL)
		return;
	rc->dropping = true;
	rc->step_gen++;
	redisAsyncFree(ac);
	rc->dropping = false;
	rc->ac = NULL;
	rc->want_read = rc->want_write = false;
	if (rc->phase == PH_READY)
		rc->phase = PH_DOWN;
}

void
redis_conn_free(redis_conn *rc)
{
	if (rc == NULL)
		return;
	free_ctx(rc);
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
	return rc->phase == PH_READY && rc->ac != NULL && !rc->doomed;
}

bool
redis_conn_connecting(const redis_conn *rc)
{
	return rc->phase != PH_DOWN && rc->phase != PH_READY;
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

int
redis_conn_fd(const redis_conn *rc)
{
	return rc->ac != NULL ? rc->ac->c.fd : -1;
}

short
redis_conn_events(const redis_conn *rc)
{
	short ev;

	if (rc->ac == NULL)
		return 0;
	ev = (short)((rc->want_read ? POLLIN : 0) | (rc->want_write ? POLLOUT : 0));
	/* Up, a server that closes the connection is seen at once, not at the next command. */
	if (rc->phase == PH_READY || ev == 0)
		ev |= POLLIN;
	return ev;
}

/* Opens the asynchronous context to HOST:PORT, or with HOST NULL to the socket. */
static int
open_ctx(redis_conn *rc, const char *host, int port)
{
	redisAsyncContext *ac;

	free_ctx(rc);
	if (host == NULL)
		snprintf(rc->where, sizeof(rc->where), "%s", rc->socket);
	else
		snprintf(rc->where, sizeof(rc->where), "%s:%d", host, port);
	ac = host == NULL ? redisAsyncConnectUnix(rc->socket) : redisAsyncConnect(host, port);
	if (ac == NULL) {
		set_err(rc, "out of memory");
		return -1;
	}
	if (ac->c.err) {
		set_err(rc, "%s", ac->c.errstr);
		redisAsyncFree(ac);
		return -1;
	}
	ac->data = rc;
	ac->ev.data = rc;
	ac->ev.addRead = ev_add_read;
	ac->ev.delRead = ev_del_read;
	ac->ev.addWrite = ev_add_write;
	ac->ev.delWrite = ev_del_write;
	ac->ev.cleanup = ev_cleanup;
	rc->ac = ac;
	rc->want_read = rc->want_write = false;
	/* Asks for the first write event, which tells the connect is done. */
	(void)redisAsyncSetConnectCallback(ac, on_connect);
	(void)redisAsyncSetDisconnectCallback(ac, on_disconnect);
	return 0;
}

/* The next step waits, at most TIMEOUT_MS, for what PHASE names. */
static void
begin_step(redis_conn *rc, enum phase phase, const char *cmd, int timeout_ms, int64_t now)
{
	rc->phase = phase;
	rc->step_cmd = cmd;
	rc->step_timeout_ms = timeout_ms;
	rc->step_deadline_ms = now + timeout_ms;
	memset(&rc->sr, 0, sizeof(rc->sr));
}

/* A connect step's reply, copied for the step machine (see struct step_reply). */
static void
step_cb(redisAsyncContext *ac, void *reply, void *priv)
{
	redis_conn *rc = ac->data;
	const redisReply *r = reply;

	if ((unsigned)(uintptr_t)priv != rc->step_gen)
		return;
	rc->sr.done = true;
	if (r == NULL) {
		rc->sr.lost = true;
		lost_reason(rc, ac);
		return;
	}
	rc->sr.type = r->type;
	if ((r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS ||
	    r->type == REDIS_REPLY_ERROR) && r->str != NULL)
		snprintf(rc->sr.str, sizeof(rc->sr.str), "%s", r->str);
	if (r->type == REDIS_REPLY_ARRAY) {
		rc->sr.elements = r->elements;
		for (size_t i = 0; i < r->elements && i < 2; i++) {
			rc->sr.etype[i] = r->element[i]->type;
			if (r->element[i]->type == REDIS_REPLY_STRING) {
				rc->sr.elen[i] = r->element[i]->len;
				snprintf(rc->sr.e[i], sizeof(rc->sr.e[i]), "%s", r->element[i]->str);
			}
		}
	}
}

/*
 * Sends a step's command (FMT as redisCommand's) and writes it at once
 * when the socket takes it.  A failure shows as the step lost.
 */
static void
send_step(redis_conn *rc, enum phase phase, const char *cmd, int64_t now, const char *fmt, ...)
{
	va_list ap;
	int r;

	begin_step(rc, phase, cmd, rc->command_timeout_ms, now);
	if (rc->ac == NULL) {
		rc->sr.done = rc->sr.lost = true;
		return;
	}
	va_start(ap, fmt);
	r = redisvAsyncCommand(rc->ac, step_cb, (void *)(uintptr_t)rc->step_gen, fmt, ap);
	va_end(ap);
	if (r != REDIS_OK) {
		set_err(rc, "could not send %s", cmd);
		rc->sr.done = rc->sr.lost = true;
		return;
	}
	redisAsyncHandleWrite(rc->ac);
}

/* Appends "; WHAT: rc->errmsg" to rc->why. */
static void
note(redis_conn *rc)
{
	size_t used = strlen(rc->why);

	if (used + 1 < sizeof(rc->why))
		snprintf(rc->why + used, sizeof(rc->why) - used, "%s%s: %s", used > 0 ? "; " : "",
		    rc->what, rc->errmsg);
}

static void next_sentinel(redis_conn *rc, int k, int64_t now);
static void start_node(redis_conn *rc, const char *host, int port, int64_t now);

/* The connect ended without a connection; the reason is in errmsg. */
static void
connect_failed(redis_conn *rc)
{
	free_ctx(rc);
	rc->phase = PH_DOWN;
}

/*
 * The server of this attempt cannot be used: with sentinels, noted, and
 * the next sentinel asked; without, the connect failed.
 */
static void
node_failed(redis_conn *rc, int64_t now)
{
	free_ctx(rc);
	if (rc->nsentinels > 0) {
		note(rc);
		next_sentinel(rc, rc->sentinel_k + 1, now);
	} else {
		connect_failed(rc);
	}
}

/*
 * Finds the master through the sentinels: each sentinel in turn, from the
 * one that answered last, names an address; the first address that
 * accepts us and says it is the master is kept.  An address already tried
 * in this round is not tried again, so a dead master that every sentinel
 * still names costs one connect, not one per sentinel.  Sentinels are
 * asked without AUTH.
 */
static void
next_sentinel(redis_conn *rc, int k, int64_t now)
{
	for (; k < rc->nsentinels; k++) {
		const struct sentinel *s =
		    &rc->sentinels[(rc->first_sentinel + k) % rc->nsentinels];

		rc->sentinel_k = k;
		snprintf(rc->what, sizeof(rc->what), "sentinel %s:%d", s->host, s->port);
		if (open_ctx(rc, s->host, s->port) == 0) {
			begin_step(rc, PH_SENTINEL_CONNECT, "connect", rc->connect_timeout_ms, now);
			return;
		}
		note(rc);
	}
	if (rc->nnamed > 0)
		set_err(rc, "no master found for \"%s\": %s", rc->master_name, rc->why);
	else if (rc->nunknown > 0)
		set_err(rc, "no sentinel knows master \"%s\": %s", rc->master_name, rc->why);
	else
		set_err(rc, "no sentinel answered for master \"%s\": %s", rc->master_name, rc->why);
	connect_failed(rc);
}

/* The sentinel's answer (rc->sr): 1 with the master's address, 0 when it does not know the name, -1. */
static int
sentinel_answer(redis_conn *rc, char *host, size_t hlen, int *port)
{
	const struct step_reply *r = &rc->sr;

	if (r->lost)
		return -1;
	if (r->type == REDIS_REPLY_NIL || (r->type == REDIS_REPLY_ARRAY && r->elements == 0)) {
		set_err(rc, "does not know master \"%s\"", rc->master_name);
		return 0;
	}
	if (r->type == REDIS_REPLY_ERROR) {
		set_err(rc, "%s", r->str);
		return -1;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
	    r->etype[0] != REDIS_REPLY_STRING || r->etype[1] != REDIS_REPLY_STRING ||
	    r->elen[0] >= hlen || atoi(r->e[1]) < 1 || atoi(r->e[1]) > 65535) {
		set_err(rc, "unexpected reply to SENTINEL get-master-addr-by-name");
		return -1;
	}
	snprintf(host, hlen, "%s", r->e[0]);
	*port = atoi(r->e[1]);
	return 1;
}

static void
sentinel_answered(redis_conn *rc, int64_t now)
{
	const struct sentinel *s = &rc->sentinels[(rc->first_sentinel + rc->sentinel_k) %
	    rc->nsentinels];
	char host[HOST_MAX], addr[HOST_MAX + 8];
	int port = 0, got;

	free_ctx(rc);
	if ((got = sentinel_answer(rc, host, sizeof(host), &port)) != 1) {
		rc->nunknown += got == 0;
		note(rc);
		next_sentinel(rc, rc->sentinel_k + 1, now);
		return;
	}
	rc->nnamed++;
	snprintf(addr, sizeof(addr), "%s:%d", host, port);
	for (int t = 0; t < rc->ntried; t++)
		if (strcmp(rc->tried[t], addr) == 0) {
			next_sentinel(rc, rc->sentinel_k + 1, now);
			return;
		}
	snprintf(rc->tried[rc->ntried++], sizeof(rc->tried[0]), "%s", addr);
	snprintf(rc->what, sizeof(rc->what), "master at %s (from sentinel %s:%d)", addr,
	    s->host, s->port);
	start_node(rc, host, port, now);
}

/* Opens the server: HOST:PORT (from a sentinel), or with HOST NULL the configured one. */
static void
start_node(redis_conn *rc, const char *host, int port, int64_t now)
{
	bool unix_socket = host == NULL && rc->socket[0] != '\0';

	snprintf(rc->node_host, sizeof(rc->node_host), "%s", host != NULL ? host : "");
	rc->node_port = port;
	if (open_ctx(rc, unix_socket ? NULL : host != NULL ? host : rc->host,
	    host != NULL ? port : rc->port) == -1) {
		node_failed(rc, now);
		return;
	}
	if (!unix_socket)
		(void)redisEnableKeepAlive(&rc->ac->c);
	begin_step(rc, PH_NODE_CONNECT, "connect", rc->connect_timeout_ms, now);
}

static void
ready(redis_conn *rc)
{
	rc->phase = PH_READY;
	if (rc->nsentinels > 0)
		log_info("connected to redis at \"%s:%d\" (master \"%s\", database %d, keys \"%s*\")",
		    rc->master_host, rc->master_port, rc->master_name, rc->db, rc->prefix);
	else if (rc->socket[0] != '\0')
		log_info("connected to redis at \"%s\" (database %d, keys \"%s*\")",
		    rc->socket, rc->db, rc->prefix);
	else
		log_info("connected to redis at \"%s:%d\" (database %d, keys \"%s*\")",
		    rc->host, rc->port, rc->db, rc->prefix);
}

/* Scripts are loaded once this is known to be the server to keep. */
static void
load_scripts_from(redis_conn *rc, int i, int64_t now)
{
	rc->script_at = i;
	if (i == rc->nscripts) {
		ready(rc);
		return;
	}
	send_step(rc, PH_SCRIPT, "SCRIPT LOAD", now, "SCRIPT LOAD %s", rc->scripts[i].source);
}

/*
 * The server's steps after the connect, each only when needed: AUTH with
 * a password, SELECT another database than 0 (a new connection starts in
 * 0, so every connect selects ours again), ROLE when a sentinel named it.
 */
static void
after_phase(redis_conn *rc, enum phase done, int64_t now)
{
	if (done < PH_AUTH && rc->password != NULL) {
		/* ACL (Redis 6): AUTH user password; otherwise the default user's. */
		if (rc->username[0] != '\0')
			send_step(rc, PH_AUTH, "AUTH", now, "AUTH %s %s", rc->username, rc->password);
		else
			send_step(rc, PH_AUTH, "AUTH", now, "AUTH %s", rc->password);
	} else if (done < PH_SELECT && rc->db != 0) {
		send_step(rc, PH_SELECT, "SELECT", now, "SELECT %d", rc->db);
	} else if (done < PH_ROLE && rc->nsentinels > 0) {
		send_step(rc, PH_ROLE, "ROLE", now, "ROLE");
	} else {
		load_scripts_from(rc, 0, now);
	}
}

/*
 * Whether the server says it is a master (ROLE).  A replica is what a
 * sentinel names for a moment during a failover, or a master already
 * demoted: it would refuse every lock with READONLY.  A user the ACL
 * forbids ROLE is trusted as it is: a write it refuses still drops the
 * connection (take_reply).
 */
static bool
role_ok(redis_conn *rc)
{
	const struct step_reply *r = &rc->sr;

	if (r->lost)
		return false;
	if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOPERM", 6) == 0)
		return true;
	if (r->type == REDIS_REPLY_ARRAY && r->elements > 0 && r->etype[0] == REDIS_REPLY_STRING) {
		if (strcmp(r->e[0], "master") == 0)
			return true;
		set_err(rc, "it says it is a %s, not the master", r->e[0]);
		return false;
	}
	set_err(rc, "ROLE: %s", r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
	return false;
}

/* The current step has its answer (or failed): on to the next one. */
static void
step_finished(redis_conn *rc, int64_t now)
{
	const struct step_reply *r = &rc->sr;
	int i;

	switch (rc->phase) {
	case PH_SENTINEL_CONNECT:
		if (r->lost) {
			free_ctx(rc);
			note(rc);
			next_sentinel(rc, rc->sentinel_k + 1, now);
		} else {
			send_step(rc, PH_SENTINEL_ASK, "SENTINEL get-master-addr-by-name", now,
			    "SENTINEL get-master-addr-by-name %s", rc->master_name);
		}
		break;
	case PH_SENTINEL_ASK:
		sentinel_answered(rc, now);
		break;
	case PH_NODE_CONNECT:
		if (r->lost)
			node_failed(rc, now);
		else
			after_phase(rc, PH_NODE_CONNECT, now);
		break;
	case PH_AUTH:
		if (r->lost || r->type == REDIS_REPLY_ERROR) {
			/* The server's answer (WRONGPASS ...) never repeats the password. */
			const char *detail = r->lost ? rc->errmsg : r->str;
			char d[sizeof(rc->sr.str)];

			snprintf(d, sizeof(d), "%s", detail);
			if (rc->username[0] != '\0')
				set_err(rc, "authentication as user \"%s\" failed: %s", rc->username, d);
			else
				set_err(rc, "authentication failed: %s", d);
			node_failed(rc, now);
		} else {
			after_phase(rc, PH_AUTH, now);
		}
		break;
	case PH_SELECT:
		if (r->lost || r->type == REDIS_REPLY_ERROR) {
			char d[sizeof(rc->sr.str)];

			snprintf(d, sizeof(d), "%s", r->lost ? rc->errmsg : r->str);
			set_err(rc, "could not select database %d: %s", rc->db, d);
			node_failed(rc, now);
		} else {
			after_phase(rc, PH_SELECT, now);
		}
		break;
	case PH_ROLE:
		if (!role_ok(rc)) {
			node_failed(rc, now);
			break;
		}
		i = (rc->first_sentinel + rc->sentinel_k) % rc->nsentinels;
		rc->first_sentinel = i;
		snprintf(rc->master_host, sizeof(rc->master_host), "%s", rc->node_host);
		rc->master_port = rc->node_port;
		snprintf(rc->master_from, sizeof(rc->master_from), "%s:%d", rc->sentinels[i].host,
		    rc->sentinels[i].port);
		log_info("redis master \"%s\" is %s:%d (from sentinel %s)", rc->master_name,
		    rc->master_host, rc->master_port, rc->master_from);
		after_phase(rc, PH_ROLE, now);
		break;
	case PH_SCRIPT:
		i = rc->script_at;
		if (r->lost) {
			connect_failed(rc);
		} else if (r->type != REDIS_REPLY_STRING) {
			set_err(rc, "could not load %s scripts: %s", rc->scripts[i].name,
			    r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
			connect_failed(rc);
		} else {
			snprintf(rc->scripts[i].sha, sizeof(rc->scripts[i].sha), "%s", r->str);
			load_scripts_from(rc, i + 1, now);
		}
		break;
	case PH_DOWN:
	case PH_READY:
		break;
	}
}

/* A step that missed its deadline: which one, on which server; never the password. */
static void
step_timed_out(redis_conn *rc)
{
	if (rc->phase == PH_SENTINEL_CONNECT || rc->phase == PH_NODE_CONNECT)
		set_err(rc, "could not connect to %s within %d ms", rc->where, rc->step_timeout_ms);
	else
		set_err(rc, "%s sent to %s got no answer within %d ms", rc->step_cmd, rc->where,
		    rc->step_timeout_ms);
	free_ctx(rc);
	rc->sr.done = rc->sr.lost = true;
}

/* Moves the connect on as far as the answers in and the clock allow. */
static void
advance(redis_conn *rc, int64_t now)
{
	while (redis_conn_connecting(rc)) {
		if (!rc->sr.done) {
			if (now < rc->step_deadline_ms)
				return;
			step_timed_out(rc);
		}
		step_finished(rc, now);
	}
}

int
redis_conn_connect_start(redis_conn *rc, int64_t now)
{
	free_ctx(rc);
	rc->phase = PH_DOWN;
	rc->why[0] = '\0';
	rc->ntried = rc->nunknown = rc->nnamed = 0;
	if (rc->nsentinels > 0)
		next_sentinel(rc, 0, now);
	else
		start_node(rc, NULL, 0, now);
	advance(rc, now);
	return rc->phase == PH_DOWN ? -1 : 0;
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

int64_t
redis_conn_deadline(const redis_conn *rc)
{
	int64_t at = INT64_MAX;

	if (redis_conn_connecting(rc) || rc->pinging)
		return rc->step_deadline_ms;
	if (rc->phase != PH_READY)
		return INT64_MAX;
	for (const struct redis_job *j = rc->jobs; j != NULL; j = j->next)
		if (j->deadline_ms < at)
			at = j->deadline_ms;
	return at;
}

/* A job in flight missed its deadline: the server is frozen or cut off. */
static void
check_jobs(redis_conn *rc, int64_t now)
{
	for (struct redis_job *j = rc->jobs; j != NULL; j = j->next) {
		const struct redis_eval *ev;

		if (now < j->deadline_ms)
			continue;
		ev = &j->evals[j->nevals - j->pending < j->nevals ? j->nevals - j->pending : 0];
		set_err(rc, "the %s script sent to %s got no answer within %d ms; dropped the "
		    "connection", rc->scripts[ev->id].name, rc->where, rc->command_timeout_ms);
		free_ctx(rc);
		return;
	}
	if (rc->pinging && !rc->sr.done && now >= rc->step_deadline_ms) {
		set_err(rc, "PING sent to %s got no answer within %d ms", rc->where,
		    rc->command_timeout_ms);
		free_ctx(rc);
	}
}

void
redis_conn_drive(redis_conn *rc, short revents, int64_t now)
{
	if (rc->ac != NULL && (revents & (POLLIN | POLLERR | POLLHUP)))
		redisAsyncHandleRead(rc->ac);
	if (rc->ac != NULL && (revents & POLLOUT))
		redisAsyncHandleWrite(rc->ac);
	/* Out of hiredis' callbacks now: a connection found unusable there goes. */
	if (rc->doomed)
		free_ctx(rc);
	advance(rc, now);
	if (rc->phase == PH_READY)
		check_jobs(rc, now);
}

/* The job's last answer is in: off the queue. */
static void
call_done(redis_conn *rc, struct redis_job *job)
{
	if (--job->pending > 0)
		return;
	for (struct redis_job **p = &rc->jobs; *p != NULL; p = &(*p)->next)
		if (*p == job) {
			*p = job->next;
			break;
		}
	job->next = NULL;
	job->state = REDIS_JOB_DONE;
}

/* SCRIPT LOAD's answer: the digest is the same, but a script never loaded gets one here. */
static void
reload_cb(redisAsyncContext *ac, void *reply, void *priv)
{
	struct script *s = priv;
	const redisReply *r = reply;

	(void)ac;
	if (r != NULL && r->type == REDIS_REPLY_STRING)
		snprintf(s->sha, sizeof(s->sha), "%s", r->str);
}

static void eval_cb(redisAsyncContext *ac, void *reply, void *priv);

/* Sends CALL's EVALSHA (pipelined behind whatever is in flight). */
static int
send_call(redis_conn *rc, redisAsyncContext *ac, struct redis_job_call *call)
{
	const struct redis_eval *ev = &call->job->evals[call->k];
	char nkeybuf[24];
	size_t argc = build_argv(rc, ev, rc->argv, rc->argvlen, nkeybuf);

	return redisAsyncCommandArgv(ac, eval_cb, call, (int)argc, rc->argv, rc->argvlen) ==
	    REDIS_OK ? 0 : -1;
}

/*
 * One call's answer.  Runs inside hiredis: a connection found unusable is
 * only marked (doomed), and dropped by redis_conn_drive() on return.
 */
static void
eval_cb(redisAsyncContext *ac, void *reply, void *priv)
{
	struct redis_job_call *call = priv;
	struct redis_job *job = call->job;
	redis_conn *rc = ac->data;
	const redisReply *r = reply;

	if (r == NULL) {
		lost_reason(rc, ac);
		job->ok = false;
		job->lost = true;
	} else if (rc->doomed) {
		/* An earlier answer said this server cannot be used. */
		job->ok = false;
		job->lost = true;
	} else if (is_noscript(r) && !call->retried) {
		/* A restarted or flushed server: load the script and run the call again. */
		call->retried = true;
		if (redisAsyncCommand(ac, reload_cb, &rc->scripts[job->evals[call->k].id],
		    "SCRIPT LOAD %s", rc->scripts[job->evals[call->k].id].source) == REDIS_OK &&
		    send_call(rc, ac, call) == 0)
			return;
		set_err(rc, "could not send the %s script again",
		    rc->scripts[job->evals[call->k].id].name);
		rc->doomed = true;
		job->ok = false;
		job->lost = true;
	} else if (take_reply(rc, &job->evals[call->k], r) == -1) {
		job->ok = false;
	}
	call_done(rc, job);
}

bool
redis_conn_job_done(const struct redis_job *job)
{
	return job->state == REDIS_JOB_DONE;
}

bool
redis_conn_busy(const redis_conn *rc)
{
	return rc->jobs != NULL;
}

int
redis_conn_submit(redis_conn *rc, struct redis_job *job, int64_t now)
{
	size_t total = 0;

	job->state = REDIS_JOB_DONE;
	job->ok = false;
	job->lost = false;
	job->pending = 0;
	job->next = NULL;
	if (!redis_conn_connected(rc)) {
		set_err(rc, "not connected to redis");
		job->lost = true;
		return -1;
	}
	if (job->nevals == 0 || job->nevals > REDIS_EVAL_MAX) {
		set_err(rc, "%zu script calls in one round trip", job->nevals);
		return -1;
	}
	for (size_t k = 0; k < job->nevals; k++) {
		const struct redis_eval *ev = &job->evals[k];

		if (ev->id < 0 || ev->id >= rc->nscripts) {
			set_err(rc, "no such script");
			return -1;
		}
		if (3 + ev->nkeys + ev->nargs > total)
			total = 3 + ev->nkeys + ev->nargs;
	}
	if (argv_reserve(rc, total) == -1) {
		set_err(rc, "out of memory");
		return -1;
	}
	job->ok = true;
	job->state = REDIS_JOB_QUEUED;
	job->submitted_ms = now;
	job->deadline_ms = now + rc->command_timeout_ms;
	/* Queued first: a failure while sending completes the job through the callbacks. */
	{
		struct redis_job **p = &rc->jobs;

		while (*p != NULL)
			p = &(*p)->next;
		*p = job;
	}
	/* Every command first, then every reply: one round trip for all of them. */
	for (size_t k = 0; k < job->nevals; k++) {
		job->calls[k].job = job;
		job->calls[k].k = k;
		job->calls[k].retried = false;
		job->pending++;
		if (send_call(rc, rc->ac, &job->calls[k]) == -1) {
			job->pending--;
			set_err(rc, "could not send the %s script", rc->scripts[job->evals[k].id].name);
			job->ok = false;
			job->lost = true;
			if (job->pending == 0) {
				job->pending = 1;
				call_done(rc, job);
			}
			/* Half a job may be in the buffer: the connection cannot be trusted. */
			free_ctx(rc);
			return -1;
		}
	}
	redisAsyncHandleWrite(rc->ac);
	if (rc->doomed)
		free_ctx(rc);
	return job->state == REDIS_JOB_DONE && job->lost ? -1 : 0;
}

/*
 * The blocking calls' wait: one poll() on the connection's one socket,
 * until something comes or the engine's next deadline, then a drive.
 */
static void
pump(redis_conn *rc)
{
	struct pollfd p = { .fd = redis_conn_fd(rc), .events = redis_conn_events(rc) };
	int64_t now = clock_ms(), at = redis_conn_deadline(rc);
	int timeout = at == INT64_MAX ? 1000 : at <= now ? 0 : at - now > 60000 ? 60000 :
	    (int)(at - now);
	int n = poll(&p, p.fd >= 0 ? 1 : 0, timeout);

	redis_conn_drive(rc, n > 0 ? p.revents : 0, clock_ms());
}

int
redis_conn_connect(redis_conn *rc)
{
	if (redis_conn_connect_start(rc, clock_ms()) == -1)
		return -1;
	while (redis_conn_connecting(rc))
		pump(rc);
	return redis_conn_connected(rc) ? 0 : -1;
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
	/*
	 * Loaded now when connected, without waiting: the digest comes with
	 * the answer, and a call sent before it loads the script itself
	 * (NOSCRIPT).  A failure here shows at the first call.
	 */
	if (redis_conn_connected(rc))
		(void)redisAsyncCommand(rc->ac, reload_cb, &rc->scripts[id], "SCRIPT LOAD %s", source);
	*ret_id = id;
	return 0;
}

int
redis_conn_eval_many(redis_conn *rc, const struct redis_eval *ev, size_t n)
{
	struct redis_job job;

	if (!redis_conn_connected(rc)) {
		set_err(rc, "not connected to redis");
		return -1;
	}
	if (n == 0 || n > REDIS_EVAL_MAX) {
		set_err(rc, "%zu script calls in one round trip", n);
		return -1;
	}
	memset(&job, 0, sizeof(job));
	memcpy(job.evals, ev, n * sizeof(*ev));
	job.nevals = n;
	if (redis_conn_submit(rc, &job, clock_ms()) == -1)
		return -1;
	while (job.state != REDIS_JOB_DONE)
		pump(rc);
	return job.ok ? 0 : -1;
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
	int ret = -1;

	if (!redis_conn_connected(rc)) {
		set_err(rc, "not connected");
		return -1;
	}
	rc->pinging = true;
	send_step(rc, PH_READY, "PING", clock_ms(), "PING");
	while (redis_conn_connected(rc) && !rc->sr.done)
		pump(rc);
	rc->pinging = false;
	if (!rc->sr.done || rc->sr.lost)
		return -1;
	if (rc->sr.type == REDIS_REPLY_STATUS || rc->sr.type == REDIS_REPLY_STRING) {
		snprintf(buf, len, "%s", rc->sr.str);
		ret = 0;
	} else {
		set_err(rc, "PING: %s", rc->sr.type == REDIS_REPLY_ERROR ? rc->sr.str :
		    "unexpected reply");
	}
	return ret;
}
