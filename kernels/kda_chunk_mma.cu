/*
 * kda_chunk_mma.cu — the chunkwise KDA form (kernels/kda.cu's header and
 * src/engine/cpu_kda.c have the math) for precision bf16, its products on
 * tensor cores (mma.sync m16n8k16, bf16 operands, fp32 accumulators).
 *
 *   1. kk_kda_chunk_prep_bf16 (kda_chunk_prep_mma.cu: on tensor cores, or
 *      kda.cu's kda_chunk_prep_kernel<K, true>), all chunks in parallel: the
 *      fp32 decays (products of a = exp(g) through reference points), the
 *      pair matrices and the WY solve, stored as bf16 operands per (chunk,
 *      head): W, U0, Qg [C][K], Kt^T [K][C], P [C][C], Gam_end fp32 [K].
 *   2. kda_chunk_mma_kernel: the sequential part and the outputs in one
 *      persistent block per (head, 32 columns of V).  The block's slice of
 *      the state S stays in fp32 registers (the accumulator fragments of the
 *      state update) for the whole sequence; per chunk
 *          U  = U0 - W S                     (64 x K x 32)
 *          o  = Qg S + P U                   (64 x K x 32 + 64 x 64 x 32)
 *          S  = Gam_end S + Kt^T U           (K x 64 x 32)
 *      with S and U rounded to bf16 only as operands.  The next chunk's
 *      tiles stream in (cp.async) while this one computes.  That 4-warp
 *      kernel is KL_CUDA_KDA_MMA=1; the default (=2) is
 *      kda_chunk_mma_wide_kernel, the same products in the same order over
 *      16 warps a block (U on half of them, o on the other half), 64
 *      columns a block with =3, 8 warps with =4.
 *
 * The decay factors never leave fp32 until they are folded into the bf16
 * operands (each factor <= 1), so no exponential of a cumulative sum is
 * ever formed: bf16 costs relative 2^-9 per operand, not range.
 */
#include "common.cuh"

#define KM_C 64					/* chunk rows */
#define KM_VS 32				/* columns of V per block */
#define KM_THREADS 128			/* 4 warps */

/* two adjacent bf16 of shared memory (4-byte aligned) as one operand register */
__device__ __forceinline__ uint32_t
km_ld2(const uint16_t *p)
{
	return *(const uint32_t *) p;
}

/*
 * The A fragment of rows r0..r0+15, columns k0..k0+15 of a row-major bf16
 * matrix with row stride ld (the reduction runs along a row).
 */
__device__ __forceinline__ void
km_frag_a(uint32_t *a, const uint16_t *m, int ld, int r0, int k0, int lane)
{
	int			g = lane >> 2,
				t2 = 2 * (lane & 3);

	a[0] = km_ld2(m + (r0 + g) * ld + k0 + t2);
	a[1] = km_ld2(m + (r0 + g + 8) * ld + k0 + t2);
	a[2] = km_ld2(m + (r0 + g) * ld + k0 + t2 + 8);
	a[3] = km_ld2(m + (r0 + g + 8) * ld + k0 + t2 + 8);
}

/* The B fragment of columns n0..n0+7, k0..k0+15 of B, stored transposed
 * (row n of bt is column n of B, the reduction along its row) */
__device__ __forceinline__ void
km_frag_b(uint32_t *b, const uint16_t *bt, int ld, int n0, int k0, int lane)
{
	int			g = lane >> 2,
				t2 = 2 * (lane & 3);

	b[0] = km_ld2(bt + (n0 + g) * ld + k0 + t2);
	b[1] = km_ld2(bt + (n0 + g) * ld + k0 + t2 + 8);
}

/* Padded row strides (bf16): 8 extra per row put the 8 rows a fragment load
 * touches in different banks. */
template <int K>
struct km_layout
{
	static constexpr int LK = K + 8;	/* W, Qg, S^T rows */
	static constexpr int LC = KM_C + 8;	/* Kt^T, P, U^T rows */
	static constexpr int LU = KM_VS + 8;	/* U0 slice rows */
	/* one stage (bf16 units): W, Qg, Kt^T, P, U0 slice, Gam_end (fp32) */
	static constexpr int W = 0;
	static constexpr int Q = W + KM_C * LK;
	static constexpr int KT = Q + KM_C * LK;
	static constexpr int P = KT + K * LC;
	static constexpr int U0 = P + KM_C * LC;
	static constexpr int GL = U0 + KM_C * LU;
	static constexpr int STAGE = GL + 2 * K;
	/* after the stages: S^T [VS][LK], U^T [VS][LC] */
	static constexpr int SB = KM_VS * LK;
	static constexpr int UT = KM_VS * LC;
};

static size_t
chunk_mma_smem(int K, int stages)
{
	switch (K)
	{
		case 32:
			return sizeof(uint16_t) * ((size_t) stages * km_layout<32>::STAGE + km_layout<32>::SB + km_layout<32>::UT);
		case 64:
			return sizeof(uint16_t) * ((size_t) stages * km_layout<64>::STAGE + km_layout<64>::SB + km_layout<64>::UT);
		default:
			return sizeof(uint16_t) * ((size_t) stages * km_layout<128>::STAGE + km_layout<128>::SB +
									   km_layout<128>::UT);
	}
}

/* chunk `chunk`'s tiles of head h (V columns x0..x0+31 of U0) into stage st;
 * one commit group */
template <int K>
__device__ __forceinline__ void
km_load_chunk(uint16_t *st, int chunk, int H, int h, int x0, const uint16_t *__restrict__ W16,
			  const uint16_t *__restrict__ U16, const uint16_t *__restrict__ Q16,
			  const uint16_t *__restrict__ Kt16, const uint16_t *__restrict__ P16, const float *__restrict__ gl,
			  int tid)
{
	typedef km_layout<K> L;
	constexpr int C = KM_C;
	constexpr int V = K;
	size_t		tile = (size_t) chunk * H + h;
	const uint16_t *w = W16 + tile * C * K,
			   *q = Q16 + tile * C * K,
			   *kt = Kt16 + tile * K * C,
			   *p = P16 + tile * C * C,
			   *u = U16 + tile * C * V + x0;

	for (int e = tid; e < C * (K / 8); e += KM_THREADS)
	{
		int			r = e / (K / 8),
					c = 8 * (e % (K / 8));

		cp_async16(st + L::W + r * L::LK + c, w + r * K + c);
		cp_async16(st + L::Q + r * L::LK + c, q + r * K + c);
	}
	for (int e = tid; e < K * (C / 8); e += KM_THREADS)
	{
		int			r = e / (C / 8),
					c = 8 * (e % (C / 8));

		cp_async16(st + L::KT + r * L::LC + c, kt + r * C + c);
	}
	for (int e = tid; e < C * (C / 8); e += KM_THREADS)
	{
		int			r = e / (C / 8),
					c = 8 * (e % (C / 8));

		cp_async16(st + L::P + r * L::LC + c, p + r * C + c);
	}
	for (int e = tid; e < C * (KM_VS / 8); e += KM_THREADS)
	{
		int			r = e / (KM_VS / 8),
					c = 8 * (e % (KM_VS / 8));

		cp_async16(st + L::U0 + r * L::LU + c, u + (size_t) r * V + c);
	}
	for (int e = tid; e < K / 4; e += KM_THREADS)
		cp_async16(st + L::GL + 8 * e, gl + tile * K + 4 * e);
	cp_async_commit();
}

/*
 * The sequential part and the outputs.  Block (h, V slice), 4 warps.  Warp
 * w: rows 16w..16w+15 of U and o (all 32 columns, 4 fragments of 8); the
 * state's columns 8w..8w+7 of the slice, all K rows (K/16 fragments, kept
 * in registers across chunks).  stages 2: the next chunk's tiles load while
 * this one computes (1 where shared memory is too small for two).
 */
template <int K>
__global__ void __launch_bounds__(KM_THREADS)
kda_chunk_mma_kernel(int n, int H, const uint16_t *__restrict__ W16, const uint16_t *__restrict__ U16,
					 const uint16_t *__restrict__ Q16, const uint16_t *__restrict__ Kt16,
					 const uint16_t *__restrict__ P16, const float *__restrict__ gl, float *S, float *o, int stages)
{
	typedef km_layout<K> L;
	constexpr int C = KM_C;
	constexpr int V = K;
	constexpr int MT = K / 16;	/* state fragments (rows) per warp */
	extern __shared__ uint4 km_smem[];
	uint16_t   *base = (uint16_t *) km_smem;
	uint16_t   *Sb = base + (size_t) stages * L::STAGE;	/* S^T of the entering state, bf16 */
	uint16_t   *Ut = Sb + L::SB;	/* U^T, bf16 */
	int			h = blockIdx.x,
				x0 = blockIdx.y * KM_VS;
	int			tid = threadIdx.x,
				warp = tid >> 5,
				lane = tid & 31,
				g = lane >> 2,
				t2 = 2 * (lane & 3);
	int			nc = (n + C - 1) / C;
	float	   *Sh = S + (size_t) h * K * V;
	float		s[MT][4];

	/* this warp's state fragments: rows 16 m + g (+ 8), columns x0 + 8 warp + t2 (+ 1) */
#pragma unroll
	for (int m = 0; m < MT; m++)
	{
		const float *r0 = Sh + (size_t) (16 * m + g) * V + x0 + 8 * warp + t2;
		const float *r1 = r0 + (size_t) 8 * V;

		s[m][0] = r0[0];
		s[m][1] = r0[1];
		s[m][2] = r1[0];
		s[m][3] = r1[1];
	}
	km_load_chunk<K>(base, 0, H, h, x0, W16, U16, Q16, Kt16, P16, gl, tid);

	for (int chunk = 0; chunk < nc; chunk++)
	{
		uint16_t   *st = base + (size_t) (stages == 2 ? (chunk & 1) : 0) * L::STAGE;
		const float *sg = (const float *) (st + L::GL);
		float		u[4][4],
					oa[4][4];

		if (stages == 1 && chunk > 0)
			km_load_chunk<K>(st, chunk, H, h, x0, W16, U16, Q16, Kt16, P16, gl, tid);
		if (stages == 2 && chunk + 1 < nc)
		{
			km_load_chunk<K>(base + (size_t) ((chunk + 1) & 1) * L::STAGE, chunk + 1, H, h, x0, W16, U16, Q16, Kt16,
							 P16, gl, tid);
			cp_async_wait_group<1>();
		}
		else
			cp_async_wait_group<0>();

		/* the entering state as the bf16 operand S^T [x][c] */
#pragma unroll
		for (int m = 0; m < MT; m++)
		{
			int			x = 8 * warp + t2,
						c = 16 * m + g;

			Sb[x * L::LK + c] = f32_to_bf16(s[m][0]);
			Sb[(x + 1) * L::LK + c] = f32_to_bf16(s[m][1]);
			Sb[x * L::LK + c + 8] = f32_to_bf16(s[m][2]);
			Sb[(x + 1) * L::LK + c + 8] = f32_to_bf16(s[m][3]);
		}
		__syncthreads();		/* the tiles (every thread's copies) and S^T */

		/* U = U0 - W S and the first half of o, Qg S: rows 16 warp.. */
#pragma unroll
		for (int j = 0; j < 4; j++)
		{
			const uint16_t *u0 = st + L::U0 + (16 * warp + g) * L::LU + 8 * j + t2;

			u[j][0] = bf16_to_f32(u0[0]);
			u[j][1] = bf16_to_f32(u0[1]);
			u[j][2] = bf16_to_f32(u0[8 * L::LU]);
			u[j][3] = bf16_to_f32(u0[8 * L::LU + 1]);
			oa[j][0] = oa[j][1] = oa[j][2] = oa[j][3] = 0.0f;
		}
#pragma unroll
		for (int kk = 0; kk < K; kk += 16)
		{
			uint32_t	aw[4],
						aq[4];

			km_frag_a(aw, st + L::W, L::LK, 16 * warp, kk, lane);
			km_frag_a(aq, st + L::Q, L::LK, 16 * warp, kk, lane);
#pragma unroll
			for (int i = 0; i < 4; i++)
				aw[i] ^= 0x80008000u;	/* -W: the sign bits, exact */
#pragma unroll
			for (int j = 0; j < 4; j++)
			{
				uint32_t	b[2];

				km_frag_b(b, Sb, L::LK, 8 * j, kk, lane);
				mma_bf16_16816(u[j], aw, b[0], b[1]);
				mma_bf16_16816(oa[j], aq, b[0], b[1]);
			}
		}
		/* U^T [x][t] as bf16, the operand of P U and Kt^T U */
#pragma unroll
		for (int j = 0; j < 4; j++)
		{
			int			x = 8 * j + t2,
						t = 16 * warp + g;

			Ut[x * L::LC + t] = f32_to_bf16(u[j][0]);
			Ut[(x + 1) * L::LC + t] = f32_to_bf16(u[j][1]);
			Ut[x * L::LC + t + 8] = f32_to_bf16(u[j][2]);
			Ut[(x + 1) * L::LC + t + 8] = f32_to_bf16(u[j][3]);
		}
		__syncthreads();		/* all of U^T */

		/* o += P U (P lower triangular: columns up to this warp's last row) */
		for (int kk = 0; kk <= 16 * warp; kk += 16)
		{
			uint32_t	ap[4];

			km_frag_a(ap, st + L::P, L::LC, 16 * warp, kk, lane);
#pragma unroll
			for (int j = 0; j < 4; j++)
			{
				uint32_t	b[2];

				km_frag_b(b, Ut, L::LC, 8 * j, kk, lane);
				mma_bf16_16816(oa[j], ap, b[0], b[1]);
			}
		}
		{
			int			t = chunk * C + 16 * warp + g;
			size_t		ld = (size_t) H * V;
			float	   *orow = o + (size_t) t * ld + (size_t) h * V + x0 + t2;

#pragma unroll
			for (int j = 0; j < 4; j++)
			{
				if (t < n)
					*(float2 *) (orow + 8 * j) = make_float2(oa[j][0], oa[j][1]);
				if (t + 8 < n)
					*(float2 *) (orow + 8 * ld + 8 * j) = make_float2(oa[j][2], oa[j][3]);
			}
		}

		/* S = Gam_end S + Kt^T U: this warp's 8 columns, all K rows */
#pragma unroll
		for (int m = 0; m < MT; m++)
		{
			float		g0 = sg[16 * m + g],
						g1 = sg[16 * m + g + 8];

			s[m][0] *= g0;
			s[m][1] *= g0;
			s[m][2] *= g1;
			s[m][3] *= g1;
		}
#pragma unroll
		for (int kk = 0; kk < C; kk += 16)
		{
			uint32_t	b[2];

			km_frag_b(b, Ut, L::LC, 8 * warp, kk, lane);
#pragma unroll
			for (int m = 0; m < MT; m++)
			{
				uint32_t	a[4];

				km_frag_a(a, st + L::KT, L::LC, 16 * m, kk, lane);
				mma_bf16_16816(s[m], a, b[0], b[1]);
			}
		}
		__syncthreads();		/* this stage, S^T and U^T read: the next chunk may overwrite them */
	}

#pragma unroll
	for (int m = 0; m < MT; m++)
	{
		float	   *r0 = Sh + (size_t) (16 * m + g) * V + x0 + 8 * warp + t2;
		float	   *r1 = r0 + (size_t) 8 * V;

		r0[0] = s[m][0];
		r0[1] = s[m][1];
		r1[0] = s[m][2];
		r1[1] = s[m][3];
	}
}

/*
 * The wide form (KL_CUDA_KDA_MMA=2, default, or =3): the same products in
 * the same order as kda_chunk_mma_kernel, spread over NW warps instead of 4,
 * so that an SM holds 8 or 16 warps instead of 4 (the 4-warp kernel issued
 * an instruction every 3.1 cycles per scheduler, one warp each, waiting on
 * its own chain: Nsight, bench/notes-cuda.md).  Block (h, VS columns of V).
 *   U = U0 - W S: warps 0 .. NW/2 - 1; o = Qg S, then + P U once U is
 *     known: warps NW/2 .. NW - 1 (the state update waits only for U; each
 *     W or Qg fragment is read by NW/8 warps, not NW/4).  Warp w of either
 *     half takes rows 16 (w % 4).. and the column fragments
 *     ((w % (NW/2)) / 4) JN .. + JN - 1 (JN = VS / 8 / (NW / 8)).
 *   S = Gam_end S + Kt^T U: warp w takes the state's columns 8 (w % SC)..
 *     (SC = VS / 8 column blocks) and its row fragments (w / SC) MS ..
 *     + MS - 1 (MS = K / 16 / (NW / SC)), in fp32 registers.
 * Each accumulator sums its products in the same k order as the 4-warp
 * kernel from the same bf16 operands (U0, then W S ascending; Qg S then P U;
 * Gam_end S then Kt^T U), so the results are the same bit for bit.
 * Operands by ldmatrix (one instruction per A fragment, one per two k steps
 * of a B fragment).  Two barriers a chunk: the next chunk's tiles are issued
 * after the first barrier of this one, when every warp is done with the
 * stage they overwrite (the previous chunk's).
 */
template <int K, int VS>
struct kw_layout
{
	static constexpr int LK = K + 8;
	static constexpr int LC = KM_C + 8;
	static constexpr int LU = VS + 8;
	static constexpr int W = 0;
	static constexpr int Q = W + KM_C * LK;
	static constexpr int KT = Q + KM_C * LK;
	static constexpr int P = KT + K * LC;
	static constexpr int U0 = P + KM_C * LC;
	static constexpr int GL = U0 + KM_C * LU;
	static constexpr int STAGE = GL + 2 * K;
	static constexpr int SB = VS * LK;
	static constexpr int UT = VS * LC;
	static constexpr size_t BYTES = sizeof(uint16_t) * (2 * (size_t) STAGE + SB + UT);
};

/* chunk `chunk`'s tiles of head h (V columns x0..x0+VS-1 of U0) into stage
 * st, NT threads; one commit group */
template <int K, int VS, int NT>
__device__ __forceinline__ void
kw_load_chunk(uint16_t *st, int chunk, int H, int h, int x0, const uint16_t *__restrict__ W16,
			  const uint16_t *__restrict__ U16, const uint16_t *__restrict__ Q16,
			  const uint16_t *__restrict__ Kt16, const uint16_t *__restrict__ P16, const float *__restrict__ gl,
			  int tid)
{
	typedef kw_layout<K, VS> L;
	constexpr int C = KM_C;
	constexpr int V = K;
	size_t		tile = (size_t) chunk * H + h;
	const uint16_t *w = W16 + tile * C * K,
			   *q = Q16 + tile * C * K,
			   *kt = Kt16 + tile * K * C,
			   *p = P16 + tile * C * C,
			   *u = U16 + tile * C * V + x0;

#pragma unroll
	for (int i = 0; i < (C * (K / 8) + NT - 1) / NT; i++)
	{
		int			e = tid + i * NT,
					r = e / (K / 8),
					c = 8 * (e % (K / 8));

		cp_async16(st + L::W + r * L::LK + c, w + r * K + c);
		cp_async16(st + L::Q + r * L::LK + c, q + r * K + c);
	}
#pragma unroll
	for (int i = 0; i < (K * (C / 8) + NT - 1) / NT; i++)
	{
		int			e = tid + i * NT,
					r = e / (C / 8),
					c = 8 * (e % (C / 8));

		cp_async16(st + L::KT + r * L::LC + c, kt + r * C + c);
	}
#pragma unroll
	for (int i = 0; i < (C * (C / 8) + NT - 1) / NT; i++)
	{
		int			e = tid + i * NT,
					r = e / (C / 8),
					c = 8 * (e % (C / 8));

		cp_async16(st + L::P + r * L::LC + c, p + r * C + c);
	}
#pragma unroll
	for (int i = 0; i < (C * (VS / 8) + NT - 1) / NT; i++)
	{
		int			e = tid + i * NT,
					r = e / (VS / 8),
					c = 8 * (e % (VS / 8));

		if ((C * (VS / 8)) % NT != 0 && e >= C * (VS / 8))
			break;
		cp_async16(st + L::U0 + r * L::LU + c, u + (size_t) r * V + c);
	}
	if (tid < K / 4)
		cp_async16(st + L::GL + 8 * tid, gl + tile * K + 4 * tid);
	cp_async_commit();
}

template <int K, int VS, int NW>
__global__ void __launch_bounds__(32 * NW)
kda_chunk_mma_wide_kernel(int n, int H, const uint16_t *__restrict__ W16, const uint16_t *__restrict__ U16,
						  const uint16_t *__restrict__ Q16, const uint16_t *__restrict__ Kt16,
						  const uint16_t *__restrict__ P16, const float *__restrict__ gl, float *S, float *o)
{
	typedef kw_layout<K, VS> L;
	constexpr int C = KM_C;
	constexpr int V = K;
	constexpr int NT = 32 * NW;
	constexpr int HW = NW / 2;	/* warps on U, and as many on o */
	constexpr int CG = HW / 4;	/* column groups of U (of o) */
	constexpr int JN = VS / 8 / CG;	/* their 8-column fragments per warp */
	constexpr int SC = VS / 8;	/* the state's 8-column blocks */
	constexpr int RP = NW / SC;	/* row parts of each */
	constexpr int MS = K / 16 / RP;	/* state fragments per warp */

	static_assert(NW % 8 == 0 && JN >= 1 && JN * CG * 8 == VS, "U / o split");
	static_assert(NW % SC == 0 && MS >= 1 && MS * RP * 16 == K, "state split");
	extern __shared__ uint4 km_smem[];
	uint16_t   *base = (uint16_t *) km_smem;
	uint16_t   *Sb = base + 2 * (size_t) L::STAGE;	/* S^T of the entering state, bf16 */
	uint16_t   *Ut = Sb + L::SB;	/* U^T, bf16 */
	int			h = blockIdx.x,
				x0 = blockIdx.y * VS;
	int			tid = threadIdx.x,
				warp = tid >> 5,
				lane = tid & 31,
				g = lane >> 2,
				t2 = 2 * (lane & 3);
	int			rw = warp & 3,	/* U / o rows 16 rw .. */
				j0 = ((warp % HW) >> 2) * JN,	/* U / o column fragments j0 .. */
				xs = 8 * (warp % SC),	/* state columns xs .. xs + 7 */
				m0 = (warp / SC) * MS;	/* state row fragments m0 .. */
	bool		uwarp = warp < HW;	/* U, else o */
	int			nc = (n + C - 1) / C;
	float	   *Sh = S + (size_t) h * K * V;
	float		s[MS][4];

#pragma unroll
	for (int m = 0; m < MS; m++)
	{
		const float *r0 = Sh + (size_t) (16 * (m0 + m) + g) * V + x0 + xs + t2;
		const float *r1 = r0 + (size_t) 8 * V;

		s[m][0] = r0[0];
		s[m][1] = r0[1];
		s[m][2] = r1[0];
		s[m][3] = r1[1];
	}
	kw_load_chunk<K, VS, NT>(base, 0, H, h, x0, W16, U16, Q16, Kt16, P16, gl, tid);

	for (int chunk = 0; chunk < nc; chunk++)
	{
		uint16_t   *st = base + (size_t) (chunk & 1) * L::STAGE;
		const float *sg = (const float *) (st + L::GL);

		/* the entering state as the bf16 operand S^T [x][c]; Sb was last
		 * read before the previous chunk's second barrier */
#pragma unroll
		for (int m = 0; m < MS; m++)
		{
			int			x = xs + t2,
						c = 16 * (m0 + m) + g;

			Sb[x * L::LK + c] = f32_to_bf16(s[m][0]);
			Sb[(x + 1) * L::LK + c] = f32_to_bf16(s[m][1]);
			Sb[x * L::LK + c + 8] = f32_to_bf16(s[m][2]);
			Sb[(x + 1) * L::LK + c + 8] = f32_to_bf16(s[m][3]);
		}
		cp_async_wait_group<0>();	/* this chunk's tiles (the only group in flight) */
		__syncthreads();		/* every thread's copies and S^T; the other stage is free */
		if (chunk + 1 < nc)
			kw_load_chunk<K, VS, NT>(base + (size_t) ((chunk + 1) & 1) * L::STAGE, chunk + 1, H, h, x0, W16, U16,
									 Q16, Kt16, P16, gl, tid);

		float		oa[JN][4];	/* o's rows 16 rw.., fragments j0.. (o warps) */

		if (uwarp)
		{
			/* U = U0 - W S: rows 16 rw.., fragments j0.. */
			float		u[JN][4];

#pragma unroll
			for (int j = 0; j < JN; j++)
			{
				const uint16_t *u0 = st + L::U0 + (16 * rw + g) * L::LU + 8 * (j0 + j) + t2;

				uint32_t	lo = km_ld2(u0),
							hi = km_ld2(u0 + 8 * L::LU);	/* one 4-byte load a row pair */

				u[j][0] = __uint_as_float(lo << 16);
				u[j][1] = __uint_as_float(lo & 0xffff0000u);
				u[j][2] = __uint_as_float(hi << 16);
				u[j][3] = __uint_as_float(hi & 0xffff0000u);
			}
#pragma unroll
			for (int kk = 0; kk < K; kk += 32)
			{
				uint32_t	b[JN][4];

#pragma unroll
				for (int j = 0; j < JN; j++)
					ldsm_frag_b_k32(b[j], Sb, L::LK, 8 * (j0 + j), kk, lane);
#pragma unroll
				for (int hk = 0; hk < 2; hk++)
				{
					uint32_t	aw[4];

					ldsm_frag_a(aw, st + L::W, L::LK, 16 * rw, kk + 16 * hk, lane);
#pragma unroll
					for (int i = 0; i < 4; i++)
						aw[i] ^= 0x80008000u;	/* -W: the sign bits, exact */
#pragma unroll
					for (int j = 0; j < JN; j++)
						mma_bf16_16816(u[j], aw, b[j][2 * hk], b[j][2 * hk + 1]);
				}
			}
			/* U^T [x][t] as bf16, the operand of P U and Kt^T U; Ut was
			 * last read before this chunk's first barrier */
#pragma unroll
			for (int j = 0; j < JN; j++)
			{
				int			x = 8 * (j0 + j) + t2,
							t = 16 * rw + g;

				Ut[x * L::LC + t] = f32_to_bf16(u[j][0]);
				Ut[(x + 1) * L::LC + t] = f32_to_bf16(u[j][1]);
				Ut[x * L::LC + t + 8] = f32_to_bf16(u[j][2]);
				Ut[(x + 1) * L::LC + t + 8] = f32_to_bf16(u[j][3]);
			}
		}
		else
		{
			/* o = Qg S (+ P U below): rows 16 rw.., fragments j0.. */
#pragma unroll
			for (int j = 0; j < JN; j++)
				oa[j][0] = oa[j][1] = oa[j][2] = oa[j][3] = 0.0f;
#pragma unroll
			for (int kk = 0; kk < K; kk += 32)
			{
				uint32_t	b[JN][4];

#pragma unroll
				for (int j = 0; j < JN; j++)
					ldsm_frag_b_k32(b[j], Sb, L::LK, 8 * (j0 + j), kk, lane);
#pragma unroll
				for (int hk = 0; hk < 2; hk++)
				{
					uint32_t	aq[4];

					ldsm_frag_a(aq, st + L::Q, L::LK, 16 * rw, kk + 16 * hk, lane);
#pragma unroll
					for (int j = 0; j < JN; j++)
						mma_bf16_16816(oa[j], aq, b[j][2 * hk], b[j][2 * hk + 1]);
				}
			}
		}
		__syncthreads();		/* all of U^T */
		if (!uwarp)
		{
			/* o += P U (P lower triangular: k steps 0..rw, two at a time) */
			for (int kk = 0; kk <= 16 * rw; kk += 32)
			{
				uint32_t	b[JN][4],
							ap[4];

#pragma unroll
				for (int j = 0; j < JN; j++)
					ldsm_frag_b_k32(b[j], Ut, L::LC, 8 * (j0 + j), kk, lane);
				ldsm_frag_a(ap, st + L::P, L::LC, 16 * rw, kk, lane);
#pragma unroll
				for (int j = 0; j < JN; j++)
					mma_bf16_16816(oa[j], ap, b[j][0], b[j][1]);
				if (kk + 16 <= 16 * rw)
				{
					ldsm_frag_a(ap, st + L::P, L::LC, 16 * rw, kk + 16, lane);
#pragma unroll
					for (int j = 0; j < JN; j++)
						mma_bf16_16816(oa[j], ap, b[j][2], b[j][3]);
				}
			}
			{
				int			t = chunk * C + 16 * rw + g;
				size_t		ld = (size_t) H * V;
				float	   *orow = o + (size_t) t * ld + (size_t) h * V + x0 + 8 * j0 + t2;

#pragma unroll
				for (int j = 0; j < JN; j++)
				{
					/* __stwb: one 8-byte store each (nvcc split the first
					 * float2 store into two of 4 bytes, each touching all 8
					 * rows' sectors for half their bytes) */
					if (t < n)
						__stwb((float2 *) (orow + 8 * j), make_float2(oa[j][0], oa[j][1]));
					if (t + 8 < n)
						__stwb((float2 *) (orow + 8 * ld + 8 * j), make_float2(oa[j][2], oa[j][3]));
				}
			}
		}

		/* S = Gam_end S + Kt^T U: columns xs.., row fragments m0.. */
#pragma unroll
		for (int m = 0; m < MS; m++)
		{
			float		g0 = sg[16 * (m0 + m) + g],
						g1 = sg[16 * (m0 + m) + g + 8];

			s[m][0] *= g0;
			s[m][1] *= g0;
			s[m][2] *= g1;
			s[m][3] *= g1;
		}
#pragma unroll
		for (int kk = 0; kk < C; kk += 32)
		{
			uint32_t	b[4];

			ldsm_frag_b_k32(b, Ut, L::LC, xs, kk, lane);
#pragma unroll
			for (int hk = 0; hk < 2; hk++)
			{
#pragma unroll
				for (int m = 0; m < MS; m++)
				{
					uint32_t	a[4];

					ldsm_frag_a(a, st + L::KT, L::LC, 16 * (m0 + m), kk + 16 * hk, lane);
					mma_bf16_16816(s[m], a, b[2 * hk], b[2 * hk + 1]);
				}
			}
		}
	}

#pragma unroll
	for (int m = 0; m < MS; m++)
	{
		float	   *r0 = Sh + (size_t) (16 * (m0 + m) + g) * V + x0 + xs + t2;
		float	   *r1 = r0 + (size_t) 8 * V;

		r0[0] = s[m][0];
		r0[1] = s[m][1];
		r1[0] = s[m][2];
		r1[1] = s[m][3];
	}
}

/* bf16 elements of each per-tile array and the byte size of the scratch */
static size_t
chunk_mma_tiles(int n, int H)
{
	return (size_t) ((n + KM_C - 1) / KM_C) * H;
}

extern "C" size_t
kk_kda_chunk_mma_scratch(int n, int H, int K)
{
	size_t		tiles = chunk_mma_tiles(n, H);

	return tiles * (sizeof(uint16_t) * ((size_t) 4 * KM_C * K + (size_t) KM_C * KM_C) + sizeof(float) * K);
}

/* the arrays in a scratch of kk_kda_chunk_mma_scratch(n, H, K) bytes, per
 * tile: W, U0, Qg [C][K], Kt^T [K][C], P [C][C] bf16, then Gam_end [K] fp32 */
struct km_scratch
{
	uint16_t   *W16,
			   *U16,
			   *Q16,
			   *Kt16,
			   *P16;
	float	   *gl;
};

static km_scratch
km_scratch_arrays(void *scratch, int n, int H, int K)
{
	size_t		tiles = chunk_mma_tiles(n, H);
	km_scratch	x;

	x.W16 = (uint16_t *) scratch;
	x.U16 = x.W16 + tiles * KM_C * K;
	x.Q16 = x.U16 + tiles * KM_C * K;
	x.Kt16 = x.Q16 + tiles * KM_C * K;
	x.P16 = x.Kt16 + tiles * KM_C * K;
	x.gl = (float *) (x.P16 + tiles * KM_C * KM_C);
	return x;
}

/* set by kk_set_kda_mma_form: 1 the 4-warp kernel, 2 the wide one with 32
 * columns a block and 16 warps, 3 with 64 columns and 16 warps, 4 with 32
 * columns and 8 warps (KL_CUDA_KDA_MMA) */
static int kda_mma_form = 2;

extern "C" void
kk_set_kda_mma_form(int form)
{
	kda_mma_form = form;
}

/* the wide kernel <K, VS, NW> over (H, K / VS) blocks; 1 where its shared
 * memory does not fit (the caller falls back to the 4-warp kernel) */
template <int K, int VS, int NW>
static int
chunk_mma_wide_launch(cudaStream_t s, int n, int H, float *S, float *o, uint16_t *W16, uint16_t *U16,
					  uint16_t *Q16, uint16_t *Kt16, uint16_t *P16, float *gl)
{
	constexpr size_t sm = kw_layout<K, VS>::BYTES;
	int			dev,
				optin = 0;
	cudaError_t e;

	if ((e = cudaGetDevice(&dev)) != cudaSuccess ||
		(e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
		return (int) e;
	if (sm > (size_t) optin)
		return 1;
	if ((e = cudaFuncSetAttribute(kda_chunk_mma_wide_kernel<K, VS, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  (int) sm)) != cudaSuccess)
		return (int) e;
	kda_chunk_mma_wide_kernel<K, VS, NW><<<dim3(H, K / VS), 32 * NW, sm, s>>>(n, H, W16, U16, Q16, Kt16, P16, gl,
																			 S, o);
	return 0;
}

template <int K>
static int
chunk_mma_launch(cudaStream_t s, int n, int H, float *S, float *o, uint16_t *W16, uint16_t *U16, uint16_t *Q16,
				 uint16_t *Kt16, uint16_t *P16, float *gl)
{
	int			dev,
				optin = 0,
				stages = 2;
	size_t		sm;
	cudaError_t e;

	if (kda_mma_form >= 2)
	{
		int			rc;

		/* 16 warps a block; K = 32 (8 state fragments of 8 x 16 in all)
		 * splits over 8 and has only 32 columns */
		if constexpr (K == 32)
			rc = chunk_mma_wide_launch<K, 32, 8>(s, n, H, S, o, W16, U16, Q16, Kt16, P16, gl);
		else if (kda_mma_form == 3)
			rc = chunk_mma_wide_launch<K, 64, 16>(s, n, H, S, o, W16, U16, Q16, Kt16, P16, gl);
		else if (kda_mma_form == 4)
			rc = chunk_mma_wide_launch<K, 32, 8>(s, n, H, S, o, W16, U16, Q16, Kt16, P16, gl);
		else
			rc = chunk_mma_wide_launch<K, 32, 16>(s, n, H, S, o, W16, U16, Q16, Kt16, P16, gl);
		if (rc != 1)
			return rc;
	}
	if ((e = cudaGetDevice(&dev)) != cudaSuccess ||
		(e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
		return (int) e;
	if (chunk_mma_smem(K, 2) > (size_t) optin)
		stages = 1;
	sm = chunk_mma_smem(K, stages);
	if (sm > (size_t) optin)
		return -2;
	if ((e = cudaFuncSetAttribute(kda_chunk_mma_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm)) !=
		cudaSuccess)
		return (int) e;
	kda_chunk_mma_kernel<K><<<dim3(H, K / KM_VS), KM_THREADS, sm, s>>>(n, H, W16, U16, Q16, Kt16, P16, gl, S, o,
																	  stages);
	return 0;
}

/*
 * The chunkwise form in bf16 operands (kernels.h has the contract).
 */
extern "C" int
kk_kda_chunked_mma(cudaStream_t s, int n, int H, int K, const float *q, const float *k, const float *v,
				   const float *g, const float *beta, float *S, float *o, void *scratch)
{
	km_scratch	x = km_scratch_arrays(scratch, n, H, K);
	int			rc;

	if (n <= 0)
		return 0;
	if (K != 32 && K != 64 && K != 128)
		return -1;
	if ((rc = kk_kda_chunk_prep_bf16(s, n, H, K, q, k, v, g, beta, x.W16, x.U16, x.Q16, x.Kt16, x.P16, x.gl)) != 0)
		return rc;
	switch (K)
	{
		case 32:
			return chunk_mma_launch<32>(s, n, H, S, o, x.W16, x.U16, x.Q16, x.Kt16, x.P16, x.gl);
		case 64:
			return chunk_mma_launch<64>(s, n, H, S, o, x.W16, x.U16, x.Q16, x.Kt16, x.P16, x.gl);
		default:
			return chunk_mma_launch<128>(s, n, H, S, o, x.W16, x.U16, x.Q16, x.Kt16, x.P16, x.gl);
	}
}

/*
 * kk_kda_chunked_mma with q, k, v in bf16 (kernels.h has the contract).
 */
extern "C" int
kk_kda_chunked_mma16(cudaStream_t s, int n, int H, int K, const uint16_t *q, const uint16_t *k, const uint16_t *v,
					 const float *g, const float *beta, float *S, float *o, void *scratch)
{
	km_scratch	x = km_scratch_arrays(scratch, n, H, K);
	int			rc;

	if (n <= 0)
		return 0;
	if (K != 128)
		return -1;
	if ((rc = kk_kda_chunk_prep_bf16_in16(s, n, H, K, q, k, v, g, beta, x.W16, x.U16, x.Q16, x.Kt16, x.P16,
										  x.gl)) != 0)
		return rc;
	return chunk_mma_launch<128>(s, n, H, S, o, x.W16, x.U16, x.Q16, x.Kt16, x.P16, x.gl);
}

/*
 * kk_kda_chunked_mma for one sequence, from the op's raw inputs (the
 * elementwise prep fused into the parallel half: kk_kda_chunk_prep_bf16_fused
 * has the arguments); only when kk_kda_prep_fused_ok(K, W).
 */
extern "C" int
kk_kda_chunked_mma_fused(cudaStream_t s, int n, int H, int K, int W, const float *q, const float *k,
						 const float *v, const float *f, const float *b, const float *conv_q, const float *conv_k,
						 const float *conv_v, const float *A_log, const float *dt_bias, float *const *tailp,
						 float *S, float *o, void *scratch)
{
	km_scratch	x = km_scratch_arrays(scratch, n, H, K);
	int			rc;

	if (n <= 0)
		return 0;
	if (K != 128)
		return -1;
	if ((rc = kk_kda_chunk_prep_bf16_fused(s, n, H, K, W, q, k, v, f, b, conv_q, conv_k, conv_v, A_log, dt_bias,
										   tailp, x.W16, x.U16, x.Q16, x.Kt16, x.P16, x.gl)) != 0)
		return rc;
	return chunk_mma_launch<128>(s, n, H, S, o, x.W16, x.U16, x.Q16, x.Kt16, x.P16, x.gl);
}
