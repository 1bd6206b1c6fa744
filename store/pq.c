#include "store/pq.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/clock.h"
#include "common/log.h"

struct pq {
	PGconn *conn;
	enum pq_state state;
	PostgresPollingStatusType polling;      /* while connecting: what libpq waits for */
	bool want_write;                        /* PQflush left data to send */
	int64_t connect_deadline_ms;            /* the whole connect */
	int64_t host_deadline_ms;               /* this host's attempt */
	int host_timeout_ms;
	int host_sock;                          /* the socket of this host's attempt */
	struct pq_job *head, *tail;
	char errmsg[512];
};

int
pq_new(pq **ret)
{
	pq *c = calloc(1, sizeof(*c));

	if (c == NULL)
		return -1;
	c->state = PQ_DOWN;
	c->host_sock = -1;
	*ret = c;
	return 0;
}

static void
set_err(pq *c, const char *what, const char *detail)
{
	size_t n;

	snprintf(c->errmsg, sizeof(c->errmsg), "%s%s%s", what, detail != NULL ? ": " : "",
	    detail != NULL ? detail : "");
	/* libpq's messages end in a newline; the log adds its own. */
	n = strlen(c->errmsg);
	while (n > 0 && (c->errmsg[n - 1] == '\n' || c->errmsg[n - 1] == ' '))
		c->errmsg[--n] = '\0';
}

/* Every job in flight fails: the connection they were sent on is gone. */
static void
fail_all(pq *c)
{
	struct pq_job *j, *next;

	for (j = c->head; j != NULL; j = next) {
		next = j->next;
		j->next = NULL;
		j->ok = false;
		j->lost = true;
		j->state = PQ_JOB_DONE;
	}
	c->head = c->tail = NULL;
}

void
pq_drop(pq *c, const char *why)
{
	if (why != NULL)
		set_err(c, why, NULL);
	if (c->conn != NULL) {
		PQfinish(c->conn);
		c->conn = NULL;
	}
	c->state = PQ_DOWN;
	c->want_write = false;
	c->host_sock = -1;
	fail_all(c);
}

void
pq_free(pq *c)
{
	if (c == NULL)
		return;
	pq_drop(c, NULL);
	free(c);
}

/*
 * How many hosts a conninfo lists (host=a,b,c): each gets its own attempt;
 * and its connect_timeout in ms into *TIMEOUT_MS, when it sets one (libpq
 * reads values under 2 s as 2 s).
 */
static int
count_hosts(PGconn *conn, int *timeout_ms)
{
	PQconninfoOption *opts = PQconninfo(conn);
	int n = 1;

	if (opts == NULL)
		return 1;
	for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
		if (strcmp(o->keyword, "connect_timeout") == 0 && o->val != NULL &&
		    atoi(o->val) > 0)
			*timeout_ms = (atoi(o->val) < 2 ? 2 : atoi(o->val)) * 1000;
		if (strcmp(o->keyword, "host") != 0 && strcmp(o->keyword, "hostaddr") != 0)
			continue;
		if (o->val != NULL && o->val[0] != '\0') {
			int m = 1;

			for (const char *p = o->val; *p != '\0'; p++)
				m += *p == ',';
			n = m > n ? m : n;
		}
	}
	PQconninfoFree(opts);
	return n;
}

int
pq_connect_start(pq *c, const char *const *keywords, const char *const *values,
    int timeout_ms)
{
	int64_t now = clock_ms();
	int nhosts;

	pq_drop(c, NULL);
	c->errmsg[0] = '\0';
	if ((c->conn = PQconnectStartParams(keywords, values, 1)) == NULL) {
		set_err(c, "out of memory", NULL);
		return -1;
	}
	if (PQstatus(c->conn) == CONNECTION_BAD) {
		set_err(c, PQerrorMessage(c->conn), NULL);
		pq_drop(c, NULL);
		return -1;
	}
	/*
	 * libpq enforces connect_timeout per host only in its blocking
	 * connect; here the loop does: each host's attempt gets TIMEOUT_MS,
	 * then its socket is shut down, which libpq takes as that host
	 * failing and moves on to the next one, as the blocking connect would.
	 */
	nhosts = count_hosts(c->conn, &timeout_ms);
	c->host_timeout_ms = timeout_ms;
	c->host_deadline_ms = now + timeout_ms;
	c->host_sock = PQsocket(c->conn);
	c->connect_deadline_ms = now + (int64_t)timeout_ms * nhosts + 1000;
	c->polling = PGRES_POLLING_WRITING;
	c->state = PQ_CONNECTING;
	return 0;
}

enum pq_state
pq_state(const pq *c)
{
	return c->state;
}

int
pq_fd(const pq *c)
{
	return c->conn != NULL ? PQsocket(c->conn) : -1;
}

short
pq_events(const pq *c)
{
	switch (c->state) {
	case PQ_DOWN:
		return 0;
	case PQ_CONNECTING:
		return c->polling == PGRES_POLLING_READING ? POLLIN : POLLOUT;
	case PQ_READY:
		break;
	}
	return (short)(POLLIN | (c->want_write ? POLLOUT : 0));
}

int64_t
pq_deadline(const pq *c)
{
	switch (c->state) {
	case PQ_DOWN:
		return INT64_MAX;
	case PQ_CONNECTING:
		return c->host_deadline_ms < c->connect_deadline_ms ? c->host_deadline_ms :
		    c->connect_deadline_ms;
	case PQ_READY:
		break;
	}
	return c->head != NULL ? c->head->deadline_ms : INT64_MAX;
}

PGconn *
pq_raw_conn(const pq *c)
{
	return c->conn;
}

const char *
pq_errmsg(const pq *c)
{
	return c->errmsg;
}

static void
connected(pq *c)
{
	if (PQsetnonblocking(c->conn, 1) == -1 || PQenterPipelineMode(c->conn) == 0) {
		set_err(c, "could not set up the connection", PQerrorMessage(c->conn));
		pq_drop(c, NULL);
		return;
	}
	c->state = PQ_READY;
	c->want_write = false;
}

static void
drive_connect(pq *c, short revents, int64_t now)
{
	int sock;

	if (now >= c->connect_deadline_ms) {
		set_err(c, "timeout expired", NULL);
		pq_drop(c, NULL);
		return;
	}
	if (now >= c->host_deadline_ms) {
		/* This host does not answer: make libpq try the next one. */
		if (PQsocket(c->conn) >= 0)
			shutdown(PQsocket(c->conn), SHUT_RDWR);
		c->host_deadline_ms = now + c->host_timeout_ms;
		revents = POLLIN;
	}
	if (revents == 0)
		return;
	c->polling = PQconnectPoll(c->conn);
	if ((sock = PQsocket(c->conn)) != c->host_sock) {
		c->host_sock = sock;        /* the next host (or address): its own time */
		c->host_deadline_ms = now + c->host_timeout_ms;
	}
	switch (c->polling) {
	case PGRES_POLLING_OK:
		connected(c);
		break;
	case PGRES_POLLING_FAILED:
		set_err(c, PQerrorMessage(c->conn), NULL);
		pq_drop(c, NULL);
		break;
	default:
		break;
	}
}

/* The head job has every answer: take it off the queue. */
static void
finish_head(pq *c)
{
	struct pq_job *j = c->head;

	c->head = j->next;
	if (c->head == NULL)
		c->tail = NULL;
	j->next = NULL;
	j->state = PQ_JOB_DONE;
}

/* Takes every answer libpq has complete, without waiting for more. */
static void
read_answers(pq *c)
{
	struct pq_job *j;
	PGresult *res;

	while ((j = c->head) != NULL && !PQisBusy(c->conn)) {
		int i = j->answered < j->nstmts ? j->answered : j->nstmts - 1;

		if ((res = PQgetResult(c->conn)) == NULL) {
			/* The end of one statement's answers. */
			j->answered++;
			continue;
		}
		switch (PQresultStatus(res)) {
		case PGRES_PIPELINE_SYNC:
			PQclear(res);
			finish_head(c);
			continue;
		case PGRES_PIPELINE_ABORTED:
			/* Skipped after an earlier statement's error. */
			PQclear(res);
			j->ok = false;
			continue;
		case PGRES_FATAL_ERROR:
		case PGRES_BAD_RESPONSE:
		case PGRES_NONFATAL_ERROR:
			j->ok = false;
			break;
		default:
			/* A second result after an error does not hide the error. */
			if (j->res[i] != NULL && PQresultStatus(j->res[i]) == PGRES_FATAL_ERROR) {
				PQclear(res);
				continue;
			}
			break;
		}
		PQclear(j->res[i]);
		j->res[i] = res;
	}
	if (PQstatus(c->conn) == CONNECTION_BAD)
		pq_drop(c, PQerrorMessage(c->conn));
}

void
pq_drive(pq *c, short revents, int64_t now)
{
	switch (c->state) {
	case PQ_DOWN:
		return;
	case PQ_CONNECTING:
		drive_connect(c, revents, now);
		return;
	case PQ_READY:
		break;
	}
	if (c->want_write || (revents & POLLOUT)) {
		int r = PQflush(c->conn);

		if (r == -1) {
			pq_drop(c, PQerrorMessage(c->conn));
			return;
		}
		c->want_write = r == 1;
	}
	if (revents & (POLLIN | POLLERR | POLLHUP)) {
		if (PQconsumeInput(c->conn) == 0) {
			pq_drop(c, PQerrorMessage(c->conn));
			return;
		}
	}
	read_answers(c);
	if (c->state == PQ_READY && c->head != NULL && now >= c->head->deadline_ms) {
		char why[160];

		snprintf(why, sizeof(why), "the database did not answer within %" PRId64
		    " ms; dropped the connection", c->head->deadline_ms - c->head->submitted_ms);
		log_warnx("%s", why);
		/* As for a cut-off host: the socket goes, libpq sees the end. */
		shutdown(PQsocket(c->conn), SHUT_RDWR);
		pq_drop(c, why);
	}
}

int
pq_submit(pq *c, struct pq_job *job, int timeout_ms, int64_t now)
{
	int r;

	job->state = PQ_JOB_DONE;
	job->ok = false;
	job->lost = false;
	job->answered = 0;
	job->next = NULL;
	memset(job->res, 0, sizeof(job->res));
	if (c->state != PQ_READY) {
		job->lost = true;
		set_err(c, "not connected to the database", NULL);
		return -1;
	}
	for (int i = 0; i < job->nstmts; i++) {
		const struct pq_stmt *s = &job->stmts[i];

		if (s->prepare)
			r = PQsendPrepare(c->conn, s->name, s->sql, 0, NULL);
		else if (s->name != NULL)
			r = PQsendQueryPrepared(c->conn, s->name, s->nparams, s->params, NULL, NULL,
			    0);
		else
			r = PQsendQueryParams(c->conn, s->sql, s->nparams, NULL, s->params, NULL,
			    NULL, 0);
		if (r == 0)
			goto failed;
	}
	if (PQpipelineSync(c->conn) == 0)
		goto failed;
	if ((r = PQflush(c->conn)) == -1)
		goto failed;
	c->want_write = r == 1;
	job->state = PQ_JOB_QUEUED;
	job->ok = true;
	job->submitted_ms = now;
	job->deadline_ms = now + timeout_ms;
	if (c->tail != NULL)
		c->tail->next = job;
	else
		c->head = job;
	c->tail = job;
	return 0;
failed:
	/* Half a job may be in libpq's buffer: the connection cannot be trusted. */
	set_err(c, "could not send a statement", PQerrorMessage(c->conn));
	job->lost = true;
	{
		char why[sizeof(c->errmsg)];

		snprintf(why, sizeof(why), "%s", c->errmsg);
		pq_drop(c, why);
	}
	return -1;
}

void
pq_wait(pq *c, struct pq_job *job)
{
	while (job->state == PQ_JOB_QUEUED) {
		int64_t now = clock_ms(), deadline = pq_deadline(c);
		struct pollfd pfd = { .fd = pq_fd(c), .events = pq_events(c) };
		int timeout = deadline == INT64_MAX ? -1 : deadline <= now ? 0 :
		    deadline - now > INT32_MAX ? INT32_MAX : (int)(deadline - now);
		int r = poll(&pfd, 1, timeout);

		if (r == -1 && errno != EINTR) {
			pq_drop(c, "could not wait for the database");
			break;
		}
		pq_drive(c, r > 0 ? pfd.revents : 0, clock_ms());
	}
}

bool
pq_busy(const pq *c)
{
	return c->head != NULL;
}

void
pq_job_clear(struct pq_job *job)
{
	for (int i = 0; i < PQ_JOB_STMTS_MAX; i++) {
		PQclear(job->res[i]);
		job->res[i] = NULL;
	}
	job->state = PQ_JOB_IDLE;
	job->ok = false;
	job->lost = false;
}
