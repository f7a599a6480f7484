/*
 * libFuzzer harness: decoding a state blob into a sequence of the golden
 * tiny_a model (test/fixtures, or $KL_FIXTURES), then one forward step on it when it
 * loads.  Inputs may be one part or several, split at "KLSTATE" magics.
 * Built twice: as is, and with FIX_CRC (fuzz_state_crc).  Every refusal must
 * carry an error code and a message.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kl.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kl_model *model;
static kl_ctx *ctx;
static kl_seq *seq;

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_err		err;
	kl_blob		parts[8];
	int			n = 0;
	size_t		start = 0;

	if (!model)
	{
		char		dir[1024];
		const char *fixtures = getenv("KL_FIXTURES");

		snprintf(dir, sizeof(dir), "%s/golden/tiny_a", fixtures ? fixtures : "test/fixtures");
		kl_set_threads(1);
		if (kl_model_load(dir, NULL, &model, &err) != KL_OK || kl_ctx_new(model, 64, &ctx, &err) != KL_OK ||
			kl_seq_new(model, &seq, &err) != KL_OK)
			abort();
	}
	for (size_t i = 1; i + 8 <= size && n < 7; i++)
		if (memcmp(data + i, "KLSTATE", 8) == 0)
		{
			parts[n].data = data + start;
			parts[n++].len = i - start;
			start = i;
		}
	parts[n].data = data + start;
	parts[n++].len = size - start;
#ifdef FIX_CRC
	/*
	 * Variant fuzz_state_crc: rewrite each part's trailing checksum so that
	 * mutations reach the header and payload checks behind it.
	 */
	{
		static uint8_t *copy;
		static size_t cap;

		if (copy == NULL || cap < size)
		{
			/* (an empty input too gets a buffer: memcpy wants a pointer) */
			free(copy);
			copy = malloc(size ? size : 1);
			cap = size;
			if (copy == NULL)
				abort();
		}
		memcpy(copy, data, size);
		for (int i = 0; i < n; i++)
		{
			uint8_t    *p = copy + (parts[i].data - data);

			parts[i].data = p;
			if (parts[i].len >= 8)
			{
				uint32_t	crc = kl_crc32c(p, parts[i].len - 4);

				memcpy(p + parts[i].len - 4, &crc, 4);
			}
		}
	}
#endif
	err = (kl_err) {0};
	if (kl_state_load(seq, parts, n, &err) == KL_OK)
	{
		int32_t		tok = 1;
		kl_batch_item it = {seq, &tok, 1, NULL, false};

		(void) kl_forward(ctx, &it, 1, &err);
	}
	else if (!kl_err_is_set(&err))
		abort();
	return 0;
}
