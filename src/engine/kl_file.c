/*
 * kl_file.c — opening a model directory's files, confined to a root
 * directory when one is given (see kl_file.h for the rules and why).
 */
#include "kl_file.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* whether the resolved path `real` is the resolved directory `root` or lies below it */
static bool
inside(const char *root, const char *real)
{
	size_t		n = strlen(root);

	if (n == 1 && root[0] == '/')
		return true;
	return strncmp(real, root, n) == 0 && (real[n] == '/' || real[n] == '\0');
}

/* the one error for a path that is missing or outside the root */
static int
not_found(const char *path, kl_err *err)
{
	return kl_errc(err, KL_E_INVALID, "cannot open %s: no such file in the model directory", path);
}

static int
resolve_root(const char *root, char *out, kl_err *err)
{
	if (!realpath(root, out))
		return kl_errc(err, kl_errno_code(errno),
					   "cannot resolve the directory models must stay in (%s): %s", root, strerror(errno));
	return KL_OK;
}

int
kl_file_open(const char *root, const char *path, int *fd, kl_err *err)
{
	char		rroot[PATH_MAX];
	char		real[PATH_MAX];
	int			f;

	*fd = -1;
	if (!root)
	{
		f = open(path, O_RDONLY | O_CLOEXEC);
		if (f < 0)
			return kl_errc(err, kl_errno_code(errno), "cannot open %s: %s", path, strerror(errno));
		*fd = f;
		return KL_OK;
	}
	if (resolve_root(root, rroot, err) != KL_OK)
		return KL_FAIL;
	if (!realpath(path, real) || !inside(rroot, real))
		return not_found(path, err);
	/* by its resolved name: a link put there since realpath is not followed */
	f = open(real, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (f < 0)
	{
		if (errno == ENOENT || errno == ELOOP || errno == ENOTDIR)
			return not_found(path, err);
		return kl_errc(err, kl_errno_code(errno), "cannot open %s: %s", path, strerror(errno));
	}
	/* the file actually opened (a directory on the way may have been swapped) */
	{
		char		link[64];
		char		opened[PATH_MAX];
		ssize_t		n;

		snprintf(link, sizeof(link), "/proc/self/fd/%d", f);
		n = readlink(link, opened, sizeof(opened) - 1);
		if (n >= 0)
		{
			opened[n] = '\0';
			if (!inside(rroot, opened))
			{
				close(f);
				return not_found(path, err);
			}
		}
	}
	*fd = f;
	return KL_OK;
}

/* read(2) that retries when interrupted */
static ssize_t
read_retrying(int fd, char *b, size_t want)
{
	ssize_t		n;

	do
		n = read(fd, b, want);
	while (n < 0 && errno == EINTR);
	return n;
}

int
kl_file_read(const char *root, const char *path, size_t max_bytes, const char *what,
			 char **buf, size_t *len, kl_err *err)
{
	int			fd;
	struct stat sb;
	char	   *b;
	size_t		got = 0;

	*buf = NULL;
	*len = 0;
	if (kl_file_open(root, path, &fd, err) != KL_OK)
		return KL_FAIL;
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode))
	{
		close(fd);
		return kl_errc(err, KL_E_INVALID, "%s is not a regular file", path);
	}
	if ((unsigned long long) sb.st_size > max_bytes)
	{
		close(fd);
		return kl_errc(err, KL_E_RESOURCES, "%s is %lld bytes, too large for %s", path, (long long) sb.st_size, what);
	}
	b = kl_malloc((size_t) sb.st_size + 1, err);
	if (!b)
	{
		close(fd);
		return KL_FAIL;
	}
	while (got < (size_t) sb.st_size)
	{
		ssize_t		n = read_retrying(fd, b + got, (size_t) sb.st_size - got);

		if (n <= 0)
		{
			int			e = errno;

			close(fd);
			free(b);
			return kl_errc(err, n < 0 ? kl_errno_code(e) : KL_E_CORRUPT,
						   "cannot read %s: %s", path, n < 0 ? strerror(e) : "the file shrank while reading");
		}
		got += (size_t) n;
	}
	close(fd);
	b[got] = '\0';
	*buf = b;
	*len = got;
	return KL_OK;
}

int
kl_file_read_stream(int fd, const char *name, size_t max_bytes, const char *what,
					char **buf, size_t *len, kl_err *err)
{
	size_t		cap = 1 << 16,
				got = 0;
	char	   *b = kl_malloc(cap, err);

	*buf = NULL;
	*len = 0;
	if (!b)
		return KL_FAIL;
	for (;;)
	{
		ssize_t		n;

		if (got + 1 == cap)
		{
			char	   *nb = cap > SIZE_MAX / 2 ? NULL : realloc(b, cap * 2);

			if (!nb)
			{
				free(b);
				return kl_errc(err, KL_E_RESOURCES, "out of memory reading %s", name);
			}
			b = nb;
			cap *= 2;
		}
		n = read_retrying(fd, b + got, cap - got - 1);
		if (n == 0)
			break;
		if (n < 0)
		{
			int			e = errno;

			free(b);
			return kl_errc(err, kl_errno_code(e), "cannot read %s: %s", name, strerror(e));
		}
		got += (size_t) n;
		if (got > max_bytes)
		{
			free(b);
			return kl_errc(err, KL_E_RESOURCES, "%s is more than %zu bytes, too large for %s", name, max_bytes, what);
		}
	}
	b[got] = '\0';
	*buf = b;
	*len = got;
	return KL_OK;
}

bool
kl_file_present(const char *path)
{
	struct stat sb;

	return lstat(path, &sb) == 0;
}

const char *
kl_json_error_kind(const json_error_t *e)
{
	switch (json_error_code(e))
	{
		case json_error_out_of_memory:
			return "out of memory";
		case json_error_stack_overflow:
			return "nested too deeply";
		case json_error_invalid_utf8:
			return "not valid UTF-8";
		case json_error_premature_end_of_input:
			return "the text ends too early";
		case json_error_end_of_input_expected:
			return "more text after the end of the JSON value";
		case json_error_invalid_syntax:
			return "invalid syntax";
		case json_error_null_character:
			return "a NUL character";
		case json_error_null_byte_in_key:
			return "a NUL byte in a key";
		case json_error_duplicate_key:
			return "a key appears twice in an object";
		case json_error_numeric_overflow:
			return "a number out of range";
		default:
			return "not valid JSON";
	}
}

json_t *
kl_json_parse_file(const char *root, const char *path, size_t max_bytes, kl_err *err)
{
	char	   *buf;
	size_t		len;
	json_error_t jerr;
	json_t	   *root_value;

	if (kl_file_read(root, path, max_bytes, "a JSON file", &buf, &len, err) != KL_OK)
		return NULL;
	root_value = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
	free(buf);
	if (!root_value)
		kl_errc(err, KL_E_INVALID, "%s: not valid JSON (line %d column %d: %s)", path, jerr.line, jerr.column,
				kl_json_error_kind(&jerr));
	return root_value;
}

const char *
kl_file_token(const char *s)
{
	size_t		n = s ? strlen(s) : 0;

	if (n == 0 || n > 32)
		return "(not shown)";
	for (size_t i = 0; i < n; i++)
		if (!(isalnum((unsigned char) s[i]) || s[i] == '_' || s[i] == '-' || s[i] == '.'))
			return "(not shown)";
	return s;
}
