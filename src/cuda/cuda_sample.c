/*
 * cuda_sample.c — the backend's `sample` op: the next token of each row of
 * logits chosen on the device (kernels/sample.cu), so that only the ids
 * come back instead of a row of vocabulary-sized logits per sequence.
 *
 * Per call the rows' settings, their repetition-penalty ids (made distinct
 * here: the penalty applies once per id, as in kl_sample_draw) and their
 * optional allowed-token masks are staged in pinned memory and go to the
 * device in one copy; the kernel runs (a cluster of blocks per row where the
 * GPU has clusters, unless KL_CUDA_SAMPLE_WIDE=0; else one block per row);
 * the ids come back in one copy.  KL_CUDA_SAMPLE_WIDE=2 runs the cluster
 * kernel's fast form (kk_sample_fast: fewer passes, the same choices), opt-in:
 * on an H200 (2026-12-01, bench_cuda sample, V 163840) top-p and plain
 * temperature ran 5-35 % faster, top-k and min-p on peaked logits 10-50 %
 * slower (bench/notes-cuda.md, issue 11 fourth session).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

/* grow a pinned host buffer and a device buffer to `bytes` */
static bool
stage_reserve(kl_backend *be, size_t bytes)
{
	cuda_state *cs = CS(be);

	if (bytes <= cs->smp_cap)
		return true;
	bytes = bytes * 2 + 4096;
	cudaFreeHost(cs->smp_host);
	cudaFree(cs->smp_dev);
	cs->smp_host = NULL;
	cs->smp_dev = NULL;
	cs->smp_cap = 0;
	if (!cuda_ok(be, cudaMallocHost(&cs->smp_host, bytes), "cudaMallocHost (sampling)") ||
		!cuda_ok(be, cudaMalloc(&cs->smp_dev, bytes), "cudaMalloc (sampling)"))
		return false;
	cs->smp_cap = bytes;
	return true;
}

static size_t
align16(size_t n)
{
	return (n + 15) & ~(size_t) 15;
}

int
cuda_sample(kl_backend *be, float *logits, int vocab, const kl_sample_row *rows, int n, int32_t *ids, kl_err *err)
{
	cuda_state *cs = CS(be);
	size_t		n_recent = 0,
				n_mask = 0,
				words = ((size_t) vocab + 31) / 32;
	size_t		o_rows,
				o_recent,
				o_mask,
				o_out,
				total;
	uint8_t    *h;
	kk_sample_row *kr;
	int32_t    *rec;
	uint32_t   *seen = NULL;
	float	   *scratch;

	if (n <= 0)
		return KL_OK;
	cuda_flush_add(be);
	for (int i = 0; i < n; i++)
	{
		n_recent += rows[i].s->repetition_penalty != 1.0f && rows[i].n_recent > 0 ? (size_t) rows[i].n_recent : 0;
		n_mask += rows[i].allowed ? words : 0;
	}
	o_rows = 0;
	o_recent = align16(sizeof(kk_sample_row) * (size_t) n);
	o_mask = align16(o_recent + sizeof(int32_t) * n_recent);
	o_out = align16(o_mask + sizeof(uint32_t) * n_mask);
	total = align16(o_out + sizeof(int32_t) * (size_t) n);
	if (!stage_reserve(be, total))
		goto fail;
	if (n_recent > 0 && !(seen = calloc(words, sizeof(uint32_t))))
	{
		cuda_fail(be, KL_E_RESOURCES, "out of memory");
		goto fail;
	}

	/* the previous call's copies are done: it waited for its ids */
	h = cs->smp_host;
	kr = (kk_sample_row *) (h + o_rows);
	rec = (int32_t *) (h + o_recent);
	n_recent = 0;
	n_mask = 0;
	for (int i = 0; i < n; i++)
	{
		const kl_sample_row *r = &rows[i];

		memset(&kr[i], 0, sizeof(kk_sample_row));
		kr[i].row = r->row;
		kr[i].temperature = r->s->temperature;
		kr[i].top_p = r->s->top_p;
		kr[i].min_p = r->s->min_p;
		kr[i].penalty = r->s->repetition_penalty;
		kr[i].top_k = r->s->top_k;
		kr[i].u0 = r->u0;
		kr[i].recent_off = (int) n_recent;
		kr[i].mask_off = -1;
		if (r->s->repetition_penalty != 1.0f)
		{
			/* each valid id once, in first-seen order */
			for (int j = 0; j < r->n_recent; j++)
			{
				int32_t		id = r->recent[j];

				if (id < 0 || id >= vocab || (seen[id >> 5] >> (id & 31)) & 1u)
					continue;
				seen[id >> 5] |= 1u << (id & 31);
				rec[n_recent++] = id;
			}
			for (size_t j = (size_t) kr[i].recent_off; j < n_recent; j++)
				seen[rec[j] >> 5] = 0;
		}
		kr[i].n_recent = (int) n_recent - kr[i].recent_off;
		if (r->allowed)
		{
			memcpy(h + o_mask + sizeof(uint32_t) * n_mask, r->allowed, sizeof(uint32_t) * words);
			kr[i].mask_off = (int) n_mask;
			n_mask += words;
		}
	}
	free(seen);
	seen = NULL;
	if (!cuda_ok(be, cudaMemcpyAsync(cs->smp_dev, cs->smp_host, o_out, cudaMemcpyHostToDevice, cs->stream),
				 "sampling inputs"))
		goto fail;
	if (!cs->sample_wide ||
		(cs->sample_fast ? kk_sample_fast : kk_sample_wide) (cs->stream, logits, vocab, n,
															 (const kk_sample_row *) ((uint8_t *) cs->smp_dev + o_rows),
															 (const int32_t *) ((uint8_t *) cs->smp_dev + o_recent),
															 (const uint32_t *) ((uint8_t *) cs->smp_dev + o_mask),
															 (int32_t *) ((uint8_t *) cs->smp_dev + o_out)) != 0)
	{
		/* one block per row (also where the wide kernel cannot run: it launched nothing) */
		scratch = cuda_buf(be, CB_SAMPLE_PROB, sizeof(float) * (size_t) n * vocab);
		if (!scratch)
			goto fail;
		kk_sample(cs->stream, logits, vocab, n, (const kk_sample_row *) ((uint8_t *) cs->smp_dev + o_rows),
				  (const int32_t *) ((uint8_t *) cs->smp_dev + o_recent),
				  (const uint32_t *) ((uint8_t *) cs->smp_dev + o_mask), scratch,
				  (int32_t *) ((uint8_t *) cs->smp_dev + o_out));
	}
	if (!cuda_launched(be, "sample") ||
		!cuda_ok(be, cudaMemcpyAsync(h + o_out, (uint8_t *) cs->smp_dev + o_out, sizeof(int32_t) * (size_t) n,
									 cudaMemcpyDeviceToHost, cs->stream), "sampled ids") ||
		!cuda_ok(be, cudaStreamSynchronize(cs->stream), "sampling"))
		goto fail;
	memcpy(ids, h + o_out, sizeof(int32_t) * (size_t) n);
	for (int i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= vocab)
		{
			cuda_fail(be, KL_E_INTERNAL, "internal error: the GPU sampler chose token %d of %d", ids[i], vocab);
			goto fail;
		}
	return KL_OK;
fail:
	free(seen);
	return cuda_take_failure(be, err, "sampling on the GPU");
}
