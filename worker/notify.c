#include "worker/notify.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "common/log.h"

static bool enabled;
static int64_t watchdog_ms;     /* half of WATCHDOG_USEC; 0 when off */
static int64_t last_ping_ms = -1;
static char last_status[512];

void
notify_init(void)
{
	uint64_t usec = 0;
	const char *sock = getenv("NOTIFY_SOCKET");

	enabled = sock != NULL && sock[0] != '\0';
	/* Checks WATCHDOG_PID too: a watchdog meant for another process is not ours. */
	if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
		watchdog_ms = (int64_t)(usec / 2000);
		if (watchdog_ms < 1)
			watchdog_ms = 1;
		log_debug("systemd watchdog every %lld ms", (long long)watchdog_ms);
	}
}

bool
notify_enabled(void)
{
	return enabled;
}

static void
send_state(const char *state)
{
	int r;

	if (!enabled)
		return;
	if ((r = sd_notify(0, state)) < 0)
		log_warnx("could not notify the service manager (%s): %s", state, strerror(-r));
}

void
notify_ready(void)
{
	send_state("READY=1");
}

void
notify_reloading(void)
{
	send_state("RELOADING=1");
}

void
notify_stopping(void)
{
	send_state("STOPPING=1");
}

void
notify_status(const char *fmt, ...)
{
	char line[sizeof(last_status) + 8];
	char text[sizeof(last_status)];
	va_list ap;

	if (!enabled)
		return;
	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	if (strcmp(text, last_status) == 0)
		return;
	memcpy(last_status, text, sizeof(last_status));
	snprintf(line, sizeof(line), "STATUS=%s", text);
	send_state(line);
}

void
notify_watchdog(int64_t now_ms)
{
	if (!enabled || watchdog_ms == 0)
		return;
	if (last_ping_ms >= 0 && now_ms - last_ping_ms < watchdog_ms)
		return;
	last_ping_ms = now_ms;
	send_state("WATCHDOG=1");
}

int
notify_watchdog_wait_ms(int64_t now_ms)
{
	int64_t left;

	if (!enabled || watchdog_ms == 0)
		return -1;
	left = last_ping_ms < 0 ? 0 : last_ping_ms + watchdog_ms - now_ms;
	return left < 0 ? 0 : (int)left;
}
