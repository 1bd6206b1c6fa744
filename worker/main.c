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
	    "                      status [--json] | audit | show KIND ID [--json] |\n"
	    "                      pause [--kind KIND] --reason TEXT | resume [--kind KIND] |\n"
	    "                      version]\n"
	    "\n"
	    "  run           the daemon (default); SIGTERM/SIGINT stop, SIGHUP reloads\n"
	    "  once          process everything due now, then exit\n"
	    "  check-config  validate the configuration and the files it names; exit 2 if\n"
	    "                invalid (--connect: also reach the database, Redis and the API)\n"
	    "  migrate       create or upgrade the database schema\n"
	    "  status        counts by state, oldest pending, items in flight\n"
	    "                (--json: the same as one JSON document)\n"
	    "  audit         check the ledger and item invariants; exit 1 on a violation\n"
	    "  show          an item, its ledger rows and its history of attempts\n"
	    "  pause         stop billing fleet-wide (KIND invoice or redemption; default both);\n"
	    "                calls in flight finish and are recorded\n"
	    "  resume        take up billing again\n"
	    "  version       print the version and exit\n"
	    "\n"
	    "  -c, --config FILE  configuration file (default " DEFAULT_CONFIG ")\n"
	    "  -h, --help         this summary\n"
	    "      --version      print the version and exit\n"
	    "\n"
	    "Options may come before or after the command.\n");
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
	"version", NULL
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
		    strncmp(argv[i], "--kind", 6) == 0 || strncmp(argv[i], "--reason", 8) == 0)
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
		{ NULL, 0, NULL, 0 },
	};
	const char *path = DEFAULT_CONFIG, *cmd = "run";
	struct bw_config cfg;
	char *errors = NULL;
	const char *kind = NULL, *reason = NULL, *show_kind = NULL, *show_id = NULL;
	bool json = false, connect = false, version = false;
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
	    (reason != NULL && strcmp(cmd, "pause") != 0)) {
		fprintf(stderr, "billing-worker: option \"%s\" belongs to \"%s\", not \"%s\"\n",
		    reason != NULL && strcmp(cmd, "pause") != 0 ? "--reason" : "--kind",
		    reason != NULL && strcmp(cmd, "pause") != 0 ? "pause" : "pause or resume", cmd);
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
		config_free(&cfg);
		return EXIT_CONFIG;
	}
	if (config_resolve_worker_id(&cfg) == -1) {
		fprintf(stderr, "billing-worker: out of memory\n");
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
	    strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0)
		log_set_level(LOG_WARN);

	if (preflight_database(&cfg) == -1)
		status = EXIT_CONFIG;
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
