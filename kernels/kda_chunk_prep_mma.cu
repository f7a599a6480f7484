/*
 * kda_chunk_prep_mma.cu — the parallel half of the bf16 chunkwise KDA
 * (kk_kda_chunked_mma, kda_chunk_mma.cu) on tensor cores: for every
 * (chunk of 64 rows, head) at once, the parts of the chunkwise form that do
 * not depend on the state entering the chunk (the math: kda.cu's header,
 * kda_chunk_prep):
 *
 *   A = beta k.Gamma k (strictly lower), P = q.Gamma k (lower), the WY
 *   solution W = (I+A)^-1 (beta Gam k), U0 = (I+A)^-1 (beta v), Qg = Gam q,
 *   Kt = k Gamma(end, j), and Gam_end = exp(sum of the chunk's g).
 *
 * The layout it writes for kda_chunk_mma.cu, per tile (chunk * H + h), bf16:
 * W16, U16, Q16 [C][K] row-major, Kt16 [K][C] (transposed), P16 [C][C]
 * (zero above the diagonal); gl fp32 [K] (Gam_end).  kk_kda_chunk_prep_bf16
 * picks this kernel (KL_CUDA_KDA_PREP_MMA, default) or kda.cu's fp32 prep
 * kernel with bf16 stores (kda_chunk_prep_fp32_bf16); both write the same
 * layout, equal within bf16 rounding.  KL_CUDA_KDA_PREP_MMA=6 (the
 * default at K = 128) splits the 63.5 KB kernel (=3) into two kernels of
 * independent blocks with =3's outputs bit for bit (the phases they share
 * are one device function each), and reads q, k, v in fp32 or bf16
 * (kk_kda_chunk_prep_bf16_in16).
 */
#include "kda_common.cuh"

/* ------------------------------------------------------------------ chunkwise: prep on tensor cores */

/*
 * kda_chunk_prep_mma_kernel<K> (KL_CUDA_KDA_PREP_MMA, precision bf16): the
 * outputs of kda_chunk_prep_kernel<K, true> with the chunk's products on
 * tensor cores (mma.sync m16n8k16, bf16 operands, fp32 accumulators) and
 * 93 KB of shared memory at K = 128 (two blocks an SM; the fp32 kernel's
 * 216 KB allowed one).  One block of 128 threads per (chunk, head).
 *
 * Decays: G_t = sum_{u <= t} g_u (fp32, per channel, from the chunk start).
 * Every factor that reaches a bf16 operand is exp of a difference G_i - G_j
 * with i >= j, so <= 1 (underflow to 0 is harmless: the true product is
 * smaller still); no exponential of a cumulative sum is ever divided out.
 *   - pairs inside a 16-row sub-chunk: fp32 running products of a = exp(g)
 *     on CUDA cores (a reference point inside the sub-chunk would need
 *     factors > 1, unbounded for large gates);
 *   - pairs across sub-chunks (i in sub-chunk b, j before it): through the
 *     reference point r = 16 b - 1, (q_i, k_i) exp(G_i - G_r) against
 *     k_j exp(G_r - G_j), as mma products;
 *   - (I + A)^-1 in fp32 (16 x 16 blocks, kda_common.cuh's functions), then
 *     applied to [beta k Gam | beta v] as an mma product with the inverse
 *     rounded to bf16.
 * Rows past n: q = k = v = 0, g = 0, beta = 0 (they change nothing).
 */

/* A fragment: rows r0.., columns k0.. of row-major bf16 m (stride ld) */
__device__ __forceinline__ void
kp_frag_a(uint32_t *a, const uint16_t *m, int ld, int r0, int k0, int lane)
{
	const uint16_t *p = m + (r0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);

	a[0] = *(const uint32_t *) p;
	a[1] = *(const uint32_t *) (p + 8 * ld);
	a[2] = *(const uint32_t *) (p + 8);
	a[3] = *(const uint32_t *) (p + 8 * ld + 8);
}

/* B fragment: columns n0..n0+7 of B stored transposed (row n of bt = column n) */
__device__ __forceinline__ void
kp_frag_b(uint32_t *b, const uint16_t *bt, int ld, int n0, int k0, int lane)
{
	const uint16_t *p = bt + (n0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);

	b[0] = *(const uint32_t *) p;
	b[1] = *(const uint32_t *) (p + 8);
}

/* shared memory layout (bytes); U1 (the pair phase) and U2 (solve) overlap */
template <int K>
struct kp_layout
{
	static constexpr int C = KDA_CHUNK;
	static constexpr int LK = K + 8;	/* bf16 rows of K: fragment loads free of bank conflicts */
	static constexpr int LC = C + 8;	/* bf16 rows of C */
	static constexpr int SB = 0;		/* beta [C] fp32 */
	static constexpr int SA = SB + 4 * C;	/* A [C][C] fp32 */
	static constexpr int GE = SA + 4 * C * C;	/* G at the sub-chunk ends [4][K] fp32 */
	static constexpr int U = GE + 4 * 4 * K;
	/* U1: one sub-chunk's q, k, a fp32 [16][K]; Xq, Xk [48][LK]; Kr [96][LK] */
	static constexpr int DQ = U;
	static constexpr int DK = DQ + 4 * 16 * K;
	static constexpr int DA = DK + 4 * 16 * K;
	static constexpr int XQ = DA + 4 * 16 * K;
	static constexpr int XK = XQ + 2 * 48 * LK;
	static constexpr int KR = XK + 2 * 48 * LK;
	static constexpr int U1END = KR + 2 * 96 * LK;
	/* U2: Li [C][C] fp32, Tb [3][16][16] fp32, Lb [C][LC] bf16, Kb^T, Vb^T [K][LC] bf16 */
	static constexpr int LI = U;
	static constexpr int TB = LI + 4 * C * C;
	static constexpr int LB = TB + 4 * 3 * 256;
	static constexpr int KBT = LB + 2 * C * LC;
	static constexpr int VBT = KBT + 2 * K * LC;
	static constexpr int U2END = VBT + 2 * K * LC;
	static constexpr int BYTES = U1END > U2END ? U1END : U2END;
	static_assert(XQ % 16 == 0 && XK % 16 == 0 && KR % 16 == 0 && LB % 16 == 0 && KBT % 16 == 0 &&
				  VBT % 16 == 0 && (2 * LK) % 16 == 0 && (2 * LC) % 16 == 0, "ldmatrix rows 16-byte aligned");
};

/*
 * NTH = 128: the kernel as first written (KL_CUDA_KDA_PREP_MMA=1).  NTH =
 * 256 (=2, K = 128 only): Nsight at 8192 rows x 32 heads found the 128-thread
 * kernel latency-bound (1.65 ms; 8 warps an SM, 2 blocks by shared memory;
 * one instruction every 6.8 cycles a warp, 41 % of stalls waiting on shared
 * memory loads, DRAM 11 %), so the same shared memory (still 2 blocks an SM)
 * gets twice the warps, each with half the serial work:
 *   - the sub-chunk operands (B): thread (c, half) takes rows 8 half ..
 *     8 half + 7 of the sub-chunk (the second half first adds rows 0..7's
 *     g to G in the same order, so every G is the 128-thread kernel's);
 *   - the pairs inside a sub-chunk: 16 slices of K / 16 channels (not 8 of
 *     K / 8), so each thread's dependent chain of shared loads is half as
 *     long (only this sum's order differs from NTH = 128);
 *   - the right-hand sides (D): rows 32 half .. 32 half + 31, the second
 *     half starting from G at row 31 (Ge[1], the same sum);
 *   - the mma phases spread their tiles over 8 warps;
 *   - the sums of g (A) and (D) issue their global loads 16 rows at a time
 *     before adding (the 128-thread loop waits on each row's load in turn).
 */
template <int K, int NTH>
__global__ void __launch_bounds__(NTH)
kda_chunk_prep_mma_kernel(int n, int H, const float *__restrict__ q, const float *__restrict__ k,
						  const float *__restrict__ v, const float *__restrict__ g, const float *__restrict__ beta,
						  uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16,
						  float *glast)
{
	typedef kp_layout<K> L;
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	constexpr bool WIDE = NTH == 256;	/* the second form above (K = 128 only) */
	constexpr int NSL = WIDE ? 16 : 8;	/* slices in the sub-chunk pairs */
	constexpr int CS = K / NSL;	/* channels per slice */
	extern __shared__ uint4 kp_smem[];
	char	   *sm = (char *) kp_smem;
	float	   *sb = (float *) (sm + L::SB),
			   *sA = (float *) (sm + L::SA),
			   *Ge = (float *) (sm + L::GE),
			   *dq = (float *) (sm + L::DQ),
			   *dk = (float *) (sm + L::DK),
			   *da = (float *) (sm + L::DA),
			   *Li = (float *) (sm + L::LI),
			   *Tb = (float *) (sm + L::TB);
	uint16_t   *Xq = (uint16_t *) (sm + L::XQ),
			   *Xk = (uint16_t *) (sm + L::XK),
			   *Kr = (uint16_t *) (sm + L::KR),
			   *Lb = (uint16_t *) (sm + L::LB),
			   *KbT = (uint16_t *) (sm + L::KBT),
			   *VbT = (uint16_t *) (sm + L::VBT);
	int			chunk = blockIdx.x,
				h = blockIdx.y,
				tid = threadIdx.x,
				warp = tid >> 5,
				lane = tid & 31,
				gq = lane >> 2,
				t2 = 2 * (lane & 3);
	int			t0 = chunk * C,
				Cn = n - t0 < C ? n - t0 : C;
	size_t		tile = (size_t) chunk * H + h,
				HK = (size_t) H * K;
	const size_t rowoff = (size_t) t0 * HK + (size_t) h * K;
	uint16_t   *P = P16 + tile * C * C;

	/* A. beta, A zeroed, the sub-chunk ends' G */
	if (tid < C)
		sb[tid] = tid < Cn ? beta[(size_t) (t0 + tid) * H + h] : 0.0f;
	for (int e = tid; e < C * C; e += NTH)
		sA[e] = 0.0f;
	if (WIDE && tid < K)
	{
		float		G = 0;

		/* 16 loads in flight, then the adds in row order; rows past n add
		 * +0, so every Ge is the sum the loop below makes */
		for (int t16 = 0; t16 < C; t16 += 16)
		{
			float		gl[16];

#pragma unroll
			for (int u = 0; u < 16; u++)
				gl[u] = t16 + u < Cn ? g[rowoff + (size_t) (t16 + u) * HK + tid] : 0.0f;
#pragma unroll
			for (int u = 0; u < 16; u++)
				G += gl[u];
			Ge[(t16 >> 4) * K + tid] = G;
		}
		glast[tile * K + tid] = __expf(G);
	}
	else if (tid < K)
	{
		float		G = 0;

		for (int t = 0; t < Cn; t++)
		{
			G += g[rowoff + (size_t) t * HK + tid];
			if ((t & 15) == 15)
				Ge[(t >> 4) * K + tid] = G;
		}
		for (int b = Cn >> 4; b < 4; b++)
			Ge[b * K + tid] = G;	/* rows past n: g = 0 */
		glast[tile * K + tid] = __expf(G);
	}
	__syncthreads();

	/* B. per sub-chunk: its rows' operands, then its pairs */
	for (int b = 0; b < 4; b++)
	{
		int			s0 = 16 * b;

		if (WIDE || tid < K)
		{
			int			c = tid % K,
						i0 = WIDE ? 8 * (tid / K) : 0;	/* this thread's rows i0 .. of the sub-chunk */
			float		Gs = b > 0 ? Ge[(b - 1) * K + c] : 0.0f,	/* G at the reference point s0 - 1 */
						Gb = Ge[b * K + c],
						G = Gs,
						eS = __expf(Gs),		/* Gam(s0 - 1) */
						eT = __expf(Ge[3 * K + c] - Gb);	/* Gamma(end, sub-chunk end) */
			uint32_t	kt[4];

			/* the second half: G through row s0 + 7, added as the first half does */
			if (WIDE && i0 > 0)
#pragma unroll
				for (int ii = 0; ii < 8; ii++)
					G += s0 + ii < Cn ? g[rowoff + (size_t) (s0 + ii) * HK + c] : 0.0f;
#pragma unroll
			for (int u = 0; u < (WIDE ? 8 : 16); u++)
			{
				int			ii = i0 + u;	/* (i0 a multiple of 8: ii & 7 = u & 7) */
				int			t = s0 + ii;
				bool		in = t < Cn;
				size_t		off = rowoff + (size_t) t * HK + c;
				float		qv = in ? q[off] : 0.0f,
							kv = in ? k[off] : 0.0f,
							gv = in ? g[off] : 0.0f;
				float		F,
							R;

				G += gv;
				F = __expf(G - Gs);		/* Gamma(t, r) */
				R = __expf(Gb - G);	/* Gamma(sub-chunk end, t) */
				dq[ii * K + c] = qv;
				dk[ii * K + c] = kv;
				da[ii * K + c] = __expf(gv);
				if (b > 0)
				{
					Xq[(t - 16) * L::LK + c] = f32_to_bf16(qv * F);
					Xk[(t - 16) * L::LK + c] = f32_to_bf16(kv * F);
				}
				/* Kr for the later sub-chunks b2: k_t Gamma(16 b2 - 1, t) */
				for (int b2 = b + 1; b2 < 4; b2++)
					Kr[((b2 - 1) * b2 / 2 * 16 + t) * L::LK + c] =
						f32_to_bf16(kv * R * __expf(Ge[(b2 - 1) * K + c] - Gb));
				Q16[tile * C * K + (size_t) t * K + c] = f32_to_bf16(qv * (F * eS));
				{
					float		x = kv * (R * eT);	/* k_t Gamma(end, t) */

					if (u & 1)
						kt[(u & 7) >> 1] |= (uint32_t) f32_to_bf16(x) << 16;
					else
						kt[(u & 7) >> 1] = f32_to_bf16(x);
				}
				if ((u & 7) == 7)
					*(uint4 *) (Kt16 + tile * K * C + (size_t) c * C + s0 + ii - 7) =
						make_uint4(kt[0], kt[1], kt[2], kt[3]);
			}
		}
		__syncthreads();
		{
			/* pairs (i, j) inside the sub-chunk: thread (jj, slice), channels sl + NSL cs */
			int			jj = tid / NSL,
						sl = tid % NSL;
			float		d[CS],
						kj[CS];

#pragma unroll
			for (int cs = 0; cs < CS; cs++)
			{
				d[cs] = 1.0f;
				kj[cs] = dk[jj * K + sl + NSL * cs];
			}
			for (int ii = 0; ii < 16; ii++)
			{
				float		pp = 0,
							aa = 0;

#pragma unroll
				for (int cs = 0; cs < CS; cs++)
				{
					int			c = sl + NSL * cs;

					if (ii > jj)
						d[cs] *= da[ii * K + c];
					pp += dq[ii * K + c] * (kj[cs] * d[cs]);
					aa += dk[ii * K + c] * (kj[cs] * d[cs]);
				}
				pp += __shfl_xor_sync(0xffffffffu, pp, 1);
				aa += __shfl_xor_sync(0xffffffffu, aa, 1);
				pp += __shfl_xor_sync(0xffffffffu, pp, 2);
				aa += __shfl_xor_sync(0xffffffffu, aa, 2);
				pp += __shfl_xor_sync(0xffffffffu, pp, 4);
				aa += __shfl_xor_sync(0xffffffffu, aa, 4);
				if (WIDE)
				{
					pp += __shfl_xor_sync(0xffffffffu, pp, 8);
					aa += __shfl_xor_sync(0xffffffffu, aa, 8);
				}
				if (sl == 0)
				{
					P[(s0 + ii) * C + s0 + jj] = ii >= jj ? f32_to_bf16(pp) : 0;
					if (ii > jj)
						sA[(s0 + ii) * C + s0 + jj] = sb[s0 + ii] * aa;
				}
			}
		}
		__syncthreads();		/* dq, dk, da free for the next sub-chunk */
	}

	/* C. pairs across sub-chunks: 12 column tiles of 8 for P, 12 for A */
	for (int item = warp; item < 24; item += NTH / 32)
	{
		int			which = item / 12,	/* 0: P (q side), 1: A (k side) */
					it = item % 12,
					b = it < 2 ? 1 : it < 6 ? 2 : 3,
					n0 = 8 * (it - (b == 1 ? 0 : b == 2 ? 2 : 6)),
					s0 = 16 * b;
		const uint16_t *X = which ? Xk : Xq;
		const uint16_t *Krb = Kr + (b - 1) * b / 2 * 16 * L::LK;
		float		acc[4] = {0, 0, 0, 0};

#pragma unroll
		for (int kk = 0; kk < K; kk += 16)
		{
			uint32_t	a[4],
						bb[2];

			kp_frag_a(a, X, L::LK, s0 - 16, kk, lane);
			kp_frag_b(bb, Krb, L::LK, n0, kk, lane);
			mma_bf16_16816(acc, a, bb[0], bb[1]);
		}
		{
			int			r = s0 + gq,
						cc = n0 + t2;

			if (which == 0)
			{
				*(uint32_t *) (P + r * C + cc) = pack_bf16x2(acc[0], acc[1]);
				*(uint32_t *) (P + (r + 8) * C + cc) = pack_bf16x2(acc[2], acc[3]);
			}
			else
			{
				sA[r * C + cc] = sb[r] * acc[0];
				sA[r * C + cc + 1] = sb[r] * acc[1];
				sA[(r + 8) * C + cc] = sb[r + 8] * acc[2];
				sA[(r + 8) * C + cc + 1] = sb[r + 8] * acc[3];
			}
		}
	}
	/* P above the diagonal blocks: zero */
	for (int e = tid; e < C * C; e += NTH)
		if ((e % C) / 16 > (e / C) / 16)
			P[e] = 0;
	__syncthreads();			/* A complete; Xq, Xk, Kr dead (U2 may overwrite them) */

	/* D. the right-hand sides [beta k Gam | beta v] transposed (bf16) */
	if (WIDE || tid < K)
	{
		int			c = tid % K,
					r0 = WIDE ? 32 * (tid / K) : 0,	/* this thread's rows r0 .. */
					r1 = WIDE ? r0 + 32 : C;
		float		G = r0 > 0 ? Ge[K + c] : 0.0f;	/* G at row 31: the same sum */
		uint32_t	kb[4],
					vb[4];

		for (int t8 = r0; t8 < r1; t8 += 8)
#pragma unroll
		for (int u = 0; u < 8; u++)
		{
			int			t = t8 + u;	/* (t8 a multiple of 8: t & 7 = u) */
			bool		in = t < Cn;
			size_t		off = rowoff + (size_t) t * HK + c;
			float		bt = sb[t],
						x,
						y;

			G += in ? g[off] : 0.0f;
			x = in ? bt * k[off] * __expf(G) : 0.0f;
			y = in ? bt * v[off] : 0.0f;
			if (u & 1)
			{
				kb[u >> 1] |= (uint32_t) f32_to_bf16(x) << 16;
				vb[u >> 1] |= (uint32_t) f32_to_bf16(y) << 16;
			}
			else
			{
				kb[u >> 1] = f32_to_bf16(x);
				vb[u >> 1] = f32_to_bf16(y);
			}
			if (u == 7)
			{
				*(uint4 *) (KbT + c * L::LC + t - 7) = make_uint4(kb[0], kb[1], kb[2], kb[3]);
				*(uint4 *) (VbT + c * L::LC + t - 7) = make_uint4(vb[0], vb[1], vb[2], vb[3]);
			}
		}
	}
	/* E. (I + A)^-1 in fp32, then as the bf16 operand Lb */
	chunk_prep_invert_diagonal(sA, Li, tid);
	chunk_prep_invert_below(sA, Li, Tb, tid);
	for (int e = tid; e < C * C; e += NTH)
		Lb[(e / C) * L::LC + e % C] = f32_to_bf16(Li[e]);
	__syncthreads();

	/* F. [W | U0] = Li [Kb | Vb]: warp w, column tiles w NT.. of the 2K/8 */
	{
		constexpr int NT = 8 * K / NTH;	/* column tiles of 8 per warp (2 K / 8 over NTH / 32 warps) */
#pragma unroll 1
		for (int m = 0; m < 4; m++)
		{
			float		acc[NT][4];

#pragma unroll
			for (int j = 0; j < NT; j++)
				acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
			for (int kk = 0; kk <= 16 * m; kk += 16)	/* Li lower triangular */
			{
				uint32_t	a[4];

				kp_frag_a(a, Lb, L::LC, 16 * m, kk, lane);
#pragma unroll
				for (int j = 0; j < NT; j++)
				{
					int			col = 8 * (warp * NT + j);	/* in [Kb | Vb] */
					const uint16_t *bt = col < K ? KbT + col * L::LC : VbT + (col - K) * L::LC;
					uint32_t	bb[2];

					kp_frag_b(bb, bt, L::LC, 0, kk, lane);
					mma_bf16_16816(acc[j], a, bb[0], bb[1]);
				}
			}
#pragma unroll
			for (int j = 0; j < NT; j++)
			{
				int			col = 8 * (warp * NT + j) + t2,
							r = 16 * m + gq;
				uint16_t   *dst = col < K ? W16 + tile * C * K + col : U16 + tile * C * V + col - K;

				*(uint32_t *) (dst + (size_t) r * K) = pack_bf16x2(acc[j][0], acc[j][1]);
				*(uint32_t *) (dst + (size_t) (r + 8) * K) = pack_bf16x2(acc[j][2], acc[j][3]);
			}
		}
	}
}

/*
 * kda_chunk_prep_mma3_kernel (KL_CUDA_KDA_PREP_MMA=3, K = 128, 256 threads):
 * the outputs of the kernels above, equal within fp32 rounding order, in
 * 63.5 KB of shared memory (3 blocks = 24 warps an SM; the forms above use
 * 95.5 KB, 2 blocks) and fewer instructions.  Nsight of the 256-thread form
 * at 8192 rows x 32 heads: 1.19 ms, one instruction every 2.1 cycles a
 * scheduler, 52 % of cycles no eligible warp, 135k warp instructions a
 * tile, most of them in the pairs inside a sub-chunk.  What changes:
 *   - pairs inside a sub-chunk: lane (jj, slice) holds k_jj's 8 channels
 *     (4 sl.., 64 + 4 sl..: float4 loads free of bank conflicts) already
 *     multiplied by the running product of a, so a row ii costs 6 LDS.128,
 *     8 FMUL, 16 FFMA; rows ii < jj are skipped (warp w starts at ii = 2 w;
 *     the strict upper triangle of P is zeroed once at the start); P's and
 *     A's sums share one shuffle tree (even lanes P, odd lanes A);
 *   - pairs across sub-chunks are formed one sub-chunk at a time: at
 *     sub-chunk b only its 16 rows of Xq, Xk and the 16 b rows of Kr
 *     (k_t Gamma(16 b - 1, t), one exp each, k and g read again, from L1/L2)
 *     live, 22 KB instead of 52 KB; the mma tiles run in the same phase as
 *     the pairs inside the sub-chunk, on the warps that have fewer pairs;
 *   - the 16 x 16 diagonal inverses: thread (block, column) solves its
 *     column fully unrolled in registers (A's rows read as float4,
 *     broadcast to the block's 16 threads): a dependent chain of ~16 FFMA
 *     instead of ~120 dependent shared loads;
 *   - the right-hand sides [beta k Gam | beta v]^T are formed after the
 *     inverse, over Li and Tb's room; A is not zeroed (every element the
 *     inverse reads is written), Li is not zeroed (Lb masks the blocks above
 *     the diagonal).
 */
template <int K>
struct kp3_layout
{
	static constexpr int C = KDA_CHUNK;
	static constexpr int LK = K + 8;
	static constexpr int LC = C + 8;
	static constexpr int SB = 0;		/* beta [C] fp32 */
	static constexpr int GE = SB + 4 * C;	/* G at the sub-chunk ends [4][K] fp32 */
	static constexpr int SA = GE + 4 * 4 * K;	/* A [C][C] fp32 */
	static constexpr int U = SA + 4 * C * C;
	/* U1 (sub-chunk loop): q, k, a fp32 [16][K]; Xq, Xk [16][LK]; Kr [48][LK] */
	static constexpr int DQ = U;
	static constexpr int DK = DQ + 4 * 16 * K;
	static constexpr int DA = DK + 4 * 16 * K;
	static constexpr int XQ = DA + 4 * 16 * K;
	static constexpr int XK = XQ + 2 * 16 * LK;
	static constexpr int KR = XK + 2 * 16 * LK;
	static constexpr int U1END = KR + 2 * 48 * LK;
	/* U2 (inverse): Lb [C][LC] bf16, Li [C][C] fp32, Tb [3][16][16] fp32 */
	static constexpr int LB = U;
	static constexpr int LI = LB + 2 * C * LC;
	static constexpr int TB = LI + 4 * C * C;
	static constexpr int U2END = TB + 4 * 3 * 256;
	/* U3 (products): Lb kept, Kb^T, Vb^T [K][LC] bf16 over Li and Tb */
	static constexpr int KBT = LI;
	static constexpr int VBT = KBT + 2 * K * LC;
	static constexpr int U3END = VBT + 2 * K * LC;
	static constexpr int BYTES = U1END > U2END ? (U1END > U3END ? U1END : U3END) : (U2END > U3END ? U2END : U3END);
};

/* exp(x) as one ex2 with denormal results flushed to 0 (every exp here
 * is of a difference <= 0 or of a g <= 0: a flushed factor is harmless, the
 * true product is smaller still) */
__device__ __forceinline__ float
kp3_exp(float x)
{
	float		r;

	asm("ex2.approx.ftz.f32 %0, %1;\n":"=f"(r):"f"(x * 1.4426950408889634f));
	return r;
}

/* x as bf16, rounded to nearest even (one cvt; f32_to_bf16's numbers but for NaN) */
__device__ __forceinline__ uint16_t
kp3_bf16(float x)
{
	uint16_t	r;

	asm("cvt.rn.bf16.f32 %0, %1;\n":"=h"(r):"f"(x));
	return r;
}

/*
 * 4b of the inverse (chunk_prep_invert_below's sums in the same order per
 * element), a thread per (block pair, row, 4 columns): A's row and Tb's /
 * Li's rows read as float4, 5 shared loads per 16 FMA instead of 32.
 * LDA: the row stride (floats) of A and Li.  At C = 64 a warp's 8 rows rr
 * read the same column of 8 rows 256 bytes apart (one bank group: 8-way
 * conflicts, Nsight's 2.6-way average in kp6_solve); C + 4 (=6's solve)
 * puts the 8 rows in 8 different bank groups.  The sums do not change.
 */
template <int LDA = KDA_CHUNK>
__device__ __forceinline__ void
kp3_invert_below(const float *sA, float *Li, float *Tb, int tid)
{
	for (int d = 1; d < KDA_CHUNK / KDA_SUB; d++)
	{
		int			np = KDA_CHUNK / KDA_SUB - d;

		if (tid < np * 64)
		{
			int			j = tid >> 6,
						i = j + d,
						rr = (tid >> 2) & 15,
						c4 = 4 * (tid & 3);
			float		t[4] = {0, 0, 0, 0};

			for (int kb = j; kb < i; kb++)
#pragma unroll
				for (int m4 = 0; m4 < KDA_SUB; m4 += 4)
				{
					float4		a4 = *(const float4 *) (sA + (KDA_SUB * i + rr) * LDA + KDA_SUB * kb + m4);
					float		av[4] = {a4.x, a4.y, a4.z, a4.w};

#pragma unroll
					for (int mm = 0; mm < 4; mm++)
					{
						float4		l4 = *(const float4 *) (Li + (KDA_SUB * kb + m4 + mm) * LDA + KDA_SUB * j + c4);

						t[0] += av[mm] * l4.x;
						t[1] += av[mm] * l4.y;
						t[2] += av[mm] * l4.z;
						t[3] += av[mm] * l4.w;
					}
				}
			*(float4 *) (Tb + j * 256 + rr * 16 + c4) = make_float4(t[0], t[1], t[2], t[3]);
		}
		__syncthreads();
		if (tid < np * 64)
		{
			int			j = tid >> 6,
						i = j + d,
						rr = (tid >> 2) & 15,
						c4 = 4 * (tid & 3);
			float		t[4] = {0, 0, 0, 0};

#pragma unroll
			for (int m4 = 0; m4 < KDA_SUB; m4 += 4)
			{
				float4		a4 = *(const float4 *) (Li + (KDA_SUB * i + rr) * LDA + KDA_SUB * i + m4);
				float		av[4] = {a4.x, a4.y, a4.z, a4.w};

#pragma unroll
				for (int mm = 0; mm < 4; mm++)
				{
					float4		b4 = *(const float4 *) (Tb + j * 256 + (m4 + mm) * 16 + c4);

					t[0] += av[mm] * b4.x;
					t[1] += av[mm] * b4.y;
					t[2] += av[mm] * b4.z;
					t[3] += av[mm] * b4.w;
				}
			}
			*(float4 *) (Li + (KDA_SUB * i + rr) * LDA + KDA_SUB * j + c4) = make_float4(-t[0], -t[1], -t[2], -t[3]);
		}
		__syncthreads();
	}
}

/*
 * kp3_invert_below, then the whole inverse Li as the bf16 operand Lb
 * [C][LC] with the blocks above the diagonal zero (=3 and =6's solve);
 * LDA: A's and Li's row stride, as kp3_invert_below.
 */
template <int NTH, int LC, int LDA = KDA_CHUNK>
__device__ __forceinline__ void
kp3_invert_below_bf16(const float *sA, float *Li, float *Tb, uint16_t *Lb, int tid)
{
	constexpr int C = KDA_CHUNK;

	kp3_invert_below<LDA>(sA, Li, Tb, tid);
	for (int e = tid; e < C * C / 2; e += NTH)
	{
		int			r = e / (C / 2),
					c = 2 * (e % (C / 2));
		float2		l2 = *(const float2 *) (Li + r * LDA + c);

		*(uint32_t *) (Lb + r * LC + c) = c / 16 > r / 16 ? 0u : cvt_bf16x2(l2.x, l2.y);
	}
}

/*
 * The pairs of sub-chunk b (rows s0 = 16 b ..) with the sub-chunks before
 * it, as mma products through the reference point: 2 b column tiles of 8
 * for P (from Xq) and 2 b for A (from Xk), both against Kr [16 b][LK], on
 * the warps with the fewest pairs above (7, 6, ..).  P [C][C] bf16 takes
 * rows s0 .. s0 + 15; A [C][C] fp32 the same rows scaled by their beta
 * (beta_r[i]: row s0 + i's).  One copy for =3 and =6's sub-chunk kernel.
 */
template <int K, int LK, int NTH>
__device__ __forceinline__ void
kp_pairs_before(const uint16_t *Xq, const uint16_t *Xk, const uint16_t *Kr, int b, int s0, int warp, int lane,
				uint16_t *P, float *A, const float *beta_r)
{
	constexpr int C = KDA_CHUNK;
	int			gq = lane >> 2,
				t2 = 2 * (lane & 3);

	for (int item = 7 - warp; item < 4 * b; item += NTH / 32)
	{
		int			which = item & 1,	/* 0: P (q side), 1: A (k side) */
					n0 = 8 * (item >> 1);
		const uint16_t *X = which ? Xk : Xq;
		float		acc[4] = {0, 0, 0, 0};

		static_assert(K % 32 == 0 && (2 * LK) % 16 == 0, "ldmatrix: two k steps a pass, 16-byte rows");
		/* the fragments by ldmatrix: 3 instructions for two k steps where
		 * kp_frag_a / kp_frag_b took 12 shared loads (the same registers,
		 * so the same products in the same k order) */
#pragma unroll
		for (int kk = 0; kk < K; kk += 32)
		{
			uint32_t	a0[4],
						a1[4],
						bb[4];

			ldsm_frag_a(a0, X, LK, 0, kk, lane);
			ldsm_frag_a(a1, X, LK, 0, kk + 16, lane);
			ldsm_frag_b_k32(bb, Kr, LK, n0, kk, lane);
			mma_bf16_16816(acc, a0, bb[0], bb[1]);
			mma_bf16_16816(acc, a1, bb[2], bb[3]);
		}
		{
			int			r = s0 + gq,
						cc = n0 + t2;

			if (which == 0)
			{
				*(uint32_t *) (P + r * C + cc) = cvt_bf16x2(acc[0], acc[1]);
				*(uint32_t *) (P + (r + 8) * C + cc) = cvt_bf16x2(acc[2], acc[3]);
			}
			else
			{
				*(float2 *) (A + r * C + cc) = make_float2(beta_r[gq] * acc[0], beta_r[gq] * acc[1]);
				*(float2 *) (A + (r + 8) * C + cc) = make_float2(beta_r[gq + 8] * acc[2], beta_r[gq + 8] * acc[3]);
			}
		}
	}
}

/*
 * x = column j of (I + A)^-1 for a 16 x 16 block A, strictly lower
 * triangular (row stride LDA floats, 16-byte aligned rows), by forward
 * substitution in registers: x[m] = 0 for m < j, so the terms before the
 * diagonal add 0.  One copy for =3's diagonal blocks and =6's sub-chunks.
 */
template <int LDA>
__device__ __forceinline__ void
kp_unit_lower_inverse_column(const float *a, int j, float x[16])
{
#pragma unroll
	for (int i = 0; i < 16; i++)
	{
		float		s = 0;

#pragma unroll
		for (int m4 = 0; m4 < i; m4 += 4)
		{
			float4		a4 = *(const float4 *) (a + i * LDA + m4);

			s += a4.x * x[m4];
			if (m4 + 1 < i)
				s += a4.y * x[m4 + 1];
			if (m4 + 2 < i)
				s += a4.z * x[m4 + 2];
			if (m4 + 3 < i)
				s += a4.w * x[m4 + 3];
		}
		x[i] = i == j ? 1.0f : i < j ? 0.0f : -s;
	}
}

/*
 * [W | U0] = Li [Kb | Vb] for tile `tile` (chunk * H + h) into the scratch:
 * Li lower triangular, bf16 Lb [C][LC]; Kb^T, Vb^T [K][LC] bf16, all in
 * shared memory; warp w takes the column tiles w NT .. w NT + NT - 1 of the
 * 2 K / 8.  One copy for =3 (its step F) and =6's solve (its step D).
 * STG (=6's solve, KL_CUDA_KDA_KP6_WIDE): the accumulators' 4-byte pieces
 * (2 columns, rows 8 apart: 16 of a sector's 32 bytes a store, Nsight)
 * go through the warp's stw [16][KP_STW] bf16 in shared memory first, and
 * out as 16-byte stores of whole sectors (the same values).
 */
constexpr int KP_STW = 40;		/* stw's row stride: 32 columns + 8 (fragment writes and 16-byte reads free of bank conflicts) */

template <int K, int NTH, int LC, bool STG = false>
__device__ __forceinline__ void
kp_wu_product(const uint16_t *Lb, const uint16_t *KbT, const uint16_t *VbT, uint16_t *W16, uint16_t *U16,
			  size_t tile, int warp, int lane, uint16_t *stw = NULL)
{
	constexpr int C = KDA_CHUNK;
	constexpr int V = K;
	constexpr int NT = 8 * K / NTH;
	int			gq = lane >> 2,
				t2 = 2 * (lane & 3);

#pragma unroll 1
	for (int m = 0; m < 4; m++)
	{
		float		acc[NT][4];

#pragma unroll
		for (int j = 0; j < NT; j++)
			acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
		for (int kk = 0; kk <= 16 * m; kk += 16)
		{
			uint32_t	a[4];

			/* fragments by ldmatrix (the registers kp_frag_a / kp_frag_b
			 * load, one instruction for A and one for two column tiles'
			 * B where there were 4 + 2 NT shared loads) */
			ldsm_frag_a(a, Lb, LC, 16 * m, kk, lane);
			if constexpr (NT % 2 == 0)
			{
				/* a warp's NT tiles are adjacent columns of one of Kb^T, Vb^T */
				static_assert(K % (8 * NT) == 0, "a warp's tiles in one matrix");
#pragma unroll
				for (int j = 0; j < NT; j += 2)
				{
					int			col = 8 * (warp * NT + j);
					const uint16_t *bt = col < K ? KbT + col * LC : VbT + (col - K) * LC;
					uint32_t	bb[4];

					ldsm_frag_b_n16(bb, bt, LC, 0, kk, lane);
					mma_bf16_16816(acc[j], a, bb[0], bb[1]);
					mma_bf16_16816(acc[j + 1], a, bb[2], bb[3]);
				}
			}
			else
#pragma unroll
				for (int j = 0; j < NT; j++)
				{
					int			col = 8 * (warp * NT + j);
					const uint16_t *bt = col < K ? KbT + col * LC : VbT + (col - K) * LC;
					uint32_t	bb[2];

					kp_frag_b(bb, bt, LC, 0, kk, lane);
					mma_bf16_16816(acc[j], a, bb[0], bb[1]);
				}
		}
		if constexpr (STG)
		{
			static_assert(NT == 4, "stw holds a warp's 32 columns");
			/* rows 16 m .. 16 m + 15, columns 32 warp .. 32 warp + 31 of
			 * [W | U0] (one of the two: K is a multiple of 32) */
			int			col0 = 8 * warp * NT;
			uint16_t   *dst = col0 < K ? W16 + tile * C * K + col0 : U16 + tile * C * V + col0 - K;

#pragma unroll
			for (int j = 0; j < NT; j++)
			{
				*(uint32_t *) (stw + gq * KP_STW + 8 * j + t2) = cvt_bf16x2(acc[j][0], acc[j][1]);
				*(uint32_t *) (stw + (gq + 8) * KP_STW + 8 * j + t2) = cvt_bf16x2(acc[j][2], acc[j][3]);
			}
			__syncwarp();
			/* lane: row lane & 15, 16-byte pieces lane >> 4 and 2 + (lane >> 4):
			 * a store writes the first or second 32 bytes of 16 rows */
#pragma unroll
			for (int p = 0; p < 2; p++)
			{
				int			rr = lane & 15,
							cc = 8 * ((lane >> 4) + 2 * p);

				*(uint4 *) (dst + (16 * m + rr) * K + cc) = *(const uint4 *) (stw + rr * KP_STW + cc);
			}
			__syncwarp();		/* stw free for the next m */
		}
		else
#pragma unroll
			for (int j = 0; j < NT; j++)
			{
				int			col = 8 * (warp * NT + j) + t2,
							r = 16 * m + gq;
				uint16_t   *dst = col < K ? W16 + tile * C * K + col : U16 + tile * C * V + col - K;

				*(uint32_t *) (dst + r * K) = cvt_bf16x2(acc[j][0], acc[j][1]);
				*(uint32_t *) (dst + (r + 8) * K) = cvt_bf16x2(acc[j][2], acc[j][3]);
			}
	}
}

/*
 * KL_CUDA_KDA_PREP_MMA=4: kda_chunk_prep_mma4_kernel<128> (kp3_body<128, true>) reads the
 * op's raw inputs instead of kda_prep's fp32 outputs (kk_kda_prep does not
 * run, its q, k, v, g, beta are never written: 0.54 GB of stores and as much
 * of loads an 8192-row step at the 48B shape).  Wherever the 63.5 KB kernel
 * loads q, k, v, g or beta, the fused one computes the element from the raw
 * projections with the elementwise kernels' functions in their order:
 * kp4_conv = kda_conv_silu's taps (oldest first, summed from 0, the tail for
 * positions before the sequence), siluf_, x * (scale / sqrtf(ss + 1e-6f)) =
 * kda_l2_scaled, A softplusf_(f + dt_bias) = kda_decay, sigmoidf_.  The
 * per-row sums of squares of q and k (a reduction over the head) are formed
 * once at the start, a warp per row, 4 channels a lane, by kda_head_sum
 * (kda_prep_rows_kernel's order), and kept as the row's factor scale /
 * sqrtf(ss + 1e-6f) in 512 bytes past the 63.5 KB.  So the elements, and
 * with them the outputs, are =3's bit for bit as far as the compiler
 * contracts the same expressions the same way.  Elements are recomputed
 * where =3 loads them again (g about 4 times, k 3), from L1 / L2.
 */
struct kp4_raw
{
	const float *q,
			   *k,
			   *v,
			   *f,
			   *b;				/* the sequence's row 0 of the raw projections */
	const float *conv_q,
			   *conv_k,
			   *conv_v,
			   *A_log,
			   *dt_bias;
	float	   *const *tailp;	/* -> the sequence's conv tails [3][H K][W] */
	float		qscale;			/* K^-1/2 */
	int			W;				/* conv width */
};

/* silu(short conv) of channel ch at row i of the sequence (kda_conv_silu's
 * order; positions before row 0 from tail, this array's [H K][W]) */
__device__ __forceinline__ float
kp4_conv(const float *__restrict__ x, const float *tail, const float *__restrict__ cw, int HKi, int W, int ch,
		 int i)
{
	float		sum = 0;

#pragma unroll 4
	for (int j = 0; j < W; j++)
	{
		int			idx = i - W + 1 + j;
		float		xv = idx >= 0 ? x[(size_t) idx * HKi + ch] : tail[(size_t) ch * W + W + idx];

		sum += cw[(size_t) ch * W + j] * xv;
	}
	return siluf_(sum);
}

/* the 63.5 KB kernel's body; FUSE: from the raw inputs (kp4_raw) */
template <int K, bool FUSE>
__device__ __forceinline__ void
kp3_body(int n, int H, const float *__restrict__ q, const float *__restrict__ k,
						   const float *__restrict__ v, const float *__restrict__ g, const float *__restrict__ beta,
						   uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16,
						   float *glast, const kp4_raw &raw)
{
	static_assert(K == 128, "the lane layout of the pairs assumes K = 128");
	typedef kp3_layout<K> L;
	constexpr int C = KDA_CHUNK;
	constexpr int NTH = 256;
	extern __shared__ uint4 kp_smem[];
	char	   *sm = (char *) kp_smem;
	float	   *sb = (float *) (sm + L::SB),
			   *sA = (float *) (sm + L::SA),
			   *Ge = (float *) (sm + L::GE),
			   *dq = (float *) (sm + L::DQ),
			   *dk = (float *) (sm + L::DK),
			   *da = (float *) (sm + L::DA),
			   *Li = (float *) (sm + L::LI),
			   *Tb = (float *) (sm + L::TB);
	uint16_t   *Xq = (uint16_t *) (sm + L::XQ),
			   *Xk = (uint16_t *) (sm + L::XK),
			   *Kr = (uint16_t *) (sm + L::KR),
			   *Lb = (uint16_t *) (sm + L::LB),
			   *KbT = (uint16_t *) (sm + L::KBT),
			   *VbT = (uint16_t *) (sm + L::VBT);
	int			chunk = blockIdx.x,
				h = blockIdx.y,
				tid = threadIdx.x,
				warp = tid >> 5,
				lane = tid & 31;
	int			t0 = chunk * C,
				Cn = n - t0 < C ? n - t0 : C;
	size_t		tile = (size_t) chunk * H + h,
				HK = (size_t) H * K;
	const size_t rowoff = (size_t) t0 * HK + (size_t) h * K;
	/* the block's rows: 32-bit offsets t HK + c from here (t < 64) */
	const float *qb = q + rowoff,
			   *kb_ = k + rowoff,
			   *vb_ = v + rowoff,
			   *gb = g + rowoff;
	const int	HKi = H * K;
	uint16_t   *P = P16 + tile * C * C,
			   *Qt = Q16 + tile * C * K,
			   *Ktt = Kt16 + tile * K * C;
	/* FUSE: row t's L2 factors of q and k (past the 63.5 KB) */
	float	   *fq = (float *) (sm + L::BYTES),
			   *fk = fq + C;
	const float *tails = FUSE ? *raw.tailp : NULL;
	const float	Ad = FUSE ? -expf(raw.A_log[h]) : 0.0f;
	/* the block's elements: loaded (=3) or computed from the raw inputs */
	auto		LQ = [&](int t, int c) -> float {
		if (!FUSE)
			return qb[t * HKi + c];
		return kp4_conv(raw.q, tails, raw.conv_q, HKi, raw.W, h * K + c, t0 + t) * fq[t];
	};
	auto		LK = [&](int t, int c) -> float {
		if (!FUSE)
			return kb_[t * HKi + c];
		return kp4_conv(raw.k, tails + (size_t) HKi * raw.W, raw.conv_k, HKi, raw.W, h * K + c, t0 + t) * fk[t];
	};
	auto		LV = [&](int t, int c) -> float {
		if (!FUSE)
			return vb_[t * HKi + c];
		return kp4_conv(raw.v, tails + (size_t) 2 * HKi * raw.W, raw.conv_v, HKi, raw.W, h * K + c, t0 + t);
	};
	auto		LG = [&](int t, int c) -> float {
		if (!FUSE)
			return gb[t * HKi + c];
		return Ad * softplusf_(raw.f[(size_t) (t0 + t) * HKi + h * K + c] + raw.dt_bias[h * K + c]);
	};

	if (FUSE)
	{
		/* warp w: rows w, w + 8, ..; lane: channels 4 lane .. 4 lane + 3 */
		for (int t = warp; t < C; t += NTH / 32)
		{
			float		y[2][4];

			if (t >= Cn)
			{
				if (lane == 0)
					fq[t] = fk[t] = 0.0f;
				continue;
			}
#pragma unroll
			for (int e = 0; e < 4; e++)
			{
				int			ch = h * K + 4 * lane + e;

				y[0][e] = kp4_conv(raw.q, tails, raw.conv_q, HKi, raw.W, ch, t0 + t);
				y[1][e] = kp4_conv(raw.k, tails + (size_t) HKi * raw.W, raw.conv_k, HKi, raw.W, ch, t0 + t);
			}
			{
				float		ssq = kda_head_sum<K>(y[0][0] * y[0][0], y[0][1] * y[0][1], y[0][2] * y[0][2],
												  y[0][3] * y[0][3]);
				float		ssk = kda_head_sum<K>(y[1][0] * y[1][0], y[1][1] * y[1][1], y[1][2] * y[1][2],
												  y[1][3] * y[1][3]);

				if (lane == 0)
				{
					fq[t] = raw.qscale / sqrtf(ssq + 1e-6f);
					fk[t] = 1.0f / sqrtf(ssk + 1e-6f);
				}
			}
		}
	}

	/* A. beta, the sub-chunk ends' G (as the 256-thread form), P's strict
	 * upper triangle zeroed (the pair phase writes only i >= j) */
	if (tid < C)
		sb[tid] = tid < Cn ? (FUSE ? sigmoidf_(raw.b[(size_t) (t0 + tid) * H + h]) : beta[(size_t) (t0 + tid) * H + h]) : 0.0f;
	if (tid < K)
	{
		float		G = 0;

		for (int t16 = 0; t16 < C; t16 += 16)
		{
			float		gl[16];

#pragma unroll
			for (int u = 0; u < 16; u++)
				gl[u] = t16 + u < Cn ? LG(t16 + u, tid) : 0.0f;
#pragma unroll
			for (int u = 0; u < 16; u++)
				G += gl[u];
			Ge[(t16 >> 4) * K + tid] = G;
		}
		glast[tile * K + tid] = __expf(G);
	}
	for (int e = tid; e < C * C / 8; e += NTH)
	{
		int			r = e >> 3,
					c8 = 8 * (e & 7);

		if (c8 > r)
			*(uint4 *) (P + r * C + c8) = make_uint4(0, 0, 0, 0);
		else
			for (int c = r + 1; c < c8 + 8; c++)
				P[r * C + c] = 0;
	}
	__syncthreads();

	/* B. per sub-chunk: its rows' operands and Kr, then its pairs (CUDA
	 * cores) and its pairs with the earlier sub-chunks (mma) */
	for (int b = 0; b < 4; b++)
	{
		int			s0 = 16 * b;

		{
			int			c = tid % K,
						i0 = 8 * (tid / K);	/* this thread's rows i0 .. i0 + 7 of a sub-chunk */
			float		Gs = b > 0 ? Ge[(b - 1) * K + c] : 0.0f,	/* G at the reference point s0 - 1 */
						Gb = Ge[b * K + c],
						G = Gs,
						eS = kp3_exp(Gs),		/* Gam(s0 - 1) */
						eT = kp3_exp(Ge[3 * K + c] - Gb);	/* Gamma(end, sub-chunk end) */
			float		ktv[8];

			if (i0 > 0)
#pragma unroll
				for (int ii = 0; ii < 8; ii++)
					G += s0 + ii < Cn ? LG(s0 + ii, c) : 0.0f;
#pragma unroll
			for (int u = 0; u < 8; u++)
			{
				int			ii = i0 + u;
				int			t = s0 + ii;
				bool		in = t < Cn;
				float		qv = in ? LQ(t, c) : 0.0f,
							kv = in ? LK(t, c) : 0.0f,
							gv = in ? LG(t, c) : 0.0f;
				float		F,
							R;

				G += gv;
				F = kp3_exp(G - Gs);	/* Gamma(t, r) */
				R = kp3_exp(Gb - G);	/* Gamma(sub-chunk end, t) */
				dq[ii * K + c] = qv;
				dk[ii * K + c] = kv;
				da[ii * K + c] = kp3_exp(gv);
				if (b > 0)
				{
					Xq[ii * L::LK + c] = kp3_bf16(qv * F);
					Xk[ii * L::LK + c] = kp3_bf16(kv * F);
				}
				Qt[t * K + c] = kp3_bf16(qv * (F * eS));
				ktv[u] = kv * (R * eT);	/* k_t Gamma(end, t) */
			}
			*(uint4 *) (Ktt + c * C + s0 + i0) = make_uint4(cvt_bf16x2(ktv[0], ktv[1]), cvt_bf16x2(ktv[2], ktv[3]),
															cvt_bf16x2(ktv[4], ktv[5]), cvt_bf16x2(ktv[6], ktv[7]));

			/* Kr: rows i0 .. i0 + 7 of every earlier sub-chunk b2, k_t
			 * Gamma(s0 - 1, t) = k_t exp(Gs - G_t), G_t summed again in
			 * the order above */
			for (int b2 = 0; b2 < b; b2++)
			{
				int			r0 = 16 * b2;
				float		G2 = b2 > 0 ? Ge[(b2 - 1) * K + c] : 0.0f;

				if (i0 > 0)
#pragma unroll
					for (int ii = 0; ii < 8; ii++)
						G2 += r0 + ii < Cn ? LG(r0 + ii, c) : 0.0f;
#pragma unroll
				for (int u = 0; u < 8; u++)
				{
					int			t = r0 + i0 + u;
					float		gv = t < Cn ? LG(t, c) : 0.0f,
								kv = t < Cn ? LK(t, c) : 0.0f;

					G2 += gv;
					Kr[t * L::LK + c] = kp3_bf16(kv * kp3_exp(Gs - G2));
				}
			}
		}
		__syncthreads();
		{
			/* pairs (i, j) inside the sub-chunk: warp w, j = 2 w + lane / 16,
			 * channels 4 sl .. 4 sl + 3 and 64 + 4 sl .. (sl = lane % 16);
			 * kd = k_j prod_{j < m <= i} a_m, updated row by row */
			int			hw = lane >> 4,
						jj = 2 * warp + hw,
						sl = lane & 15;
			const float4 *dq4 = (const float4 *) dq,
					   *dk4 = (const float4 *) dk,
					   *da4 = (const float4 *) da;
			float4		kd0 = dk4[jj * (K / 4) + sl],
						kd1 = dk4[jj * (K / 4) + 16 + sl];

			for (int ii = 2 * warp; ii < 16; ii++)
			{
				float4		q0 = dq4[ii * (K / 4) + sl],
							q1 = dq4[ii * (K / 4) + 16 + sl],
							k0 = dk4[ii * (K / 4) + sl],
							k1 = dk4[ii * (K / 4) + 16 + sl];
				float		pp,
							aa,
							keep,
							send;

				if (ii > jj)
				{
					float4		a0 = da4[ii * (K / 4) + sl],
								a1 = da4[ii * (K / 4) + 16 + sl];

					kd0.x *= a0.x;
					kd0.y *= a0.y;
					kd0.z *= a0.z;
					kd0.w *= a0.w;
					kd1.x *= a1.x;
					kd1.y *= a1.y;
					kd1.z *= a1.z;
					kd1.w *= a1.w;
				}
				pp = q0.x * kd0.x + q0.y * kd0.y + q0.z * kd0.z + q0.w * kd0.w +
					q1.x * kd1.x + q1.y * kd1.y + q1.z * kd1.z + q1.w * kd1.w;
				aa = k0.x * kd0.x + k0.y * kd0.y + k0.z * kd0.z + k0.w * kd0.w +
					k1.x * kd1.x + k1.y * kd1.y + k1.z * kd1.z + k1.w * kd1.w;
				/* one tree for both sums: even lanes carry P's, odd A's */
				keep = (lane & 1) ? aa : pp;
				send = (lane & 1) ? pp : aa;
				keep += __shfl_xor_sync(0xffffffffu, send, 1);
				keep += __shfl_xor_sync(0xffffffffu, keep, 2);
				keep += __shfl_xor_sync(0xffffffffu, keep, 4);
				keep += __shfl_xor_sync(0xffffffffu, keep, 8);
				if (sl == 0 && ii >= jj)
					P[(s0 + ii) * C + s0 + jj] = kp3_bf16(keep);
				if (sl == 1 && ii > jj)
					sA[(s0 + ii) * C + s0 + jj] = sb[s0 + ii] * keep;
			}
		}
		/* pairs with the sub-chunks before: 2 b column tiles of 8 for P,
		 * 2 b for A, on the warps with the fewest pairs above (7, 6, ..) */
		kp_pairs_before<K, L::LK, NTH>(Xq, Xk, Kr, b, s0, warp, lane, P, sA, sb + s0);
		__syncthreads();		/* dq, dk, da, Xq, Xk, Kr free for the next sub-chunk */
	}

	/* E. (I + A)^-1 in fp32: the diagonal blocks, thread (block, column j),
	 * x = column j of (I + A_bb)^-1 by forward substitution in registers */
	if (tid < C)
	{
		int			o = (tid >> 4) * 16,
					j = tid & 15;
		float		x[16];

		kp_unit_lower_inverse_column<C>(sA + o * C + o, j, x);
#pragma unroll
		for (int i = 0; i < 16; i++)
			Li[(o + i) * C + o + j] = x[i];
	}
	__syncthreads();
	kp3_invert_below_bf16<NTH, L::LC>(sA, Li, Tb, Lb, tid);
	__syncthreads();			/* Li, Tb dead: Kb^T, Vb^T take their room */

	/* D. the right-hand sides [beta k Gam | beta v] transposed (bf16) */
	{
		int			c = tid % K,
					r0 = 32 * (tid / K),	/* this thread's rows r0 .. r0 + 31 */
					r1 = r0 + 32;
		float		G = r0 > 0 ? Ge[K + c] : 0.0f;	/* G at row 31 */

		for (int t8 = r0; t8 < r1; t8 += 8)
		{
			float		xs[8],
						ys[8];

#pragma unroll
			for (int u = 0; u < 8; u++)
			{
				int			t = t8 + u;
				bool		in = t < Cn;
				float		bt = sb[t];

				G += in ? LG(t, c) : 0.0f;
				xs[u] = in ? bt * LK(t, c) * kp3_exp(G) : 0.0f;
				ys[u] = in ? bt * LV(t, c) : 0.0f;
			}
			*(uint4 *) (KbT + c * L::LC + t8) = make_uint4(cvt_bf16x2(xs[0], xs[1]), cvt_bf16x2(xs[2], xs[3]),
														   cvt_bf16x2(xs[4], xs[5]), cvt_bf16x2(xs[6], xs[7]));
			*(uint4 *) (VbT + c * L::LC + t8) = make_uint4(cvt_bf16x2(ys[0], ys[1]), cvt_bf16x2(ys[2], ys[3]),
														   cvt_bf16x2(ys[4], ys[5]), cvt_bf16x2(ys[6], ys[7]));
		}
	}
	__syncthreads();

	/* F. [W | U0] = Li [Kb | Vb] */
	kp_wu_product<K, 256, L::LC>(Lb, KbT, VbT, W16, U16, tile, warp, lane);
}

template <int K>
__global__ void __launch_bounds__(256)
kda_chunk_prep_mma3_kernel(int n, int H, const float *__restrict__ q, const float *__restrict__ k,
						   const float *__restrict__ v, const float *__restrict__ g, const float *__restrict__ beta,
						   uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16,
						   float *glast)
{
	kp3_body<K, false>(n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, glast, kp4_raw{});
}

/* KL_CUDA_KDA_PREP_MMA=4: 3 blocks an SM need <= 80 registers */
template <int K>
__global__ void __launch_bounds__(256, 3)
kda_chunk_prep_mma4_kernel(int n, int H, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16,
						   float *glast, kp4_raw raw)
{
	kp3_body<K, true>(n, H, NULL, NULL, NULL, NULL, NULL, W16, U16, Q16, Kt16, P16, glast, raw);
}

/*
 * KL_CUDA_KDA_PREP_MMA=6 (K = 128): =3's work split over two kernels of
 * independent blocks, for latency.  Nsight of =3 at 32768 rows x 32 heads
 * (2.72 ms): latency bound, 11.8 cycles an issue, barrier 27 % of stalls;
 * a block of 8 warps walks 12 barrier-separated dependent phases (four
 * sub-chunks in turn, then the inverse, the right-hand sides, the products)
 * while the SM holds only 3 blocks.  Here:
 *   kp6_sub_kernel, a block of 256 threads per (16-row sub-chunk, chunk,
 *     head), 46.3 KB (4 blocks = 32 warps an SM), 2 barriers: its rows'
 *     operands and Kr, its pairs inside the sub-chunk (CUDA cores) and with
 *     the sub-chunks before (mma), and its diagonal 16 x 16 inverse.  It
 *     writes Q16, Kt16, P16's rows and glast as =3, and its rows of A (the
 *     blocks left of the diagonal, beta-scaled fp32) with the diagonal
 *     block's inverse in the diagonal block, into the tile's W16 room (16 KB
 *     = one 64 x 64 fp32 matrix; W is written only by the second kernel,
 *     after it has read A);
 *   kp6_solve_kernel, a block of 256 threads per (chunk, head), 44.3 KB (4
 *     blocks an SM): the blocks below the diagonal of (I + A)^-1, the
 *     right-hand sides and [W | U0] = Li [Kb | Vb], as =3.
 * Every value is summed in =3's order (the fold of g from the chunk start,
 * the pairs' lanes and shuffle tree, the mma's k steps, the inverse's
 * code), so the outputs are =3's bit for bit.  TIN: q, k, v as fp32 or as
 * bf16 (uint16_t; g and beta stay fp32); fp32 inputs holding bf16 values
 * give the bf16 form's outputs bit for bit.
 */

/* element i of q, k or v as fp32 */
__device__ __forceinline__ float
kp_in(const float *p, int i)
{
	return p[i];
}

__device__ __forceinline__ float
kp_in(const uint16_t *p, int i)
{
	return bf16_to_f32(p[i]);
}

/* kp_in through the read-only path, said so (the wide forms: their
 * cp.async waits clobber memory, and nvcc then no longer proves it) */
__device__ __forceinline__ float
kp_in_nc(const float *p, int i)
{
	return __ldg(p + i);
}

__device__ __forceinline__ float
kp_in_nc(const uint16_t *p, int i)
{
	return bf16_to_f32(__ldg(p + i));
}

template <int K, int KW, int IN = 0>
struct kp6_sub_layout
{
	static constexpr int LK = K + 8;
	static constexpr int SB = 0;		/* beta of the sub-chunk's rows [16] fp32 */
	static constexpr int SAD = SB + 4 * 16;	/* A's diagonal block [16][16] fp32 */
	static constexpr int DQ = SAD + 4 * 256;	/* q, k, a fp32 [16][K] */
	static constexpr int DK = DQ + 4 * 16 * K;
	static constexpr int DA = DK + 4 * 16 * K;
	static constexpr int XQ = DA + 4 * 16 * K;	/* Xq, Xk [16][LK] bf16 */
	static constexpr int XK = XQ + 2 * 16 * LK;
	static constexpr int KR = XK + 2 * 16 * LK;	/* Kr [48][LK] bf16 */
	static constexpr int KREND = KR + 2 * 48 * LK;
	/* KW: G at the sub-chunk ends [4][K] and at their rows 7 [4][K] fp32,
	 * from the threads of rows 0 .. 7.  IN (KL_CUDA_KDA_KP6_INTRA=1): only
	 * this block's row 7 is kept, Ge [5][K] (the block reads no other) */
	static constexpr int GE = KREND;
	static constexpr int GEEND = GE + 4 * (IN ? 5 : 8) * K;
	/* IN: the cross-half operands, fp16 [LK] rows: CQK rows 0 .. 7 q_i
	 * exp(G_i - G_r), rows 8 .. 15 k_i exp(G_i - G_r) (i = 8 .. 15: one
	 * mma A operand whose upper half gives P, its lower half A), CC k_j
	 * exp(G_r - G_j) (j = 0 .. 7), r the sub-chunk's row 7.  K = 128:
	 * 47,424 + 2,560 (Ge) + 4,352 + 2,176 = 56,512 bytes; 4 blocks an SM
	 * take 4 (56,512 + 1,024 reserved) = 230,144 <= the H200's 233,472
	 * (without the trim of Ge: 58,048, 236,288: 3 blocks) */
	static constexpr int CQK = GEEND;
	static constexpr int CC = CQK + 2 * 16 * LK;
	static constexpr int BYTES = IN ? CC + 2 * 8 * LK : KW ? GEEND : KREND;
	static_assert(!IN || (KW && K == 128), "the cross-half form is for the wide forms at K = 128");
	static_assert(!IN || 4 * (BYTES + 1024) <= 233472, "4 blocks an SM");
	static_assert(XQ % 16 == 0 && XK % 16 == 0 && KR % 16 == 0 && (2 * LK) % 16 == 0,
				  "ldmatrix rows 16-byte aligned");
};

/* G at the sub-chunk ends, e0..e3, as a register choice (b in 0..3) */
__device__ __forceinline__ float
kp6_pick(int b, float e0, float e1, float e2, float e3)
{
	return b == 0 ? e0 : b == 1 ? e1 : b == 2 ? e2 : e3;
}

/*
 * KL_CUDA_KDA_KP6_INTRA=1: the cross-half pairs of sub-chunk s0 (rows
 * 8 .. 15 against columns 0 .. 7), one warp: 8 k steps of m16n8k16 on
 * fp16 operands, CQK's rows 0 .. 7 (q side) and 8 .. 15 (k side) against
 * CC, so that one accumulator tile holds P's block (its upper half) and
 * A's (its lower half, scaled here by beta_i as the chain's entries).
 * P's bf16 entries go to P [C][C], A's to the diagonal block sAd [16][16].
 */
template <int K, int LK>
__device__ __forceinline__ void
kp6_cross(const uint16_t *CQK, const uint16_t *CC, int s0, int lane, uint16_t *P, float *sAd, const float *sb)
{
	constexpr int C = KDA_CHUNK;
	int			gq = lane >> 2,
				t2 = 2 * (lane & 3);
	float		acc[4] = {0, 0, 0, 0};

#pragma unroll
	for (int kk = 0; kk < K; kk += 16)
	{
		uint32_t	a[4],
					bb[2];

		kp_frag_a(a, CQK, LK, 0, kk, lane);
		kp_frag_b(bb, CC, LK, 0, kk, lane);
		mma_f16_16816(acc, a, bb[0], bb[1]);
	}
	*(uint32_t *) (P + (s0 + 8 + gq) * C + s0 + t2) = cvt_bf16x2(acc[0], acc[1]);
	*(float2 *) (sAd + (8 + gq) * 16 + t2) = make_float2(sb[8 + gq] * acc[2], sb[8 + gq] * acc[3]);
}

/*
 * kp6_sub_kernel's body.  FULL: the chunk has C rows (no row past n; the
 * kernel picks FULL per block, and the partial form keeps the zero inputs of
 * rows past n), so the full chunks' loads go without bounds tests.  It
 * changes no floating-point operation or its order (only the bounds tests).
 * H at compile time (H = 32: the loads' offsets as immediates) was tried:
 * 20 % fewer instructions but 26 % slower on the H200 (2026-11-30).
 * KW (KL_CUDA_KDA_KP6_WIDE 1 or 2): the sub-chunk's q and k rows reach
 * dq, dk (fp32 [16][K], which the row phase wrote before) as 16-byte
 * pieces, a warp a row, issued before the fold of g so that they are in
 * flight while it runs: fp32 by cp.async (4 pieces a thread), bf16 by one
 * 16-byte load of 8 channels a tensor, widened after the fold.  The row
 * phase then reads q and k back from dq, dk instead of loading 4 or 2
 * bytes a channel from global memory (one load a channel a row a warp:
 * the bf16 form's 2-byte loads cost more than the bytes they saved,
 * 2026-11-30).  bf16 also copies the earlier sub-chunks' k rows (for Kr)
 * raw into Kr by cp.async, 16 bytes a piece, where the Kr loop reads them
 * (a shared load and a widening a value instead of a 2-byte global load,
 * its address and the widening); fp32 keeps those loads (Kr is bf16: no
 * room for fp32 rows).  The same values (zeros past n), so the same outputs.
 * KW = 2 (the default) also forms the solve's right-hand side Kb^T =
 * (beta_t k_t Gam(t))^T for its rows -- it has k_t, beta_t and G_t (the
 * fold from the chunk start: the solve's sum, in its order) at hand -- and
 * leaves it in the tile's U16 room ([K][C] bf16, 16 KB: U0 is written
 * there only after the solve has read it), so that the solve reads 16 KB
 * of Kb^T instead of g and k (32 + 32 KB fp32: it is close to the DRAM
 * rate, 2.4 GB at 32k tokens in 0.84 ms).
 * IN (KL_CUDA_KDA_KP6_INTRA=1, KW only): the pairs inside the sub-chunk
 * whose row is in rows 8 .. 15 and column in 0 .. 7 (64 of the 136) on
 * tensor cores through the reference point r = row 7 (kp6_cross), the two
 * 8-row triangles left to the chain (phase C's comment); those entries
 * keep their bits, the 64 others change by the fp16 operands' rounding.
 */
template <int K, typename TIN, bool FULL, int KW, int IN>
__device__ __forceinline__ void
kp6_sub_body(int n, int H, const TIN *__restrict__ q, const TIN *__restrict__ k, const float *__restrict__ g,
			 const float *__restrict__ beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16,
			 uint16_t *P16, float *glast)
{
	static_assert(K == 128, "the lane layout of the pairs assumes K = 128");
	typedef kp6_sub_layout<K, KW, IN> L;
	constexpr int C = KDA_CHUNK;
	constexpr int NTH = 256;
	extern __shared__ uint4 kp_smem[];
	char	   *sm = (char *) kp_smem;
	float	   *sb = (float *) (sm + L::SB),
			   *sAd = (float *) (sm + L::SAD),
			   *dq = (float *) (sm + L::DQ),
			   *dk = (float *) (sm + L::DK),
			   *da = (float *) (sm + L::DA);
	uint16_t   *Xq = (uint16_t *) (sm + L::XQ),
			   *Xk = (uint16_t *) (sm + L::XK),
			   *Kr = (uint16_t *) (sm + L::KR);
	int			chunk = blockIdx.x >> 2,
				b = blockIdx.x & 3,
				s0 = 16 * b,
				h = blockIdx.y,
				tid = threadIdx.x,
				warp = tid >> 5,
				lane = tid & 31;
	int			t0 = chunk * C,
				Cn = n - t0 < C ? n - t0 : C;
	size_t		tile = (size_t) chunk * H + h,
				HK = (size_t) H * K;
	const size_t rowoff = (size_t) t0 * HK + (size_t) h * K;
	const TIN  *qb = q + rowoff,
			   *kb_ = k + rowoff;
	const float *gb = g + rowoff;
	const int	HKi = H * K;
	uint16_t   *P = P16 + tile * C * C,
			   *Qt = Q16 + tile * C * K,
			   *Ktt = Kt16 + tile * K * C;
	float	   *Ag = (float *) (W16 + tile * C * K);	/* A and the diagonal inverses [C][C] */

	if (tid < 16)
		sb[tid] = FULL || s0 + tid < Cn ? beta[(size_t) (t0 + s0 + tid) * H + h] : 0.0f;
	/* P's strict upper triangle in this sub-chunk's rows */
	if (tid < 16 * C / 8)
	{
		int			r = s0 + (tid >> 3),
					c8 = 8 * (tid & 7);

		if (c8 > r)
			*(uint4 *) (P + r * C + c8) = make_uint4(0, 0, 0, 0);
		else
			for (int c = r + 1; c < c8 + 8; c++)
				P[r * C + c] = 0;
	}

	/* KW: the sub-chunk's q, k rows into dq, dk (fp32 by cp.async; bf16
	 * loaded here, widened and stored after the fold) */
	uint4		wq = make_uint4(0, 0, 0, 0),
				wk = make_uint4(0, 0, 0, 0);

	if constexpr (KW)
	{
		if constexpr (sizeof(TIN) == 4)
		{
#pragma unroll
			for (int s2 = 0; s2 < 2; s2++)
			{
				int			f = tid + NTH * s2,
							r = f >> 5,
							c4 = 4 * (f & 31);

				if (FULL || s0 + r < Cn)
				{
					cp_async16(dq + r * K + c4, qb + (s0 + r) * HKi + c4);
					cp_async16(dk + r * K + c4, kb_ + (s0 + r) * HKi + c4);
				}
				else
				{
					*(float4 *) (dq + r * K + c4) = make_float4(0, 0, 0, 0);
					*(float4 *) (dk + r * K + c4) = make_float4(0, 0, 0, 0);
				}
			}
			cp_async_commit();
		}
		else
		{
			int			r = tid >> 4,
						c8 = 8 * (tid & 15);

			if (FULL || s0 + r < Cn)
			{
				wq = __ldg((const uint4 *) (qb + (s0 + r) * HKi + c8));
				wk = __ldg((const uint4 *) (kb_ + (s0 + r) * HKi + c8));
			}
			/* the earlier sub-chunks' k rows 0 .. s0 - 1, raw bf16, into Kr
			 * (the Kr loop turns each element into its operand in place,
			 * the thread that reads it being the one that writes it) */
			for (int f = tid; f < s0 * (K / 8); f += NTH)
			{
				int			r2 = f / (K / 8),
							c82 = 8 * (f % (K / 8));

				if (FULL || r2 < Cn)
					cp_async16(Kr + r2 * L::LK + c82, kb_ + r2 * HKi + c82);
				else
					*(uint4 *) (Kr + r2 * L::LK + c82) = make_uint4(0, 0, 0, 0);
			}
			cp_async_commit();
		}
	}

	/* A. G at the sub-chunk ends: =3's fold of g from the chunk start (16
	 * loads in flight, then the adds in row order, rows past n adding +0),
	 * by both threads of a channel; KW: by the thread of rows 0 .. 7 (warps
	 * 0 .. 3), which leaves it in Ge for the other, with G at each sub-
	 * chunk's row 7 (the fold passes through it: G at s0 - 1 plus rows s0 ..
	 * s0 + 7 in order, what the other thread adds up before its rows).
	 * Warps 4 .. 7 skip 64 + 8 loads and adds: the same numbers.  (The same
	 * for the Kr loop's G at row 16 b2 + 7 made ptxas spill 16 bytes at the
	 * 64 registers of 4 blocks an SM: not done.)  IN: only this block's
	 * row 7 goes to Ge, at Ge[4 K + c]. */
	{
		int			c = tid & (K - 1),
					i0 = 8 * (tid >> 7);	/* this thread's rows i0 .. i0 + 7 of the sub-chunk */
		float		e[4];
		float	   *Ge = (float *) (sm + L::GE);	/* KW only */
		const float *gc = gb + c;	/* channel c's g, q, k at row t: [t * HKi] */
		const TIN  *qc = qb + c,
				   *kc = kb_ + c;
		uint16_t   *Qc = Qt + c;

		if (!KW || i0 == 0)
		{
			float		G = 0;

#pragma unroll
			for (int s16 = 0; s16 < 4; s16++)
			{
				float		gl[16];

#pragma unroll
				for (int u = 0; u < 16; u++)
					gl[u] = FULL || 16 * s16 + u < Cn ? gc[(16 * s16 + u) * HKi] : 0.0f;
#pragma unroll
				for (int u = 0; u < 16; u++)
				{
					G += gl[u];
					if (KW && u == 7 && (!IN || s16 == b))	/* G at row 16 s16 + 7: where rows 8 .. 15 start */
						Ge[(IN ? 4 : 4 + s16) * K + c] = G;
				}
				e[s16] = G;
			}
			if (b == 0 && i0 == 0)
				glast[tile * K + c] = __expf(G);
			if (KW)
#pragma unroll
				for (int s16 = 0; s16 < 4; s16++)
					Ge[s16 * K + c] = e[s16];
		}
		if constexpr (KW)
		{
			cp_async_wait_all();
			if constexpr (sizeof(TIN) == 2)
			{
				int			r = tid >> 4,
							c8 = 8 * (tid & 15);
				float		w[8];

				unpack8_bf16(wq, w);
				*(float4 *) (dq + r * K + c8) = make_float4(w[0], w[1], w[2], w[3]);
				*(float4 *) (dq + r * K + c8 + 4) = make_float4(w[4], w[5], w[6], w[7]);
				unpack8_bf16(wk, w);
				*(float4 *) (dk + r * K + c8) = make_float4(w[0], w[1], w[2], w[3]);
				*(float4 *) (dk + r * K + c8 + 4) = make_float4(w[4], w[5], w[6], w[7]);
			}
			__syncthreads();	/* dq, dk, Ge (and bf16: Kr's k) complete */
			if (i0 > 0)
#pragma unroll
				for (int s16 = 0; s16 < 4; s16++)
					e[s16] = Ge[s16 * K + c];
		}

		/* B. this thread's rows' operands, then Kr as =3 */
		{
			float		Gs = b > 0 ? kp6_pick(b - 1, e[0], e[1], e[2], e[3]) : 0.0f,	/* G at s0 - 1 */
						Gb = kp6_pick(b, e[0], e[1], e[2], e[3]),
						G = Gs,
						eS = kp3_exp(Gs),
						eT = kp3_exp(e[3] - Gb);
			float		ktv[8],
						xprev = 0;
			uint32_t	xb[4];	/* KW: this thread's 8 values of Kb^T, bf16 pairs */
			/* IN: G at row s0 + 7, the reference point of the cross-half
			 * operands: the i0 = 0 thread's own fold passes through the
			 * same bits (G at s0 - 1 plus rows s0 .. s0 + 7 in row order,
			 * rows past n adding +0, the adds of phase A), so its rows'
			 * exponents G_r - G_j are <= 0, as the others' G_i - G_r */
			float		Gr = IN ? Ge[4 * K + c] : 0.0f;
			uint16_t   *Cx = (uint16_t *) (sm + (i0 ? L::CQK : L::CC)) + c;	/* IN: this thread's operand column */

			if (KW && i0 > 0)
				G = IN ? Gr : Ge[(4 + b) * K + c];	/* the fold's G at row s0 + 7: the sum below */
			else if (i0 > 0)
#pragma unroll
				for (int ii = 0; ii < 8; ii++)
					G += FULL || s0 + ii < Cn ? gc[(s0 + ii) * HKi] : 0.0f;
#pragma unroll
			for (int u = 0; u < 8; u++)
			{
				int			ii = i0 + u;
				int			t = s0 + ii;
				bool		in = FULL || t < Cn;
				float		qv = KW ? dq[ii * K + c] : in ? kp_in(qc, t * HKi) : 0.0f,
							kv = KW ? dk[ii * K + c] : in ? kp_in(kc, t * HKi) : 0.0f,
							gv = in ? gc[t * HKi] : 0.0f;
				float		F,
							R;

				G += gv;
				F = kp3_exp(G - Gs);
				R = kp3_exp(Gb - G);
				if (!KW)
				{
					dq[ii * K + c] = qv;
					dk[ii * K + c] = kv;
				}
				if (!IN || u > 0)	/* IN: rows 0 and 8 start the chains, no decay read */
					da[ii * K + c] = kp3_exp(gv);
				if constexpr (IN)
				{
					/* the cross-half operands: every factor in (0, 1], the
					 * values in [-1, 1] (q, k L2-normalized): no fp16 overflow */
					float		d = G - Gr,
								x = kp3_exp(i0 ? d : -d);

					if (i0)
					{
						Cx[u * L::LK] = cvt_f16(qv * x);
						Cx[(8 + u) * L::LK] = cvt_f16(kv * x);
					}
					else
						Cx[u * L::LK] = cvt_f16(kv * x);
				}
				if (b > 0)
				{
					Xq[ii * L::LK + c] = kp3_bf16(qv * F);
					Xk[ii * L::LK + c] = kp3_bf16(kv * F);
				}
				Qc[t * K] = kp3_bf16(qv * (F * eS));
				ktv[u] = kv * (R * eT);
				if (KW >= 2)
				{
					/* the solve's right-hand side beta_t k_t Gam(t), its
					 * expression on the same G (the fold from the chunk start) */
					float		x = in ? sb[ii] * kv * kp3_exp(G) : 0.0f;

					if (u & 1)
						xb[u >> 1] = cvt_bf16x2(xprev, x);
					else
						xprev = x;
				}
			}
			*(uint4 *) (Ktt + c * C + s0 + i0) = make_uint4(cvt_bf16x2(ktv[0], ktv[1]), cvt_bf16x2(ktv[2], ktv[3]),
															cvt_bf16x2(ktv[4], ktv[5]), cvt_bf16x2(ktv[6], ktv[7]));
			if (KW >= 2)		/* Kb^T [K][C] in the tile's U16 room (U0 is written after it is read) */
				*(uint4 *) (U16 + tile * C * K + c * C + s0 + i0) = make_uint4(xb[0], xb[1], xb[2], xb[3]);
			for (int b2 = 0; b2 < b; b2++)
			{
				int			r0 = 16 * b2;
				float		G2 = b2 > 0 ? kp6_pick(b2 - 1, e[0], e[1], e[2], e[3]) : 0.0f;

				if (i0 > 0)
#pragma unroll
					for (int ii = 0; ii < 8; ii++)
						G2 += FULL || r0 + ii < Cn ? gc[(r0 + ii) * HKi] : 0.0f;
#pragma unroll
				for (int u = 0; u < 8; u++)
				{
					int			t = r0 + i0 + u;
					float		gv = FULL || t < Cn ? gc[t * HKi] : 0.0f,
								kv = KW && sizeof(TIN) == 2 ? bf16_to_f32(Kr[t * L::LK + c]) :
						FULL || t < Cn ? (KW ? kp_in_nc(kc, t * HKi) : kp_in(kc, t * HKi)) : 0.0f;

					G2 += gv;
					Kr[t * L::LK + c] = kp3_bf16(kv * kp3_exp(Gs - G2));
				}
			}
		}
	}
	__syncthreads();

	/* C. the pairs inside the sub-chunk (=3's lanes and tree).  Row ii
	 * decays kd (ii > jj) and is stored (ii >= jj): rows 2 warp and
	 * 2 warp + 1 are peeled, where that depends on the lane's jj; every row
	 * after has ii > jj.  IN: only the triangles of rows and columns 0 .. 7
	 * and 8 .. 15 (kp6_cross has the rest): half-warp 0 walks column w,
	 * half-warp 1 column w + 8, both 8 - w rows from their diagonal, the
	 * same trip count (w = warp for warps 0 .. 3, 11 - warp for 4 .. 7, so
	 * that the warps sharing a scheduler, warp and warp + 4, walk 9 rows
	 * together); then warp 4, with one row, takes the cross block */
	{
		int			hw = lane >> 4,
					w8 = warp < 4 ? warp : 11 - warp,
					jj = IN ? w8 + 8 * hw : 2 * warp + hw,
					sl = lane & 15;
		const float4 *dq4 = (const float4 *) dq + sl,
				   *dk4 = (const float4 *) dk + sl,
				   *da4 = (const float4 *) da + sl;
		float4		kd0 = dk4[jj * (K / 4)],
					kd1 = dk4[jj * (K / 4) + 16];
		bool		odd = lane & 1;
		uint16_t   *Pj = P + s0 * C + s0 + jj;	/* P[s0 + ii][s0 + jj] at Pj[ii * C] */
		float	   *Aj = sAd + jj;	/* sAd[ii][jj] at Aj[ii * 16] */
		auto		row = [&](int ii, bool decay, bool store, bool storeA) {
			float4		q0 = dq4[ii * (K / 4)],
						q1 = dq4[ii * (K / 4) + 16],
						k0 = dk4[ii * (K / 4)],
						k1 = dk4[ii * (K / 4) + 16];
			float		pp,
						aa,
						keep,
						send;

			if (decay)
			{
				float4		a0 = da4[ii * (K / 4)],
							a1 = da4[ii * (K / 4) + 16];

				kd0.x *= a0.x;
				kd0.y *= a0.y;
				kd0.z *= a0.z;
				kd0.w *= a0.w;
				kd1.x *= a1.x;
				kd1.y *= a1.y;
				kd1.z *= a1.z;
				kd1.w *= a1.w;
			}
			pp = q0.x * kd0.x + q0.y * kd0.y + q0.z * kd0.z + q0.w * kd0.w +
				q1.x * kd1.x + q1.y * kd1.y + q1.z * kd1.z + q1.w * kd1.w;
			aa = k0.x * kd0.x + k0.y * kd0.y + k0.z * kd0.z + k0.w * kd0.w +
				k1.x * kd1.x + k1.y * kd1.y + k1.z * kd1.z + k1.w * kd1.w;
			keep = odd ? aa : pp;
			send = odd ? pp : aa;
			keep += __shfl_xor_sync(0xffffffffu, send, 1);
			keep += __shfl_xor_sync(0xffffffffu, keep, 2);
			keep += __shfl_xor_sync(0xffffffffu, keep, 4);
			keep += __shfl_xor_sync(0xffffffffu, keep, 8);
			if (sl == 0 && store)
				Pj[ii * C] = kp3_bf16(keep);
			if (sl == 1 && storeA)
				Aj[ii * 16] = sb[ii] * keep;
		};

		if constexpr (IN)
		{
			row(jj, false, true, false);
#pragma unroll 1
			for (int ii = jj + 1; ii < jj + 8 - w8; ii++)	/* 7 - w8 rows in either half: no divergence */
				row(ii, true, true, true);
			if (warp == 4)
				kp6_cross<K, L::LK>((const uint16_t *) (sm + L::CQK), (const uint16_t *) (sm + L::CC), s0, lane,
									P, sAd, sb);
		}
		else
		{
			row(2 * warp, false, hw == 0, false);
			row(2 * warp + 1, hw == 0, true, hw == 0);
#pragma unroll 1
			for (int ii = 2 * warp + 2; ii < 16; ii++)
				row(ii, true, true, true);
		}
	}
	/* pairs with the sub-chunks before (mma): P to its rows, A (beta-scaled)
	 * to the scratch rows */
	kp_pairs_before<K, L::LK, NTH>(Xq, Xk, Kr, b, s0, warp, lane, P, Ag, sb);
	__syncthreads();

	/* D. (I + A_bb)^-1 by =3's forward substitution, thread j = column j */
	if (tid < 16)
	{
		int			j = tid;
		float		x[16];

		kp_unit_lower_inverse_column<16>(sAd, j, x);
#pragma unroll
		for (int i = 0; i < 16; i++)
			Ag[(s0 + i) * C + s0 + j] = x[i];
	}
}

/* one block per (16-row sub-chunk, chunk, head); KW, IN: kp6_sub_body's;
 * U16: the tiles' U0 room (KW = 2 leaves Kb^T there for the solve) */
template <int K, typename TIN, int KW, int IN = 0>
__global__ void __launch_bounds__(256, 4)
kp6_sub_kernel(int n, int H, const TIN *__restrict__ q, const TIN *__restrict__ k, const float *__restrict__ g,
			   const float *__restrict__ beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16,
			   uint16_t *P16, float *glast)
{
	if (n - (int) (blockIdx.x >> 2) * KDA_CHUNK >= KDA_CHUNK)
		kp6_sub_body<K, TIN, true, KW, IN>(n, H, q, k, g, beta, W16, U16, Q16, Kt16, P16, glast);
	else
		kp6_sub_body<K, TIN, false, KW, IN>(n, H, q, k, g, beta, W16, U16, Q16, Kt16, P16, glast);
}

/*
 * kp6_solve_kernel's shared memory.  KW (KL_CUDA_KDA_KP6_WIDE 1 or 2):
 * A's and Li's rows padded to C + 4 floats (kp3_invert_below: its row reads
 * free of bank conflicts), and 8 warps' store tiles stw [16][KP_STW] bf16
 * (kp_wu_product's STG) past Kb^T, Vb^T (over Tb, dead by then): 55.3 KB,
 * still 4 blocks an SM (4 x 56.3 KB of the H200's 228 KB with the 1 KB a
 * block the runtime keeps); without KW 45.3 KB.
 */
template <int K, int KW>
struct kp6_solve_layout
{
	static constexpr int C = KDA_CHUNK;
	static constexpr int LC = C + 8;
	static constexpr int LA = KW ? C + 4 : C;	/* A's and Li's row stride (floats) */
	static constexpr int SB = 0;		/* beta [C] fp32 */
	static constexpr int LB = SB + 4 * C;	/* Lb [C][LC] bf16 */
	static constexpr int SA = LB + 2 * C * LC;	/* A [C][LA] fp32 (the blocks left of the diagonal) */
	static constexpr int LI = SA + 4 * C * LA;	/* Li [C][LA] fp32 */
	static constexpr int TB = LI + 4 * C * LA;	/* Tb [3][16][16] fp32 */
	static constexpr int U1END = TB + 4 * 3 * 256;
	/* after the inverse: Kb^T, Vb^T [K][LC] bf16 over A, Li and Tb */
	static constexpr int KBT = SA;
	static constexpr int VBT = KBT + 2 * K * LC;
	static constexpr int U2END = VBT + 2 * K * LC;
	/* KW, the products: the warps' store tiles */
	static constexpr int STW = U2END;
	static constexpr int U3END = KW ? STW + 8 * 2 * 16 * KP_STW : 0;
	static constexpr int U12 = U1END > U2END ? U1END : U2END;
	static constexpr int BYTES = U12 > U3END ? U12 : U3END;
	static_assert(LB % 16 == 0 && KBT % 16 == 0 && VBT % 16 == 0 && (2 * LC) % 16 == 0,
				  "ldmatrix rows 16-byte aligned");
};

template <int K, typename TIN, int KW>
__global__ void __launch_bounds__(256, 4)
kp6_solve_kernel(int n, int H, const TIN *__restrict__ k, const TIN *__restrict__ v, const float *__restrict__ g,
				 const float *__restrict__ beta, uint16_t *W16, uint16_t *U16)
{
	typedef kp6_solve_layout<K, KW> L;
	constexpr int C = KDA_CHUNK;
	constexpr int NTH = 256;
	extern __shared__ uint4 kp_smem[];
	char	   *sm = (char *) kp_smem;
	float	   *sb = (float *) (sm + L::SB),
			   *sA = (float *) (sm + L::SA),
			   *Li = (float *) (sm + L::LI),
			   *Tb = (float *) (sm + L::TB);
	uint16_t   *Lb = (uint16_t *) (sm + L::LB),
			   *KbT = (uint16_t *) (sm + L::KBT),
			   *VbT = (uint16_t *) (sm + L::VBT);
	int			chunk = blockIdx.x,
				h = blockIdx.y,
				tid = threadIdx.x,
				warp = tid >> 5,
				lane = tid & 31;
	int			t0 = chunk * C,
				Cn = n - t0 < C ? n - t0 : C;
	size_t		tile = (size_t) chunk * H + h,
				HK = (size_t) H * K;
	const size_t rowoff = (size_t) t0 * HK + (size_t) h * K;
	const TIN  *kb_ = k + rowoff,
			   *vb_ = v + rowoff;
	const float *gb = g + rowoff;
	const int	HKi = H * K;
	const float4 *Ag4 = (const float4 *) (W16 + tile * C * K);
	/* the second half of C's threads (rows 32 ..) start from G at row 31:
	 * =3's fold of rows 0 .. 31 of g, 16 loads in flight at a time */
	auto		fold31 = [&](int c) -> float {
		float		G = 0;

#pragma unroll
		for (int s16 = 0; s16 < 2; s16++)
		{
			float		gl[16];

#pragma unroll
			for (int u = 0; u < 16; u++)
				gl[u] = 16 * s16 + u < Cn ? gb[(16 * s16 + u) * HKi + c] : 0.0f;
#pragma unroll
			for (int u = 0; u < 16; u++)
				G += gl[u];
		}
		return G;
	};
	float		G31 = 0;

	/* KW = 1: that fold first, its loads in flight with A's (it needs
	 * nothing from the inverse: one round trip to memory less between
	 * barriers); KW = 2 needs no g */
	if (KW == 1 && tid >= K)
		G31 = fold31(tid % K);

	/* A. beta; A and the diagonal inverses from the scratch (the whole
	 * matrix: only the blocks on and left of the diagonal are read after) */
	if (tid < C)
		sb[tid] = tid < Cn ? beta[(size_t) (t0 + tid) * H + h] : 0.0f;
	for (int e = tid; e < C * C / 4; e += NTH)
	{
		float4		a4 = Ag4[e];
		int			r = e / (C / 4),
					c = 4 * (e % (C / 4));

		*(float4 *) ((r >> 4) == (c >> 4) ? Li + r * L::LA + c : sA + r * L::LA + c) = a4;
	}
	__syncthreads();

	/* B. the blocks below the diagonal of the inverse, as =3; Lb */
	kp3_invert_below_bf16<NTH, L::LC, L::LA>(sA, Li, Tb, Lb, tid);
	__syncthreads();			/* A, Li, Tb dead: Kb^T, Vb^T take their room */

	/* C. the right-hand sides [beta k Gam | beta v] transposed, as =3 (the
	 * second half first folds rows 0 .. 31 as =3's G at row 31).  KW:
	 * kp6_sub left Kb^T [K][C] in the tile's U16 room (the same values: its
	 * expression on the same G); it comes in by cp.async while Vb^T is
	 * formed, and g and k are not read here at all */
	if constexpr (KW >= 2)
	{
		const uint16_t *kbg = U16 + tile * C * K;

#pragma unroll 1				/* (unrolled, ptxas spills 8 bytes at 64 registers) */
		for (int p = tid; p < K * C / 8; p += NTH)
		{
			int			c = p / (C / 8),
						c8 = 8 * (p % (C / 8));

			cp_async16(KbT + c * L::LC + c8, kbg + c * C + c8);
		}
		cp_async_commit();
	}
	if constexpr (KW >= 2)
	{
		int			c = tid % K,
					r0 = 32 * (tid / K),
					r1 = r0 + 32;

		for (int t8 = r0; t8 < r1; t8 += 8)
		{
			float		ys[8];

#pragma unroll
			for (int u = 0; u < 8; u++)
			{
				int			t = t8 + u;
				bool		in = t < Cn;
				float		bt = sb[t];

				ys[u] = in ? bt * kp_in_nc(vb_, t * HKi + c) : 0.0f;
			}
			*(uint4 *) (VbT + c * L::LC + t8) = make_uint4(cvt_bf16x2(ys[0], ys[1]), cvt_bf16x2(ys[2], ys[3]),
														   cvt_bf16x2(ys[4], ys[5]), cvt_bf16x2(ys[6], ys[7]));
		}
		cp_async_wait_all();
	}
	else
	{
		int			c = tid % K,
					r0 = 32 * (tid / K),
					r1 = r0 + 32;
		float		G = 0;

		if (r0 > 0)
			G = KW == 1 ? G31 : fold31(c);

		for (int t8 = r0; t8 < r1; t8 += 8)
		{
			float		xs[8],
						ys[8];

#pragma unroll
			for (int u = 0; u < 8; u++)
			{
				int			t = t8 + u;
				bool		in = t < Cn;
				float		bt = sb[t];

				G += in ? gb[t * HKi + c] : 0.0f;
				xs[u] = in ? bt * kp_in(kb_, t * HKi + c) * kp3_exp(G) : 0.0f;
				ys[u] = in ? bt * kp_in(vb_, t * HKi + c) : 0.0f;
			}
			*(uint4 *) (KbT + c * L::LC + t8) = make_uint4(cvt_bf16x2(xs[0], xs[1]), cvt_bf16x2(xs[2], xs[3]),
														   cvt_bf16x2(xs[4], xs[5]), cvt_bf16x2(xs[6], xs[7]));
			*(uint4 *) (VbT + c * L::LC + t8) = make_uint4(cvt_bf16x2(ys[0], ys[1]), cvt_bf16x2(ys[2], ys[3]),
														   cvt_bf16x2(ys[4], ys[5]), cvt_bf16x2(ys[6], ys[7]));
		}
	}
	__syncthreads();

	/* D. [W | U0] = Li [Kb | Vb], as =3 (W over the scratch, read above);
	 * KW: stored through the warp's tile, 16 bytes a lane */
	kp_wu_product<K, NTH, L::LC, (KW > 0)>(Lb, KbT, VbT, W16, U16, tile, warp, lane,
									 KW ? (uint16_t *) (sm + L::STW) + warp * 16 * KP_STW : NULL);
}

/* =6's two kernels (K = 128); KW: their wide forms (kp6_sub_body,
 * kp6_solve_layout; 2: with the Kb^T hand-off); IN: the sub-chunk kernel's
 * cross-half pairs on tensor cores (KW only) */
template <typename TIN, int KW, int IN = 0>
static int
kp6_launch_form(cudaStream_t s, int n, int H, const TIN *q, const TIN *k, const TIN *v, const float *g,
				const float *beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16,
				float *gl)
{
	unsigned	nc = (unsigned) ((n + KDA_CHUNK - 1) / KDA_CHUNK);
	int			sm1 = kp6_sub_layout<128, KW, IN>::BYTES,
				sm2 = kp6_solve_layout<128, KW>::BYTES;
	cudaError_t e;

	if ((e = cudaFuncSetAttribute(kp6_sub_kernel<128, TIN, KW, IN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  sm1)) != cudaSuccess ||
		(e = cudaFuncSetAttribute(kp6_solve_kernel<128, TIN, KW>, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  sm2)) != cudaSuccess)
		return (int) e;
	kp6_sub_kernel<128, TIN, KW, IN><<<dim3(4 * nc, H), 256, sm1, s>>>(n, H, q, k, g, beta, W16, U16, Q16, Kt16,
																		P16, gl);
	kp6_solve_kernel<128, TIN, KW><<<dim3(nc, H), 256, sm2, s>>>(n, H, k, v, g, beta, W16, U16);
	return 0;
}

/* set by kk_set_kda_kp6_wide (KL_CUDA_KDA_KP6_WIDE): =6's wide forms with
 * Kb^T handed from the sub-chunk kernel to the solve (2, default), without
 * that hand-off (1), or the forms before them (0); the same outputs bit
 * for bit */
static int kda_kp6_wide = 2;

extern "C" void
kk_set_kda_kp6_wide(int on)
{
	kda_kp6_wide = on;
}

/* set by kk_set_kda_kp6_intra (KL_CUDA_KDA_KP6_INTRA): the sub-chunk
 * kernel's pairs of rows 8 .. 15 with columns 0 .. 7 on tensor cores from
 * fp16 operands (1, default; the wide forms only), or all its pairs inside
 * the sub-chunk on CUDA cores (0: the outputs as before, bit for bit) */
static int kda_kp6_intra = 1;

extern "C" int
kk_set_kda_kp6_intra(int on)
{
	int			was = kda_kp6_intra;

	kda_kp6_intra = on;
	return was;
}

template <typename TIN>
static int
kp6_launch(cudaStream_t s, int n, int H, const TIN *q, const TIN *k, const TIN *v, const float *g,
		   const float *beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16, float *gl)
{
	/* the wide sub-chunk kernel reads q, k 16 bytes at a time (every row
	 * 16-byte aligned when the arrays are: H K is a multiple of 128) */
	bool		aligned = (((uintptr_t) q | (uintptr_t) k) & 15) == 0;

	if (!aligned || kda_kp6_wide <= 0)
		return kp6_launch_form<TIN, 0>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
	if (kda_kp6_wide == 1)
		return kda_kp6_intra == 1 ?
			kp6_launch_form<TIN, 1, 1>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl) :
			kp6_launch_form<TIN, 1>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
	return kda_kp6_intra == 1 ?
		kp6_launch_form<TIN, 2, 1>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl) :
		kp6_launch_form<TIN, 2>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
}

/* set by kk_set_kda_prep_mma: kk_kda_chunked_mma's parallel half on tensor
 * cores, 128 threads a block (1) or 256 (2, K = 128; 1 for other K), the
 * 256-thread kernel in 63.5 KB (3; K = 128, 1 for other K), or the fp32
 * prep kernel (0); 4: as 3, and in prefill steps that kk_kda_prep_fused_ok
 * accepts the elementwise prep fused into it (kk_kda_chunked_mma_fused);
 * 6 (the default): =3's outputs bit for bit from two kernels of independent
 * blocks (kp6_sub_kernel, kp6_solve_kernel; K = 128, 1 for other K; 1.0 to
 * 1.3 % off the KDA op at 8k-128k tokens on the H200, 2026-11-30) */
static int kda_prep_mma_on = 6;

extern "C" void
kk_set_kda_prep_mma(int on)
{
	kda_prep_mma_on = on;
}

template <int K, int NTH>
static int
chunk_prep_mma_launch(cudaStream_t s, int n, int H, const float *q, const float *k, const float *v, const float *g,
					  const float *beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16,
					  uint16_t *P16, float *gl)
{
	size_t		nc = (size_t) (n + KDA_CHUNK - 1) / KDA_CHUNK;
	int			sm = kp_layout<K>::BYTES;
	cudaError_t e;

	if ((e = cudaFuncSetAttribute(kda_chunk_prep_mma_kernel<K, NTH>, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  sm)) != cudaSuccess)
		return (int) e;
	kda_chunk_prep_mma_kernel<K, NTH><<<dim3((unsigned) nc, H), NTH, sm, s>>>(n, H, q, k, v, g, beta, W16, U16, Q16,
																			   Kt16, P16, gl);
	return 0;
}

/*
 * The parallel part of kk_kda_chunked_mma (kda_chunk_mma.cu) in the layout
 * above; on tensor cores (kda_chunk_prep_mma_kernel) unless
 * kk_set_kda_prep_mma(0).  Returns 0, -1 for an unsupported head size, or a
 * CUDA error code.
 */
extern "C" int
kk_kda_chunk_prep_bf16(cudaStream_t s, int n, int H, int K, const float *q, const float *k, const float *v,
					   const float *g, const float *beta, uint16_t *W16, uint16_t *U16, uint16_t *Q16,
					   uint16_t *Kt16, uint16_t *P16, float *gl)
{
	if (kda_prep_mma_on)		/* tensor cores (KL_CUDA_KDA_PREP_MMA, default) */
		switch (K)
		{
			case 32:
				return chunk_prep_mma_launch<32, 128>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
			case 64:
				return chunk_prep_mma_launch<64, 128>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
			case 128:
				if (kda_prep_mma_on == 6)
					return kp6_launch<float>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
				if (kda_prep_mma_on >= 3)	/* 4 where kk_kda_chunked_mma_fused does not run */
				{
					size_t		nc = (size_t) (n + KDA_CHUNK - 1) / KDA_CHUNK;
					int			smb = kp3_layout<128>::BYTES;
					cudaError_t e;

					if ((e = cudaFuncSetAttribute(kda_chunk_prep_mma3_kernel<128>,
												  cudaFuncAttributeMaxDynamicSharedMemorySize, smb)) != cudaSuccess)
						return (int) e;
					kda_chunk_prep_mma3_kernel<128><<<dim3((unsigned) nc, H), 256, smb, s>>>(n, H, q, k, v, g, beta, W16,
																							  U16, Q16, Kt16, P16, gl);
					return 0;
				}
				return kda_prep_mma_on == 2 ?
					chunk_prep_mma_launch<128, 256>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl) :
					chunk_prep_mma_launch<128, 128>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
		}
	return kda_chunk_prep_fp32_bf16(s, n, H, K, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
}

/*
 * kk_kda_chunk_prep_bf16 of q, k, v in bf16 (g, beta fp32): =6's kernels
 * whatever KL_CUDA_KDA_PREP_MMA says (the other forms read fp32 only).
 * Returns 0, -1 for K other than 128, or a CUDA error code.
 */
extern "C" int
kk_kda_chunk_prep_bf16_in16(cudaStream_t s, int n, int H, int K, const uint16_t *q, const uint16_t *k,
							const uint16_t *v, const float *g, const float *beta, uint16_t *W16, uint16_t *U16,
							uint16_t *Q16, uint16_t *Kt16, uint16_t *P16, float *gl)
{
	if (K != 128)
		return -1;
	return kp6_launch<uint16_t>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
}

/* whether kk_kda_chunked_mma_fused runs for head size K and conv width W
 * (KL_CUDA_KDA_PREP_MMA=4, K = 128, W 1 .. 4) */
extern "C" int
kk_kda_prep_fused_ok(int K, int W)
{
	return kda_prep_mma_on == 4 && K == 128 && W >= 1 && W <= 4;
}

/*
 * kk_kda_chunk_prep_bf16 of kda_prep's outputs for one sequence of n rows,
 * computed from the raw inputs (q, k, v, f, b at the sequence's row 0, the
 * weights, *tailp = its conv tails before the step): the 63.5 KB kernel with
 * the elementwise prep fused (kp4_raw above).  Only when
 * kk_kda_prep_fused_ok(K, W).  Returns 0, -1 if not, or a CUDA error code.
 */
extern "C" int
kk_kda_chunk_prep_bf16_fused(cudaStream_t s, int n, int H, int K, int W, const float *q, const float *k,
							 const float *v, const float *f, const float *b, const float *conv_q,
							 const float *conv_k, const float *conv_v, const float *A_log, const float *dt_bias,
							 float *const *tailp, uint16_t *W16, uint16_t *U16, uint16_t *Q16, uint16_t *Kt16,
							 uint16_t *P16, float *gl)
{
	size_t		nc = (size_t) (n + KDA_CHUNK - 1) / KDA_CHUNK;
	int			smb = kp3_layout<128>::BYTES + 2 * KDA_CHUNK * (int) sizeof(float);
	kp4_raw		raw = {q, k, v, f, b, conv_q, conv_k, conv_v, A_log, dt_bias, tailp, 1.0f / sqrtf((float) K), W};
	cudaError_t e;

	if (!kk_kda_prep_fused_ok(K, W))
		return -1;
	if ((e = cudaFuncSetAttribute(kda_chunk_prep_mma4_kernel<128>, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  smb)) != cudaSuccess)
		return (int) e;
	kda_chunk_prep_mma4_kernel<128><<<dim3((unsigned) nc, H), 256, smb, s>>>(n, H, W16, U16, Q16, Kt16, P16, gl, raw);
	return 0;
}
