/*
 * pg_protocol.h — the request protocol between backends and inference
 * workers: the one place that defines it.
 *
 * A backend that wants inference:
 *   1. creates a DSM segment holding two shm_mq rings (request: backend ->
 *      worker, reply: worker -> backend) and takes a free request slot in the
 *      control area (pg_shmem.h), naming the segment and the chosen worker;
 *   2. sets the worker's latch and sends ONE request message (below);
 *   3. reads reply messages until DONE or ERROR, waiting on its latch.
 * The worker admits the request into its batch, streams TOKENS messages as it
 * generates, and ends with STATE parts (if asked) and DONE, or with ERROR.
 *
 * Cancellation: the backend sets the slot's cancel flag (or simply detaches,
 * e.g. at transaction abort); the worker checks both before every step and
 * drops the sequence.  A dead worker is noticed by the backend through the
 * worker's generation counter in the control area.
 *
 * All messages are native-endian structs (both ends are on one machine, same
 * binary) followed by arrays.  Sizes are validated on receipt anyway.
 */
#ifndef KL_PG_PROTOCOL_H
#define KL_PG_PROTOCOL_H

#include <stdint.h>

#define KL_PROTOCOL_MAGIC 0x4b4c5251	/* "KLRQ" */
#define KL_PROTOCOL_VERSION 1

#define KL_MAX_STOP_IDS 16
#define KL_MAX_STOP_STRINGS 8
#define KL_MAX_STOP_LEN 128
#define KL_MODEL_NAME_LEN 64

/* request flags */
#define KL_REQ_WANT_STATE	0x01	/* reply with the sequence's state (STATE messages) */
#define KL_REQ_CHAT_TURN	0x02	/* the prompt is a chat turn: close an unfinished reply first */

/* Backend -> worker: the request header, then
 *   int32 stop_ids[n_stop_ids], int32 prompt[n_prompt],
 *   then n_state_parts x (uint64 length, bytes): rows pages in order, then one head. */
typedef struct KlRequest
{
	uint32_t	magic;
	uint32_t	version;
	char		model[KL_MODEL_NAME_LEN];
	uint32_t	flags;

	/* sampling (see kl_sampling) */
	float		temperature;
	int32_t		top_k;
	float		top_p;
	float		min_p;
	float		repetition_penalty;
	uint64_t	seed;
	int32_t		max_tokens;
	int32_t		ignore_eos;

	int32_t		n_stop_ids;
	int32_t		n_stop_strings;
	char		stop_strings[KL_MAX_STOP_STRINGS][KL_MAX_STOP_LEN];	/* NUL-terminated */

	int32_t		n_prompt;
	int32_t		n_state_parts;
	/*
	 * Conversations keep their early MLA rows in pages of page_size positions
	 * that never change; the reply then carries the pages completed by this
	 * turn and a head from the last page boundary.  0: one complete head.
	 */
	int32_t		page_size;
} KlRequest;

/* Worker -> backend message types (first byte of each message) */
#define KL_MSG_TOKENS	'T'			/* KlMsgTokens: ids and the text they completed */
#define KL_MSG_STATE	'S'			/* KlMsgState + blob */
#define KL_MSG_DONE		'D'			/* KlMsgDone */
#define KL_MSG_ERROR	'E'			/* KlMsgError + message text */

typedef struct KlMsgTokens
{
	char		type;			/* KL_MSG_TOKENS */
	int32_t		n_ids;
	int32_t		text_len;
	/* int32 ids[n_ids]; char text[text_len] (complete UTF-8) */
} KlMsgTokens;

typedef struct KlMsgState
{
	char		type;			/* KL_MSG_STATE */
	int32_t		kind;			/* KL_STATE_ROWS (a page) or KL_STATE_HEAD */
	int64_t		from_pos;
	int64_t		to_pos;
	uint64_t	len;
	/* uint8 blob[len] */
} KlMsgState;

/* why generation ended */
#define KL_STOP_EOS			1
#define KL_STOP_STOP_ID		2
#define KL_STOP_STRING		3
#define KL_STOP_MAX_TOKENS	4

typedef struct KlMsgDone
{
	char		type;			/* KL_MSG_DONE */
	int32_t		reason;
	int32_t		prompt_tokens;
	int32_t		generated;
	int64_t		positions;		/* the sequence's positions afterwards */
	double		prefill_seconds;
	double		decode_seconds;
} KlMsgDone;

/* errcodes the worker reports (mapped to SQLSTATEs by the backend) */
#define KL_ERR_INVALID		1		/* bad argument or state: invalid_parameter_value */
#define KL_ERR_RESOURCES	2		/* out of memory, too long: program_limit_exceeded */
#define KL_ERR_MODEL		3		/* model not loaded / failed: undefined_object */
#define KL_ERR_INTERNAL		4		/* anything else: internal_error */

typedef struct KlMsgError
{
	char		type;			/* KL_MSG_ERROR */
	int32_t		code;
	int32_t		len;
	/* char message[len] */
} KlMsgError;

#endif
