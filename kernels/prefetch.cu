/*
 * prefetch.cu — start moving a weight into the GPU's L2 cache ahead of the
 * product that reads it (a hint: no effect on any result).
 *
 * Why: a decode step at small batch alternates products that stream weights
 * at DRAM bandwidth with chains of small latency-bound kernels (the KDA
 * recurrence, MLA attention, norms, routing) during which DRAM is nearly
 * idle.  A weight that the step will read right after such a chain (a
 * mixer's o_proj, the MoE router) can be fetched into L2 during the chain,
 * so the product after it reads L2 instead of DRAM.
 *
 * The kernel only issues the prefetches (on Hopper one bulk prefetch per
 * PF_CHUNK bytes, handled by the copy engines of the SMs, spread over many
 * blocks; or one prefetch instruction per 128-byte line) and exits: it lets the next kernel launch at once (kk_dep_launch first), and
 * waits for its predecessor before it exits, as every kernel launched with
 * kk_launch must (common.cuh), so the stream's order is kept.
 */
#include "common.cuh"

#define PF_CHUNK 8192			/* bytes per bulk prefetch */
#define PF_THREADS 64
#define PF_MAX_BLOCKS 256		/* ~2 per SM: every SM's copy engine takes a share */

/* bulk prefetches of PF_CHUNK bytes from Hopper on (measured: prefetch
 * instructions per 128-byte line were slower there), else one per line */
__global__ void __launch_bounds__(PF_THREADS)
prefetch_l2_kernel(const char *p, size_t bytes)
{
	size_t		tid = (size_t) blockIdx.x * blockDim.x + threadIdx.x,
				nthreads = (size_t) gridDim.x * blockDim.x;

	kk_dep_launch();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	{
		/* whole 16-byte-aligned chunks in bulk (the copy engine wants 16-byte
		 * address and size); the ragged ends are single lines */
		size_t		head = (16 - ((uintptr_t) p & 15)) & 15;
		size_t		body = bytes > head ? (bytes - head) & ~(size_t) 15 : 0;
		const char *b = p + head;

		for (size_t o = tid * PF_CHUNK; o < body; o += nthreads * PF_CHUNK)
		{
			unsigned	n = (unsigned) (body - o < PF_CHUNK ? body - o : PF_CHUNK);

			asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n"::"l"(b + o), "r"(n):"memory");
		}
		if (tid == 0 && head > 0)
			asm volatile("prefetch.global.L2 [%0];\n"::"l"(p));
		if (tid == 1 && head + body < bytes)
			asm volatile("prefetch.global.L2 [%0];\n"::"l"(p + bytes - 1));
	}
#else
	for (size_t o = tid * 128; o < bytes; o += nthreads * 128)
		asm volatile("prefetch.global.L2 [%0];\n"::"l"(p + o));
#endif
	kk_dep_wait();
}

extern "C" void
kk_prefetch_weight(cudaStream_t s, const void *p, size_t bytes)
{
	size_t		chunks = (bytes + PF_CHUNK - 1) / PF_CHUNK;
	size_t		blocks = (chunks + PF_THREADS - 1) / PF_THREADS;

	if (!p || bytes == 0)
		return;
	blocks = blocks < 1 ? 1 : blocks > PF_MAX_BLOCKS ? PF_MAX_BLOCKS : blocks;
	kk_launch(prefetch_l2_kernel, dim3((unsigned) blocks), dim3(PF_THREADS), 0, s, (const char *) p, bytes);
}
