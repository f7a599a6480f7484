/*
 * mla.cu — multi-head latent attention over the paged latent cache
 * (src/engine/cpu_mla.c has the math; rows of the cache are [c (R), k_pe (Dr)]).
 *
 * Decode and short inputs, the absorbed form (no keys expanded):
 *   mla_absorb_q    qabs[t, h] = [W_uk_h^T q_nope, q_pe]  per (head, 64 columns, 8 rows)
 *   mla_attend      one block per (query token, range of keys): all heads
 *                   against the same latent rows (multi-query attention over
 *                   R+Dr numbers a key) with an online softmax; partial
 *                   (max, sum, accumulator) per key range, so that long
 *                   contexts spread over many blocks (flash-decoding)
 *   mla_merge       combines the key ranges into olat [t, h, R]
 *   mla_out         out[t, h] = W_uv_h olat[t, h]
 * (mla_absorb_q_stream and mla_out_stream: the same two products for decode
 * steps of up to 64 tokens, weights in 16-byte loads; KL_CUDA_MLA_SMALL=0
 * keeps the kernels above; mla_absorb_q_stream also does mla_append's work
 * where asked, KL_CUDA_MLA_FOLD: one launch fewer a layer)
 * Long prompts (the expanded form) use cuBLAS for the products, with these
 * helpers: mla_gather (the sequence's cache rows, contiguous) and
 * mla_softmax (causal softmax of one block of score rows).
 *
 * Per-row and per-sequence step metadata (row_seq, row0, pos0, the absorbed
 * flag, the page table) live on the device, uploaded once per step, so that
 * a decode step can be replayed as a CUDA graph whatever the positions.
 *
 * The cache holds fp32 rows, or bf16 rows (c16, the bf16 precision mode:
 * half the memory and half the bytes to read per step); bf16 rows are
 * widened to fp32 on load, so the arithmetic is the same.  For bf16 rows
 * mla_attend_mma does the attention's two products on tensor cores instead
 * (KL_CUDA_MLA_MMA=0: mla_attend); the fp32 cache stays on mla_attend.
 */
#include "common.cuh"

#define ATT_TK 32				/* keys per tile in mla_attend */
#define ATT_MAXHPT 16			/* heads per thread in the accumulator */
#define ATT_C16_LOADS 12		/* 16-byte loads per thread for a bf16 key tile: Wa <= 768 */

/* ------------------------------------------------------------------ append, gather */

/*
 * The cache row (Wa values: bf16 where c16, else fp32) of token t's new
 * latent row: its sequence's page of position pos0 + (t - row0).  The step
 * metadata (row_seq, row0, pos0, the page table) is read through L2
 * (__ldcg), so that the folded append may find its row before kk_dep_wait:
 * the metadata is uploaded before the step's first kernel, and the SM's L1
 * may still hold the previous step's lines.
 */
__device__ __forceinline__ void *
append_dst(int t, int Wa, int c16, const int *row_seq, const int *row0, const int64_t *pos0, float *const *pages,
		   int page_cap)
{
	int			s = __ldcg(row_seq + t);
	int64_t		pos = __ldcg(pos0 + s) + (t - __ldcg(row0 + s));
	uint8_t    *page = (uint8_t *) __ldcg((const unsigned long long *) (pages + (size_t) s * page_cap +
																		pos / KK_MLA_PAGE));

	return page + (size_t) (pos % KK_MLA_PAGE) * Wa * (c16 ? 2 : 4);
}

/* column c of a cache row: v (bf16 in a bf16 cache) */
__device__ __forceinline__ void
append_put(void *row, int c, float v, int c16)
{
	if (c16)
		((uint16_t *) row)[c] = f32_to_bf16(v);
	else
		((float *) row)[c] = v;
}

/*
 * Token t's new latent row kv[t] (Wa floats) into its cache row, the
 * block's threads striding over the columns (mla_append_kernel, and the
 * folded append's tokens beyond a block's first: the same bytes either way).
 */
__device__ __forceinline__ void
append_row(int t, int Wa, int c16, const float *__restrict__ kv, const int *row_seq, const int *row0,
		   const int64_t *pos0, float *const *pages, int page_cap)
{
	void	   *row = append_dst(t, Wa, c16, row_seq, row0, pos0, pages, page_cap);

	for (int c = threadIdx.x; c < Wa; c += blockDim.x)
		append_put(row, c, kv[(size_t) t * Wa + c], c16);
}

template <bool C16>
__global__ void
mla_append_kernel(int Wa, const float *__restrict__ kv, const int *__restrict__ row_seq,
				  const int *__restrict__ row0, const int64_t *__restrict__ pos0, float *const *pages, int page_cap)
{
	kk_dep_wait();
	kk_dep_launch();
	append_row(blockIdx.x, Wa, C16, kv, row_seq, row0, pos0, pages, page_cap);
}

extern "C" void
kk_mla_append(cudaStream_t s, int n_tokens, int Wa, const float *kv, const int *row_seq, const int *row0,
			  const int64_t *pos0, float *const *pages, int page_cap, int c16)
{
	if (n_tokens <= 0)
		return;
	if (c16)
		kk_launch(mla_append_kernel<true>, dim3(n_tokens), dim3(128), 0, s, Wa, kv, row_seq, row0, pos0, pages,
				  page_cap);
	else
		kk_launch(mla_append_kernel<false>, dim3(n_tokens), dim3(128), 0, s, Wa, kv, row_seq, row0, pos0, pages,
				  page_cap);
}

template <bool C16>
__global__ void
mla_gather_kernel(float *dst, int64_t m, int Wa, float *const *pages)
{
	size_t		n = (size_t) m * Wa;

	for (size_t e = blockIdx.x * (size_t) blockDim.x + threadIdx.x; e < n; e += (size_t) gridDim.x * blockDim.x)
	{
		size_t		i = e / Wa,
					c = e % Wa;
		const void *page = pages[i / KK_MLA_PAGE];

		dst[e] = C16 ? bf16_to_f32(((const uint16_t *) page)[(i % KK_MLA_PAGE) * Wa + c])
			: ((const float *) page)[(i % KK_MLA_PAGE) * Wa + c];
	}
}

extern "C" void
kk_mla_gather(cudaStream_t s, float *dst, int64_t m, int Wa, float *const *pages, int c16)
{
	unsigned	blocks = ceil_div((size_t) m * Wa, 256);

	if (m <= 0)
		return;
	if (c16)
		mla_gather_kernel<true><<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(dst, m, Wa, pages);
	else
		mla_gather_kernel<false><<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(dst, m, Wa, pages);
}

/* ------------------------------------------------------------------ absorbed queries */

/* do any of tokens t0 .. t0 + nr - 1 take the absorbed form (their sequence's
 * flag)?  The absorbed-form kernels skip a group of tokens that none does */
__device__ __forceinline__ bool
any_absorbed(const int *absorbed, const int *row_seq, int t0, int nr)
{
	bool		any = false;

	for (int r = 0; r < nr; r++)
		any |= absorbed[row_seq[t0 + r]] != 0;
	return any;
}

/*
 * Block (head, 64 columns of R, 8 rows): 4 groups of 64 threads split the
 * Dn-long sums, so that the block reads its 64-column strip of W_uk with many
 * loads in flight; the groups' partial sums meet in shared memory.
 */
template <bool BF16>
__global__ void __launch_bounds__(256)
mla_absorb_q_kernel(int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *__restrict__ q,
					const void *__restrict__ kv_b, float *qabs, const int *__restrict__ row_seq,
					const int *__restrict__ absorbed)
{
	extern __shared__ float qn[];	/* [8][Dn], then [4][8][64] partial sums */
	float	   *part = qn + 8 * Dn;
	int			h = blockIdx.x,
				t0 = blockIdx.z * 8;
	int			Dq = Dn + Dr,
				Wa = R + Dr;
	int			nr = n_tokens - t0 < 8 ? n_tokens - t0 : 8;
	int			cl = threadIdx.x % 64,
				dg = threadIdx.x / 64;
	int			c = blockIdx.y * 64 + cl;
	int			per = (Dn + 3) / 4,
				d0 = dg * per,
				d1 = d0 + per < Dn ? d0 + per : Dn;
	float		acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};

	kk_dep_wait();
	kk_dep_launch();
	if (!any_absorbed(absorbed, row_seq, t0, nr))
		return;
	for (int e = threadIdx.x; e < 8 * Dn; e += blockDim.x)
	{
		int			r = e / Dn,
					d = e % Dn;

		qn[e] = r < nr ? q[(size_t) (t0 + r) * Ha * Dq + (size_t) h * Dq + d] : 0.0f;
	}
	__syncthreads();
	if (c < R)
	{
#pragma unroll 8
		for (int d = d0; d < d1; d++)
		{
			size_t		wi = ((size_t) h * (Dn + Dv) + d) * R + c;
			float		w = BF16 ? bf16_to_f32(((const uint16_t *) kv_b)[wi]) : ((const float *) kv_b)[wi];

#pragma unroll
			for (int r = 0; r < 8; r++)
				acc[r] += qn[r * Dn + d] * w;
		}
	}
#pragma unroll
	for (int r = 0; r < 8; r++)
		part[(dg * 8 + r) * 64 + cl] = acc[r];
	__syncthreads();
	if (dg == 0 && c < R)
		for (int r = 0; r < nr; r++)
			qabs[((size_t) (t0 + r) * Ha + h) * Wa + c] = part[r * 64 + cl] + part[(8 + r) * 64 + cl] +
				part[(16 + r) * 64 + cl] + part[(24 + r) * 64 + cl];
	if (blockIdx.y == 0)
		for (int e = threadIdx.x; e < nr * Dr; e += blockDim.x)
		{
			int			r = e / Dr,
						i = e % Dr;

			qabs[((size_t) (t0 + r) * Ha + h) * Wa + R + i] = q[(size_t) (t0 + r) * Ha * Dq + (size_t) h * Dq + Dn + i];
		}
}

extern "C" void
kk_mla_absorb_q(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *q,
				const void *kv_b, int bf16, float *qabs, const int *row_seq, const int *absorbed)
{
	dim3		grid(Ha, ceil_div(R, 64), ceil_div(n_tokens, 8));
	size_t		sm = sizeof(float) * (8 * (size_t) Dn + 4 * 8 * 64);

	if (n_tokens <= 0)
		return;
	if (bf16)
		kk_launch(mla_absorb_q_kernel<true>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b, qabs, row_seq,
				  absorbed);
	else
		kk_launch(mla_absorb_q_kernel<false>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b, qabs,
				  row_seq, absorbed);
}

/*
 * The decode form of the same product (KL_CUDA_MLA_SMALL, 1..64 tokens):
 * the weights stream with 16-byte loads, all of a thread's loads issued
 * before it waits for the previous kernel (W_uk is constant), so that the
 * 4 MB of the 48B shape are in flight at once instead of trickling in as
 * 2-byte loads of one column per thread.
 *
 * Block (head, 128 columns of R), 256 threads: the 16 eight-column pieces
 * of a row go to 16 threads, the Dn rows to 16 row groups (row d to group
 * d % 16, so at most 8 rows a thread: Dn <= 128).  A warp holds 8 pieces of
 * 4 row groups, so that its 8 lanes on one row read 128 contiguous bytes.
 * The block walks its tokens NT at a time (q of the NT tokens in shared
 * memory, [d][NT]): a thread sums its rows for NT tokens x 8 columns, the
 * warp folds its 4 row groups together with a halving exchange (each step
 * sends half of the values, so 8 NT values cost 6 NT shuffles, not 16 NT),
 * and the 4 warps of a piece half meet in shared memory.
 */
#define SQ_PIECES 16			/* eight-column pieces per block: 128 columns */
#define SQ_GROUPS 16			/* row groups */
#define SQ_ROWS 8				/* rows per thread: Dn <= 128 */
#define SQ_AV 3					/* the folded append's values a thread held across the absorb (Wa <= 768; more: at the end) */

/* eight consecutive weights from 16-byte loads: bf16 (one load) or fp32 (two) */
template <bool BF16>
struct w8
{
	uint4		a,
				b;

	__device__ __forceinline__ void load(const void *base, size_t e)
	{
		if (BF16)
			a = __ldg((const uint4 *) ((const uint16_t *) base + e));
		else
		{
			const uint4 *p = (const uint4 *) ((const float *) base + e);

			a = __ldg(p);
			b = __ldg(p + 1);
		}
	}
	__device__ __forceinline__ void zero(void)
	{
		a = make_uint4(0, 0, 0, 0);
		b = a;
	}
	__device__ __forceinline__ void get(float *w) const
	{
		if (BF16)
			unpack8_bf16(a, w);
		else
		{
			w[0] = __uint_as_float(a.x);
			w[1] = __uint_as_float(a.y);
			w[2] = __uint_as_float(a.z);
			w[3] = __uint_as_float(a.w);
			w[4] = __uint_as_float(b.x);
			w[5] = __uint_as_float(b.y);
			w[6] = __uint_as_float(b.z);
			w[7] = __uint_as_float(b.w);
		}
	}
};

/*
 * One halving step of a warp's exchange: lanes with bit `o` of their lane
 * id set keep the upper half of v[0 .. 2 m) and send the lower half, the
 * others the reverse; afterwards v[i] (i < m) holds the pair's sum of the
 * kept index i + m (upper) or i (lower).
 */
template <int m>
__device__ __forceinline__ void
halve_xor(float *v, int o, int lane)
{
	/* a bit mask, not a select: a select of two array elements becomes a
	 * select of their addresses, which moves the array to local memory */
	uint32_t	up = (lane & o) ? 0xffffffffu : 0u;

#pragma unroll
	for (int i = 0; i < m; i++)
	{
		uint32_t	lo = __float_as_uint(v[i]),
					hi = __float_as_uint(v[i + m]);
		float		send = __uint_as_float((lo & up) | (hi & ~up)),
					keep = __uint_as_float((hi & up) | (lo & ~up));

		v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
	}
}

/* what KL_CUDA_MLA_FOLD adds to mla_absorb_q_stream_kernel: the append
 * (kk_mla_append's arguments; kv NULL: none) and Qabs written as bf16
 * instead of fp32 (qabs16 not NULL) */
struct mla_fold
{
	const float *kv;
	const int  *row0;
	const int64_t *pos0;
	float	   *const *pages;
	int			page_cap,
				c16;
	uint16_t   *qabs16;
};

/* qabs[i] = v, or its bf16 into qabs16[i] (cvt.rn: the rounding of the wgmma decode attention's Qabs) */
__device__ __forceinline__ void
put_qabs(float *qabs, uint16_t *qabs16, size_t i, float v)
{
	if (qabs16)
		qabs16[i] = (uint16_t) cvt_bf16x2(v, 0.0f);
	else
		qabs[i] = v;
}

template <bool BF16, int NT>
__global__ void __launch_bounds__(256)
mla_absorb_q_stream_kernel(int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *__restrict__ q,
						   const void *__restrict__ kv_b, float *qabs, const int *__restrict__ row_seq,
						   const int *__restrict__ absorbed, mla_fold ap)
{
	__shared__ __align__(16) float qs[SQ_ROWS * SQ_GROUPS * NT];	/* [d][NT] */
	__shared__ float part[4 * NT * SQ_PIECES * 8];	/* [row quarter][token][column] */
	const int	NV = 8 * NT;	/* a thread's sums: [token][column] */
	int			h = blockIdx.x,
				lane = threadIdx.x & 31,
				w = threadIdx.x >> 5;
	int			piece = (w & 1) * 8 + (lane & 7),
				quarter = (lane >> 3) & 3,
				g = (w >> 1) * 4 + quarter;
	int			c0 = (blockIdx.y * SQ_PIECES + piece) * 8;
	int			Dq = Dn + Dr,
				Wa = R + Dr;
	w8<BF16>	wt[SQ_ROWS];

	/* the weights first: constant, so before the wait */
#pragma unroll
	for (int i = 0; i < SQ_ROWS; i++)
	{
		int			d = g + SQ_GROUPS * i;

		if (d < Dn && c0 < R)
			wt[i].load(kv_b, ((size_t) h * (Dn + Dv) + d) * R + c0);
		else
			wt[i].zero();
	}
	/*
	 * The folded append: block b appends tokens b, b + blocks, ... (one
	 * token a block at most at the 48B shape: 128 blocks).  Its first
	 * token's row is found now (append_dst: metadata only) and up to
	 * SQ_AV values a thread of its kv row are loaded right after the wait,
	 * next to the absorb's own loads, and stored after the absorb work:
	 * neither the metadata chain nor the kv load lengthens the block.  The
	 * attention that reads these rows waits for this kernel.
	 */
	int			ab = blockIdx.y * gridDim.x + blockIdx.x,
				an = gridDim.x * gridDim.y;
	void	   *arow = ap.kv && ab < n_tokens ? append_dst(ab, Wa, ap.c16, row_seq, ap.row0, ap.pos0, ap.pages,
														   ap.page_cap) : NULL;
	float		av[SQ_AV];

	kk_dep_wait();
	kk_dep_launch();
	if (arow)
#pragma unroll
		for (int k = 0; k < SQ_AV; k++)
		{
			int			c = threadIdx.x + k * blockDim.x;

			av[k] = c < Wa ? ap.kv[(size_t) ab * Wa + c] : 0.0f;
		}
	for (int t0 = 0; t0 < n_tokens; t0 += NT)
	{
		int			nr = n_tokens - t0 < NT ? n_tokens - t0 : NT;
		float		acc[NV];

		if (!any_absorbed(absorbed, row_seq, t0, nr))
			continue;			/* the same for the whole block */
		__syncthreads();		/* the previous tokens' qs and part are read */
		for (int e = threadIdx.x; e < Dn * NT; e += blockDim.x)
		{
			int			d = e / NT,
						r = e % NT;

			qs[e] = r < nr ? q[(size_t) (t0 + r) * Ha * Dq + (size_t) h * Dq + d] : 0.0f;
		}
		__syncthreads();
#pragma unroll
		for (int i = 0; i < NV; i++)
			acc[i] = 0.0f;
#pragma unroll
		for (int i = 0; i < SQ_ROWS; i++)
		{
			int			d = g + SQ_GROUPS * i;
			float		wf[8],
						qv[NT];

			if (d >= Dn)
				break;
			wt[i].get(wf);
#pragma unroll
			for (int r = 0; r < NT; r++)
				qv[r] = qs[d * NT + r];
#pragma unroll
			for (int r = 0; r < NT; r++)
#pragma unroll
				for (int k = 0; k < 8; k++)
					acc[r * 8 + k] += qv[r] * wf[k];
		}
		/* fold the warp's 4 row groups (lane bits 3 and 4): NV -> NV / 4 values */
		halve_xor<NV / 2>(acc, 16, lane);
		halve_xor<NV / 4>(acc, 8, lane);
		/* acc[i] is the sum of index i + (NV / 4) quarter: token o / 8, column o % 8 */
#pragma unroll
		for (int i = 0; i < NV / 4; i++)
		{
			int			o = i + (NV / 4) * quarter;

			part[((w >> 1) * NT + o / 8) * (SQ_PIECES * 8) + piece * 8 + o % 8] = acc[i];
		}
		__syncthreads();
		for (int e = threadIdx.x; e < NT * SQ_PIECES * 8; e += blockDim.x)
		{
			int			r = e / (SQ_PIECES * 8),
						c = blockIdx.y * SQ_PIECES * 8 + e % (SQ_PIECES * 8);
			const int	qstride = NT * SQ_PIECES * 8;

			if (r < nr && c < R)
				put_qabs(qabs, ap.qabs16, ((size_t) (t0 + r) * Ha + h) * Wa + c,
						 (part[e] + part[qstride + e]) + (part[2 * qstride + e] + part[3 * qstride + e]));
		}
		if (blockIdx.y == 0)
			for (int e = threadIdx.x; e < nr * Dr; e += blockDim.x)
			{
				int			r = e / Dr,
							i = e % Dr;

				put_qabs(qabs, ap.qabs16, ((size_t) (t0 + r) * Ha + h) * Wa + R + i,
						 q[(size_t) (t0 + r) * Ha * Dq + (size_t) h * Dq + Dn + i]);
			}
	}
	/* the folded append's stores: the first token's loaded values, its columns beyond them, further tokens */
	if (arow)
	{
#pragma unroll
		for (int k = 0; k < SQ_AV; k++)
		{
			int			c = threadIdx.x + k * blockDim.x;

			if (c < Wa)
				append_put(arow, c, av[k], ap.c16);
		}
		for (int c = threadIdx.x + SQ_AV * blockDim.x; c < Wa; c += blockDim.x)
			append_put(arow, c, ap.kv[(size_t) ab * Wa + c], ap.c16);
		for (int t = ab + an; t < n_tokens; t += an)
			append_row(t, Wa, ap.c16, ap.kv, row_seq, ap.row0, ap.pos0, ap.pages, ap.page_cap);
	}
}

/* the launch of one (precision, token tile) instance: NT tokens a pass */
template <bool BF16>
static void
absorb_q_stream(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *q,
				const void *kv_b, float *qabs, const int *row_seq, const int *absorbed, const mla_fold &ap)
{
	dim3		grid(Ha, ceil_div(R, SQ_PIECES * 8));

	if (n_tokens == 1)
		kk_launch(mla_absorb_q_stream_kernel<BF16, 1>, grid, dim3(256), 0, s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b,
				  qabs, row_seq, absorbed, ap);
	else if (n_tokens == 2)
		kk_launch(mla_absorb_q_stream_kernel<BF16, 2>, grid, dim3(256), 0, s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b,
				  qabs, row_seq, absorbed, ap);
	else if (n_tokens <= 4)
		kk_launch(mla_absorb_q_stream_kernel<BF16, 4>, grid, dim3(256), 0, s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b,
				  qabs, row_seq, absorbed, ap);
	else
		kk_launch(mla_absorb_q_stream_kernel<BF16, 8>, grid, dim3(256), 0, s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b,
				  qabs, row_seq, absorbed, ap);
}

/* kk_mla_absorb_q_stream with the append `ap` folded in (ap.kv NULL: none) */
static int
absorb_q_fold(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *q,
			  const void *kv_b, int bf16, float *qabs, const int *row_seq, const int *absorbed, const mla_fold &ap)
{
	if (n_tokens < 1 || n_tokens > KK_MLA_STREAM_MAX_TOKENS || Dn > SQ_ROWS * SQ_GROUPS || R % 8 != 0 ||
		((uintptr_t) kv_b & 15) != 0)
		return -1;
	if (bf16)
		absorb_q_stream<true>(s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b, qabs, row_seq, absorbed, ap);
	else
		absorb_q_stream<false>(s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b, qabs, row_seq, absorbed, ap);
	return 0;
}

extern "C" int
kk_mla_absorb_q_stream(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *q,
					   const void *kv_b, int bf16, float *qabs, const int *row_seq, const int *absorbed)
{
	mla_fold	none = {NULL, NULL, NULL, NULL, 0, 0, NULL};

	return absorb_q_fold(s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b, bf16, qabs, row_seq, absorbed, none);
}

extern "C" int
kk_mla_absorb_q_append(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *q,
					   const void *kv_b, int bf16, float *qabs, uint16_t *qabs16, const int *row_seq,
					   const int *absorbed, const float *kv, const int *row0, const int64_t *pos0,
					   float *const *pages, int page_cap, int c16)
{
	mla_fold	ap = {kv, row0, pos0, pages, page_cap, c16, qabs16};

	return absorb_q_fold(s, n_tokens, Ha, Dn, Dr, Dv, R, q, kv_b, bf16, qabs, row_seq, absorbed, ap);
}

/* ------------------------------------------------------------------ decode attention */

/* floats of dynamic shared memory */
static size_t
attend_smem(int Ha, int Wa)
{
	int			WaP = Wa + 4;

	return (size_t) Ha * WaP + (size_t) ATT_TK * WaP + (size_t) Ha * ATT_TK + 4 * (size_t) Ha;
}

/*
 * Block (token t, key range p).  Scores: thread (warp w, lane j) computes key
 * j against heads w, w+8, ...; softmax: warp per head; accumulator: thread
 * (head group, 4 columns of R) holds up to ATT_MAXHPT heads x 4 floats.
 */
template <bool C16>
__global__ void __launch_bounds__(256)
mla_attend_kernel(int split_keys, int max_splits, int Ha, int R, int Dr, const float *__restrict__ qabs,
				  float scale, const int *__restrict__ row_seq, const int *__restrict__ row0,
				  const int64_t *__restrict__ pos0, const int *__restrict__ absorbed, float *const *pages,
				  int page_cap, float *part_acc, float *part_ml)
{
	extern __shared__ float smem[];
	int			Wa = R + Dr,
				WaP = Wa + 4;
	float	   *sq = smem;		/* [Ha][WaP] */
	float	   *skey = sq + (size_t) Ha * WaP;	/* [ATT_TK][WaP] */
	float	   *sc = skey + ATT_TK * WaP;	/* [Ha][ATT_TK] scores, then p */
	float	   *sm = sc + Ha * ATT_TK;	/* [Ha] running max */
	float	   *sl = sm + Ha;	/* [Ha] running sum */
	float	   *scorr = sl + Ha;	/* [Ha] */
	int			t = blockIdx.x,
				p = blockIdx.y;
	int			tid = threadIdx.x,
				lane = tid & 31,
				w = tid >> 5;
	int			s;
	int64_t		pos;
	int64_t		k0 = (int64_t) p * split_keys,
				k1;
	int			RQ = R / 4;		/* column quads of the accumulator */
	int			HG = 256 / RQ;	/* head groups */
	int			rq = tid % RQ,
				hg = tid / RQ;
	float4		acc[ATT_MAXHPT];

	kk_dep_wait();
	kk_dep_launch();
	s = row_seq[t];
	pos = pos0[s] + (t - row0[s]);
	if (!absorbed[s] || k0 > pos)
		return;
	k1 = k0 + split_keys < pos + 1 ? k0 + split_keys : pos + 1;

	for (int e = tid; e < Ha * (Wa / 4); e += blockDim.x)
		cp_async16(sq + (e / (Wa / 4)) * WaP + 4 * (e % (Wa / 4)), qabs + (size_t) t * Ha * Wa + 4 * e);
	for (int h = tid; h < Ha; h += blockDim.x)
	{
		sm[h] = -INFINITY;
		sl[h] = 0;
	}
#pragma unroll
	for (int i = 0; i < ATT_MAXHPT; i++)
		acc[i] = make_float4(0, 0, 0, 0);

	for (int64_t kb = k0; kb < k1; kb += ATT_TK)
	{
		int			nk = k1 - kb < ATT_TK ? (int) (k1 - kb) : ATT_TK;
		/* tiles start at multiples of ATT_TK, which divides the page size: one page each */
		const void *page = pages[(size_t) s * page_cap + kb / KK_MLA_PAGE];

		__syncthreads();		/* the previous tile is consumed */
		if (C16)
		{
			/* bf16 rows: 8 numbers a load, all of the thread's loads issued
			 * before the first is widened into the fp32 tile */
			const uint16_t *src = (const uint16_t *) page + (size_t) (kb % KK_MLA_PAGE) * Wa;
			uint4		raw[ATT_C16_LOADS];
			int			n8 = ATT_TK * (Wa / 8);

#pragma unroll
			for (int q = 0; q < ATT_C16_LOADS; q++)
			{
				int			e = tid + q * 256,
							j = e / (Wa / 8),
							c8 = e % (Wa / 8);

				raw[q] = make_uint4(0, 0, 0, 0);
				if (e < n8 && j < nk)
					raw[q] = __ldg((const uint4 *) (src + (size_t) j * Wa + 8 * c8));
			}
#pragma unroll
			for (int q = 0; q < ATT_C16_LOADS; q++)
			{
				int			e = tid + q * 256,
							j = e / (Wa / 8),
							c8 = e % (Wa / 8);
				float		v[8];

				if (e >= n8)
					break;
				unpack8_bf16(raw[q], v);
				*(float4 *) (skey + j * WaP + 8 * c8) = make_float4(v[0], v[1], v[2], v[3]);
				*(float4 *) (skey + j * WaP + 8 * c8 + 4) = make_float4(v[4], v[5], v[6], v[7]);
			}
		}
		else
		{
			const float *src = (const float *) page + (size_t) (kb % KK_MLA_PAGE) * Wa;

			for (int e = tid; e < ATT_TK * (Wa / 4); e += blockDim.x)
			{
				int			j = e / (Wa / 4),
							c4 = e % (Wa / 4);

				if (j < nk)
					cp_async16(skey + j * WaP + 4 * c4, src + (size_t) j * Wa + 4 * c4);
				else
					*(float4 *) (skey + j * WaP + 4 * c4) = make_float4(0, 0, 0, 0);
			}
		}
		cp_async_wait_all();	/* (the queries' copies, the first time) */
		__syncthreads();

		/* scores: key `lane` against heads w, w+8, ... (four at a time) */
		for (int h0 = w; h0 < Ha; h0 += 32)
		{
			float		d0 = 0,
						d1 = 0,
						d2 = 0,
						d3 = 0;
			const float *kr = skey + lane * WaP;
			bool		h1ok = h0 + 8 < Ha,
						h2ok = h0 + 16 < Ha,
						h3ok = h0 + 24 < Ha;
			const float *q0 = sq + h0 * WaP,
					   *q1 = sq + (h1ok ? h0 + 8 : h0) * WaP,
					   *q2 = sq + (h2ok ? h0 + 16 : h0) * WaP,
					   *q3 = sq + (h3ok ? h0 + 24 : h0) * WaP;

			for (int c = 0; c < Wa; c += 4)
			{
				float4		kk = *(const float4 *) (kr + c);
				float4		a = *(const float4 *) (q0 + c),
							b = *(const float4 *) (q1 + c),
							e2 = *(const float4 *) (q2 + c),
							f = *(const float4 *) (q3 + c);

				d0 += a.x * kk.x + a.y * kk.y + a.z * kk.z + a.w * kk.w;
				d1 += b.x * kk.x + b.y * kk.y + b.z * kk.z + b.w * kk.w;
				d2 += e2.x * kk.x + e2.y * kk.y + e2.z * kk.z + e2.w * kk.w;
				d3 += f.x * kk.x + f.y * kk.y + f.z * kk.z + f.w * kk.w;
			}
			sc[h0 * ATT_TK + lane] = d0 * scale;
			if (h1ok)
				sc[(h0 + 8) * ATT_TK + lane] = d1 * scale;
			if (h2ok)
				sc[(h0 + 16) * ATT_TK + lane] = d2 * scale;
			if (h3ok)
				sc[(h0 + 24) * ATT_TK + lane] = d3 * scale;
		}
		__syncthreads();

		/* online softmax, warp per head */
		for (int h = w; h < Ha; h += 8)
		{
			float		x = lane < nk ? sc[h * ATT_TK + lane] : -INFINITY;
			float		mold = sm[h];
			float		mnew = fmaxf(mold, warp_max(x));
			float		pr = lane < nk ? expf(x - mnew) : 0.0f;
			float		sum = warp_sum(pr);

			sc[h * ATT_TK + lane] = pr;
			__syncwarp();
			if (lane == 0)
			{
				float		corr = mold == -INFINITY ? 0.0f : expf(mold - mnew);

				sl[h] = sl[h] * corr + sum;
				sm[h] = mnew;
				scorr[h] = corr;
			}
		}
		__syncthreads();

		/* acc = acc * corr + P C (the latent part of the keys) */
		if (rq < RQ && hg < HG)
		{
#pragma unroll
			for (int i = 0; i < ATT_MAXHPT; i++)
			{
				int			h = hg + i * HG;

				if (h < Ha)
				{
					float		cr = scorr[h];

					acc[i].x *= cr;
					acc[i].y *= cr;
					acc[i].z *= cr;
					acc[i].w *= cr;
				}
			}
			for (int j = 0; j < nk; j++)
			{
				float4		kv = *(const float4 *) (skey + j * WaP + 4 * rq);

#pragma unroll
				for (int i = 0; i < ATT_MAXHPT; i++)
				{
					int			h = hg + i * HG;

					if (h < Ha)
					{
						float		pr = sc[h * ATT_TK + j];

						acc[i].x += pr * kv.x;
						acc[i].y += pr * kv.y;
						acc[i].z += pr * kv.z;
						acc[i].w += pr * kv.w;
					}
				}
			}
		}
	}

	/* partial results of this key range */
	{
		size_t		base = ((size_t) t * max_splits + p) * Ha;

		if (rq < RQ && hg < HG)
#pragma unroll
			for (int i = 0; i < ATT_MAXHPT; i++)
			{
				int			h = hg + i * HG;

				if (h < Ha)
					*(float4 *) (part_acc + (base + h) * R + 4 * rq) = acc[i];
			}
		for (int h = tid; h < Ha; h += blockDim.x)
		{
			part_ml[(base + h) * 2] = sm[h];
			part_ml[(base + h) * 2 + 1] = sl[h];
		}
	}
}

/* Can mla_attend take this shape?  (R a multiple of 4 with at most 1024 columns,
 * every head in an accumulator group.) */
extern "C" int
kk_mla_attend_supported(int Ha, int R, int Dr)
{
	int			RQ = R / 4;

	/* (a bf16 cache needs (R + Dr) % 8 == 0 and R + Dr <= 768 too: the backend checks) */
	if (R % 4 || Dr % 4 || RQ > 256 || RQ < 1)
		return 0;
	return (Ha + 256 / RQ - 1) / (256 / RQ) <= ATT_MAXHPT && attend_smem(Ha, R + Dr) * sizeof(float) <= 227 * 1024;
}

extern "C" int
kk_mla_attend(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R, int Dr,
			  const float *qabs, float scale, const int *row_seq, const int *row0, const int64_t *pos0,
			  const int *absorbed, float *const *pages, int page_cap, float *part_acc, float *part_ml, int c16)
{
	size_t		sm = attend_smem(Ha, R + Dr) * sizeof(float);
	cudaError_t e;
	void		(*kern) (int, int, int, int, int, const float *, float, const int *, const int *, const int64_t *,
						 const int *, float *const *, int, float *, float *) =
		c16 ? mla_attend_kernel<true> : mla_attend_kernel<false>;

	if (n_tokens <= 0)
		return 0;
	if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm)) != cudaSuccess)
		return (int) e;
	kk_launch(kern, dim3(n_tokens, max_splits), dim3(256), sm, s, split_keys, max_splits, Ha, R, Dr, qabs, scale,
			  row_seq, row0, pos0, absorbed, pages, page_cap, part_acc, part_ml);
	return 0;
}

/* ------------------------------------------------------------------ decode attention on tensor cores */

/*
 * mla_attend_mma: the same partials as mla_attend for a bf16 cache, with the
 * two products on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate):
 *   S = Qabs K^T   heads (padded to 16 * MT) as the m side, the tile's keys as n
 *   O += P V       heads as m, the latent c (first R numbers of a row) as n
 * Qabs is rounded to bf16 once per block and P (fp32 softmax) to bf16 per
 * tile; everything else, the online softmax included, stays fp32.
 *
 * Block (token t, key range p), 8 warps, key tiles of MMA_TK rows read from
 * global memory once each with cp.async, two buffers (tile i+1 loads while
 * tile i is computed).  Shared rows are padded by 8 bf16 (16 bytes): with a
 * row pitch of an odd multiple of 16 bytes, the 8 row addresses of one
 * ldmatrix fall into 8 different 16-byte bank groups (no conflicts).
 *   scores: warp w takes keys 8w..8w+7 (one n-tile) for all m-tiles
 *   softmax: warp per head row, lanes along the tile's keys
 *   P V: warp w owns the column pairs (16 columns) w, w + 8, ... of R; its
 *        accumulators (MT x 2 x 4 pairs x 4 floats) stay in registers
 * Fragment maps (PTX ISA, mma.m16n8k16 .bf16; g = lane / 4, q = lane % 4):
 *   A regs {a01, a23, a45, a67}: (row g, cols 2q..), (g + 8, 2q..),
 *        (g, 2q + 8..), (g + 8, 2q + 8..)
 *   B regs {b01, b23}: (k rows 2q, 2q+1; col g), (k rows 2q+8, 2q+9; col g)
 *   C {c0, c1, c2, c3}: (row g, cols 2q, 2q+1), (row g + 8, cols 2q, 2q+1)
 * ldmatrix (non-transposed) gives lane l of matrix i the pair (row l/4,
 * cols 2(l%4), +1); .trans gives (rows 2(l%4), +1; col l/4).  Lane l names
 * row (l & 7) of matrix (l >> 3).
 */
#define MMA_TK 64				/* keys per tile */
#define MMA_PAD 8				/* bf16 of padding per shared row */
#define MMA_SPITCH (MMA_TK + 4) /* floats per score row */

/* bytes of dynamic shared memory for 16 * MT heads and rows of Wa numbers */
static size_t
attend_mma_smem(int MT, int Wa)
{
	size_t		pitch = (size_t) Wa + MMA_PAD,
				HP = 16 * (size_t) MT;

	return sizeof(uint16_t) * ((2 * MMA_TK + HP) * pitch + HP * (MMA_TK + MMA_PAD)) +
		sizeof(float) * (HP * MMA_SPITCH + 3 * HP);
}

__device__ __forceinline__ void
ldsm_x2(uint32_t *r, const void *p)
{
	unsigned	a = (unsigned) __cvta_generic_to_shared(p);

	asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
				 :"=r"(r[0]), "=r"(r[1]):"r"(a));
}

/*
 * Rows kb .. kb + nk - 1 of the page into a tile buffer (cp.async, 16 bytes
 * a copy); rows nk .. MMA_TK - 1 are zeroed, so that P (zero there) times
 * them is zero and never NaN from stale bits.
 */
__device__ __forceinline__ void
mma_load_tile(uint16_t *dst, const uint16_t *src, int nk, int Wa, int pitch)
{
	int			n8 = Wa / 8;

	for (int e = threadIdx.x; e < MMA_TK * n8; e += blockDim.x)
	{
		int			j = e / n8,
					c8 = e % n8;

		if (j < nk)
			cp_async16(dst + j * pitch + 8 * c8, src + (size_t) j * Wa + 8 * c8);
		else
			*(uint4 *) (dst + j * pitch + 8 * c8) = make_uint4(0, 0, 0, 0);
	}
}

template <int MT>
__global__ void __launch_bounds__(256)
mla_attend_mma_kernel(int split_keys, int max_splits, int Ha, int R, int Dr, const float *__restrict__ qabs,
					  float scale, const int *__restrict__ row_seq, const int *__restrict__ row0,
					  const int64_t *__restrict__ pos0, const int *__restrict__ absorbed, float *const *pages,
					  int page_cap, float *part_acc, float *part_ml)
{
	extern __shared__ uint4 smem_mma[];
	const int	HP = 16 * MT;
	int			Wa = R + Dr,
				pitch = Wa + MMA_PAD,
				ppitch = MMA_TK + MMA_PAD;
	uint16_t   *sk = (uint16_t *) smem_mma; /* [2][MMA_TK][pitch] key tiles */
	uint16_t   *sq = sk + 2 * MMA_TK * pitch;	/* [HP][pitch] Qabs, bf16 */
	uint16_t   *sp = sq + HP * pitch;	/* [HP][ppitch] P, bf16 */
	float	   *ss = (float *) (sp + HP * ppitch);	/* [HP][MMA_SPITCH] scores */
	float	   *sm = ss + HP * MMA_SPITCH;	/* [HP] running max */
	float	   *sl = sm + HP;	/* [HP] running sum */
	float	   *scorr = sl + HP;	/* [HP] this tile's correction */
	int			t = blockIdx.x,
				p = blockIdx.y;
	int			tid = threadIdx.x,
				lane = tid & 31,
				w = tid >> 5,
				g = lane >> 2,
				q = lane & 3;
	/* this lane's ldmatrix row address: row (lane & 7) of matrix (lane >> 3) */
	int			lrow = (lane & 7) + ((lane >> 3) & 1) * 8,
				lcol = (lane >> 4) * 8;
	int			npairs = R / 16;
	int			s,
				it;
	int64_t		pos,
				k0 = (int64_t) p * split_keys,
				k1;
	float		o[MT][8][4];	/* [m-tile][n-tile of the warp's 4 column pairs][C regs] */

	kk_dep_wait();
	kk_dep_launch();
	s = row_seq[t];
	pos = pos0[s] + (t - row0[s]);
	if (!absorbed[s] || k0 > pos)
		return;
	k1 = k0 + split_keys < pos + 1 ? k0 + split_keys : pos + 1;

	/* the first tile's copies go out before Qabs is converted (they overlap) */
	{
		int			nk = k1 - k0 < MMA_TK ? (int) (k1 - k0) : MMA_TK;
		const uint16_t *page = (const uint16_t *) pages[(size_t) s * page_cap + k0 / KK_MLA_PAGE];

		mma_load_tile(sk, page + (size_t) (k0 % KK_MLA_PAGE) * Wa, nk, Wa, pitch);
		cp_async_commit();
	}
	/* Qabs to bf16, padded heads zero; six loads in flight before the first store */
	for (int e0 = tid; e0 < HP * (Wa / 4); e0 += 6 * blockDim.x)
	{
		float4		v[6];

#pragma unroll
		for (int u = 0; u < 6; u++)
		{
			int			e = e0 + u * blockDim.x,
						h = e / (Wa / 4);

			v[u] = make_float4(0, 0, 0, 0);
			if (e < HP * (Wa / 4) && h < Ha)
				v[u] = __ldg((const float4 *) (qabs + ((size_t) t * Ha + h) * Wa) + e % (Wa / 4));
		}
#pragma unroll
		for (int u = 0; u < 6; u++)
		{
			int			e = e0 + u * blockDim.x;

			if (e < HP * (Wa / 4))
				*(uint2 *) (sq + (e / (Wa / 4)) * pitch + 4 * (e % (Wa / 4))) =
					make_uint2((uint32_t) f32_to_bf16(v[u].x) | ((uint32_t) f32_to_bf16(v[u].y) << 16),
							   (uint32_t) f32_to_bf16(v[u].z) | ((uint32_t) f32_to_bf16(v[u].w) << 16));
		}
	}
	for (int h = tid; h < HP; h += blockDim.x)
	{
		sm[h] = -INFINITY;
		sl[h] = 0;
	}
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int n = 0; n < 8; n++)
			o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.0f;

	it = 0;
	for (int64_t kb = k0; kb < k1; kb += MMA_TK, it++)
	{
		int			nk = k1 - kb < MMA_TK ? (int) (k1 - kb) : MMA_TK;
		const uint16_t *kt = sk + (it & 1) * MMA_TK * pitch;

		__syncthreads();		/* tile it - 1 and its scores, P consumed */
		if (kb + MMA_TK < k1)
		{
			/* tiles start at multiples of MMA_TK, which divides the page size: one page each */
			int64_t		kn = kb + MMA_TK;
			int			nn = k1 - kn < MMA_TK ? (int) (k1 - kn) : MMA_TK;
			const uint16_t *page = (const uint16_t *) pages[(size_t) s * page_cap + kn / KK_MLA_PAGE];

			mma_load_tile(sk + ((it + 1) & 1) * MMA_TK * pitch, page + (size_t) (kn % KK_MLA_PAGE) * Wa, nn, Wa,
						  pitch);
		}
		cp_async_commit();		/* (an empty group on the last tile keeps the count) */
		cp_async_wait_group<1>();	/* this thread's copies of tile it have landed */
		__syncthreads();

		/* scores: warp w, keys 8w .. 8w + 7, all heads; k along the row */
		{
			float		c[MT][4];

#pragma unroll
			for (int m = 0; m < MT; m++)
				c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.0f;
			for (int k = 0; k < Wa; k += 16)
			{
				uint32_t	b[2],
							a[4];

				/* B = K^T: matrices (keys, cols k..k+7) and (keys, k+8..k+15);
				 * lanes 16-31 repeat the addresses (x2 uses lanes 0-15) */
				ldsm_x2(b, kt + (8 * w + (lane & 7)) * pitch + k + ((lane >> 3) & 1) * 8);
#pragma unroll
				for (int m = 0; m < MT; m++)
				{
					ldsm_x4(a, sq + (16 * m + lrow) * pitch + k + lcol);
					mma_bf16_16816(c[m], a, b[0], b[1]);
				}
			}
#pragma unroll
			for (int m = 0; m < MT; m++)
			{
				*(float2 *) (ss + (16 * m + g) * MMA_SPITCH + 8 * w + 2 * q) = make_float2(c[m][0] * scale,
																						   c[m][1] * scale);
				*(float2 *) (ss + (16 * m + g + 8) * MMA_SPITCH + 8 * w + 2 * q) = make_float2(c[m][2] * scale,
																							   c[m][3] * scale);
			}
		}
		__syncthreads();

		/* online softmax, warp per head row: lanes take keys lane and lane + 32;
		 * the running sum adds the bf16-rounded p that P V uses */
		for (int h = w; h < HP; h += 8)
		{
			float		x0 = lane < nk ? ss[h * MMA_SPITCH + lane] : -INFINITY,
						x1 = lane + 32 < nk ? ss[h * MMA_SPITCH + lane + 32] : -INFINITY;
			float		mold = sm[h];
			float		mnew = fmaxf(mold, warp_max(fmaxf(x0, x1)));
			uint16_t	p0 = f32_to_bf16(lane < nk ? expf(x0 - mnew) : 0.0f),
						p1 = f32_to_bf16(lane + 32 < nk ? expf(x1 - mnew) : 0.0f);
			float		sum = warp_sum(bf16_to_f32(p0) + bf16_to_f32(p1));

			sp[h * ppitch + lane] = p0;
			sp[h * ppitch + lane + 32] = p1;
			if (lane == 0)
			{
				float		corr = mold == -INFINITY ? 0.0f : expf(mold - mnew);

				sl[h] = sl[h] * corr + sum;
				sm[h] = mnew;
				scorr[h] = corr;
			}
		}
		__syncthreads();

		/* O = O corr + P V: warp w, column pairs w + 8i (columns 16 (w + 8i) ..) */
#pragma unroll
		for (int m = 0; m < MT; m++)
		{
			float		cr0 = scorr[16 * m + g],
						cr1 = scorr[16 * m + g + 8];

#pragma unroll
			for (int n = 0; n < 8; n++)
			{
				o[m][n][0] *= cr0;
				o[m][n][1] *= cr0;
				o[m][n][2] *= cr1;
				o[m][n][3] *= cr1;
			}
		}
#pragma unroll
		for (int k = 0; k < MMA_TK; k += 16)
		{
			uint32_t	a[MT][4];

#pragma unroll
			for (int m = 0; m < MT; m++)
				ldsm_x4(a[m], sp + (16 * m + lrow) * ppitch + k + lcol);
#pragma unroll
			for (int i = 0; i < 4; i++)
			{
				int			pr = w + 8 * i;
				uint32_t	b[4];

				if (pr >= npairs)
					break;
				/* V rows k..k+15, columns 16 pr .. 16 pr + 15, transposed:
				 * b[0], b[1] for columns 16 pr .. +7, b[2], b[3] for +8 .. +15 */
				ldsm_x4_trans(b, kt + (k + lrow) * pitch + 16 * pr + lcol);
#pragma unroll
				for (int m = 0; m < MT; m++)
				{
					mma_bf16_16816(o[m][2 * i], a[m], b[0], b[1]);
					mma_bf16_16816(o[m][2 * i + 1], a[m], b[2], b[3]);
				}
			}
		}
	}
	cp_async_wait_group<0>();	/* (only empty groups can be left) */

	/* partial results of this key range (same layout as mla_attend) */
	{
		size_t		base = ((size_t) t * max_splits + p) * Ha;

#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			int			pr = w + 8 * i;

			if (pr >= npairs)
				break;
#pragma unroll
			for (int m = 0; m < MT; m++)
#pragma unroll
				for (int half = 0; half < 2; half++)
				{
					int			col = 16 * pr + 8 * half + 2 * q,
								h0 = 16 * m + g,
								h1 = h0 + 8;
					const float *c = o[m][2 * i + half];

					if (h0 < Ha)
						*(float2 *) (part_acc + (base + h0) * R + col) = make_float2(c[0], c[1]);
					if (h1 < Ha)
						*(float2 *) (part_acc + (base + h1) * R + col) = make_float2(c[2], c[3]);
				}
		}
		for (int h = tid; h < Ha; h += blockDim.x)
		{
			part_ml[(base + h) * 2] = sm[h];
			part_ml[(base + h) * 2 + 1] = sl[h];
		}
	}
}

/* Can mla_attend_mma take this shape?  (R and Dr multiples of 16, R <= 512:
 * the warps' accumulators; at most 32 heads: two m-tiles, fewer padded.) */
extern "C" int
kk_mla_attend_mma_supported(int Ha, int R, int Dr)
{
	if (Ha < 1 || Ha > 32 || R < 16 || R > 512 || R % 16 || Dr < 0 || Dr % 16)
		return 0;
	return attend_mma_smem(Ha > 16 ? 2 : 1, R + Dr) <= 227 * 1024;
}

extern "C" int
kk_mla_attend_mma(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R, int Dr,
				  const float *qabs, float scale, const int *row_seq, const int *row0, const int64_t *pos0,
				  const int *absorbed, float *const *pages, int page_cap, float *part_acc, float *part_ml)
{
	int			MT = Ha > 16 ? 2 : 1;
	size_t		sm = attend_mma_smem(MT, R + Dr);
	cudaError_t e;
	void		(*kern) (int, int, int, int, int, const float *, float, const int *, const int *, const int64_t *,
						 const int *, float *const *, int, float *, float *) =
		MT == 2 ? mla_attend_mma_kernel<2> : mla_attend_mma_kernel<1>;

	if (n_tokens <= 0)
		return 0;
	if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm)) != cudaSuccess)
		return (int) e;
	kk_launch(kern, dim3(n_tokens, max_splits), dim3(256), sm, s, split_keys, max_splits, Ha, R, Dr, qabs, scale,
			  row_seq, row0, pos0, absorbed, pages, page_cap, part_acc, part_ml);
	return 0;
}

/* the key ranges holding token t's partials; 0 for a token not in the absorbed form */
__device__ __forceinline__ int
merge_ranges(int t, int split_keys, const int *row_seq, const int *row0, const int64_t *pos0, const int *absorbed)
{
	int			s = row_seq[t];
	int64_t		pos = pos0[s] + (t - row0[s]);

	return absorbed[s] ? (int) (pos / split_keys) + 1 : 0;
}

/*
 * The weights exp(m_p - M) of a token's np key ranges for head h into wsc
 * (M their largest max) and the sum of w_p l_p, returned to every thread:
 * the first half of both merges.  Ends with a barrier (wsc is read next).
 */
__device__ __forceinline__ float
merge_weights(const float *part_ml, size_t base, int Ha, int h, int np, float *wsc, float *red)
{
	float		M = -INFINITY,
				L = 0;

	for (int p = threadIdx.x; p < np; p += blockDim.x)
	{
		float		mp = part_ml[(base + (size_t) p * Ha + h) * 2];

		wsc[p] = mp;
		M = fmaxf(M, mp);
	}
	M = warp_max(M);
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x >> 5] = M;
	__syncthreads();
	M = -INFINITY;
	for (int i = 0; i < (int) (blockDim.x >> 5); i++)
		M = fmaxf(M, red[i]);
	__syncthreads();
	for (int p = threadIdx.x; p < np; p += blockDim.x)
	{
		float		mp = wsc[p],
					wp = mp != -INFINITY ? expf(mp - M) : 0.0f;

		wsc[p] = wp;
		L += wp * part_ml[(base + (size_t) p * Ha + h) * 2 + 1];
	}
	L = block_sum(L, red);
	__syncthreads();
	return L;
}

/*
 * olat[t, h] = sum over key ranges of exp(m_p - M) acc_p / sum of exp(m_p - M) l_p.
 * The ranges' (m, l) are read by all threads at once and their weights made
 * once in shared memory (dynamic: max_splits floats); then each thread sums
 * its column over the ranges with the loads unrolled (one round trip per 16).
 */
__global__ void
mla_merge_kernel(int split_keys, int max_splits, int Ha, int R, const float *part_acc, const float *part_ml,
				 const int *row_seq, const int *row0, const int64_t *pos0, const int *absorbed, float *olat)
{
	extern __shared__ float wsc[];	/* [max_splits] weights exp(m_p - M) */
	__shared__ float red[32];
	int			t = blockIdx.x,
				h = blockIdx.y;
	int			np;
	size_t		base = (size_t) t * max_splits * Ha;
	float		L;

	kk_dep_wait();
	kk_dep_launch();
	if (!(np = merge_ranges(t, split_keys, row_seq, row0, pos0, absorbed)))
		return;
	L = merge_weights(part_ml, base, Ha, h, np, wsc, red);
	for (int c = threadIdx.x; c < R; c += blockDim.x)
	{
		float		o = 0;

#pragma unroll 16
		for (int p = 0; p < np; p++)
			o += wsc[p] * part_acc[(base + (size_t) p * Ha + h) * R + c];
		olat[((size_t) t * Ha + h) * R + c] = o * (1.0f / L);
	}
}

extern "C" void
kk_mla_merge(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R, const float *part_acc,
			 const float *part_ml, const int *row_seq, const int *row0, const int64_t *pos0, const int *absorbed,
			 float *olat)
{
	if (n_tokens > 0)
		kk_launch(mla_merge_kernel, dim3(n_tokens, Ha), dim3(R >= 512 ? 512 : 256), sizeof(float) * (size_t) max_splits,
				  s, split_keys, max_splits, Ha, R, part_acc, part_ml, row_seq, row0, pos0, absorbed, olat);
}

/*
 * mla_merge_wide: mla_merge's result for decode steps with few tokens, from
 * more blocks: block (t, h, column slice of MERGE_COLS) — 8 warps split the key
 * ranges (warp w takes ranges w, w + 8, ...), each lane two adjacent columns
 * (float2 loads, a warp's 64 columns one 256-byte row segment), every load of
 * a warp's ranges issued before the first add; the 8 warps' sums meet in
 * shared memory in warp order.  The weights exp(m_p - M) and L as in
 * mla_merge (every block makes them again: np numbers).  Same value as
 * mla_merge up to the order of the fp32 sums over ranges.
 */
#define MERGE_COLS 64				/* columns a block */
#define MERGE_WARPS 8

__global__ void __launch_bounds__(MERGE_WARPS * 32)
mla_merge_wide_kernel(int split_keys, int max_splits, int Ha, int R, const float *part_acc, const float *part_ml,
					  const int *row_seq, const int *row0, const int64_t *pos0, const int *absorbed, float *olat)
{
	extern __shared__ float wsc[];	/* [max_splits] weights exp(m_p - M) */
	__shared__ float red[32];
	__shared__ float2 sums[MERGE_WARPS][32];
	int			t = blockIdx.x,
				h = blockIdx.y,
				lane = threadIdx.x & 31,
				w = threadIdx.x >> 5,
				c = blockIdx.z * MERGE_COLS + 2 * lane;
	size_t		base = (size_t) t * max_splits * Ha;
	float		L;
	float2		o = make_float2(0.0f, 0.0f);
	int			np;

	kk_dep_wait();
	kk_dep_launch();
	if (!(np = merge_ranges(t, split_keys, row_seq, row0, pos0, absorbed)))
		return;
	L = merge_weights(part_ml, base, Ha, h, np, wsc, red);
	if (c < R)
	{
#pragma unroll 8
		for (int p = w; p < np; p += MERGE_WARPS)
		{
			float2		a = *(const float2 *) (part_acc + (base + (size_t) p * Ha + h) * R + c);

			o.x += wsc[p] * a.x;
			o.y += wsc[p] * a.y;
		}
	}
	sums[w][lane] = o;
	__syncthreads();
	if (w == 0 && c < R)
	{
		float2		r = sums[0][lane];

		for (int i = 1; i < MERGE_WARPS; i++)
		{
			r.x += sums[i][lane].x;
			r.y += sums[i][lane].y;
		}
		*(float2 *) (olat + ((size_t) t * Ha + h) * R + c) = make_float2(r.x * (1.0f / L), r.y * (1.0f / L));
	}
}

extern "C" void
kk_mla_merge_wide(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R, const float *part_acc,
				  const float *part_ml, const int *row_seq, const int *row0, const int64_t *pos0, const int *absorbed,
				  float *olat)
{
	if (n_tokens > 0)
		kk_launch(mla_merge_wide_kernel, dim3(n_tokens, Ha, ceil_div(R, MERGE_COLS)), dim3(MERGE_WARPS * 32),
				  sizeof(float) * (size_t) max_splits, s, split_keys, max_splits, Ha, R, part_acc, part_ml, row_seq,
				  row0, pos0, absorbed, olat);
}

/* ------------------------------------------------------------------ output projection */

/* Block (head, 8 output columns, 8 rows): warp w computes column x of the
 * 8 rows, lanes along R (coalesced reads of W_uv's row x). */
template <bool BF16>
__global__ void __launch_bounds__(256)
mla_out_kernel(int n_tokens, int Ha, int Dn, int Dv, int R, const float *__restrict__ olat,
			   const void *__restrict__ kv_b, float *out, const int *__restrict__ row_seq,
			   const int *__restrict__ absorbed)
{
	extern __shared__ float so[];	/* [8][R] */
	int			h = blockIdx.x,
				t0 = blockIdx.z * 8;
	int			nr = n_tokens - t0 < 8 ? n_tokens - t0 : 8;
	int			lane = threadIdx.x & 31,
				w = threadIdx.x >> 5;
	int			x = blockIdx.y * 8 + w;

	kk_dep_wait();
	kk_dep_launch();
	if (!any_absorbed(absorbed, row_seq, t0, nr))
		return;
#pragma unroll 4
	for (int e = threadIdx.x; e < 8 * R; e += blockDim.x)
	{
		int			r = e / R;

		so[e] = r < nr ? olat[((size_t) (t0 + r) * Ha + h) * R + e % R] : 0.0f;
	}
	__syncthreads();
	if (x < Dv)
	{
		float		acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
		size_t		wrow = ((size_t) h * (Dn + Dv) + Dn + x) * R;

#pragma unroll 4
		for (int c = lane; c < R; c += 32)
		{
			float		wv = BF16 ? bf16_to_f32(((const uint16_t *) kv_b)[wrow + c]) : ((const float *) kv_b)[wrow + c];

#pragma unroll
			for (int r = 0; r < 8; r++)
				acc[r] += so[r * R + c] * wv;
		}
#pragma unroll
		for (int r = 0; r < 8; r++)
		{
			float		v = warp_sum(acc[r]);

			if (lane == 0 && r < nr && absorbed[row_seq[t0 + r]])
				out[(size_t) (t0 + r) * Ha * Dv + (size_t) h * Dv + x] = v;
		}
	}
}

extern "C" void
kk_mla_out(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dv, int R, const float *olat, const void *kv_b,
		   int bf16, float *out, const int *row_seq, const int *absorbed)
{
	dim3		grid(Ha, ceil_div(Dv, 8), ceil_div(n_tokens, 8));
	size_t		sm = sizeof(float) * 8 * R;

	if (n_tokens <= 0)
		return;
	if (bf16)
		kk_launch(mla_out_kernel<true>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out, row_seq,
				  absorbed);
	else
		kk_launch(mla_out_kernel<false>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out, row_seq,
				  absorbed);
}

/*
 * The decode form of the same product (KL_CUDA_MLA_SMALL, 1..64 tokens): a
 * GEMV per head with 16-byte weight loads, all issued before the wait (W_uv
 * is constant).  Block (head, 32 output columns), 256 threads: warp w has
 * columns 4w .. 4w + 3, its lanes the rows' eight-weight pieces (lane and
 * lane + 32: R <= 512).  Tokens NT at a time, their olat rows in shared
 * memory; a lane's 4 NT partial sums go through a halving exchange over the
 * warp (31 shuffles for 32 values instead of 160), which leaves each sum on
 * its own lane.
 */
#define SO_COLS 32				/* output columns per block */
#define SO_PIECES 2				/* eight-weight pieces per lane and row: R <= 512 */

/*
 * The whole warp's sum of each of a lane's 2 m values (m a power of two,
 * 2 m <= 32): halving steps over lane bits 4, 3, ... while values are left
 * to split, then plain sums over the remaining bits.  Afterwards lane l
 * holds the sum of index l / (16 / m) in v[0].
 */
template <int m, int o>
__device__ __forceinline__ void
fold_warp(float *v, int lane)
{
	if constexpr (o >= 1)
	{
		if constexpr (m >= 1)
			halve_xor<m>(v, o, lane);
		else
			v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
		fold_warp<m / 2, o / 2>(v, lane);
	}
}

template <bool BF16, int NT>
__global__ void __launch_bounds__(256)
mla_out_stream_kernel(int n_tokens, int Ha, int Dn, int Dv, int R, const float *__restrict__ olat,
					  const void *__restrict__ kv_b, float *out, const int *__restrict__ row_seq,
					  const int *__restrict__ absorbed, uint16_t *out16)
{
	extern __shared__ __align__(16) float so_s[];	/* [NT][R] */
	const int	NV = 4 * NT;	/* a lane's sums: [column][token] */
	int			h = blockIdx.x,
				lane = threadIdx.x & 31,
				w = threadIdx.x >> 5;
	int			x0 = blockIdx.y * SO_COLS + 4 * w;
	int			np = R / 8;
	w8<BF16>	wt[4][SO_PIECES];

#pragma unroll
	for (int j = 0; j < 4; j++)
#pragma unroll
		for (int m = 0; m < SO_PIECES; m++)
		{
			int			p = lane + 32 * m;

			if (x0 + j < Dv && p < np)
				wt[j][m].load(kv_b, ((size_t) h * (Dn + Dv) + Dn + x0 + j) * R + p * 8);
			else
				wt[j][m].zero();
		}
	kk_dep_wait();
	kk_dep_launch();
	for (int t0 = 0; t0 < n_tokens; t0 += NT)
	{
		int			nr = n_tokens - t0 < NT ? n_tokens - t0 : NT;
		float		acc[NV];

		if (!any_absorbed(absorbed, row_seq, t0, nr))
			continue;			/* the same for the whole block */
		__syncthreads();		/* the previous tokens' rows are read */
		for (int e = threadIdx.x * 4; e < NT * R; e += blockDim.x * 4)
		{
			int			r = e / R;

			if (r < nr)
				*(float4 *) (so_s + e) = *(const float4 *) (olat + ((size_t) (t0 + r) * Ha + h) * R + e % R);
			else
				*(float4 *) (so_s + e) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
		}
		__syncthreads();
#pragma unroll
		for (int i = 0; i < NV; i++)
			acc[i] = 0.0f;
#pragma unroll
		for (int m = 0; m < SO_PIECES; m++)
		{
			int			p = lane + 32 * m;
			float		wf[4][8];

			if (p >= np)
				break;
#pragma unroll
			for (int j = 0; j < 4; j++)
				wt[j][m].get(wf[j]);
#pragma unroll
			for (int r = 0; r < NT; r++)
			{
				float4		a = *(const float4 *) (so_s + r * R + p * 8),
							b = *(const float4 *) (so_s + r * R + p * 8 + 4);
				float		ov[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};

#pragma unroll
				for (int j = 0; j < 4; j++)
#pragma unroll
					for (int k = 0; k < 8; k++)
						acc[j * NT + r] += ov[k] * wf[j][k];
			}
		}
		/* halve over lane bits 4, 3, ... while more than one value is left, then plain sums */
		fold_warp<NV / 2, 16>(acc, lane);
		/* lane l holds the sum of index l / (32 / NV): column idx / NT, token idx % NT */
		if ((lane & (32 / NV - 1)) == 0)
		{
			int			idx = lane / (32 / NV),
						j = idx / NT,
						r = idx % NT;

			if (r < nr && x0 + j < Dv && absorbed[row_seq[t0 + r]])
			{
				size_t		off = (size_t) (t0 + r) * Ha * Dv + (size_t) h * Dv + x0 + j;

				out[off] = acc[0];
				if (out16)
					out16[off] = f32_to_bf16(acc[0]);	/* (o_proj's bf16 twin: KL_CUDA_Q_TWIN) */
			}
		}
	}
}

template <bool BF16>
static void
out_stream(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dv, int R, const float *olat, const void *kv_b,
		   float *out, const int *row_seq, const int *absorbed, uint16_t *out16)
{
	dim3		grid(Ha, ceil_div(Dv, SO_COLS));
	int			nt = n_tokens == 1 ? 1 : n_tokens == 2 ? 2 : n_tokens <= 4 ? 4 : 8;
	size_t		sm = sizeof(float) * (size_t) nt * R;

	if (nt == 1)
		kk_launch(mla_out_stream_kernel<BF16, 1>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out,
				  row_seq, absorbed, out16);
	else if (nt == 2)
		kk_launch(mla_out_stream_kernel<BF16, 2>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out,
				  row_seq, absorbed, out16);
	else if (nt == 4)
		kk_launch(mla_out_stream_kernel<BF16, 4>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out,
				  row_seq, absorbed, out16);
	else
		kk_launch(mla_out_stream_kernel<BF16, 8>, grid, dim3(256), sm, s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out,
				  row_seq, absorbed, out16);
}

extern "C" int
kk_mla_out_stream_twin(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dv, int R, const float *olat,
					   const void *kv_b, int bf16, float *out, const int *row_seq, const int *absorbed,
					   uint16_t *out16)
{
	if (n_tokens < 1 || n_tokens > KK_MLA_STREAM_MAX_TOKENS || R % 8 != 0 || R > 32 * 8 * SO_PIECES ||
		((uintptr_t) kv_b & 15) != 0 || ((uintptr_t) olat & 15) != 0)
		return -1;
	if (bf16)
		out_stream<true>(s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out, row_seq, absorbed, out16);
	else
		out_stream<false>(s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, out, row_seq, absorbed, out16);
	return 0;
}

extern "C" int
kk_mla_out_stream(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dv, int R, const float *olat, const void *kv_b,
				  int bf16, float *out, const int *row_seq, const int *absorbed)
{
	return kk_mla_out_stream_twin(s, n_tokens, Ha, Dn, Dv, R, olat, kv_b, bf16, out, row_seq, absorbed, NULL);
}

/* ------------------------------------------------------------------ prefill softmax */

/*
 * Rows (h, i) of S [Ha][nq][kb] (scores already scaled): query i sits at
 * position first_pos + i and sees keys [0, first_pos + i].  P = softmax, zero
 * beyond; fp32 in place, or bf16 into P16 (same layout).
 */
__global__ void
mla_softmax_kernel(float *S, uint16_t *P16, int nq, int kb, int64_t first_pos)
{
	__shared__ float red[32];
	int			row = blockIdx.x;
	int			i = row % nq;
	float	   *sr = S + (size_t) row * kb;
	int64_t	lim = first_pos + i + 1;
	int			nv = lim < kb ? (int) lim : kb;
	float		mx = -INFINITY,
				sum = 0,
				inv;

	for (int c = threadIdx.x; c < nv; c += blockDim.x)
		mx = fmaxf(mx, sr[c]);
	mx = warp_max(mx);
	__syncthreads();
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x >> 5] = mx;
	__syncthreads();
	mx = (threadIdx.x & 31) < (blockDim.x >> 5) ? red[threadIdx.x & 31] : -INFINITY;
	mx = warp_max(mx);
	for (int c = threadIdx.x; c < nv; c += blockDim.x)
		sum += expf(sr[c] - mx);
	sum = block_sum(sum, red);
	inv = 1.0f / sum;
	for (int c = threadIdx.x; c < kb; c += blockDim.x)
	{
		float		p = c < nv ? expf(sr[c] - mx) * inv : 0.0f;

		if (P16)
			P16[(size_t) row * kb + c] = f32_to_bf16(p);
		else
			sr[c] = p;
	}
}

extern "C" void
kk_mla_softmax(cudaStream_t s, float *S, uint16_t *P16, int Ha, int nq, int kb, int64_t first_pos)
{
	if (Ha * nq > 0)
		mla_softmax_kernel<<<Ha * nq, 256, 0, s>>>(S, P16, nq, kb, first_pos);
}
