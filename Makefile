# Every target sets itself up on a fresh machine and skips set-up that is already done:
# stamps under .venv/ remember what was installed and are redone when their inputs change.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
EXTRAS := worker,aml,aml-v1,app,dev

.PHONY: help setup demo test lint bench clean

help:
	@echo "make demo   run the main job locally (Azurite + worker processes) on sample videos"
	@echo "make test   run the test suite (sets everything up first)"
	@echo "make lint   ruff + mypy"
	@echo "make bench  run the benchmarks (they print ratios measured side by side)"

# The node image's pins constrain the development install, so the tests run the versions the
# image ships (tests/test_dockerfile.py checks they agree) and a new upstream release cannot
# change what CI runs overnight.
$(STAMPS)/python: pyproject.toml requirements.txt node_image/requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<27"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" -c node_image/requirements.txt
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/node: package.json package-lock.json | $(STAMPS)/python
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(STAMPS)/ffmpeg: scripts/ensure-ffmpeg.sh | $(STAMPS)/python
	bash scripts/ensure-ffmpeg.sh
	@touch $@

# Only the tests need a browser (the report test renders report.html headless), so the demo
# and `setup` never install one.
$(STAMPS)/chromium: scripts/ensure-chromium.sh | $(STAMPS)/python
	bash scripts/ensure-chromium.sh
	@touch $@

# The live-view test drives `batchctl run` in a real terminal: tmux, for the tests only.
$(STAMPS)/tmux: scripts/ensure-tmux.sh | $(STAMPS)/python
	bash scripts/ensure-tmux.sh
	@touch $@

setup: $(STAMPS)/python $(STAMPS)/node $(STAMPS)/ffmpeg

demo: setup
	$(PY) -m batchctl demo

test: setup $(STAMPS)/chromium $(STAMPS)/tmux
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy batchctl node_image orchestrators activities function_app.py bench tests
	bash scripts/check-infra.sh

bench: setup
	$(PY) -m bench.queue_fill --items 20000 --json
	$(PY) -m bench.manifest_memory --rows 1000000 --json
	$(PY) -m bench.worker --json
	$(PY) -m bench.transform --json
	$(PY) -m bench.segments --json
	$(PY) -m bench.controller --json
	$(PY) -m bench.scale --json
	$(PY) -m bench.endofrun --items 100000 --json
	$(PY) -m bench.copyout --files 5000 --json
	$(PY) -m bench.copyout --files 3000 --latency-ms 10 --json
	$(PY) -m bench.peers --json
	$(PY) -m bench.bookkeeping --items 20000 --json

clean:
	rm -rf $(VENV) .venv-infra node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis
