/*
 * chat.h — the Kimi chat format with tools, both ways: a conversation
 * (OpenAI-style messages and function declarations, read from JSON) rendered
 * to text or token ids exactly as the public Kimi Instruct chat template
 * renders it, and a reply's tool calls parsed from the model's tokens.
 *
 * The format (test/fixtures/golden/chat holds the template and its renders):
 *
 *   <|im_system|>tool_declare<|im_middle|>{tools as json.dumps}<|im_end|>     (when tools are declared)
 *   <|im_system|>system<|im_middle|>{default}<|im_end|>\n   (when the first message is not a system
 *                                                              one and the model's template has a default)
 *   per message: <|im_{user|assistant|system}|>{name or role}<|im_middle|>{content}<|im_end|>
 *     (tool results and other roles use <|im_system|>)
 *   assistant tool calls, after the content:
 *     <|tool_calls_section_begin|>
 *       <|tool_call_begin|>functions.{name}:{k}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>  ...
 *     <|tool_calls_section_end|>
 *     k counts the calls of the whole conversation from 0;
 *   tool result: "## Return of {id}\n{content}", the ids taken in the order of the calls;
 *   <|im_assistant|>assistant<|im_middle|> to ask for a reply.
 *
 * Token ids: text between special tokens is encoded as plain text (special
 * token texts inside a message are not interpreted), so the ids equal the
 * rendered text encoded with special tokens whenever no message contains a
 * special token's text.  A model whose tokenizer lacks a token the
 * conversation needs (the tool tokens, say) gets an error naming it.
 *
 * Everything here is thread-safe on const arguments; results are malloc'd.
 */
#ifndef KL_CHAT_H
#define KL_CHAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"
#include "tokenizer.h"

/* the special tokens of tool use */
#define KL_TOK_SECTION_BEGIN "<|tool_calls_section_begin|>"
#define KL_TOK_SECTION_END "<|tool_calls_section_end|>"
#define KL_TOK_CALL_BEGIN "<|tool_call_begin|>"
#define KL_TOK_ARG_BEGIN "<|tool_call_argument_begin|>"
#define KL_TOK_CALL_END "<|tool_call_end|>"

/* A tool call of an assistant message. */
typedef struct kl_chat_call
{
	char	   *name;			/* the function called */
	char	   *arguments;		/* as rendered: a JSON string's text as given, other JSON as tojson */
	size_t		arguments_len;
} kl_chat_call;

typedef struct kl_chat_msg
{
	char	   *role;			/* system, user, assistant or tool */
	char	   *name;			/* optional: shown in the header instead of the role */
	char	   *content;		/* NULL: none */
	size_t		content_len;
	kl_chat_call *calls;		/* assistant */
	int			n_calls;
	char	   *tool_call_id;	/* tool: the call this answers (must be the next expected one) */
	int32_t    *token_ids;		/* assistant: the reply exactly as the model generated it, or NULL */
	size_t		n_token_ids;
} kl_chat_msg;

/* A tool declaration: name and parameter schema (compact JSON text, NULL: any object). */
typedef struct kl_chat_tool
{
	char	   *name;
	char	   *parameters;
} kl_chat_tool;

typedef struct kl_chat
{
	kl_chat_msg *msgs;
	size_t		n;
	char	   *tools_text;		/* the declarations as the template's tojson writes them; NULL: none */
	size_t		tools_len;
	kl_chat_tool *tools;
	int			n_tools;
} kl_chat;

/*
 * Read a conversation from JSON text: messages_json is an array of messages
 * {"role", "content" (text, a list of {"type": "text", "text"} parts, or
 * null), "name"?, "tool_calls"? (assistant: [{"id"?, "type"?, "function":
 * {"name", "arguments"}}] or [{"name", "arguments"}]; arguments a JSON
 * string or a JSON value), "tool_call_id"? (tool), "token_ids"? (assistant:
 * the generated ids, used instead of the content when rendering ids)};
 * messages_json NULL reads no messages.  tools_json (NULL: none) is an array
 * of OpenAI function declarations {"type": "function", "function": {"name",
 * "description"?, "parameters"?, "strict"?}}, checked: names [A-Za-z0-9_-]
 * (1-64) and unique, parameters a JSON schema the constraint supports.
 * conventional_order: write the declarations' keys in the usual order (type,
 * function; name, description, parameters; type, description, properties,
 * items, required, ...) instead of the order given — for JSON that lost its
 * key order (PostgreSQL's jsonb).  Errors name the message or tool and the
 * field.
 */
int			kl_chat_parse(const char *messages_json, size_t messages_len, const char *tools_json,
						  size_t tools_len, bool conventional_order, kl_chat **out, kl_err *err);
void		kl_chat_free(kl_chat *c);

/* Tool calls among the messages (what the next call's index k starts from). */
int			kl_chat_count_calls(const kl_chat *c);

/* What a model's template adds on its own. */
typedef struct kl_chat_format
{
	bool		has_default_system;
	char		default_system[512];	/* when the first message is not a system one */
	bool		default_system_newline; /* "\n" after its <|im_end|> (the Kimi K2 template has one) */
} kl_chat_format;

/* The public Kimi Instruct template's (the golden renders'). */
void		kl_chat_format_kimi(kl_chat_format *f);
/*
 * Read from the model's chat_template: a default system message exists when
 * the template inserts one for conversations that do not start with a
 * system message (as Kimi's does; the bundled model's template does not).
 */
void		kl_chat_format_of(const kl_tokenizer *tok, kl_chat_format *f);

typedef struct kl_chat_render_opts
{
	const kl_chat_format *format;	/* NULL: no default system message */
	bool		add_generation_prompt;

	/*
	 * The messages continue a conversation whose beginning a state already
	 * holds: no tool declarations and no default system message; tool calls
	 * are numbered from call_counter, and the first tool results answer
	 * pending_calls (the ids of the last reply's calls, in order).
	 */
	bool		continuation;
	int			call_counter;
	const char *const *pending_calls;
	int			n_pending;
} kl_chat_render_opts;

/*
 * The rendered text (malloc'd, NUL-terminated).  tok (may be NULL) decodes
 * the token_ids of assistant messages; without it their content is rendered.
 */
int			kl_chat_render_text(const kl_chat *c, const kl_chat_render_opts *o, const kl_tokenizer *tok,
								char **text, size_t *len, kl_err *err);
/* Append the rendered ids to out; on failure out keeps what it had. */
int			kl_chat_render_ids(const kl_tokenizer *tok, const kl_chat *c, const kl_chat_render_opts *o,
							   kl_ids *out, kl_err *err);

/*
 * The output grammar of a reply (a spec for json_constraint.h), or *spec =
 * NULL when the reply is free text.  tool_choice: NULL or "auto" (free text
 * or calls of the declared tools), "none" (no calls), "required" (calls
 * only), or a declared tool's name (one call of it; the prefix is forced).
 * schema_json (NULL: none): the text reply must be one JSON value matching
 * it.  first_index: the conversation's tool calls so far.
 */
int			kl_chat_grammar_spec(const kl_chat *c, const char *tool_choice, const char *schema_json,
								 size_t schema_len, int first_index, char **spec, kl_err *err);

/* ------------------------------------------------------------------ replies */

typedef struct kl_reply_call
{
	char	   *id;				/* "functions.NAME:K" as written */
	char	   *name;
	char	   *arguments;		/* the arguments' text as written */
	size_t		arguments_len;
	char	   *error;			/* NULL: a valid call; else why not (cut off, not JSON, unknown tool) */
} kl_reply_call;

typedef struct kl_chat_reply
{
	char	   *content;		/* the text outside the tool-call section (valid UTF-8) */
	size_t		content_len;
	kl_reply_call *calls;
	int			n_calls;
} kl_chat_reply;

/*
 * Parse what the model generated (ids, or its text with the special tokens
 * written out): the content, and each tool call with its arguments checked
 * to be a JSON object.  A call cut off (the ids end inside it), with
 * arguments that are not JSON, or naming a tool not in tools (when tools is
 * not NULL) is kept with its error, never dropped.  A final end token is
 * not content.
 */
int			kl_chat_parse_reply_ids(const kl_tokenizer *tok, const int32_t *ids, size_t n,
									const kl_chat *tools, kl_chat_reply **out, kl_err *err);
int			kl_chat_parse_reply_text(const char *text, size_t len, const kl_chat *tools,
									 kl_chat_reply **out, kl_err *err);
/*
 * The reply as JSON:
 *   {"content": text,
 *    "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": text},
 *                    "name", "arguments": {...}}],
 *    "invalid_tool_calls": [{"id", "name", "arguments": text, "error"}]}   (only when there are some)
 * A valid call carries both the OpenAI form (function.arguments: the exact
 * text, so that the call can be fed back as it was generated) and the parsed
 * arguments.
 */
int			kl_chat_reply_json(const kl_chat_reply *r, char **json, size_t *len, kl_err *err);

/*
 * The same with what a caller knows about how the generation ended:
 * "finish_reason" (NULL: left out), and with parse_content, "parsed": the
 * content read as JSON (a reply constrained to a JSON schema), or null with
 * an "error" saying why (cut_off: the reply stopped before the value was
 * complete).
 */
int			kl_chat_reply_json_ex(const kl_chat_reply *r, const char *finish_reason, bool parse_content,
								  bool cut_off, char **json, size_t *len, kl_err *err);
void		kl_chat_reply_free(kl_chat_reply *r);

#endif
