/*
 * cuda_mma_q_test.c — test hooks of the tensor-core products of quantized
 * weights (kernels/mma_q.cu) for test/engine/test_cuda.c, which finds them
 * with dlsym; the backend does not call them.  They take host arrays:
 * the weight matrices as the device objects kernels.h describes (data, then
 * at kk_q_scale_offset the fp32 scales), made on the host by the test from
 * quant.h's kl_q_quantize_rows or by hand, so that the test's reference
 * (kl_q_dequant_row) sees the very same bytes.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

/* copy n bytes of host memory to a new device buffer on s (*d NULL on failure) */
static cudaError_t
mq_upload(cudaStream_t s, void **d, const void *h, size_t n)
{
	cudaError_t e = cudaMalloc(d, n ? n : 1);

	if (e != cudaSuccess)
	{
		*d = NULL;
		return e;
	}
	return cudaMemcpyAsync(*d, h, n, cudaMemcpyHostToDevice, s);
}

/*
 * One kk_gemv_multi_mma_q launch (kk_gemv_mma_q when count is 1 and path
 * is -1) of count (<= KK_GEMV_JOBS) jobs of the same n (<=
 * KK_GEMV_MMA_Q_ROWS) rows.  Job j: W[j] the host copy of a quantized
 * matrix [rows[j], cols[j]] in format fmt[j] (KK_WF_*) with group[j]
 * columns per scale, kk_q_bytes of it; x[j] [n, cols[j]] fp32 (uploaded
 * with row stride cols[j] + xpad: xpad % 4 != 0 takes the unaligned path);
 * jobs whose x is the same host array (and cols) share one device copy, as
 * a layer's projections of one input do; y[j] [n, rows[j]] receives the
 * result (the device rows are NaN before the launch, so rows no block wrote
 * show).  path: -1 the settings in force
 * (no room for the dense kernel); 0 the staging kernel; 1 the direct kernel
 * (KL_CUDA_Q_DIRECT=2) where it takes the jobs; 2, 3 and 4 the dense kernel
 * (KL_CUDA_Q_DENSE=1, =2, its tokens-as-M form off) and the slab kernel
 * (=3) where they take them, 5 the dense kernel (=2) with the tokens-as-M
 * form on (kk_set_mma_q_tok: from 9 rows where it takes the batch); 6, 7
 * and 8 (the balanced grid and its k split, KL_CUDA_Q_GRID) were retired
 * and return -1; 9, 10 and 11: paths 3, 5 and 4 with the even-numbered
 * jobs' x16 preset to a bf16 twin of their x
 * (kk_f32_to_bf16 into a buffer of exactly n rows, row stride cols:
 * KL_CUDA_Q_TWIN's form), the others converted; with
 * their room (NaN before the launch), through kk_gemv_multi_mma_q_as.  Returns 0, -1 for
 * arguments the kernels do not take (kk_mma_q_ok), or a CUDA error code.
 */
static int
mq_gemv_run(int path, int n, int count, const int *rows, const int *cols, const int *fmt, const int *group,
			const void *const *W, const float *const *x, int xpad, float *const *y)
{
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	void	   *dW[KK_GEMV_JOBS] = {NULL},
			   *dx[KK_GEMV_JOBS] = {NULL},
			   *dy[KK_GEMV_JOBS] = {NULL},
			   *room = NULL,
			   *tw[KK_GEMV_JOBS] = {NULL};
	kk_gemv_batch b;
	int			twin = path >= 9 && path <= 11,
				dense,
				tok_was = 0;

	if (twin)
		path = path == 9 ? 3 : path == 10 ? 5 : 4;	/* (6, 7, 8, retired, stay above 5: refused below) */
	dense = path == 5 ? 2 : path >= 2 ? path - 1 : 0;
	if (n <= 0 || n > KK_GEMV_MMA_Q_ROWS || count <= 0 || count > KK_GEMV_JOBS || xpad < 0 || path < -1 ||
		path > 5)
		return -1;
	for (int j = 0; j < count; j++)
		if (rows[j] <= 0 || !kk_mma_q_ok(fmt[j], group[j], cols[j]))
			return -1;
	memset(&b, 0, sizeof(b));
	b.n = n;
	b.count = count;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess)
		return (int) e;
	for (int j = 0; j < count; j++)
	{
		size_t		ldx = (size_t) cols[j] + xpad;
		int			same = 0;

		while (same < j && !(x[same] == x[j] && cols[same] == cols[j]))
			same++;
		if ((e = mq_upload(s, &dW[j], W[j], kk_q_bytes(rows[j], fmt[j], cols[j], group[j]))) != cudaSuccess)
			goto out;
		if (same < j)
			b.job[j].x = b.job[same].x;	/* (dx[j] stays NULL: freed once) */
		else if ((e = cudaMalloc(&dx[j], sizeof(float) * n * ldx)) != cudaSuccess ||
				 (e = cudaMemcpy2DAsync(dx[j], sizeof(float) * ldx, x[j], sizeof(float) * cols[j],
										sizeof(float) * cols[j], n, cudaMemcpyHostToDevice, s)) != cudaSuccess)
			goto out;
		else
			b.job[j].x = dx[j];
		if ((e = cudaMalloc(&dy[j], sizeof(float) * n * rows[j])) != cudaSuccess ||
			(e = cudaMemsetAsync(dy[j], 0xff, sizeof(float) * n * rows[j], s)) != cudaSuccess)
			goto out;
		b.job[j].W = dW[j];
		b.job[j].y = dy[j];
		b.job[j].ldx = (int) ldx;
		b.job[j].ldy = rows[j];
		b.job[j].rows = rows[j];
		b.job[j].cols = cols[j];
		b.job[j].fmt = fmt[j];
		b.job[j].group = group[j];
		if (twin && j % 2 == 0)
		{
			/* (exactly n rows: the kernels must not read past them) */
			if ((e = cudaMalloc(&tw[j], sizeof(uint16_t) * n * cols[j])) != cudaSuccess)
				goto out;
			kk_f32_to_bf16(s, tw[j], cols[j], b.job[j].x, (int) ldx, n, cols[j]);
			b.job[j].x16 = tw[j];
		}
	}
	if (path >= 0)
	{
		if ((b.xq_bytes = kk_gemv_mma_q_room_as(&b, dense)) > 0 &&
			((e = cudaMalloc(&room, b.xq_bytes)) != cudaSuccess ||
			 (e = cudaMemsetAsync(room, 0xff, b.xq_bytes, s)) != cudaSuccess))
			goto out;
		b.xq = room;
		tok_was = kk_set_mma_q_tok(path == 5);
		kk_gemv_multi_mma_q_as(s, &b, path == 1 ? 2 : 0, dense);
		kk_set_mma_q_tok(tok_was);
	}
	else if (count == 1)
		kk_gemv_mma_q(s, dy[0], rows[0], b.job[0].x, b.job[0].ldx, n, dW[0], fmt[0], group[0], rows[0], cols[0]);
	else
		kk_gemv_multi_mma_q(s, &b);
	if ((e = cudaGetLastError()) != cudaSuccess)
		goto out;
	for (int j = 0; j < count; j++)
		if ((e = cudaMemcpyAsync(y[j], dy[j], sizeof(float) * n * rows[j], cudaMemcpyDeviceToHost, s)) !=
			cudaSuccess)
			goto out;
	e = cudaStreamSynchronize(s);
out:
	cudaStreamSynchronize(s);
	for (int j = 0; j < count; j++)
	{
		cudaFree(dW[j]);
		cudaFree(dx[j]);
		cudaFree(dy[j]);
		cudaFree(tw[j]);
	}
	cudaFree(room);
	cudaStreamDestroy(s);
	return (int) e;
}

__attribute__((visibility("default"))) int
kl_cuda_test_gemv_mma_q(int n, int count, const int *rows, const int *cols, const int *fmt, const int *group,
						const void *const *W, const float *const *x, int xpad, float *const *y)
{
	return mq_gemv_run(-1, n, count, rows, cols, fmt, group, W, x, xpad, y);
}

/* the same through a chosen kernel (path as mq_gemv_run's: 0 staging, 1 direct, 2 and 3 dense, 4 slab, 5 dense
 * tokens-as-M; 6, 7, 8 retired (-1); 9, 10, 11: 3, 5, 4 reading preset bf16 twins for the even-numbered jobs) */
__attribute__((visibility("default"))) int
kl_cuda_test_gemv_mma_q_path(int path, int n, int count, const int *rows, const int *cols, const int *fmt,
							 const int *group, const void *const *W, const float *const *x, int xpad,
							 float *const *y)
{
	return mq_gemv_run(path, n, count, rows, cols, fmt, group, W, x, xpad, y);
}

/* work items of at most P rows for nk routed pairs over E experts and shared_rows rows (cuda_moe.c's bound) */
static int
mq_item_slots(int nk, int E, int shared_rows, int P)
{
	int			A = nk < E ? nk : E;

	return (nk + A * (P - 1)) / P + (shared_rows + P - 1) / P;
}

/*
 * The expert products of one decode step of n tokens through
 * kk_expert_mma_q, in its three modes, as a decode step groups them: the
 * routing choices sel [n k] (host; expert ids < E, distinct within a
 * token) are grouped on the device by kk_moe_group with items of
 * KK_EXPERT_MMA_ROWS, the shared expert (expert E) over every token.
 * Experts e = 0 .. E: gate[e], up[e] [F, D] and down[e] [D, F], host copies
 * of quantized matrices in format fmt, group columns per scale for gate/up
 * (D columns) and group_down for down (F columns).  x [n, D] the tokens;
 * h [R, F] (R = n k + n) the down product's rows, one per grouped pair.
 * Outputs: out [R (3 F + D)] floats, one after another: SwiGLU silu(gate x)
 * * (up x) [R, F]; gate x and up x from the two-matrix mode [R, F] each;
 * down h [R, D] (rows no item wrote stay NaN); start [E + 2] and xrow [R]:
 * the grouping (pair row i belongs to expert e for start[e] <= i <
 * start[e + 1] and reads token xrow[i]).  Returns 0, -1 for a shape the
 * kernel does not take, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_expert_mma_q(int n, int E, int k, int D, int F, int fmt, int group, int group_down, const int *sel,
						  const void *const *gate, const void *const *up, const void *const *down, const float *x,
						  const float *h, float *out, int *start, int *xrow)
{
	int			nk = n * k,
				R = nk + n,
				P = KK_EXPERT_MMA_ROWS,
				slots = mq_item_slots(nk, E, n, P);
	size_t		gbytes = kk_q_bytes(F, fmt, D, group),
				dbytes = kk_q_bytes(D, fmt, F, group_down),
				gsz = (gbytes + 255) & ~(size_t) 255,	/* each object 256-byte aligned, as the pool's */
				dsz = (dbytes + 255) & ~(size_t) 255,
				osz = (size_t) R * (3 * (size_t) F + D),
				nact = (size_t) E + nk + n + 4;
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	uint8_t    *w = NULL;
	float	   *dx = NULL,
			   *y = NULL;
	int		   *ints = NULL;
	void	  **tab = NULL,
			  **host_tab = NULL;

	if (n <= 0 || k <= 0 || E <= 0 || !kk_mma_q_ok(fmt, group, D) || !kk_mma_q_ok(fmt, group_down, F))
		return -1;
	host_tab = malloc(sizeof(void *) * 3 * ((size_t) E + 1));
	if (!host_tab)
		return (int) cudaErrorMemoryAllocation;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &w, (2 * gsz + dsz) * ((size_t) E + 1))) != cudaSuccess ||
		(e = cudaMalloc((void **) &dx, sizeof(float) * ((size_t) n * D + (size_t) R * F))) != cudaSuccess ||
		(e = cudaMalloc((void **) &y, sizeof(float) * osz)) != cudaSuccess ||
		(e = cudaMalloc((void **) &ints, sizeof(int) * (nk + ((size_t) E + 2) + R + nk + nact))) != cudaSuccess ||
		(e = cudaMalloc((void **) &tab, sizeof(void *) * 3 * ((size_t) E + 1))) != cudaSuccess)
		goto out;
	/* the objects one after another */
	for (int j = 0; j <= E; j++)
	{
		uint8_t    *g = w + (size_t) j * (2 * gsz + dsz);

		host_tab[j] = g;
		host_tab[E + 1 + j] = g + gsz;
		host_tab[2 * (E + 1) + j] = g + 2 * gsz;
		if ((e = cudaMemcpyAsync(g, gate[j], gbytes, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
			(e = cudaMemcpyAsync(g + gsz, up[j], gbytes, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
			(e = cudaMemcpyAsync(g + 2 * gsz, down[j], dbytes, cudaMemcpyHostToDevice, s)) != cudaSuccess)
			goto out;
	}
	if ((e = cudaMemcpyAsync(tab, host_tab, sizeof(void *) * 3 * ((size_t) E + 1), cudaMemcpyHostToDevice, s)) !=
		cudaSuccess ||
		(e = cudaMemcpyAsync(dx, x, sizeof(float) * (size_t) n * D, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
		(e = cudaMemcpyAsync(dx + (size_t) n * D, h, sizeof(float) * (size_t) R * F, cudaMemcpyHostToDevice, s)) !=
		cudaSuccess ||
		(e = cudaMemcpyAsync(ints, sel, sizeof(int) * nk, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
		(e = cudaMemsetAsync(y, 0xff, sizeof(float) * osz, s)) != cudaSuccess)
		goto out;
	{
		int		   *dsel = ints,
				   *dstart = dsel + nk,
				   *dxrow = dstart + E + 2,
				   *dinv = dxrow + R,
				   *dact = dinv + nk;
		const void *const *tg = (const void *const *) tab,
				   *const *tu = (const void *const *) (tab + (E + 1)),
				   *const *td = (const void *const *) (tab + 2 * (E + 1));
		const float *dh = dx + (size_t) n * D;

		kk_moe_group(s, nk, E, k, n, P, dsel, dstart, dxrow, dinv, dact);
		kk_expert_mma_q(s, y, NULL, F, dx, D, dxrow, tg, tu, fmt, group, F, D, dstart, dact, slots, P);
		kk_expert_mma_q(s, y + (size_t) R * F, y + 2 * (size_t) R * F, F, dx, D, dxrow, tg, tu, fmt, group, F, D,
						dstart, dact, slots, P);
		kk_expert_mma_q(s, y + 3 * (size_t) R * F, NULL, D, dh, F, NULL, td, NULL, fmt, group_down, D, F, dstart,
						dact, slots, P);
		if ((e = cudaGetLastError()) != cudaSuccess ||
			(e = cudaMemcpyAsync(out, y, sizeof(float) * osz, cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
			(e = cudaMemcpyAsync(start, dstart, sizeof(int) * ((size_t) E + 2), cudaMemcpyDeviceToHost, s)) !=
			cudaSuccess ||
			(e = cudaMemcpyAsync(xrow, dxrow, sizeof(int) * (size_t) R, cudaMemcpyDeviceToHost, s)) != cudaSuccess)
			goto out;
		e = cudaStreamSynchronize(s);
	}
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(w);
	cudaFree(dx);
	cudaFree(y);
	cudaFree(ints);
	cudaFree(tab);
	if (s)
		cudaStreamDestroy(s);
	free(host_tab);
	return (int) e;
}
