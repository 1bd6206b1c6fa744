#include "worker/secret.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"

/*
 * A file holding a secret must be readable by its owner alone: a token
 * that moves money in a 0644 file is readable by every account on the
 * host.  Containers that mount secrets 0644 opt out with
 * worker.allow_readable_secrets, and get a warning at every start.
 */
int
secret_check_mode(const char *what, const char *path, int fd, bool allow)
{
	struct stat sb;

	if (fstat(fd, &sb) == -1) {
		log_error("could not stat %s \"%s\": %s", what, path,
		    strerror(errno));
		return -1;
	}
	if ((sb.st_mode & (S_IRGRP | S_IROTH)) == 0)
		return 0;
	if (allow) {
		log_warnx("%s \"%s\" is readable by group or others (mode %04o); accepted "
		    "because worker.allow_readable_secrets is set", what, path,
		    (unsigned)(sb.st_mode & 07777));
		return 0;
	}
	log_error("%s \"%s\" is readable by group or others (mode "
	    "%04o): make it readable by its owner only (chmod 600), or set "
	    "worker.allow_readable_secrets = true", what, path, (unsigned)(sb.st_mode & 07777));
	return -1;
}

/*
 * Reads a secret (API token, Redis password) from PATH into BUF, trailing
 * whitespace removed.  Messages name the file, never its content.
 */
int
secret_read(const char *what, const char *path, bool allow_readable, char *buf, size_t len)
{
	FILE *f;
	size_t n;

	if ((f = fopen(path, "re")) == NULL) {
		log_error("could not open %s \"%s\": %s", what, path,
		    strerror(errno));
		return -1;
	}
	if (secret_check_mode(what, path, fileno(f), allow_readable) == -1) {
		fclose(f);
		return -1;
	}
	n = fread(buf, 1, len - 1, f);
	if (ferror(f)) {
		log_error("could not read %s \"%s\": %s", what, path,
		    strerror(errno));
		fclose(f);
		return -1;
	}
	if (!feof(f)) {
		log_error("%s \"%s\" is longer than %d bytes", what,
		    path, SECRET_MAX - 1);
		fclose(f);
		return -1;
	}
	fclose(f);
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' ||
	    buf[n - 1] == '\t'))
		buf[--n] = '\0';
	if (n == 0) {
		log_error("%s \"%s\" is empty", what, path);
		return -1;
	}
	if (strpbrk(buf, "\r") != NULL) {
		log_error("%s \"%s\" holds more than one line", what, path);
		return -1;
	}
	return 0;
}

/*
 * systemd's LoadCredential=NAME:PATH hands the service a copy of a secret
 * in $CREDENTIALS_DIRECTORY/NAME, readable by the service alone, so the
 * secret's file itself can stay root's.  Returns that path when the unit
 * passed credential NAME, else NULL.
 */
const char *
secret_credential(const char *name, char *buf, size_t len)
{
	const char *dir = getenv("CREDENTIALS_DIRECTORY");

	if (dir == NULL || dir[0] == '\0')
		return NULL;
	snprintf(buf, len, "%s/%s", dir, name);
	return access(buf, F_OK) == 0 ? buf : NULL;
}


int
secret_api_token(const struct bw_config *cfg, char *buf, size_t len)
{
	char cred[4096];
	const char *path = secret_credential("api-token", cred, sizeof(cred));

	return secret_read(path != NULL ? "credential" : "billing_api.token_file",
	    path != NULL ? path : cfg->billing_api.token_file,
	    cfg->worker.allow_readable_secrets, buf, len);
}
