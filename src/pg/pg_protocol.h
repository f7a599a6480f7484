/*
 * pg_protocol.h — the request protocol between backends and inference
 * workers.  This is the one place that defines it; pg_protocol.c encodes and
 * decodes requests, side by side, in plain C (no PostgreSQL calls, so that
 * test/fuzz/fuzz_protocol.c can feed the decoder arbitrary bytes).
 *
 * A backend that wants inference (pg_request.c):
 *   1. creates a DSM segment laid out as
 *          KlRequest | data area (arrays, at offsets given in KlRequest) | reply shm_mq
 *      and attaches to the reply queue as its receiver;
 *   2. takes a free request slot in the control area (pg_shmem.h) under the
 *      lock, naming the segment and a worker, marks it SUBMITTED, and sets
 *      that worker's latch.  No free slot: an immediate ERROR, never a wait
 *      (a set-based call, pg_batch_call.c, waits for one of its own instead);
 *   3. reads reply messages (below) until DONE or ERROR, waiting on its latch,
 *      honouring cancellation and noticing a dead worker.
 * The worker (pg_worker.c, pg_batch.c) attaches to the segment, reads the
 * request in place (no copy through a ring: a prompt or state may be large),
 * runs it in its batch and streams the reply through the queue:
 *       TOKENS*  STATE*  DONE        or, at any point,  ERROR
 * STATE parts come only when KL_REQ_WANT_STATE is set: the rows pages that
 * the turn completed, in position order, then one head.
 *
 * Cancellation: the backend sets the slot's cancel flag (it does so from a
 * DSM detach callback, so an aborted transaction cancels too) and wakes the
 * worker, which drops the sequence before its next step.  A dead worker is
 * noticed through the queue (the sender detached without DONE) or, for a
 * request it had not yet taken, is simply replaced: the restarted worker
 * takes the request.
 *
 * Everything is native-endian (both ends run the same binary on one
 * machine); the worker still validates every size and offset it reads
 * (kl_request_decode) before it uses any.
 */
#ifndef KL_PG_PROTOCOL_H
#define KL_PG_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl.h"					/* kl_blob; kl_errcode: the codes of ERROR messages */

#define KL_PROTOCOL_MAGIC 0x4b4c5251	/* "KLRQ" */
#define KL_PROTOCOL_VERSION 4	/* 3: output constraints (grammar spec); 4: errors carry the engine's codes */

#define KL_MODEL_NAME_LEN 64
#define KL_MAX_STOP_IDS 64
#define KL_MAX_STOP_STRINGS 16
#define KL_MAX_STOP_LEN 256
#define KL_MAX_GRAMMAR_LEN (1024 * 1024)	/* an output constraint's spec (JSON text) */
#define KL_REPLY_QUEUE_SIZE (1024 * 1024)	/* at least; more for replies with a state */

/* request flags */
#define KL_REQ_WANT_STATE	0x01	/* reply with the sequence's state (STATE messages) */
#define KL_REQ_WANT_TEXT	0x02	/* detokenize: TOKENS messages carry text */
#define KL_REQ_SKIP_STOP_TEXT 0x04	/* no text for a final eos / stop id (it is markup) */
#define KL_REQ_STREAM		0x08	/* send tokens as they come (else: all in one message at the end,
									 * sparing the backend a wake-up per token) */

typedef struct KlRequest
{
	uint32_t	magic;
	uint32_t	version;
	uint64_t	request_id;
	char		model[KL_MODEL_NAME_LEN];
	uint32_t	model_generation;	/* the registry entry the backend resolved */
	uint32_t	flags;

	/* sampling (kl_sampling), validated by the backend and again by the worker */
	float		temperature;
	float		top_p;
	float		min_p;
	float		repetition_penalty;
	int32_t		top_k;
	int32_t		ignore_eos;
	uint64_t	seed;
	int32_t		max_tokens;
	int32_t		_pad;
	int64_t		max_context;	/* positions the sequence may reach */

	/*
	 * Paging of the returned state (conversations): the given head starts at
	 * pages_upto (everything before it is in the given rows parts); the reply
	 * carries rows parts of page_size positions from pages_upto up to the last
	 * page boundary reached, then a head from there.  page_size 0: one
	 * complete head (from_pos 0).
	 */
	int64_t		page_size;
	int64_t		pages_upto;

	/* worker-side cache of conversation states (0: none) */
	int64_t		cache_key;

	/* arrays in the data area: offsets from the start of the segment */
	int32_t		n_prompt;		/* int32 ids */
	int32_t		n_stop_ids;		/* int32 ids */
	int32_t		n_stop_strings; /* each: uint32 length, bytes, padded to 4 */
	int32_t		n_parts;		/* each: uint64 length, bytes, padded to 8 */
	uint64_t	prompt_off;
	uint64_t	stop_ids_off;
	uint64_t	stop_strings_off;
	uint64_t	parts_off;
	uint64_t	data_end;		/* end of the data area */

	/*
	 * Output constraint (json_constraint.h): its spec, JSON text of
	 * n_grammar bytes at grammar_off (0: free output).  The worker compiles
	 * it, computes the allowed tokens before each sampling step and samples
	 * among them; the eos (unless ignore_eos) and the stop ids end it.
	 */
	int32_t		n_grammar;
	int32_t		_pad2;
	uint64_t	grammar_off;

	uint64_t	mq_off;			/* the reply queue */
	uint64_t	mq_size;

	/*
	 * Set by the backend once it has read DONE or ERROR: the worker has
	 * nothing more to say, so the backend may free the slot itself when it
	 * detaches (the worker only ever touches a slot whose request id is its
	 * request's).
	 */
	uint32_t	reply_complete;
} KlRequest;

/* Worker -> backend messages: the first byte is the type. */
#define KL_MSG_TOKENS	'T'
#define KL_MSG_STATE	'S'
#define KL_MSG_DONE		'D'
#define KL_MSG_ERROR	'E'

/* TOKENS: int32 ids[n_ids] then char text[text_len] (complete UTF-8 characters) */
typedef struct KlMsgTokens
{
	char		type;
	int32_t		n_ids;
	int32_t		text_len;
} KlMsgTokens;

/* STATE: one serialized part (engine state format), bytes[len] */
typedef struct KlMsgState
{
	char		type;
	int32_t		kind;			/* KL_STATE_ROWS or KL_STATE_HEAD */
	int64_t		from_pos;
	int64_t		to_pos;
	uint64_t	len;
} KlMsgState;

/* why generation ended */
#define KL_STOP_NONE		0	/* max_tokens 0: prompt only */
#define KL_STOP_EOS			1
#define KL_STOP_STOP_ID		2
#define KL_STOP_STRING		3
#define KL_STOP_MAX_TOKENS	4
#define KL_STOP_CONTEXT		5	/* reached max_context */

typedef struct KlMsgDone
{
	char		type;
	int32_t		reason;
	int32_t		prompt_tokens;
	int32_t		generated;
	int64_t		positions;		/* the sequence's positions afterwards */
	int32_t		pending;		/* its pending token */
	int32_t		cache_hit;		/* the state came from the worker's cache */
	double		queue_seconds;
	double		prefill_seconds;
	double		decode_seconds;
} KlMsgDone;

/*
 * ERROR: char message[msg_len], char hint[hint_len] (not NUL-terminated).
 * code: the engine's code of the error (kl_errcode, kl_util.h: KL_E_INVALID,
 * KL_E_CORRUPT, KL_E_RESOURCES, KL_E_UNSUPPORTED, KL_E_INTERNAL), as the
 * engine set it or as the worker chose for an error of its own, or one of the
 * worker's codes below.  pg_errors.c maps each to its SQLSTATE.
 */
#define KL_ERR_MODEL		16	/* model not loaded / unloaded */
#define KL_ERR_SHUTDOWN		17	/* the worker is stopping */
#define KL_ERR_CACHE_MISS	18	/* the request relied on a cached state that is gone: resend it whole */

typedef struct KlMsgError
{
	char		type;
	int32_t		code;
	int32_t		msg_len;
	int32_t		hint_len;
} KlMsgError;

/* ------------------------------------------------------------------ encoding and decoding (pg_protocol.c) */

/* What a SQL function asks for: the backend fills it, kl_request_encode lays it out. */
typedef struct KlReqSpec
{
	const char *model;
	uint32_t	model_generation;
	uint32_t	flags;			/* KL_REQ_* */

	float		temperature;
	float		top_p;
	float		min_p;
	float		repetition_penalty;
	int32_t		top_k;
	bool		ignore_eos;
	uint64_t	seed;
	int32_t		max_tokens;
	int64_t		max_context;

	const int32_t *prompt;
	int			n_prompt;
	const int32_t *stop_ids;
	int			n_stop_ids;
	char	  **stop_strings;	/* NUL-terminated, 1 to KL_MAX_STOP_LEN bytes */
	int			n_stop_strings;

	const char *grammar;		/* output constraint spec (JSON), NULL: none */
	size_t		grammar_len;

	int64_t		page_size;
	int64_t		pages_upto;
	int64_t		cache_key;
	size_t		reply_hint;		/* expected size of the returned state (sizes the reply queue) */
} KlReqSpec;

/* Where everything of a request lies in its segment (offsets from its start). */
typedef struct KlReqLayout
{
	uint64_t	prompt_off,
				stop_ids_off,
				stop_strings_off,
				grammar_off,
				parts_off,
				data_end,
				mq_off,
				mq_size,
				total;			/* the segment's size */
} KlReqLayout;

/* The layout of a request for spec with n_parts state parts of parts_bytes in all. */
void		kl_request_layout(const KlReqSpec *spec, uint64_t parts_bytes, int n_parts, KlReqLayout *l);

/*
 * Write the header (request_id 0: set at submission) and the arrays into a
 * segment of l->total bytes, 8-byte aligned.  The state parts follow, one
 * kl_request_put_part each, from l->parts_off.
 */
void		kl_request_encode(void *seg, const KlReqSpec *spec, int n_parts, const KlReqLayout *l);

/*
 * Write one state part at offset `at` (l->parts_off for the first); returns
 * where the next one goes, or 0 when it would pass `end` (l->data_end).
 */
uint64_t	kl_request_put_part(void *seg, uint64_t at, uint64_t end, const void *data, uint64_t len);

/*
 * A request as the worker reads it: a copy of the header and pointers into
 * the segment, every size and offset checked against it.
 */
typedef struct KlReqView
{
	KlRequest	hdr;			/* (model NUL-terminated) */
	const int32_t *prompt;		/* hdr.n_prompt ids */
	const int32_t *stop_ids;	/* hdr.n_stop_ids ids */
	int			n_stops;		/* stop strings (not NUL-terminated) */
	const char *stops[KL_MAX_STOP_STRINGS];
	int			stop_lens[KL_MAX_STOP_STRINGS];
	const char *grammar;		/* NULL: none */
	int			grammar_len;
	int			n_parts;		/* state parts: kl_request_parts */
} KlReqView;

typedef enum KlDecodeResult
{
	KL_DECODE_OK,
	KL_DECODE_NO_QUEUE,			/* no reply queue to answer through (or another request's segment):
								 * drop it */
	KL_DECODE_MALFORMED			/* the queue is sound (hdr.mq_off), the rest is not: answer with an
								 * error saying why */
} KlDecodeResult;

/*
 * Check and decode the request in a segment of seg_size bytes (8-byte
 * aligned) that must carry request_id.  Reads only inside the segment,
 * whatever its bytes; *why says what is wrong unless KL_DECODE_OK.
 */
KlDecodeResult kl_request_decode(const void *seg, size_t seg_size, uint64_t request_id, KlReqView *out,
								 const char **why);

/* The state parts of a decoded request, in order: out[0 .. v->n_parts). */
void		kl_request_parts(const void *seg, const KlReqView *v, kl_blob *out);

#endif
