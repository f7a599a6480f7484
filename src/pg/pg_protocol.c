/*
 * pg_protocol.c — a request's segment (pg_protocol.h): the backend's encoder
 * and the worker's decoder, side by side, so that what one writes the other
 * checks.
 *
 * Plain C: no PostgreSQL header or call, no allocation.  The decoder is fed
 * arbitrary bytes by test/fuzz/fuzz_protocol.c; it must read nothing outside
 * the segment whatever the header says, so every offset is checked against
 * the end before anything is added to it (no sum of two untrusted numbers is
 * compared: it could wrap).
 */
#include <string.h>

#include "pg_protocol.h"

/* Everything in a segment is 8-byte aligned (what shm_mq and the arrays need). */
static inline uint64_t
align8(uint64_t x)
{
	return (x + 7) & ~(uint64_t) 7;
}

/*
 * Stop strings and state parts are both lists of items: a length word of
 * STOP_WORD or PART_WORD bytes, then the item's bytes padded to that size.
 */
#define STOP_WORD 4
#define PART_WORD 8

/* The room an item of len bytes takes, its length word included. */
static inline uint64_t
item_size(uint64_t len, uint64_t word)
{
	return word + ((len + word - 1) & ~(word - 1));
}

/* ------------------------------------------------------------------ encoding (the backend) */

void
kl_request_layout(const KlReqSpec *spec, uint64_t parts_bytes, int n_parts, KlReqLayout *l)
{
	uint64_t	off = align8(sizeof(KlRequest));

	l->prompt_off = off;
	off = align8(off + sizeof(int32_t) * (uint64_t) spec->n_prompt);
	l->stop_ids_off = off;
	off = align8(off + sizeof(int32_t) * (uint64_t) spec->n_stop_ids);
	l->stop_strings_off = off;
	for (int i = 0; i < spec->n_stop_strings; i++)
		off += item_size(strlen(spec->stop_strings[i]), STOP_WORD);
	off = align8(off);
	l->grammar_off = off;
	off = align8(off + (spec->grammar ? spec->grammar_len : 0));
	l->parts_off = off;
	/* length words, data, padding */
	off += (uint64_t) n_parts * 8 + parts_bytes + (uint64_t) n_parts * 8;
	l->data_end = align8(off);
	l->mq_off = l->data_end;

	/*
	 * A reply carrying a state gets a queue that holds it whole (the caller's
	 * estimate), up to 64 MB: fewer round trips per megabyte.  (The segment
	 * is allocated up front, so the estimate is of the reply, not of all the
	 * pages sent.)
	 */
	l->mq_size = KL_REPLY_QUEUE_SIZE;
	if (spec->flags & KL_REQ_WANT_STATE)
	{
		uint64_t	want = align8(spec->reply_hint) + KL_REPLY_QUEUE_SIZE;

		l->mq_size = want < (uint64_t) 64 * 1024 * 1024 ? want : (uint64_t) 64 * 1024 * 1024;
	}
	l->total = l->mq_off + l->mq_size;
}

void
kl_request_encode(void *seg, const KlReqSpec *spec, int n_parts, const KlReqLayout *l)
{
	char	   *base = seg;
	KlRequest  *r = seg;
	size_t		name_len = strnlen(spec->model, KL_MODEL_NAME_LEN - 1);

	memset(r, 0, sizeof(KlRequest));
	r->magic = KL_PROTOCOL_MAGIC;
	r->version = KL_PROTOCOL_VERSION;
	memcpy(r->model, spec->model, name_len);
	r->model_generation = spec->model_generation;
	r->flags = spec->flags;
	r->temperature = spec->temperature;
	r->top_p = spec->top_p;
	r->min_p = spec->min_p;
	r->repetition_penalty = spec->repetition_penalty;
	r->top_k = spec->top_k;
	r->ignore_eos = spec->ignore_eos ? 1 : 0;
	r->seed = spec->seed;
	r->max_tokens = spec->max_tokens;
	r->max_context = spec->max_context;
	r->page_size = spec->page_size;
	r->pages_upto = spec->pages_upto;
	r->cache_key = spec->cache_key;
	r->n_prompt = spec->n_prompt;
	r->n_stop_ids = spec->n_stop_ids;
	r->n_stop_strings = spec->n_stop_strings;
	r->n_parts = n_parts;
	r->prompt_off = l->prompt_off;
	r->stop_ids_off = l->stop_ids_off;
	r->stop_strings_off = l->stop_strings_off;
	r->parts_off = l->parts_off;
	r->data_end = l->data_end;
	r->n_grammar = spec->grammar ? (int32_t) spec->grammar_len : 0;
	r->grammar_off = l->grammar_off;
	r->mq_off = l->mq_off;
	r->mq_size = l->mq_size;

	if (spec->n_prompt > 0)
		memcpy(base + l->prompt_off, spec->prompt, sizeof(int32_t) * spec->n_prompt);
	if (spec->n_stop_ids > 0)
		memcpy(base + l->stop_ids_off, spec->stop_ids, sizeof(int32_t) * spec->n_stop_ids);
	{
		char	   *p = base + l->stop_strings_off;

		for (int i = 0; i < spec->n_stop_strings; i++)
		{
			uint32_t	len = (uint32_t) strlen(spec->stop_strings[i]);

			memcpy(p, &len, STOP_WORD);
			memcpy(p + STOP_WORD, spec->stop_strings[i], len);
			p += item_size(len, STOP_WORD);
		}
	}
	if (spec->grammar)
		memcpy(base + l->grammar_off, spec->grammar, spec->grammar_len);
}

uint64_t
kl_request_put_part(void *seg, uint64_t at, uint64_t end, const void *data, uint64_t len)
{
	char	   *base = seg;

	if (at > end || end - at < PART_WORD || len > end - at - PART_WORD || item_size(len, PART_WORD) > end - at)
		return 0;
	memcpy(base + at, &len, PART_WORD);
	memcpy(base + at + PART_WORD, data, len);
	return at + item_size(len, PART_WORD);
}

/* ------------------------------------------------------------------ decoding (the worker) */

/* Whether [off, off + count * elem) lies in [start, end), off aligned to align. */
static bool
array_inside(uint64_t off, uint64_t count, uint64_t elem, uint64_t align, uint64_t start, uint64_t end)
{
	return off >= start && off <= end && off % align == 0 && count <= (end - off) / elem;
}

/* The reply queue: without a sound one the worker cannot even say what is wrong. */
static bool
queue_sound(const KlRequest *q, size_t seg_size, uint64_t request_id)
{
	return q->request_id == request_id && q->mq_size >= KL_REPLY_QUEUE_SIZE && q->mq_off % 8 == 0 &&
		q->mq_off >= sizeof(KlRequest) && q->mq_off <= seg_size && q->mq_size <= seg_size - q->mq_off;
}

/*
 * The length of the item at off, in a list of items with `word`-byte length
 * words; false when the word or the item runs past end.  (Every bound is
 * checked before an untrusted length is added to anything.)
 */
static bool
item_at(const char *base, uint64_t off, uint64_t end, uint64_t word, uint64_t *len)
{
	if (off > end || end - off < word)
		return false;
	if (word == STOP_WORD)
	{
		uint32_t	len32;

		memcpy(&len32, base + off, STOP_WORD);
		*len = len32;
	}
	else
		memcpy(len, base + off, PART_WORD);
	return *len <= end - off - word && item_size(*len, word) <= end - off;
}

/* What is wrong with a list of items (walk_items). */
typedef enum ItemsFault
{
	ITEMS_OK,
	ITEMS_OUTSIDE,				/* the list starts outside [start, end) or unaligned */
	ITEMS_PAST,					/* an item runs past end */
	ITEMS_LENGTH				/* an item's length is out of [min_len, max_len] */
} ItemsFault;

/*
 * Check a list of n items (of `word`-byte length words) from off, inside
 * [start, end) and aligned to the word, each of min_len to max_len bytes;
 * each item's bytes and length go to data[i] and lens[i] unless data is
 * NULL.
 */
static ItemsFault
walk_items(const char *base, uint64_t off, uint64_t start, uint64_t end, uint64_t word, int n,
		   uint64_t min_len, uint64_t max_len, const char **data, int *lens)
{
	if (off < start || off > end || off % word != 0)
		return ITEMS_OUTSIDE;
	for (int i = 0; i < n; i++)
	{
		uint64_t	len;

		if (!item_at(base, off, end, word, &len))
			return ITEMS_PAST;
		if (len < min_len || len > max_len)
			return ITEMS_LENGTH;
		if (data)
		{
			data[i] = base + off + word;
			lens[i] = (int) len;
		}
		off += item_size(len, word);
	}
	return ITEMS_OK;
}

/* The stop strings: 1 to KL_MAX_STOP_LEN bytes each. */
static const char *
decode_stop_strings(const char *base, const KlRequest *q, KlReqView *v)
{
	static const char *const why[] = {
		[ITEMS_OUTSIDE] = "the stop strings lie outside the data area",
		[ITEMS_PAST] = "a stop string runs past the data area",
		[ITEMS_LENGTH] = "a stop string's length is out of range",
	};
	ItemsFault	f = walk_items(base, q->stop_strings_off, sizeof(KlRequest), q->data_end, STOP_WORD,
							   q->n_stop_strings, 1, KL_MAX_STOP_LEN, v->stops, v->stop_lens);

	if (f != ITEMS_OK)
		return why[f];
	v->n_stops = q->n_stop_strings;
	return NULL;
}

/* The state parts (kl_request_parts reads them). */
static const char *
decode_parts(const char *base, const KlRequest *q, KlReqView *v)
{
	static const char *const why[] = {
		[ITEMS_OUTSIDE] = "the state parts lie outside the data area",
		[ITEMS_PAST] = "a state part runs past the data area",
		[ITEMS_LENGTH] = "a state part's length is out of range",
	};
	ItemsFault	f = walk_items(base, q->parts_off, sizeof(KlRequest), q->data_end, PART_WORD, q->n_parts,
							   0, UINT64_MAX, NULL, NULL);

	if (f != ITEMS_OK)
		return why[f];
	v->n_parts = q->n_parts;
	return NULL;
}

/* Everything but the queue and the stop strings and parts; NULL when sound. */
static const char *
decode_header(const KlRequest *q)
{
	if (q->magic != KL_PROTOCOL_MAGIC)
		return "not a kimi_linear request (bad magic)";
	if (q->version != KL_PROTOCOL_VERSION)
		return "another version of the request protocol";
	if (q->data_end < sizeof(KlRequest) || q->data_end > q->mq_off)
		return "the data area overlaps the header or the reply queue";
	if (q->n_prompt < 0 || q->n_stop_ids < 0 || q->n_stop_ids > KL_MAX_STOP_IDS ||
		q->n_stop_strings < 0 || q->n_stop_strings > KL_MAX_STOP_STRINGS || q->n_parts < 0 ||
		q->n_grammar < 0 || q->n_grammar > KL_MAX_GRAMMAR_LEN)
		return "a count is out of range";
	if (!array_inside(q->prompt_off, (uint64_t) q->n_prompt, 4, 4, sizeof(KlRequest), q->data_end))
		return "the prompt lies outside the data area";
	if (!array_inside(q->stop_ids_off, (uint64_t) q->n_stop_ids, 4, 4, sizeof(KlRequest), q->data_end))
		return "the stop ids lie outside the data area";
	if (q->n_grammar > 0 &&
		!array_inside(q->grammar_off, (uint64_t) q->n_grammar, 1, 1, sizeof(KlRequest), q->data_end))
		return "the output constraint lies outside the data area";
	return NULL;
}

KlDecodeResult
kl_request_decode(const void *seg, size_t seg_size, uint64_t request_id, KlReqView *out, const char **why)
{
	const char *base = seg;
	KlRequest  *q = &out->hdr;

	memset(out, 0, sizeof(*out));
	if (seg_size < sizeof(KlRequest))
	{
		*why = "the segment is smaller than a request";
		return KL_DECODE_NO_QUEUE;
	}
	memcpy(q, base, sizeof(KlRequest));
	q->model[KL_MODEL_NAME_LEN - 1] = '\0';
	if (!queue_sound(q, seg_size, request_id))
	{
		*why = "no sound reply queue";
		return KL_DECODE_NO_QUEUE;
	}
	if ((*why = decode_header(q)) != NULL ||
		(*why = decode_stop_strings(base, q, out)) != NULL ||
		(*why = decode_parts(base, q, out)) != NULL)
		return KL_DECODE_MALFORMED;
	out->prompt = (const int32_t *) (base + q->prompt_off);
	out->stop_ids = (const int32_t *) (base + q->stop_ids_off);
	if (q->n_grammar > 0)
	{
		out->grammar = base + q->grammar_off;
		out->grammar_len = q->n_grammar;
	}
	return KL_DECODE_OK;
}

void
kl_request_parts(const void *seg, const KlReqView *v, kl_blob *out)
{
	const char *base = seg;
	uint64_t	off = v->hdr.parts_off;

	/* (kl_request_decode checked every one) */
	for (int i = 0; i < v->n_parts; i++)
	{
		uint64_t	len;

		memcpy(&len, base + off, PART_WORD);
		out[i].data = (const uint8_t *) base + off + PART_WORD;
		out[i].len = len;
		off += item_size(len, PART_WORD);
	}
}
