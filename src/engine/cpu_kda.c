/*
 * cpu_kda.c — Kimi Delta Attention on the CPU: the one place where the KDA
 * recurrence is written down (docs/model.md, "KDA").
 *
 * Per head, with state S [K x V] (row c belongs to key channel c):
 *
 *     S <- diag(a_t) S                      a_t = exp(g_t), channel-wise decay
 *     S <- S + beta_t k_t (v_t - S^T k_t)^T  the delta rule
 *     o_t = S^T q_t
 *
 * kda_recurrent() runs exactly that, token by token (decode, short inputs).
 * kda_chunk() computes the same for a chunk of up to 64 tokens with matrix
 * products (prefill).  Writing Gamma(i, j) = prod_{s=j+1..i} a_s (so the
 * decay between positions j and i), the state after the chunk is
 *
 *     S_t = Gamma(t, -1) S_0 + sum_{j<=t} diag(Gamma(t, j)) k_j u_j^T
 *
 * with pseudo-values u obeying the unit lower-triangular system
 *
 *     u_t + beta_t sum_{j<t} (k_t . Gamma(t, j) k_j) u_j = beta_t (v_t - S_0^T (Gamma(t,-1) k_t))
 *
 * (the WY / UT form of the delta rule), solved by forward substitution; then
 * o_t = S_0^T (Gamma(t,-1) q_t) + sum_{j<=t} (q_t . Gamma(t, j) k_j) u_j.
 *
 * Decay factors are products of a_s, never exponentials of cumulative sums:
 * exp(G_i - G_j) with G a running sum loses accuracy when the decay is strong
 * (cancellation in G_i - G_j), and exp(-G_j) alone overflows.  Products of
 * factors <= 1 are exact to a few ulp, like the recurrence itself.  Pairs
 * (i, j) in different 16-token sub-chunks use Gamma(i, j) = F_i * R_j through a
 * reference point r between them (F_i = Gamma(i, r) and R_j = Gamma(r, j),
 * both <= 1), which turns the pair sums into matrix products.
 */
#include <math.h>
#include <string.h>

#include "cpu_ops.h"
#include "threadpool.h"

#define CHUNK 64
#define SUB 16
#define RECURRENT_MAX 16		/* inputs this short run token by token */

/*
 * Each CLONES function is compiled for AVX-512, AVX2 and baseline x86-64, the
 * copy chosen at load time by an ifunc resolver.  Under ThreadSanitizer (the
 * check-engine-tsan build) GCC instruments those resolvers too, and they run
 * during relocation, before the sanitizer's runtime exists: the program dies
 * before main.  That build takes the baseline copy only; the threading it
 * checks is the same.
 */
#ifdef __SANITIZE_THREAD__
#define CLONES
#else
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif

/* ------------------------------------------------------------------ per-token recurrence */

/*
 * One head, n tokens.  q, k, g: rows of K (stride ld), v: rows of V (stride
 * ld), beta[n]; o: rows of V (stride ldo).  S [K x V] is updated in place.
 *
 * The step above, regrouped so that S is read once and written once per
 * token (with a = exp(g_t), D = diag(a)):
 *
 *     w = (D S)^T k = S^T (a * k)         z = S^T (a * q)     (read-only pass)
 *     u = beta (v - w)                    o = z + u (k . q)
 *     S = D S + k u^T                                         (update pass)
 *
 * since o = (D S + k u^T)^T q = S^T (a * q) + u (k . q).
 */
CLONES static void
kda_recurrent(float *S, int K, int V, int n, const float *q, const float *k, const float *v,
			  const float *g, int ld, const float *beta, float *o, int ldo, float *a, float *w)
{
	const kl_simd *simd = kl_simd_get();

	for (int t = 0; t < n; t++)
	{
		const float *qt = q + (size_t) t * ld;
		const float *kt = k + (size_t) t * ld;
		const float *vt = v + (size_t) t * ld;
		float	   *ot = o + (size_t) t * ldo;
		float		kq = 0;

		simd->vexp(a, g + (size_t) t * ld, K);
		for (int x = 0; x < V; x++)
		{
			w[x] = 0;
			ot[x] = 0;
		}
		for (int c = 0; c < K; c++)
		{
			const float *Sc = S + (size_t) c * V;
			float		ak = a[c] * kt[c],
						aq = a[c] * qt[c];

			kq += kt[c] * qt[c];
			for (int x = 0; x < V; x++)
			{
				w[x] += ak * Sc[x];
				ot[x] += aq * Sc[x];
			}
		}
		for (int x = 0; x < V; x++)
		{
			w[x] = beta[t] * (vt[x] - w[x]);	/* now u */
			ot[x] += w[x] * kq;
		}
		for (int c = 0; c < K; c++)
		{
			float	   *Sc = S + (size_t) c * V;
			float		ac = a[c],
						kc = kt[c];

			for (int x = 0; x < V; x++)
				Sc[x] = ac * Sc[x] + kc * w[x];
		}
	}
}

/* ------------------------------------------------------------------ chunkwise form */

CLONES static void
vmul(float *y, const float *a, const float *b, int n)
{
	for (int i = 0; i < n; i++)
		y[i] = a[i] * b[i];
}

CLONES static float
dot3(const float *a, const float *b, const float *d, int n)
{
	float		s = 0;

	for (int i = 0; i < n; i++)
		s += a[i] * b[i] * d[i];
	return s;
}

/*
 * One chunk of C <= 64 tokens of one head; same arguments as kda_recurrent
 * plus scratch `ws` (see kda_chunk_scratch).
 */
static size_t
kda_chunk_scratch(int K, int V)
{
	return (size_t) CHUNK * K * 6 + (size_t) CHUNK * V * 2 + (size_t) CHUNK * CHUNK * 2 + (size_t) K * 2 + 64;
}

static void
kda_chunk(float *S, int K, int V, int C, const float *q, const float *k, const float *v,
		  const float *g, int ld, const float *beta, float *o, int ldo, float *ws)
{
	const kl_simd *simd = kl_simd_get();
	float	   *a = ws;			/* [C, K] per-step decay exp(g) */
	float	   *Gam = a + (size_t) CHUNK * K;	/* [C, K] Gamma(t, -1): decay since chunk start */
	float	   *Rb = Gam + (size_t) CHUNK * K;	/* [C, K] decay to a reference point */
	float	   *X1 = Rb + (size_t) CHUNK * K;	/* [C, K] decayed q or k */
	float	   *X2 = X1 + (size_t) CHUNK * K;	/* [C, K] */
	float	   *Kt = X2 + (size_t) CHUNK * K;	/* [C, K] */
	float	   *U = Kt + (size_t) CHUNK * K;	/* [C, V] pseudo-values */
	float	   *T = U + (size_t) CHUNK * V; /* [C, V] */
	float	   *A = T + (size_t) CHUNK * V; /* [C, C] strictly lower: beta_t k_t.Gamma k_j */
	float	   *P = A + (size_t) CHUNK * CHUNK; /* [C, C] lower: q_t.Gamma k_j */
	float	   *d = P + (size_t) CHUNK * CHUNK; /* [K] */

	memset(A, 0, sizeof(float) * (size_t) C * C);
	memset(P, 0, sizeof(float) * (size_t) C * C);

	for (int t = 0; t < C; t++)
	{
		simd->vexp(a + (size_t) t * K, g + (size_t) t * ld, K);
		if (t == 0)
			memcpy(Gam, a, sizeof(float) * K);
		else
			vmul(Gam + (size_t) t * K, Gam + (size_t) (t - 1) * K, a + (size_t) t * K, K);
	}

	/* pairs inside each 16-token sub-chunk: Gamma(i, j) built up by products */
	for (int s0 = 0; s0 < C; s0 += SUB)
	{
		int			s1 = s0 + SUB < C ? s0 + SUB : C;

		for (int j = s0; j < s1; j++)
		{
			const float *kj = k + (size_t) j * ld;

			for (int c = 0; c < K; c++)
				d[c] = 1.0f;
			for (int i = j; i < s1; i++)
			{
				if (i > j)
					vmul(d, d, a + (size_t) i * K, K);
				P[(size_t) i * C + j] = dot3(q + (size_t) i * ld, kj, d, K);
				if (i > j)
					A[(size_t) i * C + j] = beta[i] * dot3(k + (size_t) i * ld, kj, d, K);
			}
		}
	}

	/* pairs across sub-chunks, through the reference r = s0 - 1 */
	for (int s0 = SUB; s0 < C; s0 += SUB)
	{
		int			s1 = s0 + SUB < C ? s0 + SUB : C;
		int			r = s0 - 1;
		int			m = s1 - s0;

		/* F_i = Gamma(i, r) for i in [s0, s1): X1 = q_i F_i, X2 = k_i F_i */
		for (int i = s0; i < s1; i++)
		{
			float	   *F = d;

			if (i == s0)
				memcpy(F, a + (size_t) i * K, sizeof(float) * K);
			else
				vmul(F, F, a + (size_t) i * K, K);
			vmul(X1 + (size_t) (i - s0) * K, q + (size_t) i * ld, F, K);
			vmul(X2 + (size_t) (i - s0) * K, k + (size_t) i * ld, F, K);
		}
		/* R_j = Gamma(r, j) for j <= r, backwards from r: Kt = k_j R_j */
		for (int j = r; j >= 0; j--)
		{
			float	   *R = Rb + (size_t) j * K;

			if (j == r)
				for (int c = 0; c < K; c++)
					R[c] = 1.0f;
			else
				vmul(R, Rb + (size_t) (j + 1) * K, a + (size_t) (j + 1) * K, K);
			vmul(Kt + (size_t) j * K, k + (size_t) j * ld, R, K);
		}
		/* P[i, 0..s0) = X1 Kt^T ; A[i, 0..s0) = beta_i X2 Kt^T */
		cpu_sgemm(false, true, m, s0, K, 1.0f, X1, K, Kt, K, 0.0f, P + (size_t) s0 * C, C);
		cpu_sgemm(false, true, m, s0, K, 1.0f, X2, K, Kt, K, 0.0f, A + (size_t) s0 * C, C);
		for (int i = s0; i < s1; i++)
			simd->scale(A + (size_t) i * C, beta[i], s0);
	}

	/* right-hand side: T = beta (v - (Gamma k) S0) */
	for (int t = 0; t < C; t++)
		vmul(X1 + (size_t) t * K, k + (size_t) t * ld, Gam + (size_t) t * K, K);
	cpu_sgemm(false, false, C, V, K, 1.0f, X1, K, S, V, 0.0f, T, V);
	for (int t = 0; t < C; t++)
		for (int x = 0; x < V; x++)
			T[(size_t) t * V + x] = beta[t] * (v[(size_t) t * ld + x] - T[(size_t) t * V + x]);

	/* forward substitution: u_t = T_t - sum_{j<t} A[t, j] u_j */
	for (int t = 0; t < C; t++)
	{
		float	   *ut = U + (size_t) t * V;

		memcpy(ut, T + (size_t) t * V, sizeof(float) * V);
		for (int j = 0; j < t; j++)
			simd->axpy(ut, -A[(size_t) t * C + j], U + (size_t) j * V, V);
	}

	/* o = (Gamma q) S0 + P U */
	for (int t = 0; t < C; t++)
		vmul(X1 + (size_t) t * K, q + (size_t) t * ld, Gam + (size_t) t * K, K);
	cpu_sgemm(false, false, C, V, K, 1.0f, X1, K, S, V, 0.0f, T, V);
	cpu_sgemm(false, false, C, V, C, 1.0f, P, C, U, V, 1.0f, T, V);
	for (int t = 0; t < C; t++)
		memcpy(o + (size_t) t * ldo, T + (size_t) t * V, sizeof(float) * V);

	/* S = Gamma(C-1, -1) S0 + (Gamma(C-1, j) k_j)^T U */
	for (int j = C - 1; j >= 0; j--)
	{
		float	   *R = Rb + (size_t) j * K;

		if (j == C - 1)
			for (int c = 0; c < K; c++)
				R[c] = 1.0f;
		else
			vmul(R, Rb + (size_t) (j + 1) * K, a + (size_t) (j + 1) * K, K);
		vmul(Kt + (size_t) j * K, k + (size_t) j * ld, R, K);
	}
	for (int c = 0; c < K; c++)
		simd->scale(S + (size_t) c * V, Gam[(size_t) (C - 1) * K + c], V);
	cpu_sgemm(true, false, K, V, C, 1.0f, Kt, K, U, V, 1.0f, S, V);
}

/* ------------------------------------------------------------------ the fused op */

typedef struct kda_job
{
	kl_backend *be;
	const kl_step *st;
	const kl_kda_args *a;
	const kl_config *cfg;
} kda_job;

static inline float
softplus(float x)
{
	/* torch.nn.functional.softplus (beta 1, threshold 20) */
	return x > 20.0f ? x : log1pf(expf(x));
}

/*
 * Depthwise causal conv + silu over n rows of K channels (row stride ld), in
 * place.  tail [K, W] holds the W raw inputs before the first row (oldest
 * first) and is replaced by the last W raw inputs.
 */
static void
short_conv(float *u, int n, int ld, int K, const float *w, int W, float *tail, float *old)
{
	memcpy(old, tail, sizeof(float) * (size_t) K * W);
	/* new tail: the last W raw inputs of (old tail ++ rows) */
	for (int c = 0; c < K; c++)
		for (int j = 0; j < W; j++)
		{
			int			t = n - W + j;	/* row index; < 0 reaches into the old tail */

			tail[(size_t) c * W + j] = t >= 0 ? u[(size_t) t * ld + c] : old[(size_t) c * W + W + t];
		}
	/* backwards, so that rows still needed as inputs are not yet overwritten */
	for (int t = n - 1; t >= 0; t--)
		for (int c = 0; c < K; c++)
		{
			float		s = 0;

			for (int j = 0; j < W; j++)
			{
				int			src = t - W + 1 + j;
				float		x = src >= 0 ? u[(size_t) src * ld + c] : old[(size_t) c * W + W + src];

				s += w[(size_t) c * W + j] * x;
			}
			u[(size_t) t * ld + c] = kl_silu(s);
		}
}

static void
l2norm(float *x, int K, float scale)
{
	float		ss = 0;

	for (int c = 0; c < K; c++)
		ss += x[c] * x[c];
	ss = scale / sqrtf(ss + 1e-6f);
	for (int c = 0; c < K; c++)
		x[c] *= ss;
}

static void
kda_task(void *arg, int task, int thread)
{
	kda_job    *j = arg;
	const kl_config *cfg = j->cfg;
	const kl_kda_args *a = j->a;
	int			H = cfg->kda_heads,
				K = cfg->kda_head_dim,
				V = K,
				W = cfg->conv_kernel,
				HK = H * K;
	int			si = task / H,
				h = task % H;
	kl_seq	   *seq = j->st->seqs[si];
	int			r0 = j->st->row0[si],
				n = j->st->row0[si + 1] - r0;
	float	   *S = seq->kda_S[a->kda_index] + (size_t) h * K * V;
	float	   *conv = seq->kda_conv[a->kda_index];
	float	   *q = a->q + (size_t) r0 * HK + (size_t) h * K;
	float	   *k = a->k + (size_t) r0 * HK + (size_t) h * K;
	float	   *v = a->v + (size_t) r0 * HK + (size_t) h * K;
	float	   *g = a->f + (size_t) r0 * HK + (size_t) h * K;
	float	   *o = a->out + (size_t) r0 * HK + (size_t) h * K;
	const float *gate = a->gate + (size_t) r0 * HK + (size_t) h * K;
	float	   *old = cpu_scratch(j->be, SCRATCH_A, thread);
	float	   *beta = cpu_scratch(j->be, SCRATCH_B, thread);
	float		A = -expf(a->w->A_log[h]);
	float		qscale = 1.0f / sqrtf((float) K);

	/* 1. short conv + silu on q, k, v (the tails of this head's channels) */
	short_conv(q, n, HK, K, a->w->conv_q + (size_t) h * K * W, W, conv + (size_t) h * K * W, old);
	short_conv(k, n, HK, K, a->w->conv_k + (size_t) h * K * W, W, conv + (size_t) HK * W + (size_t) h * K * W, old);
	short_conv(v, n, HK, V, a->w->conv_v + (size_t) h * K * W, W, conv + (size_t) 2 * HK * W + (size_t) h * K * W, old);

	for (int t = 0; t < n; t++)
	{
		float	   *gt = g + (size_t) t * HK;
		const float *dtb = a->w->dt_bias + (size_t) h * K;

		/* 2. L2-normalized q (then scaled by K^-1/2) and k */
		l2norm(q + (size_t) t * HK, K, qscale);
		l2norm(k + (size_t) t * HK, K, 1.0f);
		/* 3. channel-wise decay in log space; 4. beta */
		for (int c = 0; c < K; c++)
			gt[c] = A * softplus(gt[c] + dtb[c]);
		beta[t] = kl_sigmoid(a->b[(size_t) (r0 + t) * H + h]);
	}

	/* 5. the delta rule */
	if (n <= RECURRENT_MAX || j->st->force_recurrent)
		kda_recurrent(S, K, V, n, q, k, v, g, HK, beta, o, HK, cpu_scratch(j->be, SCRATCH_C, thread),
					  cpu_scratch(j->be, SCRATCH_D, thread));
	else
	{
		float	   *ws = cpu_scratch(j->be, SCRATCH_C, thread);

		for (int c0 = 0; c0 < n; c0 += CHUNK)
		{
			int			C = n - c0 < CHUNK ? n - c0 : CHUNK;
			size_t		off = (size_t) c0 * HK;

			kda_chunk(S, K, V, C, q + off, k + off, v + off, g + off, HK, beta + c0, o + off, HK, ws);
		}
	}

	/* 6. per-head RMSNorm, gated by sigmoid(g_b(g_a x)) */
	for (int t = 0; t < n; t++)
	{
		float	   *ot = o + (size_t) t * HK;
		const float *gtt = gate + (size_t) t * HK;
		float		ss = 0,
					inv;

		for (int x = 0; x < V; x++)
			ss += ot[x] * ot[x];
		inv = 1.0f / sqrtf(ss / (float) V + cfg->rms_norm_eps);
		for (int x = 0; x < V; x++)
			ot[x] = a->w->o_norm[x] * (ot[x] * inv) * kl_sigmoid(gtt[x]);
	}
}

void
cpu_kda(kl_backend *be, const kl_step *st, const kl_kda_args *a)
{
	kda_job		j = {be, st, a, be->cfg};
	int			K = be->cfg->kda_head_dim;
	int			max_n = 0;

	for (int s = 0; s < st->n_seqs; s++)
		if (st->row0[s + 1] - st->row0[s] > max_n)
			max_n = st->row0[s + 1] - st->row0[s];
	if (!cpu_scratch_reserve(be, SCRATCH_A, (size_t) K * be->cfg->conv_kernel) ||
		!cpu_scratch_reserve(be, SCRATCH_B, (size_t) max_n) ||
		!cpu_scratch_reserve(be, SCRATCH_C, kda_chunk_scratch(K, K)) ||
		!cpu_scratch_reserve(be, SCRATCH_D, (size_t) K))
		return;
	kl_parallel_for(st->n_seqs * be->cfg->kda_heads, kda_task, &j);
}
