# The two commands of the README. Both create .venv in the repo root when it is missing.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: sweep test lint venv

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: .venv/.installed

# Main job: a quick sweep on the embedded whisper-base and the embedded Russian set.
sweep: venv
	$(PY) -m sweep.launch --space quick

# The test suite, as CI runs it.
test: venv
	$(PY) -m ruff check sweep tests bench scripts
	$(PY) -m pytest -q -rs

lint: venv
	$(PY) -m ruff check sweep tests bench scripts
