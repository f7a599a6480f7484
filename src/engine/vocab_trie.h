/*
 * vocab_trie.h — a model's vocabulary as the JSON constraint walks it: a
 * trie over the byte strings of the ordinary tokens (so that an automaton
 * state is advanced once per shared prefix, not once per token), the
 * special tokens classified by what they mean to a reply grammar, and
 * precomputed masks for the states where most tokens are allowed.
 *
 * Masks everywhere are one bit per token id, 1 = allowed: bit (id & 31) of
 * uint32_t word id >> 5 (the GPU sampler's convention too).
 *
 * Immutable after building; one per model, shared by all its requests.
 * The struct is visible to json_constraint.c, its only reader.
 */
#ifndef KL_VOCAB_TRIE_H
#define KL_VOCAB_TRIE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"
#include "tokenizer.h"

/* What a token id means to a reply grammar, beyond its bytes. */
typedef enum kl_vocab_sym
{
	KL_VSYM_BYTES = 0,			/* an ordinary token: its bytes */
	KL_VSYM_SECTION_BEGIN,		/* <|tool_calls_section_begin|> */
	KL_VSYM_SECTION_END,
	KL_VSYM_CALL_BEGIN,
	KL_VSYM_ARG_BEGIN,
	KL_VSYM_CALL_END,
	KL_VSYM_OTHER,				/* any other special token */
	KL_VSYM_NONE				/* an id with no text (beyond the tokenizer) */
} kl_vocab_sym;

#define KL_VSYM_TOOL_FIRST KL_VSYM_SECTION_BEGIN
#define KL_VSYM_TOOL_LAST KL_VSYM_CALL_END

/*
 * A trie in breadth-first order: node i's children are the nodes
 * first[i] .. first[i] + count[i] - 1, sorted by byte; node 0 is the root.
 */
typedef struct kl_byte_trie
{
	int32_t    *first;
	uint16_t   *count;
	uint8_t    *byte;
	int32_t    *token;			/* the id whose bytes end here, -1 if none */
	int32_t		n_nodes;
	int32_t		max_depth;		/* the longest token, in bytes */
} kl_byte_trie;

typedef struct kl_vocab
{
	int			n_ids;			/* mask size: ids 0 .. n_ids - 1 */
	kl_byte_trie all;			/* every ordinary token */
	uint8_t    *pool;			/* ordinary token id's bytes: pool[off[id] .. off[id + 1]) */
	uint32_t   *off;

	/*
	 * Inside a JSON string (at a character boundary), a token of UTF-8
	 * characters — the last one may be cut short — with no '"', '\\' or
	 * control byte keeps the string open: all of those that fit are allowed
	 * at once (string_safe, safe_upto), and only the others are walked
	 * (unsafe).
	 */
	uint32_t   *string_safe;	/* mask */
	int32_t    *safe_chars;		/* per id: characters of a string-safe token, else -1 */
	int32_t		max_safe_chars; /* the longest string-safe token, in characters */
	uint32_t   *safe_upto;		/* KL_SAFE_BUCKETS masks: string-safe tokens of at most k characters */
	kl_byte_trie unsafe;

	uint32_t   *text_mask;		/* ordinary tokens and KL_VSYM_OTHER specials (free text) */
	uint8_t    *sym;			/* per id: kl_vocab_sym */
	int32_t		tool_ids[KL_VSYM_TOOL_LAST + 1];	/* the id of each tool token, -1 if missing */
	const char *tool_text[KL_VSYM_TOOL_LAST + 1];
	int32_t    *special_ids;	/* the ids that are not KL_VSYM_BYTES / NONE */
	int			n_special;
} kl_vocab;

#define KL_SAFE_BUCKETS 64

static inline size_t
kl_mask_words(int n_ids)
{
	return ((size_t) n_ids + 31) / 32;
}

static inline bool
kl_mask_get(const uint32_t *mask, int32_t id)
{
	return (mask[id >> 5] >> (id & 31)) & 1;
}

static inline void
kl_mask_set(uint32_t *mask, int32_t id)
{
	mask[id >> 5] |= 1u << (id & 31);
}

/* n_ids: the model's vocabulary size (ids past the tokenizer's have no text). */
int			kl_vocab_from_tokenizer(const kl_tokenizer *tok, int n_ids, kl_vocab **out, kl_err *err);
/* A vocabulary of ordinary tokens only (benchmarks, tests): token i has bytes[i][0..lens[i]). */
int			kl_vocab_from_bytes(const uint8_t *const *bytes, const size_t *lens, int n, kl_vocab **out,
								kl_err *err);
void		kl_vocab_free(kl_vocab *v);

#endif
