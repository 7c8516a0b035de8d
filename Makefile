# The README's two commands: `make demo` and `make test`. Both create or update .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imgstream-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv schemas clean bench

venv: $(STAMP)

# torch/torchvision are pinned to the builds these machines carry; facenet-pytorch pins an old
# torch, so it goes in without its dependencies (requests is what it needs besides torch).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-deps facenet-pytorch
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# --durations: the slowest tests, so a suite that grows slower says where.
test: $(STAMP)
	$(PY) -m pytest --durations=15

# JSON Schema files and docs/DEPLOY.md's settings tables (tests fail when either is stale)
schemas: $(STAMP)
	$(PY) -m imgstream.schemas.export
	$(PY) -m imgstream.schemas.settings_doc

# The end-to-end stream benchmark (docs/BENCHMARKS.md); BENCH_ARGS=--quick for a 4-minute check.
bench: $(STAMP)
	$(PY) scripts/bench_stream.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .imgstream
