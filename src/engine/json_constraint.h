/*
 * json_constraint.h — constrained decoding: the output is valid JSON that
 * matches a JSON schema, or a Kimi reply whose tool calls name declared
 * tools and carry arguments matching their parameter schemas.
 *
 * A grammar (kl_grammar, compiled once from a spec) describes what a reply
 * may be; a constraint (kl_constraint) is one generation's position in it:
 * a pushdown automaton over bytes and special tokens.  Before each sampling
 * step the worker asks for the mask of allowed token ids (computed by
 * walking the vocabulary's byte trie through the automaton, vocab_trie.h),
 * the sampler draws among them (kl_sample_masked), and the chosen token
 * advances the automaton.  Once the value (or the reply) is complete only
 * end tokens are allowed, so the model always can, and then must, stop.
 *
 * Spec (JSON text):
 *   {"json_schema": S,                        the reply is one JSON value matching S
 *    "tools": [{"name": N, "parameters": S}], and/or a tool-call reply
 *    "tool_choice": "auto" | "none" | "required" | N,
 *    "first_index": K}                        calls are numbered functions.N:K, K+1, ...
 * With tools and tool_choice "auto" the reply is free text (or a JSON value
 * matching json_schema) or a tool-call section; "none": no calls; "required":
 * calls only; N: exactly one call of N.
 *
 * JSON schema keywords supported (anything else is refused with an error
 * naming it): type (a name or a list of them: object, array, string, number,
 * integer, boolean, null), enum, const, properties, required,
 * additionalProperties (false, the default when properties are given; true
 * or a schema for objects without properties), items (one schema),
 * minItems, maxItems, minLength, maxLength; the annotations title,
 * description, default, examples, $schema, $id, $comment, deprecated,
 * readOnly and writeOnly are ignored.  Objects with properties take only
 * those keys, each at most once, and close only once the required ones are
 * present.  enum and const compare the exact compact JSON text of a value.
 * Strings are valid UTF-8 without NUL or lone surrogate escapes (what
 * PostgreSQL's jsonb accepts); numbers have at most 24 characters, integer
 * parts of at most 18 digits and exponents of at most 2 digits (so that
 * every number is a finite double); between tokens at most 16 whitespace
 * characters in a row, one of them a line break ("\n"; no "\r"); nesting at
 * most 16 levels in a schema (30 in free-form values).
 */
#ifndef KL_JSON_CONSTRAINT_H
#define KL_JSON_CONSTRAINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"
#include "vocab_trie.h"

#define KL_JSON_SCHEMA_SUPPORTED \
	"type, enum, const, properties, required, additionalProperties, items, minItems, maxItems, minLength, " \
	"maxLength (annotations such as title and description are ignored)"

typedef struct kl_grammar kl_grammar;
typedef struct kl_constraint kl_constraint;

/* Compile a spec (above).  Errors name the keyword and where it is. */
int			kl_grammar_compile(const char *spec, size_t len, kl_grammar **out, kl_err *err);
void		kl_grammar_free(kl_grammar *g);
/* The grammar may produce tool calls, so the tokenizer needs the tool tokens. */
bool		kl_grammar_has_tools(const kl_grammar *g);

/* Check a JSON schema alone; what: how the message names it ("json_schema"). */
int			kl_json_schema_check(const char *schema, size_t len, const char *what, kl_err *err);

/*
 * A generation's constraint.  end_ids: the tokens that end the output (the
 * eos and stop ids); there must be at least one.  The grammar and the
 * vocabulary must outlive the constraint.  A tool grammar on a vocabulary
 * without the tool tokens is an error naming the missing token.
 */
int			kl_constraint_new(const kl_grammar *g, const kl_vocab *v, const int32_t *end_ids, int n_end,
							  kl_constraint **out, kl_err *err);
void		kl_constraint_free(kl_constraint *c);
/* The vocabulary size its masks cover. */
int			kl_constraint_n_ids(const kl_constraint *c);

/*
 * The allowed tokens now: mask has kl_mask_words(v->n_ids) words (one bit
 * per id, 1 = allowed).  *n_allowed (may be NULL) counts them; none allowed
 * is an error (it cannot happen with the vocabularies of byte-level BPE).
 */
int			kl_constraint_mask(kl_constraint *c, uint32_t *mask, int *n_allowed, kl_err *err);
/* Advance by a token; one the mask did not allow is an error. */
int			kl_constraint_accept(kl_constraint *c, int32_t id, kl_err *err);
/* An end token was accepted: the output is complete. */
bool		kl_constraint_done(const kl_constraint *c);
/*
 * What the automaton is in the middle of (benchmarks): "text", "string",
 * "string, mid-escape or character", "key", "number", "literal", "structure", "end".
 */
const char *kl_constraint_state_kind(const kl_constraint *c);
/* Benchmarks: compute masks by the plain trie walk only (no precomputed string masks). */
void		kl_constraint_use_fast_paths(kl_constraint *c, bool on);

/* Tests and fuzzing: feed raw bytes, or the end; false (state unchanged) if not allowed. */
bool		kl_constraint_feed(kl_constraint *c, const char *bytes, size_t n);
bool		kl_constraint_feed_end(kl_constraint *c);

#endif
