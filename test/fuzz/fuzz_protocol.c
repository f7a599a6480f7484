/*
 * libFuzzer harness: the inference worker's decoder of requests
 * (kl_request_decode, src/pg/pg_protocol.c), built against pg_protocol.c
 * alone.
 *
 * An input is a request's segment up to its reply queue.  The queue itself,
 * which the decoder must never read, is not allocated: when the header puts
 * the queue at or before the input's end, the segment is declared 64 MB
 * longer than the input (the largest queue a backend makes), so a read
 * anywhere past the input's bytes is one ASan reports.  (A header that puts
 * the queue further out is given a segment of the input's size: its queue
 * does not fit.)  A request
 * that decodes is read whole (every id, stop string, constraint byte and
 * state part), encoded again from what was decoded, and decoded again: the
 * same request must come back.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg_protocol.h"

#define QUEUE_ROOM ((size_t) 64 * 1024 * 1024)

static volatile unsigned sink;	/* what touch() read: kept, so that the reads are */

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(int ok, const char *what)
{
	if (!ok)
	{
		fprintf(stderr, "fuzz_protocol: %s\n", what);
		abort();
	}
}

/* Read every byte the decoded request points at (ASan checks each read). */
static unsigned
touch(const void *seg, const KlReqView *v, kl_blob *parts)
{
	unsigned	sum = 0;

	for (int i = 0; i < v->hdr.n_prompt; i++)
		sum += (unsigned) v->prompt[i];
	for (int i = 0; i < v->hdr.n_stop_ids; i++)
		sum += (unsigned) v->stop_ids[i];
	for (int i = 0; i < v->n_stops; i++)
		for (int k = 0; k < v->stop_lens[i]; k++)
			sum += (unsigned char) v->stops[i][k];
	for (int k = 0; k < v->grammar_len; k++)
		sum += (unsigned char) v->grammar[k];
	kl_request_parts(seg, v, parts);
	for (int i = 0; i < v->n_parts; i++)
		for (size_t k = 0; k < parts[i].len; k++)
			sum += parts[i].data[k];
	return sum;
}

/* The same request, field by field (the layout may differ). */
static void
check_same(const KlReqView *a, const kl_blob *pa, const KlReqView *b, const kl_blob *pb)
{
	const KlRequest *x = &a->hdr,
			   *y = &b->hdr;

	check(strcmp(x->model, y->model) == 0 && x->model_generation == y->model_generation && x->flags == y->flags,
		  "the model or flags changed");
	check(memcmp(&x->temperature, &y->temperature, 4 * sizeof(float)) == 0 && x->top_k == y->top_k &&
		  (x->ignore_eos != 0) == (y->ignore_eos != 0) && x->seed == y->seed && x->max_tokens == y->max_tokens &&
		  x->max_context == y->max_context, "the sampling settings changed");
	check(x->page_size == y->page_size && x->pages_upto == y->pages_upto && x->cache_key == y->cache_key,
		  "the paging changed");
	check(x->n_prompt == y->n_prompt && memcmp(a->prompt, b->prompt, 4 * (size_t) x->n_prompt) == 0,
		  "the prompt changed");
	check(x->n_stop_ids == y->n_stop_ids && memcmp(a->stop_ids, b->stop_ids, 4 * (size_t) x->n_stop_ids) == 0,
		  "the stop ids changed");
	check(a->n_stops == b->n_stops, "the number of stop strings changed");
	for (int i = 0; i < a->n_stops; i++)
		check(a->stop_lens[i] == b->stop_lens[i] && memcmp(a->stops[i], b->stops[i], a->stop_lens[i]) == 0,
			  "a stop string changed");
	check(a->grammar_len == b->grammar_len && (a->grammar_len == 0 || memcmp(a->grammar, b->grammar, a->grammar_len) == 0),
		  "the output constraint changed");
	check(a->n_parts == b->n_parts, "the number of state parts changed");
	for (int i = 0; i < a->n_parts; i++)
		check(pa[i].len == pb[i].len && memcmp(pa[i].data, pb[i].data, pa[i].len) == 0, "a state part changed");
}

/* Encode the decoded request again, decode that, and compare. */
static void
round_trip(const KlReqView *v, const kl_blob *parts)
{
	KlReqSpec	spec = {0};
	KlReqLayout l;
	char	   *stops[KL_MAX_STOP_STRINGS];
	uint64_t	parts_bytes = 0,
				at;
	char	   *seg;
	KlReqView	w;
	kl_blob    *wparts;
	const char *why;

	/* stop strings travel as C strings: one with a NUL inside cannot be sent */
	for (int i = 0; i < v->n_stops; i++)
		if (memchr(v->stops[i], 0, v->stop_lens[i]))
			return;
	spec.model = v->hdr.model;
	spec.model_generation = v->hdr.model_generation;
	spec.flags = v->hdr.flags;
	spec.temperature = v->hdr.temperature;
	spec.top_p = v->hdr.top_p;
	spec.min_p = v->hdr.min_p;
	spec.repetition_penalty = v->hdr.repetition_penalty;
	spec.top_k = v->hdr.top_k;
	spec.ignore_eos = v->hdr.ignore_eos != 0;
	spec.seed = v->hdr.seed;
	spec.max_tokens = v->hdr.max_tokens;
	spec.max_context = v->hdr.max_context;
	spec.prompt = v->prompt;
	spec.n_prompt = v->hdr.n_prompt;
	spec.stop_ids = v->stop_ids;
	spec.n_stop_ids = v->hdr.n_stop_ids;
	for (int i = 0; i < v->n_stops; i++)
	{
		stops[i] = malloc((size_t) v->stop_lens[i] + 1);
		memcpy(stops[i], v->stops[i], v->stop_lens[i]);
		stops[i][v->stop_lens[i]] = '\0';
	}
	spec.stop_strings = stops;
	spec.n_stop_strings = v->n_stops;
	spec.grammar = v->grammar;
	spec.grammar_len = (size_t) v->grammar_len;
	spec.page_size = v->hdr.page_size;
	spec.pages_upto = v->hdr.pages_upto;
	spec.cache_key = v->hdr.cache_key;
	for (int i = 0; i < v->n_parts; i++)
		parts_bytes += parts[i].len;

	kl_request_layout(&spec, parts_bytes, v->n_parts, &l);
	seg = calloc(1, l.mq_off);	/* the queue: not allocated (see above) */
	check(seg != NULL, "out of memory");
	kl_request_encode(seg, &spec, v->n_parts, &l);
	((KlRequest *) seg)->request_id = 42;
	at = l.parts_off;
	for (int i = 0; i < v->n_parts; i++)
	{
		at = kl_request_put_part(seg, at, l.data_end, parts[i].data, parts[i].len);
		check(at != 0, "the layout has no room for a part");
	}
	check(kl_request_decode(seg, l.total, 42, &w, &why) == KL_DECODE_OK, "an encoded request does not decode");
	wparts = malloc(sizeof(kl_blob) * ((size_t) w.n_parts + 1));
	check(wparts != NULL, "out of memory");
	sink = touch(seg, &w, wparts);
	check_same(v, parts, &w, wparts);
	free(wparts);
	free(seg);
	for (int i = 0; i < v->n_stops; i++)
		free(stops[i]);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint64_t	rid = 0,
				mq_off = UINT64_MAX;
	size_t		declared;
	void	   *seg = malloc(size ? size : 1);	/* aligned, as a segment is */
	KlReqView	v;
	KlDecodeResult res;
	const char *why = NULL;

	check(seg != NULL, "out of memory");
	memcpy(seg, data, size);
	/* the id the slot names: the header's own, so that mutations get past it */
	if (size >= sizeof(KlRequest))
	{
		memcpy(&rid, (const char *) seg + offsetof(KlRequest, request_id), 8);
		memcpy(&mq_off, (const char *) seg + offsetof(KlRequest, mq_off), 8);
	}
	declared = mq_off <= size ? size + QUEUE_ROOM : size;
	res = kl_request_decode(seg, declared, rid, &v, &why);
	if (res == KL_DECODE_OK)
	{
		kl_blob    *parts = malloc(sizeof(kl_blob) * ((size_t) v.n_parts + 1));

		check(parts != NULL, "out of memory");
		sink = touch(seg, &v, parts);
		round_trip(&v, parts);
		free(parts);
	}
	else
		check(why != NULL && why[0] != '\0', "a refused request without a reason");
	if (res == KL_DECODE_MALFORMED)
		check(v.hdr.mq_off <= declared && v.hdr.mq_size <= declared - v.hdr.mq_off,
			  "a malformed request whose reply queue lies outside the segment");
	free(seg);
	return 0;
}
