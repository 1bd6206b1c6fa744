/*
 * Unit tests for config/config.c.
 *
 * Most cases are data: a config text, how many errors it must produce and
 * pieces of the error text, each with its exact "NAME:LINE:" prefix.  Each
 * row runs as its own cmocka test so a failure names the row.
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/stat.h>

#include <cmocka.h>

#include "tests/unit/table.h"
#include "config/config.h"

#define NAME "t.conf"

/* The two required keys, one line each, so case lines start at 3. */
#define DB  "database = { conninfo = \"postgresql:///billing\"; };\n"
#define API "billing_api = { base_url = \"https://billing.example.com\"; };\n"
#define API_OPEN "billing_api = {\n\tbase_url = \"https://billing.example.com\";\n"

#define PREFIX64 "billing-worker:0123456789012345678901234567890123456789abcdefgh:"

#define EXAMPLE_PATH "config/billing-worker.conf.example"

struct load_case {
	const char *name;
	const char *text;
	int nerrors;
	const char *expect[6];  /* substrings of the error text; NULL ends */
};

static struct load_case cases[] = {
	{ "minimal file is valid", DB API, 0, { NULL } },
	{ "syntax error has its line",
	  DB API "worker = {\n\tconcurrency = ;\n};\n", 1,
	  { NAME ":4: syntax error\n" } },
	{ "duplicate key is named, with its first line",
	  DB API "worker = {\n\tconcurrency = 1;\n\tconcurrency = 2;\n};\n", 1,
	  { NAME ":5: duplicate setting \"worker.concurrency\" (first set at " NAME ":4)\n" } },
	{ "duplicate key on one line",
	  DB API "worker = { concurrency = 1; batch_size = 1; concurrency : 2; };\n", 1,
	  { NAME ":3: duplicate setting \"worker.concurrency\" (first set at " NAME ":3)\n" } },
	{ "duplicate group",
	  DB API "worker = { concurrency = 1; };\n# worker = {};\nworker = { batch_size = 1; };\n", 1,
	  { NAME ":5: duplicate setting \"worker\" (first set at " NAME ":3)\n" } },
	{ "same name in two groups is no duplicate",
	  DB API "worker = { id = \"a\"; };\nlocks = { ttl_ms = 30000; };\n"
	  "redis = { host = \"h\"; /* host = */ port = 1; };\nlog = { level = \"info\"; };\n",
	  0, { NULL } },
	{ "duplicate inside a group after a string holding a name",
	  DB API "redis = {\n\thost = \"port = 1;\";\n\tport = 1;\n\tport = 2;\n};\n", 1,
	  { NAME ":6: duplicate setting \"redis.port\" (first set at " NAME ":5)\n" } },
	{ "unknown key in a group",
	  DB API "worker = {\n\tconcurency = 3;\n};\n", 1,
	  { NAME ":4: unknown setting \"worker.concurency\"\n" } },
	{ "unknown group",
	  DB API "wroker = { concurrency = 3; };\n", 1,
	  { NAME ":3: unknown setting \"wroker\"\n" } },
	{ "unknown top-level scalar",
	  DB API "concurrency = 3;\n", 1,
	  { NAME ":3: unknown setting \"concurrency\"\n" } },
	{ "unknown nested group",
	  DB API "worker = {\n\ttuning = { level = 1; };\n};\n", 1,
	  { NAME ":4: unknown setting \"worker.tuning\"\n" } },
	{ "digits in a name are not widened",
	  DB API "worker = { x99999999999 = 1; };\n", 1,
	  { NAME ":3: unknown setting \"worker.x99999999999\"\n" } },
	{ "group given as a scalar",
	  DB API "worker = 3;\n", 1,
	  { NAME ":3: \"worker\" must be a group\n" } },
	{ "group given as a list",
	  DB API "log = ( \"info\" );\n", 1,
	  { NAME ":3: \"log\" must be a group\n" } },
	{ "integer given as a string",
	  DB API "worker = { concurrency = \"64\"; };\n", 1,
	  { NAME ":3: \"worker.concurrency\" must be an integer\n" } },
	{ "integer given as a float",
	  DB API "worker = { concurrency = 64.0; };\n", 1,
	  { NAME ":3: \"worker.concurrency\" must be an integer\n" } },
	{ "integer given as a bool",
	  DB API "worker = { batch_size = true; };\n", 1,
	  { NAME ":3: \"worker.batch_size\" must be an integer\n" } },
	{ "integer given as a group",
	  DB API "redis = { port = { }; };\n", 1,
	  { NAME ":3: \"redis.port\" must be an integer\n" } },
	{ "string given as an integer",
	  DB API "redis = { host = 127; };\n", 1,
	  { NAME ":3: \"redis.host\" must be a string\n" } },
	{ "enum given as an integer",
	  DB API "locks = { mode = 1; };\n", 1,
	  { NAME ":3: \"locks.mode\" must be a string\n" } },
	{ "below range",
	  DB API "worker = { concurrency = 0; };\n", 1,
	  { NAME ":3: \"worker.concurrency\" must be between 1 and 10000, not 0\n" } },
	{ "above range",
	  DB API "redis = {\n\tport = 65536;\n};\n", 1,
	  { NAME ":4: \"redis.port\" must be between 1 and 65535, not 65536\n" } },
	{ "negative",
	  DB API "worker = { poll_interval_ms = -5; };\n", 1,
	  { NAME ":3: \"worker.poll_interval_ms\" must be between 10 and 3600000, not -5\n" } },
	{ "int64 literal is accepted", DB API "locks = { ttl_ms = 60000L; };\n", 0, { NULL } },
	{ "int64 literal out of range",
	  DB API "locks = { ttl_ms = 99999999999L; };\n", 1,
	  { NAME ":3: \"locks.ttl_ms\" must be between 100 and 86400000, not 99999999999\n" } },
	{ "wide literal without L is not truncated",
	  DB API "locks = { ttl_ms = 4294967396; };\n", 1,
	  { NAME ":3: \"locks.ttl_ms\" must be between 100 and 86400000, not 4294967396\n" } },
	{ "wide negative literal is not truncated",
	  DB API "worker = { shutdown_timeout_ms = -4294967296; };\n", 1,
	  { "not -4294967296\n" } },
	{ "wide hex literal is not truncated",
	  DB API "redis = { port = 0x100000000; };\n", 1,
	  { NAME ":3: \"redis.port\" must be between 1 and 65535, not 4294967296\n" } },
	{ "INT_MAX + 1 is not truncated",
	  DB API "worker = { shutdown_timeout_ms = 2147483648; };\n", 1,
	  { "between 0 and 3600000, not 2147483648\n" } },
	{ "INT_MIN needs no widening",
	  DB API "worker = { shutdown_timeout_ms = -2147483648; };\n", 1,
	  { "between 0 and 3600000, not -2147483648\n" } },
	{ "hex literal in range", DB API "redis = { port = 0x18EB; };\n", 0, { NULL } },
	{ "numbers in comments are left alone",
	  "# 99999999999\n/* 4294967396 */ " DB "// 1e99999 4294967396\n" API, 0, { NULL } },
	{ "bad lock mode",
	  DB API "locks = { mode = \"fast\"; };\n", 1,
	  { NAME ":3: \"locks.mode\" must be one of redis, skip-locked, auto, not \"fast\"\n" } },
	{ "enum is case-sensitive",
	  DB API "locks = { mode = \"Redis\"; };\n", 1,
	  { "not \"Redis\"\n" } },
	{ "bad pooling mode",
	  API "database = {\n\tconninfo = \"host=pgbouncer\";\n\tpooling = \"statement\";\n};\n", 1,
	  { NAME ":4: \"database.pooling\" must be one of session, transaction, not \"statement\"\n" } },
	{ "transaction pooling with a direct LISTEN connection",
	  API "database = { conninfo = \"host=pgbouncer\"; pooling = \"transaction\"; "
	  "listen_conninfo = \"host=db1\"; };\n", 0, { NULL } },
	{ "bad log level",
	  DB API "log = { level = \"verbose\"; };\n", 1,
	  { NAME ":3: \"log.level\" must be one of debug, info, warn, error, not \"verbose\"\n" } },
	{ "bool must be a bool",
	  DB API_OPEN "\tallow_insecure_http = 1;\n};\n", 1,
	  { NAME ":4: \"billing_api.allow_insecure_http\" must be true or false\n" } },
	{ "log format must be text or json",
	  DB API "log = { format = \"xml\"; };\n", 1,
	  { NAME ":3: \"log.format\" must be one of text, json, not \"xml\"\n" } },
	{ "redis key prefix default is accepted",
	  DB API "redis = { key_prefix = \"billing-worker:staging:\"; };\n", 0, { NULL } },
	{ "redis key prefix must not be empty",
	  DB API "redis = { key_prefix = \"\"; };\n", 1,
	  { NAME ":3: \"redis.key_prefix\" must be 1 to 64 printable ASCII characters "
	    "without spaces" } },
	{ "redis key prefix without spaces",
	  DB API "redis = {\n\tkey_prefix = \"billing worker:\";\n};\n", 1,
	  { NAME ":4: \"redis.key_prefix\" must be 1 to 64" } },
	{ "redis key prefix without control characters",
	  DB API "redis = { key_prefix = \"bw:\\n\"; };\n", 1,
	  { NAME ":3: \"redis.key_prefix\" must be 1 to 64" } },
	{ "redis key prefix of 64 characters",
	  DB API "redis = { key_prefix = \"" PREFIX64 "\"; };\n", 0, { NULL } },
	{ "redis key prefix of 65 characters",
	  DB API "redis = { key_prefix = \"" PREFIX64 "x\"; };\n", 1,
	  { NAME ":3: \"redis.key_prefix\" must be 1 to 64" } },
	{ "redis db above 15 is left to the server", DB API "redis = { db = 31; };\n", 0, { NULL } },
	{ "redis db is not negative",
	  DB API "redis = { db = -1; };\n", 1,
	  { NAME ":3: \"redis.db\" must be between 0 and 2147483647, not -1\n" } },
	{ "redis username needs a password file",
	  DB API "redis = {\n\tusername = \"staging\";\n};\n", 1,
	  { NAME ":4: \"redis.username\" is set but \"redis.password_file\" is not: "
	    "Redis authenticates a user only with a password\n" } },
	{ "redis username with a password file",
	  DB API "redis = {\n\tusername = \"staging\";\n"
	  "\tpassword_file = \"/etc/billing-worker/redis-password\";\n};\n", 0, { NULL } },
	{ "redis username without control characters",
	  DB API "redis = {\n\tusername = \"a\\tb\";\n"
	  "\tpassword_file = \"/etc/billing-worker/redis-password\";\n};\n", 1,
	  { NAME ":4: \"redis.username\" must not contain control characters\n" } },
	{ "redis sentinels with a master name",
	  DB API "redis = {\n\tsentinels = [ \"10.0.0.5:26379\", \"[::1]:26380\", "
	  "\"sentinel-3.internal:26379\" ];\n\tmaster_name = \"billing\";\n};\n", 0, { NULL } },
	{ "redis sentinels as a list", DB API "redis = { sentinels = ( \"h:1\" ); "
	  "master_name = \"m\"; };\n", 0, { NULL } },
	{ "no redis sentinels", DB API "redis = { sentinels = [ ]; };\n", 0, { NULL } },
	{ "redis sentinels need a master name",
	  DB API "redis = {\n\tsentinels = [ \"10.0.0.5:26379\" ];\n};\n", 1,
	  { NAME ":4: \"redis.sentinels\" is set but \"redis.master_name\" is not: " } },
	{ "each bad redis sentinel at its line",
	  DB API "redis = {\n\tmaster_name = \"m\";\n\tsentinels = [ \"10.0.0.5:26379\",\n"
	  "\t\t\"10.0.0.6\",\n\t\t\"a,b:1\",\n\t\t\":26379\" ];\n};\n", 3,
	  { NAME ":6: \"redis.sentinels\" entry 2 (\"10.0.0.6\") must be HOST:PORT, e.g. ",
	    NAME ":7: \"redis.sentinels\" entry 3 (\"a,b:1\") must be HOST:PORT",
	    NAME ":8: \"redis.sentinels\" entry 4 (\":26379\") must be HOST:PORT" } },
	{ "a redis sentinel port in range",
	  DB API "redis = { master_name = \"m\"; sentinels = [ \"h:65536\" ]; };\n", 1,
	  { NAME ":3: \"redis.sentinels\" entry 1 (\"h:65536\") must be HOST:PORT" } },
	{ "redis sentinels are a list",
	  DB API "redis = { master_name = \"m\"; sentinels = \"h:26379\"; };\n", 1,
	  { NAME ":3: \"redis.sentinels\" must be a list of strings, e.g. " } },
	{ "redis sentinels are strings",
	  DB API "redis = { master_name = \"m\"; sentinels = ( \"h:1\", 26379 ); };\n", 1,
	  { NAME ":3: \"redis.sentinels\" entry 2 must be a string\n" } },
	{ "redis master name without control characters",
	  DB API "redis = { master_name = \"m\\n\"; sentinels = [ \"h:1\" ]; };\n", 1,
	  { NAME ":3: \"redis.master_name\" must not contain control characters\n" } },
	{ "empty redis username needs no password", DB API "redis = { username = \"\"; };\n", 0,
	  { NULL } },
	{ "metrics listen on IPv4", DB API "metrics = { listen = \"127.0.0.1:9187\"; };\n", 0, { NULL } },
	{ "metrics listen on IPv6", DB API "metrics = { listen = \"[::1]:9187\"; };\n", 0, { NULL } },
	{ "metrics listen on a name", DB API "metrics = { listen = \"localhost:9187\"; };\n", 0, { NULL } },
	{ "metrics listen needs a port",
	  DB API "metrics = { listen = \"127.0.0.1\"; };\n", 1,
	  { NAME ":3: \"metrics.listen\" must be \"\" or HOST:PORT" } },
	{ "metrics listen port range",
	  DB API "metrics = { listen = \"127.0.0.1:65536\"; };\n", 1,
	  { NAME ":3: \"metrics.listen\" must be" } },
	{ "metrics listen bare IPv6 is ambiguous",
	  DB API "metrics = { listen = \"::1:9187\"; };\n", 1,
	  { NAME ":3: \"metrics.listen\" must be" } },
	{ "metrics listen needs a host",
	  DB API "metrics = { listen = \":9187\"; };\n", 1,
	  { NAME ":3: \"metrics.listen\" must be" } },
	{ "rate limit range",
	  DB API_OPEN "\tmax_requests_per_second = -1;\n};\n", 1,
	  { NAME ":4: \"billing_api.max_requests_per_second\" must be between 0 and 1000000, not -1\n" } },
	{ "renew equal to ttl points at renew",
	  DB API "locks = {\n\tttl_ms = 30000;\n\trenew_interval_ms = 30000;\n};\n", 1,
	  { NAME ":5: \"locks.renew_interval_ms\" (30000) must be less than \"locks.ttl_ms\" (30000)\n" } },
	{ "renew default against a short ttl points at ttl",
	  DB API "locks = { ttl_ms = 5000; };\n", 1,
	  { NAME ":3: \"locks.renew_interval_ms\" (10000) must be less than \"locks.ttl_ms\" (5000)\n" } },
	{ "cross-key rule skipped when a key is already wrong",
	  DB API "locks = {\n\tttl_ms = 50;\n\trenew_interval_ms = 40000;\n};\n", 1,
	  { NAME ":4: \"locks.ttl_ms\" must be between 100 and 86400000, not 50\n" } },
	{ "connect timeout above timeout",
	  DB API_OPEN "\ttimeout_ms = 1000;\n\tconnect_timeout_ms = 2000;\n};\n", 1,
	  { NAME ":5: \"billing_api.connect_timeout_ms\" (2000) must be less than or equal to "
	    "\"billing_api.timeout_ms\" (1000)\n" } },
	{ "connect timeout equal to timeout",
	  DB API_OPEN "\ttimeout_ms = 2000;\n\tconnect_timeout_ms = 2000;\n};\n", 0, { NULL } },
	{ "backoff max below initial",
	  DB API_OPEN "\tbackoff_max_ms = 500;\n};\n", 1,
	  { NAME ":4: \"billing_api.backoff_max_ms\" (500) must be greater than or equal to "
	    "\"billing_api.backoff_initial_ms\" (1000)\n" } },
	{ "missing conninfo", API, 1,
	  { NAME ":0: missing required setting \"database.conninfo\" (the file has no "
	    "\"database\" group)\n" } },
	{ "missing base_url", DB, 1,
	  { NAME ":0: missing required setting \"billing_api.base_url\" (the file has no "
	    "\"billing_api\" group)\n" } },
	{ "missing conninfo points at its group",
	  API "\ndatabase = {\n\tquery_timeout_ms = 1000;\n};\n", 1,
	  { NAME ":3: missing required setting \"database.conninfo\"\n" } },
	{ "missing base_url points at its group",
	  DB "billing_api = { timeout_ms = 5000; };\n", 1,
	  { NAME ":2: missing required setting \"billing_api.base_url\"\n" } },
	{ "empty file", "", 2,
	  { NAME ":0: missing required setting \"database.conninfo\" (the file has no "
	    "\"database\" group)\n",
	    NAME ":0: missing required setting \"billing_api.base_url\" (the file has no "
	    "\"billing_api\" group)\n" } },
	{ "missing @include names the file",
	  DB API "@include \"/nonexistent/limits.conf\"\n", 1,
	  { NAME ":3: could not open @include file \"/nonexistent/limits.conf\": "
	    "No such file or directory\n" } },
	{ "@include closing quote opens no string",
	  DB "@include \"/nonexistent/a\" # \"\n@include \"/nonexistent/b\"\n" API, 2,
	  { NAME ":2: could not open @include file \"/nonexistent/a\"",
	    NAME ":3: could not open @include file \"/nonexistent/b\"" } },
	{ "empty conninfo",
	  "database = {\n\tconninfo = \"\";\n};\n" API, 1,
	  { NAME ":2: \"database.conninfo\" must not be empty\n" } },
	{ "base_url given as an integer",
	  DB "billing_api = { base_url = 8080; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be a string\n" } },
	{ "base_url with another scheme",
	  DB "billing_api = { base_url = \"ftp://billing.example.com\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http:// or https:// URL with a host\n" } },
	{ "base_url without a scheme",
	  DB "billing_api = { base_url = \"billing.example.com\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url scheme is lowercase",
	  DB "billing_api = { base_url = \"HTTPS://billing.example.com\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url without a host",
	  DB "billing_api = { base_url = \"https://\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url with an empty host and a path",
	  DB "billing_api = { base_url = \"http:///v1\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url with only a port",
	  DB "billing_api = { base_url = \"http://:8080\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url with a bad port",
	  DB "billing_api = { base_url = \"https://billing.example.com:99999\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url with an empty port",
	  DB "billing_api = { base_url = \"https://billing.example.com:\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url with a space",
	  DB "billing_api = { base_url = \"https://billing example.com\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url with an unclosed IPv6 host",
	  DB "billing_api = { base_url = \"http://[::1\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must be an http" } },
	{ "base_url on loopback with a port",
	  DB "billing_api = { base_url = \"http://127.0.0.1:8080\"; };\n", 0, { NULL } },
	{ "base_url on IPv6 with a path",
	  DB "billing_api = { base_url = \"https://[::1]:8443/billing/\"; };\n", 0, { NULL } },
	/* Plain http only to loopback, unless explicitly allowed (issue 7). */
	{ "http to a remote host is refused",
	  DB "billing_api = { base_url = \"http://billing.example.com/v1\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" uses http:// to a host that is not loopback: "
	    "use https://, or set \"billing_api.allow_insecure_http\" = true to send the token "
	    "in clear text\n" } },
	{ "http to a remote address is refused",
	  DB "billing_api = { base_url = \"http://10.0.0.7:8080\"; };\n", 1,
	  { "uses http:// to a host that is not loopback" } },
	{ "http to a name that only starts like loopback is refused",
	  DB "billing_api = { base_url = \"http://127.0.0.1.example.com\"; };\n", 1,
	  { "uses http:// to a host that is not loopback" } },
	{ "http to localhost.example.com is refused",
	  DB "billing_api = { base_url = \"http://localhost.example.com\"; };\n", 1,
	  { "uses http:// to a host that is not loopback" } },
	{ "http to a v4-mapped address is refused",
	  DB "billing_api = { base_url = \"http://[::ffff:127.0.0.1]\"; };\n", 1,
	  { "uses http:// to a host that is not loopback" } },
	{ "http to a remote host when allowed",
	  DB "billing_api = {\n\tbase_url = \"http://billing.example.com\";\n"
	  "\tallow_insecure_http = true;\n};\n", 0, { NULL } },
	{ "http to localhost", DB "billing_api = { base_url = \"http://localhost:8080/\"; };\n",
	  0, { NULL } },
	{ "http to LOCALHOST.", DB "billing_api = { base_url = \"http://LOCALHOST.\"; };\n",
	  0, { NULL } },
	{ "http to a .localhost name",
	  DB "billing_api = { base_url = \"http://api.localhost\"; };\n", 0, { NULL } },
	{ "http to 127.1.2.3", DB "billing_api = { base_url = \"http://127.1.2.3\"; };\n",
	  0, { NULL } },
	{ "http to ::1", DB "billing_api = { base_url = \"http://[::1]:8080\"; };\n", 0, { NULL } },
	{ "credentials in base_url are refused",
	  DB "billing_api = { base_url = \"https://u:hunter2@billing.example.com\"; };\n", 1,
	  { NAME ":2: \"billing_api.base_url\" must not hold a user or password: the token "
	    "comes from \"billing_api.token_file\"\n" } },
	/* Found by tests/fuzz/config.c: libconfig's scanner exit()s on a directory. */
	{ "@include of a directory",
	  DB API "@include \"/\"\n", 1,
	  { NAME ":3: @include \"/\" is not a regular file\n" } },
	{ "@include of a device",
	  "  @include \t\"/dev/null\"\n" DB API, 1,
	  { NAME ":1: @include \"/dev/null\" is not a regular file\n" } },
	{ "@include in a comment or a string is not one",
	  "/*\n@include \"/\"\n*/\n# @include \"/\"\n" DB
	  "worker = { id = \"\n@include \\\"/\\\"\"; };\n" API, 0, { NULL } },
	/* Found by tests/fuzz/config.c: libconfig leaks these (tests/lsan.supp). */
	{ "string token before a syntax error", "\"\"un\xff;;\n", 1, { NAME ":1: syntax error" } },
	{ "unterminated string", "worker = { id = \"ated; };\n", 1, { NAME ":2: syntax error" } },
	{ "several errors are all reported",
	  "worker = {\n"
	  "\tconcurrency = 0;\n"                 /* 2: range */
	  "\tbatch_size = \"many\";\n"           /* 3: type */
	  "\tthreads = 4;\n"                     /* 4: unknown */
	  "};\n"
	  "locks = { mode = \"fast\"; };\n"      /* 6: enum */
	  "cache = { size = 1; };\n"             /* 7: unknown group */
	  API, 6,                                /* and conninfo missing */
	  { NAME ":2: \"worker.concurrency\" must be between 1 and 10000, not 0\n"
	    NAME ":3: \"worker.batch_size\" must be an integer\n"
	    NAME ":4: unknown setting \"worker.threads\"\n"
	    NAME ":6: \"locks.mode\" must be one of redis, skip-locked, auto, not \"fast\"\n"
	    NAME ":7: unknown setting \"cache\"\n"
	    NAME ":0: missing required setting \"database.conninfo\" (the file has no "
	    "\"database\" group)\n" } },
};


static int
count_lines(const char *s)
{
	int n = 0;

	for (; *s != '\0'; s++)
		n += *s == '\n';
	return n;
}

static void
test_case(void **state)
{
	const struct load_case *c = *state;
	struct bw_config cfg;
	char *errors = (char *)"unset";
	int n;

	n = config_load_string(c->text, NAME, &cfg, &errors);
	if (n != c->nerrors)
		print_message("errors:\n%s", errors != NULL ? errors : "(none)\n");
	assert_int_equal(n, c->nerrors);
	if (c->nerrors == 0) {
		assert_null(errors);
		assert_string_equal(cfg.path, NAME);
	} else {
		assert_non_null(errors);
		assert_int_equal(count_lines(errors), c->nerrors);
		for (size_t i = 0; c->expect[i] != NULL; i++) {
			if (strstr(errors, c->expect[i]) == NULL)
				print_message("missing: %s\nerrors:\n%s", c->expect[i], errors);
			assert_non_null(strstr(errors, c->expect[i]));
		}
		/* A failed load leaves nothing to free. */
		assert_null(cfg.path);
		assert_null(cfg.database.conninfo);
	}
	config_free(&cfg);
	free(errors);
}

static void
load_ok(const char *text, struct bw_config *cfg)
{
	char *errors = NULL;
	int n = config_load_string(text, NAME, cfg, &errors);

	if (n != 0)
		print_message("errors:\n%s", errors);
	assert_int_equal(n, 0);
	assert_null(errors);
}

static void
assert_defaults(const struct bw_config *cfg)
{
	assert_string_equal(cfg->worker.id, "");
	assert_int_equal(cfg->worker.concurrency, 64);
	assert_int_equal(cfg->worker.batch_size, 64);
	assert_int_equal(cfg->worker.poll_interval_ms, 1000);
	assert_int_equal(cfg->worker.shutdown_timeout_ms, 30000);
	assert_string_equal(cfg->database.conninfo, "postgresql:///billing");
	assert_string_equal(cfg->redis.host, "127.0.0.1");
	assert_int_equal(cfg->redis.port, 6379);
	assert_string_equal(cfg->redis.socket, "");
	assert_string_equal(cfg->redis.password_file, "");
	assert_string_equal(cfg->redis.username, "");
	assert_int_equal(cfg->redis.db, 0);
	assert_string_equal(cfg->redis.key_prefix, "billing-worker:");
	assert_int_equal(cfg->redis.connect_timeout_ms, 500);
	assert_int_equal(cfg->redis.command_timeout_ms, 2000);
	assert_int_equal(cfg->locks.mode, LOCK_MODE_REDIS);
	assert_int_equal(cfg->locks.ttl_ms, 30000);
	assert_int_equal(cfg->locks.renew_interval_ms, 10000);
	assert_string_equal(cfg->billing_api.base_url, "https://billing.example.com");
	assert_string_equal(cfg->billing_api.token_file, "/etc/billing-worker/api-token");
	assert_int_equal(cfg->billing_api.timeout_ms, 10000);
	assert_int_equal(cfg->billing_api.connect_timeout_ms, 2000);
	assert_int_equal(cfg->billing_api.max_attempts, 8);
	assert_int_equal(cfg->billing_api.backoff_initial_ms, 1000);
	assert_int_equal(cfg->billing_api.backoff_max_ms, 300000);
	assert_int_equal(cfg->log.level, LOG_LEVEL_INFO);
}

static void
test_defaults(void **state)
{
	struct bw_config cfg;

	(void)state;
	load_ok(DB API, &cfg);
	assert_string_equal(cfg.path, NAME);
	assert_defaults(&cfg);
	config_free(&cfg);
}

static const char all_keys[] =
	"worker = {\n"
	"\tid = \"w-1\";\n"
	"\tconcurrency = 10000;\n"
	"\tbatch_size = 1;\n"
	"\tpoll_interval_ms = 10;\n"
	"\tshutdown_timeout_ms = 0;\n"
	"};\n"
	"database = { conninfo = \"host=db dbname=billing user=worker\"; };\n"
	"redis = {\n"
	"\thost = \"redis.internal\";\n"
	"\tport = 6380;\n"
	"\tsocket = \"/run/redis/redis.sock\";\n"
	"\tpassword_file = \"/etc/billing-worker/redis-password\";\n"
	"\tusername = \"billing-staging\";\n"
	"\tdb = 15;\n"
	"\tkey_prefix = \"billing-worker:staging:\";\n"
	"\tconnect_timeout_ms = 1;\n"
	"\tcommand_timeout_ms = 60000L;\n"
	"};\n"
	"locks = {\n"
	"\tmode = \"auto\";\n"
	"\tttl_ms = 86400000;\n"
	"\trenew_interval_ms = 10;\n"
	"};\n"
	"billing_api = {\n"
	"\tbase_url = \"http://127.0.0.1:8080\";\n"
	"\ttoken_file = \"/run/token\";\n"
	"\ttimeout_ms = 600000;\n"
	"\tconnect_timeout_ms = 1;\n"
	"\tmax_attempts = 1000;\n"
	"\tbackoff_initial_ms = 86400000;\n"
	"\tbackoff_max_ms = 86400000;\n"
	"};\n"
	"log = { level = \"debug\"; };\n";

static void
test_all_keys(void **state)
{
	struct bw_config cfg;

	(void)state;
	load_ok(all_keys, &cfg);
	assert_string_equal(cfg.worker.id, "w-1");
	assert_int_equal(cfg.worker.concurrency, 10000);
	assert_int_equal(cfg.worker.batch_size, 1);
	assert_int_equal(cfg.worker.poll_interval_ms, 10);
	assert_int_equal(cfg.worker.shutdown_timeout_ms, 0);
	assert_string_equal(cfg.database.conninfo, "host=db dbname=billing user=worker");
	assert_string_equal(cfg.redis.host, "redis.internal");
	assert_int_equal(cfg.redis.port, 6380);
	assert_string_equal(cfg.redis.socket, "/run/redis/redis.sock");
	assert_string_equal(cfg.redis.password_file, "/etc/billing-worker/redis-password");
	assert_string_equal(cfg.redis.username, "billing-staging");
	assert_int_equal(cfg.redis.db, 15);
	assert_string_equal(cfg.redis.key_prefix, "billing-worker:staging:");
	assert_int_equal(cfg.redis.connect_timeout_ms, 1);
	assert_int_equal(cfg.redis.command_timeout_ms, 60000);
	assert_int_equal(cfg.locks.mode, LOCK_MODE_AUTO);
	assert_int_equal(cfg.locks.ttl_ms, 86400000);
	assert_int_equal(cfg.locks.renew_interval_ms, 10);
	assert_string_equal(cfg.billing_api.base_url, "http://127.0.0.1:8080");
	assert_string_equal(cfg.billing_api.token_file, "/run/token");
	assert_int_equal(cfg.billing_api.timeout_ms, 600000);
	assert_int_equal(cfg.billing_api.connect_timeout_ms, 1);
	assert_int_equal(cfg.billing_api.max_attempts, 1000);
	assert_int_equal(cfg.billing_api.backoff_initial_ms, 86400000);
	assert_int_equal(cfg.billing_api.backoff_max_ms, 86400000);
	assert_int_equal(cfg.log.level, LOG_LEVEL_DEBUG);
	config_free(&cfg);
}

static void
test_enum_values(void **state)
{
	static const struct {
		const char *text;
		enum lock_mode mode;
		enum log_level level;
	} rows[] = {
		{ DB API "locks = { mode = \"redis\"; };\nlog = { level = \"info\"; };\n",
		  LOCK_MODE_REDIS, LOG_LEVEL_INFO },
		{ DB API "locks = { mode = \"skip-locked\"; };\nlog = { level = \"warn\"; };\n",
		  LOCK_MODE_SKIP_LOCKED, LOG_LEVEL_WARN },
		{ DB API "locks = { mode = \"auto\"; };\nlog = { level = \"error\"; };\n",
		  LOCK_MODE_AUTO, LOG_LEVEL_ERROR },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		struct bw_config cfg;

		load_ok(rows[i].text, &cfg);
		assert_int_equal(cfg.locks.mode, rows[i].mode);
		assert_int_equal(cfg.log.level, rows[i].level);
		config_free(&cfg);
	}
}

/* Widening integer literals must not reach into strings. */
static void
test_digits_in_strings_untouched(void **state)
{
	struct bw_config cfg;

	(void)state;
	load_ok(DB API "worker = { id = \"4294967396 \\\" 99999999999\"; };\n", &cfg);
	assert_string_equal(cfg.worker.id, "4294967396 \" 99999999999");
	config_free(&cfg);
}

static void
test_restart_needed(void **state)
{
	struct bw_config running, loaded;
	char *names = (char *)"unset";

	(void)state;
	load_ok(DB API, &running);

	load_ok("database = { conninfo = \"postgresql:///billing2\"; };\n" API
	    "redis = { host = \"10.0.0.2\"; };\n", &loaded);
	assert_int_equal(config_restart_needed(&running, &loaded, &names), 2);
	assert_non_null(names);
	assert_string_equal(names, "database.conninfo, redis.host");
	free(names);
	config_free(&loaded);

	names = (char *)"unset";
	load_ok(DB API "worker = { concurrency = 8; };\n", &loaded);
	assert_int_equal(config_restart_needed(&running, &loaded, &names), 0);
	assert_null(names);
	config_free(&loaded);

	/* Every reloadable key changed at once still needs no restart. */
	names = (char *)"unset";
	load_ok(DB API_OPEN
	    "\ttimeout_ms = 20000;\n\tconnect_timeout_ms = 3000;\n\tmax_attempts = 3;\n"
	    "\tbackoff_initial_ms = 50;\n\tbackoff_max_ms = 5000;\n};\n"
	    "worker = {\n\tconcurrency = 8;\n\tbatch_size = 5;\n\tpoll_interval_ms = 50;\n"
	    "\tshutdown_timeout_ms = 1;\n};\n"
	    "locks = {\n\tttl_ms = 5000;\n\trenew_interval_ms = 1000;\n};\n"
	    "log = { level = \"debug\"; };\n", &loaded);
	assert_int_equal(config_restart_needed(&running, &loaded, &names), 0);
	assert_null(names);
	config_free(&loaded);

	/* And every other key does. */
	names = NULL;
	load_ok(all_keys, &loaded);
	assert_int_equal(config_restart_needed(&running, &loaded, &names), 14);
	assert_string_equal(names, "worker.id, database.conninfo, redis.host, redis.port, "
	    "redis.socket, redis.password_file, redis.username, redis.db, redis.key_prefix, "
	    "redis.connect_timeout_ms, "
	    "redis.command_timeout_ms, locks.mode, billing_api.base_url, "
	    "billing_api.token_file");
	free(names);
	config_free(&loaded);

	config_free(&running);
}

/*
 * The keys SIGHUP may change, in table order: the ones reload() applied by
 * hand before the table drove it.  Making a key reloadable is a decision
 * about the running worker (locks.mode or redis.key_prefix changed under
 * live locks would split the fleet), so it takes an edit here too.
 */
static const char *const reloadable_keys[] = {
	"worker.concurrency", "worker.batch_size", "worker.poll_interval_ms", "worker.gather_us",
	"worker.shutdown_timeout_ms", "worker.once_patience_ms",
	"locks.ttl_ms", "locks.renew_interval_ms",
	"billing_api.timeout_ms", "billing_api.connect_timeout_ms",
	"billing_api.max_attempts", "billing_api.backoff_initial_ms",
	"billing_api.backoff_max_ms", "billing_api.max_requests_per_second",
	"billing_api.idempotency_key_ttl_s",
	"log.level", "log.format",
	"history.enabled", "history.retention_days",
};

static void
test_reloadable_keys(void **state)
{
	const char *name;
	bool reloadable;
	size_t n = 0, nkeys = 0;

	(void)state;
	while (config_key_at(nkeys, &name, &reloadable) == 0) {
		nkeys++;
		if (!reloadable)
			continue;
		if (n >= sizeof(reloadable_keys) / sizeof(reloadable_keys[0]))
			fail_msg("\"%s\" is reloadable but not in reloadable_keys", name);
		assert_string_equal(name, reloadable_keys[n]);
		n++;
	}
	assert_int_equal(n, sizeof(reloadable_keys) / sizeof(reloadable_keys[0]));
	assert_true(nkeys > n);
}

/*
 * The file both sides of test_apply_every_key start from: the two required
 * keys, a password file so that redis.username may be set alone, and a
 * master name so that redis.sentinels may.  A group's keys are adjacent.
 */
static const struct {
	const char *group, *name, *value;
} base_keys[] = {
	{ "database", "conninfo", "\"postgresql:///billing\"" },
	{ "billing_api", "base_url", "\"https://billing.example.com\"" },
	{ "redis", "password_file", "\"/run/redis-password\"" },
	{ "redis", "master_name", "\"bw-master\"" },
};

#define N_BASE_KEYS (sizeof(base_keys) / sizeof(base_keys[0]))

static bool
in_group(const char *key, size_t glen, const char *group)
{
	return key != NULL && strlen(group) == glen && strncmp(group, key, glen) == 0;
}

/*
 * The base file with KEY ("group.name") set to VALUE, or the base file
 * alone when KEY is NULL.
 */
static void
key_text(const char *key, const char *value, char *buf, size_t len)
{
	const char *dot = key != NULL ? strchr(key, '.') : NULL;
	size_t glen = dot != NULL ? (size_t)(dot - key) : 0;
	FILE *out = fmemopen(buf, len, "w");
	bool placed = false, group_same = false;

	assert_true(key == NULL || dot != NULL);
	assert_non_null(out);
	for (size_t i = 0; i < N_BASE_KEYS; i++) {
		const char *group = base_keys[i].group;
		bool first = i == 0 || strcmp(base_keys[i - 1].group, group) != 0;
		bool last = i + 1 == N_BASE_KEYS || strcmp(base_keys[i + 1].group, group) != 0;
		bool here = in_group(key, glen, group);
		bool same = here && strcmp(dot + 1, base_keys[i].name) == 0;

		if (first) {
			fprintf(out, "%s = { ", group);
			group_same = false;
		}
		fprintf(out, "%s = %s; ", base_keys[i].name, same ? value : base_keys[i].value);
		group_same = group_same || same;
		if (last) {
			if (here && !group_same)
				fprintf(out, "%s = %s; ", dot + 1, value);
			fprintf(out, "};\n");
		}
		placed = placed || here;
	}
	if (key != NULL && !placed)
		fprintf(out, "%.*s = { %s = %s; };\n", (int)glen, key, dot + 1, value);
	assert_int_equal(fclose(out), 0);
}

/*
 * Values to try for a key whose type and range the test does not know: the
 * first that loads and differs from the default is used.  A new key none
 * of them fits fails the test below, which names it.
 */
static const char *const candidates[] = {
	"1", "2", "50", "101", "5000", "20000", "true", "false",
	"\"debug\"", "\"json\"", "\"skip-locked\"", "\"transaction\"", "\"x\"",
	"\"https://other.example.com\"", "\"127.0.0.1:9187\"", "\"billing-worker:t:\"",
	"[ \"127.0.0.1:26379\" ]",
};

/*
 * Walks the table: for every key, a file that changes that key alone.  A
 * reloadable key must be copied into the running configuration and named;
 * any other key must be left alone and named by config_restart_needed
 * instead.  A key flagged reloadable that the copy skips finds no candidate
 * (neither function names it) and fails here too.
 */
static void
test_apply_every_key(void **state)
{
	const char *key;
	bool reloadable;
	size_t nkeys = 0, nreloaded = 0;

	(void)state;
	for (size_t k = 0; config_key_at(k, &key, &reloadable) == 0; k++) {
		bool found = false;

		nkeys++;
		for (size_t c = 0; c < sizeof(candidates) / sizeof(candidates[0]) && !found; c++) {
			struct bw_config running, fresh;
			char text[1024], *errors = NULL;
			char *restart = NULL, *changed = (char *)"unset";
			int nrestart, nchanged;

			key_text(key, candidates[c], text, sizeof(text));
			if (config_load_string(text, NAME, &fresh, &errors) != 0) {
				free(errors);
				continue;
			}
			key_text(NULL, NULL, text, sizeof(text));
			load_ok(text, &running);
			nrestart = config_restart_needed(&running, &fresh, &restart);
			nchanged = config_apply_reloadable(&running, &fresh, &changed);
			assert_true(nchanged >= 0);
			if (nrestart + nchanged == 1) {
				found = true;
				if (reloadable) {
					assert_int_equal(nchanged, 1);
					assert_string_equal(changed, key);
					assert_null(restart);
				} else {
					assert_int_equal(nrestart, 1);
					assert_string_equal(restart, key);
					assert_null(changed);
				}
				free(restart);
				free(changed);
				/* Applied: nothing left to copy.  Not applied: still differs. */
				changed = (char *)"unset";
				restart = NULL;
				assert_int_equal(config_apply_reloadable(&running, &fresh, &changed), 0);
				assert_null(changed);
				assert_int_equal(config_restart_needed(&running, &fresh, &restart),
				    reloadable ? 0 : 1);
				nreloaded += reloadable;
			} else if (nchanged > 0) {
				free(changed);
			}
			free(restart);
			config_free(&running);
			config_free(&fresh);
		}
		if (!found)
			fail_msg("no candidate value changes \"%s\" alone: add one to "
			    "candidates, or the key is %s", key,
			    reloadable ? "reloadable but not applied" : "not compared");
	}
	assert_int_equal(nreloaded, sizeof(reloadable_keys) / sizeof(reloadable_keys[0]));
	assert_true(nkeys > nreloaded);
}

/* Several keys at once: only the reloadable ones move, named in table order. */
static void
test_apply_reloadable(void **state)
{
	struct bw_config running, fresh;
	char *changed = (char *)"unset";

	(void)state;
	load_ok(DB API, &running);

	/* The same file twice changes nothing. */
	load_ok(DB API, &fresh);
	assert_int_equal(config_apply_reloadable(&running, &fresh, &changed), 0);
	assert_null(changed);
	config_free(&fresh);

	load_ok(DB API "history = { enabled = false; };\n"
	    "redis = { host = \"10.0.0.2\"; };\n"
	    "log = { level = \"debug\"; };\n"
	    "locks = { mode = \"auto\"; };\n"
	    "worker = { concurrency = 8; batch_size = 8; id = \"w-2\"; };\n", &fresh);
	assert_int_equal(config_apply_reloadable(&running, &fresh, &changed), 4);
	assert_string_equal(changed,
	    "worker.concurrency, worker.batch_size, log.level, history.enabled");
	free(changed);
	assert_int_equal(running.worker.concurrency, 8);
	assert_int_equal(running.worker.batch_size, 8);
	assert_int_equal(running.log.level, LOG_LEVEL_DEBUG);
	assert_false(running.history.enabled);
	assert_string_equal(running.worker.id, "");
	assert_string_equal(running.redis.host, "127.0.0.1");
	assert_int_equal(running.locks.mode, LOCK_MODE_REDIS);
	assert_int_equal(running.worker.poll_interval_ms, 1000);
	config_free(&fresh);

	/* Going back reports the same keys again. */
	changed = (char *)"unset";
	load_ok(DB API, &fresh);
	assert_int_equal(config_apply_reloadable(&running, &fresh, &changed), 4);
	assert_string_equal(changed,
	    "worker.concurrency, worker.batch_size, log.level, history.enabled");
	free(changed);
	assert_int_equal(running.worker.concurrency, 64);
	assert_true(running.history.enabled);
	config_free(&fresh);

	config_free(&running);
}

static void
test_load_missing_file(void **state)
{
	struct bw_config cfg;
	char *errors = NULL;

	(void)state;
	assert_int_equal(config_load("/nonexistent/billing-worker.conf", &cfg, &errors), 1);
	assert_string_equal(errors,
	    "/nonexistent/billing-worker.conf:0: could not open file: No such file or directory\n");
	assert_null(cfg.path);
	free(errors);
	config_free(&cfg);
}

/* libconfig's scanner would exit the process reading a directory. */
static void
test_load_directory(void **state)
{
	struct bw_config cfg;
	char *errors = NULL;

	(void)state;
	assert_int_equal(config_load("config", &cfg, &errors), 1);
	assert_string_equal(errors, "config:0: could not read file: Is a directory\n");
	free(errors);
	config_free(&cfg);
}

static char *
write_temp(const char *text, size_t len)
{
	char tmpl[] = "/tmp/test_config.XXXXXX";
	int fd = mkstemp(tmpl);
	char *path;

	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, len), (ssize_t)len);
	assert_int_equal(close(fd), 0);
	path = strdup(tmpl);
	assert_non_null(path);
	return path;
}

/*
 * Writes LEN bytes of TEXT to a file, loads it by path, and checks that the
 * one error reported is "PATH:LINE: MESSAGE".
 */
static void
assert_file_error(const char *text, size_t len, int line, const char *message)
{
	char *path = write_temp(text, len);
	char expect[512];
	struct bw_config cfg;
	char *errors = NULL;

	assert_int_equal(config_load(path, &cfg, &errors), 1);
	snprintf(expect, sizeof(expect), "%s:%d: %s\n", path, line, message);
	assert_string_equal(errors, expect);
	free(errors);
	config_free(&cfg);
	unlink(path);
	free(path);
}

static void
test_load_file(void **state)
{
	static const char text[] = DB API "worker = {\n\tconcurrency = 0;\n};\n";

	(void)state;
	assert_file_error(text, sizeof(text) - 1, 4,
	    "\"worker.concurrency\" must be between 1 and 10000, not 0");
}

static void
test_load_file_syntax_error(void **state)
{
	static const char text[] = DB API "worker = {\n\tconcurrency = 3\n\tbatch_size = ;\n};\n";

	(void)state;
	assert_file_error(text, sizeof(text) - 1, 5, "syntax error");
}

/* A NUL would make libconfig ignore the rest of the file. */
static void
test_load_null_byte(void **state)
{
	static const char text[] = DB API "\0worker = { concurrency = 0; };\n";

	(void)state;
	assert_file_error(text, sizeof(text) - 1, 3, "file contains a null byte");
}

/* Larger than one read buffer, with the settings at the end. */
static void
test_load_large_file(void **state)
{
	static const char tail[] = DB API "worker = { concurrency = 7; };\n";
	size_t pad = 20000;
	char *text = malloc(pad + sizeof(tail));
	char *path;
	struct bw_config cfg;
	char *errors = NULL;

	(void)state;
	assert_non_null(text);
	for (size_t i = 0; i < pad; i += 100) {
		memset(text + i, '#', 99);
		text[i + 99] = '\n';
	}
	memcpy(text + pad, tail, sizeof(tail));
	path = write_temp(text, pad + sizeof(tail) - 1);
	assert_int_equal(config_load(path, &cfg, &errors), 0);
	assert_null(errors);
	assert_int_equal(cfg.worker.concurrency, 7);
	config_free(&cfg);
	unlink(path);
	free(path);
	free(text);
}

/* The file operators copy must load and hold exactly the defaults. */
static void
test_load_example(void **state)
{
	struct bw_config cfg;
	char *errors = NULL;
	int n;

	(void)state;
	n = config_load(EXAMPLE_PATH, &cfg, &errors);
	if (n != 0)
		print_message("errors:\n%s", errors);
	assert_int_equal(n, 0);
	assert_null(errors);
	assert_string_equal(cfg.path, EXAMPLE_PATH);
	assert_defaults(&cfg);
	config_free(&cfg);
}

/* Whatever *cfg held before, a failed load leaves it zeroed. */
static void
test_error_leaves_cfg_empty(void **state)
{
	struct bw_config cfg, zero;
	char *errors = NULL;

	(void)state;
	memset(&cfg, 0xa5, sizeof(cfg));
	memset(&zero, 0, sizeof(zero));
	assert_int_equal(config_load_string("worker = 3;\n", NAME, &cfg, &errors), 3);
	assert_memory_equal(&cfg, &zero, sizeof(cfg));
	free(errors);
}

static void
test_free_twice(void **state)
{
	struct bw_config cfg;

	(void)state;
	load_ok(DB API, &cfg);
	config_free(&cfg);
	config_free(&cfg);
	config_free(NULL);
}

static void
test_lock_mode_name(void **state)
{
	(void)state;
	assert_string_equal(config_lock_mode_name(LOCK_MODE_REDIS), "redis");
	assert_string_equal(config_lock_mode_name(LOCK_MODE_SKIP_LOCKED), "skip-locked");
	assert_string_equal(config_lock_mode_name(LOCK_MODE_AUTO), "auto");
	assert_string_equal(config_lock_mode_name((enum lock_mode)42), "unknown");
}

/*
 * @include against files on disk: each row's files are written under a
 * fresh directory D, D/main.conf is loaded from "/" (where systemd starts
 * the worker), and "@D@" in the expected text stands for D.
 */
struct include_file {
	const char *path;       /* under D; "sub/" makes the folder */
	const char *text;
};

struct include_case {
	const char *name;
	struct include_file files[4];   /* the first is main.conf */
	int nerrors;
	const char *expect[4];
};

static const struct include_case include_cases[] = {
	{ "relative @include is beside the including file",
	  { { "main.conf", DB "@include \"api.conf\"\n" }, { "api.conf", API } },
	  0, { NULL } },
	{ "nested relative @include is beside its own file",
	  { { "main.conf", DB "@include \"sub/a.conf\"\n" },
	    { "sub/a.conf", "@include \"b.conf\"\n" },
	    { "sub/b.conf", API } },
	  0, { NULL } },
	{ "missing relative @include names the resolved file",
	  { { "main.conf", DB API "@include \"sub/none.conf\"\n" }, { "sub/x", "" } },
	  1, { "@D@/main.conf:3: could not open @include file \"@D@/sub/none.conf\": "
	       "No such file or directory\n" } },
	{ "an error in an included file has its file and line",
	  { { "main.conf", DB "@include \"w.conf\"\n" API },
	    { "w.conf", "# limits\nworker = {\n\tconcurrency = 0;\n};\n" } },
	  1, { "@D@/w.conf:3: \"worker.concurrency\" must be between 1 and 10000, not 0\n" } },
	{ "lines after an @include keep their numbers",
	  { { "main.conf", "@include \"w.conf\"\n" DB API "worker = { batch_size = 0; };\n" },
	    { "w.conf", "locks = {\n};\nlog = {\n};" } },
	  1, { "@D@/main.conf:4: \"worker.batch_size\" must be between 1 and 10000, not 0\n" } },
	{ "syntax error in an included file",
	  { { "main.conf", DB API "@include \"bad.conf\"\n" }, { "bad.conf", "\n\nlog = {;\n" } },
	  1, { "@D@/bad.conf:3: syntax error\n" } },
	{ "duplicate across files names both",
	  { { "main.conf", DB API "worker = {\n@include \"w.conf\"\n\tconcurrency = 2;\n};\n" },
	    { "w.conf", "\tconcurrency = 1;\n" } },
	  1, { "@D@/main.conf:5: duplicate setting \"worker.concurrency\" (first set at "
	       "@D@/w.conf:1)\n" } },
	{ "integers in an included file are widened too",
	  { { "main.conf", DB API "@include \"w.conf\"\n" },
	    { "w.conf", "worker = { batch_size = 4294967396; };\n" } },
	  1, { "@D@/w.conf:1: \"worker.batch_size\" must be between 1 and 10000, not 4294967396\n" } },
	{ "an @include of itself stops",
	  { { "main.conf", DB API "@include \"main.conf\"\n" } },
	  1, { "@include \"main.conf\" is nested more than 10 deep\n" } },
};

static char *
expand_dir(const char *text, const char *dir)
{
	char *out = malloc(strlen(text) * 2 + strlen(dir) * 8 + 1);
	char *o = out;

	assert_non_null(out);
	for (const char *p = text; *p != '\0';) {
		if (strncmp(p, "@D@", 3) == 0) {
			o = stpcpy(o, dir);
			p += 3;
		} else {
			*o++ = *p++;
		}
	}
	*o = '\0';
	return out;
}

static void
test_include_case(void **state)
{
	const struct include_case *c = *state;
	char dir[] = "/tmp/bw-test-include-XXXXXX", path[512], cwd[4096];
	struct bw_config cfg;
	char *errors = NULL;
	int n;

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/sub", dir);
	assert_int_equal(mkdir(path, 0700), 0);
	for (size_t i = 0; i < 4 && c->files[i].path != NULL; i++) {
		FILE *f;

		snprintf(path, sizeof(path), "%s/%s", dir, c->files[i].path);
		assert_non_null(f = fopen(path, "w"));
		fputs(c->files[i].text, f);
		fclose(f);
	}
	assert_non_null(getcwd(cwd, sizeof(cwd)));
	assert_int_equal(chdir("/"), 0);
	snprintf(path, sizeof(path), "%s/main.conf", dir);
	n = config_load(path, &cfg, &errors);
	assert_int_equal(chdir(cwd), 0);
	if (n != c->nerrors)
		print_message("errors:\n%s", errors != NULL ? errors : "(none)\n");
	assert_int_equal(n, c->nerrors);
	for (size_t i = 0; i < 4 && c->expect[i] != NULL; i++) {
		char *want = expand_dir(c->expect[i], dir);

		if (strstr(errors, want) == NULL)
			print_message("missing: %s\nerrors:\n%s", want, errors);
		assert_non_null(strstr(errors, want));
		free(want);
	}
	if (n == 0)
		assert_null(errors);
	free(errors);
	config_free(&cfg);
	for (size_t i = 0; i < 4 && c->files[i].path != NULL; i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, c->files[i].path);
		unlink(path);
	}
	snprintf(path, sizeof(path), "%s/sub", dir);
	rmdir(path);
	rmdir(dir);
}

/* Warnings: valid files, FILE:LINE like errors, only for what the file sets. */
static void
test_warnings(void **state)
{
	static const struct {
		const char *text;
		const char *want;           /* NULL: no warning */
	} rows[] = {
		{ DB API, NULL },               /* the defaults, both 64, say nothing */
		{ DB API "worker = {\n\tconcurrency = 8;\n\tbatch_size = 8;\n};\n", NULL },
		{ DB API "worker = {\n\tconcurrency = 8;\n\tbatch_size = 20;\n};\n",
		  NAME ":5: warning: \"worker.batch_size\" (20) is greater than "
		  "\"worker.concurrency\" (8): a poll takes at most 8 items\n" },
		{ DB API "worker = {\n\tconcurrency = 32;\n};\n",
		  NAME ":4: warning: \"worker.batch_size\" (64) is greater than "
		  "\"worker.concurrency\" (32): a poll takes at most 32 items\n" },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		struct bw_config cfg;

		load_ok(rows[i].text, &cfg);
		if (rows[i].want == NULL)
			assert_null(cfg.warnings);
		else
			assert_string_equal(cfg.warnings, rows[i].want);
		config_free(&cfg);
	}
}

#define INCLUDE_TEST(i) { include_cases[i].name, test_include_case, NULL, NULL, \
	(void *)&include_cases[i] }

static const struct CMUnitTest fixed_tests[] = {
	INCLUDE_TEST(0), INCLUDE_TEST(1), INCLUDE_TEST(2), INCLUDE_TEST(3), INCLUDE_TEST(4),
	INCLUDE_TEST(5), INCLUDE_TEST(6), INCLUDE_TEST(7), INCLUDE_TEST(8),
	cmocka_unit_test(test_defaults),
	cmocka_unit_test(test_warnings),
	cmocka_unit_test(test_all_keys),
	cmocka_unit_test(test_enum_values),
	cmocka_unit_test(test_digits_in_strings_untouched),
	cmocka_unit_test(test_restart_needed),
	cmocka_unit_test(test_reloadable_keys),
	cmocka_unit_test(test_apply_every_key),
	cmocka_unit_test(test_apply_reloadable),
	cmocka_unit_test(test_load_missing_file),
	cmocka_unit_test(test_load_directory),
	cmocka_unit_test(test_load_file),
	cmocka_unit_test(test_load_file_syntax_error),
	cmocka_unit_test(test_load_null_byte),
	cmocka_unit_test(test_load_large_file),
	cmocka_unit_test(test_load_example),
	cmocka_unit_test(test_error_leaves_cfg_empty),
	cmocka_unit_test(test_free_twice),
	cmocka_unit_test(test_lock_mode_name),
};

TABLE_TESTS_MAIN(cases, test_case, fixed_tests)
