/*
 * router.cu — a decode step's MoE router product and routing in one kernel
 * (KL_CUDA_ROUTER_FUSED), optionally with the residual add and RMSNorm
 * before them.
 *
 * Without it a MoE layer of a decode step runs three dependent kernels that
 * leave the memory idle: the add + norm (kk_add_rmsnorm), the router GEMV
 * (kk_gemv's block-rows kernel, E x D fp32 arithmetic) and the routing +
 * grouping (kk_moe_route_group_warp).  Here the GEMV's blocks (ROWS_RB router
 * rows each, ROWS_BT threads, the same grid) compute the logits exactly as
 * gemv_rows_kernel does (rows_first / rows_dot / rows_block_sum of
 * gemv_rows.cuh, the input rows staged in shared memory), and the last block
 * to finish (a grid-wide counter in global memory: __threadfence, then
 * atomicAdd; that block sets it back to 0 for the next launch or graph
 * replay) routes and groups the tokens with moe.cu's warp code
 * (route_token_warp, group_pairs_warp of route_warp.cuh).  Every output is
 * bit for bit what the three kernels write.
 *
 * With the norm (NORM): each block computes h = x + a and xn = rmsnorm(h) of
 * the step's token rows itself, in row_norm_kernel<1>'s order (per virtual
 * thread of kk_row_threads(D) its float4s' sumsq4 in column order, then that
 * kernel's block_sum tree: warp sums of 32 virtual threads, then one warp
 * over the warp sums), and uses xn for its dot products.  x (and a, which
 * may be xn itself) are read by every block, so only the last block, after
 * the counter says all blocks have read them, writes the new residual x = h
 * and xn, which the expert kernels read after this one.
 */
#include "common.cuh"
#include "gemv_rows.cuh"
#include "route_warp.cuh"

#define RT_WARPS (ROWS_BT / 32)

/* the step's tokens the fused router takes (one pass of the GEMV) */
#define ROUTER_MAX_TOKENS 8

extern int	kk_gemv_rows;		/* gemv.cu: bf16 GEMVs in the block-rows design */

/*
 * xs[t][.] = rmsnorm(x[t] + a[t]) for the NR token rows (each of D numbers,
 * contiguous), as row_norm_kernel<1> computes it with T = kk_row_threads(D)
 * threads: virtual thread v sums the squares of its float4s v, v + T, ...
 * (ROW_V4 at most) in that order; the T partials add up in the block_sum
 * tree.  part: T floats of shared memory.  Ends with a __syncthreads().
 */
template <int NR>
__device__ __forceinline__ void
norm_rows(float *xs, const float *x, const float *a, const float *__restrict__ w, int D, float eps, int T, float *part)
{
	__shared__ float red[32],
				ivs[NR];
	int			tid = threadIdx.x,
				lane = tid & 31,
				warp = tid >> 5,
				nc = D >> 2;

	for (int t = 0; t < NR; t++)
	{
		const float4 *xr = (const float4 *) (x + (size_t) t * D),
				   *ar = (const float4 *) (a + (size_t) t * D);
		float4	   *hr = (float4 *) (xs + (size_t) t * D);

		for (int v = tid; v < T; v += ROWS_BT)
		{
			float		ss = 0;

#pragma unroll
			for (int j = 0; j < ROW_V4; j++)
			{
				int			c = v + j * T;

				if (c < nc)
				{
					float4		val = xr[c],
								b = ar[c];

					val.x += b.x;
					val.y += b.y;
					val.z += b.z;
					val.w += b.w;
					hr[c] = val;	/* h, normalized below */
					ss += sumsq4(val);
				}
			}
			part[v] = ss;
		}
		__syncthreads();
		/* block_sum over T threads: each warp's butterfly, then one over the warp sums */
		for (int vw = warp; vw < T / 32; vw += RT_WARPS)
		{
			float		s = warp_sum(part[vw * 32 + lane]);

			if (lane == 0)
				red[vw] = s;
		}
		__syncthreads();
		if (warp == 0)
		{
			float		s = warp_sum(lane < T / 32 ? red[lane] : 0.0f);

			if (lane == 0)
				ivs[t] = 1.0f / sqrtf(s / (float) D + eps);
		}
		__syncthreads();
	}
	for (int i = tid; i < NR * nc; i += ROWS_BT)
	{
		float4	   *p = (float4 *) xs + i;
		float4		v = *p,
					wv = ((const float4 *) w)[i % nc],
					o;
		float		iv = ivs[i / nc];

		o.x = wv.x * (v.x * iv);
		o.y = wv.y * (v.y * iv);
		o.z = wv.z * (v.z * iv);
		o.w = wv.w * (v.w * iv);
		*p = o;
	}
	__syncthreads();
}

/*
 * Block b: router rows b * ROWS_RB ..; the last block to finish routes and
 * groups.  Dynamic shared memory (floats): xs [NR D]; then the scratch,
 * either the norm's T partials or the routing's logits [NR E], ssel [NR k],
 * srank [NR k], cnt [E] and per warp E + 2G (kk_router_route sizes it).
 */
template <int NR, bool NORM>
__global__ void __launch_bounds__(ROWS_BT)
router_route_kernel(kk_router_args a)
{
	extern __shared__ float4 sh4[];
	__shared__ float sums[ROWS_RB * NR];
	__shared__ int last;
	float	   *xs = (float *) sh4,
			   *scr = xs + (size_t) NR * a.D;
	int			D = a.D,
				E = a.E,
				nch = D >> 3,
				row0 = blockIdx.x * ROWS_RB,
				tid = threadIdx.x;
	const uint16_t *Wr[ROWS_RB];
	const float *xr[NR];
	uint4		raw[ROWS_RB];
	float		acc[ROWS_RB][NR];

	/* the weights do not depend on earlier kernels: the first pieces before the wait */
#pragma unroll
	for (int w = 0; w < ROWS_RB; w++)
		Wr[w] = row0 + w < E ? (const uint16_t *) a.W + (size_t) (row0 + w) * D : NULL;
	rows_first<ROWS_RB, ROWS_BT>(raw, Wr, nch);
	kk_dep_wait();
	kk_dep_launch();

	/* the input rows in shared memory: xn itself, or made from x + a */
	if (NORM)
		norm_rows<NR>(xs, a.x, a.a, a.norm_w, D, a.eps, a.norm_threads, scr);
	else
	{
		for (int i = tid; i < NR * (D >> 2); i += ROWS_BT)
			((float4 *) xs)[i] = ((const float4 *) a.x)[i];
		__syncthreads();
	}

	/* the logits of rows row0.., as gemv_rows_kernel<NR, ROWS_RB, ROWS_BT> */
#pragma unroll
	for (int r = 0; r < NR; r++)
		xr[r] = xs + (size_t) r * D;
#pragma unroll
	for (int w = 0; w < ROWS_RB; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
			acc[w][r] = 0;
	rows_dot<NR, ROWS_RB, ROWS_BT, true>(acc, raw, Wr, xr, nch);
	rows_block_sum<NR, ROWS_RB, ROWS_BT>(acc, sums);
	for (int i = tid; i < ROWS_RB * NR; i += ROWS_BT)
		if (row0 + i / NR < E)
			a.logits[(size_t) (i % NR) * E + row0 + i / NR] = sums[i];

	/* the last block to get here has every block's logits (and every block has read x) */
	__threadfence();
	__syncthreads();
	if (tid == 0)
		last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
	__syncthreads();
	if (!last)
		return;
	__threadfence();
	if (tid == 0)
		*a.counter = 0;			/* for the next launch (graph replays too) */

	if (NORM)
	{
		/* now the residual and xn may change: h again (x, a unchanged so far), xn from xs */
		for (int i = tid; i < NR * (D >> 2); i += ROWS_BT)
		{
			float4		v = ((const float4 *) a.x)[i],
						b = ((const float4 *) a.a)[i];

			v.x += b.x;
			v.y += b.y;
			v.z += b.z;
			v.w += b.w;
			((float4 *) a.x)[i] = v;
			((float4 *) a.xn)[i] = ((const float4 *) xs)[i];
		}
	}

	/* route (a warp per token) and group (warp 0), as moe_route_group_warp_kernel */
	{
		int			k = a.k,
					nk = NR * k,
					lane = tid & 31,
					w = tid >> 5;
		float	   *slog = scr;
		int		   *ssel = (int *) (slog + (size_t) NR * E),
				   *srank = ssel + nk,
				   *cnt = srank + nk;
		float	   *gs = (float *) (cnt + E) + (size_t) w * (E + 2 * a.G);
		float		bz[ROUTE_NPL];

		/* other blocks' logits: from L2 (__ldcg), never a stale L1 line */
		for (int i = tid; i < NR * E; i += ROWS_BT)
			slog[i] = __ldcg(a.logits + i);
		for (int e = tid; e < E; e += ROWS_BT)
			cnt[e] = 0;
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			bz[i] = lane + 32 * i < E ? a.bias[lane + 32 * i] : 0.0f;
		__syncthreads();
		for (int t = w; t < NR; t += RT_WARPS)
			route_token_warp(t, E, k, a.G, a.Tg, a.use_softmax, a.renorm, a.bias_in_w, a.scaling, slog, bz, gs, a.sel,
							 a.wts, ssel);
		__syncthreads();
		if (w == 0)
			group_pairs_warp(nk, E, k, a.shared_rows, a.P, ssel, cnt, srank, a.start, a.xrow, a.inv, a.active);
	}
}

template <int NR, bool NORM>
static int
router_launch(cudaStream_t s, size_t sm, const kk_router_args *a)
{
	cudaError_t e;

	if (sm > 48 * 1024 &&
		(e = cudaFuncSetAttribute(router_route_kernel<NR, NORM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  (int) sm)) != cudaSuccess)
		return (int) e;
	kk_launch(router_route_kernel<NR, NORM>, dim3(ceil_div(a->E, ROWS_RB)), dim3(ROWS_BT), sm, s, *a);
	return 0;
}

template <bool NORM>
static int
router_dispatch(cudaStream_t s, int n, size_t sm, const kk_router_args *a)
{
	switch (n)
	{
#define CASE(N) case N: return router_launch<N, NORM>(s, sm, a);
			CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
	}
	return -1;
}

extern "C" int
kk_router_route(cudaStream_t s, int n, const kk_router_args *a)
{
	int			D = a->D,
				E = a->E,
				k = a->k,
				G = a->G,
				nch = D >> 3;
	bool		norm = a->a != NULL;
	kk_router_args b = *a;
	size_t		route = sizeof(float) * ((size_t) n * E + 2 * (size_t) n * k + E + RT_WARPS * ((size_t) E + 2 * G)),
				scratch,
				sm;

	/* the shapes gemv_rows_kernel<n, ROWS_RB, ROWS_BT> and the warp routing take */
	if (n < 1 || n > ROUTER_MAX_TOKENS || !kk_gemv_rows || D % 8 != 0 || D <= 0 || (nch >= 512 && nch % 128 == 0) ||
		(((uintptr_t) a->x | (uintptr_t) a->W) & 15) != 0 ||
		E < 1 || E > 32 * ROUTE_NPL || k < 1 || k > 32 || k > E || G < 1 || (G > 1 && a->Tg < G && E % G != 0) ||
		a->P < 1)
		return -1;
	if (norm && (D > 4 * ROW_V4 * 1024 || !a->xn || !a->norm_w ||
				 (((uintptr_t) a->a | (uintptr_t) a->xn | (uintptr_t) a->norm_w) & 15) != 0))
		return -1;
	b.norm_threads = norm ? (int) kk_row_threads(D) : 0;
	scratch = sizeof(float) * (size_t) b.norm_threads > route ? sizeof(float) * (size_t) b.norm_threads : route;
	sm = sizeof(float) * (size_t) n * D + scratch;
	if (sm > 200 * 1024)
		return -1;
	return norm ? router_dispatch<true>(s, n, sm, &b) : router_dispatch<false>(s, n, sm, &b);
}
