/*
 * cuda_test_hooks.c — the buffer handling that the mixers' test hooks
 * (cuda_kda.c, cuda_mla.c; called by test/engine/test_cuda.c through dlsym,
 * never by the backend) share.  Each hook runs kernels on host arrays, on a
 * stream of its own, and returns the first CUDA error: hook_open makes the
 * stream and the device buffers with the inputs uploaded, hook_close brings
 * the outputs back and frees everything whatever failed in between, so that
 * a failing check does not leak device memory into the checks after it.
 * The contracts are in cuda_internal.h.
 */
#include "cuda_internal.h"

int
hook_open_fill(cudaStream_t *s, void **d, const size_t *sz, const void *const *in, int nbuf, int fill)
{
	cudaError_t e;

	if ((e = cudaStreamCreateWithFlags(s, cudaStreamNonBlocking)) != cudaSuccess)
		return (int) e;
	for (int i = 0; i < nbuf; i++)
		if ((e = cudaMalloc(&d[i], sz[i])) != cudaSuccess ||
			(in[i] && (e = cudaMemcpyAsync(d[i], in[i], sz[i], cudaMemcpyHostToDevice, *s)) != cudaSuccess) ||
			(!in[i] && fill >= 0 && (e = cudaMemsetAsync(d[i], fill, sz[i], *s)) != cudaSuccess))
			return (int) e;
	return 0;
}

int
hook_open(cudaStream_t *s, void **d, const size_t *sz, const void *const *in, int nbuf)
{
	return hook_open_fill(s, d, sz, in, nbuf, -1);
}

int
hook_close(cudaStream_t s, void **d, const size_t *sz, int nbuf, const int *dev_of, void *const *host_out, int nout,
		   int rc)
{
	cudaError_t e;

	for (int i = 0; i < nout && rc == 0; i++)
		if ((e = cudaMemcpyAsync(host_out[i], d[dev_of[i]], sz[dev_of[i]], cudaMemcpyDeviceToHost, s)) != cudaSuccess)
			rc = (int) e;
	/* s is NULL only when hook_open could not make it (nothing to wait for) */
	if (s && (e = cudaStreamSynchronize(s)) != cudaSuccess && rc == 0)
		rc = (int) e;
	for (int i = 0; i < nbuf; i++)
		cudaFree(d[i]);
	if (s)
		cudaStreamDestroy(s);
	return rc;
}
