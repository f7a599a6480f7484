# kimi_linear — PostgreSQL extension + inference engine.
#
#   make               the extension (kimi_linear.so), and the CUDA backend where nvcc exists
#   make install       install the extension into the PostgreSQL found by pg_config
#   make cli           the command-line tool ./kl (engine only, no PostgreSQL needed at run time)
#   make check-engine  the engine's C unit tests (TAP, run by prove)
#   make test          everything: engine tests, then pg_regress + pgTAP against a throwaway cluster
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

# -O3 for the numeric code; SIMD paths are selected at run time (target attributes), so no -march.
PG_CFLAGS   = -O3 -std=gnu11 -Wall -Wno-declaration-after-statement -MMD -MP
PG_CPPFLAGS = -Isrc/engine -I$(OPENBLAS_INC)
SHLIB_LINK  = $(ENGINE_LIBS)

# The engine has nothing to gain from LLVM bitcode for JIT inlining, and Debian's
# clang may be absent.
override with_llvm := no

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

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

check-engine: engine-tests cli corpus
	prove --exec '' $(ENGINE_TEST_BINS)

test: all cli engine-tests
	bash test/run-tests.sh

# libFuzzer harnesses for the parsers (needs clang; see test/fuzz/README.md)
FUZZ_CC ?= clang-14
FUZZ_FLAGS = -g -O1 -std=gnu11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -Isrc/engine -I$(OPENBLAS_INC)
FUZZ_ENGINE = $(ENGINE_SRCS)
fuzz: test/fuzz/bin/fuzz_safetensors test/fuzz/bin/fuzz_config test/fuzz/bin/fuzz_state test/fuzz/bin/fuzz_state_crc \
      test/fuzz/bin/fuzz_tokenizer
test/fuzz/bin/fuzz_state_crc: test/fuzz/fuzz_state.c $(ENGINE_SRCS)
	@mkdir -p test/fuzz/bin
	$(FUZZ_CC) $(FUZZ_FLAGS) -DFIX_CRC -o $@ $< $(FUZZ_ENGINE) $(ENGINE_LIBS)
test/fuzz/bin/%: test/fuzz/%.c $(ENGINE_SRCS)
	@mkdir -p test/fuzz/bin
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< $(FUZZ_ENGINE) $(ENGINE_LIBS)

bench: cli
	bash bench/run-bench.sh

# The bundled model: installed where kimi_linear.model_dir points by default.
MODEL_DIR_INSTALL = $(DESTDIR)$(datadir)/kimi_linear/models
install: install-models
install-models:
	$(MKDIR_P) '$(MODEL_DIR_INSTALL)/pgdocs-kimi-18m'
	$(INSTALL_DATA) models/pgdocs-kimi-18m/* '$(MODEL_DIR_INSTALL)/pgdocs-kimi-18m/'

EXTRA_CLEAN = kl test/engine/bin test/fuzz/bin src/cli/*.o src/*/*.d $(CORPUS)

-include $(wildcard src/*/*.d)

.PHONY: fuzz cli corpus engine-tests check-engine test bench install-models

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
CUDA_CFLAGS  = -O2 -std=gnu11 -Wall -Wno-declaration-after-statement -fPIC -fvisibility=hidden -MMD -MP \
               -Isrc/engine -I$(OPENBLAS_INC) -I$(CUDA_HOME)/include
NVCC_FLAGS   = -O3 -std=c++17 $(CUDA_GENCODE) -Xcompiler -fPIC,-fvisibility=hidden
# cudart linked statically and kept private (--exclude-libs), cuBLAS found through the rpath
CUDA_LDLIBS  = -L$(CUDA_HOME)/lib64 -lcublas -Xlinker --exclude-libs,ALL -Xlinker -rpath -Xlinker $(CUDA_HOME)/lib64

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
