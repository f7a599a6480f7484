/*
 * kl.c — the command-line tool: ./kl COMMAND [options].
 *
 *   logits      logits of every position of a token sequence, as safetensors
 *   generate    generate a continuation (ids, and text with a tokenizer)
 *   bench       prefill / decode throughput table (bench.c)
 *   perplexity  token-level perplexity over a corpus (cmd_perplexity.c)
 *   quantize    write a quantized checkpoint, or its dequantized f32 copy (cmd_quantize.c)
 *   tokenize, detokenize, bench-tokenizer   (cmd_tokenizer.c)
 *   render, parse-reply   the Kimi chat format with tools (cmd_chat.c)
 *   bench-constraint      the per-step cost of JSON constraint masks (bench_constraint.c)
 *
 * Used by the tests and benchmarks; a thin layer over the engine (kl.h).
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "cli_util.h"
#include "commands.h"
#include "json_constraint.h"
#include "kl_file.h"
#include "kl.h"
#include "tokenizer.h"

static void
usage(void)
{
	fprintf(stderr,
			"usage: kl COMMAND [options]\n"
			"  logits     --model DIR --ids 1,2,3 [--split N] [--recurrent] --out FILE\n"
			"  generate   --model DIR (--ids 1,2,3 | --prompt TEXT | --chat TEXT [--system TEXT] | --chat-json FILE)\n"
			"             [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P]\n"
			"             [--repetition-penalty R] [--seed S] [--stop-ids a,b] [--ignore-eos]\n"
			"             [--json-schema FILE] [--tool-choice auto|none|required|NAME]   (constrained output)\n"
			"             [--state-in FILE] [--state-out FILE]   (resume from / save the sequence state)\n"
			"  render     --chat-json FILE [--model DIR] [--ids] [--format kimi|model]   (the Kimi chat format)\n"
			"  parse-reply [--tools FILE] < reply text      (content and tool calls as JSON)\n"
			"  bench-constraint --model DIR [--synthetic N] [--steps N]   (JSON constraint masks per step)\n"
			"  bench      --model DIR | --config FILE  [--prefill 512,4096] [--decode 0,4096] [--dtype bf16]\n"
			"  perplexity --model DIR --corpus FILE [--max-tokens N] [--save-argmax FILE] [--agree-with FILE]\n"
			"  quantize   --model DIR (--format FMT --out DIR | --at-load fp8|int8|int4) [--dequantized DIR]\n"
			"  tokenize   --model DIR [--special]        (text on stdin, ids on stdout)\n"
			"  detokenize --model DIR                    (ids on stdin, text on stdout)\n"
			"  bench-tokenizer --model DIR --corpus FILE\n"
			"common options: --threads N (default: all cores), --device cpu|cuda|auto,\n"
			"                --moe-routing select|reference (MoE models: select = the router bias chooses\n"
			"                the experts, the scores weight them (default); reference = the bias is added\n"
			"                into the weights too, as the released kimi_linear code does),\n"
			"                --quantize fp8|int8|int4 (quantize the weights at load),\n"
			"                --precision auto|fp32|bf16|fp8 (activations of the matrix products; default auto:\n"
			"                bf16 on the GPU, fp32 on the CPU; fp32 on the GPU matches the CPU to float\n"
			"                rounding; bf16 is GPU-only: the CPU computes in fp32; fp8 is bf16 plus FP8\n"
			"                activations in the prefill products of FP8 weights, e.g. with --quantize fp8)\n");
}

/* ------------------------------------------------------------------ logits */

/* Write one F32 tensor "logits" [rows, cols] as a safetensors file. */
static int
write_logits(const char *path, const float *data, int rows, int cols)
{
	char		header[256];
	size_t		bytes = sizeof(float) * (size_t) rows * cols;
	int			n = snprintf(header, sizeof(header),
							 "{\"logits\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[0,%zu]}}",
							 rows, cols, bytes);
	uint64_t	hlen;
	FILE	   *f;

	/* pad the header with spaces so that the data is 8-byte aligned */
	while ((8 + n) % 8 != 0)
		header[n++] = ' ';
	hlen = (uint64_t) n;
	f = fopen(path, "wb");
	if (!f)
	{
		fprintf(stderr, "kl: cannot write %s: %s\n", path, strerror(errno));
		return 1;
	}
	if (fwrite(&hlen, 8, 1, f) != 1 || fwrite(header, 1, (size_t) n, f) != (size_t) n ||
		fwrite(data, 1, bytes, f) != bytes || fclose(f) != 0)
	{
		fprintf(stderr, "kl: error writing %s\n", path);
		return 1;
	}
	return 0;
}

/*
 * The logits of all n ids into logits; with 0 < split < n, the first split
 * ids, then through the serializer (save, drop the sequence, restore) the
 * rest: the state must carry everything.  *seq may be replaced.
 */
static int
logits_split(kl_ctx *ctx, kl_model *m, kl_seq **seq, const int32_t *ids, int n, int split, float *logits,
			 kl_err *err)
{
	int			first = split > 0 ? split : n;
	kl_batch_item it = {*seq, ids, first, logits, true};
	uint8_t    *blob;
	size_t		len;
	kl_blob		part;
	int			rc;

	if (kl_forward(ctx, &it, 1, err) != KL_OK)
		return KL_FAIL;
	if (!(split > 0 && split < n))
		return KL_OK;
	if (kl_state_save(*seq, 0, &blob, &len, err) != KL_OK)
		return KL_FAIL;
	kl_seq_free(*seq);
	*seq = NULL;
	part.data = blob;
	part.len = len;
	rc = kl_seq_new(m, seq, err) == KL_OK && kl_state_load(*seq, &part, 1, err) == KL_OK ? KL_OK : KL_FAIL;
	free(blob);
	if (rc != KL_OK)
		return KL_FAIL;
	it.seq = *seq;
	it.ids = ids + split;
	it.n = n - split;
	it.logits = logits + (size_t) split * kl_model_config(m)->vocab_size;
	return kl_forward(ctx, &it, 1, err);
}

int
cmd_logits(int argc, char **argv)
{
	cli_common co;
	const char *ids_s = NULL,
			   *out = NULL;
	int			split = -1;
	bool		recurrent = false;
	kl_err		err;
	kl_model   *m = NULL;
	kl_ctx	   *ctx = NULL;
	kl_seq	   *seq = NULL;
	int32_t    *ids = NULL;
	int			n = 0;
	float	   *logits = NULL;
	int			rc = 1;
	const cli_opt opts[] = {
		CLI_OPT("--ids", CLI_OPT_STRING, &ids_s),
		CLI_OPT("--out", CLI_OPT_STRING, &out),
		CLI_OPT("--split", CLI_OPT_INT, &split),
		CLI_OPT("--recurrent", CLI_OPT_SET, &recurrent),
	};

	cli_common_init(&co);
	if (cli_parse_options("logits", argc, argv, &co, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (!co.model || !ids_s || !out)
	{
		fprintf(stderr, "kl logits: --model, --ids and --out are required\n");
		return 2;
	}
	if (cli_parse_ids(ids_s, &ids, &n) != 0 || n == 0)
	{
		fprintf(stderr, "kl logits: --ids must be a non-empty comma-separated list of token ids\n");
		return 2;
	}
	if (split > n)
	{
		fprintf(stderr, "kl logits: --split %d is beyond the %d ids\n", split, n);
		goto out;
	}
	if (cli_load(&co, &m, &err) != KL_OK || kl_ctx_new(m, 0, &ctx, &err) != KL_OK ||
		kl_seq_new(m, &seq, &err) != KL_OK)
		goto fail;
	kl_ctx_force_recurrent(ctx, recurrent);
	logits = malloc(sizeof(float) * (size_t) n * kl_model_config(m)->vocab_size);
	if (!logits)
	{
		fprintf(stderr, "kl: out of memory\n");
		goto out;
	}
	if (logits_split(ctx, m, &seq, ids, n, split, logits, &err) != KL_OK)
		goto fail;
	rc = write_logits(out, logits, n, kl_model_config(m)->vocab_size);
	goto out;
fail:
	fprintf(stderr, "kl: %s\n", err.msg);
out:
	free(ids);
	free(logits);
	kl_seq_free(seq);
	kl_ctx_free(ctx);
	kl_model_free(m);
	return rc;
}

/* ------------------------------------------------------------------ generate */

/* what a step of generate returns besides KL_OK and KL_FAIL (err set): it
 * failed and has said why */
#define GEN_SAID 1

typedef struct gen_opts
{
	cli_common	co;
	const char *ids,
			   *prompt,
			   *chat,
			   *system_msg,
			   *stop_ids,
			   *state_in,
			   *state_out,
			   *chat_json,
			   *schema_file,
			   *tool_choice;
	kl_gen_params gp;			/* --max-tokens, the sampling options, --ignore-eos */
} gen_opts;

/* what the steps of one generation build (gen_run_free releases it) */
typedef struct gen_run
{
	kl_model   *m;
	kl_ctx	   *ctx;
	kl_seq	   *seq;
	int32_t    *ids;			/* the prompt */
	int			n;
	int32_t    *stops;			/* --stop-ids, then a chat's stop tokens */
	int			n_stops;
	uint8_t    *schema;			/* --json-schema's file */
	size_t		schema_len;
	kl_chat    *chat;			/* --chat-json: the messages and tools */
	char	   *spec;			/* the grammar of constrained output */
	kl_grammar *grammar;
	kl_vocab   *vocab;
	kl_constraint *con;
	kl_tokens	out;
} gen_run;

static int
parse_generate_args(int argc, char **argv, gen_opts *o)
{
	kl_sampling *s = &o->gp.sampling;
	const cli_opt opts[] = {
		CLI_OPT("--ids", CLI_OPT_STRING, &o->ids),
		CLI_OPT("--prompt", CLI_OPT_STRING, &o->prompt),
		CLI_OPT("--chat", CLI_OPT_STRING, &o->chat),
		CLI_OPT("--system", CLI_OPT_STRING, &o->system_msg),
		CLI_OPT("--max-tokens", CLI_OPT_INT, &o->gp.max_tokens),
		CLI_OPT("--temperature", CLI_OPT_FLOAT, &s->temperature),
		CLI_OPT("--top-k", CLI_OPT_INT, &s->top_k),
		CLI_OPT("--top-p", CLI_OPT_FLOAT, &s->top_p),
		CLI_OPT("--min-p", CLI_OPT_FLOAT, &s->min_p),
		CLI_OPT("--repetition-penalty", CLI_OPT_FLOAT, &s->repetition_penalty),
		CLI_OPT("--seed", CLI_OPT_U64, &s->seed),
		CLI_OPT("--stop-ids", CLI_OPT_STRING, &o->stop_ids),
		CLI_OPT("--ignore-eos", CLI_OPT_SET, &o->gp.ignore_eos),
		CLI_OPT("--state-in", CLI_OPT_STRING, &o->state_in),
		CLI_OPT("--state-out", CLI_OPT_STRING, &o->state_out),
		CLI_OPT("--chat-json", CLI_OPT_STRING, &o->chat_json),
		CLI_OPT("--json-schema", CLI_OPT_STRING, &o->schema_file),
		CLI_OPT("--tool-choice", CLI_OPT_STRING, &o->tool_choice),
	};

	memset(o, 0, sizeof(*o));
	kl_sampling_default(s);
	o->gp.max_tokens = 64;
	cli_common_init(&o->co);
	if (cli_parse_options("generate", argc, argv, &o->co, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (!o->co.model || (!!o->ids + !!o->prompt + !!o->chat + !!o->chat_json) > 1 ||
		(!o->ids && !o->prompt && !o->chat && !o->chat_json && !o->state_in))
	{
		fprintf(stderr, "kl generate: --model and one of --ids, --prompt, --chat, --chat-json are required "
				"(none only with --state-in: continue the saved generation)\n");
		return 2;
	}
	return 0;
}

/* The inputs read before the model loads: --json-schema's file, --stop-ids; 0 or 2. */
static int
read_generate_inputs(const gen_opts *o, gen_run *r)
{
	if (o->schema_file && !(r->schema = cli_read_file(o->schema_file, &r->schema_len)))
	{
		fprintf(stderr, "kl generate: cannot read %s\n", o->schema_file);
		return 2;
	}
	if (o->stop_ids && cli_parse_ids(o->stop_ids, &r->stops, &r->n_stops) != 0)
	{
		fprintf(stderr, "kl generate: --stop-ids must be comma-separated token ids\n");
		return 2;
	}
	return 0;
}

/* --state-in: the sequence resumes from the saved state. */
static int
load_state_in(gen_run *r, const char *path, kl_err *err)
{
	size_t		len;
	uint8_t    *blob = cli_read_file(path, &len);
	kl_blob		part = {blob, len};
	int			rc_load;

	if (!blob)
	{
		fprintf(stderr, "kl generate: cannot read %s\n", path);
		return GEN_SAID;
	}
	rc_load = kl_state_load(r->seq, &part, 1, err);
	free(blob);
	if (rc_load != KL_OK)
	{
		kl_err_prefix(err, "%s", path);
		return KL_FAIL;
	}
	return KL_OK;
}

/* A chat reply ends at the tokenizer's chat stop tokens: add them to the stops. */
static int
add_chat_stops(gen_run *r, const kl_tokenizer *tok, kl_err *err)
{
	int32_t		chat_stops[8];
	int			ns = kl_tokenizer_stop_ids(tok, chat_stops, 8);
	int32_t    *more = realloc(r->stops, sizeof(int32_t) * (size_t) (r->n_stops + ns));

	if (!more && r->n_stops + ns > 0)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	r->stops = more;
	for (int i = 0; i < ns; i++)
		r->stops[r->n_stops++] = chat_stops[i];
	return KL_OK;
}

/*
 * --chat-json: the full Kimi format, messages and tools from a file
 * (cmd_chat.c's forms), rendered with the generation prompt; the grammar of
 * its tool calls (and of --json-schema) in r->spec.
 */
static int
chat_json_ids(const gen_opts *o, gen_run *r, const kl_tokenizer *tok, kl_ids *enc, kl_err *err)
{
	size_t		len;
	uint8_t    *file = cli_read_file(o->chat_json, &len);
	json_error_t jerr;
	json_t	   *j,
			   *msgs,
			   *t;
	char	   *ms,
			   *ts;
	kl_chat_format f;
	kl_chat_render_opts ro = {0};
	int			rc_parse;

	if (!file)
	{
		fprintf(stderr, "kl generate: cannot read %s\n", o->chat_json);
		return GEN_SAID;
	}
	j = json_loadb((const char *) file, len, 0, &jerr);
	free(file);
	if (!j)
		return kl_errc(err, KL_E_INVALID, "%s: not valid JSON (line %d column %d: %s)", o->chat_json, jerr.line,
					   jerr.column, kl_json_error_kind(&jerr));
	msgs = json_is_array(j) ? j : json_object_get(j, "messages");
	t = json_is_object(j) ? json_object_get(j, "tools") : NULL;
	if (!json_is_array(msgs))
	{
		json_decref(j);
		return kl_errc(err, KL_E_INVALID, "%s: expected a list of messages, or an object with \"messages\" "
					   "(and \"tools\")", o->chat_json);
	}
	ms = json_dumps(msgs, JSON_COMPACT);
	ts = t && !json_is_null(t) ? json_dumps(t, JSON_COMPACT) : NULL;
	json_decref(j);
	rc_parse = kl_chat_parse(ms, ms ? strlen(ms) : 0, ts, ts ? strlen(ts) : 0, false, &r->chat, err);
	free(ms);
	free(ts);
	if (rc_parse != KL_OK)
		return KL_FAIL;
	kl_chat_format_of(tok, &f);
	ro.format = &f;
	ro.add_generation_prompt = true;
	if (kl_chat_render_ids(tok, r->chat, &ro, enc, err) != KL_OK ||
		kl_chat_grammar_spec(r->chat, o->tool_choice, (const char *) r->schema, r->schema_len,
							 kl_chat_count_calls(r->chat), &r->spec, err) != KL_OK)
		return KL_FAIL;
	return add_chat_stops(r, tok, err);
}

/* --prompt: a fresh text prompt starts with the bos token, as the model was trained. */
static int
text_prompt_ids(const gen_opts *o, const gen_run *r, const kl_tokenizer *tok, kl_ids *enc, kl_err *err)
{
	if (kl_seq_positions(r->seq) == 0 && kl_seq_pending(r->seq) < 0 && kl_tokenizer_bos(tok) >= 0 &&
		kl_ids_push(enc, kl_tokenizer_bos(tok), err) != KL_OK)
		return KL_FAIL;
	return kl_encode(tok, o->prompt, strlen(o->prompt), 0, enc, err);
}

/* --chat [--system]: one user turn in the chat format. */
static int
chat_ids(const gen_opts *o, gen_run *r, const kl_tokenizer *tok, kl_ids *enc, kl_err *err)
{
	kl_chat_message msgs[2];
	size_t		nm = 0;

	if (o->system_msg)
	{
		msgs[nm].role = "system";
		msgs[nm].content = o->system_msg;
		msgs[nm++].content_len = strlen(o->system_msg);
	}
	msgs[nm].role = "user";
	msgs[nm].content = o->chat;
	msgs[nm++].content_len = strlen(o->chat);
	if (kl_chat_render(tok, msgs, nm, 1, enc, err) != KL_OK)
		return KL_FAIL;
	return add_chat_stops(r, tok, err);
}

/* The prompt's ids in r->ids (none: continue from the state's pending token). */
static int
prompt_ids(const gen_opts *o, gen_run *r, kl_err *err)
{
	const kl_tokenizer *tok = kl_model_tokenizer(r->m);
	kl_ids		enc = {0};
	int			rc;

	if (!o->ids && !o->prompt && !o->chat && !o->chat_json)
	{
		r->n = 0;
		return KL_OK;
	}
	if (o->ids)
	{
		if (cli_parse_ids(o->ids, &r->ids, &r->n) != 0)
		{
			fprintf(stderr, "kl generate: --ids must be comma-separated token ids\n");
			return GEN_SAID;
		}
		return KL_OK;
	}
	if (!tok)
	{
		fprintf(stderr, "kl generate: %s has no tokenizer (tiktoken.model); use --ids\n", o->co.model);
		return GEN_SAID;
	}
	if (o->chat_json)
		rc = chat_json_ids(o, r, tok, &enc, err);
	else if (o->prompt)
		rc = text_prompt_ids(o, r, tok, &enc, err);
	else
		rc = chat_ids(o, r, tok, &enc, err);
	if (rc != KL_OK)
	{
		free(enc.ids);
		return rc;
	}
	r->ids = enc.ids;
	r->n = (int) enc.n;
	return KL_OK;
}

/*
 * Constrained output: the grammar of --chat-json's tools, or of a JSON value
 * after a prompt or --chat ({"json_schema": ...}); ends at eos and the stops.
 */
static int
build_constraint(gen_run *r, kl_gen_params *gp, kl_err *err)
{
	const kl_tokenizer *tok = kl_model_tokenizer(r->m);
	const kl_config *cfg = kl_model_config(r->m);
	int32_t		ends[72];
	int			n_ends = 0;

	if (r->schema && !r->spec)
	{
		kl_chat    *none = NULL;
		int			rc_spec;

		rc_spec = kl_chat_parse(NULL, 0, NULL, 0, false, &none, err) != KL_OK ||
			kl_chat_grammar_spec(none, NULL, (const char *) r->schema, r->schema_len, 0, &r->spec, err) != KL_OK;
		kl_chat_free(none);
		if (rc_spec)
			return KL_FAIL;
	}
	if (!r->spec)
		return KL_OK;
	if (!tok)
	{
		fprintf(stderr, "kl generate: constrained output needs a model with a tokenizer\n");
		return GEN_SAID;
	}
	if (!gp->ignore_eos && cfg->eos_id >= 0)
		ends[n_ends++] = cfg->eos_id;
	for (int i = 0; i < r->n_stops && n_ends < 72; i++)
		ends[n_ends++] = r->stops[i];
	if (kl_grammar_compile(r->spec, strlen(r->spec), &r->grammar, err) != KL_OK ||
		kl_vocab_from_tokenizer(tok, cfg->vocab_size, &r->vocab, err) != KL_OK ||
		kl_constraint_new(r->grammar, r->vocab, ends, n_ends, &r->con, err) != KL_OK)
		return KL_FAIL;
	gp->constraint = r->con;
	return KL_OK;
}

/* --state-out: the sequence's state after the generation. */
static int
save_state_out(const gen_run *r, const char *path, kl_err *err)
{
	uint8_t    *blob;
	size_t		len;

	if (kl_state_save(r->seq, 0, &blob, &len, err) != KL_OK)
		return KL_FAIL;
	if (cli_write_file(path, blob, len) != 0)
	{
		free(blob);
		fprintf(stderr, "kl generate: cannot write %s\n", path);
		return GEN_SAID;
	}
	free(blob);
	return KL_OK;
}

/* The generated ids; with a tokenizer their text, and the reply parsed when tools were declared. */
static void
print_generation(const gen_run *r, kl_err *err)
{
	const kl_tokenizer *tok = kl_model_tokenizer(r->m);
	char	   *text;
	size_t		len;

	for (size_t i = 0; i < r->out.n; i++)
		printf("%s%d", i ? "," : "", r->out.ids[i]);
	printf("\n");
	if (!tok)
		return;
	if (kl_decode(tok, r->out.ids, r->out.n, &text, &len, err) == KL_OK)
	{
		fwrite(text, 1, len, stdout);
		printf("\n");
		free(text);
	}
	if (r->chat && r->chat->n_tools > 0)
	{
		kl_chat_reply *reply;
		char	   *json;
		size_t		jl;

		if (kl_chat_parse_reply_ids(tok, r->out.ids, r->out.n, r->chat, &reply, err) == KL_OK &&
			kl_chat_reply_json(reply, &json, &jl, err) == KL_OK)
		{
			printf("%s\n", json);
			free(json);
		}
		kl_chat_reply_free(reply);
	}
}

static void
gen_run_free(gen_run *r)
{
	free(r->ids);
	free(r->stops);
	kl_tokens_free(&r->out);
	kl_constraint_free(r->con);
	kl_grammar_free(r->grammar);
	kl_vocab_free(r->vocab);
	kl_chat_free(r->chat);
	free(r->spec);
	free(r->schema);
	kl_seq_free(r->seq);
	kl_ctx_free(r->ctx);
	kl_model_free(r->m);
}

int
cmd_generate(int argc, char **argv)
{
	gen_opts	o;
	gen_run		r = {0};
	kl_err		err;
	int			rc;
	double		t0,
				t1;

	if ((rc = parse_generate_args(argc, argv, &o)) != 0 || (rc = read_generate_inputs(&o, &r)) != 0)
	{
		gen_run_free(&r);
		return rc;
	}
	if (cli_load(&o.co, &r.m, &err) != KL_OK || kl_ctx_new(r.m, 0, &r.ctx, &err) != KL_OK ||
		kl_seq_new(r.m, &r.seq, &err) != KL_OK)
		rc = KL_FAIL;
	else if (!o.state_in || (rc = load_state_in(&r, o.state_in, &err)) == KL_OK)
		rc = prompt_ids(&o, &r, &err);
	if (rc == KL_OK)
	{
		o.gp.stop_ids = r.stops;
		o.gp.n_stop_ids = r.n_stops;
		rc = build_constraint(&r, &o.gp, &err);
	}
	if (rc == KL_OK)
	{
		t0 = kl_now();
		rc = kl_generate(r.ctx, r.seq, r.ids, r.n, &o.gp, &r.out, NULL, NULL, &err);
		t1 = kl_now();
	}
	if (rc == KL_OK && o.state_out)
		rc = save_state_out(&r, o.state_out, &err);
	if (rc == KL_OK)
	{
		print_generation(&r, &err);
		fprintf(stderr, "kl: %d prompt tokens, %zu generated in %.3f s\n", r.n, r.out.n, t1 - t0);
	}
	else if (rc == KL_FAIL)
		fprintf(stderr, "kl: %s\n", err.msg);
	gen_run_free(&r);
	return rc == KL_OK ? 0 : 1;
}

/* ------------------------------------------------------------------ main */

int
main(int argc, char **argv)
{
	static const struct
	{
		const char *name;
		int			(*fn) (int, char **);
	}			cmds[] = {
		{"logits", cmd_logits},
		{"generate", cmd_generate},
		{"bench", cmd_bench},
		{"perplexity", cmd_perplexity},
		{"quantize", cmd_quantize},
		{"tokenize", cmd_tokenize},
		{"detokenize", cmd_detokenize},
		{"bench-tokenizer", cmd_bench_tokenizer},
		{"render", cmd_render},
		{"parse-reply", cmd_parse_reply},
		{"bench-constraint", cmd_bench_constraint},
	};

	if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)
	{
		usage();
		return argc < 2 ? 2 : 0;
	}
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (strcmp(argv[1], cmds[i].name) == 0)
			return cmds[i].fn(argc - 1, argv + 1);
	fprintf(stderr, "kl: unknown command \"%s\"\n", argv[1]);
	usage();
	return 2;
}
