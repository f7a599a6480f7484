/*
 * pg_load_options.c — load_model's options as a canonical string and back
 * (contract in pg_load_options.h).
 */
#include "pg_load_options.h"
#include "pg_errors.h"

#include "quant.h"

static const char *const routing_hint =
"'select' (the default): the router bias chooses the experts and the scores weight them, as vLLM, SGLang "
"and llama.cpp run Kimi Linear; 'reference': the bias is added into the weights too, as the released "
"kimi_linear reference code does.";

static const char *const precision_hint =
"'auto' (the default): bf16 on a GPU, fp32 on the CPU; 'fp32': the GPU matches the CPU to float rounding; "
"'bf16': the GPU's matrix products on tensor cores (not on the CPU, which computes in fp32); 'fp8': bf16 plus "
"FP8 activations in the prefill products of FP8 weights (W8A8; GPU only, models with FP8 weights).";

void
kl_load_options_from_args(const char *moe_routing, const char *quantize, const char *precision,
						  KlLoadOptions *out)
{
	kl_qtype	qt;
	kl_err		err;

	memset(out, 0, sizeof(*out));
	if (moe_routing && strcmp(moe_routing, "reference") == 0)
		strlcpy(out->moe_routing, "reference", sizeof(out->moe_routing));
	else if (moe_routing && strcmp(moe_routing, "select") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("moe_routing must be 'select' or 'reference', got '%s'", moe_routing),
				 errhint("%s", routing_hint)));
	if (kl_qtype_parse(quantize, &qt, &err) != KL_OK)
		kl_engine_error(&err, NULL, "quantize => NULL (the weights as stored), 'fp8', 'int8' or 'int4'.");
	if (qt != KL_Q_NONE)
		strlcpy(out->quantize, kl_qtype_name(qt), sizeof(out->quantize));
	if (precision && (strcmp(precision, "bf16") == 0 || strcmp(precision, "fp32") == 0 ||
					  strcmp(precision, "fp8") == 0))
		strlcpy(out->precision, precision, sizeof(out->precision));
	else if (precision && strcmp(precision, "auto") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("matmul_precision must be 'auto', 'fp32', 'bf16' or 'fp8', got '%s'", precision),
				 errhint("%s", precision_hint)));
}

void
kl_load_options_format(const KlLoadOptions *o, char *out, size_t size)
{
	out[0] = '\0';
	if (o->moe_routing[0])
		snprintf(out, size, "moe_routing=%s", o->moe_routing);
	if (o->quantize[0])
		snprintf(out + strlen(out), size - strlen(out), "%squantize=%s", out[0] ? " " : "", o->quantize);
	if (o->precision[0])
		snprintf(out + strlen(out), size - strlen(out), "%sprecision=%s", out[0] ? " " : "", o->precision);
}

bool
kl_load_options_parse(const char *s, KlLoadOptions *out, char *errbuf, size_t errsize)
{
	char		buf[256];
	char	   *save = NULL;

	memset(out, 0, sizeof(*out));
	if (strlen(s) >= sizeof(buf))
	{
		snprintf(errbuf, errsize, "the load options are too long");
		return false;
	}
	strlcpy(buf, s, sizeof(buf));
	for (char *tok = strtok_r(buf, " ", &save); tok; tok = strtok_r(NULL, " ", &save))
	{
		kl_qtype	qt;
		kl_err		err;

		if (strcmp(tok, "moe_routing=reference") == 0)
			strlcpy(out->moe_routing, "reference", sizeof(out->moe_routing));
		else if (strncmp(tok, "quantize=", 9) == 0 && kl_qtype_parse(tok + 9, &qt, &err) == KL_OK &&
				 qt != KL_Q_NONE)
			strlcpy(out->quantize, kl_qtype_name(qt), sizeof(out->quantize));
		else if (strcmp(tok, "precision=bf16") == 0 || strcmp(tok, "precision=fp32") == 0 ||
				 strcmp(tok, "precision=fp8") == 0)
			strlcpy(out->precision, tok + 10, sizeof(out->precision));
		else
		{
			snprintf(errbuf, errsize, "unknown load option \"%.64s\"", tok);
			return false;
		}
	}
	return true;
}

void
kl_load_options_apply(const KlLoadOptions *o, kl_load_opts *opts)
{
	opts->moe_routing = o->moe_routing[0] ? o->moe_routing : NULL;
	opts->quantize = o->quantize[0] ? o->quantize : NULL;
	opts->precision = o->precision[0] ? o->precision : NULL;
}
