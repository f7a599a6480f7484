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
 * widened to fp32 on load, so the arithmetic is the same.
 */
#include "common.cuh"

#define ATT_TK 32				/* keys per tile in mla_attend */
#define ATT_MAXHPT 16			/* heads per thread in the accumulator */
#define ATT_C16_LOADS 12		/* 16-byte loads per thread for a bf16 key tile: Wa <= 768 */

/* ------------------------------------------------------------------ append, gather */

template <bool C16>
__global__ void
mla_append_kernel(int Wa, const float *__restrict__ kv, const int *__restrict__ row_seq,
				  const int *__restrict__ row0, const int64_t *__restrict__ pos0, float *const *pages, int page_cap)
{
	int			t = blockIdx.x;
	int			s;
	int64_t		pos;
	size_t		off;
	void	   *page;

	kk_dep_wait();
	kk_dep_launch();
	s = row_seq[t];
	pos = pos0[s] + (t - row0[s]);
	page = pages[(size_t) s * page_cap + pos / KK_MLA_PAGE];
	off = (size_t) (pos % KK_MLA_PAGE) * Wa;
	for (int c = threadIdx.x; c < Wa; c += blockDim.x)
	{
		float		v = kv[(size_t) t * Wa + c];

		if (C16)
			((uint16_t *) page)[off + c] = f32_to_bf16(v);
		else
			((float *) page)[off + c] = v;
	}
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
	bool		any = false;
	float		acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};

	kk_dep_wait();
	kk_dep_launch();
	for (int r = 0; r < nr; r++)
		any |= absorbed[row_seq[t0 + r]] != 0;
	if (!any)
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
	int			s;
	int64_t		pos;
	int			np;
	size_t		base = (size_t) t * max_splits * Ha;
	float		M = -INFINITY,
				L = 0;

	kk_dep_wait();
	kk_dep_launch();
	s = row_seq[t];
	pos = pos0[s] + (t - row0[s]);
	np = (int) (pos / split_keys) + 1;
	if (!absorbed[s])
		return;
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
	bool		any = false;

	kk_dep_wait();
	kk_dep_launch();
	for (int r = 0; r < nr; r++)
		any |= absorbed[row_seq[t0 + r]] != 0;
	if (!any)
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
