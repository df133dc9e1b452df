# aiida-eqml: two commands for a fresh machine (see README.md).
#   make demo   (a) environment + `aiida-eqml local setup` + daemon + the ML self-consistent DFT+U+V loop
#               (eqml.hubbard.self_consistent) on cubic SrTiO3 with the shipped hubbard-tmo model, validated by hp.x
#   make test   (b) environment + the whole test suite (what .ci/run runs)
# Everything lands in the git-ignored .venv of the repo and in ~/.aiida-eqml (the QE virtualenv).

VENV ?= .venv
# jax needs CPython >= 3.11; the first suitable interpreter on the PATH builds the environment.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' \
	2>/dev/null && echo $$p && break; done)
BIN := $(VENV)/bin
# verdi must be on the PATH for the daemon to start its workers.
export PATH := $(CURDIR)/$(BIN):$(PATH)
PYTEST_ARGS ?=

.PHONY: venv demo demo-dfpt test setup clean-venv

$(BIN)/.installed: pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo 'No CPython 3.11-3.13 on the PATH: install one (e.g. apt install python3.11-venv) or run make PYTHON=/path/to/python3.11' >&2; exit 1; fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[tests]'
	@touch $@

venv: $(BIN)/.installed

setup: venv
	$(BIN)/aiida-eqml local setup

# (a) the main job: the ML self-consistent Hubbard loop on a material the model never saw (prints U/V per
# iteration, the final table and the hp.x validation at the converged point).
demo: setup
	@$(BIN)/verdi daemon status >/dev/null 2>&1 || $(BIN)/verdi daemon start 1
	$(BIN)/aiida-eqml hubbard run examples/structures/SrTiO3_perovskite.extxyz --model hubbard-tmo --validate --submit

# aiida-hubbard's own DFPT loop (scf -> hp.x) on AFM NiO at the cheap test cutoffs.
demo-dfpt: setup
	@$(BIN)/verdi daemon status >/dev/null 2>&1 || $(BIN)/verdi daemon start 1
	$(BIN)/python examples/nio_self_consistent_u.py

# (b) the whole suite. pytest exits non-zero on failures, errors and on "no tests collected" (5).
test: venv
	CI=true $(BIN)/python -m pytest tests/ -ra --durations=25 $(PYTEST_ARGS) </dev/null

clean-venv:
	rm -rf $(VENV)
