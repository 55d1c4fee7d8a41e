# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: demo test bench bench-quick bench-store bench-cluster bench-peers clean venv wheel

# The venv is made (again) unless its python runs and has pip: `python3 -m venv` without Debian's
# python3-venv stops after .venv/bin/python, and an upgraded system Python leaves .venv/bin/python
# pointing nowhere; either would otherwise satisfy make for ever.  The check costs a Python start.
ifneq ($(shell $(BIN)/python -c 'import pip' 2>/dev/null && echo ok),ok)
.PHONY: $(BIN)/pip
endif

# What is missing to make it (python3 3.11+, python3-venv), as the one line make stops with.
missing = $(shell scripts/check-prerequisites $(PYTHON))
$(BIN)/pip:
	$(if $(missing),$(error $(missing)))
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# Editable install in "compat" mode puts the checkout on sys.path, which is
# what lets Twisted find twisted/plugins/mcpr_plugins.py (`twist mcpr`).
$(STAMP): $(BIN)/pip setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q tests

# mcpr side by side with its peers (nginx, localtunnel), one interleaved session, then the CSP rewrite;
# a peer that is not installed is skipped, saying how to install it. See bench/README.md.
bench: $(STAMP)
	$(BIN)/python bench/side_by_side.py
	$(BIN)/python bench/csp_rewrite.py

bench-quick: $(STAMP)
	$(BIN)/python bench/side_by_side.py --quick

# What the event store costs per request: the gateway with and without it, interleaved (about 2 minutes; wrk).
bench-store: $(STAMP)
	$(BIN)/python bench/store_cost.py

# The relay cluster: a request through a node that does not hold its tunnel against one through the
# node that does, and 1, 2, 3 relay processes on one port (about 5 minutes; wrk, redis-server).
bench-cluster: $(STAMP)
	$(BIN)/python bench/cluster.py

# The peers and tools of `make bench`: nginx and wrk (Debian packages; needs root), node, the npm
# peers into bench/peers/ (git-ignored; versions pinned by bench/peers.package-lock.json, install
# scripts off), and py-spy into the venv for profiling.
PEERS := bench/peers
bench-peers: $(STAMP)
	command -v nginx >/dev/null && command -v wrk >/dev/null && command -v npm >/dev/null || \
		{ apt-get update && apt-get install -y nginx wrk nodejs npm; }
	mkdir -p $(PEERS)
	cp bench/peers.package.json $(PEERS)/package.json
	cp bench/peers.package-lock.json $(PEERS)/package-lock.json
	cd $(PEERS) && npm ci --ignore-scripts --no-audit --no-fund
	$(BIN)/python -m pip install --quiet py-spy

# mcpr as a wheel, for machines without a clone: dist/mcpr-<version>-py3-none-any.whl, built from
# the committed tree (git HEAD) like the .deb.  Install it into any Python 3.11+ venv, with the
# tested versions of its dependencies:
#   pip install -c requirements.lock dist/mcpr-<version>-py3-none-any.whl
DIST ?= dist
wheel: $(BIN)/python
	@mkdir -p $(DIST) && src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	git archive --format=tar HEAD | tar -xf - -C "$$src" && \
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w $(DIST) "$$src" && \
	ls $(DIST)/mcpr-*.whl

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .pytest_cache .hypothesis
	find twisted/plugins -name dropin.cache -delete

# The Debian package (Debian 12: apt-get install dpkg-dev debhelper dh-virtualenv
# python3-venv), built from the committed tree (git HEAD) into dist/; see docs/deploy.md.
.PHONY: deb
deb:
	scripts/build-deb
