#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "config/config.h"
#include "store/conninfo.h"
#include "store/report.h"
#include "store/store.h"
#include "worker/loop.h"
#include "worker/secret.h"

#define DEFAULT_CONFIG "/etc/billing-worker/billing-worker.conf"

enum { EXIT_OK = 0, EXIT_ERROR = 1, EXIT_USAGE = 2 };

static void
usage(FILE *out)
{
	fprintf(out,
	    "usage: billing-worker [-c FILE] [run | once | check-config | migrate | status [--json] |\n"
	    "                      audit | show KIND ID [--json] |\n"
	    "                      pause [--kind KIND] --reason TEXT | resume [--kind KIND]]\n"
	    "\n"
	    "  run           the daemon (default); SIGTERM/SIGINT stop, SIGHUP reloads\n"
	    "  once          process everything due now, then exit\n"
	    "  check-config  validate the configuration file; exit 2 if invalid\n"
	    "  migrate       create or upgrade the database schema\n"
	    "  status        counts by state, oldest pending, items in flight\n"
	    "                (--json: the same as one JSON document)\n"
	    "  audit         check the ledger and item invariants; exit 1 on a violation\n"
	    "  show          an item, its ledger rows and its history of attempts\n"
	    "  pause         stop billing fleet-wide (KIND invoice or redemption; default both);\n"
	    "                calls in flight finish and are recorded\n"
	    "  resume        take up billing again\n"
	    "\n"
	    "  -c FILE       configuration file (default " DEFAULT_CONFIG ")\n");
}

/*
 * A password written into database.conninfo makes the configuration file
 * itself a secret file, under the same rule.  (Better: ~/.pgpass, which
 * libpq itself refuses when others can read it.)
 */
static int
check_config_secret(const struct bw_config *cfg)
{
	char *password = NULL;
	int fd, ret;

	if (conninfo_password(cfg->database.conninfo, &password) == -1 || password == NULL)
		return 0;
	explicit_bzero(password, strlen(password));
	free(password);
	if ((fd = open(cfg->path, O_RDONLY | O_CLOEXEC)) == -1) {
		fprintf(stderr, "billing-worker: could not open \"%s\": %s\n", cfg->path,
		    strerror(errno));
		return -1;
	}
	ret = secret_check_mode("configuration file with a password in database.conninfo",
	    cfg->path, fd, cfg->worker.allow_readable_secrets);
	close(fd);
	return ret;
}

static int
open_store(const struct bw_config *cfg, store **ret)
{
	store *st;

	if (store_new(cfg->database.conninfo, cfg->worker.id, &st) == -1) {
		fprintf(stderr, "billing-worker: out of memory\n");
		return -1;
	}
	if (store_connect(st) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
		store_free(st);
		return -1;
	}
	*ret = st;
	return 0;
}

static int
cmd_migrate(const struct bw_config *cfg)
{
	store *st;
	int status = EXIT_ERROR;

	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_migrate(st) == 0)
		status = EXIT_OK;
	else
		fprintf(stderr, "billing-worker: migrate failed: %s\n", store_errmsg(st));
	store_free(st);
	return status;
}

static int
cmd_status(const struct bw_config *cfg, bool json)
{
	store *st;
	int status = EXIT_ERROR;

	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_check_schema(st) == -1)
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
	else if ((json ? store_status_json(st, stdout, cfg->billing_api.max_attempts) :
	    store_status(st, stdout, cfg->billing_api.max_attempts)) == 0)
		status = EXIT_OK;
	else
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
	store_free(st);
	return status;
}

/* A pending item whose lease ran out this long ago is taken by no one. */
#define AUDIT_STUCK_AFTER_S 300

/*
 * pause / resume: fleet-wide, in the database, so every worker on every
 * host sees it at its next poll.  BY names the operator ("user@host") in
 * the record and in every worker's log.
 */
static int
cmd_pause(const struct bw_config *cfg, bool pause, const char *kind, const char *reason)
{
	bool kinds[ITEM_KIND_COUNT] = { kind == NULL, kind == NULL };
	struct passwd *pw = getpwuid(getuid());
	char host[256], by[512];
	store *st;
	int changed, status = EXIT_ERROR;

	if (kind != NULL) {
		for (int k = 0; k < ITEM_KIND_COUNT; k++)
			kinds[k] = strcmp(kind, item_kind_name(k)) == 0;
		if (!kinds[ITEM_INVOICE] && !kinds[ITEM_REDEMPTION]) {
			fprintf(stderr, "billing-worker: --kind must be \"invoice\" or "
			    "\"redemption\", not \"%s\"\n", kind);
			return EXIT_USAGE;
		}
	}
	if (gethostname(host, sizeof(host)) == -1)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	snprintf(by, sizeof(by), "%s@%s", pw != NULL ? pw->pw_name : "uid", host);
	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_check_schema(st) == -1 ||
	    store_set_pause(st, kinds, pause, reason, by, &changed) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
		goto out;
	}
	printf("%s %s%s (%d changed)\n", pause ? "paused" : "resumed",
	    kind == NULL ? "invoices and redemptions" : kind, kind == NULL ? "" : "s", changed);
	status = EXIT_OK;
out:
	store_free(st);
	return status;
}

/* show KIND ID: the item, its ledger rows and its history of attempts. */
static int
cmd_show(const struct bw_config *cfg, const char *kind, const char *id, bool json)
{
	enum item_kind k;
	char *end;
	long long v;
	bool found = false;
	store *st;
	int status = EXIT_ERROR;

	if (strcmp(kind, "invoice") == 0)
		k = ITEM_INVOICE;
	else if (strcmp(kind, "redemption") == 0)
		k = ITEM_REDEMPTION;
	else {
		fprintf(stderr, "billing-worker: show: the kind must be \"invoice\" or "
		    "\"redemption\", not \"%s\"\n", kind);
		return EXIT_USAGE;
	}
	errno = 0;
	v = strtoll(id, &end, 10);
	if (errno != 0 || end == id || *end != '\0' || v <= 0) {
		fprintf(stderr, "billing-worker: show: \"%s\" is not an item id\n", id);
		return EXIT_USAGE;
	}
	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_check_schema(st) == -1 || store_show(st, k, v, json, stdout, &found) == -1)
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
	else if (!found)
		fprintf(stderr, "billing-worker: no %s %lld\n", kind, v);
	else
		status = EXIT_OK;
	store_free(st);
	return status;
}

static int
cmd_audit(const struct bw_config *cfg)
{
	store *st;
	int status = EXIT_ERROR, violations = 0;

	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_check_schema(st) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
	} else if (store_audit(st, stdout, AUDIT_STUCK_AFTER_S, &violations) == -1) {
		fprintf(stderr, "billing-worker: audit failed: %s\n", store_errmsg(st));
	} else if (violations > 0) {
		printf("audit: %d violation%s\n", violations, violations == 1 ? "" : "s");
	} else {
		printf("audit: clean\n");
		status = EXIT_OK;
	}
	store_free(st);
	return status;
}

static int
cmd_work(struct bw_config *cfg, bool once)
{
	static char token[SECRET_MAX], redis_password[SECRET_MAX];
	char token_cred[4096], redis_cred[4096];
	const char *token_path = secret_credential("api-token", token_cred, sizeof(token_cred));
	const char *redis_path = secret_credential("redis-password", redis_cred, sizeof(redis_cred));
	bool have_redis_password = false;
	int status;

	if (config_insecure_http(cfg->billing_api.base_url))
		log_warnx("billing_api.base_url \"%s\" is plain http to a host that is not "
		    "loopback (allow_insecure_http): the token and every request cross the "
		    "network unencrypted", cfg->billing_api.base_url);
	if (token_path != NULL)
		log_info("reading the API token from the systemd credential \"api-token\"");
	if (secret_api_token(cfg, token, sizeof(token)) == -1)
		return EXIT_ERROR;
	if (redis_path == NULL && cfg->redis.password_file[0] != '\0')
		redis_path = cfg->redis.password_file;
	else if (redis_path != NULL)
		log_info("reading the Redis password from the systemd credential "
		    "\"redis-password\"");
	if (redis_path != NULL && cfg->locks.mode != LOCK_MODE_SKIP_LOCKED) {
		if (secret_read(redis_path == redis_cred ? "credential" : "redis.password_file",
		    redis_path, cfg->worker.allow_readable_secrets, redis_password,
		    sizeof(redis_password)) == -1) {
			explicit_bzero(token, sizeof(token));
			return EXIT_ERROR;
		}
		have_redis_password = true;
	}
	status = loop_run(cfg, token, have_redis_password ? redis_password : NULL, once);
	explicit_bzero(token, sizeof(token));
	explicit_bzero(redis_password, sizeof(redis_password));
	return status;
}

int
main(int argc, char **argv)
{
	const char *path = DEFAULT_CONFIG, *cmd = "run";
	struct bw_config cfg;
	char *errors = NULL;
	const char *kind = NULL, *reason = NULL, *show_kind = NULL, *show_id = NULL;
	bool json = false;
	int ch, nerr, status;

	/*
	 * From here on the process holds secrets (the token, the conninfo's
	 * password): no core dump may carry them off, and no other process of
	 * the same user may ptrace or read our memory.
	 */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == -1)
		fprintf(stderr, "billing-worker: could not disable core dumps: %s\n",
		    strerror(errno));

	memset(&cfg, 0, sizeof(cfg));
	/* "+": options end at the command, whose own options follow it. */
	while ((ch = getopt(argc, argv, "+c:h")) != -1) {
		switch (ch) {
		case 'c':
			path = optarg;
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (optind < argc)
		cmd = argv[optind++];
	if (strcmp(cmd, "show") == 0 && optind + 1 < argc) {
		show_kind = argv[optind];
		show_id = argv[optind + 1];
		optind += 2;
	}
	if (optind < argc && (strcmp(cmd, "status") == 0 || strcmp(cmd, "show") == 0) &&
	    strcmp(argv[optind], "--json") == 0) {
		json = true;
		optind++;
	}
	while (optind + 1 < argc && (strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0) &&
	    (strcmp(argv[optind], "--kind") == 0 ||
	    (strcmp(argv[optind], "--reason") == 0 && strcmp(cmd, "pause") == 0))) {
		if (strcmp(argv[optind], "--kind") == 0)
			kind = argv[optind + 1];
		else
			reason = argv[optind + 1];
		optind += 2;
	}
	if (optind < argc) {
		fprintf(stderr, "billing-worker: unexpected argument \"%s\"\n", argv[optind]);
		usage(stderr);
		return EXIT_USAGE;
	}
	if (strcmp(cmd, "run") != 0 && strcmp(cmd, "once") != 0 &&
	    strcmp(cmd, "check-config") != 0 && strcmp(cmd, "migrate") != 0 &&
	    strcmp(cmd, "status") != 0 && strcmp(cmd, "audit") != 0 &&
	    strcmp(cmd, "pause") != 0 && strcmp(cmd, "resume") != 0 && strcmp(cmd, "show") != 0) {
		fprintf(stderr, "billing-worker: unknown command \"%s\"\n", cmd);
		usage(stderr);
		return EXIT_USAGE;
	}
	if (strcmp(cmd, "show") == 0 && show_id == NULL) {
		fprintf(stderr, "billing-worker: show needs KIND ID, e.g. \"show invoice 17\"\n");
		return EXIT_USAGE;
	}
	if (strcmp(cmd, "pause") == 0 && (reason == NULL || reason[0] == '\0')) {
		fprintf(stderr, "billing-worker: pause needs --reason TEXT: it is shown in every "
		    "worker's log and in status\n");
		return EXIT_USAGE;
	}

	nerr = config_load(path, &cfg, &errors);
	if (nerr != 0) {
		fputs(errors ? errors : "", stderr);
		if (errors != NULL && errors[0] != '\0' && errors[strlen(errors) - 1] != '\n')
			fputc('\n', stderr);
		fprintf(stderr, "billing-worker: \"%s\": %d error%s\n", path, nerr,
		    nerr == 1 ? "" : "s");
		free(errors);
		config_free(&cfg);
		return EXIT_USAGE;
	}
	if (strcmp(cmd, "check-config") == 0) {
		printf("%s: configuration is valid\n", path);
		config_free(&cfg);
		return EXIT_OK;
	}
	if (config_resolve_worker_id(&cfg) == -1) {
		fprintf(stderr, "billing-worker: out of memory\n");
		config_free(&cfg);
		return EXIT_ERROR;
	}
	log_init(cfg.worker.id, (int)cfg.log.level);
	log_set_json(cfg.log.format == LOG_FORMAT_JSON);

	/* Reports print to stdout; keep connection chatter out of them. */
	if (strcmp(cmd, "status") == 0 || strcmp(cmd, "audit") == 0 || strcmp(cmd, "show") == 0 ||
	    strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0)
		log_set_level(LOG_WARN);

	if (check_config_secret(&cfg) == -1)
		status = EXIT_ERROR;
	else if (strcmp(cmd, "migrate") == 0)
		status = cmd_migrate(&cfg);
	else if (strcmp(cmd, "status") == 0)
		status = cmd_status(&cfg, json);
	else if (strcmp(cmd, "audit") == 0)
		status = cmd_audit(&cfg);
	else if (strcmp(cmd, "show") == 0)
		status = cmd_show(&cfg, show_kind, show_id, json);
	else if (strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0)
		status = cmd_pause(&cfg, strcmp(cmd, "pause") == 0, kind, reason);
	else
		status = cmd_work(&cfg, strcmp(cmd, "once") == 0);
	config_free(&cfg);
	return status;
}
