/*
 * mla_flash.cu — MLA prefill attention (the expanded form, precision bf16)
 * as one flash-attention style kernel on tensor cores: scores, causal online
 * softmax and the output product per (query tile, head) block, the score
 * matrix never in memory.  Replaces cuda_mla.c's cuBLAS scores, softmax and
 * output products (KL_CUDA_MLA_FLASH).
 *
 * Inputs as mla_expanded holds them (bf16):
 *   q16   [nr, Ha * DQ]  per head DN nope then DR rope numbers (DQ = DN + DR)
 *   kv16  [m, Ha * (DN + DV)]  per head DN nope-key then DV value columns
 *   lat16 [m, Wa]  the latent rows; columns R .. R + DR - 1 are the rope key
 *                  shared by all heads
 * Query i (0-based in the step) is at position pos0 + i and sees keys
 * 0 .. pos0 + i; m = pos0 + nr keys.
 *
 * Block: MF_QT = 128 query rows of one head, 8 warps of 16 rows; key tiles of
 * MF_KT = 64 rows streamed with cp.async into a ring of MF_STAGES buffers
 * (tile j + 2 loads while tile j is computed).  One tile buffer row holds
 * the head's nope keys and values (contiguous in kv16: one copy) and then
 * the rope key: [DN nope | DV values | DR rope | pad].  Every warp keeps its
 * 16 rows of Q (bf16 A fragments, DQ / 16 of them), its scores S (16 x 64,
 * fp32) and its output O (16 x DV, fp32) in registers:
 *   S = Q K^T   mma.m16n8k16, K read with ldmatrix (non-transposed)
 *   online softmax in the base-2 domain on S's registers (a row's 64 numbers
 *               are spread over the 4 lanes of a quad: two shuffles)
 *   O = O corr + P V   P rounded to bf16 and used straight from the S
 *               registers as A fragments (the C layout of two n-tiles is the
 *               A layout of one k-step), V with ldmatrix.trans
 * The running sum adds the bf16-rounded p that P V uses.  Only the tiles
 * that cross the diagonal are masked; tiles above it are never loaded.
 * The grid is (Ha, query tiles) with the longest query tiles (the last
 * ones) first: blocks start in order of their index, so the big ones do
 * not end up alone in the last wave.
 *
 * Shared rows are padded by 8 bf16: a row pitch that is an odd multiple of
 * 16 bytes puts the 8 rows of one ldmatrix in 8 different bank groups.
 * Fragment maps (PTX ISA, mma.m16n8k16 .bf16; g = lane / 4, q = lane % 4):
 *   A {a0, a1, a2, a3}: (row g, cols 2q, 2q+1), (g + 8, 2q..), (g, 2q + 8..),
 *      (g + 8, 2q + 8..)
 *   B {b0, b1}: (k rows 2q, 2q+1; col g), (k rows 2q + 8, 2q + 9; col g)
 *   C {c0, c1, c2, c3}: (row g, cols 2q, 2q+1), (row g + 8, cols 2q, 2q+1)
 */
#include <math.h>

#include "common.cuh"

#define MF_QT 128				/* query rows per block */
#define MF_KT 64				/* keys per tile */
#define MF_WARPS (MF_QT / 16)
#define MF_PAD 8				/* bf16 of padding per shared row */
#define MF_STAGES 3				/* key tiles in flight */

/* ---------------------------------------------------------------- small PTX wrappers */

/* the pair's two numbers back as floats, added */
__device__ __forceinline__ float
mf_pair_sum(uint32_t p)
{
	return __uint_as_float(p << 16) + __uint_as_float(p & 0xffff0000u);
}

/* ---------------------------------------------------------------- the kernel */

/* bf16 numbers per shared row of a key tile, and of the Q tile */
template <int DN, int DR, int DV>
struct mf_shape
{
	static constexpr int DQ = DN + DR;
	static constexpr int KP = DN + DV + DR + MF_PAD;	/* tile row: nope | values | rope | pad */
	static constexpr int QP = DQ + MF_PAD;
	static constexpr size_t smem = sizeof(uint16_t) * ((size_t) MF_STAGES * MF_KT * KP + (size_t) MF_QT * QP);
};

/*
 * Key tile j (keys MF_KT j ..) of head h into dst; keys at m and beyond are
 * zeroed (P is zero there, but stale bits could be NaN, and 0 * NaN is NaN).
 */
template <int DN, int DR, int DV>
__device__ __forceinline__ void
mf_load_tile(uint16_t *dst, const uint16_t *__restrict__ kv16, const uint16_t *__restrict__ lat16, int L, int Wa,
			 int R, int h, int j, int m)
{
	constexpr int KP = mf_shape<DN, DR, DV>::KP;
	constexpr int NKV = (DN + DV) / 8;	/* 16-byte copies of a row's nope keys and values */
	constexpr int NR = DR / 8;	/* and of its rope key */
	constexpr int PER = NKV + NR;

	for (int e = threadIdx.x; e < MF_KT * PER; e += MF_WARPS * 32)
	{
		int			r = e / PER,
					c = e % PER,
					key = j * MF_KT + r;
		uint16_t   *d = dst + r * KP + 8 * c;

		if (key >= m)
			*(uint4 *) d = make_uint4(0, 0, 0, 0);
		else if (c < NKV)
			cp_async16(d, kv16 + (size_t) key * L + (size_t) h * (DN + DV) + 8 * c);
		else
			cp_async16(d, lat16 + (size_t) key * Wa + R + 8 * (c - NKV));
	}
}

template <int DN, int DR, int DV>
__global__ void __launch_bounds__(MF_WARPS * 32, 1)
mla_flash_kernel(int nr, int pos0, int Ha, int R, int Wa, const uint16_t *__restrict__ q16,
				 const uint16_t *__restrict__ kv16, const uint16_t *__restrict__ lat16, float scale_log2,
				 float *__restrict__ out)
{
	typedef mf_shape<DN, DR, DV> S;
	constexpr int DQ = S::DQ,
				KP = S::KP,
				QP = S::QP,
				KQ = DQ / 16,	/* k-steps of the scores */
				NV = DV / 8;	/* n-tiles of the output */
	extern __shared__ uint4 mf_smem[];
	uint16_t   *sk = (uint16_t *) mf_smem;	/* [MF_STAGES][MF_KT][KP] */
	uint16_t   *sq = sk + MF_STAGES * MF_KT * KP;	/* [MF_QT][QP] */
	int			h = blockIdx.x,
				nqt = gridDim.y,
				qt = nqt - 1 - blockIdx.y;	/* the longest query tiles first */
	int			tid = threadIdx.x,
				lane = tid & 31,
				w = tid >> 5,
				g = lane >> 2,
				q = lane & 3;
	int			L = Ha * (DN + DV),
				m = pos0 + nr,
				i0 = qt * MF_QT,
				last = (i0 + MF_QT < nr ? i0 + MF_QT : nr) - 1,
				ntiles = (pos0 + last) / MF_KT + 1,
				first_pos = pos0 + i0;	/* tiles at and after this one's end need the mask */
	/* this lane's ldmatrix address: row (lane & 7) of matrix (lane >> 3) */
	int			lrow = (lane & 7) + ((lane >> 3) & 1) * 8,
				lcol = (lane >> 4) * 8;
	/* the warp's rows' positions (rows g and g + 8 of its 16) */
	int			p0 = first_pos + 16 * w + g,
				p1 = p0 + 8;
	uint32_t	qa[KQ][4];
	float		o[NV][4];
	float		mx0 = -INFINITY,
				mx1 = -INFINITY,
				l0 = 0.0f,
				l1 = 0.0f;

	kk_dep_wait();
	kk_dep_launch();

	/* the Q tile (rows past nr zero) with the first tile, then tiles 1 .. MF_STAGES - 2 */
	{
		constexpr int NQ = DQ / 8;

		for (int e = tid; e < MF_QT * NQ; e += MF_WARPS * 32)
		{
			int			r = e / NQ,
						c = e % NQ;
			uint16_t   *d = sq + r * QP + 8 * c;

			if (i0 + r < nr)
				cp_async16(d, q16 + (size_t) (i0 + r) * Ha * DQ + (size_t) h * DQ + 8 * c);
			else
				*(uint4 *) d = make_uint4(0, 0, 0, 0);
		}
	}
#pragma unroll
	for (int st = 0; st < MF_STAGES - 1; st++)
	{
		if (st < ntiles)
			mf_load_tile<DN, DR, DV>(sk + st * MF_KT * KP, kv16, lat16, L, Wa, R, h, st, m);
		cp_async_commit();
	}
#pragma unroll
	for (int n = 0; n < NV; n++)
		o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

	for (int j = 0; j < ntiles; j++)
	{
		const uint16_t *kt = sk + (j % MF_STAGES) * MF_KT * KP;
		float		s[MF_KT / 8][4];
		uint32_t	pk[MF_KT / 8][2];	/* P, bf16 pairs: rows g and g + 8 */

		/* tile j has landed (groups after it may still be in flight); everyone's copies visible,
		 * and every warp is done with tile j - 1, whose buffer the next load reuses */
		cp_async_wait_group<MF_STAGES - 2>();
		__syncthreads();
		if (j + MF_STAGES - 1 < ntiles)
			mf_load_tile<DN, DR, DV>(sk + ((j + MF_STAGES - 1) % MF_STAGES) * MF_KT * KP, kv16, lat16, L, Wa, R, h,
									 j + MF_STAGES - 1, m);
		cp_async_commit();			/* (an empty group near the end keeps the count) */
		if (j == 0)
		{
#pragma unroll
			for (int k = 0; k < KQ; k++)
				ldsm_x4(qa[k], sq + (16 * w + lrow) * QP + 16 * k + lcol);
		}

		/* S = Q K^T over DQ: nope columns at 0 .., rope columns after the values */
#pragma unroll
		for (int n = 0; n < MF_KT / 8; n++)
			s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
		for (int k = 0; k < KQ; k++)
		{
			int			col = 16 * k < DN ? 16 * k : 16 * k + DV;

#pragma unroll
			for (int n2 = 0; n2 < MF_KT / 16; n2++)
			{
				uint32_t	b[4];

				/* matrices (keys 16 n2 + 0..7 | 8..15) x (cols col + 0..7 | 8..15):
				 * lanes 0-7 keys 0-7 cols 0-7, 8-15 keys 0-7 cols 8-15,
				 * 16-23 keys 8-15 cols 0-7, 24-31 keys 8-15 cols 8-15 */
				ldsm_frag_b_n16(b, kt, KP, 16 * n2, col, lane);
				mma_bf16_16816(s[2 * n2], qa[k], b[0], b[1]);
				mma_bf16_16816(s[2 * n2 + 1], qa[k], b[2], b[3]);
			}
		}

		/* mask keys past a row's position (only the tiles crossing the diagonal) */
		if ((j + 1) * MF_KT - 1 > first_pos)
		{
#pragma unroll
			for (int n = 0; n < MF_KT / 8; n++)
			{
				int			key = j * MF_KT + 8 * n + 2 * q;

				if (key > p0)
					s[n][0] = -INFINITY;
				if (key + 1 > p0)
					s[n][1] = -INFINITY;
				if (key > p1)
					s[n][2] = -INFINITY;
				if (key + 1 > p1)
					s[n][3] = -INFINITY;
			}
		}

		/*
		 * Online softmax for rows g (regs 0, 1) and g + 8 (regs 2, 3), in the
		 * base-2 domain: p = 2^(s scale log2(e) - max scale log2(e)).  P is
		 * rounded to bf16 here (packed as P V's A fragments); the running sum
		 * adds what P V uses.
		 */
		{
			float		t0 = -INFINITY,
						t1 = -INFINITY,
						c0,
						c1,
						b0,
						b1,
						sum0 = 0.0f,
						sum1 = 0.0f;

#pragma unroll
			for (int n = 0; n < MF_KT / 8; n++)
			{
				t0 = fmaxf(t0, fmaxf(s[n][0], s[n][1]));
				t1 = fmaxf(t1, fmaxf(s[n][2], s[n][3]));
			}
			softmax_rescale_quad(t0, t1, mx0, mx1, scale_log2, c0, c1, b0, b1);
			mx0 = t0;
			mx1 = t1;
#pragma unroll
			for (int n = 0; n < MF_KT / 8; n++)
			{
				pk[n][0] = cvt_bf16x2(exp2f(fmaf(s[n][0], scale_log2, -b0)), exp2f(fmaf(s[n][1], scale_log2, -b0)));
				pk[n][1] = cvt_bf16x2(exp2f(fmaf(s[n][2], scale_log2, -b1)), exp2f(fmaf(s[n][3], scale_log2, -b1)));
				sum0 += mf_pair_sum(pk[n][0]);
				sum1 += mf_pair_sum(pk[n][1]);
			}
			/* (the quad's partial sums are added once, at the end) */
			l0 = l0 * c0 + sum0;
			l1 = l1 * c1 + sum1;
#pragma unroll
			for (int n = 0; n < NV; n++)
			{
				o[n][0] *= c0;
				o[n][1] *= c0;
				o[n][2] *= c1;
				o[n][3] *= c1;
			}
		}

		/* O += P V: k-step kk is keys 16 kk ..; the C layout of n-tiles 2 kk and 2 kk + 1 is
		 * the A layout of that k-step */
#pragma unroll
		for (int kk = 0; kk < MF_KT / 16; kk++)
		{
			uint32_t	pa[4] = {pk[2 * kk][0], pk[2 * kk][1], pk[2 * kk + 1][0], pk[2 * kk + 1][1]};

#pragma unroll
			for (int n2 = 0; n2 < DV / 16; n2++)
			{
				uint32_t	b[4];

				/* V rows 16 kk .., columns DN + 16 n2 .., transposed: b[0], b[1] for
				 * columns + 0..7, b[2], b[3] for + 8..15 */
				ldsm_x4_trans(b, kt + (16 * kk + lrow) * KP + DN + 16 * n2 + lcol);
				mma_bf16_16816(o[2 * n2], pa, b[0], b[1]);
				mma_bf16_16816(o[2 * n2 + 1], pa, b[2], b[3]);
			}
		}
	}
	cp_async_wait_group<0>();				/* (only empty groups can be left) */

	/* O / l for the rows of the step */
	{
		float		inv0,
					inv1;
		int			r0 = i0 + 16 * w + g,
					r1 = r0 + 8;

		l0 = quad_sum(l0);
		l1 = quad_sum(l1);
		inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
		inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
		for (int n = 0; n < NV; n++)
		{
			int			col = h * DV + 8 * n + 2 * q;

			if (r0 < nr)
				*(float2 *) (out + (size_t) r0 * Ha * DV + col) = make_float2(o[n][0] * inv0, o[n][1] * inv0);
			if (r1 < nr)
				*(float2 *) (out + (size_t) r1 * Ha * DV + col) = make_float2(o[n][2] * inv1, o[n][3] * inv1);
		}
	}
}

/* ---------------------------------------------------------------- launcher */

typedef void (*mf_kernel_fn) (int, int, int, int, int, const uint16_t *, const uint16_t *, const uint16_t *, float,
							  float *);

/* the instance for a head shape, with its shared memory; NULL where not covered */
static mf_kernel_fn
mf_pick(int Dn, int Dr, int Dv, size_t *smem)
{
	if (Dn == 128 && Dr == 64 && Dv == 128)
	{
		*smem = mf_shape<128, 64, 128>::smem;
		return mla_flash_kernel<128, 64, 128>;
	}
	if (Dn == 32 && Dr == 16 && Dv == 32)
	{
		*smem = mf_shape<32, 16, 32>::smem;
		return mla_flash_kernel<32, 16, 32>;
	}
	return NULL;
}

extern "C" int
kk_mla_flash_supported(int Ha, int Dn, int Dr, int Dv, int R)
{
	size_t		smem;

	return Ha >= 1 && Ha <= 65535 && R >= 0 && R % 8 == 0 && mf_pick(Dn, Dr, Dv, &smem) != NULL;
}

extern "C" int
kk_mla_flash(cudaStream_t s, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R, const uint16_t *q16,
			 const uint16_t *kv16, const uint16_t *lat16, float scale, float *out)
{
	size_t		smem = 0;
	mf_kernel_fn kern = mf_pick(Dn, Dr, Dv, &smem);
	int			nqt = (nr + MF_QT - 1) / MF_QT;
	cudaError_t e;

	if (!kern || !kk_mla_flash_supported(Ha, Dn, Dr, Dv, R) || pos0 < 0 || pos0 + nr > INT32_MAX / 2 ||
		nqt > 65535 || ((uintptr_t) q16 | (uintptr_t) kv16 | (uintptr_t) lat16 | (uintptr_t) out) % 16)
		return -1;
	if (nr <= 0)
		return 0;
	if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem)) != cudaSuccess)
		return (int) e;
	kk_launch(kern, dim3(Ha, nqt), dim3(MF_WARPS * 32), smem, s, nr, (int) pos0, Ha, R, R + Dr, q16, kv16, lat16,
			  scale * 1.44269504088896340736f, out);	/* scale log2(e) */
	return 0;
}
