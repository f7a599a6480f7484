/*
 * libFuzzer harness: config.json parsing and validation on arbitrary bytes.
 */
#include <stddef.h>
#include <stdint.h>

#include "config.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_config	cfg;
	kl_err		err;

	(void) kl_config_parse((const char *) data, size, "fuzz", &cfg, &err);
	return 0;
}
