/*
 * gemv_rows.cuh — the pieces of the block-rows GEMV (kernels/gemv.cu) that
 * other kernels reuse so that their products are made in exactly the same
 * order: the 8-wide FMA chain, the block's walk over the 16-byte pieces of
 * RB weight rows and the block reduction of the partial sums.  The fused
 * router (kernels/router.cu) computes its logits with them, bit for bit
 * those of kk_gemv.
 */
#ifndef KL_KERNELS_GEMV_ROWS_CUH
#define KL_KERNELS_GEMV_ROWS_CUH

#include "common.cuh"

/* acc + w[0..8) . (a, b) (fused multiply-adds in index order): every GEMV's inner step */
__device__ __forceinline__ float
fma8_acc(const float *w, float4 a, float4 b, float acc)
{
	acc = fmaf(w[0], a.x, acc);
	acc = fmaf(w[1], a.y, acc);
	acc = fmaf(w[2], a.z, acc);
	acc = fmaf(w[3], a.w, acc);
	acc = fmaf(w[4], b.x, acc);
	acc = fmaf(w[5], b.y, acc);
	acc = fmaf(w[6], b.z, acc);
	acc = fmaf(w[7], b.w, acc);
	return acc;
}

/* an input piece: through the read-only cache from global memory, or from shared memory */
template <bool XSH>
__device__ __forceinline__ float4
load_x4(const float4 *p)
{
	if (XSH)
		return *p;
	return __ldg(p);
}

/* ------------------------------------------------------------------ block rows (bf16) */

#define ROWS_BT 96				/* threads of a block-rows block (288 pieces = 2304 columns: 3 each) */
#define ROWS_RB 3				/* its weight rows */
#define ROWS_BT_WIDE 128		/* for rows of 512 pieces or a multiple of 128 above (4096 columns) */
#define ROWS_RB_WIDE 2

/*
 * The first pieces of RB weight rows (Wr[w] NULL: past the matrix, zeros):
 * loaded before kk_dep_wait, since the weights do not depend on earlier
 * kernels, so the first memory latency overlaps the previous kernel's tail.
 */
template <int RB, int BT>
__device__ __forceinline__ void
rows_first(uint4 (&raw)[RB], const uint16_t *const (&Wr)[RB], int nch)
{
#pragma unroll
	for (int w = 0; w < RB; w++)
		raw[w] = Wr[w] && (int) threadIdx.x < nch ? __ldg((const uint4 *) Wr[w] + threadIdx.x) : make_uint4(0, 0, 0, 0);
}

/*
 * acc[w][r] += W_w . x_r over this thread's pieces threadIdx.x, + BT, ...
 * of the nch 16-byte pieces (8 columns each) of the rows; raw holds the first
 * pieces (rows_first).  Each input piece is read once for all RB rows;
 * the input rows are in global memory, or (XSH) in shared memory.
 */
template <int NR, int RB, int BT, bool XSH = false>
__device__ __forceinline__ void
rows_dot(float (&acc)[RB][NR], uint4 (&raw)[RB], const uint16_t *const (&Wr)[RB], const float *const (&xr)[NR],
		 int nch)
{
	for (int ch = threadIdx.x; ch < nch; ch += BT)
	{
		uint4		cur[RB];

#pragma unroll
		for (int w = 0; w < RB; w++)
		{
			cur[w] = raw[w];
			/* the next pieces are in flight while these are used */
			raw[w] = Wr[w] && ch + BT < nch ? __ldg((const uint4 *) Wr[w] + ch + BT) : make_uint4(0, 0, 0, 0);
		}
#pragma unroll
		for (int r = 0; r < NR; r++)
		{
			float4		a = load_x4<XSH>((const float4 *) xr[r] + 2 * ch),
						b = load_x4<XSH>((const float4 *) xr[r] + 2 * ch + 1);

#pragma unroll
			for (int w = 0; w < RB; w++)
			{
				float		f[8];

				unpack8_bf16(cur[w], f);
				acc[w][r] = fma8_acc(f, a, b, acc[w][r]);
			}
		}
	}
}

/*
 * sums[w * NR + r] = the block's total of acc[w][r] (shared memory; every
 * thread sees it on return).  Warp sums, then the warps' partials added in
 * warp order: the same result on every run.
 */
template <int NR, int RB, int BT>
__device__ __forceinline__ void
rows_block_sum(float (&acc)[RB][NR], float *sums)
{
	__shared__ float part[RB * NR][BT / 32];
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5;

#pragma unroll
	for (int w = 0; w < RB; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
		{
			float		v = warp_sum(acc[w][r]);

			if (lane == 0)
				part[w * NR + r][warp] = v;
		}
	__syncthreads();
	for (int i = threadIdx.x; i < RB * NR; i += BT)
	{
		float		v = 0;

#pragma unroll
		for (int k = 0; k < BT / 32; k++)
			v += part[i][k];
		sums[i] = v;
	}
	__syncthreads();
}

#endif
