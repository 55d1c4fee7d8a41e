# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: demo test bench clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# Editable install in "compat" mode puts the checkout on sys.path, which is
# what lets Twisted find twisted/plugins/mcpr_plugins.py (`twist mcpr`).
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/proxy_overhead.py
	$(BIN)/python bench/tunnel.py
	$(BIN)/python bench/csp_rewrite.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .pytest_cache .hypothesis
	find twisted/plugins -name dropin.cache -delete

# The Debian package (Debian 12: apt-get install dpkg-dev debhelper dh-virtualenv
# python3-venv), built from the committed tree (git HEAD) into dist/; see docs/deploy.md.
.PHONY: deb
deb:
	scripts/build-deb
