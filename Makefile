# NÜWA-mini: `make demo` and `make test` each bootstrap .venv on a fresh machine by themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The offline MNIST copy beside the checkout, used when NUWA_DATA is not already set.
SHARED_MNIST := $(abspath ../shared/data/mnist)
ifeq ($(NUWA_DATA),)
ifneq ($(wildcard $(SHARED_MNIST)/train-images-idx3-ubyte.gz),)
export NUWA_DATA := $(SHARED_MNIST)
endif
endif

.PHONY: demo test notebooks bench lint clean

# The stamp depends on pyproject.toml so a changed dependency list re-installs.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# An unpinned torch would pull gigabytes of CUDA packages: install the CPU build first
	# when no torch is present. pyproject only asks for torch>=2.6, which this satisfies.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The demo renders captioned clips, trains the tiny tokenizer for 4 minutes on the CPU (or GPU),
# then measures and draws its reconstructions of held-out Moving MNIST frames into out/demo/.
demo: $(VENV)/.installed
	$(PY) data.py --out out/demo
	$(PY) train.py --stage vqgan --preset tiny --max-seconds 240 --out out/demo
	$(PY) evaluate.py recon --ckpt out/demo/vqgan/ckpt.pt --num-sequences 100 --grid out/demo/vqgan_reconstructions.png

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

notebooks: $(VENV)/.installed
	$(PY) tests/run_notebooks.py --inplace

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf out .pytest_cache
