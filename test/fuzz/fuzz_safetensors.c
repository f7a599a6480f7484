/*
 * libFuzzer harness: the safetensors header parser (offsets, shapes, dtypes,
 * overlaps) on arbitrary bytes.  Build and run with `make fuzz` (clang).
 * Every refusal must carry an error code and a message.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "safetensors.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_err		err = {0};

	if (kl_st_parse_header(data, size, "fuzz", &err) != KL_OK && !kl_err_is_set(&err))
		abort();
	return 0;
}
