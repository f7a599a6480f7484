/*
 * mla_decode_wg.cu — MLA decode attention over the bf16 latent cache:
 * the decode attention on Hopper's wgmma (KL_CUDA_MLA_MMA=3; sm_90a image only).
 * Contract: kernels.h, "MLA decode attention variants".
 * (Skeleton: not written yet; every entry point says "not covered", so the
 * backend keeps kk_mla_attend_mma.)
 */
#include "common.cuh"

extern "C" int
kk_mla_decode_wg_supported(int Ha, int R, int Dr)
{
	(void) Ha;
	(void) R;
	(void) Dr;
	return 0;
}

extern "C" int64_t
kk_mla_decode_wg_split(int64_t max_keys, int n_tokens, int sm_count)
{
	(void) n_tokens;
	(void) sm_count;
	return max_keys;
}

extern "C" int
kk_mla_decode_wg(cudaStream_t s, const kk_mla_decode_args *a, int *merged)
{
	(void) s;
	(void) a;
	*merged = 0;
	return -1;
}
