/*
 * cuda_moe_prefill.c — the routed experts of a prefill MoE op on the GPU
 * (batches of more than 64 tokens; cuda_moe in cuda_moe.c routes, then calls
 * these, then adds the shared experts and combines).
 *
 * The expert choices come to the host, which groups them stably (as
 * cpu_moe.c does; cuda_moe_host_group).  With bf16 precision and bf16
 * experts, or quantized ones (converted to bf16 stage by stage for the
 * batched products: batch_dequant; KL_CUDA_Q_BATCHED=0 keeps them on 0),
 * KL_CUDA_MOE_PREFILL picks how the expert products run:
 *   4 (default) variant 3 with the grouping made on the device
 *     (cuda_moe_device_group, kk_moe_pad_group): only the counts come to
 *     the host, which waits for them while the gather and the shared expert
 *     run instead of draining the stream twice;
 *   3 the used experts' rows in slots padded to a few size
 *     classes, gathered token-major, one batched product per class and stage,
 *     bf16 outputs the combine reads directly (cuda_moe_experts_batched16);
 *     where cuBLAS refuses a batched call, 0 from then on;
 *   0 the older code: grouped products with fp32 results
 *     (cuda_moe_experts_grouped), which cuBLAS refuses, else cuda_moe's
 *     product per used expert through the ordinary matmul path.
 * (Variants 1, a product per expert from rows gathered once as bf16, and 2,
 * cuBLAS's grouped GEMM with bf16 results, were removed: 3 and 4 replace
 * them, bench/notes-cuda.md.)
 * The state these use (size classes, argument arrays, refusal flags) is
 * cuda_state's moe_* fields (cuda_internal.h); cuda_moe_free releases it.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

/* ------------------------------------------------------------------ host grouping (prefill) */

/*
 * Variant 3's slot of an expert with c > 0 rows: c rounded up to a multiple
 * of 128 where that pads less than 15 % (cuBLAS's wide tiles fit it), else to
 * a multiple of 64.  Pad rows cost products whose outputs nobody reads.
 */
static int
slot_rows(int c)
{
	int			s64 = (c + 63) / 64 * 64,
				s128 = (c + 127) / 128 * 128;

	return (s128 - c) * 100 < 15 * c ? s128 : s64;
}

static int
cmp_llong(const void *a, const void *b)
{
	long long	x = *(const long long *) a,
				y = *(const long long *) b;

	return (x > y) - (x < y);
}

/*
 * Variant 3's size classes from the counts in cs->h_start (prefix sums,
 * E + 1 entries): the used experts sorted by (slot size, id), runs of one
 * size a class, slots laid out class after class (cuda_state.moe_cls).
 */
static bool
moe_classes(kl_backend *be, int E)
{
	cuda_state *cs = CS(be);
	const int  *st = cs->h_start;
	int		   *base,
			   *order,
			   *size,
			   *first;
	long long  *key;
	int			A = 0;

	if (cs->moe_cls_cap < E)
	{
		free(cs->moe_cls);
		cs->moe_cls_cap = 0;
		/* base, order, size, first [E + 1], then the sort keys (two ints each, 8-byte aligned: one int more) */
		cs->moe_cls = malloc(sizeof(int) * (6 * (size_t) E + 2));
		if (!cs->moe_cls)
		{
			cuda_fail(be, KL_E_RESOURCES, "out of memory grouping experts");
			return false;
		}
		cs->moe_cls_cap = E;
	}
	base = cs->moe_cls;
	order = base + cs->moe_cls_cap;
	size = order + cs->moe_cls_cap;
	first = size + cs->moe_cls_cap;
	key = (long long *) (first + cs->moe_cls_cap + 1);
	if (((uintptr_t) key & 7) != 0)
		key = (long long *) ((char *) key + 4);
	for (int e = 0; e < E; e++)
	{
		int			c = st[e + 1] - st[e];

		base[e] = -1;
		if (c > 0)
			key[A++] = (long long) slot_rows(c) << 32 | e;
	}
	qsort(key, (size_t) A, sizeof(long long), cmp_llong);
	cs->moe_ncls = 0;
	cs->moe_npad = 0;
	for (int i = 0; i < A; i++)
	{
		int			S = (int) (key[i] >> 32),
					e = (int) (key[i] & 0xffffffff);

		if (i == 0 || S != size[cs->moe_ncls - 1])
		{
			size[cs->moe_ncls] = S;
			first[cs->moe_ncls++] = i;
		}
		order[i] = e;
		base[e] = cs->moe_npad;
		cs->moe_npad += S;
	}
	first[cs->moe_ncls] = A;
	return true;
}

/*
 * The prefill grouping on the host: downloads the expert choices d_sel (a
 * stream drain), counts them into cs->h_start, and uploads the stable
 * grouping: d_xrow (the token of each grouped row) and d_inv (the grouped
 * row of each (token, slot) pair).  pad (variant 3): the rows go to their
 * expert's slot of the padded layout instead (moe_classes; d_inv only, d_xrow
 * is left alone: kk_gather_tok_bf16 reads d_inv).
 */
bool
cuda_moe_host_group(kl_backend *be, int n, int E, int k, const int *d_sel, int *d_xrow, int *d_inv,
					bool pad)
{
	cuda_state *cs = CS(be);
	size_t		nk = (size_t) n * k;
	int		   *fill;

	if (cs->h_moe_cap < nk || !cs->h_start)
	{
		size_t		cap = nk * 2;

		free(cs->h_sel);
		free(cs->h_xrow);
		free(cs->h_inv);
		free(cs->h_start);
		cs->h_sel = malloc(sizeof(int) * cap);
		cs->h_xrow = malloc(sizeof(int) * cap);
		cs->h_inv = malloc(sizeof(int) * cap);
		cs->h_start = malloc(sizeof(int) * 2 * ((size_t) E + 1));
		cs->h_moe_cap = cap;
		if (!cs->h_sel || !cs->h_xrow || !cs->h_inv || !cs->h_start)
		{
			cs->h_moe_cap = 0;
			cuda_fail(be, KL_E_RESOURCES, "out of memory grouping experts");
			return false;
		}
	}
	if (!cuda_ok(be, cudaMemcpyAsync(cs->h_sel, d_sel, sizeof(int) * nk, cudaMemcpyDeviceToHost, cs->stream),
				 "expert choices download") ||
		!cuda_ok(be, cudaStreamSynchronize(cs->stream), "expert choices download"))
		return false;
	fill = cs->h_start + E + 1;
	memset(cs->h_start, 0, sizeof(int) * ((size_t) E + 1));
	for (size_t i = 0; i < nk; i++)
	{
		if (cs->h_sel[i] < 0 || cs->h_sel[i] >= E)
		{
			cuda_fail(be, KL_E_INTERNAL, "internal error: expert id %d out of range", cs->h_sel[i]);
			return false;
		}
		cs->h_start[cs->h_sel[i] + 1]++;
	}
	for (int e = 0; e < E; e++)
		cs->h_start[e + 1] += cs->h_start[e];
	if (pad && !moe_classes(be, E))
		return false;
	memcpy(fill, cs->h_start, sizeof(int) * (size_t) E);
	for (size_t i = 0; i < nk; i++)
	{
		int			e = cs->h_sel[i],
					p = fill[e]++;

		cs->h_xrow[p] = (int) (i / k);
		cs->h_inv[i] = pad ? cs->moe_cls[e] + (p - cs->h_start[e]) : p;
	}
	return (pad || cuda_ok(be, cudaMemcpyAsync(d_xrow, cs->h_xrow, sizeof(int) * nk, cudaMemcpyHostToDevice,
											   cs->stream), "expert grouping upload")) &&
		cuda_ok(be, cudaMemcpyAsync(d_inv, cs->h_inv, sizeof(int) * nk, cudaMemcpyHostToDevice, cs->stream),
				"expert grouping upload") &&
		cuda_ok(be, cudaStreamSynchronize(cs->stream), "expert grouping upload");
}

/* ------------------------------------------------------------------ device grouping (prefill, variant 4) */

/*
 * An upper bound of the padded rows (moe_npad) of nk pairs over E experts,
 * known before the counts: a slot pads its c rows by at most 63 (multiples
 * of 64), or by at most 127 where the multiple of 128 pads less than 15 %
 * of c, which needs c > 420; at most nk / 400 experts have that many.  So
 * the rows are gathered before the host knows the layout.
 */
static size_t
pad_rows_max(size_t nk, int E)
{
	size_t		A = nk < (size_t) E ? nk : (size_t) E;

	return nk + 63 * A + 64 * (nk / 400);
}

/*
 * KL_CUDA_MOE_PREFILL=4, first half (cuda_internal.h): kk_moe_pad_group
 * writes d_inv and its summary, the summary goes to pinned memory
 * (cs->moe_pad_host) with an event after it, then the rows are gathered
 * (kk_gather_tok_bf16 into CB_MOE_X, sized by pad_rows_max) where gather16
 * (precision fp8's experts gather their FP8 rows themselves).  Nothing here
 * waits: the caller queues the shared expert before it waits for the
 * summary, so the device has work while the host lays out the classes.
 */
bool
cuda_moe_device_group(kl_backend *be, int n, int E, int k, const int *d_sel, int *d_inv, const float *x, int D,
					  bool gather16)
{
	cuda_state *cs = CS(be);
	size_t		nk = (size_t) n * k,
				cap = pad_rows_max(nk, E),
				wn = kk_moe_pad_group_ints(n, E);
	int			sn = 2 * E + 3;
	int		   *work;
	uint16_t   *x16;

	if (E > 1024 || k > 64 || cap > (size_t) INT_MAX)
		return false;
	if (!cs->moe_pad_done &&
		!cuda_ok(be, cudaEventCreateWithFlags(&cs->moe_pad_done, cudaEventDisableTiming), "cudaEventCreate (MoE)"))
		return false;
	if (cs->moe_pad_host_cap < sn)
	{
		cudaFreeHost(cs->moe_pad_host);
		cs->moe_pad_host = NULL;
		cs->moe_pad_host_cap = 0;
		if (!cuda_ok(be, cudaMallocHost((void **) &cs->moe_pad_host, sizeof(int) * (size_t) sn),
					 "cudaMallocHost (expert grouping summary)"))
			return false;
		cs->moe_pad_host_cap = sn;
	}
	work = cuda_buf(be, CB_MOE_PAD, sizeof(int) * (wn + (size_t) sn));
	x16 = gather16 ? cuda_buf(be, CB_MOE_X, sizeof(uint16_t) * cap * D) : NULL;
	if (!work || (gather16 && !x16))
		return false;
	if (kk_moe_pad_group(cs->stream, n, E, k, (int) cap, d_sel, work, work + wn, d_inv) != 0)
		return false;
	if (!cuda_launched(be, "expert grouping (device)") ||
		!cuda_ok(be, cudaMemcpyAsync(cs->moe_pad_host, work + wn, sizeof(int) * (size_t) sn, cudaMemcpyDeviceToHost,
									 cs->stream), "expert grouping summary download") ||
		!cuda_ok(be, cudaEventRecord(cs->moe_pad_done, cs->stream), "expert grouping summary download"))
		return false;
	if (!gather16)
		return true;
	kk_gather_tok_bf16(cs->stream, x16, x, D, d_inv, n, k, D);
	return cuda_launched(be, "gather rows token-major (bf16)");
}

/*
 * KL_CUDA_MOE_PREFILL=4, second half: waits for the summary alone (the
 * device goes on with whatever was queued after it), rebuilds the counts'
 * prefix sums in cs->h_start and the size classes with variant 3's own
 * moe_classes, and checks them against the device's layout (each expert's
 * first padded row and the padded total): the products are laid out by the
 * host's classes over rows the device placed.
 */
bool
cuda_moe_device_group_wait(kl_backend *be, int n, int E, int k)
{
	cuda_state *cs = CS(be);
	const int  *sm = cs->moe_pad_host;

	if (!cuda_ok(be, cudaEventSynchronize(cs->moe_pad_done), "expert grouping summary download"))
		return false;
	if (sm[2 * E + 1] != n * k)
	{
		cuda_fail(be, KL_E_INTERNAL, "internal error: %d of %d expert choices in range", sm[2 * E + 1], n * k);
		return false;
	}
	if (sm[2 * E + 2] != 0)
	{
		cuda_fail(be, KL_E_INTERNAL, "internal error: %d padded expert rows exceed the bound", sm[2 * E]);
		return false;
	}
	if (!cs->h_start)
	{
		/* (cuda_moe_host_group's size: it may reallocate this with its own arrays) */
		cs->h_start = malloc(sizeof(int) * 2 * ((size_t) E + 1));
		if (!cs->h_start)
		{
			cuda_fail(be, KL_E_RESOURCES, "out of memory grouping experts");
			return false;
		}
	}
	cs->h_start[0] = 0;
	for (int e = 0; e < E; e++)
		cs->h_start[e + 1] = cs->h_start[e] + sm[e];
	if (!moe_classes(be, E))
		return false;
	for (int e = 0; e < E; e++)
		if (cs->moe_cls[e] != sm[E + e])
		{
			cuda_fail(be, KL_E_INTERNAL, "internal error: expert %d's padded rows start at %d on the device, %d on "
					  "the host", e, sm[E + e], cs->moe_cls[e]);
			return false;
		}
	if (cs->moe_npad != sm[2 * E])
	{
		cuda_fail(be, KL_E_INTERNAL, "internal error: %d padded expert rows on the device, %d on the host",
				  sm[2 * E], cs->moe_npad);
		return false;
	}
	return true;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): kk_moe_pad_group on host choices sel [n][k] (E experts), with
 * the backend's bound of the padded rows, on the current device; inv [n k]
 * and summary [2 E + 3] (kernels.h) copied back.  inv is filled with a
 * negative pattern (bytes 0xf9) first, so that a pair the kernels miss
 * shows.  Returns 0, -1 when
 * the shape is not covered, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_moe_pad_group(int n, int E, int k, const int *sel, int *inv, int *summary)
{
	size_t		nk = (size_t) n * k,
				wn = kk_moe_pad_group_ints(n, E),
				cap = pad_rows_max(nk, E);
	int		   *d = NULL;
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0;

	if (n <= 0 || E <= 0 || k <= 0 || cap > (size_t) INT_MAX)
		return -1;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &d, sizeof(int) * (2 * nk + wn + 2 * (size_t) E + 3))) != cudaSuccess ||
		(e = cudaMemcpyAsync(d, sel, sizeof(int) * nk, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
		(e = cudaMemsetAsync(d + nk, 0xf9, sizeof(int) * nk, s)) != cudaSuccess)
		goto out;
	rc = kk_moe_pad_group(s, n, E, k, (int) cap, d, d + 2 * nk, d + 2 * nk + wn, d + nk);
	if (rc != 0)
		goto out;
	if ((e = cudaGetLastError()) != cudaSuccess ||
		(e = cudaMemcpyAsync(inv, d + nk, sizeof(int) * nk, cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
		(e = cudaMemcpyAsync(summary, d + 2 * nk + wn, sizeof(int) * (2 * (size_t) E + 3), cudaMemcpyDeviceToHost,
							 s)) != cudaSuccess)
		goto out;
	e = cudaStreamSynchronize(s);
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(d);
	if (s)
		cudaStreamDestroy(s);
	return rc != 0 ? rc : (int) e;
}

/* ------------------------------------------------------------------ grouped products (prefill, bf16) */

/*
 * One cublasGemmGroupedBatchedEx per stage instead of a product per used
 * expert: Y_g [cnt, rows] = X_g [cnt, cols] W_g^T for the listed groups
 * (bf16 operands, fp32 results).  Returns false with be->failed clear when
 * cuBLAS does not support it here (the caller then loops).
 */
typedef struct moe_group_list
{
	int			n;
	const void **W;
	const uint16_t **X;
	float	  **Y;
	int		   *cnt;
} moe_group_list;

static bool
grouped_gemm(kl_backend *be, const moe_group_list *g, int rows, int cols, int mark)
{
	cuda_state *cs = CS(be);
	int			n = g->n;
	cublasOperation_t *ta = malloc(sizeof(cublasOperation_t) * (size_t) n),
			   *tb = malloc(sizeof(cublasOperation_t) * (size_t) n);
	int		   *m = malloc(sizeof(int) * (size_t) n * 7);
	float	   *ab = malloc(sizeof(float) * 2 * (size_t) n);
	void	  **host = malloc(sizeof(void *) * 3 * (size_t) n);
	void	  **dev = cuda_buf(be, CB_MOE_PTRS, sizeof(void *) * 3 * (size_t) n);
	cublasStatus_t st = CUBLAS_STATUS_ALLOC_FAILED;
	bool		ok = false;

	if (!ta || !tb || !m || !ab || !host || !dev)
		goto out;
	for (int i = 0; i < n; i++)
	{
		ta[i] = CUBLAS_OP_T;
		tb[i] = CUBLAS_OP_N;
		m[i] = rows;			/* m */
		m[n + i] = g->cnt[i];	/* n */
		m[2 * n + i] = cols;	/* k */
		m[3 * n + i] = cols;	/* lda */
		m[4 * n + i] = cols;	/* ldb */
		m[5 * n + i] = rows;	/* ldc */
		m[6 * n + i] = 1;		/* group size */
		ab[i] = 1.0f;
		ab[n + i] = 0.0f;
		host[i] = (void *) g->W[i];
		host[n + i] = (void *) g->X[i];
		host[2 * n + i] = g->Y[i];
	}
	if (!cuda_upload_sync(be, dev, host, sizeof(void *) * 3 * (size_t) n))
		goto out;
	cuda_moe_mark(cs, mark);
	st = cublasGemmGroupedBatchedEx(cs->blas, ta, tb, m, m + n, m + 2 * n, ab, (const void *const *) dev,
									CUDA_R_16BF, m + 3 * n, (const void *const *) (dev + n), CUDA_R_16BF, m + 4 * n,
									ab + n, dev + 2 * n, CUDA_R_32F, m + 5 * n, n, m + 6 * n, CUBLAS_COMPUTE_32F);
	cuda_moe_mark(cs, mark + 1);
	if (st == CUBLAS_STATUS_NOT_SUPPORTED)
		cs->no_grouped_gemm = true;
	else
		ok = blas_ok(be, st, "GemmGroupedBatchedEx (experts)");
out:
	free(ta);
	free(tb);
	free(m);
	free(ab);
	free(host);
	return ok;
}

/* the experts of a prefill batch in bf16: three grouped products */
bool
cuda_moe_experts_grouped(kl_backend *be, const kl_moe_layer *w, const int *st, int E, int D, int F, const float *x,
						 const int *xrow, size_t nk, float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	uint16_t   *x16 = cuda_buf(be, CB_MOE_X, sizeof(uint16_t) * nk * D);
	uint16_t   *h16 = cuda_buf(be, CB_MOE_H16, sizeof(uint16_t) * nk * F);
	moe_group_list gl;
	bool		ok = false;
	int			na = 0;

	gl.W = malloc(sizeof(void *) * 2 * (size_t) E);
	gl.X = malloc(sizeof(void *) * 2 * (size_t) E);
	gl.Y = malloc(sizeof(void *) * 2 * (size_t) E);
	gl.cnt = malloc(sizeof(int) * 2 * (size_t) E);
	if (!x16 || !h16 || !gl.W || !gl.X || !gl.Y || !gl.cnt)
		goto out;
	kk_gather_rows_bf16(cs->stream, x16, x, D, xrow, (int) nk, D);
	if (!cuda_launched(be, "gather rows (bf16)"))
		goto out;
	for (int e = 0; e < E; e++)
		if (st[e + 1] > st[e])
		{
			gl.W[na] = w->experts[e].gate.dev;
			gl.X[na] = x16 + (size_t) st[e] * D;
			gl.Y[na] = g + (size_t) st[e] * F;
			gl.cnt[na++] = st[e + 1] - st[e];
			gl.W[na] = w->experts[e].up.dev;
			gl.X[na] = x16 + (size_t) st[e] * D;
			gl.Y[na] = u + (size_t) st[e] * F;
			gl.cnt[na++] = st[e + 1] - st[e];
		}
	gl.n = na;
	if (!grouped_gemm(be, &gl, F, D, 0))
		goto out;
	kk_swiglu_bf16(cs->stream, h16, g, u, nk * F);
	if (!cuda_launched(be, "swiglu (bf16)"))
		goto out;
	na = 0;
	for (int e = 0; e < E; e++)
		if (st[e + 1] > st[e])
		{
			gl.W[na] = w->experts[e].down.dev;
			gl.X[na] = h16 + (size_t) st[e] * F;
			gl.Y[na] = ye + (size_t) st[e] * D;
			gl.cnt[na++] = st[e + 1] - st[e];
		}
	gl.n = na;
	ok = grouped_gemm(be, &gl, D, F, 2);
out:
	free(gl.W);
	free(gl.X);
	free(gl.Y);
	free(gl.cnt);
	return ok;
}

/* ------------------------------------------------------------------ batched products over size classes */

/* variant 3's pinned pointer arrays for at least cap problems (grow-only) */
bool
cuda_moe_batch_arrays(kl_backend *be, int cap)
{
	cuda_state *cs = CS(be);

	if (cs->moe_grp_cap >= cap)
		return true;
	cudaFreeHost(cs->moe_grp_ptrs);
	cs->moe_grp_ptrs = NULL;
	cs->moe_grp_cap = 0;
	if (!cuda_ok(be, cudaMallocHost((void **) &cs->moe_grp_ptrs, sizeof(void *) * 4 * (size_t) cap),
				 "cudaMallocHost (batched GEMM pointers)"))
		return false;
	cs->moe_grp_cap = cap;
	return true;
}

/*
 * problem i of variant 3 in the pinned pointer arrays: A (the bf16 weights
 * the product reads), B (rows), C (results), and the quantized matrix that
 * A is converted from (NULL: A is the expert's own bf16 matrix)
 */
void
cuda_moe_batch_problem(cuda_state *cs, int i, const void *W, const void *X, void *C, const void *Wq)
{
	cs->moe_grp_ptrs[i] = (void *) W;
	cs->moe_grp_ptrs[cs->moe_grp_cap + i] = (void *) X;
	cs->moe_grp_ptrs[2 * cs->moe_grp_cap + i] = C;
	cs->moe_grp_ptrs[3 * cs->moe_grp_cap + i] = (void *) Wq;
}

/*
 * Quantized experts in variants 3 and 4: problems i0 .. i0 + count - 1's
 * quantized matrices (like W, [rows, cols]) converted into their A slots of
 * CB_MOE_WQ16, as the panels' bf16 values (kk_q_dequant_many_bf16).
 */
static bool
batch_dequant(kl_backend *be, void **dev, int i0, int count, const kl_weight *W)
{
	cuda_state *cs = CS(be);

	if (kk_q_dequant_many_bf16(cs->stream, dev + i0, (const void *const *) (dev + 3 * cs->moe_grp_cap + i0), count,
							   cuda_weight_fmt(W), W->q.group, W->rows, W->cols) != 0)
	{
		cuda_fail(be, KL_E_INTERNAL, "internal error: quantized experts of a shape the bf16 conversion does not take");
		return false;
	}
	return cuda_launched(be, "quantized experts to bf16");
}

/* problems i0 .. i0 + count - 1 of variant 3, all C [S, m] = X [S, kd] W^T, W [m, kd], in one batched call */
static cublasStatus_t
batch_call(cuda_state *cs, void **dev, int i0, int count, int m, int S, int kd)
{
	const float one = 1.0f,
				zero = 0.0f;
	int			cap = cs->moe_grp_cap;

	/* column-major view: C^T [m, S] = W [m, kd] (stored [kd, m] column-major, transposed) X^T [kd, S] */
	return cublasGemmBatchedEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, S, kd, &one, (const void *const *) (dev + i0),
							   CUDA_R_16BF, kd, (const void *const *) (dev + cap + i0), CUDA_R_16BF, kd, &zero,
							   dev + 2 * cap + i0, CUDA_R_16BF, m, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

/*
 * KL_CUDA_MOE_PREFILL=3: the routed experts of a prefill batch as batched
 * products over size classes (cuda_moe_host_group with pad, moe_classes).
 * Each used expert's rows sit in a slot of its class's size S (padded layout
 * of cs->moe_npad rows; d_inv names each pair's row): the rows are gathered
 * token-major as bf16 (kk_gather_tok_bf16: x read once), then per class one
 * cublasGemmBatchedEx for gate and up of all its experts (2 m problems of
 * [S, F], bf16 results), kk_swiglu_bf16_bf16 over the whole layout, and per
 * class one for down ([S, D], bf16 results).  Uniform m, n, k within a call
 * lets cuBLAS take its ordinary (Hopper) batched kernels (its grouped GEMM
 * ran an sm_80 kernel at 37 % of the GEMM rate).  Pad rows hold whatever the
 * buffer held: a product's output row depends only on its own input row,
 * and the combine reads only the pairs' rows, so their results are never
 * read.  g, u, h and the expert outputs are rounded to bf16; the combine
 * reads the bf16 outputs itself (cuda_defer_combine16).
 *
 * Returns the expert outputs [npad, D] (bf16), or NULL: be->failed set, or
 * clear when cuBLAS refused a call before the products completed
 * (moe_batched_refused, status in moe_batched_status; the caller then
 * groups again without padding and runs variant 0).  Buffers: g, u, ye (the
 * caller's fp32 ones, room for 2 (nk + n) bf16 rows each) when the padded
 * layout fits them, else working memory of their own.
 */
const uint16_t *
cuda_moe_experts_batched16(kl_backend *be, const kl_moe_layer *w, int D, int F, const float *x, const int *inv,
						   int n, int k, float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	uint16_t   *x16 = cuda_buf(be, CB_MOE_X, sizeof(uint16_t) * (size_t) cs->moe_npad * D);

	if (!x16)
		return NULL;
	kk_gather_tok_bf16(cs->stream, x16, x, D, inv, n, k, D);
	if (!cuda_launched(be, "gather rows token-major (bf16)"))
		return NULL;
	return cuda_moe_batched_products(be, w, D, F, n, k, g, u, ye);
}

/*
 * The bf16 results of the batched products (g16, u16 [Np, F], ye16 [Np, D]):
 * in the caller's fp32 g, u, ye where Np padded rows fit their room rows of
 * floats (a bf16 row takes half a float row), else in buffers of their own.
 * False: out of device memory (be->failed set).
 */
bool
cuda_moe_out16(kl_backend *be, float *g, float *u, float *ye, size_t room, size_t Np, int D, int F, uint16_t **g16,
			   uint16_t **u16, uint16_t **ye16)
{
	if (Np <= room)
	{
		*g16 = (uint16_t *) g;
		*u16 = (uint16_t *) u;
		*ye16 = (uint16_t *) ye;
		return true;
	}
	*g16 = cuda_buf(be, CB_MOE_GU16, sizeof(uint16_t) * 2 * Np * F);
	*u16 = *g16 ? *g16 + Np * F : NULL;
	*ye16 = cuda_buf(be, CB_MOE_Y16, sizeof(uint16_t) * Np * D);
	return *g16 && *ye16;
}

/*
 * The products of variants 3 and 4 (cuda_internal.h): x16 (CB_MOE_X) holds
 * the gathered rows in the padded layout of cs->moe_cls.
 */
const uint16_t *
cuda_moe_batched_products(kl_backend *be, const kl_moe_layer *w, int D, int F, int n, int k, float *g, float *u,
						  float *ye)
{
	cuda_state *cs = CS(be);
	size_t		Np = (size_t) cs->moe_npad,
				room = 2 * ((size_t) n * k + n);
	const int  *base = cs->moe_cls,
			   *order = base + cs->moe_cls_cap,
			   *size = order + cs->moe_cls_cap,
			   *first = size + cs->moe_cls_cap;
	int			ncls = cs->moe_ncls,
				A = first[ncls],
				cap;
	uint16_t   *x16 = cuda_buf(be, CB_MOE_X, sizeof(uint16_t) * Np * D),
			   *h16 = cuda_buf(be, CB_MOE_H16, sizeof(uint16_t) * Np * F),
			   *g16,
			   *u16,
			   *ye16,
			   *wq16 = NULL;
	void	  **dev;
	bool		qgu = false,
				qd = false;
	cublasStatus_t bst = CUBLAS_STATUS_SUCCESS;

	if (!x16 || !h16 || !cuda_moe_batch_arrays(be, 3 * cs->moe_cls_cap))
		return NULL;
	if (!cuda_moe_out16(be, g, u, ye, room, Np, D, F, &g16, &u16, &ye16))
		return NULL;
	cap = cs->moe_grp_cap;
	dev = cuda_buf(be, CB_MOE_PTRS, sizeof(void *) * 4 * (size_t) cap);
	if (!dev)
		return NULL;
	if (A > 0)
	{
		qgu = cuda_weight_quantized(&w->experts[order[0]].gate);
		qd = cuda_weight_quantized(&w->experts[order[0]].down);
	}
	/*
	 * Quantized experts: converted to bf16 stage by stage into one arena (the
	 * down matrices reuse the gate/up room: the stream has finished the
	 * gate/up products before their conversion starts)
	 */
	if ((qgu || qd) && !(wq16 = cuda_buf(be, CB_MOE_WQ16, sizeof(uint16_t) * (qgu ? 2 : 1) * (size_t) A * F * D)))
		return NULL;
	/* class after class: gate and up problems 2j, 2j + 1; down 2A + j (j: the expert's place in order) */
	for (int j = 0; j < A; j++)
	{
		const kl_mlp *ex = &w->experts[order[j]];
		size_t		b = (size_t) base[order[j]],
					FD = (size_t) F * D;

		cuda_moe_batch_problem(cs, 2 * j, qgu ? wq16 + 2 * j * FD : ex->gate.dev, x16 + b * D, g16 + b * F,
					  qgu ? ex->gate.dev : NULL);
		cuda_moe_batch_problem(cs, 2 * j + 1, qgu ? wq16 + (2 * j + 1) * FD : ex->up.dev, x16 + b * D, u16 + b * F,
					  qgu ? ex->up.dev : NULL);
		cuda_moe_batch_problem(cs, 2 * A + j, qd ? wq16 + j * FD : ex->down.dev, h16 + b * F, ye16 + b * D,
					  qd ? ex->down.dev : NULL);
	}
	/* (the previous op's copy of these arrays is complete: cuda_moe_host_group
	 * drained the stream since, or cuda_moe_device_group_wait waited for an
	 * event recorded after it) */
	if (!cuda_ok(be, cudaMemcpyAsync(dev, cs->moe_grp_ptrs, sizeof(void *) * ((qgu || qd) ? 4 : 3) * (size_t) cap,
									 cudaMemcpyHostToDevice, cs->stream), "batched GEMM pointers upload"))
		return NULL;
	cuda_moe_mark(cs, 0);
	if (qgu && !batch_dequant(be, dev, 0, 2 * A, &w->experts[order[0]].gate))
		return NULL;
	for (int c = 0; c < ncls && bst == CUBLAS_STATUS_SUCCESS; c++)
		bst = batch_call(cs, dev, 2 * first[c], 2 * (first[c + 1] - first[c]), F, size[c], D);
	cuda_moe_mark(cs, 1);
	if (bst == CUBLAS_STATUS_SUCCESS)
	{
		kk_swiglu_bf16_bf16(cs->stream, h16, g16, u16, Np * F);
		if (!cuda_launched(be, "swiglu (bf16 from bf16)"))
			return NULL;
		cuda_moe_mark(cs, 2);
		if (qd && !batch_dequant(be, dev, 2 * A, A, &w->experts[order[0]].down))
			return NULL;
		for (int c = 0; c < ncls && bst == CUBLAS_STATUS_SUCCESS; c++)
			bst = batch_call(cs, dev, 2 * A + first[c], first[c + 1] - first[c], D, size[c], F);
		cuda_moe_mark(cs, 3);
	}
	if (bst != CUBLAS_STATUS_SUCCESS)
	{
		cs->moe_batched_refused = true;
		cs->moe_batched_status = (int) bst;
		cs->moe_ev_mask = 0;
		return NULL;
	}
	return ye16;
}
