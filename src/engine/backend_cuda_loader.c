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
 *
 * The library is built apart and may be stale: before calling anything in it
 * the loader asks its kl_cuda_backend_abi_version() and refuses (and unloads)
 * one built for another KL_BACKEND_ABI_VERSION (backend.h), whose structures
 * would not match the engine's.
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"

#define CUDA_LIB_NAME "kimi_linear_cuda.so"

/* The library's entry point: same contract as kl_backend_cpu_create. */
typedef int (*cuda_create_fn) (const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err);

/* The library's version check: returns the KL_BACKEND_ABI_VERSION it was built with. */
typedef int (*cuda_abi_version_fn) (void);

static void *cuda_lib;

static void *
try_open(const char *path, char *why, size_t whylen)
{
	void	   *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);

	if (!h && why[0] == 0)
		snprintf(why, whylen, "%s", dlerror());
	return h;
}

/*
 * Whether the library at `path` was built for this engine's
 * KL_BACKEND_ABI_VERSION (one without kl_cuda_backend_abi_version predates
 * the check: version 0); one built for another is unloaded, not called.
 */
static int
check_abi(void *lib, const char *path, kl_err *err)
{
	cuda_abi_version_fn version = (cuda_abi_version_fn) dlsym(lib, "kl_cuda_backend_abi_version");
	int			v = version ? version() : 0;

	if (v == KL_BACKEND_ABI_VERSION)
		return KL_OK;
	dlclose(lib);
	return kl_errc(err, KL_E_UNSUPPORTED,
				   "the CUDA backend %s was built for backend ABI version %d, this engine needs version %d: "
				   "rebuild it with make (and install it with make install), or use device = cpu",
				   path, v, KL_BACKEND_ABI_VERSION);
}

/*
 * Open the library (search order above) and write where it was found to
 * path; NULL, with err set, where there is none.
 */
static void *
open_library(char *path, size_t pathlen, kl_err *err)
{
	char		why[512] = "";
	const char *env = getenv("KL_CUDA_LIB");
	Dl_info		info;
	void	   *lib = NULL;

	if (env && *env)
	{
		snprintf(path, pathlen, "%s", env);
		lib = try_open(path, why, sizeof(why));
	}
	if (!lib && dladdr((void *) kl_backend_cuda_create, &info) && info.dli_fname)
	{
		const char *slash = strrchr(info.dli_fname, '/');

		if (slash)
			snprintf(path, pathlen, "%.*s/%s", (int) (slash - info.dli_fname), info.dli_fname, CUDA_LIB_NAME);
		else
			snprintf(path, pathlen, "./%s", CUDA_LIB_NAME);
		lib = try_open(path, why, sizeof(why));
	}
	if (!lib)
		kl_errc(err, KL_E_UNSUPPORTED,
				"the CUDA backend is not available: cannot load %s (%s); build it with "
				"make where nvcc exists, or use device = cpu", CUDA_LIB_NAME,
				why[0] ? why : "not found");
	return lib;
}

int
kl_backend_cuda_create(const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err)
{
	cuda_create_fn create;

	if (!cuda_lib)
	{
		char		path[4096];
		void	   *lib = open_library(path, sizeof(path), err);

		if (!lib || check_abi(lib, path, err) != KL_OK)
			return KL_FAIL;
		cuda_lib = lib;
	}
	create = (cuda_create_fn) dlsym(cuda_lib, "kl_cuda_backend_create");
	if (!create)
		return kl_errc(err, KL_E_UNSUPPORTED, "%s does not export kl_cuda_backend_create: rebuild it", CUDA_LIB_NAME);
	return create(cfg, opts, out, err);
}
