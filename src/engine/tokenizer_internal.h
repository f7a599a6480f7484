/*
 * tokenizer_internal.h — what the tokenizer's source files share: the layout
 * of kl_tokenizer and the functions one file provides to another.  Not part
 * of the engine's interface (that is tokenizer.h).
 *
 *   tokenizer.c        loading, specials, encode/decode, streaming
 *   tokenizer_split.c  the pre-tokenizer: PCRE2 pattern and the scanner
 *   bpe.c              vocabulary hash tables and byte-pair merging
 */
#ifndef KL_TOKENIZER_INTERNAL_H
#define KL_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "tokenizer.h"

/* Character classes of the pre-tokenizer pattern, one bit each. */
enum
{
	KL_CC_HAN = 1 << 0,			/* \p{Han} (Script, not Script_Extensions) */
	KL_CC_UPPER = 1 << 1,		/* [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]] */
	KL_CC_LOWER = 1 << 2,		/* [\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]] */
	KL_CC_LETTER = 1 << 3,		/* \p{L} */
	KL_CC_NUMBER = 1 << 4,		/* \p{N} */
	KL_CC_SPACE = 1 << 5,		/* \s: Unicode White_Space */
	KL_CC_NEWLINE = 1 << 6		/* \r or \n */
};

typedef struct kl_special
{
	char	   *text;
	size_t		len;
	int32_t		id;
} kl_special;

/* A node of the byte trie of special-token texts (children as a sibling list). */
typedef struct kl_trie_node
{
	int32_t		child;			/* first child, -1 if none */
	int32_t		sibling;		/* next sibling, -1 if none */
	int32_t		special;		/* index into specials of the text ending here, -1 if none */
	uint8_t		byte;
} kl_trie_node;

struct kl_tokenizer
{
	/* ordinary tokens: rank r has bytes pool[off[r] .. off[r+1]) */
	int			n_base;
	uint8_t    *pool;
	uint32_t   *off;

	/* bytes -> rank: open addressing, slot holds rank + 1 (0 = empty) */
	int32_t    *rank_slots;
	uint32_t	rank_mask;
	int32_t		byte_rank[256];

	/*
	 * (left rank, right rank) -> rank of their concatenation, for every way
	 * of cutting a token into two tokens.  Merging works on ranks with this
	 * table instead of hashing byte strings.
	 */
	uint64_t   *pair_keys;		/* (left << 32 | right) + 1; 0 = empty */
	int32_t    *pair_ranks;
	uint32_t	pair_mask;

	/* special tokens */
	kl_special *specials;		/* sorted by id */
	int			n_specials;
	kl_trie_node *trie;			/* node 0 is the root */
	int			n_trie;
	bool		special_first_byte[256];
	char	  **special_text;	/* id - n_base -> text, for n_base <= id < n_vocab */
	int			n_vocab;
	int32_t		bos,
				eos,
				pad,
				unk,
				eos_alt;		/* [EOS] */
	char	   *chat_template;	/* tokenizer_config.json's chat_template, or NULL */

	/* pre-tokenizer */
	pcre2_code *re;
	pcre2_match_context *match_ctx; /* limits raised; shared read-only */
	uint8_t		ascii_class[128];
	uint16_t   *class_block;	/* code point >> 8 -> block of class_bits */
	uint8_t    *class_bits;		/* blocks of 256 class bytes */
};

/* bpe.c */
int32_t		kl_tok_lookup(const kl_tokenizer *t, const uint8_t *p, size_t n);
/* Read tiktoken.model at path (confined to root unless NULL: kl_file.h) into t's tables. */
int			kl_tok_build_tables(kl_tokenizer *t, const char *root, const char *path, kl_err *err);
int			kl_tok_bpe(const kl_tokenizer *t, const uint8_t *p, size_t n, kl_ids *out, kl_err *err);

/* tokenizer_split.c */
int			kl_tok_split_init(kl_tokenizer *t, kl_err *err);
void		kl_tok_split_free(kl_tokenizer *t);
/* The end of the piece that starts at pos (pos < len; text is valid UTF-8). */
size_t		kl_tok_scan_piece(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t pos);
/* The same with PCRE2: piece end, or an error. md: the caller's match data. */
int			kl_tok_pcre2_piece(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t pos,
							   pcre2_match_data *md, size_t *end, kl_err *err);

#endif
