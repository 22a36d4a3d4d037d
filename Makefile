# Set-up and entry points. `make test` is what CI runs; `make demo` is the main job.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export MUJOCO_GL ?= egl

# A second environment from a plain install (test tools only, no `libero` extra): it resolves the newest
# transformers the package allows, which the `libero` extra pins lower. Reused when present.
VENV_LATEST ?= .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python

.PHONY: setup test test-fast test-latest demo clean

$(VENV)/.installed: pyproject.toml
	@scripts/install_system_deps.sh
	@set -e; py=$$(scripts/find_python.sh); \
	  [ -x $(PY) ] || $$py -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q -e ".[test,libero,demo]"; \
	  touch $@

setup: $(VENV)/.installed

$(VENV_LATEST)/.installed: pyproject.toml
	@set -e; py=$$(scripts/find_python.sh); \
	  [ -x $(PY_LATEST) ] || $$py -m venv $(VENV_LATEST); \
	  $(PY_LATEST) -m pip install -q --upgrade pip; \
	  $(PY_LATEST) -m pip install -q -e ".[test]"; \
	  touch $@

# Two pytest workers, one per core: most tests run one single-threaded process at a time. A test file
# stays on one worker (module fixtures such as trained checkpoints are built once).
PYTEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

# The tests marked transformers_range (checkpoints across module layouts, backbone loaders, a policy's
# train / save / load, the benches' model building) on that newest transformers; only their modules
# are collected (others import the `libero` extra's packages).
TRANSFORMERS_RANGE_TESTS := tests/test_checkpoints.py tests/test_golden.py tests/test_backbones.py tests/test_policy.py \
	tests/test_latency_bench.py
test-latest: $(VENV_LATEST)/.installed
	$(PY_LATEST) -m pytest -q -m transformers_range $(TRANSFORMERS_RANGE_TESTS)

demo: setup
	$(PY) -m lerobot_llava3d_fusion.demo

clean:
	rm -rf $(VENV) $(VENV_LATEST) outputs
