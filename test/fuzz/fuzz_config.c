/*
 * libFuzzer harness: config.json parsing and validation on arbitrary bytes,
 * the model fields and the quantization_config.
 */
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "quant_config.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_config	cfg;
	kl_qconfig	qc;
	kl_err		err;

	(void) kl_config_parse((const char *) data, size, "fuzz", &cfg, &err);
	if (kl_qconfig_parse((const char *) data, size, "fuzz", &qc, &err) == KL_OK)
	{
		(void) kl_qconfig_expects(&qc, "model.layers.0.self_attn.q_proj", true);
		kl_qconfig_free(&qc);
	}
	return 0;
}
