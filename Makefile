# graft — the two set-up commands in the README are `make demo` and `make test`.
# torch is pinned through constraints.txt: a looser range pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
GRAFT   = $(VENV)/bin/graft
STAMP   = $(VENV)/.graft-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# Compile a real model (PP-OCR mobile text-direction classifier, shipped in
# rapidocr-onnxruntime) with the optimize pipeline, then show what changed.
demo: $(STAMP)
	mkdir -p out
	$(GRAFT) compile ppocr-cls -o out/ppocr-cls.opt.onnx --pipeline optimize
	$(GRAFT) diff ppocr-cls out/ppocr-cls.opt.onnx

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

bench: $(STAMP)
	$(PY) bench/bench_rewrite.py

clean:
	rm -rf out .pytest_cache
