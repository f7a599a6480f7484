/*
 * cuda_backend.c — the CUDA implementation of backend.h, built as the shared
 * library kimi_linear_cuda.so that the engine loads with dlopen()
 * (backend_cuda_loader.c); its only exports are kl_cuda_backend_create and
 * kl_cuda_backend_abi_version (the loader refuses a library built for another
 * KL_BACKEND_ABI_VERSION), and one hook for test_cuda.c
 * (kl_cuda_test_route_group, cuda_moe.c).
 *
 * This file: creation, device memory, weights (upload, conversion for the
 * precision mode, random weights made on the device), the element-wise ops,
 * synchronization and the ops table.  One CUDA stream carries all the work,
 * so every op is ordered after the previous one without host waits; upload
 * and download wait for the stream.
 *
 * Quantized weights (FP8, int8, int4: quant.h) stay resident as they are, one
 * object each in kernels.h's layout (data, then fp32 scales); the products
 * read them directly (cuda_matmul.c, cuda_moe.c).
 *
 * Precision: weights stay as stored (bf16 or fp32).  "fp32" computes in fp32
 * with TF32 off (cuBLAS pedantic math), to match the CPU engine within
 * rounding.  "bf16" feeds the products of bf16 weights bf16 activations with
 * fp32 accumulation; fp32 weights are not rounded to bf16 (that would change
 * the model itself: the tiny_a checkpoint's logits move by 20% as expert
 * choices flip) and their products use TF32 tensor cores instead.  "fp8" is
 * bf16 with FP8 activations (rounded per row to E4M3) in the prefill
 * products of FP8 per-channel weights, on cuBLASLt (cuda_fp8.c; sm_89 on).
 *
 * The library is self-contained: it uses the engine's headers for the data
 * structures and inline helpers but calls no engine function, because the
 * executable that loads it need not export its symbols.
 */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

_Static_assert(KK_MLA_PAGE == KL_MLA_PAGE, "kernels/kernels.h and backend.h disagree on the MLA page size");


/* ------------------------------------------------------------------ errors */

/* (kl_errc's twin: this library calls no engine function) */
static void
set_err(kl_err *err, kl_errcode code, const char *fmt, va_list ap)
{
	err->code = code;
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
}

static int
errf(kl_err *err, kl_errcode code, const char *fmt,...) __attribute__((format(printf, 3, 4)));

static int
errf(kl_err *err, kl_errcode code, const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	set_err(err, code, fmt, ap);
	va_end(ap);
	return KL_FAIL;
}

/* A failed CUDA call: out of device memory is KL_E_RESOURCES, anything else internal. */
static kl_errcode
cuda_code(cudaError_t e)
{
	return e == cudaErrorMemoryAllocation ? KL_E_RESOURCES : KL_E_INTERNAL;
}

void
cuda_fail(kl_backend *be, kl_errcode code, const char *fmt,...)
{
	va_list		ap;

	if (be->failed)
		return;					/* keep the first error: later ones are its consequences */
	va_start(ap, fmt);
	set_err(&be->err, code, fmt, ap);
	va_end(ap);
	be->failed = true;
	cuda_abort_capture(be);
}

int
cuda_take_failure(kl_backend *be, kl_err *err, const char *context)
{
	be->failed = false;
	err->code = be->err.code;
	if (context)
		snprintf(err->msg, sizeof(err->msg), "%s: %.900s", context, be->err.msg);
	else
		snprintf(err->msg, sizeof(err->msg), "%s", be->err.msg);
	return KL_FAIL;
}

bool
cuda_ok(kl_backend *be, cudaError_t e, const char *what)
{
	if (e == cudaSuccess)
		return true;
	cuda_fail(be, cuda_code(e), "CUDA error in %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
	return false;
}

bool
cuda_launched(kl_backend *be, const char *what)
{
	return cuda_ok(be, cudaGetLastError(), what);
}

bool
blas_ok(kl_backend *be, cublasStatus_t st, const char *what)
{
	if (st == CUBLAS_STATUS_SUCCESS)
		return true;
	cuda_fail(be, st == CUBLAS_STATUS_ALLOC_FAILED ? KL_E_RESOURCES : KL_E_INTERNAL, "cuBLAS error in %s: %s", what, cublasGetStatusString(st));
	return false;
}

/* ------------------------------------------------------------------ scratch */

static void
defer_free(kl_backend *be, void *p)
{
	cuda_state *cs = CS(be);

	if (cs->n_deferred == cs->cap_deferred)
	{
		int			cap = cs->cap_deferred ? cs->cap_deferred * 2 : 16;
		void	  **nd = realloc(cs->deferred, sizeof(void *) * (size_t) cap);

		if (!nd)
			return;				/* leak rather than free memory a graph uses */
		cs->deferred = nd;
		cs->cap_deferred = cap;
	}
	cs->deferred[cs->n_deferred++] = p;
}

static bool
graphs_exist(cuda_state *cs)
{
	if (cs->mode == GM_CAPTURE)
		return true;
	for (int i = 0; i < CUDA_MAX_GRAPHS; i++)
		if (cs->graphs[i].exec)
			return true;
	return false;
}

void *
cuda_buf(kl_backend *be, int id, size_t bytes)
{
	cuda_state *cs = CS(be);

	if (cs->buf_cap[id] < bytes)
	{
		size_t		cap = bytes + bytes / 4 + 4096;
		void	   *p = NULL;

		if (!cuda_ok(be, cudaMalloc(&p, cap), "cudaMalloc (working memory)"))
		{
			kl_err		e = be->err;

			be->failed = false;
			cuda_fail(be, KL_E_RESOURCES, "out of GPU memory for %zu MB of working memory (%s)", cap >> 20, e.msg);
			return NULL;
		}
		if (cs->buf[id])
		{
			/* a captured graph may still point at the old buffer */
			if (graphs_exist(cs))
				defer_free(be, cs->buf[id]);
			else
				cudaFree(cs->buf[id]);
		}
		cs->buf[id] = p;
		cs->buf_cap[id] = cap;
	}
	return cs->buf[id];
}

/* ------------------------------------------------------------------ memory */

static void *
cu_alloc(kl_backend *be, size_t bytes)
{
	cuda_state *cs = CS(be);
	void	   *p;
	size_t		rounded = (bytes + 255) & ~(size_t) 255;

	if (rounded < bytes || !(p = cuda_pool_alloc(be, rounded)))
		return NULL;
	/* zeroed in stream order: after any earlier user of recycled memory */
	if (cudaMemsetAsync(p, 0, rounded ? rounded : 256, cs->stream) != cudaSuccess)
	{
		cudaGetLastError();
		cuda_pool_free(be, p);
		return NULL;
	}
	return p;
}

static void
cu_release(kl_backend *be, void *p)
{
	if (!p)
		return;
	cuda_flush_add(be);
	cuda_graphs_forget_buffer(be, p);
	cuda_pool_free(be, p);
}

bool
cuda_upload_sync(kl_backend *be, void *dst, const void *src, size_t bytes)
{
	cuda_state *cs = CS(be);

	return cuda_ok(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cs->stream), "upload") &&
		cuda_ok(be, cudaStreamSynchronize(cs->stream), "upload");
}

static void
cu_upload(kl_backend *be, void *dst, const void *src, size_t bytes)
{
	cuda_flush_add(be);
	cuda_acts_invalid(CS(be));	/* (it may write over a bf16 twin's rows) */
	cuda_r16_flush(be);			/* (or a kept bf16 result's: widened first, then written over) */
	if (bytes)
		cuda_upload_sync(be, dst, src, bytes);
}

static void
cu_download(kl_backend *be, void *dst, const void *src, size_t bytes)
{
	cuda_state *cs = CS(be);

	cuda_flush_add(be);
	cuda_r16_flush(be);			/* (src may be a kept bf16 result's y) */
	if (bytes == 0)
		return;
	if (!cuda_ok(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cs->stream), "download") ||
		!cuda_ok(be, cudaStreamSynchronize(cs->stream), "download"))
		memset(dst, 0, bytes);	/* never hand out uninitialized host memory */
}

/* MLA cache rows to / from fp32 host rows (the cache may hold bf16) */
static void
cu_read_mla_rows(kl_backend *be, float *dst, const void *page, int row, int n, int width)
{
	cuda_state *cs = CS(be);
	size_t		cnt = (size_t) n * width;

	if (!cs->mla_c16)
	{
		cu_download(be, dst, (const float *) page + (size_t) row * width, cnt * sizeof(float));
		return;
	}
	{
		uint16_t   *tmp = malloc(cnt * sizeof(uint16_t) + 1);

		if (!tmp)
		{
			cuda_fail(be, KL_E_RESOURCES, "out of memory reading the attention cache");
			memset(dst, 0, cnt * sizeof(float));
			return;
		}
		cu_download(be, tmp, (const uint16_t *) page + (size_t) row * width, cnt * sizeof(uint16_t));
		for (size_t i = 0; i < cnt; i++)
		{
			float		f = kl_bf16_to_f32(tmp[i]);

			memcpy((char *) dst + i * sizeof(float), &f, sizeof(float));	/* dst may be unaligned */
		}
		free(tmp);
	}
}

static void
cu_write_mla_rows(kl_backend *be, void *page, int row, const float *src, int n, int width)
{
	cuda_state *cs = CS(be);
	size_t		cnt = (size_t) n * width;

	if (!cs->mla_c16)
	{
		cu_upload(be, (float *) page + (size_t) row * width, src, cnt * sizeof(float));
		return;
	}
	{
		uint16_t   *tmp = malloc(cnt * sizeof(uint16_t) + 1);

		if (!tmp)
		{
			cuda_fail(be, KL_E_RESOURCES, "out of memory writing the attention cache");
			return;
		}
		for (size_t i = 0; i < cnt; i++)
		{
			float		f;

			memcpy(&f, (const char *) src + i * sizeof(float), sizeof(float));
			tmp[i] = kl_f32_to_bf16(f);
		}
		cu_upload(be, (uint16_t *) page + (size_t) row * width, tmp, cnt * sizeof(uint16_t));
		free(tmp);
	}
}

static void
cu_copy(kl_backend *be, void *dst, const void *src, size_t bytes)
{
	if (cuda_step_skip(be, OP_COPY, (uintptr_t) dst, (uintptr_t) src, bytes, 0))
		return;
	if (dst != src && bytes)
		cuda_ok(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, CS(be)->stream), "copy");
}

/* ------------------------------------------------------------------ weights */

/* (the engine's kl_dtype_size is not callable from this library) */
static size_t
dtype_size(kl_dtype t)
{
	return t == KL_DT_F32 ? 4 : 2;
}

/* a quantized weight was made on the device: of the dense FP8 decode products' shape (mma_q.cu's mx_ok), its
 * products' inputs get bf16 twins from their producers (KL_CUDA_Q_TWIN, cuda_twin_out) */
static void
note_fp8_dense(cuda_state *cs, const kl_weight *w)
{
	if (cuda_weight_fmt(w) == KK_WF_FP8 && w->q.group >= w->cols && w->cols % 64 == 0)
		cs->q_fp8_dense = true;
}

/*
 * A quantized weight (quant.h's forms) becomes one device object in
 * kernels.h's layout: the data rows as they are, then the fp32 scales at
 * kk_q_scale_offset.  w->q keeps its shape fields (the kernels' fmt and
 * group); its host data and scales stay the loader's and are not read after.
 */
static int
load_quantized(kl_backend *be, kl_weight *w, kl_err *err)
{
	cuda_state *cs = CS(be);
	int			fmt = cuda_weight_fmt(w);
	const kl_qmat *q = &w->q;
	size_t		rb = kk_q_row_bytes(fmt, w->cols),
				bytes,
				ns;
	char	   *p;

	if (q->rows != w->rows || q->cols != w->cols || q->row_bytes != rb || q->group <= 0 ||
		q->n_groups != kk_q_groups(w->cols, q->group) || !q->data || !q->scales)
		return errf(err, KL_E_INTERNAL, "a %s weight of %d x %d has an inconsistent layout (rows %d, cols %d, "
					"%zu bytes a row, group %d, %d groups)", w->q.type == KL_Q_INT4 ? "int4" :
					w->q.type == KL_Q_INT8 ? "int8" : "fp8", w->rows, w->cols, q->rows, q->cols, q->row_bytes,
					q->group, q->n_groups);
	bytes = kk_q_bytes(w->rows, fmt, w->cols, q->group);
	ns = (size_t) w->rows * q->n_groups;
	if (!(p = cuda_pool_alloc(be, bytes)))
		return errf(err, KL_E_RESOURCES, "out of GPU memory for a %d x %d quantized weight (%zu MB)", w->rows,
					w->cols, bytes >> 20);
	/* (the gap before the scales zeroed: no uninitialized bytes in a weight) */
	if (!cuda_ok(be, cudaMemsetAsync(p, 0, bytes, cs->stream), "memset (weight)") ||
		!cuda_ok(be, cudaMemcpyAsync(p, q->data, (size_t) w->rows * rb, cudaMemcpyHostToDevice, cs->stream),
				 "upload") ||
		!cuda_upload_sync(be, p + kk_q_scale_offset(w->rows, fmt, w->cols), q->scales, ns * sizeof(float)))
	{
		cuda_pool_free(be, p);
		be->failed = false;
		return errf(err, be->err.code, "loading onto the GPU: %s", be->err.msg);
	}
	w->dev = p;
	note_fp8_dense(cs, w);
	return KL_OK;
}

static int
cu_load_weight(kl_backend *be, kl_weight *w, kl_err *err)
{
	size_t		n = (size_t) w->rows * w->cols;
	float	   *widened = NULL;
	const void *src = w->host;
	size_t		bytes;
	void	   *p = NULL;

	if (cuda_weight_quantized(w))
		return load_quantized(be, w, err);
	if (w->dtype == KL_DT_F16)
	{
		/* no f16 kernels: widen once to f32 (exact), as the CPU backend does */
		const uint16_t *h = w->host;

		widened = malloc(n * sizeof(float));
		if (!widened)
			return errf(err, KL_E_RESOURCES, "out of host memory converting an f16 weight");
		for (size_t i = 0; i < n; i++)
		{
			uint16_t	x = h[i];
			uint32_t	sign = (uint32_t) (x >> 15) << 31,
						e = (x >> 10) & 31,
						m = x & 1023,
						u;
			float		f;

			if (e == 0)
			{
				f = (float) m * (1.0f / 16777216.0f);	/* subnormal: m * 2^-24 */
				widened[i] = sign ? -f : f;
				continue;
			}
			u = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
			memcpy(&f, &u, 4);
			widened[i] = f;
		}
		src = widened;
		w->dtype = KL_DT_F32;
	}
	bytes = n * dtype_size(w->dtype);
	if (!(p = cuda_pool_alloc(be, bytes)))
	{
		free(widened);
		return errf(err, KL_E_RESOURCES, "out of GPU memory for a %d x %d weight", w->rows, w->cols);
	}
	if (!cuda_upload_sync(be, p, src, bytes))
	{
		free(widened);
		cuda_pool_free(be, p);
		be->failed = false;
		return errf(err, be->err.code, "loading onto the GPU: %s", be->err.msg);
	}
	free(widened);
	w->dev = p;
	return KL_OK;
}

static int
cu_init_random_weight(kl_backend *be, kl_weight *w, uint64_t seed, float scale, kl_err *err)
{
	cuda_state *cs = CS(be);
	size_t		n = (size_t) w->rows * w->cols;
	void	   *p = NULL;

	if (cuda_weight_quantized(w))
	{
		/* random quantized weights in the form the loader set in w->q (ops.random_quantized) */
		int			fmt = cuda_weight_fmt(w);

		if (w->q.group <= 0 || w->q.rows != w->rows || w->q.cols != w->cols)
			return errf(err, KL_E_INTERNAL, "random quantized weight of %d x %d without a valid group", w->rows,
						w->cols);
		if (!(p = cuda_pool_alloc(be, kk_q_bytes(w->rows, fmt, w->cols, w->q.group))))
			return errf(err, KL_E_RESOURCES, "out of GPU memory for a %d x %d quantized weight", w->rows, w->cols);
		cudaMemsetAsync(p, 0, kk_q_bytes(w->rows, fmt, w->cols, w->q.group), cs->stream);
		kk_q_fill_random(cs->stream, p, fmt, w->q.group, w->rows, w->cols, seed, scale);
		note_fp8_dense(cs, w);
	}
	else
	{
		if (w->dtype == KL_DT_F16)
			w->dtype = KL_DT_F32;
		if (!(p = cuda_pool_alloc(be, n * dtype_size(w->dtype))))
			return errf(err, KL_E_RESOURCES, "out of GPU memory for a %d x %d weight", w->rows, w->cols);
		kk_fill_random(cs->stream, p, w->dtype == KL_DT_BF16, n, seed, scale);
	}
	if (!cuda_launched(be, "fill_random"))
	{
		cuda_pool_free(be, p);
		be->failed = false;
		return errf(err, be->err.code, "%s", be->err.msg);
	}
	w->dev = p;
	return KL_OK;
}

static void
cu_unload_weight(kl_backend *be, kl_weight *w)
{
	if (w->dev)
		cuda_pool_free(be, w->dev);
	w->dev = NULL;
}

/* ------------------------------------------------------------------ element-wise */

/*
 * The residual add h += x is held back: forward.c follows it with the
 * rmsnorm of h, and one kernel does both (a launch and a pass over h
 * saved per add).  Any other op launches a held-back add first.
 */
void
cuda_flush_add(kl_backend *be)
{
	cuda_state *cs = CS(be);

	if (cs->pend_moe)
	{
		cs->pend_moe = false;
		cuda_acts_invalid(cs);	/* (writes that may be a bf16 twin's rows) */
		if (!be->failed)
		{
			if (cs->pm_ye16)
				kk_moe_combine16(cs->stream, cs->pm_y, cs->pm_n, cs->pm_D, cs->pm_k, cs->pm_wts, cs->pm_inv,
								 cs->pm_ye16, cs->pm_ys);
			else
				kk_moe_combine(cs->stream, cs->pm_y, cs->pm_n, cs->pm_D, cs->pm_k, cs->pm_wts, cs->pm_inv,
							   cs->pm_ye, cs->pm_ys);
			cuda_launched(be, "moe_combine");
		}
	}
	if (!cs->pend)
		return;
	cs->pend = false;
	cuda_acts_invalid(cs);
	if (be->failed)
		return;
	kk_add(cs->stream, cs->pend_y, cs->pend_x, cs->pend_n);
	cuda_launched(be, "add");
}

void
cuda_defer_combine(kl_backend *be, float *y, int n, int D, int k, const float *wts, const int *inv, const float *ye,
				   const float *ys)
{
	cuda_state *cs = CS(be);

	cuda_flush_add(be);
	if (be->failed)
		return;
	cs->pend_moe = true;
	cs->pm_y = y;
	cs->pm_n = n;
	cs->pm_D = D;
	cs->pm_k = k;
	cs->pm_wts = wts;
	cs->pm_inv = inv;
	cs->pm_ye = ye;
	cs->pm_ye16 = NULL;
	cs->pm_ys = ys;
	cs->pm_route_early = false;	/* (cuda_moe's fused decode path sets it) */
}

void
cuda_defer_combine16(kl_backend *be, float *y, int n, int D, int k, const float *wts, const int *inv,
					 const uint16_t *ye16, const float *ys)
{
	cuda_defer_combine(be, y, n, D, k, wts, inv, NULL, ys);
	CS(be)->pm_ye16 = ye16;
}

/* a producer launched the bf16 twin y16 of y [rows, d] (contiguous): the products of y read it */
static void
twin_made(kl_backend *be, const float *y, int rows, int d, const uint16_t *y16)
{
	cuda_twin_set(CS(be), y, d, rows, d, y16, false);
}

static void
cu_rmsnorm(kl_backend *be, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int d, float eps)
{
	cuda_state *cs = CS(be);
	uint16_t   *y16;

	if (cuda_step_skip(be, OP_RMSNORM, (uintptr_t) y, (uintptr_t) x, (uintptr_t) w, (uintptr_t) rows * 65536 + d))
		return;
	/* the products of y that follow read its bf16 twin, written here (KL_CUDA_BF16_TWIN; not for a
	 * part of the rows, as kv_a_layernorm's, which no product reads) */
	y16 = ldy == d ? cuda_twin_out(be, rows, d) : NULL;
	if (be->failed)
		return;
	if (cs->pend && cs->pend_moe && cs->pend_x == cs->pm_y && cs->pend_y == x && ldx == d && ldy == d &&
		rows == cs->pm_n && d == cs->pm_D && cs->pend_n == (size_t) rows * d && y != cs->pm_y)
	{
		/*
		 * MoE combine + residual add + norm in one kernel.  Its early form
		 * (KL_CUDA_NORM_EARLY) may read the residual before its PDL wait: the
		 * kernel right before is the MoE op's last (every other op launches
		 * the held combine first), and the MoE op's kernels write only the
		 * backend's scratch (the combine's output is this kernel's); and the
		 * routing weights and indices after cuda_moe's fused decode path.
		 */
		int			early = !cs->norm_early ? 0 : cs->norm_early >= 2 && cs->pm_route_early ? 2 : 1;

		cs->pend = cs->pend_moe = false;
		if (y16 && kk_row_norm_twin(cs->stream, cs->pm_ye16 ? 3 : 2, y, d, y16, cs->pend_y, d, NULL, w, rows, d, eps,
									cs->pm_k, cs->pm_wts, cs->pm_inv,
									cs->pm_ye16 ? (const void *) cs->pm_ye16 : (const void *) cs->pm_ye, cs->pm_ys,
									early) == 0)
			twin_made(be, y, rows, d, y16);
		else if (cs->pm_ye16)
			kk_moe_combine16_add_rmsnorm(cs->stream, y, cs->pend_y, rows, d, cs->pm_k, cs->pm_wts, cs->pm_inv,
										 cs->pm_ye16, cs->pm_ys, w, eps);
		else
			kk_moe_combine_add_rmsnorm(cs->stream, y, cs->pend_y, rows, d, cs->pm_k, cs->pm_wts, cs->pm_inv,
									   cs->pm_ye, cs->pm_ys, w, eps);
		cuda_launched(be, "moe_combine_add_rmsnorm");
		return;
	}
	if (cs->pend_moe)
		cuda_flush_add(be);
	if (cs->pend && cs->pend_y == x && ldx == d && ldy == d && cs->pend_n == (size_t) rows * d && cs->pend_x != x)
	{
		cs->pend = false;
		if (y16 && kk_row_norm_twin(cs->stream, 1, y, d, y16, cs->pend_y, d, cs->pend_x, w, rows, d, eps, 0, NULL,
									NULL, NULL, NULL, cs->norm_early ? 1 : 0) == 0)
			twin_made(be, y, rows, d, y16);
		else
			kk_add_rmsnorm(cs->stream, y, cs->pend_y, cs->pend_x, w, rows, d, eps);
		cuda_launched(be, "add_rmsnorm");
		return;
	}
	cuda_flush_add(be);
	if (y16 && kk_row_norm_twin(cs->stream, 0, y, ldy, y16, (float *) x, ldx, NULL, w, rows, d, eps, 0, NULL, NULL,
								NULL, NULL, cs->norm_early ? 1 : 0) == 0)
		twin_made(be, y, rows, d, y16);
	else
		kk_rmsnorm(cs->stream, y, ldy, x, ldx, w, rows, d, eps);
	cuda_launched(be, "rmsnorm");
}

static void
cu_add(kl_backend *be, float *y, const float *x, size_t count)
{
	cuda_state *cs = CS(be);

	if (cuda_step_skip(be, OP_ADD, (uintptr_t) y, (uintptr_t) x, count, 0))
		return;
	/* y += (a held-back MoE combine's output): both stay held back for the norm */
	if (!(cs->pend_moe && !cs->pend && x == cs->pm_y && count == (size_t) cs->pm_n * cs->pm_D))
		cuda_flush_add(be);
	cs->pend = true;
	cs->pend_y = y;
	cs->pend_x = x;
	cs->pend_n = count;
}

static void
cu_swiglu(kl_backend *be, float *h, const float *g, const float *u, int rows, int width, int ld)
{
	uint16_t   *h16;

	if (cuda_step_skip(be, OP_SWIGLU, (uintptr_t) h, (uintptr_t) g, (uintptr_t) u, (uintptr_t) rows * 65536 + width))
		return;
	/* the down product that follows reads h's bf16 twin (KL_CUDA_BF16_TWIN) */
	h16 = cuda_twin_out(be, rows, width);
	if (be->failed)
		return;
	if (h16 && kk_swiglu_twin(CS(be)->stream, h, h16, g, u, rows, width, ld) == 0)
		twin_made(be, h, rows, width, h16);
	else
		kk_swiglu(CS(be)->stream, h, g, u, rows, width, ld);
	cuda_launched(be, "swiglu");
}

/*
 * A hint from forward.c: W is read after the mixer's small kernels.  Decode
 * steps of cs->prefetch_min..PREFETCH_MAX_TOKENS tokens start fetching it into L2 now
 * (kk_prefetch_weight), while those kernels leave DRAM idle.  The hints of
 * one window (consecutive prefetch ops) are taken in order while they fit in
 * cs->prefetch_budget bytes: more would evict what was fetched first.
 */
#define PREFETCH_MAX_TOKENS 16	/* above, it cost 0.07 ms a step (batch 32, 64 on the H200) */

static void
cu_prefetch(kl_backend *be, const kl_weight *W)
{
	cuda_state *cs = CS(be);
	size_t		bytes = cuda_weight_bytes(W);

	if (cuda_step_skip(be, OP_PREFETCH, (uintptr_t) W, 0, 0, 0))
		return;
	if (cs->n_tokens < cs->prefetch_min || cs->n_tokens > PREFETCH_MAX_TOKENS || !W->dev || cs->prefetch_used + bytes > cs->prefetch_budget)
		return;
	if (cuda_weight_quantized(W) && !cs->prefetch_q)
		return;					/* (KL_CUDA_PREFETCH_Q: slower for FP8 weights, whose products read half the bytes) */
	if (cs->prefetch_used == 0)
	{
		/* the window's first hint: fork the side stream off the step here */
		cuda_prefetch_join(be);
		if (!cuda_ok(be, cudaEventRecord(cs->pf_fork, cs->stream), "prefetch fork") ||
			!cuda_ok(be, cudaStreamWaitEvent(cs->pf_stream, cs->pf_fork, 0), "prefetch fork"))
			return;
		cs->pf_wait_for = W;
	}
	cs->prefetch_used += bytes;
	kk_prefetch_weight(cs->pf_stream, W->dev, bytes);
	if (cuda_launched(be, "prefetch") && cuda_ok(be, cudaEventRecord(cs->pf_join, cs->pf_stream), "prefetch"))
		cs->pf_pending = true;
}

/* the step's stream waits for the prefetches forked off it (a graph capture
 * must join every stream it forked before it ends) */
void
cuda_prefetch_join(kl_backend *be)
{
	cuda_state *cs = CS(be);

	if (!cs->pf_pending)
		return;
	cs->pf_pending = false;
	cs->pf_wait_for = NULL;
	cuda_ok(be, cudaStreamWaitEvent(cs->stream, cs->pf_join, 0), "prefetch join");
}

static void
cu_sync(kl_backend *be)
{
	cuda_state *cs = CS(be);

	/* inside a step that is being captured or replayed there is nothing to wait for yet */
	if (cs->mode != GM_EAGER)
		return;
	cuda_flush_add(be);
	cuda_ok(be, cudaStreamSynchronize(cs->stream), "synchronize");
}

static void
cu_destroy(kl_backend *be)
{
	cuda_state *cs = CS(be);

	cudaStreamSynchronize(cs->stream);
	cuda_graphs_destroy(be);
	cuda_moe_free(be);
	cuda_fp8_free(cs);
	for (int i = 0; i < CB_COUNT; i++)
		cudaFree(cs->buf[i]);
	for (int i = 0; i < cs->n_deferred; i++)
		cudaFree(cs->deferred[i]);
	free(cs->deferred);
	cudaFreeHost(cs->meta_host);
	cudaFree(cs->meta_dev);
	cudaFreeHost(cs->ids_host);
	cudaFree(cs->ids_dev);
	cudaFreeHost(cs->smp_host);
	cudaFree(cs->smp_dev);
	cudaEventDestroy(cs->meta_done);
	cudaEventDestroy(cs->ids_done);
	cudaStreamSynchronize(cs->pf_stream);
	cudaEventDestroy(cs->pf_fork);
	cudaEventDestroy(cs->pf_join);
	cudaStreamDestroy(cs->pf_stream);
	free(cs->h_absorbed);
	free(cs->h_sel);
	free(cs->h_xrow);
	free(cs->h_inv);
	free(cs->h_start);
	free(cs->moe_cls);
	cudaFreeHost(cs->moe_grp_ptrs);
	cuda_pool_destroy(be);
	cublasDestroy(cs->blas);
	cudaFree(cs->blas_ws);
	cudaStreamDestroy(cs->stream);
	free(cs);
	free(be);
}

static const kl_backend_ops cuda_ops = {
	.name = "cuda",
	.alloc = cu_alloc,
	.release = cu_release,
	.upload = cu_upload,
	.download = cu_download,
	.copy = cu_copy,
	.load_weight = cu_load_weight,
	.unload_weight = cu_unload_weight,
	.init_random_weight = cu_init_random_weight,
	.prepare_mla = cuda_prepare_mla,
	.release_mla = cuda_release_mla,
	.embed = cuda_embed,
	.rmsnorm = cu_rmsnorm,
	.matmul = cuda_matmul,
	.matmul_batch = cuda_matmul_batch,
	.add = cu_add,
	.swiglu = cu_swiglu,
	.read_mla_rows = cu_read_mla_rows,
	.write_mla_rows = cu_write_mla_rows,
	.kda = cuda_kda,
	.mla = cuda_mla,
	.moe = cuda_moe,
	.sample = cuda_sample,
	.prefetch = cu_prefetch,
	.begin_step = cuda_begin_step,
	.end_step = cuda_end_step,
	.sync = cu_sync,
	.destroy = cu_destroy,
	.quantized_weights = true,
	.random_quantized = true,
};

/* Shapes the kernels do not cover are refused at creation, with the reason. */
static int
check_config(const kl_config *cfg, kl_err *err)
{
	int			K = cfg->kda_head_dim;

	if (cfg->n_kda_layers > 0 && K != 32 && K != 64 && K != 128)
		return errf(err, KL_E_UNSUPPORTED, "the CUDA backend supports KDA head sizes 32, 64 and 128, not %d", K);
	if (cfg->n_kda_layers > 0 && (cfg->conv_kernel < 1 || cfg->conv_kernel > 8))
		return errf(err, KL_E_UNSUPPORTED, "the CUDA backend supports short convolutions of 1 to 8 taps, not %d", cfg->conv_kernel);
	if (cfg->n_experts > 1024)
		return errf(err, KL_E_UNSUPPORTED, "the CUDA backend supports at most 1024 experts, not %d", cfg->n_experts);
	if (cfg->n_experts > 0 && cfg->experts_per_token > 64)
		return errf(err, KL_E_UNSUPPORTED, "the CUDA backend supports at most 64 experts per token, not %d", cfg->experts_per_token);
	return KL_OK;
}

/* The backend.h this library was built with; the loader checks it before anything else. */
__attribute__((visibility("default"))) int
kl_cuda_backend_abi_version(void)
{
	return KL_BACKEND_ABI_VERSION;
}

__attribute__((visibility("default"))) int
kl_cuda_backend_create(const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err)
{
	int			ndev = 0,
				idx = opts ? opts->device_index : 0;
	const char *prec = opts && opts->precision ? opts->precision : "fp32";
	cudaError_t e;
	kl_backend *be;
	cuda_state *cs;

	*out = NULL;
	if (check_config(cfg, err) != KL_OK)
		return KL_FAIL;
	e = cudaGetDeviceCount(&ndev);
	if (e != cudaSuccess || ndev == 0)
	{
		cudaGetLastError();
		return errf(err, KL_E_UNSUPPORTED, "no usable CUDA GPU: %s", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
	}
	if (idx < 0 || idx >= ndev)
		return errf(err, KL_E_INVALID, "GPU %d does not exist (this machine has %d)", idx, ndev);
	if (strcmp(prec, "fp32") != 0 && strcmp(prec, "bf16") != 0 && strcmp(prec, "fp8") != 0)
		return errf(err, KL_E_INVALID, "unknown precision \"%s\" (use fp32, bf16 or fp8)", prec);
	if ((e = cudaSetDevice(idx)) != cudaSuccess)
		return errf(err, cuda_code(e), "cannot use GPU %d: %s", idx, cudaGetErrorString(e));
	if (strcmp(prec, "fp8") == 0)
	{
		int			major = 0,
					minor = 0;

		cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, idx);
		cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, idx);
		if (major * 10 + minor < 89)
			return errf(err, KL_E_UNSUPPORTED, "precision fp8 needs FP8 tensor cores (compute capability 8.9 or "
						"later); GPU %d has %d.%d: use precision bf16", idx, major, minor);
	}

	be = calloc(1, sizeof(kl_backend));
	cs = calloc(1, sizeof(cuda_state));
	if (!be || !cs)
	{
		free(be);
		free(cs);
		return errf(err, KL_E_RESOURCES, "out of memory");
	}
	be->ops = &cuda_ops;
	be->cfg = cfg;
	be->impl = cs;
	cs->device = idx;
	/* (fp8 is bf16 plus FP8 activations in the prefill products of FP8 weights: cuda_fp8.c) */
	cs->bf16 = strcmp(prec, "bf16") == 0 || strcmp(prec, "fp8") == 0;
	cs->mode = GM_EAGER;
	cs->cur = -1;
	cs->graphs_enabled = true;	/* until a capture fails; KL_CUDA_GRAPHS=0: cuda_step.c */
	{
		/* KL_CUDA_GROUPED_GEMM=0: experts of prefill batches one product at a time (tests compare) */
		const char *gg = getenv("KL_CUDA_GROUPED_GEMM");

		cs->no_grouped_gemm = gg && strcmp(gg, "0") == 0;
	}
	{
		/*
		 * KL_CUDA_BF16_TWIN=0: in bf16 precision every product of many rows
		 * converts its fp32 input to bf16 in a pass of its own (the older
		 * code).  Default on: the row norms and SwiGLUs of many rows also
		 * write the bf16 rounding of their output, products of the same
		 * input convert it once (cuda_state.tw), conversions run four
		 * columns a thread — the same bf16 numbers reach the same products.
		 */
		const char *bt = getenv("KL_CUDA_BF16_TWIN");

		cs->bf16_twin = cs->bf16 && !(bt && strcmp(bt, "0") == 0);
	}
	{
		/*
		 * KL_CUDA_MOE_PREFILL: the routed experts of prefill batches in bf16
		 * precision (cuda_state.moe_prefill): 0 the older code, 3 batched
		 * products over size classes of padded expert slots, bf16 results
		 * combined as bf16 (0 where cuBLAS refuses; 75 % of the GEMM rate,
		 * bench/notes-cuda.md), 4 (default) the same products and outputs
		 * with the grouping made on the device: no stream drain, only the
		 * counts come to the host.  (1 and 2, a product per expert and
		 * cuBLAS's grouped GEMM with bf16 results, were removed: slower than
		 * 3; they now take the default.)
		 */
		const char *mp = getenv("KL_CUDA_MOE_PREFILL");

		cs->moe_prefill = mp && (strcmp(mp, "0") == 0 || strcmp(mp, "3") == 0) ? atoi(mp) : 4;
		cs->moe_prefill_ran = -1;
		/* KL_CUDA_Q_BATCHED=0: quantized experts keep variant 0 (a product per expert on converted panels) */
		mp = getenv("KL_CUDA_Q_BATCHED");
		cs->moe_q_batched = !(mp && strcmp(mp, "0") == 0);
	}
	cudaDeviceGetAttribute(&cs->sm_count, cudaDevAttrMultiProcessorCount, idx);
	if (cs->sm_count <= 0)
		cs->sm_count = 100;
	{
		/*
		 * Decode-step switches: KL_CUDA_PDL=0 launches without programmatic
		 * dependent launch (Hopper and later only; a small gain at batch 1,
		 * bench/notes-cuda.md), KL_CUDA_MOE_FUSE=0 runs the MoE as separate
		 * kernels,
		 * KL_CUDA_MLA_CACHE=fp32 keeps an fp32 latent cache in bf16 mode,
		 * KL_CUDA_GEMV_ROWS=0 runs bf16 GEMVs one warp per row (the older design),
		 * KL_CUDA_ROWS_EARLY=0: those block-rows GEMVs request only their
		 * first weight piece a row before the PDL wait (default, for 1 or 2
		 * input rows: every piece a thread holds, up to 4 a row: the whole
		 * row at 2304 and 4096 columns, so a GEMV that starts under a
		 * latency-bound kernel has its weights on chip when its input
		 * arrives; same bits; gemv.cu); the same for the quantized
		 * CUDA-core GEMVs of 2 input rows (gemv_q.cu's kk_gemv_q /
		 * kk_gemv_multi_q: up to 3 pieces a row, whole FP8 rows of 2304 and
		 * 4096 columns; at 1 row as KL_CUDA_Q_EARLY1 says),
		 * KL_CUDA_Q_EARLY1: the quantized GEMVs' early form at 1 input row:
		 * 0 (default: no gain measured, 2026-12-03) never, 1 in launches that one wave of the
		 * early kernel covers (at the 48B shapes o_proj and the dense down
		 * product: their whole FP8 rows requested before the wait; not
		 * lm_head, q/k/v or MLA's q + kv_a, many-wave launches where every
		 * one-row launch in that form lost 0.02 ms a step), 2 every one-row
		 * launch of the 64- and 128-thread shapes (gemv_q.cu),
		 * KL_CUDA_ROWS_WIDE1=2, 3 or 4: weight rows a block of the wide
		 * (4096-column) block-rows GEMV at 1 input row in the early form
		 * (default 3: o_proj's 768 blocks of 64 registers a thread fit
		 * one wave beside the KDA decode kernel its blocks start under,
		 * where 2 rows' 1152 blocks of 48 do not by the register count;
		 * same bits; gemv.cu),
		 * KL_CUDA_NORM_EARLY=0: the row norms wait before reading anything;
		 * =1: they read their weight before the PDL wait; =2 (default): and
		 * the combine + add + norm after the fused decode MoE op
		 * (cuda_moe.c) also the residual and the routing weights and
		 * indices, written three launches back; elementwise.cu.  Same bits
		 * in every form since the sum of squares is written out
		 * (row_sumsq4; before, its fma contraction differed per
		 * instantiation and test_cuda's int4 twin check failed with it);
		 * batch 1, H200 2026-12-03, five interleaved rounds: 4k 2.293 ->
		 * 2.282 ms, 32k 2.413 -> 2.410 (bench/notes-cuda.md),
		 * KL_CUDA_ROUTE_RANK1=0: the rank routing groups a one-token step
		 * by counts and a block scan as at other sizes (default: from the
		 * warps' ballots of the choices, a barrier and a scan fewer; same
		 * outputs; moe.cu),
		 * KL_CUDA_EXPERT_NR=N (1, 2, 4, 8) caps the rows of an expert pass,
		 * KL_CUDA_MLA_MMA=0 keeps the bf16 cache's decode attention on CUDA
		 * cores (mla_attend; else tensor cores where the shape fits: 1
		 * mla_attend_mma, 2 (the default where it runs) the wgmma one of
		 * kernels.h, "MLA decode attention variants", else 1);
		 * KL_CUDA_MLA_MERGE=0 merges its key ranges with mla_merge (else
		 * mla_merge_wide: more blocks a token).
		 * KL_CUDA_MLA_WG_SPLIT=K (keys a block of the wgmma attention;
		 * default: the rule), KL_CUDA_MLA_WG_PF=W (its ranges request their
		 * tiles into L2 W tiles ahead; default 0, none: no gain measured at
		 * 4k or 32k, 2026-12-03; same bits) and
		 * KL_CUDA_MLA_WG_DUAL=1 (each warpgroup a key range of its own where
		 * a block has 2 tiles or more; default 0): cuda_mla.c,
		 * cuda_mla_wg_read.  KL_CUDA_MLA_PLAN_CAP=1 plans the key ranges
		 * for the page table's capacity (a power of two) as before
		 * 2026-12-03, not for the pages in use (cuda_mla_plan; for
		 * measurements).
		 * KL_CUDA_MLA_FOLD=0 appends the MLA layer's new latent rows in a
		 * launch of its own and the wgmma attention loads its key tiles
		 * after its wait (default 1: the append is folded into the
		 * 16-byte-load absorb kernel, one launch fewer a layer, which also
		 * writes Qabs in bf16 for the wgmma attention (half its fixed
		 * load), and the attention's first two tiles' rows of earlier
		 * steps are requested before its wait; same bytes, same logits bit
		 * for bit; =2 the fold alone; cuda_mla.c).
		 * KL_CUDA_EXPERT_MMA=0 keeps the CUDA-core expert kernel for every
		 * step (default: the tensor-core one from 8 tokens, bf16 precision
		 * only; =N >= 2 moves that threshold; 1 means the default).
		 * KL_CUDA_GEMV_MMA=N: bf16-precision decode products of N..8 rows on
		 * tensor cores (default 8: below, the CUDA-core kernel was faster on
		 * the H200; 0 never),
		 * KL_CUDA_GEMV_MMA_SLAB=0 runs those in the older 16-row-tile kernel
		 * (gemv_mma_kernel; default: slabs of rows with the activations
		 * staged once a block, gemv_slab_kernel),
		 * KL_CUDA_ROUTE_WARP=0 routes and groups in the block kernel instead of
		 * warps (=N: warps only for steps of up to N tokens; default all that
		 * group on the device).
		 * KL_CUDA_ROUTE_RANK=N: steps of up to N tokens (default 4; 0 never)
		 * route with a thread per expert choosing by rank (the warp kernel's
		 * outputs bit for bit; no group-limited routing): -0.05 ms a step at
		 * batch 1, +0.06 at batch 8 (two rounds of 4 tokens) on the H200.
		 * KL_CUDA_SAMPLE_WIDE=0 samples with one block per row (the wide
		 * sampler spreads a row over a cluster of blocks; same choices);
		 * =2 runs the cluster sampler's fast form (fewer passes over the row
		 * and fewer cluster barriers; same choices; to become the default
		 * once timed on the GPU).
		 * KL_CUDA_MLA_SMALL=0 keeps the older MLA absorb and output kernels
		 * for decode steps (default: 16-byte weight loads up to 64 tokens).
		 * KL_CUDA_PREFETCH=N: decode steps of N..16 tokens fetch the weight
		 * read after a mixer's small kernels into L2 while they run (default
		 * 8; 0 never), at most KL_CUDA_PREFETCH_MB megabytes of them
		 * at a time (default 20: a mixer's o_proj and the router).
		 * KL_CUDA_PREFETCH_Q=1: quantized weights take those hints too
		 * (default: not: H200, 2026-12-03, FP8 48B step at batch 8, greedy,
		 * three rounds: 5.324 ms with them, 5.279 without).
		 * KL_CUDA_KDA_FUSED=0 runs a decode step's KDA mixer as three kernels
		 * (default: one, kk_kda_decode, where the GPU has clusters; =N: one
		 * for steps of up to N sequences).
		 * KL_CUDA_KDA_DEC_EARLY=0: that kernel waits for the products
		 * before it reads anything (default: it reads the state, the conv
		 * tails and the step's metadata, which earlier steps wrote, while
		 * the products finish; kernels/kda.cu, kda_decode_early_kernel).
		 * KL_CUDA_KDA_MMA=0: prefill's chunkwise KDA form in precision bf16
		 * runs the fp32 kernels (default: tensor cores from sm_80); =1 its
		 * sequential part as the 4-warp kernel (kda_chunk_mma_kernel), =2
		 * (default) as the wide one, 16 warps a block of 32 V columns, =3
		 * the wide one with 64 columns a block, =4 the wide one with 8 warps
		 * (same numbers bit for bit).
		 * KL_CUDA_KDA_PREP_MMA=0: that form's parallel half (W, U0, P, Qg,
		 * Kt per chunk) runs the fp32 prep kernel with bf16 stores; =1 its
		 * products on tensor cores (kda_chunk_prep_mma_kernel) in blocks of
		 * 128 threads; =2: blocks of 256 at K = 128 (1 elsewhere); =3:
		 * blocks of 256 in 63.5 KB of shared memory, 3 an SM, with the
		 * pairs, the cross-sub-chunk operands and the diagonal inverses
		 * reworked (kda_chunk_prep_mma3_kernel; K = 128, 1 elsewhere).
		 * =4: as 3, and in prefill steps whose every sequence takes the
		 * chunkwise form (K = 128, conv width <= 4) the elementwise prep
		 * (conv, silu, norms, decay, beta) fused into that kernel
		 * (kda_chunk_prep_mma4_kernel; cuda_kda_fused): kda_prep's fp32
		 * q, k, v, g, beta are not written.  =6 (default): 3's outputs bit
		 * for bit from two kernels of independent blocks (kp6_sub_kernel per
		 * 16-row sub-chunk, kp6_solve_kernel per chunk; K = 128), 1.0 to
		 * 1.3 % faster at 8k-128k tokens.
		 * KL_CUDA_KDA_KP6_WIDE=0: =6's kernels as before their wide forms;
		 * =1 the wide forms (q, k read 16 bytes a thread into shared memory
		 * and g folded once a channel by the sub-chunk kernel, the solve's
		 * shared arrays padded and W / U0 stored 16 bytes a lane); =2
		 * (default) those with the right-hand side Kb^T formed by the
		 * sub-chunk kernel, so that the solve reads no g or k.  The same
		 * outputs bit for bit.
		 * KL_CUDA_KDA_KP6_INTRA=1 (default): in =6's wide forms the sub-chunk
		 * kernel's pairs of rows 8 .. 15 with columns 0 .. 7 (64 of a 16-row
		 * sub-chunk's 136) as one mma tile from fp16 operands through the
		 * reference point row 7 (factors exp(G_i - G_r), exp(G_r - G_j) <= 1
		 * whatever the gate), the two 8-row triangles on CUDA cores as
		 * before; those 64 entries of P and A change by the operands'
		 * rounding (check_kda_kp6_intra: W and U as far from fp64 as with
		 * 0), the rest keep their bits.  H200 2026-12-03: kp6_sub 1.74 ->
		 * 1.53 ms at 32k tokens x 32 heads, the KDA op -4 % at 8k-128k.  0:
		 * all pairs on CUDA cores, the outputs as before.
		 * KL_CUDA_KDA_ELEM_WARP: which kernels run the KDA prep (conv, norms,
		 * decay) and the gated norm, a mask (kernels.h KK_KDA_EW_*), all with
		 * the same outputs bit for bit: 2 the gated norm as a warp per
		 * (row, head) (98 us at 8192 tokens x 32 heads x 128 on the H200,
		 * against the block kernel's 317), 4 prefill's prep as a warp walking
		 * 16 rows (kda_prep_rows_kernel, 384 us against 667; decode steps keep
		 * the block kernel), 8 (with 4, precision bf16 only) that prep with
		 * the hardware exponential and division in silu and softplus
		 * (common.cuh siluf_fast: within ~4e-6 relative, before q, k, v are
		 * rounded to bf16 operands; the only bit that changes numbers).
		 * Default 14; 0 a block per (row, head) for both, the old path.
		 * Bit 1 (the prep as a warp per (row, head), 913 us) was removed
		 * and is ignored.
		 * KL_CUDA_KDA_PREP_FORM (precision bf16 prefill, the rows prep above
		 * with bit 8, bf16 raw inputs, fp32 prepared q, k, v, K = 32 / 64 /
		 * 128, conv width 4): which form of that kernel runs, all with the
		 * same outputs bit for bit but 4-6's q and k or g (kda.cu's KDA_PF_*
		 * table): 0 kda_prep_rows_kernel as before; 1-6 kda_prep_ring_kernel,
		 * which keeps 2 or 3 rows of raw inputs in flight while it computes
		 * (form 0, with bf16 inputs, waits for each next row's loads) and
		 * computes beta once a walk; 2-6 silu with ex2.approx.ftz; 4 and 6
		 * the L2 norms' factors by rsqrt.approx (q, k within 5e-7 relative of
		 * form 0's); 5 and 6 softplus by a branch-free series (g within
		 * 3e-7).  Default 6 (H200, 2026-12-02, 32768 tokens: the kernel 1.17
		 * -> 0.97 ms, the KDA op 5.29 -> 5.09 ms; kda.cu has the table).
		 * KL_CUDA_KDA_IN16 (precision bf16, prefill): which of the KDA op's
		 * input products keep their result in bf16 only (cuda_state.r16),
		 * a mask: 1 (default) q, k, v and f, read by the rows prep and the
		 * conv tails as bf16; 2 the gate (widened back to fp32 before the
		 * gated norm until the norm reads bf16, so it costs bytes for now);
		 * 0 none (the fp32 results of before).
		 * KL_CUDA_KDA_OUT16=1 (opt-in, precision bf16): the rows prep writes
		 * the prepared q, k, v as bf16 only, read by kk_kda_chunked_mma16,
		 * in prefill steps whose every sequence takes the chunkwise form on
		 * tensor cores (K = 128); default fp32.  Opt-in because its second
		 * bf16 rounding of q, k, v put the K = 128 random model's logits
		 * 1.28-1.51x as far from precision fp32 as the bf16 path without it
		 * (1.52-1.59x with IN16), above test_cuda's bar of 1.5x
		 * (H200, 2026-12-01; the 48B shapes: 1.02-1.09x); -0.1 ms of the
		 * op's 5.5 at 32768 tokens.
		 * KL_CUDA_EXPERT_PRELOAD=0: the expert down product waits for the
		 * gate/up kernel before it reads its work list and first weights
		 * (default: it reads them while gate/up finishes; gemv.cu).
		 * KL_CUDA_EXPERT_B1=G[,D[,S]]: the expert products at one row a
		 * work item (batch 1) in gemv.cu's tiled kernel, G tiles of rows a
		 * block for the SwiGLU gate/up product and D (default: G) for down,
		 * each 1, 2 or 4; 0 expert_rows_kernel as before.  Every piece a
		 * thread takes of a tile is requested at once and the next tile's
		 * while the last is summed.  S: the fused shared expert's gate/up
		 * blocks go first and request their first tile before the PDL wait
		 * (1), and their later tiles into L2 (2, the default), or not (0).
		 * Default 4,4,2 (about one wave a launch at batch 1); the same
		 * logits bit for bit in every form.
		 * KL_CUDA_MLA_FLASH=0: bf16 prefill attention (the expanded MLA form)
		 * through cuBLAS score products, a softmax kernel and an output
		 * product over a score buffer; =1: one flash-attention kernel on
		 * mma.sync (kernels/mla_flash.cu); =2 or =3: the Hopper one on wgmma
		 * with 2 or 3 warpgroups per block (kernels/mla_flash_wgmma.cu,
		 * sm_90a image only, else =1).  Default: 3 where it runs (30.7 ms
		 * at 32k tokens against 37.3 with 2 and 47.1 with =1 on the H200),
		 * else 1, where the head shape is covered.
		 */
		const char *pdl = getenv("KL_CUDA_PDL"),
				   *fm = getenv("KL_CUDA_MOE_FUSE"),
				   *mc = getenv("KL_CUDA_MLA_CACHE"),
				   *gw = getenv("KL_CUDA_GEMV_ROWS"),
				   *gre = getenv("KL_CUDA_ROWS_EARLY"),
				   *qe1 = getenv("KL_CUDA_Q_EARLY1"),
				   *rw1 = getenv("KL_CUDA_ROWS_WIDE1"),
				   *ne = getenv("KL_CUDA_NORM_EARLY"),
				   *rr1 = getenv("KL_CUDA_ROUTE_RANK1"),
				   *enr = getenv("KL_CUDA_EXPERT_NR"),
				   *emma = getenv("KL_CUDA_EXPERT_MMA"),
				   *kr = getenv("KL_CUDA_KDA_STATE_ROUND"),
				   *mm = getenv("KL_CUDA_MLA_MMA"),
				   *mg = getenv("KL_CUDA_MLA_MERGE"),
				   *rw = getenv("KL_CUDA_ROUTE_WARP"),
				   *rr = getenv("KL_CUDA_ROUTE_RANK"),
				   *gm = getenv("KL_CUDA_GEMV_MMA"),
				   *qm = getenv("KL_CUDA_Q_MMA"),
				   *qem = getenv("KL_CUDA_Q_EXPERT_MMA"),
				   *qd = getenv("KL_CUDA_Q_DIRECT"),
				   *qsh = getenv("KL_CUDA_Q_SHAPE"),
				   *qx = getenv("KL_CUDA_Q_DENSE"),
				   *qxr = getenv("KL_CUDA_Q_DENSE_ROWS"),
				   *qtk = getenv("KL_CUDA_Q_TOK"),
				   *qtw = getenv("KL_CUDA_Q_TWIN"),
				   *ql2 = getenv("KL_CUDA_Q_L2"),
				   *qocc = getenv("KL_CUDA_Q_DENSE_OCC"),
				   *gs = getenv("KL_CUDA_GEMV_MMA_SLAB"),
				   *sw = getenv("KL_CUDA_SAMPLE_WIDE"),
				   *ms = getenv("KL_CUDA_MLA_SMALL"),
				   *mfo = getenv("KL_CUDA_MLA_FOLD"),
				   *pf = getenv("KL_CUDA_PREFETCH"),
				   *pfmb = getenv("KL_CUDA_PREFETCH_MB"),
				   *pfq = getenv("KL_CUDA_PREFETCH_Q"),
				   *kf = getenv("KL_CUDA_KDA_FUSED"),
				   *kde = getenv("KL_CUDA_KDA_DEC_EARLY"),
				   *ep = getenv("KL_CUDA_EXPERT_PRELOAD"),
				   *eb1 = getenv("KL_CUDA_EXPERT_B1"),
				   *kmma = getenv("KL_CUDA_KDA_MMA"),
				   *mf = getenv("KL_CUDA_MLA_FLASH"),
				   *kpm = getenv("KL_CUDA_KDA_PREP_MMA"),
				   *kew = getenv("KL_CUDA_KDA_ELEM_WARP"),
				   *kpf = getenv("KL_CUDA_KDA_PREP_FORM"),
				   *kpw = getenv("KL_CUDA_KDA_KP6_WIDE"),
				   *kpi = getenv("KL_CUDA_KDA_KP6_INTRA"),
				   *ki16 = getenv("KL_CUDA_KDA_IN16"),
				   *ko16 = getenv("KL_CUDA_KDA_OUT16");
		int			major = 0;

		cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, idx);
		kk_set_pdl(major >= 9 && !(pdl && strcmp(pdl, "0") == 0));
		kk_set_gemv_rows(!(gw && strcmp(gw, "0") == 0));
		kk_set_rows_early(!(gre && strcmp(gre, "0") == 0));
		kk_set_q_early1(qe1 && *qe1 ? atoi(qe1) : 0);
		kk_set_rows_wide1(rw1 && *rw1 ? atoi(rw1) : 3);
		kk_set_route_rank1(!(rr1 && strcmp(rr1, "0") == 0));
		cs->norm_early = ne && *ne ? (atoi(ne) < 0 ? 0 : atoi(ne) > 2 ? 2 : atoi(ne)) : 2;
		kk_set_expert_nr(enr ? atoi(enr) : 4);
		kk_set_gemv_mma_slab(!(gs && strcmp(gs, "0") == 0));
		kk_set_mma_q_direct(qd && *qd ? atoi(qd) : 2);
		kk_gemv_q_force_shape(qsh && *qsh && atoi(qsh) >= -1 && atoi(qsh) <= 3 ? atoi(qsh) : 3);
		kk_set_mma_q_dense(qx && *qx ? atoi(qx) : 2, qxr && *qxr ? atoi(qxr) : 0);
		kk_set_mma_q_tok(!(qtk && strcmp(qtk, "0") == 0));
		/* (the rows the dense FP8 kernel takes, as kk_set_mma_q_dense reads the same two switches) */
		cs->q_twin_rows = !cs->bf16_twin || (qtw && strcmp(qtw, "0") == 0) || (qx && *qx && atoi(qx) <= 0) ? 0 :
			qxr && *qxr && atoi(qxr) > 0 && atoi(qxr) < KK_GEMV_MMA_Q_ROWS ? atoi(qxr) : KK_GEMV_MMA_Q_ROWS;
		/* (KL_CUDA_Q_L2=0: no L2 prefetch of the FP8 tokens-as-M blocks' weight rows from 9 rows; default 1 (bit 1,
		 * the only one: H200, 2026-12-02, -0.05 ms a step at batch 32).  Bits 2 and 4 (the expert blocks' rows, the
		 * dense kernel's at 2-8 rows) lost there and were retired, as was KL_CUDA_Q_GRID: both are ignored now) */
		kk_set_mma_q_l2(ql2 && *ql2 ? atoi(ql2) : 1);
		/* (KL_CUDA_Q_DENSE_OCC=2: the dense FP8 kernel at 2-8 tokens with 2 blocks an SM; default 3, for launches of
		 * more than one wave at 2 an SM, the same bits: H200, 2026-12-02, FP8 48B step at batch 8, 4k: q/k/v 18.1 ->
		 * 15.1 us a launch, the step 5.403 -> 5.339 ms) */
		kk_set_mma_q_dense_occ(qocc && *qocc ? atoi(qocc) : 3);
		kk_set_expert_preload(!(ep && strcmp(ep, "0") == 0));
		{
			int			gu = eb1 && *eb1 ? atoi(eb1) : 4;
			const char *d = eb1 && *eb1 ? strchr(eb1, ',') : NULL,
					   *sh = d ? strchr(d + 1, ',') : NULL;

			kk_set_expert_b1(gu, d ? atoi(d + 1) : gu, sh ? atoi(sh + 1) : 2);
		}
		kk_set_kda_prep_mma(kpm && *kpm ? ((atoi(kpm) >= 0 && atoi(kpm) <= 4) || atoi(kpm) == 6 ? atoi(kpm) : 6) : 6);
		kk_set_kda_kp6_wide(kpw && *kpw && atoi(kpw) >= 0 && atoi(kpw) <= 2 ? atoi(kpw) : 2);
		kk_set_kda_kp6_intra(kpi && *kpi && atoi(kpi) == 0 ? 0 : 1);
		kk_set_kda_elem_warp(kew && *kew ? atoi(kew) & (KK_KDA_EW_NORM_WARP | KK_KDA_EW_PREP_ROWS | KK_KDA_EW_FAST) :
							 KK_KDA_EW_DEFAULT);
		kk_set_kda_prep_form(kpf && *kpf ? atoi(kpf) : 6);
		kk_set_kda_mma_form(kmma && atoi(kmma) >= 1 && atoi(kmma) <= 4 ? atoi(kmma) : 2);
		cs->kda_round16 = kr && strcmp(kr, "bf16") == 0;
		cs->kda_fused_max = !kk_kda_decode_supported(cfg->kda_head_dim) ? 0 :
			kf && *kf ? (atoi(kf) > 0 ? atoi(kf) : 0) : 8;
		cs->kda_dec_early = !(kde && strcmp(kde, "0") == 0);
		cs->kda_mma = cs->bf16 && major >= 8 && !(kmma && strcmp(kmma, "0") == 0) &&
			(cfg->kda_head_dim == 32 || cfg->kda_head_dim == 64 || cfg->kda_head_dim == 128);
		cs->kda_in16 = !cs->bf16 ? 0 : ki16 && *ki16 ? atoi(ki16) & (KL_R16_KDA_IN | KL_R16_KDA_GATE) : KL_R16_KDA_IN;
		cs->kda_out16 = cs->bf16 && ko16 && strcmp(ko16, "1") == 0;
		cs->fuse_moe = !(fm && strcmp(fm, "0") == 0);
		cs->expert_mma_min = !emma || atoi(emma) == 1 ? 8 : atoi(emma) <= 0 ? 0 : atoi(emma);
		cs->route_warp = rw && *rw ? atoi(rw) : INT_MAX;
		cs->route_rank_max = rr && *rr ? (atoi(rr) > 0 ? atoi(rr) : 0) : 4;
		cs->gemv_mma_min = gm && *gm ? (atoi(gm) > 0 ? atoi(gm) : INT_MAX) : 8;
		cs->q_mma_min = qm && *qm ? (atoi(qm) > 0 ? atoi(qm) : INT_MAX) : 2;
		cs->q_expert_mma_min = qem && *qem ? (atoi(qem) > 0 ? atoi(qem) : 0) : 4;
		cs->sample_wide = !(sw && strcmp(sw, "0") == 0);
		cs->sample_fast = sw && strcmp(sw, "2") == 0;
		cs->mla_small = !(ms && strcmp(ms, "0") == 0);
		cs->mla_fold = !(mfo && strcmp(mfo, "0") == 0);
		cs->mla_early = cs->mla_fold && !(mfo && strcmp(mfo, "2") == 0);
		cs->mla_merge_wide = !(mg && strcmp(mg, "0") == 0);
		cuda_mla_wg_read(&cs->mla_wg);
		cs->prefetch_min = pf && *pf ? (atoi(pf) > 0 ? atoi(pf) : INT_MAX) : 8;
		cs->prefetch_budget = (size_t) (pfmb && *pfmb ? atoi(pfmb) : 20) << 20;
		cs->prefetch_q = pfq && strcmp(pfq, "1") == 0;
		cs->mla_c16 = cs->bf16 && (cfg->kv_lora_rank + cfg->qk_rope_dim) % 8 == 0 &&
			cfg->kv_lora_rank + cfg->qk_rope_dim <= 768 && !(mc && strcmp(mc, "fp32") == 0);
		be->mla_cache_bf16 = cs->mla_c16;
		cs->mla_mma = cuda_mla_decode_variant(mm && *mm ? atoi(mm) : 2, cs->mla_c16, cfg->mla_heads,
											  cfg->kv_lora_rank, cfg->qk_rope_dim);
		cs->mla_flash = !cs->bf16 || (mf && strcmp(mf, "0") == 0) ||
			!kk_mla_flash_supported(cfg->mla_heads, cfg->qk_nope_dim, cfg->qk_rope_dim, cfg->v_head_dim,
									cfg->kv_lora_rank) ? 0 : mf && *mf ? atoi(mf) : 3;
		if (cs->mla_flash >= 2 &&
			!kk_mla_flash_wgmma_supported(cs->mla_flash, cfg->mla_heads, cfg->qk_nope_dim, cfg->qk_rope_dim,
										  cfg->v_head_dim, cfg->kv_lora_rank))
			cs->mla_flash = 1;	/* (not Hopper's sm_90a image, another head shape, or no such variant) */
		else if (cs->mla_flash < 0)
			cs->mla_flash = 1;
	}

	if ((e = cudaStreamCreateWithFlags(&cs->stream, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaStreamCreateWithFlags(&cs->pf_stream, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaEventCreateWithFlags(&cs->pf_fork, cudaEventDisableTiming)) != cudaSuccess ||
		(e = cudaEventCreateWithFlags(&cs->pf_join, cudaEventDisableTiming)) != cudaSuccess ||
		(e = cudaEventCreateWithFlags(&cs->meta_done, cudaEventDisableTiming)) != cudaSuccess ||
		(e = cudaEventCreateWithFlags(&cs->ids_done, cudaEventDisableTiming)) != cudaSuccess ||
		(e = cudaMalloc(&cs->blas_ws, CUDA_BLAS_WORKSPACE)) != cudaSuccess)
	{
		errf(err, cuda_code(e), "initializing GPU %d: %s", idx, cudaGetErrorString(e));
		goto fail;
	}
	if (cublasCreate(&cs->blas) != CUBLAS_STATUS_SUCCESS ||
		cublasSetStream(cs->blas, cs->stream) != CUBLAS_STATUS_SUCCESS ||
		cublasSetWorkspace(cs->blas, cs->blas_ws, CUDA_BLAS_WORKSPACE) != CUBLAS_STATUS_SUCCESS ||
		/* fp32: no TF32 or other reduced-precision shortcuts; bf16: TF32 for fp32 weights */
		cublasSetMathMode(cs->blas, cs->bf16 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_PEDANTIC_MATH) != CUBLAS_STATUS_SUCCESS)
	{
		errf(err, KL_E_INTERNAL, "initializing cuBLAS on GPU %d failed", idx);
		goto fail;
	}
	if (strcmp(prec, "fp8") == 0)
	{
		/* KL_CUDA_FP8_ACT_MIN=N: FP8 activations in products of at least N rows (default 65: the
		 * products of up to 64 rows keep mma_q.cu's bf16-activation kernels whatever N) */
		const char *fm = getenv("KL_CUDA_FP8_ACT_MIN");

		cs->fp8_act_min = fm && atoi(fm) > 0 ? atoi(fm) : 65;
		if (cuda_fp8_create(be) != 0)
		{
			errf(err, KL_E_INTERNAL, "initializing cuBLASLt on GPU %d failed", idx);
			goto fail;
		}
	}
	*out = be;
	return KL_OK;
fail:
	cuda_fp8_free(cs);
	if (cs->blas)
		cublasDestroy(cs->blas);
	cudaFree(cs->blas_ws);
	if (cs->meta_done)
		cudaEventDestroy(cs->meta_done);
	if (cs->ids_done)
		cudaEventDestroy(cs->ids_done);
	if (cs->pf_fork)
		cudaEventDestroy(cs->pf_fork);
	if (cs->pf_join)
		cudaEventDestroy(cs->pf_join);
	if (cs->pf_stream)
		cudaStreamDestroy(cs->pf_stream);
	if (cs->stream)
		cudaStreamDestroy(cs->stream);
	free(cs);
	free(be);
	return KL_FAIL;
}
