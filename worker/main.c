#include <errno.h>
#include <getopt.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "common/log.h"
#include "config/config.h"
#include "store/report.h"
#include "store/store.h"
#include "worker/loop.h"
#include "worker/preflight.h"
#include "worker/probe.h"
#include "worker/secret.h"

#define DEFAULT_CONFIG "/etc/billing-worker/billing-worker.conf"

/*
 * 2 is both a usage and a configuration error: the units'
 * RestartPreventExitStatus=2 stops systemd restarting a worker that will
 * refuse again, whatever made it refuse.
 */
enum { EXIT_OK = 0, EXIT_ERROR = 1, EXIT_USAGE = 2, EXIT_CONFIG = 2 };

static void
usage(FILE *out)
{
	fprintf(out,
	    "usage: billing-worker [-c FILE] [run | once | check-config [--connect] | migrate |\n"
	    "                      status [--json] [--failed] | audit [--since-last-clean] |\n"
	    "                      show KIND ID [--json] |\n"
	    "                      pause [--kind KIND] --reason TEXT | resume [--kind KIND] |\n"
	    "                      requeue KIND ID... --reason TEXT [--dry-run] |\n"
	    "                      requeue KIND --failed [--since TIME] [--error PATTERN]\n"
	    "                              --reason TEXT [--dry-run] | version]\n"
	    "\n"
	    "  run           the daemon (default); SIGTERM/SIGINT stop, SIGHUP reloads\n"
	    "  once          process everything due now, then exit\n"
	    "  check-config  validate the configuration and the files it names; exit 2 if\n"
	    "                invalid (--connect: also reach the database, Redis and the API)\n"
	    "  migrate       create or upgrade the database schema\n"
	    "  status        counts by state, oldest pending, items in flight\n"
	    "                (--json: the same as one JSON document)\n"
	    "  audit         check the ledger and item invariants; exit 1 on a violation\n"
	    "                (--since-last-clean: only the items finished since the last\n"
	    "                clean run, and the pending ones)\n"
	    "  show          an item, its ledger rows and its history of attempts\n"
	    "  pause         stop billing fleet-wide (KIND invoice or redemption; default both);\n"
	    "                calls in flight finish and are recorded\n"
	    "  resume        take up billing again\n"
	    "  requeue       put failed items (KIND invoice or redemption) back for a new\n"
	    "                charge attempt under a new idempotency key: those named, or\n"
	    "                every failed one since TIME whose last error matches PATTERN\n"
	    "                (a POSIX regular expression); --dry-run lists them only\n"
	    "  version       print the version and exit\n"
	    "\n"
	    "  -c, --config FILE  configuration file (default " DEFAULT_CONFIG ")\n"
	    "  -h, --help         this summary\n"
	    "      --version      print the version and exit\n"
	    "\n"
	    "Options may come before or after the command.\n");
}

/*
 * A connected handle on CONNINFO, told whether it leads through a
 * transaction pooler (database.pooling): every command but migrate then
 * works through one, since none keeps anything across transactions.
 */
static int
open_store_on(const struct bw_config *cfg, const char *conninfo, bool txn_pooling, store **ret)
{
	store *st;

	if (store_new(conninfo, cfg->worker.id, &st) == -1) {
		fprintf(stderr, "billing-worker: out of memory\n");
		return -1;
	}
	store_set_pooling(st, txn_pooling);
	if (store_connect(st) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
		store_free(st);
		return -1;
	}
	*ret = st;
	return 0;
}

static int
open_store(const struct bw_config *cfg, store **ret)
{
	return open_store_on(cfg, cfg->database.conninfo,
	    cfg->database.pooling == DB_POOLING_TRANSACTION, ret);
}

/*
 * Migrations hold a session-level advisory lock from the first statement
 * to the last, so that hosts migrating at once take turns.  A transaction
 * pooler would run the lock, the DDL and the unlock on different server
 * connections: the lock would serialize nothing and stay behind on one of
 * them.  So under transaction pooling migrate uses database.listen_conninfo,
 * which must reach PostgreSQL directly, or refuses and says what to do.
 */
static int
cmd_migrate(const struct bw_config *cfg)
{
	const char *conninfo = cfg->database.conninfo;
	store *st;
	int status = EXIT_ERROR;

	if (cfg->database.pooling == DB_POOLING_TRANSACTION) {
		if (cfg->database.listen_conninfo[0] == '\0') {
			fprintf(stderr, "billing-worker: migrate refused: database.pooling is "
			    "\"transaction\", and migrate needs a session of its own (it holds an "
			    "advisory lock across its statements, which a transaction pooler does "
			    "not keep): set database.listen_conninfo to a connection string that "
			    "reaches PostgreSQL directly, or run migrate with a configuration whose "
			    "database.conninfo does\n");
			return EXIT_CONFIG;
		}
		conninfo = cfg->database.listen_conninfo;
		fprintf(stderr, "billing-worker: database.pooling is \"transaction\": migrating "
		    "through database.listen_conninfo, a direct connection\n");
	}
	if (open_store_on(cfg, conninfo, false, &st) == -1)
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

/* "user@host": who paused or requeued, for the record. */
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

/*
 * pause / resume: fleet-wide, in the database, so every worker on every
 * host sees it at its next poll.  BY names the operator ("user@host") in
 * the record and in every worker's log.
 */
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

/* requeue's command line, as parsed; IDS is allocated, the strings are argv's. */
struct requeue_args {
	enum item_kind kind;
	int64_t *ids;
	size_t nids;
	bool failed, dry_run;
	const char *since, *error, *reason;
};

/*
 * requeue's arguments after the options were taken out: KIND, then the
 * ids (none with --failed).  Prints the reason and returns -1 on a usage
 * error (RA->ids may then be set: the caller frees it).
 */
static int
parse_requeue(int argc, char **argv, int first, struct requeue_args *ra)
{
	const char *kind;
	int i = first;

	if (i >= argc) {
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
		const char *a = argv[i];
		char *end;
		long long id;

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
cmd_audit(const struct bw_config *cfg, bool since_last_clean)
{
	const struct store_audit_opts opts = {
		.stuck_after_s = AUDIT_STUCK_AFTER_S, .since_last_clean = since_last_clean,
		.unseen_margin_ms = 2 * cfg->database.query_timeout_ms,
	};
	store *st;
	int status = EXIT_ERROR, violations = 0;

	if (open_store(cfg, &st) == -1)
		return EXIT_ERROR;
	if (store_check_schema(st) == -1) {
		fprintf(stderr, "billing-worker: %s\n", store_errmsg(st));
	} else if (store_audit(st, stdout, &opts, &violations) == -1) {
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
	bool have_redis_password = false;
	int status = EXIT_CONFIG;

	if (config_insecure_http(cfg->billing_api.base_url))
		log_warnx("billing_api.base_url \"%s\" is plain http to a host that is not "
		    "loopback (allow_insecure_http): the token and every request cross the "
		    "network unencrypted", cfg->billing_api.base_url);
	if (preflight_worker(cfg, token, redis_password, &have_redis_password) == 0)
		status = loop_run(cfg, token, have_redis_password ? redis_password : NULL, once);
	explicit_bzero(token, sizeof(token));
	explicit_bzero(redis_password, sizeof(redis_password));
	return status;
}

/*
 * Everything "run" would refuse, without starting: the file, then the
 * files it names and the conninfo, each problem said once.  The secrets
 * are read as "run" reads them, into buffers wiped at once.  With CONNECT
 * the servers are asked too (probe.c), a line each.
 */
static int
cmd_check_config(const struct bw_config *cfg, bool connect)
{
	static char token[SECRET_MAX], redis_password[SECRET_MAX];
	bool have_redis_password = false;
	int status = EXIT_OK;

	if (preflight_database(cfg) == -1)
		status = EXIT_CONFIG;
	if (preflight_worker(cfg, token, redis_password, &have_redis_password) == -1)
		status = EXIT_CONFIG;
	if (status != EXIT_OK) {
		fprintf(stderr, "billing-worker: \"%s\": the worker would refuse to start\n",
		    cfg->path);
	} else {
		printf("%s: configuration is valid\n", cfg->path);
		if (connect)
			status = probe_all(cfg, have_redis_password ? redis_password : NULL) == 0 ?
			    EXIT_OK : EXIT_ERROR;
	}
	explicit_bzero(token, sizeof(token));
	explicit_bzero(redis_password, sizeof(redis_password));
	return status;
}

static const char *const commands[] = {
	"run", "once", "check-config", "migrate", "status", "audit", "show", "pause", "resume",
	"requeue", "version", NULL
};

static bool
known_command(const char *cmd)
{
	for (size_t i = 0; commands[i] != NULL; i++)
		if (strcmp(commands[i], cmd) == 0)
			return true;
	return false;
}

/*
 * --json and --connect qualify their command, so they come after it
 * ("status --json"); the global options may come anywhere.  getopt_long
 * permutes argv and cannot tell, so this looks first.  Returns the option
 * found before any command, or NULL.
 */
static const char *
command_option_first(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--") == 0 || argv[i][0] != '-')
			break;
		if (strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0)
			i++;
		else if (strcmp(argv[i], "--json") == 0 || strcmp(argv[i], "--connect") == 0 ||
		    strncmp(argv[i], "--kind", 6) == 0 || strncmp(argv[i], "--reason", 8) == 0 ||
		    strcmp(argv[i], "--failed") == 0 || strcmp(argv[i], "--dry-run") == 0 ||
		    strncmp(argv[i], "--since", 7) == 0 || strncmp(argv[i], "--error", 7) == 0 ||
		    strcmp(argv[i], "--since-last-clean") == 0)
			return argv[i];
	}
	return NULL;
}

static void
print_errors(const char *path, const char *errors, int nerr)
{
	fputs(errors != NULL ? errors : "", stderr);
	if (errors != NULL && errors[0] != '\0' && errors[strlen(errors) - 1] != '\n')
		fputc('\n', stderr);
	fprintf(stderr, "billing-worker: \"%s\": %d error%s\n", path, nerr, nerr == 1 ? "" : "s");
}

int
main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ "json", no_argument, NULL, 'j' },
		{ "connect", no_argument, NULL, 'C' },
		{ "kind", required_argument, NULL, 'k' },
		{ "reason", required_argument, NULL, 'r' },
		{ "failed", no_argument, NULL, 'F' },
		{ "dry-run", no_argument, NULL, 'D' },
		{ "since", required_argument, NULL, 'S' },
		{ "error", required_argument, NULL, 'E' },
		{ "since-last-clean", no_argument, NULL, 'L' },
		{ NULL, 0, NULL, 0 },
	};
	const char *path = DEFAULT_CONFIG, *cmd = "run";
	struct bw_config cfg;
	char *errors = NULL;
	const char *kind = NULL, *reason = NULL, *show_kind = NULL, *show_id = NULL;
	const char *since = NULL, *error_pattern = NULL;
	struct requeue_args ra;
	bool json = false, connect = false, version = false, failed = false, dry_run = false;
	bool since_last_clean = false;
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
	if (command_option_first(argc, argv) != NULL) {
		fprintf(stderr, "billing-worker: option \"%s\" must follow its command\n",
		    command_option_first(argc, argv));
		usage(stderr);
		return EXIT_USAGE;
	}
	/*
	 * getopt_long permutes: options may follow the command
	 * ("status --config FILE --json"), as operators type them.  --json
	 * and --connect belong to one command each, checked below.
	 */
	while ((ch = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
		switch (ch) {
		case 'c':
			path = optarg;
			break;
		case 'h':
			usage(stdout);
			return EXIT_OK;
		case 'V':
			version = true;
			break;
		case 'j':
			json = true;
			break;
		case 'C':
			connect = true;
			break;
		case 'k':
			kind = optarg;
			break;
		case 'r':
			reason = optarg;
			break;
		case 'F':
			failed = true;
			break;
		case 'D':
			dry_run = true;
			break;
		case 'S':
			since = optarg;
			break;
		case 'E':
			error_pattern = optarg;
			break;
		case 'L':
			since_last_clean = true;
			break;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (optind < argc)
		cmd = argv[optind++];
	memset(&ra, 0, sizeof(ra));
	if (strcmp(cmd, "requeue") == 0) {
		ra.failed = failed;
		ra.dry_run = dry_run;
		ra.since = since;
		ra.error = error_pattern;
		ra.reason = reason;
		if (parse_requeue(argc, argv, optind, &ra) == -1) {
			free(ra.ids);
			usage(stderr);
			return EXIT_USAGE;
		}
		optind = argc;
	}
	if (strcmp(cmd, "show") == 0 && optind + 1 < argc) {
		show_kind = argv[optind];
		show_id = argv[optind + 1];
		optind += 2;
	}
	if (optind < argc) {
		fprintf(stderr, "billing-worker: unexpected argument \"%s\"\n", argv[optind]);
		usage(stderr);
		return EXIT_USAGE;
	}
	if (!known_command(cmd)) {
		fprintf(stderr, "billing-worker: unknown command \"%s\"\n", cmd);
		usage(stderr);
		return EXIT_USAGE;
	}
	if ((json && strcmp(cmd, "status") != 0 && strcmp(cmd, "show") != 0) ||
	    (connect && strcmp(cmd, "check-config") != 0)) {
		fprintf(stderr, "billing-worker: option \"%s\" belongs to \"%s\", not \"%s\"\n",
		    json ? "--json" : "--connect", json ? "status or show" : "check-config", cmd);
		usage(stderr);
		return EXIT_USAGE;
	}
	if ((kind != NULL && strcmp(cmd, "pause") != 0 && strcmp(cmd, "resume") != 0) ||
	    (reason != NULL && strcmp(cmd, "pause") != 0 && strcmp(cmd, "requeue") != 0) ||
	    (failed && strcmp(cmd, "status") != 0 && strcmp(cmd, "requeue") != 0) ||
	    ((dry_run || since != NULL || error_pattern != NULL) && strcmp(cmd, "requeue") != 0)) {
		fprintf(stderr, "billing-worker: option \"%s\" does not belong to \"%s\"\n",
		    kind != NULL ? "--kind" : reason != NULL ? "--reason" : failed ? "--failed" :
		    dry_run ? "--dry-run" : since != NULL ? "--since" : "--error", cmd);
		free(ra.ids);
		usage(stderr);
		return EXIT_USAGE;
	}
	if (since_last_clean && strcmp(cmd, "audit") != 0) {
		fprintf(stderr, "billing-worker: option \"--since-last-clean\" does not belong to "
		    "\"%s\"\n", cmd);
		free(ra.ids);
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
	if (version || strcmp(cmd, "version") == 0) {
		printf("billing-worker %s\n", BW_VERSION);
		return EXIT_OK;
	}

	nerr = config_load(path, &cfg, &errors);
	if (nerr != 0) {
		print_errors(path, errors, nerr);
		free(errors);
		free(ra.ids);
		config_free(&cfg);
		return EXIT_CONFIG;
	}
	if (config_resolve_worker_id(&cfg) == -1) {
		fprintf(stderr, "billing-worker: out of memory\n");
		free(ra.ids);
		config_free(&cfg);
		return EXIT_ERROR;
	}
	log_init(cfg.worker.id, (int)cfg.log.level);
	log_set_json(cfg.log.format == LOG_FORMAT_JSON);

	/* check-config talks to a person: plain lines, only what is wrong. */
	if (strcmp(cmd, "check-config") == 0) {
		log_set_plain(1);
		log_set_level(LOG_WARN);
		if (cfg.warnings != NULL)
			fputs(cfg.warnings, stderr);
		status = cmd_check_config(&cfg, connect);
		config_free(&cfg);
		return status;
	}
	if (cfg.warnings != NULL)
		for (char *line = strtok(cfg.warnings, "\n"); line != NULL; line = strtok(NULL, "\n"))
			log_warnx("%s", line);

	/* Reports print to stdout; keep connection chatter out of them. */
	if (strcmp(cmd, "status") == 0 || strcmp(cmd, "audit") == 0 || strcmp(cmd, "show") == 0 ||
	    strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0 || strcmp(cmd, "requeue") == 0)
		log_set_level(LOG_WARN);

	if (preflight_database(&cfg) == -1)
		status = EXIT_CONFIG;
	else if (strcmp(cmd, "migrate") == 0)
		status = cmd_migrate(&cfg);
	else if (strcmp(cmd, "status") == 0)
		status = cmd_status(&cfg, json, failed);
	else if (strcmp(cmd, "audit") == 0)
		status = cmd_audit(&cfg, since_last_clean);
	else if (strcmp(cmd, "show") == 0)
		status = cmd_show(&cfg, show_kind, show_id, json);
	else if (strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0)
		status = cmd_pause(&cfg, strcmp(cmd, "pause") == 0, kind, reason);
	else if (strcmp(cmd, "requeue") == 0)
		status = cmd_requeue(&cfg, &ra);
	else
		status = cmd_work(&cfg, strcmp(cmd, "once") == 0);
	free(ra.ids);
	config_free(&cfg);
	return status;
}
