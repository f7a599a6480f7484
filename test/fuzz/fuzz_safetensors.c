/*
 * libFuzzer harness: the safetensors header parser (offsets, shapes, dtypes,
 * overlaps) on arbitrary bytes.  Build and run with `make fuzz` (clang).
 */
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_err		err;

	(void) kl_st_parse_header(data, size, "fuzz", &err);
	return 0;
}
