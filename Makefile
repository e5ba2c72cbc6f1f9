# The two commands of the README. Both create .venv in the repo root when it is missing.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: sweep test test-slow lint venv

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: .venv/.installed

# Main job: a quick sweep on the embedded whisper-base and the embedded Russian set.
sweep: venv
	$(PY) -m sweep.launch --space quick

# The test suite, as CI runs it: everything but the real-model tests marked `slow`, which
# together with the rest outgrew CI's 30 minutes on 2 cores (run them with `make test-slow`).
# Two workers, a test file each (its module fixtures built once): most of the suite's time is
# sweeps waiting on Ray, process starts and timeouts, which overlap. The slowest tests are
# listed at the end, for the next time the suite nears CI's limit.
test: venv
	$(PY) -m ruff check sweep tests bench scripts
	$(PY) -m pytest -q -rs -m "not slow" -n 2 --dist loadfile --durations=25

# The real embedded whisper-base tests (minutes each on 2 cores), run by hand like bench/.
test-slow: venv
	$(PY) -m pytest -q -rs -m slow

lint: venv
	$(PY) -m ruff check sweep tests bench scripts
