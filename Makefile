# Two commands on a fresh machine: `make demo` (set up .venv, run the demo), `make test`.
# Both create .venv on first use; the install is redone when pyproject.toml changes.
# PYTHON: an interpreter >= 3.11 with the venv module (Debian/Ubuntu: apt install python3-venv).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
EXTRAS := cpu,test,efficientnet
STAMP := $(VENV)/.installed

export FIXRES_NO_PROGRESS ?= 1

.PHONY: setup demo test trt-api lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The main job on the built-in demo data (~4.5 min on 2 CPU cores, after the install).
demo: $(STAMP)
	$(VENV)/bin/fixres-deploy demo --out runs/demo

# The tests: offline and deterministic, no wall-clock assertions (what CI runs first).
test: $(STAMP)
	$(PY) -m pytest -q

# The TensorRT 10.x/11.x API contract tests: download the bindings wheels (CI's second step).
trt-api: $(STAMP)
	$(PY) -m pytest -q -m trt_api

lint: $(STAMP)
	$(VENV)/bin/ruff check fixres_deploy tests tools
	$(VENV)/bin/ruff format --check fixres_deploy tests tools

clean-venv:
	rm -rf $(VENV)
