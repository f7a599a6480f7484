/*
 * protocol_seeds.c — writes fuzz_protocol's seeds: request segments made by
 * the backend's own encoder (src/pg/pg_protocol.c), each up to its reply
 * queue (see fuzz_protocol.c).  test/fuzz/make-seeds.sh builds and runs it:
 *
 *     protocol_seeds DIR
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg_protocol.h"

static void
write_seed(const char *dir, const char *name, const KlReqSpec *spec, const char *const *parts, int n_parts)
{
	KlReqLayout l;
	uint64_t	bytes = 0,
				at;
	char	   *seg;
	char		path[1024];
	FILE	   *f;

	for (int i = 0; i < n_parts; i++)
		bytes += strlen(parts[i]);
	kl_request_layout(spec, bytes, n_parts, &l);
	seg = calloc(1, l.total);
	if (!seg)
		exit(1);
	kl_request_encode(seg, spec, n_parts, &l);
	((KlRequest *) seg)->request_id = 7;
	at = l.parts_off;
	for (int i = 0; i < n_parts; i++)
		if ((at = kl_request_put_part(seg, at, l.data_end, parts[i], strlen(parts[i]))) == 0)
			exit(1);
	snprintf(path, sizeof(path), "%s/%s.req", dir, name);
	f = fopen(path, "wb");
	if (!f || fwrite(seg, 1, l.mq_off, f) != l.mq_off || fclose(f) != 0)
	{
		fprintf(stderr, "protocol_seeds: cannot write %s\n", path);
		exit(1);
	}
	free(seg);
}

int
main(int argc, char **argv)
{
	int32_t		prompt[] = {3840, 464, 16012, 2775, 3290};
	int32_t		stop_ids[] = {3841, 3842};
	char	   *stops[] = {"\n\n", "END", "</answer>"};
	const char *grammar = "{\"json_schema\": {\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}}}";
	const char *parts[] = {"KLSTATE: a rows page, in short", "KLSTATE: and a head"};
	KlReqSpec	spec = {0};

	if (argc != 2)
	{
		fprintf(stderr, "usage: protocol_seeds DIR\n");
		return 2;
	}
	spec.model = "pgdocs-kimi-18m";
	spec.model_generation = 1;
	spec.flags = KL_REQ_WANT_TEXT | KL_REQ_SKIP_STOP_TEXT;
	spec.temperature = 0.7f;
	spec.top_p = 0.9f;
	spec.repetition_penalty = 1.0f;
	spec.seed = 1234;
	spec.max_tokens = 64;
	spec.max_context = 131072;
	spec.prompt = prompt;
	spec.n_prompt = 5;
	write_seed(argv[1], "prompt", &spec, NULL, 0);

	spec.stop_ids = stop_ids;
	spec.n_stop_ids = 2;
	spec.stop_strings = stops;
	spec.n_stop_strings = 3;
	spec.grammar = grammar;
	spec.grammar_len = strlen(grammar);
	write_seed(argv[1], "stops_and_constraint", &spec, NULL, 0);

	/* a conversation's turn: paging, the cache key, two state parts */
	spec.flags |= KL_REQ_WANT_STATE | KL_REQ_STREAM;
	spec.n_stop_strings = 0;
	spec.grammar = NULL;
	spec.grammar_len = 0;
	spec.page_size = 1024;
	spec.pages_upto = 1024;
	spec.cache_key = 99;
	spec.reply_hint = 4096;
	write_seed(argv[1], "conversation_turn", &spec, parts, 2);
	return 0;
}
