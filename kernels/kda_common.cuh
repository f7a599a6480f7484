/*
 * kda_common.cuh — what kda.cu (the fp32 KDA kernels) and
 * kda_chunk_prep_mma.cu (the chunk prep on tensor cores) share: the chunk
 * and sub-chunk sizes, the fp32 inverse of I + A by 16 x 16 blocks (kda.cu,
 * step 4 of kda_chunk_prep, says why by blocks), and the fp32 prep kernel
 * with bf16 stores that kk_kda_chunk_prep_bf16 falls back to.
 */
#ifndef KL_KERNELS_KDA_COMMON_CUH
#define KL_KERNELS_KDA_COMMON_CUH

#include "common.cuh"

#define KDA_CHUNK 64
#define KDA_SUB 16

/* Both inverse steps below run in a whole block (every thread calls them;
 * they synchronize it) on shared memory: sA the strictly lower A [C][C],
 * Li [C][C] receives (I + A)^-1, Tb [3][16][16] is scratch. */

/* 4a. Li zeroed, then its diagonal 16 x 16 blocks by substitution */
__device__ __forceinline__ void
chunk_prep_invert_diagonal(const float *sA, float *Li, int tid)
{
	constexpr int C = KDA_CHUNK;

	for (int e = tid; e < C * C; e += blockDim.x)
		Li[e] = 0.0f;
	__syncthreads();
	if (tid < C)
	{
		int			b = tid / KDA_SUB,
					j = tid % KDA_SUB,
					o = b * KDA_SUB;

		for (int i = j; i < KDA_SUB; i++)
		{
			float		x = i == j ? 1.0f : 0.0f;

			for (int m = j; m < i; m++)
				x -= sA[(o + i) * C + o + m] * Li[(o + m) * C + o + j];
			Li[(o + i) * C + o + j] = x;
		}
	}
	__syncthreads();
}

/* 4b. the blocks below the diagonal, in order of block distance */
__device__ __forceinline__ void
chunk_prep_invert_below(const float *sA, float *Li, float *Tb, int tid)
{
	constexpr int C = KDA_CHUNK;

	for (int d = 1; d < C / KDA_SUB; d++)
	{
		int			np = C / KDA_SUB - d;

		for (int e = tid; e < np * 256; e += blockDim.x)
		{
			int			j = e / 256,
						i = j + d,
						rr = (e % 256) / 16,
						cc = e % 16;
			float		t = 0;

			for (int k = j; k < i; k++)
				for (int m = 0; m < KDA_SUB; m++)
					t += sA[(KDA_SUB * i + rr) * C + KDA_SUB * k + m] * Li[(KDA_SUB * k + m) * C + KDA_SUB * j + cc];
			Tb[e] = t;
		}
		__syncthreads();
		for (int e = tid; e < np * 256; e += blockDim.x)
		{
			int			j = e / 256,
						i = j + d,
						rr = (e % 256) / 16,
						cc = e % 16;
			float		t = 0;

			for (int m = 0; m < KDA_SUB; m++)
				t += Li[(KDA_SUB * i + rr) * C + KDA_SUB * i + m] * Tb[j * 256 + m * 16 + cc];
			Li[(KDA_SUB * i + rr) * C + KDA_SUB * j + cc] = -t;
		}
		__syncthreads();
	}
}
/*
 * kda.cu's fp32 prep kernel (kda_chunk_prep_kernel<K, true>) writing
 * kk_kda_chunk_prep_bf16's outputs (kernels.h) in its layout
 * (kda_chunk_prep_mma.cu's header).  Returns 0, -1 for an unsupported head
 * size, or a CUDA error code (launch errors: the caller's cuda_launched).
 */
int			kda_chunk_prep_fp32_bf16(cudaStream_t s, int n, int H, int K, const float *q, const float *k,
									 const float *v, const float *g, const float *beta, uint16_t *W16, uint16_t *U16,
									 uint16_t *Q16, uint16_t *Kt16, uint16_t *P16, float *gl);

/*
 * The sum over a head of x, which this lane holds for channels 4 s .. 4 s + 3
 * of the head (s = the lane's index among the head's K / 4 lanes), added in
 * block_sum's order for a block of K threads (thread c = channel c):
 * block_sum first adds each warp's 32 channels by shuffles at distances 16,
 * 8, 4, 2, 1 (channel bits 4, 3, 2, 1, 0), then the K / 32 warp sums by the
 * same butterfly over lanes whose values past K / 32 are zero (adding +0
 * changes no sum of squares), which leaves (p0 + p2) + (p1 + p3) for 4 warps,
 * p0 + p1 for 2.  Here channel bits 4..2 are lane bits 2..0 and bits 1..0 the
 * element, so: shuffles at 4, 2, 1 on each element, then (x0 + x2) + (x1 +
 * x3); warp sum p_w sits in lanes 8 w .. 8 w + 7 of the head, combined at
 * lane distances 16 (w ^ 2), then 8 (w ^ 1).  Every lane of the head gets
 * the same bits (each butterfly step adds the same two numbers in both
 * lanes).  All 32 lanes of the warp must call it.
 */
template <int K>
__device__ __forceinline__ float
kda_head_sum(float x0, float x1, float x2, float x3)
{
	float		p;

#pragma unroll
	for (int o = 4; o > 0; o >>= 1)
	{
		x0 += __shfl_xor_sync(0xffffffffu, x0, o);
		x1 += __shfl_xor_sync(0xffffffffu, x1, o);
		x2 += __shfl_xor_sync(0xffffffffu, x2, o);
		x3 += __shfl_xor_sync(0xffffffffu, x3, o);
	}
	p = (x0 + x2) + (x1 + x3);
	if (K == 128)
		p += __shfl_xor_sync(0xffffffffu, p, 16);
	if (K >= 64)
		p += __shfl_xor_sync(0xffffffffu, p, 8);
	return p;
}

#endif							/* KL_KERNELS_KDA_COMMON_CUH */
