/*
 * gemv_sweep.cu — decode GEMV variants on the model's shapes, timed side by
 * side with a read-only streaming kernel over the same bytes (the ceiling a
 * kernel of that size can reach), each as 20 launches captured in one CUDA
 * graph with programmatic dependent launch, as a decode step runs them.
 *
 * Built and run on the GPU machine by `bash bench/bench-cuda.sh gemv-sweep
 * [VARIANT [SHAPE]]` (substrings of the names below).  Prints one table.
 * "kk_gemv" is the library's kernel (the block-rows design), "warp a row" the
 * older one (kk_set_gemv_rows(0)), "blockrows" the library's block-rows
 * kernel in other shapes (rows a block, threads); "upfront" the experiment
 * that lost to it (bench/notes-cuda.md, 2026-11-30; the L2-prefetch variants
 * of that day's table: raw/2026-11-30-gemv-variants.md).  "mma tile" and
 * "mma slab" are the tensor-core GEMVs of 8 rows (kernels/expert_mma.cu:
 * gemv_mma_kernel, KL_CUDA_GEMV_MMA_SLAB=0, and gemv_slab_kernel, the
 * default).  Every variant's output is checked against kk_gemv's (the
 * tensor-core ones round the activations to bf16: ~1e-3 apart).
 *
 * A second table (variant or shape argument "q", or all by default): the
 * quantized-weight kernels of kernels/gemv_q.cu (FP8, int8, int4: kk_gemv_q
 * and kk_expert_gemv_q) at batch 1 and 4 on the 48B shapes, each against
 * a plain read of the same bytes (the quantized objects: data and scales),
 * the plain products checked against a one-thread-an-output kernel; at
 * batch 1 also with gemv_q's early form off ("not early": KL_CUDA_ROWS_EARLY=0).
 * A third table: the products of FP8 / int4 weights on the tensor cores (kernels/mma_q.cu; see
 * quant_sweep), alone with `gemv-sweep mma_q`.
 * A fourth: the dense FP8 product batches of a 48B decode step through
 * gemv_q (at 1 and 2 rows also without its early form), the dense kernel and
 * the slab kernel (dense_fp8_table), alone with `gemv-sweep dense_fp8` (not
 * in the default run).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* the library's kernels, and their device helpers for the variants below */
#include "../kernels/gemv.cu"
#include "../kernels/expert_mma.cu"
#include "../kernels/gemv_q.cu"
#include "../kernels/mma_q.cu"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
	fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(1); } } while (0)

/* ---------------------------------------------------------------- ceiling */

__global__ void __launch_bounds__(256)
stream_read(const uint4 *__restrict__ p, size_t n, unsigned *out)
{
	unsigned	acc = 0;
	size_t		i = (size_t) blockIdx.x * blockDim.x + threadIdx.x,
				stride = (size_t) gridDim.x * blockDim.x;

	kk_dep_wait();
	kk_dep_launch();
	for (; i + 3 * stride < n; i += 4 * stride)
	{
		uint4		a = __ldg(p + i),
					b = __ldg(p + i + stride),
					c = __ldg(p + i + 2 * stride),
					d = __ldg(p + i + 3 * stride);

		acc ^= a.x ^ a.w ^ b.y ^ b.z ^ c.x ^ c.w ^ d.y ^ d.z;
	}
	for (; i < n; i += stride)
		acc ^= __ldg(p + i).x;
	if (acc == 0x12345678u)
		out[0] = acc;
}

/* ----------------------------------------------------- all loads up front */

/*
 * One warp per weight row (or RW consecutive rows): every lane issues all of
 * its 16-byte pieces of the row group (up to PPL per row) before it uses
 * any, so a warp waits for memory once per PPL pieces instead of per four.
 * XS: the input rows staged in shared memory (else read through L1).
 */
template <int NR, int PPL, int RW, bool XS>
__global__ void __launch_bounds__(256)
gemv_upfront(float *__restrict__ y, int ldy, const float *__restrict__ x, int ldx,
			 const uint16_t *__restrict__ W, int rows, int cols)
{
	extern __shared__ float xs_[];
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31;
	int			row0 = (blockIdx.x * 8 + warp) * RW;
	int			nch = cols >> 3;
	float		acc[RW][NR];

	if (row0 < rows)
		for (int w = 0; w < RW; w++)
			kk_prefetch_l2(W + (size_t) (row0 + w) * cols, (size_t) cols * 2, lane);
	kk_dep_wait();
	kk_dep_launch();
	if (XS)
	{
		for (int r = 0; r < NR; r++)
			for (int c = threadIdx.x * 4; c < cols; c += 1024)
				*(float4 *) (xs_ + r * cols + c) = *(const float4 *) (x + (size_t) r * ldx + c);
		__syncthreads();
	}
	if (row0 >= rows)
		return;
#pragma unroll
	for (int w = 0; w < RW; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
			acc[w][r] = 0;
	for (int base = 0; base < nch; base += PPL * 32)
	{
		uint4		raw[RW][PPL];

#pragma unroll
		for (int w = 0; w < RW; w++)
#pragma unroll
			for (int u = 0; u < PPL; u++)
			{
				int			ch = base + lane + 32 * u;

				raw[w][u] = ch < nch ? __ldg((const uint4 *) (W + (size_t) (row0 + w) * cols) + ch)
					: make_uint4(0, 0, 0, 0);
			}
#pragma unroll
		for (int u = 0; u < PPL; u++)
		{
			int			ch = base + lane + 32 * u;

			if (ch >= nch)
				break;
#pragma unroll
			for (int r = 0; r < NR; r++)
			{
				float4		a,
							b;

				if (XS)
				{
					a = *(const float4 *) (xs_ + r * cols + 8 * ch);
					b = *(const float4 *) (xs_ + r * cols + 8 * ch + 4);
				}
				else
				{
					a = __ldg((const float4 *) (x + (size_t) r * ldx) + 2 * ch);
					b = __ldg((const float4 *) (x + (size_t) r * ldx) + 2 * ch + 1);
				}
#pragma unroll
				for (int w = 0; w < RW; w++)
				{
					float		f[8];

					unpack8_bf16(raw[w][u], f);
					acc[w][r] = fma8_acc(f, a, b, acc[w][r]);
				}
			}
		}
	}
#pragma unroll
	for (int w = 0; w < RW; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
		{
			float		s = warp_sum(acc[w][r]);

			if (lane == 0 && row0 + w < rows)
				y[(size_t) r * ldy + row0 + w] = s;
		}
}

/* ------------------------------------------------------------------ harness */

typedef struct
{
	const char *name;
	int			rows,
				cols;
}			shape_t;

static const shape_t shapes[] = {
	{"kda_qkv 3x4096x2304", 12288, 2304},
	{"o_proj 2304x4096", 2304, 4096},
	{"router 256x2304", 256, 2304},
	{"shared_dn 2304x1024", 2304, 1024},
	{"experts_gu 16x1024x2304", 16384, 2304},
	{"experts_dn 8x2304x1024", 18432, 1024},
	{"lm_head 163840x2304", 163840, 2304},
	{"square 8192x8192", 8192, 8192},
};

typedef void (*launch_fn) (cudaStream_t, float *, const float *, const uint16_t *, int, int, int);

template <int NR, int PPL, int RW, bool XS>
static void
run_upfront(cudaStream_t s, float *y, const float *x, const uint16_t *W, int rows, int cols, int nr)
{
	int			blocks = (rows + 8 * RW - 1) / (8 * RW);
	size_t		smem = XS ? (size_t) NR * cols * 4 : 0;

	if (smem > 100000)
		return;
	if (XS)
		cudaFuncSetAttribute(gemv_upfront<NR, PPL, RW, XS>, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000);
	kk_launch(gemv_upfront<NR, PPL, RW, XS>, dim3(blocks), dim3(256), smem, s, y, rows, x, cols, W, rows, cols);
}

template <int NR, int RB, int BT>
static void
run_blockrows(cudaStream_t s, float *y, const float *x, const uint16_t *W, int rows, int cols, int nr)
{
	/* the waiting form (EARLY false): the shapes as they were swept */
	kk_launch(gemv_rows_kernel<NR, RB, BT, false>, dim3((rows + RB - 1) / RB), dim3(BT), 0, s, y, rows, x, cols, W,
			  rows, cols);
}

static void
run_current(cudaStream_t s, float *y, const float *x, const uint16_t *W, int rows, int cols, int nr)
{
	kk_gemv(s, y, rows, x, cols, nr, W, 1, rows, cols);
}

static void
run_warp_row(cudaStream_t s, float *y, const float *x, const uint16_t *W, int rows, int cols, int nr)
{
	kk_set_gemv_rows(0);
	kk_gemv(s, y, rows, x, cols, nr, W, 1, rows, cols);
	kk_set_gemv_rows(1);
}

/* the tensor-core GEMV: slab = gemv_slab_kernel where the library takes it, else gemv_mma_kernel */
template <int SLAB>
static void
run_mma(cudaStream_t s, float *y, const float *x, const uint16_t *W, int rows, int cols, int nr)
{
	kk_set_gemv_mma_slab(SLAB);
	kk_gemv_mma(s, y, rows, x, cols, nr, W, rows, cols);
	kk_set_gemv_mma_slab(1);
}

static unsigned *g_sink;

static void
run_stream(cudaStream_t s, float *y, const float *x, const uint16_t *W, int rows, int cols, int nr)
{
	size_t		n = (size_t) rows * cols / 8;

	kk_launch(stream_read, dim3(132 * 8), dim3(256), 0, s, (const uint4 *) W, n, g_sink);
}

/* ------------------------------------------------------------------ quantized weights (gemv_q.cu) */

/* a valid random object (kernels.h layout) of fmt/group at p: FP8 bytes without the NaN codes, scales ~1/64 */
__global__ void
q_sweep_fill(uint8_t *p, int fmt, int group, int rows, int cols, uint32_t seed)
{
	size_t		data = (size_t) rows * kk_q_row_bytes(fmt, cols),
				so = kk_q_scale_offset(rows, fmt, cols),
				ns = (size_t) rows * ((cols + group - 1) / group);

	for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < data; i += (size_t) gridDim.x * blockDim.x)
	{
		uint32_t	h = (uint32_t) i * 2654435761u ^ seed;

		h ^= h >> 15;
		h *= 2246822519u;
		h ^= h >> 13;
		/* FP8: exponent at most 8 (|w| <= 3.75), never 0x7f / 0xff */
		p[i] = fmt == KK_WF_FP8 ? (uint8_t) ((h & 0x80u) | ((h >> 8) % 0x40u)) : (uint8_t) h;
	}
	for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < ns; i += (size_t) gridDim.x * blockDim.x)
		((float *) (p + so))[i] = 0.015625f * (1.0f + (float) (i % 7) / 8.0f);
}

/* y[r, o] = sum_c q_weight(o, c) x[r, c], one thread an output: the check */
__global__ void
q_sweep_naive(float *y, const float *x, const uint8_t *W, int fmt, int group, int rows, int cols, int n)
{
	int			o = blockIdx.x * blockDim.x + threadIdx.x;
	size_t		rb = kk_q_row_bytes(fmt, cols);
	const float *sc = (const float *) (W + kk_q_scale_offset(rows, fmt, cols)) + (size_t) o * ((cols + group - 1) / group);

	if (o >= rows)
		return;
	for (int r = 0; r < n; r++)
	{
		float		acc = 0;

		for (int c = 0; c < cols; c++)
			acc = fmaf(q_weight(fmt, W + (size_t) o * rb, sc, c, group), x[(size_t) r * cols + c], acc);
		y[(size_t) r * rows + o] = acc;
	}
}

typedef struct
{
	const char *name;
	int			kind,			/* 0 plain, 1 experts SwiGLU (gate + up), 2 experts one matrix */
				experts,
				rows,
				cols;
}			qshape_t;

static const qshape_t qshapes[] = {
	{"q/k/v 3x4096x2304", 0, 1, 12288, 2304},
	{"o_proj 2304x4096", 0, 1, 2304, 4096},
	{"down 2304x1024", 0, 1, 2304, 1024},
	{"lm_head 163840x2304", 0, 1, 163840, 2304},
	{"experts gate/up SwiGLU 1x1024x2304", 1, 1, 1024, 2304},
	{"experts gate/up SwiGLU 8x1024x2304", 1, 8, 1024, 2304},
	{"experts down 8x2304x1024", 2, 8, 2304, 1024},
};

typedef struct
{
	const char *name;
	int			fmt,
				group;			/* 0: cols */
}			qfmt_t;

static const qfmt_t qfmts[] = {
	{"fp8", KK_WF_FP8, 0}, {"fp8 g128", KK_WF_FP8, 128}, {"int8", KK_WF_INT8, 0}, {"int4 g32", KK_WF_INT4, 32},
	{"int4", KK_WF_INT4, 0},
};

/* one timed case: everything its launches need */
typedef struct
{
	const qshape_t *sh;
	int			fmt,
				group,
				n,
				mats;			/* matrices a copy (experts, times 2 for SwiGLU) */
	size_t		slot;			/* bytes of one matrix's object, rounded to 256 */
	uint8_t    *base;
	const void *const *tab;		/* [copies][2][experts] device pointers */
	const int  *start,
			   *active;
	float	   *y,
			   *x;
	bool		stream;			/* the plain read of a copy's bytes instead */
}			qcase_t;

static void
q_launch(cudaStream_t s, const qcase_t *c, int copy)
{
	const uint8_t *W = c->base + (size_t) copy * c->mats * c->slot;

	if (c->stream)
		kk_launch(stream_read, dim3(132 * 8), dim3(256), 0, s, (const uint4 *) W, c->mats * c->slot / 16, g_sink);
	else if (c->sh->kind == 0)
		kk_gemv_q(s, c->y, c->sh->rows, c->x, c->sh->cols, c->n, W, c->fmt, c->group, c->sh->rows, c->sh->cols);
	else
	{
		const void *const *t = c->tab + (size_t) copy * 2 * c->sh->experts;

		kk_expert_gemv_q(s, c->y, NULL, c->sh->rows, c->x, c->sh->cols, NULL, t,
						 c->sh->kind == 1 ? t + c->sh->experts : NULL, c->fmt, c->group, c->sh->rows, c->sh->cols,
						 c->start, c->active, c->sh->experts, c->n);
	}
}

/* microseconds a launch, best of 5 replays of `reps` launches over the copies in one graph */
static double
q_time(cudaStream_t s, const qcase_t *c, int copies, int reps, int tries)
{
	cudaGraph_t g;
	cudaGraphExec_t ge;
	cudaEvent_t e0,
				e1;
	float		ms,
				best = 1e30f;

	CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
	for (int r = 0; r < reps; r++)
		q_launch(s, c, r % copies);
	CK(cudaStreamEndCapture(s, &g));
	CK(cudaGraphInstantiate(&ge, g, 0));
	CK(cudaEventCreate(&e0));
	CK(cudaEventCreate(&e1));
	for (int t = 0; t < tries; t++)
	{
		CK(cudaEventRecord(e0, s));
		CK(cudaGraphLaunch(ge, s));
		CK(cudaEventRecord(e1, s));
		CK(cudaEventSynchronize(e1));
		CK(cudaEventElapsedTime(&ms, e0, e1));
		if ((t > 0 || tries == 1) && ms < best)
			best = ms;
	}
	cudaGraphExecDestroy(ge);
	cudaGraphDestroy(g);
	cudaEventDestroy(e0);
	cudaEventDestroy(e1);
	return best * 1000.0 / reps;
}

/*
 * The quantized table: for each shape, format and batch (1, 4), the
 * kernel's time, its GB/s over the objects' bytes and its share of a plain
 * read of the same bytes; plain products checked against q_sweep_naive.
 * buf: the sweep's weight buffer (bytes), x / y: room for 8 x 8192 inputs
 * and 8 x 163840 outputs.
 */
static void
q_table(cudaStream_t s, uint8_t *buf, size_t bytes, float *x, float *y, float *yref, const char *want, int reps,
		int tries)
{
	void	  **tab_h;
	void	  **tab_d;
	int		   *meta;

	CK(cudaMalloc(&tab_d, sizeof(void *) * 2 * 8 * 64));
	CK(cudaMalloc(&meta, sizeof(int) * 64));
	tab_h = (void **) malloc(sizeof(void *) * 2 * 8 * 64);
	printf("\n| quantized shape | fmt | batch | MB | us | GB/s | of stream | max rel diff |\n"
		   "|---|---|---:|---:|---:|---:|---:|---:|\n");
	for (size_t si = 0; si < sizeof(qshapes) / sizeof(qshapes[0]); si++)
		for (size_t fi = 0; fi < sizeof(qfmts) / sizeof(qfmts[0]); fi++)
			for (int n = 1; n <= 4; n += 3)
			{
				const qshape_t *sh = &qshapes[si];
				qcase_t		c;
				int			group = qfmts[fi].group ? qfmts[fi].group : sh->cols;
				int			copies;
				int			start_h[9],
							act_h[9];
				double		us,
							stream_us,
							mb,
							diff = 0;
				char		label[160];

				snprintf(label, sizeof(label), "q %s %s", sh->name, qfmts[fi].name);
				if (want && !strstr(label, want))
					continue;
				memset(&c, 0, sizeof(c));
				c.sh = sh;
				c.fmt = qfmts[fi].fmt;
				c.group = group;
				c.n = n;
				c.mats = sh->experts * (sh->kind == 1 ? 2 : 1);
				c.slot = (kk_q_bytes(sh->rows, c.fmt, sh->cols, group) + 255) & ~(size_t) 255;
				c.base = buf;
				c.x = x;
				c.y = y;
				copies = (int) (bytes / (c.mats * c.slot));
				copies = copies < reps ? copies : reps;
				if (copies < 1)
					continue;
				for (int k = 0; k < copies * c.mats; k++)
					q_sweep_fill<<<264, 256, 0, s>>>(buf + (size_t) k * c.slot, c.fmt, group, sh->rows, sh->cols,
													 1234u + k);
				/* expert tables: copy k's gate (or only) matrices, then its up matrices; expert e: n pairs */
				for (int k = 0; k < copies && sh->kind; k++)
					for (int e = 0; e < sh->experts; e++)
					{
						tab_h[(size_t) k * 2 * sh->experts + e] = buf + ((size_t) k * c.mats + e) * c.slot;
						tab_h[(size_t) k * 2 * sh->experts + sh->experts + e] =
							buf + ((size_t) k * c.mats + (sh->kind == 1 ? sh->experts + e : e)) * c.slot;
					}
				for (int e = 0; e <= sh->experts; e++)
					start_h[e] = e * n;
				act_h[0] = sh->experts;
				for (int e = 0; e < sh->experts; e++)
					act_h[1 + e] = e * 64;
				CK(cudaMemcpy(tab_d, tab_h, sizeof(void *) * 2 * sh->experts * copies, cudaMemcpyHostToDevice));
				CK(cudaMemcpy(meta, start_h, sizeof(int) * (sh->experts + 1), cudaMemcpyHostToDevice));
				CK(cudaMemcpy(meta + 16, act_h, sizeof(int) * (sh->experts + 1), cudaMemcpyHostToDevice));
				c.tab = (const void *const *) tab_d;
				c.start = meta;
				c.active = meta + 16;
				if (sh->kind == 0)
				{
					size_t		no = (size_t) n * sh->rows;
					float	   *a = (float *) malloc(no * 4),
							   *b = (float *) malloc(no * 4);
					double		num = 0,
								den = 0;

					q_sweep_naive<<<ceil_div(sh->rows, 128), 128, 0, s>>>(yref, x, buf, c.fmt, group, sh->rows,
																		   sh->cols, n);
					q_launch(s, &c, 0);
					CK(cudaStreamSynchronize(s));
					CK(cudaMemcpy(a, y, no * 4, cudaMemcpyDeviceToHost));
					CK(cudaMemcpy(b, yref, no * 4, cudaMemcpyDeviceToHost));
					for (size_t i = 0; i < no; i++)
					{
						num = fmax(num, fabs((double) a[i] - b[i]));
						den = fmax(den, fabs((double) b[i]));
					}
					diff = num / (den > 0 ? den : 1);
					free(a);
					free(b);
				}
				us = q_time(s, &c, copies, reps, tries);
				c.stream = true;
				stream_us = q_time(s, &c, copies, reps, tries);
				mb = (double) c.mats * kk_q_bytes(sh->rows, c.fmt, sh->cols, group) / 1e6;
				printf("| %s | %s | %d | %.1f | %.2f | %.0f | %.0f%% | %.1e |\n", sh->name, qfmts[fi].name, n, mb, us,
					   mb * 1e6 / (us * 1e-6) / 1e9, 100.0 * stream_us / us, diff);
				c.stream = false;
				/* plain products of 1-2 rows: the early form (KL_CUDA_ROWS_EARLY, the row above) off */
				if (sh->kind == 0 && n <= 2)
				{
					kk_set_rows_early(0);
					us = q_time(s, &c, copies, reps, tries);
					kk_set_rows_early(1);
					printf("| %s | %s, not early | %d | %.1f | %.2f | %.0f | %.0f%% | |\n", sh->name, qfmts[fi].name,
						   n, mb, us, mb * 1e6 / (us * 1e-6) / 1e9, 100.0 * stream_us / us);
				}
				/* the other block shapes (kk_gemv_q_force_shape: 32, 64, 128 threads), for tuning */
				for (int f = 0; f < 3; f++)
				{
					kk_gemv_q_force_shape(f);
					us = q_time(s, &c, copies, reps, tries);
					kk_gemv_q_force_shape(-1);
					printf("| %s | %s, %d threads forced | %d | %.1f | %.2f | %.0f | %.0f%% | |\n", sh->name,
						   qfmts[fi].name, 32 << f, n, mb, us, mb * 1e6 / (us * 1e-6) / 1e9, 100.0 * stream_us / us);
				}
				fflush(stdout);
			}
	free(tab_h);
	cudaFree(tab_d);
	cudaFree(meta);
}

typedef struct
{
	const char *name;
	int			nr;
	launch_fn	fn;
}			variant_t;

#define UP(N, P, R, X) {"upfront nr" #N " ppl" #P " rw" #R " xs" #X, N, run_upfront<N, P, R, X>}
#define BR(N, R, B) {"blockrows nr" #N " rb" #R " bt" #B, N, run_blockrows<N, R, B>}
static const variant_t variants[] = {
	{"stream (ceiling)", 1, run_stream},
	{"kk_gemv nr1", 1, run_current},
	{"warp a row nr1", 1, run_warp_row},
	UP(1, 9, 1, 1), UP(1, 4, 1, 0),
	BR(1, 1, 64), BR(1, 1, 128), BR(1, 2, 64), BR(1, 2, 96), BR(1, 2, 128), BR(1, 3, 96), BR(1, 4, 96), BR(1, 4, 128),
	{"kk_gemv nr8", 8, run_current},
	{"warp a row nr8", 8, run_warp_row},
	UP(8, 2, 2, 0), BR(8, 4, 64), BR(8, 8, 32), BR(8, 4, 32),
	{"mma tile nr8", 8, run_mma<0>},
	{"mma slab nr8", 8, run_mma<1>},
};


/* ------------------------------------------ quantized weights on tensor cores */

/*
 * kernels/mma_q.cu's products of FP8 / int4 weights (kk_gemv_mma_q,
 * kk_expert_mma_q) against a plain read of the same bytes: dense 4096 x 2304
 * (a KDA projection) and 163840 x 2304 (lm_head) at 8 and 32 rows; the 48B
 * model's expert gate/up (SwiGLU, 2 x 1024 x 2304) and down (2304 x 1024)
 * for a decode step of 8 and 32 tokens (top 8 of 256 experts drawn at
 * random, and the shared expert over every token), the bytes of the experts
 * the step uses.  Random weight bytes (FP8 NaN codes avoided), scales 0.01:
 * timing only (test_cuda checks the results).  One table, after the bf16
 * one; `gemv-sweep mma_q` prints only this one.
 */
__global__ void
q_fill(uint8_t *p, size_t n, uint64_t seed)
{
	for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
	{
		uint64_t	z = (i + seed) * 0x9e3779b97f4a7c15ull;
		uint8_t		b;

		z ^= z >> 29;
		z *= 0xbf58476d1ce4e5b9ull;
		b = (uint8_t) (z >> 40);
		p[i] = (b & 0x7f) == 0x7f ? b ^ 1 : b;
	}
}

__global__ void
q_fill_scales(float *p, size_t n)
{
	for (size_t i = (size_t) blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
		p[i] = 0.01f;
}

/* a quantized matrix object at W (data random, scales 0.01) */
static void
q_make(cudaStream_t s, uint8_t *W, int fmt, int group, int rows, int cols, uint64_t seed)
{
	size_t		off = kk_q_scale_offset(rows, fmt, cols);

	q_fill<<<264, 256, 0, s>>>(W, off, seed);
	q_fill_scales<<<264, 256, 0, s>>>((float *) (W + off), (size_t) rows * kk_q_groups(cols, group));
}

/* the best of 5 runs of a 20-launch graph of fn(r), microseconds a launch */
template <typename F>
static double
q_time(cudaStream_t s, F fn)
{
	cudaGraph_t g;
	cudaGraphExec_t ge;
	cudaEvent_t e0,
				e1;
	float		ms,
				best = 1e30f;

	fn(0);
	CK(cudaStreamSynchronize(s));
	CK(cudaGetLastError());
	CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
	for (int r = 0; r < 20; r++)
		fn(r);
	CK(cudaStreamEndCapture(s, &g));
	CK(cudaGraphInstantiate(&ge, g, 0));
	CK(cudaEventCreate(&e0));
	CK(cudaEventCreate(&e1));
	for (int t = 0; t < 5; t++)
	{
		CK(cudaEventRecord(e0, s));
		CK(cudaGraphLaunch(ge, s));
		CK(cudaEventRecord(e1, s));
		CK(cudaEventSynchronize(e1));
		CK(cudaEventElapsedTime(&ms, e0, e1));
		if (t > 0 && ms < best)
			best = ms;
	}
	cudaGraphExecDestroy(ge);
	cudaGraphDestroy(g);
	cudaEventDestroy(e0);
	cudaEventDestroy(e1);
	return best * 1000.0 / 20;
}

static void
q_row(const char *shape, const char *form, int n, double bytes, double us, double stream_us)
{
	printf("| %s | %s | %d | %.1f | %.2f | %.0f | %.0f%% |\n", shape, form, n, bytes / 1e6, us,
		   bytes / (us * 1e-6) / 1e9, 100.0 * stream_us / us);
}

static void
quant_sweep(void)
{
	static const struct
	{
		int			fmt,
					group;
		const char *name;
	}			forms[] = {
		{KK_WF_FP8, 0, "fp8 row scale"}, {KK_WF_FP8, 128, "fp8 g128"},
		{KK_WF_INT4, 32, "int4 g32"}, {KK_WF_INT4, 128, "int4 g128"},
	};
	const int	D = 2304,
				F = 1024,
				E = 256,
				K = 8;
	cudaStream_t s;
	uint8_t    *W;
	float	   *x,
			   *y;
	size_t		wbytes = (size_t) 2 << 30;
	unsigned   *sink;

	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	CK(cudaMalloc(&W, wbytes));
	CK(cudaMalloc(&x, sizeof(float) * 64 * 8192));
	CK(cudaMalloc(&y, sizeof(float) * 64 * (size_t) 163840 * 2));
	CK(cudaMalloc(&sink, 64));
	kk_fill_random(s, x, 0, 64 * 8192, 7, 1.0f);
	printf("\n| shape | form | rows | MB | us | GB/s | of stream |\n|---|---|---:|---:|---:|---:|---:|\n");
	for (size_t fi = 0; fi < sizeof(forms) / sizeof(forms[0]); fi++)
	{
		int			fmt = forms[fi].fmt;

		/* dense: a different copy each launch (never from L2) where copies fit */
		static const int dr[] = {4096, 163840};

		for (int di = 0; di < 2; di++)
		{
			int			rows = dr[di],
						group = forms[fi].group ? forms[fi].group : D;
			size_t		obj = (kk_q_bytes(rows, fmt, D, group) + 255) & ~(size_t) 255;
			int			copies = (int) (wbytes / obj < 20 ? wbytes / obj : 20);
			double		stream_us;

			for (int c = 0; c < copies; c++)
				q_make(s, W + c * obj, fmt, group, rows, D, 11 + c);
			stream_us = q_time(s, [&](int r) {
				kk_launch(stream_read, dim3(132 * 8), dim3(256), 0, s, (const uint4 *) (W + (r % copies) * obj),
						  obj / 16, sink);
			});
			/* the launcher's slab height for 2 (its default) and 1 blocks an SM (mq_sm_blocks) */
			for (int smb = 2; smb >= 1; smb--)
				for (int n = 8; n <= 32; n += 24)
				{
					double		us;
					char		name[64];

					mq_sm_blocks = smb;
					us = q_time(s, [&](int r) {
						kk_gemv_mma_q(s, y, rows, x, D, n, W + (r % copies) * obj, fmt, group, rows, D);
					});
					snprintf(name, sizeof(name), "dense %d x 2304, slabs for %d blocks/SM", rows, smb);
					q_row(name, forms[fi].name, n, (double) obj, us, stream_us);
				}
			mq_sm_blocks = 2;
		}

		/* experts: 257 x (gate, up, down), a decode step's routing */
		{
			int			gg = forms[fi].group ? forms[fi].group : D,
						gd = forms[fi].group ? forms[fi].group : F;
			size_t		gsz = (kk_q_bytes(F, fmt, D, gg) + 255) & ~(size_t) 255,
						dsz = (kk_q_bytes(D, fmt, F, gd) + 255) & ~(size_t) 255,
						per = 2 * gsz + dsz;
			void	   *host_tab[3 * 257],
					  **tab;
			uint8_t    *base = W;

			if (per * 257 > wbytes)
				continue;
			for (int e = 0; e <= E; e++)
			{
				q_make(s, base + e * per, fmt, gg, F, D, 100 + 3 * e);
				q_make(s, base + e * per + gsz, fmt, gg, F, D, 101 + 3 * e);
				q_make(s, base + e * per + 2 * gsz, fmt, gd, D, F, 102 + 3 * e);
				host_tab[e] = base + e * per;
				host_tab[257 + e] = base + e * per + gsz;
				host_tab[514 + e] = base + e * per + 2 * gsz;
			}
			CK(cudaMalloc(&tab, sizeof(host_tab)));
			CK(cudaMemcpy(tab, host_tab, sizeof(host_tab), cudaMemcpyHostToDevice));
			for (int n = 8; n <= 32; n += 24)
			{
				/* routing on the host: k distinct random experts a token, grouped stably, items of 8 */
				int			cnt[257] = {0},
							start[258],
							act[1 + 4096],
							xrow[64 * 9],
							fill[257],
							used = 0,
							R = n * K + n;
				int		   *dint;
				uint64_t	z = 12345 + n;
				int			sel[64 * 8];

				for (int i = 0; i < n; i++)
					for (int j = 0; j < K; j++)
					{
						int			c,
									dup;

						do
						{
							z = z * 6364136223846793005ull + 1442695040888963407ull;
							c = (int) ((z >> 33) % E);
							dup = 0;
							for (int q = 0; q < j; q++)
								dup |= sel[i * K + q] == c;
						} while (dup);
						sel[i * K + j] = c;
						cnt[c]++;
					}
				cnt[E] = n;
				start[0] = 0;
				for (int e = 0; e <= E; e++)
					start[e + 1] = start[e] + cnt[e];
				memcpy(fill, start, sizeof(fill));
				for (int i = 0; i < n; i++)
					for (int j = 0; j < K; j++)
						xrow[fill[sel[i * K + j]]++] = i;
				for (int i = 0; i < n; i++)
					xrow[start[E] + i] = i;
				act[0] = 0;
				for (int e = 0; e <= E; e++)
				{
					used += cnt[e] > 0;
					for (int c = 0; c * 8 < cnt[e]; c++)
						act[1 + act[0]++] = e * 64 + c;
				}
				CK(cudaMalloc(&dint, sizeof(int) * (258 + 1 + 4096 + 64 * 9)));
				CK(cudaMemcpy(dint, start, sizeof(start), cudaMemcpyHostToDevice));
				CK(cudaMemcpy(dint + 258, act, sizeof(int) * (1 + act[0]), cudaMemcpyHostToDevice));
				CK(cudaMemcpy(dint + 258 + 4097, xrow, sizeof(int) * R, cudaMemcpyHostToDevice));
				{
					const int  *dstart = dint,
							   *dact = dint + 258,
							   *dxrow = dint + 258 + 4097;
					int			items = act[0];
					const void *const *tg = (const void *const *) tab,
							   *const *tu = (const void *const *) (tab + 257),
							   *const *td = (const void *const *) (tab + 514);
					double		gu_bytes = (double) used * 2 * gsz,
								d_bytes = (double) used * dsz,
								s_gu = q_time(s, [&](int r) {
									kk_launch(stream_read, dim3(132 * 8), dim3(256), 0, s, (const uint4 *) W,
											  (size_t) gu_bytes / 16, sink);
								}),
								s_d = q_time(s, [&](int r) {
									kk_launch(stream_read, dim3(132 * 8), dim3(256), 0, s, (const uint4 *) W,
											  (size_t) d_bytes / 16, sink);
								}),
								us_gu = q_time(s, [&](int r) {
									kk_expert_mma_q(s, y, NULL, F, x, D, dxrow, tg, tu, fmt, gg, F, D, dstart, dact,
													items, 8);
								}),
								us_d = q_time(s, [&](int r) {
									kk_expert_mma_q(s, y, NULL, D, y + (size_t) R * F, F, NULL, td, NULL, fmt, gd,
													D, F, dstart, dact, items, 8);
								});

					q_row("experts gate/up SwiGLU", forms[fi].name, n, gu_bytes, us_gu, s_gu);
					q_row("experts down", forms[fi].name, n, d_bytes, us_d, s_d);
				}
				cudaFree(dint);
			}
			cudaFree(tab);
		}
	}
	cudaFree(W);
	cudaFree(x);
	cudaFree(y);
	cudaFree(sink);
	cudaStreamDestroy(s);
}

static void
q_row_dense(const char *batch, double bytes, int n, const char *kernel, double us, double stream_us, double diff)
{
	char		d[32] = "";

	if (diff >= 0)
		snprintf(d, sizeof(d), "%.1e", diff);
	printf("| %s | %.1f | %d | %s | %.2f | %.0f | %.0f%% | %s |\n", batch, bytes / 1e6, n, kernel, us,
		   bytes / (us * 1e-6) / 1e9, 100.0 * stream_us / us, d);
}

/* max |y - ref| / max |ref| over n floats on the device, after s's work */
static double
dev_rel_diff(cudaStream_t s, const float *y, const float *ref, size_t n)
{
	float	   *a = (float *) malloc(n * 4),
			   *c = (float *) malloc(n * 4);
	double		dmax = 0,
				ymax = 0;

	CK(cudaStreamSynchronize(s));
	CK(cudaMemcpy(a, y, n * 4, cudaMemcpyDeviceToHost));
	CK(cudaMemcpy(c, ref, n * 4, cudaMemcpyDeviceToHost));
	for (size_t i = 0; i < n; i++)
	{
		dmax = fmax(dmax, fabs((double) a[i] - c[i]));
		ymax = fmax(ymax, fabs((double) c[i]));
	}
	free(a);
	free(c);
	return dmax / (ymax > 0 ? ymax : 1);
}

/*
 * "dense FP8 step batches" (`gemv-sweep dense_fp8`): each dense FP8 product
 * batch of a 48B decode step (one scale a row) at n = 1 .. 64 through
 * gemv_q.cu (kk_gemv_multi_q, n <= 8; the batch-1 path), the dense kernel
 * (KL_CUDA_Q_DENSE=2) and the slab kernel (=3), each with its conversion
 * launch, and the dense kernel reading preset bf16 twins ("dense twin":
 * KL_CUDA_Q_TWIN, no conversion launch), 20 launches in a graph with PDL
 * (q_time), a different copy of the weights each launch where copies fit,
 * against a plain read of the same bytes; "vs 2": the max difference from
 * the dense kernel's results over its max |y| (sums in another order:
 * ~1e-6; the twin rows: 0).  Then from 9 rows the tokens-as-M form, and
 * at 2-8 rows the dense kernel on twins at 2 and 3 blocks an SM.
 */
static void
dense_fp8_table(void)
{
	static const struct
	{
		const char *name;
		int			count,
					rows[3],
					cols[3],
					xi[3];		/* the activation matrix a job reads (jobs of one index share it) */
	}			batches[] = {
		{"KDA q/k/v 3 x 4096 x 2304", 3, {4096, 4096, 4096}, {2304, 2304, 2304}, {0, 0, 0}},
		{"KDA/MLA o_proj 2304 x 4096", 1, {2304}, {4096}, {0}},
		{"MLA q 6144 + kv_a 576 x 2304", 2, {6144, 576}, {2304, 2304}, {0, 0}},
		{"MLA kv_b 8192 x 512", 1, {8192}, {512}, {0}},
		{"shared gate/up 2 x 1024 x 2304", 2, {1024, 1024}, {2304, 2304}, {0, 0}},
		{"shared down 2304 x 1024", 1, {2304}, {1024}, {0}},
		{"layer-0 gate/up 2 x 9216 x 2304", 2, {9216, 9216}, {2304, 2304}, {0, 0}},
	};
	static const int ns[] = {1, 2, 4, 8, 16, 32, 64};
	const size_t wbytes = (size_t) 2 << 30;
	cudaStream_t s;
	uint8_t    *W;
	float	   *x,
			   *y,
			   *y2;
	uint16_t   *room,
			   *tw;
	unsigned   *sink;
	size_t		room_bytes = (size_t) 64 << 20;

	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	CK(cudaMalloc(&W, wbytes));
	CK(cudaMalloc(&x, sizeof(float) * 2 * 64 * 9216));
	CK(cudaMalloc(&y, sizeof(float) * 64 * 3 * 9216));
	CK(cudaMalloc(&y2, sizeof(float) * 64 * 3 * 9216));
	CK(cudaMalloc(&room, room_bytes));
	CK(cudaMalloc(&tw, sizeof(uint16_t) * 2 * 64 * 9216));
	CK(cudaMalloc(&sink, 64));
	kk_fill_random(s, x, 0, 2 * 64 * 9216, 7, 1.0f);
	/* the twins: element for element f32_to_bf16 of x, so any cols reads them with ld = cols as x */
	kk_f32_to_bf16(s, tw, 9216, x, 9216, 2 * 64, 9216);
	kk_gemv_q_force_shape(3);	/* the backend's default */
	printf("\n### dense FP8 step batches\n\n| batch | MB | n | kernel | us | GB/s | of stream | vs 2 |\n"
		   "|---|---:|---:|---|---:|---:|---:|---:|\n");
	for (size_t bi = 0; bi < sizeof(batches) / sizeof(batches[0]); bi++)
	{
		size_t		obj[3],
					per = 0;
		int			copies;
		double		stream_us;

		for (int j = 0; j < batches[bi].count; j++)
		{
			obj[j] = (kk_q_bytes(batches[bi].rows[j], KK_WF_FP8, batches[bi].cols[j], batches[bi].cols[j]) + 255) &
				~(size_t) 255;
			per += obj[j];
		}
		copies = (int) (wbytes / per < 20 ? wbytes / per : 20);
		for (int c = 0; c < copies; c++)
		{
			size_t		off = 0;

			for (int j = 0; j < batches[bi].count; j++)
			{
				q_make(s, W + c * per + off, KK_WF_FP8, batches[bi].cols[j], batches[bi].rows[j],
					   batches[bi].cols[j], 31 + 7 * c + j);
				off += obj[j];
			}
		}
		stream_us = q_time(s, [&](int r) {
			kk_launch(stream_read, dim3(132 * 8), dim3(256), 0, s, (const uint4 *) (W + (r % copies) * per),
					  per / 16, sink);
		});
		for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++)
		{
			int			n = ns[ni];
			size_t		ny = 0;
			/* the batch over copy r, results into out */
			auto		batch = [&](int r, float *out) {
				kk_gemv_batch b;
				size_t		off = 0,
							yoff = 0;

				memset(&b, 0, sizeof(b));
				b.n = n;
				b.count = batches[bi].count;
				for (int j = 0; j < b.count; j++)
				{
					kk_gemv_job *jb = &b.job[j];

					jb->W = W + (size_t) (r % copies) * per + off;
					jb->x = x + (size_t) batches[bi].xi[j] * 64 * 9216;
					jb->ldx = batches[bi].cols[j];
					jb->y = out + yoff;
					jb->ldy = batches[bi].rows[j];
					jb->rows = batches[bi].rows[j];
					jb->cols = batches[bi].cols[j];
					jb->fmt = KK_WF_FP8;
					jb->group = batches[bi].cols[j];
					off += obj[j];
					yoff += (size_t) n * batches[bi].rows[j];
				}
				b.xq = room;
				b.xq_bytes = room_bytes;
				return b;
			};

			for (int j = 0; j < batches[bi].count; j++)
				ny += (size_t) n * batches[bi].rows[j];
			if (n <= 8)
			{
				double		us = q_time(s, [&](int r) {
					kk_gemv_batch b = batch(r, y);

					kk_gemv_multi_q(s, &b);
				});

				q_row_dense(batches[bi].name, per, n, "gemv_q", us, stream_us, -1);
			}
			/* 1-2 rows: gemv_q without its early form (KL_CUDA_ROWS_EARLY=0); "vs 2" here: against gemv_q's
			 * results above (must be 0: the same sums) */
			if (n <= 2)
			{
				double		us;

				kk_set_rows_early(0);
				us = q_time(s, [&](int r) {
					kk_gemv_batch b = batch(r, y2);

					kk_gemv_multi_q(s, &b);
				});
				kk_set_rows_early(1);
				q_row_dense(batches[bi].name, per, n, "gemv_q not early", us, stream_us, dev_rel_diff(s, y2, y, ny));
			}
			for (int v = 2; v <= 4; v++)
			{
				double		us = q_time(s, [&](int r) {
					kk_gemv_batch b = batch(r, v == 2 ? y2 : y);

					if (v == 4)	/* twins preset: the dense kernel (=2) without its conversion launch */
						for (int j = 0; j < b.count; j++)
							b.job[j].x16 = tw + (size_t) batches[bi].xi[j] * 64 * 9216;
					kk_gemv_multi_mma_q_as(s, &b, 0, v == 4 ? 2 : v);
				});
				double		diff = v >= 3 ? dev_rel_diff(s, y, y2, ny) : 0;

				q_row_dense(batches[bi].name, per, n, v == 2 ? "dense (=2)" : v == 3 ? "slab (=3)" : "dense twin",
							us, stream_us, diff);
			}
			/* from 9 rows the tokens-as-M form (KL_CUDA_Q_TOK, the backend's default) */
			if (n > 8)
			{
				int			tok_was = kk_set_mma_q_tok(1);
				double		us = q_time(s, [&](int r) {
					kk_gemv_batch b = batch(r, y2);

					kk_gemv_multi_mma_q_as(s, &b, 0, 2);
				});

				kk_set_mma_q_tok(tok_was);
				q_row_dense(batches[bi].name, per, n, "tokens-as-M (=2, TOK)", us, stream_us, -1);
			}
			/* with the producers' twins preset (as in the step), 2-8 rows: the dense kernel at 2 blocks an SM
			 * (KL_CUDA_Q_DENSE_OCC=2) and at 3 (the default), "vs 2" against the first (must be 0: the same sums) */
			if (n <= 8)
			{
				double		us[2];

				for (int occ = 2; occ <= 3; occ++)
				{
					int			was = kk_set_mma_q_dense_occ(occ);

					us[occ - 2] = q_time(s, [&](int r) {
						kk_gemv_batch b = batch(r, occ == 2 ? y2 : y);

						for (int j = 0; j < b.count; j++)
							b.job[j].x16 = tw + (size_t) batches[bi].xi[j] * 64 * 9216;
						kk_gemv_multi_mma_q_as(s, &b, 0, 2);
					});
					kk_set_mma_q_dense_occ(was);
				}
				q_row_dense(batches[bi].name, per, n, "dense twin, OCC=2", us[0], stream_us, -1);
				q_row_dense(batches[bi].name, per, n, "dense twin, OCC=3", us[1], stream_us, dev_rel_diff(s, y, y2, ny));
			}
		}
	}
	cudaFree(W);
	cudaFree(x);
	cudaFree(y);
	cudaFree(y2);
	cudaFree(room);
	cudaFree(tw);
	cudaFree(sink);
	cudaStreamDestroy(s);
}

int
main(int argc, char **argv)
{
	cudaStream_t s;
	size_t		maxw = 0,
				wtotal;
	uint16_t   *W;
	float	   *x,
			   *y,
			   *yref;
	int			reps = getenv("SWEEP_NCU") ? 1 : 20;
	int			tries = getenv("SWEEP_NCU") ? 1 : 5;

	kk_set_pdl(1);
	if (argc > 1 && strcmp(argv[1], "mma_q") == 0)
	{
		quant_sweep();
		return 0;
	}
	if (argc > 1 && strcmp(argv[1], "dense_fp8") == 0)
	{
		dense_fp8_table();
		return 0;
	}
	for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
		if ((size_t) shapes[i].rows * shapes[i].cols > maxw)
			maxw = (size_t) shapes[i].rows * shapes[i].cols;
	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	wtotal = maxw > ((size_t) 1 << 30) ? maxw : ((size_t) 1 << 30);
	CK(cudaMalloc(&W, wtotal * 2));
	CK(cudaMalloc(&x, 32 * 8192 * 4));	/* 32 rows: the quantized table's 8 experts x 4 pairs */
	CK(cudaMalloc(&y, 8 * (size_t) 163840 * 4));
	CK(cudaMalloc(&yref, 8 * (size_t) 163840 * 4));
	CK(cudaMalloc(&g_sink, 64));
	kk_fill_random(s, W, 1, wtotal, 1234, 0.05f);
	kk_fill_random(s, x, 0, 32 * 8192, 99, 1.0f);
	CK(cudaStreamSynchronize(s));
	printf("| shape | MB | variant | us | GB/s | of stream | max rel diff |\n|---|---:|---|---:|---:|---:|---:|\n");
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
	{
		const shape_t *sh = &shapes[si];

		if (argc > 2 && !strstr(sh->name, argv[2]))
			continue;
		if (argc > 1 && strcmp(argv[1], "q") == 0)
			break;
		double		mb = (double) sh->rows * sh->cols * 2 / 1e6;
		double		stream_us = 0;

		for (size_t vi = 0; vi < sizeof(variants) / sizeof(variants[0]); vi++)
		{
			const variant_t *v = &variants[vi];
			cudaGraph_t g;
			cudaGraphExec_t ge;
			cudaEvent_t e0,
						e1;
			float		ms,
						best = 1e30f;
			double		diff = 0;

			if (argc > 1 && !strstr(v->name, argv[1]) && vi != 0)
				continue;
			/* reference and check */
			run_current(s, yref, x, W, sh->rows, sh->cols, v->nr);
			CK(cudaMemsetAsync(y, 0, (size_t) v->nr * sh->rows * 4, s));
			v->fn(s, y, x, W, sh->rows, sh->cols, v->nr);
			CK(cudaStreamSynchronize(s));
			if (vi != 0)
			{
				size_t		n = (size_t) v->nr * sh->rows;
				float	   *a = (float *) malloc(n * 4),
						   *b = (float *) malloc(n * 4);
				double		num = 0,
							den = 0;

				CK(cudaMemcpy(a, y, n * 4, cudaMemcpyDeviceToHost));
				CK(cudaMemcpy(b, yref, n * 4, cudaMemcpyDeviceToHost));
				for (size_t i = 0; i < n; i++)
				{
					num = fmax(num, fabs((double) a[i] - b[i]));
					den = fmax(den, fabs((double) b[i]));
				}
				diff = num / (den > 0 ? den : 1);
				free(a);
				free(b);
			}
			CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
			for (int r = 0; r < reps; r++)
			{
				/* a different copy each launch: the weights never come from L2, as in a decode step */
				size_t		per = (size_t) sh->rows * sh->cols;
				size_t		copies = wtotal / per < (size_t) reps ? wtotal / per : (size_t) reps;

				v->fn(s, y, x, W + (r % copies) * per, sh->rows, sh->cols, v->nr);
			}
			CK(cudaStreamEndCapture(s, &g));
			CK(cudaGraphInstantiate(&ge, g, 0));
			CK(cudaEventCreate(&e0));
			CK(cudaEventCreate(&e1));
			for (int t = 0; t < tries; t++)
			{
				CK(cudaEventRecord(e0, s));
				CK(cudaGraphLaunch(ge, s));
				CK(cudaEventRecord(e1, s));
				CK(cudaEventSynchronize(e1));
				CK(cudaEventElapsedTime(&ms, e0, e1));
				if ((t > 0 || tries == 1) && ms < best)
					best = ms;
			}
			{
				double		us = best * 1000.0 / reps;

				if (vi == 0)
					stream_us = us;
				printf("| %s | %.1f | %s | %.2f | %.0f | %.0f%% | %.1e |\n", sh->name, mb, v->name, us,
					   mb * 1e6 / (us * 1e-6) / 1e9, 100.0 * stream_us / us, diff);
			}
			cudaGraphExecDestroy(ge);
			cudaGraphDestroy(g);
			cudaEventDestroy(e0);
			cudaEventDestroy(e1);
		}
	}
	/* the quantized table: all of it by default, or where an argument names "q" (argv[2] a filter) */
	if (argc <= 1 || strcmp(argv[1], "q") == 0)
		q_table(s, (uint8_t *) W, wtotal * 2, x, y, yref, argc > 2 ? argv[2] : NULL, reps, tries);
	if (argc <= 1 || strcmp(argv[1], "mma_q") == 0)
		quant_sweep();
	return 0;
}
