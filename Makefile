# qatx: `make test` and `make demo` work on a fresh machine: they create .venv, install the
# pinned dependencies, build the extension and the C++ library, then run.
#   make test                        pytest + GoogleTest/ctest (CPU; CUDA tests skip without a GPU)
#   make test TORCH=torch==2.14.1    the same against another torch
#   make demo                        the end-to-end example on Fashion-MNIST
#   make cuda-compile                compiles the CUDA kernels in a separate venv (torch 2.14.1 + CUDA)
#   make bench                       benchmarks/ops.py on the CPU
#   make sanitize                    the C++ tests built and run under ASan + UBSan (build/sanitize, CI)
#   make sanitize-math               only the torch-free math tests under ASan + UBSan (quick)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := ninja pytest numpy tqdm matplotlib hypothesis==6.170.15
# export: ONNX files (qatx.export.onnx) and running them in the tests
DEPS += onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0
# The stamp names the torch pin and a hash of DEPS, so a changed dependency list reinstalls.
STAMP := $(VENV)/.installed-$(subst =,_,$(TORCH))-$(shell echo "$(DEPS)" | md5sum | cut -c1-8)
CMAKE_BUILD := build/cmake
JOBS ?= $(shell nproc)

CUDA_TORCH ?= torch==2.14.1
CUDA_VENV ?= $(HOME)/.cache/qatx/venv-cuda-$(subst =,,$(subst torch==,torch,$(CUDA_TORCH)))
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda /usr/local/cuda-*))
CUDA_ARCHS ?= 8.0;9.0

FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: test pytest ctest build cmake-build venv gtest demo cuda-compile bench clean sanitize sanitize-math

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(DEPS)
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# GoogleTest from Debian when missing (needs root; otherwise says what to install).
gtest:
	@if [ ! -f /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake ] && [ ! -f /usr/lib/cmake/GTest/GTestConfig.cmake ] && \
	    ! ls /usr/lib/*/cmake/GTest/GTestConfig.cmake >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev; \
	  else echo "GoogleTest is missing: run 'sudo apt-get install libgtest-dev'" >&2; exit 1; fi; \
	fi

build: venv
	MAX_JOBS=$(JOBS) $(PY) setup.py --quiet build_ext --inplace

cmake-build: venv gtest
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(CMAKE_BUILD) -j $(JOBS)

pytest: build
	$(PY) -m pytest -q

ctest: cmake-build
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure -j $(JOBS)

test: build cmake-build
	$(PY) -m pytest -q
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure -j $(JOBS)

# ---- sanitizers (docs/reliability.md) ----
# libqatx and the C++ tests with -fsanitize=address,undefined in their own build tree. libtorch is
# not instrumented and keeps its static registries until exit, so leak detection is off; every
# other ASan/UBSan finding aborts the test. The packaging test is left out (an uninstrumented
# consumer cannot load an ASan-linked library). 88 tests: quant_math (44), histogram_math (7),
# ops (35), finetune (1), qatx_example_run (1); CI runs them after `make test`. On 2 cores, from
# an empty build tree without ccache: 25 min at a load average of 3 (29 min of CPU time, so about
# 15 min on idle cores); with a warm ccache 4 min; the ctest run alone 45-50 s.
SANITIZE_BUILD := build/sanitize
SANITIZE_ENV := ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: venv gtest
	cmake -S . -B $(SANITIZE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQATX_SANITIZE=ON \
	  $$(command -v ccache >/dev/null && echo -DCMAKE_CXX_COMPILER_LAUNCHER=ccache) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
	$(SANITIZE_ENV) cmake --build $(SANITIZE_BUILD) -j $(JOBS)
	$(SANITIZE_ENV) ctest --test-dir $(SANITIZE_BUILD) --output-on-failure -j $(JOBS) -LE packaging

# The torch-free math tests (the quantization and histogram math shared by the CPU and CUDA
# kernels) under ASan + UBSan: about 100 s from an empty build tree. `make sanitize` runs every
# C++ test.
sanitize-math: venv gtest
	cmake -S . -B $(SANITIZE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQATX_SANITIZE=ON \
	  $$(command -v ccache >/dev/null && echo -DCMAKE_CXX_COMPILER_LAUNCHER=ccache) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(SANITIZE_BUILD) -j $(JOBS) --target test_quant_math test_histogram_math
	$(SANITIZE_ENV) ctest --test-dir $(SANITIZE_BUILD) --output-on-failure -j $(JOBS) -R '^(quant_math|histogram_math)\.'

# Compile-only check of the CUDA kernels (nothing can run them without a GPU). The venv lives
# outside the clone so repeated runs reuse it.
cuda-compile:
	@test -n "$(CUDA_HOME)" || { echo "no CUDA toolkit found: set CUDA_HOME" >&2; exit 1; }
	@if [ ! -x $(CUDA_VENV)/bin/python ] || ! $(CUDA_VENV)/bin/python -c 'import torch, ninja' 2>/dev/null; then \
	  rm -rf $(CUDA_VENV) && $(PYTHON) -m venv $(CUDA_VENV) && \
	  $(CUDA_VENV)/bin/pip install --quiet "$(CUDA_TORCH)" ninja numpy; fi
	CUDA_HOME=$(CUDA_HOME) QATX_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=$(JOBS) \
	  $(CUDA_VENV)/bin/python setup.py --quiet build_ext --build-lib build/cuda/lib --build-temp build/cuda/tmp
	@ls build/cuda/lib/qatx/_C*.so

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: 'sudo apt-get install dataset-fashion-mnist', or run examples/fashion_mnist.py --data DIR" >&2; exit 1; fi

demo: build cmake-build $(FASHION_MNIST)/train-images-idx3-ubyte.gz
	PYTHONPATH=python $(PY) examples/fashion_mnist.py --data $(FASHION_MNIST)

bench: build
	PYTHONPATH=python $(PY) benchmarks/ops.py

clean:
	rm -rf build python/qatx/_C*.so
