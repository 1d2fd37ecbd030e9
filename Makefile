# Set-up and everyday commands. `make install` is idempotent: it reinstalls the pinned
# dependencies only when requirements change (stamp file keyed on their hash), and installs
# the project itself into .venv (editable) so `python -m slurm.submit|data_prep|pretrain|eval`
# works from any directory, e.g. a cluster job's (stamp redone when pyproject.toml changes).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-gpu.txt 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
PROJECT_STAMP := $(VENV)/.project-installed
# A GPU machine keeps the torch it already has (built for its CUDA).
HAS_CUDA := $(shell $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1 || echo 0)
PYTEST_ARGS ?=

.PHONY: install test lint format demo clean help
help:
	@echo "make install   create .venv: pinned dependencies (CPU torch unless CUDA is present) + this project, editable"
	@echo "make demo      run the end-to-end demo on generated data (CPU is fine)"
	@echo "make test      lint + the CPU test suite (tests/gpu skip without CUDA)"
	@echo "make format    ruff format + autofix"

install: $(PROJECT_STAMP)

# the project, editable: its packages import from this checkout wherever Python runs
$(PROJECT_STAMP): pyproject.toml $(STAMP)
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	@# CPU: DeepSpeed's comm op built now, not in the first training run's start-up (~1 min)
	@[ "$(HAS_CUDA)" = 1 ] || $(VPY) -c "from pretrain.launch import build_cpu_comm_op as b; b()" \
	  || echo "[install] DeepSpeed's CPU comm op did not build (g++ missing?): the first CPU run builds it"
	touch $@

$(STAMP): requirements.txt requirements-gpu.txt
	@set -euo pipefail; \
	if [ "$(HAS_CUDA)" = 1 ]; then \
	  echo "[install] CUDA found: venv over the system torch"; \
	  $(PY) -m venv --system-site-packages $(VENV); \
	  $(VPY) -m pip install -q --upgrade pip; \
	  grep -v '^torch==' requirements.txt > $(VENV)/requirements-notorch.txt; \
	  $(VPY) -m pip install -q --no-build-isolation -r $(VENV)/requirements-notorch.txt; \
	  $(VPY) -m pip install -q --no-deps --no-build-isolation -r requirements-gpu.txt \
	    || echo "[install] GPU extras did not build; see docker/build_gpu_deps.sh (megablocks on CUDA 13 needs a patch)"; \
	else \
	  echo "[install] no CUDA: CPU build of torch"; \
	  $(PY) -m venv $(VENV); \
	  $(VPY) -m pip install -q --upgrade pip; \
	  $(VPY) -m pip install -q "$$(grep '^torch==' requirements.txt)"; \
	  $(VPY) -m pip install -q --no-build-isolation -r requirements.txt; \
	fi; \
	rm -f $(VENV)/.installed-*; touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	@set +e; DS_ACCELERATOR=$${DS_ACCELERATOR:-$$( [ "$(HAS_CUDA)" = 1 ] && echo cuda || echo cpu )} \
	  WANDB_MODE=offline $(VPY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

demo: install
	$(VPY) -m demo --out demo_out

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out
