#!/usr/bin/env bash
# test/fuzz/make-seeds.sh — (re)write the fuzzers' committed seed corpora,
# test/fuzz/seeds/NAME/, from the test fixtures with the ./kl CLI.  Small
# valid inputs of each format are what mutation needs to get past the first
# checks; the seeds are committed so that a fuzz run needs nothing else.
#
#   bash test/fuzz/make-seeds.sh        (after make cli)
set -euo pipefail
cd "$(dirname "$0")/../.."
S=test/fuzz/seeds
G=test/fixtures/golden
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
make -s cli >/dev/null
rm -rf "$S"
mkdir -p "$S"/fuzz_config "$S"/fuzz_safetensors "$S"/fuzz_state "$S"/fuzz_tokenizer "$S"/fuzz_json_schema \
  "$S"/fuzz_tool_calls "$S"/fuzz_protocol

# config.json: both golden models, the bundled model, the benchmark shapes
cp $G/tiny_a/config.json "$S"/fuzz_config/tiny_a.json
cp $G/tiny_c/config.json "$S"/fuzz_config/tiny_c.json
cp models/pgdocs-kimi-18m/config.json "$S"/fuzz_config/pgdocs-kimi-18m.json
for f in bench/configs/*.json; do cp "$f" "$S/fuzz_config/$(basename "$f")"; done

# safetensors: small whole files the CLI writes (logits of a few tokens; one
# and several tensors), and the golden checkpoints' headers alone (the parser
# must refuse their offsets past the end)
./kl logits --model $G/tiny_a --ids 1,2 --out "$S"/fuzz_safetensors/logits_tiny_a.safetensors >/dev/null
./kl logits --model $G/tiny_c --ids 5,6,7 --split 1 --out "$S"/fuzz_safetensors/logits_tiny_c.safetensors >/dev/null
header_only() {	# u64 little-endian header length, then the header
  local n
  n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
  head -c $((8 + n)) "$1" >"$2"
}
header_only $G/tiny_a/model.safetensors "$S"/fuzz_safetensors/tiny_a_header.safetensors
header_only $G/tiny_c/golden.safetensors "$S"/fuzz_safetensors/tiny_c_golden_header.safetensors

# states of the golden tiny_a model (the one fuzz_state loads): empty, after a
# prompt, after a generation (with a pending token)
./kl generate --model $G/tiny_a --ids 1 --max-tokens 0 --state-out "$S"/fuzz_state/one_token.kls >/dev/null
./kl generate --model $G/tiny_a --ids 1,2,3,4,5,6,7,8 --max-tokens 3 --state-out "$S"/fuzz_state/generated.kls >/dev/null
./kl generate --model $G/tiny_a --state-in "$S"/fuzz_state/generated.kls --ids 9,10 --max-tokens 2 \
  --state-out "$S"/fuzz_state/resumed.kls >/dev/null

# tokenizer: text of several scripts, special tokens, a chat render, numbers,
# white space runs, invalid UTF-8
printf 'The VACUUM command reclaims storage occupied by dead tuples.\n' >"$S"/fuzz_tokenizer/english.txt
printf 'SELECT kimi_linear.generate($$x$$, max_tokens => 64);\n\n\t  -- 12345 6.02e23\r\n' >"$S"/fuzz_tokenizer/sql.txt
printf '数据库管理系统 PostgreSQL は、オープンソースです。 Ünïcödé façade naïve ΑΒΓ\n' >"$S"/fuzz_tokenizer/scripts.txt
printf '<|im_system|>system<|im_middle|>You are helpful.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>' \
  >"$S"/fuzz_tokenizer/chat.txt
printf "it's they're we've I'm you'll he'd DON'T\n" >"$S"/fuzz_tokenizer/contractions.txt
printf 'ok \xff\xfe broken \xc3 utf-8 \xe2\x82\n' >"$S"/fuzz_tokenizer/invalid_utf8.bin
{ xz -dc test/fixtures/corpus/pgdocs.json.xz || true; } | head -c 2048 >"$S"/fuzz_tokenizer/manual.txt

# JSON schemas (then a NUL and bytes to feed through the automaton)
printf '{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}\0{"name": "x", "age": 42}' \
  >"$S"/fuzz_json_schema/object.bin
printf '{"type": "array", "items": {"enum": ["a", "b", 1, null, true]}}\0["a", 1, null]' >"$S"/fuzz_json_schema/enum.bin
printf '{"type": ["number", "boolean", "null"]}\0-1.5e+3' >"$S"/fuzz_json_schema/union.bin

# model replies with tool calls (the golden parsing cases' texts) and conversations
# (messages JSON, a NUL, tool declarations JSON: the golden renders)
python3 - "$S"/fuzz_tool_calls <<'PY'
import json, sys
d = json.load(open("test/fixtures/golden/chat/kimi_chat.json"))
for i, c in enumerate(d["tool_call_parsing"]):
    open(f"{sys.argv[1]}/reply_{i}.txt", "w").write(c["text"])
for i, r in enumerate(d["renders"]):
    open(f"{sys.argv[1]}/render_{i}.bin", "wb").write(
        json.dumps(r["messages"]).encode() + b"\0" + json.dumps(r.get("tools") or []).encode())
PY

# requests as a backend lays them out (the encoder in src/pg/pg_protocol.c): a
# prompt; stop ids, stop strings and an output constraint; a conversation's
# turn with two state parts
cc -std=gnu11 -Isrc/engine -Isrc/pg -o "$TMP"/protocol_seeds test/fuzz/protocol_seeds.c src/pg/pg_protocol.c
"$TMP"/protocol_seeds "$S"/fuzz_protocol

du -sh "$S"/*
