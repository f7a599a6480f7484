/*
 * cuda_kda.c — the KDA mixer op on the GPU (kernels/kda.cu has the kernels
 * and the math).  One step:
 *   prep (conv + silu, norms, decay, beta) over all rows, then the new conv
 *   tails; the per-token recurrence for every sequence with few rows (one
 *   launch for the whole batch: decode); the chunkwise form for each sequence
 *   with more; the gated RMSNorm over all rows into the output.
 * Like the CPU backend, sequences of up to 16 rows take the recurrence
 * (unless the step forces it for all).
 */
#include <limits.h>

#include "cuda_internal.h"

#define RECURRENT_MAX 16

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

	if (cuda_step_skip(be, OP_KDA, (uintptr_t) a->q, (uintptr_t) a->out, (uintptr_t) w, (uintptr_t) a->kda_index))
		return;
	qo = cuda_buf(be, CB_KDA_Q, sizeof(float) * (size_t) n * HK);
	ko = cuda_buf(be, CB_KDA_K, sizeof(float) * (size_t) n * HK);
	vo = cuda_buf(be, CB_KDA_V, sizeof(float) * (size_t) n * HK);
	o = cuda_buf(be, CB_KDA_O, sizeof(float) * (size_t) n * HK);
	beta = cuda_buf(be, CB_KDA_BETA, sizeof(float) * (size_t) n * H);
	for (int s = 0; s < ns; s++)
		if (st->row0[s + 1] - st->row0[s] > max_rows && st->row0[s + 1] - st->row0[s] > longest)
			longest = st->row0[s + 1] - st->row0[s];
	if (longest > 0)
		scratch = cuda_buf(be, CB_KDA_CHUNK, sizeof(float) * kk_kda_chunk_scratch(longest, H, K));
	if (!qo || !ko || !vo || !o || !beta || (longest > 0 && !scratch))
		return;

	/* decode (one row per sequence): the prep kernel shifts the tails itself */
	kk_kda_prep(cs->stream, n, H, K, W, a->q, a->k, a->v, a->f, a->b, qo, ko, vo, beta, w->conv_q, w->conv_k,
				w->conv_v, w->A_log, w->dt_bias, cs->d_row_seq, cs->d_row0, conv_tab, n == ns);
	if (!cuda_launched(be, "kda_prep"))
		return;
	if (n != ns)
	{
		kk_kda_tails(cs->stream, ns, HK, W, a->q, a->k, a->v, cs->d_row0, conv_tab);
		if (!cuda_launched(be, "kda_tails"))
			return;
	}
	if (kk_kda_recurrent(cs->stream, ns, H, K, qo, ko, vo, a->f, beta, o, cs->d_row0, S_tab, max_rows,
						 cs->kda_round16) != 0)
	{
		cuda_fail(be, KL_E_UNSUPPORTED, "KDA head size %d is not supported on the GPU", K);
		return;
	}
	if (!cuda_launched(be, "kda_recurrent"))
		return;
	for (int s = 0; s < ns; s++)
	{
		int			r0 = st->row0[s],
					ni = st->row0[s + 1] - r0;
		int			rc;

		if (ni <= max_rows)
			continue;
		rc = kk_kda_chunked(cs->stream, ni, H, K, qo + (size_t) r0 * HK, ko + (size_t) r0 * HK,
							vo + (size_t) r0 * HK, a->f + (size_t) r0 * HK, beta + (size_t) r0 * H,
							st->seqs[s]->kda_S[a->kda_index], o + (size_t) r0 * HK, scratch);
		if (rc == -1)
		{
			cuda_fail(be, KL_E_UNSUPPORTED, "KDA head size %d is not supported on the GPU", K);
			return;
		}
		if (rc != 0)
		{
			cuda_ok(be, (cudaError_t) rc, "kda_chunked");
			return;
		}
		if (!cuda_launched(be, "kda_chunked"))
			return;
	}
	kk_kda_gated_norm(cs->stream, n, H, K, o, a->gate, w->o_norm, cfg->rms_norm_eps, a->out);
	cuda_launched(be, "kda_gated_norm");
}
