# Two commands for a fresh clone: `make demo` (train on bundled MNIST) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: install demo test bench bench-audio clean chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test,data]'
	touch $@

install: $(VENV)/.installed

# THREADS=0: the cores other work leaves idle (see the README); THREADS=N: N threads.
THREADS ?= 0
demo: install
	$(BIN)/vqvae --threads $(THREADS) demo

# The browser tests (tests/test_serve.py) drive Debian's Chromium through Playwright: installed here with
# apt-get as root (or passwordless sudo); elsewhere they skip, saying why.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get: browser tests will skip"; \
	else SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if [ -n "$$SUDO" ] && ! sudo -n true 2>/dev/null; then echo "not root: browser tests will skip"; \
	  else $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
	    || echo "apt-get could not install chromium: browser tests will skip"; fi; fi

test: install chromium
	$(BIN)/python -m pytest

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,data,bench]' $(TORCH_PIN)
	touch $@

BENCH_THREADS ?= 1
bench: $(VENV)/.bench
	$(BIN)/python benchmarks/quantizer.py --threads $(BENCH_THREADS)
	$(BIN)/python benchmarks/train.py --threads $(BENCH_THREADS)
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/streaming.py

# The audio codec benchmark: a speech run (under 10 minutes on 2 cores), then bytes and quality against FLAC,
# Opus (opus-tools from Debian, installed here when missing) and 8 kHz mu-law.
bench-audio: $(VENV)/.bench
	command -v opusenc >/dev/null || (apt-get install -y opus-tools || sudo apt-get install -y opus-tools)
	test -f runs/speech/prior/integer/config.json || $(BIN)/vqvae --threads $(THREADS) demo --data speech --out runs/speech
	$(BIN)/python benchmarks/audio_codec.py runs/speech

clean:
	rm -rf $(VENV) runs
