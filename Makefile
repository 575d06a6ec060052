# Two entry points that do all set-up on a fresh machine (see README.md).
PY := .venv/bin/python
TORCH := torch==2.13.0

.venv/installed: pyproject.toml
	python3 -m venv .venv
	# torch first: anything that needs torch, installed before it, would pull a multi-GB CUDA build.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[data,llm,dev]"
	touch .venv/installed

demo: .venv/installed
	.venv/bin/prunekit demo

# The report test renders report.html in Debian's headless chromium; installed when root
# (CI, a fresh machine), otherwise that one test is skipped outside CI.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq chromium >/dev/null)

test: .venv/installed browser
	$(PY) -m ruff check .
	.venv/bin/lint-imports   # the layer and no-cycle contracts in pyproject.toml
	$(MAKE) docs             # a few seconds: every docstring of the API reference parses
	$(PY) -m pytest

# The API reference from the docstrings (mkdocs + mkdocstrings, mkdocs.yml) into build/site;
# --strict: a docstring griffe cannot parse or a broken link fails the build.
docs: .venv/installed
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict   # (--quiet would hide warnings from strict)

# The bad-input and fault suites at full strength (`make test` runs a bounded sample of
# both, see docs/RELIABILITY.md): hypothesis draws 150 values per case, and the fault
# suite kills at PRUNEKIT_FUZZ events and byte offsets per scenario (50 covers every event).
PRUNEKIT_FUZZ ?= 50
fuzz: .venv/installed
	PRUNEKIT_FUZZ=$(PRUNEKIT_FUZZ) $(PY) -m pytest tests/test_bad_inputs*.py tests/test_faults.py

.PHONY: demo test browser fuzz docs
