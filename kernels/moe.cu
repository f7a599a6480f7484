/*
 * moe.cu — mixture-of-experts routing and bookkeeping on the device.
 *
 *   moe_route     one block per token: exactly kl_moe_route's rule
 *                 (src/engine/moe_route.c): sigmoid or softmax scores, the
 *                 score-correction bias, group selection, top k by repeated
 *                 selection (ties to the lower expert id), weights with or
 *                 without the bias, renormalized, scaled
 *   moe_group     (decode sizes) the (token, slot) pairs grouped by expert,
 *                 stable, in one block: start[E+1], the gathered token rows,
 *                 the inverse map and the work list of the expert products:
 *                 one item per P rows of an expert (expert * 64 + chunk), so
 *                 that an expert with many tokens (the shared one: all of
 *                 them) spreads over many blocks instead of making one block
 *                 loop;
 *                 optionally the shared expert as expert E over all tokens
 *                 (rows nk .. nk+n), so that its products join the same launches
 *   moe_combine   y[t] = sum over slots of w * (expert output) (+ shared);
 *                 the expert outputs fp32, or bf16 (moe_combine16, prefill)
 *   moe_route_group   (decode) both of the first two in one launch: a warp
 *                 routes a token, then the block groups the pairs
 *   moe_route_group_warp   (decode, E <= 256) the same outputs with warp
 *                 reductions instead of the block's scans: a warp per token,
 *                 then one warp groups
 *   moe_combine_add_rmsnorm   (decode) the combine fused with the residual
 *                 add and the next layer's input norm: x += y, xn = norm(x)
 *   moe_pad_*     (prefill, KL_CUDA_MOE_PREFILL=4) the pairs grouped into
 *                 variant 3's padded size-class slots: counts, layout and
 *                 inverse map on the device, only the counts go to the host
 * Prefill batches otherwise group on the host (cuda_moe_prefill.c), which
 * needs the counts there anyway to size the cuBLAS products.
 */
#include "common.cuh"

/* (value, index) pair order of the top-k selection: larger value first, then
 * the lower index, which is what kl_moe_route's strict ">" scan picks */
__device__ __forceinline__ bool
better(float v, int i, float bv, int bi)
{
	return bi < 0 || v > bv || (v == bv && i >= 0 && i < bi);
}

/* A group's score: the sum of its two largest choices (the largest alone in a
 * group of one expert), as kl_moe_route scores groups. */
__device__ __forceinline__ float
group_score(const float *choice, int g, int per)
{
	float		b1 = -INFINITY,
				b2 = -INFINITY;

	for (int e = g * per; e < (g + 1) * per; e++)
	{
		if (choice[e] > b1)
		{
			b2 = b1;
			b1 = choice[e];
		}
		else if (choice[e] > b2)
			b2 = choice[e];
	}
	return per >= 2 ? b1 + b2 : b1;
}

/* keep[g] = 1 for the Tg groups of highest score, ties to the lower group
 * (keep[] starts at 0); one thread does it. */
__device__ __forceinline__ void
keep_top_groups(const float *gscore, int *keep, int G, int Tg)
{
	for (int r = 0; r < Tg; r++)
	{
		int			best = -1;

		for (int g = 0; g < G; g++)
			if (!keep[g] && (best < 0 || gscore[g] > gscore[best]))
				best = g;
		keep[best] = 1;
	}
}

/*
 * Lane r < k holds slot r's weight wr: wts_row[r] = wr (divided by the k
 * weights' sum, added in slot order, when renormalizing) times scaling.
 * Every lane of the warp calls it.
 */
__device__ __forceinline__ void
slot_weights_warp(float wr, int k, int renorm, float scaling, float *wts_row, int lane)
{
	float		sum = 0;

	for (int r = 0; r < k; r++)
		sum += __shfl_sync(0xffffffffu, wr, r);
	if (lane < k)
	{
		float		x = wr;

		if (renorm && k > 1)
			x /= (sum + 1e-20f);
		wts_row[lane] = x * scaling;
	}
}

/*
 * One block per token (blockDim.x a multiple of 32, at most 1024).  Shared:
 * s[E], choice[E], taken[E], gscore[G], keep[G].
 */
__global__ void
moe_route_kernel(int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w, float scaling,
				 const float *__restrict__ logits, const float *__restrict__ bias, int *sel, float *wts)
{
	extern __shared__ float sh[];
	__shared__ float rv[32],
				red[32],
				wsel[64];
	__shared__ int ri[32];
	float	   *s = sh,
			   *choice = s + E,
			   *gscore = choice + E;
	int		   *taken = (int *) (gscore + G),
			   *keep = taken + E;
	int			t = blockIdx.x,
				tid = threadIdx.x,
				lane = tid & 31,
				w = tid >> 5,
				nw = blockDim.x >> 5;
	const float *lg = logits + (size_t) t * E;

	kk_dep_wait();
	kk_dep_launch();
	if (use_softmax)
	{
		float		mx = -INFINITY,
					z = 0;

		for (int e = tid; e < E; e += blockDim.x)
			mx = fmaxf(mx, lg[e]);
		mx = warp_max(mx);
		if (lane == 0)
			rv[w] = mx;
		__syncthreads();
		mx = -INFINITY;
		for (int i = 0; i < nw; i++)
			mx = fmaxf(mx, rv[i]);
		for (int e = tid; e < E; e += blockDim.x)
			z += expf(lg[e] - mx);
		z = block_sum(z, red);
		for (int e = tid; e < E; e += blockDim.x)
			s[e] = expf(lg[e] - mx) / z;
	}
	else
		for (int e = tid; e < E; e += blockDim.x)
			s[e] = 1.0f / (1.0f + expf(-lg[e]));
	for (int e = tid; e < E; e += blockDim.x)
	{
		choice[e] = s[e] + bias[e];
		taken[e] = 0;
	}
	__syncthreads();

	if (G > 1 && Tg < G)
	{
		int			per = E / G;

		/* group score: the sum of the group's two largest choices */
		for (int g = tid; g < G; g += blockDim.x)
		{
			gscore[g] = group_score(choice, g, per);
			keep[g] = 0;
		}
		__syncthreads();
		if (tid == 0)
			keep_top_groups(gscore, keep, G, Tg);
		__syncthreads();
		for (int e = tid; e < E; e += blockDim.x)
			if (!keep[e / per])
				choice[e] = 0.0f;
		__syncthreads();
	}

	/* top k, one block-wide argmax per pick */
	for (int r = 0; r < k; r++)
	{
		float		bv = -INFINITY;
		int			bi = -1;

		for (int e = tid; e < E; e += blockDim.x)
			if (!taken[e] && better(choice[e], e, bv, bi))
			{
				bv = choice[e];
				bi = e;
			}
#pragma unroll
		for (int o = 16; o > 0; o >>= 1)
		{
			float		ov = __shfl_xor_sync(0xffffffffu, bv, o);
			int			oi = __shfl_xor_sync(0xffffffffu, bi, o);

			if (oi >= 0 && better(ov, oi, bv, bi))
			{
				bv = ov;
				bi = oi;
			}
		}
		if (lane == 0)
		{
			rv[w] = bv;
			ri[w] = bi;
		}
		__syncthreads();
		if (tid == 0)
		{
			for (int i = 1; i < nw; i++)
				if (ri[i] >= 0 && better(rv[i], ri[i], bv, bi))
				{
					bv = rv[i];
					bi = ri[i];
				}
			taken[bi] = 1;
			sel[(size_t) t * k + r] = bi;
			wsel[r] = bias_in_w ? s[bi] + bias[bi] : s[bi];
		}
		__syncthreads();
	}
	if (tid == 0)
	{
		float		sum = 0;

		for (int r = 0; r < k; r++)
			sum += wsel[r];
		for (int r = 0; r < k; r++)
		{
			float		x = wsel[r];

			if (renorm && k > 1)
				x /= (sum + 1e-20f);
			wts[(size_t) t * k + r] = x * scaling;
		}
	}
}

extern "C" void
kk_moe_route(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w,
			 float scaling, const float *logits, const float *bias, int *sel, float *wts)
{
	size_t		sm = sizeof(float) * (2 * (size_t) E + G) + sizeof(int) * ((size_t) E + G);
	int			threads = E >= 256 ? 256 : (E + 31) / 32 * 32;

	if (n > 0)
		kk_launch(moe_route_kernel, dim3(n), dim3(threads), sm, s, E, k, G, Tg, use_softmax, renorm, bias_in_w, scaling,
				  logits, bias, sel, wts);
}

/*
 * The grouping's last entries (every grouping kernel's): start[E] = tot_c,
 * the routed pairs (and start[E + 1] with the shared expert's rows: expert
 * E, over every token), active[0] = the tot_i routed work items plus the
 * shared expert's, which follow them; the shared rows' x rows (pairs nk ..).
 * Called by threads me = 0 .. nthreads - 1 (me 0 writes the entries).
 */
__device__ __forceinline__ void
group_tail(int E, int nk, int tot_c, int tot_i, int shared_rows, int P, int *start, int *xrow, int *active, int me,
		   int nthreads)
{
	if (me == 0)
	{
		int			items = (shared_rows + P - 1) / P;

		start[E] = tot_c;
		active[0] = tot_i + items;
		if (shared_rows > 0)
			start[E + 1] = tot_c + shared_rows;
		for (int j = 0; j < items; j++)
			active[1 + tot_i + j] = E * 64 + j;
	}
	for (int t = me; t < shared_rows; t += nthreads)
		xrow[nk + t] = t;
}

/*
 * One block of 1024 threads, E <= 1024.  Pair i (token i / k, slot i % k)
 * goes to position start[e] + (pairs before i with the same expert): the
 * CPU backend's stable order (cpu_moe.c).
 */
__device__ __forceinline__ void
group_pairs(int nk, int E, int k, int shared_rows, int P, const int *sel, int *start, int *xrow, int *inv,
			int *active)
{
	__shared__ int cnt[1024],
				act[1024];
	int			tid = threadIdx.x;

	for (int e = tid; e < 1024; e += blockDim.x)
		cnt[e] = 0;
	__syncthreads();
	for (int i = tid; i < nk; i += blockDim.x)
		atomicAdd(&cnt[sel[i]], 1);
	__syncthreads();
	act[tid] = tid < E ? (cnt[tid] + P - 1) / P : 0;	/* work items of the expert */
	__syncthreads();
	/* inclusive scans of counts and of the work items (Hillis-Steele) */
	for (int o = 1; o < 1024; o <<= 1)
	{
		int			c = tid >= o ? cnt[tid - o] : 0,
					a = tid >= o ? act[tid - o] : 0;

		__syncthreads();
		cnt[tid] += c;
		act[tid] += a;
		__syncthreads();
	}
	if (tid < E)
	{
		int			before = tid ? cnt[tid - 1] : 0,
					items = (cnt[tid] - before + P - 1) / P,
					first = act[tid] - items;

		start[tid] = before;
		for (int j = 0; j < items; j++)
			active[1 + first + j] = tid * 64 + j;
	}
	group_tail(E, nk, cnt[E - 1], act[E - 1], shared_rows, P, start, xrow, active, tid, blockDim.x);
	for (int i = tid; i < nk; i += blockDim.x)
	{
		int			e = sel[i];
		int			rank = 0;

		for (int j = 0; j < i; j++)
			rank += sel[j] == e;
		{
			int			p = (e ? cnt[e - 1] : 0) + rank;

			xrow[p] = i / k;
			inv[i] = p;
		}
	}
}

__global__ void __launch_bounds__(1024)
moe_group_kernel(int nk, int E, int k, int shared_rows, int P, const int *__restrict__ sel, int *start, int *xrow,
				 int *inv, int *active)
{
	kk_dep_wait();
	kk_dep_launch();
	group_pairs(nk, E, k, shared_rows, P, sel, start, xrow, inv, active);
}

extern "C" void
kk_moe_group(cudaStream_t s, int nk, int E, int k, int shared_rows, int P, const int *sel, int *start, int *xrow,
			 int *inv, int *active)
{
	kk_launch(moe_group_kernel, dim3(1), dim3(1024), 0, s, nk, E, k, shared_rows, P, sel, start, xrow, inv, active);
}

/* one expert output element as float: fp32 outputs, or bf16 ones (KL_CUDA_MOE_PREFILL=3) */
__device__ __forceinline__ float
ye_at(const float *__restrict__ ye, size_t i)
{
	return ye[i];
}

__device__ __forceinline__ float
ye_at(const uint16_t *__restrict__ ye, size_t i)
{
	return bf16_to_f32(ye[i]);
}

template <typename YE>
__global__ void
moe_combine_kernel(float *y, int n, int D, int k, const float *__restrict__ wts, const int *__restrict__ inv,
				   const YE *__restrict__ ye, const float *__restrict__ ys)
{
	size_t		total = (size_t) n * D;

	kk_dep_wait();
	kk_dep_launch();
	for (size_t e = blockIdx.x * (size_t) blockDim.x + threadIdx.x; e < total; e += (size_t) gridDim.x * blockDim.x)
	{
		size_t		t = e / D,
					d = e % D;
		float		acc = 0;

		for (int r = 0; r < k; r++)
			acc += wts[t * k + r] * ye_at(ye, (size_t) inv[t * k + r] * D + d);
		if (ys)
			acc += ys[e];
		y[e] = acc;
	}
}

extern "C" void
kk_moe_combine(cudaStream_t s, float *y, int n, int D, int k, const float *wts, const int *inv, const float *ye,
			   const float *ys)
{
	unsigned	blocks = ceil_div((size_t) n * D, 256);

	if (n > 0)
		kk_launch(moe_combine_kernel<float>, dim3(blocks < 8192 ? blocks : 8192), dim3(256), 0, s, y, n, D, k, wts,
				  inv, ye, ys);
}

extern "C" void
kk_moe_combine16(cudaStream_t s, float *y, int n, int D, int k, const float *wts, const int *inv,
				 const uint16_t *ye16, const float *ys)
{
	unsigned	blocks = ceil_div((size_t) n * D, 256);

	if (n > 0)
		kk_launch(moe_combine_kernel<uint16_t>, dim3(blocks < 8192 ? blocks : 8192), dim3(256), 0, s, y, n, D, k,
				  wts, inv, ye16, ys);
}

__global__ void
gather_rows_kernel(float *dst, const float *src, int ld, const int *rows, int n, int D)
{
	size_t		total = (size_t) n * D;

	for (size_t e = blockIdx.x * (size_t) blockDim.x + threadIdx.x; e < total; e += (size_t) gridDim.x * blockDim.x)
		dst[e] = src[(size_t) rows[e / D] * ld + e % D];
}

extern "C" void
kk_gather_rows(cudaStream_t s, float *dst, const float *src, int ld, const int *rows, int n, int D)
{
	unsigned	blocks = ceil_div((size_t) n * D, 256);

	if (n > 0)
		gather_rows_kernel<<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(dst, src, ld, rows, n, D);
}

/* dst (bf16) [n, D] = src rows rows[i] (fp32, row stride ld): the gathered
 * expert inputs of a prefill batch, ready for bf16 products */
__global__ void
gather_rows_bf16_kernel(uint16_t *dst, const float *src, int ld, const int *rows, int n, int D)
{
	size_t		total = (size_t) n * D;

	for (size_t e = blockIdx.x * (size_t) blockDim.x + threadIdx.x; e < total; e += (size_t) gridDim.x * blockDim.x)
		dst[e] = f32_to_bf16(src[(size_t) rows[e / D] * ld + e % D]);
}

extern "C" void
kk_gather_rows_bf16(cudaStream_t s, uint16_t *dst, const float *src, int ld, const int *rows, int n, int D)
{
	unsigned	blocks = ceil_div((size_t) n * D, 256);

	if (n > 0)
		gather_rows_bf16_kernel<<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(dst, src, ld, rows, n, D);
}

/*
 * Token-major gather (KL_CUDA_MOE_PREFILL=3): dst (bf16) row inv[t k + r] =
 * src row t (fp32, row stride ld) for each of token t's k slots, so each x
 * row is read once and written k times.  Vector form: a block per token (grid
 * stride), a thread per 8 columns (two 16-byte loads, one 16-byte store per
 * slot); needs D % 8 == 0, ld % 4 == 0 and 16-byte aligned src and dst.  The
 * scalar form takes any shape.  Rows of dst that no slot names are left alone.
 */
__global__ void
gather_tok_bf16_vec_kernel(uint16_t *dst, const float *__restrict__ src, int ld, const int *__restrict__ inv, int n,
						   int k, int D)
{
	int			D8 = D / 8;

	for (int t = blockIdx.x; t < n; t += gridDim.x)
	{
		const float4 *xr = (const float4 *) (src + (size_t) t * ld);
		const int  *it = inv + (size_t) t * k;

		for (int c = threadIdx.x; c < D8; c += blockDim.x)
		{
			float4		a = xr[2 * c],
						b = xr[2 * c + 1];
			uint4		o;

			o.x = pack_bf16x2(a.x, a.y);
			o.y = pack_bf16x2(a.z, a.w);
			o.z = pack_bf16x2(b.x, b.y);
			o.w = pack_bf16x2(b.z, b.w);
			for (int r = 0; r < k; r++)
				((uint4 *) (dst + (size_t) it[r] * D))[c] = o;
		}
	}
}

__global__ void
gather_tok_bf16_kernel(uint16_t *dst, const float *__restrict__ src, int ld, const int *__restrict__ inv, int n, int k,
					   int D)
{
	for (int t = blockIdx.x; t < n; t += gridDim.x)
	{
		const int  *it = inv + (size_t) t * k;

		for (int c = threadIdx.x; c < D; c += blockDim.x)
		{
			uint16_t	v = f32_to_bf16(src[(size_t) t * ld + c]);

			for (int r = 0; r < k; r++)
				dst[(size_t) it[r] * D + c] = v;
		}
	}
}

extern "C" void
kk_gather_tok_bf16(cudaStream_t s, uint16_t *dst, const float *src, int ld, const int *inv, int n, int k, int D)
{
	unsigned	blocks = n < 65535 ? n : 65535;

	if (n <= 0 || k <= 0 || D <= 0)
		return;
	if (D % 8 == 0 && ld % 4 == 0 && (((uintptr_t) src | (uintptr_t) dst) & 15) == 0)
	{
		int			D8 = D / 8,
					iters = (D8 + 255) / 256,
					th = ((D8 + iters - 1) / iters + 31) / 32 * 32;	/* even work per thread */

		gather_tok_bf16_vec_kernel<<<blocks, th, 0, s>>>(dst, src, ld, inv, n, k, D);
	}
	else
		gather_tok_bf16_kernel<<<blocks, 256, 0, s>>>(dst, src, ld, inv, n, k, D);
}

/* ------------------------------------------------------------------ prefill: padded grouping on the device */

/*
 * KL_CUDA_MOE_PREFILL=4: variant 3's padded size-class layout
 * (cuda_moe_prefill.c, moe_classes) computed on the device, so that the
 * host needs only the counts (a small read-back it waits for while the
 * gather and the shared expert run) instead of downloading every choice.
 * Three launches over chunks of KK_PAD_TOK tokens:
 *   pad_count   block c: cnt[c][e] = the pairs of chunk c with expert e
 *   pad_layout  one block: each expert's total, its slot (pad_slot_rows),
 *               its place among the used experts in (slot size, id) order,
 *               base[e] = the slots before it; cnt[c][e] becomes the
 *               expert's first padded row for chunk c (base + the pairs of
 *               the chunks before); summary for the host
 *   pad_inv     block c: inv[i] of each pair of the chunk, stable: a
 *               thread per expert walks the chunk's pairs in order
 * The result equals the host's stable grouping (cuda_moe_host_group with
 * pad): pair i of expert e goes to base[e] + (pairs of e before i).
 * A thread per expert reading the chunk's choices from shared memory (all
 * threads read the same word: a broadcast) keeps the order without atomics.
 */
#define KK_PAD_TOK 128

/* variant 3's slot of an expert with c > 0 rows (cuda_moe_prefill.c, slot_rows: the same rule) */
__device__ __forceinline__ int
pad_slot_rows(int c)
{
	int			s64 = (c + 63) / 64 * 64,
				s128 = (c + 127) / 128 * 128;

	return (s128 - c) * 100 < 15 * c ? s128 : s64;
}

/*
 * The chunk's choices into shared memory (16-byte aligned: the dynamic
 * shared memory's start), padded with -1 to a multiple of 4 so that the
 * scans read four choices a load; returns the padded count.
 */
__device__ __forceinline__ int
pad_load_chunk(int *s_sel, const int *__restrict__ sel, int n, int k)
{
	int			t0 = blockIdx.x * KK_PAD_TOK,
				nt = n - t0 < KK_PAD_TOK ? n - t0 : KK_PAD_TOK,
				np = nt * k,
				np4 = (np + 3) & ~3;
	const int  *src = sel + (size_t) t0 * k;

	for (int i = threadIdx.x; i < np4; i += blockDim.x)
		s_sel[i] = i < np ? src[i] : -1;
	__syncthreads();
	return np4;
}

__global__ void
moe_pad_count_kernel(int n, int E, int k, const int *__restrict__ sel, int *cnt)
{
	extern __shared__ int4 s_sel4[];
	int			np4 = pad_load_chunk((int *) s_sel4, sel, n, k);

	for (int e = threadIdx.x; e < E; e += blockDim.x)
	{
		int			c = 0;

#pragma unroll 4
		for (int i = 0; i < np4 / 4; i++)
		{
			int4		v = s_sel4[i];

			c += (v.x == e) + (v.y == e) + (v.z == e) + (v.w == e);
		}
		cnt[(size_t) blockIdx.x * E + e] = c;
	}
}

/*
 * One block of 1024 threads, E <= 1024; thread e owns expert e.  summary:
 * [0, E) the counts, [E, 2E) base (-1: unused), [2E] the padded rows, [2E +
 * 1] the pairs counted (less than n k: an expert id out of range), [2E + 2]
 * 1 when the padded rows exceed cap (then no base is added: every inv stays
 * below n k, inside the buffers, and the host fails the op).
 */
__global__ void __launch_bounds__(1024)
moe_pad_layout_kernel(int nchunks, int E, int cap, int *cnt, int *summary)
{
	__shared__ int s_slot[1024];
	__shared__ int s_sum[2];
	int			e = threadIdx.x,
				total = 0,
				slot = 0,
				base = 0;

	if (e == 0)
		s_sum[0] = s_sum[1] = 0;
	if (e < E)
	{
#pragma unroll 8
		for (int c = 0; c < nchunks; c++)
		{
			int			v = cnt[(size_t) c * E + e];

			cnt[(size_t) c * E + e] = total;
			total += v;
		}
		slot = total > 0 ? pad_slot_rows(total) : 0;
	}
	s_slot[e] = slot;
	__syncthreads();
	/* the slots before e's in (slot size, id) order: base */
	if (slot > 0)
		for (int j = 0; j < E; j++)
		{
			int			sj = s_slot[j];

			if (sj > 0 && (sj < slot || (sj == slot && j < e)))
				base += sj;
		}
	if (e < E)
	{
		atomicAdd(&s_sum[0], slot);
		atomicAdd(&s_sum[1], total);
	}
	__syncthreads();
	if (e < E)
	{
		bool		fits = s_sum[0] <= cap;

		summary[e] = total;
		summary[E + e] = slot > 0 ? base : -1;
		if (slot > 0 && fits)
			for (int c = 0; c < nchunks; c++)
				cnt[(size_t) c * E + e] += base;
	}
	if (e == 0)
	{
		summary[2 * E] = s_sum[0];
		summary[2 * E + 1] = s_sum[1];
		summary[2 * E + 2] = s_sum[0] > cap;
	}
}

__global__ void
moe_pad_inv_kernel(int n, int E, int k, const int *__restrict__ sel, const int *__restrict__ pos, int *inv)
{
	extern __shared__ int4 s_sel4[];
	const int  *s_sel = (const int *) s_sel4;
	int			np4 = pad_load_chunk((int *) s_sel4, sel, n, k),
				t0 = blockIdx.x * KK_PAD_TOK,
				np = (n - t0 < KK_PAD_TOK ? n - t0 : KK_PAD_TOK) * k;
	int		   *out = inv + (size_t) t0 * k;

	/* (the -1 padding never matches: every write lands below np) */
	for (int e = threadIdx.x; e < E; e += blockDim.x)
	{
		int			p = pos[(size_t) blockIdx.x * E + e];

		for (int i = 0; i < np4 / 4; i++)
		{
			int4		v = s_sel4[i];

			if (v.x == e)
				out[4 * i] = p++;
			if (v.y == e)
				out[4 * i + 1] = p++;
			if (v.z == e)
				out[4 * i + 2] = p++;
			if (v.w == e)
				out[4 * i + 3] = p++;
		}
	}
	/* an expert id out of range (the host fails the op): a row inside the buffers */
	for (int i = threadIdx.x; i < np; i += blockDim.x)
		if (s_sel[i] < 0 || s_sel[i] >= E)
			out[i] = 0;
}

extern "C" size_t
kk_moe_pad_group_ints(int n, int E)
{
	return (size_t) ((n + KK_PAD_TOK - 1) / KK_PAD_TOK) * E;
}

extern "C" int
kk_moe_pad_group(cudaStream_t s, int n, int E, int k, int cap, const int *sel, int *work, int *summary, int *inv)
{
	int			nchunks = (n + KK_PAD_TOK - 1) / KK_PAD_TOK,
				th = E >= 256 ? 256 : (E + 31) / 32 * 32;
	size_t		sm = sizeof(int) * (((size_t) KK_PAD_TOK * k + 3) & ~(size_t) 3);

	if (n <= 0 || E <= 0 || E > 1024 || k <= 0 || k > 64)
		return -1;
	moe_pad_count_kernel<<<nchunks, th, sm, s>>>(n, E, k, sel, work);
	moe_pad_layout_kernel<<<1, 1024, 0, s>>>(nchunks, E, cap, work, summary);
	moe_pad_inv_kernel<<<nchunks, th, sm, s>>>(n, E, k, sel, work, inv);
	return 0;
}

/* h (bf16) = silu(g) * u, contiguous [n, F] */
__global__ void
swiglu_bf16_kernel(uint16_t *h, const float *g, const float *u, size_t n)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
		h[i] = f32_to_bf16(siluf_(g[i]) * u[i]);
}

extern "C" void
kk_swiglu_bf16(cudaStream_t s, uint16_t *h, const float *g, const float *u, size_t n)
{
	unsigned	blocks = ceil_div(n, 256);

	if (n > 0)
		swiglu_bf16_kernel<<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(h, g, u, n);
}

/*
 * h (bf16) = silu(g) * u from bf16 g and u (the grouped prefill products'
 * bf16 results), contiguous [n]: eight elements a thread from 16-byte loads
 * (the buffers are whole cuda_buf allocations, so aligned), the tail of n
 * not a multiple of 8 element by element.  The same float formula as
 * kk_swiglu, rounded to nearest even once.
 */
__global__ void
swiglu_bf16_bf16_kernel(uint16_t *h, const uint16_t *g, const uint16_t *u, size_t n)
{
	size_t		n8 = n / 8,
				stride = (size_t) gridDim.x * blockDim.x;

	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n8; i += stride)
	{
		uint4		gv = ((const uint4 *) g)[i],
					uv = ((const uint4 *) u)[i],
					hv;
		const uint16_t *gp = (const uint16_t *) &gv,
				   *up = (const uint16_t *) &uv;
		uint16_t   *hp = (uint16_t *) &hv;

#pragma unroll
		for (int j = 0; j < 8; j++)
			hp[j] = f32_to_bf16(siluf_(bf16_to_f32(gp[j])) * bf16_to_f32(up[j]));
		((uint4 *) h)[i] = hv;
	}
	for (size_t i = n8 * 8 + blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += stride)
		h[i] = f32_to_bf16(siluf_(bf16_to_f32(g[i])) * bf16_to_f32(u[i]));
}

extern "C" void
kk_swiglu_bf16_bf16(cudaStream_t s, uint16_t *h, const uint16_t *g, const uint16_t *u, size_t n)
{
	unsigned	blocks = ceil_div(n / 8 > 0 ? n / 8 : 1, 256);

	if (n > 0)
		swiglu_bf16_bf16_kernel<<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(h, g, u, n);
}

/* ------------------------------------------------------------------ decode: fused kernels */

/*
 * Route the n tokens (warp w takes tokens w, w + RW, ... for the RW routing
 * warps) by exactly moe_route_kernel's rule, then group the pairs as
 * moe_group_kernel does, in one block of 1024 threads.  Lane j of a warp
 * holds experts j, j + 32, ...; k <= 32, E <= 1024.  The block first copies
 * all router logits and the bias to shared memory in one round trip (read
 * from global memory lane by lane they cost one round trip per 32 experts).
 * Shared: logits [n E] (becoming the scores s), bias [E], per routing warp
 * choice[E], gscore[G], keep[G]; then the choices [n k].
 * (A softmax router sums its exponentials in another order than
 * moe_route_kernel: the same within rounding.)
 */
__global__ void __launch_bounds__(1024)
moe_route_group_kernel(int n, int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w, float scaling,
					   const float *__restrict__ logits, const float *__restrict__ bias, int rw, int *sel,
					   float *wts, int shared_rows, int P, int *start, int *xrow, int *inv, int *active)
{
	extern __shared__ float sh[];
	int			tid = threadIdx.x,
				lane = tid & 31,
				w = tid >> 5;
	int			per_warp = E + 2 * G;
	float	   *slg = sh,
			   *sbias = slg + (size_t) n * E;
	int		   *ssel = (int *) (sbias + E + (size_t) rw * per_warp);

	kk_dep_wait();
	kk_dep_launch();
	for (int i = tid; i < n * E; i += blockDim.x)
		slg[i] = logits[i];
	for (int i = tid; i < E; i += blockDim.x)
		sbias[i] = bias[i];
	__syncthreads();
	if (w < rw)
	{
		float	   *choice = sbias + E + (size_t) w * per_warp,
				   *gscore = choice + E;
		int		   *keep = (int *) (gscore + G);

		for (int t = w; t < n; t += rw)
		{
			const float *lg = slg + (size_t) t * E;
			float	   *s = slg + (size_t) t * E;	/* scores replace the logits */
			const float *bias_ = sbias;
			uint32_t	taken = 0;
			float		wr = 0;

			if (use_softmax)
			{
				float		mx = -INFINITY,
							z = 0;

				for (int e = lane; e < E; e += 32)
					mx = fmaxf(mx, lg[e]);
				mx = warp_max(mx);
				for (int e = lane; e < E; e += 32)
					z += expf(lg[e] - mx);
				z = warp_sum(z);
				for (int e = lane; e < E; e += 32)
					s[e] = expf(lg[e] - mx) / z;
			}
			else
				for (int e = lane; e < E; e += 32)
					s[e] = 1.0f / (1.0f + expf(-lg[e]));
			for (int e = lane; e < E; e += 32)
				choice[e] = s[e] + bias_[e];
			__syncwarp();

			if (G > 1 && Tg < G)
			{
				int			pg = E / G;

				for (int g = lane; g < G; g += 32)
				{
					gscore[g] = group_score(choice, g, pg);
					keep[g] = 0;
				}
				__syncwarp();
				if (lane == 0)
					keep_top_groups(gscore, keep, G, Tg);
				__syncwarp();
				for (int e = lane; e < E; e += 32)
					if (!keep[e / pg])
						choice[e] = 0.0f;
				__syncwarp();
			}

			/* top k: a warp-wide argmax per pick */
			for (int r = 0; r < k; r++)
			{
				float		bv = -INFINITY;
				int			bi = -1;

				for (int j = 0, e = lane; e < E; j++, e += 32)
					if (!((taken >> j) & 1u) && better(choice[e], e, bv, bi))
					{
						bv = choice[e];
						bi = e;
					}
#pragma unroll
				for (int o = 16; o > 0; o >>= 1)
				{
					float		ov = __shfl_xor_sync(0xffffffffu, bv, o);
					int			oi = __shfl_xor_sync(0xffffffffu, bi, o);

					if (oi >= 0 && better(ov, oi, bv, bi))
					{
						bv = ov;
						bi = oi;
					}
				}
				if (lane == (bi & 31))
					taken |= 1u << (bi >> 5);
				if (lane == r)
				{
					ssel[t * k + r] = bi;
					wr = bias_in_w ? s[bi] + bias_[bi] : s[bi];
				}
			}
			/* weights: summed in slot order, as moe_route_kernel */
			slot_weights_warp(wr, k, renorm, scaling, wts + (size_t) t * k, lane);
			if (lane < k)
				sel[(size_t) t * k + lane] = ssel[t * k + lane];
			__syncwarp();
		}
	}
	__syncthreads();
	group_pairs(n * k, E, k, shared_rows, P, ssel, start, xrow, inv, active);
}

extern "C" int
kk_moe_route_group(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w,
				   float scaling, const float *logits, const float *bias, int *sel, float *wts, int shared_rows,
				   int P, int *start, int *xrow, int *inv, int *active)
{
	size_t		per_warp = sizeof(float) * ((size_t) E + 2 * (size_t) G);
	size_t		fixed = sizeof(float) * ((size_t) n * E + E) + sizeof(int) * (size_t) n * k;
	int			rw;
	size_t		sm;
	cudaError_t e;

	if (n <= 0)
		return 0;
	if (k > 32 || E > 1024 || E < 1 || G < 1 || n * k > 4096 || fixed + per_warp > 200 * 1024)
		return -1;
	rw = (int) ((200 * 1024 - fixed) / per_warp);
	rw = rw > 32 ? 32 : rw > n ? n : rw;
	sm = fixed + per_warp * rw;
	if ((e = cudaFuncSetAttribute(moe_route_group_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sm)) != cudaSuccess)
		return (int) e;
	kk_launch(moe_route_group_kernel, dim3(1), dim3(1024), sm, s, n, E, k, G, Tg, use_softmax, renorm, bias_in_w,
			  scaling, logits, bias, rw, sel, wts, shared_rows, P, start, xrow, inv, active);
	return 0;
}

/* ------------------------------------------------------------------ decode: routing in warps */

/*
 * moe_route_group_kernel's outputs, bit for bit, without its block of 1024
 * threads, its 76 KB of shared memory and ten rounds of block-wide scans
 * (10.9 us a layer at batch 1, for a few hundred numbers):
 *   routing   one warp per token (warp w takes tokens w, w + nw, ...); lane j
 *             keeps experts j + 32 i (i < ROUTE_NPL) in registers as
 *             order-preserving integer keys, and each of the k picks is two
 *             warp reductions (redux.sync): the largest key, then the lowest
 *             expert id among the lanes whose best has that key — the same
 *             (value, then lower id) order as better(); only the lane that
 *             lost its expert rescans its own ROUTE_NPL
 *   grouping  warp 0 alone: the stable rank of each pair among the pairs of
 *             its expert from __match_any_sync over 32 pairs at a time; the
 *             counts and work items per expert from one warp scan, each lane
 *             owning a contiguous run of experts so that its exclusive prefix
 *             is their first start and first work item
 * Scores, choices, group scores and the weight sums are the same float
 * operations in the same order as moe_route_group_kernel (the softmax too).
 * Router logits with NaN have no order; there the choice may differ from
 * moe_route_group_kernel's (both stay in bounds).
 */
#define ROUTE_NPL 8				/* experts per lane: E <= 32 * ROUTE_NPL */

/* float -> unsigned with the same order (-0 and +0 one key, as == sees them) */
__device__ __forceinline__ unsigned
order_key(float v)
{
	unsigned	u = v == 0.0f ? 0u : __float_as_uint(v);

	return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* the lane's best untaken expert: largest key, then lowest slot (= lowest
 * id); its slot, key and weight */
__device__ __forceinline__ void
lane_best(const unsigned *key, const float *wv, uint32_t avail, unsigned *bk, int *bs, float *bw)
{
	*bs = -1;
	*bk = 0;
	*bw = 0;
#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
		if (((avail >> i) & 1u) && (*bs < 0 || key[i] > *bk))
		{
			*bk = key[i];
			*bs = i;
			*bw = wv[i];
		}
}

/*
 * A softmax router's max and denominator for one token in one warp, lane j
 * holding the logits of experts j + 32 i (-inf past E): the lane's terms in
 * order of i, then a butterfly.  route_token_warp and the rank kernel both
 * call it, so that their denominators are the same float operations.  No
 * conditions in the sum (a predicated add stayed unfused); past E,
 * expf(-inf) = 0 adds nothing.
 */
__device__ __forceinline__ void
softmax_max_sum_warp(const float *lg, float *mxp, float *zp)
{
	float		mx = -INFINITY,
				z = 0;

#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
		mx = fmaxf(mx, lg[i]);
	mx = warp_max(mx);
#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
		z += expf(lg[i] - mx);
	z = warp_sum(z);
	*mxp = mx;
	*zp = z;
}

/*
 * Route token t in one warp (moe_route_group_kernel's rule); write its
 * choices to sel and ssel, its weights to wts.  gs: this warp's scratch for
 * groups, E + 2G words.
 */
__device__ __forceinline__ void
route_token_warp(int t, int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w, float scaling,
				 const float *__restrict__ logits, const float *bz, float *gs, int *sel, float *wts, int *ssel)
{
	int			lane = threadIdx.x & 31;
	float		lg[ROUTE_NPL],
				s[ROUTE_NPL],
				c[ROUTE_NPL],
				wv[ROUTE_NPL];
	unsigned	key[ROUTE_NPL];
	uint32_t	avail = 0;		/* bit i: expert lane + 32 i exists and is not taken */
	float		wr = 0;
	int			mine = 0;		/* lane r < k: the r-th choice */

#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
	{
		int			e = lane + 32 * i;

		/* -inf past E: adds nothing to the softmax (see below) */
		lg[i] = e < E ? logits[(size_t) t * E + e] : -INFINITY;
		if (e < E)
			avail |= 1u << i;
	}
	if (use_softmax)
	{
		float		mx,
					z;

		/*
		 * moe_route_group_kernel's loops compute expf(lg - mx) twice (its
		 * scores overwrite the logits), and the compiler fuses the first
		 * expf's last product into z += (an FMA).  Here the two would be one
		 * common subexpression with two uses, left unfused, and the sums
		 * would differ in the last bit: the second expf's argument goes
		 * through an empty asm so that each stays alone, as there.
		 */
		softmax_max_sum_warp(lg, &mx, &z);
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
		{
			float		x = lg[i];

			asm volatile("" : "+f"(x));
			s[i] = expf(x - mx) / z;
		}
	}
	else
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			s[i] = 1.0f / (1.0f + expf(-lg[i]));
#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
	{
		c[i] = s[i] + bz[i];
		wv[i] = bias_in_w ? s[i] + bz[i] : s[i];
	}

	if (G > 1 && Tg < G)
	{
		float	   *choice = gs,
				   *gscore = gs + E;
		int		   *keep = (int *) (gscore + G);
		int			pg = E / G;

#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			if ((avail >> i) & 1u)
				choice[lane + 32 * i] = c[i];
		__syncwarp();
		for (int g = lane; g < G; g += 32)
		{
			gscore[g] = group_score(choice, g, pg);
			keep[g] = 0;
		}
		__syncwarp();
		if (lane == 0)
			keep_top_groups(gscore, keep, G, Tg);
		__syncwarp();
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			if (((avail >> i) & 1u) && !keep[(lane + 32 * i) / pg])
				c[i] = 0.0f;
		__syncwarp();			/* the scratch is the next token's */
	}

	/* top k: the warp's largest key, then its lowest expert id */
	{
		unsigned	bk;
		int			bs;
		float		bw;

#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			key[i] = order_key(c[i]);
		lane_best(key, wv, avail, &bk, &bs, &bw);
		for (int r = 0; r < k; r++)
		{
			unsigned	top = __reduce_max_sync(0xffffffffu, bs >= 0 ? bk : 0u);
			unsigned	cand = bs >= 0 && bk == top ? (unsigned) (lane + 32 * bs) : 0xffffffffu;
			int			bi = (int) __reduce_min_sync(0xffffffffu, cand);
			float		v;

			if (bi < 0 || bi >= E)	/* no expert left: k > E, not launched */
				bi = 0;
			/* the winner's lane holds it as its best (the reductions are uniform) */
			v = __shfl_sync(0xffffffffu, bw, bi & 31);
			if (lane == r)
			{
				mine = bi;
				wr = v;
			}
			if (lane == (bi & 31))
			{
				avail &= ~(1u << (bi >> 5));
				lane_best(key, wv, avail, &bk, &bs, &bw);
			}
		}
	}
	/* weights: summed in slot order, as moe_route_group_kernel */
	slot_weights_warp(wr, k, renorm, scaling, wts + (size_t) t * k, lane);
	if (lane < k)
	{
		sel[(size_t) t * k + lane] = mine;
		ssel[t * k + lane] = mine;
	}
}

/* inclusive prefix sums of a and b over the warp's lanes (every lane calls it):
 * the grouping's counts and work items, in the warp and the rank kernel */
__device__ __forceinline__ void
warp_scan_pair(int &a, int &b, int lane)
{
#pragma unroll
	for (int o = 1; o < 32; o <<= 1)
	{
		int			pa = __shfl_up_sync(0xffffffffu, a, o),
					pb = __shfl_up_sync(0xffffffffu, b, o);

		if (lane >= o)
		{
			a += pa;
			b += pb;
		}
	}
}

/*
 * Warp 0 groups the nk pairs of ssel as group_pairs does (same start,
 * xrow, inv, active).  cnt: E zeroed words; srank: nk words.
 */
__device__ __forceinline__ void
group_pairs_warp(int nk, int E, int k, int shared_rows, int P, const int *ssel, int *cnt, int *srank, int *start,
				 int *xrow, int *inv, int *active)
{
	int			lane = threadIdx.x & 31;
	unsigned	below = (1u << lane) - 1u;
	int			per = (E + 31) / 32,
				lo = lane * per,
				hi = lo + per < E ? lo + per : E;
	int			tc = 0,
				ti = 0,
				ic,
				ii,
				tot_c,
				tot_i;

	/* stable ranks, 32 pairs at a time; cnt[e]: pairs of e so far */
	for (int c0 = 0; c0 < nk; c0 += 32)
	{
		int			i = c0 + lane;
		int			e = i < nk ? ssel[i] : -1;
		unsigned	same = __match_any_sync(0xffffffffu, e);
		int			before = e >= 0 ? cnt[e] : 0;

		__syncwarp();
		if (e >= 0)
		{
			srank[i] = before + __popc(same & below);
			if ((same & below) == 0)	/* the first of its expert here */
				cnt[e] = before + __popc(same);
		}
		__syncwarp();
	}
	/* lane: experts [lo, hi); exclusive prefixes of counts and work items */
	for (int e = lo; e < hi; e++)
	{
		int			c = cnt[e];

		tc += c;
		ti += (c + P - 1) / P;
	}
	ic = tc;
	ii = ti;
	warp_scan_pair(ic, ii, lane);
	tot_c = __shfl_sync(0xffffffffu, ic, 31);
	tot_i = __shfl_sync(0xffffffffu, ii, 31);
	{
		int			run = ic - tc,
					item = ii - ti;

		for (int e = lo; e < hi; e++)
		{
			int			c = cnt[e],
						items = (c + P - 1) / P;

			start[e] = run;
			cnt[e] = run;		/* now the expert's first position */
			for (int j = 0; j < items; j++)
				active[1 + item + j] = e * 64 + j;
			run += c;
			item += items;
		}
	}
	group_tail(E, nk, tot_c, tot_i, shared_rows, P, start, xrow, active, lane, 32);
	__syncwarp();
	for (int i = lane; i < nk; i += 32)
	{
		int			p = cnt[ssel[i]] + srank[i];

		xrow[p] = i / k;
		inv[i] = p;
	}
}

/*
 * blockDim.x = 32 nw.  Shared (words): ssel [n k], srank [n k], cnt [E], and
 * with groups nw scratch areas of E + 2G.
 */
__global__ void __launch_bounds__(1024)
moe_route_group_warp_kernel(int n, int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w,
							float scaling, const float *__restrict__ logits, const float *__restrict__ bias, int *sel,
							float *wts, int shared_rows, int P, int *start, int *xrow, int *inv, int *active)
{
	extern __shared__ int shw[];
	int			nk = n * k;
	int		   *ssel = shw,
			   *srank = ssel + nk,
			   *cnt = srank + nk;
	int			tid = threadIdx.x,
				lane = tid & 31,
				w = tid >> 5,
				nw = blockDim.x >> 5;
	float	   *gs = (float *) (cnt + E) + (size_t) w * (E + 2 * G);
	float		bz[ROUTE_NPL];

	/* the bias is a weight and the counts are ours: both before the wait */
#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
		bz[i] = lane + 32 * i < E ? bias[lane + 32 * i] : 0.0f;
	for (int e = tid; e < E; e += blockDim.x)
		cnt[e] = 0;
	kk_dep_wait();
	kk_dep_launch();
	for (int t = w; t < n; t += nw)
		route_token_warp(t, E, k, G, Tg, use_softmax, renorm, bias_in_w, scaling, logits, bz, gs, sel, wts, ssel);
	__syncthreads();
	if (w == 0)
		group_pairs_warp(nk, E, k, shared_rows, P, ssel, cnt, srank, start, xrow, inv, active);
}

extern "C" int
kk_moe_route_group_warp(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
						int bias_in_w, float scaling, const float *logits, const float *bias, int *sel, float *wts,
						int shared_rows, int P, int *start, int *xrow, int *inv, int *active)
{
	size_t		fixed = sizeof(int) * (2 * (size_t) n * k + E);
	size_t		per_warp = G > 1 && Tg < G ? sizeof(float) * ((size_t) E + 2 * (size_t) G) : 0;
	size_t		limit = 48 * 1024;	/* no opt-in to more shared memory */
	int			nw;

	if (n <= 0)
		return 0;
	if (E < 1 || E > 32 * ROUTE_NPL || k < 1 || k > 32 || k > E || G < 1 || (per_warp && E % G != 0) || P < 1 ||
		fixed + per_warp > limit)
		return -1;
	nw = n < 32 ? n : 32;
	if (per_warp && (size_t) nw * per_warp > limit - fixed)
		nw = (int) ((limit - fixed) / per_warp);
	kk_launch(moe_route_group_warp_kernel, dim3(1), dim3(32 * nw), fixed + per_warp * nw, s, n, E, k, G, Tg,
			  use_softmax, renorm, bias_in_w, scaling, logits, bias, sel, wts, shared_rows, P, start, xrow, inv,
			  active);
	return 0;
}

/* ------------------------------------------------------------------ decode: routing by rank */

/*
 * moe_route_group_warp_kernel's outputs, bit for bit, without its dependent
 * chain of k warp-wide picks (7.5 us a layer at batch 1): a thread per
 * expert, a group of W = ceil(E / 32) warps per token, up to RANK_GROUPS
 * tokens at a time.
 *   scores    each thread its own expert's, the same float operations as
 *             route_token_warp (a softmax's max and denominator from the
 *             group's first warp through softmax_max_sum_warp, the same lane
 *             layout as there)
 *   choice    the sequential pick takes experts in the order of (key
 *             order_key(choice) larger, then id lower), a strict total
 *             order, so the r-th pick is the expert that exactly r others
 *             precede: its rank.  Only candidates need ranking: with k <= W,
 *             the smallest of the W warp maxima (L) has W >= k experts at or
 *             above it, so an expert below L has rank >= k, and everything
 *             preceding a candidate is a candidate too.  Candidates (usually
 *             a few more than k; all of them when the keys tie) go to a
 *             shared list and each counts the ones that precede it.
 *   weights   slot_weights_warp on the picks in slot order, as there
 *   grouping  a thread per expert: its pairs (one per token that chose it,
 *             in token order: the stable order) and work items, positions
 *             from one block scan of the counts
 * Only without group-limited routing (G == 1 or Tg >= G), E <= 256 (the
 * softmax layout), k <= min(E, 32), n <= RANK_MAXN; the launcher says -1
 * otherwise.
 */
#define RANK_MAXN 8				/* tokens a launch */
#define RANK_GROUPS 4			/* tokens routed at a time (4 x 256 threads) */
#define RANK_MAXE (32 * ROUTE_NPL)

/*
 * KL_CUDA_ROUTE_RANK1 (kk_set_route_rank1): steps of one token take ONE, the
 * same kernel with a grouping that needs no block scan: with one token each
 * chosen expert has exactly one pair and one work item (P >= 1), so an
 * expert's first position and first item are both the number of chosen
 * experts below it, read from the warps' ballots of the choices (made before
 * the ranking's barrier) instead of a scan of per-expert counts behind a
 * barrier of its own: one block-wide barrier, a warp scan and the slots'
 * table fewer on the path of a layer's routing at batch 1 (26 launches a
 * step).  The same outputs bit for bit (the same choices, weights and
 * positions; kk_moe_route_group_rank's check).  Default on; 0: the grouping
 * by counts at every n.
 */
int			kk_route_rank1 = 1;

extern "C" int
kk_set_route_rank1(int on)
{
	int			was = kk_route_rank1;

	kk_route_rank1 = on;
	return was;
}

template <bool ONE>
__global__ void __launch_bounds__(1024)
moe_route_group_rank_kernel(int n, int E, int k, int use_softmax, int renorm, int bias_in_w, float scaling,
							const float *__restrict__ logits, const float *__restrict__ bias, int *sel, float *wts,
							int shared_rows, int P, int *start, int *xrow, int *inv, int *active)
{
	__shared__ float slg[RANK_GROUPS][RANK_MAXE],
				smz[RANK_GROUPS][2],
				pickw[RANK_MAXN][32];
	__shared__ unsigned ckey[RANK_GROUPS][RANK_MAXE],
				wtop[RANK_GROUPS][ROUTE_NPL],
				wmask[ROUTE_NPL];	/* ONE: warp w's ballot of its chosen experts */
	__shared__ int cid[RANK_GROUPS][RANK_MAXE],
				ncand[RANK_GROUPS],
				pick[RANK_MAXN][32],
				wsum[2][ROUTE_NPL];
	__shared__ signed char slotof[RANK_MAXN][RANK_MAXE];	/* token's slot of the expert, -1 none */
	int			W = (E + 31) >> 5,
				tpt = W << 5,
				ng = blockDim.x / tpt,
				tid = threadIdx.x,
				g = tid / tpt,
				e = tid - g * tpt,	/* this thread's expert */
				lane = tid & 31,
				wl = e >> 5,
				myrank = -1;	/* ONE: this thread's expert's slot, -1 none */
	float		bz = e < E ? bias[e] : 0.0f;	/* a weight: before the wait */

	if constexpr (!ONE)
		for (int i = tid; i < n * RANK_MAXE; i += blockDim.x)
			slotof[i / RANK_MAXE][i % RANK_MAXE] = -1;
	kk_dep_wait();
	kk_dep_launch();
	/* every group runs every round (block barriers); t >= n only idles */
	for (int t0 = 0; t0 < (ONE ? 1 : n); t0 += ng)
	{
		int			t = t0 + g;
		bool		valid = t < n && e < E;
		float		lg = valid ? logits[(size_t) t * E + e] : -INFINITY,
					sc,
					c,
					wv;
		unsigned	key,
					L = 0;

		if (use_softmax)
		{
			slg[g][e] = lg;
			__syncthreads();
			if (wl == 0)
			{
				float		l8[ROUTE_NPL],
							mx,
							z;

#pragma unroll
				for (int i = 0; i < ROUTE_NPL; i++)
					l8[i] = lane + 32 * i < E ? slg[g][lane + 32 * i] : -INFINITY;
				softmax_max_sum_warp(l8, &mx, &z);
				if (lane == 0)
				{
					smz[g][0] = mx;
					smz[g][1] = z;
				}
			}
			__syncthreads();
			{
				float		x = lg;

				/* as route_token_warp's second expf */
				asm volatile("" : "+f"(x));
				sc = expf(x - smz[g][0]) / smz[g][1];
			}
		}
		else
			sc = 1.0f / (1.0f + expf(-lg));
		c = sc + bz;
		wv = bias_in_w ? sc + bz : sc;
		key = order_key(c);
		/* warp maxima of the keys (keys are >= 0: the lanes past E add nothing) */
		{
			unsigned	m = __reduce_max_sync(0xffffffffu, valid ? key : 0u);

			if (lane == 0)
				wtop[g][wl] = m;
			if (e == 0)
				ncand[g] = 0;
		}
		__syncthreads();
		if (k <= W)
		{
			L = 0xffffffffu;
			for (int w = 0; w < W; w++)
				L = min(L, wtop[g][w]);
		}
		if (valid && key >= L)
		{
			int			p = atomicAdd(&ncand[g], 1);

			ckey[g][p] = key;
			cid[g][p] = e;
		}
		__syncthreads();
		if (valid && key >= L)
		{
			int			nc = ncand[g],
						rank = 0;

			for (int j = 0; j < nc; j++)
			{
				unsigned	kj = ckey[g][j];

				rank += kj > key || (kj == key && cid[g][j] < e);
			}
			if (rank < k)
			{
				pick[t][rank] = e;
				pickw[t][rank] = wv;
				if constexpr (ONE)
					myrank = rank;
				else
					slotof[t][e] = (signed char) rank;
			}
		}
		if constexpr (ONE)
		{
			unsigned	chosen = __ballot_sync(0xffffffffu, myrank >= 0);

			if (lane == 0)
				wmask[wl] = chosen;
		}
		__syncthreads();
		if (wl == 0 && t < n)
		{
			/* weights: summed in slot order, as route_token_warp */
			slot_weights_warp(lane < k ? pickw[t][lane] : 0.0f, k, renorm, scaling, wts + (size_t) t * k, lane);
			if (lane < k)
				sel[(size_t) t * k + lane] = pick[t][lane];
		}
	}
	if constexpr (ONE)
	{
		/* grouping, one token: an expert's first position and first item are
		 * the chosen experts below it (wmask is final: the barrier above) */
		int			below = 0,
					tot = 0;

		for (int w = 0; w < W; w++)
		{
			int			cw = __popc(wmask[w]);

			below += w < wl ? cw : 0;
			tot += cw;
		}
		below += __popc(wmask[wl] & ((1u << lane) - 1u));
		if (tid < E)
		{
			start[tid] = below;
			if (myrank >= 0)
			{
				xrow[below] = 0;
				inv[myrank] = below;
				active[1 + below] = tid * 64;
			}
		}
		group_tail(E, k, tot, tot, shared_rows, P, start, xrow, active, tid, blockDim.x);
	}
	else
	{
		/* grouping: threads 0 .. E-1, one expert each (slotof is final) */
		int			cnt = 0,
					items,
					ic,
					ii,
					tot_c = 0,
					tot_i = 0,
					before_c = 0,
					before_i = 0;

		if (tid < E)
			for (int t = 0; t < n; t++)
				cnt += slotof[t][tid] >= 0;
		items = (cnt + P - 1) / P;
		ic = cnt;
		ii = items;
		warp_scan_pair(ic, ii, lane);
		if (tid < tpt && lane == 31)
		{
			wsum[0][tid >> 5] = ic;
			wsum[1][tid >> 5] = ii;
		}
		__syncthreads();
		for (int w = 0; w < W; w++)
		{
			int			a = wsum[0][w],
						b = wsum[1][w];

			if (w < (tid >> 5))
			{
				before_c += a;
				before_i += b;
			}
			tot_c += a;
			tot_i += b;
		}
		if (tid < E)
		{
			int			pos = before_c + ic - cnt,
						item = before_i + ii - items;

			start[tid] = pos;
			for (int t = 0; t < n; t++)
			{
				int			r = slotof[t][tid];

				if (r >= 0)
				{
					xrow[pos] = t;
					inv[t * k + r] = pos;
					pos++;
				}
			}
			for (int j = 0; j < items; j++)
				active[1 + item + j] = tid * 64 + j;
		}
		group_tail(E, n * k, tot_c, tot_i, shared_rows, P, start, xrow, active, tid, blockDim.x);
	}
}

extern "C" int
kk_moe_route_group_rank(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
						int bias_in_w, float scaling, const float *logits, const float *bias, int *sel, float *wts,
						int shared_rows, int P, int *start, int *xrow, int *inv, int *active)
{
	int			tpt = (E + 31) / 32 * 32,
				ng;

	if (n <= 0)
		return 0;
	if (n > RANK_MAXN || E < 1 || E > RANK_MAXE || k < 1 || k > 32 || k > E || (G > 1 && Tg < G) || P < 1)
		return -1;
	ng = 1024 / tpt;
	if (ng > RANK_GROUPS)
		ng = RANK_GROUPS;
	if (ng > n)
		ng = n;
	kk_launch(n == 1 && kk_route_rank1 ? moe_route_group_rank_kernel<true> : moe_route_group_rank_kernel<false>,
			  dim3(1), dim3(ng * tpt), 0, s, n, E, k, use_softmax, renorm, bias_in_w, scaling, logits, bias, sel, wts,
			  shared_rows, P, start, xrow, inv, active);
	return 0;
}

/*
 * One block per token row: y = sum over slots of w * (expert output) (+
 * shared), exactly as moe_combine_kernel; then x += y and xn = w_norm * x /
 * rms(x), exactly as add_rmsnorm_kernel (same block size, same sums).
 */
template <typename YE>
__global__ void
moe_combine_add_rmsnorm_kernel(float *xn, float *x, int D, int k, const float *__restrict__ wts,
							   const int *__restrict__ inv, const YE *__restrict__ ye, const float *__restrict__ ys,
							   const float *__restrict__ w, float eps)
{
	__shared__ float red[32];
	size_t		t = blockIdx.x;
	float	   *xr = x + t * D;
	float	   *yr = xn + t * D;
	float		ss = 0;

	kk_dep_wait();
	kk_dep_launch();
	for (int c = threadIdx.x; c < D; c += blockDim.x)
	{
		float		acc = 0,
					v;

		for (int r = 0; r < k; r++)
			acc += wts[t * k + r] * ye_at(ye, (size_t) inv[t * k + r] * D + c);
		if (ys)
			acc += ys[t * D + c];
		v = xr[c] + acc;
		xr[c] = v;
		ss += v * v;
	}
	ss = block_sum(ss, red);
	{
		float		iv = 1.0f / sqrtf(ss / (float) D + eps);

		for (int c = threadIdx.x; c < D; c += blockDim.x)
			yr[c] = w[c] * (xr[c] * iv);
	}
}

extern "C" void
kk_moe_combine_add_rmsnorm(cudaStream_t s, float *xn, float *x, int n, int D, int k, const float *wts, const int *inv,
						   const float *ye, const float *ys, const float *w, float eps)
{
	if (kk_row_norm(s, 2, xn, D, x, D, NULL, w, n, D, eps, k, wts, inv, ye, ys) == 0)
		return;
	if (n > 0)
		kk_launch(moe_combine_add_rmsnorm_kernel<float>, dim3(n), dim3(D >= 1024 ? 256 : 128), 0, s, xn, x, D, k, wts,
				  inv, ye, ys, w, eps);
}

extern "C" void
kk_moe_combine16_add_rmsnorm(cudaStream_t s, float *xn, float *x, int n, int D, int k, const float *wts,
							 const int *inv, const uint16_t *ye16, const float *ys, const float *w, float eps)
{
	if (kk_row_norm_combine16(s, xn, x, w, n, D, eps, k, wts, inv, ye16, ys) == 0)
		return;
	if (n > 0)
		kk_launch(moe_combine_add_rmsnorm_kernel<uint16_t>, dim3(n), dim3(D >= 1024 ? 256 : 128), 0, s, xn, x, D, k,
				  wts, inv, ye16, ys, w, eps);
}
