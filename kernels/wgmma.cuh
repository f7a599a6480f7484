/*
 * wgmma.cuh — what the Hopper wgmma kernels (mla_flash_wgmma.cu,
 * mla_decode_wg.cu) share: KK_WGMMA, defined only while compiling the sm_90a
 * image (wgmma exists there alone: the sm_90 and compute_80 images get the
 * kernels' empty bodies), the PTX wrappers those bodies use, and the host's
 * question whether the device runs that image.
 */
#ifndef KL_WGMMA_CUH
#define KL_WGMMA_CUH

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KK_WGMMA 1
#endif

/*
 * 1 when the current device runs this library's sm_90a image (probed once
 * per device by a one-thread kernel; mla_flash_wgmma.cu), else 0: the wgmma
 * kernels' _supported functions ask it, so that any other device keeps the
 * mma.sync kernels.
 */
int			kk_device_has_wgmma(void);

#ifdef KK_WGMMA

/* register writes before it are done before the next wgmma reads them */
__device__ __forceinline__ void
kw_fence(void)
{
	asm volatile("wgmma.fence.sync.aligned;\n":::"memory");
}

__device__ __forceinline__ void
kw_commit(void)
{
	asm volatile("wgmma.commit_group.sync.aligned;\n":::"memory");
}

/* at most N of this warpgroup's wgmma groups still in flight */
template <int N>
__device__ __forceinline__ void
kw_wait(void)
{
	asm volatile("wgmma.wait_group.sync.aligned %0;\n"::"n"(N):"memory");
}

/*
 * Pin registers an in-flight wgmma reads or writes to this point of the
 * program: the compiler sees them used and redefined here, so it neither
 * reads accumulators before the wait nor reuses an operand's register early.
 */
template <int N>
__device__ __forceinline__ void
kw_pin(float *r)
{
#pragma unroll
	for (int i = 0; i < N; i++)
		asm volatile("":"+f"(r[i])::"memory");
}

template <int N>
__device__ __forceinline__ void
kw_pin_u(uint32_t *r)
{
#pragma unroll
	for (int i = 0; i < N; i++)
		asm volatile("":"+r"(r[i])::"memory");
}

/* this thread's generic-proxy shared writes (cp.async, stores) visible to wgmma */
__device__ __forceinline__ void
kw_fence_async_smem(void)
{
	asm volatile("fence.proxy.async.shared::cta;\n":::"memory");
}

/* 16 bytes global -> shared (a shared-window address: no conversion in the tile loop) */
__device__ __forceinline__ void
kw_cp16(uint32_t s, const void *g)
{
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"::"r"(s), "l"(g));
}

#endif							/* KK_WGMMA */

#endif
