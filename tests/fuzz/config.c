/*
 * libFuzzer target: the configuration loader and validator.  The input is
 * the file's text; libconfig parses it, then the table and the cross-key
 * rules check it.  Whatever the text, the load returns, reports at least
 * one error or a struct whose strings are all set, and frees everything.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct bw_config cfg;
	char *text, *errors = NULL;
	int n;

	/* Beyond a config file's size nothing new is reached, only time spent. */
	if (size > 64 * 1024)
		return 0;
	if ((text = malloc(size + 1)) == NULL)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	n = config_load_string(text, "fuzz.conf", &cfg, &errors);
	if (n == 0) {
		if (errors != NULL || cfg.database.conninfo == NULL || cfg.billing_api.base_url == NULL ||
		    cfg.worker.id == NULL || cfg.billing_api.ca_file == NULL)
			abort();
		(void)config_insecure_http(cfg.billing_api.base_url);
	} else if (n < 0 || errors == NULL) {
		abort();
	}
	free(errors);
	config_free(&cfg);
	free(text);
	return 0;
}
