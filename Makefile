# kimi_linear — PostgreSQL extension + inference engine.
#
#   make               the extension (kimi_linear.so), and the CUDA backend where nvcc exists
#   make install       install the extension into the PostgreSQL found by pg_config
#   make cli           the command-line tool ./kl (engine only, no PostgreSQL needed at run time)
#   make check-engine  the engine's C unit tests (TAP, run by prove); TESTS=test_golden for one
#   make test          everything: engine tests, then pg_regress + pgTAP against a throwaway cluster
#   make test-regress REGRESS=basic, make test-tap PROVE_TESTS=test/pg/t01_generate.sql:
#                      one pg_regress test / pgTAP file on the throwaway cluster
#   make check-engine-asan, check-engine-tsan, fuzz, fuzz-run: sanitizers and fuzzers (CI)
#   see the README, "Developing"
#
# The engine (src/engine) is plain C11; the PostgreSQL glue (src/pg) is built with PGXS.

EXTENSION   = kimi_linear
EXTVERSION  = $(shell grep default_version $(EXTENSION).control | sed -e "s/default_version[[:space:]]*=[[:space:]]*'\([^']*\)'/\1/")
MODULE_big  = kimi_linear

ENGINE_SRCS := $(sort $(wildcard src/engine/*.c))
PG_SRCS     := $(sort $(wildcard src/pg/*.c))
ENGINE_OBJS := $(ENGINE_SRCS:.c=.o)
OBJS         = $(ENGINE_OBJS) $(PG_SRCS:.c=.o)

DATA        = $(wildcard sql/$(EXTENSION)--*.sql)
REGRESS     = $(patsubst sql/%.sql,%,$(filter-out sql/$(EXTENSION)--%,$(sort $(wildcard sql/*.sql))))
REGRESS_OPTS = --inputdir=. --load-extension=$(EXTENSION)

OPENBLAS_INC ?= /usr/include/x86_64-linux-gnu/openblas-pthread
ENGINE_LIBS  = -lopenblas -lpcre2-8 -ljansson -lisal -lcrypto -lpthread -ldl -lm

# Our own sources compile with -Wall -Wextra -Werror (on top of PGXS's warning
# flags).  `make WERROR=` keeps the warnings but lets a build go on, for a
# compiler newer than the ones CI uses.
WERROR     ?= -Werror
KL_WARN     = -Wall -Wextra $(WERROR)

# -O3 for the numeric code; SIMD paths are selected at run time (target attributes), so no -march.
# (C99 declarations are our style, hence -Wno-declaration-after-statement.)
PG_CFLAGS   = -O3 -std=gnu11 $(KL_WARN) -Wno-declaration-after-statement -MMD -MP
PG_CPPFLAGS = -Isrc/engine -I$(OPENBLAS_INC)
SHLIB_LINK  = $(ENGINE_LIBS)

# The engine has nothing to gain from LLVM bitcode for JIT inlining, and Debian's
# clang may be absent.
override with_llvm := no

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# The one exception to -Wextra, for the PostgreSQL glue only: PostgreSQL's own
# headers (lib/ilist.h, storage/bufpage.h: static inline functions) have unused
# parameters, and so do the callbacks whose signatures PostgreSQL prescribes
# (GUC check hooks, on_shmem_exit); PostgreSQL itself builds without -Wextra.
src/pg/%.o: override CFLAGS += -Wno-unused-parameter

# ---------------------------------------------------------------- CLI and unit tests
CLI_SRCS := $(sort $(wildcard src/cli/*.c))

cli: kl
kl: $(CLI_SRCS:.c=.o) $(ENGINE_OBJS)
	$(CC) $(CFLAGS) -o $@ $^ $(ENGINE_LIBS)

src/cli/%.o: src/cli/%.c
	$(CC) $(CFLAGS) $(PG_CFLAGS) $(PG_CPPFLAGS) -c -o $@ $<

ENGINE_TEST_SRCS := $(sort $(wildcard test/engine/test_*.c))
ENGINE_TEST_BINS := $(patsubst test/engine/%.c,test/engine/bin/%.t,$(ENGINE_TEST_SRCS))

test/engine/bin/%.t: test/engine/%.c test/engine/tap.h $(ENGINE_OBJS)
	@mkdir -p test/engine/bin
	$(CC) $(CFLAGS) $(PG_CFLAGS) $(PG_CPPFLAGS) -Itest/engine -o $@ $< $(ENGINE_OBJS) $(ENGINE_LIBS)

engine-tests: $(ENGINE_TEST_BINS)

# The tests' data live in test/fixtures; the manual corpus is kept xz-compressed
# and decompressed here (xz-utils).
CORPUS = test/fixtures/corpus/pgdocs.json
corpus: $(CORPUS)
$(CORPUS): $(CORPUS).xz
	xz -dc $< >$@.tmp && mv $@.tmp $@

# TESTS="test_golden test_tokenizer": only those (here and in the sanitizer checks)
TESTS ?=
ENGINE_TESTS_RUN = $(if $(TESTS),$(patsubst %,test/engine/bin/%.t,$(TESTS)),$(ENGINE_TEST_BINS))
check-engine: $(ENGINE_TESTS_RUN) cli corpus
	prove --exec '' $(ENGINE_TESTS_RUN)

test: all cli engine-tests
	bash test/run-tests.sh

# One part of `make test` on its throwaway cluster (test/run-tests.sh):
#   make test-regress [REGRESS="basic state"]   pg_regress (sql/NAME.sql, expected/NAME.out)
#   make test-tap [PROVE_TESTS=test/pg/t05_conversation.sql]   pgTAP files
#   make test-concurrency                        the multi-session tests
#   make test-shell [SHELL_TESTS="dump_restore restart"]   the shell tests (test/pg/*.sh)
# KL_KEEP_CLUSTER=1 leaves the cluster running, for `make installcheck REGRESS=...`.
PROVE_TESTS ?= $(sort $(wildcard test/pg/t*.sql))
test-regress: all cli
	KL_SKIP_ENGINE=1 KL_SKIP_TAP=1 KL_SHELL_TESTS= KL_REGRESS="$(REGRESS)" bash test/run-tests.sh
test-tap: all cli
	KL_SKIP_ENGINE=1 KL_SKIP_REGRESS=1 KL_SHELL_TESTS= KL_TAP_FILES="$(PROVE_TESTS)" bash test/run-tests.sh
test-concurrency: all cli
	KL_SKIP_ENGINE=1 KL_SKIP_REGRESS=1 KL_SKIP_TAP=1 KL_SHELL_TESTS=concurrency bash test/run-tests.sh
SHELL_TESTS ?= concurrency dump_restore dump state_cache standby restart
test-shell: all cli
	KL_SKIP_ENGINE=1 KL_SKIP_REGRESS=1 KL_SKIP_TAP=1 KL_SHELL_TESTS="$(SHELL_TESTS)" bash test/run-tests.sh

# ---------------------------------------------------------------- sanitizer builds
# The engine and its tests built again into build/asan/ (AddressSanitizer +
# UndefinedBehaviorSanitizer) and build/tsan/ (ThreadSanitizer), beside the
# optimized build, and run under prove.  Any report fails the test program.
#   make check-engine-asan     every engine test
#   make check-engine-tsan     the tests that run threads: the thread-pool stress
#                              test and the golden tests (batch invariance, chunked
#                              prefill: every op through the pool)
SAN_CFLAGS   = -O1 -g -fno-omit-frame-pointer -std=gnu11 -D_GNU_SOURCE $(KL_WARN) -Wno-declaration-after-statement \
               -MMD -MP $(PG_CPPFLAGS)
SAN_asan     = -fsanitize=address,undefined -fno-sanitize-recover=all
SAN_tsan     = -fsanitize=thread
TSAN_TESTS   = test_threadpool test_golden
ASAN_TEST_BINS = $(patsubst test/engine/bin/%,build/asan/test/%,$(ENGINE_TESTS_RUN))
TSAN_TEST_BINS = $(patsubst %,build/tsan/test/%.t,$(if $(TESTS),$(filter $(TESTS),$(TSAN_TESTS)),$(TSAN_TESTS)))
# halt at the first report; leaks count (the engine lives inside long-running
# server processes); OpenBLAS's own threads off (it is not instrumented, and
# the engine calls it single-threaded anyway)
SAN_ENV      = ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
               UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
               TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 OPENBLAS_NUM_THREADS=1

define SAN_VARIANT
$(1)_ENGINE_OBJS := $$(patsubst src/engine/%.c,build/$(1)/engine/%.o,$$(ENGINE_SRCS))
build/$(1)/engine/%.o: src/engine/%.c
	@mkdir -p $$(@D)
	$$(CC) $$(SAN_CFLAGS) $$(SAN_$(1)) -c -o $$@ $$<
build/$(1)/test/%.t: test/engine/%.c test/engine/tap.h $$($(1)_ENGINE_OBJS)
	@mkdir -p $$(@D)
	$$(CC) $$(SAN_CFLAGS) $$(SAN_$(1)) -Itest/engine -o $$@ $$< $$($(1)_ENGINE_OBJS) $$(ENGINE_LIBS)
endef
$(eval $(call SAN_VARIANT,asan))
$(eval $(call SAN_VARIANT,tsan))

check-engine-asan: $(ASAN_TEST_BINS) cli corpus
	$(SAN_ENV) prove --exec '' $(ASAN_TEST_BINS)
check-engine-tsan: $(TSAN_TEST_BINS) cli corpus
	$(SAN_ENV) prove --exec '' $(TSAN_TEST_BINS)

# ---------------------------------------------------------------- fuzzing
# libFuzzer harnesses for every parser (clang; see test/fuzz/README.md), with
# ASan + UBSan.  The engine is compiled once into build/fuzz/engine/.
#   make fuzz                      build test/fuzz/bin/*
#   make fuzz-run FUZZ_SECONDS=60  each harness for that long over its committed
#                                  seeds (test/fuzz/seeds/NAME); new inputs go to
#                                  build/fuzz/corpus/NAME, crashes to build/fuzz/crashes/
FUZZ_CC ?= clang-14
FUZZ_FLAGS = -g -O1 -std=gnu11 -D_GNU_SOURCE $(KL_WARN) -Wno-declaration-after-statement \
             -fsanitize=fuzzer-no-link,address,undefined -Isrc/engine -I$(OPENBLAS_INC)
FUZZ_NAMES = fuzz_safetensors fuzz_config fuzz_state fuzz_state_crc fuzz_tokenizer fuzz_json_schema fuzz_tool_calls \
             fuzz_protocol
FUZZ_BINS = $(addprefix test/fuzz/bin/,$(FUZZ_NAMES))
FUZZ_ENGINE_OBJS = $(patsubst src/engine/%.c,build/fuzz/engine/%.o,$(ENGINE_SRCS))
FUZZ_SECONDS ?= 60
fuzz: $(FUZZ_BINS)
build/fuzz/engine/%.o: src/engine/%.c
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_FLAGS) -MMD -MP -c -o $@ $<
# the request protocol's decoder: pg_protocol.c alone (no PostgreSQL, no engine code)
test/fuzz/bin/fuzz_protocol: test/fuzz/fuzz_protocol.c src/pg/pg_protocol.c src/pg/pg_protocol.h
	@mkdir -p test/fuzz/bin
	$(FUZZ_CC) $(FUZZ_FLAGS) -Isrc/pg -fsanitize=fuzzer -o $@ test/fuzz/fuzz_protocol.c src/pg/pg_protocol.c
test/fuzz/bin/fuzz_state_crc: test/fuzz/fuzz_state.c $(FUZZ_ENGINE_OBJS)
	@mkdir -p test/fuzz/bin
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer -DFIX_CRC -o $@ $< $(FUZZ_ENGINE_OBJS) $(ENGINE_LIBS)
test/fuzz/bin/%: test/fuzz/%.c $(FUZZ_ENGINE_OBJS)
	@mkdir -p test/fuzz/bin
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_ENGINE_OBJS) $(ENGINE_LIBS)
fuzz-run: fuzz corpus
	bash test/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_NAMES)

bench: cli
	bash bench/run-bench.sh

# bench/engine-batch.c (bench-sql.sh's engine-alone column)
bench-bins: bench/bin/engine-batch
bench/bin/engine-batch: bench/engine-batch.c $(ENGINE_OBJS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(PG_CPPFLAGS) -o $@ $< $(ENGINE_OBJS) $(ENGINE_LIBS)

# the README's pictures (docs/img/*.png) from bench/results/*.md (python3-matplotlib)
plots:
	/usr/bin/python3 bench/plots.py

# The bundled model: installed where kimi_linear.model_dir points by default.
MODEL_DIR_INSTALL = $(DESTDIR)$(datadir)/kimi_linear/models
install: install-models
install-models:
	$(MKDIR_P) '$(MODEL_DIR_INSTALL)/pgdocs-kimi-18m'
	$(INSTALL_DATA) models/pgdocs-kimi-18m/* '$(MODEL_DIR_INSTALL)/pgdocs-kimi-18m/'

# Our build outputs.  PGXS's clean tests EXTRA_CLEAN where it is included,
# before this point, so our own clean-local removes them.
EXTRA_CLEAN = kl build bench/bin test/engine/bin test/fuzz/bin src/cli/*.o src/*/*.d $(CORPUS)
clean: clean-local
clean-local:
	rm -rf $(EXTRA_CLEAN)

-include $(wildcard src/*/*.d build/*/engine/*.d)

.PHONY: fuzz fuzz-run cli corpus engine-tests check-engine check-engine-asan check-engine-tsan test bench install-models \
        test-regress test-tap test-concurrency test-shell bench-bins plots clean-local

# ================================================================ CUDA backend (kimi_linear_cuda.so)
# Built by `make` where nvcc exists (CUDA 13), skipped silently otherwise;
# `make install` puts it next to kimi_linear.so, where the engine's loader
# (src/engine/backend_cuda_loader.c) looks for it.  The engine itself never
# links CUDA.  Kernels: kernels/*.cu; host code: src/cuda/*.c (plain C).
NVCC         ?= $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
CUDA_HOME    ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA_LIB     := kimi_linear_cuda.so
# Hopper (sm_90a: wgmma etc.; sm_90), and PTX for any GPU from Ampere on
CUDA_GENCODE ?= -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=sm_90 \
                -gencode=arch=compute_80,code=compute_80
CUDA_KERNEL_SRCS := $(sort $(wildcard kernels/*.cu))
CUDA_HOST_SRCS   := $(filter-out src/cuda/device_blas_shim.c,$(sort $(wildcard src/cuda/*.c)))
CUDA_OBJS        := $(CUDA_KERNEL_SRCS:.cu=.o) $(CUDA_HOST_SRCS:.c=.o)
CUDA_CFLAGS  = -O2 -std=gnu11 $(KL_WARN) -Wno-declaration-after-statement -fPIC -fvisibility=hidden -MMD -MP \
               -Isrc/engine -I$(OPENBLAS_INC) -I$(CUDA_HOME)/include
NVCC_FLAGS   = -O3 -std=c++17 $(CUDA_GENCODE) -Xcompiler -fPIC,-fvisibility=hidden
# cudart linked statically and kept private (--exclude-libs), cuBLAS and cuBLASLt (precision fp8) found through the rpath
CUDA_LDLIBS  = -L$(CUDA_HOME)/lib64 -lcublasLt -lcublas -Xlinker --exclude-libs,ALL -Xlinker -rpath -Xlinker $(CUDA_HOME)/lib64

# (only where nvcc exists and the kernel sources are present)
ifneq ($(NVCC),)
ifneq ($(CUDA_KERNEL_SRCS),)
all: $(CUDA_LIB)
install: install-cuda
endif
endif

cuda: $(CUDA_LIB)
$(CUDA_LIB): $(CUDA_OBJS)
	$(NVCC) -shared $(CUDA_GENCODE) -o $@ $(CUDA_OBJS) $(CUDA_LDLIBS)

kernels/%.o: kernels/%.cu kernels/kernels.h kernels/common.cuh
	$(NVCC) $(NVCC_FLAGS) -c -o $@ $<
kernels/sample.o: src/engine/sample_core.h
kernels/kda.o kernels/kda_chunk_prep_mma.o: kernels/kda_common.cuh
kernels/mla_decode_wg.o: kernels/mla_decode_wg_layout.h
kernels/mla_decode_wg.o kernels/mla_flash_wgmma.o: kernels/wgmma.cuh

src/cuda/%.o: src/cuda/%.c
	$(CC) $(CUDA_CFLAGS) -c -o $@ $<

install-cuda: $(CUDA_LIB)
	$(MKDIR_P) '$(DESTDIR)$(pkglibdir)'
	$(INSTALL_SHLIB) $(CUDA_LIB) '$(DESTDIR)$(pkglibdir)/'

# Programs for the GPU machine (bench/bench-cuda.sh carries them there in
# .gpu/): it has no OpenBLAS, so they link the plain-C stand-in
# src/cuda/device_blas_shim.c, and PCRE2, Jansson, OpenSSL statically.
GPU_DIR     ?= .gpu
DEVICE_LIBS  = src/cuda/device_blas_shim.o -Wl,-Bstatic -lpcre2-8 -ljansson -lcrypto -Wl,-Bdynamic -lisal \
               -lpthread -ldl -lm
cuda-device-bins: $(CUDA_LIB) $(GPU_DIR)/bin/test_cuda.t $(GPU_DIR)/bin/bench_cuda $(GPU_DIR)/bin/kl \
                  $(GPU_DIR)/bin/engine-summarize
$(GPU_DIR)/bin/test_cuda.t: test/engine/test_cuda.c test/engine/tap.h $(ENGINE_OBJS) src/cuda/device_blas_shim.o
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(PG_CFLAGS) $(PG_CPPFLAGS) -Itest/engine -o $@ $< $(ENGINE_OBJS) $(DEVICE_LIBS)
$(GPU_DIR)/bin/bench_cuda: bench/bench_cuda.c $(ENGINE_OBJS) src/cuda/device_blas_shim.o
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(PG_CFLAGS) $(PG_CPPFLAGS) -I$(CUDA_HOME)/include -o $@ $< $(ENGINE_OBJS) $(DEVICE_LIBS) \
		-L$(CUDA_HOME)/lib64 -lcudart -Wl,-rpath,$(CUDA_HOME)/lib64
$(GPU_DIR)/bin/kl: $(CLI_SRCS:.c=.o) $(ENGINE_OBJS) src/cuda/device_blas_shim.o
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $(CLI_SRCS:.c=.o) $(ENGINE_OBJS) $(DEVICE_LIBS)
# the engine's side of bench/bench-batch-sql.sh --gpu
$(GPU_DIR)/bin/engine-summarize: bench/engine-summarize.c $(ENGINE_OBJS) src/cuda/device_blas_shim.o
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(PG_CFLAGS) $(PG_CPPFLAGS) -o $@ $< $(ENGINE_OBJS) $(DEVICE_LIBS)

EXTRA_CLEAN += $(CUDA_LIB) kernels/*.o src/cuda/*.o src/cuda/*.d
.PHONY: cuda install-cuda cuda-device-bins
# ================================================================ end of the CUDA section
