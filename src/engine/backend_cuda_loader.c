/*
 * backend_cuda_loader.c — finds and loads the CUDA backend at run time.
 *
 * The CUDA backend (kernels/ and src/cuda/) is a separate shared library,
 * kimi_linear_cuda.so, built only where nvcc exists and linked against the
 * CUDA runtime.  The engine itself never links CUDA, so the extension and the
 * CLI load and run on machines without a GPU; this file dlopen()s the library
 * on first use of device = cuda and reports clearly what is missing.
 *
 * Search order: $KL_CUDA_LIB; the directory of the library or executable that
 * contains this code (PostgreSQL's pkglibdir for the extension, the repository
 * root for ./kl).
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"

#define CUDA_LIB_NAME "kimi_linear_cuda.so"

/* The library's entry point: same contract as kl_backend_cpu_create. */
typedef int (*cuda_create_fn) (const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err);

static void *cuda_lib;

static void *
try_open(const char *path, char *why, size_t whylen)
{
	void	   *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);

	if (!h && why[0] == 0)
		snprintf(why, whylen, "%s", dlerror());
	return h;
}

int
kl_backend_cuda_create(const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err)
{
	char		why[512] = "";
	cuda_create_fn create;

	if (!cuda_lib)
	{
		const char *env = getenv("KL_CUDA_LIB");
		Dl_info		info;

		if (env && *env)
			cuda_lib = try_open(env, why, sizeof(why));
		if (!cuda_lib && dladdr((void *) kl_backend_cuda_create, &info) && info.dli_fname)
		{
			char		path[4096];
			const char *slash = strrchr(info.dli_fname, '/');

			if (slash)
				snprintf(path, sizeof(path), "%.*s/%s", (int) (slash - info.dli_fname), info.dli_fname,
						 CUDA_LIB_NAME);
			else
				snprintf(path, sizeof(path), "./%s", CUDA_LIB_NAME);
			cuda_lib = try_open(path, why, sizeof(why));
		}
		if (!cuda_lib)
			return kl_errc(err, KL_E_UNSUPPORTED,
						   "the CUDA backend is not available: cannot load %s (%s); build it with "
						   "make where nvcc exists, or use device = cpu", CUDA_LIB_NAME,
						   why[0] ? why : "not found");
	}
	create = (cuda_create_fn) dlsym(cuda_lib, "kl_cuda_backend_create");
	if (!create)
		return kl_errc(err, KL_E_UNSUPPORTED, "%s does not export kl_cuda_backend_create: rebuild it", CUDA_LIB_NAME);
	return create(cfg, opts, out, err);
}
