/*
 * cuda_kda.c — the KDA mixer op on the GPU (kernels/kda.cu has the kernels
 * and the math).  One step:
 *   prep (conv + silu, norms, decay, beta) over all rows, then the new conv
 *   tails; the per-token recurrence for every sequence with few rows (one
 *   launch for the whole batch: decode); the chunkwise form for each sequence
 *   with more; the gated RMSNorm over all rows into the output.
 * In precision bf16 the chunkwise form runs on tensor cores
 * (kk_kda_chunked_mma; KL_CUDA_KDA_MMA=0: the fp32 kernels).
 * Like the CPU backend, sequences of up to 16 rows take the recurrence
 * (unless the step forces it for all).
 * A decode step (one row per sequence) runs all of it in one kernel,
 * kk_kda_decode, with the same outputs bit for bit (KL_CUDA_KDA_FUSED=0: the
 * three kernels; =N: one kernel for steps of up to N sequences), by default
 * in the form that reads the state and conv tails while the products before
 * it finish (KL_CUDA_KDA_DEC_EARLY=0: after them; kernels/kda.cu).
 * bf16 (precision bf16, prefill; cuda_state.r16): where the products kept
 * q, k, v and f in bf16 only (KL_CUDA_KDA_IN16), the rows prep and the
 * conv tails read those; where every sequence takes the chunkwise form on
 * tensor cores, the rows prep can write the prepared q, k, v in bf16 only
 * (KL_CUDA_KDA_OUT16=1, opt-in) for kk_kda_chunked_mma16.  Every path that cannot
 * read a kept result (decode, the fused prep =4, the block prep kernel)
 * widens it back into its fp32 buffer first, and the gate is widened before
 * the gated norm.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define RECURRENT_MAX 16

/*
 * A chunked launcher's return code rc for one sequence (kk_kda_chunked*:
 * 0 launched, -1 / -2 head size not covered, else a CUDA error): true when
 * the launch went out; otherwise the backend has failed with the reason.
 */
static bool
chunked_launched(kl_backend *be, int rc, int K, const char *what)
{
	if (rc == -1 || rc == -2)
	{
		cuda_fail(be, KL_E_UNSUPPORTED, "KDA head size %d is not supported on the GPU", K);
		return false;
	}
	if (rc != 0)
		return cuda_ok(be, (cudaError_t) rc, what);
	return cuda_launched(be, what);
}

/*
 * The op's last stage: the gated RMSNorm of o (n rows) into a->out, with
 * the bf16 twin o_proj reads (KL_CUDA_BF16_TWIN) where one is kept.
 */
static void
cuda_kda_gated_norm(kl_backend *be, const kl_kda_args *a, int n, const float *o)
{
	cuda_state *cs = CS(be);
	const kl_config *cfg = be->cfg;
	int			H = cfg->kda_heads,
				K = cfg->kda_head_dim,
				HK = H * K;
	uint16_t   *o16 = cuda_twin_out(be, n, HK);

	if (be->failed)
		return;
	/* the gate kept in bf16 (KL_CUDA_KDA_IN16 bit 2, opt-in) is widened here: the gated norm reads fp32
	 * (a norm reading a bf16 gate was part of the reverted O16 work, commit 82fb674) */
	cuda_r16_widen(be, a->gate);
	kk_kda_gated_norm_twin(cs->stream, n, H, K, o, a->gate, a->w->o_norm, cfg->rms_norm_eps, a->out, o16);
	if (cuda_launched(be, "kda_gated_norm") && o16)
		cuda_twin_set(cs, a->out, HK, n, HK, o16, false);
}

/*
 * A prefill step whose every sequence takes the chunkwise form on tensor
 * cores, with KL_CUDA_KDA_PREP_MMA=4 (kk_kda_prep_fused_ok): the elementwise
 * prep runs inside the chunk prep (kk_kda_chunked_mma_fused, a sequence at a
 * time, reading the raw projections and the conv tails before the step), so
 * kda_prep's q, k, v, g, beta buffers are neither written nor read and f is
 * left as it came.  The new conv tails (kk_kda_tails: the raw inputs) are
 * written after the last chunked call, which read the old ones; then the
 * gated norm as in cuda_kda.  Steps with a sequence of few rows keep
 * cuda_kda's path (the recurrence reads kda_prep's buffers).
 */
static void
cuda_kda_fused(kl_backend *be, const kl_step *st, const kl_kda_args *a)
{
	cuda_state *cs = CS(be);
	const kl_config *cfg = be->cfg;
	const kl_kda_layer *w = a->w;
	int			H = cfg->kda_heads,
				K = cfg->kda_head_dim,
				W = cfg->conv_kernel,
				HK = H * K;
	int			n = st->n_tokens,
				ns = st->n_seqs;
	int			longest = 0;
	float	   *o,
			   *scratch;
	float	  **conv_tab = cs->d_kda_conv + (size_t) a->kda_index * ns;

	for (int s = 0; s < ns; s++)
		if (st->row0[s + 1] - st->row0[s] > longest)
			longest = st->row0[s + 1] - st->row0[s];
	o = cuda_buf(be, CB_KDA_O, sizeof(float) * (size_t) n * HK);
	scratch = cuda_buf(be, CB_KDA_CHUNK, kk_kda_chunk_mma_scratch(longest, H, K));
	if (!o || !scratch)
		return;
	for (int s = 0; s < ns; s++)
	{
		int			r0 = st->row0[s],
					ni = st->row0[s + 1] - r0;
		size_t		ro = (size_t) r0 * HK;
		int			rc = kk_kda_chunked_mma_fused(cs->stream, ni, H, K, W, a->q + ro, a->k + ro, a->v + ro,
												  a->f + ro, a->b + (size_t) r0 * H, w->conv_q, w->conv_k,
												  w->conv_v, w->A_log, w->dt_bias, conv_tab + s,
												  st->seqs[s]->kda_S[a->kda_index], o + ro, scratch);

		if (!chunked_launched(be, rc, K, "kda_chunked_fused"))
			return;
	}
	kk_kda_tails(cs->stream, ns, HK, W, a->q, a->k, a->v, cs->d_row0, conv_tab);
	if (!cuda_launched(be, "kda_tails"))
		return;
	cuda_kda_gated_norm(be, a, n, o);
}

/*
 * The op's q, k, v, f kept in bf16 by their products (cuda_state.r16):
 * read (true: the records are dropped, the op has consumed them; the fp32
 * buffers are the op's to overwrite, as f is with g) or to be read in fp32
 * (false: widened back first).  The gate's record is left to the norm.
 */
static void
kda_r16_settle(kl_backend *be, const kl_kda_args *a, bool read16)
{
	const float *in[4] = {a->q, a->k, a->v, a->f};

	for (int i = 0; i < 4; i++)
		if (read16)
			cuda_r16_drop(CS(be), in[i]);
		else
			cuda_r16_widen(be, in[i]);
}

void
cuda_kda(kl_backend *be, const kl_step *st, const kl_kda_args *a)
{
	cuda_state *cs = CS(be);
	const kl_config *cfg = be->cfg;
	const kl_kda_layer *w = a->w;
	int			H = cfg->kda_heads,
				K = cfg->kda_head_dim,
				W = cfg->conv_kernel,
				HK = H * K;
	int			n = st->n_tokens,
				ns = st->n_seqs;
	int			max_rows = st->force_recurrent ? INT_MAX : RECURRENT_MAX;
	int			longest = 0;
	float	   *qo,
			   *ko,
			   *vo,
			   *beta,
			   *o,
			   *scratch = NULL;
	float	  **S_tab = cs->d_kda_S + (size_t) a->kda_index * ns;
	float	  **conv_tab = cs->d_kda_conv + (size_t) a->kda_index * ns;
	const uint16_t *q16,
			   *k16,
			   *v16,
			   *f16;
	bool		all_long = true,
				in16,
				out16;

	if (cuda_step_skip(be, OP_KDA, (uintptr_t) a->q, (uintptr_t) a->out, (uintptr_t) w, (uintptr_t) a->kda_index))
		return;
	/* the products' bf16 results (KL_CUDA_KDA_IN16; NULL: in fp32 as usual) */
	q16 = cuda_r16_find(cs, a->q, n, HK);
	k16 = cuda_r16_find(cs, a->k, n, HK);
	v16 = cuda_r16_find(cs, a->v, n, HK);
	f16 = cuda_r16_find(cs, a->f, n, HK);
	for (int s = 0; s < ns; s++)
		if (st->row0[s + 1] - st->row0[s] <= max_rows)
			all_long = false;
	/* bf16 raw inputs: the rows prep (prefill) reads them; the decode
	 * kernels and the fused prep (=4) widen them first */
	in16 = q16 && k16 && v16 && f16 && n != ns && !(cs->kda_mma && kk_kda_prep_fused_ok(K, W) && all_long);
	/* bf16 prepared q, k, v: only the tensor-core chunkwise form reads them
	 * (kk_kda_chunked_mma16: K = 128), so every sequence must take it */
	out16 = cs->kda_out16 && cs->kda_mma && K == 128 && all_long && n != ns;
	if (!in16)
		kda_r16_settle(be, a, false);
	if (n == ns && ns <= cs->kda_fused_max)
	{
		int			rc;
		/* o_proj's bf16 twin, where its dense FP8 product reads one (KL_CUDA_Q_TWIN; cuda_twin_out) */
		uint16_t   *o16 = cuda_twin_out(be, n, HK);

		if (be->failed)
			return;
		cuda_r16_widen(be, a->gate);
		rc = kk_kda_decode_twin(cs->stream, ns, H, K, W, a->q, a->k, a->v, a->f, a->b, a->gate, w->conv_q,
								w->conv_k, w->conv_v, w->A_log, w->dt_bias, w->o_norm, cfg->rms_norm_eps,
								cs->d_row0, S_tab, conv_tab, cs->kda_round16, a->out, o16, cs->kda_dec_early);
		if (rc == 0)
		{
			if (cuda_launched(be, "kda_decode") && o16)
				cuda_twin_set(cs, a->out, HK, n, HK, o16, false);
			return;
		}
		/* refused (a launch configuration this GPU or driver does not take): the three kernels from now on */
		cudaGetLastError();
		cs->kda_fused_max = 0;
	}
	if (cs->kda_mma && kk_kda_prep_fused_ok(K, W) && all_long)
	{
		cuda_kda_fused(be, st, a);
		return;
	}
	qo = cuda_buf(be, CB_KDA_Q, sizeof(float) * (size_t) n * HK);
	ko = cuda_buf(be, CB_KDA_K, sizeof(float) * (size_t) n * HK);
	vo = cuda_buf(be, CB_KDA_V, sizeof(float) * (size_t) n * HK);
	o = cuda_buf(be, CB_KDA_O, sizeof(float) * (size_t) n * HK);
	beta = cuda_buf(be, CB_KDA_BETA, sizeof(float) * (size_t) n * H);
	for (int s = 0; s < ns; s++)
		if (st->row0[s + 1] - st->row0[s] > max_rows && st->row0[s + 1] - st->row0[s] > longest)
			longest = st->row0[s + 1] - st->row0[s];
	if (longest > 0)
		scratch = cuda_buf(be, CB_KDA_CHUNK, cs->kda_mma ? kk_kda_chunk_mma_scratch(longest, H, K) :
						   sizeof(float) * kk_kda_chunk_scratch(longest, H, K));
	if (!qo || !ko || !vo || !o || !beta || (longest > 0 && !scratch))
		return;

	/* prefill with a bf16 side: the rows prep of those types (g into f's
	 * fp32 buffer; out16's q, k, v bf16 in the fp32 buffers' room) */
	if ((in16 || out16) &&
		kk_kda_prep_rows16(cs->stream, n, H, K, W, in16, in16 ? (const void *) q16 : a->q,
						   in16 ? (const void *) k16 : a->k, in16 ? (const void *) v16 : a->v,
						   in16 ? (const void *) f16 : a->f, a->f, a->b, out16, qo, ko, vo, beta, w->conv_q,
						   w->conv_k, w->conv_v, w->A_log, w->dt_bias, cs->d_row_seq, cs->d_row0, conv_tab,
						   cs->bf16) != 0)
	{
		/* not covered (head size, conv width, KL_CUDA_KDA_ELEM_WARP): the fp32 path */
		if (in16)
			kda_r16_settle(be, a, false);
		in16 = out16 = false;
	}
	if (in16)
		kda_r16_settle(be, a, true);	/* (q16 .. f16 stay readable: no product runs before the tails) */
	/* decode (one row per sequence): the prep kernel shifts the tails itself */
	if (!in16 && !out16)
		kk_kda_prep(cs->stream, n, H, K, W, a->q, a->k, a->v, a->f, a->b, qo, ko, vo, beta, w->conv_q, w->conv_k,
					w->conv_v, w->A_log, w->dt_bias, cs->d_row_seq, cs->d_row0, conv_tab, n == ns, cs->bf16);
	if (!cuda_launched(be, "kda_prep"))
		return;
	if (n != ns)
	{
		if (in16)
			kk_kda_tails16(cs->stream, ns, HK, W, q16, k16, v16, cs->d_row0, conv_tab);
		else
			kk_kda_tails(cs->stream, ns, HK, W, a->q, a->k, a->v, cs->d_row0, conv_tab);
		if (!cuda_launched(be, "kda_tails"))
			return;
	}
	/* (out16: no sequence takes the recurrence, which reads fp32 q, k, v) */
	if (!out16 && kk_kda_recurrent(cs->stream, ns, H, K, qo, ko, vo, a->f, beta, o, cs->d_row0, S_tab, max_rows,
								   cs->kda_round16) != 0)
	{
		cuda_fail(be, KL_E_UNSUPPORTED, "KDA head size %d is not supported on the GPU", K);
		return;
	}
	if (!out16 && !cuda_launched(be, "kda_recurrent"))
		return;
	for (int s = 0; s < ns; s++)
	{
		int			r0 = st->row0[s],
					ni = st->row0[s + 1] - r0;
		int			rc;

		if (ni <= max_rows)
			continue;
		/* precision bf16: tensor cores (kda_chunk_mma.cu); else the fp32 kernels */
		if (out16)
			rc = kk_kda_chunked_mma16(cs->stream, ni, H, K, (const uint16_t *) qo + (size_t) r0 * HK,
									  (const uint16_t *) ko + (size_t) r0 * HK,
									  (const uint16_t *) vo + (size_t) r0 * HK, a->f + (size_t) r0 * HK,
									  beta + (size_t) r0 * H, st->seqs[s]->kda_S[a->kda_index],
									  o + (size_t) r0 * HK, scratch);
		else if (cs->kda_mma)
			rc = kk_kda_chunked_mma(cs->stream, ni, H, K, qo + (size_t) r0 * HK, ko + (size_t) r0 * HK,
									vo + (size_t) r0 * HK, a->f + (size_t) r0 * HK, beta + (size_t) r0 * H,
									st->seqs[s]->kda_S[a->kda_index], o + (size_t) r0 * HK, scratch);
		else
			rc = kk_kda_chunked(cs->stream, ni, H, K, qo + (size_t) r0 * HK, ko + (size_t) r0 * HK,
								vo + (size_t) r0 * HK, a->f + (size_t) r0 * HK, beta + (size_t) r0 * H,
								st->seqs[s]->kda_S[a->kda_index], o + (size_t) r0 * HK, scratch);
		/* -2 (kk_kda_chunked_mma: shared memory too small) cannot happen from
		 * sm_80 on: one stage of K = 128 takes 81 KB */
		if (!chunked_launched(be, rc, K, "kda_chunked"))
			return;
	}
	cuda_kda_gated_norm(be, a, n, o);
}

/* ------------------------------------------------------------------ test hook */

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): one decode step of ns sequences (row s is sequence s) through the
 * three kernels (kk_kda_prep, kk_kda_recurrent, kk_kda_gated_norm) and
 * through kk_kda_decode, each on its own copy of the state and conv tails,
 * on the current device (early: kk_kda_decode's early form,
 * KL_CUDA_KDA_DEC_EARLY).  Host inputs: q, k, v, f, gate [ns, H K], b [ns, H],
 * conv_* [H K, W], A_log [H], dt_bias [H K], o_norm [K], S [ns, H, K, K],
 * tails [ns, 3 H K W].  Outputs, copied back: out_* [ns, H K], S_* and
 * tails_* (the inputs' shapes).  Returns 0, -1 when kk_kda_decode does not
 * cover the shape or GPU, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_kda_decode(int early, int ns, int H, int K, int W, int round16, float eps, const float *q,
						const float *k, const float *v, const float *f, const float *b, const float *gate,
						const float *conv_q, const float *conv_k, const float *conv_v, const float *A_log,
						const float *dt_bias, const float *o_norm, const float *S, const float *tails, float *out_old,
						float *out_new, float *S_old, float *S_new, float *tails_old, float *tails_new)
{
	enum
	{
		Q, K_, V_, F_OLD, F_NEW, B, GATE, CQ, CK, CV, ALOG, DT, ONORM, S_O, S_N, T_O, T_N,
		QO, KO, VO, BETA, O, OUT_O, OUT_N, ROW0, ROWSEQ, STAB_O, STAB_N, CTAB_O, CTAB_N, NBUF
	};
	size_t		HK = (size_t) H * K,
				nS = (size_t) H * K * K,
				nT = 3 * HK * W;
	size_t		sz[NBUF];
	const void *in[NBUF] = {NULL};
	void	   *d[NBUF] = {NULL};
	int		   *ints = malloc(sizeof(int) * (size_t) (2 * ns + 1));
	float	  **ptrs = malloc(sizeof(float *) * (size_t) (4 * ns));
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0;

	if (!ints || !ptrs)
	{
		free(ints);
		free(ptrs);
		return (int) cudaErrorMemoryAllocation;
	}
	if (!kk_kda_decode_supported(K))
	{
		free(ints);
		free(ptrs);
		return -1;
	}
	sz[Q] = sz[K_] = sz[V_] = sz[F_OLD] = sz[F_NEW] = sz[GATE] = sz[QO] = sz[KO] = sz[VO] = sz[O] = sz[OUT_O] =
		sz[OUT_N] = sizeof(float) * ns * HK;
	sz[B] = sz[BETA] = sizeof(float) * ns * H;
	sz[CQ] = sz[CK] = sz[CV] = sizeof(float) * HK * W;
	sz[ALOG] = sizeof(float) * H;
	sz[DT] = sizeof(float) * HK;
	sz[ONORM] = sizeof(float) * K;
	sz[S_O] = sz[S_N] = sizeof(float) * ns * nS;
	sz[T_O] = sz[T_N] = sizeof(float) * ns * nT;
	sz[ROW0] = sizeof(int) * (ns + 1);
	sz[ROWSEQ] = sizeof(int) * ns;
	sz[STAB_O] = sz[STAB_N] = sz[CTAB_O] = sz[CTAB_N] = sizeof(float *) * ns;
	in[Q] = q;
	in[K_] = k;
	in[V_] = v;
	in[F_OLD] = in[F_NEW] = f;
	in[B] = b;
	in[GATE] = gate;
	in[CQ] = conv_q;
	in[CK] = conv_k;
	in[CV] = conv_v;
	in[ALOG] = A_log;
	in[DT] = dt_bias;
	in[ONORM] = o_norm;
	in[S_O] = in[S_N] = S;
	in[T_O] = in[T_N] = tails;
	rc = hook_open(&s, d, sz, in, NBUF);
	if (rc == 0)
	{
		/* row s is sequence s; each copy's per-sequence state and tail pointers */
		for (int i = 0; i <= ns; i++)
			ints[i] = i;
		for (int i = 0; i < ns; i++)
		{
			ints[ns + 1 + i] = i;
			ptrs[i] = (float *) d[S_O] + i * nS;
			ptrs[ns + i] = (float *) d[S_N] + i * nS;
			ptrs[2 * ns + i] = (float *) d[T_O] + i * nT;
			ptrs[3 * ns + i] = (float *) d[T_N] + i * nT;
		}
		if ((e = cudaMemcpyAsync(d[ROW0], ints, sz[ROW0], cudaMemcpyHostToDevice, s)) != cudaSuccess ||
			(e = cudaMemcpyAsync(d[ROWSEQ], ints + ns + 1, sz[ROWSEQ], cudaMemcpyHostToDevice, s)) != cudaSuccess)
			rc = (int) e;
		for (int i = 0; i < 4 && rc == 0; i++)
			if ((e = cudaMemcpyAsync(d[STAB_O + i], ptrs + (size_t) i * ns, sz[STAB_O], cudaMemcpyHostToDevice, s)) !=
				cudaSuccess)
				rc = (int) e;
	}
	if (rc == 0)
	{
		kk_kda_prep(s, ns, H, K, W, d[Q], d[K_], d[V_], d[F_OLD], d[B], d[QO], d[KO], d[VO], d[BETA], d[CQ], d[CK],
					d[CV], d[ALOG], d[DT], d[ROWSEQ], d[ROW0], d[CTAB_O], 1, 0);
		if (kk_kda_recurrent(s, ns, H, K, d[QO], d[KO], d[VO], d[F_OLD], d[BETA], d[O], d[ROW0], d[STAB_O], 16,
							 round16) != 0)
			rc = -1;
		else
		{
			kk_kda_gated_norm(s, ns, H, K, d[O], d[GATE], d[ONORM], eps, d[OUT_O]);
			rc = kk_kda_decode(s, ns, H, K, W, d[Q], d[K_], d[V_], d[F_NEW], d[B], d[GATE], d[CQ], d[CK], d[CV],
							   d[ALOG], d[DT], d[ONORM], eps, d[ROW0], d[STAB_N], d[CTAB_N], round16, d[OUT_N],
							   early);
			if (rc == 0 && (e = cudaGetLastError()) != cudaSuccess)
				rc = (int) e;
		}
	}
	{
		void	   *host_out[6] = {out_old, out_new, S_old, S_new, tails_old, tails_new};
		int			dev_of[6] = {OUT_O, OUT_N, S_O, S_N, T_O, T_N};

		rc = hook_close(s, d, sz, NBUF, dev_of, host_out, 6, rc);
	}
	free(ints);
	free(ptrs);
	return rc;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): the parallel half of
 * kk_kda_chunked_mma on tensor cores in blocks of 256 threads (2), of 256 in
 * 63.5 KB of shared memory (3) or of 128 (1), as two kernels with 3's
 * outputs (6, KL_CUDA_KDA_PREP_MMA's default), or as the fp32 prep kernel (0),
 * for the calls of kl_cuda_test_kda_chunked that follow.
 */
__attribute__((visibility("default"))) void
kl_cuda_test_kda_prep_mma(int on)
{
	kk_set_kda_prep_mma(on);
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): =6's wide forms with
 * the Kb^T hand-off (2, KL_CUDA_KDA_KP6_WIDE's default), without it (1) or
 * the forms before them (0), for the calls of kl_cuda_test_kda_chunked_raw
 * that follow.
 */
__attribute__((visibility("default"))) void
kl_cuda_test_kda_kp6_wide(int on)
{
	kk_set_kda_kp6_wide(on);
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): the sub-chunk
 * kernel's cross-half pairs on tensor cores (1, KL_CUDA_KDA_KP6_INTRA) or
 * on CUDA cores (0, default), for the calls of kl_cuda_test_kda_chunked_raw
 * that follow.  Returns the value it replaces (so checks can pin a form and
 * give the environment's back).
 */
__attribute__((visibility("default"))) int
kl_cuda_test_kda_kp6_intra(int on)
{
	return kk_set_kda_kp6_intra(on);
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): kk_kda_chunked_mma's
 * sequential part as the 4-warp kernel (1), the wide one with 32 columns a
 * block (2, KL_CUDA_KDA_MMA's default), with 64 (3) or with 8 warps (4),
 * for the calls of kl_cuda_test_kda_chunked that follow.
 */
__attribute__((visibility("default"))) void
kl_cuda_test_kda_mma_form(int form)
{
	kk_set_kda_mma_form(form);
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): the chunkwise form of
 * one sequence of n rows through the fp32 kernels (kk_kda_chunked) and
 * through the tensor-core ones (kk_kda_chunked_mma), each on its own copy of
 * the state, on the current device.  Host inputs, already prepared (what
 * kk_kda_prep leaves): q, k, v, g [n, H K], beta [n, H], S [H, K, K].
 * Outputs, copied back: o_old, o_new [n, H K], S_old, S_new [H, K, K].
 * Returns 0, -1 for a head size the tensor-core form does not cover, -2 if
 * its shared memory does not fit, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_kda_chunked(int n, int H, int K, const float *q, const float *k, const float *v, const float *g,
						 const float *beta, const float *S, float *o_old, float *o_new, float *S_old, float *S_new)
{
	enum
	{
		Q, K_, V_, G, BETA, S_O, S_N, O_O, O_N, SCR_O, SCR_N, NBUF
	};
	size_t		nx = (size_t) n * H * K,
				nS = (size_t) H * K * K;
	size_t		sz[NBUF];
	const void *in[NBUF] = {NULL};
	void	   *d[NBUF] = {NULL};
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0;

	sz[Q] = sz[K_] = sz[V_] = sz[G] = sz[O_O] = sz[O_N] = sizeof(float) * nx;
	sz[BETA] = sizeof(float) * (size_t) n * H;
	sz[S_O] = sz[S_N] = sizeof(float) * nS;
	sz[SCR_O] = sizeof(float) * kk_kda_chunk_scratch(n, H, K);
	sz[SCR_N] = kk_kda_chunk_mma_scratch(n, H, K);
	in[Q] = q;
	in[K_] = k;
	in[V_] = v;
	in[G] = g;
	in[BETA] = beta;
	in[S_O] = in[S_N] = S;
	rc = hook_open(&s, d, sz, in, NBUF);
	if (rc == 0)
		rc = kk_kda_chunked(s, n, H, K, d[Q], d[K_], d[V_], d[G], d[BETA], d[S_O], d[O_O], d[SCR_O]);
	if (rc == 0)
		rc = kk_kda_chunked_mma(s, n, H, K, d[Q], d[K_], d[V_], d[G], d[BETA], d[S_N], d[O_N], d[SCR_N]);
	if (rc == 0 && (e = cudaGetLastError()) != cudaSuccess)
		rc = (int) e;
	{
		void	   *host_out[4] = {o_old, o_new, S_old, S_new};
		int			dev_of[4] = {O_O, O_N, S_O, S_N};

		rc = hook_close(s, d, sz, NBUF, dev_of, host_out, 4, rc);
	}
	return rc;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): the bytes of
 * kk_kda_chunked_mma's scratch for n rows (what kl_cuda_test_kda_chunked_raw
 * copies back into scr).
 */
__attribute__((visibility("default"))) size_t
kl_cuda_test_kda_chunk_mma_scratch(int n, int H, int K)
{
	return kk_kda_chunk_mma_scratch(n, H, K);
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): the tensor-core
 * chunkwise form of one sequence of n rows, kk_kda_chunked_mma (in16 = 0) or
 * kk_kda_chunked_mma16 with q, k, v converted to bf16 here (in16 = 1), on the
 * current device, with its scratch zeroed first.  Host inputs as
 * kl_cuda_test_kda_chunked; outputs, copied back: o [n, H K], S_out
 * [H, K, K] and scr, the scratch after the call
 * (kl_cuda_test_kda_chunk_mma_scratch bytes: the parallel half's W16, U16,
 * Q16, Kt16, P16, gl, which the sequential part only reads), so that two
 * forms of the parallel half can be compared bit for bit.  Returns 0, -1
 * for a head size the form does not cover, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_kda_chunked_raw(int n, int H, int K, int in16, const float *q, const float *k, const float *v,
							 const float *g, const float *beta, const float *S, float *o, float *S_out, void *scr)
{
	enum
	{
		Q, K_, V_, G, BETA, S_N, O_N, SCR, NBUF
	};
	size_t		nx = (size_t) n * H * K,
				nS = (size_t) H * K * K;
	size_t		sz[NBUF];
	const void *in[NBUF] = {NULL};
	void	   *d[NBUF] = {NULL};
	uint16_t   *h16 = NULL;
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0;

	sz[Q] = sz[K_] = sz[V_] = in16 ? sizeof(uint16_t) * nx : sizeof(float) * nx;
	sz[G] = sz[O_N] = sizeof(float) * nx;
	sz[BETA] = sizeof(float) * (size_t) n * H;
	sz[S_N] = sizeof(float) * nS;
	sz[SCR] = kk_kda_chunk_mma_scratch(n, H, K);
	in[Q] = q;
	in[K_] = k;
	in[V_] = v;
	if (in16)
	{
		const float *src[3] = {q, k, v};

		if (!(h16 = malloc(sizeof(uint16_t) * 3 * nx)))
			return (int) cudaErrorMemoryAllocation;
		for (int a = 0; a < 3; a++)
		{
			for (size_t i = 0; i < nx; i++)
				h16[a * nx + i] = kl_f32_to_bf16(src[a][i]);
			in[Q + a] = h16 + a * nx;
		}
	}
	in[G] = g;
	in[BETA] = beta;
	in[S_N] = S;
	rc = hook_open_fill(&s, d, sz, in, NBUF, 0);
	if (rc == 0)
		rc = in16 ? kk_kda_chunked_mma16(s, n, H, K, d[Q], d[K_], d[V_], d[G], d[BETA], d[S_N], d[O_N], d[SCR]) :
			kk_kda_chunked_mma(s, n, H, K, d[Q], d[K_], d[V_], d[G], d[BETA], d[S_N], d[O_N], d[SCR]);
	if (rc == 0 && (e = cudaGetLastError()) != cudaSuccess)
		rc = (int) e;
	{
		void	   *host_out[3] = {o, S_out, scr};
		int			dev_of[3] = {O_N, S_N, SCR};

		rc = hook_close(s, d, sz, NBUF, dev_of, host_out, 3, rc);
	}
	free(h16);
	return rc;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): kk_kda_prep (and
 * kk_kda_tails when a sequence has several rows) and kk_kda_gated_norm on
 * one step of ns sequences, sequence s = rows row0[s] .. row0[s + 1] - 1,
 * with the kernels that KL_CUDA_KDA_ELEM_WARP's mask `warp` selects (0 the
 * block kernels; kernels.h's KK_KDA_EW_*: the prep is asked for fast, so
 * KK_KDA_EW_FAST decides); the backend's setting is restored after.  Host
 * inputs: q, k, v, f, gate, o [n, H K] (o: what the gated norm normalizes),
 * b [n, H], conv_* [H K, W], A_log [H], dt_bias [H K], o_norm [K], tails
 * [ns, 3 H K W].  Outputs, copied back: qo, ko, vo, g (f after the prep),
 * out [n, H K], beta [n, H], tails_out (the new tails).  Returns 0 or a CUDA
 * error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_kda_elem(int warp, int ns, const int *row0, int H, int K, int W, float eps, const float *q,
					  const float *k, const float *v, const float *f, const float *b, const float *gate,
					  const float *o, const float *conv_q, const float *conv_k, const float *conv_v,
					  const float *A_log, const float *dt_bias, const float *o_norm, const float *tails, float *qo,
					  float *ko, float *vo, float *g, float *beta, float *out, float *tails_out)
{
	enum
	{
		Q, K_, V_, F, B, GATE, O, CQ, CK, CV, ALOG, DT, ONORM, T, QO, KO, VO, BETA, OUT, ROW0, ROWSEQ, CTAB, NBUF
	};
	int			n = row0[ns];
	size_t		HK = (size_t) H * K,
				nT = 3 * HK * W;
	size_t		sz[NBUF];
	const void *in[NBUF] = {NULL};
	void	   *d[NBUF] = {NULL};
	int		   *rseq = malloc(sizeof(int) * (size_t) (n > 0 ? n : 1));
	float	  **ptrs = malloc(sizeof(float *) * (size_t) ns);
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0,
				was;

	if (!rseq || !ptrs)
	{
		free(rseq);
		free(ptrs);
		return (int) cudaErrorMemoryAllocation;
	}
	for (int si = 0; si < ns; si++)
		for (int r = row0[si]; r < row0[si + 1]; r++)
			rseq[r] = si;
	sz[Q] = sz[K_] = sz[V_] = sz[F] = sz[GATE] = sz[O] = sz[QO] = sz[KO] = sz[VO] = sz[OUT] =
		sizeof(float) * n * HK;
	sz[B] = sz[BETA] = sizeof(float) * n * H;
	sz[CQ] = sz[CK] = sz[CV] = sizeof(float) * HK * W;
	sz[ALOG] = sizeof(float) * H;
	sz[DT] = sizeof(float) * HK;
	sz[ONORM] = sizeof(float) * K;
	sz[T] = sizeof(float) * ns * nT;
	sz[ROW0] = sizeof(int) * (ns + 1);
	sz[ROWSEQ] = sizeof(int) * n;
	sz[CTAB] = sizeof(float *) * ns;
	in[Q] = q;
	in[K_] = k;
	in[V_] = v;
	in[F] = f;
	in[B] = b;
	in[GATE] = gate;
	in[O] = o;
	in[CQ] = conv_q;
	in[CK] = conv_k;
	in[CV] = conv_v;
	in[ALOG] = A_log;
	in[DT] = dt_bias;
	in[ONORM] = o_norm;
	in[T] = tails;
	in[ROW0] = row0;
	in[ROWSEQ] = rseq;
	rc = hook_open(&s, d, sz, in, NBUF);
	if (rc == 0)
	{
		for (int i = 0; i < ns; i++)
			ptrs[i] = (float *) d[T] + i * nT;
		if ((e = cudaMemcpyAsync(d[CTAB], ptrs, sz[CTAB], cudaMemcpyHostToDevice, s)) != cudaSuccess)
			rc = (int) e;
	}
	if (rc == 0)
	{
		was = kk_set_kda_elem_warp(warp);
		kk_kda_prep(s, n, H, K, W, d[Q], d[K_], d[V_], d[F], d[B], d[QO], d[KO], d[VO], d[BETA], d[CQ], d[CK],
					d[CV], d[ALOG], d[DT], d[ROWSEQ], d[ROW0], d[CTAB], n == ns, 1);
		if (n != ns)
			kk_kda_tails(s, ns, (int) HK, W, d[Q], d[K_], d[V_], d[ROW0], d[CTAB]);
		kk_kda_gated_norm(s, n, H, K, d[O], d[GATE], d[ONORM], eps, d[OUT]);
		kk_set_kda_elem_warp(was);
		if ((e = cudaGetLastError()) != cudaSuccess)
			rc = (int) e;
	}
	{
		void	   *host_out[7] = {qo, ko, vo, g, beta, out, tails_out};
		int			dev_of[7] = {QO, KO, VO, F, BETA, OUT, T};

		rc = hook_close(s, d, sz, NBUF, dev_of, host_out, 7, rc);
	}
	free(rseq);
	free(ptrs);
	return rc;
}

/*
 * For bench/bench_cuda.c only (found with dlsym; the backend does not use
 * it): fp32 rows y [n, cols] recorded as a product's bf16 result of role
 * KL_R16_* (cuda_r16_offer: the record forward.c's q, k, v, f, gate
 * products make under KL_CUDA_KDA_IN16), so that the next KDA op reads its
 * inputs as prefill does.  Call after begin_step.  Returns 1 kept, 0 not
 * (the switch or role off, precision fp32, a decode step, too few rows).
 */
__attribute__((visibility("default"))) int
kl_cuda_bench_kda_offer16(kl_backend *be, const float *y, int n, int cols, int role)
{
	return cuda_r16_offer(be, y, n, cols, role) ? 1 : 0;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): a prefill step's
 * prep of ns sequences (sequence s = rows row0[s] .. row0[s + 1] - 1; at
 * least one of more than one row) through kk_kda_prep + kk_kda_tails on fp32
 * inputs (the reference, *_ref) and through kk_kda_prep_rows16 with the raw
 * q, k, v, f in bf16 (in16; converted here, so the host values should be
 * bf16 values for a bit-for-bit comparison) and / or the prepared q, k, v
 * in bf16 (out16; widened back here) + kk_kda_tails16 (in16) or
 * kk_kda_tails, each on its own copy of f and of the tails, fast forms
 * (precision bf16's), the rows prep in its form 0 (KL_CUDA_KDA_PREP_FORM:
 * the backend's form is restored after).  Host inputs: q, k, v, f [n, H K], b [n, H], conv_*
 * [H K, W], A_log [H], dt_bias [H K], tails [ns, 3 H K W].  Outputs, copied
 * back: qo, ko, vo, g [n, H K], beta [n, H], tails_out [ns, 3 H K W], for
 * each side.  Returns 0, -1 when kk_kda_prep_rows16 does not cover the
 * shape, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_kda_prep16(int ns, const int *row0, int H, int K, int W, int in16, int out16, const float *q,
						const float *k, const float *v, const float *f, const float *b, const float *conv_q,
						const float *conv_k, const float *conv_v, const float *A_log, const float *dt_bias,
						const float *tails, float *qo_ref, float *ko_ref, float *vo_ref, float *g_ref,
						float *beta_ref, float *tails_ref, float *qo, float *ko, float *vo, float *g, float *beta,
						float *tails_out)
{
	enum
	{
		Q, K_, V_, F_R, B, CQ, CK, CV, ALOG, DT, T_R, T_N, QO_R, KO_R, VO_R, BETA_R, Q16, K16, V16, F16, G_N,
		QO_N, KO_N, VO_N, BETA_N, ROW0, ROWSEQ, CTAB_R, CTAB_N, NBUF
	};
	int			n = row0[ns];
	size_t		HK = (size_t) H * K,
				nx = (size_t) n * HK,
				nT = 3 * HK * W;
	size_t		sz[NBUF];
	const void *in[NBUF] = {NULL};
	void	   *d[NBUF] = {NULL};
	int		   *rseq = malloc(sizeof(int) * (size_t) (n > 0 ? n : 1));
	float	  **ptrs = malloc(sizeof(float *) * (size_t) (2 * ns));
	uint16_t   *h16 = malloc(sizeof(uint16_t) * 4 * (nx > 0 ? nx : 1));
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0;

	if (!rseq || !ptrs || !h16)
	{
		free(rseq);
		free(ptrs);
		free(h16);
		return (int) cudaErrorMemoryAllocation;
	}
	for (int si = 0; si < ns; si++)
		for (int r = row0[si]; r < row0[si + 1]; r++)
			rseq[r] = si;
	{
		const float *src[4] = {q, k, v, f};

		for (int a = 0; a < 4; a++)
			for (size_t i = 0; i < nx; i++)
				h16[a * nx + i] = kl_f32_to_bf16(src[a][i]);
	}
	sz[Q] = sz[K_] = sz[V_] = sz[F_R] = sz[QO_R] = sz[KO_R] = sz[VO_R] = sz[G_N] = sizeof(float) * nx;
	sz[QO_N] = sz[KO_N] = sz[VO_N] = out16 ? sizeof(uint16_t) * nx : sizeof(float) * nx;
	sz[Q16] = sz[K16] = sz[V16] = sz[F16] = sizeof(uint16_t) * nx;
	sz[B] = sz[BETA_R] = sz[BETA_N] = sizeof(float) * n * H;
	sz[CQ] = sz[CK] = sz[CV] = sizeof(float) * HK * W;
	sz[ALOG] = sizeof(float) * H;
	sz[DT] = sizeof(float) * HK;
	sz[T_R] = sz[T_N] = sizeof(float) * ns * nT;
	sz[ROW0] = sizeof(int) * (ns + 1);
	sz[ROWSEQ] = sizeof(int) * (n > 0 ? n : 1);
	sz[CTAB_R] = sz[CTAB_N] = sizeof(float *) * ns;
	in[Q] = q;
	in[K_] = k;
	in[V_] = v;
	in[F_R] = f;
	in[B] = b;
	in[CQ] = conv_q;
	in[CK] = conv_k;
	in[CV] = conv_v;
	in[ALOG] = A_log;
	in[DT] = dt_bias;
	in[T_R] = in[T_N] = tails;
	in[Q16] = h16;
	in[K16] = h16 + nx;
	in[V16] = h16 + 2 * nx;
	in[F16] = h16 + 3 * nx;
	in[G_N] = f;				/* (fp32 f for !in16: g in place, as the backend does) */
	in[ROW0] = row0;
	in[ROWSEQ] = rseq;
	rc = hook_open(&s, d, sz, in, NBUF);
	if (rc == 0)
	{
		for (int i = 0; i < ns; i++)
		{
			ptrs[i] = (float *) d[T_R] + i * nT;
			ptrs[ns + i] = (float *) d[T_N] + i * nT;
		}
		if ((e = cudaMemcpyAsync(d[CTAB_R], ptrs, sz[CTAB_R], cudaMemcpyHostToDevice, s)) != cudaSuccess ||
			(e = cudaMemcpyAsync(d[CTAB_N], ptrs + ns, sz[CTAB_N], cudaMemcpyHostToDevice, s)) != cudaSuccess)
			rc = (int) e;
	}
	if (rc == 0)
	{
		/* form 0 of the rows prep (KL_CUDA_KDA_PREP_FORM): this compares types, the same math on both sides;
		 * the forms against form 0 are check_kda_prep_form's (kl_cuda_test_kda_prep_form) */
		int			was_form = kk_set_kda_prep_form(0);

		kk_kda_prep(s, n, H, K, W, d[Q], d[K_], d[V_], d[F_R], d[B], d[QO_R], d[KO_R], d[VO_R], d[BETA_R], d[CQ],
					d[CK], d[CV], d[ALOG], d[DT], d[ROWSEQ], d[ROW0], d[CTAB_R], 0, 1);
		kk_kda_tails(s, ns, (int) HK, W, d[Q], d[K_], d[V_], d[ROW0], d[CTAB_R]);
		if (kk_kda_prep_rows16(s, n, H, K, W, in16, in16 ? d[Q16] : d[Q], in16 ? d[K16] : d[K_],
							   in16 ? d[V16] : d[V_], in16 ? d[F16] : d[G_N], d[G_N], d[B], out16, d[QO_N],
							   d[KO_N], d[VO_N], d[BETA_N], d[CQ], d[CK], d[CV], d[ALOG], d[DT], d[ROWSEQ],
							   d[ROW0], d[CTAB_N], 1) != 0)
			rc = -1;
		kk_set_kda_prep_form(was_form);
		if (in16)
			kk_kda_tails16(s, ns, (int) HK, W, d[Q16], d[K16], d[V16], d[ROW0], d[CTAB_N]);
		else
			kk_kda_tails(s, ns, (int) HK, W, d[Q], d[K_], d[V_], d[ROW0], d[CTAB_N]);
		if (rc == 0 && (e = cudaGetLastError()) != cudaSuccess)
			rc = (int) e;
	}
	{
		void	   *host_out[12] = {qo_ref, ko_ref, vo_ref, g_ref, beta_ref, tails_ref, out16 ? (void *) h16 : qo,
			out16 ? (void *) (h16 + nx) : ko, out16 ? (void *) (h16 + 2 * nx) : vo, g, beta, tails_out};
		int			dev_of[12] = {QO_R, KO_R, VO_R, F_R, BETA_R, T_R, QO_N, KO_N, VO_N, G_N, BETA_N, T_N};

		rc = hook_close(s, d, sz, NBUF, dev_of, host_out, 12, rc);
	}
	if (rc == 0 && out16)
	{
		float	   *dst[3] = {qo, ko, vo};

		for (int a = 0; a < 3; a++)
			for (size_t i = 0; i < nx; i++)
			{
				uint32_t	u = (uint32_t) h16[a * nx + i] << 16;

				memcpy(&dst[a][i], &u, sizeof(float));
			}
	}
	free(rseq);
	free(ptrs);
	free(h16);
	return rc;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym): a prefill step's
 * rows prep of ns sequences (as kl_cuda_test_kda_prep16's) through
 * kk_kda_prep_rows16 with the raw q, k, v, f in bf16 (converted here: the
 * host values should be bf16 values) and fp32 prepared q, k, v, in form
 * `form` of kk_set_kda_prep_form (KL_CUDA_KDA_PREP_FORM), fast or not
 * (fast: precision bf16's math, the only one the forms change), with
 * KL_CUDA_KDA_ELEM_WARP's default kernels; the backend's settings are
 * restored after.  Host inputs: q, k, v, f [n, H K], b [n, H], conv_*
 * [H K, W], A_log [H], dt_bias [H K], tails [ns, 3 H K W] (read only).
 * Outputs, copied back: qo, ko, vo, g [n, H K], beta [n, H].  Returns 0,
 * -1 when kk_kda_prep_rows16 does not cover the shape, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_kda_prep_form(int form, int fast, int ns, const int *row0, int H, int K, int W, const float *q,
						   const float *k, const float *v, const float *f, const float *b, const float *conv_q,
						   const float *conv_k, const float *conv_v, const float *A_log, const float *dt_bias,
						   const float *tails, float *qo, float *ko, float *vo, float *g, float *beta)
{
	enum
	{
		Q16, K16, V16, F16, B, CQ, CK, CV, ALOG, DT, T, G, QO, KO, VO, BETA, ROW0, ROWSEQ, CTAB, NBUF
	};
	int			n = row0[ns];
	size_t		HK = (size_t) H * K,
				nx = (size_t) n * HK,
				nT = 3 * HK * W;
	size_t		sz[NBUF];
	const void *in[NBUF] = {NULL};
	void	   *d[NBUF] = {NULL};
	int		   *rseq = malloc(sizeof(int) * (size_t) (n > 0 ? n : 1));
	float	  **ptrs = malloc(sizeof(float *) * (size_t) (ns > 0 ? ns : 1));
	uint16_t   *h16 = malloc(sizeof(uint16_t) * 4 * (nx > 0 ? nx : 1));
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0;

	if (!rseq || !ptrs || !h16)
	{
		free(rseq);
		free(ptrs);
		free(h16);
		return (int) cudaErrorMemoryAllocation;
	}
	for (int si = 0; si < ns; si++)
		for (int r = row0[si]; r < row0[si + 1]; r++)
			rseq[r] = si;
	{
		const float *src[4] = {q, k, v, f};

		for (int a = 0; a < 4; a++)
			for (size_t i = 0; i < nx; i++)
				h16[a * nx + i] = kl_f32_to_bf16(src[a][i]);
	}
	sz[Q16] = sz[K16] = sz[V16] = sz[F16] = sizeof(uint16_t) * nx;
	sz[G] = sz[QO] = sz[KO] = sz[VO] = sizeof(float) * nx;
	sz[B] = sz[BETA] = sizeof(float) * n * H;
	sz[CQ] = sz[CK] = sz[CV] = sizeof(float) * HK * W;
	sz[ALOG] = sizeof(float) * H;
	sz[DT] = sizeof(float) * HK;
	sz[T] = sizeof(float) * ns * nT;
	sz[ROW0] = sizeof(int) * (ns + 1);
	sz[ROWSEQ] = sizeof(int) * (n > 0 ? n : 1);
	sz[CTAB] = sizeof(float *) * ns;
	in[Q16] = h16;
	in[K16] = h16 + nx;
	in[V16] = h16 + 2 * nx;
	in[F16] = h16 + 3 * nx;
	in[B] = b;
	in[CQ] = conv_q;
	in[CK] = conv_k;
	in[CV] = conv_v;
	in[ALOG] = A_log;
	in[DT] = dt_bias;
	in[T] = tails;
	in[ROW0] = row0;
	in[ROWSEQ] = rseq;
	rc = hook_open(&s, d, sz, in, NBUF);
	if (rc == 0)
	{
		for (int i = 0; i < ns; i++)
			ptrs[i] = (float *) d[T] + i * nT;
		if ((e = cudaMemcpyAsync(d[CTAB], ptrs, sz[CTAB], cudaMemcpyHostToDevice, s)) != cudaSuccess)
			rc = (int) e;
	}
	if (rc == 0)
	{
		int			was_form = kk_set_kda_prep_form(form),
					was_ew = kk_set_kda_elem_warp(KK_KDA_EW_DEFAULT);

		if (kk_kda_prep_rows16(s, n, H, K, W, 1, d[Q16], d[K16], d[V16], d[F16], d[G], d[B], 0, d[QO], d[KO],
							   d[VO], d[BETA], d[CQ], d[CK], d[CV], d[ALOG], d[DT], d[ROWSEQ], d[ROW0], d[CTAB],
							   fast) != 0)
			rc = -1;
		kk_set_kda_elem_warp(was_ew);
		kk_set_kda_prep_form(was_form);
		if (rc == 0 && (e = cudaGetLastError()) != cudaSuccess)
			rc = (int) e;
	}
	{
		void	   *host_out[5] = {qo, ko, vo, g, beta};
		int			dev_of[5] = {QO, KO, VO, G, BETA};

		rc = hook_close(s, d, sz, NBUF, dev_of, host_out, 5, rc);
	}
	free(rseq);
	free(ptrs);
	free(h16);
	return rc;
}
