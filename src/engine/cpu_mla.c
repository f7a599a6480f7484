/*
 * cpu_mla.c — multi-head latent attention on the CPU, in the absorbed form.
 *
 * The cache keeps one row per position: the normalized latent c [R] and the
 * shared k_pe [Dr].  Keys and values are never expanded: with W_uk_h and W_uv_h
 * the head-h blocks of kv_b_proj,
 *
 *     q_nope . (W_uk_h c_s)  =  (W_uk_h^T q_nope) . c_s
 *     sum_s p_s W_uv_h c_s   =  W_uv_h (sum_s p_s c_s)
 *
 * so every head attends over the same rows [c_s, k_pe_s] with the query
 * [W_uk_h^T q_nope, q_pe]: multi-query attention over R+Dr numbers a key.
 * The (token, head) query rows of a sequence are processed in blocks against
 * the cache pages with an online softmax (no n x n matrix); long key ranges
 * are split too and the partial softmax sums merged.
 *
 * Long prompts take the expanded form instead: with many queries per key it is
 * cheaper to expand each key and value once per step (k_nope = W_uk c, v = W_uv c,
 * per head) and attend over Dn + Dr numbers per pair, then Dv, instead of the
 * absorbed R + Dr and R (per pair 2(Dn+Dr) + 2Dv FLOPs instead of 2(R+Dr) + 2R:
 * 1.8 times fewer for the bundled model, 3.4 times for the 48B shape).  Which
 * form a sequence takes depends only on its own rows, never on the batch.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"
#include "threadpool.h"

#define BLOCK_ROWS 64			/* query rows per task */
#define SPLIT_KEYS 2048			/* keys per task: long contexts split into parts of this many */
#define FEW_ROWS 16				/* query blocks this small use the decode kernels (simd.c) */
#define EXPAND_MIN_ROWS 64		/* a sequence feeding this many tokens takes the expanded form */
#define EXPAND_KEY_BLOCK 512	/* keys per block in the expanded form (divides KL_MLA_PAGE) */
#define EXPAND_MAX_BYTES ((size_t) 1 << 30)	/* expanded keys and values of one step, at most */

/* fp32 copy of kv_b: absorbed attention multiplies by W_uk^T, which the GEMV
 * kernels (x W^T only) cannot do on bf16 or quantized data. */
int
cpu_prepare_mla(kl_backend *be, kl_mla_layer *w, kl_err *err)
{
	size_t		n = (size_t) w->kv_b.rows * w->kv_b.cols;
	float	   *f = kl_aligned_alloc(n * sizeof(float), err);

	(void) be;
	if (!f)
		return KL_FAIL;
	if (w->kv_b.q.type != KL_Q_NONE)
		for (int r = 0; r < w->kv_b.rows; r++)
			kl_q_dequant_row(&w->kv_b.q, r, f + (size_t) r * w->kv_b.cols);
	else if (w->kv_b.dtype == KL_DT_BF16)
		kl_simd_get()->bf16_to_f32(f, w->kv_b.dev, n);
	else
		memcpy(f, w->kv_b.dev, n * sizeof(float));
	w->prepared = f;
	return KL_OK;
}

void
cpu_release_mla(kl_backend *be, kl_mla_layer *w)
{
	(void) be;
	free(w->prepared);
	w->prepared = NULL;
}

typedef struct mla_task
{
	int			seq;
	int			b0,
				b1;				/* query rows of the sequence (row = token * Ha + head) */
	int			k0,
				k1;				/* keys (positions) */
	int			part;			/* index of this task's partial result */
} mla_task;

typedef struct mla_job
{
	kl_backend *be;
	const kl_step *st;
	const kl_mla_args *a;
	const kl_config *cfg;
	const float *kv_b;			/* fp32 [Ha*(Dn+Dv), R] */
	float	   *qabs;			/* [n_tokens * Ha, R+Dr] */
	float	   *olat;			/* [n_tokens * Ha, R] */
	mla_task   *tasks;
	int			n_tasks;
	int		   *block_first;	/* per block: first task; tasks of a block are consecutive */
	int		   *block_ntasks;
	int			n_blocks;
	const bool *expanded;		/* [n_seqs]: handled by the expanded form */
	float	   *part_acc;		/* [n_tasks, BLOCK_ROWS, R] */
	float	   *part_m;			/* [n_tasks, BLOCK_ROWS] */
	float	   *part_l;
} mla_job;

/* per (seq, head): absorbed queries [W_uk^T q_nope, q_pe] */
static void
query_task(void *arg, int t, int thread)
{
	mla_job    *j = arg;
	const kl_config *c = j->cfg;
	int			Ha = c->mla_heads,
				Dn = c->qk_nope_dim,
				Dr = c->qk_rope_dim,
				Dv = c->v_head_dim,
				R = c->kv_lora_rank;
	int			si = t / Ha,
				h = t % Ha;
	int			r0 = j->st->row0[si],
				n = j->st->row0[si + 1] - r0;
	int			Wq = Ha * (Dn + Dr),
				Wa = R + Dr;
	const float *q = j->a->q + (size_t) r0 * Wq + (size_t) h * (Dn + Dr);
	float	   *qa = j->qabs + ((size_t) r0 * Ha + h) * Wa;

	(void) thread;
	if (j->expanded[si])
		return;
	cpu_sgemm(false, false, n, R, Dn, 1.0f, q, Wq, j->kv_b + (size_t) h * (Dn + Dv) * R, R,
			  0.0f, qa, Ha * Wa);
	for (int i = 0; i < n; i++)
		memcpy(qa + (size_t) i * Ha * Wa + R, q + (size_t) i * Wq + Dn, sizeof(float) * Dr);
}

/*
 * The online-softmax step shared by both forms: S [nq x kn] holds the scaled
 * scores of nq query rows against keys k0 .. k0+kn-1; query row i sits at
 * position pos(i) = pos_base + (row_off + i) / rows_per_pos and sees keys up
 * to it.  Masks later keys, turns S into exp(score - running max) in place,
 * updates the running max m and sum l, and rescales the rows of acc [nq x dv]
 * whose max moved.  acc += S V is left to the caller.
 */
static void
online_softmax(float *S, int nq, int kn, int64_t k0, int64_t pos_base, int row_off, int rows_per_pos,
			   float *m, float *l, float *acc, int dv)
{
	const kl_simd *simd = kl_simd_get();

	for (int i = 0; i < nq; i++)
	{
		float	   *s = S + (size_t) i * kn;
		int64_t		pos = pos_base + (row_off + i) / rows_per_pos;
		int			nv = pos - k0 + 1 < kn ? (int) (pos - k0 + 1) : kn;
		float		mx = m[i],
					corr;

		if (nv <= 0)
		{
			memset(s, 0, sizeof(float) * kn);
			continue;
		}
		{
			float		bm = simd->vmax(s, nv);

			mx = bm > mx ? bm : mx;
		}
		corr = m[i] == -INFINITY ? 0.0f : expf(m[i] - mx);
		l[i] = l[i] * corr + simd->exp_shift_sum(s, s, mx, nv);
		if (nv < kn)
			memset(s + nv, 0, sizeof(float) * (size_t) (kn - nv));
		if (corr != 1.0f)
			simd->scale(acc + (size_t) i * dv, corr, dv);
		m[i] = mx;
	}
}

/* a block of query rows against keys [k0, k1): partial online softmax */
static void
attend_task(void *arg, int t, int thread)
{
	mla_job    *j = arg;
	const kl_config *c = j->cfg;
	const kl_simd *simd = kl_simd_get();
	const mla_task *tk = &j->tasks[t];
	int			Ha = c->mla_heads,
				R = c->kv_lora_rank,
				Wa = R + c->qk_rope_dim;
	kl_seq	   *seq = j->st->seqs[tk->seq];
	kl_mla_cache *mc = &seq->mla[j->a->mla_index];
	int64_t		pos0 = j->st->pos0[tk->seq];
	int			r0 = j->st->row0[tk->seq];
	int			nr = tk->b1 - tk->b0;
	const float *Q = j->qabs + ((size_t) r0 * Ha + tk->b0) * Wa;
	float	   *acc = j->part_acc + (size_t) tk->part * BLOCK_ROWS * R;
	float	   *m = j->part_m + (size_t) tk->part * BLOCK_ROWS;
	float	   *l = j->part_l + (size_t) tk->part * BLOCK_ROWS;
	float	   *S = cpu_scratch(j->be, SCRATCH_A, thread);
	float		scale = 1.0f / sqrtf((float) (c->qk_nope_dim + c->qk_rope_dim));

	for (int i = 0; i < nr; i++)
	{
		m[i] = -INFINITY;
		l[i] = 0;
	}
	memset(acc, 0, sizeof(float) * (size_t) nr * R);

	for (int kb = tk->k0; kb < tk->k1; kb += KL_MLA_PAGE)
	{
		const float *Kp = mc->pages[kb / KL_MLA_PAGE];
		int			nk = tk->k1 - kb < KL_MLA_PAGE ? tk->k1 - kb : KL_MLA_PAGE;

		if (nr <= FEW_ROWS && simd->few_scores)
			simd->few_scores(S, nk, Q, Wa, nr, Kp, Wa, nk, Wa, scale);
		else
			cpu_sgemm(false, true, nr, nk, Wa, scale, Q, Wa, Kp, Wa, 0.0f, S, nk);
		online_softmax(S, nr, nk, kb, pos0, tk->b0, Ha, m, l, acc, R);
		/* acc += P C, C = the latent part of the key rows */
		cpu_sgemm(false, false, nr, R, nk, 1.0f, S, nk, Kp, Wa, 1.0f, acc, R);
	}
}

/* merge a block's partial results into olat */
static void
merge_task(void *arg, int b, int thread)
{
	mla_job    *j = arg;
	const kl_config *c = j->cfg;
	int			R = c->kv_lora_rank,
				Ha = c->mla_heads;
	int			first = j->block_first[b],
				nt = j->block_ntasks[b];
	const mla_task *t0 = &j->tasks[first];
	int			nr = t0->b1 - t0->b0;
	float	   *out = j->olat + ((size_t) j->st->row0[t0->seq] * Ha + t0->b0) * R;

	(void) thread;
	for (int i = 0; i < nr; i++)
	{
		float		M = -INFINITY,
					L = 0;
		float	   *o = out + (size_t) i * R;

		for (int p = 0; p < nt; p++)
		{
			float		mp = j->part_m[(size_t) (t0->part + p) * BLOCK_ROWS + i];

			M = mp > M ? mp : M;
		}
		memset(o, 0, sizeof(float) * R);
		for (int p = 0; p < nt; p++)
		{
			int			part = t0->part + p;
			float		mp = j->part_m[(size_t) part * BLOCK_ROWS + i];
			float		w;

			if (mp == -INFINITY)
				continue;
			w = expf(mp - M);
			L += w * j->part_l[(size_t) part * BLOCK_ROWS + i];
			kl_simd_get()->axpy(o, w, j->part_acc + ((size_t) part * BLOCK_ROWS + i) * R, R);
		}
		kl_simd_get()->scale(o, 1.0f / L, R);
	}
}

/* per (seq, head): out_h = olat_h W_uv_h^T */
static void
output_task(void *arg, int t, int thread)
{
	mla_job    *j = arg;
	const kl_config *c = j->cfg;
	int			Ha = c->mla_heads,
				Dn = c->qk_nope_dim,
				Dv = c->v_head_dim,
				R = c->kv_lora_rank;
	int			si = t / Ha,
				h = t % Ha;
	int			r0 = j->st->row0[si],
				n = j->st->row0[si + 1] - r0;

	(void) thread;
	if (j->expanded[si])
		return;
	cpu_sgemm(false, true, n, Dv, R, 1.0f, j->olat + ((size_t) r0 * Ha + h) * R, Ha * R,
			  j->kv_b + ((size_t) h * (Dn + Dv) + Dn) * R, R, 0.0f,
			  j->a->out + (size_t) r0 * Ha * Dv + (size_t) h * Dv, Ha * Dv);
}

/* ------------------------------------------------------------------ expanded form */

typedef struct exp_job
{
	kl_backend *be;
	const kl_config *cfg;
	const kl_mla_args *a;
	const kl_mla_cache *mc;
	const float *kv_b;
	int64_t		pos0;			/* positions before the new rows */
	int			n;				/* new rows */
	int			r0;				/* their first row in the step */
	int64_t		m;				/* keys: pos0 + n */
	int			key_blocks;
	float	   *K;				/* [Ha][m][Dn + Dr] */
	float	   *V;				/* [Ha][m][Dv] */
} exp_job;

/* keys and values of one head for one block of positions */
static void
expand_task(void *arg, int t, int thread)
{
	exp_job    *j = arg;
	const kl_config *c = j->cfg;
	int			Dn = c->qk_nope_dim,
				Dr = c->qk_rope_dim,
				Dv = c->v_head_dim,
				R = c->kv_lora_rank,
				Wa = R + Dr,
				Dk = Dn + Dr;
	int			h = t / j->key_blocks;
	int64_t		k0 = (int64_t) (t % j->key_blocks) * EXPAND_KEY_BLOCK;
	int			kn = j->m - k0 < EXPAND_KEY_BLOCK ? (int) (j->m - k0) : EXPAND_KEY_BLOCK;
	const float *C = j->mc->pages[k0 / KL_MLA_PAGE] + (size_t) (k0 % KL_MLA_PAGE) * Wa;
	float	   *K = j->K + ((size_t) h * j->m + k0) * Dk;
	float	   *V = j->V + ((size_t) h * j->m + k0) * Dv;

	(void) thread;
	cpu_sgemm(false, true, kn, Dn, R, 1.0f, C, Wa, j->kv_b + (size_t) h * (Dn + Dv) * R, R, 0.0f, K, Dk);
	cpu_sgemm(false, true, kn, Dv, R, 1.0f, C, Wa, j->kv_b + ((size_t) h * (Dn + Dv) + Dn) * R, R, 0.0f, V, Dv);
	for (int i = 0; i < kn; i++)
		memcpy(K + (size_t) i * Dk + Dn, C + (size_t) i * Wa + R, sizeof(float) * Dr);
}

/* one head, one block of up to BLOCK_ROWS new tokens, over the expanded keys */
static void
expanded_attend_task(void *arg, int t, int thread)
{
	exp_job    *j = arg;
	const kl_config *c = j->cfg;
	int			Ha = c->mla_heads,
				Dn = c->qk_nope_dim,
				Dr = c->qk_rope_dim,
				Dv = c->v_head_dim,
				Dk = Dn + Dr;
	int			q_blocks = (j->n + BLOCK_ROWS - 1) / BLOCK_ROWS;
	int			h = t / q_blocks;
	int			t0 = (t % q_blocks) * BLOCK_ROWS;
	int			nq = j->n - t0 < BLOCK_ROWS ? j->n - t0 : BLOCK_ROWS;
	int64_t		last = j->pos0 + t0 + nq - 1;	/* the block's last query position */
	const float *Q = j->a->q + (size_t) (j->r0 + t0) * Ha * Dk + (size_t) h * Dk;
	float	   *S = cpu_scratch(j->be, SCRATCH_A, thread);
	float	   *acc = cpu_scratch(j->be, SCRATCH_B, thread);
	float	   *m = cpu_scratch(j->be, SCRATCH_C, thread);
	float	   *l = m + BLOCK_ROWS;
	float		scale = 1.0f / sqrtf((float) Dk);

	for (int i = 0; i < nq; i++)
	{
		m[i] = -INFINITY;
		l[i] = 0;
	}
	memset(acc, 0, sizeof(float) * (size_t) nq * Dv);
	for (int64_t k0 = 0; k0 <= last; k0 += EXPAND_KEY_BLOCK)
	{
		int			kn = last + 1 - k0 < EXPAND_KEY_BLOCK ? (int) (last + 1 - k0) : EXPAND_KEY_BLOCK;
		const float *K = j->K + ((size_t) h * j->m + k0) * Dk;
		const float *V = j->V + ((size_t) h * j->m + k0) * Dv;

		cpu_sgemm(false, true, nq, kn, Dk, scale, Q, Ha * Dk, K, Dk, 0.0f, S, kn);
		online_softmax(S, nq, kn, k0, j->pos0 + t0, 0, 1, m, l, acc, Dv);
		cpu_sgemm(false, false, nq, Dv, kn, 1.0f, S, kn, V, Dv, 1.0f, acc, Dv);
	}
	for (int i = 0; i < nq; i++)
	{
		float	   *o = j->a->out + (size_t) (j->r0 + t0 + i) * Ha * Dv + (size_t) h * Dv;

		for (int x = 0; x < Dv; x++)
			o[x] = acc[(size_t) i * Dv + x] / l[i];
	}
}

/* Can sequence s of the step take the expanded form, within the memory bound? */
static bool
use_expanded(const kl_config *c, const kl_step *st, int s)
{
	int			n = st->row0[s + 1] - st->row0[s];
	size_t		keys = (size_t) (st->pos0[s] + n);

	return n >= EXPAND_MIN_ROWS &&
		keys * c->mla_heads * (c->qk_nope_dim + c->qk_rope_dim + c->v_head_dim) * sizeof(float) <= EXPAND_MAX_BYTES;
}

static void
mla_expanded(kl_backend *be, const kl_step *st, const kl_mla_args *a, int s)
{
	const kl_config *c = be->cfg;
	exp_job		j;
	int			Ha = c->mla_heads;
	int			Dv = c->v_head_dim;

	j.be = be;
	j.cfg = c;
	j.a = a;
	j.mc = &st->seqs[s]->mla[a->mla_index];
	j.kv_b = a->w->prepared;
	j.pos0 = st->pos0[s];
	j.r0 = st->row0[s];
	j.n = st->row0[s + 1] - st->row0[s];
	j.m = j.pos0 + j.n;
	j.key_blocks = (int) ((j.m + EXPAND_KEY_BLOCK - 1) / EXPAND_KEY_BLOCK);
	j.K = cpu_buffer(be, BUF_MLA_KEXP, sizeof(float) * (size_t) j.m * Ha * (c->qk_nope_dim + c->qk_rope_dim));
	j.V = cpu_buffer(be, BUF_MLA_VEXP, sizeof(float) * (size_t) j.m * Ha * Dv);
	if (!j.K || !j.V ||
		!cpu_scratch_reserve(be, SCRATCH_A, (size_t) BLOCK_ROWS * EXPAND_KEY_BLOCK) ||
		!cpu_scratch_reserve(be, SCRATCH_B, (size_t) BLOCK_ROWS * Dv) ||
		!cpu_scratch_reserve(be, SCRATCH_C, (size_t) 2 * BLOCK_ROWS))
		return;
	kl_parallel_for(Ha * j.key_blocks, expand_task, &j);
	kl_parallel_for(Ha * ((j.n + BLOCK_ROWS - 1) / BLOCK_ROWS), expanded_attend_task, &j);
}

/* ------------------------------------------------------------------ the op */

void
cpu_mla(kl_backend *be, const kl_step *st, const kl_mla_args *a)
{
	const kl_config *c = be->cfg;
	int			Ha = c->mla_heads,
				R = c->kv_lora_rank,
				Wa = R + c->qk_rope_dim;
	mla_job		j;
	int			total_blocks = 0;

	/* 1. append the new latent rows to the caches */
	for (int s = 0; s < st->n_seqs; s++)
	{
		kl_mla_cache *mc = &st->seqs[s]->mla[a->mla_index];

		for (int r = st->row0[s]; r < st->row0[s + 1]; r++)
		{
			int64_t		pos = st->pos0[s] + (r - st->row0[s]);

			memcpy(mc->pages[pos / KL_MLA_PAGE] + (size_t) (pos % KL_MLA_PAGE) * Wa,
				   a->kv + (size_t) r * Wa, sizeof(float) * Wa);
		}
	}

	/* long prompts: the expanded form, one sequence at a time */
	{
		bool	   *expanded = cpu_buffer(be, BUF_MLA_EXPANDED, sizeof(bool) * (size_t) st->n_seqs);
		bool		all = true;

		if (!expanded)
			return;
		for (int s = 0; s < st->n_seqs; s++)
		{
			expanded[s] = use_expanded(c, st, s);
			if (expanded[s])
				mla_expanded(be, st, a, s);
			else
				all = false;
			if (be->failed)
				return;
		}
		j.expanded = expanded;
		if (all)
			return;
	}

	j.be = be;
	j.st = st;
	j.a = a;
	j.cfg = c;
	j.kv_b = a->w->prepared;
	j.qabs = cpu_buffer(be, BUF_MLA_QABS, sizeof(float) * (size_t) st->n_tokens * Ha * Wa);
	j.olat = cpu_buffer(be, BUF_MLA_OLAT, sizeof(float) * (size_t) st->n_tokens * Ha * R);
	if (!j.qabs || !j.olat || !cpu_scratch_reserve(be, SCRATCH_A, (size_t) BLOCK_ROWS * KL_MLA_PAGE))
		return;

	/* 2. plan: blocks of query rows, long key ranges split */
	for (int s = 0; s < st->n_seqs; s++)
		if (!j.expanded[s])
			total_blocks += ((st->row0[s + 1] - st->row0[s]) * Ha + BLOCK_ROWS - 1) / BLOCK_ROWS;
	{
		int			max_tasks = 0;

		for (int s = 0; s < st->n_seqs; s++)
		{
			int64_t		keys = st->pos0[s] + (st->row0[s + 1] - st->row0[s]);

			max_tasks += ((st->row0[s + 1] - st->row0[s]) * Ha + BLOCK_ROWS - 1) / BLOCK_ROWS *
				(int) ((keys + SPLIT_KEYS - 1) / SPLIT_KEYS);
		}
		j.tasks = cpu_buffer(be, BUF_MLA_TASKS, sizeof(mla_task) * (size_t) max_tasks);
		j.block_first = cpu_buffer(be, BUF_MLA_BLOCKS, sizeof(int) * 2 * (size_t) total_blocks);
		if (!j.tasks || !j.block_first)
			return;
		j.block_ntasks = j.block_first + total_blocks;
	}
	j.n_tasks = 0;
	j.n_blocks = 0;
	for (int s = 0; s < st->n_seqs; s++)
	{
		int			rows = (st->row0[s + 1] - st->row0[s]) * Ha;

		if (j.expanded[s])
			continue;
		for (int b0 = 0; b0 < rows; b0 += BLOCK_ROWS)
		{
			int			b1 = b0 + BLOCK_ROWS < rows ? b0 + BLOCK_ROWS : rows;
			int			keys = (int) (st->pos0[s] + (b1 - 1) / Ha + 1);	/* causal limit of the block */

			/*
			 * Long key ranges are split in fixed-size parts whose softmax sums
			 * are merged: decided by the block alone, never by the rest of the
			 * batch, so a sequence's result does not depend on its neighbours.
			 */
			int			split = (keys + SPLIT_KEYS - 1) / SPLIT_KEYS;

			j.block_first[j.n_blocks] = j.n_tasks;
			j.block_ntasks[j.n_blocks] = split;
			j.n_blocks++;
			for (int p = 0; p < split; p++)
			{
				/* page-aligned key ranges */
				int			pages = (keys + KL_MLA_PAGE - 1) / KL_MLA_PAGE;
				int			pg0 = (int) ((int64_t) pages * p / split);
				int			pg1 = (int) ((int64_t) pages * (p + 1) / split);
				mla_task   *t = &j.tasks[j.n_tasks];

				t->seq = s;
				t->b0 = b0;
				t->b1 = b1;
				t->k0 = pg0 * KL_MLA_PAGE;
				t->k1 = pg1 * KL_MLA_PAGE < keys ? pg1 * KL_MLA_PAGE : keys;
				t->part = j.n_tasks;
				j.n_tasks++;
			}
		}
	}
	j.part_acc = cpu_buffer(be, BUF_MLA_ACC, sizeof(float) * (size_t) j.n_tasks * BLOCK_ROWS * R);
	j.part_m = cpu_buffer(be, BUF_MLA_M, sizeof(float) * (size_t) j.n_tasks * BLOCK_ROWS);
	j.part_l = cpu_buffer(be, BUF_MLA_L, sizeof(float) * (size_t) j.n_tasks * BLOCK_ROWS);
	if (!j.part_acc || !j.part_m || !j.part_l)
		return;

	/* 3. queries, attention, merge, output projection */
	kl_parallel_for(st->n_seqs * Ha, query_task, &j);
	kl_parallel_for(j.n_tasks, attend_task, &j);
	kl_parallel_for(j.n_blocks, merge_task, &j);
	kl_parallel_for(st->n_seqs * Ha, output_task, &j);
}
