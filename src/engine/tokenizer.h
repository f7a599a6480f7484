/*
 * tokenizer.h — the byte-level BPE tokenizer of Kimi models (tiktoken
 * style), its special tokens and the chat format.  docs/model.md,
 * "Tokenizer", is the definition; tokenizer.c has the overview of the
 * implementation.
 *
 * A kl_tokenizer is immutable after loading: every function below that takes
 * a const kl_tokenizer * may be called from many threads at once.  Text is
 * UTF-8; encode rejects invalid UTF-8 (NUL bytes are ordinary characters).
 */
#ifndef KL_TOKENIZER_H
#define KL_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"

typedef struct kl_tokenizer kl_tokenizer;

/* A growable list of token ids; start from {0}, free with kl_ids_free. */
typedef struct kl_ids
{
	int32_t    *ids;
	size_t		n,
				cap;
} kl_ids;

int			kl_ids_push(kl_ids *v, int32_t id, kl_err *err);
void		kl_ids_free(kl_ids *v);

/*
 * Read model_dir/tiktoken.model and model_dir/tokenizer_config.json.  Every
 * malformed line or field is an error naming the file (and line), never
 * quoting its text.
 */
int			kl_tokenizer_load(const char *model_dir, kl_tokenizer **out, kl_err *err);
/* The same, reading the files only if they resolve inside root (kl_file.h; NULL: anywhere). */
int			kl_tokenizer_load_under(const char *model_dir, const char *root, kl_tokenizer **out, kl_err *err);
void		kl_tokenizer_free(kl_tokenizer *tok);

/* Number of ids (max id + 1): ordinary tokens, then the special tokens. */
int			kl_tokenizer_n_vocab(const kl_tokenizer *tok);
/* Number of ordinary (BPE) tokens; specials have ids from here on. */
int			kl_tokenizer_n_base(const kl_tokenizer *tok);
/* bos_token, eos_token, pad_token, unk_token of tokenizer_config.json; -1 when not given. */
int32_t		kl_tokenizer_bos(const kl_tokenizer *tok);
int32_t		kl_tokenizer_eos(const kl_tokenizer *tok);
int32_t		kl_tokenizer_pad(const kl_tokenizer *tok);
int32_t		kl_tokenizer_unk(const kl_tokenizer *tok);
/* The id of a special token's text ("<|im_end|>"), -1 if there is none. */
int32_t		kl_tokenizer_special_id(const kl_tokenizer *tok, const char *text);
/* The text of a special token id, NULL for ordinary ids and ids out of range. */
const char *kl_tokenizer_special_text(const kl_tokenizer *tok, int32_t id);
/* The ids that end a chat reply (eos, then [EOS] if present); returns how many (at most cap). */
int			kl_tokenizer_stop_ids(const kl_tokenizer *tok, int32_t *out, int cap);
/* The bytes of an ordinary token (not NUL-terminated), NULL for specials and ids out of range. */
const uint8_t *kl_tokenizer_token_bytes(const kl_tokenizer *tok, int32_t id, size_t *len);
/* tokenizer_config.json's chat_template (the Jinja text), NULL when it has none. */
const char *kl_tokenizer_chat_template(const kl_tokenizer *tok);

/*
 * Append the ids of text[0..len) to out.  allow_special: special-token texts
 * in the input become their ids (the longest one where several start at the
 * same place); otherwise they are ordinary text.  Invalid UTF-8 is an error
 * giving the offset of the first bad byte; out then keeps what it had.
 */
int			kl_encode(const kl_tokenizer *tok, const char *text, size_t len, bool allow_special,
					  kl_ids *out, kl_err *err);

/*
 * How text is cut into pieces before merging.  KL_SPLIT_SCANNER (what
 * kl_encode uses) is a hand-written scanner of the pattern whose character
 * classes come from PCRE2's Unicode tables; KL_SPLIT_PCRE2 runs the pattern
 * itself with PCRE2 (JIT).  Both give the same pieces for every valid UTF-8
 * text: the tests check it on the whole manual and on random text.
 */
typedef enum kl_splitter
{
	KL_SPLIT_SCANNER = 0,
	KL_SPLIT_PCRE2 = 1
} kl_splitter;

int			kl_encode_with(const kl_tokenizer *tok, const char *text, size_t len, bool allow_special,
						   kl_splitter splitter, kl_ids *out, kl_err *err);

/*
 * The pre-tokenizer alone (no special tokens): the end offset of each piece
 * of text[0..len), in order, appended to *ends (malloc'd, grown; *n and *cap
 * track it; start from NULL, 0, 0).
 */
int			kl_split(const kl_tokenizer *tok, const char *text, size_t len, kl_splitter splitter,
					 size_t **ends, size_t *n, size_t *cap, kl_err *err);

/*
 * The bytes of ids (specials as their text), malloc'd and NUL-terminated.
 * The result may be invalid UTF-8 where a character is split across tokens;
 * kl_decode_text replaces invalid sequences with U+FFFD.  An id outside the
 * vocabulary is an error naming it and its position.
 */
int			kl_decode(const kl_tokenizer *tok, const int32_t *ids, size_t n, char **text, size_t *len,
					  kl_err *err);
int			kl_decode_text(const kl_tokenizer *tok, const int32_t *ids, size_t n, char **text, size_t *len,
						   kl_err *err);

/*
 * Streaming decode: push ids as they are generated; each push appends the
 * complete UTF-8 characters available so far to *buf (an incomplete character
 * waits for the next token; bytes that cannot be part of a valid character
 * become U+FFFD).  finish flushes: an unfinished character becomes U+FFFD.
 * What is appended is always valid UTF-8.  *buf is malloc'd and grown as
 * needed (*len and *cap track it; start from NULL, 0, 0) and kept
 * NUL-terminated.
 */
typedef struct kl_detok_stream
{
	const kl_tokenizer *tok;
	uint8_t		pending[4];		/* the start of an incomplete character */
	int			n_pending;
	size_t		n_pushed;		/* ids pushed so far (for error messages) */
} kl_detok_stream;

void		kl_detok_stream_init(kl_detok_stream *s, const kl_tokenizer *tok);
int			kl_detok_stream_push(kl_detok_stream *s, int32_t id, char **buf, size_t *len, size_t *cap,
								 kl_err *err);
int			kl_detok_stream_finish(kl_detok_stream *s, char **buf, size_t *len, size_t *cap, kl_err *err);

/*
 * The chat format: <|im_{role}|>{role}<|im_middle|>{content}<|im_end|> per
 * message.  This is the plain-text subset of the Kimi chat format that
 * chat.h renders in full (tools, tool calls, named roles); kl_chat_render is
 * defined in chat.c.
 */
typedef struct kl_chat_message
{
	const char *role;			/* "system", "user" or "assistant" */
	const char *content;		/* UTF-8, content_len bytes */
	size_t		content_len;
} kl_chat_message;

/*
 * Append a conversation's ids; with add_generation_prompt, end with
 * <|im_assistant|>assistant<|im_middle|>.  Contents are encoded as plain text:
 * special-token texts inside a message are not interpreted.  An unknown role
 * or invalid UTF-8 is an error naming the message; out then keeps what it had.
 * The model's chat template decides whether a default system message comes
 * first (see kl_chat_format_of in chat.h).
 */
int			kl_chat_render(const kl_tokenizer *tok, const kl_chat_message *msgs, size_t n,
						   bool add_generation_prompt, kl_ids *out, kl_err *err);

/* Check UTF-8 (no overlongs, no surrogates); on failure *bad_offset is the first bad byte. */
bool		kl_utf8_valid(const char *s, size_t len, size_t *bad_offset);

#endif
