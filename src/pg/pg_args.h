/*
 * pg_args.h — what the SQL functions share: reading the generation settings
 * (the same trailing arguments everywhere, NULL meaning the default),
 * checking them with messages that name the argument, text <-> token ids in
 * the database encoding, and filling a request.
 */
#ifndef KL_PG_ARGS_H
#define KL_PG_ARGS_H

#include "postgres.h"

#include "fmgr.h"
#include "utils/array.h"
#include "utils/jsonb.h"

#include "kl.h"
#include "tokenizer.h"

#include "pg_model.h"
#include "pg_request.h"

typedef struct KlGenArgs
{
	int			max_tokens;
	kl_sampling sampling;
	bool		ignore_eos;
	char	   *model;			/* NULL: the default model */
	int			n_stop;
	char	  **stop;			/* stop strings, UTF-8 */
} KlGenArgs;

/*
 * The settings start at argument `first`, in this order: max_tokens,
 * temperature, top_p, top_k, seed, stop, [model,] repetition_penalty, min_p,
 * ignore_eos.  Arguments past PG_NARGS() take their defaults.
 */
void		kl_read_gen_args(FunctionCallInfo fcinfo, int first, bool has_model, int default_max_tokens,
							 KlGenArgs *g);

/* ERROR naming the setting and its range when a sampling setting is out of range */
void		kl_check_sampling(const kl_sampling *s);
/*
 * A floating-point sampling setting (temperature, top_p, min_p,
 * repetition_penalty) as the sampler's float: ERROR, reporting v as given,
 * unless v is in the setting's range both as given and in single precision.
 */
float		kl_sampling_setting(const char *name, double v);

/* A text argument that must not be NULL (nor empty unless allowed), as UTF-8. */
char	   *kl_text_arg(FunctionCallInfo fcinfo, int i, const char *what, bool allow_empty);
/* server encoding <-> UTF-8 */
char	   *kl_to_utf8(const char *s, int len);
text	   *kl_utf8_to_text(const char *s, int len);

/* Token ids of UTF-8 text (palloc'd); with_bos: a fresh sequence starts with the bos token. */
int32	   *kl_encode_text(const kl_tokenizer *tok, const char *utf8, bool with_bos, int *n_out);
/* Render chat messages (roles and UTF-8 contents) to ids. */
int32	   *kl_render_chat(const kl_tokenizer *tok, const kl_chat_message *msgs, int n, bool gen_prompt,
						   int *n_out);
/* messages jsonb [{"role": ..., "content": ...}] -> chat messages (UTF-8) */
kl_chat_message *kl_parse_messages(Jsonb *jb, int *n_out);
/* The prompt summarize sends for a document (UTF-8): a chat turn asking for a summary. */
int32	   *kl_summary_prompt(const kl_tokenizer *tok, const char *doc_utf8, int *n_out);
/* The ids that end a chat reply (palloc'd). */
int32	   *kl_chat_stop_ids(const kl_tokenizer *tok, int *n_out);

/* ERROR unless history + n_prompt positions fit in kimi_linear.max_context. */
void		kl_check_context(int64 history, int64 n_prompt);

/* A request for generation settings g on model ref (prompt etc. set by the caller). */
void		kl_spec_init(KlReqSpec *spec, const KlGenArgs *g, const KlModelRef *ref);

ArrayType  *kl_ids_to_array(const int32 *ids, int n);
int32	   *kl_array_to_ids(ArrayType *a, int *n, const char *what);

#endif
