# Set-up and entry points. `make test` is what CI runs; `make demo` is the main job.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export MUJOCO_GL ?= egl

.PHONY: setup test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	@scripts/install_system_deps.sh
	@set -e; py=$$(scripts/find_python.sh); \
	  [ -x $(PY) ] || $$py -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q -e ".[test,libero,demo]"; \
	  touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) -m lerobot_llava3d_fusion.demo

clean:
	rm -rf $(VENV) outputs
