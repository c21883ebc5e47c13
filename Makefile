# Two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse .venv and install what they need: torch first (TORCH_SPEC overrides it,
# e.g. TORCH_SPEC="torch==2.11.0"), then dyndepth with its dev extra.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# make test runs the suite on TEST_WORKERS pytest-xdist processes of one thread each (on the project's 2-core CPU:
# 5 min, against 9 min for one process of two threads); TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dyndepth-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dyndepth demo

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) runs .pytest_cache
