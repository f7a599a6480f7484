/*
 * pg_load_options.h — the load options of a registered model (load_model's
 * optional arguments) as one canonical string, "key=value" pairs separated by
 * spaces in a fixed order, e.g. "moe_routing=reference quantize=int8 precision=bf16".  The string is what
 * the registry entry and the registry file keep (pg_registry.h), what decides
 * whether loading a name again is a no-op, and what a worker turns back into
 * the engine's kl_load_opts.  "" means every option at its default.
 */
#ifndef KL_PG_LOAD_OPTIONS_H
#define KL_PG_LOAD_OPTIONS_H

#include "postgres.h"

#include "kl.h"

typedef struct KlLoadOptions
{
	char		moe_routing[16];	/* "" (default: select) or "reference" */
	char		quantize[8];	/* "" (the weights as stored) or "fp8", "int8", "int4" */
	char		precision[8];	/* "" (default: auto, bf16 on a GPU, fp32 on the CPU), "fp32", "bf16" or "fp8" */
} KlLoadOptions;

/*
 * Check the SQL arguments (NULL = default) and fill *out; ERROR on a bad
 * value.  precision is load_model's argument, or (NULL) the setting
 * kimi_linear.precision: "auto", "fp32" or "bf16".
 */
void		kl_load_options_from_args(const char *moe_routing, const char *quantize, const char *precision,
									  KlLoadOptions *out);

/* The canonical string of *o (at most size-1 bytes). */
void		kl_load_options_format(const KlLoadOptions *o, char *out, size_t size);

/*
 * Parse a canonical string (from the registry file, so it is checked again);
 * false with a message in errbuf when it is not one.
 */
bool		kl_load_options_parse(const char *s, KlLoadOptions *out, char *errbuf, size_t errsize);

/* Set the engine's options from *o (pointers into *o: keep it alive while loading). */
void		kl_load_options_apply(const KlLoadOptions *o, kl_load_opts *opts);

#endif
