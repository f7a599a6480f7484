/*
 * tokenizer.h — the byte-level BPE tokenizer of Kimi models (tiktoken
 * style), its special tokens and the chat format.  ARCHITECTURE.md,
 * "Tokenizer", is the definition; tokenizer.c has the algorithm.
 *
 * A kl_tokenizer is immutable after loading and safe to share between
 * threads.  Text is UTF-8; encode rejects invalid UTF-8.
 */
#ifndef KL_TOKENIZER_H
#define KL_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"

typedef struct kl_tokenizer kl_tokenizer;

/* A growable list of token ids (free with kl_ids_free). */
typedef struct kl_ids
{
	int32_t    *ids;
	size_t		n,
				cap;
} kl_ids;

int			kl_ids_push(kl_ids *v, int32_t id, kl_err *err);
void		kl_ids_free(kl_ids *v);

/* Reads dir/tiktoken.model and dir/tokenizer_config.json. */
int			kl_tokenizer_load(const char *model_dir, kl_tokenizer **out, kl_err *err);
void		kl_tokenizer_free(kl_tokenizer *tok);

/* Number of ids (max id + 1), ordinary tokens plus specials. */
int			kl_tokenizer_n_vocab(const kl_tokenizer *tok);
int32_t		kl_tokenizer_bos(const kl_tokenizer *tok);	/* -1 when none */
int32_t		kl_tokenizer_eos(const kl_tokenizer *tok);
int32_t		kl_tokenizer_pad(const kl_tokenizer *tok);
/* The id of a special token's text ("<|im_end|>"), -1 if there is none. */
int32_t		kl_tokenizer_special_id(const kl_tokenizer *tok, const char *text);
/* The ids that end a chat reply (eos, then [EOS] if present); returns how many. */
int			kl_tokenizer_stop_ids(const kl_tokenizer *tok, int32_t *out, int cap);

/*
 * Append the ids of text[0..len) to out.  allow_special: special-token texts
 * in the input become their ids; otherwise they are ordinary text.
 */
int			kl_encode(const kl_tokenizer *tok, const char *text, size_t len, bool allow_special,
					  kl_ids *out, kl_err *err);

/*
 * The bytes of ids (specials as their text), malloc'd and NUL-terminated.
 * The result may be invalid UTF-8 where a character is split across tokens;
 * kl_decode_text replaces invalid sequences with U+FFFD.
 */
int			kl_decode(const kl_tokenizer *tok, const int32_t *ids, size_t n, char **text, size_t *len,
					  kl_err *err);
int			kl_decode_text(const kl_tokenizer *tok, const int32_t *ids, size_t n, char **text, size_t *len,
						   kl_err *err);

/*
 * Streaming decode: push ids as they are generated; each push yields the
 * complete UTF-8 characters available so far (invalid bytes become U+FFFD,
 * an incomplete character waits for the next token).  finish flushes.
 */
typedef struct kl_detok_stream
{
	const kl_tokenizer *tok;
	unsigned char pending[8];	/* bytes of an incomplete character */
	int			n_pending;
} kl_detok_stream;

void		kl_detok_stream_init(kl_detok_stream *s, const kl_tokenizer *tok);
/* Appends to *buf (malloc'd, grown as needed; *len and *cap track it). */
int			kl_detok_stream_push(kl_detok_stream *s, int32_t id, char **buf, size_t *len, size_t *cap,
								 kl_err *err);
int			kl_detok_stream_finish(kl_detok_stream *s, char **buf, size_t *len, size_t *cap, kl_err *err);

/* The chat format: <|im_{role}|>{role}<|im_middle|>{content}<|im_end|> per message. */
typedef struct kl_chat_message
{
	const char *role;			/* "system", "user" or "assistant" */
	const char *content;
	size_t		content_len;
} kl_chat_message;

/*
 * Append a conversation's ids; with add_generation_prompt, end with
 * <|im_assistant|>assistant<|im_middle|>.  Contents are encoded as plain text:
 * special-token texts inside a message are not interpreted.
 */
int			kl_chat_render(const kl_tokenizer *tok, const kl_chat_message *msgs, size_t n,
						   bool add_generation_prompt, kl_ids *out, kl_err *err);

/* Check UTF-8; on failure *bad_offset is the first invalid byte. */
bool		kl_utf8_valid(const char *s, size_t len, size_t *bad_offset);

#endif
