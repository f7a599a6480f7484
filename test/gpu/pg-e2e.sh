#!/usr/bin/env bash
# pg-e2e.sh — the extension end to end on the GPU machine: PostgreSQL started by
# test/gpu/pg-on-device.sh with kimi_linear preloaded, the bundled model
# loaded three times (kimi_linear.device = cpu; = cuda with precision fp32; cuda with the default precision, auto = bf16), and quantized at
# load to FP8 on each device (precision fp32 on cuda; and precision fp8 on cuda), then generate, say and
# state hand-over between the devices, each checked; prints "N passed, N failed".
#
# On the development machine (see bench/results/cuda.md for the last run):
#   EXTRA_DEBS=libisal2 bash test/gpu/make-pg-runtime.sh .gpu/pg-runtime.tar.xz
#   make && make install DESTDIR=$PWD/.gpu/stage && rm -rf .gpu/stage/usr/share/postgresql/15/kimi_linear/models
# On the GPU machine, from the repository root (carry .gpu/pg-runtime.tar.xz and .gpu/stage):
#   bash test/gpu/pg-e2e.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
share=.gpu/stage/usr/share/postgresql/15/kimi_linear/models
mkdir -p $share && cp -r models/pgdocs-kimi-18m $share/
PG_CONF="shared_preload_libraries='kimi_linear'" bash test/gpu/pg-on-device.sh .gpu/pg-runtime.tar.xz .gpu/stage || exit 1
. /tmp/pgenv
pass=0 fail=0
q() { psql -X -qAt -v ON_ERROR_STOP=1 -c "$1" 2>&1; }
check() {	# check WHAT GOT WANT
	if [ "$2" = "$3" ]; then pass=$((pass + 1)); echo "ok - $1"
	else fail=$((fail + 1)); echo "not ok - $1: got [$2] want [$3]"; fi
}
q "CREATE EXTENSION kimi_linear" >/dev/null
q "SET kimi_linear.device = 'cpu'; SELECT kimi_linear.load_model('cpu', 'pgdocs-kimi-18m')" >/dev/null
out=$(q "SET kimi_linear.device = 'cuda'; SELECT kimi_linear.load_model('gpu', 'pgdocs-kimi-18m', matmul_precision => 'fp32')")
check "load_model on cuda, precision fp32" "$out" ""
q "SELECT name, device, matmul_precision, status, pg_size_pretty(bytes) FROM kimi_linear.models ORDER BY name"
check "the models view says cuda fp32" "$(q "SELECT device || ' ' || matmul_precision FROM kimi_linear.models WHERE name = 'gpu'")" "cuda fp32"
for p in 'The VACUUM command' 'CREATE INDEX builds' 'To restore a dump, run'; do
	c=$(q "SELECT kimi_linear.generate_tokens('$p', max_tokens => 48, model => 'cpu', ignore_eos => true)")
	g=$(q "SELECT kimi_linear.generate_tokens('$p', max_tokens => 48, model => 'gpu', ignore_eos => true)")
	check "generate '$p': 48 greedy ids on cuda = on cpu" "$g" "$c"
done
# kimi_linear.precision auto (the default) on cuda is bf16: tensor-core products; the golden bar is 8 greedy ids
# identical
q "SET kimi_linear.device = 'cuda'; SELECT kimi_linear.load_model('gpu16', 'pgdocs-kimi-18m')" >/dev/null
check "kimi_linear.precision auto (the default) on cuda: the models view says cuda bf16" \
	"$(q "SELECT device || ' ' || matmul_precision FROM kimi_linear.models WHERE name = 'gpu16'")" "cuda bf16"
for p in 'The VACUUM command' 'CREATE INDEX builds' 'To restore a dump, run'; do
	c=$(q "SELECT kimi_linear.generate_tokens('$p', max_tokens => 8, model => 'cpu', ignore_eos => true)")
	g=$(q "SELECT kimi_linear.generate_tokens('$p', max_tokens => 8, model => 'gpu16', ignore_eos => true)")
	check "generate '$p' with bf16 products on cuda: 8 greedy ids = on cpu" "$g" "$c"
done
echo "--- generate on the GPU:"
q "SELECT kimi_linear.generate('The VACUUM command', max_tokens => 40, model => 'gpu')"
# a conversation on each device: three turns, replies identical
for dev in cpu gpu; do
	cid=$(q "SELECT kimi_linear.new_conversation(model => '$dev', system => 'You are a helpful PostgreSQL expert.')")
	r=""
	for m in 'What does VACUUM do?' 'And ANALYZE?' 'Thanks. What about REINDEX?'; do
		r="$r|$(q "SELECT kimi_linear.say($cid, '$m', max_tokens => 32)")"
	done
	eval "replies_$dev=\$r"
	eval "cid_$dev=$cid"
done
echo "--- say on the GPU:"; echo "$replies_gpu" | tr '|' '\n'
check "say: three turns on cuda = on cpu" "$replies_gpu" "$replies_cpu"
check "say: turns stored" "$(q "SELECT turns FROM kimi_linear.conversations WHERE id = $cid_gpu")" "3"
# state hand-over: a state made on the GPU continued on the CPU and the other way
s1=$(q "SELECT encode(new_state, 'hex') FROM kimi_linear.generate_with_state(NULL, 'The VACUUM command', max_tokens => 16, model => 'gpu')")
a=$(q "SELECT reply FROM kimi_linear.generate_with_state(decode('$s1', 'hex'), ' Also,', max_tokens => 24, model => 'cpu')")
b=$(q "SELECT reply FROM kimi_linear.generate_with_state(decode('$s1', 'hex'), ' Also,', max_tokens => 24, model => 'gpu')")
check "a state saved on cuda continues on cpu as on cuda" "$a" "$b"
s2=$(q "SELECT encode(new_state, 'hex') FROM kimi_linear.generate_with_state(NULL, 'The VACUUM command', max_tokens => 16, model => 'cpu')")
a=$(q "SELECT reply FROM kimi_linear.generate_with_state(decode('$s2', 'hex'), ' Also,', max_tokens => 24, model => 'gpu')")
b=$(q "SELECT reply FROM kimi_linear.generate_with_state(decode('$s2', 'hex'), ' Also,', max_tokens => 24, model => 'cpu')")
check "a state saved on cpu continues on cuda as on cpu" "$a" "$b"
# a rolled-back say on the GPU leaves the conversation unchanged
before=$(q "SELECT md5(state) FROM kimi_linear.conversations WHERE id = $cid_gpu")
q "BEGIN; SELECT kimi_linear.say($cid_gpu, 'Roll me back', max_tokens => 8); ROLLBACK" >/dev/null
check "rolled-back say on cuda" "$(q "SELECT md5(state) FROM kimi_linear.conversations WHERE id = $cid_gpu")" "$before"
# quantized at load: the GPU keeps the FP8 weights as they are (no "dequantized" in weight_format, the CPU's
# bytes) and its greedy ids equal the CPU's FP8 model's
q "SET kimi_linear.device = 'cpu'; SELECT kimi_linear.load_model('cpu8', 'pgdocs-kimi-18m', quantize => 'fp8')" >/dev/null
out=$(q "SET kimi_linear.device = 'cuda'; SELECT kimi_linear.load_model('gpu8', 'pgdocs-kimi-18m', quantize => 'fp8', matmul_precision => 'fp32')")
check "load_model quantize => fp8 on cuda" "$out" ""
check "fp8 on cuda: kept in FP8, the CPU's weight bytes" \
	"$(q "SELECT g.weight_format LIKE 'fp8%' AND g.weight_format NOT LIKE '%dequantized%' AND g.weight_bytes = c.weight_bytes FROM kimi_linear.models g, kimi_linear.models c WHERE g.name = 'gpu8' AND c.name = 'cpu8'")" "t"
for p in 'The VACUUM command' 'To restore a dump, run'; do
	c=$(q "SELECT kimi_linear.generate_tokens('$p', max_tokens => 48, model => 'cpu8', ignore_eos => true)")
	g=$(q "SELECT kimi_linear.generate_tokens('$p', max_tokens => 48, model => 'gpu8', ignore_eos => true)")
	check "generate '$p' with FP8 weights: 48 greedy ids on cuda = on cpu" "$g" "$c"
done
# precision fp8 (FP8 activations in the prefill products of FP8 weights) through SQL: loaded as asked, the models
# view says so, generation runs; its numbers are test_cuda's (a lossy mode: no comparison with the CPU's ids); a
# model without FP8 weights is refused in it
out=$(q "SET kimi_linear.device = 'cuda'; SELECT kimi_linear.load_model('gpu8a', 'pgdocs-kimi-18m', quantize => 'fp8', matmul_precision => 'fp8')")
check "load_model quantize => fp8, matmul_precision => fp8 on cuda" "$out" ""
check "the models view says cuda fp8" "$(q "SELECT device || ' ' || matmul_precision FROM kimi_linear.models WHERE name = 'gpu8a'")" "cuda fp8"
check "generate with FP8 activations: 48 tokens" \
	"$(q "SELECT cardinality(kimi_linear.generate_tokens('The VACUUM command', max_tokens => 48, model => 'gpu8a', ignore_eos => true))")" "48"
check "matmul_precision => fp8 without FP8 weights is refused" \
	"$(q "SET kimi_linear.device = 'cuda'; SELECT kimi_linear.load_model('gpu8b', 'pgdocs-kimi-18m', matmul_precision => 'fp8')" | grep -c 'needs FP8 weights')" "1"
q "SELECT count(*) FROM kimi_linear.workers" >/dev/null && check "server up" "$(q 'SELECT 1')" "1"
grep -iE "error|fatal|panic" /tmp/pg.log | head -5
echo "$pass passed, $fail failed"
[ $fail = 0 ]
