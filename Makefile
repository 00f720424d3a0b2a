# The two commands of the README: `make demo` (set up, then the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-lowest lint bench

setup: $(VENV)/.installed

# pyproject.toml declares ranges; constraints.txt holds the exact versions CI uses (torch 2.14.1, torchvision 0.29.1,
# timm 1.0.31, ...), so the two commands install the same thing everywhere (pip itself included).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,demo,export]"
	touch $@

demo: setup
	$(VENV)/bin/tokenreduce demo

test: setup
	$(PY) -m pytest tests

# The declared floor (lowest torch, torchvision, timm of pyproject.toml) in its own venv, and the fast subset there.
test-lowest:
	.ci/lowest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/speed.py
