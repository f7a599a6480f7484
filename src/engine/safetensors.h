/*
 * safetensors.h — reading checkpoints in the safetensors format, one file or
 * sharded with model.safetensors.index.json, by mmap.
 *
 * File format: u64 little-endian header length N, N bytes of JSON
 *   {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
 * then raw little-endian data; offsets are relative to the end of the header.
 * Every header is validated before any tensor is used: JSON, dtypes, shapes,
 * offsets inside the file, sizes matching shape x element size, no overlaps.
 */
#ifndef KL_SAFETENSORS_H
#define KL_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"

typedef enum kl_dtype
{
	KL_DT_F32 = 0,
	KL_DT_BF16,
	KL_DT_F16,
	KL_DT_F64,
	KL_DT_I64,
	KL_DT_I32,
	KL_DT_I16,
	KL_DT_I8,
	KL_DT_U8,
	KL_DT_BOOL,
	KL_DT_F8_E4M3				/* quantized weights (quant.h) */
} kl_dtype;

#define KL_ST_MAX_DIMS 8

typedef struct kl_st_tensor
{
	char	   *name;
	kl_dtype	dtype;
	int			ndim;
	int64_t		shape[KL_ST_MAX_DIMS];
	int64_t		numel;
	const void *data;			/* inside the mapping, or `owned` if it was misaligned */
	size_t		nbytes;
	int			file;			/* index into files[] */
	bool		used;			/* set when the model binds it (extra tensors are reported) */
	void	   *owned;
} kl_st_tensor;

typedef struct kl_st_file
{
	char	   *path;
	void	   *map;
	size_t		size;
} kl_st_file;

typedef struct kl_safetensors
{
	kl_st_file *files;
	int			n_files;
	kl_st_tensor *tensors;
	int			n_tensors;
	int		   *hash;			/* open addressing: tensor index + 1, 0 = empty */
	int			hash_size;
} kl_safetensors;

const char *kl_dtype_name(kl_dtype t);
size_t		kl_dtype_size(kl_dtype t);

/*
 * A model directory: model.safetensors.index.json + shards, or
 * model.safetensors.  root: NULL, or the directory every file opened must
 * resolve into (kl_file.h).
 */
int			kl_st_open_dir(const char *dir, const char *root, kl_safetensors *st, kl_err *err);
/* One file. */
int			kl_st_open_file(const char *path, kl_safetensors *st, kl_err *err);
/* Parse a header held in memory (fuzzing): checks everything but maps nothing. */
int			kl_st_parse_header(const uint8_t *buf, size_t size, const char *what, kl_err *err);
void		kl_st_close(kl_safetensors *st);

kl_st_tensor *kl_st_find(const kl_safetensors *st, const char *name);

/* Copy a tensor's elements to f32 (F32/BF16/F16/F64 sources). */
int			kl_st_to_f32(const kl_st_tensor *t, float *out, kl_err *err);

#endif
