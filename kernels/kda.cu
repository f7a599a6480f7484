/*
 * kda.cu — Kimi Delta Attention on the GPU (the math: src/engine/cpu_kda.c's
 * header comment, which these kernels follow step for step).
 *
 *   kda_prep          per (row, head): short conv + silu on q, k, v (reading
 *                     the conv tails for positions before the step), L2 norm
 *                     of q (times K^-1/2) and k, decay g = -exp(A_log) *
 *                     softplus(f + dt_bias) in place of f, beta = sigmoid(b)
 *   kda_tails         the new conv tails (last W raw inputs), after kda_prep
 *   kda_recurrent     the per-token delta rule for sequences with few rows
 *                     (decode): one block per (sequence, head, 32 columns of
 *                     V); the block's slice of S stays in registers across
 *                     its tokens, S is read and written once per call
 *   kda_chunk_prep    chunkwise form, the parts that do not depend on the
 *                     state entering the chunk, for all chunks in parallel:
 *                     A = beta k.Gamma k (strictly lower), P = q.Gamma k
 *                     (lower), the WY solution W = (I+A)^-1 (beta Gam k) and
 *                     U0 = (I+A)^-1 (beta v), Qg = Gam q, Kt = k Gamma(end, j)
 *   kda_chunk_state   the sequential part, chunk after chunk, per (head, 16
 *                     columns of V): keep the entering state Hc, U = U0 - W S,
 *                     S = Gam_end S + Kt^T U
 *   kda_chunk_out     o = Qg Hc + P U, all chunks in parallel
 *   kda_gated_norm    per-head RMSNorm times sigmoid(gate)
 *
 * Decay factors are products of a = exp(g), never exponentials of cumulative
 * sums (cpu_kda.c explains why): pairs inside a 16-token sub-chunk build
 * Gamma(i, j) by running products, pairs across sub-chunks go through the
 * reference point just before the later sub-chunk, Gamma(i, j) = F_i R_j
 * with both factors <= 1.
 */
#include <type_traits>

#include "kda_common.cuh"

#define KDA_SLICE 32			/* columns of V per block in the state kernels */

/* ------------------------------------------------------------------ prep */

/*
 * The pieces of prep, recurrence and gated norm that the three decode
 * kernels and the fused one (kda_decode_kernel) share, so both paths do the
 * same operations in the same order (the fused kernel's outputs are the
 * three kernels' bit for bit).
 */

/* one tap of the short conv: weight wi of q, k and v times the inputs at
 * that position, added to the running sums (kda_conv_silu's order; the
 * early decode kernel adds the tails' taps before its wait and the row's
 * after, through this) */
__device__ __forceinline__ void
kda_conv_tap(float *sq, float *sk, float *sv, const float *__restrict__ conv_q, const float *__restrict__ conv_k,
			 const float *__restrict__ conv_v, size_t wi, float xq, float xk, float xv, bool with_v)
{
	*sq += conv_q[wi] * xq;
	*sk += conv_k[wi] * xk;
	*sv += (with_v ? conv_v[wi] : 0.0f) * xv;
}

/* short conv + silu of channel ch of row r0 + i on q, k and v; positions
 * before the step come from the conv tail.  !with_v: v's inputs and weights
 * are not read (*vv is silu(0)); the select, not a branch around the sum,
 * keeps the fused kernel from spilling */
__device__ __forceinline__ void
kda_conv_silu(const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,
			  const float *tail, const float *__restrict__ conv_q, const float *__restrict__ conv_k,
			  const float *__restrict__ conv_v, int HK, int W, int ch, int r0, int i, bool with_v,
			  float *qv, float *kv, float *vv)
{
	float		sq = 0,
				sk = 0,
				sv = 0;

	#pragma unroll 4
	for (int j = 0; j < W; j++)
	{
		int			idx = i - W + 1 + j;	/* < 0 reaches into the tail */
		float		xq,
					xk,
					xv;

		if (idx >= 0)
		{
			size_t		off = (size_t) (r0 + idx) * HK + ch;

			xq = q[off];
			xk = k[off];
			xv = with_v ? v[off] : 0.0f;
		}
		else
		{
			xq = tail[(size_t) ch * W + W + idx];
			xk = tail[(size_t) (HK + ch) * W + W + idx];
			xv = with_v ? tail[(size_t) (2 * HK + ch) * W + W + idx] : 0.0f;
		}
		kda_conv_tap(&sq, &sk, &sv, conv_q, conv_k, conv_v, (size_t) ch * W + j, xq, xk, xv, with_v);
	}
	*qv = siluf_(sq);
	*kv = siluf_(sk);
	*vv = siluf_(sv);
}

/* decode (the sequence's one row is row t): channel ch's new tail is the old
 * one shifted by one, then row t's raw input */
__device__ __forceinline__ void
kda_shift_tail(float *tail, const float *__restrict__ q, const float *__restrict__ k,
			   const float *__restrict__ v, int HK, int W, int ch, int t)
{
	size_t		off = (size_t) t * HK + ch;

	#pragma unroll 4
	for (int j = 0; j + 1 < W; j++)
	{
		tail[(size_t) ch * W + j] = tail[(size_t) ch * W + j + 1];
		tail[(size_t) (HK + ch) * W + j] = tail[(size_t) (HK + ch) * W + j + 1];
		tail[(size_t) (2 * HK + ch) * W + j] = tail[(size_t) (2 * HK + ch) * W + j + 1];
	}
	tail[(size_t) ch * W + W - 1] = q[off];
	tail[(size_t) (HK + ch) * W + W - 1] = k[off];
	tail[(size_t) (2 * HK + ch) * W + W - 1] = v[off];
}

/* x scaled by scale / ||x|| (ss = the head's sum of squares) */
__device__ __forceinline__ float
kda_l2_scaled(float x, float ss, float scale)
{
	return x * (scale / sqrtf(ss + 1e-6f));
}

/* decay g = A softplus(f + dt_bias), A = -exp(A_log) (FAST: softplusf_fast) */
template <bool FAST = false>
__device__ __forceinline__ float
kda_decay(float A, float f, float dt_bias)
{
	return A * (FAST ? softplusf_fast(f + dt_bias) : softplusf_(f + dt_bias));
}


__global__ void
kda_prep_kernel(int H, int K, int W, const float *__restrict__ q, const float *__restrict__ k,
				const float *__restrict__ v, float *f, const float *__restrict__ b,
				float *qo, float *ko, float *vo, float *beta,
				const float *__restrict__ conv_q, const float *__restrict__ conv_k,
				const float *__restrict__ conv_v, const float *__restrict__ A_log,
				const float *__restrict__ dt_bias, const int *__restrict__ row_seq,
				const int *__restrict__ row0, float *const *conv_tab, float qscale, int write_tails)
{
	__shared__ float red[32];
	int			t = blockIdx.x,
				h = blockIdx.y,
				c = threadIdx.x;
	int			HK = H * K;
	int			s,
				r0,
				i;
	float	   *tail;
	bool		act = c < K;
	int			ch = h * K + c;
	float		qv = 0,
				kv = 0,
				vv = 0;

	kk_dep_wait();
	kk_dep_launch();
	s = row_seq[t];
	r0 = row0[s];
	i = t - r0;
	tail = conv_tab[s];
	if (act)
	{
		kda_conv_silu(q, k, v, tail, conv_q, conv_k, conv_v, HK, W, ch, r0, i, true, &qv, &kv, &vv);
		if (write_tails)
			kda_shift_tail(tail, q, k, v, HK, W, ch, t);	/* read above, this thread's channel only */
	}
	{
		float		ssq = block_sum(act ? qv * qv : 0.0f, red);
		float		ssk = block_sum(act ? kv * kv : 0.0f, red);

		if (act)
		{
			size_t		off = (size_t) t * HK + ch;
			float		A = -expf(A_log[h]);

			qo[off] = kda_l2_scaled(qv, ssq, qscale);
			ko[off] = kda_l2_scaled(kv, ssk, 1.0f);
			vo[off] = vv;
			f[off] = kda_decay(A, f[off], dt_bias[ch]);
		}
	}
	if (c == 0)
		beta[(size_t) t * H + h] = sigmoidf_(b[(size_t) t * H + h]);
}


/*
 * Warp-per-(row, head) form of kda_gated_norm (KL_CUDA_KDA_ELEM_WARP, a mask
 * of kernels.h's KK_KDA_EW_* bits; K = 32, 64, 128 with 16-byte aligned
 * rows, else the block kernel): Nsight on the H200 at 8192 rows x 32 heads
 * x 128, 98 us against the block kernel's 317 (on by default).  The block
 * kernels spend most of their time in block_sum's two barriers and
 * shared-memory round trips.  Here K / 4 lanes hold a head's row, 4
 * adjacent channels a lane (16-byte loads and stores), and the head's sums
 * are shuffles, so nothing waits on a barrier.  (A prep kernel of the same
 * shape, mask bit 1, took 913 us against the block kernel's 667: its taps
 * waited for their loads one after the other; it was removed, and prefill
 * runs kda_prep_rows_kernel below instead, 384 us.)
 *
 * The outputs are the block kernels' bit for bit: every element goes
 * through the same functions (kda_l2_scaled, kda_gated, and in the rows
 * kernel below kda_conv_silu's taps in the same order and kda_decay), and
 * kda_head_sum adds the squares in block_sum's order (below), so the fused
 * decode kernel, which matches the block kernels bit for bit, matches these
 * too.
 *
 * A block is 8 warps; warp w takes row blockIdx.x * 8 + w and the 128 / K
 * heads from blockIdx.y * 128 / K.
 */
#define KDA_EW_WARPS 8

/* set by kk_set_kda_elem_warp: which of the kernels below run (KK_KDA_EW_* bits) */
static int kda_elem_mode = KK_KDA_EW_DEFAULT;

extern "C" int
kk_set_kda_elem_warp(int mode)
{
	int			was = kda_elem_mode;

	kda_elem_mode = mode;
	return was;
}

/* this lane's (row, head) in the warp kernels' grid; false past the ends */
template <int K>
__device__ __forceinline__ bool
kda_ew_place(int n_tokens, int H, int *t, int *h, int *c0)
{
	constexpr int LPH = K / 4;	/* lanes per head */
	int			lane = threadIdx.x & 31;

	*t = blockIdx.x * KDA_EW_WARPS + (threadIdx.x >> 5);
	*h = blockIdx.y * (32 / LPH) + lane / LPH;
	*c0 = 4 * (lane % LPH);
	return *t < n_tokens && *h < H;
}

/*
 * kda_prep_kernel for prefill steps (no tails to shift) as a warp that walks
 * KDA_RW_ROWS consecutive rows of the same head(s) (KL_CUDA_KDA_ELEM_WARP
 * bit 4, on by default; K = 32, 64, 128, conv widths 2 .. 4, 16-byte aligned
 * rows and conv weights, else the kernels above).
 *
 * Why: kda_prep_kernel is instruction bound, not memory bound (Nsight at
 * 8192 rows x 32 heads x 128: 0.67 ms, SM throughput 76 %, DRAM 33 %,
 * 523 M warp instructions = ~500 a thread for one channel's q, k, v and g).
 * Per thread it pays, for one channel: the whole row setup (row_seq, row0,
 * conv_tab, 20 parameters), 4 conv taps each with a branch into the tail,
 * 64-bit index products and 3 + 3 scalar loads (the weights reloaded for
 * every row), two block_sums (4 barriers, 20 shuffles, shared-memory round
 * trips), and the per-head scalars (expf(A_log), the norm's sqrt and
 * division) recomputed in all K threads.  A warp per (row, head) (mask
 * bit 1, since removed) cut the sums but kept the per-tap branches and
 * loads and the per-row setup, and each of its taps waited for its loads
 * before the next branch (913 us).
 * Here a lane holds 4 adjacent channels (float4) and walks the rows: the
 * block's conv weights go to shared memory once, before the wait for the
 * previous kernel (read back per row as W 16-byte loads an array: in
 * registers they would take 48 of them), dt_bias and exp(A_log) once per
 * lane, the W - 1 rows before the current one stay in registers (each
 * input row is loaded once, as one float4 per array), the next row's q, k,
 * v, f and b are loaded while this row computes, and the tails are read
 * only where a warp starts or a sequence starts (a warp-uniform branch).
 * PTX per lane and row (4 channels of q, k, v, g): ~550 instructions
 * besides moves (13 div.rn, 17 ex2, 28 shuffles, 160 fma) for what costs
 * kda_prep_kernel ~4 x 500 (its four threads' worth).  The element math is the same functions
 * in the same order (the taps oldest first from 0, siluf_, kda_head_sum =
 * block_sum's order, kda_l2_scaled, kda_decay, sigmoidf_), so the outputs
 * are kda_prep_kernel's bit for bit.  FAST (KK_KDA_EW_FAST, precision bf16
 * only): siluf_fast and softplusf_fast instead (~4e-6 relative; Nsight at
 * 8192 rows x 32 heads x 128 put 28 % of the kernel's instructions in
 * siluf_'s expf and IEEE division and 18 % in softplusf_).
 */
#define KDA_RW_ROWS 16
#define KDA_RW_WARPS 4
#define KDA_RW_MINB 4			/* blocks an SM: 128 registers a thread */

/* row t's q, k, v, f (4 channels from ch0) and b (this lane's head) */
struct kda_rw_row
{
	float4		x[3];
	float4		f;
	float		b;
};

/*
 * 4 consecutive channels as floats: one 16-byte load (fp32) or one 8-byte
 * load (bf16, widened exactly); and the store of 4 as fp32 (16 bytes) or
 * rounded to bf16 (8 bytes, nearest even: cvt_bf16x2).  (bf16 keeps 4
 * channels a lane, not 8 in 16-byte accesses: the lane's work, registers and
 * element math stay those of the fp32 form, so a bf16 input gives the
 * outputs of its widened fp32 values bit for bit, and 32 lanes' 8-byte
 * accesses still cover whole 32-byte sectors.)
 */
__device__ __forceinline__ float4
kda_ld4(const float *p)
{
	return *(const float4 *) p;
}

__device__ __forceinline__ float4
kda_ld4(const uint16_t *p)
{
	uint2		u = *(const uint2 *) p;

	return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
					   __uint_as_float(u.y & 0xffff0000u));
}

__device__ __forceinline__ void
kda_st4(float *p, float4 v)
{
	*(float4 *) p = v;
}

__device__ __forceinline__ void
kda_st4(uint16_t *p, float4 v)
{
	*(uint2 *) p = make_uint2(cvt_bf16x2(v.x, v.y), cvt_bf16x2(v.z, v.w));
}

template <typename TI>
__device__ __forceinline__ void
kda_rw_load(kda_rw_row *r, const TI *__restrict__ q, const TI *__restrict__ k, const TI *__restrict__ v,
			const TI *f, const float *__restrict__ b, int t, int H, int HK, int h, int ch0)
{
	size_t		off = (size_t) t * HK + ch0;

	r->x[0] = kda_ld4(q + off);
	r->x[1] = kda_ld4(k + off);
	r->x[2] = kda_ld4(v + off);
	r->f = kda_ld4(f + off);
	r->b = b[(size_t) t * H + h];
}

__device__ __forceinline__ float
kda_f4(float4 v, int e)
{
	return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

/* a 16-byte shared-memory load the compiler may not hoist out of the row
 * loop (held in registers across it, the 12 W conv weights would take 48
 * registers of the thread's budget) */
__device__ __forceinline__ float4
kda_lds4(const float4 *p)
{
	float4		r;
	unsigned	a = (unsigned) __cvta_generic_to_shared(p);

	asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n":"=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w):"r"(a));
	return r;
}

/* TI: the raw q, k, v, f (float, or uint16_t for bf16); TO: the prepared q,
 * k, v (the same); the decay g goes to g, fp32 (g == f for fp32 f: in place) */
template <int K, int W, bool FAST, typename TI, typename TO>
__global__ void __launch_bounds__(KDA_RW_WARPS * 32, KDA_RW_MINB)
kda_prep_rows_kernel(int n_tokens, int H, const TI *__restrict__ q, const TI *__restrict__ k,
					 const TI *__restrict__ v, const TI *f, float *g, const float *__restrict__ b,
					 TO *__restrict__ qo, TO *__restrict__ ko, TO *__restrict__ vo,
					 float *__restrict__ beta, const float *__restrict__ conv_q, const float *__restrict__ conv_k,
					 const float *__restrict__ conv_v, const float *__restrict__ A_log,
					 const float *__restrict__ dt_bias, const int *__restrict__ row_seq,
					 const int *__restrict__ row0, float *const *conv_tab, float qscale)
{
	constexpr int LPH = K / 4;	/* lanes per head */
	constexpr int HPW = 32 / LPH;	/* heads per warp */
	constexpr int R = KDA_RW_ROWS;
	/* the block's conv weights (its warps share the heads): lane L's 4 W
	 * weights of array a (channel-major, as conv_a) are sw[a][0..W-1][L] */
	__shared__ float4 sw[3][W][32];
	int			lane = threadIdx.x & 31;
	int			t0 = (blockIdx.y * KDA_RW_WARPS + (threadIdx.x >> 5)) * R;
	int			h = blockIdx.x * HPW + lane / LPH,
				c0 = 4 * (lane % LPH);
	bool		live = h < H;
	int			HK = H * K;
	int			hr = live ? h : 0;	/* lanes past the last head read head 0 and store nothing */
	int			ch0 = hr * K + c0;
	float		xw[3][W - 1][4];	/* the W - 1 raw rows before the current one, oldest first */
	float4		dt;
	float		A;
	int			nr,
				my_i = 0,
				my_s = 0;
	kda_rw_row	nx;

	/* weights only before the wait */
	for (int x = threadIdx.x; x < 3 * W * 32; x += KDA_RW_WARPS * 32)
	{
		int			a = x / (W * 32),
					u = x / 32 % W,
					L = x % 32,
					hL = blockIdx.x * HPW + L / LPH;
		const float *cw = a == 0 ? conv_q : a == 1 ? conv_k : conv_v;

		sw[a][u][L] = *(const float4 *) (cw + (size_t) ((hL < H ? hL : 0) * K + 4 * (L % LPH)) * W + 4 * u);
	}
	dt = *(const float4 *) (dt_bias + ch0);
	A = -expf(A_log[hr]);
	__syncthreads();

	kk_dep_wait();
	kk_dep_launch();
	if (t0 >= n_tokens)
		return;
	nr = min(R, n_tokens - t0);
	/* lane j < nr: row t0 + j's sequence and index in it */
	if (lane < nr)
	{
		my_s = row_seq[t0 + lane];
		my_i = t0 + lane - row0[my_s];
	}
	kda_rw_load(&nx, q, k, v, f, b, t0, H, HK, hr, ch0);
	/* the W - 1 rows before t0, without waiting for the row indices (rows
	 * of another sequence are replaced by the tail in the loop) */
#pragma unroll
	for (int m = 0; m < W - 1; m++)
	{
		int			r = t0 - (W - 1) + m;

#pragma unroll
		for (int a = 0; a < 3; a++)
		{
			float4		x4 = make_float4(0, 0, 0, 0);

			if (r >= 0)
				x4 = kda_ld4((a == 0 ? q : a == 1 ? k : v) + (size_t) r * HK + ch0);
#pragma unroll
			for (int e = 0; e < 4; e++)
				xw[a][m][e] = kda_f4(x4, e);
		}
	}

	for (int j = 0; j < nr; j++)
	{
		int			t = t0 + j,
					i = __shfl_sync(0xffffffffu, my_i, j),
					s = __shfl_sync(0xffffffffu, my_s, j);
		kda_rw_row	cur = nx;
		float		y[3][4];

		if (j + 1 < nr)
			kda_rw_load(&nx, q, k, v, f, b, t + 1, H, HK, hr, ch0);

		/* taps before the sequence's first row come from its tail: at the
		 * warp's first row (the rows loaded above) and at a sequence's first
		 * row (all W - 1); elsewhere the window is right */
		if (i < W - 1 && (j == 0 || i == 0))
		{
			const float *tail = conv_tab[s];

#pragma unroll
			for (int m = 0; m < W - 1; m++)
			{
				int			idx = i - (W - 1) + m;

				if (idx < 0)
#pragma unroll
					for (int a = 0; a < 3; a++)
#pragma unroll
						for (int e = 0; e < 4; e++)
							xw[a][m][e] = tail[(size_t) (a * HK + ch0 + e) * W + W + idx];
			}
		}

		/* kda_conv_silu: taps oldest first, summed from 0 */
#pragma unroll
		for (int a = 0; a < 3; a++)
		{
			float		wt[4 * W];	/* [channel][tap] */

#pragma unroll
			for (int u = 0; u < W; u++)
			{
				float4		w4 = kda_lds4(&sw[a][u][lane]);

				wt[4 * u] = w4.x;
				wt[4 * u + 1] = w4.y;
				wt[4 * u + 2] = w4.z;
				wt[4 * u + 3] = w4.w;
			}
#pragma unroll
			for (int e = 0; e < 4; e++)
			{
				float		sum = 0;
				float		xc = kda_f4(cur.x[a], e);

#pragma unroll
				for (int m = 0; m < W - 1; m++)
					sum += wt[e * W + m] * xw[a][m][e];
				sum += wt[e * W + W - 1] * xc;
				y[a][e] = FAST ? siluf_fast(sum) : siluf_(sum);
#pragma unroll
				for (int m = 0; m + 1 < W - 1; m++)
					xw[a][m][e] = xw[a][m + 1][e];
				xw[a][W - 2][e] = xc;
			}
		}

		{
			float		ssq = kda_head_sum<K>(y[0][0] * y[0][0], y[0][1] * y[0][1], y[0][2] * y[0][2],
											  y[0][3] * y[0][3]);
			float		ssk = kda_head_sum<K>(y[1][0] * y[1][0], y[1][1] * y[1][1], y[1][2] * y[1][2],
											  y[1][3] * y[1][3]);

			if (live)
			{
				size_t		off = (size_t) t * HK + ch0;

				kda_st4(qo + off, make_float4(kda_l2_scaled(y[0][0], ssq, qscale),
											  kda_l2_scaled(y[0][1], ssq, qscale),
											  kda_l2_scaled(y[0][2], ssq, qscale),
											  kda_l2_scaled(y[0][3], ssq, qscale)));
				kda_st4(ko + off, make_float4(kda_l2_scaled(y[1][0], ssk, 1.0f),
											  kda_l2_scaled(y[1][1], ssk, 1.0f),
											  kda_l2_scaled(y[1][2], ssk, 1.0f),
											  kda_l2_scaled(y[1][3], ssk, 1.0f)));
				kda_st4(vo + off, make_float4(y[2][0], y[2][1], y[2][2], y[2][3]));
				*(float4 *) (g + off) = make_float4(kda_decay<FAST>(A, cur.f.x, dt.x),
													kda_decay<FAST>(A, cur.f.y, dt.y),
													kda_decay<FAST>(A, cur.f.z, dt.z),
													kda_decay<FAST>(A, cur.f.w, dt.w));
				if (c0 == 0)
					beta[(size_t) t * H + h] = sigmoidf_(cur.b);
			}
		}
	}
}

/*
 * KL_CUDA_KDA_PREP_FORM (kk_set_kda_prep_form): forms of the rows prep above
 * for prefill in precision bf16 (its FAST math, bf16 raw q, k, v, f:
 * KL_CUDA_KDA_IN16's default; K = 32 / 64 / 128, conv width 4; elsewhere
 * form 0, the kernel above).  At 32768 tokens x 32 heads x 128 the kernel
 * above moves ~3.2 GB in 1.19 ms (2.7 TB/s of the ~4 the H200 streams),
 * and with bf16 inputs its PTX widens each loaded value to fp32 right
 * after its load, in the same conditional block (`if (j + 1 < nr)`), so
 * unless ptxas moves the widening out of that block (not checked: no SASS
 * tools on the development machine) the warp waits there for the next
 * row's loads and has no row in flight while it computes (16 warps an SM
 * then hold at most 16 rows, 16 KB, and only while they wait).  Form 1
 * measures that alone.  kda_prep_ring_kernel keeps the prefetched rows raw (uint2
 * per array, 8 registers a row) in a ring of P rows and widens a row only
 * when it is the current one, so P rows (P KB a warp) are in flight while
 * the warp computes; the row loop is unrolled by P, so the ring slots are
 * fixed registers (no copies, which would wait for the loads) and, at
 * P = W - 1, the conv window's shift is register renaming too.  beta
 * (sigmoidf_ of b) is computed once a walk, a lane a row, not by lane 0 of
 * every row with the other 31 lanes idle.  Same functions in the same order
 * for every element, so the outputs are form 0's bit for bit (but forms
 * 4-6's q, k or g, below; test_cuda.c's check_kda_prep_form compares each form
 * with form 0 by memcmp).  MATH bits:
 * KDA_PF_EX2FTZ, silu's exponential as ex2_ftz (one MUFU.EX2 where
 * __expf's ex2.approx.f32 adds three instructions to scale subnormal
 * results): the two differ only where 2^y < 2^-126, i.e. exp(-x) <
 * 1.2e-38, and there 1 + exp(-x) rounds to 1.0f either way (a subnormal y
 * gives 1.0f either way too); KDA_PF_RSQ, the L2 norms' factors by
 * rsqrt.approx (kda_l2_factor): q and k within 5.0e-7 relative an element
 * of form 0's (v, g, beta the same bits), inside FAST's ~4e-6.
 * KDA_PF_SPL, softplus without branches by kda_softplus_series (g within
 * ~3e-7 relative of form 0's; q, k, v, beta the same bits).
 *   form  P  MATH                ptxas (CUDA 13,     kernel, ms     op, ms
 *                                  sm_90a, K = 128,    (ncu, 32768    (8192 / 32768 /
 *                                  128 registers)      tokens)        131072 tokens)
 *   0     1  -                   no spills           1.17           1.373 / 5.290 / 20.85
 *   1     2  -                   no spills           1.10           1.356 / 5.226 / 20.59
 *   2     3  EX2FTZ              36 / 48 B spilled   1.14           1.368 / 5.256 / 20.74
 *   3     2  EX2FTZ              no spills           1.09           1.353 / 5.219 / 20.57
 *   4     3  EX2FTZ | RSQ        12 B spilled        1.06           1.345 / 5.185 / 20.45
 *   5     3  EX2FTZ | SPL        no spills           1.01           1.331 / 5.134 / 20.25
 *   6     3  EX2FTZ | SPL | RSQ  no spills           0.97           1.321 / 5.090 / 20.10
 * (H200, 2026-12-02, bench_cuda kda 32 128 with KL_BENCH_KDA_PREC=bf16, two
 * rounds within 0.01 ms.)  Form 6 is the default: its q, k and g move by
 * at most 5e-7 relative (FAST's bound is ~4e-6), the op 3.8 % faster than
 * form 0 at 32k.  Only the fp32 q, k, v out (KL_CUDA_KDA_OUT16 off, the
 * default) have the forms.  A first sweep (same day) had softplus in a
 * branch-free transcription of libdevice's log1pf (same bits; it left before
 * landing: NVIDIA's code, not ours), 4 rows in flight (no faster), evict-first
 * stores of g and v (as plain; CS stays a template switch no form sets) and
 * 5 blocks an SM (96 registers, spills: slower than 4).
 */
#define KDA_PF_FORMS 7			/* forms 0 .. 6 */
#define KDA_PF_EX2FTZ 1			/* kda_prep_ring_kernel's MATH: silu through ex2_ftz */
#define KDA_PF_RSQ 2			/* the norms' factors by rsqrt.approx (not the same bits) */
#define KDA_PF_SPL 4			/* softplus by kda_softplus_series (not the same bits) */

/* set by kk_set_kda_prep_form: the form above that prefill's FAST rows prep runs */
static int kda_prep_form = 6;

extern "C" int
kk_set_kda_prep_form(int form)
{
	int			was = kda_prep_form;

	kda_prep_form = form >= 0 && form < KDA_PF_FORMS ? form : 0;
	return was;
}

/* one row's raw q, k, v, f (4 channels a lane): as loaded, widened when used */
template <typename TI>
struct kda_raw_row
{
	typedef uint2 raw;
	raw			x[4];
};

template <>
struct kda_raw_row<float>
{
	typedef float4 raw;
	raw			x[4];
};

__device__ __forceinline__ float4
kda_widen4(uint2 u)
{
	return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
					   __uint_as_float(u.y & 0xffff0000u));
}

__device__ __forceinline__ float4
kda_widen4(float4 u)
{
	return u;
}

/* the raw q, k, v, f at element offset `off` (no widening here: nothing
 * waits for the loads; 32-bit offsets, which take no 64-bit registers for
 * pointers advanced row by row: the launcher checks that they fit) */
template <typename TI>
__device__ __forceinline__ void
kda_raw_load(kda_raw_row<TI> *r, const TI *__restrict__ q, const TI *__restrict__ k, const TI *__restrict__ v,
			 const TI *f, unsigned off)
{
	typedef typename kda_raw_row<TI>::raw raw;

	r->x[0] = *(const raw *) (q + off);
	r->x[1] = *(const raw *) (k + off);
	r->x[2] = *(const raw *) (v + off);
	r->x[3] = *(const raw *) (f + off);
}

/* silu, FAST: siluf_fast, or the same with ex2_ftz (form 3's same-bits
 * argument above); -log2(e) as __expf's multiply has it */
template <bool EX2FTZ>
__device__ __forceinline__ float
kda_silu_pf(float x)
{
	return EX2FTZ ? __fdividef(x, 1.0f + ex2_ftz(x * __int_as_float(0xbfb8aa3bu))) : siluf_fast(x);
}


/*
 * softplus for the FAST rows prep without branches (KDA_PF_SPL; ours, not
 * libdevice's log1pf): softplus(x) = max(x, 0) + log1p(t), t = exp(-|x|)
 * in (0, 1], and log1p(t) = 2 atanh(s) = 2 (s + s^3 / 3 + s^5 / 5 + ...),
 * s = t / (2 + t) in (0, 1/3], summed to s^13 (the next term is below
 * 1.5e-8 of s).  t is ex2.approx.ftz of -|x| log2(e), as __expf forms
 * exp(x), so the argument's rounding costs what softplusf_fast's costs; a
 * CPU emulation (exp2f for ex2, x in [-87, 40] by 1e-5) put it within
 * 2.6e-7 relative of softplusf_fast's value and within 1.0e-6 of the exact
 * softplus for x >= -20 (where decays matter: g = A softplus).  Past
 * x = 20 max(x, 0) + 2e-9 rounds to x, which is softplusf_'s threshold
 * without the branch; +-inf and NaN give softplusf_'s inf, 0 and NaN; an
 * exp(-|x|) below 2^-126 is flushed to 0 (softplus then 1.2e-38 too small).
 */
__device__ __forceinline__ float
kda_softplus_series(float x)
{
	float		t = ex2_ftz(-fabsf(x) * 1.44269504088896341f);
	float		s = __fdividef(t, 2.0f + t),
				s2 = s * s,
				p = 1.0f / 13.0f;

	p = fmaf(p, s2, 1.0f / 11.0f);
	p = fmaf(p, s2, 1.0f / 9.0f);
	p = fmaf(p, s2, 1.0f / 7.0f);
	p = fmaf(p, s2, 1.0f / 5.0f);
	p = fmaf(p, s2, 1.0f / 3.0f);
	p = fmaf(p, s2, 1.0f);
	return fmaxf(x, 0.0f) + 2.0f * s * p;
}

/* kda_decay<true>, or with kda_softplus_series (SPL) */
template <bool SPL>
__device__ __forceinline__ float
kda_decay_pf(float A, float f, float dt_bias)
{
	return SPL ? A * kda_softplus_series(f + dt_bias) : kda_decay<true>(A, f, dt_bias);
}

/*
 * The L2 norm's factor scale / ||x|| (ss = the head's sum of squares):
 * kda_l2_scaled's, scale / sqrtf(ss + 1e-6f) (sqrt.rn + div.rn, ~20
 * instructions with their slow-path checks), or with RSQ scale *
 * rsqrt.approx.ftz(ss + 1e-6f) (one MUFU.RSQ and a multiply; ss + 1e-6 is
 * normal, so ftz changes nothing).  rsqrt.approx is within 2 ulp (CUDA's
 * rsqrtf bound): a CPU emulation with its error at +-2 ulp (4e7 cases,
 * sums of squares 1e-8 .. 1e6, bench/notes-cuda.md) put x * factor within
 * 5.0e-7 relative of kda_l2_scaled's and 3.9e-7 of the exact value
 * (kda_l2_scaled's own: 1.6e-7).
 */
template <bool RSQ>
__device__ __forceinline__ float
kda_l2_factor(float ss, float scale)
{
	float		r;

	if (!RSQ)
		return scale / sqrtf(ss + 1e-6f);
	asm("rsqrt.approx.ftz.f32 %0, %1;\n":"=f"(r):"f"(ss + 1e-6f));
	return scale * r;
}

/* a 16-byte store, optionally evict-first (st.global.cs) */
template <bool CS>
__device__ __forceinline__ void
kda_st4f(float *p, float4 v)
{
	if (CS)
		__stcs((float4 *) p, v);
	else
		*(float4 *) p = v;
}

template <bool CS>
__device__ __forceinline__ void
kda_st4o(float *p, float4 v)
{
	kda_st4f<CS>(p, v);
}

template <bool CS>
__device__ __forceinline__ void
kda_st4o(uint16_t *p, float4 v)
{
	uint2		u = make_uint2(cvt_bf16x2(v.x, v.y), cvt_bf16x2(v.z, v.w));

	if (CS)
		__stcs((uint2 *) p, u);
	else
		*(uint2 *) p = u;
}

/*
 * kda_prep_rows_kernel's walk (same grid, same rows a warp, FAST math) with
 * P rows in flight (the comment above).  MINB: blocks an SM for the launch
 * bounds; MATH: KDA_PF_* bits; CS: g and v stored evict-first.
 */
template <int K, int W, typename TI, typename TO, int P, int MINB, int MATH, bool CS>
__global__ void __launch_bounds__(KDA_RW_WARPS * 32, MINB)
kda_prep_ring_kernel(int n_tokens, int H, const TI *__restrict__ q, const TI *__restrict__ k,
					 const TI *__restrict__ v, const TI *f, float *g, const float *__restrict__ b,
					 TO *__restrict__ qo, TO *__restrict__ ko, TO *__restrict__ vo,
					 float *__restrict__ beta, const float *__restrict__ conv_q, const float *__restrict__ conv_k,
					 const float *__restrict__ conv_v, const float *__restrict__ A_log,
					 const float *__restrict__ dt_bias, const int *__restrict__ row_seq,
					 const int *__restrict__ row0, float *const *conv_tab, float qscale)
{
	constexpr int LPH = K / 4;	/* lanes per head */
	constexpr int HPW = 32 / LPH;	/* heads per warp */
	constexpr int R = KDA_RW_ROWS;
	static_assert(W == 4, "the ring forms read the conv weights a channel at a time: W = 4");
	__shared__ float4 sw[3][W][32];	/* as kda_prep_rows_kernel's */
	int			lane = threadIdx.x & 31;
	int			t0 = (blockIdx.y * KDA_RW_WARPS + (threadIdx.x >> 5)) * R;
	int			h = blockIdx.x * HPW + lane / LPH,
				c0 = 4 * (lane % LPH);
	bool		live = h < H;
	int			HK = H * K;
	int			hr = live ? h : 0;	/* lanes past the last head read head 0 and store nothing */
	int			ch0 = hr * K + c0;
	float		xw[3][W - 1][4];	/* the W - 1 raw rows before the current one, oldest first */
	float4		dt;
	float		A;
	int			nr,
				my_i = 0,
				my_s = 0;
	kda_raw_row<TI> ring[P];	/* rows j .. j + P - 1 of the walk, slot j % P */

	for (int x = threadIdx.x; x < 3 * W * 32; x += KDA_RW_WARPS * 32)
	{
		int			a = x / (W * 32),
					u = x / 32 % W,
					L = x % 32,
					hL = blockIdx.x * HPW + L / LPH;
		const float *cw = a == 0 ? conv_q : a == 1 ? conv_k : conv_v;

		sw[a][u][L] = *(const float4 *) (cw + (size_t) ((hL < H ? hL : 0) * K + 4 * (L % LPH)) * W + 4 * u);
	}
	dt = *(const float4 *) (dt_bias + ch0);
	A = -expf(A_log[hr]);
	__syncthreads();

	kk_dep_wait();
	kk_dep_launch();
	if (t0 >= n_tokens)
		return;
	nr = min(R, n_tokens - t0);
	/* the ring's first P rows, then the W - 1 rows before t0, then the row
	 * indices (their loads wait for one another) */
#pragma unroll
	for (int d = 0; d < P; d++)
		if (d < nr)
			kda_raw_load(&ring[d], q, k, v, f, (unsigned) (t0 + d) * HK + ch0);
#pragma unroll
	for (int m = 0; m < W - 1; m++)
	{
		int			r = t0 - (W - 1) + m;

#pragma unroll
		for (int a = 0; a < 3; a++)
		{
			float4		x4 = make_float4(0, 0, 0, 0);

			if (r >= 0)
				x4 = kda_ld4((a == 0 ? q : a == 1 ? k : v) + (size_t) r * HK + ch0);
#pragma unroll
			for (int e = 0; e < 4; e++)
				xw[a][m][e] = kda_f4(x4, e);
		}
	}
	if (lane < nr)
	{
		my_s = row_seq[t0 + lane];
		my_i = t0 + lane - row0[my_s];
	}
	/* beta of the walk's rows and the warp's heads, a lane a (row, head) */
	for (int x = lane; x < HPW * R; x += 32)
	{
		int			hh = blockIdx.x * HPW + x / R,
					r = x % R;

		if (r < nr && hh < H)
			beta[(size_t) (t0 + r) * H + hh] = sigmoidf_(b[(size_t) (t0 + r) * H + hh]);
	}

	for (int j0 = 0; j0 < nr; j0 += P)
#pragma unroll
		for (int d = 0; d < P; d++)
		{
			int			j = j0 + d;

			if (j < nr)
			{
				int			t = t0 + j,
							i = __shfl_sync(0xffffffffu, my_i, j),
							s = __shfl_sync(0xffffffffu, my_s, j);
				float4		xc[3],
							fc;
				float		y[3][4];

#pragma unroll
				for (int a = 0; a < 3; a++)
					xc[a] = kda_widen4(ring[d].x[a]);
				fc = kda_widen4(ring[d].x[3]);
				if (j + P < nr)
					kda_raw_load(&ring[d], q, k, v, f, (unsigned) (t + P) * HK + ch0);

				/* kda_prep_rows_kernel's taps from the tails */
				if (i < W - 1 && (j == 0 || i == 0))
				{
					const float *tail = conv_tab[s];

#pragma unroll
					for (int m = 0; m < W - 1; m++)
					{
						int			idx = i - (W - 1) + m;

						if (idx < 0)
#pragma unroll
							for (int a = 0; a < 3; a++)
#pragma unroll
								for (int e = 0; e < 4; e++)
									xw[a][m][e] = tail[(size_t) (a * HK + ch0 + e) * W + W + idx];
					}
				}

				/* kda_conv_silu: taps oldest first, summed from 0 (at W = 4,
				 * sw[a][e] is channel e's 4 taps: one 16-byte load a channel,
				 * so 4 weights live at a time, not 16) */
#pragma unroll
				for (int a = 0; a < 3; a++)
				{
#pragma unroll
					for (int e = 0; e < 4; e++)
					{
						float4		w4 = kda_lds4(&sw[a][e][lane]);
						float		sum = 0;
						float		x = kda_f4(xc[a], e);

						sum += w4.x * xw[a][0][e];
						sum += w4.y * xw[a][1][e];
						sum += w4.z * xw[a][2][e];
						sum += w4.w * x;
						y[a][e] = kda_silu_pf<(MATH & KDA_PF_EX2FTZ) != 0>(sum);
#pragma unroll
						for (int m = 0; m + 1 < W - 1; m++)
							xw[a][m][e] = xw[a][m + 1][e];
						xw[a][W - 2][e] = x;
					}
				}

				{
					float		ssq = kda_head_sum<K>(y[0][0] * y[0][0], y[0][1] * y[0][1], y[0][2] * y[0][2],
													  y[0][3] * y[0][3]);
					float		ssk = kda_head_sum<K>(y[1][0] * y[1][0], y[1][1] * y[1][1], y[1][2] * y[1][2],
													  y[1][3] * y[1][3]);

					if (live)
					{
						unsigned	off = (unsigned) t * HK + ch0;
						/* (kda_l2_scaled's factor, once a row as nvcc computes it there) */
						float		fq = kda_l2_factor<(MATH & KDA_PF_RSQ) != 0>(ssq, qscale),
									fk = kda_l2_factor<(MATH & KDA_PF_RSQ) != 0>(ssk, 1.0f);

						kda_st4o<false>(qo + off, make_float4(y[0][0] * fq, y[0][1] * fq, y[0][2] * fq,
															  y[0][3] * fq));
						kda_st4o<false>(ko + off, make_float4(y[1][0] * fk, y[1][1] * fk, y[1][2] * fk,
															  y[1][3] * fk));
						kda_st4o<CS>(vo + off, make_float4(y[2][0], y[2][1], y[2][2], y[2][3]));
						kda_st4f<CS>(g + off, make_float4(kda_decay_pf<(MATH & KDA_PF_SPL) != 0>(A, fc.x, dt.x),
														  kda_decay_pf<(MATH & KDA_PF_SPL) != 0>(A, fc.y, dt.y),
														  kda_decay_pf<(MATH & KDA_PF_SPL) != 0>(A, fc.z, dt.z),
														  kda_decay_pf<(MATH & KDA_PF_SPL) != 0>(A, fc.w, dt.w)));
					}
				}
			}
		}
}

/* the warp kernels take these pointers as float4 */
static bool
kda_ew_aligned(const void *const *p, int n)
{
	for (int i = 0; i < n; i++)
		if (((uintptr_t) p[i]) % 16 != 0)
			return false;
	return true;
}

/* the warp kernels' grid and whether they cover K (and mode bit `bit` is set) */
static bool
kda_ew_grid(int n_tokens, int H, int K, int bit, dim3 *grid)
{
	if (!(kda_elem_mode & bit) || (K != 32 && K != 64 && K != 128))
		return false;
	*grid = dim3((unsigned) ceil_div((size_t) n_tokens, KDA_EW_WARPS), (unsigned) ceil_div((size_t) H, 128 / K));
	return true;
}

/* kda_prep_rows_kernel<K, W, FAST, TI, TO> for conv widths 2 .. 4, else NULL */
template <int K, bool FAST, typename TI, typename TO>
static decltype(&kda_prep_rows_kernel<K, 2, FAST, TI, TO>)
kda_prep_rows_for(int W)
{
	return W == 4 ? kda_prep_rows_kernel<K, 4, FAST, TI, TO> : W == 3 ? kda_prep_rows_kernel<K, 3, FAST, TI, TO> :
		W == 2 ? kda_prep_rows_kernel<K, 2, FAST, TI, TO> : NULL;
}

template <bool FAST, typename TI, typename TO>
static decltype(&kda_prep_rows_kernel<32, 2, FAST, TI, TO>)
kda_prep_rows_pick(int K, int W)
{
	/* (the kernels of the three head sizes have the same type) */
	typedef decltype(&kda_prep_rows_kernel<32, 2, FAST, TI, TO>) fn;

	return K == 32 ? (fn) kda_prep_rows_for<32, FAST, TI, TO>(W) :
		K == 64 ? (fn) kda_prep_rows_for<64, FAST, TI, TO>(W) :
		K == 128 ? (fn) kda_prep_rows_for<128, FAST, TI, TO>(W) : NULL;
}

/* kda_prep_ring_kernel for form 1 .. KDA_PF_FORMS - 1 (the KDA_PF_* comment's table), else NULL */
template <int K, typename TI, typename TO>
static decltype(&kda_prep_ring_kernel<K, 4, TI, TO, 2, KDA_RW_MINB, 0, false>)
kda_prep_ring_for(int form)
{
	constexpr int B = KDA_RW_MINB;

	switch (form)
	{
		case 1:
			return kda_prep_ring_kernel<K, 4, TI, TO, 2, B, 0, false>;
		case 2:
			return kda_prep_ring_kernel<K, 4, TI, TO, 3, B, KDA_PF_EX2FTZ, false>;
		case 3:
			return kda_prep_ring_kernel<K, 4, TI, TO, 2, B, KDA_PF_EX2FTZ, false>;
		case 4:
			return kda_prep_ring_kernel<K, 4, TI, TO, 3, B, KDA_PF_EX2FTZ | KDA_PF_RSQ, false>;
		case 5:
			return kda_prep_ring_kernel<K, 4, TI, TO, 3, B, KDA_PF_EX2FTZ | KDA_PF_SPL, false>;
		case 6:
			return kda_prep_ring_kernel<K, 4, TI, TO, 3, B, KDA_PF_EX2FTZ | KDA_PF_SPL | KDA_PF_RSQ, false>;
	}
	return NULL;
}

/* the form's kernel where it covers the shape (bf16 raw inputs, conv width 4;
 * the caller asks for FAST), else NULL (form 0: kda_prep_rows_kernel) */
template <typename TI, typename TO>
static decltype(&kda_prep_rows_kernel<32, 2, true, TI, TO>)
kda_prep_ring_pick(int K, int W, int form)
{
	if constexpr (std::is_same<TI, uint16_t>::value && std::is_same<TO, float>::value)
	{
		if (W != 4 || form <= 0 || form >= KDA_PF_FORMS)
			return NULL;
		return K == 32 ? kda_prep_ring_for<32, TI, TO>(form) : K == 64 ? kda_prep_ring_for<64, TI, TO>(form) :
			K == 128 ? kda_prep_ring_for<128, TI, TO>(form) : NULL;
	}
	return NULL;
}

/* prefill with KK_KDA_EW_PREP_ROWS: kda_prep_rows_kernel where it covers
 * K, W and the alignment (fast and KK_KDA_EW_FAST: its FAST form); true
 * when launched.  TI / TO: the raw inputs' and the prepared q, k, v's type
 * (bf16 as uint16_t: 8-byte aligned rows; fp32 16-byte) */
template <typename TI, typename TO>
static bool
kda_prep_rows(cudaStream_t s, int n_tokens, int H, int K, int W, const TI *q, const TI *k, const TI *v,
			  const TI *f, float *g, const float *b, TO *qo, TO *ko, TO *vo, float *beta,
			  const float *conv_q, const float *conv_k, const float *conv_v, const float *A_log,
			  const float *dt_bias, const int *row_seq, const int *row0, float *const *conv_tab, float qscale,
			  bool fast)
{
	const void *pi[] = {q, k, v, f},
			   *po[] = {qo, ko, vo},
			   *p[] = {g, dt_bias, conv_q, conv_k, conv_v};
	size_t		walks = ceil_div((size_t) n_tokens, KDA_RW_ROWS * KDA_RW_WARPS);
	decltype(&kda_prep_rows_kernel<32, 2, false, TI, TO>) kern;
	dim3		grid;

	if (!(kda_elem_mode & KK_KDA_EW_PREP_ROWS) || !kda_ew_aligned(p, 5) || walks > 65535)
		return false;
	for (int i = 0; i < 4; i++)
		if ((uintptr_t) pi[i] % (4 * sizeof(TI)) != 0 || (i < 3 && (uintptr_t) po[i] % (4 * sizeof(TO)) != 0))
			return false;
	kern = fast && (kda_elem_mode & KK_KDA_EW_FAST) ? kda_prep_rows_pick<true, TI, TO>(K, W) :
		kda_prep_rows_pick<false, TI, TO>(K, W);
	/* KL_CUDA_KDA_PREP_FORM: the ring forms, FAST only */
	if (kern && fast && (kda_elem_mode & KK_KDA_EW_FAST) && (size_t) n_tokens * H * K <= 0xffffffffu &&
		kda_prep_ring_pick<TI, TO>(K, W, kda_prep_form))
		kern = kda_prep_ring_pick<TI, TO>(K, W, kda_prep_form);	/* (32-bit element offsets) */
	if (!kern)
		return false;
	/* heads fastest: the blocks running at once cover whole rows (16 KB runs at the 48B shape) */
	grid = dim3((unsigned) ceil_div((size_t) H, 128 / K), (unsigned) walks);
	kk_launch(kern, grid, dim3(KDA_RW_WARPS * 32), 0, s, n_tokens, H, q, k, v, f, g, b, qo, ko, vo, beta, conv_q,
			  conv_k, conv_v, A_log, dt_bias, row_seq, row0, conv_tab, qscale);
	return true;
}

/* prefill: kda_prep_rows_kernel (KK_KDA_EW_PREP_ROWS) where it covers the
 * shape; else (and for decode steps, which shift the tails) kda_prep_kernel
 * (exact functions whatever fast says) */
extern "C" void
kk_kda_prep(cudaStream_t s, int n_tokens, int H, int K, int W, const float *q, const float *k, const float *v,
			float *f, const float *b, float *qo, float *ko, float *vo, float *beta,
			const float *conv_q, const float *conv_k, const float *conv_v, const float *A_log,
			const float *dt_bias, const int *row_seq, const int *row0, float *const *conv_tab, int write_tails,
			int fast)
{
	dim3		grid(n_tokens, H);
	float		qscale = 1.0f / sqrtf((float) K);

	if (n_tokens > 0 && !write_tails &&
		kda_prep_rows(s, n_tokens, H, K, W, q, k, v, (const float *) f, f, b, qo, ko, vo, beta, conv_q, conv_k,
					  conv_v, A_log, dt_bias, row_seq, row0, conv_tab, qscale, fast != 0))
		return;
	if (n_tokens > 0)
		kk_launch(kda_prep_kernel, grid, dim3((K + 31) / 32 * 32), 0, s, H, K, W, q, k, v, f, b, qo, ko, vo, beta,
				  conv_q, conv_k, conv_v, A_log, dt_bias, row_seq, row0, conv_tab, qscale, write_tails);
}

/* prefill, kda_prep_rows_kernel only, raw inputs and prepared q, k, v in
 * either type (KL_CUDA_KDA_IN16 / _OUT16: cuda_kda.c); 0 launched, -1 not
 * covered (nothing launched) */
extern "C" int
kk_kda_prep_rows16(cudaStream_t s, int n_tokens, int H, int K, int W, int in16, const void *q, const void *k,
				   const void *v, const void *f, float *g, const float *b, int out16, void *qo, void *ko, void *vo,
				   float *beta, const float *conv_q, const float *conv_k, const float *conv_v, const float *A_log,
				   const float *dt_bias, const int *row_seq, const int *row0, float *const *conv_tab, int fast)
{
	float		qscale = 1.0f / sqrtf((float) K);
	bool		ok;

	if (n_tokens <= 0)
		return 0;
#define KDA_ROWS16_CALL(TI, TO) \
	kda_prep_rows(s, n_tokens, H, K, W, (const TI *) q, (const TI *) k, (const TI *) v, (const TI *) f, g, b, \
				  (TO *) qo, (TO *) ko, (TO *) vo, beta, conv_q, conv_k, conv_v, A_log, dt_bias, row_seq, row0, \
				  conv_tab, qscale, fast != 0)
	if (in16)
		ok = out16 ? KDA_ROWS16_CALL(uint16_t, uint16_t) : KDA_ROWS16_CALL(uint16_t, float);
	else
		ok = out16 ? KDA_ROWS16_CALL(float, uint16_t) : KDA_ROWS16_CALL(float, float);
#undef KDA_ROWS16_CALL
	return ok ? 0 : -1;
}

__device__ __forceinline__ float
kda_to_f32(float x)
{
	return x;
}

__device__ __forceinline__ float
kda_to_f32(uint16_t x)
{
	return bf16_to_f32(x);
}

/* new tail = the last W raw inputs of (old tail ++ the sequence's rows);
 * T: the inputs' type (bf16 as uint16_t: widened, the values the conv read) */
template <typename T>
__global__ void
kda_tails_kernel(int n_seqs, int HK, int W, const T *q, const T *k, const T *v,
				 const int *row0, float *const *conv_tab)
{
	size_t		gid = blockIdx.x * (size_t) blockDim.x + threadIdx.x;
	int			s,
				which,
				ch,
				r0,
				n;
	const T    *u;
	float	   *tail;
	float		old[8];

	if (gid >= (size_t) n_seqs * 3 * HK)
		return;
	s = (int) (gid / (3 * (size_t) HK));
	which = (int) (gid % (3 * (size_t) HK)) / HK;
	ch = (int) (gid % HK);
	u = which == 0 ? q : which == 1 ? k : v;
	r0 = row0[s];
	n = row0[s + 1] - r0;
	tail = conv_tab[s] + (size_t) (which * HK + ch) * W;
	for (int j = 0; j < W; j++)
		old[j] = tail[j];
	for (int j = 0; j < W; j++)
	{
		int			t = n - W + j;

		tail[j] = t >= 0 ? kda_to_f32(u[(size_t) (r0 + t) * HK + ch]) : old[W + t];
	}
}

template <typename T>
static void
kda_tails_launch(cudaStream_t s, int n_seqs, int HK, int W, const T *q, const T *k, const T *v, const int *row0,
				 float *const *conv_tab)
{
	size_t		n = (size_t) n_seqs * 3 * HK;

	if (n > 0)
		kda_tails_kernel<<<ceil_div(n, 256), 256, 0, s>>>(n_seqs, HK, W, q, k, v, row0, conv_tab);
}

extern "C" void
kk_kda_tails(cudaStream_t s, int n_seqs, int HK, int W, const float *q, const float *k, const float *v,
			 const int *row0, float *const *conv_tab)
{
	kda_tails_launch(s, n_seqs, HK, W, q, k, v, row0, conv_tab);
}

extern "C" void
kk_kda_tails16(cudaStream_t s, int n_seqs, int HK, int W, const uint16_t *q, const uint16_t *k, const uint16_t *v,
			   const int *row0, float *const *conv_tab)
{
	kda_tails_launch(s, n_seqs, HK, W, q, k, v, row0, conv_tab);
}

/* ------------------------------------------------------------------ per-token recurrence */

/*
 * One token of the recurrence on a block's slice (kda_recurrent_kernel's
 * layout below; the fused decode kernel's too): sq, sk, sa hold q, k and
 * a = exp(g) of the head in shared memory.
 */

/* k.q, in warp 0 */
template <int K>
__device__ __forceinline__ float
kda_kq(const float *sk, const float *sq, int lane)
{
	float		kq = 0;

	for (int c = lane; c < K; c += 32)
		kq += sk[c] * sq[c];
	return warp_sum(kq);
}

/* this thread's rows' parts of w = S^T (a k) and z = S^T (a q) */
template <int RPT>
__device__ __forceinline__ void
kda_wz_part(const float *st, const float *sq, const float *sk, const float *sa, int cg, float *w, float *z)
{
#pragma unroll
	for (int i = 0; i < RPT; i++)
	{
		int			c = cg + 8 * i;

		*w += sa[c] * sk[c] * st[i];
		*z += sa[c] * sq[c] * st[i];
	}
}

/* the 8 warps' parts of column lane, summed in warp order */
__device__ __forceinline__ void
kda_wz_sum(float (*pw)[32], float (*pz)[32], int lane, float *W_, float *Z_)
{
#pragma unroll
	for (int j = 0; j < 8; j++)
	{
		*W_ += pw[j][lane];
		*Z_ += pz[j][lane];
	}
}

/*
 * One token's w = S^T (a k) and z = S^T (a q) summed over the block's warps
 * into W_, Z_ (added to them), and k.q into *skq (shared; warp 0 writes it):
 * kda_kq, kda_wz_part, one block barrier, kda_wz_sum.  Every thread calls it.
 */
template <int K, int RPT>
__device__ __forceinline__ void
kda_wz(const float *st, const float *sq, const float *sk, const float *sa, int cg, int lane, float (*pw)[32],
	   float (*pz)[32], float *skq, float *W_, float *Z_)
{
	float		w = 0,
				z = 0;

	if (cg == 0)
	{
		float		kq = kda_kq<K>(sk, sq, lane);

		if (lane == 0)
			*skq = kq;
	}
	kda_wz_part<RPT>(st, sq, sk, sa, cg, &w, &z);
	pw[cg][lane] = w;
	pz[cg][lane] = z;
	__syncthreads();
	kda_wz_sum(pw, pz, lane, W_, Z_);
}

/* S = diag(a) S + k u^T on this thread's rows */
template <int RPT>
__device__ __forceinline__ void
kda_state_update(float *st, const float *sk, const float *sa, int cg, float u)
{
#pragma unroll
	for (int i = 0; i < RPT; i++)
	{
		int			c = cg + 8 * i;

		st[i] = sa[c] * st[i] + sk[c] * u;
	}
}

/* the value stored for a state entry (round16: rounded to bf16, a measurement
 * of what a bf16 state would cost in accuracy; bench_cuda drift) */
__device__ __forceinline__ float
kda_state_out(float x, int round16)
{
	return round16 ? bf16_to_f32(f32_to_bf16(x)) : x;
}

/*
 * Block (sequence, head, slice of 32 columns); warp w holds rows c = w + 8 i
 * of the slice, lane = column.  Per token (cpu_kda.c, kda_recurrent):
 *   w = S^T (a k), z = S^T (a q), u = beta (v - w), o = z + u (k.q),
 *   S = diag(a) S + k u^T.
 */
template <int K>
__global__ void __launch_bounds__(256)
kda_recurrent_kernel(int H, const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,
					 const float *__restrict__ g, const float *__restrict__ beta, float *o,
					 const int *__restrict__ row0, float *const *S_tab, int max_rows, int round16)
{
	constexpr int V = K;
	constexpr int RPT = K / 8;
	__shared__ float sq[K],
				sk[K],
				sa[K];
	__shared__ float pw[8][32],
				pz[8][32];
	__shared__ float skq;
	int			s = blockIdx.x,
				h = blockIdx.y,
				x = blockIdx.z * KDA_SLICE + (threadIdx.x & 31);
	int			lane = threadIdx.x & 31,
				cg = threadIdx.x >> 5;
	int			r0,
				n;
	int			HK = H * K;
	float	   *S;
	float		st[RPT];

	kk_dep_wait();
	kk_dep_launch();
	r0 = row0[s];
	n = row0[s + 1] - r0;
	if (n > max_rows)
		return;					/* taken by the chunkwise kernels */
	S = S_tab[s] + (size_t) h * K * V;
#pragma unroll
	for (int i = 0; i < RPT; i++)
		st[i] = S[(size_t) (cg + 8 * i) * V + x];

	for (int t = 0; t < n; t++)
	{
		size_t		off = (size_t) (r0 + t) * HK + (size_t) h * K;
		float		W_ = 0,
					Z_ = 0,
					u;

		__syncthreads();		/* the previous token's reads of the vectors are done */
		for (int c = threadIdx.x; c < K; c += blockDim.x)
		{
			sq[c] = q[off + c];
			sk[c] = k[off + c];
			sa[c] = expf(g[off + c]);
		}
		__syncthreads();
		kda_wz<K, RPT>(st, sq, sk, sa, cg, lane, pw, pz, &skq, &W_, &Z_);
		u = beta[(size_t) (r0 + t) * H + h] * (v[off + x] - W_);
		if (cg == 0)
			o[off + x] = Z_ + u * skq;
		kda_state_update<RPT>(st, sk, sa, cg, u);
	}
#pragma unroll
	for (int i = 0; i < RPT; i++)
		S[(size_t) (cg + 8 * i) * V + x] = kda_state_out(st[i], round16);
}

extern "C" int
kk_kda_recurrent(cudaStream_t s, int n_seqs, int H, int K, const float *q, const float *k, const float *v,
				 const float *g, const float *beta, float *o, const int *row0, float *const *S_tab, int max_rows,
				 int round16)
{
	dim3		grid(n_seqs, H, K / KDA_SLICE);

	if (n_seqs <= 0)
		return 0;
	switch (K)
	{
		case 32:
			kk_launch(kda_recurrent_kernel<32>, grid, dim3(256), 0, s, H, q, k, v, g, beta, o, row0, S_tab, max_rows,
					  round16);
			return 0;
		case 64:
			kk_launch(kda_recurrent_kernel<64>, grid, dim3(256), 0, s, H, q, k, v, g, beta, o, row0, S_tab, max_rows,
					  round16);
			return 0;
		case 128:
			kk_launch(kda_recurrent_kernel<128>, grid, dim3(256), 0, s, H, q, k, v, g, beta, o, row0, S_tab, max_rows,
					  round16);
			return 0;
	}
	return -1;
}

/* ------------------------------------------------------------------ chunkwise: prep */

/* floats of dynamic shared memory of kda_chunk_prep_kernel<K> */
static size_t
chunk_prep_smem(int K)
{
	size_t		C = KDA_CHUNK;
	size_t		pairs = (size_t) (KDA_SUB + KDA_SUB + (KDA_CHUNK - KDA_SUB)) * (K + 1) + 2 * 16 * 16 * 16;
	size_t		solve = C * (2 * K) + C * C + 3 * 16 * 16;	/* X, (I+A)^-1, block products */

	return 3 * C * K + 2 * C * C + C + (pairs > solve ? pairs : solve);
}

/* The regions of kda_chunk_prep_kernel's dynamic shared memory (floats). */
struct chunk_prep_shared
{
	float	   *sq;				/* [C][K] */
	float	   *sk;				/* [C][K] */
	float	   *sa;				/* [C][K] a = exp(g) */
	float	   *sA;				/* [C][C] */
	float	   *sP;				/* [C][C] */
	float	   *sb;				/* [C] beta */
	/* a union: the pair scratch X1, X2, Kr, redp, reda, then the solve's X */
	float	   *X1;				/* [16][KP] */
	float	   *X2;				/* [16][KP] */
	float	   *Kr;				/* [48][KP] */
	float	   *redp;			/* [16][16][16] */
	float	   *reda;
	float	   *X;				/* [C][K + V], then Li and Tb (step 4) */
};

template <int K>
__device__ __forceinline__ chunk_prep_shared
chunk_prep_layout(float *smem)
{
	constexpr int C = KDA_CHUNK;
	constexpr int KP = K + 1;	/* padded rows: threads reading different rows, same column */
	chunk_prep_shared s;
	float	   *un;

	s.sq = smem;
	s.sk = s.sq + C * K;
	s.sa = s.sk + C * K;
	s.sA = s.sa + C * K;
	s.sP = s.sA + C * C;
	s.sb = s.sP + C * C;
	un = s.sb + C;
	s.X1 = un;
	s.X2 = s.X1 + KDA_SUB * KP;
	s.Kr = s.X2 + KDA_SUB * KP;
	s.redp = s.Kr + (C - KDA_SUB) * KP;
	s.reda = s.redp + 16 * 16 * 16;
	s.X = un;
	return s;
}

/* 1. load (asynchronous copies of the rows); rows past the end: k = q = 0,
 * a = 1, beta = 0 (they change nothing); then a = exp(g) */
template <int K>
__device__ __forceinline__ void
chunk_prep_load(const chunk_prep_shared &s, const float *__restrict__ q, const float *__restrict__ k,
				const float *__restrict__ g, const float *__restrict__ beta, int H, int h, int t0, int Cn, int tid)
{
	constexpr int C = KDA_CHUNK;
	int			HK = H * K;
	float	   *sq = s.sq;
	float	   *sk = s.sk;
	float	   *sa = s.sa;
	float	   *sA = s.sA;
	float	   *sP = s.sP;
	float	   *sb = s.sb;

	for (int e = tid; e < C * (K / 4); e += blockDim.x)
	{
		int			t = e / (K / 4),
					c = 4 * (e % (K / 4));

		if (t < Cn)
		{
			size_t		off = (size_t) (t0 + t) * HK + (size_t) h * K + c;

			cp_async16(sq + t * K + c, q + off);
			cp_async16(sk + t * K + c, k + off);
			cp_async16(sa + t * K + c, g + off);
		}
		else
		{
			*(float4 *) (sq + t * K + c) = make_float4(0, 0, 0, 0);
			*(float4 *) (sk + t * K + c) = make_float4(0, 0, 0, 0);
		}
	}
	for (int e = tid; e < C * C; e += blockDim.x)
	{
		sA[e] = 0;
		sP[e] = 0;
	}
	if (tid < C)
		sb[tid] = tid < Cn ? beta[(size_t) (t0 + tid) * H + h] : 0.0f;
	cp_async_wait_all();
	__syncthreads();
	for (int e = tid; e < C * K; e += blockDim.x)
		sa[e] = e / K < Cn ? expf(sa[e]) : 1.0f;
	__syncthreads();
}

/* 2a. pairs inside each sub-chunk: thread (j, slice) runs the product
 * Gamma(i, j) over i and writes per-slice partial dots */
template <int K>
__device__ __forceinline__ void
chunk_prep_pairs_within(const chunk_prep_shared &s, int tid)
{
	constexpr int C = KDA_CHUNK;
	constexpr int CS = K / 16;	/* channels per slice in the diagonal blocks */
	float	   *sq = s.sq;
	float	   *sk = s.sk;
	float	   *sa = s.sa;
	float	   *sA = s.sA;
	float	   *sP = s.sP;
	float	   *sb = s.sb;
	float	   *redp = s.redp;
	float	   *reda = s.reda;

	for (int b = 0; b < C / KDA_SUB; b++)
	{
		int			jj = tid / 16,
					sl = tid % 16;
		int			j = b * KDA_SUB + jj;
		float		d[CS],
					kj[CS];

		/* slice sl holds channels sl, sl + 16, ...: the 16 slices of a row read
		 * 16 consecutive words (no bank conflicts) */
#pragma unroll
		for (int cs = 0; cs < CS; cs++)
		{
			d[cs] = 1.0f;
			kj[cs] = sk[j * K + sl + 16 * cs];
		}
		for (int ii = jj; ii < KDA_SUB; ii++)
		{
			int			i = b * KDA_SUB + ii;
			float		pp = 0,
						aa = 0;

#pragma unroll
			for (int cs = 0; cs < CS; cs++)
			{
				int			c = sl + 16 * cs;

				if (ii > jj)
					d[cs] *= sa[i * K + c];
				pp += sq[i * K + c] * (kj[cs] * d[cs]);
				aa += sk[i * K + c] * (kj[cs] * d[cs]);
			}
			redp[(ii * 16 + jj) * 16 + sl] = pp;
			reda[(ii * 16 + jj) * 16 + sl] = aa;
		}
		__syncthreads();
		{
			int			ii = tid / 16;

			/* jj = tid % 16 */
			if (tid % 16 <= ii)
			{
				int			jj2 = tid % 16;
				float		pp = 0,
							aa = 0;

				for (int s2 = 0; s2 < 16; s2++)
				{
					pp += redp[(ii * 16 + jj2) * 16 + s2];
					aa += reda[(ii * 16 + jj2) * 16 + s2];
				}
				sP[(b * KDA_SUB + ii) * C + b * KDA_SUB + jj2] = pp;
				if (jj2 < ii)
					sA[(b * KDA_SUB + ii) * C + b * KDA_SUB + jj2] = sb[b * KDA_SUB + ii] * aa;
			}
		}
		__syncthreads();
	}
}

/* 2b. pairs across sub-chunks, through r = s0 - 1:
 * X1 = q_i F_i, X2 = k_i F_i (i in the sub-chunk), Kr = k_j R_j (j <= r) */
template <int K>
__device__ __forceinline__ void
chunk_prep_pairs_across(const chunk_prep_shared &s, int tid)
{
	constexpr int C = KDA_CHUNK;
	constexpr int KP = K + 1;
	float	   *sq = s.sq;
	float	   *sk = s.sk;
	float	   *sa = s.sa;
	float	   *sA = s.sA;
	float	   *sP = s.sP;
	float	   *sb = s.sb;
	float	   *X1 = s.X1;
	float	   *X2 = s.X2;
	float	   *Kr = s.Kr;

	for (int b = 1; b < C / KDA_SUB; b++)
	{
		int			s0 = b * KDA_SUB;

		for (int c = tid; c < K; c += blockDim.x)
		{
			float		F = 1.0f,
						R = 1.0f;

			for (int ii = 0; ii < KDA_SUB; ii++)
			{
				int			i = s0 + ii;

				F *= sa[i * K + c];
				X1[ii * KP + c] = sq[i * K + c] * F;
				X2[ii * KP + c] = sk[i * K + c] * F;
			}
			for (int j = s0 - 1; j >= 0; j--)
			{
				Kr[j * KP + c] = sk[j * K + c] * R;
				R *= sa[j * K + c];
			}
		}
		__syncthreads();
		for (int p = tid; p < KDA_SUB * s0; p += blockDim.x)
		{
			int			ii = p / s0,
						j = p % s0;
			float		pp = 0,
						aa = 0;

#pragma unroll 8
			for (int c = 0; c < K; c++)
			{
				float		kr = Kr[j * KP + c];

				pp += X1[ii * KP + c] * kr;
				aa += X2[ii * KP + c] * kr;
			}
			sP[(s0 + ii) * C + j] = pp;
			sA[(s0 + ii) * C + j] = sb[s0 + ii] * aa;
		}
		__syncthreads();
	}
}

/* 3. Gam (decay since the chunk start) by running products per channel:
 * Qg = q Gam, the k half of the solve's right-hand side [beta Gam k | beta v],
 * Kt = k Gamma(end, j), glast = Gamma(end, -1) */
template <int K, bool B16>
__device__ __forceinline__ void
chunk_prep_decays(const chunk_prep_shared &s, float *Qg, float *Kt, float *glast, size_t tile, int tid)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	float	   *sq = s.sq;
	float	   *sk = s.sk;
	float	   *sa = s.sa;
	float	   *sb = s.sb;
	float	   *X = s.X;

	for (int c = tid; c < K; c += blockDim.x)
	{
		float		run = 1.0f;
		float	   *qg = Qg + tile * C * K;
		float	   *kt = Kt + tile * C * K;

		/* B16 (kk_kda_chunk_prep_bf16): Qg as bf16 [C][K], Kt transposed as
		 * bf16 [K][C] (the A operand of the state update K^T U) */
		uint16_t   *qg16 = (uint16_t *) Qg + tile * C * K;
		uint16_t   *kt16 = (uint16_t *) Kt + tile * C * K;

		for (int t = 0; t < C; t++)
		{
			run *= sa[t * K + c];
			if (B16)
				qg16[t * K + c] = f32_to_bf16(sq[t * K + c] * run);
			else
				qg[t * K + c] = sq[t * K + c] * run;
			X[t * (K + V) + c] = sb[t] * sk[t * K + c] * run;
		}
		glast[tile * K + c] = run;
		run = 1.0f;
		for (int t = C - 1; t >= 0; t--)
		{
			if (B16)
				kt16[c * C + t] = f32_to_bf16(sk[t * K + c] * run);
			else
				kt[t * K + c] = sk[t * K + c] * run;
			run *= sa[t * K + c];
		}
	}
}

/* 3b. the v half of the right-hand side, beta v (rows past the end: 0) */
template <int K>
__device__ __forceinline__ void
chunk_prep_load_v(const chunk_prep_shared &s, const float *__restrict__ v, int H, int h, int t0, int Cn, int tid)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	int			HK = H * K;
	float	   *sb = s.sb;
	float	   *X = s.X;

	for (int e = tid; e < C * (V / 4); e += blockDim.x)
	{
		int			t = e / (V / 4),
					x = 4 * (e % (V / 4));

		if (t < Cn)
			cp_async16(X + t * (K + V) + K + x, v + (size_t) (t0 + t) * HK + (size_t) h * K + x);
		else
			*(float4 *) (X + t * (K + V) + K + x) = make_float4(0, 0, 0, 0);
	}
	cp_async_wait_all();
	__syncthreads();
	for (int e = tid; e < C * V; e += blockDim.x)
		X[(e / V) * (K + V) + K + e % V] *= sb[e / V];
	__syncthreads();
}

/*
 * 4. X = (I + A)^-1 X.  The inverse of the unit lower-triangular I + A by
 * 16 x 16 blocks: the diagonal blocks by substitution (one column per
 * thread), then Li_ij = -Li_ii sum_{k=j..i-1} A_ik Li_kj in order of
 * block distance; then one register-tiled product.  (A dependent chain of
 * 2016 FMAs per column, the substitution over the whole chunk, was the
 * slowest part of this kernel.)  Li [C][C] and Tb [3][16][16] follow X.
 */

/* 4a and 4b, the inverse (chunk_prep_invert_diagonal, chunk_prep_invert_below),
 * are in kda_common.cuh: kda_chunk_prep_mma.cu inverts the same way */

/* 4c. X = Li X, one register-tiled product */
template <int K>
__device__ __forceinline__ void
chunk_prep_apply_inverse(float *X, const float *Li, int tid)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	constexpr int QUADS = (K + V) / 4;
	constexpr int RGS = 256 / QUADS;
	constexpr int RPG = C / RGS;
	int			cq = tid % QUADS,
				rg = tid / QUADS;
	float4		acc[RPG];

#pragma unroll
	for (int r = 0; r < RPG; r++)
		acc[r] = make_float4(0, 0, 0, 0);
	/* Li is lower triangular: rows of this group need k < (rg + 1) RPG */
	for (int k = 0; k < (rg + 1) * RPG; k++)
	{
		float4		x4 = *(const float4 *) (X + k * (K + V) + 4 * cq);

#pragma unroll
		for (int r = 0; r < RPG; r++)
		{
			float		l = Li[(rg * RPG + r) * C + k];

			acc[r].x += l * x4.x;
			acc[r].y += l * x4.y;
			acc[r].z += l * x4.z;
			acc[r].w += l * x4.w;
		}
	}
	__syncthreads();
#pragma unroll
	for (int r = 0; r < RPG; r++)
		*(float4 *) (X + (rg * RPG + r) * (K + V) + 4 * cq) = acc[r];
}

/* 5. W, U0, P out (B16: as bf16, same layouts) */
template <int K, bool B16>
__device__ __forceinline__ void
chunk_prep_store(const chunk_prep_shared &s, float *Wk, float *U0, float *Pout, size_t tile, int tid)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	float	   *sP = s.sP;
	float	   *X = s.X;

	for (int e = tid; e < C * K; e += blockDim.x)
	{
		int			t = e / K,
					c = e % K;

		if (B16)
		{
			((uint16_t *) Wk)[tile * C * K + e] = f32_to_bf16(X[t * (K + V) + c]);
			((uint16_t *) U0)[tile * C * V + e] = f32_to_bf16(X[t * (K + V) + K + c]);
		}
		else
		{
			Wk[tile * C * K + e] = X[t * (K + V) + c];
			U0[tile * C * V + e] = X[t * (K + V) + K + c];
		}
	}
	for (int e = tid; e < C * C; e += blockDim.x)
		if (B16)
			((uint16_t *) Pout)[tile * C * C + e] = f32_to_bf16(sP[e]);
		else
			Pout[tile * C * C + e] = sP[e];
}

/*
 * One fused kernel per (chunk, head), its stages the functions above, in
 * order; every stage ends at a barrier that the next relies on.  B16: the
 * same fp32 arithmetic, the outputs stored as bf16 operands for the
 * tensor-core recurrence (kda_chunk_mma.cu; Kt transposed there, glast fp32).
 */
template <int K, bool B16>
__global__ void __launch_bounds__(256)
kda_chunk_prep_kernel(int n, int H, const float *__restrict__ q, const float *__restrict__ k,
					  const float *__restrict__ v, const float *__restrict__ g, const float *__restrict__ beta,
					  float *Wk, float *U0, float *Qg, float *Kt, float *Pout, float *glast)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	extern __shared__ float smem[];
	chunk_prep_shared s = chunk_prep_layout<K>(smem);
	int			chunk = blockIdx.x,
				h = blockIdx.y;
	int			tid = threadIdx.x;
	int			t0 = chunk * C;
	int			Cn = n - t0 < C ? n - t0 : C;	/* real rows of this chunk */
	size_t		tile = (size_t) chunk * H + h;

	chunk_prep_load<K>(s, q, k, g, beta, H, h, t0, Cn, tid);
	chunk_prep_pairs_within<K>(s, tid);
	chunk_prep_pairs_across<K>(s, tid);
	chunk_prep_decays<K, B16>(s, Qg, Kt, glast, tile, tid);
	chunk_prep_load_v<K>(s, v, H, h, t0, Cn, tid);
	{
		float	   *Li = s.X + C * (K + V);	/* [C][C] */
		float	   *Tb = Li + C * C;	/* [3][16][16] */

		chunk_prep_invert_diagonal(s.sA, Li, tid);
		chunk_prep_invert_below(s.sA, Li, Tb, tid);
		chunk_prep_apply_inverse<K>(s.X, Li, tid);
	}
	__syncthreads();
	chunk_prep_store<K, B16>(s, Wk, U0, Pout, tile, tid);
}

/* ------------------------------------------------------------------ chunkwise: state */

#define KDA_VS 16				/* columns of V per block of the state kernel */

static size_t
chunk_state_smem(int K)
{
	size_t		C = KDA_CHUNK;

	return 2 * C * K + C * KDA_VS + (size_t) K * KDA_VS + K;
}

/*
 * The only part that is sequential over chunks: per (head, 16 columns of V),
 * with S the state entering the chunk,
 *     Hc[chunk] = S;   U = U0 - W S (in place of U0);   S = Gam_end S + Kt^T U.
 * The outputs then come from kda_chunk_out for all chunks in parallel.
 * Shared memory ~72 KB (K = 128): two blocks per SM, one loading while the
 * other computes.  Thread mapping: U rows 4g..4g+3 (g = tid / 16), S rows
 * 8g..8g+7, column x = tid % 16; products read 16-byte vectors of W and Kt.
 */
template <int K>
__global__ void __launch_bounds__(256)
kda_chunk_state_kernel(int n, int H, const float *__restrict__ Wk, float *U, const float *__restrict__ Kt,
					   const float *__restrict__ glast, float *S, float *Hc)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	extern __shared__ float smem[];
	float	   *sW = smem;		/* [C][K] */
	float	   *sK = sW + C * K;	/* [C][K] */
	float	   *sU = sK + C * K;	/* [C][VS] */
	float	   *sS = sU + C * KDA_VS;	/* [K][VS] */
	float	   *sg = sS + K * KDA_VS;	/* [K] */
	int			h = blockIdx.x,
				x0 = blockIdx.y * KDA_VS;
	int			tid = threadIdx.x,
				x = tid % KDA_VS,
				g = tid / KDA_VS;
	int			nc = (n + C - 1) / C;
	float	   *Sh = S + (size_t) h * K * V;

	for (int e = tid; e < K * KDA_VS; e += blockDim.x)
		sS[e] = Sh[(size_t) (e / KDA_VS) * V + x0 + e % KDA_VS];
	__syncthreads();

	for (int chunk = 0; chunk < nc; chunk++)
	{
		size_t		tile = (size_t) chunk * H + h;
		float	   *Ut = U + tile * C * V;

		{
			float	   *hc = Hc + tile * K * V;

			copy_f4_async(sW, Wk + tile * C * K, C * K);
			copy_f4_async(sK, Kt + tile * C * K, C * K);
			copy_f4_async(sg, glast + tile * K, K);
			for (int e = tid; e < C * KDA_VS / 4; e += blockDim.x)
				cp_async16(sU + 4 * e, Ut + (size_t) (e / (KDA_VS / 4)) * V + x0 + 4 * (e % (KDA_VS / 4)));
			/* the state entering this chunk, for the output kernel */
			for (int e = tid; e < K * KDA_VS; e += blockDim.x)
				hc[(size_t) (e / KDA_VS) * V + x0 + e % KDA_VS] = sS[e];
			cp_async_wait_all();
		}
		__syncthreads();

		/* U = U0 - W S */
		{
			float		acc[4];

#pragma unroll
			for (int r = 0; r < 4; r++)
				acc[r] = sU[(4 * g + r) * KDA_VS + x];
			for (int c = 0; c < K; c += 4)
			{
				float		s0 = sS[(c + 0) * KDA_VS + x],
							s1 = sS[(c + 1) * KDA_VS + x],
							s2 = sS[(c + 2) * KDA_VS + x],
							s3 = sS[(c + 3) * KDA_VS + x];

#pragma unroll
				for (int r = 0; r < 4; r++)
				{
					float4		w4 = *(const float4 *) (sW + (4 * g + r) * K + c);

					acc[r] -= w4.x * s0 + w4.y * s1 + w4.z * s2 + w4.w * s3;
				}
			}
			__syncthreads();	/* everyone has read U0 */
#pragma unroll
			for (int r = 0; r < 4; r++)
			{
				sU[(4 * g + r) * KDA_VS + x] = acc[r];
				Ut[(size_t) (4 * g + r) * V + x0 + x] = acc[r];
			}
		}
		__syncthreads();

		/* S = Gam_end S + Kt^T U */
		{
			float		acc[8];
			bool		rows = 8 * g < K;	/* K < 128: some threads have no rows */

#pragma unroll
			for (int i = 0; i < 8; i++)
				acc[i] = rows ? sg[8 * g + i] * sS[(8 * g + i) * KDA_VS + x] : 0.0f;
			if (rows)
				for (int j = 0; j < C; j++)
				{
					float		u = sU[j * KDA_VS + x];
					float4		a = *(const float4 *) (sK + j * K + 8 * g),
								b = *(const float4 *) (sK + j * K + 8 * g + 4);

					acc[0] += a.x * u;
					acc[1] += a.y * u;
					acc[2] += a.z * u;
					acc[3] += a.w * u;
					acc[4] += b.x * u;
					acc[5] += b.y * u;
					acc[6] += b.z * u;
					acc[7] += b.w * u;
				}
			__syncthreads();	/* everyone has read S */
			if (rows)
#pragma unroll
				for (int i = 0; i < 8; i++)
					sS[(8 * g + i) * KDA_VS + x] = acc[i];
		}
		__syncthreads();
	}
	for (int e = tid; e < K * KDA_VS; e += blockDim.x)
		Sh[(size_t) (e / KDA_VS) * V + x0 + e % KDA_VS] = sS[e];
}

/* ------------------------------------------------------------------ chunkwise: outputs */

static size_t
chunk_out_smem(int K)
{
	size_t		C = KDA_CHUNK;

	return C * K + (size_t) K * K + C * C + C * (size_t) K;
}

/*
 * o = Qg Hc + P U for every (chunk, head) in parallel.  Thread: 4 adjacent
 * columns (one float4) of RPT rows; 16-byte shared loads on both operands.
 */
template <int K>
__global__ void __launch_bounds__(256)
kda_chunk_out_kernel(int n, int H, const float *__restrict__ Qg, const float *__restrict__ Hc,
					 const float *__restrict__ Pm, const float *__restrict__ U, float *o)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	constexpr int QUADS = V / 4;
	constexpr int RG = 256 / QUADS;
	constexpr int RPT = C / RG;
	extern __shared__ float smem[];
	float	   *sQ = smem;		/* [C][K] */
	float	   *sH = sQ + C * K;	/* [K][V] */
	float	   *sP = sH + K * V;	/* [C][C] */
	float	   *sU = sP + C * C;	/* [C][V] */
	int			chunk = blockIdx.x,
				h = blockIdx.y;
	int			tid = threadIdx.x,
				xq = tid % QUADS,
				rg = tid / QUADS;
	size_t		tile = (size_t) chunk * H + h;
	int			t0 = chunk * C;
	float4		acc[RPT];

	copy_f4_async(sQ, Qg + tile * C * K, C * K);
	copy_f4_async(sU, U + tile * C * V, C * V);
	copy_f4_async(sH, Hc + tile * K * V, K * V);
	copy_f4_async(sP, Pm + tile * C * C, C * C);
	cp_async_wait_all();
	__syncthreads();

#pragma unroll
	for (int r = 0; r < RPT; r++)
		acc[r] = make_float4(0, 0, 0, 0);
	for (int c = 0; c < K; c += 4)
	{
		float4		h0 = *(const float4 *) (sH + (c + 0) * V + 4 * xq),
					h1 = *(const float4 *) (sH + (c + 1) * V + 4 * xq),
					h2 = *(const float4 *) (sH + (c + 2) * V + 4 * xq),
					h3 = *(const float4 *) (sH + (c + 3) * V + 4 * xq);

#pragma unroll
		for (int r = 0; r < RPT; r++)
		{
			float4		q4 = *(const float4 *) (sQ + (rg * RPT + r) * K + c);

			acc[r].x += q4.x * h0.x + q4.y * h1.x + q4.z * h2.x + q4.w * h3.x;
			acc[r].y += q4.x * h0.y + q4.y * h1.y + q4.z * h2.y + q4.w * h3.y;
			acc[r].z += q4.x * h0.z + q4.y * h1.z + q4.z * h2.z + q4.w * h3.z;
			acc[r].w += q4.x * h0.w + q4.y * h1.w + q4.z * h2.w + q4.w * h3.w;
		}
	}
	for (int j = 0; j < C; j += 4)
	{
		float4		u0 = *(const float4 *) (sU + (j + 0) * V + 4 * xq),
					u1 = *(const float4 *) (sU + (j + 1) * V + 4 * xq),
					u2 = *(const float4 *) (sU + (j + 2) * V + 4 * xq),
					u3 = *(const float4 *) (sU + (j + 3) * V + 4 * xq);

#pragma unroll
		for (int r = 0; r < RPT; r++)
		{
			float4		p4 = *(const float4 *) (sP + (rg * RPT + r) * C + j);

			acc[r].x += p4.x * u0.x + p4.y * u1.x + p4.z * u2.x + p4.w * u3.x;
			acc[r].y += p4.x * u0.y + p4.y * u1.y + p4.z * u2.y + p4.w * u3.y;
			acc[r].z += p4.x * u0.z + p4.y * u1.z + p4.z * u2.z + p4.w * u3.z;
			acc[r].w += p4.x * u0.w + p4.y * u1.w + p4.z * u2.w + p4.w * u3.w;
		}
	}
#pragma unroll
	for (int r = 0; r < RPT; r++)
	{
		int			t = rg * RPT + r;

		if (t0 + t < n)
			*(float4 *) (o + (size_t) (t0 + t) * H * V + (size_t) h * V + 4 * xq) = acc[r];
	}
}

/* Scratch floats the chunkwise form needs for n rows: W, U, Qg, Kt, P, glast, Hc. */
extern "C" size_t
kk_kda_chunk_scratch(int n, int H, int K)
{
	size_t		nc = (size_t) (n + KDA_CHUNK - 1) / KDA_CHUNK;

	return nc * H * ((size_t) 4 * KDA_CHUNK * K + (size_t) KDA_CHUNK * KDA_CHUNK + K + (size_t) K * K);
}

template <int K>
static int
chunked_launch(cudaStream_t s, int n, int H, const float *q, const float *k, const float *v, const float *g,
			   const float *beta, float *S, float *o, float *scratch)
{
	size_t		nc = (size_t) (n + KDA_CHUNK - 1) / KDA_CHUNK;
	size_t		tiles = nc * H;
	float	   *Wk = scratch;
	float	   *U = Wk + tiles * KDA_CHUNK * K;
	float	   *Qg = U + tiles * KDA_CHUNK * K;
	float	   *Kt = Qg + tiles * KDA_CHUNK * K;
	float	   *P = Kt + tiles * KDA_CHUNK * K;
	float	   *gl = P + tiles * KDA_CHUNK * KDA_CHUNK;
	float	   *Hc = gl + tiles * K;
	size_t		sm1 = chunk_prep_smem(K) * sizeof(float),
				sm2 = chunk_state_smem(K) * sizeof(float),
				sm3 = chunk_out_smem(K) * sizeof(float);
	cudaError_t e;

	if ((e = cudaFuncSetAttribute(kda_chunk_prep_kernel<K, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm1)) != cudaSuccess ||
		(e = cudaFuncSetAttribute(kda_chunk_state_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm2)) != cudaSuccess ||
		(e = cudaFuncSetAttribute(kda_chunk_out_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm3)) != cudaSuccess)
		return (int) e;
	kda_chunk_prep_kernel<K, false><<<dim3((unsigned) nc, H), 256, sm1, s>>>(n, H, q, k, v, g, beta, Wk, U, Qg, Kt, P, gl);
	kda_chunk_state_kernel<K><<<dim3(H, K / KDA_VS), 256, sm2, s>>>(n, H, Wk, U, Kt, gl, S, Hc);
	kda_chunk_out_kernel<K><<<dim3((unsigned) nc, H), 256, sm3, s>>>(n, H, Qg, Hc, P, U, o);
	return 0;
}

/*
 * The chunkwise form for one sequence of n rows (q, k, v, g rows of stride
 * H*K starting at its first row; beta rows of stride H); S its [H][K][V]
 * state.  Returns 0, -1 for an unsupported head size, or a CUDA error code.
 */
extern "C" int
kk_kda_chunked(cudaStream_t s, int n, int H, int K, const float *q, const float *k, const float *v, const float *g,
			   const float *beta, float *S, float *o, float *scratch)
{
	if (n <= 0)
		return 0;
	switch (K)
	{
		case 32:
			return chunked_launch<32>(s, n, H, q, k, v, g, beta, S, o, scratch);
		case 64:
			return chunked_launch<64>(s, n, H, q, k, v, g, beta, S, o, scratch);
		case 128:
			return chunked_launch<128>(s, n, H, q, k, v, g, beta, S, o, scratch);
	}
	return -1;
}

/* ------------------------------------------------------------------ chunkwise: prep with bf16 outputs */

/*
 * The fp32 prep kernel (kda_chunk_prep_kernel<K, true>) storing the bf16
 * layout that kda_chunk_mma.cu reads: kk_kda_chunk_prep_bf16
 * (kda_chunk_prep_mma.cu) launches it when its tensor-core kernel is off.
 */
template <int K>
static int
chunk_prep_bf16_launch(cudaStream_t s, int n, int H, const float *q, const float *k, const float *v, const float *g,
					   const float *beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16,
					   float *gl)
{
	size_t		nc = (size_t) (n + KDA_CHUNK - 1) / KDA_CHUNK;
	size_t		sm1 = chunk_prep_smem(K) * sizeof(float);
	cudaError_t e;

	if ((e = cudaFuncSetAttribute(kda_chunk_prep_kernel<K, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  (int) sm1)) != cudaSuccess)
		return (int) e;
	kda_chunk_prep_kernel<K, true><<<dim3((unsigned) nc, H), 256, sm1, s>>>(n, H, q, k, v, g, beta, (float *) W16,
																			(float *) U16, (float *) Q16,
																			(float *) Kt16, (float *) P16, gl);
	return 0;					/* launch errors: the caller's cuda_launched */
}

int
kda_chunk_prep_fp32_bf16(cudaStream_t s, int n, int H, int K, const float *q, const float *k, const float *v,
						 const float *g, const float *beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16,
						 uint16_t *Kt16, uint16_t *P16, float *gl)
{
	switch (K)
	{
		case 32:
			return chunk_prep_bf16_launch<32>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
		case 64:
			return chunk_prep_bf16_launch<64>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
		case 128:
			return chunk_prep_bf16_launch<128>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
	}
	return -1;
}

/* ------------------------------------------------------------------ gated norm */

/* one output of the gated RMSNorm: ss is the head's sum of squares of o; w
 * is this output's weight, sig the sigmoid of its gate */
__device__ __forceinline__ float
kda_gated_sig(float ov, float ss, int V, float eps, float w, float sig)
{
	float		inv = 1.0f / sqrtf(ss / (float) V + eps);

	return w * (ov * inv) * sig;
}

/* kda_gated_sig with the weight and sigmoid(gate) read here */
__device__ __forceinline__ float
kda_gated(float ov, float ss, int V, float eps, const float *w, const float *gate)
{
	return kda_gated_sig(ov, ss, V, eps, *w, sigmoidf_(*gate));
}

__global__ void
kda_gated_norm_kernel(int H, int V, const float *o, const float *gate, const float *w, float eps, float *out,
					  uint16_t *out16)
{
	__shared__ float red[32];
	int			t = blockIdx.x,
				h = blockIdx.y,
				x = threadIdx.x;
	size_t		off = (size_t) t * H * V + (size_t) h * V + x;
	float		ov,
				ss;

	kk_dep_wait();
	kk_dep_launch();
	ov = x < V ? o[off] : 0.0f;
	ss = block_sum(ov * ov, red);

	if (x < V)
	{
		float		y = kda_gated(ov, ss, V, eps, w + x, gate + off);

		out[off] = y;
		if (out16)
			out16[off] = f32_to_bf16(y);	/* (the bf16 twin for o_proj: KL_CUDA_BF16_TWIN) */
	}
}


/* kda_gated_norm_kernel, warp per (row, head) (the warp kernels' comment
 * under kda_prep); V = K, passed as the block kernel gets it so the
 * division by V compiles the same way */
template <int K>
__global__ void __launch_bounds__(KDA_EW_WARPS * 32)
kda_gated_norm_warp_kernel(int n_tokens, int H, int V, const float *o, const float *gate, const float *w,
						   float eps, float *out, uint16_t *out16)
{
	int			t,
				h,
				c0;
	bool		live = kda_ew_place<K>(n_tokens, H, &t, &h, &c0);
	size_t		off = (size_t) t * H * K + (size_t) h * K + c0;
	float4		ov = make_float4(0, 0, 0, 0);
	float		ss;

	kk_dep_wait();
	kk_dep_launch();
	if (live)
		ov = *(const float4 *) (o + off);
	ss = kda_head_sum<K>(ov.x * ov.x, ov.y * ov.y, ov.z * ov.z, ov.w * ov.w);
	if (live)
	{
		float4		gv = *(const float4 *) (gate + off),
					wv = *(const float4 *) (w + c0);

		float4		y = make_float4(kda_gated(ov.x, ss, V, eps, &wv.x, &gv.x), kda_gated(ov.y, ss, V, eps, &wv.y, &gv.y),
									kda_gated(ov.z, ss, V, eps, &wv.z, &gv.z), kda_gated(ov.w, ss, V, eps, &wv.w, &gv.w));

		*(float4 *) (out + off) = y;
		if (out16)
			*(uint2 *) (out16 + off) = make_uint2((uint32_t) f32_to_bf16(y.x) | ((uint32_t) f32_to_bf16(y.y) << 16),
												  (uint32_t) f32_to_bf16(y.z) | ((uint32_t) f32_to_bf16(y.w) << 16));
	}
}

/* the warp kernel for V = 32, 64, 128 (KK_KDA_EW_NORM_WARP), else kda_gated_norm_kernel;
 * out16 (NULL: none): also the bf16 rounding of out, same layout (8-byte aligned) */
extern "C" void
kk_kda_gated_norm_twin(cudaStream_t s, int n_tokens, int H, int V, const float *o, const float *gate, const float *w,
					   float eps, float *out, uint16_t *out16)
{
	dim3		wgrid;
	const void *p[] = {o, gate, w, out};

	if (n_tokens > 0 && kda_ew_grid(n_tokens, H, V, KK_KDA_EW_NORM_WARP, &wgrid) && kda_ew_aligned(p, 4) &&
		((uintptr_t) out16 & 7) == 0)
	{
		void		(*kern) (int, int, int, const float *, const float *, const float *, float, float *, uint16_t *) =
			V == 32 ? kda_gated_norm_warp_kernel<32> :
			V == 64 ? kda_gated_norm_warp_kernel<64> : kda_gated_norm_warp_kernel<128>;

		kk_launch(kern, wgrid, dim3(KDA_EW_WARPS * 32), 0, s, n_tokens, H, V, o, gate, w, eps, out, out16);
		return;
	}
	if (n_tokens > 0)
		kk_launch(kda_gated_norm_kernel, dim3(n_tokens, H), dim3((V + 31) / 32 * 32), 0, s, H, V, o, gate, w, eps, out,
				  out16);
}

extern "C" void
kk_kda_gated_norm(cudaStream_t s, int n_tokens, int H, int V, const float *o, const float *gate, const float *w,
				  float eps, float *out)
{
	kk_kda_gated_norm_twin(s, n_tokens, H, V, o, gate, w, eps, out, NULL);
}

/* ------------------------------------------------------------------ fused decode step */

/*
 * A decode step (one row per sequence) in one kernel: kda_prep, the
 * recurrence and the gated norm (KL_CUDA_KDA_FUSED, on by default; Hopper
 * and later, since it needs thread-block clusters).
 *
 * The grid is kda_recurrent_kernel's, block (sequence, head, slice of 32
 * columns of V) with 256 threads, so the state keeps its layout, registers
 * and occupancy; the K / 32 slices of a head form a cluster.  Every block
 * does the whole head's prep (threads c < K, channel c, as kda_prep_kernel's
 * block of K threads: the same conv, the same two-stage sums over K / 32
 * warps) into shared memory instead of global memory: the head's q and k
 * norms and the decays of all K rows are needed by every slice, and
 * recomputing them costs ~K x 2 W loads that hit L2 (v only for the slice's
 * own columns), far less than a kernel boundary.  The slice's
 * outputs are the recurrent kernel's; the gated norm's sum of squares is
 * kda_gated_norm_kernel's: warp z of that kernel's block held columns
 * [32 z, 32 z + 32), which is slice z here, so slice z's warp 0 makes that
 * warp's sum and the cluster adds the K / 32 of them in warp order through
 * distributed shared memory, exactly as block_sum's second stage.
 * The conv tails are read by all slices and then shifted in place: slice z
 * writes channels [32 z, 32 z + 32) only after the cluster barrier that
 * every block reaches after its reads.  Nothing else goes through global
 * memory (q, k, v, g, beta and o stay on chip).
 */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KL_KDA_CLUSTERS 1
#include <cooperative_groups.h>
namespace coop = cooperative_groups;	/* (cg is the warp index in these kernels) */
#endif

/* sum over the first nw warps of the block (nw <= 8), every thread gets it:
 * block_sum for a block of nw warps, the other warps adding nothing */
__device__ __forceinline__ float
kda_warps_sum(float v, float *red, int nw)
{
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5;

	v = warp_sum(v);
	__syncthreads();
	if (lane == 0 && warp < nw)
		red[warp] = v;
	__syncthreads();
	v = lane < nw ? red[lane] : 0.0f;
	return warp_sum(v);
}

/* kda_warps_sum of two values in one pass, one barrier: red (2 x 8) must
 * not have been read since the block started (the early kernel's only use) */
__device__ __forceinline__ void
kda_warps_sum2(float a, float b, float (*red)[8], int nw, float *suma, float *sumb)
{
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5;

	a = warp_sum(a);
	b = warp_sum(b);
	if (lane == 0 && warp < nw)
	{
		red[0][warp] = a;
		red[1][warp] = b;
	}
	__syncthreads();
	*suma = warp_sum(lane < nw ? red[0][lane] : 0.0f);
	*sumb = warp_sum(lane < nw ? red[1][lane] : 0.0f);
}

/*
 * The fused kernels' recurrence (kda_recurrent_kernel's, one token) on the
 * block's slice: the new state stored, o of column x returned.  sq, sk, sa,
 * sv, *sbeta: the head's prepared vectors (shared memory, complete).
 */
template <int K>
__device__ __forceinline__ float
kda_decode_token(float (&st)[K / 8], const float *sq, const float *sk, const float *sa, const float *sv,
				 const float *sbeta, float *S, int x, int cg, int lane, float (*pw)[32], float (*pz)[32],
				 float *skq, int round16)
{
	constexpr int RPT = K / 8;
	float		W_ = 0,
				Z_ = 0,
				u,
				ov;

	kda_wz<K, RPT>(st, sq, sk, sa, cg, lane, pw, pz, skq, &W_, &Z_);
	u = *sbeta * (sv[x] - W_);
	ov = Z_ + u * *skq;
	kda_state_update<RPT>(st, sk, sa, cg, u);
#pragma unroll
	for (int i = 0; i < RPT; i++)
		S[(size_t) (cg + 8 * i) * K + x] = kda_state_out(st[i], round16);
	return ov;
}

template <int K>
__global__ void __launch_bounds__(256, 5)
kda_decode_kernel(int H, int W, const float *__restrict__ q, const float *__restrict__ k,
				  const float *__restrict__ v, const float *__restrict__ f, const float *__restrict__ b,
				  const float *__restrict__ gate, const float *__restrict__ conv_q,
				  const float *__restrict__ conv_k, const float *__restrict__ conv_v,
				  const float *__restrict__ A_log, const float *__restrict__ dt_bias,
				  const float *__restrict__ o_norm, float eps, const int *__restrict__ row0,
				  float *const *S_tab, float *const *conv_tab, float qscale, int round16, float *out,
				  uint16_t *out16)
{
#ifdef KL_KDA_CLUSTERS
	constexpr int V = K;
	constexpr int RPT = K / 8;
	constexpr int NW = K / 32;	/* kda_prep_kernel's and kda_gated_norm_kernel's warps */
	__shared__ float sq[K],
				sk[K],
				sa[K],
				sv[K];
	__shared__ float pw[8][32],
				pz[8][32];
	__shared__ float red[32];
	__shared__ float skq,
				sbeta,
				npart;
	int			s = blockIdx.x,
				h = blockIdx.y,
				z = blockIdx.z,
				x = z * KDA_SLICE + (threadIdx.x & 31);
	int			lane = threadIdx.x & 31,
				cg = threadIdx.x >> 5,
				c = threadIdx.x;
	int			HK = H * K;
	bool		act = c < K;
	int			ch = h * K + c;
	int			t;
	float	   *S,
			   *tail;
	float		st[RPT];
	float		qv = 0,
				kv = 0,
				vv = 0;

	kk_dep_wait();
	kk_dep_launch();
	t = row0[s];				/* the sequence's one row */
	S = S_tab[s] + (size_t) h * K * V;
	tail = conv_tab[s];
	/* the state first: its loads are the long ones, the prep runs under them */
#pragma unroll
	for (int i = 0; i < RPT; i++)
		st[i] = S[(size_t) (cg + 8 * i) * V + x];

	/* prep (kda_prep_kernel with i = 0) */
	if (act)					/* v: this slice's columns only */
		kda_conv_silu(q, k, v, tail, conv_q, conv_k, conv_v, HK, W, ch, t, 0, c >> 5 == z, &qv, &kv, &vv);
	{
		float		ssq = kda_warps_sum(act ? qv * qv : 0.0f, red, NW);
		float		ssk = kda_warps_sum(act ? kv * kv : 0.0f, red, NW);

		if (act)
		{
			size_t		off = (size_t) t * HK + ch;
			float		A = -expf(A_log[h]);

			sq[c] = kda_l2_scaled(qv, ssq, qscale);
			sk[c] = kda_l2_scaled(kv, ssk, 1.0f);
			sv[c] = vv;			/* (0 outside this slice: not read) */
			sa[c] = expf(kda_decay(A, f[off], dt_bias[ch]));
		}
	}
	if (c == 0)
		sbeta = sigmoidf_(b[(size_t) t * H + h]);
	__syncthreads();

	/* the recurrence (kda_recurrent_kernel, one token) */
	{
		float		ov = kda_decode_token<K>(st, sq, sk, sa, sv, &sbeta, S, x, cg, lane, pw, pz, &skq, round16);

		/* gated norm: this slice's warp of kda_gated_norm_kernel, then the cluster's sum */
		if (cg == 0)
		{
			float		part = warp_sum(ov * ov);

			if (lane == 0)
				npart = part;
		}
		{
			coop::cluster_group cl = coop::this_cluster();

			cl.sync();			/* every slice's npart is there, every slice read the old tails */
			if (cg == 0)
			{
				float		pv = lane < NW ? *cl.map_shared_rank(&npart, lane) : 0.0f;
				float		ss = warp_sum(pv);
				size_t		off = (size_t) t * HK + (size_t) h * K + x;

				float		y = kda_gated(ov, ss, V, eps, o_norm + x, gate + off);

				out[off] = y;
				if (out16)
					out16[off] = f32_to_bf16(y);	/* (o_proj's bf16 twin: KL_CUDA_Q_TWIN) */
			}
			if (c >= z * KDA_SLICE && c < (z + 1) * KDA_SLICE)
				kda_shift_tail(tail, q, k, v, HK, W, ch, t);
			cl.sync();			/* no block leaves while another may read its npart */
		}
	}
#endif
}

/*
 * KL_CUDA_KDA_DEC_EARLY (on by default): kda_decode_kernel's outputs bit for
 * bit (the same device functions on the same values in the same order) on a
 * shorter path after kk_dep_wait, for the conv width KDA_DEC_W.  At
 * batch 1 the kernel is latency-bound (9.2 us a layer for ~4 MB of state):
 * kda_decode_kernel waits, then reads row0, then the state pointer, then the
 * state, meanwhile the tail pointer, then the tails, then after two sums the
 * decay's inputs, and after the cluster barrier a remote npart and gate.
 *
 * Here what earlier steps wrote is read BEFORE the wait, while the product
 * kernel before it (f_b, g_b) still runs: row0, the state and tail
 * pointers, the block's slice of the state and the conv tails (their taps
 * added into the conv sums there), and the weights.  Why that is safe (the
 * rule of kernels/common.cuh; gemv.cu's PRE argues the same): this kernel
 * starts only once every block of the kernel before it has called
 * kk_dep_launch, which each does after its own kk_dep_wait, so every kernel
 * two or more launches back has completed and its writes are in L2;
 * copies in the stream (uploads, a forked sequence's state) are ordinary
 * stream dependencies, complete before any later kernel starts.  The state
 * and the tails were last written by this layer's KDA kernels of an earlier
 * step (or by those copies); row0, S_tab and conv_tab by the step's metadata
 * copy before the step's first kernel (cuda_step.c, every step, graph
 * replays too), so a reused sequence slot's pointers are already there.
 * They are read with __ldcg (L2, never an SM's stale L1 line).  Nothing is
 * written before the wait.  q, k, v, f, b and gate come from the products
 * right before and are read after it, all in one round of loads.
 *
 * The rest of the path: the decays and sigmoid(gate) are made while the
 * norms are summed; both norms in one pass (kda_warps_sum2: one barrier,
 * not four); the tails shifted from registers right after the loads; each
 * slice pushes its sum of squares of o into every block of the cluster
 * (a remote store before the barrier, not a remote load after it), so no
 * block reads another's shared memory after the second cluster barrier
 * and none waits for a third.
 * Cluster barrier phases: 1. arrive (release) once the old tails are read,
 * before kk_dep_wait; wait before the tails are written (every slice has
 * read them) and before the pushes (every block of the cluster runs);
 * 2. the pushes, arrive (release), wait (acquire), read.
 */
#define KDA_DEC_W 4			/* the conv width it takes (the models'; others: kda_decode_kernel) */

/* a pointer from a device table, through L2 */
__device__ __forceinline__ float *
kda_ldcg_ptr(float *const *p)
{
	return (float *) __ldcg((const unsigned long long *) p);
}

/* the decode tail shift (kda_shift_tail) from values held: held[m (W - 1) +
 * j][lane] is the old tail's entry j + 1 (j < W - 1) of q, k, v (m = 0, 1,
 * 2), n* the row's raw inputs */
template <int W>
__device__ __forceinline__ void
kda_shift_tail_held(float *tail, int HK, int ch, const float (*held)[32], int lane, float nq, float nk, float nv)
{
	constexpr int WT = W - 1;

#pragma unroll
	for (int j = 0; j < WT; j++)
	{
		tail[(size_t) ch * W + j] = held[j][lane];
		tail[(size_t) (HK + ch) * W + j] = held[WT + j][lane];
		tail[(size_t) (2 * HK + ch) * W + j] = held[2 * WT + j][lane];
	}
	tail[(size_t) ch * W + W - 1] = nq;
	tail[(size_t) (HK + ch) * W + W - 1] = nk;
	tail[(size_t) (2 * HK + ch) * W + W - 1] = nv;
}

template <int K, int W>
__global__ void __launch_bounds__(256, 5)
kda_decode_early_kernel(int H, int W_, const float *__restrict__ q, const float *__restrict__ k,
						const float *__restrict__ v, const float *__restrict__ f, const float *__restrict__ b,
						const float *__restrict__ gate, const float *__restrict__ conv_q,
						const float *__restrict__ conv_k, const float *__restrict__ conv_v,
						const float *__restrict__ A_log, const float *__restrict__ dt_bias,
						const float *__restrict__ o_norm, float eps, const int *__restrict__ row0,
						float *const *S_tab, float *const *conv_tab, float qscale, int round16, float *out,
						uint16_t *out16)
{
#ifdef KL_KDA_CLUSTERS
	constexpr int V = K;
	constexpr int RPT = K / 8;
	constexpr int NW = K / 32;	/* kda_prep_kernel's and kda_gated_norm_kernel's warps */
	constexpr int WT = W - 1;	/* the tails' taps (W_ == W: the launcher's choice) */
	__shared__ float sq[K],
				sk[K],
				sa[K],
				sv[K];
	__shared__ float pw[8][32],
				pz[8][32];
	__shared__ float red[2][8];
	__shared__ float parts[NW];	/* slice r's sum of squares of o, pushed by slice r */
	__shared__ float skq,
				sbeta;
	__shared__ float held[3 * WT][32];	/* the slice's old tails, each thread its own (no barrier) */
	int			s = blockIdx.x,
				h = blockIdx.y,
				z = blockIdx.z,
				x = z * KDA_SLICE + (threadIdx.x & 31);
	int			lane = threadIdx.x & 31,
				cg = threadIdx.x >> 5,
				c = threadIdx.x;
	int			HK = H * K;
	bool		act = c < K,
				mine = act && c >> 5 == z;	/* channel of this slice: v's conv, the tail shift */
	int			ch = h * K + c;
	int			t;
	float	   *S,
			   *tail;
	float		st[RPT];
	float		pq = 0,
				pk = 0,
				pv = 0,
				xq = 0,
				xk = 0,
				xv = 0,
				qv = 0,
				kv = 0,
				vv = 0,
				dtb = 0,
				sig = 0,
				A,
				onw,
				ov;
	coop::cluster_group cl = coop::this_cluster();

	/* before the wait: what earlier steps wrote (the comment above), and weights */
	t = __ldcg(row0 + s);		/* the sequence's one row */
	tail = kda_ldcg_ptr(conv_tab + s);
	S = kda_ldcg_ptr(S_tab + s) + (size_t) h * K * V;
	if (act)
	{
		/* kda_conv_silu's taps before the row (idx < 0: the tail's entries 1 .. W - 1) */
#pragma unroll
		for (int j = 0; j < WT; j++)
		{
			float		oq = __ldcg(tail + (size_t) ch * W + j + 1),
						ok = __ldcg(tail + (size_t) (HK + ch) * W + j + 1),
						ov_ = mine ? __ldcg(tail + (size_t) (2 * HK + ch) * W + j + 1) : 0.0f;

			kda_conv_tap(&pq, &pk, &pv, conv_q, conv_k, conv_v, (size_t) ch * W + j, oq, ok, ov_, mine);
			if (mine)
			{
				held[j][lane] = oq;
				held[WT + j][lane] = ok;
				held[2 * WT + j][lane] = ov_;
			}
		}
		dtb = dt_bias[ch];
	}
	__cluster_barrier_arrive();	/* phase 1 (release): this block has read the old tails */
#pragma unroll
	for (int i = 0; i < RPT; i++)
		st[i] = __ldcg(S + (size_t) (cg + 8 * i) * V + x);
	A = -expf(A_log[h]);
	onw = o_norm[x];

	kk_dep_wait();
	kk_dep_launch();
	/* this step's inputs, one round of loads; the row's tap, the decay, beta, sigmoid(gate) */
	if (act)
	{
		size_t		off = (size_t) t * HK + ch;
		float		fv = f[off];

		xq = q[off];
		xk = k[off];
		xv = mine ? v[off] : 0.0f;
		kda_conv_tap(&pq, &pk, &pv, conv_q, conv_k, conv_v, (size_t) ch * W + W - 1, xq, xk, xv, mine);
		qv = siluf_(pq);
		kv = siluf_(pk);
		vv = siluf_(pv);
		sa[c] = expf(kda_decay(A, fv, dtb));
		sv[c] = vv;				/* (0 outside this slice: not read) */
	}
	if (c == 0)
		sbeta = sigmoidf_(b[(size_t) t * H + h]);
	if (cg == 0)
		sig = sigmoidf_(gate[(size_t) t * HK + (size_t) h * K + x]);
	__cluster_barrier_wait();	/* phase 1: every slice has read the old tails, every block runs */
	if (mine)
		kda_shift_tail_held<W>(tail, HK, ch, held, lane, xq, xk, xv);
	{
		float		ssq,
					ssk;

		kda_warps_sum2(act ? qv * qv : 0.0f, act ? kv * kv : 0.0f, red, NW, &ssq, &ssk);
		if (act)
		{
			sq[c] = kda_l2_scaled(qv, ssq, qscale);
			sk[c] = kda_l2_scaled(kv, ssk, 1.0f);
		}
	}
	__syncthreads();

	ov = kda_decode_token<K>(st, sq, sk, sa, sv, &sbeta, S, x, cg, lane, pw, pz, &skq, round16);

	/* gated norm: slice z's sum (kda_gated_norm_kernel's warp z) into parts[z] of every block */
	if (cg == 0)
	{
		float		part = warp_sum(ov * ov);	/* (the same bits in every lane) */

		if (lane < NW)
			*cl.map_shared_rank(&parts[z], lane) = part;
	}
	__cluster_barrier_arrive();	/* phase 2 (release): the pushes */
	__cluster_barrier_wait();
	if (cg == 0)
	{
		float		ss = warp_sum(lane < NW ? parts[lane] : 0.0f);
		size_t		off = (size_t) t * HK + (size_t) h * K + x;
		float		y = kda_gated_sig(ov, ss, V, eps, onw, sig);

		out[off] = y;
		if (out16)
			out16[off] = f32_to_bf16(y);	/* (o_proj's bf16 twin: KL_CUDA_Q_TWIN) */
	}
#endif
}

/* 0: launched; -1: not on this GPU or head size (the three kernels then);
 * else the CUDA error of the launch.  early: kda_decode_early_kernel where
 * it covers the conv width */
template <int K>
static int
decode_launch(cudaStream_t s, int n_seqs, int H, int W, const float *q, const float *k, const float *v,
			  const float *f, const float *b, const float *gate, const float *conv_q, const float *conv_k,
			  const float *conv_v, const float *A_log, const float *dt_bias, const float *o_norm, float eps,
			  const int *row0, float *const *S_tab, float *const *conv_tab, int round16, float *out, uint16_t *out16,
			  int early)
{
	cudaLaunchConfig_t cfg = {};
	cudaLaunchAttribute at[2];
	cudaError_t e;
	decltype(&kda_decode_kernel<K>) kern = early && W == KDA_DEC_W ? kda_decode_early_kernel<K, KDA_DEC_W> :
		kda_decode_kernel<K>;

	cfg.gridDim = dim3(n_seqs, H, K / KDA_SLICE);
	cfg.blockDim = dim3(256);
	cfg.dynamicSmemBytes = 0;
	cfg.stream = s;
	at[0].id = cudaLaunchAttributeClusterDimension;
	at[0].val.clusterDim.x = 1;
	at[0].val.clusterDim.y = 1;
	at[0].val.clusterDim.z = K / KDA_SLICE;
	at[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
	at[1].val.programmaticStreamSerializationAllowed = 1;
	cfg.attrs = at;
	cfg.numAttrs = kk_pdl_on ? 2 : 1;
	e = cudaLaunchKernelEx(&cfg, kern, H, W, q, k, v, f, b, gate, conv_q, conv_k, conv_v, A_log,
						   dt_bias, o_norm, eps, row0, S_tab, conv_tab, 1.0f / sqrtf((float) K), round16, out, out16);
	return e == cudaSuccess ? 0 : (int) e;
}

/* the GPU runs clusters and the kernel it would run was built from sm_90
 * code (the compute_80 PTX has an empty body) */
extern "C" int
kk_kda_decode_supported(int K)
{
	int			dev = 0,
				major = 0;
	cudaFuncAttributes fa;
	cudaError_t e;

	if (K != 32 && K != 64 && K != 128)
		return 0;
	if (cudaGetDevice(&dev) != cudaSuccess ||
		cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9)
	{
		cudaGetLastError();
		return 0;
	}
	e = K == 32 ? cudaFuncGetAttributes(&fa, kda_decode_kernel<32>) :
		K == 64 ? cudaFuncGetAttributes(&fa, kda_decode_kernel<64>) : cudaFuncGetAttributes(&fa, kda_decode_kernel<128>);
	if (e != cudaSuccess)
	{
		cudaGetLastError();
		return 0;
	}
	return fa.ptxVersion >= 90;
}

extern "C" int
kk_kda_decode_twin(cudaStream_t s, int n_seqs, int H, int K, int W, const float *q, const float *k, const float *v,
				   const float *f, const float *b, const float *gate, const float *conv_q, const float *conv_k,
				   const float *conv_v, const float *A_log, const float *dt_bias, const float *o_norm, float eps,
				   const int *row0, float *const *S_tab, float *const *conv_tab, int round16, float *out,
				   uint16_t *out16, int early)
{
	if (n_seqs <= 0)
		return 0;
	switch (K)
	{
		case 32:
			return decode_launch<32>(s, n_seqs, H, W, q, k, v, f, b, gate, conv_q, conv_k, conv_v, A_log, dt_bias,
									 o_norm, eps, row0, S_tab, conv_tab, round16, out, out16, early);
		case 64:
			return decode_launch<64>(s, n_seqs, H, W, q, k, v, f, b, gate, conv_q, conv_k, conv_v, A_log, dt_bias,
									 o_norm, eps, row0, S_tab, conv_tab, round16, out, out16, early);
		case 128:
			return decode_launch<128>(s, n_seqs, H, W, q, k, v, f, b, gate, conv_q, conv_k, conv_v, A_log, dt_bias,
									  o_norm, eps, row0, S_tab, conv_tab, round16, out, out16, early);
	}
	return -1;
}

extern "C" int
kk_kda_decode(cudaStream_t s, int n_seqs, int H, int K, int W, const float *q, const float *k, const float *v,
			  const float *f, const float *b, const float *gate, const float *conv_q, const float *conv_k,
			  const float *conv_v, const float *A_log, const float *dt_bias, const float *o_norm, float eps,
			  const int *row0, float *const *S_tab, float *const *conv_tab, int round16, float *out, int early)
{
	return kk_kda_decode_twin(s, n_seqs, H, K, W, q, k, v, f, b, gate, conv_q, conv_k, conv_v, A_log, dt_bias, o_norm,
							  eps, row0, S_tab, conv_tab, round16, out, NULL, early);
}
