# The two commands of the README: `make demo` (set up, then the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-deep test-lowest lint bench mutate docs docs-check leaderboard

setup: $(VENV)/.installed

# pyproject.toml declares ranges; constraints.txt holds the exact versions CI uses (torch 2.14.1, torchvision 0.29.1,
# timm 1.0.31, ...), so the two commands install the same thing everywhere (pip itself included).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt --build-constraint constraints.txt -e ".[dev,demo,export,openvino]"
	touch $@

demo: setup
	$(VENV)/bin/tokenreduce demo

test: setup
	$(PY) -m pytest tests

# The property-based tests (tests/test_properties.py) with the `deep` hypothesis profile: 10x the examples of the CI
# profile, random seeds (CI runs them derandomized, as part of `make test`).
test-deep: setup
	HYPOTHESIS_PROFILE=deep $(PY) -m pytest tests/test_properties.py --hypothesis-show-statistics

# The declared floor (lowest torch, torchvision, timm of pyproject.toml) in its own venv, and the fast subset there.
test-lowest:
	.ci/lowest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks docs

# The documentation site (mkdocs.yml, docs/) into site/ (git-ignored). --strict: a broken link or anchor, a page
# missing from the navigation, an API reference that does not resolve, fails the build. The docs extra comes from
# constraints.txt too; the CLI reference imports the package (docs/hooks.py), so the main setup comes first.
$(VENV)/.installed-docs: $(VENV)/.installed pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[docs]"
	touch $@

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The built site in a headless Chromium (docs/check.py, Playwright from the docs-check extra): console errors,
# images, internal links and anchors, the leaderboard's sorting. The browser is the system's (Debian: `apt-get
# install chromium`); Playwright downloads none.
$(VENV)/.installed-docs-check: $(VENV)/.installed-docs
	$(PY) -m pip install --quiet -c constraints.txt -e ".[docs,docs-check]"
	touch $@

docs-check: docs $(VENV)/.installed-docs-check
	$(PY) docs/check.py

# The leaderboard page, the method pages' tables and the README's headline table, from benchmarks/results/.
leaderboard: setup
	$(PY) benchmarks/leaderboard.py

bench: setup
	$(PY) benchmarks/speed.py

# Mutation testing of core/ and methods/ (not part of CI: about an hour on one core). Config: [tool.mutmut] in
# pyproject.toml; mutmut works in mutants/ (git-ignored) and keeps its results there, so a second run only tests what
# changed. One worker, niced: the machine is shared. The summary goes to reports/mutation/ (see its README.md).
MUTMUT_VERSION ?= 3.8.1
mutate: setup
	$(PY) -m pip install --quiet "mutmut==$(MUTMUT_VERSION)"
	start=$$(date +%s); env -u PYTHONPATH OMP_NUM_THREADS=1 nice -n 10 $(VENV)/bin/mutmut run --max-children 1; \
	  env -u PYTHONPATH $(PY) reports/mutation/summarise.py --label latest --seconds $$(( $$(date +%s) - start ))
