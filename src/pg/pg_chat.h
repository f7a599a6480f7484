/*
 * pg_chat.h — the Kimi chat format with tools and structured output, as the
 * SQL functions use it: jsonb messages and declarations handed to the
 * engine (chat.h), output constraints (json_constraint.h) built from the
 * tools, tool_choice and json_schema arguments, and replies returned as
 * jsonb.  Engine objects are malloc'd; these helpers tie their lifetime to
 * the current memory context, so an ERROR leaks nothing.
 */
#ifndef KL_PG_CHAT_H
#define KL_PG_CHAT_H

#include "postgres.h"

#include "utils/jsonb.h"

#include "chat.h"

#include "pg_request.h"

/* JSON text of a jsonb value, in UTF-8 (palloc'd). */
char	   *kl_jsonb_utf8(Jsonb *jb);

/*
 * Messages (NULL: none) and tool declarations (NULL: none) as the engine's
 * conversation; ERROR with the engine's message when they are not valid.
 * The declarations' keys are put back in their usual order (jsonb sorted
 * them), so that the model reads them as frameworks write them.
 */
kl_chat    *kl_pg_chat(Jsonb *messages, Jsonb *tools);
/* The same from UTF-8 JSON texts. */
kl_chat    *kl_pg_chat_text(const char *messages, const char *tools);

/*
 * The output constraint of a reply (palloc'd spec, or NULL for free text):
 * the declared tools with tool_choice (NULL: auto), a JSON schema (NULL:
 * none), calls numbered from first_index.  ERROR when they are not valid.
 */
char	   *kl_pg_grammar(const kl_chat *c, const char *tool_choice, Jsonb *schema, int first_index);

/* Render c to ids (palloc'd); ERROR naming what is wrong. */
int32	   *kl_pg_render(const kl_tokenizer *tok, const kl_chat *c, const kl_chat_render_opts *o, int *n_out);

/*
 * The reply of a finished run as jsonb: {"content", "tool_calls",
 * ["invalid_tool_calls",] "finish_reason": "stop" | "length" | "tool_calls",
 * [with a schema: "parsed": the value, or null and "error" if it was cut off]}.
 * decl: the declared tools (unknown names are flagged), or NULL.
 */
Jsonb	   *kl_pg_reply(const kl_tokenizer *tok, const KlRunResult *res, const kl_chat *decl, bool with_schema);

/* The text reply of a run whose output was constrained to JSON, as jsonb; ERROR if cut off. */
Jsonb	   *kl_pg_json_value(const KlRunResult *res, int max_tokens);
/*
 * The same without an ERROR for a reply that cannot be one (the set-based
 * forms report it on the input's row): NULL with *why set when the value was
 * cut off by max_tokens or cannot be stored as jsonb.
 */
Jsonb	   *kl_pg_json_value_or_why(const KlRunResult *res, int max_tokens, const char **why);

/*
 * extract()'s request for one document (greedy, one user turn: instructions
 * (NULL: the default ones), the schema, the document; output constrained to
 * the schema), filled into *spec after kl_spec_init.
 */
void		kl_extract_request(const kl_tokenizer *tok, const char *body, Jsonb *schema,
							   const char *instructions, KlReqSpec *spec);

/* A reply's parts: has it tool calls (valid or not); its content; its valid calls (NULL: none). */
bool		kl_reply_has_calls(Jsonb *reply);
text	   *kl_reply_content(Jsonb *reply);
Jsonb	   *kl_reply_tool_calls(Jsonb *reply);

/* tool_choice argument i (NULL if absent), checked: auto, none, required or a name. */
char	   *kl_pg_tool_choice(FunctionCallInfo fcinfo, int i);

#endif
