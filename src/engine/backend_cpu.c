/*
 * backend_cpu.c — the CPU implementation of backend.h: memory, weights,
 * matrix products and the element-wise ops.  The mixers live in cpu_kda.c,
 * cpu_mla.c and cpu_moe.c.
 *
 * Matrix products: a few rows (decode) stream the weights through our own
 * GEMV kernels (simd.c, simd_quant.c), reading bf16 or quantized weights
 * directly; many rows (prefill) go to OpenBLAS sgemm, bf16 and quantized
 * weights widened to fp32 one block of rows at a time.
 * OpenBLAS runs single-threaded inside our thread pool's tasks, so one pool
 * owns all the cores.
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"
#include "kl.h"
#include "threadpool.h"

/*
 * Inputs of up to this many rows take the GEMV path, which computes every
 * row with the same instructions whatever the other rows: a sequence decoding
 * in a batch of up to 64 gets bit-for-bit the logits it would get alone.
 */
#define GEMV_MAX_ROWS KL_BATCH_INVARIANT_ROWS
#define SGEMM_BLOCK 128			/* weight rows per sgemm task */

/* ------------------------------------------------------------------ working memory */

#define MAX_POOL_THREADS 256

typedef struct cpu_state
{
	float	   *scratch[MAX_POOL_THREADS][SCRATCH_SLOTS];
	size_t		scratch_cap[MAX_POOL_THREADS][SCRATCH_SLOTS];
	void	   *buf[BUF_COUNT];
	size_t		buf_cap[BUF_COUNT];
} cpu_state;

static void *
aligned_or_null(size_t bytes)
{
	void	   *p = NULL;

	return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

bool
cpu_scratch_reserve(kl_backend *be, int slot, size_t floats)
{
	cpu_state  *cs = be->impl;
	int			threads = kl_pool_threads();

	for (int t = 0; t < threads && t < MAX_POOL_THREADS; t++)
		if (cs->scratch_cap[t][slot] < floats)
		{
			size_t		cap = floats + floats / 4 + 64;

			free(cs->scratch[t][slot]);
			cs->scratch_cap[t][slot] = 0;
			if ((cs->scratch[t][slot] = aligned_or_null(cap * sizeof(float))) == NULL)
			{
				be->failed = true;
				kl_errc(&be->err, KL_E_RESOURCES,
						"out of memory for %zu MB of working memory", cap * sizeof(float) >> 20);
				return false;
			}
			cs->scratch_cap[t][slot] = cap;
		}
	return true;
}

float *
cpu_scratch(kl_backend *be, int slot, int thread)
{
	return ((cpu_state *) be->impl)->scratch[thread][slot];
}

void *
cpu_buffer(kl_backend *be, int id, size_t bytes)
{
	cpu_state  *cs = be->impl;

	if (cs->buf_cap[id] < bytes)
	{
		size_t		cap = bytes + bytes / 4 + 256;

		free(cs->buf[id]);
		cs->buf_cap[id] = 0;
		if ((cs->buf[id] = aligned_or_null(cap)) == NULL)
		{
			be->failed = true;
			kl_errc(&be->err, KL_E_RESOURCES, "out of memory for %zu MB of working memory", cap >> 20);
			return NULL;
		}
		cs->buf_cap[id] = cap;
	}
	return cs->buf[id];
}

/* ------------------------------------------------------------------ memory */

static void *
cpu_alloc(kl_backend *be, size_t bytes)
{
	void	   *p = NULL;
	size_t		rounded = (bytes + 63) & ~(size_t) 63;

	(void) be;
	if (rounded < bytes || posix_memalign(&p, 64, rounded ? rounded : 64) != 0)
		return NULL;
	memset(p, 0, rounded ? rounded : 64);
	return p;
}

static void
cpu_release(kl_backend *be, void *p)
{
	(void) be;
	free(p);
}

static void
cpu_memcpy(kl_backend *be, void *dst, const void *src, size_t bytes)
{
	(void) be;
	if (dst != src)
		memcpy(dst, src, bytes);
}

static int
cpu_load_weight(kl_backend *be, kl_weight *w, kl_err *err)
{
	(void) be;
	if (w->q.type != KL_Q_NONE)
	{
		/* used where the loader put it (the mapped file or its own copy) */
		w->dev = (void *) w->q.data;
		return KL_OK;
	}
	if (w->dtype == KL_DT_F16)
	{
		/* No f16 kernels: widen once to f32 (exact). */
		size_t		n = (size_t) w->rows * w->cols;
		float	   *f = kl_aligned_alloc(n * sizeof(float), err);

		if (!f)
			return KL_FAIL;
		for (size_t i = 0; i < n; i++)
			f[i] = kl_f16_to_f32(((const uint16_t *) w->host)[i]);
		w->dev = f;
		w->dtype = KL_DT_F32;
		return KL_OK;
	}
	w->dev = (void *) w->host;
	return KL_OK;
}

typedef struct random_job
{
	kl_weight  *w;
	uint64_t	seed;
	float		scale;
	size_t		n;
} random_job;

static void
random_task(void *arg, int t, int thread)
{
	random_job *j = arg;
	size_t		per = (j->n + 255) / 256;
	size_t		i0 = (size_t) t * per,
				i1 = i0 + per < j->n ? i0 + per : j->n;
	uint64_t	x = j->seed ^ (0x9e3779b97f4a7c15ull * (uint64_t) (t + 1));
	/* uniform in [-a, a] has standard deviation a / sqrt(3) */
	float		a = j->scale * 1.7320508f;

	(void) thread;
	for (size_t i = i0; i < i1; i++)
	{
		float		u;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		u = (float) (x >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
		if (j->w->dtype == KL_DT_BF16)
			((uint16_t *) j->w->dev)[i] = kl_f32_to_bf16(u * a);
		else
			((float *) j->w->dev)[i] = u * a;
	}
}

static int
cpu_init_random_weight(kl_backend *be, kl_weight *w, uint64_t seed, float scale, kl_err *err)
{
	random_job	j;

	(void) be;
	j.n = (size_t) w->rows * w->cols;
	w->dev = kl_aligned_alloc(j.n * kl_dtype_size(w->dtype), err);
	if (!w->dev)
		return KL_FAIL;
	j.w = w;
	j.seed = seed;
	j.scale = scale;
	kl_parallel_for(256, random_task, &j);
	return KL_OK;
}

static void
cpu_unload_weight(kl_backend *be, kl_weight *w)
{
	(void) be;
	if (w->dev && w->dev != w->host && w->q.type == KL_Q_NONE)
		free(w->dev);
	w->dev = NULL;
}

/* ------------------------------------------------------------------ matmul */

void
cpu_sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float *A, int lda,
		  const float *B, int ldb, float beta, float *C, int ldc)
{
	if (m <= 0 || n <= 0)
		return;
	if (k <= 0)
	{
		for (int i = 0; i < m; i++)
			for (int j = 0; j < n; j++)
				C[(size_t) i * ldc + j] = beta == 0 ? 0 : beta * C[(size_t) i * ldc + j];
		return;
	}
	cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
				m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

/*
 * A batch of products runs as one parallel job.  Each product is cut into
 * tasks: blocks of weight rows (and, when a matrix has few rows, blocks of
 * input rows too); task t of the batch maps back to (product, block) through
 * the prefix sums in `first`.
 */
#define MAX_BATCH 64

typedef struct matmul_batch
{
	kl_backend *be;
	const kl_matmul_job *jobs;
	int			count;
	int			first[MAX_BATCH + 1];	/* first task of each job */
	int			row_block[MAX_BATCH];
	int			n_row_blocks[MAX_BATCH];
	int			n_block[MAX_BATCH];	/* input rows per task */
	const float *xq[MAX_BATCH];	/* int4 GEMV: the inputs permuted (kl_q4_permute_x) */
	int			ldxq[MAX_BATCH];
	const kl_simd *simd;
} matmul_batch;

static void
matmul_task(void *arg, int t, int thread)
{
	matmul_batch *b = arg;
	int			k = 0;
	int			th = thread;
	const kl_matmul_job *j;
	const kl_weight *W;
	int			rb,
				nb,
				r0,
				nr,
				i0,
				ni;

	while (t >= b->first[k + 1])
		k++;
	t -= b->first[k];
	j = &b->jobs[k];
	W = j->W;
	rb = t % b->n_row_blocks[k];
	nb = t / b->n_row_blocks[k];
	r0 = rb * b->row_block[k];
	nr = W->rows - r0 < b->row_block[k] ? W->rows - r0 : b->row_block[k];
	i0 = nb * b->n_block[k];
	ni = j->n - i0 < b->n_block[k] ? j->n - i0 : b->n_block[k];

	if (j->n <= GEMV_MAX_ROWS)
	{
		/* decode: stream the weight rows once, bf16 or quantized read directly */
		if (W->q.type == KL_Q_INT4)
			b->simd->gemv_q(j->y, j->ldy, &W->q, b->xq[k], b->ldxq[k], j->n, r0, r0 + nr);
		else if (W->q.type != KL_Q_NONE)
			b->simd->gemv_q(j->y, j->ldy, &W->q, j->x, j->ldx, j->n, r0, r0 + nr);
		else if (W->dtype == KL_DT_BF16)
			b->simd->gemv_bf16(j->y, j->ldy, W->dev, W->cols, j->x, j->ldx, j->n, r0, r0 + nr);
		else
			b->simd->gemv_f32(j->y, j->ldy, W->dev, W->cols, j->x, j->ldx, j->n, r0, r0 + nr);
		return;
	}
	/* prefill: sgemm on a block of weight rows (bf16 widened to f32 first) */
	{
		int			cols = W->cols;
		const float *Wb;

		if (W->q.type != KL_Q_NONE)
		{
			float	   *panel = cpu_scratch(b->be, SCRATCH_PANEL, th);

			for (int r = 0; r < nr; r++)
				kl_q_dequant_row(&W->q, r0 + r, panel + (size_t) r * cols);
			Wb = panel;
		}
		else if (W->dtype == KL_DT_BF16)
		{
			float	   *panel = cpu_scratch(b->be, SCRATCH_PANEL, th);

			b->simd->bf16_to_f32(panel, (const uint16_t *) W->dev + (size_t) r0 * cols, (size_t) nr * cols);
			Wb = panel;
		}
		else
			Wb = (const float *) W->dev + (size_t) r0 * cols;
		cpu_sgemm(false, true, ni, nr, cols, 1.0f, j->x + (size_t) i0 * j->ldx, j->ldx,
				  Wb, cols, 0.0f, j->y + (size_t) i0 * j->ldy + r0, j->ldy);
	}
}

/*
 * The int4 GEMV kernels read each input in the order the nibbles unpack
 * (the SIMD level's q4_permute): permute the inputs of this batch's int4
 * jobs once, here, for all the tasks.
 */
static bool
permute_int4_inputs(kl_backend *be, matmul_batch *b)
{
	size_t		total = 0;
	float	   *buf;

	for (int k = 0; k < b->count; k++)
	{
		const kl_matmul_job *j = &b->jobs[k];

		if (j->W->q.type == KL_Q_INT4 && j->n > 0 && j->n <= GEMV_MAX_ROWS)
			total += (size_t) j->n * b->simd->q4_xlen(j->W->cols);
	}
	if (total == 0)
		return true;
	buf = cpu_buffer(be, BUF_Q4_X, sizeof(float) * total);
	if (!buf)
		return false;
	for (int k = 0; k < b->count; k++)
	{
		const kl_matmul_job *j = &b->jobs[k];
		int			len = b->simd->q4_xlen(j->W->cols);

		if (!(j->W->q.type == KL_Q_INT4 && j->n > 0 && j->n <= GEMV_MAX_ROWS))
			continue;
		for (int r = 0; r < j->n; r++)
			b->simd->q4_permute(buf + (size_t) r * len, j->x + (size_t) r * j->ldx, j->W->cols);
		b->xq[k] = buf;
		b->ldxq[k] = len;
		buf += (size_t) j->n * len;
	}
	return true;
}

void
cpu_matmul_batch(kl_backend *be, const kl_matmul_job *jobs, int count)
{
	matmul_batch b;
	int			threads = kl_pool_threads();
	int			total = 0;
	size_t		panel = 0;

	/* the widest block of bf16 or quantized weights a prefill task widens to f32 */
	for (int k = 0; k < count; k++)
		if (jobs[k].n > GEMV_MAX_ROWS && (jobs[k].W->dtype == KL_DT_BF16 || jobs[k].W->q.type != KL_Q_NONE))
		{
			size_t		need = (size_t) (jobs[k].W->rows < SGEMM_BLOCK ? jobs[k].W->rows : SGEMM_BLOCK) * jobs[k].W->cols;

			panel = need > panel ? need : panel;
		}
	if (panel && !cpu_scratch_reserve(be, SCRATCH_PANEL, panel))
		return;
	b.be = be;
	for (int c0 = 0; c0 < count; c0 += MAX_BATCH)
	{
		b.jobs = jobs + c0;
		b.count = count - c0 < MAX_BATCH ? count - c0 : MAX_BATCH;
		b.simd = kl_simd_get();
		total = 0;
		for (int k = 0; k < b.count; k++)
		{
			const kl_matmul_job *j = &b.jobs[k];
			int			rows = j->W->rows;

			b.first[k] = total;
			if (j->n <= 0)
			{
				b.n_row_blocks[k] = 1;
				b.row_block[k] = rows;
				b.n_block[k] = 1;
				continue;		/* no tasks */
			}
			if (j->n <= GEMV_MAX_ROWS)
			{
				/* ~8 tasks per thread over the batch, rows a multiple of 4 */
				int			rb = rows * b.count / (threads * 8);

				rb = rb < 16 ? 16 : (rb + 3) & ~3;
				b.row_block[k] = rb;
				b.n_block[k] = j->n;
			}
			else
			{
				b.row_block[k] = SGEMM_BLOCK;
				b.n_block[k] = j->n;
			}
			b.n_row_blocks[k] = (rows + b.row_block[k] - 1) / b.row_block[k];
			if (j->n > GEMV_MAX_ROWS && b.n_row_blocks[k] * b.count < 2 * threads)
			{
				/* few weight rows (low-rank projections): split the inputs too */
				int			parts = (2 * threads + b.n_row_blocks[k] - 1) / b.n_row_blocks[k];

				b.n_block[k] = (j->n + parts - 1) / parts;
				if (b.n_block[k] < 16)
					b.n_block[k] = 16;
			}
			total += b.n_row_blocks[k] * ((j->n + b.n_block[k] - 1) / b.n_block[k]);
		}
		b.first[b.count] = total;
		if (!permute_int4_inputs(be, &b))
			return;
		kl_parallel_for(total, matmul_task, &b);
	}
}

void
cpu_matmul(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	kl_matmul_job j = {y, ldy, x, ldx, n, W, 0};

	cpu_matmul_batch(be, &j, 1);
}

/* ------------------------------------------------------------------ element-wise */

static void
cpu_embed(kl_backend *be, float *x, const kl_weight *E, const int32_t *ids, int n)
{
	const kl_simd *simd = kl_simd_get();
	int			D = E->cols;

	(void) be;
	for (int r = 0; r < n; r++)
	{
		if (E->dtype == KL_DT_BF16)
			simd->bf16_to_f32(x + (size_t) r * D, (const uint16_t *) E->dev + (size_t) ids[r] * D, (size_t) D);
		else
			memcpy(x + (size_t) r * D, (const float *) E->dev + (size_t) ids[r] * D, sizeof(float) * D);
	}
}

typedef struct rows_job
{
	float	   *y;
	int			ldy;
	const float *x;
	int			ldx;
	const float *w;
	int			rows,
				d;
	float		eps;
} rows_job;

static void
rmsnorm_task(void *arg, int t, int thread)
{
	rows_job   *j = arg;
	const kl_simd *simd = kl_simd_get();
	int			per = 32;

	(void) thread;
	for (int r = t * per; r < j->rows && r < (t + 1) * per; r++)
	{
		const float *x = j->x + (size_t) r * j->ldx;
		float	   *y = j->y + (size_t) r * j->ldy;
		float		ss = simd->dot(x, x, j->d);
		float		inv = 1.0f / sqrtf(ss / (float) j->d + j->eps);

		for (int c = 0; c < j->d; c++)
			y[c] = j->w[c] * (x[c] * inv);
	}
}

static void
cpu_rmsnorm(kl_backend *be, float *y, int ldy, const float *x, int ldx, const float *w,
			int rows, int d, float eps)
{
	rows_job	j = {y, ldy, x, ldx, w, rows, d, eps};

	(void) be;
	kl_parallel_for((rows + 31) / 32, rmsnorm_task, &j);
}

static void
cpu_add(kl_backend *be, float *y, const float *x, size_t count)
{
	(void) be;
	for (size_t i = 0; i < count; i++)
		y[i] += x[i];
}

static void
cpu_swiglu(kl_backend *be, float *h, const float *g, const float *u, int rows, int width, int ld)
{
	(void) be;
	for (int r = 0; r < rows; r++)
		for (int c = 0; c < width; c++)
			h[(size_t) r * width + c] = kl_silu(g[(size_t) r * ld + c]) * u[(size_t) r * ld + c];
}

static void
cpu_sync(kl_backend *be)
{
	(void) be;
}

static void
cpu_destroy(kl_backend *be)
{
	cpu_state  *cs = be->impl;

	for (int t = 0; t < MAX_POOL_THREADS; t++)
		for (int k = 0; k < SCRATCH_SLOTS; k++)
			free(cs->scratch[t][k]);
	for (int k = 0; k < BUF_COUNT; k++)
		free(cs->buf[k]);
	free(cs);
	free(be);
}

static const kl_backend_ops cpu_ops = {
	.name = "cpu",
	.alloc = cpu_alloc,
	.release = cpu_release,
	.upload = cpu_memcpy,
	.download = cpu_memcpy,
	.copy = cpu_memcpy,
	.load_weight = cpu_load_weight,
	.unload_weight = cpu_unload_weight,
	.init_random_weight = cpu_init_random_weight,
	.prepare_mla = cpu_prepare_mla,
	.release_mla = cpu_release_mla,
	.embed = cpu_embed,
	.rmsnorm = cpu_rmsnorm,
	.matmul = cpu_matmul,
	.matmul_batch = cpu_matmul_batch,
	.add = cpu_add,
	.swiglu = cpu_swiglu,
	.kda = cpu_kda,
	.mla = cpu_mla,
	.moe = cpu_moe,
	.sync = cpu_sync,
	.destroy = cpu_destroy,
	.quantized_weights = true,
};

int
kl_backend_cpu_create(const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err)
{
	kl_backend *be;

	/* the CPU computes in fp32 throughout; a bf16 request is honoured as fp32 */
	(void) opts;
	be = kl_calloc(1, sizeof(kl_backend), err);
	if (!be)
		return KL_FAIL;
	be->impl = kl_calloc(1, sizeof(cpu_state), err);
	if (!be->impl)
	{
		free(be);
		return KL_FAIL;
	}
	/* all parallelism comes from our pool; OpenBLAS runs inside its tasks */
	openblas_set_num_threads(1);
	be->ops = &cpu_ops;
	be->cfg = cfg;
	*out = be;
	return KL_OK;
}
