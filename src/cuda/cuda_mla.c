/*
 * cuda_mla.c — the MLA mixer op on the GPU (the math: src/engine/cpu_mla.c).
 *
 * The new latent rows go into the paged cache first (one launch for the
 * batch).  Then, as on the CPU, each sequence takes one of two forms, decided
 * by its own row count only:
 *   absorbed (fewer than 64 rows: decode, short inputs) — kernels/mla.cu,
 *     one launch each for the whole batch, all heads of a token attending to
 *     the shared latent rows, long contexts split over many blocks;
 *   expanded (64 rows or more: prompts) — keys and values expanded once per
 *     step through kv_b (one GEMM), then blocks of query rows: scores for all
 *     heads (strided-batched GEMM, plus a second one for the shared k_pe),
 *     causal softmax, output (strided-batched GEMM).  The score block is
 *     bounded (SCORE_BYTES): no n x n matrix is ever held.
 * In bf16 mode (with bf16 weights) the expanded products take bf16 operands
 * with fp32 accumulation; otherwise they are SGEMMs (without TF32 in fp32 mode).
 * In bf16 mode the cache itself holds bf16 rows (cs->mla_c16): the kernels
 * widen them on load; the state format keeps fp32 (cuda_backend.c converts).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define SPLIT_MIN_KEYS 64		/* decode: keys per block at least */
#define MMA_TILE 64				/* keys per tile of mla_attend_mma */
/* prefill: fp32 scores of one query block: a quarter of the free memory, within these bounds */
#define SCORE_BYTES_MIN ((size_t) 256 << 20)
#define SCORE_BYTES_MAX ((size_t) 4 << 30)

int
cuda_prepare_mla(kl_backend *be, kl_mla_layer *w, kl_err *err)
{
	cuda_state *cs = CS(be);
	cuda_mla_prep *p = calloc(1, sizeof(cuda_mla_prep));
	size_t		n = (size_t) w->kv_b.rows * w->kv_b.cols;

	if (!p)
	{
		err->code = KL_E_RESOURCES;
		snprintf(err->msg, sizeof(err->msg), "out of memory");
		return KL_FAIL;
	}
	if (cuda_weight_quantized(&w->kv_b))
	{
		/*
		 * a checkpoint that stores kv_b quantized: the attention kernels read
		 * W_uk, W_uv as fp32 (fp32 mode: quant.h's values, as cpu_mla.c
		 * expands them) or bf16 (bf16 mode: those values rounded)
		 */
		size_t		esz = cs->bf16 ? sizeof(uint16_t) : sizeof(float);

		if (!cuda_ok(be, cudaMalloc(&p->owned, n * esz), "cudaMalloc (kv_b)"))
			goto fail;
		kk_q_dequant(cs->stream, p->owned, cs->bf16, w->kv_b.dev, cuda_weight_fmt(&w->kv_b), w->kv_b.q.group,
					 w->kv_b.rows, w->kv_b.cols, 0, w->kv_b.rows);
		if (!cuda_launched(be, "q_dequant (kv_b)") || !cuda_ok(be, cudaStreamSynchronize(cs->stream), "prepare_mla"))
			goto fail;
		p->kv_b = p->owned;
		p->bf16 = cs->bf16;
	}
	else if (w->kv_b.dtype == KL_DT_BF16 && !cs->bf16)
	{
		/* fp32 mode: the attention kernels read W_uk, W_uv in fp32 */
		if (!cuda_ok(be, cudaMalloc(&p->owned, n * sizeof(float)), "cudaMalloc (kv_b)"))
			goto fail;
		kk_bf16_to_f32(cs->stream, p->owned, w->kv_b.dev, n);
		if (!cuda_launched(be, "bf16_to_f32") || !cuda_ok(be, cudaStreamSynchronize(cs->stream), "prepare_mla"))
			goto fail;
		p->kv_b = p->owned;
		p->bf16 = false;
	}
	else
	{
		p->kv_b = w->kv_b.dev;
		p->bf16 = w->kv_b.dtype == KL_DT_BF16;
	}
	w->prepared = p;
	return KL_OK;
fail:
	cudaFree(p->owned);
	free(p);
	return cuda_take_failure(be, err, NULL);
}

void
cuda_release_mla(kl_backend *be, kl_mla_layer *w)
{
	cuda_mla_prep *p = w->prepared;

	(void) be;
	if (!p)
		return;
	cudaFree(p->owned);
	free(p);
	w->prepared = NULL;
}

/* ------------------------------------------------------------------ absorbed form */

/*
 * Keys per range for the tensor-core kernels (a multiple of their 64-key
 * tile).  Each holds one block per SM (about 200 KB of shared memory at the 48B
 * shapes), and a block pays a fixed cost besides its tiles (Qabs, about one
 * tile's bytes; its partials, about one tile's bytes written and read by
 * mla_merge), so: the range count that minimizes waves x (tiles per range +
 * 1), the smaller count on ties.  Decided by the keys of the step's longest
 * sequence's pages and the token count alone (cuda_mla_plan; a graph is
 * recorded again when the result changes).  4k keys: batch 1 -> 64 ranges
 * of 64 keys, batch 8 -> 16 of 256, batch 64 -> 2 of 2048; 32k keys, batch
 * 1 -> 128 ranges of 256; 33 pages (33792 keys), batch 1 -> 132 of 256.
 */
static int64_t
mma_split(int64_t max_keys, int n, int sm_count)
{
	int64_t		tiles = (max_keys + MMA_TILE - 1) / MMA_TILE,
				best = tiles,
				best_cost = -1;

	/* (beyond 8 waves at batch 1 a range never pays: the bound keeps this short) */
	for (int64_t r = 1; r <= tiles && r <= 8 * (int64_t) sm_count; r++)
	{
		int64_t		per = (tiles + r - 1) / r,
					waves = ((int64_t) n * r + sm_count - 1) / sm_count,
					cost = waves * (per + 1);

		if (best_cost < 0 || cost < best_cost)
		{
			best_cost = cost;
			best = per;
		}
	}
	return best * MMA_TILE;
}

/*
 * The wgmma decode attention's forms from the environment (the backend
 * reads them once, when it is made; the test hook at each call):
 *   KL_CUDA_MLA_WG_SPLIT=K  keys a block, K a multiple of 64 (rounded down;
 *                           below 64 or unset: mma_split's rule)
 *   KL_CUDA_MLA_WG_PF=W     each key range requests its tiles into L2 W
 *                           tiles ahead of their copies to shared memory
 *                           (cp.async.bulk.prefetch.L2, one a tile: a hint,
 *                           the same bits; 0 none, the default: 2 and 4
 *                           measured no faster, 2026-12-03; at most 16)
 *   KL_CUDA_MLA_WG_DUAL=1   where a block holds 2 tiles or more, each of its
 *                           two warpgroups streams half of them as a range
 *                           of its own (kk_mla_decode_args.wg_dual; default
 *                           0: the ranges, so the merge's order, change)
 *   KL_CUDA_MLA_PLAN_CAP=1  the key ranges planned for the page table's
 *                           capacity, as before 2026-12-03 (cuda_mla_plan;
 *                           for measurements; every variant)
 * Why (bench/notes-cuda.md, "Issue 10, sixth session: MLA decode attention
 * at 32k"): a block walks its tiles at ~2.6 us a 72 KB tile whether 4 or
 * 128 blocks run (~28 GB/s an SM; DRAM's share is ~32), bound by its own
 * serial chain (copies of tile j + 2 wait for tile j's products; S^T,
 * softmax and O^T one after another behind barriers), not by DRAM.
 */
void
cuda_mla_wg_read(cuda_mla_wg *o)
{
	const char *sp = getenv("KL_CUDA_MLA_WG_SPLIT"),
			   *pf = getenv("KL_CUDA_MLA_WG_PF"),
			   *du = getenv("KL_CUDA_MLA_WG_DUAL"),
			   *pc = getenv("KL_CUDA_MLA_PLAN_CAP");

	o->split = sp && atoi(sp) >= MMA_TILE ? atoi(sp) / MMA_TILE * MMA_TILE : 0;
	o->pf = !pf || !*pf ? 0 : atoi(pf) < 0 ? 0 : atoi(pf) > 16 ? 16 : atoi(pf);
	o->dual = du && strcmp(du, "1") == 0;
	o->plan_cap = pc && strcmp(pc, "1") == 0;
}

/*
 * Keys per range of the decode attention `variant` (cs->mla_mma: 0 the
 * CUDA-core kernel, 1 mla_attend_mma, 2 the wgmma variant of kernels.h) for
 * sequences of at most max_keys keys and n tokens; *dual (variant 2 with
 * wg->dual, where a block's keys, wg->split or the rule's, are 2 tiles or
 * more): each warpgroup takes a range of half of them (rounded up to a
 * tile), and the result is that range.
 */
static int64_t
decode_split(int variant, const cuda_mla_wg *wg, int64_t max_keys, int n, int sm_count, int *dual)
{
	int			want;
	int64_t		split;

	*dual = 0;
	if (variant == 2)
	{
		int64_t		tiles = (wg->split > 0 ? wg->split : mma_split(max_keys, n, sm_count)) / MMA_TILE;

		*dual = wg->dual && tiles >= 2;
		return (*dual ? (tiles + 1) / 2 : tiles) * MMA_TILE;
	}
	if (variant >= 1)
		return mma_split(max_keys, n, sm_count);
	want = (4 * sm_count + n - 1) / n;	/* CUDA-core kernel: fill the GPU four times */
	split = (max_keys + want - 1) / want;
	split = (split + 31) / 32 * 32;
	return split < SPLIT_MIN_KEYS ? SPLIT_MIN_KEYS : split;
}

/*
 * The decode attention's key ranges for a step of n tokens whose longest
 * sequence has `keys` keys of cache pages (its pages, this step's rows
 * included) in page tables of cap_keys: cs->mla_split keys a range,
 * cs->mla_max_splits ranges a token (the grid, for the capacity: ranges past
 * a sequence's end exit at once) and cs->mla_dual.  The keys a range are
 * planned for the pages in use, not the capacity: that is a power of two,
 * so a sequence just past 32k keys (33 pages) had ranges planned for 64k,
 * 64 blocks of 8 tiles working where 129 of 4 could (H200, 2026-12-03: 32k
 * batch 1 ~2.49 against ~2.42 ms a step with 4-tile ranges;
 * bench/notes-cuda.md).  begin_step calls it; the plan is part of a graph's
 * key (cuda_step.c), so a graph is recorded again when it changes: when the
 * keys a range do (at batch 1 every ~8k keys: 132 ranges of one more tile)
 * or the capacity doubles, not at every page.
 */
void
cuda_mla_plan(cuda_state *cs, int64_t keys, int64_t cap_keys, int n)
{
	int			dual = 0;

	cs->mla_split = (int) decode_split(cs->mla_mma, &cs->mla_wg, cs->mla_wg.plan_cap ? cap_keys : keys, n,
									   cs->sm_count, &dual);
	cs->mla_max_splits = (int) ((cap_keys + cs->mla_split - 1) / cs->mla_split);
	cs->mla_dual = dual;
}

/*
 * The decode attention variant in force (cs->mla_mma) when `asked` for
 * (KL_CUDA_MLA_MMA, default 2): 0 when asked so, without a bf16 cache (c16)
 * or where the tensor-core kernels do not take the shape; 2 where asked and
 * the wgmma kernel takes the shape on this device; else 1.
 */
int
cuda_mla_decode_variant(int asked, bool c16, int Ha, int R, int Dr)
{
	if (!c16 || asked == 0 || !kk_mla_attend_mma_supported(Ha, R, Dr))
		return 0;
	return asked == 2 && kk_mla_decode_wg_supported(Ha, R, Dr) ? 2 : 1;
}

/*
 * The decode attention of a->n_tokens absorbed-form tokens into a->olat
 * through `variant` (a->split_keys and a->max_splits from decode_split),
 * then its key ranges merged (merge_wide: kk_mla_merge_wide, else
 * kk_mla_merge); c16: the cache holds bf16 rows
 * (variants >= 1 require it).  Returns 0 or a CUDA error code
 * (-1: the variant does not take the shape).
 */
static int
decode_attend(cudaStream_t s, int variant, int c16, bool merge_wide, const kk_mla_decode_args *a)
{
	int			rc;

	switch (variant)
	{
		case 0:
			rc = kk_mla_attend(s, a->n_tokens, a->max_splits, (int) a->split_keys, a->Ha, a->R, a->Dr, a->qabs,
							   a->scale, a->row_seq, a->row0, a->pos0, a->absorbed, a->pages, a->page_cap,
							   a->part_acc, a->part_ml, c16);
			break;
		case 1:
			rc = kk_mla_attend_mma(s, a->n_tokens, a->max_splits, (int) a->split_keys, a->Ha, a->R, a->Dr, a->qabs,
								   a->scale, a->row_seq, a->row0, a->pos0, a->absorbed, a->pages, a->page_cap,
								   a->part_acc, a->part_ml);
			break;
		case 2:
			rc = kk_mla_decode_wg(s, a);
			break;
		default:
			rc = -1;
	}
	if (rc == 0 && (rc = (int) cudaGetLastError()) == 0)
	{
		(merge_wide && a->R % 2 == 0 ? kk_mla_merge_wide : kk_mla_merge) (s, a->n_tokens, a->max_splits,
																		 (int) a->split_keys, a->Ha, a->R,
																		 a->part_acc, a->part_ml, a->row_seq,
																		 a->row0, a->pos0, a->absorbed, a->olat);
		rc = (int) cudaGetLastError();
	}
	return rc;
}

/*
 * Merge with kk_mla_merge_wide (when `on`) only where kk_mla_merge would have
 * fewer blocks than the GPU has SMs (one a token and head): at batch 1 it
 * took the wgmma attention stage from 25.0 to 22.5 us at 32k and 11.6 to
 * 10.2 at 4k; at batch 8 (256 blocks) it lost 2-3 us (H200, 2026-12-01).
 */
static bool
merge_wide(bool on, int n, int Ha, int sm_count)
{
	return on && n * Ha < sm_count;
}

/* the step's new latent rows into this layer's cache (pages), a launch of their own */
static bool
append_rows(kl_backend *be, const kl_step *st, const kl_mla_args *a, float **pages)
{
	cuda_state *cs = CS(be);

	kk_mla_append(cs->stream, st->n_tokens, be->cfg->kv_lora_rank + be->cfg->qk_rope_dim, a->kv, cs->d_row_seq,
				  cs->d_row0, cs->d_pos0, pages, cs->page_cap, cs->mla_c16);
	return cuda_launched(be, "mla_append");
}

/*
 * The step's new latent rows into the cache and the absorbed queries into
 * qabs: in one launch where KL_CUDA_MLA_FOLD is on and the 16-byte-load
 * absorb kernel takes the shape (kk_mla_absorb_q_append: the same bytes as
 * the two launches; Qabs into *qabs16 as bf16 instead where that is not
 * NULL), else the append and then an absorb kernel (*qabs16 = NULL: Qabs
 * in qabs).  False (be->failed set) on an error.
 */
static bool
append_absorb(kl_backend *be, const kl_step *st, const kl_mla_args *a, float **pages, float *qabs,
			  uint16_t **qabs16)
{
	cuda_state *cs = CS(be);
	const kl_config *c = be->cfg;
	const cuda_mla_prep *p = a->w->prepared;
	int			n = st->n_tokens,
				Ha = c->mla_heads,
				Dn = c->qk_nope_dim,
				Dr = c->qk_rope_dim,
				Dv = c->v_head_dim,
				R = c->kv_lora_rank;

	if (cs->mla_small && cs->mla_fold &&
		kk_mla_absorb_q_append(cs->stream, n, Ha, Dn, Dr, Dv, R, a->q, p->kv_b, p->bf16, qabs, *qabs16,
							   cs->d_row_seq, cs->d_absorbed, a->kv, cs->d_row0, cs->d_pos0, pages, cs->page_cap,
							   cs->mla_c16) == 0)
		return cuda_launched(be, "mla_absorb_q_append");
	*qabs16 = NULL;
	if (!append_rows(be, st, a, pages))
		return false;
	/* decode steps: the 16-byte-load kernel where it covers the shape (-1: not launched) */
	if (!cs->mla_small ||
		kk_mla_absorb_q_stream(cs->stream, n, Ha, Dn, Dr, Dv, R, a->q, p->kv_b, p->bf16, qabs, cs->d_row_seq,
							   cs->d_absorbed) != 0)
		kk_mla_absorb_q(cs->stream, n, Ha, Dn, Dr, Dv, R, a->q, p->kv_b, p->bf16, qabs, cs->d_row_seq, cs->d_absorbed);
	return cuda_launched(be, "mla_absorb_q");
}

/* the absorbed form of the step's absorbed sequences, after the new rows are appended (append_absorb) */
static void
mla_absorbed(kl_backend *be, const kl_step *st, const kl_mla_args *a, float **pages)
{
	cuda_state *cs = CS(be);
	const kl_config *c = be->cfg;
	const cuda_mla_prep *p = a->w->prepared;
	int			Ha = c->mla_heads,
				Dn = c->qk_nope_dim,
				Dr = c->qk_rope_dim,
				Dv = c->v_head_dim,
				R = c->kv_lora_rank,
				Wa = R + Dr;
	int			n = st->n_tokens;
	kk_mla_decode_args d = {0};
	float	   *qabs = cuda_buf(be, CB_MLA_QABS, sizeof(float) * (size_t) n * Ha * Wa);
	uint16_t   *qabs16 = NULL;
	int			rc;

	d.n_tokens = n;
	d.Ha = Ha;
	d.R = R;
	d.Dr = Dr;
	d.scale = 1.0f / sqrtf((float) (Dn + Dr));
	/* key ranges a token: the step's plan (begin_step, cuda_mla_plan), part of its graph's key */
	d.split_keys = cs->mla_split;
	d.max_splits = cs->mla_max_splits;
	d.wg_dual = cs->mla_dual;
	d.wg_pf = cs->mla_wg.pf;
	d.qabs = qabs;
	d.olat = cuda_buf(be, CB_MLA_OLAT, sizeof(float) * (size_t) n * Ha * R);
	d.part_acc = cuda_buf(be, CB_MLA_PACC, sizeof(float) * (size_t) n * d.max_splits * Ha * R);
	d.part_ml = cuda_buf(be, CB_MLA_PML, sizeof(float) * 2 * (size_t) n * d.max_splits * Ha);
	if (!d.qabs || !d.olat || !d.part_acc || !d.part_ml)
		return;
	d.row_seq = cs->d_row_seq;
	d.row0 = cs->d_row0;
	d.pos0 = cs->d_pos0;
	d.absorbed = cs->d_absorbed;
	d.pages = pages;
	d.page_cap = cs->page_cap;
	/* (the rows of earlier steps before the wait: only append_absorb writes the cache before the attention) */
	d.early = cs->mla_early;
	/* Qabs in bf16 for the wgmma attention, which rounds it so anyway (where the fold is taken) */
	if (cs->mla_early && cs->mla_mma == 2 &&
		!(qabs16 = cuda_buf(be, CB_MLA_QABS16, sizeof(uint16_t) * (size_t) n * Ha * Wa)))
		return;
	if (!append_absorb(be, st, a, pages, qabs, &qabs16))
		return;
	d.qabs16 = qabs16;
	rc = decode_attend(cs->stream, cs->mla_mma, cs->mla_c16, merge_wide(cs->mla_merge_wide, n, Ha, cs->sm_count), &d);
	if (rc != 0)
	{
		cuda_ok(be, rc == -1 ? cudaErrorInvalidConfiguration : (cudaError_t) rc, "mla_attend");
		return;
	}
	{
		/* o_proj's bf16 twin, where every row is written here (no expanded sequence) and its dense FP8
		 * product reads one (KL_CUDA_Q_TWIN; cuda_twin_out) */
		uint16_t   *o16 = cs->mla_small && !cs->any_expanded ? cuda_twin_out(be, n, Ha * Dv) : NULL;

		if (be->failed)
			return;
		if (!cs->mla_small ||
			kk_mla_out_stream_twin(cs->stream, n, Ha, Dn, Dv, R, d.olat, p->kv_b, p->bf16, a->out, cs->d_row_seq,
								   cs->d_absorbed, o16) != 0)
		{
			o16 = NULL;
			kk_mla_out(cs->stream, n, Ha, Dn, Dv, R, d.olat, p->kv_b, p->bf16, a->out, cs->d_row_seq,
					   cs->d_absorbed);
		}
		if (cuda_launched(be, "mla_out") && o16)
			cuda_twin_set(cs, a->out, Ha * Dv, n, Ha * Dv, o16, false);
	}
}

/* ------------------------------------------------------------------ test hook */

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): the absorb and output products of n decode tokens (token t its
 * own sequence t; absorbed[t] nonzero where the token takes the absorbed
 * form) through the older kernels (kk_mla_absorb_q, kk_mla_out) and the
 * 16-byte-load ones (KL_CUDA_MLA_SMALL), on the current device.  Host
 * inputs: q [n, Ha, Dn + Dr], kv_b [Ha (Dn + Dv), R] in bf16 (uint16_t) or
 * fp32, olat [n, Ha, R].  Outputs, copied back: qabs_* [n, Ha, R + Dr] and
 * out_* [n, Ha Dv]; their host contents go to the device first, so that the
 * entries a kernel leaves alone compare too.  Returns 0, -1 when the new
 * kernels do not cover the shape, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_mla_small(int n, int Ha, int Dn, int Dr, int Dv, int R, int bf16, const float *q, const void *kv_b,
					   const float *olat, const int *absorbed, float *qabs_old, float *qabs_new, float *out_old,
					   float *out_new)
{
	enum
	{
		Q, W, OLAT, ROWSEQ, ABS, QA_O, QA_N, OUT_O, OUT_N, NBUF
	};
	size_t		nq = (size_t) n * Ha * (Dn + Dr),
				nw = (size_t) Ha * (Dn + Dv) * R,
				nqa = (size_t) n * Ha * (R + Dr),
				no = (size_t) n * Ha * Dv;
	size_t		sz[NBUF] = {sizeof(float) * nq, nw * (bf16 ? 2 : 4), sizeof(float) * (size_t) n * Ha * R,
							sizeof(int) * (size_t) n, sizeof(int) * (size_t) n, sizeof(float) * nqa,
							sizeof(float) * nqa, sizeof(float) * no, sizeof(float) * no};
	int		   *row_seq = malloc(sizeof(int) * (size_t) n);
	/* the outputs' host contents go up too (the entries no kernel writes) */
	const void *in[NBUF] = {q, kv_b, olat, row_seq, absorbed, qabs_old, qabs_new, out_old, out_new};
	void	   *host_out[4] = {qabs_old, qabs_new, out_old, out_new};
	int			dev_of[4] = {QA_O, QA_N, OUT_O, OUT_N};
	void	   *d[NBUF] = {NULL};
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc;

	if (!row_seq)
		return (int) cudaErrorMemoryAllocation;
	for (int t = 0; t < n; t++)
		row_seq[t] = t;
	rc = hook_open(&s, d, sz, in, NBUF);
	if (rc == 0)
	{
		kk_mla_absorb_q(s, n, Ha, Dn, Dr, Dv, R, d[Q], d[W], bf16, d[QA_O], d[ROWSEQ], d[ABS]);
		kk_mla_out(s, n, Ha, Dn, Dv, R, d[OLAT], d[W], bf16, d[OUT_O], d[ROWSEQ], d[ABS]);
		if (kk_mla_absorb_q_stream(s, n, Ha, Dn, Dr, Dv, R, d[Q], d[W], bf16, d[QA_N], d[ROWSEQ], d[ABS]) != 0 ||
			kk_mla_out_stream(s, n, Ha, Dn, Dv, R, d[OLAT], d[W], bf16, d[OUT_N], d[ROWSEQ], d[ABS]) != 0)
			rc = -1;
		else if ((e = cudaGetLastError()) != cudaSuccess)
			rc = (int) e;
	}
	rc = hook_close(s, d, sz, NBUF, dev_of, host_out, 4, rc);
	free(row_seq);
	return rc;
}

/* ------------------------------------------------------------------ expanded form */

/*
 * Query rows per score block of the cuBLAS path: the fp32 scores of all
 * heads for nq queries over m keys within a quarter of the free memory
 * (SCORE_BYTES_MIN .. SCORE_BYTES_MAX), whole tensor-core tiles where large.
 */
static int
score_rows(int Ha, int64_t m, int nr)
{
	size_t		fr = 0,
				tot = 0,
				budget;
	int			nq;

	cudaMemGetInfo(&fr, &tot);
	budget = fr / 4;
	budget = budget < SCORE_BYTES_MIN ? SCORE_BYTES_MIN : budget > SCORE_BYTES_MAX ? SCORE_BYTES_MAX : budget;
	nq = (int) (budget / (sizeof(float) * (size_t) Ha * (size_t) m));
	if (nq >= 128)
		nq &= ~63;				/* whole tensor-core tiles */
	return nq < 1 ? 1 : nq > nr ? nr : nq;
}

/*
 * The bf16 attention of nr queries (positions pos0 ..) over m = pos0 + nr
 * keys through cuBLAS, blocks of nq queries: scores of all heads
 * (strided-batched products, the nope part then the shared k_pe) into S
 * [Ha, nq, m] fp32, the causal softmax into P16, then O = P V.  Operands as
 * kk_mla_flash documents them.  False (be->failed set) on an error.
 */
static bool
attend_blas16(kl_backend *be, int Ha, int Dn, int Dr, int Dv, int R, int nr, int64_t pos0, int nq,
			  const uint16_t *q16, const uint16_t *kv16, const uint16_t *lat16, float *S, uint16_t *P16, float *out)
{
	cuda_state *cs = CS(be);
	int			Wa = R + Dr,
				Dq = Dn + Dr,
				L = Ha * (Dn + Dv);
	float		scale = 1.0f / sqrtf((float) Dq);
	const float one = 1.0f,
				zero = 0.0f;

	for (int i0 = 0; i0 < nr && !be->failed; i0 += nq)
	{
		int			nb = nr - i0 < nq ? nr - i0 : nq;
		int			kb = (int) (pos0 + i0 + nb);	/* keys the block's last query sees */
		long long	sS = (long long) nb * kb;

		/* S_h = scale (K_nope_h Q_nope_h^T + K_pe Q_pe_h^T), column-major [kb, nb] per head */
		if (!blas_ok(be, cublasGemmStridedBatchedEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, kb, nb, Dn, &scale,
													 kv16, CUDA_R_16BF, L, Dn + Dv,
													 q16 + (size_t) i0 * Ha * Dq, CUDA_R_16BF, Ha * Dq, Dq, &zero,
													 S, CUDA_R_32F, kb, sS, Ha, CUBLAS_COMPUTE_32F,
													 CUBLAS_GEMM_DEFAULT), "attention scores (nope)") ||
			!blas_ok(be, cublasGemmStridedBatchedEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, kb, nb, Dr, &scale,
													 lat16 + R, CUDA_R_16BF, Wa, 0,
													 q16 + (size_t) i0 * Ha * Dq + Dn, CUDA_R_16BF, Ha * Dq, Dq,
													 &one, S, CUDA_R_32F, kb, sS, Ha, CUBLAS_COMPUTE_32F,
													 CUBLAS_GEMM_DEFAULT), "attention scores (pe)"))
			return false;
		kk_mla_softmax(cs->stream, S, P16, Ha, nb, kb, pos0 + i0);
		if (!cuda_launched(be, "mla_softmax"))
			return false;
		/* O_h [nb, Dv] = P_h V_h: column-major O^T = V^T P^T */
		if (!blas_ok(be, cublasGemmStridedBatchedEx(cs->blas, CUBLAS_OP_N, CUBLAS_OP_N, Dv, nb, kb, &one,
													kv16 + Dn, CUDA_R_16BF, L, Dn + Dv, P16, CUDA_R_16BF, kb, sS,
													&zero, out + (size_t) i0 * Ha * Dv, CUDA_R_32F, Ha * Dv, Dv, Ha,
													CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "attention output"))
			return false;
	}
	return !be->failed;
}

/* the fp32 form of attend_blas16 (SGEMMs on kvf, lat, q in fp32; softmax in place) */
static void
attend_blas32(kl_backend *be, int Ha, int Dn, int Dr, int Dv, int R, int nr, int64_t pos0, int nq, const float *q,
			  const float *kvf, const float *lat, float *S, float *out)
{
	cuda_state *cs = CS(be);
	int			Wa = R + Dr,
				Dq = Dn + Dr,
				L = Ha * (Dn + Dv);
	float		scale = 1.0f / sqrtf((float) Dq);
	const float one = 1.0f,
				zero = 0.0f;

	for (int i0 = 0; i0 < nr && !be->failed; i0 += nq)
	{
		int			nb = nr - i0 < nq ? nr - i0 : nq;
		int			kb = (int) (pos0 + i0 + nb);	/* keys the block's last query sees */
		long long	sS = (long long) nb * kb;

		if (!blas_ok(be, cublasSgemmStridedBatched(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, kb, nb, Dn, &scale,
												   kvf, L, Dn + Dv, q + (size_t) i0 * Ha * Dq, Ha * Dq, Dq,
												   &zero, S, kb, sS, Ha), "attention scores (nope)") ||
			!blas_ok(be, cublasSgemmStridedBatched(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, kb, nb, Dr, &scale,
												   lat + R, Wa, 0, q + (size_t) i0 * Ha * Dq + Dn, Ha * Dq, Dq,
												   &one, S, kb, sS, Ha), "attention scores (pe)"))
			return;
		kk_mla_softmax(cs->stream, S, NULL, Ha, nb, kb, pos0 + i0);
		if (!cuda_launched(be, "mla_softmax"))
			return;
		blas_ok(be, cublasSgemmStridedBatched(cs->blas, CUBLAS_OP_N, CUBLAS_OP_N, Dv, nb, kb, &one,
											  kvf + Dn, L, Dn + Dv, S, kb, sS, &zero,
											  out + (size_t) i0 * Ha * Dv, Ha * Dv, Dv, Ha), "attention output");
	}
}

/*
 * The flash prefill attention of kind 1 (kk_mla_flash, mma.sync) or 2, 3
 * (kk_mla_flash_wgmma with that many warpgroups), scale 1 / sqrt(Dn + Dr):
 * what those return.
 */
static int
flash_launch(cudaStream_t s, int kind, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R,
			 const uint16_t *q16, const uint16_t *kv16, const uint16_t *lat16, float *out)
{
	float		scale = 1.0f / sqrtf((float) (Dn + Dr));

	if (kind >= 2)
		return kk_mla_flash_wgmma(s, kind, nr, pos0, Ha, Dn, Dr, Dv, R, q16, kv16, lat16, scale, out);
	return kk_mla_flash(s, nr, pos0, Ha, Dn, Dr, Dv, R, q16, kv16, lat16, scale, out);
}

/* flash_launch's kind covers the shape on the current device */
static bool
flash_supported(int kind, int Ha, int Dn, int Dr, int Dv, int R)
{
	return kind >= 2 ? kk_mla_flash_wgmma_supported(kind, Ha, Dn, Dr, Dv, R) != 0 :
		kind == 1 && kk_mla_flash_supported(Ha, Dn, Dr, Dv, R) != 0;
}

/*
 * One sequence's prompt rows: the latent rows gathered, keys and values of
 * every head expanded through kv_b (one GEMM), then the attention: in bf16
 * one flash kernel for the whole step (KL_CUDA_MLA_FLASH, no score buffer),
 * else blocks of queries through cuBLAS over a bounded score buffer.
 */
static void
mla_expanded(kl_backend *be, const kl_step *st, const kl_mla_args *a, int s, float **seq_pages)
{
	cuda_state *cs = CS(be);
	const kl_config *c = be->cfg;
	const cuda_mla_prep *p = a->w->prepared;
	int			Ha = c->mla_heads,
				Dn = c->qk_nope_dim,
				Dr = c->qk_rope_dim,
				Dv = c->v_head_dim,
				R = c->kv_lora_rank,
				Wa = R + Dr,
				Dq = Dn + Dr,
				L = Ha * (Dn + Dv);
	int			r0 = st->row0[s],
				nr = st->row0[s + 1] - r0;
	int64_t		pos0 = st->pos0[s],
				m = pos0 + nr;
	const float *q = a->q + (size_t) r0 * Ha * Dq;
	float	   *out = a->out + (size_t) r0 * Ha * Dv;
	int			nq = 0;
	float	   *lat,
			   *S = NULL,
			   *kvf = NULL;
	uint16_t   *lat16 = NULL,
			   *kv16 = NULL,
			   *q16 = NULL,
			   *P16 = NULL;
	bool		use16 = cs->bf16 && p->bf16;	/* bf16 operands (else fp32, TF32 in bf16 mode) */
	bool		flash = use16 && cs->mla_flash > 0;

	if (m > INT32_MAX / 2)
	{
		cuda_fail(be, KL_E_RESOURCES, "sequence too long for the GPU attention (%lld positions)", (long long) m);
		return;
	}
	lat = cuda_buf(be, CB_MLA_LAT, sizeof(float) * (size_t) m * Wa);
	if (!flash)
	{
		nq = score_rows(Ha, m, nr);
		S = cuda_buf(be, CB_MLA_S, sizeof(float) * (size_t) Ha * nq * m);
	}
	if (!lat || (!flash && !S))
		return;
	kk_mla_gather(cs->stream, lat, m, Wa, seq_pages, cs->mla_c16);
	if (!cuda_launched(be, "mla_gather"))
		return;

	/* keys and values of every head: KV [m, Ha*(Dn+Dv)] = C kv_b^T */
	if (use16)
	{
		lat16 = cuda_buf(be, CB_MLA_LAT16, sizeof(uint16_t) * (size_t) m * Wa);
		kv16 = cuda_buf(be, CB_MLA_KV, sizeof(uint16_t) * (size_t) m * L);
		q16 = cuda_buf(be, CB_MLA_Q16, sizeof(uint16_t) * (size_t) nr * Ha * Dq);
		if (!flash)
			P16 = cuda_buf(be, CB_MLA_P16, sizeof(uint16_t) * (size_t) Ha * nq * m);
		if (!lat16 || !kv16 || !q16 || (!flash && !P16))
			return;
		cuda_to_bf16(be, lat16, Wa, lat, Wa, (int) m, Wa);
		cuda_to_bf16(be, q16, Ha * Dq, q, Ha * Dq, nr, Ha * Dq);
		if (!cuda_launched(be, "f32_to_bf16") || !cuda_gemm_bf16_out(be, kv16, L, lat16, Wa, (int) m, p->kv_b, L, R))
			return;
		if (flash)
		{
			int			rc = flash_launch(cs->stream, cs->mla_flash, nr, pos0, Ha, Dn, Dr, Dv, R, q16, kv16,
										  lat16, out);

			/* (-1: a buffer not 16-byte aligned, which cuda_buf never returns) */
			if (rc != 0)
				cuda_fail(be, KL_E_INTERNAL, "mla_flash: not launched (%d)", rc);
			else
				cuda_launched(be, "mla_flash");
			return;
		}
		attend_blas16(be, Ha, Dn, Dr, Dv, R, nr, pos0, nq, q16, kv16, lat16, S, P16, out);
	}
	else
	{
		kl_weight	view = {0};

		view.dtype = p->bf16 ? KL_DT_BF16 : KL_DT_F32;
		view.rows = L;
		view.cols = R;
		view.dev = (void *) p->kv_b;
		kvf = cuda_buf(be, CB_MLA_KV, sizeof(float) * (size_t) m * L);
		if (!kvf)
			return;
		cuda_matmul_raw(be, kvf, L, lat, Wa, (int) m, &view);
		if (be->failed)
			return;
		attend_blas32(be, Ha, Dn, Dr, Dv, R, nr, pos0, nq, q, kvf, lat, S, out);
	}
}

/* ------------------------------------------------------------------ test and benchmark hooks */

/*
 * For test/engine/test_cuda.c only (found with dlsym): the flash kernel of
 * `kind` (1 kk_mla_flash, 2 or 3 kk_mla_flash_wgmma with that many
 * warpgroups) on host inputs, on the current device, its own stream.
 * q16 [nr, Ha (Dn + Dr)], kv16 [m, Ha (Dn + Dv)], lat16 [m, R + Dr] (bf16
 * bits), m = pos0 + nr;
 * out [nr, Ha Dv] copied back.  Returns 0, -1 when the kernel does not
 * cover the shape, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_mla_flash(int kind, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R, const uint16_t *q16,
					   const uint16_t *kv16, const uint16_t *lat16, float *out)
{
	enum
	{
		Q, KV, LAT, OUT, NBUF
	};
	size_t		m = (size_t) (pos0 + nr);
	size_t		sz[NBUF] = {sizeof(uint16_t) * (size_t) nr * Ha * (Dn + Dr), sizeof(uint16_t) * m * Ha * (Dn + Dv),
							sizeof(uint16_t) * m * (R + Dr), sizeof(float) * (size_t) nr * Ha * Dv};
	const void *in[NBUF] = {q16, kv16, lat16, NULL};
	void	   *host_out[1] = {out};
	int			dev_of[1] = {OUT};
	void	   *d[NBUF] = {NULL};
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc;

	if (!flash_supported(kind, Ha, Dn, Dr, Dv, R))
		return -1;
	/* out: 0xff bytes (NaN) where the kernel does not write */
	rc = hook_open_fill(&s, d, sz, in, NBUF, 0xff);
	if (rc == 0)
	{
		rc = flash_launch(s, kind, nr, pos0, Ha, Dn, Dr, Dv, R, d[Q], d[KV], d[LAT], d[OUT]);
		if (rc == 0 && (e = cudaGetLastError()) != cudaSuccess)
			rc = (int) e;
	}
	return hook_close(s, d, sz, NBUF, dev_of, host_out, 1, rc);
}

/*
 * For test/engine/test_cuda.c and bench/bench_cuda.c (found with dlsym; the
 * backend does not use it): the decode attention of n tokens through
 * `variant` (0 .. 2 as KL_CUDA_MLA_MMA, the bf16 cache) on a stream of its
 * own, the key ranges split as the backend splits them (with the
 * environment's KL_CUDA_MLA_WG_SPLIT, _PF and _DUAL, read at each call:
 * cuda_mla_wg_read); merge 0 merges
 * them with kk_mla_merge, 1 with kk_mla_merge_wide, -1 as the backend's
 * default does (merge_wide); early: kk_mla_decode_args' early and qabs16
 * as the backend sets them by default (variant 2: the keys below each
 * token's position requested before the kernel's wait, the inputs complete
 * before the first launch; Qabs rounded to bf16 on the device first).
 * Token t is sequence t at position ctx[t] - 1 (its row the step's new
 * one) over page_cap pages of its own.  Host inputs qabs [n][Ha][R + Dr] fp32 and
 * cache [n][page_cap KK_MLA_PAGE][R + Dr] bf16 (either NULL: random on the
 * device); olat [n][Ha][R] is copied back where not NULL.  reps > 0: then
 * reps launches of the stage (attend and merge) recorded as one CUDA graph,
 * replayed twice; *us = the second replay's time per launch (CUDA events).
 * The scale is the 48B shape's, 1 / sqrt(192).  Returns 0, -1 where the
 * variant does not take the shape, or a CUDA error.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_mla_decode(int variant, int merge, int early, int n, int Ha, int R, int Dr, const int *ctx,
						int page_cap, const float *qabs, const uint16_t *cache, float *olat, int reps, double *us)
{
	enum
	{
		Q, CACHE, PAGES, ROWSEQ, ROW0, POS0, ABS, PACC, PML, OLAT, Q16, NBUF
	};
	int			Wa = R + Dr,
				sm_count = 0,
				dev = 0;
	int64_t		max_keys = (int64_t) page_cap * KK_MLA_PAGE;
	size_t		rows = (size_t) n * page_cap * KK_MLA_PAGE;
	kk_mla_decode_args a = {0};
	int		   *ints = malloc(sizeof(int) * 3 * (size_t) (n > 0 ? n : 1));
	int64_t    *pos0 = malloc(sizeof(int64_t) * (size_t) (n > 0 ? n : 1));
	void	  **pages = malloc(sizeof(void *) * (size_t) (n > 0 ? n : 1) * page_cap);
	size_t		sz[NBUF];
	const void *in[NBUF];
	void	   *d[NBUF] = {NULL};
	int			dev_of[1] = {OLAT};
	void	   *host_out[1] = {olat};
	cudaStream_t s = NULL;
	cudaGraph_t g = NULL;
	cudaGraphExec_t ge = NULL;
	cudaEvent_t e0 = NULL,
				e1 = NULL;
	cuda_mla_wg wo;
	bool		wide;
	int			rc;

	if (!ints || !pos0 || !pages || n < 1 || page_cap < 1 || variant < 0 || variant > 2 ||
		cuda_mla_decode_variant(variant, true, Ha, R, Dr) != variant)
	{
		free(ints);
		free(pos0);
		free(pages);
		return ints && pos0 && pages ? -1 : (int) cudaErrorMemoryAllocation;
	}
	cudaGetDevice(&dev);
	cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev);
	wide = merge < 0 ? merge_wide(true, n, Ha, sm_count) : merge == 1;
	a.n_tokens = n;
	a.Ha = Ha;
	a.R = R;
	a.Dr = Dr;
	a.scale = 1.0f / sqrtf(192.0f);
	cuda_mla_wg_read(&wo);
	a.split_keys = decode_split(variant, &wo, max_keys, n, sm_count, &a.wg_dual);
	a.wg_pf = wo.pf;
	/* (sweeps: KL_TEST_MLA_RANGE_KEYS=N keys a range, a multiple of 64: under KL_CUDA_MLA_WG_DUAL a warpgroup's
	 * where the rule's block has 2 tiles or more) */
	if (getenv("KL_TEST_MLA_RANGE_KEYS") && atoi(getenv("KL_TEST_MLA_RANGE_KEYS")) >= 64)
		a.split_keys = atoi(getenv("KL_TEST_MLA_RANGE_KEYS")) / 64 * 64;
	a.max_splits = (int) ((max_keys + a.split_keys - 1) / a.split_keys);
	a.page_cap = page_cap;
	for (int t = 0; t < n; t++)
	{
		ints[t] = t;			/* row_seq */
		ints[n + t] = t;		/* row0 */
		ints[2 * n + t] = 1;	/* absorbed */
		pos0[t] = ctx[t] - 1;
	}
	sz[Q] = sizeof(float) * (size_t) n * Ha * Wa;
	sz[CACHE] = sizeof(uint16_t) * rows * Wa;
	sz[PAGES] = sizeof(void *) * (size_t) n * page_cap;
	sz[ROWSEQ] = sz[ROW0] = sz[ABS] = sizeof(int) * (size_t) n;
	sz[POS0] = sizeof(int64_t) * (size_t) n;
	sz[PACC] = sizeof(float) * (size_t) n * a.max_splits * Ha * R;
	sz[PML] = sizeof(float) * 2 * (size_t) n * a.max_splits * Ha;
	sz[OLAT] = sizeof(float) * (size_t) n * Ha * R;
	sz[Q16] = sizeof(uint16_t) * (size_t) n * Ha * Wa;
	in[Q16] = NULL;
	in[Q] = qabs;
	in[CACHE] = cache;
	in[PAGES] = NULL;
	in[ROWSEQ] = ints;
	in[ROW0] = ints + n;
	in[ABS] = ints + 2 * n;
	in[POS0] = pos0;
	in[PACC] = in[PML] = in[OLAT] = NULL;
	rc = hook_open_fill(&s, d, sz, in, NBUF, 0);
	if (rc == 0)
	{
		for (size_t i = 0; i < (size_t) n * page_cap; i++)
			pages[i] = (uint16_t *) d[CACHE] + i * KK_MLA_PAGE * Wa;
		rc = (int) cudaMemcpyAsync(d[PAGES], pages, sz[PAGES], cudaMemcpyHostToDevice, s);
		if (!qabs)
			kk_fill_random(s, d[Q], 0, sz[Q] / sizeof(float), 81, 1.0f);
		if (!cache)
			kk_fill_random(s, d[CACHE], 1, rows * Wa, 82, 1.0f);
	}
	a.qabs = d[Q];
	a.pages = d[PAGES];
	a.row_seq = d[ROWSEQ];
	a.row0 = d[ROW0];
	a.absorbed = d[ABS];
	a.pos0 = d[POS0];
	a.part_acc = d[PACC];
	a.part_ml = d[PML];
	a.olat = d[OLAT];
	a.early = early;
	a.qabs16 = early ? d[Q16] : NULL;
	/* (early: the attention reads the cache before its wait, so the fill must be complete: kernels.h) */
	if (rc == 0 && early)
	{
		kk_f32_to_bf16(s, d[Q16], Wa, d[Q], Wa, n * Ha, Wa);
		rc = (int) cudaStreamSynchronize(s);
	}
	if (rc == 0)
		rc = decode_attend(s, variant, 1, wide, &a);
	if (rc == 0 && reps > 0)
	{
		float		ms = 0;

		if ((rc = (int) cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal)) == 0)
		{
			for (int r = 0; r < reps && rc == 0; r++)
				rc = decode_attend(s, variant, 1, wide, &a);
			if (cudaStreamEndCapture(s, &g) != cudaSuccess && rc == 0)
				rc = (int) cudaErrorStreamCaptureInvalidated;
		}
		/* the first replay warms up; the second is timed */
		if (rc == 0)
			rc = (int) cudaGraphInstantiate(&ge, g, 0);
		if (rc == 0 && (rc = (int) cudaEventCreate(&e0)) == 0 && (rc = (int) cudaEventCreate(&e1)) == 0 &&
			(rc = (int) cudaGraphLaunch(ge, s)) == 0 && (rc = (int) cudaEventRecord(e0, s)) == 0 &&
			(rc = (int) cudaGraphLaunch(ge, s)) == 0 && (rc = (int) cudaEventRecord(e1, s)) == 0 &&
			(rc = (int) cudaEventSynchronize(e1)) == 0)
			rc = (int) cudaEventElapsedTime(&ms, e0, e1);
		if (rc == 0)
			*us = 1e3 * ms / reps;
	}
	if (ge)
		cudaGraphExecDestroy(ge);
	if (g)
		cudaGraphDestroy(g);
	if (e0)
		cudaEventDestroy(e0);
	if (e1)
		cudaEventDestroy(e1);
	rc = hook_close(s, d, sz, NBUF, dev_of, host_out, olat ? 1 : 0, rc);
	free(ints);
	free(pos0);
	free(pages);
	return rc;
}

static int
cmp_ms(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return x < y ? -1 : x > y;
}

/*
 * For bench/bench_cuda.c (`bench_cuda mla`, found with dlsym): the bf16
 * prefill attention alone for one sequence of T tokens from position 0 on
 * be's stream: random bf16 q16, kv16, lat16 made on the device, then the
 * flash kernel of kind `flash` (1 mma.sync, 2 or 3 wgmma warpgroups, as
 * KL_CUDA_MLA_FLASH) or the cuBLAS path of KL_CUDA_MLA_FLASH=0 (score
 * blocks as mla_expanded sizes them), once to warm up, then reps times;
 * *ms = the median (CUDA events).  Returns 0, -1 when the flash kernel
 * does not cover the shape, or a CUDA error code (be->failed for cuBLAS).
 */
__attribute__((visibility("default"))) int
kl_cuda_bench_mla(kl_backend *be, int T, int Ha, int Dn, int Dr, int Dv, int R, int flash, int reps, double *ms)
{
	cuda_state *cs = CS(be);
	size_t		nq16 = (size_t) T * Ha * (Dn + Dr),
				nkv = (size_t) T * Ha * (Dn + Dv),
				nlat = (size_t) T * (R + Dr);
	uint16_t   *q16 = NULL,
			   *kv16 = NULL,
			   *lat16 = NULL,
			   *P16 = NULL;
	float	   *out = NULL,
			   *S = NULL;
	double	   *times = calloc((size_t) (reps > 0 ? reps : 1), sizeof(double));
	cudaEvent_t e0 = NULL,
				e1 = NULL;
	cudaError_t e = cudaSuccess;
	int			nq = score_rows(Ha, T, T),
				rc = 0;

	if (!times)
		return (int) cudaErrorMemoryAllocation;
	if (flash && !flash_supported(flash, Ha, Dn, Dr, Dv, R))
	{
		free(times);
		return -1;
	}
	if ((e = cudaMalloc((void **) &q16, sizeof(uint16_t) * nq16)) != cudaSuccess ||
		(e = cudaMalloc((void **) &kv16, sizeof(uint16_t) * nkv)) != cudaSuccess ||
		(e = cudaMalloc((void **) &lat16, sizeof(uint16_t) * nlat)) != cudaSuccess ||
		(e = cudaMalloc((void **) &out, sizeof(float) * (size_t) T * Ha * Dv)) != cudaSuccess ||
		(!flash && (e = cudaMalloc((void **) &S, sizeof(float) * (size_t) Ha * nq * T)) != cudaSuccess) ||
		(!flash && (e = cudaMalloc((void **) &P16, sizeof(uint16_t) * (size_t) Ha * nq * T)) != cudaSuccess) ||
		(e = cudaEventCreate(&e0)) != cudaSuccess || (e = cudaEventCreate(&e1)) != cudaSuccess)
		rc = (int) e;
	if (rc == 0)
	{
		kk_fill_random(cs->stream, q16, 1, nq16, 71, 1.0f);
		kk_fill_random(cs->stream, kv16, 1, nkv, 72, 1.0f);
		kk_fill_random(cs->stream, lat16, 1, nlat, 73, 1.0f);
	}
	for (int r = -1; r < reps && rc == 0 && !be->failed; r++)
	{
		float		t = 0;

		cudaEventRecord(e0, cs->stream);
		if (flash)
			rc = flash_launch(cs->stream, flash, T, 0, Ha, Dn, Dr, Dv, R, q16, kv16, lat16, out);
		else
			attend_blas16(be, Ha, Dn, Dr, Dv, R, T, 0, nq, q16, kv16, lat16, S, P16, out);
		cudaEventRecord(e1, cs->stream);
		if (rc == 0 && ((e = cudaEventSynchronize(e1)) != cudaSuccess || (e = cudaGetLastError()) != cudaSuccess ||
						(e = cudaEventElapsedTime(&t, e0, e1)) != cudaSuccess))
			rc = (int) e;
		if (r >= 0)
			times[r] = t;
	}
	if (rc == 0 && !be->failed && reps > 0)
	{
		qsort(times, (size_t) reps, sizeof(double), cmp_ms);
		*ms = times[reps / 2];
	}
	cudaStreamSynchronize(cs->stream);
	cudaFree(q16);
	cudaFree(kv16);
	cudaFree(lat16);
	cudaFree(out);
	cudaFree(S);
	cudaFree(P16);
	if (e0)
		cudaEventDestroy(e0);
	if (e1)
		cudaEventDestroy(e1);
	free(times);
	return rc;
}

/* ------------------------------------------------------------------ the op */

void
cuda_mla(kl_backend *be, const kl_step *st, const kl_mla_args *a)
{
	cuda_state *cs = CS(be);
	float	  **pages = cs->d_pages + (size_t) a->mla_index * cs->n_seqs * cs->page_cap;

	if (cuda_step_skip(be, OP_MLA, (uintptr_t) a->q, (uintptr_t) a->kv, (uintptr_t) a->out,
					   (uintptr_t) a->mla_index))
		return;
	/* (the new rows go into the cache first: in mla_absorbed, folded into its absorb kernel where it can) */
	if (cs->any_absorbed)
		mla_absorbed(be, st, a, pages);
	else if (!append_rows(be, st, a, pages))
		return;
	if (cs->any_expanded)
		for (int s = 0; s < st->n_seqs && !be->failed; s++)
			if (!cs->h_absorbed[s])
				mla_expanded(be, st, a, s, pages + (size_t) s * cs->page_cap);
}
