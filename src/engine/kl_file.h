/*
 * kl_file.h — opening the files of a model directory, optionally confined to
 * a root directory, and describing JSON syntax errors without quoting files.
 *
 * A model directory names further files (config.json, the shards listed in
 * model.safetensors.index.json, tiktoken.model, tokenizer_config.json), any
 * of which may be a symbolic link.  A caller that must read nothing outside
 * some directory (the PostgreSQL workers: kimi_linear.model_dir) passes it as
 * `root`; every file is then
 *   1. resolved (realpath: each symbolic link and ".." followed) and required
 *      to lie inside the resolved root;
 *   2. opened by its resolved path with O_NOFOLLOW;
 *   3. checked again by the path of the descriptor actually opened
 *      (/proc/self/fd), so a link swapped in between the two is caught.
 * A path that resolves outside the root gets exactly the error of a path that
 * does not exist: whether something exists outside the root is not revealed.
 * With root NULL (the command-line tool, the tests) files open as usual.
 *
 * Errors name the path as given, never its resolved target, and never quote
 * the file's content.
 */
#ifndef KL_FILE_H
#define KL_FILE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "kl_util.h"

/* Open path read-only; *fd receives the descriptor (close it). */
int			kl_file_open(const char *root, const char *path, int *fd, kl_err *err);

/*
 * Read a whole regular file of at most max_bytes into a malloc'd buffer with
 * a terminating NUL (*len excludes it).  `what` names the kind of file in the
 * size error ("a config file").
 */
int			kl_file_read(const char *root, const char *path, size_t max_bytes, const char *what,
						 char **buf, size_t *len, kl_err *err);

/*
 * Read an open descriptor to its end (a pipe, standard input: no size known
 * beforehand) into a malloc'd buffer with a terminating NUL, as kl_file_read
 * does; at most max_bytes.  `name` names the stream in errors; fd stays open.
 */
int			kl_file_read_stream(int fd, const char *name, size_t max_bytes, const char *what,
								char **buf, size_t *len, kl_err *err);

/*
 * Whether the directory has an entry by this name: a file, or a symbolic
 * link wherever it points (even nowhere).  Loaders decide with it which
 * files a model has, then open them with kl_file_open: a link pointing
 * outside the root is then an error, the same as a broken link, rather than
 * a file silently skipped.
 */
bool		kl_file_present(const char *path);

/*
 * Parse a JSON file read by kl_file_read.  On a syntax error the message
 * gives the line, column and the kind of error, never the text near it
 * (jansson's own messages quote it).
 */
json_t	   *kl_json_parse_file(const char *root, const char *path, size_t max_bytes, kl_err *err);

/* jansson's error as a description that quotes nothing of the input. */
const char *kl_json_error_kind(const json_error_t *e);

/*
 * A value read from a model's file, fit to name in an error: s itself when it
 * is a short identifier (at most 32 letters, digits, '_', '-', '.': a method
 * or format name such as "awq"), else "(not shown)", so that an error never
 * carries a file's text.
 */
const char *kl_file_token(const char *s);

#endif
