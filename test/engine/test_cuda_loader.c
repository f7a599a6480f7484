/*
 * test_cuda_loader.c — the loader of the CUDA backend library
 * (backend_cuda_loader.c) refuses a library built for another backend ABI
 * version, naming both versions, and never calls into it.
 *
 * No GPU is needed: the test builds small fake libraries with the system's C
 * compiler (cc) in a temporary directory, each exporting
 * kl_cuda_backend_create (which only returns a marker) and, but for the
 * oldest, kl_cuda_backend_abi_version; $KL_CUDA_LIB points the loader at
 * each in turn.  Without a C compiler the checks are skipped.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "tap.h"

/* What the fakes' kl_cuda_backend_create returns: the loader called it. */
#define FAKE_CREATE_CALLED 4242

static const char fake_source[] =
	"int kl_cuda_backend_create(const void *cfg, const void *opts, void **out, void *err)\n"
	"{\n"
	"	(void) cfg; (void) opts; (void) err;\n"
	"	*out = 0;\n"
	"	return FAKE_CREATE_CALLED;\n"
	"}\n"
	"#ifdef FAKE_ABI_VERSION\n"
	"int kl_cuda_backend_abi_version(void) { return FAKE_ABI_VERSION; }\n"
	"#endif\n";

static char dir[] = "/tmp/kl_test_cuda_loader_XXXXXX";

/* Build a fake library into dir/name.so; version < 0: without the version function. */
static int
build_fake(const char *name, int version, char *path, size_t pathlen)
{
	char		src[512],
				cmd[2048],
				ver[64] = "";
	FILE	   *f;

	snprintf(src, sizeof(src), "%s/fake.c", dir);
	f = fopen(src, "w");
	if (!f || fputs(fake_source, f) == EOF || fclose(f) != 0)
		return 0;
	if (version >= 0)
		snprintf(ver, sizeof(ver), "-DFAKE_ABI_VERSION=%d", version);
	snprintf(path, pathlen, "%s/%s.so", dir, name);
	snprintf(cmd, sizeof(cmd), "cc -shared -fPIC -DFAKE_CREATE_CALLED=%d %s -o %s %s 2>/dev/null",
			 FAKE_CREATE_CALLED, ver, path, src);
	return system(cmd) == 0;
}

/* Load the library at path as the CUDA backend; the return and the error. */
static int
load(const char *path, kl_err *err)
{
	kl_config	cfg;
	kl_backend *be = NULL;

	memset(&cfg, 0, sizeof(cfg));
	memset(err, 0, sizeof(*err));
	setenv("KL_CUDA_LIB", path, 1);
	return kl_backend_cuda_create(&cfg, NULL, &be, err);
}

/* A stale library: refused with both versions named, its create never called. */
static void
check_refused(const char *what, int version)
{
	char		path[1024],
				lib_says[64],
				engine_says[64];
	kl_err		err;
	int			rc;

	if (!build_fake(what, version, path, sizeof(path)))
	{
		tap_ok(0, "%s: the fake library builds", what);
		return;
	}
	rc = load(path, &err);
	tap_ok(rc == KL_FAIL, "%s: refused, not called (returned %d)", what, rc);
	tap_ok(err.code == KL_E_UNSUPPORTED, "%s: an unsupported-kind error (code %d)", what, (int) err.code);
	snprintf(lib_says, sizeof(lib_says), "built for backend ABI version %d", version < 0 ? 0 : version);
	snprintf(engine_says, sizeof(engine_says), "this engine needs version %d", KL_BACKEND_ABI_VERSION);
	tap_ok(strstr(err.msg, lib_says) && strstr(err.msg, engine_says) && strstr(err.msg, path) &&
		   strstr(err.msg, "rebuild"), "%s: the message names both versions and the fix: %s", what, err.msg);
}

int
main(void)
{
	char		path[1024];
	kl_err		err;

	if (system("cc --version >/dev/null 2>&1") != 0 || !mkdtemp(dir))
	{
		tap_skip("no C compiler (cc) to build fake CUDA backend libraries");
		return tap_done();
	}

	check_refused("newer", KL_BACKEND_ABI_VERSION + 1);
	check_refused("older", KL_BACKEND_ABI_VERSION - 1);
	check_refused("unversioned", -1);

	/* the same version is called (and stays loaded: last) */
	if (build_fake("current", KL_BACKEND_ABI_VERSION, path, sizeof(path)))
		tap_ok(load(path, &err) == FAKE_CREATE_CALLED, "a library of this ABI version is called");
	else
		tap_ok(0, "current: the fake library builds");

	{
		char		cmd[1200];

		snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
		if (system(cmd) != 0)
			tap_diag("could not remove %s", dir);
	}
	return tap_done();
}
