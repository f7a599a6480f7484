/*
 * safetensors.c — see safetensors.h for the format.
 *
 * Errors name the file, the tensor and the rule broken; they quote nothing
 * else of the file (not the header length, which is its first 8 bytes, nor
 * the text of a header that does not parse), so a file that is not a
 * checkpoint never has its start shown.  Files are opened through
 * kl_file.h, confined to a root directory when the caller gives one.
 */
#include "safetensors.h"

#include <errno.h>
#include "kl_file.h"
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_HEADER (256u << 20)		/* a header larger than this is not a checkpoint */
#define MAX_TENSORS (1 << 22)

static const struct
{
	const char *name;
	kl_dtype	t;
	size_t		size;
}			dtypes[] = {
	{"F32", KL_DT_F32, 4},
	{"BF16", KL_DT_BF16, 2},
	{"F16", KL_DT_F16, 2},
	{"F64", KL_DT_F64, 8},
	{"I64", KL_DT_I64, 8},
	{"I32", KL_DT_I32, 4},
	{"I16", KL_DT_I16, 2},
	{"I8", KL_DT_I8, 1},
	{"U8", KL_DT_U8, 1},
	{"BOOL", KL_DT_BOOL, 1},
	{"F8_E4M3", KL_DT_F8_E4M3, 1},
};

const char *
kl_dtype_name(kl_dtype t)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
		if (dtypes[i].t == t)
			return dtypes[i].name;
	return "?";
}

size_t
kl_dtype_size(kl_dtype t)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
		if (dtypes[i].t == t)
			return dtypes[i].size;
	return 0;
}

static bool
dtype_from_name(const char *s, kl_dtype *t)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
		if (strcmp(dtypes[i].name, s) == 0)
		{
			*t = dtypes[i].t;
			return true;
		}
	return false;
}

static uint64_t
hash_name(const char *s)
{
	uint64_t	h = 1469598103934665603ull;

	while (*s)
		h = (h ^ (unsigned char) *s++) * 1099511628211ull;
	return h;
}

kl_st_tensor *
kl_st_find(const kl_safetensors *st, const char *name)
{
	uint64_t	h;
	int			i;

	if (st->hash_size == 0)
		return NULL;
	h = hash_name(name);
	for (i = (int) (h & (uint64_t) (st->hash_size - 1));; i = (i + 1) & (st->hash_size - 1))
	{
		int			slot = st->hash[i];

		if (slot == 0)
			return NULL;
		if (strcmp(st->tensors[slot - 1].name, name) == 0)
			return &st->tensors[slot - 1];
	}
}

static int
build_hash(kl_safetensors *st, kl_err *err)
{
	int			size = 16;

	while (size < st->n_tensors * 2)
		size *= 2;
	free(st->hash);
	st->hash = kl_calloc((size_t) size, sizeof(int), err);
	if (!st->hash)
		return KL_FAIL;
	st->hash_size = size;
	for (int t = 0; t < st->n_tensors; t++)
	{
		uint64_t	h = hash_name(st->tensors[t].name);
		int			i = (int) (h & (uint64_t) (size - 1));

		while (st->hash[i] != 0)
		{
			if (strcmp(st->tensors[st->hash[i] - 1].name, st->tensors[t].name) == 0)
				return kl_errc(err, KL_E_INVALID, "tensor \"%s\" appears in both %s and %s: a checkpoint must "
							   "name each tensor once",
							   st->tensors[t].name, st->files[st->tensors[st->hash[i] - 1].file].path,
							   st->files[st->tensors[t].file].path);
			i = (i + 1) & (size - 1);
		}
		st->hash[i] = t + 1;
	}
	return KL_OK;
}

typedef struct span
{
	uint64_t	begin,
				end;
	int			idx;
} span;

static int
cmp_span(const void *a, const void *b)
{
	const span *x = a,
			   *y = b;

	return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

/*
 * The header of the image (base, size) as a JSON object: its length checked
 * against the file, *data_size the bytes after it, at most MAX_TENSORS
 * entries.  *root is the parsed object (json_decref it) on success.
 */
static int
header_json(const uint8_t *base, size_t size, const char *what, uint64_t *hlen, uint64_t *data_size,
			json_t **root, kl_err *err)
{
	json_error_t jerr;
	json_t	   *r;

	*root = NULL;
	if (size < 8)
		return kl_errc(err, KL_E_CORRUPT, "%s: file is %zu bytes, too short for a safetensors header "
					   "(truncated or not a safetensors file)", what, size);
	memcpy(hlen, base, 8);		/* little-endian host assumed (x86-64, arm64) */
	if (*hlen < 2 || *hlen > MAX_HEADER)
		return kl_errc(err, KL_E_INVALID, "%s: the header length (the first 8 bytes) is not plausible "
					   "(corrupt or not a safetensors file)", what);
	if (*hlen > size - 8)
		return kl_errc(err, KL_E_CORRUPT, "%s: the header length runs past the end of the %zu-byte file (truncated?)",
					   what, size);
	*data_size = size - 8 - *hlen;

	r = json_loadb((const char *) base + 8, (size_t) *hlen, JSON_REJECT_DUPLICATES, &jerr);
	if (!r)
		return kl_errc(err, KL_E_INVALID, "%s: header is not valid JSON (line %d column %d: %s)", what,
					   jerr.line, jerr.column, kl_json_error_kind(&jerr));
	if (!json_is_object(r))
	{
		json_decref(r);
		return kl_errc(err, KL_E_INVALID, "%s: header must be a JSON object", what);
	}
	if ((int) json_object_size(r) > MAX_TENSORS)
	{
		int			count = (int) json_object_size(r);

		json_decref(r);
		return kl_errc(err, KL_E_RESOURCES, "%s: %d tensors is more than supported", what, count);
	}
	*root = r;
	return KL_OK;
}

/* t->ndim and t->shape from the entry's "shape" list; *numel their product */
static int
entry_shape(const json_t *js, const char *what, const char *key, kl_st_tensor *t, uint64_t *numel, kl_err *err)
{
	*numel = 1;
	if (json_array_size(js) > KL_ST_MAX_DIMS)
		return kl_errc(err, KL_E_UNSUPPORTED, "%s: tensor \"%s\" has %zu dimensions (at most %d supported)", what,
					   key, json_array_size(js), KL_ST_MAX_DIMS);
	t->ndim = (int) json_array_size(js);
	for (size_t i = 0; i < (size_t) t->ndim; i++)
	{
		json_t	   *d = json_array_get(js, i);

		if (!json_is_integer(d) || json_integer_value(d) < 0)
			return kl_errc(err, KL_E_INVALID, "%s: tensor \"%s\" has an invalid shape (dimension %zu)", what, key, i);
		t->shape[i] = json_integer_value(d);
		if (__builtin_mul_overflow(*numel, (uint64_t) t->shape[i], numel))
			return kl_errc(err, KL_E_INVALID, "%s: tensor \"%s\" shape overflows", what, key);
	}
	return KL_OK;
}

/*
 * The entry's "data_offsets" [b, e) into the data_size bytes after the
 * header, checked to hold exactly numel elements of t->dtype.
 */
static int
entry_offsets(const json_t *jo, const char *what, const char *key, const kl_st_tensor *t, uint64_t numel,
			  uint64_t data_size, uint64_t *b, uint64_t *e, kl_err *err)
{
	uint64_t	want;

	if (!json_is_integer(json_array_get(jo, 0)) || !json_is_integer(json_array_get(jo, 1)) ||
		json_integer_value(json_array_get(jo, 0)) < 0 || json_integer_value(json_array_get(jo, 1)) < 0)
		return kl_errc(err, KL_E_INVALID, "%s: tensor \"%s\" has invalid data_offsets", what, key);
	*b = (uint64_t) json_integer_value(json_array_get(jo, 0));
	*e = (uint64_t) json_integer_value(json_array_get(jo, 1));
	if (*b > *e || *e > data_size)
		return kl_errc(err, KL_E_CORRUPT, "%s: tensor \"%s\" data_offsets lie outside the %llu bytes of data "
					   "(file truncated or header corrupt)", what, key, (unsigned long long) data_size);
	if (__builtin_mul_overflow(numel, (uint64_t) kl_dtype_size(t->dtype), &want) || want != *e - *b)
		return kl_errc(err, KL_E_INVALID,
					   "%s: tensor \"%s\" has %llu bytes of data but its shape and dtype %s need %llu",
					   what, key, (unsigned long long) (*e - *b), kl_dtype_name(t->dtype),
					   (unsigned long long) (numel * kl_dtype_size(t->dtype)));
	return KL_OK;
}

/*
 * One tensor's entry of the header: dtype, shape and data offsets validated
 * into *t (name and data not set) and [*b, *e).
 */
static int
parse_entry(const char *key, const json_t *val, const char *what, uint64_t data_size, kl_st_tensor *t,
			uint64_t *numel, uint64_t *b, uint64_t *e, kl_err *err)
{
	json_t	   *jd,
			   *js,
			   *jo;
	kl_dtype	dt;

	if (!json_is_object(val))
		return kl_errc(err, KL_E_INVALID, "%s: entry for tensor \"%s\" is not an object", what, key);
	jd = json_object_get(val, "dtype");
	js = json_object_get(val, "shape");
	jo = json_object_get(val, "data_offsets");
	if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) || json_array_size(jo) != 2)
		return kl_errc(err, KL_E_INVALID, "%s: tensor \"%s\" needs \"dtype\" (string), \"shape\" (list) and "
					   "\"data_offsets\" ([begin, end])", what, key);
	if (!dtype_from_name(json_string_value(jd), &dt))
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: tensor \"%s\" has an unsupported dtype (supported: F32, BF16, F16, F64, I64, I32, "
					   "I16, I8, U8, BOOL)", what, key);
	memset(t, 0, sizeof(*t));
	t->dtype = dt;
	if (entry_shape(js, what, key, t, numel, err) != KL_OK)
		return KL_FAIL;
	return entry_offsets(jo, what, key, t, *numel, data_size, b, e, err);
}

/*
 * Append the validated tensor t, named key, whose bytes start at p, to st
 * (room reserved by the caller); an element-misaligned p gets an aligned copy.
 */
static int
append_tensor(kl_safetensors *st, kl_st_tensor *t, const char *key, const uint8_t *p, uint64_t numel,
			  uint64_t nbytes, int file, kl_err *err)
{
	t->numel = (int64_t) numel;
	t->nbytes = (size_t) nbytes;
	t->file = file;
	t->name = strdup(key);
	if (!t->name)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	if (((uintptr_t) p % kl_dtype_size(t->dtype)) != 0)
	{
		/* Kernels assume element alignment: keep an aligned copy. */
		t->owned = kl_aligned_alloc(t->nbytes, err);
		if (!t->owned)
		{
			free(t->name);
			return KL_FAIL;
		}
		memcpy(t->owned, p, t->nbytes);
		p = t->owned;
	}
	t->data = p;
	st->tensors[st->n_tensors++] = *t;
	return KL_OK;
}

/* No two tensors may share bytes: the n non-empty spans, sorted here. */
static int
check_no_overlap(span *spans, int n, const char *what, kl_err *err)
{
	qsort(spans, (size_t) n, sizeof(span), cmp_span);
	for (int i = 1; i < n; i++)
		if (spans[i].begin < spans[i - 1].end)
			return kl_errc(err, KL_E_INVALID, "%s: tensor data regions overlap at offset %llu (corrupt header)",
						   what, (unsigned long long) spans[i].begin);
	return KL_OK;
}

/* Room in st->tensors for cap more tensors (and one spare). */
static int
reserve_tensors(kl_safetensors *st, int cap, const char *what, kl_err *err)
{
	kl_st_tensor *nt = realloc(st->tensors, sizeof(kl_st_tensor) * ((size_t) st->n_tensors + cap + 1));

	if (!nt)
		return kl_errc(err, KL_E_RESOURCES, "out of memory reading %s", what);
	st->tensors = nt;
	return KL_OK;
}

/*
 * Parse and validate the header of a safetensors image (base, size).  With st
 * non-NULL, append its tensors (pointing into base) tagged with file index
 * `file`.
 */
static int
parse_header(const uint8_t *base, size_t size, const char *what, kl_safetensors *st, int file, kl_err *err)
{
	uint64_t	hlen = 0;
	uint64_t	data_size = 0;
	json_t	   *root;
	const char *key;
	json_t	   *val;
	span	   *spans = NULL;
	int			n = 0;
	int			cap;
	int			rc = KL_FAIL;

	if (header_json(base, size, what, &hlen, &data_size, &root, err) != KL_OK)
		return KL_FAIL;
	cap = (int) json_object_size(root);
	spans = kl_calloc((size_t) cap + 1, sizeof(span), err);
	if (!spans)
		goto out;
	if (st && reserve_tensors(st, cap, what, err) != KL_OK)
		goto out;

	json_object_foreach(root, key, val)
	{
		kl_st_tensor t;
		uint64_t	b = 0,
					e = 0,
					numel = 0;

		if (strcmp(key, "__metadata__") == 0)
		{
			if (!json_is_object(val))
			{
				kl_errc(err, KL_E_INVALID, "%s: __metadata__ must be an object", what);
				goto out;
			}
			continue;
		}
		if (parse_entry(key, val, what, data_size, &t, &numel, &b, &e, err) != KL_OK)
			goto out;
		if (e > b)
		{
			/* empty tensors occupy no bytes and overlap nothing */
			spans[n].begin = b;
			spans[n].end = e;
			spans[n].idx = n;
			n++;
		}
		if (st && append_tensor(st, &t, key, base + 8 + hlen + b, numel, e - b, file, err) != KL_OK)
			goto out;
	}
	rc = check_no_overlap(spans, n, what, err);
out:
	free(spans);
	json_decref(root);
	return rc;
}

int
kl_st_parse_header(const uint8_t *buf, size_t size, const char *what, kl_err *err)
{
	return parse_header(buf, size, what, NULL, 0, err);
}

static int
map_file(const char *root, const char *path, kl_st_file *f, kl_err *err)
{
	int			fd;
	struct stat sb;

	memset(f, 0, sizeof(*f));
	if (kl_file_open(root, path, &fd, err) != KL_OK)
		return KL_FAIL;
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode))
	{
		close(fd);
		return kl_errc(err, KL_E_INVALID, "%s is not a regular file", path);
	}
	f->size = (size_t) sb.st_size;
	if (f->size > 0)
	{
		f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
		if (f->map == MAP_FAILED)
		{
			f->map = NULL;
			close(fd);
			return kl_errc(err, kl_errno_code(errno), "cannot map %s: %s", path, strerror(errno));
		}
	}
	close(fd);
	f->path = strdup(path);
	if (!f->path)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	return KL_OK;
}

static int
add_file(kl_safetensors *st, const char *root, const char *path, kl_err *err)
{
	kl_st_file *nf = realloc(st->files, sizeof(kl_st_file) * (size_t) (st->n_files + 1));

	if (!nf)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	st->files = nf;
	if (map_file(root, path, &st->files[st->n_files], err) != KL_OK)
		return KL_FAIL;
	st->n_files++;
	return parse_header(st->files[st->n_files - 1].map, st->files[st->n_files - 1].size,
						path, st, st->n_files - 1, err);
}

int
kl_st_open_file(const char *path, kl_safetensors *st, kl_err *err)
{
	memset(st, 0, sizeof(*st));
	if (add_file(st, NULL, path, err) != KL_OK || build_hash(st, err) != KL_OK)
	{
		kl_st_close(st);
		return KL_FAIL;
	}
	return KL_OK;
}

/* Shard names come from a file: they must be plain names inside the directory. */
static bool
plain_file_name(const char *s)
{
	return s[0] != 0 && strchr(s, '/') == NULL && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static int
open_sharded(const char *dir, const char *confine, const char *index_path, kl_safetensors *st, kl_err *err)
{
	json_t	   *root = kl_json_parse_file(confine, index_path, MAX_HEADER, err);
	json_t	   *map;
	const char *key;
	json_t	   *val;
	int			rc = KL_FAIL;
	char		path[4096];

	if (!root)
		return KL_FAIL;
	map = json_object_get(root, "weight_map");
	if (!json_is_object(map) || json_object_size(map) == 0)
	{
		kl_errc(err, KL_E_INVALID, "%s: \"weight_map\" (tensor name -> shard file) is missing or empty", index_path);
		goto out;
	}
	/* Open each shard named by the map once, in order of first appearance. */
	json_object_foreach(map, key, val)
	{
		const char *shard;
		bool		seen = false;

		if (!json_is_string(val) || !plain_file_name(json_string_value(val)))
		{
			kl_errc(err, KL_E_INVALID, "%s: weight_map entry for \"%s\" must be a file name in the model directory",
					index_path, key);
			goto out;
		}
		shard = json_string_value(val);
		snprintf(path, sizeof(path), "%s/%s", dir, shard);
		for (int i = 0; i < st->n_files; i++)
			if (strcmp(st->files[i].path, path) == 0)
				seen = true;
		if (!seen && add_file(st, confine, path, err) != KL_OK)
			goto out;
	}
	if (build_hash(st, err) != KL_OK)
		goto out;
	/* The map and the shards must agree exactly. */
	json_object_foreach(map, key, val)
	{
		kl_st_tensor *t = kl_st_find(st, key);

		snprintf(path, sizeof(path), "%s/%s", dir, json_string_value(val));
		if (!t)
		{
			kl_errc(err, KL_E_INVALID, "%s: tensor \"%s\" is listed in weight_map under %s but no shard contains it",
					index_path, key, json_string_value(val));
			goto out;
		}
		if (strcmp(st->files[t->file].path, path) != 0)
		{
			kl_errc(err, KL_E_INVALID, "%s: weight_map puts tensor \"%s\" in %s, but it is in %s", index_path, key,
					json_string_value(val), st->files[t->file].path);
			goto out;
		}
	}
	for (int i = 0; i < st->n_tensors; i++)
		if (!json_object_get(map, st->tensors[i].name))
		{
			kl_errc(err, KL_E_INVALID, "%s: tensor \"%s\" is in shard %s but not in the index's weight_map", index_path,
					st->tensors[i].name, st->files[st->tensors[i].file].path);
			goto out;
		}
	rc = KL_OK;
out:
	json_decref(root);
	return rc;
}

int
kl_st_open_dir(const char *dir, const char *root, kl_safetensors *st, kl_err *err)
{
	char		path[4096];

	memset(st, 0, sizeof(*st));
	if (strlen(dir) > 3000)
		return kl_errc(err, KL_E_INVALID, "model directory path is too long");
	snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
	if (kl_file_present(path))
	{
		if (open_sharded(dir, root, path, st, err) != KL_OK)
		{
			kl_st_close(st);
			return KL_FAIL;
		}
		return KL_OK;
	}
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	if (!kl_file_present(path))
		return kl_errc(err, KL_E_INVALID, "%s has neither model.safetensors nor model.safetensors.index.json", dir);
	if (add_file(st, root, path, err) != KL_OK || build_hash(st, err) != KL_OK)
	{
		kl_st_close(st);
		return KL_FAIL;
	}
	return KL_OK;
}

void
kl_st_close(kl_safetensors *st)
{
	for (int i = 0; i < st->n_tensors; i++)
	{
		free(st->tensors[i].name);
		free(st->tensors[i].owned);
	}
	for (int i = 0; i < st->n_files; i++)
	{
		if (st->files[i].map)
			munmap(st->files[i].map, st->files[i].size);
		free(st->files[i].path);
	}
	free(st->tensors);
	free(st->files);
	free(st->hash);
	memset(st, 0, sizeof(*st));
}

int
kl_st_to_f32(const kl_st_tensor *t, float *out, kl_err *err)
{
	int64_t		n = t->numel;

	switch (t->dtype)
	{
		case KL_DT_F32:
			memcpy(out, t->data, (size_t) n * 4);
			return KL_OK;
		case KL_DT_BF16:
			for (int64_t i = 0; i < n; i++)
				out[i] = kl_bf16_to_f32(((const uint16_t *) t->data)[i]);
			return KL_OK;
		case KL_DT_F16:
			for (int64_t i = 0; i < n; i++)
				out[i] = kl_f16_to_f32(((const uint16_t *) t->data)[i]);
			return KL_OK;
		case KL_DT_F64:
			for (int64_t i = 0; i < n; i++)
				out[i] = (float) ((const double *) t->data)[i];
			return KL_OK;
		default:
			return kl_errc(err, KL_E_INVALID, "tensor \"%s\" has dtype %s where a floating-point tensor is needed",
						   t->name, kl_dtype_name(t->dtype));
	}
}
