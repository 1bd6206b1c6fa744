#ifndef BW_CONNINFO_H
#define BW_CONNINFO_H

#include <stdbool.h>
#include <stddef.h>

/*
 * What may be said about a libpq connection string.  database.conninfo may
 * hold a password (password=..., or postgresql://user:PASSWORD@host); we
 * only ever log host, port and database, but libpq's and the server's
 * messages are printed too, so everything the store says passes through
 * conninfo_redact() first.  Pure functions: no connection is made.
 */

/*
 * Sets *RET to a malloc'd copy of the password CONNINFO holds, or NULL when
 * it holds none; the caller wipes and frees it.  Returns 0, or -1 when
 * CONNINFO cannot be parsed (or memory ran out), *RET then NULL.
 */
int conninfo_password(const char *conninfo, char **ret)
	__attribute__((warn_unused_result));

/*
 * Returns 0 when libpq can parse CONNINFO, the value of the configuration
 * key KEY ("database.conninfo"), else -1 with the reason in ERR
 * (ERRLEN bytes): libpq's own message when the string cannot hold a
 * secret, a message without it when it might (see below).  Makes no
 * connection, so "check-config" and a refused start say the same thing
 * before any server is asked.
 */
int conninfo_check(const char *key, const char *conninfo, char *err, size_t errlen)
	__attribute__((warn_unused_result));

/*
 * True when CONNINFO might carry a secret in its text (a password keyword
 * or userinfo): libpq's parse errors quote pieces of the string, so for
 * such a string they are not shown.
 */
bool conninfo_may_hold_secret(const char *conninfo);

/*
 * Copies MSG into OUT (OUTLEN bytes, always NUL-terminated, cut to fit)
 * with every occurrence of SECRET replaced by "[redacted]".  SECRET NULL
 * or empty copies MSG as is.  The replacement happens before the cut, so
 * a cut never leaves a prefix of the secret behind.
 */
void conninfo_redact(const char *msg, const char *secret, char *out, size_t outlen);

#define CONNINFO_REDACTED "[redacted]"

#endif
