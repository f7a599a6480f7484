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
 * layout, equal within bf16 rounding.
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

/* d += A B, one m16n8k16 step (bf16 operands, fp32 accumulators) */
__device__ __forceinline__ void
kp_mma(float *d, const uint32_t *a, uint32_t b0, uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
				 "{%0, %1, %2, %3};\n"
				 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
				 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

__device__ __forceinline__ uint32_t
kp_pack2(float lo, float hi)
{
	return (uint32_t) f32_to_bf16(lo) | ((uint32_t) f32_to_bf16(hi) << 16);
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
			kp_mma(acc, a, bb[0], bb[1]);
		}
		{
			int			r = s0 + gq,
						cc = n0 + t2;

			if (which == 0)
			{
				*(uint32_t *) (P + r * C + cc) = kp_pack2(acc[0], acc[1]);
				*(uint32_t *) (P + (r + 8) * C + cc) = kp_pack2(acc[2], acc[3]);
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
					kp_mma(acc[j], a, bb[0], bb[1]);
				}
			}
#pragma unroll
			for (int j = 0; j < NT; j++)
			{
				int			col = 8 * (warp * NT + j) + t2,
							r = 16 * m + gq;
				uint16_t   *dst = col < K ? W16 + tile * C * K + col : U16 + tile * C * V + col - K;

				*(uint32_t *) (dst + (size_t) r * K) = kp_pack2(acc[j][0], acc[j][1]);
				*(uint32_t *) (dst + (size_t) (r + 8) * K) = kp_pack2(acc[j][2], acc[j][3]);
			}
		}
	}
}

/* set by kk_set_kda_prep_mma: kk_kda_chunked_mma's parallel half on tensor
 * cores, 128 threads a block (1) or 256 (2, K = 128; 1 for other K), or the
 * fp32 prep kernel (0) */
static int kda_prep_mma_on = 2;

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
				return kda_prep_mma_on == 2 ?
					chunk_prep_mma_launch<128, 256>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl) :
					chunk_prep_mma_launch<128, 128>(s, n, H, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
		}
	return kda_chunk_prep_fp32_bf16(s, n, H, K, q, k, v, g, beta, W16, U16, Q16, Kt16, P16, gl);
}
