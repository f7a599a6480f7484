/*
 * mla_decode_v2.cu — MLA decode attention over the bf16 latent cache:
 * the mma.sync decode attention, restructured (KL_CUDA_MLA_MMA=2).
 * Contract: kernels.h, "MLA decode attention variants".
 * (Skeleton: not written yet; every entry point says "not covered", so the
 * backend keeps kk_mla_attend_mma.)
 */
#include "common.cuh"

extern "C" int
kk_mla_decode_v2_supported(int Ha, int R, int Dr)
{
	(void) Ha;
	(void) R;
	(void) Dr;
	return 0;
}

extern "C" int64_t
kk_mla_decode_v2_split(int64_t max_keys, int n_tokens, int sm_count)
{
	(void) n_tokens;
	(void) sm_count;
	return max_keys;
}

extern "C" int
kk_mla_decode_v2(cudaStream_t s, const kk_mla_decode_args *a, int *merged)
{
	(void) s;
	(void) a;
	*merged = 0;
	return -1;
}
