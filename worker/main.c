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
	    "usage: billing-worker [-c FILE] [run | once | check-config | migrate |\n"
	    "                      status [--json] [--failed] | audit |\n"
	    "                      pause [--kind KIND] --reason TEXT | resume [--kind KIND] |\n"
	    "                      requeue KIND ID... --reason TEXT [--dry-run] |\n"
	    "                      requeue KIND --failed [--since TIME] [--error PATTERN]\n"
	    "                              --reason TEXT [--dry-run]]\n"
	    "\n"
	    "  run           the daemon (default); SIGTERM/SIGINT stop, SIGHUP reloads\n"
	    "  once          process everything due now, then exit\n"
	    "  check-config  validate the configuration file; exit 2 if invalid\n"
	    "  migrate       create or upgrade the database schema\n"
	    "  status        counts by state, oldest pending, items in flight\n"
	    "                (--json: the same as one JSON document;\n"
	    "                --failed: failed items by reason, newest first)\n"
	    "  audit         check the ledger and item invariants; exit 1 on a violation\n"
	    "  pause         stop billing fleet-wide (KIND invoice or redemption; default both);\n"
	    "                calls in flight finish and are recorded\n"
	    "  resume        take up billing again\n"
	    "  requeue       put failed items (KIND invoice or redemption) back for a new\n"
	    "                charge attempt under a new idempotency key: those named, or\n"
	    "                every failed one since TIME whose last error matches PATTERN\n"
	    "                (a POSIX regular expression); --dry-run lists them only\n"
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
cmd_status(const struct bw_config *cfg, bool json, bool failed)
{
	store *st;
	int status = EXIT_ERROR, rc;

	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_check_schema(st) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
		goto out;
	}
	if (failed)
		rc = store_status_failed(st, stdout, json);
	else
		rc = json ? store_status_json(st, stdout, cfg->billing_api.max_attempts) :
		    store_status(st, stdout, cfg->billing_api.max_attempts);
	if (rc == 0)
		status = EXIT_OK;
	else
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
out:
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
/* Who runs this command, as the records of pauses and requeues name them: "user@host". */
static void
operator_name(char *by, size_t len)
{
	struct passwd *pw = getpwuid(getuid());
	char host[256];

	if (gethostname(host, sizeof(host)) == -1)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	snprintf(by, len, "%s@%s", pw != NULL ? pw->pw_name : "uid", host);
}

static int
cmd_pause(const struct bw_config *cfg, bool pause, const char *kind, const char *reason)
{
	bool kinds[ITEM_KIND_COUNT] = { kind == NULL, kind == NULL };
	char by[512];
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
	operator_name(by, sizeof(by));
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

/* requeue's command line, as parsed; IDS is allocated, the strings are argv's. */
struct requeue_args {
	enum item_kind kind;
	int64_t *ids;
	size_t nids;
	bool failed, dry_run;
	const char *since, *error, *reason;
};

/*
 * Parses ARGV[*OPTIND..] as requeue's arguments: KIND first, then ids and
 * options in any order.  Prints the reason and returns -1 on a usage error
 * (RA->ids may then be set: the caller frees it).
 */
static int
parse_requeue(int argc, char **argv, int *optind_p, struct requeue_args *ra)
{
	const char *kind;
	int i = *optind_p;

	memset(ra, 0, sizeof(*ra));
	if (i >= argc || argv[i][0] == '-') {
		fprintf(stderr, "billing-worker: requeue needs a KIND first: \"invoice\" or "
		    "\"redemption\"\n");
		return -1;
	}
	kind = argv[i++];
	if (strcmp(kind, "invoice") == 0) {
		ra->kind = ITEM_INVOICE;
	} else if (strcmp(kind, "redemption") == 0) {
		ra->kind = ITEM_REDEMPTION;
	} else {
		fprintf(stderr, "billing-worker: requeue: KIND must be \"invoice\" or "
		    "\"redemption\", not \"%s\"\n", kind);
		return -1;
	}
	if ((ra->ids = calloc((size_t)argc, sizeof(*ra->ids))) == NULL) {
		fprintf(stderr, "billing-worker: out of memory\n");
		return -1;
	}
	for (; i < argc; i++) {
		const char *a = argv[i], **value = NULL;
		char *end;
		long long id;

		if (strcmp(a, "--failed") == 0) {
			ra->failed = true;
			continue;
		}
		if (strcmp(a, "--dry-run") == 0) {
			ra->dry_run = true;
			continue;
		}
		if (strcmp(a, "--reason") == 0)
			value = &ra->reason;
		else if (strcmp(a, "--since") == 0)
			value = &ra->since;
		else if (strcmp(a, "--error") == 0)
			value = &ra->error;
		if (value != NULL) {
			if (i + 1 == argc) {
				fprintf(stderr, "billing-worker: requeue: %s needs a value\n", a);
				return -1;
			}
			*value = argv[++i];
			continue;
		}
		errno = 0;
		id = strtoll(a, &end, 10);
		if (a[0] == '-' || a[0] == '+' || a[0] == '\0' || *end != '\0' || errno != 0 ||
		    id <= 0) {
			fprintf(stderr, "billing-worker: requeue: \"%s\" is neither an option nor "
			    "an item id\n", a);
			return -1;
		}
		ra->ids[ra->nids++] = id;
	}
	*optind_p = i;
	if (ra->nids == 0 && !ra->failed) {
		fprintf(stderr, "billing-worker: requeue needs the ids of the items, or --failed\n");
		return -1;
	}
	if (ra->nids > 0 && ra->failed) {
		fprintf(stderr, "billing-worker: requeue takes item ids or --failed, not both\n");
		return -1;
	}
	if (!ra->failed && (ra->since != NULL || ra->error != NULL)) {
		fprintf(stderr, "billing-worker: requeue: --since and --error choose among "
		    "--failed items; with ids, name the items only\n");
		return -1;
	}
	if (ra->reason == NULL || ra->reason[0] == '\0') {
		fprintf(stderr, "billing-worker: requeue needs --reason TEXT: it is recorded with "
		    "who requeued the items, and when\n");
		return -1;
	}
	return 0;
}

/*
 * requeue: a failed item back to pending, in its next generation, so
 * under a new idempotency key (the old one holds the API's refusal).
 * Usage errors in the selection the database finds (a TIME or PATTERN it
 * cannot read) exit 2, like those found here.
 */
static int
cmd_requeue(const struct bw_config *cfg, const struct requeue_args *ra)
{
	struct requeue_selection sel = { ra->kind, ra->nids > 0 ? ra->ids : NULL, ra->nids,
	    ra->since, ra->error };
	const char *what = item_kind_name(ra->kind);
	char by[512];
	store *st;
	int requeued = 0, refused = 0, status = EXIT_ERROR;

	operator_name(by, sizeof(by));
	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_check_schema(st) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
		goto out;
	}
	if (store_requeue(st, &sel, ra->reason, by, ra->dry_run, stdout, stderr, &requeued,
	    &refused) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
		if (store_failed_on_data(st))
			status = EXIT_USAGE;
		goto out;
	}
	if (refused > 0) {
		fprintf(stderr, "billing-worker: nothing requeued: %d of the %ss named may not be\n",
		    refused, what);
		goto out;
	}
	if (requeued == 0)
		printf("no failed %ss match: nothing to requeue\n", what);
	else if (ra->dry_run)
		printf("dry run: %d %s%s would be requeued; nothing changed\n", requeued, what,
		    requeued == 1 ? "" : "s");
	else
		printf("requeued %d %s%s\n", requeued, what, requeued == 1 ? "" : "s");
	status = EXIT_OK;
out:
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
	const char *kind = NULL, *reason = NULL;
	struct requeue_args ra;
	bool json = false, failed = false;
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
	memset(&ra, 0, sizeof(ra));
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
	while (optind < argc && strcmp(cmd, "status") == 0 &&
	    (strcmp(argv[optind], "--json") == 0 || strcmp(argv[optind], "--failed") == 0)) {
		if (strcmp(argv[optind], "--json") == 0)
			json = true;
		else
			failed = true;
		optind++;
	}
	if (strcmp(cmd, "requeue") == 0 && parse_requeue(argc, argv, &optind, &ra) == -1) {
		free(ra.ids);
		usage(stderr);
		return EXIT_USAGE;
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
		free(ra.ids);
		return EXIT_USAGE;
	}
	if (strcmp(cmd, "run") != 0 && strcmp(cmd, "once") != 0 &&
	    strcmp(cmd, "check-config") != 0 && strcmp(cmd, "migrate") != 0 &&
	    strcmp(cmd, "status") != 0 && strcmp(cmd, "audit") != 0 &&
	    strcmp(cmd, "pause") != 0 && strcmp(cmd, "resume") != 0 &&
	    strcmp(cmd, "requeue") != 0) {
		fprintf(stderr, "billing-worker: unknown command \"%s\"\n", cmd);
		usage(stderr);
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
		free(ra.ids);
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
		free(ra.ids);
		return EXIT_ERROR;
	}
	log_init(cfg.worker.id, (int)cfg.log.level);
	log_set_json(cfg.log.format == LOG_FORMAT_JSON);

	/* Reports print to stdout; keep connection chatter out of them. */
	if (strcmp(cmd, "status") == 0 || strcmp(cmd, "audit") == 0 ||
	    strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0 ||
	    strcmp(cmd, "requeue") == 0)
		log_set_level(LOG_WARN);

	if (check_config_secret(&cfg) == -1)
		status = EXIT_ERROR;
	else if (strcmp(cmd, "migrate") == 0)
		status = cmd_migrate(&cfg);
	else if (strcmp(cmd, "status") == 0)
		status = cmd_status(&cfg, json, failed);
	else if (strcmp(cmd, "audit") == 0)
		status = cmd_audit(&cfg);
	else if (strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0)
		status = cmd_pause(&cfg, strcmp(cmd, "pause") == 0, kind, reason);
	else if (strcmp(cmd, "requeue") == 0)
		status = cmd_requeue(&cfg, &ra);
	else
		status = cmd_work(&cfg, strcmp(cmd, "once") == 0);
	config_free(&cfg);
	free(ra.ids);
	return status;
}
