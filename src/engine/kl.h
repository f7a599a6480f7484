/*
 * kl.h — the public API of the kimi_linear inference engine.
 *
 * Plain C11, no PostgreSQL headers: the same library serves the ./kl
 * command-line tool, the unit tests and the PostgreSQL inference workers.
 *
 * Objects:
 *   kl_model  a loaded checkpoint (config, weights mapped or uploaded to a
 *             backend, tokenizer).  Read-only after loading; shareable.
 *   kl_seq    one sequence's state: the KDA layers' recurrent state and conv
 *             tails, the MLA layers' latent cache, the position count, and the
 *             last sampled token not yet fed (see "pending" below).
 *   kl_ctx    scratch space for driving forward passes; one per thread that
 *             calls kl_forward.
 *
 * Every function that can fail returns KL_OK or KL_FAIL and fills a kl_err.
 */
#ifndef KL_H
#define KL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"
#include "config.h"

typedef struct kl_model kl_model;
typedef struct kl_seq kl_seq;
typedef struct kl_ctx kl_ctx;
typedef struct kl_tokenizer kl_tokenizer;

/* ------------------------------------------------------------------ threads */

/* Number of threads the CPU kernels use (0 = all online cores).  Takes effect
 * for the next forward pass; safe to call at any time from the driving thread. */
void		kl_set_threads(int n);
int			kl_get_threads(void);

/* ------------------------------------------------------------------ models */

typedef struct kl_load_opts
{
	const char *device;			/* "cpu" (default), "cuda", or "auto" */
	/*
	 * Activations of the matrix products: NULL or "auto" (default: bf16 on
	 * the GPU, fp32 on the CPU), "fp32" (the GPU matches the CPU to float
	 * rounding), "bf16" (the GPU's products on tensor cores with bf16
	 * activations; refused on the CPU, which computes in fp32 only) or
	 * "fp8" (bf16, and the prefill products of FP8 weights with FP8
	 * activations rounded per token: W8A8, docs/engine.md; the GPU only,
	 * from compute capability 8.9, and only for models with FP8 weights).
	 */
	const char *precision;
	int			device_index;	/* which GPU (default 0) */
	/*
	 * MoE routing rule (ignored by dense models): NULL or "select" (default:
	 * the router's score-correction bias chooses the experts, the plain
	 * sigmoid scores weight them, as the serving engines run Kimi Linear) or
	 * "reference" (the released kimi_linear reference code: the bias is added
	 * into the weights too; the golden data of that code need it).  States
	 * made under one rule are refused under the other.
	 */
	const char *moe_routing;
	bool		no_tokenizer;	/* skip tiktoken.model / tokenizer_config.json */
	/*
	 * NULL, or a directory that the model directory and every file loaded
	 * from it (config.json, the index and the shards it names, the tokenizer
	 * files) must resolve into, symbolic links followed (kl_file.h); a file
	 * resolving elsewhere is reported exactly as a missing one.  The
	 * PostgreSQL workers pass kimi_linear.model_dir.
	 */
	const char *root;
	/*
	 * Quantize the weights at load: NULL (default) or "none", "fp8", "int8",
	 * "int4" (method: quant.h, docs/engine.md).  For F32 / BF16 / F16
	 * checkpoints; a checkpoint stored quantized is used as it is.  Part of
	 * the model's fingerprint.
	 */
	const char *quantize;
} kl_load_opts;

/*
 * Load the checkpoint in dir.  Errors name the file and what is wrong with
 * it; they never quote the file's content.
 */
int			kl_model_load(const char *dir, const kl_load_opts *opts, kl_model **out, kl_err *err);
/*
 * A model of the shape in config_path with random weights (dtype "bf16" or
 * "f32"), made directly in backend memory: for benchmarks of shapes for which
 * no checkpoint exists here.  No tokenizer.
 */
int			kl_model_create_random(const char *config_path, const kl_load_opts *opts, const char *dtype,
								   uint64_t seed, kl_model **out, kl_err *err);
void		kl_model_free(kl_model *m);

const kl_config *kl_model_config(const kl_model *m);
const char *kl_model_dir(const kl_model *m);
const char *kl_model_device(const kl_model *m);			/* "cpu" or "cuda" */
/* The precision in force (kl_load_opts.precision resolved): "fp32", "bf16" or "fp8". */
const char *kl_model_precision(const kl_model *m);
int64_t		kl_model_n_params(const kl_model *m);
uint64_t	kl_model_weight_bytes(const kl_model *m);	/* bytes of all tensors as stored */
/* The MoE routing rule in force: "select" or "reference"; NULL for a dense model. */
const char *kl_model_moe_routing(const kl_model *m);

/* Bytes of the weights as the backend holds them (after quantization at load). */
uint64_t	kl_model_resident_bytes(const kl_model *m);
/* The weights' format in a few words: "bf16", "int4 g32 (quantized at load
 * from bf16)", "fp8 per channel (compressed-tensors)", ... */
const char *kl_model_weight_format(const kl_model *m);
/* The quantization at load ("fp8", "int8", "int4"), NULL when none. */
const char *kl_model_quantize(const kl_model *m);
/* 16 bytes identifying the architecture, weights, routing rule and quantization; states carry it. */
const uint8_t *kl_model_fingerprint(const kl_model *m);
/* NULL when the directory has no tokenizer files (or no_tokenizer was set). */
const kl_tokenizer *kl_model_tokenizer(const kl_model *m);

/* ------------------------------------------------------------------ sequences */

int			kl_seq_new(const kl_model *m, kl_seq **out, kl_err *err);
void		kl_seq_free(kl_seq *s);
/* Forget everything: back to position 0. */
void		kl_seq_reset(kl_seq *s);
/* An independent copy (a conversation fork). */
int			kl_seq_clone(const kl_seq *src, kl_seq **out, kl_err *err);
/* Number of tokens fed so far. */
int64_t		kl_seq_positions(const kl_seq *s);
/*
 * Bytes the sequence holds in its backend's memory (host memory on the CPU,
 * device memory on a GPU), bookkeeping included: per KDA layer the recurrent
 * state and conv tails; per MLA layer its latent-cache pages, allocated
 * KL_MLA_PAGE (1024) positions x (kv_lora_rank + qk_rope_head_dim) floats at
 * a time.  What a cache of sequences must charge for keeping one.
 */
size_t		kl_seq_bytes(const kl_seq *s);

/*
 * The pending token: generation samples a token and stops before feeding it
 * (feeding it would cost a forward step whose logits nobody needs).  The
 * sampled-but-unfed token is kept here and fed first by the next
 * kl_generate().  -1 when none.  The state format stores it, so a conversation
 * resumes exactly where it stopped.
 */
int32_t		kl_seq_pending(const kl_seq *s);
void		kl_seq_set_pending(kl_seq *s, int32_t id);

/* ------------------------------------------------------------------ forward */

/* max_step_tokens: the most tokens one internal step processes (all batch
 * items together); longer inputs are split.  0 picks a default (512). */
int			kl_ctx_new(kl_model *m, int max_step_tokens, kl_ctx **out, kl_err *err);
void		kl_ctx_free(kl_ctx *ctx);

/*
 * One forward pass over a ragged batch: item i feeds n tokens to its sequence.
 * Each item's sequence advances by n positions.  Logits:
 *   logits == NULL        none wanted (prefill whose output nobody reads)
 *   all_logits == false   logits[vocab] of the item's last token
 *   all_logits == true    logits[n * vocab], one row per token
 * A sequence may appear at most once in a batch.  Token ids are validated.
 * On failure the sequences touched are left in an unspecified state: callers
 * that must not lose a state keep a copy (the PostgreSQL glue reloads it from
 * the table).
 */
typedef struct kl_batch_item
{
	kl_seq	   *seq;
	const int32_t *ids;
	int			n;
	float	   *logits;
	bool		all_logits;
} kl_batch_item;

int			kl_forward(kl_ctx *ctx, kl_batch_item *items, int n_items, kl_err *err);

/*
 * The same, also sampling each item's next token from its last token's
 * logits inside the pass: on the device where the backend can (only the ids
 * come back, no logits), else on the host; the same choice either way
 * (kl_sample_draw).  reqs[i] (kl_sample_req, below) NULL: item i is not
 * sampled; tokens[i] receives item i's token.  An item's logits pointer may
 * be NULL; when it is not, it receives the raw logits (before penalty and
 * mask).  Not with all_logits.
 */
struct kl_sample_req;
int			kl_forward_sample(kl_ctx *ctx, kl_batch_item *items, int n_items,
							  const struct kl_sample_req *const *reqs, int32_t *tokens, kl_err *err);

/*
 * Batch invariance: in a kl_forward of at most this many rows in all, every
 * row is computed with the same arithmetic whatever the other rows, so a
 * sequence decoded among others gets bit-for-bit the logits it gets alone.
 * (Larger steps use blocked matrix products, exact to float rounding only.)
 */
#define KL_BATCH_INVARIANT_ROWS 64

/* Run the KDA layers through the per-token recurrence instead of the
 * chunkwise form for multi-token inputs (tests compare the two). */
void		kl_ctx_force_recurrent(kl_ctx *ctx, bool on);

/* Time spent per part of the forward pass (benchmarks).  Profiling waits for
 * each op to finish, so it slows a GPU down; off by default. */
typedef enum kl_prof_part
{
	KL_PROF_LINEAR,				/* matrix products of the projections and dense MLPs */
	KL_PROF_KDA,				/* the KDA mixer core (conv, delta rule, gated norm) */
	KL_PROF_MLA,				/* the MLA attention core */
	KL_PROF_MOE,				/* mixture of experts, routing included */
	KL_PROF_LOGITS,				/* final norm and lm_head */
	KL_PROF_OTHER,				/* embedding, norms, residual adds */
	KL_PROF_N
} kl_prof_part;

void		kl_ctx_profile(kl_ctx *ctx, bool on);
/* seconds per part since profiling was switched on */
void		kl_ctx_profile_read(const kl_ctx *ctx, double out[KL_PROF_N]);

/* ------------------------------------------------------------------ sampling */

typedef struct kl_sampling
{
	float		temperature;	/* 0 = greedy (argmax) */
	int			top_k;			/* 0 = no limit */
	float		top_p;			/* 1 = no limit */
	float		min_p;			/* 0 = no limit */
	float		repetition_penalty; /* 1 = none; applies to tokens of this request */
	uint64_t	seed;
} kl_sampling;

void		kl_sampling_default(kl_sampling *s);
/* Check ranges; the message names the setting and its valid range. */
int			kl_sampling_validate(const kl_sampling *s, kl_err *err);

typedef struct kl_rng
{
	uint64_t	s[4];
} kl_rng;

void		kl_rng_seed(kl_rng *rng, uint64_t seed);
uint64_t	kl_rng_next(kl_rng *rng);

/*
 * Pick the next token from logits[vocab] (modified in place).  `recent` are
 * the token ids the repetition penalty applies to.  Deterministic for a given
 * rng state.
 */
int32_t		kl_sample(const kl_sampling *s, kl_rng *rng, float *logits, int vocab,
					  const int32_t *recent, int n_recent);
/* The same with an optional allowed-token bitmask (constrained decoding):
 * token i is allowed when bit i % 32 of allowed[i / 32] is set; NULL allows
 * all.  Disallowed tokens are never chosen while any allowed token has a
 * finite logit (if none has, the first allowed id is returned). */
int32_t		kl_sample_masked(const kl_sampling *s, kl_rng *rng, float *logits, int vocab,
							 const int32_t *recent, int n_recent, const uint32_t *allowed);
/* The uniform number in [0, 1) a sampling step draws from rng (none, 0, when
 * greedy), and the choice given it: kl_sample_masked = kl_sample_draw with
 * kl_sample_uniform.  A GPU backend's sampler chooses exactly what
 * kl_sample_draw chooses for the same logits and draw (sample.c). */
double		kl_sample_uniform(const kl_sampling *s, kl_rng *rng);
int32_t		kl_sample_draw(const kl_sampling *s, double u0, float *logits, int vocab,
						   const int32_t *recent, int n_recent, const uint32_t *allowed);

/* A batch item's request to sample inside kl_forward_sample. */
typedef struct kl_sample_req
{
	const kl_sampling *sampling;
	kl_rng	   *rng;			/* advanced by one draw per token when temperature > 0 */
	const int32_t *recent;		/* the ids the repetition penalty applies to */
	int			n_recent;
	const uint32_t *allowed;	/* optional vocabulary bitmask, as kl_sample_masked; NULL = all */
} kl_sample_req;

/* ------------------------------------------------------------------ generation */

typedef struct kl_constraint kl_constraint;

typedef struct kl_gen_params
{
	kl_sampling sampling;
	int			max_tokens;		/* new tokens to produce */
	const int32_t *stop_ids;	/* generation ends after producing one of these */
	int			n_stop_ids;
	bool		ignore_eos;		/* do not stop at the model's eos id */
	kl_constraint *constraint;	/* NULL, or the output constraint (json_constraint.h), advanced here */
} kl_gen_params;

/* Called for each generated token; return true to stop early. */
typedef bool (*kl_token_cb) (void *arg, int32_t id);

/*
 * Feed the pending token (if any) and the prompt, then sample up to
 * max_tokens tokens.  Generated ids are appended to `out` (which the caller
 * owns: out->ids may be realloc'd).  On return the last generated token is the
 * sequence's pending token.  n_prompt may be 0 only if the sequence has a
 * pending token or positions (continuing a generation).
 */
typedef struct kl_tokens
{
	int32_t    *ids;
	size_t		n,
				cap;
} kl_tokens;

int			kl_tokens_push(kl_tokens *t, int32_t id, kl_err *err);
void		kl_tokens_free(kl_tokens *t);

int			kl_generate(kl_ctx *ctx, kl_seq *seq, const int32_t *prompt, int n_prompt,
						const kl_gen_params *p, kl_tokens *out,
						kl_token_cb cb, void *cb_arg, kl_err *err);

/* ------------------------------------------------------------------ state */

/*
 * A sequence's state serializes to self-checking blobs (format: state.c).
 * Two kinds of part:
 *   head   the KDA state, pending token and position count, plus the MLA
 *          latent rows of positions [from_pos, positions).  A head with
 *          from_pos = 0 is a complete state.
 *   rows   the MLA latent rows of positions [from_pos, to_pos): a page of a
 *          long history, written once and never rewritten.
 * kl_state_load() takes rows parts in position order followed by one head;
 * together they must cover [0, positions) without gaps.
 */
int			kl_state_save(const kl_seq *s, int64_t from_pos, uint8_t **blob, size_t *len, kl_err *err);
int			kl_state_save_rows(const kl_seq *s, int64_t from_pos, int64_t to_pos,
							   uint8_t **blob, size_t *len, kl_err *err);

typedef struct kl_blob
{
	const uint8_t *data;
	size_t		len;
} kl_blob;

/* On failure the sequence is reset to position 0. */
int			kl_state_load(kl_seq *s, const kl_blob *parts, int n_parts, kl_err *err);

typedef struct kl_state_info
{
	int			kind;			/* KL_STATE_HEAD or KL_STATE_ROWS */
	int			version;
	uint8_t		fingerprint[16];
	int64_t		positions;		/* head: total positions; rows: to_pos */
	int64_t		from_pos;
	int64_t		to_pos;
	int32_t		pending;
} kl_state_info;

#define KL_STATE_HEAD 1
#define KL_STATE_ROWS 2

/* Parse and check a blob's header and checksum without a model. */
int			kl_state_info_read(const uint8_t *blob, size_t len, kl_state_info *info, kl_err *err);

#endif
