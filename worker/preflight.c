/*
 * The checks "run" and "once" make before they start, shared with
 * "check-config" so that the two can never disagree: a unit whose
 * ExecStartPre passes must not then fail in ExecStart and be restarted
 * every RestartSec by systemd.
 */

#include "worker/preflight.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "store/conninfo.h"
#include "worker/secret.h"

/*
 * A password written into database.conninfo or database.listen_conninfo
 * makes the configuration file itself a secret file, under the same rule.
 * (Better: ~/.pgpass, which libpq itself refuses when others can read it.)
 */
static int
check_config_secret(const struct bw_config *cfg)
{
	const char *const keys[] = { "database.conninfo", "database.listen_conninfo" };
	const char *const values[] = { cfg->database.conninfo, cfg->database.listen_conninfo };
	char what[96];
	int fd, ret = -1;

	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		char *password = NULL;

		if (conninfo_password(values[i], &password) == -1 || password == NULL)
			continue;
		explicit_bzero(password, strlen(password));
		free(password);
		if ((fd = open(cfg->path, O_RDONLY | O_CLOEXEC)) == -1) {
			log_error("could not open \"%s\": %s", cfg->path, strerror(errno));
			return -1;
		}
		snprintf(what, sizeof(what), "configuration file with a password in %s", keys[i]);
		ret = secret_check_mode(what, cfg->path, fd, cfg->worker.allow_readable_secrets);
		close(fd);
		return ret;
	}
	return 0;
}

int
preflight_database(const struct bw_config *cfg)
{
	char err[512];

	/*
	 * libpq would refuse this string at every connect attempt, and the
	 * worker would wait for a database forever instead of saying so.
	 */
	if (conninfo_check("database.conninfo", cfg->database.conninfo, err, sizeof(err)) == -1) {
		log_error("%s", err);
		return -1;
	}
	if (cfg->database.listen_conninfo[0] != '\0' && conninfo_check("database.listen_conninfo",
	    cfg->database.listen_conninfo, err, sizeof(err)) == -1) {
		log_error("%s", err);
		return -1;
	}
	return check_config_secret(cfg);
}

/* Past this, a CA file is not a CA bundle (Debian's whole store is 0.2 MB). */
#define CA_FILE_MAX (16 * 1024 * 1024)

/*
 * libcurl reads billing_api.ca_file at every handshake, not at start: a
 * file it cannot use would fail every call, each one retried as an
 * ambiguous attempt.  So it is opened and looked at here, once.  Unlike a
 * secret file it may be readable by anyone: certificates are public (the
 * system's own store is 0644), and refusing that would only push
 * operators to allow_readable_secrets.  It must hold at least one PEM
 * certificate, the only form OpenSSL reads from CURLOPT_CAINFO; whether
 * it is the right CA only a handshake tells ("check-config --connect").
 */
static int
check_ca_file(const char *path)
{
	FILE *f;
	struct stat sb;
	char *line = NULL;
	size_t cap = 0;
	bool found = false;
	int ret = -1;

	if ((f = fopen(path, "re")) == NULL) {
		log_error("could not open billing_api.ca_file \"%s\": %s", path, strerror(errno));
		return -1;
	}
	if (fstat(fileno(f), &sb) == -1) {
		log_error("could not stat billing_api.ca_file \"%s\": %s", path, strerror(errno));
	} else if (!S_ISREG(sb.st_mode)) {
		log_error("billing_api.ca_file \"%s\" is not a regular file", path);
	} else if (sb.st_size == 0) {
		log_error("billing_api.ca_file \"%s\" is empty", path);
	} else if (sb.st_size > CA_FILE_MAX) {
		log_error("billing_api.ca_file \"%s\" is larger than %d bytes", path, CA_FILE_MAX);
	} else {
		errno = 0;
		while (!found && getline(&line, &cap, f) != -1)
			found = strncmp(line, "-----BEGIN ", 11) == 0 &&
			    strstr(line, "CERTIFICATE-----") != NULL;
		if (ferror(f))
			log_error("could not read billing_api.ca_file \"%s\": %s", path,
			    strerror(errno));
		else if (!found)
			log_error("billing_api.ca_file \"%s\" holds no PEM certificate "
			    "(\"-----BEGIN CERTIFICATE-----\")", path);
		else
			ret = 0;
	}
	free(line);
	fclose(f);
	return ret;
}

int
preflight_worker(const struct bw_config *cfg, char *token, char *redis_password,
    bool *have_redis_password)
{
	char token_cred[4096], redis_cred[4096];
	const char *token_path = secret_credential("api-token", token_cred, sizeof(token_cred));
	const char *redis_path = secret_credential("redis-password", redis_cred, sizeof(redis_cred));
	int ret = 0;

	*have_redis_password = false;
	if (cfg->billing_api.ca_file[0] != '\0' && check_ca_file(cfg->billing_api.ca_file) == -1)
		ret = -1;
	if (token_path != NULL)
		log_info("reading the API token from the systemd credential \"api-token\"");
	if (secret_api_token(cfg, token, SECRET_MAX) == -1)
		ret = -1;
	/* skip-locked never talks to Redis: its password is not needed, nor read */
	if (cfg->locks.mode == LOCK_MODE_SKIP_LOCKED)
		return ret;
	if (redis_path != NULL)
		log_info("reading the Redis password from the systemd credential "
		    "\"redis-password\"");
	else if (cfg->redis.password_file[0] != '\0')
		redis_path = cfg->redis.password_file;
	if (redis_path != NULL) {
		if (secret_read(redis_path == redis_cred ? "credential" : "redis.password_file",
		    redis_path, cfg->worker.allow_readable_secrets, redis_password,
		    SECRET_MAX) == -1)
			ret = -1;
		else
			*have_redis_password = true;
	}
	return ret;
}
