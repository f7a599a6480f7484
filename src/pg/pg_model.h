/*
 * pg_model.h — the model registry as backends see it: loading, unloading,
 * resolving the model a call uses, and the backend's copy of a model's
 * tokenizer (backends tokenize and detokenize locally; they never load
 * weights).
 */
#ifndef KL_PG_MODEL_H
#define KL_PG_MODEL_H

#include "postgres.h"

#include "tokenizer.h"

#include "pg_protocol.h"

/* A resolved, loaded model. */
typedef struct KlModelRef
{
	int			entry;			/* registry index */
	uint32		generation;
	char		name[KL_MODEL_NAME_LEN];
	int32		vocab_size;
	bool		has_tokenizer;
} KlModelRef;

/*
 * The model a call names (NULL or '': kimi_linear.default_model, else the
 * only loaded model, else the bundled model, loaded on first use).  ERROR
 * when it is not loaded or failed to load.
 */
void		kl_model_resolve(const char *name, KlModelRef *out);

/* Register and load a model (path relative to kimi_linear.model_dir, or
 * inside it); quantize: NULL or a quantization at load (kl_load_opts). */
void		kl_model_register(const char *name, const char *path, const char *quantize, bool check_privilege);
void		kl_model_unregister(const char *name);

/* The tokenizer of a resolved model, loaded by this backend on first use; ERROR if it has none. */
const kl_tokenizer *kl_ref_tokenizer(const KlModelRef *ref);

#endif
