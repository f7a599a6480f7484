/*
 * libFuzzer harness: config.json parsing and validation on arbitrary bytes,
 * the model fields and the quantization_config.  Every refusal must carry an
 * error code and a message.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "config.h"
#include "quant_config.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_config	cfg;
	kl_qconfig	qc;
	kl_err		err = {0};

	if (kl_config_parse((const char *) data, size, "fuzz", &cfg, &err) != KL_OK && !kl_err_is_set(&err))
		abort();
	err = (kl_err) {0};
	if (kl_qconfig_parse((const char *) data, size, "fuzz", &qc, &err) == KL_OK)
	{
		(void) kl_qconfig_expects(&qc, "model.layers.0.self_attn.q_proj", true);
		kl_qconfig_free(&qc);
	}
	else if (!kl_err_is_set(&err))
		abort();
	return 0;
}
