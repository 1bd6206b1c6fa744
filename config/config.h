#ifndef BW_CONFIG_H
#define BW_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

/*
 * The parsed configuration file.  A value type the caller embeds: fill it
 * with config_load(), release it with config_free().  Strings are owned by
 * the struct and never NULL after a successful load (empty means unset).
 */

enum lock_mode {
	LOCK_MODE_REDIS,
	LOCK_MODE_SKIP_LOCKED,
	LOCK_MODE_AUTO,
};

/* What database.conninfo leads to: the server, or a pooler's pool_mode. */
enum db_pooling {
	DB_POOLING_SESSION,     /* a session of our own: prepared statements, SET */
	DB_POOLING_TRANSACTION, /* a transaction pooler: nothing outlives a transaction */
};

enum log_level {
	LOG_LEVEL_DEBUG,
	LOG_LEVEL_INFO,
	LOG_LEVEL_WARN,
	LOG_LEVEL_ERROR,
};

enum log_format {
	LOG_FORMAT_TEXT,
	LOG_FORMAT_JSON,
};

/*
 * The longest redis.key_prefix: a lock key is the prefix plus at most
 * CONFIG_REDIS_KEY_PREFIX_MAX + 40 bytes ("lock:redemption:" and an id).
 */
#define CONFIG_REDIS_KEY_PREFIX_MAX 64

struct bw_config {
	char *path;                 /* the file this came from */
	/*
	 * Settings that are valid but probably not what was meant, one
	 * "FILE:LINE: message" line each, or NULL when there are none.
	 * Worth saying at start and in check-config; never a refusal.
	 */
	char *warnings;
	struct {
		char *id;               /* "" means hostname:pid, resolved by the caller */
		int concurrency;
		int batch_size;
		int poll_interval_ms;
		int gather_us;          /* with calls in flight, a turn lasts at least this */
		int shutdown_timeout_ms;
		int once_patience_ms;   /* once: longest wait for a lost server or a refusing API */
		bool allow_readable_secrets; /* accept group/world-readable secret files, with a warning */
	} worker;
	struct {
		char *conninfo;         /* required; may hold a password: never log it */
		int query_timeout_ms;   /* longest a statement may take, server and client side */
		enum db_pooling pooling;
		/*
		 * A direct connection (no transaction pooler) for LISTEN and for
		 * migrate; "" = database.conninfo, or under transaction pooling
		 * no LISTEN at all.  Secret like conninfo: never log it.
		 */
		char *listen_conninfo;
	} database;
	struct {
		char *host;
		int port;
		char *socket;           /* "" means TCP host:port */
		char *password_file;    /* "" means no AUTH */
		char *username;         /* ACL user for AUTH; "" = the default user */
		int db;                 /* SELECTed after every connect */
		char *key_prefix;       /* starts every key the fleet keeps in Redis */
		int connect_timeout_ms;
		int command_timeout_ms;
		/*
		 * The Sentinel entries ("HOST:PORT") joined by commas, "" for
		 * none; with them the master is asked of them by master_name,
		 * and host, port and socket are not used.
		 */
		char *sentinels;
		char *master_name;
	} redis;
	struct {
		enum lock_mode mode;
		int ttl_ms;
		int renew_interval_ms;
	} locks;
	struct {
		char *base_url;         /* required */
		char *token_file;
		int timeout_ms;
		int connect_timeout_ms;
		int max_attempts;
		int backoff_initial_ms;
		int backoff_max_ms;
		int max_requests_per_second; /* shared by every worker; 0 = no limit */
		int idempotency_key_ttl_s; /* how long the API keeps a key; 0 = forever */
		char *ca_file;          /* "" = the system CA store */
		bool allow_insecure_http; /* http:// to a host that is not loopback */
	} billing_api;
	struct {
		enum log_level level;
		enum log_format format;
	} log;
	struct {
		char *listen;           /* "host:port" of the metrics endpoint; "" = off */
	} metrics;
	struct {
		bool enabled;           /* completions write the attempts history */
		int retention_days;     /* finished items' history older than this goes; 0 = kept */
	} history;
};

/*
 * Loads FILE, applies defaults for every key it does not set and validates
 * the result.  Returns 0 when the file is valid.  Otherwise returns the
 * number of errors found and sets *errors to a malloc'd string holding one
 * line per error, "FILE:LINE: message" (LINE is 0 when no line applies,
 * e.g. a missing required key or an unreadable file); the caller frees it.
 * On error *cfg is left empty (safe to config_free) and *errors is set; on
 * success *errors is NULL.  Every error is reported, not just the first.
 */
int config_load(const char *path, struct bw_config *cfg, char **errors)
	__attribute__((warn_unused_result));

/* The same for text held in memory; NAME stands for the file in messages. */
int config_load_string(const char *text, const char *name,
    struct bw_config *cfg, char **errors)
	__attribute__((warn_unused_result));

/* Releases what config_load allocated; accepts a zeroed or freed struct. */
void config_free(struct bw_config *cfg);

/*
 * Compares a running configuration with a freshly loaded one.  Returns the
 * number of settings that differ but cannot change without a restart and
 * sets *names to a malloc'd comma-separated list of their keys
 * ("database.conninfo, redis.host"), or NULL when there are none.
 */
int config_restart_needed(const struct bw_config *running,
    const struct bw_config *loaded, char **names);

/*
 * Copies into RUNNING every setting the key table marks reloadable whose
 * value in FRESH differs, and nothing else: the table, not the caller,
 * knows what SIGHUP may change.  Returns the number of settings changed and
 * sets *changed_names to a malloc'd comma-separated list of their keys in
 * table order ("worker.concurrency, log.level"), or NULL when none changed;
 * the caller frees it.  A reloadable string is copied: RUNNING frees its
 * old value and owns the copy, FRESH keeps its own, so the caller still
 * config_frees FRESH; any pointer taken into RUNNING's old string dangles
 * afterwards.  Returns -1 without memory, with RUNNING and *changed_names
 * untouched.
 */
int config_apply_reloadable(struct bw_config *running,
    const struct bw_config *fresh, char **changed_names)
	__attribute__((warn_unused_result));

/*
 * The I-th key of the table, for callers that walk it (the tests check
 * every reloadable key reloads): sets *ret_name (static, never freed) and
 * *ret_reloadable and returns 0, or returns -1 past the last key.
 */
int config_key_at(size_t i, const char **ret_name, bool *ret_reloadable)
	__attribute__((warn_unused_result));

const char *config_lock_mode_name(enum lock_mode mode);

/*
 * Gives CFG its worker id when the file left it "": hostname:pid.  The same
 * process resolves the same file to the same id, so a reloaded config
 * compares equal to the running one unless the operator changed the key.
 * Returns -1 without memory.
 */
int config_resolve_worker_id(struct bw_config *cfg) __attribute__((warn_unused_result));

/*
 * Copies URL into BUF (LEN bytes) without any user:password@ part, for a
 * log line or a status report.
 */
void config_url_for_log(const char *url, char *buf, size_t len);

/*
 * True when URL is http:// to a host that is not loopback (localhost,
 * 127.0.0.0/8, ::1): a configuration only allow_insecure_http permits,
 * and one the worker warns about at every start.
 */
bool config_insecure_http(const char *url);

#endif
