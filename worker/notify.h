#ifndef BW_NOTIFY_H
#define BW_NOTIFY_H

#include <stdbool.h>
#include <stdint.h>

/*
 * Tells systemd how the worker is doing (sd_notify(3)), for a unit with
 * Type=notify and WatchdogSec=: READY=1 once the database is reachable and
 * the schema checked, RELOADING=1 / READY=1 around a SIGHUP reload,
 * STOPPING=1 at the start of a graceful stop, STATUS= lines for
 * `systemctl status`, and WATCHDOG=1 from the main loop.
 *
 * Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op, so the
 * loop calls them unconditionally.  Only this module includes libsystemd.
 */

/* Reads $NOTIFY_SOCKET and $WATCHDOG_USEC; call once at start. */
void notify_init(void);
/* True when a service manager listens ($NOTIFY_SOCKET set). */
bool notify_enabled(void);

void notify_ready(void);
void notify_reloading(void);
void notify_stopping(void);
/* One STATUS= line; repeated identical lines are not sent again. */
void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Sends WATCHDOG=1 when half the watchdog interval has passed since the
 * last one.  NOW_MS is CLOCK_MONOTONIC in milliseconds.
 */
void notify_watchdog(int64_t now_ms);
/*
 * The longest the loop may sleep and still ping the watchdog in time, in
 * milliseconds; -1 when no watchdog is set.
 */
int notify_watchdog_wait_ms(int64_t now_ms);

#endif
