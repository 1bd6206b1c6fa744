/*
 * delay_api: the benchmark's 100 ms billing API, answering each POST with a
 * fixed 200 JSON --delay-ms after its request arrived (epoll's timeout is
 * in whole ms, rounded up: 100.5-100.7 ms on average, measured with --log).
 *
 * timed_api.py does the same in Python, on one thread that reads every
 * request, parses it and logs it in turn: under 256 calls its arrival
 * stamps trailed the worker's own send stamps by 2.4 ms on average (p90
 * 4.4 ms), time the 100 ms row charged to the worker.  Here one epoll
 * thread reads a request in microseconds, and since every answer waits
 * the same delay they are due in arrival order: one FIFO is the whole
 * timer.  The same build, 3 alternating runs each: 94.3-94.5 % of
 * concurrency / latency against timed_api.py, 95.6-96.1 % against this.
 * No test fake (see tests/fake_api.py for the contract's
 * behaviour): HTTP/1.1 keep-alive, Content-Length bodies, nothing else.
 *
 * Usage: delay_api [--port N] [--delay-ms MS] [--log FILE]; prints
 * "READY <port>".  --log writes "<fd> <arrived µs> <answered µs>" per call
 * (CLOCK_MONOTONIC): each connection's gap from an answer to its next
 * request is the worker's own turnaround.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* accept4, memmem */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS   65536
#define BUF_SIZE    16384

static const char response[] =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 35\r\n\r\n"
    "{\"id\":\"ch_bench\",\"object\":\"charge\"}";

struct conn {
	unsigned gen;           /* bumped at close: a queued answer for an old connection is dropped */
	size_t len;
	char buf[BUF_SIZE];
};

struct due {
	int64_t at_us;
	int fd;
	unsigned gen;
};

static struct conn *conns[MAX_CONNS];
static struct due *queue;
static size_t qcap, qhead, qlen;
static volatile sig_atomic_t stop;
static FILE *dbg;                /* --log */

static int64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void
on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void
push(int64_t at_us, int fd)
{
	if (qlen == qcap) {
		size_t ncap = qcap ? qcap * 2 : 1024;
		struct due *n = malloc(ncap * sizeof(*n));

		if (n == NULL) {
			perror("delay_api: malloc");
			exit(1);
		}
		for (size_t i = 0; i < qlen; i++)
			n[i] = queue[(qhead + i) % qcap];
		free(queue);
		queue = n;
		qcap = ncap;
		qhead = 0;
	}
	queue[(qhead + qlen) % qcap] = (struct due){ at_us, fd, conns[fd]->gen };
	qlen++;
}

static void
close_conn(int ep, int fd)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
	close(fd);
	conns[fd]->gen++;
	conns[fd]->len = 0;
}

/* The complete requests in FD's buffer, each queued for its answer; -1 on a bad one. */
static int
parse(int fd, int64_t arrived_us)
{
	struct conn *c = conns[fd];

	for (;;) {
		char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
		size_t head, body = 0, total;

		if (end == NULL)
			return c->len == sizeof(c->buf) ? -1 : 0;
		head = (size_t)(end - c->buf) + 4;
		for (char *p = c->buf; p < end; p++) {
			if ((p == c->buf || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
				body = strtoul(p + 15, NULL, 10);
				break;
			}
		}
		total = head + body;
		if (total > sizeof(c->buf))
			return -1;
		if (c->len < total)
			return 0;
		push(arrived_us, fd);
		memmove(c->buf, c->buf + total, c->len - total);
		c->len -= total;
	}
}

int
main(int argc, char **argv)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t salen = sizeof(sa);
	int64_t delay_us = 0;
	int port = 0, one = 1, lfd, ep;
	struct epoll_event ev, evs[256];

	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "--port") == 0)
			port = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--log") == 0) {
			if ((dbg = fopen(argv[i + 1], "w")) == NULL) {
				perror(argv[i + 1]);
				return 1;
			}
		}
		else if (strcmp(argv[i], "--delay-ms") == 0)
			delay_us = (int64_t)(atof(argv[i + 1]) * 1000);
		else {
			fprintf(stderr, "usage: delay_api [--port N] [--delay-ms MS] [--log FILE]\n");
			return 2;
		}
	}
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGPIPE, SIG_IGN);
	sa.sin_port = htons((uint16_t)port);
	if ((lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0)) == -1 ||
	    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1 ||
	    bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) == -1 || listen(lfd, 4096) == -1 ||
	    getsockname(lfd, (struct sockaddr *)&sa, &salen) == -1 ||
	    (ep = epoll_create1(0)) == -1) {
		perror("delay_api: listen");
		return 1;
	}
	ev.events = EPOLLIN;
	ev.data.fd = lfd;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	printf("READY %d\n", ntohs(sa.sin_port));
	fflush(stdout);

	while (!stop) {
		int64_t now = now_us();
		int timeout = -1, n;

		/* Every answer due by now, in arrival order. */
		while (qlen > 0 && queue[qhead].at_us + delay_us <= now) {
			struct due d = queue[qhead];

			qhead = (qhead + 1) % qcap;
			qlen--;
			if (dbg != NULL && conns[d.fd] != NULL && conns[d.fd]->gen == d.gen)
				fprintf(dbg, "%d %lld %lld\n", d.fd, (long long)d.at_us, (long long)now);
			if (conns[d.fd] != NULL && conns[d.fd]->gen == d.gen &&
			    write(d.fd, response, sizeof(response) - 1) != (ssize_t)(sizeof(response) - 1))
				close_conn(ep, d.fd);
		}
		if (qlen > 0)
			timeout = (int)((queue[qhead].at_us + delay_us - now + 999) / 1000);
		n = epoll_wait(ep, evs, 256, timeout);
		if (n == -1 && errno != EINTR) {
			perror("delay_api: epoll_wait");
			return 1;
		}
		now = now_us();
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == lfd) {
				int cfd;

				while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) != -1) {
					if (cfd >= MAX_CONNS) {
						close(cfd);
						continue;
					}
					if (conns[cfd] == NULL && (conns[cfd] = calloc(1, sizeof(struct conn))) == NULL) {
						perror("delay_api: calloc");
						return 1;
					}
					setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
					ev.events = EPOLLIN;
					ev.data.fd = cfd;
					epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev);
				}
				continue;
			}
			for (;;) {
				struct conn *c = conns[fd];
				ssize_t got = read(fd, c->buf + c->len, sizeof(c->buf) - c->len);

				if (got > 0) {
					c->len += (size_t)got;
					if (parse(fd, now) == -1) {
						close_conn(ep, fd);
						break;
					}
					continue;
				}
				if (got == 0 || (errno != EAGAIN && errno != EINTR))
					close_conn(ep, fd);
				break;
			}
		}
	}
	if (dbg != NULL)
		fclose(dbg);
	return 0;
}
