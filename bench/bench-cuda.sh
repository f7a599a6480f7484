#!/usr/bin/env bash
# bench-cuda.sh — the CUDA backend on the GPU machine: build check, correctness
# tests, benchmarks (results: bench/results/cuda.md, notes: bench/notes-cuda.md).
#
# On the development machine (no GPU needed):
#   bash bench/bench-cuda.sh pack
#       builds kimi_linear_cuda.so and the GPU-machine programs (make cuda
#       cuda-device-bins) and packs them, libisal, the golden data and
#       flash-linear-attention's Python package (fetched source in $FLA_SRC,
#       never committed) into .gpu/pack/kl-gpu.tar.xz, which is ignored and
#       travels with the device tool's `carry`.
# On the GPU machine (repository root; carry .gpu/pack):
#   bash bench/bench-cuda.sh check          the library loads and finds the GPU
#   bash bench/bench-cuda.sh test           test_cuda.t (TAP), log in $OUT/test.log
#   bash bench/bench-cuda.sh ceilings       copy bandwidth, bf16 GEMM rate
#   bash bench/bench-cuda.sh kda T1,T2,..   our KDA op and fla's chunk_kda, H=32 K=128 (FLA=0: ours only)
#   bash bench/bench-cuda.sh moe [T1,T2,..]   the MoE op of a prefill step alone, 48B shape (default
#                                           1024,4096,8192): each KL_CUDA_MOE_PREFILL path (0, 0 loop, 3, 4)
#   bash bench/bench-cuda.sh mla T1,T2,..   our MLA prefill attention (flash kernel and cuBLAS path) and
#                                           PyTorch's cuDNN SDPA, 32 heads, q/k 192, v 128, causal (SDPA=0: ours only)
#   bash bench/bench-cuda.sh mla-decode [C1,..] [B1,..] [V1,..]
#                                           the MLA decode attention stage alone (attend + merge) at contexts C
#                                           and batches B through each KL_CUDA_MLA_MMA variant V (0 CUDA cores,
#                                           1 mma.sync, 2 wgmma), 48B head shapes, bf16 cache
#   bash bench/bench-cuda.sh model CONFIG [options of bench_cuda model]
#                                           (--quantize fp8|int8|int4: random weights made on the GPU in
#                                           that form; the RESULT kind=model line gives resident_GB)
#   bash bench/bench-cuda.sh layers N       write /tmp/kl/48b-N.json: the 48B config cut to N layers
#   bash bench/bench-cuda.sh ncu ARGS       per-kernel GPU times of `bench_cuda ARGS` (Nsight Compute)
#   bash bench/bench-cuda.sh gemv-sweep [VARIANT [SHAPE]]  decode GEMV variants against a plain read of the
#                                           same bytes on the model's shapes (bench/gemv_sweep.cu, built
#                                           here with the GPU machine's nvcc), one table
#   bash bench/bench-cuda.sh gemv-sweep dense_fp8  only the table "dense FP8 step batches" (gemv_q, dense
#                                           kernel =2, slab kernel =3 on a 48B step's FP8 batches, n 1..64)
#   bash bench/bench-cuda.sh persist-probe [ROUNDS]  a synthetic batch-1 layer chain (27 and 1 layers, the
#                                           48B shapes): kernel per op in a graph against one persistent
#                                           kernel with and without early weight loads (bench/persist_probe.cu;
#                                           PROBE_LAT_ITERS: the latency-bound op's length; PROBE_AHEAD_MB,
#                                           PROBE_HOP_MB: variants G and I's L2 prefetch; PROBE_SKIP=BCE:
#                                           variants not run), one table each;
#                                           runs bench/bin/persist_probe.xz if carried (made by
#                                           persist-probe-build), else builds it there first
#   bash bench/bench-cuda.sh persist-probe-build  (no GPU needed) build it for sm_90a into
#                                           bench/bin/persist_probe.xz (stripped, ~0.7 MB) to carry
#   bash bench/bench-cuda.sh ncu-step ARGS  per-kernel GPU times of NCU_STEPS (2) decode steps of
#                                           `bench_cuda model ARGS` (one ctx and batch), as RESULT lines
#   bash bench/bench-cuda.sh ncu-prefill ARGS  per-kernel GPU times of the timed prefill of
#                                           `bench_cuda model ARGS --decode-ctx none` (one length)
# Every command prints RESULT lines and appends them to $OUT/results.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu/pack/kl-gpu.tar.xz
K=/tmp/kl
OUT=${OUT:-/tmp/kl-out}
cmd=${1:-}
shift || true

unpack() {
	if [ ! -f $K/.unpacked ]; then
		mkdir -p $K
		tar xJf $PACK -C $K
		touch $K/.unpacked
	fi
	export LD_LIBRARY_PATH=$K/lib:${LD_LIBRARY_PATH:-}
	export KL_CUDA_LIB=$K/kimi_linear_cuda.so KL_FIXTURES=$K/fixtures KL_MODELS=$PWD/models KL_REQUIRE_GPU=1
	mkdir -p "$OUT"
	# a library built elsewhere may not load here: build it here then (nvcc is on the GPU machine)
	if ldd $KL_CUDA_LIB | grep -q "not found"; then
		echo "kimi_linear_cuda.so does not load here; building it on this machine" >&2
		ldd $KL_CUDA_LIB >&2
		build_here
	fi
}

# The CUDA section of the Makefile, without PGXS (no pg_config here).
build_here() {
	local nvcc=/usr/local/cuda/bin/nvcc cu=/usr/local/cuda objs=()
	local gen="-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=compute_80"
	mkdir -p $K/build
	for f in kernels/*.cu; do
		$nvcc -O3 -std=c++17 $gen -Xcompiler -fPIC,-fvisibility=hidden -c -o $K/build/$(basename $f).o $f &
		objs+=($K/build/$(basename $f).o)
	done
	for f in src/cuda/cuda_*.c; do
		gcc -O2 -std=gnu11 -fPIC -fvisibility=hidden -Isrc/engine -I$cu/include -c -o $K/build/$(basename $f).o $f &
		objs+=($K/build/$(basename $f).o)
	done
	wait
	$nvcc -shared $gen -o $KL_CUDA_LIB "${objs[@]}" -L$cu/lib64 -lcublas -Xlinker --exclude-libs,ALL \
		-Xlinker -rpath -Xlinker $cu/lib64
}

# KL_BENCH_TAG labels every RESULT line that has no tag= of its own (variants of one table)
log() {
	if [ -n "${KL_BENCH_TAG:-}" ]; then
		sed -u "/^RESULT .* tag=/!s/^RESULT kind=\([a-z_]*\)/RESULT kind=\1 tag=$KL_BENCH_TAG/" | tee -a "$OUT/results.log"
	else
		tee -a "$OUT/results.log"
	fi
}

case "$cmd" in
pack)
	FLA_SRC=${FLA_SRC:-/work/.mirror/fla-org+flash-linear-attention/repo}
	make cuda cuda-device-bins -j"$(nproc)"
	tmp=$(mktemp -d)
	mkdir -p $tmp/bin $tmp/lib $tmp/fixtures/golden $tmp/fla
	for b in test_cuda.t bench_cuda kl; do strip -o $tmp/bin/$b .gpu/bin/$b; done
	cp kimi_linear_cuda.so $tmp/
	cp -L /lib/x86_64-linux-gnu/libisal.so.2 $tmp/lib/
	cp -r test/fixtures/golden/tiny_a test/fixtures/golden/tiny_c $tmp/fixtures/golden/
	# fla: the Python package without its model and layer zoo (not needed for chunk_kda);
	# without its source here the pack goes without it (`kda` then needs FLA=0)
	if [ -d "$FLA_SRC" ]; then
		git -C "$FLA_SRC" archive HEAD fla | tar x -C $tmp/fla
		rm -rf $tmp/fla/fla/models $tmp/fla/fla/layers
	else
		echo "no flash-linear-attention source at $FLA_SRC: packed without it" >&2
	fi
	cp bench/configs/kimi-linear-48b-a3b.json $tmp/kimi-linear-48b-a3b.config.json
	mkdir -p .gpu/pack
	tar cJf $PACK -C $tmp .
	chmod -R u+w $tmp; rm -rf $tmp
	ls -la $PACK
	;;
check)
	unpack
	nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | log
	$K/bin/kl generate --model $KL_FIXTURES/golden/tiny_c --ids 1,2,3 --max-tokens 4 --device cuda 2>&1 | log || true
	;;
test)
	unpack
	set +e
	$K/bin/test_cuda.t 2>&1 | tee "$OUT/test.log"
	rc=${PIPESTATUS[0]}
	set -e
	echo "RESULT kind=test failed=$(grep -c '^not ok' "$OUT/test.log") passed=$(grep -c '^ok' "$OUT/test.log") rc=$rc" | log
	;;
ceilings)
	unpack
	$K/bin/bench_cuda ceilings 2>&1 | log
	;;
kda)
	unpack
	Ts=${1:-4096,32768,131072}
	$K/bin/bench_cuda kda 32 128 "$Ts" 2>&1 | log
	[ "${FLA:-1}" = 0 ] && exit 0
	# Triton compiles (and autotunes) fla's kernels on first use: bounded
	PYTHONUNBUFFERED=1 timeout ${FLA_TIMEOUT:-300} python3 bench/bench_cuda_fla.py $K/fla 32 128 "$Ts" 2>&1 |
		grep -v "^\s*$" | log || echo "RESULT kind=fla error=\"timed out or failed\"" | log
	;;
mla)
	unpack
	Ts=${1:-4096,32768}
	$K/bin/bench_cuda mla "$Ts" 2>&1 | log
	[ "${SDPA:-1}" = 0 ] && exit 0
	PYTHONUNBUFFERED=1 timeout ${SDPA_TIMEOUT:-300} python3 bench/bench_cuda_sdpa.py "$Ts" 2>&1 |
		grep -v "^\s*$" | log || echo "RESULT kind=sdpa error=\"timed out or failed\"" | log
	;;
mla-decode)
	unpack
	$K/bin/bench_cuda mla_decode "${1:-1024,4096,32768}" "${2:-1,8,32,64}" "${3:-0,1,2}" 2>&1 | log
	;;
ncu)
	# per-kernel GPU time of a bench_cuda run (Nsight Compute, clocks left alone)
	unpack
	ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
	timeout 300 "$ncu" --clock-control none --cache-control ${NCU_CACHE:-all} --metrics gpu__time_duration.sum --print-summary per-kernel \
		$K/bin/bench_cuda "$@" > "$OUT/ncu.log" 2>&1 || true
	grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum" "$OUT/ncu.log" | sed 's/^ *//' | cut -c1-150 | log
	;;
gemv-sweep)
	mkdir -p $K "$OUT"
	/usr/local/cuda/bin/nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o $K/gemv_sweep \
		bench/gemv_sweep.cu kernels/elementwise.cu
	$K/gemv_sweep "$@" | tee "$OUT/gemv-sweep.md"
	;;
persist-probe-build)
	# where it is built (here or on the GPU machine): the two translation units in parallel
	dir=${PROBE_BUILD_DIR:-bench/bin}
	mkdir -p $dir
	for f in bench/persist_probe.cu kernels/elementwise.cu; do
		/usr/local/cuda/bin/nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -c -o $dir/pp-$(basename $f).o $f &
	done
	wait
	/usr/local/cuda/bin/nvcc -gencode=arch=compute_90a,code=sm_90a -Xlinker -s -o $dir/persist_probe \
		$dir/pp-persist_probe.cu.o $dir/pp-elementwise.cu.o
	rm -f $dir/pp-persist_probe.cu.o $dir/pp-elementwise.cu.o
	[ -n "${PROBE_BUILD_DIR:-}" ] || xz -9 -f $dir/persist_probe
	;;
persist-probe)
	mkdir -p $K "$OUT"
	if [ -f bench/bin/persist_probe.xz ]; then
		xz -dc bench/bin/persist_probe.xz > $K/persist_probe
		chmod +x $K/persist_probe
	else
		# no carried binary: build it here (~40 s)
		PROBE_BUILD_DIR=$K bash "$0" persist-probe-build
	fi
	timeout ${PROBE_TIMEOUT:-45} $K/persist_probe "$@" | tee "$OUT/persist-probe.md" | log
	;;
ncu-step)
	unpack
	ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
	KL_BENCH_NCU_STEPS=${NCU_STEPS:-2} timeout ${NCU_TIMEOUT:-300} "$ncu" --profile-from-start off --clock-control none \
		--cache-control none --metrics gpu__time_duration.sum --csv --print-units base \
		$K/bin/bench_cuda model "$@" > "$OUT/ncu-step.csv" 2> "$OUT/ncu-step.err" || true
	grep "^RESULT" "$OUT/ncu-step.csv" | log || true
	python3 bench/ncu-kernels.py "$OUT/ncu-step.csv" ${NCU_STEPS:-2} | log
	;;
moe)
	unpack
	$K/bin/bench_cuda moe "${1:-1024,4096,8192}" $K/kimi-linear-48b-a3b.config.json 2>&1 | log
	;;
ncu-prefill)
	# per-kernel GPU times of the timed prefills of `bench_cuda model ARGS` (use --decode-ctx none)
	unpack
	ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
	KL_BENCH_NCU_PREFILL=1 timeout ${NCU_TIMEOUT:-300} "$ncu" --profile-from-start off --clock-control none \
		--cache-control none --metrics gpu__time_duration.sum --csv --print-units base \
		$K/bin/bench_cuda model "$@" > "$OUT/ncu-prefill.csv" 2> "$OUT/ncu-prefill.err" || true
	grep "^RESULT" "$OUT/ncu-prefill.csv" | log || true
	python3 bench/ncu-kernels.py "$OUT/ncu-prefill.csv" 1 | sed 's/kind=kernel/kind=prefill_kernel/' | log
	;;
layers)
	unpack
	n=$1
	python3 - "$n" <<'PY'
import json, sys
n = int(sys.argv[1])
c = json.load(open('/tmp/kl/kimi-linear-48b-a3b.config.json'))
c['num_hidden_layers'] = n
lac = c['linear_attn_config']
lac['kda_layers'] = [i for i in lac['kda_layers'] if i <= n]
lac['full_attn_layers'] = [i for i in lac['full_attn_layers'] if i <= n]
json.dump(c, open(f'/tmp/kl/48b-{n}.json', 'w'), indent=1)
print(f'/tmp/kl/48b-{n}.json: {n} layers, {len(lac["kda_layers"])} KDA, {len(lac["full_attn_layers"])} MLA')
PY
	;;
model)
	unpack
	config=$1
	shift
	$K/bin/bench_cuda model "$config" "$@" 2>&1 | log
	;;
*)
	sed -n '2,37p' "$0"
	exit 2
	;;
esac
