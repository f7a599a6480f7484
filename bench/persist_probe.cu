/*
 * persist_probe.cu — what a persistent decode kernel would buy at batch 1,
 * measured on a synthetic layer chain with the 48B model's shapes before the
 * decode path is redesigned (issue 10; bench/notes-cuda.md, "Issue 10, fourth
 * session: persistent-decode probe").
 *
 * The chain (bf16 weights, fp32 activations, batch 1), L layers with
 * distinct weights (27 layers: 5.0 GB, a real step's order of bytes):
 *   xn = rmsnorm(x)                                   (layer > 0: x += d first)
 *   p  = P xn        P  8448 x 2304   (the KDA projections)
 *   a  = lat(p[0 .. 4096))            one block of dependent work (the KDA
 *                                     recurrence, routing: latency-bound)
 *   o  = O a         O  2304 x 4096   (o_proj)
 *   x += o; xn2 = rmsnorm(x)
 *   g  = G xn2       G 18432 x 2304   (gate/up of 8 experts + shared; rows
 *                                     2j, 2j + 1 = gate, up of output j)
 *   h  = silu(g[2j]) g[2j + 1]        9216
 *   d  = D h         D  2304 x 9216   (the 9 down matrices side by side:
 *                                     down + combine, weights 1)
 *   (next layer: x += d; after the last, x += d)
 * Variants, each timed as whole chains (CUDA events, median of rounds that
 * interleave the variants), each chain's final x checked against A's:
 *   A  a kernel per op (the library's kk_gemv, kk_rmsnorm, kk_add_rmsnorm,
 *      kk_swiglu, kk_add; this file's lat kernel), programmatic dependent
 *      launch, the chain in one CUDA graph: the engine's execution model.
 *   B  one persistent kernel for the chain (persist_chain<true, false>): a
 *      GEMV's rows spread over all warps of the grid, the small ops (norms,
 *      lat) done by the last block to finish the op before them, each warp's
 *      weights streamed through its lanes' ring of shared memory with
 *      cp.async and issued AHEAD across op boundaries, so that the next op's
 *      weights are in flight while the block waits for its input.
 *   C  B with loads issued only for the op whose input is ready (no weight
 *      prefetch across a dependency): B - C is the prefetch's share.
 *   D  B with the norms done by every block while it stages its input
 *      (redundantly, no one-block stage and no flag between the GEMVs but
 *      the lat op's).
 *   E  B's kernel launched once a layer (27 cooperative launches in stream
 *      order): what a kernel boundary a layer costs (no loads across it).
 *   (round 2, after B-E lost to A: their engine streamed below the copy rate)
 *   F  one persistent kernel (f_chain<false>) streaming as the library's
 *      GEMVs do: one 1024-thread block an SM, each lane 6 register loads in
 *      flight, no shared-memory ring, no early loads; norms (and SwiGLU) in
 *      every block: does the persistent form match A's per-op streaming?
 *   G  F + each warp's share of the next product prefetched into L2
 *      (prefetch.global.L2) before its block waits on a dependency: all of
 *      O's and the first PROBE_AHEAD_MB (16) of G's under the lat op,
 *      PROBE_HOP_MB (4) of the next product's before the other waits.
 *   H  A whose O GEMV (launched by PDL while the lat op runs) prefetches
 *      its blocks' rows into L2 before kk_dep_wait: no persistent kernel.
 *   I  H for every GEMV, and O's blocks also prefetch the first
 *      PROBE_AHEAD_MB of G's weights under the lat op.
 *   J  G with each product's units claimed dynamically (chunks of 24 from
 *      a counter) instead of a static share a warp: the static split's tail.
 * Also: a plain streaming read of all the weights (the ceiling), and the lat
 * op alone (L dependent launches in a graph).  Each table is printed for
 * L = 27 and L = 1; for L = 27 a second table from one traced run of each
 * persistent variant (B-G, J) (%globaltimer marks) says where a layer's time goes:
 * each product from its input to its last block, each hop between them.
 *
 * Run on the GPU machine by `bash bench/bench-cuda.sh persist-probe
 * [ROUNDS]` (it runs bench/bin/persist_probe.xz when carried, made without a
 * GPU by `bash bench/bench-cuda.sh persist-probe-build`, else builds it
 * there); PROBE_LAT_ITERS sets the lat op's iterations (default 24, 12 us on
 * the H200), PROBE_SKIP lists variants (B-J) not to run.  Each variant's
 * check prints a line as it passes, so a fault names its variant.
 * Self-contained: no library change.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
#include <vector>

/* the library's block-rows GEMV (variant A) and its device helpers */
#include "../kernels/gemv.cu"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
	fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(1); } } while (0)

/* ---------------------------------------------------------------- shapes */

#define HID 2304				/* hidden size */
#define P_ROWS 8448				/* KDA projections */
#define LAT_N 4096				/* the lat op's numbers (o_proj's input) */
#define G_ROWS 18432			/* 9 x (gate, up) x 1024 */
#define H_N 9216				/* 9 x 1024 */
#define EPS 1e-6f

#define BT 256					/* threads of a persistent block (and of the lat kernel) */
#define WARPS (BT / 32)
#define RING 44					/* 16-byte weight slots a lane holds in shared memory */
#define MAXG 16					/* weight units (cp.async groups) a warp has in flight */
#define XS_FLOATS H_N			/* the staged input vector: the largest op input */

/*
 * The four products as streams of 16-byte pieces (8 bf16): a unit is
 * UNIT consecutive pieces of the row-major matrix, one warp's task (a lane
 * takes pieces lane, lane + 32, ...).  ROWP: pieces a row.  A unit is a
 * whole row (P), a quarter of a row (O, D: units of ~4.5 KB), or two rows
 * (G: gate and up of one output).  Every product has ~8.7 units a warp on
 * 132 x 8 warps, so a warp's share is within one unit of every other's.
 */
enum { OP_P, OP_O, OP_G, OP_D, N_OPS };

template <int OP>
struct op_shape
{
	static constexpr int ROWS = OP == OP_P ? P_ROWS : OP == OP_O ? HID : OP == OP_G ? G_ROWS : HID;
	static constexpr int ROWP = (OP == OP_P || OP == OP_G ? HID : OP == OP_O ? LAT_N : H_N) / 8;
	static constexpr int UNIT = OP == OP_O ? ROWP / 4 : OP == OP_D ? ROWP / 4 : OP == OP_G ? 2 * ROWP : ROWP;
	static constexpr int PPL = UNIT / 32;	/* pieces a lane, a unit */
	static constexpr int UNITS = ROWS * ROWP / UNIT;
	static constexpr size_t LAYER = (size_t) ROWS * ROWP;	/* pieces a layer */
};

/* the same numbers for an op known only at run time (the issue side) */
__device__ __forceinline__ int
op_ppl(int op)
{
	return op == OP_P ? op_shape<OP_P>::PPL : op == OP_O ? op_shape<OP_O>::PPL : op == OP_G ? op_shape<OP_G>::PPL
		: op_shape<OP_D>::PPL;
}

__device__ __forceinline__ int
op_units(int op)
{
	return op == OP_P ? op_shape<OP_P>::UNITS : op == OP_O ? op_shape<OP_O>::UNITS : op == OP_G ?
		op_shape<OP_G>::UNITS : op_shape<OP_D>::UNITS;
}

/*
 * Everything a chain reads and writes.  Weights: W[op] holds L layers'
 * matrices one after the other.  Activations one slice a layer, so that no
 * buffer is written twice in a chain (no write-after-read between blocks of
 * different speed); o and d are accumulated with atomics and must be zero
 * before a run, as must the counters.
 */
typedef struct
{
	int			L,
				l0,				/* this launch's layers: [l0, l1) (E: one a launch) */
				l1,
				lat_iters;
	const uint4 *Wp,
			   *Wo,
			   *Wg,
			   *Wd;
	const float *nw;			/* the norms' weight [HID] (all norms) */
	float	   *xres,			/* [L + 1][HID] residual stream entering layer l (xres[0]: the input) */
			   *xmid,			/* [L][HID] after the attention part */
			   *xn,				/* [L + 1][HID] rmsnorm(xres[l]) */
			   *xn2,			/* [L][HID] rmsnorm(xmid[l]) */
			   *p,				/* [L][P_ROWS] */
			   *a,				/* [L][LAT_N] */
			   *o,				/* [L][HID], zeroed */
			   *h,				/* [L][H_N] */
			   *d,				/* [L][HID], zeroed */
			   *gs;				/* [L][G_ROWS] G's row sums (F, G, J: atomics), zeroed */
	int			pf_ahead_kb,	/* G: KB of G's weights prefetched during the lat op (whole grid) */
				pf_hop_kb;		/* G: KB of the next op's weights prefetched before each other wait */
	unsigned   *cnt;			/* [L + 1][C_N], zeroed */
	unsigned long long *trace;	/* [L][T_N] %globaltimer marks, or NULL (timed runs) */
}			chain_t;

/* the dependency words of a layer: done counters count blocks, flags are 0 / 1 */
enum { C_N1, C_P, C_LAT, C_O, C_N2, C_G, C_D, C_QP, C_QO, C_QG, C_QD, C_N };	/* C_Q*: J's chunk claims */

/*
 * Trace marks of a layer (a traced run, not timed): block 0 when its input
 * for an op is staged (_IN) and when its own share is done (_END); the last
 * block of an op when it found itself last (_ALL), and after its small op.
 */
enum { T_P_IN, T_P_END, T_P_ALL, T_LAT, T_O_IN, T_O_END, T_O_ALL, T_N2, T_G_IN, T_G_END, T_G_ALL, T_D_IN, T_D_END,
	T_D_ALL, T_N };

__device__ __forceinline__ const uint4 *
op_weights(const chain_t &c, int op)
{
	return op == OP_P ? c.Wp : op == OP_O ? c.Wo : op == OP_G ? c.Wg : c.Wd;
}

__device__ __forceinline__ size_t
op_layer_pieces(int op)
{
	return op == OP_P ? op_shape<OP_P>::LAYER : op == OP_O ? op_shape<OP_O>::LAYER : op == OP_G ?
		op_shape<OP_G>::LAYER : op_shape<OP_D>::LAYER;
}

/* ------------------------------------------------------- the small ops */

/*
 * The latency-bound stand-in: a block of BT threads, LAT_N numbers (16 a
 * thread), `iters` rounds each of which needs the whole block's sum of
 * squares of the last (a chain of block reductions, as the KDA recurrence
 * and the routing are chains of dependent steps).  Contractive: every round
 * rescales to an RMS of 0.75, so fp32 differences do not grow.
 */
template <int NT = BT>
__device__ __forceinline__ void
lat_op(float *out, const float *in, int iters, float *red)
{
	constexpr int per = LAT_N / NT;
	float		v[per];

	/* element i = threadIdx.x + NT j; its constant term is indexed by i / BT, whatever NT */
#pragma unroll
	for (int j = 0; j < per; j++)
		v[j] = __ldcg(in + threadIdx.x + NT * j);
	for (int it = 0; it < iters; it++)
	{
		float		ss = 0;

#pragma unroll
		for (int j = 0; j < per; j++)
			ss = fmaf(v[j], v[j], ss);
		ss = block_sum(ss, red);
		{
			float		r = 0.75f / sqrtf(ss / (float) LAT_N + EPS);

#pragma unroll
			for (int j = 0; j < per; j++)
				v[j] = fmaf(v[j], r, 0.01f * (float) (((int) (threadIdx.x + NT * j) / BT + it) % 5 - 2));
		}
	}
#pragma unroll
	for (int j = 0; j < per; j++)
		out[threadIdx.x + NT * j] = v[j];
}

/*
 * dst = nw * v / rms(v), v = a + b (b NULL: a), one block of BT threads;
 * keep (unless NULL) gets v.  dst may be shared memory.  Inputs read
 * through L2 (__ldcg): they were written by other SMs during this kernel.
 */
template <int NT = BT>
__device__ __forceinline__ void
add_norm_block(float *dst, float *keep, const float *a, const float *b, const float *__restrict__ nw, float *red)
{
	constexpr int per = (HID + NT - 1) / NT;
	float		v[per],
				ss = 0;

#pragma unroll
	for (int j = 0; j < per; j++)
	{
		int			i = threadIdx.x + NT * j;

		v[j] = i < HID ? __ldcg(a + i) + (b ? __ldcg(b + i) : 0.0f) : 0.0f;
		ss = fmaf(v[j], v[j], ss);
	}
	ss = block_sum(ss, red);
	{
		float		inv = 1.0f / sqrtf(ss / (float) HID + EPS);

#pragma unroll
		for (int j = 0; j < per; j++)
		{
			int			i = threadIdx.x + NT * j;

			if (i >= HID)
				break;
			if (keep)
				keep[i] = v[j];
			dst[i] = nw[i] * (v[j] * inv);
		}
	}
}

/* variant A's lat kernel: one block */
__global__ void __launch_bounds__(BT)
lat_kernel(float *out, const float *in, int iters)
{
	__shared__ float red[32];

	kk_dep_wait();
	kk_dep_launch();
	lat_op(out, in, iters, red);
}

/* prefetch the 128-byte lines of [p, p + bytes) into L2, the block's threads striding */
template <int NT>
__device__ __forceinline__ void
block_prefetch_l2(const char *p, size_t bytes)
{
	for (size_t o = (size_t) threadIdx.x * 128; o < bytes; o += (size_t) NT * 128)
		asm volatile("prefetch.global.L2 [%0];\n"::"l"(p + o));
}

/*
 * Variants H and I: the library's block-rows GEMV (its rows_product, one
 * input row, the same blocks as kk_gemv's) whose blocks, before
 * kk_dep_wait, request into L2 their own rows (own) and their slice of
 * [ahead, ahead + ahead_bytes) (the next product's first weights).  A GEMV
 * launched by PDL while a long kernel runs (O during the lat op) then has
 * all of its weights on chip when its input is ready.
 */
template <int RB, int NT>
__global__ void __launch_bounds__(NT)
gemv_pf_kernel(float *y, const float *x, const uint16_t *W, int rows, int cols, int own, const char *ahead,
			   size_t ahead_bytes)
{
	int			row0 = blockIdx.x * RB;

	if (own)
		block_prefetch_l2<NT>((const char *) (W + (size_t) row0 * cols),
							  (size_t) (rows - row0 < RB ? rows - row0 : RB) * cols * 2);
	if (ahead_bytes)
	{
		size_t		share = (ahead_bytes / gridDim.x + 127) & ~(size_t) 127,
					lo = share * blockIdx.x;

		if (lo < ahead_bytes)
			block_prefetch_l2<NT>(ahead + lo, ahead_bytes - lo < share ? ahead_bytes - lo : share);
	}
	rows_product<1, RB, NT>(y, 0, x, 0, W, rows, cols, row0);
}

/* y = W x as kk_gemv launches it (bf16, one row), with gemv_pf_kernel's prefetches */
static void
gemv_pf(cudaStream_t s, float *y, const float *x, const void *W, int rows, int cols, int own, const void *ahead,
		size_t ahead_bytes)
{
	if (rows_wide(cols))
		kk_launch(gemv_pf_kernel<ROWS_RB_WIDE, ROWS_BT_WIDE>, dim3(ceil_div(rows, ROWS_RB_WIDE)),
				  dim3(ROWS_BT_WIDE), 0, s, y, x, (const uint16_t *) W, rows, cols, own, (const char *) ahead,
				  ahead_bytes);
	else
		kk_launch(gemv_pf_kernel<ROWS_RB, ROWS_BT>, dim3(ceil_div(rows, ROWS_RB)), dim3(ROWS_BT), 0, s, y, x,
				  (const uint16_t *) W, rows, cols, own, (const char *) ahead, ahead_bytes);
}

/* the ceiling: a read of n 16-byte pieces that keeps nothing (as gemv_sweep.cu's stream_read) */
__global__ void __launch_bounds__(256)
stream_read_kernel(const uint4 *__restrict__ p, size_t n, unsigned *out)
{
	unsigned	acc = 0;
	size_t		i = (size_t) blockIdx.x * blockDim.x + threadIdx.x,
				stride = (size_t) gridDim.x * blockDim.x;

	for (; i + 3 * stride < n; i += 4 * stride)
	{
		uint4		q0 = __ldg(p + i),
					q1 = __ldg(p + i + stride),
					q2 = __ldg(p + i + 2 * stride),
					q3 = __ldg(p + i + 3 * stride);

		acc ^= q0.x ^ q1.y ^ q2.z ^ q3.w;
	}
	for (; i < n; i += stride)
		acc ^= __ldg(p + i).x;
	if (acc == 0x9e3779b9u)
		out[0] = acc;
}

/* keeps the GPU busy ~50 us while the host submits the timed launch (the time is the GPU's, not the host's) */
__global__ void
spin_kernel(long long cycles)
{
	long long	t0 = clock64();

	while (clock64() - t0 < cycles)
		;
}

/* mark `what` of layer l in the trace (thread 0 of a block for which `mine`) */
__device__ __forceinline__ void
trace_mark(const chain_t &c, int l, int what, bool mine)
{
	unsigned long long t;

	if (c.trace && mine && threadIdx.x == 0)
	{
		asm volatile("mov.u64 %0, %%globaltimer;\n":"=l"(t));
		c.trace[l * T_N + what] = t;
	}
}

/* ------------------------------------------- dependencies in device memory */

__device__ __forceinline__ unsigned
ld_acquire(const unsigned *p)
{
	unsigned	v;

	asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n":"=r"(v):"l"(p):"memory");
	return v;
}

__device__ __forceinline__ unsigned
atom_add_acq_rel(unsigned *p, unsigned v)
{
	unsigned	old;

	asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;\n":"=r"(old):"l"(p), "r"(v):"memory");
	return old;
}

__device__ __forceinline__ void
red_add_release(unsigned *p, unsigned v)
{
	asm volatile("red.release.gpu.global.add.u32 [%0], %1;\n"::"l"(p), "r"(v):"memory");
}

/*
 * The block waits until *w >= target: thread 0 spins on an acquire load,
 * the barrier passes what it acquired on to the block's other threads.
 * Only ever called for a word that blocks which never wait on this one will
 * bump (all blocks are resident: the launch checks it), so it cannot hang.
 */
__device__ __forceinline__ void
block_wait(const unsigned *w, unsigned target)
{
	if (threadIdx.x == 0)
		while (ld_acquire(w) < target)
			;
	__syncthreads();
}

/*
 * The block has finished its share of an op: after the barrier (every
 * thread's writes are done), thread 0 publishes them with a release
 * increment of the op's done counter.  Returns true in the last block to
 * finish (every block's writes are visible to it: the increment acquires
 * too), which then does the small op that follows.
 */
__device__ __forceinline__ bool
block_done(unsigned *w)
{
	__shared__ int last;

	__syncthreads();
	if (threadIdx.x == 0)
	{
		__threadfence();
		last = atom_add_acq_rel(w, 1) == gridDim.x - 1;
	}
	__syncthreads();
	return last;
}

/* a one-block stage's result is ready */
__device__ __forceinline__ void
block_signal(unsigned *w)
{
	__syncthreads();
	if (threadIdx.x == 0)
	{
		__threadfence();
		red_add_release(w, 1);
	}
}

/* n floats (a multiple of 4) from global (written during this kernel) to shared */
template <int NT = BT>
__device__ __forceinline__ void
stage_vector(float *xs, const float *src, int n)
{
	for (int i = threadIdx.x; i < n / 4; i += NT)
		((float4 *) xs)[i] = __ldcg((const float4 *) src + i);
	__syncthreads();
}

/* ------------------------------------------------ a warp's weight stream */

/*
 * 16-byte cp.async with a compiler memory barrier (the ring's slots are
 * refilled by the thread that read them: the refill must stay after the read
 * in program order).
 */
__device__ __forceinline__ void
cp_async16_ordered(void *smem, const void *gmem)
{
	unsigned	s = (unsigned) __cvta_generic_to_shared(smem);

	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"::"r"(s), "l"(gmem):"memory");
}

/* wait until at most n (capped at 15: waiting for more is still correct) of this thread's groups are pending */
__device__ __forceinline__ void
cp_async_wait_upto(int n)
{
	switch (n)
	{
#define W_(N) case N: asm volatile("cp.async.wait_group " #N ";\n":::"memory"); break;
			W_(0) W_(1) W_(2) W_(3) W_(4) W_(5) W_(6) W_(7) W_(8) W_(9) W_(10) W_(11) W_(12) W_(13) W_(14)
#undef W_
		default:
			asm volatile("cp.async.wait_group 15;\n":::"memory");
	}
}

/*
 * A warp's weights for the whole chain are one sequence of units: for
 * each layer, for each product, the warp's range of that product's units
 * (warp gw of nw takes units [U gw / nw, U (gw + 1) / nw)).  The issue
 * cursor walks it ahead of the consumer by up to RING pieces a lane and
 * MAXG units, each unit one cp.async group; lane t's slot k of the ring is
 * ring[k * BT + t] (consecutive threads on consecutive 16 bytes: no bank
 * conflicts), and only lane t reads it, so no barrier guards the ring.
 */
typedef struct
{
	int			l,				/* issue cursor: layer, op, unit, end of the op's range */
				op,
				u,
				end;
	int			issued,			/* pieces a lane issued / consumed */
				used,
				units_issued,
				units_used,
				islot,			/* ring slot of the next issue / consumption */
				cslot;
}			wstream_t;

__device__ __forceinline__ int
warp_global(void)
{
	return blockIdx.x * WARPS + (threadIdx.x >> 5);
}

__device__ __forceinline__ void
unit_range(int units, int *lo, int *hi)
{
	int			nw = gridDim.x * WARPS,
				gw = warp_global();

	*lo = (int) ((long long) units * gw / nw);
	*hi = (int) ((long long) units * (gw + 1) / nw);
}

/* move the issue cursor past empty ranges (and to the next op at a range's end) */
__device__ __forceinline__ void
cursor_settle(wstream_t &ws, int l1)
{
	while (ws.l < l1 && ws.u >= ws.end)
	{
		if (++ws.op == N_OPS)
		{
			ws.op = 0;
			ws.l++;
		}
		unit_range(op_units(ws.op), &ws.u, &ws.end);
	}
}

__device__ __forceinline__ void
stream_init(wstream_t &ws, int l0, int l1)
{
	ws.l = l0;
	ws.op = OP_P;
	unit_range(op_units(OP_P), &ws.u, &ws.end);
	ws.issued = ws.used = ws.units_issued = ws.units_used = ws.islot = ws.cslot = 0;
	cursor_settle(ws, l1);
}

/*
 * Issue the warp's next units while the ring and the group budget allow,
 * up to and including op `lim_op` of layer `lim_l` (variant B passes the
 * chain's end: loads run ahead across dependencies; C the op whose input is
 * ready).  Weights are constant, so loading them early is always correct.
 */
__device__ __forceinline__ void
stream_issue(wstream_t &ws, const chain_t &c, uint4 *ring, int lim_l, int lim_op)
{
	int			lane = threadIdx.x & 31;

	while (ws.l < c.l1 && (ws.l < lim_l || (ws.l == lim_l && ws.op <= lim_op)))
	{
		int			n = op_ppl(ws.op);
		const uint4 *src;

		if (ws.issued + n - ws.used > RING || ws.units_issued - ws.units_used >= MAXG)
			break;
		src = op_weights(c, ws.op) + ws.l * op_layer_pieces(ws.op) + (size_t) ws.u * (n * 32) + lane;
		for (int k = 0; k < n; k++)
		{
			cp_async16_ordered(ring + ws.islot * BT + threadIdx.x, src + 32 * k);
			ws.islot = ws.islot + 1 == RING ? 0 : ws.islot + 1;
		}
		cp_async_commit();
		ws.issued += n;
		ws.units_issued++;
		ws.u++;
		cursor_settle(ws, c.l1);
	}
}

/* the lane's pieces of the oldest issued unit (issued: stream_issue ran since the last use) */
template <int N>
__device__ __forceinline__ void
stream_take(wstream_t &ws, const uint4 *ring, uint4 (&w)[N])
{
	cp_async_wait_upto(ws.units_issued - ws.units_used - 1);
#pragma unroll
	for (int k = 0; k < N; k++)
	{
		int			s = ws.cslot + k;

		w[k] = ring[(s >= RING ? s - RING : s) * BT + threadIdx.x];
	}
	ws.cslot = ws.cslot + N >= RING ? ws.cslot + N - RING : ws.cslot + N;
	ws.used += N;
	ws.units_used++;
}

/* acc + the 8 weights of piece w times xs[8q .. 8q + 8) */
__device__ __forceinline__ float
piece_dot(uint4 w, const float *xs, int q, float acc)
{
	float		f[8];

	unpack8_bf16(w, f);
	return fma8_acc(f, ((const float4 *) xs)[2 * q], ((const float4 *) xs)[2 * q + 1], acc);
}

/*
 * The warp's units of product OP in layer l, input staged in xs: P writes
 * whole rows to y; G writes h = silu(gate) up of its output; O and D
 * accumulate a row's quarters in registers while they stay in the warp and
 * add the row's sum to y (zeroed) with an atomic: a row is split between at
 * most two warps (a warp has >= 8 units, a row 4), and 0 + a + b is the
 * same in either order, so the result is deterministic.
 */
template <int OP, bool PREFETCH>
__device__ __forceinline__ void
stream_op(wstream_t &ws, const chain_t &c, uint4 *ring, int l, const float *xs, float *y)
{
	typedef op_shape<OP> S;
	int			lane = threadIdx.x & 31,
				lo,
				hi,
				row = -1;
	float		racc = 0;

	unit_range(S::UNITS, &lo, &hi);
	for (int u = lo; u < hi; u++)
	{
		uint4		w[S::PPL];

		stream_issue(ws, c, ring, PREFETCH ? c.l1 : l, PREFETCH ? 0 : OP);
		stream_take<S::PPL>(ws, ring, w);
		if (OP == OP_G)
		{
			float		g = 0,
						up = 0;

#pragma unroll
			for (int k = 0; k < S::PPL / 2; k++)
			{
				g = piece_dot(w[k], xs, lane + 32 * k, g);
				up = piece_dot(w[k + S::PPL / 2], xs, lane + 32 * k, up);
			}
			g = warp_sum(g);
			up = warp_sum(up);
			if (lane == 0)
				y[u] = siluf_(g) * up;
		}
		else if (OP == OP_P)
		{
			float		acc = 0;

#pragma unroll
			for (int k = 0; k < S::PPL; k++)
				acc = piece_dot(w[k], xs, lane + 32 * k, acc);
			acc = warp_sum(acc);
			if (lane == 0)
				y[u] = acc;
		}
		else
		{
			int			r = u * S::UNIT / S::ROWP,
						q0 = u * S::UNIT % S::ROWP;

			if (r != row)
			{
				if (row >= 0)
				{
					float		s = warp_sum(racc);

					if (lane == 0)
						atomicAdd(y + row, s);
				}
				row = r;
				racc = 0;
			}
#pragma unroll
			for (int k = 0; k < S::PPL; k++)
				racc = piece_dot(w[k], xs, q0 + lane + 32 * k, racc);
		}
	}
	if (row >= 0)
	{
		float		s = warp_sum(racc);

		if (lane == 0)
			atomicAdd(y + row, s);
	}
	/* the units after this op (B: the next op's, across its dependency) */
	stream_issue(ws, c, ring, PREFETCH ? c.l1 : l, PREFETCH ? 0 : OP);
}

/* ------------------------------------------------------ the persistent chain */

/*
 * The chain's layers [c.l0, c.l1) in one launch (variants B, C, D: all of
 * them; E: one), BT threads a block, all
 * blocks resident (cooperative launch).  Per layer: P, the lat op (last
 * block of P), O, the add + norm (last block of O; SPREAD: every block as
 * it stages G's input), G, D, the add + next norm (last block of D; SPREAD:
 * every block as it stages the next P's input).  A block waits for an op's
 * input only after it has issued its share of that op's weights
 * (PREFETCH; without it the issue starts after the wait).
 */
template <bool PREFETCH, bool SPREAD>
__global__ void __launch_bounds__(BT, 1)
persist_chain(chain_t c)
{
	extern __shared__ uint4 smem_[];
	uint4	   *ring = smem_;
	float	   *xs = (float *) (smem_ + RING * BT);
	__shared__ float red[32];
	wstream_t	ws;
	unsigned	all = gridDim.x;

	stream_init(ws, c.l0, c.l1);
	if (PREFETCH)
		stream_issue(ws, c, ring, c.l1, 0);
	if (!SPREAD && c.l0 == 0 && blockIdx.x == 0)
	{
		add_norm_block(c.xn, NULL, c.xres, NULL, c.nw, red);
		block_signal(c.cnt + C_N1);
	}
	for (int l = c.l0; l < c.l1; l++)
	{
		unsigned   *cl = c.cnt + l * C_N;
		size_t		lh = (size_t) l * HID;
		bool		b0 = blockIdx.x == 0,
					last;

		/* P: xn -> p, then the lat op in the last block */
		if (SPREAD)
		{
			if (l > 0)
				block_wait(cl - C_N + C_D, all);
			add_norm_block(xs, l > 0 && b0 ? c.xres + lh : NULL, l > 0 ? c.xmid + lh - HID : c.xres,
						   l > 0 ? c.d + lh - HID : NULL, c.nw, red);
			__syncthreads();
		}
		else
		{
			block_wait(cl + C_N1, 1);
			stage_vector(xs, c.xn + lh, HID);
		}
		trace_mark(c, l, T_P_IN, b0);
		stream_op<OP_P, PREFETCH>(ws, c, ring, l, xs, c.p + (size_t) l * P_ROWS);
		trace_mark(c, l, T_P_END, b0);
		if (block_done(cl + C_P))
		{
			trace_mark(c, l, T_P_ALL, true);
			lat_op(c.a + (size_t) l * LAT_N, c.p + (size_t) l * P_ROWS, c.lat_iters, red);
			block_signal(cl + C_LAT);
			trace_mark(c, l, T_LAT, true);
		}

		/* O: a -> o, then (B) x + o and its norm in the last block */
		block_wait(cl + C_LAT, 1);
		stage_vector(xs, c.a + (size_t) l * LAT_N, LAT_N);
		trace_mark(c, l, T_O_IN, b0);
		stream_op<OP_O, PREFETCH>(ws, c, ring, l, xs, c.o + lh);
		trace_mark(c, l, T_O_END, b0);
		last = block_done(cl + C_O);
		trace_mark(c, l, T_O_ALL, last);
		if (last && !SPREAD)
		{
			add_norm_block(c.xn2 + lh, c.xmid + lh, c.xres + lh, c.o + lh, c.nw, red);
			block_signal(cl + C_N2);
			trace_mark(c, l, T_N2, true);
		}

		/* G: xn2 -> h */
		if (SPREAD)
		{
			block_wait(cl + C_O, all);
			add_norm_block(xs, b0 ? c.xmid + lh : NULL, c.xres + lh, c.o + lh, c.nw, red);
			__syncthreads();
		}
		else
		{
			block_wait(cl + C_N2, 1);
			stage_vector(xs, c.xn2 + lh, HID);
		}
		trace_mark(c, l, T_G_IN, b0);
		stream_op<OP_G, PREFETCH>(ws, c, ring, l, xs, c.h + (size_t) l * H_N);
		trace_mark(c, l, T_G_END, b0);
		last = block_done(cl + C_G);
		trace_mark(c, l, T_G_ALL, last);

		/* D: h -> d, then (B) x + d and the next layer's norm in the last block */
		block_wait(cl + C_G, all);
		stage_vector(xs, c.h + (size_t) l * H_N, H_N);
		trace_mark(c, l, T_D_IN, b0);
		stream_op<OP_D, PREFETCH>(ws, c, ring, l, xs, c.d + lh);
		trace_mark(c, l, T_D_END, b0);
		last = block_done(cl + C_D);
		trace_mark(c, l, T_D_ALL, last);
		if (last && (!SPREAD || l == c.L - 1))
		{
			add_norm_block(c.xn + lh + HID, c.xres + lh + HID, c.xmid + lh, c.d + lh, c.nw, red);
			block_signal(cl + C_N + C_N1);
		}
	}
}

/* --------------------------------------- the register-streaming chain (F, G, J) */

/*
 * Variants F, G and J: the library's way of streaming weights inside one
 * persistent kernel.  One block of FT threads an SM (32 warps, <= 64
 * registers a thread), no shared-memory ring: a warp's weights go straight
 * to registers, each lane with FDEPTH 16-byte loads in flight (a slot is
 * reloaded with the piece FDEPTH ahead before its piece is used): 32 warps
 * x 32 lanes x 6 = 6144 pieces, 96 KB an SM, as the library's block-rows
 * GEMV (~21 blocks of 96 threads an SM, 3 rows each: ~6000 pieces).
 *
 * Work: a product is cut into units of 32 consecutive 16-byte pieces of
 * its row-major matrix (one piece a lane; every row is a whole number of
 * units: P and G 9, O 16, D 36), and warp gw of nw takes units
 * [U gw / nw, U (gw + 1) / nw) (a warp has ~18 of P, 8.7 of O, 39 of G,
 * 20 of D: one unit of imbalance, 11 % for O, 2.5-6 % for the others).  A warp
 * sums a row's units in registers and adds the row's sum to the zeroed
 * output with an atomic when the row changes (rows split between warps:
 * fp32 order may vary run to run, ~1e-7).  G writes its row sums; D applies
 * silu(gate) up while it stages its input, so SwiGLU is no stage; both norms
 * are done by every block as it stages its input (variant D's finding).
 */
#define FT 1024
#define FWARPS (FT / 32)
#define FDEPTH 6
#define FUNIT_BYTES 512

template <int OP>
struct f_shape
{
	static constexpr int UPR = op_shape<OP>::ROWP / 32;	/* units a row */
	static constexpr int UNITS = op_shape<OP>::ROWS * UPR;
};

__device__ __forceinline__ void
f_range(int units, int *lo, int *hi)
{
	int			nw = gridDim.x * FWARPS,
				gw = blockIdx.x * FWARPS + (threadIdx.x >> 5);

	*lo = (int) ((long long) units * gw / nw);
	*hi = (int) ((long long) units * (gw + 1) / nw);
}

/* a row's partial sum into the zeroed output */
__device__ __forceinline__ void
f_flush(float *y, int row, float racc)
{
	float		s = warp_sum(racc);

	if ((threadIdx.x & 31) == 0)
		atomicAdd(y + row, s);
}

/*
 * The warp's units of product OP (W: this layer's matrix), input staged in
 * xs, row sums added to y.  Not inlined: in the chain the layer's state
 * would compete with the stream's 64 registers (spills in the hot loop);
 * as a call it saves what it needs once.
 */
template <int OP>
__device__ __noinline__ void
f_stream(const uint4 *__restrict__ W, const float *xs, float *y)
{
	constexpr int UPR = f_shape<OP>::UPR;
	int			lane = threadIdx.x & 31,
				lo,
				hi,
				row,
				ur;				/* the unit being used: its index in its row (warp-uniform) */
	const uint4 *ahead;			/* the lane's piece of the unit FDEPTH ahead of the one being used */
	uint4		nxt[FDEPTH];
	float		racc = 0;

	f_range(f_shape<OP>::UNITS, &lo, &hi);
	if (lo >= hi)
		return;
	ahead = W + (size_t) 32 * lo + lane;
#pragma unroll
	for (int k = 0; k < FDEPTH; k++, ahead += 32)
		nxt[k] = lo + k < hi ? __ldg(ahead) : make_uint4(0, 0, 0, 0);
	row = lo / UPR;
	ur = lo - row * UPR;
	for (int u0 = lo; u0 < hi; u0 += FDEPTH)
	{
#pragma unroll
		for (int k = 0; k < FDEPTH; k++, ahead += 32)
		{
			uint4		w = nxt[k];

			if (u0 + k >= hi)
				break;
			/* the slot's next piece is requested before this one is used: FDEPTH in flight */
			nxt[k] = u0 + k + FDEPTH < hi ? __ldg(ahead) : make_uint4(0, 0, 0, 0);
			if (ur == UPR)
			{
				f_flush(y, row, racc);
				row++;
				ur = 0;
				racc = 0;
			}
			racc = piece_dot(w, xs, ur * 32 + lane, racc);
			ur++;
		}
	}
	f_flush(y, row, racc);
}

/*
 * Variant J: f_stream with the units claimed dynamically, FCHUNK at a time
 * from the op's counter (an atomic a claim, lane 0's result broadcast), so
 * that a slow SM takes fewer and the op ends when the last chunk does, not
 * when the slowest static share does.  The loads run FDEPTH units ahead
 * across chunk ends: `ca` is the chunk being loaded, `cu` the one being used
 * and `cn` the one claimed after it (FDEPTH <= FCHUNK: the loads are at most
 * one chunk ahead; only the last chunk is short, and every claim after it
 * is past the end).  Chunks of 24 units (12 KB): 3456-6912 claims an op.
 */
#define FCHUNK 24

__device__ __forceinline__ int
f_claim(unsigned *ctr)
{
	unsigned	v = 0;

	if ((threadIdx.x & 31) == 0)
		v = atomicAdd(ctr, 1);
	return (int) __shfl_sync(0xffffffffu, v, 0);
}

template <int OP>
__device__ __noinline__ void
f_stream_dyn(const uint4 *__restrict__ W, const float *xs, float *y, unsigned *ctr)
{
	constexpr int UPR = f_shape<OP>::UPR,
				UNITS = f_shape<OP>::UNITS,
				NCH = (UNITS + FCHUNK - 1) / FCHUNK;
	int			lane = threadIdx.x & 31,
				ca = f_claim(ctr),	/* loads: chunk, its next unit */
				ua,
				cu = ca,		/* use: chunk, unit, the chunk after it */
				uu,
				cn = -1,
				row = -1;
	uint4		nxt[FDEPTH];
	float		racc = 0;

	if (ca >= NCH)
		return;
	ua = ca * FCHUNK;
	uu = ua;
#pragma unroll
	for (int k = 0; k < FDEPTH; k++)
	{
		nxt[k] = ca < NCH ? __ldg(W + (size_t) 32 * ua + lane) : make_uint4(0, 0, 0, 0);
		if (ca < NCH && ++ua == min((ca + 1) * FCHUNK, UNITS))
		{
			ca = f_claim(ctr);
			ua = ca * FCHUNK;
			if (cn < 0)
				cn = ca;
		}
	}
	while (cu < NCH)
	{
#pragma unroll
		for (int k = 0; k < FDEPTH; k++)
		{
			uint4		w = nxt[k];
			int			r = uu / UPR;

			if (cu >= NCH)
				break;
			nxt[k] = ca < NCH ? __ldg(W + (size_t) 32 * ua + lane) : make_uint4(0, 0, 0, 0);
			if (ca < NCH && ++ua == min((ca + 1) * FCHUNK, UNITS))
			{
				ca = f_claim(ctr);
				ua = ca * FCHUNK;
				if (cn < 0)
					cn = ca;
			}
			if (r != row)
			{
				if (row >= 0)
					f_flush(y, row, racc);
				row = r;
				racc = 0;
			}
			racc = piece_dot(w, xs, (uu - r * UPR) * 32 + lane, racc);
			if (++uu == min((cu + 1) * FCHUNK, UNITS))
			{
				/* the next chunk: claimed by the loads already (or past the end) */
				cu = cn;
				cn = cu == ca ? -1 : ca;
				uu = cu * FCHUNK;
			}
		}
	}
	if (row >= 0)
		f_flush(y, row, racc);
}

/*
 * Variant G: the L2 prefetch of units [lo + skip, lo + skip + n) of the
 * warp's share of product OP (W: its layer's matrix), issued before the
 * block waits on a dependency, so that the op reads them from L2.
 */
template <int OP>
__device__ __forceinline__ void
f_prefetch(const uint4 *W, int skip, int n)
{
	int			lo,
				hi;

	f_range(f_shape<OP>::UNITS, &lo, &hi);
	lo += skip;
	hi = lo + n < hi ? lo + n : hi;
	if (lo < hi)
		kk_prefetch_l2(W + (size_t) 32 * lo, (size_t) (hi - lo) * FUNIT_BYTES, threadIdx.x & 31);
}

/* layer l's matrix of product op */
__device__ __forceinline__ const uint4 *
layer_w(const chain_t &c, int op, int l)
{
	return op_weights(c, op) + (size_t) l * op_layer_pieces(op);
}

/* units a warp: KB over the grid -> units of each warp, rounded (at least 1 when kb > 0) */
__device__ __forceinline__ int
f_units_of_kb(int kb)
{
	int			nw = gridDim.x * FWARPS,
				u = (int) (((long long) kb * (1024 / FUNIT_BYTES) + nw / 2) / nw);

	return kb > 0 && u < 1 ? 1 : u;
}

/* D's input: h = silu(g[2j]) g[2j + 1] from G's row sums (written during this kernel: through L2) */
__device__ __forceinline__ void
f_stage_swiglu(float *xs, const float *gs)
{
	for (int j = threadIdx.x; j < H_N; j += FT)
	{
		float2		g = __ldcg((const float2 *) gs + j);

		xs[j] = siluf_(g.x) * g.y;
	}
	__syncthreads();
}

/*
 * The chain in one launch, one FT-thread block an SM.  Per layer: every
 * block stages P's input (norm of x; layer > 0: x + d once all of D is
 * done), P, the lat op by P's last block, O, every block stages G's input
 * (norm of x + o once all of O is done), G, every block stages D's input
 * (SwiGLU of G's sums once all of G is done), D.  PF (variant G): before
 * each wait a warp issues L2 prefetches of its share of the next product:
 * all of O's and the first pf_ahead_kb of G's during the lat op, the first
 * pf_hop_kb of the next product's before the others.  DYN (variant J): the
 * units claimed dynamically (f_stream_dyn).
 */
template <bool PF, bool DYN>
__global__ void __launch_bounds__(FT, 1)
f_chain(chain_t c)
{
	__shared__ __align__(16) float xs[XS_FLOATS];
	__shared__ float red[32];
	unsigned	all = gridDim.x;

	/* (the prefetch lengths are recomputed where used: kept live they cost spills at 64 registers) */
	if (PF)
		f_prefetch<OP_P>(c.Wp, 0, f_units_of_kb(c.pf_hop_kb));
	for (int l = c.l0; l < c.l1; l++)
	{
		unsigned   *cl = c.cnt + l * C_N;
		size_t		lh = (size_t) l * HID;
		bool		b0 = blockIdx.x == 0;

		/* P: norm(x) -> p, then the lat op in P's last block */
		if (l > 0)
			block_wait(cl - C_N + C_D, all);
		add_norm_block<FT>(xs, l > 0 && b0 ? c.xres + lh : NULL, l > 0 ? c.xmid + lh - HID : c.xres,
						   l > 0 ? c.d + lh - HID : NULL, c.nw, red);
		__syncthreads();
		trace_mark(c, l, T_P_IN, b0);
		if (DYN)
			f_stream_dyn<OP_P>(layer_w(c, OP_P, l), xs, c.p + (size_t) l * P_ROWS, cl + C_QP);
		else
			f_stream<OP_P>(layer_w(c, OP_P, l), xs, c.p + (size_t) l * P_ROWS);
		trace_mark(c, l, T_P_END, b0);
		if (PF)
		{
			f_prefetch<OP_O>(layer_w(c, OP_O, l), 0, 1 << 30);
			f_prefetch<OP_G>(layer_w(c, OP_G, l), 0, f_units_of_kb(c.pf_ahead_kb));
		}
		if (block_done(cl + C_P))
		{
			trace_mark(c, l, T_P_ALL, true);
			lat_op<FT>(c.a + (size_t) l * LAT_N, c.p + (size_t) l * P_ROWS, c.lat_iters, red);
			block_signal(cl + C_LAT);
			trace_mark(c, l, T_LAT, true);
		}

		/* O: a -> o */
		block_wait(cl + C_LAT, 1);
		stage_vector<FT>(xs, c.a + (size_t) l * LAT_N, LAT_N);
		trace_mark(c, l, T_O_IN, b0);
		if (DYN)
			f_stream_dyn<OP_O>(layer_w(c, OP_O, l), xs, c.o + lh, cl + C_QO);
		else
			f_stream<OP_O>(layer_w(c, OP_O, l), xs, c.o + lh);
		trace_mark(c, l, T_O_END, b0);
		if (PF)
			f_prefetch<OP_G>(layer_w(c, OP_G, l), f_units_of_kb(c.pf_ahead_kb), f_units_of_kb(c.pf_hop_kb));
		trace_mark(c, l, T_O_ALL, block_done(cl + C_O));

		/* G: norm(x + o) -> G's row sums */
		block_wait(cl + C_O, all);
		add_norm_block<FT>(xs, b0 ? c.xmid + lh : NULL, c.xres + lh, c.o + lh, c.nw, red);
		__syncthreads();
		trace_mark(c, l, T_G_IN, b0);
		if (DYN)
			f_stream_dyn<OP_G>(layer_w(c, OP_G, l), xs, c.gs + (size_t) l * G_ROWS, cl + C_QG);
		else
			f_stream<OP_G>(layer_w(c, OP_G, l), xs, c.gs + (size_t) l * G_ROWS);
		trace_mark(c, l, T_G_END, b0);
		if (PF)
			f_prefetch<OP_D>(layer_w(c, OP_D, l), 0, f_units_of_kb(c.pf_hop_kb));
		trace_mark(c, l, T_G_ALL, block_done(cl + C_G));

		/* D: SwiGLU of G's sums -> d; after the last layer, x + d (and its norm) by D's last block */
		block_wait(cl + C_G, all);
		f_stage_swiglu(xs, c.gs + (size_t) l * G_ROWS);
		trace_mark(c, l, T_D_IN, b0);
		if (DYN)
			f_stream_dyn<OP_D>(layer_w(c, OP_D, l), xs, c.d + lh, cl + C_QD);
		else
			f_stream<OP_D>(layer_w(c, OP_D, l), xs, c.d + lh);
		trace_mark(c, l, T_D_END, b0);
		if (PF && l + 1 < c.l1)
			f_prefetch<OP_P>(layer_w(c, OP_P, l + 1), 0, f_units_of_kb(c.pf_hop_kb));
		{
			bool		last = block_done(cl + C_D);

			trace_mark(c, l, T_D_ALL, last);
			if (last && l == c.L - 1)
			{
				add_norm_block<FT>(c.xn + lh + HID, c.xres + lh + HID, c.xmid + lh, c.d + lh, c.nw, red);
				block_signal(cl + C_N + C_N1);
			}
		}
	}
}

/* ------------------------------------------------------------------ harness */

typedef struct
{
	int			L;
	chain_t		c;
	uint16_t   *wbase;			/* all weights, one allocation: P, O, G, D */
	size_t		wbytes;
	float	   *act;			/* all activations and counters, one allocation (zeroed before a run) */
	size_t		act_bytes;
	float	   *x_in,			/* the chain's input [HID] */
			   *xa;				/* variant A's residual stream */
	float	   *a_xn,			/* variant A's buffers */
			   *a_g;
	cudaGraphExec_t graph_a,
				graph_h,
				graph_i,
				graph_lat;
	int			sms,
				grid,			/* persistent grid, blocks (B-E) */
				fgrid,			/* F, G and J.s grid */
				smem;
}			probe_t;

static size_t
layer_bytes(void)
{
	return 2 * ((size_t) P_ROWS * HID + (size_t) HID * LAT_N + (size_t) G_ROWS * HID + (size_t) HID * H_N);
}

/* carve the activations of L layers out of one zeroable allocation */
static void
probe_buffers(probe_t *pr)
{
	int			L = pr->L;
	size_t		floats = (size_t) (L + 1) * HID * 2 + (size_t) L * (3 * HID + P_ROWS + LAT_N + H_N + HID + G_ROWS);
	size_t		cnt_bytes = (size_t) (L + 1) * C_N * sizeof(unsigned);
	float	   *f;

	pr->act_bytes = floats * 4 + cnt_bytes;
	CK(cudaMalloc(&pr->act, pr->act_bytes));
	f = pr->act;
	pr->c.xres = f, f += (size_t) (L + 1) * HID;
	pr->c.xn = f, f += (size_t) (L + 1) * HID;
	pr->c.xmid = f, f += (size_t) L * HID;
	pr->c.xn2 = f, f += (size_t) L * HID;
	pr->c.o = f, f += (size_t) L * HID;
	pr->c.d = f, f += (size_t) L * HID;
	pr->c.p = f, f += (size_t) L * P_ROWS;
	pr->c.a = f, f += (size_t) L * LAT_N;
	pr->c.h = f, f += (size_t) L * H_N;
	pr->c.gs = f, f += (size_t) L * G_ROWS;
	pr->c.cnt = (unsigned *) f;
}

/*
 * Variants A, H, I: the chain as a kernel per op, captured (with PDL) into
 * one graph.  A: the library's kk_gemv.  H: O's GEMV (launched while the lat
 * op runs) prefetches its rows into L2 first.  I: every GEMV does, and O's
 * blocks also prefetch the first pf_ahead_kb of G's weights.
 */
enum { GA_A, GA_H, GA_I };

static cudaGraphExec_t
capture_kernels(probe_t *pr, cudaStream_t s, int mode)
{
	const chain_t *c = &pr->c;
	cudaGraph_t g;
	cudaGraphExec_t ge;
	size_t		ahead = mode == GA_I ? (size_t) c->pf_ahead_kb * 1024 : 0;

	CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
	for (int l = 0; l < pr->L; l++)
	{
		const uint16_t *Wp = (const uint16_t *) c->Wp + (size_t) l * P_ROWS * HID,
				   *Wo = (const uint16_t *) c->Wo + (size_t) l * HID * LAT_N,
				   *Wg = (const uint16_t *) c->Wg + (size_t) l * G_ROWS * HID,
				   *Wd = (const uint16_t *) c->Wd + (size_t) l * HID * H_N;
		float	   *p = c->p + (size_t) l * P_ROWS,
				   *a = c->a + (size_t) l * LAT_N,
				   *o = c->o + (size_t) l * HID,
				   *h = c->h + (size_t) l * H_N,
				   *d = c->d + (size_t) l * HID;

		if (l == 0)
			kk_rmsnorm(s, pr->a_xn, HID, pr->xa, HID, c->nw, 1, HID, EPS);
		else
			kk_add_rmsnorm(s, pr->a_xn, pr->xa, d - HID, c->nw, 1, HID, EPS);
		if (mode == GA_I)
			gemv_pf(s, p, pr->a_xn, Wp, P_ROWS, HID, 1, NULL, 0);
		else
			kk_gemv(s, p, P_ROWS, pr->a_xn, HID, 1, Wp, 1, P_ROWS, HID);
		kk_launch(lat_kernel, dim3(1), dim3(BT), 0, s, a, (const float *) p, c->lat_iters);
		if (mode == GA_A)
			kk_gemv(s, o, HID, a, LAT_N, 1, Wo, 1, HID, LAT_N);
		else
			gemv_pf(s, o, a, Wo, HID, LAT_N, 1, Wg, ahead);
		kk_add_rmsnorm(s, pr->a_xn, pr->xa, o, c->nw, 1, HID, EPS);
		if (mode == GA_I)
			gemv_pf(s, pr->a_g, pr->a_xn, Wg, G_ROWS, HID, 1, NULL, 0);
		else
			kk_gemv(s, pr->a_g, G_ROWS, pr->a_xn, HID, 1, Wg, 1, G_ROWS, HID);
		kk_swiglu(s, h, pr->a_g, pr->a_g + 1, H_N, 1, 2);
		if (mode == GA_I)
			gemv_pf(s, d, h, Wd, HID, H_N, 1, NULL, 0);
		else
			kk_gemv(s, d, HID, h, H_N, 1, Wd, 1, HID, H_N);
	}
	kk_add(s, pr->xa, c->d + (size_t) (pr->L - 1) * HID, HID);
	CK(cudaStreamEndCapture(s, &g));
	CK(cudaGraphInstantiate(&ge, g, 0));
	cudaGraphDestroy(g);
	return ge;
}

/* the kernel-per-op graphs (A, H, I) and the lat op alone */
static void
capture_a(probe_t *pr, cudaStream_t s)
{
	const chain_t *c = &pr->c;
	cudaGraph_t g;

	pr->graph_a = capture_kernels(pr, s, GA_A);
	pr->graph_h = capture_kernels(pr, s, GA_H);
	pr->graph_i = capture_kernels(pr, s, GA_I);

	/* the lat op alone: L dependent launches */
	CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
	for (int l = 0; l < pr->L; l++)
		kk_launch(lat_kernel, dim3(1), dim3(BT), 0, s, c->a + (size_t) l * LAT_N,
				  (const float *) c->p + (size_t) l * P_ROWS, c->lat_iters);
	CK(cudaStreamEndCapture(s, &g));
	CK(cudaGraphInstantiate(&pr->graph_lat, g, 0));
	cudaGraphDestroy(g);
}

typedef void (*persist_fn) (chain_t);

enum { V_A, V_B, V_C, V_D, V_E, V_F, V_G, V_H, V_I, V_J, V_COPY, V_LAT, N_V };

static const char *const vnames[N_V] = {
	"A kernel per op, PDL, graph", "B persistent, weights issued ahead", "C persistent, no early weights",
	"D persistent ahead, norms in every block", "E B as one launch a layer",
	"F persistent, 32 warps an SM streaming to registers", "G F + next op's weights prefetched to L2",
	"H A + O's GEMV prefetches its rows to L2 under the lat op", "I H + every GEMV, + G's head under the lat op",
	"J G with units claimed dynamically",
	"plain read of the weights", "lat op alone (a launch)",
};

/* the variants that run as one persistent kernel (the trace rows) */
static bool
is_persistent(int v)
{
	return (v >= V_B && v <= V_G) || v == V_J;
}

static persist_fn
persist_kernel(int v)
{
	return v == V_B || v == V_E ? persist_chain<true, false> : v == V_C ? persist_chain<false, false>
		: v == V_D ? persist_chain<true, true> : v == V_F ? f_chain<false, false> : v == V_G ? f_chain<true, false>
		: f_chain<true, true>;
}

/* reset what a run writes (outside the timed region) */
static void
probe_reset(probe_t *pr, cudaStream_t s)
{
	CK(cudaMemsetAsync(pr->act, 0, pr->act_bytes, s));
	CK(cudaMemcpyAsync(pr->c.xres, pr->x_in, HID * 4, cudaMemcpyDeviceToDevice, s));
	CK(cudaMemcpyAsync(pr->xa, pr->x_in, HID * 4, cudaMemcpyDeviceToDevice, s));
}

static unsigned *g_sink;

/* PROBE_SKIP: letters of variants B-J not to run (e.g. "BCE"; A, the read and the lat op always run) */
static const char *g_skip = "";

static bool
skipped(int v)
{
	return v >= V_B && v <= V_J && strchr(g_skip, 'A' + v) != NULL;
}

/*
 * Wait for a run, at most 10 s: a persistent variant that deadlocks would
 * otherwise hold the GPU until the device tool's limit (leaving the process
 * tears the context, and the kernel, down).
 */
static void
wait_or_quit(cudaEvent_t e, int v)
{
	struct timespec t0,
				t;
	cudaError_t st;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	while ((st = cudaEventQuery(e)) == cudaErrorNotReady)
	{
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 10)
		{
			printf("RESULT kind=persist_probe error=\"%s did not finish in 10 s (deadlock?)\"\n", vnames[v]);
			fflush(stdout);
			_exit(3);
		}
	}
	CK(st);
}

/* one run of variant v, timed by events around the launch only; returns ms */
static float
probe_run(probe_t *pr, cudaStream_t s, int v, cudaEvent_t e0, cudaEvent_t e1)
{
	float		ms;

	probe_reset(pr, s);
	spin_kernel<<<1, 1, 0, s>>>(100000);
	CK(cudaEventRecord(e0, s));
	if (v == V_A || v == V_H || v == V_I)
		CK(cudaGraphLaunch(v == V_A ? pr->graph_a : v == V_H ? pr->graph_h : pr->graph_i, s));
	else if (v == V_LAT)
		CK(cudaGraphLaunch(pr->graph_lat, s));
	else if (v == V_COPY)
		stream_read_kernel<<<pr->sms * 8, 256, 0, s>>>((const uint4 *) pr->wbase, pr->wbytes / 16, g_sink);
	else
		for (int l = v == V_E ? 0 : pr->L - 1; l < pr->L; l++)
		{
			/* B, C, D, F, G, J: the chain in one launch; E: a launch a layer */
			chain_t		c = pr->c;
			void	   *args[] = {&c};
			bool		f = v == V_F || v == V_G || v == V_J;

			c.l0 = v == V_E ? l : 0;
			c.l1 = v == V_E ? l + 1 : pr->L;
			CK(cudaLaunchCooperativeKernel((const void *) persist_kernel(v), dim3(f ? pr->fgrid : pr->grid),
										   dim3(f ? FT : BT), args, f ? 0 : pr->smem, s));
		}
	CK(cudaEventRecord(e1, s));
	wait_or_quit(e1, v);
	CK(cudaGetLastError());
	CK(cudaEventElapsedTime(&ms, e0, e1));
	return ms;
}

/* max |a - b| / max |b| over the final residual (persistent runs: xres[L]; H, I: xa) against A's */
static double
final_diff(probe_t *pr, int v, const float *ref)
{
	float		got[HID];
	double		num = 0,
				den = 0;

	CK(cudaMemcpy(got, is_persistent(v) ? pr->c.xres + (size_t) pr->L * HID : pr->xa, sizeof(got),
				  cudaMemcpyDeviceToHost));
	for (int i = 0; i < HID; i++)
	{
		num = fmax(num, fabs((double) got[i] - ref[i]));
		den = fmax(den, fabs((double) ref[i]));
	}
	return num / (den > 0 ? den : 1);
}

/*
 * Where a layer's time goes in a traced run of variant v: means over layers
 * 0 .. L - 2 of the intervals between the marks (us; %globaltimer's
 * resolution may be ~1 us on some drivers, the means over 26 layers are finer).
 */
static void
trace_row(probe_t *pr, cudaStream_t s, int v, cudaEvent_t e0, cudaEvent_t e1, unsigned long long *dev)
{
	static const struct
	{
		int			from,
					to;
		int			next;		/* `to` is in the next layer */
	}			iv[] = {
		{T_P_IN, T_P_ALL, 0}, {T_P_ALL, T_LAT, 0}, {T_LAT, T_O_IN, 0}, {T_O_IN, T_O_ALL, 0}, {T_O_ALL, T_G_IN, 0},
		{T_G_IN, T_G_ALL, 0}, {T_G_ALL, T_D_IN, 0}, {T_D_IN, T_D_ALL, 0}, {T_D_ALL, T_P_IN, 1},
		{T_P_END, T_P_ALL, 0}, {T_O_END, T_O_ALL, 0}, {T_G_END, T_G_ALL, 0}, {T_D_END, T_D_ALL, 0},
		{T_P_IN, T_P_IN, 1},
	};
	const int	n = (int) (sizeof(iv) / sizeof(iv[0]));
	std::vector<unsigned long long> t((size_t) pr->L * T_N);

	CK(cudaMemset(dev, 0, t.size() * 8));
	pr->c.trace = dev;
	probe_run(pr, s, v, e0, e1);
	pr->c.trace = NULL;
	CK(cudaMemcpy(t.data(), dev, t.size() * 8, cudaMemcpyDeviceToHost));
	printf("| %c |", 'A' + v);
	for (int i = 0; i < n; i++)
	{
		double		sum = 0;
		int			cnt = 0;

		for (int l = 0; l + 1 < pr->L; l++)
		{
			unsigned long long a = t[(size_t) l * T_N + iv[i].from],
						b = t[(size_t) (l + iv[i].next) * T_N + iv[i].to];

			if (a && b)
			{
				sum += (double) ((long long) (b - a)) / 1e3;
				cnt++;
			}
		}
		if (cnt)
			printf(" %.2f |", sum / cnt);
		else
			printf(" - |");
	}
	printf("\n");
}

static double
median(std::vector<float> &v)
{
	std::sort(v.begin(), v.end());
	return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

/* the table for a chain of L layers (weights: the first L layers of the allocation) */
static void
probe_table(probe_t *pr, cudaStream_t s, int L, int rounds)
{
	std::vector<float> t[N_V];
	float		ref[HID];
	double		diff[N_V] = {0},
				copy_us,
				gb;
	cudaEvent_t e0,
				e1;
	size_t		per_op[N_OPS] = {(size_t) P_ROWS * HID * 2, (size_t) HID * LAT_N * 2, (size_t) G_ROWS * HID * 2,
		(size_t) HID * H_N * 2};

	pr->L = pr->c.L = L;
	pr->wbytes = layer_bytes() * L;
	probe_buffers(pr);
	capture_a(pr, s);
	CK(cudaEventCreate(&e0));
	CK(cudaEventCreate(&e1));

	/* correctness: A's final residual is the reference; every persistent variant checked against it */
	probe_run(pr, s, V_A, e0, e1);
	CK(cudaMemcpy(ref, pr->xa, sizeof(ref), cudaMemcpyDeviceToHost));
	for (int v = V_B; v <= V_J; v++)
		if (!skipped(v))
		{
			/* one line as each passes: if a variant faults, the log says which */
			probe_run(pr, s, v, e0, e1);
			diff[v] = final_diff(pr, v, ref);
			printf("# L = %d, %c ran: max rel diff to A %.2e\n", L, 'A' + v, diff[v]);
			fflush(stdout);
		}
	/* rounds: every variant once a round, medians */
	for (int r = 0; r < rounds; r++)
		for (int v = 0; v < N_V; v++)
			if (!skipped(v))
				t[v].push_back(probe_run(pr, s, v, e0, e1));
	copy_us = median(t[V_COPY]) * 1000.0;
	gb = (double) pr->wbytes / 1e9;
	printf("\n### L = %d (%.2f GB of weights: P %.1f, O %.1f, G %.1f, D %.1f MB a layer), B-E: grid %d x %d threads, "
		   "%d B shared a block; F, G, J: grid %d x %d; lat %d iterations; G, I, J: %d KB of G ahead, G, J: %d KB a hop; "
		   "%d rounds\n\n",
		   L, gb, per_op[0] / 1e6, per_op[1] / 1e6, per_op[2] / 1e6, per_op[3] / 1e6, pr->grid, BT, pr->smem,
		   pr->fgrid, FT, pr->c.lat_iters, pr->c.pf_ahead_kb, pr->c.pf_hop_kb, rounds);
	printf("| variant | us a chain | us a layer | weight GB/s | of plain read | max rel diff to A |\n"
		   "|---|---:|---:|---:|---:|---:|\n");
	for (int v = 0; v < N_V; v++)
	{
		double		us = skipped(v) ? 0 : median(t[v]) * 1000.0;

		if (skipped(v))
			printf("| %s | skipped | | | | |\n", vnames[v]);
		else if (v == V_LAT)
			printf("| %s | %.2f | | | | |\n", vnames[v], us / L);
		else
			printf("| %s | %.1f | %.2f | %.0f | %.0f%% | %s |\n", vnames[v], us, us / L, gb * 1e6 / us,
				   100.0 * copy_us / us, v >= V_B && v <= V_J ? (diff[v] < 1e-3 ? "ok" : "MISMATCH") : "");
	}
	printf("\n");
	for (int v = 0; v < N_V; v++)
	{
		double		us = skipped(v) ? 0 : median(t[v]) * 1000.0;

		if (skipped(v))
			continue;
		if (v == V_LAT)
			printf("RESULT kind=persist_probe L=%d variant=lat us_op=%.3f\n", L, us / L);
		else
			printf("RESULT kind=persist_probe L=%d variant=%c us=%.1f us_layer=%.2f gbps=%.0f of_copy=%.3f "
				   "diff=%.2e\n", L, v == V_COPY ? 'R' : 'A' + v, us, us / L, gb * 1e6 / us, copy_us / us, diff[v]);
	}
	if (L > 1)
	{
		unsigned long long *dev;

		printf("\nWhere a layer's time goes (one traced run each, us, means over layers 0..%d; block 0's view: "
			   "IN = its input staged, END = its share done; ALL = the op's last block done):\n\n"
			   "| variant | P in->all | lat | ->O in | O in->all | ->G in | G in->all | ->D in | D in->all | "
			   "->next P in | P end->all | O end->all | G end->all | D end->all | layer |\n"
			   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n", L - 2);
		CK(cudaMalloc(&dev, (size_t) L * T_N * 8));
		for (int v = V_B; v <= V_J; v++)
			if (is_persistent(v) && !skipped(v))
				trace_row(pr, s, v, e0, e1, dev);
		cudaFree(dev);
	}
	fflush(stdout);
	cudaGraphExecDestroy(pr->graph_a);
	cudaGraphExecDestroy(pr->graph_h);
	cudaGraphExecDestroy(pr->graph_i);
	cudaGraphExecDestroy(pr->graph_lat);
	cudaFree(pr->act);
	cudaEventDestroy(e0);
	cudaEventDestroy(e1);
}

int
main(int argc, char **argv)
{
	const int	Lmax = 27;
	int			rounds = argc > 1 ? atoi(argv[1]) : 15;
	const char *it = getenv("PROBE_LAT_ITERS");
	probe_t		pr;
	cudaStream_t s;
	cudaDeviceProp prop;
	int			per_sm = 1 << 30;
	size_t		lb = layer_bytes();
	uint16_t   *w;

	memset(&pr, 0, sizeof(pr));
	kk_set_pdl(1);
	CK(cudaGetDeviceProperties(&prop, 0));
	if (!prop.cooperativeLaunch)
	{
		printf("no cooperative launch on this device: the persistent variants cannot be run\n");
		return 1;
	}
	pr.c.lat_iters = it ? atoi(it) : 24;
	g_skip = getenv("PROBE_SKIP") ? getenv("PROBE_SKIP") : "";
	pr.c.pf_ahead_kb = (int) (1024 * (getenv("PROBE_AHEAD_MB") ? atof(getenv("PROBE_AHEAD_MB")) : 16));
	pr.c.pf_hop_kb = (int) (1024 * (getenv("PROBE_HOP_MB") ? atof(getenv("PROBE_HOP_MB")) : 4));
	pr.smem = RING * BT * 16 + XS_FLOATS * 4;
	/* every block resident: the grid is what the occupancy calculator admits for every variant */
	for (int v = V_B; v <= V_D; v++)
	{
		int			n;

		CK(cudaFuncSetAttribute((const void *) persist_kernel(v), cudaFuncAttributeMaxDynamicSharedMemorySize,
								pr.smem));
		CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, (const void *) persist_kernel(v), BT, pr.smem));
		per_sm = n < per_sm ? n : per_sm;
	}
	if (per_sm < 1)
	{
		printf("a persistent block (%d threads, %d B shared) does not fit an SM: refused\n", BT, pr.smem);
		return 1;
	}
	pr.sms = prop.multiProcessorCount;
	pr.grid = per_sm * pr.sms;
	{
		/* F, G and J: one FT-thread block an SM (what their design assumes), if it fits */
		int			nf = 1 << 30;

		for (int v = V_F; v <= V_J; v++)
		{
			int			n;

			if (!is_persistent(v))
				continue;

			CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, (const void *) persist_kernel(v), FT, 0));
			nf = n < nf ? n : nf;
		}
		if (nf < 1)
		{
			printf("a block of F, G or J (%d threads) does not fit an SM: refused\n", FT);
			return 1;
		}
		pr.fgrid = pr.sms;
	}
	printf("# persist_probe on %s: %d SMs, %d persistent block(s) an SM (B-E), 1 of %d threads (F, G, J)\n", prop.name,
		   prop.multiProcessorCount, per_sm, FT);

	CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
	CK(cudaMalloc(&g_sink, 64));
	CK(cudaMalloc(&w, lb * Lmax));
	CK(cudaMalloc(&pr.x_in, HID * 4));
	CK(cudaMalloc(&pr.xa, HID * 4));
	CK(cudaMalloc(&pr.a_xn, HID * 4));
	CK(cudaMalloc(&pr.a_g, G_ROWS * 4));
	CK(cudaMalloc((void **) &pr.c.nw, HID * 4));
	pr.wbase = w;
	/* P, O, G, D of all layers in four arrays (layer after layer in each); scales keep the stream O(1..10) */
	{
		size_t		np = (size_t) Lmax * P_ROWS * HID,
					no = (size_t) Lmax * HID * LAT_N,
					ng = (size_t) Lmax * G_ROWS * HID,
					nd = (size_t) Lmax * HID * H_N;

		pr.c.Wp = (const uint4 *) w;
		pr.c.Wo = (const uint4 *) (w + np);
		pr.c.Wg = (const uint4 *) (w + np + no);
		pr.c.Wd = (const uint4 *) (w + np + no + ng);
		kk_fill_random(s, w, 1, np, 11, 0.05f);
		kk_fill_random(s, w + np, 1, no, 12, 0.02f);
		kk_fill_random(s, w + np + no, 1, ng, 13, 0.05f);
		kk_fill_random(s, w + np + no + ng, 1, nd, 14, 0.01f);
	}
	kk_fill_random(s, pr.x_in, 0, HID, 15, 1.0f);
	kk_fill_random(s, (void *) pr.c.nw, 0, HID, 16, 0.1f);
	{
		/* norm weights 1 + U(-0.17, 0.17) */
		float		nw[HID];

		CK(cudaStreamSynchronize(s));
		CK(cudaMemcpy(nw, pr.c.nw, sizeof(nw), cudaMemcpyDeviceToHost));
		for (int i = 0; i < HID; i++)
			nw[i] += 1.0f;
		CK(cudaMemcpy((void *) pr.c.nw, nw, sizeof(nw), cudaMemcpyHostToDevice));
	}
	/* L = 1: layer 0 of each array; its ceiling reads as many bytes from the allocation's start */
	probe_table(&pr, s, Lmax, rounds);
	probe_table(&pr, s, 1, rounds);
	return 0;
}
